//! `m.serve(...)`: the model in memory served over the OpenAI API from a recipe or the REPL;
//! training that model publishes each optimizer step's weights to the server.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::sync::Arc;

use qscript_runtime::model::Model;
use qscript_runtime::serve::{ServeOptions, ServedModel, Server};
use qscript_runtime::tokenizer::Tokenizer;
use rhai::{EvalAltResult, Map};
use serde::Deserialize;

use crate::context::RunContext;
use crate::error::{script_error, to_rhai_at};
use crate::handles::{ServerHandle, TokenizerHandle};
use crate::options::from_options;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `m.serve` (vLLM's names where it has them).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServeOpts {
    port: u16,
    host: String,
    api_key: Option<String>,
    name: Option<String>,
    max_num_seqs: usize,
    max_model_len: Option<usize>,
}

impl Default for ServeOpts {
    fn default() -> Self {
        let d = qscript_runtime::serve::ServeOptions::default();
        Self {
            port: d.port,
            host: d.host,
            api_key: None,
            name: None,
            max_num_seqs: d.max_seqs,
            max_model_len: None,
        }
    }
}

/// Whether a recipe may bind `host`: this machine only (a shared recipe never opens a port to
/// the network; `qscript serve --host` does that on purpose).
fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The tokenizer of `m`'s folder, or the built-in one for a model made in code.
fn default_tokenizer(m: &qscript_runtime::model::Model) -> qscript_runtime::Result<Tokenizer> {
    match &m.source {
        None => Tokenizer::builtin(),
        Some(dir) if dir.join("tokenizer.json").is_file() => {
            Tokenizer::load(dir, &qscript_runtime::cancel::CancelToken::new())
        }
        Some(dir) => Err(qscript_runtime::Error::InvalidArgument(format!(
            "`{}` has no `tokenizer.json`: pass `tokenizer` to `serve`",
            dir.display()
        ))),
    }
}

/// Starts serving `model` (a copy of `source`'s weights, or a trainer's) as `m.serve` and
/// `t.serve` do; the server is kept in the session under `source`. Returns its handle and, when
/// one started (not in a dry run), the served model to publish new weights to.
pub(crate) fn start(
    ctx: &NativeCallContext,
    source: &Arc<Model>,
    model: Model,
    opts: Map,
) -> Res<(ServerHandle, Option<Arc<ServedModel>>)> {
    let rc = RunContext::of(ctx)?;
    let mut opts = opts;
    let tok = match opts.remove("tokenizer") {
        None => None,
        Some(t) => Some(t.try_cast::<TokenizerHandle>().ok_or_else(|| {
            let mut e = script_error("serve", "`tokenizer` must be a tokenizer");
            e.set_position(ctx.call_position());
            e
        })?),
    };
    let o: ServeOpts = from_options(ctx, "serve", opts)?;
    if !loopback(&o.host) {
        let mut e = script_error(
            "serve",
            format!(
                "`host: \"{}\"`: a recipe serves this machine only (`127.0.0.1`); \
                 `qscript serve --host` opens a server to the network",
                o.host
            ),
        );
        e.set_position(ctx.call_position());
        return Err(e);
    }
    let tok = match tok {
        Some(t) => t.0,
        None => Arc::new(default_tokenizer(&model).map_err(to_rhai_at(ctx))?),
    };
    let name = o.name.clone().unwrap_or_else(|| {
        model
            .source
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or_else(|| "tiny".into(), |n| n.to_string_lossy().into_owned())
    });
    if rc.checking() || model.is_shapes_only() {
        // A dry run starts nothing.
        rc.check_fact(
            "serve",
            format!(
                "`{name}` on http://{}:{} (not started in a dry run)",
                o.host, o.port
            ),
        );
        return Ok((
            ServerHandle {
                url: format!("http://{}:{}", o.host, o.port),
                id: None,
            },
            None,
        ));
    }
    let sopts = ServeOptions {
        host: o.host,
        port: o.port,
        api_key: o.api_key,
        max_seqs: o.max_num_seqs,
        max_len: o.max_model_len,
        ..ServeOptions::default()
    };
    let served = Arc::new(ServedModel::new(name.clone(), model));
    let server = Server::start(vec![served.clone()], tok, &sopts).map_err(to_rhai_at(ctx))?;
    let url = format!("http://{}", server.addr);
    rc.sink.err(&format!(
        "serving `{name}` on {url} (OpenAI API: /v1/chat/completions, /v1/completions)"
    ));
    let id = rc.servers.add(source.clone(), server);
    Ok((ServerHandle { url, id: Some(id) }, Some(served)))
}

