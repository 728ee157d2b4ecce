//! The OpenAI-compatible HTTP routes (axum on tokio): `POST /v1/chat/completions`,
//! `POST /v1/completions` (both streamed as server-sent events with `stream: true`),
//! `GET /v1/models`, `GET /health`; an optional API key checked on every route. Each request
//! becomes a [`Job`] for the engine a choice; their tokens come back over channels and become the
//! reply in `reply.rs`, and a client that goes away drops the channels, which ends its sequences.

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
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::api::{self, ApiError, Prompt, Request};
use super::engine::{EngineHandle, Job};
use super::reply::{Choices, Kind, Reply, stream_reply, whole_reply};
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
                logprobs: req.logprobs,
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
        logprobs: req.logprobs.is_some(),
    };
    if req.stream {
        Ok(stream_reply(reply, choices).into_response())
    } else {
        Ok(whole_reply(reply, choices).await)
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
