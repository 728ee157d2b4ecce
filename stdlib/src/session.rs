//! A session: one engine, one scope, and the notebook state of a loaded recipe. The REPL, `run`,
//! `--watch` and the tests all drive this type; nothing here touches a terminal.
//!
//! A recipe runs cell by cell. After each cell the session keeps a snapshot of the scope and of the
//! functions defined so far, plus the hashes of the files the cell imported. Loading the same file
//! again compares cells: the first cell whose text or imports changed, or which did not finish last
//! time, is where the run resumes, from the snapshot before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{AST, Dynamic, Engine, EvalAltResult, Scope};

use crate::cells::{self, Cell};
use crate::context::{OutputSink, RunContext, RunOptions, lock};
use crate::diagnostic::{self, Failure};
use crate::docs::{self, FnDoc};

/// An error, already rendered with its source snippet.
#[derive(Clone, Debug)]
pub struct ScriptError {
    /// What kind of failure it was.
    pub failure: Failure,
    /// The rendered message (several lines).
    pub rendered: String,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rendered)
    }
}

impl std::error::Error for ScriptError {}

/// How long one cell ran.
#[derive(Clone, Debug)]
pub struct CellTiming {
    /// The cell's label (`cell 2 "train"`).
    pub label: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a (re)load did.
#[derive(Debug)]
pub struct RunReport {
    /// Cells reused from the previous run, not run again.
    pub reused: usize,
    /// Cells that ran (the last one may have failed).
    pub ran: Vec<CellTiming>,
    /// The error that stopped the run, if any.
    pub error: Option<ScriptError>,
}

impl RunReport {
    /// A one-line summary: `re-ran cells 3-4 (cell 3 0.10s, cell 4 "eval" 0.02s)`.
    pub fn summary(&self) -> String {
        if self.ran.is_empty() {
            return "nothing changed".into();
        }
        let first = self.reused + 1;
        let last = self.reused + self.ran.len();
        let range = if first == last {
            format!("cell {first}")
        } else {
            format!("cells {first}-{last}")
        };
        let times: Vec<_> = self
            .ran
            .iter()
            .map(|t| format!("{} {:.2}s", t.label, t.elapsed.as_secs_f64()))
            .collect();
        let verb = if self.reused == 0 { "ran" } else { "re-ran" };
        format!("{verb} {range} ({})", times.join(", "))
    }
}

/// What `:cells` shows for each cell.
#[derive(Clone, Debug)]
pub struct CellInfo {
    /// The cell's label.
    pub label: String,
    /// First line in the file.
    pub start_line: usize,
    /// Time of its last successful run, if it has one.
    pub elapsed: Option<Duration>,
}

/// A recipe read and compiled, cell by cell, not run.
pub struct CompiledRecipe {
    /// The canonical path.
    pub path: PathBuf,
    /// The whole text.
    pub source: String,
    /// Each cell with its compiled code.
    pub cells: Vec<(Cell, AST)>,
}

struct Snapshot {
    scope: Scope<'static>,
    functions: AST,
    elapsed: Duration,
}

struct CellState {
    cell: Cell,
    ast: AST,
    imports: Vec<(PathBuf, String)>,
    done: Option<Snapshot>,
}

impl CellState {
    /// A compiled cell that has not run.
    fn fresh(cell: Cell, ast: AST) -> Self {
        Self {
            cell,
            ast,
            imports: Vec::new(),
            done: None,
        }
    }
}

struct Notebook {
    path: PathBuf,
    source: String,
    cells: Vec<CellState>,
}

/// A persistent scripting session.
pub struct Session {
    engine: Engine,
    ctx: Arc<RunContext>,
    functions: Vec<FnDoc>,
    std_names: Vec<String>,
    scope: Scope<'static>,
    repl_functions: AST,
    notebook: Option<Notebook>,
    /// What the session held when the loaded recipe was first loaded (the REPL's variables and
    /// functions before `:load`): its first cell starts from it, so loading keeps them.
    before_notebook: (Scope<'static>, AST),
}

impl Session {
    /// A session with the sandbox, overrides and limits of `opts`, printing to `sink`.
    pub fn new(opts: &RunOptions, sink: Arc<dyn OutputSink>) -> qscript_runtime::Result<Self> {
        let ctx = Arc::new(RunContext::new(opts, sink)?);
        // Panics caught below (and inside rhai, as a sort's) print nothing: they become errors.
        qscript_runtime::panic::install_hook();
        qscript_runtime::chat_template::set_max_steps(opts.max_template_steps);
        // A render may build 16 times the text a record may have (0: no limit).
        qscript_runtime::chat_template::set_max_bytes(
            u64::try_from(opts.max_record_bytes)
                .unwrap_or(u64::MAX)
                .saturating_mul(16),
        );
        let engine = crate::engine::build_engine(&ctx, opts.max_operations, opts.max_value_size);
        let functions = docs::collect(&engine);
        let mut std_names: Vec<String> = engine
            .gen_fn_signatures(true)
            .iter()
            .filter_map(|s| s.split('(').next())
            .filter(|n| {
                n.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == ':')
            })
            .map(str::to_string)
            .collect();
        std_names.sort();
        std_names.dedup();
        Ok(Self {
            engine,
            ctx,
            functions,
            std_names,
            scope: Scope::new(),
            repl_functions: AST::empty(),
            before_notebook: (Scope::new(), AST::empty()),
            notebook: None,
        })
    }

