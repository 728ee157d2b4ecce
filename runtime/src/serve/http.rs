//! The OpenAI-compatible HTTP routes (axum on tokio): `POST /v1/chat/completions`,
//! `POST /v1/completions` (both streamed as server-sent events with `stream: true`),
//! `GET /v1/models`, `GET /health`; an optional API key checked on every route. Each request
//! becomes a [`Job`] for the engine; its tokens come back over a channel, and a client that goes
//! away drops the channel, which ends its sequence.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, ApiError, Prompt, Request};
use super::engine::{EngineHandle, Event, Finish, Job};
use crate::detok::Detok;
use crate::model::generate::GenerateOptions;
use crate::tokenizer::{TemplateOptions, Tokenizer};

/// What every route shares.
pub struct AppState {
    /// The engine's queue.
    pub engine: EngineHandle,
    /// Served names, in the engine's order.
    pub names: Vec<String>,
    /// Per served model, its tokenizer and the ids that end a reply besides the model's eos (the
    /// tokenizer's eos, `<|im_end|>`, `<|eot_id|>`).
    pub tokenizers: Vec<(Arc<Tokenizer>, Vec<u32>)>,
    /// `Authorization: Bearer` key every route requires, if set.
    pub api_key: Option<String>,
    /// When the server started (the models' `created`).
    pub started: u64,
    /// The largest request body taken, bytes.
    pub max_body: usize,
    next_id: AtomicU64,
}

