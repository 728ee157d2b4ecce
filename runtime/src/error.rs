//! One error type for the engine. Every variant names what the user can act on: the file, the
//! option, the shapes. Messages are lower case, with literals in backticks.

use std::path::PathBuf;

/// Result alias used across the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors raised by the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("`{}`: invalid JSON: {source}", path.display())]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: serde_json::Error,
    },
    /// A model or tokenizer config is invalid.
    #[error("`{}`: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, with line and column where serde knows them.
        message: String,
    },
    /// `architectures[0]` is not one qscript implements.
    #[error("unsupported architecture `{name}`; supported: {supported}")]
    UnsupportedArchitecture {
        /// The name in config.json.
        name: String,
        /// The supported names.
        supported: String,
    },
    /// A weight the architecture needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint in `{}`", path.display())]
    MissingTensor {
        /// The HF tensor name.
        name: String,
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// A weight has the wrong shape for the config.
    #[error("tensor `{name}` in `{}` has shape {found:?}, but the config implies {expected:?}", path.display())]
    ShapeMismatch {
        /// The HF tensor name.
        name: String,
        /// The checkpoint directory.
        path: PathBuf,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("`{}`: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to compile or render (including `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// A path is outside what the recipe may touch.
    #[error("{0}")]
    Sandbox(String),
    /// A bad argument or option value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A glob matched no file, or one of its matches could not be read. The message names the
    /// pattern, never a match: a match may lie outside the sandbox.
    #[error("{0}")]
    Glob(String),
    /// The run was cancelled (Ctrl-C, or a watch reload).
    #[error("cancelled")]
    Cancelled,
    /// A tensor op failed inside the training engine: which pass, which layer, on what shape.
    #[error("{op} failed on a micro-batch of {shape:?} (examples x tokens): {source}")]
    Engine {
        /// `forward of layer 3`, `loss`, `backward of layer 0`, ...
        op: String,
        /// The micro-batch shape.
        shape: Vec<usize>,
        /// What candle said.
        source: Box<candle_core::Error>,
    },
    /// An error from candle (its message only: a backtrace candle captured under
    /// `RUST_BACKTRACE` is dropped, never shown to a user).
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(e))
    }
}

/// `e` without the backtraces candle adds when `RUST_BACKTRACE` is set (they are internals:
/// Rust frames and type names).
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        candle_core::Error::WithPath { inner, path } => candle_core::Error::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        candle_core::Error::Context { inner, context } => candle_core::Error::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        other => other,
    }
}

impl Error {
    /// A short, stable name for the kind of error. Scripts see it as `e.kind` in `catch`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } | Error::Glob(_) => "io",
            Error::Json { .. } => "json",
            Error::Sandbox(_) => "sandbox",
            Error::Config { .. } => "config",
            Error::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::Safetensors { .. } => "checkpoint",
            Error::Tokenizer(_) => "tokenizer",
            Error::Template(_) => "template",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Cancelled => "cancelled",
            Error::Candle(_) | Error::Engine { .. } => "tensor",
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
