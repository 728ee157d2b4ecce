//! Documentation of the functions a script can call, read from the engine's metadata: what
//! `:help` shows, what completion offers, and where the tested ```` ```rhai ```` examples live.

use rhai::Engine;
use serde::Deserialize;

/// One registered function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FnDoc {
    /// Name as a script calls it: `io::read_text`, `params`, `encode`.
    pub name: String,
    /// `io::read_text(path: &str) -> String`.
    pub signature: String,
    /// The doc comment, without the `///` markers.
    pub docs: String,
}

impl FnDoc {
    /// The ```` ```rhai ```` examples in the docs.
    pub fn examples(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut current: Option<String> = None;
        for line in self.docs.lines() {
            let t = line.trim();
            match &mut current {
                None if t == "```rhai" => current = Some(String::new()),
                Some(code) if t == "```" => {
                    out.push(std::mem::take(code));
                    current = None;
                }
                Some(code) => {
                    code.push_str(line);
                    code.push('\n');
                }
                None => {}
            }
        }
        out
    }
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    modules: std::collections::BTreeMap<String, Meta>,
    #[serde(default)]
    functions: Vec<FnMeta>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FnMeta {
    name: String,
    signature: String,
    #[serde(default)]
    doc_comments: Vec<String>,
}

/// The functions this engine registers (not Rhai's standard library), sorted by name.
pub fn collect(engine: &Engine) -> Vec<FnDoc> {
    let Ok(json) = engine.gen_fn_metadata_to_json(false) else {
        return Vec::new();
    };
    let Ok(meta) = serde_json::from_str::<Meta>(&json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&meta, "", &mut out);
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.signature.cmp(&b.signature)));
    out.dedup();
    out
}

fn walk(meta: &Meta, prefix: &str, out: &mut Vec<FnDoc>) {
    for f in &meta.functions {
        if f.name.starts_with("get$") || f.name.starts_with("set$") || f.name.starts_with("anon$") {
            continue;
        }
        out.push(FnDoc {
            name: format!("{prefix}{}", f.name),
            signature: format!("{prefix}{}", clean_signature(&f.signature)),
            docs: f
                .doc_comments
                .iter()
                .map(|c| strip_comment(c))
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    for (name, m) in &meta.modules {
        walk(m, &format!("{prefix}{name}::"), out);
    }
}

/// `-> Result<String, Box<EvalAltResult>>` reads `-> String` to a script writer.
fn clean_signature(sig: &str) -> String {
    match sig.split_once("-> Result<") {
        Some((head, ret)) => {
            let ret = ret.strip_suffix(", Box<EvalAltResult>>").unwrap_or(ret);
            format!("{head}-> {ret}")
        }
        None => sig.to_string(),
    }
}

fn strip_comment(c: &str) -> String {
    c.lines()
        .map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("///")
                .or_else(|| l.strip_prefix("//!"))
                .unwrap_or(l);
            l.strip_prefix(' ').unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text `:help name` prints: every overload's signature, then its docs.
pub fn help(docs: &[FnDoc], name: &str) -> Option<String> {
    let matches: Vec<_> = docs.iter().filter(|d| d.name == name).collect();
    if matches.is_empty() {
        return None;
    }
    let mut out = String::new();
    for d in matches {
        out.push_str(&d.signature);
        out.push('\n');
        if !d.docs.is_empty() {
            for line in d.docs.lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Some(out.trim_end().to_string())
}
