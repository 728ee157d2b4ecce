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
    /// Callable without its module's name, and so as a method of its first parameter.
    pub global: bool,
}

impl FnDoc {
    /// The name a method call uses (`to_messages` for `data::to_messages`).
    pub fn short_name(&self) -> &str {
        self.name.rsplit("::").next().unwrap_or(&self.name)
    }

    /// The script type of the first parameter (`Dataset`), which a method is called on.
    pub fn receiver(&self) -> Option<&str> {
        let args = self.signature.split_once('(')?.1;
        let first = args.split([',', ')']).next()?;
        Some(first.split_once(": ").map_or(first, |(_, t)| t).trim()).filter(|t| !t.is_empty())
    }
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
    namespace: String,
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
        if ["get$", "set$", "anon$", "index$"]
            .iter()
            .any(|p| f.name.starts_with(p))
        {
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
            global: prefix.is_empty() || f.namespace == "global",
        });
    }
    for (name, m) in &meta.modules {
        walk(m, &format!("{prefix}{name}::"), out);
    }
}

/// A signature in the script's words: `train::fit(model: Model, train: Dataset, opts: map) ->
/// Model`, not Rust's (`ModelHandle`, `&mut`, `&str`, `Result<.., Box<EvalAltResult>>`).
fn clean_signature(sig: &str) -> String {
    let (head, ret) = match sig.rsplit_once(") -> ") {
        Some((h, r)) => (h, Some(r)),
        None => (sig.strip_suffix(')').unwrap_or(sig), None),
    };
    let Some((name, params)) = head.split_once('(') else {
        return sig.to_string();
    };
    let params: Vec<String> = split_top(params)
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once(": ") {
            Some((n, t)) => format!("{}: {}", n.trim(), script_type(t)),
            None => script_type(&p),
        })
        .collect();
    match ret.map(script_type) {
        Some(r) if r != "()" => format!("{name}({}) -> {r}", params.join(", ")),
        _ => format!("{name}({})", params.join(", ")),
    }
}

/// Splits `a: X, b: Y<Z, W>` at the commas outside angle brackets.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

/// A Rust type as scripts name it.
fn script_type(t: &str) -> String {
    let t = t.trim();
    let t = t
        .strip_prefix("&mut ")
        .or_else(|| t.strip_prefix('&'))
        .unwrap_or(t)
        .trim();
    for wrapper in ["Result<", "Res<", "RhaiResultOf<"] {
        if let Some(inner) = t.strip_prefix(wrapper).and_then(|x| x.strip_suffix('>')) {
            return script_type(&split_top(inner)[0]);
        }
    }
    if t.contains("Range<") || t.contains("RangeInclusive<") {
        return "range".into();
    }
    let last = t.rsplit("::").next().unwrap_or(t);
    match last {
        "ModelHandle" => "Model",
        "DatasetHandle" => "Dataset",
        "TokenizerHandle" => "Tokenizer",
        "TrainerHandle" => "Trainer",
        "INT" | "i64" | "i32" | "usize" | "u64" => "int",
        "FLOAT" | "f64" | "f32" => "float",
        "str" | "String" | "ImmutableString" => "string",
        "Map" => "map",
        "Array" => "array",
        "Blob" => "blob",
        "Dynamic" => "any",
        "FnPtr" => "function",
        other => other,
    }
    .to_string()
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
    let mut matches: Vec<_> = docs.iter().filter(|d| d.name == name).collect();
    if matches.is_empty() {
        // `:help fit` finds `train::fit` (and a method's module function).
        matches = docs
            .iter()
            .filter(|d| d.name.rsplit("::").next() == Some(name))
            .collect();
    }
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
