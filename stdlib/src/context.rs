//! The state a run shares with every script function: the sandbox, `--set` overrides, the cancel
//! token, the memo cache and where output goes. One [`RunContext`] lives for a whole session; the
//! engine carries it as its default tag, so `#[export_module]` functions reach it through
//! [`RunContext::of`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::sandbox::Sandbox;
use rhai::{Dynamic, EvalAltResult, NativeCallContext};

use crate::error::script_error;

/// Where `print`, `debug` and progress text go.
pub trait OutputSink: Send + Sync {
    /// One line of normal output (`print`), without the trailing newline.
    fn out(&self, line: &str);
    /// One line of diagnostics (notices, progress, `debug`), without the trailing newline.
    fn err(&self, line: &str);
    /// A piece of normal output with no newline (streamed generation).
    fn stream(&self, text: &str);
}

/// Prints to the process's stdout and stderr.
#[derive(Debug, Default)]
pub struct StdSink;

#[allow(clippy::print_stdout, clippy::print_stderr)]
impl OutputSink for StdSink {
    fn out(&self, line: &str) {
        println!("{line}");
    }
    fn err(&self, line: &str) {
        eprintln!("{line}");
    }
    fn stream(&self, text: &str) {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Collects output in memory, for tests and transcripts. Both streams go to one buffer, in order;
/// diagnostics are prefixed with `[err] `.
#[derive(Debug, Default, Clone)]
pub struct BufferSink(Arc<Mutex<String>>);

impl BufferSink {
    /// Takes everything written so far.
    pub fn take(&self) -> String {
        std::mem::take(&mut *lock(&self.0))
    }
}

impl OutputSink for BufferSink {
    fn out(&self, line: &str) {
        let mut b = lock(&self.0);
        b.push_str(line);
        b.push('\n');
    }
    fn err(&self, line: &str) {
        let mut b = lock(&self.0);
        b.push_str("[err] ");
        b.push_str(line);
        b.push('\n');
    }
    fn stream(&self, text: &str) {
        lock(&self.0).push_str(text);
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a session was started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Directory relative reads and imports resolve against (the recipe's).
    pub base_dir: PathBuf,
    /// Where the run may write.
    pub output_dir: PathBuf,
    /// Extra readable paths (`--allow-read`).
    pub allow_read: Vec<PathBuf>,
    /// `--set key=value` overrides for `params`, in the order given.
    pub overrides: Vec<(String, String)>,
    /// `--config FILE`: the file and its `key = value` params (under the `--set` ones).
    pub config: Option<(PathBuf, Vec<(String, String)>)>,
    /// `--resume` (the latest checkpoint of the output dir) or `--resume PATH`: what `train::fit`
    /// resumes from when the recipe does not say.
    pub resume: Option<Resume>,
    /// The operation limit that stops runaway scripts (0 = none).
    pub max_operations: u64,
    /// The largest string (bytes), array or blob (items) and map (entries) a script may build
    /// (0 = none), so a runaway value ends in an error, not an out-of-memory abort.
    pub max_value_size: usize,
    /// The most instructions one chat-template render may run (0 = none).
    pub max_template_steps: u64,
    /// The most bytes of rendered text one record may have in `data::sft` (0 = none).
    pub max_record_bytes: usize,
    /// The heap (bytes) past which a running script is stopped (`None`: from the process's
    /// limits, see `qscript_runtime::device::heap_budget`; `Some(0)`: no limit).
    pub max_memory: Option<usize>,
    /// The data-parallel ranks a dry run plans for (`qscript check --nproc-per-node N`); a real
    /// run takes its ranks from its environment (the launcher's or torchrun's variables).
    pub planned_ranks: usize,
    /// The machine a dry run plans for (`qscript check --gpu h100-80gb`); this one by default.
    pub machine: qscript_runtime::device::Machine,
    /// `--fit`: every `train::fit` runs with `auto_fit: true`.
    pub auto_fit: bool,
}

impl RunOptions {
    /// Options for a recipe in `base_dir`, writing to `output_dir`, with the default limits.
    pub fn new(base_dir: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            output_dir: output_dir.into(),
            allow_read: Vec::new(),
            overrides: Vec::new(),
            config: None,
            resume: None,
            max_operations: DEFAULT_MAX_OPERATIONS,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            max_template_steps: qscript_runtime::chat_template::DEFAULT_FUEL,
            planned_ranks: 1,
            machine: qscript_runtime::device::Machine::Here,
            auto_fit: false,
            max_record_bytes: qscript_runtime::data::sft::DEFAULT_MAX_RECORD_BYTES,
            max_memory: None,
        }
    }
}

/// `--resume`: what to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The latest checkpoint in the output dir.
    Latest,
    /// This checkpoint.
    From(PathBuf),
}

/// A param value from outside the recipe, and where it came from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    /// The text to parse as the param's type.
    pub raw: String,
    /// `` `--set lr=2e-4` `` or `` `run.yaml` (key `lr`) ``.
    pub origin: String,
}

impl Override {
    /// Whether the value came from `--config` (not `--set`).
    pub fn from_config(&self) -> bool {
        !self.origin.starts_with("`--set ")
    }

