//! Helpers shared by the integration tests: sessions in temp dirs, REPL transcripts, running the
//! binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use qscript_stdlib::repl::{self, Outcome};
use qscript_stdlib::{BufferSink, RunOptions, Session};

/// A temp dir with `recipe/` (the sandbox base) and `out/` (the output dir).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub sink: BufferSink,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("recipe")).unwrap();
        Self {
            dir,
            sink: BufferSink::default(),
        }
    }

    pub fn recipe_dir(&self) -> PathBuf {
        self.dir.path().join("recipe")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.recipe_dir().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn options(&self) -> RunOptions {
        RunOptions::new(self.recipe_dir(), self.out_dir())
    }

    pub fn session(&self) -> Session {
        self.session_with(&self.options())
    }

    pub fn session_with(&self, opts: &RunOptions) -> Session {
        Session::new(opts, Arc::new(self.sink.clone())).unwrap()
    }

    /// Replaces this env's temp path with `[TMP]` (canonical and as given).
    pub fn filter(&self, text: &str) -> String {
        let canon = self.dir.path().canonicalize().unwrap();
        text.replace(&canon.to_string_lossy().into_owned(), "[TMP]")
            .replace(&self.dir.path().to_string_lossy().into_owned(), "[TMP]")
    }
}

/// Feeds `input` to the REPL line by line, as the CLI does with a pipe, and returns the
/// transcript: `>> ` before the first line of an entry, `.. ` before continuation lines, then
/// what the entry printed, echoed and raised.
pub fn transcript(env: &Env, session: &mut Session, input: &str) -> String {
    let mut out = String::new();
    let mut buffer = String::new();
    for line in input.lines() {
        out.push_str(if buffer.is_empty() { ">> " } else { ".. " });
        out.push_str(line);
        out.push('\n');
        buffer.push_str(line);
        buffer.push('\n');
        if !repl::is_complete(session.engine(), &buffer) {
            continue;
        }
        let outcome = repl::handle(session, &std::mem::take(&mut buffer));
        out.push_str(&env.sink.take());
        match outcome {
            Outcome::Output(s) if !s.is_empty() => {
                out.push_str(&s);
                out.push('\n');
            }
            Outcome::Error(e) => {
                out.push_str(&e.rendered);
                out.push('\n');
            }
            _ => {}
        }
    }
    env.filter(&out)
}

/// The `qscript` binary built for these tests.
pub fn qscript() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qscript"));
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs `qscript` with `args` in `cwd`.
pub fn run_in(cwd: &Path, args: &[&str]) -> Output {
    qscript().current_dir(cwd).args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