    /// The engine (for completion, validation and docs).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The shared run context (cancel token, sandbox, memo cache).
    pub fn context(&self) -> &Arc<RunContext> {
        &self.ctx
    }

    /// Every registered function with its docs.
    pub fn functions(&self) -> &[FnDoc] {
        &self.functions
    }

    /// Names of the variables in the session scope.
    pub fn variables(&self) -> Vec<String> {
        self.scope
            .iter()
            .map(|(name, _, _)| name.to_string())
            .collect()
    }

    /// The variables with the script names of their types (`Dataset`, `string`, `map`), for
    /// completion after `name.`.
    pub fn variable_types(&self) -> Vec<(String, String)> {
        self.scope
            .iter()
            .map(|(name, _, v)| {
                let ty = match self.engine.map_type_name(v.type_name()) {
                    "i64" => "int",
                    "f64" => "float",
                    "string" | "ImmutableString" => "string",
                    t => t,
                };
                (name.to_string(), ty.to_string())
            })
            .collect()
    }

    /// Evaluates one REPL entry against the session scope. Returns the echo of its value
    /// (`=> 3 : i64`), or `None` when it has no value.
    pub fn eval(&mut self, code: &str) -> Result<Option<String>, ScriptError> {
        self.ctx.cancel.reset();
        qscript_runtime::sandbox::activate(Some(self.ctx.sandbox.clone()));
        let ast = self
            .engine
            .compile_with_scope(&self.scope, code)
            .map_err(|e| self.render(&e.into(), "<repl>", code))?;
        let ast = self.repl_functions.merge(&ast);
        *lock(&self.ctx.functions) = ast.clone_functions_only();
        let result = caught(
            || {
                self.engine
                    .eval_ast_with_scope::<Dynamic>(&mut self.scope, &ast)
            },
            rhai::Position::new(1, 1),
        );
        self.repl_functions = ast.clone_functions_only();
        let value = result.map_err(|e| self.render(&e, "<repl>", code))?;
        if value.is_unit() {
            return Ok(None);
        }
        Ok(Some(format!(
            "=> {} : {}",
            self.show(&value),
            self.engine.map_type_name(value.type_name())
        )))
    }

    /// The debug form of a value, through the script's `to_debug` so custom types show nicely.
    fn show(&self, value: &Dynamic) -> String {
        let mut scope = Scope::new();
        scope.push("__value", value.clone());
        self.engine
            .eval_with_scope::<String>(&mut scope, "to_debug(__value)")
            .unwrap_or_else(|_| value.to_string())
    }

