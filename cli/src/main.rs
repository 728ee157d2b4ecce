//! `qscript`: run, check and watch training recipes, or open the REPL.
//!
//! Exit codes: 0 success, 1 script or user error, 2 usage or internal error, 130 stopped by Ctrl-C.

mod config;
mod launch;
mod repl;
mod serve;
mod watch;

/// mimalloc keeps freed memory for reuse: the CPU engine allocates and frees tensors of tens of
/// megabytes every step (logit chunks, a 152k-row embedding gradient), which the system allocator
/// returns to the kernel and faults back in each time.
/// Also counts the heap in use, so a script growing a value without end is stopped before the
/// process runs out of memory (see `qscript_runtime::device::HEAP_BYTES`).
#[global_allocator]
static ALLOC: Counting = Counting(mimalloc::MiMalloc);

struct Counting(mimalloc::MiMalloc);

// SAFETY: every call is forwarded to mimalloc unchanged; the counter only observes sizes.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: the caller's contract is passed on as is.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            qscript_runtime::device::HEAP_BYTES.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        qscript_runtime::device::HEAP_BYTES.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            qscript_runtime::device::HEAP_BYTES.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            qscript_runtime::device::HEAP_BYTES.fetch_add(new_size, Relaxed);
            qscript_runtime::device::HEAP_BYTES.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Parser, Subcommand};
use qscript_stdlib::context::{DEFAULT_MAX_OPERATIONS, DEFAULT_MAX_VALUE_SIZE, Resume};
use qscript_stdlib::{RunOptions, Session, StdSink};

/// Notebook-style scripting runtime for LLM training recipes.
#[derive(Parser, Debug)]
#[command(name = "qscript", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a recipe (the same as `qscript FILE`).
    Run(RunArgs),
    /// Check a recipe: parse it, resolve its params and run it as a dry run (no weights read, nothing trained or written).
    Check(RunArgs),
    /// Serve a model and its adapters over the OpenAI API (chat and text completions, streamed
    /// or not; continuous batching).
    Serve(serve::ServeArgs),
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// The recipe to run; without one, the REPL opens.
    file: Option<PathBuf>,
    /// Override a param declared with `params(#{ ... })`, e.g. `--set lr=2e-4`.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    set: Vec<(String, String)>,
    /// Resume training from the latest checkpoint in the output dir, or from CHECKPOINT (put it
    /// after the recipe: `qscript recipe.rhai --resume`).
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
    /// Params from a YAML or JSON file (`key: value` per param, as TRL's `--config`); `--set`
    /// goes on top.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Run, then re-run from the first edited cell on every save.
    #[arg(long)]
    watch: bool,
    /// Where the run writes (default `./runs/<recipe-name>`).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Let the recipe read under PATH too (repeatable).
    #[arg(long, value_name = "PATH")]
    allow_read: Vec<PathBuf>,
    /// Stop scripts after this many operations (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_OPERATIONS)]
    max_operations: u64,
    /// The largest string (bytes), array (items) or map (entries) a script may build (0 = no
    /// limit).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_VALUE_SIZE)]
    max_value_size: usize,
    /// The most instructions one chat-template render may run (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = qscript_stdlib::DEFAULT_MAX_TEMPLATE_STEPS)]
    max_template_steps: u64,
    /// The most bytes of rendered text one record may have in `data::sft` (0 = no limit).
    #[arg(long, value_name = "BYTES", default_value_t = qscript_stdlib::DEFAULT_MAX_RECORD_SIZE)]
    max_record_size: usize,
    /// Train data-parallel over N processes on this machine (one per GPU; on the CPU, N
    /// processes), as `torchrun --nproc-per-node N` would start them.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Stop a script whose process heap passes BYTES (default: from the machine's memory, the
    /// container's limit and `ulimit -v`; 0 = no limit).
    #[arg(long, value_name = "BYTES")]
    max_memory: Option<usize>,
    /// `check` only: plan for these GPUs instead of this machine's, e.g. `h100-80gb`,
    /// `2xa100-40gb`, `rtx4090-24gb` or a size (`24GiB`), so a machine without a GPU checks a
    /// cluster's run.
    #[arg(long, value_name = "CARD")]
    gpu: Option<String>,
    /// When a training run would not fit its device, apply the cheapest change that fits (a
    /// smaller micro-batch with more accumulation, checkpointing) and say so (`auto_fit: true`
    /// in every `train::fit`).
    #[arg(long)]
    fit: bool,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected `KEY=VALUE`, found `{s}`")),
    }
}

