//! `io`: files, through the sandbox. Reads resolve against the recipe's directory (and may reach
//! the output directory and `--allow-read` paths); writes resolve against the output directory.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

/// The `io` module: sandboxed file access.
#[export_module]
pub mod io_module {
    use rhai::EvalAltResult;

    use crate::context::RunContext;
    use crate::error::to_rhai_at;
    use qscript_runtime::Error;

    /// Reads a UTF-8 text file.
    ///
    /// Relative paths resolve against the recipe's directory. Paths outside the sandbox are
    /// refused with an error of kind `sandbox`.
    ///
    /// ```rhai
    /// io::write_text("hello.txt", "hi there");
    /// let text = io::read_text(io::output_dir() + "/hello.txt");
    /// assert(text == "hi there");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn read_text(ctx: NativeCallContext, path: &str) -> Result<String, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.sandbox.resolve_read(path).map_err(to_rhai_at(&ctx))?;
        qscript_runtime::files::read_text(&real).map_err(to_rhai_at(&ctx))
    }

    /// Writes a text file under the output directory (atomically: temp file, then rename) and
    /// returns its absolute path. Missing parent directories are created.
    ///
    /// ```rhai
    /// let path = io::write_text("notes/today.md", "# loss went down");
    /// assert(path.ends_with("today.md"));
    /// ```
    #[rhai_fn(return_raw)]
    pub fn write_text(
        ctx: NativeCallContext,
        path: &str,
        text: &str,
    ) -> Result<String, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        let real = rc
            .sandbox
            .write_atomic(path, text.as_bytes())
            .map_err(to_rhai_at(&ctx))?;
        // In a dry run the file is in the overlay; the script sees the path it stands for.
        Ok(rc.sandbox.shown(&real).to_string_lossy().into_owned())
    }

    /// Reads a JSON file into script values (maps, arrays, strings, numbers, booleans, `()`).
    /// A parse error names the file, line and column.
    ///
    /// ```rhai
    /// io::write_text("cfg.json", `{"r": 8, "target_modules": ["q_proj", "v_proj"]}`);
    /// let cfg = io::read_json(io::output_dir() + "/cfg.json");
    /// assert(cfg.r == 8 && cfg.target_modules.len() == 2);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn read_json(ctx: NativeCallContext, path: &str) -> Result<Dynamic, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.sandbox.resolve_read(path).map_err(to_rhai_at(&ctx))?;
        let text = qscript_runtime::files::read_text(&real).map_err(to_rhai_at(&ctx))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| {
            to_rhai_at(&ctx)(Error::Json {
                path: real.clone(),
                source,
            })
        })?;
        rhai::serde::to_dynamic(value)
    }

    /// The run's output directory (absolute). Written files land here; it may not exist until
    /// the first write.
    ///
    /// ```rhai
    /// assert(io::output_dir().len() > 0);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn output_dir(ctx: NativeCallContext) -> Result<String, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        Ok(rc.sandbox.output_dir().to_string_lossy().into_owned())
    }
}