    /// Loads a recipe and runs it. If the same file is loaded already, runs only from the first
    /// changed cell; a file that does not parse leaves the state as it was.
    pub fn load_file(&mut self, path: &Path) -> Result<RunReport, ScriptError> {
        let CompiledRecipe {
            path,
            source,
            cells,
        } = self.compile_file(path)?;
        // The recipe's relative paths resolve against its own directory, as `qscript FILE` does.
        if let Some(dir) = path.parent() {
            self.ctx
                .sandbox
                .set_base(dir)
                .map_err(|e| plain_error(&format!("error[sandbox]: {e}")))?;
        }
        let mut fresh: Vec<_> = cells
            .into_iter()
            .map(|(cell, ast)| CellState::fresh(cell, ast))
            .collect();
        let mut old = match self.notebook.take() {
            Some(nb) if nb.path == path => nb.cells,
            _ => {
                // Another recipe: it starts from what the session holds now.
                self.before_notebook = (self.scope.clone(), self.repl_functions.clone());
                Vec::new()
            }
        };
        let reused = first_changed(&old, &fresh);
        for (new, prev) in fresh.iter_mut().zip(old.drain(..)).take(reused) {
            new.imports = prev.imports;
            new.done = prev.done;
        }
        self.notebook = Some(Notebook {
            path,
            source,
            cells: fresh,
        });
        Ok(self.run_from(reused))
    }

    /// Reads and compiles every cell of a recipe without running it. Returns the canonical path,
    /// the source and the compiled cells; the first syntax error is rendered against the file.
    pub fn compile_file(&self, path: &Path) -> Result<CompiledRecipe, ScriptError> {
        let read_err = |e: std::io::Error| plain_error(&format!("`{}`: {e}", path.display()));
        let path = path.canonicalize().map_err(read_err)?;
        let source =
            qscript_runtime::files::read_text(&path).map_err(|e| plain_error(&e.to_string()))?;
        let label = path.to_string_lossy().into_owned();
        let mut out = Vec::new();
        // A cell's `import "x" as y;` lines carry to the cells after it (the module runs once:
        // the resolver keeps it by content), put on the padding line before each later cell.
        let mut imports = String::new();
        for cell in cells::split(&source) {
            let mut text = cell.padded_source();
            if !imports.is_empty() && text.starts_with('\n') {
                text.insert_str(0, &imports);
            }
            imports.push_str(&cells::imports(&cell.text));
            let mut ast = self
                .engine
                .compile(text)
                .map_err(|e| self.render(&e.into(), &label, &source))?;
            ast.set_source(label.as_str());
            out.push((cell, ast));
        }
        Ok(CompiledRecipe {
            path,
            source,
            cells: out,
        })
    }

    /// Loads the current recipe again (`:reload`).
    pub fn reload(&mut self) -> Result<RunReport, ScriptError> {
        let Some(path) = self.notebook.as_ref().map(|n| n.path.clone()) else {
            return Err(plain_error("no file loaded; use `:load FILE` first"));
        };
        self.load_file(&path)
    }

    fn run_from(&mut self, start: usize) -> RunReport {
        self.run_range(start, usize::MAX)
    }

