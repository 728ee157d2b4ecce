//! The REPL's logic, free of any terminal: when an entry is complete, what `:` commands do, what
//! completion offers. The CLI feeds it lines from reedline or from a pipe.

use std::fmt::Write as _;
use std::path::Path;

use rhai::{Engine, LexError, ParseErrorType};

use crate::docs;
use crate::session::{ScriptError, Session};

/// The REPL's commands, for `:help` and completion.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        ":help",
        "`:help` lists functions; `:help NAME` shows one function's signature and docs",
    ),
    (
        ":load",
        "`:load FILE` runs a recipe into the session, cell by cell",
    ),
    (
        ":reload",
        "run the loaded recipe again from its first changed cell",
    ),
    (
        ":cells",
        "list the loaded recipe's cells with their last run times",
    ),
    (":quit", "leave the REPL (Ctrl-D does too)"),
];

/// What an entry produced.
#[derive(Debug)]
pub enum Outcome {
    /// Text for stdout (may be empty).
    Output(String),
    /// A rendered error for stderr.
    Error(ScriptError),
    /// `:quit`.
    Quit,
}

/// Whether `input` is a complete entry. Only a missing end makes it incomplete: an unexpected end
/// of input, a token missing at the very end, or an unterminated string. Any other error is
/// complete, so that it is submitted and reported.
pub fn is_complete(engine: &Engine, input: &str) -> bool {
    let trimmed = input.trim();
    if trimmed.starts_with(':') || trimmed.is_empty() {
        return true;
    }
    let Err(err) = engine.compile(input) else {
        return true;
    };
    match err.err_type() {
        ParseErrorType::UnexpectedEOF | ParseErrorType::BadInput(LexError::UnterminatedString) => {
            false
        }
        ParseErrorType::MissingToken(..) => !at_end(input, err.position()),
        _ => true,
    }
}

fn at_end(input: &str, pos: rhai::Position) -> bool {
    let body = input.trim_end();
    let last_line = body.lines().count().max(1);
    let last_len = body.lines().last().map_or(0, |l| l.chars().count());
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => l > last_line || (l == last_line && c > last_len),
        (Some(l), None) => l >= last_line,
        _ => true,
    }
}

/// Runs one complete entry: a `:` command or Rhai code.
pub fn handle(session: &mut Session, input: &str) -> Outcome {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Outcome::Output(String::new());
    }
    let Some(command) = trimmed.strip_prefix(':') else {
        return match session.eval(input) {
            Ok(echo) => Outcome::Output(echo.unwrap_or_default()),
            Err(e) => Outcome::Error(e),
        };
    };
    let (name, arg) = command
        .split_once(char::is_whitespace)
        .unwrap_or((command, ""));
    let arg = arg.trim();
    match name {
        "q" | "quit" | "exit" => Outcome::Quit,
        "help" | "h" => Outcome::Output(help(session, arg)),
        "load" if arg.is_empty() => Outcome::Output("usage: `:load FILE`".into()),
        "load" => report(session.load_file(Path::new(arg))),
        "reload" => report(session.reload()),
        "cells" => Outcome::Output(cells(session)),
        other => Outcome::Output(format!(
            "unknown command `:{other}`; commands: {}",
            COMMANDS
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn report(r: Result<crate::RunReport, ScriptError>) -> Outcome {
    match r {
        Ok(rep) => match &rep.error {
            Some(e) => Outcome::Error(ScriptError {
                failure: e.failure,
                rendered: format!("{}\n{}", e.rendered, rep.summary()),
            }),
            None => Outcome::Output(rep.summary()),
        },
        Err(e) => Outcome::Error(e),
    }
}

fn help(session: &Session, name: &str) -> String {
    if name.is_empty() {
        let mut out = String::from("commands:\n");
        for (c, what) in COMMANDS {
            let _ = writeln!(out, "  {c:<8} {what}");
        }
        out.push_str("functions (`:help NAME` for details):\n");
        let mut names: Vec<_> = session
            .functions()
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        names.dedup();
        for n in names {
            let _ = writeln!(out, "  {n}");
        }
        return out.trim_end().to_string();
    }
    let name = name.trim_start_matches(':');
    if let Some((c, what)) = COMMANDS
        .iter()
        .find(|(c, _)| c.trim_start_matches(':') == name)
    {
        return format!("{c}: {what}");
    }
    docs::help(session.functions(), name)
        .unwrap_or_else(|| format!("no function `{name}`; `:help` lists them"))
}

fn cells(session: &Session) -> String {
    let cells = session.cells();
    if cells.is_empty() {
        return "no file loaded; use `:load FILE`".into();
    }
    let mut out = String::new();
    for c in cells {
        let status = c.elapsed.map_or("not run".to_string(), |d| {
            format!("{:.2}s", d.as_secs_f64())
        });
        let _ = writeln!(out, "{:<28} line {:<5} {status}", c.label, c.start_line);
    }
    out.trim_end().to_string()
}

/// Completion candidates for the word ending at `pos` in `line`: functions (`io::read_text`),
/// modules (`io::`), variables, commands. Returns the start of the word and the candidates.
pub fn complete(
    functions: &[docs::FnDoc],
    variables: &[(String, String)],
    line: &str,
    pos: usize,
) -> (usize, Vec<String>) {
    let before = &line[..pos.min(line.len())];
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_alphanumeric() || *c == '_' || *c == ':')
        .last()
        .map_or(before.len(), |(i, _)| i);
    let word = &before[start..];
    let method = before[..start].ends_with('.');
    // `ds.`: the type of the variable before the dot, when it is one.
    let receiver = method
        .then(|| {
            let head = &before[..start - 1];
            let name: String = head
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            variables
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.as_str())
        })
        .flatten();
    let mut out: Vec<String> = Vec::new();
    if word.starts_with(':') && start == 0 {
        out.extend(COMMANDS.iter().map(|(c, _)| (*c).to_string()));
    } else {
        for f in functions {
            if method {
                if f.global && receiver.is_none_or(|t| f.receiver() == Some(t)) {
                    out.push(f.short_name().to_string());
                }
                continue;
            }
            out.push(f.name.clone());
            if let Some((module, _)) = f.name.rsplit_once("::") {
                out.push(format!("{module}::"));
            }
        }
        if !method {
            out.extend(variables.iter().map(|(n, _)| n.clone()));
        }
    }
    out.retain(|c| c.starts_with(word) && c != word);
    out.sort();
    out.dedup();
    (start, out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn completeness_follows_the_parser() {
        let e = Engine::new();
        assert!(!is_complete(&e, "fn f() {"));
        assert!(!is_complete(&e, "let x = 1 +"));
        assert!(!is_complete(&e, "let x = `abc"));
        assert!(!is_complete(&e, "let m = #{ a: 1,"));
        assert!(is_complete(&e, "let x = 1; }"));
        assert!(is_complete(&e, "let x = 1;"));
        assert!(is_complete(&e, "1 +* 2"));
        assert!(is_complete(&e, ":help"));
    }
}