impl AppState {
    /// The state of a server of `names` over `engine`.
    pub fn new(
        engine: EngineHandle,
        names: Vec<String>,
        tokenizers: Vec<Arc<Tokenizer>>,
        api_key: Option<String>,
    ) -> Self {
        let tokenizers = tokenizers
            .into_iter()
            .map(|t| {
                let mut stop_ids: Vec<u32> = t.eos_id().into_iter().collect();
                stop_ids.extend(t.token_to_id("<|im_end|>"));
                stop_ids.extend(t.token_to_id("<|eot_id|>"));
                (t, stop_ids)
            })
            .collect();
        Self {
            engine,
            names,
            tokenizers,
            api_key,
            started: now(),
            max_body: MAX_BODY,
            next_id: AtomicU64::new(1),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, axum::Json(self.body())).into_response()
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(state.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Serves `router` on `addr` until `shutdown` completes; returns the address bound (port 0
/// picks a free one) through `bound` before serving.
pub async fn serve(
    state: Arc<AppState>,
    addr: SocketAddr,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    bound(listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn auth(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn health(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    let s = &state.engine.stats;
    axum::Json(json!({
        "status": "ok",
        "running": s.running.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "max_seqs": state.engine.config.max_seqs,
        "max_model_len": state.engine.config.max_len,
    }))
}

async fn models(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    let data: Vec<Value> = state
        .names
        .iter()
        .map(|n| {
            json!({
                "id": n,
                "object": "model",
                "created": state.started,
                "owned_by": "qscript",
                "max_model_len": state.engine.config.max_len,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

/// The largest request body taken unless told otherwise (a chat of this many bytes is far past
/// any context).
pub const MAX_BODY: usize = 16 << 20;

async fn chat(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req = body.map_err(too_large).and_then(|b| api::chat(&b));
    respond(&state, req, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completion(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req = body.map_err(too_large).and_then(|b| api::completion(&b));
    respond(&state, req, Kind::Text)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A body that could not be read (over the limit, or cut off) as OpenAI's JSON error.
fn too_large(e: BytesRejection) -> ApiError {
    let mut err = ApiError::invalid(
        "body",
        format!(
            "the request body could not be read ({e}); bodies up to {MAX_BODY} bytes are taken"
        ),
    );
    err.status = e.status().as_u16();
    err
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }
    }
}

/// One request, from its checked body to the response.
async fn respond(
    state: &Arc<AppState>,
    req: Result<Request, ApiError>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let req = req?;
    let model = state
        .names
        .iter()
        .position(|n| *n == req.model)
        .ok_or_else(|| ApiError::unknown_model(&req.model, &state.names))?;
    let (tok, stop_ids) = &state.tokenizers[model];
    let prompt = prompt_ids(tok, &req)?;
    let max_len = state.engine.config.max_len;
    if prompt.len() >= max_len {
        return Err(ApiError::invalid(
            if kind == Kind::Chat { "messages" } else { "prompt" },
            format!(
                "This model's maximum context length is {max_len} tokens; the prompt has {} (leave room for at least one new token)",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = max_len - prompt.len();
    let max_new = req.max_tokens.unwrap_or(room).min(room);
    let seed = req.seed.unwrap_or_else(rand::random);
    let prompt_tokens = prompt.len();
    // One sequence a choice, each with its own seed (the request's, then the next ones).
    let mut receivers = Vec::with_capacity(req.n);
    for i in 0..req.n {
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            repetition_penalty: req.repetition_penalty,
            seed: seed.wrapping_add(i as u64),
            stop_ids: stop_ids.clone(),
            ignore_eos: req.ignore_eos,
        };
        opts.validate()
            .map_err(|e| ApiError::invalid("body", e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        state
            .engine
            .submit(Job {
                model,
                prompt: prompt.clone(),
                opts,
                events: tx,
            })
            .map_err(|e| ApiError::server(e.to_string()))?;
        receivers.push(rx);
    }
    let choices = Choices::merge(receivers, &req.stop);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        tokenizer: tok.clone(),
        kind,
        id: format!("{}-{:x}{n:06}", kind.id_prefix(), state.started),
        created: now(),
        model: req.model.clone(),
        prompt_tokens,
        include_usage: req.include_usage,
    };
    if req.stream {
        Ok(stream_reply(reply, choices).into_response())
    } else {
        Ok(whole_reply(reply, choices).await)
    }
}

/// The choices of one request: their engine events merged into one channel (each tagged with its
/// choice's index), and each choice's text so far. A choice that ends early (a stop string) stops
/// its forwarding, which drops its receiver: the engine frees its slot at its next token, as for
/// a client that went away.
struct Choices {
    rx: UnboundedReceiver<(usize, Event)>,
    forwards: Vec<tokio::task::JoinHandle<()>>,
    detok: Vec<Detok>,
    done: Vec<bool>,
}

impl Choices {
    fn merge(receivers: Vec<UnboundedReceiver<Event>>, stop: &[String]) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forwards = receivers
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(e) = r.recv().await {
                        if tx.send((i, e)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect::<Vec<_>>();
        let n = forwards.len();
        Self {
            rx,
            forwards,
            detok: (0..n).map(|_| Detok::new(stop.to_vec())).collect(),
            done: vec![false; n],
        }
    }

    /// A choice is done: nothing more of it is wanted.
    fn end(&mut self, i: usize) {
        self.done[i] = true;
        self.forwards[i].abort();
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// Completion tokens of every choice.
    fn tokens(&self) -> usize {
        self.detok.iter().map(Detok::tokens).sum()
    }
}

impl Drop for Choices {
    fn drop(&mut self) {
        for f in &self.forwards {
            f.abort();
        }
    }
}

/// The prompt's ids: chat messages through the chat template, or the text as it is.
fn prompt_ids(tok: &Tokenizer, req: &Request) -> Result<Vec<u32>, ApiError> {
    let (text, param, special) = match &req.prompt {
        Prompt::Chat { messages, extra } => {
            let opts = TemplateOptions {
                add_generation_prompt: true,
                extra: extra.clone(),
            };
            let text = tok
                .apply_chat_template(messages, &opts)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            (text, "messages", false)
        }
        Prompt::Text(t) => (t.clone(), "prompt", true),
    };
    let ids = tok
        .encode(&text, special)
        .map_err(|e| ApiError::invalid(param, e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt has no tokens"));
    }
    Ok(ids)
}

/// What every chunk and reply of one request names.
struct Reply {
    tokenizer: Arc<Tokenizer>,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
}

impl Reply {
    fn decode(&self) -> impl Fn(&[u32]) -> crate::Result<String> + '_ {
        |ids| self.tokenizer.decode(ids, true)
    }

    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn choice(
        &self,
        index: usize,
        text: &str,
        finish: Option<&str>,
        chunk: bool,
        first: bool,
    ) -> Value {
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": null,
            }),
            (Kind::Chat, true) => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            (Kind::Text, _) => json!({
                "index": index,
                "text": text,
                "finish_reason": finish,
                "logprobs": null,
            }),
        }
    }

    fn envelope(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({
            "id": self.id,
            "object": self.kind.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

fn finish_name(f: Finish, stopped: bool) -> &'static str {
    match (f, stopped) {
        (_, true) | (Finish::Stop, _) => "stop",
        (Finish::Length, false) => "length",
    }
}

/// The whole reply as one JSON body (every choice in order of its index).
async fn whole_reply(reply: Reply, mut ch: Choices) -> Response {
    let n = ch.done.len();
    let mut text = vec![String::new(); n];
    let mut finish: Vec<Option<Finish>> = vec![None; n];
    while !ch.all_done() {
        let Some((i, event)) = ch.rx.recv().await else {
            return ApiError::server("the server's engine stopped").into_response();
        };
        if ch.done[i] {
            continue;
        }
        match event {
            Event::Token(id) => match ch.detok[i].push(id, reply.decode()) {
                Ok(t) => {
                    text[i].push_str(&t);
                    if ch.detok[i].stopped {
                        finish[i] = Some(Finish::Stop);
                        ch.end(i);
                    }
                }
                Err(e) => return ApiError::server(e.to_string()).into_response(),
            },
            Event::Done(f) => {
                match ch.detok[i].finish(reply.decode()) {
                    Ok(t) => text[i].push_str(&t),
                    Err(e) => return ApiError::server(e.to_string()).into_response(),
                }
                finish[i] = Some(f);
                ch.end(i);
            }
            Event::Failed(e) => return ApiError::server(e).into_response(),
        }
    }
    let choices = (0..n)
        .map(|i| {
            let f = finish[i].unwrap_or(Finish::Stop);
            reply.choice(
                i,
                &text[i],
                Some(finish_name(f, ch.detok[i].stopped)),
                false,
                false,
            )
        })
        .collect();
    let mut body = reply.envelope(choices, false);
    body["usage"] = reply.usage(ch.tokens());
    axum::Json(body).into_response()
}

/// Server-sent events: a chunk for each piece of text of each choice (tagged with its index),
/// each choice's final chunk with its finish reason, then, once every choice is done, the usage
/// chunk when asked and `[DONE]`.
fn stream_reply(
    reply: Reply,
    ch: Choices,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        reply: Reply,
        ch: Choices,
        first: Vec<bool>,
        done: bool,
        pending: std::collections::VecDeque<String>,
    }
    let n = ch.done.len();
    let st = St {
        reply,
        ch,
        first: vec![true; n],
        done: false,
        pending: std::collections::VecDeque::new(),
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let chunk = |st: &St, i: usize, text: &str, finish: Option<&str>, first: bool| {
                st.reply
                    .envelope(vec![st.reply.choice(i, text, finish, true, first)], true)
                    .to_string()
            };
            // Choice `i` ends with `finish`; after the last one, the usage and `[DONE]`.
            let end = |st: &mut St, i: usize, finish: &str, text: String| {
                let c = chunk(st, i, &text, Some(finish), false);
                st.pending.push_back(c);
                st.ch.end(i);
                if st.ch.all_done() {
                    if st.reply.include_usage {
                        let mut u = st.reply.envelope(Vec::new(), true);
                        u["usage"] = st.reply.usage(st.ch.tokens());
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
            };
            match st.ch.rx.recv().await {
                Some((i, _)) if st.ch.done[i] => {}
                Some((i, Event::Token(id))) => {
                    let text = match st.ch.detok[i].push(id, st.reply.decode()) {
                        Ok(t) => t,
                        Err(e) => {
                            fail(&mut st.pending, &e.to_string());
                            st.done = true;
                            continue;
                        }
                    };
                    if st.first[i] || !text.is_empty() {
                        let first = st.first[i];
                        st.first[i] = false;
                        let c = chunk(&st, i, &text, None, first);
                        st.pending.push_back(c);
                    }
                    if st.ch.detok[i].stopped {
                        end(&mut st, i, "stop", String::new());
                    }
                }
                Some((i, Event::Done(f))) => {
                    let text = st.ch.detok[i].finish(st.reply.decode()).unwrap_or_default();
                    let name = finish_name(f, st.ch.detok[i].stopped);
                    end(&mut st, i, name, text);
                }
                Some((_, Event::Failed(e))) => {
                    fail(&mut st.pending, &e);
                    st.done = true;
                }
                None => {
                    fail(&mut st.pending, "the server's engine stopped");
                    st.done = true;
                }
            }
        }
    });
    Sse::new(s)
}

fn fail(pending: &mut std::collections::VecDeque<String>, message: &str) {
    pending.push_back(ApiError::server(message).body().to_string());
    pending.push_back("[DONE]".into());
}
