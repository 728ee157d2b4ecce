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
    /// A path is outside what the recipe may touch.
    #[error("{0}")]
    Sandbox(String),
    /// A bad argument or option value.
    #[error("{0}")]
    InvalidArgument(String),
    /// The run was cancelled (Ctrl-C, or a watch reload).
    #[error("cancelled")]
    Cancelled,
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A short, stable name for the kind of error. Scripts see it as `e.kind` in `catch`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::Sandbox(_) => "sandbox",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Cancelled => "cancelled",
            Error::Candle(_) => "tensor",
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