/// The `serve` module: `Model.serve` and the `Server` handle.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod serve_module {
    use rhai::{EvalAltResult, Map};

    use crate::context::RunContext;
    use crate::handles::{ModelHandle, ServerHandle};

    type Res<T> = Result<T, Box<EvalAltResult>>;

    /// Serves the model over the OpenAI API (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/models`, `/health`) in the background and returns the server; the recipe goes on.
    /// While `train::fit` trains this model, requests get the weights of the latest optimizer
    /// step (LoRA); a run that ends with servers still running serves until Ctrl-C.
    ///
    /// # Options
    /// `port` (8000; 0 picks a free one), `host` (`"127.0.0.1"`: recipes serve this machine
    /// only), `api_key`, `name` (the model's name in requests; default its folder's name),
    /// `tokenizer` (default: the one in the model's folder, or the built-in one of
    /// `model::tiny`), `max_num_seqs` (32), `max_model_len` (the model's, at most 4096).
    ///
    /// ```rhai
    /// let srv = model::tiny().serve(#{ port: 0, name: "tiny" });
    /// assert(srv.url.starts_with("http://127.0.0.1:"));
    /// srv.stop();
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn serve(ctx: NativeCallContext, m: &mut ModelHandle, opts: Map) -> Res<ServerHandle> {
        Ok(super::start(&ctx, &m.0, (*m.0).clone(), opts)?.0)
    }

    /// `serve` with the default options (port 8000).
    ///
    /// ```rhai
    /// // let srv = model::load("Qwen/Qwen2.5-0.5B-Instruct").serve();
    /// let m = model::tiny();
    /// assert(type_of(m) == "Model");
    /// ```
    #[rhai_fn(global, pure, name = "serve", return_raw)]
    pub fn serve_default(ctx: NativeCallContext, m: &mut ModelHandle) -> Res<ServerHandle> {
        serve(ctx, m, Map::new())
    }

    /// Where the server listens (`http://127.0.0.1:8000`).
    #[rhai_fn(global, get = "url", pure)]
    pub fn url(s: &mut ServerHandle) -> String {
        s.url.clone()
    }

    /// Whether the server still runs.
    ///
    /// ```rhai
    /// let srv = model::tiny().serve(#{ port: 0 });
    /// assert(srv.running);
    /// srv.stop();
    /// assert(!srv.running);
    /// ```
    #[rhai_fn(global, get = "running", pure, return_raw)]
    pub fn running(ctx: NativeCallContext, s: &mut ServerHandle) -> Res<bool> {
        let rc = RunContext::of(&ctx)?;
        Ok(s.id.is_some_and(|id| rc.servers.is_running(id)))
    }

    /// Stops the server (requests running get an error; nothing else changes).
    ///
    /// ```rhai
    /// let srv = model::tiny().serve(#{ port: 0 });
    /// srv.stop();
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn stop(ctx: NativeCallContext, s: &mut ServerHandle) -> Res<()> {
        let rc = RunContext::of(&ctx)?;
        if let Some(id) = s.id
            && rc.servers.stop(id)
        {
            rc.sink.err(&format!("stopped the server on {}", s.url));
        }
        Ok(())
    }
}
