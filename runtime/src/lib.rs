//! The qscript engine: everything that does real work, with no scripting in it.
//!
//! The scripting layer (`qscript-stdlib`) turns Rhai calls into calls on this crate; nothing here
//! knows about Rhai. Today it holds the pieces every later part builds on:
//!
//! - [`sandbox`]: the path policy every file access goes through;
//! - [`cancel`]: a cancel token polled by long native work (Ctrl-C, watch reloads);
//! - [`hash`]: content hashes of files, the keys of the session's memo cache.
//!
//! ```
//! use qscript_runtime::sandbox::Sandbox;
//! let dir = tempfile::tempdir()?;
//! let sb = Sandbox::new(dir.path(), dir.path().join("runs"), &[])?;
//! assert!(sb.resolve_read("/etc/passwd").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(
    missing_docs,
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

pub mod bytes;
pub mod cancel;
pub mod chat_template;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod hash;
pub mod lora;
pub mod model;
pub mod nn;
pub mod notice;
pub mod plan;
pub mod profile;
pub mod sandbox;
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use candle_core;
pub use error::{Error, Result};
