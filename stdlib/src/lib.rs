//! The qscript script library: everything Rhai. It turns script calls into calls on
//! `qscript-runtime`, and holds the [`Session`] that runs recipes cell by cell.
//!
//! | module | what it gives scripts |
//! |---|---|
//! | global | `params(#{ ... })`: recipe knobs with `--set` overrides |
//! | `io` | `read_text`, `write_text`, `read_json`, `output_dir`, all through the sandbox |
//! | `model` | `load` (HF checkpoints), `tiny`; `m.save`, `m.generate`, `m.chat` |
//! | `tokenizer` | `load`, `builtin`; `tok.encode`, `tok.decode`, `tok.apply_chat_template` |
//!
//! ```
//! use std::sync::Arc;
//! use qscript_stdlib::{BufferSink, RunOptions, Session};
//! let dir = tempfile::tempdir()?;
//! let sink = BufferSink::default();
//! let mut s = Session::new(&RunOptions::new(dir.path(), dir.path().join("out")), Arc::new(sink.clone()))?;
//! assert_eq!(s.eval("1 + 2").unwrap().as_deref(), Some("=> 3 : i64"));
//! s.eval(r#"print("hi")"#).unwrap();
//! assert_eq!(sink.take(), "hi\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

pub mod cells;
pub mod check;
pub mod context;
pub mod diagnostic;
pub mod docs;
pub mod engine;
pub mod error;
pub mod handles;
pub mod modules;
pub mod options;
pub mod progress;
pub mod repl;
pub mod servers;
pub mod session;

pub use context::{BufferSink, OutputSink, RunContext, RunOptions, StdSink};
pub use diagnostic::Failure;
pub use session::{RunReport, ScriptError, Session};

/// The default of `--max-template-steps`.
pub const DEFAULT_MAX_TEMPLATE_STEPS: u64 = qscript_runtime::chat_template::DEFAULT_FUEL;

/// The default of `--max-record-size`.
pub const DEFAULT_MAX_RECORD_SIZE: usize = qscript_runtime::data::sft::DEFAULT_MAX_RECORD_BYTES;
