//! Fuzzing on stable Rust for every untrusted input qscript parses (no libFuzzer, no nightly).
//!
//! - [`targets`]: one target per input (a safetensors file, `config.json`, a tokenizer, a chat
//!   template, a data file, a `--config` file, a checkpoint file, a recipe), each calling the
//!   public entry point the engine itself calls on that input;
//! - [`mutate`], [`json`], [`synth`]: the engine: byte mutations with a per-target dictionary,
//!   structure-aware mutation of JSON, and `arbitrary`-driven safetensors files;
//! - [`supervise`]: a parent that feeds inputs to a child worker (address-space limit,
//!   per-input timeout), so aborts, stack overflows, OOM and hangs are findings, not the end of
//!   the run; [`bounded`]: one input run in-process under a time bound (`repro`, the tests);
//! - [`corpus`]: the seed corpus (`fuzz/corpus/<target>/`, plus files made at run time from the
//!   built-in model and tokenizer and the shared fixtures) and the findings
//!   (`fuzz/regressions/<target>/`).
//!
//! ```no_run
//! let t = qscript_fuzz::targets::find("model_config").unwrap();
//! let mut h = (t.harness)()?;
//! assert!(h.run(b"{\"num_hidden_layers\": 1e12}").is_err());
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod bounded;
pub mod corpus;
pub mod interesting;
pub mod json;
pub mod mutate;
pub mod supervise;
pub mod synth;
pub mod targets;
