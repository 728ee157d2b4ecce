//! The response to one request: its choices' engine events merged ([`Choices`]), and the reply
//! OpenAI's API gives for them, whole ([`whole_reply`]) or as server-sent events
//! ([`stream_reply`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::ApiError;
use super::engine::{Event, Finish, TokenLogprobs};
use crate::detok::Detok;
use crate::tokenizer::Tokenizer;

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

impl Kind {
    pub(super) fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    pub(super) fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }
    }
}

/// The choices of one request: their engine events merged into one channel (each tagged with its
/// choice's index), and each choice's text so far. A choice that ends early (a stop string) stops
/// its forwarding, which drops its receiver: the engine frees its slot at its next token, as for
/// a client that went away.
pub(super) struct Choices {
    rx: UnboundedReceiver<(usize, Event)>,
    forwards: Vec<tokio::task::JoinHandle<()>>,
    detok: Vec<Detok>,
    done: Vec<bool>,
}

impl Choices {
    pub(super) fn merge(receivers: Vec<UnboundedReceiver<Event>>, stop: &[String]) -> Self {
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

/// What every chunk and reply of one request names.
pub(super) struct Reply {
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) prompt_tokens: usize,
    pub(super) include_usage: bool,
    /// The request asked for log-probabilities.
    pub(super) logprobs: bool,
}

/// Tokens of one choice with their log-probabilities, not yet in a reply, each with the number
/// of characters of the choice's text before it (completions' `text_offset`).
type Logprobs = Vec<(u32, TokenLogprobs, usize)>;

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

    /// A token as the log-probabilities name it: the bytes it stands for (part of a character,
    /// or a special token's text) and their text (lossy where a character is split).
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let b = self.tokenizer.token_bytes(id).unwrap_or_default();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    /// A choice's `logprobs` for `tokens` (null when the request asked for none): chat's
    /// `{content: [{token, logprob, bytes, top_logprobs}]}`, or completions' `{tokens,
    /// token_logprobs, top_logprobs, text_offset}` (the alternatives with the chosen token among
    /// them, as OpenAI's legacy field; two that read the same keep the likelier).
    fn logprobs(&self, tokens: Logprobs) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|(id, lp, _)| {
                        let (t, b) = self.token(*id);
                        let top: Vec<Value> = lp
                            .top
                            .iter()
                            .map(|(a, l)| {
                                let (t, b) = self.token(*a);
                                json!({"token": t, "logprob": l, "bytes": b})
                            })
                            .collect();
                        json!({"token": t, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Text => {
                let (mut names, mut lps, mut tops, mut offsets) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (id, lp, offset) in &tokens {
                    let (t, _) = self.token(*id);
                    offsets.push(*offset);
                    let mut top = serde_json::Map::new();
                    for (a, l) in lp.top.iter().chain([(*id, lp.logprob)].iter()) {
                        top.entry(self.token(*a).0).or_insert(json!(l));
                    }
                    names.push(t);
                    lps.push(lp.logprob);
                    tops.push(Value::Object(top));
                }
                json!({"tokens": names, "token_logprobs": lps, "top_logprobs": tops,
                       "text_offset": offsets})
            }
        }
    }

    fn choice(
        &self,
        index: usize,
        text: &str,
        finish: Option<&str>,
        (chunk, first): (bool, bool),
        logprobs: Value,
    ) -> Value {
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }),
            (Kind::Chat, true) => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
            }
            (Kind::Text, _) => json!({
                "index": index,
                "text": text,
                "finish_reason": finish,
                "logprobs": logprobs,
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
pub(super) async fn whole_reply(reply: Reply, mut ch: Choices) -> Response {
    let n = ch.done.len();
    let mut text = vec![String::new(); n];
    let mut finish: Vec<Option<Finish>> = vec![None; n];
    let mut lps: Vec<Logprobs> = vec![Vec::new(); n];
    let mut chars = vec![0usize; n];
    while !ch.all_done() {
        let Some((i, event)) = ch.rx.recv().await else {
            return ApiError::server("the server's engine stopped").into_response();
        };
        if ch.done[i] {
            continue;
        }
        match event {
            Event::Token(id, lp) => match ch.detok[i].push(id, reply.decode()) {
                Ok(t) => {
                    lps[i].extend(lp.map(|lp| (id, lp, chars[i])));
                    chars[i] += t.chars().count();
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
    let choices = lps
        .into_iter()
        .enumerate()
        .map(|(i, lp)| {
            let f = finish[i].unwrap_or(Finish::Stop);
            reply.choice(
                i,
                &text[i],
                Some(finish_name(f, ch.detok[i].stopped)),
                (false, false),
                reply.logprobs(lp),
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
pub(super) fn stream_reply(
    reply: Reply,
    ch: Choices,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        reply: Reply,
        ch: Choices,
        first: Vec<bool>,
        done: bool,
        pending: std::collections::VecDeque<String>,
        /// Each choice's tokens whose log-probabilities no chunk carried yet (a token whose
        /// text is held back goes with the next chunk), and the characters of its text so far.
        lps: Vec<Logprobs>,
        chars: Vec<usize>,
    }
    let n = ch.done.len();
    let st = St {
        reply,
        ch,
        first: vec![true; n],
        done: false,
        pending: std::collections::VecDeque::new(),
        lps: vec![Vec::new(); n],
        chars: vec![0; n],
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            // Choice `i`'s chunk of `text`, with the log-probabilities of its tokens so far.
            let chunk = |st: &mut St, i: usize, text: &str, finish: Option<&str>, first: bool| {
                let lp = st.reply.logprobs(std::mem::take(&mut st.lps[i]));
                st.reply
                    .envelope(
                        vec![st.reply.choice(i, text, finish, (true, first), lp)],
                        true,
                    )
                    .to_string()
            };
            // Choice `i` ends with `finish`; after the last one, the usage and `[DONE]`.
            let end = |st: &mut St, i: usize, finish: &str, text: String| {
                let c = chunk(&mut *st, i, &text, Some(finish), false);
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
                Some((i, Event::Token(id, lp))) => {
                    st.lps[i].extend(lp.map(|lp| (id, lp, st.chars[i])));
                    let text = match st.ch.detok[i].push(id, st.reply.decode()) {
                        Ok(t) => t,
                        Err(e) => {
                            fail(&mut st.pending, &e.to_string());
                            st.done = true;
                            continue;
                        }
                    };
                    st.chars[i] += text.chars().count();
                    if st.first[i] || !text.is_empty() {
                        let first = st.first[i];
                        st.first[i] = false;
                        let c = chunk(&mut st, i, &text, None, first);
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