/// Set by Ctrl-C; the watch loop reads it to tell "cancel the run" from "quit".
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, check) = match cli.command {
        Some(Command::Run(a)) => (a, false),
        Some(Command::Check(a)) => (a, true),
        Some(Command::Serve(a)) => {
            let cancel = qscript_runtime::cancel::CancelToken::new();
            let c = cancel.clone();
            if let Err(e) = ctrlc::set_handler(move || c.cancel()) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            return serve::serve(&a, &cancel);
        }
        None => (cli.run, false),
    };
    match run(&args, check) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The default output dir's name for recipe `f`: its file stem without leading dots, never
/// `.`, `..` or empty (a recipe named `...rhai` would otherwise write into `runs/..`, the working
/// directory); `recipe` when nothing is left.
fn run_name(f: &Path) -> String {
    let stem = f
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = stem.trim_start_matches('.');
    if name.is_empty() {
        "recipe".to_string()
    } else {
        name.to_string()
    }
}

fn run(args: &RunArgs, check: bool) -> anyhow::Result<ExitCode> {
    let cwd = std::env::current_dir()?;
    let (base, name) = match &args.file {
        Some(f) => {
            let dir = f
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (dir.to_path_buf(), run_name(f))
        }
        None => (cwd.clone(), "repl".to_string()),
    };
    let mut args = args.clone();
    // `qscript --resume recipe.rhai`: clap took the recipe for the checkpoint.
    if args.file.is_none()
        && let Some(r) = &args.resume
        && Path::new(r)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("rhai"))
    {
        args.file = args.resume.replace(String::new()).map(PathBuf::from);
    }
    let args = &args;
    if let Some(f) = &args.file
        && !f.is_file()
    {
        eprintln!("error: cannot read recipe `{}`: no such file", f.display());
        return Ok(ExitCode::from(1));
    }
    if let Some(n) = args.nproc_per_node {
        if n == 0 {
            eprintln!("error: `--nproc-per-node` is 0; expected 1 or more");
            return Ok(ExitCode::from(2));
        }
        if args.file.is_none() || args.watch {
            eprintln!("error: `--nproc-per-node` runs a recipe: give one, without `--watch`");
            return Ok(ExitCode::from(2));
        }
        // A dry run plans for the ranks without starting them (`planned_ranks` below).
        if !check && n > 1 && std::env::var_os("RANK").is_none() {
            ctrlc::set_handler(|| {
                launch::SIGNALS.fetch_add(1, Ordering::SeqCst);
            })?;
            return launch::launch(n, &launch::rank_args(std::env::args_os().skip(1)));
        }
    }
    let mut opts = RunOptions::new(
        &base,
        args.output_dir
            .clone()
            .unwrap_or(cwd.join("runs").join(name)),
    );
    opts.allow_read.clone_from(&args.allow_read);
    if check {
        // The ranks a dry run plans for: `--nproc-per-node`, else a launcher's `WORLD_SIZE`.
        opts.planned_ranks = args
            .nproc_per_node
            .unwrap_or_else(qscript_runtime::dist::planned_size);
    }
    if let Some(card) = &args.gpu {
        if !check {
            eprintln!("error: `--gpu` plans a run for other GPUs: use it with `qscript check`");
            return Ok(ExitCode::from(2));
        }
        match card.parse::<qscript_runtime::device::Card>() {
            Ok(c) => opts.machine = qscript_runtime::device::Machine::Named(c),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    opts.overrides.clone_from(&args.set);
    opts.auto_fit = args.fit;
    // Relative to where qscript was started (an absolute path stays as it is).
    opts.resume = args.resume.as_ref().map(|p| {
        if p.is_empty() {
            Resume::Latest
        } else {
            Resume::From(cwd.join(p))
        }
    });
    if let Some(path) = &args.config {
        match config::load(path) {
            Ok(pairs) => opts.config = Some((path.clone(), pairs)),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    opts.max_operations = args.max_operations;
    opts.max_value_size = args.max_value_size;
    opts.max_template_steps = args.max_template_steps;
    opts.max_record_bytes = args.max_record_size;
    opts.max_memory = args.max_memory;
    let mut session = match Session::new(&opts, Arc::new(StdSink)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // Ranks other than 0 write nothing: their writes go to a throw-away overlay (on the output
    // dir's disk, not /tmp: a rank may save a whole model), removed when the rank ends.
    let _overlay = match qscript_runtime::dist::World::from_vars(|k| std::env::var(k).ok()) {
        Ok(Some(w)) if w.rank > 0 => {
            let out = session.context().sandbox.output_dir().to_path_buf();
            std::fs::create_dir_all(&out)?;
            let dir = tempfile::Builder::new()
                .prefix(&format!(".rank-{}-", w.rank))
                .tempdir_in(&out)?;
            session
                .context()
                .sandbox
                .set_overlay(Some(dir.path().to_path_buf()));
            Some(dir)
        }
        Ok(_) => None,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let cancel = session.context().cancel.clone();
    ctrlc::set_handler(move || {
        INTERRUPTED.store(true, Ordering::SeqCst);
        cancel.cancel();
        // At the REPL's prompt nothing runs to cancel: SIGTERM or SIGHUP ends the REPL.
        if repl::AT_PROMPT.load(Ordering::SeqCst) {
            repl::end_at_prompt(130);
        }
    })?;

    let Some(file) = &args.file else {
        return Ok(if std::io::stdin().is_terminal() {
            repl::interactive(&mut session)?
        } else {
            repl::piped(&mut session)?
        });
    };
    if check {
        return Ok(
            match qscript_stdlib::check::check_and_run(&mut session, file) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            },
        );
    }
    if args.watch {
        return watch::watch(&mut session, file);
    }
    let report = match session.load_file(file) {
        Ok(r) => r,
        Err(e) => return Ok(fail(&e)),
    };
    if let Some(e) = &report.error {
        return Ok(fail(e));
    }
    if let Err(e) = session
        .check_overrides_used()
        .and_then(|()| session.check_train_options_used())
    {
        return Ok(fail(&e));
    }
    serve_on(&session);
    Ok(ExitCode::SUCCESS)
}

/// A recipe that ended with servers running (`m.serve(...)`) serves until Ctrl-C.
fn serve_on(session: &Session) {
    let ctx = session.context();
    let urls = ctx.servers.urls();
    if urls.is_empty() {
        return;
    }
    eprintln!(
        "the recipe ended; still serving on {} (Ctrl-C stops)",
        urls.join(", ")
    );
    while !ctx.cancel.is_cancelled() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ctx.servers.stop_all();
}

/// Prints `e`; a stop (Ctrl-C) is not an error: exit 130, as shells report SIGINT.
fn fail(e: &qscript_stdlib::ScriptError) -> ExitCode {
    eprint!("{e}");
    if !e.rendered.ends_with('\n') {
        eprintln!();
    }
    if e.failure == qscript_stdlib::diagnostic::Failure::Cancelled {
        ExitCode::from(130)
    } else {
        ExitCode::from(1)
    }
}
