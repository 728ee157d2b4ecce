//! The targets: one per untrusted input, each calling the engine's own entry point for it.
//!
//! A target is data ([`Target`]): its name, the entry point it calls, the largest input, a
//! dictionary of tokens for the mutator, its seeds made at run time, and a [`Harness`] made once
//! per worker (a temporary directory with the files around the input: a checkpoint next to a
//! fuzzed `config.json`, a tokenizer next to a fuzzed `tokenizer_config.json`, ...). A harness
//! writes each input to its file (the same file each time) and calls the entry point.

mod checkpoint;
mod config;
mod data;
mod hub;
mod model;
mod recipe;
mod text;

use std::path::{Path, PathBuf};

/// What one input did: `Ok`, or the error the entry point returned (its message). A panic is
/// not an outcome: it escapes, and the caller records it.
pub type Outcome = Result<(), String>;

/// A target's per-worker state: it runs inputs.
pub trait Harness {
    /// Runs `input` through the entry point.
    fn run(&mut self, input: &[u8]) -> Outcome;
}

/// How inputs of a target are mutated, beside the byte mutations every target gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Text or bytes with no structure the mutator knows.
    Plain,
    /// A JSON document, or JSON Lines: values mutated after parsing ([`crate::json`]).
    Json,
    /// A safetensors file: also generated from scratch ([`crate::synth`]), names from the seeds.
    Safetensors,
}

/// One fuzz target.
pub struct Target {
    /// Its name on the command line and under `fuzz/corpus/` and `fuzz/regressions/`.
    pub name: &'static str,
    /// The entry point it calls (for `qscript-fuzz list` and the docs).
    pub entry: &'static str,
    /// The largest input, in bytes.
    pub max_len: usize,
    /// How inputs are mutated.
    pub shape: Shape,
    /// Tokens the mutator inserts.
    pub dict: &'static [&'static str],
    /// Seeds made at run time (the built-in model and tokenizer, the shared fixtures when
    /// present), beside `fuzz/corpus/<name>/`.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Makes the per-worker state.
    pub harness: fn() -> anyhow::Result<Box<dyn Harness>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.name)
    }
}

/// Every target.
pub fn all() -> Vec<&'static Target> {
    let mut out: Vec<&'static Target> = Vec::new();
    out.extend(model::TARGETS);
    out.extend(text::TARGETS);
    out.extend(data::TARGETS);
    out.extend(checkpoint::TARGETS);
    out.extend(config::TARGETS);
    out.extend(hub::TARGETS);
    out.extend(recipe::TARGETS);
    out
}

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    all().into_iter().find(|t| t.name == name)
}

/// The shared fixtures (`QSCRIPT_FIXTURES`, else `../shared/fixtures` from the workspace), when
/// present: seeds only, never needed.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("QSCRIPT_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
        PathBuf::from,
    );
    dir.is_dir().then_some(dir)
}

/// The bytes of fixture files at `rel` paths under [`fixtures`], those that exist and are at
/// most `max_len` long.
fn fixture_files(rel: &[&str], max_len: usize) -> Vec<Vec<u8>> {
    let Some(dir) = fixtures() else {
        return Vec::new();
    };
    rel.iter()
        .filter_map(|r| std::fs::read(dir.join(r)).ok())
        .filter(|b| b.len() <= max_len)
        .collect()
}

/// An error of the runtime as an outcome.
fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A temporary directory for a harness, and the file inputs are written to.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::Builder::new().prefix("qscript-fuzz").tempdir()?,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` to `name` in the directory (the same file for every input).
    fn put(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes)
            .map_err(|e| format!("harness: cannot write {}: {e}", p.display()))?;
        Ok(p)
    }
}
