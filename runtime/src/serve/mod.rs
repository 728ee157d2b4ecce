//! Serving a model over the OpenAI API: `qscript serve`, or a recipe's `m.serve(...)` (the model
//! in memory, also while it trains).
//!
//! - `engine.rs`: continuous batching on one thread that owns the models and the KV cache;
//! - `slots.rs`: that KV cache, allocated once, one slot per sequence;
//! - `api.rs`: requests checked and errors as OpenAI's JSON;
//! - `http.rs`: the routes (axum on tokio).

pub mod api;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod http;
mod reply;
pub mod slots;

use std::net::SocketAddr;
use std::sync::Arc;

pub use engine::{EngineConfig, ServedModel};

use crate::cancel::CancelToken;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The address to bind (`127.0.0.1` unless opened on purpose).
    pub host: String,
    /// The port (0: any free one).
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every route when set.
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Positions a sequence may hold (prompt and reply); `None`: the model's
    /// `max_position_embeddings`, at most [`DEFAULT_MAX_LEN`].
    pub max_len: Option<usize>,
    /// The largest request body taken, bytes.
    pub max_body: usize,
}

/// The context a server gives each sequence unless told otherwise.
pub const DEFAULT_MAX_LEN: usize = 4096;

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_seqs: 32,
            max_len: None,
            max_body: http::MAX_BODY,
        }
    }
}

/// A running server: its engine thread and its HTTP thread.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The models it serves (publish new weights through them).
    pub models: Vec<Arc<ServedModel>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    engine: Option<std::thread::JoinHandle<()>>,
    cancel: CancelToken,
}

impl Server {
    /// Starts serving `models` (a base and its adapters, each under its name) with `tokenizer`:
    /// allocates the KV cache, binds the address (an error names it when it is taken) and
    /// returns once requests are taken.
    pub fn start(
        models: Vec<Arc<ServedModel>>,
        tokenizer: Arc<Tokenizer>,
        opts: &ServeOptions,
    ) -> Result<Self> {
        let Some(first) = models.first() else {
            return Err(Error::InvalidArgument("nothing to serve".into()));
        };
        let mut names: Vec<String> = Vec::with_capacity(models.len());
        for m in &models {
            if names.contains(&m.name) {
                return Err(Error::InvalidArgument(format!(
                    "two served models are named `{}`; give each its own name",
                    m.name
                )));
            }
            names.push(m.name.clone());
        }
        let base = first.current();
        for m in &models[1..] {
            if m.current().config() != base.config() {
                return Err(Error::InvalidArgument(format!(
                    "`{}` is not the same architecture as `{}`: one server serves one base model and its adapters",
                    m.name, first.name
                )));
            }
        }
        let positions = base.config().max_position_embeddings.max(2);
        let max_len = opts.max_len.unwrap_or(positions.min(DEFAULT_MAX_LEN));
        if max_len < 2 || max_len > positions {
            return Err(Error::InvalidArgument(format!(
                "the context (`--max-model-len`, `max_model_len`) is {max_len}; this model takes 2 to {positions} positions (its `max_position_embeddings`)"
            )));
        }
        if opts.max_seqs == 0 || opts.max_seqs > 4096 {
            return Err(Error::InvalidArgument(format!(
                "the sequences at once (`--max-num-seqs`, `max_num_seqs`) are {}; expected 1 to 4096",
                opts.max_seqs
            )));
        }
        // Each model's tokenizer (its own, or the server's); one whose ids the model's embedding
        // cannot hold is refused before serving.
        let tokenizers: Vec<Arc<Tokenizer>> = models
            .iter()
            .map(|m| m.tokenizer.clone().unwrap_or_else(|| tokenizer.clone()))
            .collect();
        for t in &tokenizers {
            crate::tokenizer::check_fits(t.vocab_size(), base.config().vocab_size, None)?;
        }
        let need = slots::Slots::bytes(&base.decoder, opts.max_seqs, max_len);
        if let Some(free) = crate::device::free_bytes(base.decoder.device())
            && need as u64 > free
        {
            return Err(Error::InvalidArgument(format!(
                "the KV cache for {} sequences of {max_len} positions needs {}, and the GPU has {} free; lower `--max-seqs` or `--max-model-len`",
                opts.max_seqs,
                crate::bytes::human(need as f64),
                crate::bytes::human(free as f64)
            )));
        }
        drop(base);
        let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
            .parse()
            .or_else(|_| {
                use std::net::ToSocketAddrs;
                (opts.host.as_str(), opts.port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or(())
            })
            .map_err(|()| {
                Error::InvalidArgument(format!(
                    "`--host {}` is not an address this machine can bind",
                    opts.host
                ))
            })?;
        let cancel = CancelToken::new();
        let config = EngineConfig {
            max_seqs: opts.max_seqs,
            max_len,
        };
        let (engine, engine_thread) = engine::start(models.clone(), config, cancel.clone())?;
        let mut state = http::AppState::new(engine, names, tokenizers, opts.api_key.clone());
        state.max_body = opts.max_body;
        let state = Arc::new(state);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
        let http = std::thread::Builder::new()
            .name("qscript-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let fail = bound_tx.clone();
                let r = rt.block_on(http::serve(
                    state,
                    addr,
                    move |a| {
                        let _ = bound_tx.send(Ok(a));
                    },
                    async move {
                        let _ = stop_rx.await;
                    },
                ));
                if let Err(e) = &r {
                    let _ = fail.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                }
                r
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start the server: {e}")))?;
        let mut server = Self {
            addr,
            models,
            shutdown: Some(stop_tx),
            http: Some(http),
            engine: Some(engine_thread),
            cancel,
        };
        match bound_rx.recv() {
            Ok(Ok(a)) => {
                server.addr = a;
                Ok(server)
            }
            Ok(Err(e)) => {
                server.stop();
                Err(Error::InvalidArgument(format!(
                    "cannot listen on {addr}: {e}{}",
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (another server runs there: pick another `--port`)"
                    } else {
                        ""
                    }
                )))
            }
            Err(_) => {
                server.stop();
                Err(Error::InvalidArgument(format!(
                    "cannot listen on {addr}: the server's thread ended"
                )))
            }
        }
    }

    /// Serves until `cancel` is cancelled (Ctrl-C), then stops.
    pub fn run_until(mut self, cancel: &CancelToken) {
        while !cancel.is_cancelled() && self.http.as_ref().is_some_and(|h| !h.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.stop();
    }

    /// Stops taking requests, ends running ones and joins the threads.
    pub fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.cancel.cancel();
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
