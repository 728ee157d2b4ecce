//! `model` and `tokenizer` from scripts: tiny models, save and load, memoization, generation,
//! chat templates, and the errors a recipe author sees.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use insta::assert_snapshot;
use support::{Env, transcript};

#[test]
fn tiny_save_load_generate() {
    let env = Env::new();
    let mut s = env.session();
    let t = transcript(
        &env,
        &mut s,
        r#"let m = model::tiny(#{ seed: 1 });
m
let tok = tokenizer::builtin();
m.save("ckpt", tok);
let m2 = model::load(io::output_dir() + "/ckpt", #{ dtype: "f32", device: "cpu" });
m2.num_params == m.num_params && m2.arch == m.arch && m2.dtype == "float32" && m2.device == "cpu"
let a = m.generate(tok, "Once upon", #{ max_new_tokens: 6 });
let b = m2.generate(tok, tok.encode("Once upon"), #{ max_new_tokens: 6 });
a == b
let tok2 = tokenizer::load(io::output_dir() + "/ckpt");
tok2.encode("你好") == tok.encode("你好")
tok.apply_chat_template([#{ role: "system", content: "现在你要扮演皇帝身边的女人--甄嬛" }, #{ role: "user", content: "你是谁？" }])
"#,
    );
    assert_snapshot!("tiny_save_load_generate", t);
}

#[test]
fn loads_are_memoized_by_path_options_and_contents() {
    let env = Env::new();
    let mut s = env.session();
    s.eval(r#"model::tiny(#{ seed: 2 }).save("ckpt", tokenizer::builtin());"#)
        .unwrap();
    let memo = &s.context().memo;
    assert_eq!(memo.len(), 0);
    s.eval(r#"let a = model::load(io::output_dir() + "/ckpt", #{ device: "cpu" });"#)
        .unwrap();
    s.eval(r#"let b = model::load(io::output_dir() + "/ckpt", #{ device: "cpu" });"#)
        .unwrap();
    assert_eq!(
        s.context().memo.len(),
        1,
        "same path, options and files: one entry"
    );
    s.eval(r#"let c = model::load(io::output_dir() + "/ckpt", #{ device: "cpu", dtype: "f32" });"#)
        .unwrap();
    assert_eq!(s.context().memo.len(), 2, "other options: a new entry");
    s.eval(r#"model::tiny(#{ seed: 3 }).save("ckpt");"#)
        .unwrap();
    s.eval(r#"let d = model::load(io::output_dir() + "/ckpt", #{ device: "cpu" });"#)
        .unwrap();
    assert_eq!(s.context().memo.len(), 3, "changed files: a new entry");
}

#[test]
fn model_errors_name_the_problem() {
    let env = Env::new();
    std::fs::create_dir(env.recipe_dir().join("empty")).unwrap();
    std::fs::create_dir(env.recipe_dir().join("sneaky")).unwrap();
    std::fs::write(env.dir.path().join("outside.json"), "{}").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        env.dir.path().join("outside.json"),
        env.recipe_dir().join("sneaky/config.json"),
    )
    .unwrap();
    let mut s = env.session();
    let t = transcript(
        &env,
        &mut s,
        r#"model::tiny(#{ hiden: 3 })
model::tiny(#{ arch: "gpt2" })
model::load("empty")
model::load("/etc")
model::load("sneaky")
model::tiny().generate(tokenizer::builtin(), 3.5)
model::tiny().generate(tokenizer::builtin(), "x", #{ max_tokens: 3 })
tokenizer::builtin().decode([1, -2])
"#,
    );
    assert_snapshot!("model_errors", t);
}