    /// `--config` values, then `--set` ones on top.
    fn all(opts: &RunOptions) -> BTreeMap<String, Override> {
        let mut out = BTreeMap::new();
        if let Some((file, pairs)) = &opts.config {
            for (k, v) in pairs {
                let origin = format!("`{}` (key `{k}`)", file.display());
                out.insert(
                    k.clone(),
                    Override {
                        raw: v.clone(),
                        origin,
                    },
                );
            }
        }
        for (k, v) in &opts.overrides {
            let origin = format!("`--set {k}={v}`");
            out.insert(
                k.clone(),
                Override {
                    raw: v.clone(),
                    origin,
                },
            );
        }
        out
    }
}

/// The default [`RunOptions::max_value_size`]: 64 Mi bytes, items or entries.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1 << 26;

/// The default operation limit: far above any recipe (the heavy work runs natively and counts as
/// one operation), low enough that an endless loop stops within seconds.
pub const DEFAULT_MAX_OPERATIONS: u64 = 200_000_000;

/// State shared by a session and its script functions.
pub struct RunContext {
    /// The path policy.
    pub sandbox: Sandbox,
    /// Stops running work (Ctrl-C, reloads).
    pub cancel: CancelToken,
    /// Output destination.
    pub sink: Arc<dyn OutputSink>,
    /// Memo cache for expensive calls.
    pub memo: Memo,
    pub(crate) overrides: BTreeMap<String, Override>,
    pub(crate) resume: Option<Resume>,
    /// Output dirs this session has trained into (a re-run may start over there).
    pub(crate) trained_dirs: Mutex<BTreeSet<PathBuf>>,
    pub(crate) params_declared: Mutex<Option<Vec<String>>>,
    /// Whether the recipe called `train::options` (which takes the training options of
    /// `--config` and `--set`).
    pub(crate) train_options_taken: Mutex<bool>,
    /// `--config FILE`.
    pub(crate) config_file: Option<PathBuf>,
    pub(crate) imports: Mutex<BTreeSet<PathBuf>>,
    /// The script functions of the code running now, so native code can call script closures
    /// from other threads (`Dataset.map` runs them in parallel).
    pub functions: Mutex<rhai::AST>,
    /// Set while `qscript check` runs a recipe (a dry run): models load from their headers,
    /// training and generation check their options without computing, writes go to the
    /// sandbox's overlay, data functions show what they would feed the model.
    pub check_mode: std::sync::atomic::AtomicBool,
    /// `--max-record-size`.
    pub max_record_bytes: usize,
    /// `--max-memory` (see [`RunOptions::max_memory`]).
    pub max_memory: Option<usize>,
    /// See [`RunOptions::planned_ranks`].
    pub planned_ranks: usize,
    /// See [`RunOptions::machine`].
    pub machine: qscript_runtime::device::Machine,
    /// See [`RunOptions::auto_fit`].
    pub auto_fit: bool,
    /// What a dry run found, by topic (`data`, `model`, `adapters`, `steps`, `memory`, `plan`),
    /// for `qscript check`'s summary; the latest fact of a topic wins.
    pub(crate) check_facts: Mutex<Vec<(String, String)>>,
    /// The `data` fact of each dataset `data::sft` made in a dry run, by the dataset's address
    /// (with its length): training states the one it trains on, not the latest tokenized.
    pub(crate) sft_facts: Mutex<HashMap<usize, (usize, String)>>,
    /// Models without weights "saved" during a dry run, by the directory they would be in, so
    /// a later `model::load` of it gets them back.
    pub(crate) dry_models: Mutex<HashMap<PathBuf, crate::handles::ModelHandle>>,
    /// Whether generation streams token by token by default (the interactive REPL).
    pub stream_by_default: std::sync::atomic::AtomicBool,
    /// Whether the session is the interactive REPL (no command line to add a flag to).
    pub in_repl: std::sync::atomic::AtomicBool,
    /// The servers `m.serve(...)` started (they live as long as the session).
    pub servers: crate::servers::Servers,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl RunContext {
    /// Builds the context; fails on a missing base dir or `--allow-read` path.
    pub fn new(opts: &RunOptions, sink: Arc<dyn OutputSink>) -> qscript_runtime::Result<Self> {
        let sandbox = Sandbox::new(&opts.base_dir, opts.output_dir.clone(), &opts.allow_read)?;
        Ok(Self {
            sandbox,
            cancel: CancelToken::new(),
            sink,
            memo: Memo::default(),
            overrides: Override::all(opts),
            resume: opts.resume.clone(),
            trained_dirs: Mutex::new(BTreeSet::new()),
            params_declared: Mutex::new(None),
            train_options_taken: Mutex::new(false),
            config_file: opts.config.as_ref().map(|(f, _)| f.clone()),
            imports: Mutex::new(BTreeSet::new()),
            functions: Mutex::new(rhai::AST::empty()),
            check_mode: std::sync::atomic::AtomicBool::new(false),
            dry_models: Mutex::new(HashMap::new()),
            max_record_bytes: opts.max_record_bytes,
            max_memory: opts.max_memory,
            planned_ranks: opts.planned_ranks,
            machine: opts.machine.clone(),
            auto_fit: opts.auto_fit,
            check_facts: Mutex::new(Vec::new()),
            sft_facts: Mutex::new(HashMap::new()),
            stream_by_default: std::sync::atomic::AtomicBool::new(false),
            in_repl: std::sync::atomic::AtomicBool::new(false),
            servers: crate::servers::Servers::default(),
        })
    }

    /// The context of the engine running `ctx`.
    pub fn of(ctx: &NativeCallContext) -> Result<Arc<RunContext>, Box<EvalAltResult>> {
        ctx.tag()
            .and_then(|t| t.clone().try_cast::<Arc<RunContext>>())
            .ok_or_else(|| script_error("internal", "the engine has no run context"))
    }

    /// Whether this is a dry run (`qscript check`).
    pub fn checking(&self) -> bool {
        self.check_mode.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How training executes in this run: for real over this process's ranks, or (`qscript
    /// check`) as a dry run that plans for `--nproc-per-node` ranks.
    pub fn training(
        &self,
        model: &qscript_runtime::model::Model,
    ) -> qscript_runtime::Result<(
        qscript_runtime::train::Mode,
        Arc<dyn qscript_runtime::train::collective::Collective>,
    )> {
        use qscript_runtime::train::{Mode, collective};
        if self.checking() {
            let planned = collective::Single::planning(self.planned_ranks);
            return Ok((Mode::Check, Arc::new(planned)));
        }
        model.needs_weights("training")?;
        Ok((Mode::Train, collective::from_env(model)?))
    }

    /// Records a fact for `qscript check`'s summary (during a dry run only).
    pub fn check_fact(&self, topic: &str, fact: String) {
        if !self.checking() {
            return;
        }
        let mut facts = lock(&self.check_facts);
        match facts.iter_mut().find(|(t, _)| t == topic) {
            Some(slot) => slot.1 = fact,
            None => facts.push((topic.to_string(), fact)),
        }
    }

    /// Whether `--set` overrides the param `key`.
    pub fn is_overridden(&self, key: &str) -> bool {
        self.overrides.contains_key(key)
    }

    /// When `--config` or `--set` gave training options (HF's names) that the recipe neither
    /// declares as params nor takes with `train::options`: the error to give.
    pub fn untaken_train_options(&self) -> Option<String> {
        if *lock(&self.train_options_taken) {
            return None;
        }
        let declared = lock(&self.params_declared).clone().unwrap_or_default();
        let train = qscript_runtime::train::TrainConfig::option_names();
        let untaken: Vec<(&String, &Override)> = self
            .overrides
            .iter()
            .filter(|(k, _)| {
                (train.contains(k)
                    || qscript_runtime::train::preference::OPTION_NAMES.contains(&k.as_str()))
                    && !declared.contains(k)
            })
            .collect();
        let listed = if declared.is_empty() {
            "none".to_string()
        } else {
            let names: Vec<_> = declared.iter().map(|k| format!("`{k}`")).collect();
            names.join(", ")
        };
        let take = "the recipe takes those through `train::options`, e.g. \
                    `train::fit(m, ds, train::options(#{ ... }))`";
        match untaken.as_slice() {
            [] => None,
            [(k, o)] => Some(format!(
                "unknown param `{k}` in {}; the recipe declares: {listed}; `{k}` is a training \
                 option: {take}",
                o.origin
            )),
            many => {
                let keys: Vec<_> = many
                    .iter()
                    .map(|(k, o)| format!("`{k}` (in {})", o.origin))
                    .collect();
                Some(format!(
                    "unknown params {}; the recipe declares: {listed}; they are training \
                     options: {take}",
                    keys.join(", ")
                ))
            }
        }
    }

    /// The text `--config` or `--set` gives for `key`.
    pub fn override_raw(&self, key: &str) -> Option<String> {
        self.overrides.get(key).map(|o| o.raw.clone())
    }

    /// Where the param `key`'s value comes from when not from the recipe: `--set` or
    /// `--config FILE`.
    pub fn override_source(&self, key: &str) -> Option<String> {
        let o = self.overrides.get(key)?;
        Some(match (&self.config_file, o.from_config()) {
            (Some(file), true) => format!("--config {}", file.display()),
            _ => "--set".to_string(),
        })
    }

    /// Resolves a directory for reading (model checkpoints, tokenizers): the directory and every
    /// file in it must pass the sandbox, so a symlink inside it cannot reach out.
    pub fn resolve_read_dir(&self, dir: &str) -> qscript_runtime::Result<PathBuf> {
        let real = self.sandbox.resolve_read(dir)?;
        for entry in qscript_runtime::sandbox::list_dir(&real)? {
            self.sandbox.resolve_read(entry)?;
        }
        Ok(real)
    }

    /// Whether `name` is a hub id to look up in the HF cache: it has an id's shape and no such
    /// path exists relative to the recipe (a local path wins, as in `from_pretrained`). Asked of
    /// the sandbox, so a link out of the tree reads as a path (refused alike whether its target
    /// exists or not), never as a missing one.
    pub fn is_hub_id(&self, name: &str) -> bool {
        qscript_runtime::hub::looks_like_id(name)
            && matches!(
                self.sandbox.resolve_read(name),
                Err(qscript_runtime::Error::Io { ref source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
            )
    }

    /// `files`, each checked against the sandbox (their names kept: a hub snapshot's links name
    /// the format their blobs do not).
    pub fn readable_files(&self, files: Vec<PathBuf>) -> qscript_runtime::Result<Vec<PathBuf>> {
        for f in &files {
            self.sandbox.resolve_read(f)?;
        }
        Ok(files)
    }

    /// A directory a recipe names to read: a path (relative to the recipe), or, when no such
    /// path exists and the name has a hub id's shape, that repo's snapshot at `revision` in the
    /// HF cache ([`qscript_runtime::hub`]), whose cache folder becomes readable.
    pub fn resolve_repo_dir(
        &self,
        dir: &str,
        kind: qscript_runtime::hub::RepoType,
        revision: Option<&str>,
    ) -> qscript_runtime::Result<PathBuf> {
        use qscript_runtime::hub;
        if !self.is_hub_id(dir) {
            if revision.is_some() {
                return Err(qscript_runtime::Error::InvalidArgument(format!(
                    "`revision` is for a hub id in the HF cache; `{dir}` is a path"
                )));
            }
            return self.resolve_read_dir(dir);
        }
        let snap = hub::resolve(dir, kind, revision)?;
        self.sandbox.allow_hub_repo(&snap.repo_dir)?;
        self.sink.err(&format!(
            "hub: `{dir}` from the HF cache (`{}`, commit {})",
            snap.repo_dir.display(),
            &snap.commit[..snap.commit.len().min(12)]
        ));
        self.resolve_read_dir(&snap.dir.to_string_lossy())
    }

    /// Resolves a directory for writing under the output directory, creating it (through the
    /// output directory's handle, no link followed).
    pub fn resolve_write_dir(&self, dir: &str) -> qscript_runtime::Result<PathBuf> {
        let probe = self
            .sandbox
            .resolve_write(Path::new(dir).join("config.json"))?;
        Ok(probe.parent().map(Path::to_path_buf).unwrap_or(probe))
    }

    /// Records a file the current cell imported.
    pub(crate) fn note_import(&self, path: &Path) {
        lock(&self.imports).insert(path.to_path_buf());
    }

    /// Returns and clears the imports recorded since the last call.
    pub(crate) fn take_imports(&self) -> BTreeSet<PathBuf> {
        std::mem::take(&mut *lock(&self.imports))
    }
}

/// A cache of expensive results, keyed by function name, arguments and the content hashes of the
/// files they read, so a re-run cell with the same inputs gets the same value instantly.
#[derive(Default)]
pub struct Memo {
    map: Mutex<HashMap<String, Dynamic>>,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo")
            .field("entries", &self.len())
            .finish()
    }
}

impl Memo {
    /// The key for `function` called with `args` (any stable text form) reading `files`.
    pub fn key(function: &str, args: &str, files: &[&Path]) -> qscript_runtime::Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(function.as_bytes());
        h.update(&[0]);
        h.update(args.as_bytes());
        for f in files {
            h.update(&[0]);
            h.update(qscript_runtime::hash::hash_path(f)?.as_bytes());
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// The cached value for `key`, or the result of `compute`, which is stored when it succeeds.
    pub fn get_or_try_insert<E>(
        &self,
        key: &str,
        compute: impl FnOnce() -> Result<Dynamic, E>,
    ) -> Result<Dynamic, E> {
        if let Some(v) = lock(&self.map).get(key) {
            return Ok(v.clone());
        }
        let v = compute()?;
        lock(&self.map).insert(key.to_string(), v.clone());
        Ok(v)
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry.
    pub fn clear(&self) {
        lock(&self.map).clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memo_reuses_until_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.json");
        std::fs::write(&f, "[1]").unwrap();
        let memo = Memo::default();
        let mut calls = 0i32;
        let mut get = |memo: &Memo| {
            let key = Memo::key("data::load", "\"d.json\"", &[&f]).unwrap();
            memo.get_or_try_insert::<()>(&key, || {
                calls += 1;
                Ok(Dynamic::from(rhai::INT::from(calls)))
            })
            .unwrap()
            .as_int()
            .unwrap()
        };
        assert_eq!(get(&memo), 1);
        assert_eq!(get(&memo), 1);
        std::fs::write(&f, "[2]").unwrap();
        assert_eq!(get(&memo), 2);
        assert_eq!(memo.len(), 2);
    }
}