    /// `qscript check`: runs the cells of a recipe up to the first one that loads weights or
    /// trains (`model::load`, `lora::load`, `train::fit`, `.generate(`, `.chat(`), with the run in
    /// check mode (data functions show their first examples). Returns the report and the label of
    /// the cell it stopped before, if any.
    pub fn check_file(&mut self, path: &Path) -> Result<RunReport, ScriptError> {
        let CompiledRecipe {
            path,
            source,
            cells,
        } = self.compile_file(path)?;
        let fresh = cells
            .into_iter()
            .map(|(cell, ast)| CellState::fresh(cell, ast))
            .collect();
        self.notebook = Some(Notebook {
            path,
            source,
            cells: fresh,
        });
        self.before_notebook = (Scope::new(), AST::empty());
        // Writes land in a throw-away overlay that later reads see; nothing under the output dir.
        let overlay = tempfile::tempdir().map_err(|e| ScriptError {
            failure: Failure::Script,
            rendered: format!("error: cannot make a temporary directory for the dry run: {e}"),
        })?;
        self.ctx
            .sandbox
            .set_overlay(Some(overlay.path().to_path_buf()));
        self.ctx
            .check_mode
            .store(true, std::sync::atomic::Ordering::Relaxed);
        lock(&self.ctx.check_facts).clear();
        let report = self.run_range(0, usize::MAX);
        self.ctx
            .check_mode
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.ctx.sandbox.set_overlay(None);
        lock(&self.ctx.dry_models).clear();
        // A dry run's values (shapes-only models, counted trainers) must not serve a real run.
        self.ctx.memo.clear();
        self.notebook = None;
        Ok(report)
    }

    fn run_range(&mut self, start: usize, end: usize) -> RunReport {
        self.ctx.cancel.reset();
        // Reads on this thread check the file they actually open against this run's sandbox.
        qscript_runtime::sandbox::activate(Some(self.ctx.sandbox.clone()));
        let Some(nb) = self.notebook.as_mut() else {
            return RunReport {
                reused: 0,
                ran: Vec::new(),
                error: None,
            };
        };
        let (mut scope, mut functions) =
            match start.checked_sub(1).and_then(|i| nb.cells[i].done.as_ref()) {
                Some(s) => (s.scope.clone(), s.functions.clone()),
                None => self.before_notebook.clone(),
            };
        let mut report = RunReport {
            reused: start,
            ran: Vec::new(),
            error: None,
        };
        for i in start..nb.cells.len().min(end) {
            let state = &mut nb.cells[i];
            state.done = None;
            self.ctx.take_imports();
            let ast = functions.merge(&state.ast);
            *lock(&self.ctx.functions) = ast.clone_functions_only();
            let t0 = Instant::now();
            let start = u16::try_from(state.cell.start_line).unwrap_or(u16::MAX);
            let result = caught(
                || self.engine.run_ast_with_scope(&mut scope, &ast),
                rhai::Position::new(start.max(1), 1),
            );
            let elapsed = t0.elapsed();
            for n in qscript_runtime::notice::take() {
                self.ctx.sink.err(&n);
            }
            state.imports = self
                .ctx
                .take_imports()
                .into_iter()
                .map(|p| {
                    let h = qscript_runtime::hash::hash_path(&p).unwrap_or_default();
                    (p, h)
                })
                .collect();
            report.ran.push(CellTiming {
                label: state.cell.label(),
                elapsed,
            });
            if let Err(e) = result {
                let label = nb.path.to_string_lossy().into_owned();
                for later in &mut nb.cells[i..] {
                    later.done = None;
                }
                let mut names: Vec<_> = scope.iter().map(|(n, _, _)| n.to_string()).collect();
                names.extend(self.std_names.iter().cloned());
                report.error = Some(render_with(&self.functions, names, &e, &label, &nb.source));
                break;
            }
            functions = ast.clone_functions_only();
            state.done = Some(Snapshot {
                scope: scope.clone(),
                functions: functions.clone(),
                elapsed,
            });
        }
        self.scope = scope;
        self.repl_functions = functions;
        report
    }

    /// The cells of the loaded recipe.
    pub fn cells(&self) -> Vec<CellInfo> {
        self.notebook
            .iter()
            .flat_map(|nb| &nb.cells)
            .map(|c| CellInfo {
                label: c.cell.label(),
                start_line: c.cell.start_line,
                elapsed: c.done.as_ref().map(|d| d.elapsed),
            })
            .collect()
    }

