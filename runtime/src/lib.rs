//! The qscript engine: everything that does real work, with no scripting in it and no printing
//! (it reports through return values, events and [`notice`]). The scripting layer
//! (`qscript-stdlib`) turns Rhai calls into calls on this crate.
//!
//! - [`model`]: HF checkpoints and the Llama-family decoder, generation; [`lora`]: PEFT adapters;
//! - [`tokenizer`], [`chat_template`], [`data`]: tokenizers, templates, datasets, tokenization;
//! - [`train`]: the training loop, its plan, executors, objective, callbacks and collective;
//! - [`nn`]: the ops the decoder runs, each with its backward; the fused CUDA kernels beside
//!   their reference ops;
//! - [`plan`]: the memory estimate and the device map (pure arithmetic); [`device`]: devices and
//!   the only queries of a GPU; [`dist`]: the ranks of a data-parallel run (TCP, NCCL);
//! - [`sandbox`]: the path policy every file access goes through; [`files`]: text and JSON files
//!   read through it; [`cancel`]: the cancel token
//!   long native work polls; [`hash`]: content hashes (the session's memo keys);
//! - [`error`], [`notice`], [`profile`], [`bytes`], [`testing`]: the error type, one-line
//!   notices, GPU-time spans, byte counts as messages show them, test helpers.
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
pub mod detok;
pub mod device;
pub mod dist;
pub mod error;
pub mod files;
pub mod gguf;
pub mod hash;
pub mod hub;
pub mod lora;
pub mod model;
pub mod nn;
pub mod notice;
pub mod panic;
pub mod plan;
pub mod profile;
pub mod quant;
pub mod sandbox;
pub mod serve;
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use candle_core;
pub use error::{Error, Result};
