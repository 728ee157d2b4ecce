//! The one place an [`Engine`] is built, so the CLI, the REPL and the tests run the same engine:
//! limits, output routing, cancellation, the sandboxed module resolver and every module.

use std::path::Path;
use std::sync::Arc;

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, Module, ModuleResolver, Position, Shared};

use crate::context::RunContext;
use crate::error::{script_error, to_rhai};
use crate::modules;

/// Call depth allowed to scripts; deeper recursion is stopped with a clear message.
pub const MAX_CALL_LEVELS: usize = 64;

/// Builds the engine for a session.
pub fn build_engine(ctx: &Arc<RunContext>, max_operations: u64, max_value_size: usize) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(max_operations);
    engine.set_max_string_size(max_value_size);
    engine.set_max_array_size(max_value_size);
    engine.set_max_map_size(max_value_size);
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_expr_depths(256, 128);
    engine.set_default_tag(Dynamic::from(ctx.clone()));

    let sink = ctx.sink.clone();
    engine.on_print(move |s| {
        for line in s.split('\n') {
            sink.out(line);
        }
    });
    let sink = ctx.sink.clone();
    engine.on_debug(move |s, src, pos| {
        let at = match (src, pos.line()) {
            (Some(src), Some(l)) => format!("{src}:{l}: "),
            (None, Some(l)) => format!("line {l}: "),
            _ => String::new(),
        };
        sink.err(&format!("{at}{s}"));
    });
    let cancel = ctx.cancel.clone();
    let heap_budget = match ctx.max_memory {
        Some(0) => None,
        Some(n) => Some(n),
        None => qscript_runtime::device::heap_budget(),
    };
    engine.on_progress(move |ops| {
        if cancel.is_cancelled() {
            return Some(Dynamic::from("cancelled"));
        }
        // Values a script grows without a size check (a map filled by index assignment) stop
        // here, before the process is killed for memory: against the heap budget on every
        // operation (one atomic load), against the system's memory every 2^20.
        let heap = qscript_runtime::device::HEAP_BYTES.load(std::sync::atomic::Ordering::Relaxed);
        let over = heap_budget.is_some_and(|b| heap > b).then(|| {
            format!(
                "the heap reached {}, over its budget of {} (`--max-memory N` sets it)",
                qscript_runtime::plan::memory::human(heap as f64),
                qscript_runtime::plan::memory::human(heap_budget.unwrap_or(0) as f64)
            )
        });
        let why = over.or_else(|| {
            ops.is_multiple_of(1 << 20)
                .then(qscript_runtime::device::memory_pressure)
                .flatten()
        });
        if let Some(why) = why {
            return Some(Dynamic::from(format!(
                "error: the script was stopped: {why} (a value growing without end?); \
                 `--max-value-size N` bounds strings, arrays and blobs"
            )));
        }
        None
    });

    engine.set_module_resolver(SandboxedResolver::new(ctx.clone()));
    engine.register_global_module(rhai::exported_module!(modules::core::core_module).into());
    engine.register_global_module(rhai::exported_module!(modules::params::params_module).into());
    crate::handles::register(&mut engine);
    modules::train::register(&mut engine);
    engine.register_static_module(
        "data",
        rhai::exported_module!(modules::data::data_module).into(),
    );
    engine.register_static_module(
        "lora",
        rhai::exported_module!(modules::lora::lora_module).into(),
    );
    engine.register_static_module(
        "train",
        rhai::exported_module!(modules::train::train_module).into(),
    );
    engine.register_static_module("io", rhai::exported_module!(modules::io::io_module).into());
    engine.register_static_module(
        "model",
        rhai::exported_module!(modules::model::model_module).into(),
    );
    engine.register_static_module(
        "serve",
        rhai::exported_module!(modules::serve::serve_module).into(),
    );
    engine.register_static_module(
        "tokenizer",
        rhai::exported_module!(modules::tokenizer::tokenizer_module).into(),
    );
    engine
}

/// Resolves `import "x" as y` relative to the importing file (the recipe's directory for the
/// recipe itself), through the sandbox, and records each imported file so the session can re-run
/// the cells that import a file when it changes. A module is kept by its file's content: the
/// later cells that import it again (a cell's imports carry to the next ones) get the same
/// module without running it again, and an edited file is run anew.
struct SandboxedResolver {
    ctx: Arc<RunContext>,
    files: FileModuleResolver,
    loaded:
        std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, (String, Shared<Module>)>>,
}

impl SandboxedResolver {
    fn new(ctx: Arc<RunContext>) -> Self {
        let mut files = FileModuleResolver::new();
        files.enable_cache(false);
        Self {
            ctx,
            files,
            loaded: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl ModuleResolver for SandboxedResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, Box<EvalAltResult>> {
        let base = self.ctx.sandbox.base();
        let dir = source
            .and_then(|s| Path::new(s).parent())
            .filter(|p| p.is_absolute())
            .unwrap_or(&base);
        let mut file = dir.join(path);
        if file.extension().is_none() {
            file.set_extension("rhai");
        }
        let real = self.ctx.sandbox.resolve_read(&file).map_err(|e| {
            Box::new(EvalAltResult::ErrorInModule(
                path.to_string(),
                to_rhai(e),
                pos,
            ))
        })?;
        self.ctx.note_import(&real);
        // Resolving a module runs it, and its imports resolve here again, on this thread: a
        // file already being imported is a cycle (it would recurse until the stack overflows).
        let cycle = IMPORTING.with(|stack| {
            let stack = stack.borrow();
            stack.contains(&real).then(|| {
                let name = |p: &Path| {
                    p.strip_prefix(&base)
                        .unwrap_or_else(|_| Path::new(p.file_name().unwrap_or(p.as_os_str())))
                        .display()
                        .to_string()
                };
                let start = stack.iter().position(|p| p == &real).unwrap_or(0);
                let mut chain: Vec<String> = stack[start..].iter().map(|p| name(p)).collect();
                chain.push(name(&real));
                chain.join(" -> ")
            })
        });
        if let Some(chain) = cycle {
            return Err(Box::new(EvalAltResult::ErrorInModule(
                path.to_string(),
                script_error(
                    "import",
                    format!("modules import each other in a cycle: {chain}"),
                ),
                pos,
            )));
        }
        let content = qscript_runtime::hash::hash_path(&real).unwrap_or_default();
        let lock = || {
            self.loaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((h, m)) = lock().get(&real)
            && *h == content
        {
            return Ok(m.clone());
        }
        IMPORTING.with(|stack| stack.borrow_mut().push(real.clone()));
        let _pop = PopOnDrop;
        let module = self
            .files
            .resolve(engine, None, &real.to_string_lossy(), pos)?;
        lock().insert(real, (content, module.clone()));
        Ok(module)
    }
}

thread_local! {
    /// The files being imported on this thread, outermost first.
    static IMPORTING: std::cell::RefCell<Vec<std::path::PathBuf>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Pops the innermost file of [`IMPORTING`] when its import ends, however it ends.
struct PopOnDrop;

impl Drop for PopOnDrop {
    fn drop(&mut self) {
        IMPORTING.with(|stack| stack.borrow_mut().pop());
    }
}
