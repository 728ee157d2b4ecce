//! A recipe (a Rhai script), run as `qscript check` runs it: a fresh stdlib `Session` per input,
//! with a tight operation limit, next to a tiny model (`m/`), the built-in tokenizer (`tok/`)
//! and a small data set (`d.jsonl`) that mutated recipes can reach.

use std::path::Path;
use std::sync::Arc;

use qscript_runtime::model::tiny::{TinyConfig, tiny};
use qscript_runtime::tokenizer::Tokenizer;
use qscript_stdlib::{BufferSink, RunOptions, Session};

use super::{Harness, Outcome, Scratch, Shape, Target};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&RECIPE];

/// The operation limit of a fuzzed recipe (the engine's default is far higher; a fuzzed loop
/// should end in an error quickly).
const MAX_OPERATIONS: u64 = 200_000;

struct Recipe {
    scratch: Scratch,
}

impl Harness for Recipe {
    fn run(&mut self, input: &[u8]) -> Outcome {
        let path = self.scratch.put("recipe.rhai", input)?;
        let dir = self.scratch.path();
        let mut opts = RunOptions::new(dir, dir.join("runs/recipe"));
        opts.max_operations = MAX_OPERATIONS;
        let mut session =
            Session::new(&opts, Arc::new(BufferSink::default())).map_err(|e| e.to_string())?;
        let report = session.check_file(&path).map_err(|e| e.rendered)?;
        match report.error {
            Some(e) => Err(e.rendered),
            None => Ok(()),
        }
    }
}

/// The repository's recipes.
fn repo_recipes() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// A recipe.
pub static RECIPE: Target = Target {
    name: "recipe",
    entry: "stdlib Session::check_file (`qscript check`) on a recipe, operation limit 200,000",
    max_len: 32 << 10,
    shape: Shape::Plain,
    dict: &[
        "// %%\n",
        "let x = ",
        "fn f(x) { f(x) }\nf(1);\n",
        "import \"recipe\" as r;\n",
        "model::load(\"m\")",
        "tokenizer::load(\"tok\")",
        "data::load(\"d.jsonl\")",
        "data::sft(ds, tok)",
        "lora::attach(m, #{ r: 4 })",
        "train::fit(m, ds, #{ max_steps: 1 })",
        "m.generate(\"hi\", #{ max_new_tokens: 2 })",
        "io::read_text(\"d.jsonl\")",
        "io::write_text(\"o.txt\", \"x\")",
        "params(#{ a: 1 })",
        ".map(|r| r)",
        ".sort(|a, b| 1)",
        "\"x\" * 1000000",
        "[1, 2, 3]",
        "#{ a: 1 }",
        "1e308",
        "-9223372036854775808",
        "9223372036854775807",
        "while true {}",
        "loop { break; }",
        "throw \"x\";",
        "try { } catch (e) { e.kind }",
    ],
    seeds: repo_recipes,
    harness: || {
        let scratch = Scratch::new()?;
        let dir = scratch.path();
        tiny(&TinyConfig {
            hidden: 16,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            intermediate: 24,
            ..TinyConfig::default()
        })?
        .save(&dir.join("m"))?;
        Tokenizer::builtin()?.save(&dir.join("tok"))?;
        std::fs::write(
            dir.join("d.jsonl"),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
        )?;
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/data");
        if data.is_dir() {
            std::fs::create_dir_all(dir.join("data"))?;
            for e in std::fs::read_dir(&data)?.flatten() {
                if e.path().is_file() {
                    std::fs::copy(e.path(), dir.join("data").join(e.file_name()))?;
                }
            }
        }
        Ok(Box::new(Recipe { scratch }))
    },
};