    /// The loaded recipe and every file its cells imported: what `--watch` watches.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let Some(nb) = &self.notebook else {
            return Vec::new();
        };
        let mut files = vec![nb.path.clone()];
        for c in &nb.cells {
            files.extend(c.imports.iter().map(|(p, _)| p.clone()));
        }
        files.sort();
        files.dedup();
        files
    }

    /// After a complete run: an error if `--set` was given but the recipe never called `params`
    /// (training options are for `train::options`: see [`Self::check_train_options_used`]), or
    /// if training options were given and the recipe never called `train::options`.
    pub fn check_overrides_used(&self) -> Result<(), ScriptError> {
        if lock(&self.ctx.params_declared).is_some() {
            return Ok(());
        }
        let train = qscript_runtime::train::TrainConfig::option_names();
        let keys: Vec<_> = self
            .ctx
            .overrides
            .keys()
            .filter(|k| !train.contains(k))
            .map(|k| format!("`{k}`"))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        Err(plain_error(&format!(
            "error: params were given with `--set` or `--config` ({}), but the recipe declares \
             none; declare them with `let p = params(#{{ ... }});`",
            keys.join(", ")
        )))
    }

    /// After a complete run: an error if `--set` or `--config` gave training options (HF's names)
    /// that the recipe neither declares as params nor takes with `train::options`.
    pub fn check_train_options_used(&self) -> Result<(), ScriptError> {
        match self.ctx.untaken_train_options() {
            None => Ok(()),
            Some(m) => Err(plain_error(&format!("error: {m}"))),
        }
    }

    /// Renders `err` against `source` (labelled `label`) with this session's names for hints.
    pub fn render_error(&self, err: &EvalAltResult, label: &str, source: &str) -> ScriptError {
        self.render(err, label, source)
    }

    fn render(&self, err: &EvalAltResult, label: &str, source: &str) -> ScriptError {
        let mut names = self.variables();
        names.extend(self.std_names.iter().cloned());
        render_with(&self.functions, names, err, label, source)
    }
}

fn render_with(
    functions: &[FnDoc],
    names: Vec<String>,
    err: &EvalAltResult,
    label: &str,
    source: &str,
) -> ScriptError {
    let cx = diagnostic::Context {
        label,
        source,
        functions,
        names,
    };
    ScriptError {
        failure: diagnostic::failure(err),
        rendered: diagnostic::render(err, &cx),
    }
}

/// Runs a script under `catch_unwind`: a panic in native code it calls (a bug) is a script error
/// at `at` (the cell's first line), not panic text and a dead REPL.
fn caught<T>(
    run: impl FnOnce() -> Result<T, Box<EvalAltResult>>,
    at: rhai::Position,
) -> Result<T, Box<EvalAltResult>> {
    qscript_runtime::panic::catch(run).unwrap_or_else(|message| {
        let message = if message.is_empty() {
            "an internal error stopped this code (a bug in qscript)".to_string()
        } else {
            format!("an internal error stopped this code (a bug in qscript): {message}")
        };
        let mut e = crate::error::script_error("internal", message);
        e.set_position(at);
        Err(e)
    })
}

fn plain_error(message: &str) -> ScriptError {
    let rendered = if message.starts_with("error") {
        message.to_string()
    } else {
        format!("error: {message}")
    };
    ScriptError {
        failure: Failure::Script,
        rendered,
    }
}

/// Index of the first cell of `fresh` that must run: its text or its imports changed, or it did
/// not finish in `old`.
fn first_changed(old: &[CellState], fresh: &[CellState]) -> usize {
    fresh
        .iter()
        .zip(old)
        .take_while(|(new, prev)| {
            prev.done.is_some()
                && new.cell.text == prev.cell.text
                && prev
                    .imports
                    .iter()
                    .all(|(p, h)| qscript_runtime::hash::hash_path(p).is_ok_and(|now| &now == h))
        })
        .count()
}
