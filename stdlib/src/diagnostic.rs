//! Renders script errors the way compilers do: the message, `--> file:line:col`, the source line
//! and a caret, then the call chain (`in call to function ...` with each call site) and a hint
//! (close names for a typo, the real signature for wrong argument types).

use std::fmt::Write as _;

use rhai::{EvalAltResult, Position};

use crate::docs::FnDoc;
use crate::error::kind_and_message;

/// What the renderer needs to know about the code around an error.
pub struct Context<'a> {
    /// The label of the code being run (a file path, or `<repl>`).
    pub label: &'a str,
    /// Its text.
    pub source: &'a str,
    /// Registered functions, for hints.
    pub functions: &'a [FnDoc],
    /// Names of variables in scope and script-defined functions, for hints.
    pub names: Vec<String>,
}

/// How an evaluation ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A syntax error, a script error or an error raised by a binding.
    Script,
    /// Stopped by the cancel token (Ctrl-C or a reload).
    Cancelled,
}

/// Classifies an error.
pub fn failure(err: &EvalAltResult) -> Failure {
    match innermost(err) {
        // A stop for memory is an error; any other is a cancel (Ctrl-C, a reload).
        EvalAltResult::ErrorTerminated(v, _)
            if v.clone()
                .into_string()
                .is_ok_and(|t| t.starts_with("error")) =>
        {
            Failure::Script
        }
        EvalAltResult::ErrorTerminated(..) => Failure::Cancelled,
        _ => Failure::Script,
    }
}

fn innermost(err: &EvalAltResult) -> &EvalAltResult {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
        | EvalAltResult::ErrorInModule(_, inner, _) => innermost(inner),
        other => other,
    }
}

/// Renders `err` with source snippets.
pub fn render(err: &EvalAltResult, cx: &Context) -> String {
    let mut frames = Vec::new();
    let mut label = cx.label.to_string();
    let mut cur = err;
    loop {
        match cur {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                frames.push((format!("in call to function `{name}`"), label.clone(), *pos));
                if !src.is_empty() {
                    label.clone_from(src);
                }
                cur = inner;
            }
            EvalAltResult::ErrorInModule(path, inner, pos) => {
                frames.push((format!("in module `{path}`"), label.clone(), *pos));
                label.clone_from(path);
                cur = inner;
            }
            _ => break,
        }
    }
    let mut out = String::new();
    let (head, hint) = headline(cur, cx);
    let _ = writeln!(out, "{head}");
    if matches!(cur, EvalAltResult::ErrorTerminated(..)) {
        // A stop (Ctrl-C, a reload) is not a mistake in the recipe: no caret, no call chain.
        return out;
    }
    snippet(&mut out, &label, cur.position(), cx);
    for (what, at, pos) in frames.iter().rev() {
        let _ = writeln!(out, "note: {what}");
        snippet(&mut out, at, *pos, cx);
    }
    if let Some(h) = hint {
        let _ = writeln!(out, "help: {h}");
    }
    out.trim_end().to_string()
}

fn headline(err: &EvalAltResult, cx: &Context) -> (String, Option<String>) {
    match err {
        EvalAltResult::ErrorRuntime(value, _) => match kind_and_message(value) {
            Some((kind, message)) => (format!("error[{kind}]: {message}"), None),
            None => (format!("error: {value}"), None),
        },
        EvalAltResult::ErrorFunctionNotFound(sig, _) => (
            format!("error: function not found: `{sig}`"),
            function_hint(sig, cx),
        ),
        EvalAltResult::ErrorVariableNotFound(name, _) => (
            format!("error: variable not found: `{name}`"),
            closest(name, &cx.names),
        ),
        EvalAltResult::ErrorTooManyOperations(_) => (
            "error: the script was stopped after too many operations (an endless loop?)".into(),
            Some("raise the limit with `--max-operations N` (0 = no limit)".into()),
        ),
        EvalAltResult::ErrorDataTooLarge(what, _) => (
            format!("error: {} grew over the size limit", what.to_lowercase()),
            Some(format!(
                "raise the limit with `--max-value-size N` (bytes of a string, items of an array or blob, entries of a map; default {}, 0 = no limit)",
                crate::context::DEFAULT_MAX_VALUE_SIZE
            )),
        ),
        EvalAltResult::ErrorStackOverflow(_) => (
            format!(
                "error: calls nested deeper than {} levels",
                crate::engine::MAX_CALL_LEVELS
            ),
            Some("is there a recursion without an end?".into()),
        ),
        EvalAltResult::ErrorTerminated(value, _) => match value.clone().into_string() {
            Ok(text) if text != "cancelled" => (text, None),
            _ => ("stopped".into(), None),
        },
        EvalAltResult::ErrorParsing(..) => {
            let text = without_position(err);
            let text = text.strip_prefix("Syntax error: ").unwrap_or(&text);
            (format!("error: syntax error: {text}"), None)
        }
        other => (format!("error: {}", without_position(other)), None),
    }
}

/// The error's message without the ` (line 3, position 9)` that rhai appends.
fn without_position(err: &EvalAltResult) -> String {
    let text = err.to_string();
    let pos = err.position();
    if pos.is_none() {
        return text;
    }
    let suffix = format!(" ({pos})");
    text.strip_suffix(&suffix)
        .map_or_else(|| text.clone(), str::to_string)
}

/// For `name (types)`: a close name, or the real signatures when only the types are wrong.
fn function_hint(sig: &str, cx: &Context) -> Option<String> {
    let name = sig.split(" (").next().unwrap_or(sig).trim();
    // A module's global function (`model::chat`) is also called by its own name and as a method.
    let callable_as = |f: &FnDoc| -> bool {
        f.name == name || (f.global && f.name.rsplit("::").next() == Some(name))
    };
    let same: Vec<_> = cx.functions.iter().filter(|f| callable_as(f)).collect();
    if !same.is_empty() {
        let sigs: Vec<_> = same.iter().map(|f| format!("`{}`", f.signature)).collect();
        return Some(format!(
            "wrong argument types; `{name}` takes: {}",
            sigs.join(", ")
        ));
    }
    let mut names: Vec<String> = cx.functions.iter().map(|f| f.name.clone()).collect();
    names.extend(cx.names.iter().cloned());
    closest(name, &names)
}

fn closest(name: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(name, c), c))
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

fn snippet(out: &mut String, label: &str, pos: Position, cx: &Context) {
    let (Some(line), col) = (pos.line(), pos.position().unwrap_or(1)) else {
        let _ = writeln!(out, " --> {label}");
        return;
    };
    let pad = " ".repeat(line.to_string().len());
    let _ = writeln!(out, "{pad}--> {label}:{line}:{col}");
    let text = if label == cx.label {
        cx.source.lines().nth(line - 1).map(str::to_string)
    } else {
        std::fs::read_to_string(label)
            .ok()
            .and_then(|s| s.lines().nth(line - 1).map(Into::into))
    };
    if let Some(text) = text {
        let caret: String = text
            .chars()
            .take(col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{line} | {text}");
        let _ = writeln!(out, "{pad} | {caret}^");
    }
}
