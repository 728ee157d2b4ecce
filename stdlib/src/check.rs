//! `qscript check`: everything that can be known about a recipe without loading weights or
//! training. Every cell parses and the `params(#{ ... })` call resolves with the overrides; then
//! the whole recipe runs as a dry run (see [`RunContext::check_mode`](crate::context::RunContext)):
//! models load from their headers, tokenizers and data for real, training and generation check
//! their options and print the plan (steps, memory, placement) without computing, and writes go
//! to a throw-away overlay. The bindings decide what a dry run does, not the recipe's text.

use std::fmt::Write as _;
use std::path::Path;

use rhai::Map;

use crate::session::{CompiledRecipe, ScriptError, Session};

/// Checks the recipe at `path` (see [`check`]) and runs it as a dry run.
pub fn check_and_run(session: &mut Session, path: &Path) -> Result<String, ScriptError> {
    let mut out = check(session, path)?;
    let report = session.check_file(path)?;
    if let Some(e) = report.error {
        return Err(e);
    }
    session.check_train_options_used()?;
    let facts = std::mem::take(&mut *crate::context::lock(&session.context().check_facts));
    if !facts.is_empty() {
        let _ = write!(out, "\nsummary:");
        for (topic, fact) in &facts {
            let _ = write!(out, "\n  {topic:<9} {fact}");
        }
    }
    let _ = write!(
        out,
        "\nran all {} cells as a dry run: no weights read, nothing trained or generated, nothing written under the output dir",
        report.ran.len()
    );
    Ok(out)
}

/// Checks the recipe at `path` and returns the report to print.
pub fn check(session: &Session, path: &Path) -> Result<String, ScriptError> {
    let CompiledRecipe {
        path,
        source,
        cells,
    } = session.compile_file(path)?;
    let mut out = String::new();
    let _ = writeln!(out, "recipe: {}", path.display());
    if let qscript_runtime::device::Machine::Named(card) = &session.context().machine {
        let _ = writeln!(out, "planned for: {card}, named by `--gpu`");
    }
    let _ = writeln!(out, "cells:");
    for (cell, _) in &cells {
        let _ = writeln!(out, "  {:<28} line {}", cell.label(), cell.start_line);
    }
    let label = path.to_string_lossy();
    match find_call(&source, "params") {
        None => {
            let _ = writeln!(out, "params: none declared");
            session.check_overrides_used()?;
        }
        Some(call) => {
            let mut ast = session
                .engine()
                .compile(call.padded())
                .map_err(|e| session.render_error(&e.into(), &label, &source))?;
            ast.set_source(label.as_ref());
            let map = session
                .engine()
                .eval_ast::<Map>(&ast)
                .map_err(|e| session.render_error(&e, &label, &source))?;
            let _ = writeln!(out, "params:");
            let width = map.keys().map(|k| k.as_str().len()).max().unwrap_or(0);
            for (k, v) in &map {
                let set = session
                    .context()
                    .override_source(k)
                    .map_or_else(String::new, |from| format!("  ({from})"));
                let _ = writeln!(out, "  {k:<width$} = {v:?}{set}");
            }
            train_options(session, &map, &mut out);
        }
    }
    out.push_str("ok: the recipe parses and its params resolve");
    Ok(out)
}

/// The training options `--config` and `--set` give `train::options` (the keys that are not
/// params), with their sources.
fn train_options(session: &Session, params: &Map, out: &mut String) {
    let names = qscript_runtime::train::TrainConfig::option_names();
    let ctx = session.context();
    let keys: Vec<&String> = names
        .iter()
        .filter(|k| !params.contains_key(k.as_str()) && ctx.is_overridden(k))
        .collect();
    if keys.is_empty() {
        return;
    }
    let _ = writeln!(out, "train options for `train::options`:");
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
    for k in keys {
        let raw = ctx.override_raw(k).unwrap_or_default();
        let from = ctx.override_source(k).unwrap_or_default();
        let _ = writeln!(out, "  {k:<width$} = {raw}  ({from})");
    }
}

/// A call found in the source: its text and the line it starts on.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    line: usize,
    column: usize,
    text: String,
}

impl Call {
    /// The call padded so that positions match the file.
    fn padded(&self) -> String {
        format!(
            "{}{}{}",
            "\n".repeat(self.line - 1),
            " ".repeat(self.column - 1),
            self.text
        )
    }
}

/// Finds the first call `name(...)` outside strings and comments, with balanced parentheses.
fn find_call(source: &str, name: &str) -> Option<Call> {
    let chars: Vec<char> = source.chars().collect();
    let mut i = 0;
    let (mut line, mut col) = (1, 1);
    let mut depth = 0usize;
    let mut start: Option<(usize, usize, usize)> = None;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let skip_to = |mut j: usize, end: &dyn Fn(usize) -> bool| {
            while j < chars.len() && !end(j) {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            j
        };
        let end = match (c, next) {
            ('/', Some('/')) => skip_to(i, &|j| chars[j] == '\n'),
            ('/', Some('*')) => {
                skip_to(i + 2, &|j| {
                    chars[j] == '*' && chars.get(j + 1) == Some(&'/')
                }) + 2
            }
            ('"' | '`' | '\'', _) => skip_to(i + 1, &|j| chars[j] == c) + 1,
            _ => i,
        };
        if end > i {
            for &ch in &chars[i..end.min(chars.len())] {
                (line, col) = if ch == '\n' {
                    (line + 1, 1)
                } else {
                    (line, col + 1)
                };
            }
            i = end;
            continue;
        }
        if let Some((_, _, s)) = start {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        let (l, cl, _) = start?;
                        return Some(Call {
                            line: l,
                            column: cl,
                            text: chars[s..=i].iter().collect(),
                        });
                    }
                }
                _ => {}
            }
        } else if source_word_at(&chars, i, name) {
            let mut j = i + name.chars().count();
            while j < chars.len() && chars[j].is_whitespace() && chars[j] != '\n' {
                j += 1;
            }
            if chars.get(j) == Some(&'(') {
                start = Some((line, col, i));
            }
        }
        (line, col) = if c == '\n' {
            (line + 1, 1)
        } else {
            (line, col + 1)
        };
        i += 1;
    }
    None
}

fn source_word_at(chars: &[char], i: usize, word: &str) -> bool {
    let w: Vec<char> = word.chars().collect();
    let before_ok =
        i == 0 || !(chars[i - 1].is_alphanumeric() || matches!(chars[i - 1], '_' | '.' | ':'));
    let after = chars.get(i + w.len()).copied().unwrap_or(' ');
    before_ok && chars[i..].starts_with(&w) && !(after.is_alphanumeric() || after == '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_call_outside_strings_and_comments() {
        let src = "// params(#{x: 1})\nlet s = \"params(2)\";\nlet p = params(#{ a: (1 + 2), b: \")\" });\n";
        let call = find_call(src, "params").unwrap();
        assert_eq!(call.line, 3);
        assert_eq!(call.column, 9);
        assert_eq!(call.text, "params(#{ a: (1 + 2), b: \")\" })");
        assert!(find_call("my_params(1); x.params(2)", "params").is_none());
    }
}
