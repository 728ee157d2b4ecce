//! `qscript serve MODEL`: an OpenAI-compatible server for a base model and its PEFT adapters
//! (vLLM's option names: `--lora-modules NAME=DIR`, `--served-model-name`, `--max-model-len`,
//! `--max-num-seqs`, `--api-key`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use qscript_runtime::cancel::CancelToken;
use qscript_runtime::model::load::{LoadOptions, Model};
use qscript_runtime::serve::{ServeOptions, ServedModel, Server};
use qscript_runtime::tokenizer::Tokenizer;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The base model: a directory of HF safetensors, or a hub id in the HF cache.
    pub model: String,
    /// A PEFT adapter served under its own name (repeatable): `NAME=DIR`, or `DIR` (named after
    /// its folder).
    #[arg(
        long = "lora-modules",
        visible_alias = "adapter",
        value_name = "NAME=DIR"
    )]
    pub adapters: Vec<String>,
    /// The base model's name in requests (default: the model as given).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// The address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free one; the one taken is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Positions one sequence may hold, prompt and reply (default: the model's, at most 4096).
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<usize>,
    /// Sequences decoded together at most (the KV cache holds this many).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_num_seqs: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `auto`, `bf16`, `f16` or `f32`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// Loads, serves until Ctrl-C, and says where.
pub fn serve(args: &ServeArgs, cancel: &CancelToken) -> ExitCode {
    match start(args) {
        Ok(server) => {
            let names: Vec<&str> = server.models.iter().map(|m| m.name.as_str()).collect();
            eprintln!(
                "serving {} on http://{} (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models; Ctrl-C stops)",
                names.join(", "),
                server.addr
            );
            server.run_until(cancel);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn start(args: &ServeArgs) -> qscript_runtime::Result<Server> {
    let dir = model_dir(&args.model)?;
    let opts = LoadOptions {
        dtype: args.dtype.clone(),
        device: args.device.clone(),
        ..LoadOptions::default()
    };
    let base = Model::load(&dir, &opts)?;
    let mut adapters = Vec::with_capacity(args.adapters.len());
    for a in &args.adapters {
        let (name, path) = match a.split_once('=') {
            Some((n, p)) if !n.trim().is_empty() => (n.trim().to_string(), PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(a);
                let n = p
                    .file_name()
                    .map_or_else(|| a.clone(), |n| n.to_string_lossy().into_owned());
                (n, p)
            }
        };
        let m = qscript_runtime::lora::load_adapter(&base, &path).map_err(|e| {
            qscript_runtime::Error::InvalidArgument(format!(
                "adapter `{name}` from `{}`: {e}",
                path.display()
            ))
        })?;
        adapters.push((name, path, m));
    }
    // The base's tokenizer, else the first adapter's (trainers save it beside the adapter).
    let tok_dir = std::iter::once(dir.as_path())
        .chain(adapters.iter().map(|(_, p, _)| p.as_path()))
        .find(|d| d.join("tokenizer.json").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            qscript_runtime::Error::InvalidArgument(format!(
                "no `tokenizer.json` in `{}` or beside an adapter",
                dir.display()
            ))
        })?;
    let tokenizer = Arc::new(Tokenizer::load(&tok_dir, &CancelToken::new())?);
    let name = args.served_model_name.clone().unwrap_or(args.model.clone());
    let mut models = vec![Arc::new(ServedModel::new(name, base))];
    for (n, path, m) in adapters {
        // An adapter saved with its tokenizer (the template it was trained with) renders with it.
        let served = if path.join("tokenizer.json").is_file() && path != tok_dir {
            ServedModel::new(n, m)
                .with_tokenizer(Arc::new(Tokenizer::load(&path, &CancelToken::new())?))
        } else {
            ServedModel::new(n, m)
        };
        models.push(Arc::new(served));
    }
    let opts = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_seqs: args.max_num_seqs,
        max_len: args.max_model_len,
        ..ServeOptions::default()
    };
    Server::start(models, tokenizer, &opts)
}

/// A local directory, or a hub id's snapshot in the HF cache.
fn model_dir(model: &str) -> qscript_runtime::Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() || !qscript_runtime::hub::looks_like_id(model) {
        return Ok(p.to_path_buf());
    }
    Ok(qscript_runtime::hub::resolve(model, qscript_runtime::hub::RepoType::Model, None)?.dir)
}
