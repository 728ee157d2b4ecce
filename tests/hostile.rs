//! A hostile recipe and hostile files beside it: planted links (to devices, FIFOs, other
//! directories), a linked output dir or subdirectory, a linked `metrics.jsonl`, shard names and
//! checkpoint files that point out of the tree, existence probes, globs over outside files and a
//! runaway chat template. Each ends in a clear error, nothing outside is read or written, and
//! nothing hangs.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

#[path = "support/mod.rs"]
mod support;

use std::os::unix::fs::symlink;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, qscript, stderr};

/// Runs the binary in `env` with `args`, killed after `secs` (a hang is a failure).
fn run_bounded(env: &Env, args: &[&str], secs: u64) -> std::process::Output {
    let mut cmd = qscript();
    cmd.current_dir(env.dir.path()).args(args);
    bounded(cmd, &format!("`qscript {}`", args.join(" ")), secs)
}

/// Runs `cmd` with its output captured, killed after `secs` (a hang is a failure).
fn bounded(mut cmd: Command, what: &str, secs: u64) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("{what} hung for {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn fails_with(env: &Env, recipe: &str, text: &str, want: &str) -> String {
    env.write(recipe, text);
    let o = run_bounded(env, &[&format!("recipe/{recipe}")], 60);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{recipe}: {err}");
    assert!(err.contains(want), "{recipe}: wanted `{want}` in\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

#[test]
fn fifos_and_device_links_are_never_opened() {
    let env = Env::new();
    let tok = env.recipe_dir().join("tok");
    std::fs::create_dir(&tok).unwrap();
    let ok = Command::new("mkfifo")
        .arg(tok.join("tokenizer.json"))
        .status()
        .unwrap();
    assert!(ok.success());
    fails_with(
        &env,
        "fifo.rhai",
        "tokenizer::load(\"tok\");\n",
        "not a regular file",
    );
    let dev = env.recipe_dir().join("dev");
    std::fs::create_dir(&dev).unwrap();
    symlink("/dev/zero", dev.join("tokenizer.json")).unwrap();
    fails_with(
        &env,
        "zero.rhai",
        "tokenizer::load(\"dev\");\n",
        "outside the recipe's sandbox",
    );
}

#[test]
fn a_linked_output_dir_or_subdir_receives_nothing() {
    let env = Env::new();
    let victim = env.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    // The bundle ships `runs/r` as a link to someone else's directory.
    std::fs::create_dir(env.recipe_dir().join("runs")).unwrap();
    symlink(&victim, env.recipe_dir().join("runs/r")).unwrap();
    let out = env.recipe_dir().join("runs/r");
    env.write("r.rhai", "io::write_text(\".bashrc\", \"pwned\");\n");
    let o = run_bounded(
        &env,
        &["recipe/r.rhai", "--output-dir", out.to_str().unwrap()],
        60,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    // A real output dir with a linked subdirectory: no write and no directory goes through it.
    let real_out = env.dir.path().join("out");
    std::fs::create_dir(&real_out).unwrap();
    symlink(&victim, real_out.join("sub")).unwrap();
    env.write(
        "s.rhai",
        "io::write_text(\"sub/deeper/x.txt\", \"pwned\");\n",
    );
    let o = run_bounded(
        &env,
        &["recipe/s.rhai", "--output-dir", real_out.to_str().unwrap()],
        60,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is a symbolic link"), "{}", stderr(&o));
    // A planted link where the run's metrics go.
    std::fs::write(victim.join("notes"), "mine").unwrap();
    symlink(victim.join("notes"), real_out.join("metrics.jsonl")).unwrap();
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    env.write(
        "m.rhai",
        r#"let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
train::fit(lora::attach(model::tiny(), #{ r: 2 }), ds, #{ max_steps: 1, save_steps: 0 });
"#,
    );
    let o = run_bounded(
        &env,
        &["recipe/m.rhai", "--output-dir", real_out.to_str().unwrap()],
        120,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("metrics.jsonl"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(victim.join("notes")).unwrap(),
        "mine"
    );
    let names: Vec<_> = std::fs::read_dir(&victim).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "nothing new in the victim's directory");
}

#[test]
fn paths_inside_files_stay_in_the_tree() {
    let env = Env::new();
    // A sharded checkpoint whose index names a file outside its directory.
    let m = env.recipe_dir().join("m");
    std::fs::create_dir(&m).unwrap();
    env.write("save.rhai", "model::tiny().save(\"t\");\n");
    let saved = env.dir.path().join("saved");
    let o = run_bounded(
        &env,
        &["recipe/save.rhai", "--output-dir", saved.to_str().unwrap()],
        60,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::copy(saved.join("t/config.json"), m.join("config.json")).unwrap();
    std::fs::copy(
        saved.join("t/model.safetensors"),
        env.dir.path().join("outside.safetensors"),
    )
    .unwrap();
    std::fs::write(
        m.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "../../outside.safetensors"}}"#,
    )
    .unwrap();
    fails_with(
        &env,
        "shard.rhai",
        "model::load(\"m\");\n",
        "shard `../../outside.safetensors` is not a file name in the checkpoint directory",
    );
    // A checkpoint whose optimizer file is a link to another run's.
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    env.write(
        "train.rhai",
        r#"let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
train::fit(lora::attach(model::tiny(), #{ r: 2 }), ds, #{ max_steps: 2, save_steps: 1 });
"#,
    );
    let out = env.dir.path().join("run");
    let o = run_bounded(
        &env,
        &["recipe/train.rhai", "--output-dir", out.to_str().unwrap()],
        120,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let other = env.dir.path().join("other-team.safetensors");
    std::fs::copy(out.join("checkpoint-2/optimizer.safetensors"), &other).unwrap();
    std::fs::remove_file(out.join("checkpoint-2/optimizer.safetensors")).unwrap();
    symlink(&other, out.join("checkpoint-2/optimizer.safetensors")).unwrap();
    let ckpt = out.join("checkpoint-2");
    let o = run_bounded(
        &env,
        &[
            "recipe/train.rhai",
            "--output-dir",
            out.to_str().unwrap(),
            "--resume",
            ckpt.to_str().unwrap(),
        ],
        120,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("optimizer.safetensors`: it is outside the recipe's sandbox"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn refusals_do_not_tell_what_exists_outside() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("secret.json"), "[]").unwrap();
    let a = fails_with(
        &env,
        "a.rhai",
        "io::read_text(\"../secret.json\");\n",
        "outside the recipe's sandbox",
    );
    let b = fails_with(
        &env,
        "b.rhai",
        "io::read_text(\"../missing.json\");\n",
        "outside the recipe's sandbox",
    );
    assert_eq!(
        a.replace("secret", "X")
            .replace("a.rhai", "r")
            .replace("runs/a", "runs/r"),
        b.replace("missing", "X")
            .replace("b.rhai", "r")
            .replace("runs/b", "runs/r"),
        "an existing and a missing outside file read the same"
    );
    let g = fails_with(
        &env,
        "g.rhai",
        "data::load(\"../*.json\");\n",
        "`../*.json` matches files outside the recipe's sandbox",
    );
    assert!(!g.contains("secret"), "the match is not named: {g}");
    // A name shaped like a hub id through a planted link out of the tree: an existing and a
    // missing target are refused alike (neither is looked up in the HF cache).
    symlink(env.dir.path(), env.recipe_dir().join("l")).unwrap();
    std::fs::create_dir(env.dir.path().join("model")).unwrap();
    let h = fails_with(
        &env,
        "h.rhai",
        "model::load(\"l/model\");\n",
        "outside the recipe's sandbox",
    );
    let i = fails_with(
        &env,
        "i.rhai",
        "model::load(\"l/absent\");\n",
        "outside the recipe's sandbox",
    );
    assert_eq!(
        h.replace("h.rhai", "r")
            .replace("runs/h", "runs/r")
            .replace("model\")", "X\")")
            .replace("l/model", "l/X"),
        i.replace("i.rhai", "r")
            .replace("runs/i", "runs/r")
            .replace("absent", "X"),
    );
}

#[test]
fn a_runaway_chat_template_stops_with_a_limit_the_user_can_raise() {
    let env = Env::new();
    let tok = env.recipe_dir().join("tok");
    std::fs::create_dir(&tok).unwrap();
    env.write("save.rhai", "tokenizer::builtin().save(\"b\");\n");
    let saved = env.dir.path().join("saved");
    let o = run_bounded(
        &env,
        &["recipe/save.rhai", "--output-dir", saved.to_str().unwrap()],
        60,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::copy(saved.join("b/tokenizer.json"), tok.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(saved.join("b/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg["chat_template"] =
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}"
            .into();
    std::fs::write(tok.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    let start = Instant::now();
    fails_with(
        &env,
        "t.rhai",
        "data::sft(data::to_messages(data::load(\"d.json\")), tokenizer::load(\"tok\"));\n",
        "--max-template-steps",
    );
    assert!(start.elapsed() < Duration::from_secs(50));
}

/// Runs the binary under `sh -c 'ulimit -v ...'` (4 GB of address space), bounded in time.
fn run_limited(env: &Env, recipe: &str, extra: &str) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_qscript");
    let mut cmd = Command::new("sh");
    cmd.current_dir(env.dir.path()).arg("-c").arg(format!(
        "ulimit -v 4000000; exec '{bin}' recipe/{recipe} {extra}"
    ));
    bounded(cmd, recipe, 120)
}

/// Sizes no machine holds and deep recursion end in clear errors under a memory limit, never
/// an abort; a huge record is refused before it is tokenized, with the flag that raises it.
#[test]
fn allocation_and_recursion_bombs_end_in_clear_errors() {
    let env = Env::new();
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    for (name, text, want) in [
        (
            "tiny",
            "model::tiny(#{ hidden: 1000000, heads: 4, kv_heads: 2 });\n",
            "`model::tiny` with hidden 1000000",
        ),
        (
            "rank",
            "lora::attach(model::tiny(), #{ r: 1000000000 });\n",
            "LoRA with `r: 1000000000`",
        ),
        (
            "recursion",
            "fn f(n) { if n == 0 { 0 } else { let m = #{ a: [n] }; 1 + f(n - 1) } }\ndata::load(\"d.json\").map(|r| #{ x: f(100000) });\n",
            "record 0",
        ),
    ] {
        env.write(&format!("{name}.rhai"), text);
        let o = run_limited(&env, &format!("{name}.rhai"), "");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: wanted `{want}` in\n{err}");
        assert!(
            !err.contains("panicked") && !err.contains("memory allocation"),
            "{err}"
        );
    }
    // A map filled by index assignment (Rhai checks the value assigned, not the map it grows)
    // stops at the heap budget.
    env.write(
        "map.rhai",
        "let m = #{};\nlet i = 0;\nloop { m[\"k\" + i] = blob(100000); i += 1; }\n",
    );
    let o = run_limited(&env, "map.rhai", "--max-memory 300000000");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the script was stopped: the heap reached") && err.contains("--max-memory N"),
        "{err}"
    );
    let big = "x".repeat(5 << 20);
    env.write(
        "big.json",
        &format!(r#"[{{"instruction": "a", "output": "{big}"}}]"#),
    );
    env.write(
        "big.rhai",
        "data::sft(data::to_messages(data::load(\"big.json\")), tokenizer::builtin(), #{ max_length: 64 });\n",
    );
    let o = run_limited(&env, "big.rhai", "");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("record 0 renders to 524") && err.contains("--max-record-size"),
        "{err}"
    );
    let o = run_limited(&env, "big.rhai", "--max-record-size 8000000");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Saves the built-in tokenizer into `recipe/<dir>` with `edit` applied to its `tokenizer.json`.
fn hostile_tokenizer(env: &Env, dir: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let saved = env.dir.path().join("saved-tok");
    if !saved.join("b/tokenizer.json").is_file() {
        env.write("save-tok.rhai", "tokenizer::builtin().save(\"b\");\n");
        let o = run_bounded(
            env,
            &[
                "recipe/save-tok.rhai",
                "--output-dir",
                saved.to_str().unwrap(),
            ],
            60,
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let tok = env.recipe_dir().join(dir);
    std::fs::create_dir(&tok).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("b/tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut json);
    std::fs::write(tok.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(
        saved.join("b/tokenizer_config.json"),
        tok.join("tokenizer_config.json"),
    )
    .unwrap();
}

/// A `tokenizer.json` that would make the `tokenizers` crate panic or abort, on load (a
/// `Precompiled` normalizer whose charsmap is shorter than the trie it declares: `tokenizers`
/// reserves the declared size first, up to 8 GiB for 4 bytes, found by the fuzzer) or on encode
/// (a `Split` regex that runs over onig's match limit), is an error naming the file and the field
/// (or the record), no panic text.
#[test]
fn a_tokenizer_file_that_panics_the_tokenizer_is_named() {
    let env = Env::new();
    // A trie of 1000 bytes announced, none given; then 2.7 GB announced, nested in a sequence.
    for (dir, normalizer, says) in [
        (
            "short",
            serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "6AMAAA=="}),
            "normalizer.precompiled_charsmap declares a trie of 1000 bytes but holds 0",
        ),
        (
            "huge",
            serde_json::json!({"type": "Sequence", "normalizers": [{"type": "NFC"},
                {"type": "Precompiled", "precompiled_charsmap": "AAAAoG9yZExldmVs"}]}),
            "normalizer.normalizers.1.precompiled_charsmap declares a trie of 2684354560 bytes",
        ),
    ] {
        hostile_tokenizer(&env, dir, |j| j["normalizer"] = normalizer);
        let err = fails_with(
            &env,
            &format!("{dir}.rhai"),
            &format!("tokenizer::load(\"{dir}\");\n"),
            &format!("{dir}/tokenizer.json`: {says}"),
        );
        assert!(
            !err.contains("index out of") && !err.contains(".rs:"),
            "{err}"
        );
    }
    hostile_tokenizer(&env, "split", |j| {
        j["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(a+)+$"},
            "behavior": "Isolated", "invert": false});
    });
    let a = "a".repeat(40);
    env.write(
        "d.json",
        &format!(
            r#"[{{"instruction": "x", "output": "y"}}, {{"instruction": "{a}b", "output": "y"}}]"#
        ),
    );
    let err = fails_with(
        &env,
        "split.rhai",
        "data::sft(data::to_messages(data::load(\"d.json\")), tokenizer::load(\"split\"));\n",
        "record 1 of",
    );
    assert!(
        err.contains("split/tokenizer.json` failed while encoding a text")
            && !err.contains("retry-limit")
            && !err.contains(".rs:"),
        "{err}"
    );
    let err = fails_with(
        &env,
        "enc.rhai",
        &format!("tokenizer::load(\"split\").encode(\"{a}b\");\n"),
        "split/tokenizer.json` failed while encoding a text",
    );
    assert!(!err.contains("retry-limit"), "{err}");
}

/// A pre-tokenizer regex with catastrophic backtracking (`(a|aa)+$`) on one long record: onig
/// bounds one match attempt but not a search over every start position, so without a search
/// budget this record runs for minutes, deaf to Ctrl-C. With it, the record is an error naming
/// the file within seconds.
#[test]
fn a_catastrophic_regex_on_one_record_ends_in_seconds() {
    let env = Env::new();
    hostile_tokenizer(&env, "cat", |j| {
        j["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(a|aa)+$"},
            "behavior": "Isolated", "invert": false});
    });
    // Each start position stays under onig's per-match limit (10M steps); the positions together
    // do not.
    let a = format!("{}b", "a".repeat(30)).repeat(300);
    let start = Instant::now();
    let err = fails_with(
        &env,
        "cat.rhai",
        &format!("tokenizer::load(\"cat\").encode(\"{a}\");\n"),
        "cat/tokenizer.json` failed while encoding a text",
    );
    assert!(!err.contains("retry-limit"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

/// A module that imports itself, or two that import each other, is an error naming the chain,
/// not a stack overflow.
#[test]
fn an_import_cycle_is_named() {
    let env = Env::new();
    env.write("a.rhai", "import \"b\" as b;\nexport const X = 1;\n");
    env.write("b.rhai", "import \"a\" as a;\nexport const Y = 2;\n");
    env.write("self.rhai", "import \"self\" as me;\n");
    fails_with(
        &env,
        "r.rhai",
        "import \"a\" as a;\nprint(a::X);\n",
        "modules import each other in a cycle: a.rhai -> b.rhai -> a.rhai",
    );
    fails_with(
        &env,
        "s.rhai",
        "import \"self\" as s;\n",
        "modules import each other in a cycle: self.rhai -> self.rhai",
    );
}

/// Out-of-range values in `config.json` (next to real weights) and `generation_config.json` are
/// errors naming the file, the field and the valid range, before anything is allocated.
#[test]
fn out_of_range_model_configs_are_named() {
    let env = Env::new();
    env.write("save.rhai", "model::tiny().save(\"t\");\n");
    let saved = env.dir.path().join("saved");
    let o = run_bounded(
        &env,
        &["recipe/save.rhai", "--output-dir", saved.to_str().unwrap()],
        60,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("t/config.json")).unwrap())
            .unwrap();
    let cases: [(&str, &str, serde_json::Value, &str); 6] = [
        (
            "config.json",
            "num_hidden_layers",
            1_000_000_000_000u64.into(),
            "`num_hidden_layers` is 1000000000000; it must be in 1..=4096",
        ),
        (
            "config.json",
            "rms_norm_eps",
            (-1).into(),
            "`rms_norm_eps` is -1",
        ),
        (
            "config.json",
            "rope_theta",
            (-1).into(),
            "`rope_theta` is -1",
        ),
        (
            "generation_config.json",
            "temperature",
            (-5).into(),
            "`temperature` is -5; it must be a finite number, 0 or over",
        ),
        (
            "generation_config.json",
            "top_p",
            7.into(),
            "`top_p` is 7; it must be over 0 and at most 1",
        ),
        (
            "generation_config.json",
            "top_k",
            0.into(),
            "`top_k` is 0; it must be at least 1",
        ),
    ];
    for (i, (file, field, value, want)) in cases.into_iter().enumerate() {
        let dir = env.recipe_dir().join(format!("m{i}"));
        std::fs::create_dir(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(saved.join("t").join(f), dir.join(f)).unwrap();
        }
        let mut json = if file == "config.json" {
            config.clone()
        } else {
            serde_json::json!({})
        };
        json[field] = value;
        std::fs::write(dir.join(file), json.to_string()).unwrap();
        let err = fails_with(
            &env,
            &format!("m{i}.rhai"),
            &format!("model::load(\"m{i}\");\n"),
            want,
        );
        assert!(err.contains(&format!("m{i}/{file}`")), "{err}");
        assert!(!err.contains("memory allocation"), "{err}");
    }
}

/// Recursion within the call-depth limit inside a `map` callback is as safe on the workers as
/// on the main thread.
#[test]
fn deep_recursion_in_a_map_callback_runs_on_the_workers() {
    let env = Env::new();
    let rows: Vec<_> = (0..8)
        .map(|i| serde_json::json!({"instruction": format!("a{i}"), "output": "b"}))
        .collect();
    env.write("d.json", &serde_json::Value::from(rows).to_string());
    let mut body = "f(n - 1)".to_string();
    for _ in 0..45 {
        body = format!("(1 + {body})");
    }
    let f = format!("fn f(n) {{ if n == 0 {{ 0 }} else {{ {body} }} }}\n");
    env.write("main.rhai", &format!("{f}print(f(60));\n"));
    let o = run_bounded(&env, &["recipe/main.rhai"], 120);
    assert_eq!(
        o.status.code(),
        Some(0),
        "on the main thread: {}",
        stderr(&o)
    );
    env.write(
        "map.rhai",
        &format!("{f}let ds = data::load(\"d.json\").map(|r| #{{ x: f(60) }});\nprint(ds[7].x);\n"),
    );
    let o = run_bounded(&env, &["recipe/map.rhai"], 120);
    assert_eq!(o.status.code(), Some(0), "on the workers: {}", stderr(&o));
    assert_eq!(support::stdout(&o).trim(), "2700");
}

/// A sort whose comparer is not a consistent order is a script error at the call, with no
/// panic text from Rust's sort.
#[test]
fn an_inconsistent_sort_is_a_script_error() {
    let env = Env::new();
    let err = fails_with(
        &env,
        "sort.rhai",
        "let a = [];\nfor i in 0..100 { a.push((i * 7919) % 101); }\nlet n = 0;\na.sort(|x, y| { n += 1; if (x + y + n) % 3 == 0 { 1 } else { -1 } });\n",
        "error in comparer for sorting",
    );
    assert!(err.contains("sort.rhai:4:3"), "{err}");
    assert!(
        !err.contains("total order") && !err.contains("thread"),
        "{err}"
    );
}

/// A checkpoint is checked before it is trusted: a resumed `optimizer.safetensors` with a
/// negative second moment, or weights holding a NaN, is refused naming the file and the tensor
/// (never a NaN checkpoint written later with the learning rate blamed).
#[test]
fn a_damaged_checkpoint_is_refused_on_resume() {
    use candle_core::{DType, Tensor};
    let env = Env::new();
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    env.write(
        "train.rhai",
        r#"let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
train::fit(lora::attach(model::tiny(), #{ r: 2 }), ds, #{ max_steps: 2, save_steps: 1 });
"#,
    );
    let out = env.dir.path().join("run");
    let o = run_bounded(
        &env,
        &["recipe/train.rhai", "--output-dir", out.to_str().unwrap()],
        120,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let resume = |ckpt: &std::path::Path| {
        let o = run_bounded(
            &env,
            &[
                "recipe/train.rhai",
                "--output-dir",
                out.to_str().unwrap(),
                "--resume",
                ckpt.to_str().unwrap(),
            ],
            120,
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        stderr(&o)
    };
    // Each file rewritten with its first tensor (in name order) damaged.
    let damage = |file: &std::path::Path, prefix: &str, f: &dyn Fn(&Tensor) -> Tensor| -> String {
        let mut all = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
        let mut names: Vec<String> = all
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        let name = names[0].clone();
        let t = all[&name].to_dtype(DType::F32).unwrap();
        all.insert(name.clone(), f(&t).to_dtype(all[&name].dtype()).unwrap());
        candle_core::safetensors::save(&all, file).unwrap();
        name
    };
    let ckpt = out.join("checkpoint-1");
    let opt = ckpt.join("optimizer.safetensors");
    let saved = std::fs::read(&opt).unwrap();
    let v = damage(&opt, "v.", &|t| (t - 1.0).unwrap());
    let err = resume(&ckpt);
    assert!(
        err.contains("checkpoint-1/optimizer.safetensors`: tensor `")
            && err.contains(&format!("`{v}` holds negative values")),
        "{err}"
    );
    assert!(
        !err.contains("learning_rate") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::write(&opt, saved).unwrap();
    let weights = ckpt.join("adapter_model.safetensors");
    let w = damage(&weights, "", &|t| (t * f64::NAN).unwrap());
    let err = resume(&ckpt);
    assert!(
        err.contains("checkpoint-1/adapter_model.safetensors`: tensor `")
            && err.contains(&format!("`{w}` holds NaN or infinite values")),
        "{err}"
    );
    assert!(!out.join("checkpoint-3").exists());
}

/// The bundle ships its default output dir `runs/<name>` as a link to an outside directory:
/// the recipe can neither read through it (`io::output_dir() + "/secret"`) nor write there.
#[test]
fn a_bundled_output_dir_link_reads_and_writes_nothing() {
    let env = Env::new();
    let victim = env.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("secret"), "TOP SECRET").unwrap();
    std::fs::create_dir(env.dir.path().join("runs")).unwrap();
    symlink(&victim, env.dir.path().join("runs/r")).unwrap();
    env.write(
        "r.rhai",
        "print(io::read_text(io::output_dir() + \"/secret\"));\n",
    );
    let o = run_bounded(&env, &["recipe/r.rhai"], 60);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the output directory") && err.contains("is a symbolic link"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("SECRET"));
    assert!(!err.contains("SECRET"), "{err}");
    // A missing file there is refused alike (nothing tells what exists in the victim's dir).
    env.write(
        "m.rhai",
        "print(io::read_text(io::output_dir() + \"/missing\"));\n",
    );
    symlink(&victim, env.dir.path().join("runs/m")).unwrap();
    let o = run_bounded(&env, &["recipe/m.rhai"], 60);
    let missing = stderr(&o);
    let shown = |e: &str, run: &str, file: &str| {
        e.replace(&format!("{run}.rhai"), "R")
            .replace(&format!("runs/{run}"), "runs/R")
            .replace(file, "F")
    };
    assert_eq!(
        shown(&err, "r", "secret"),
        shown(&missing, "m", "missing"),
        "an existing and a missing file read alike"
    );
    env.write("w.rhai", "io::write_text(\"x.txt\", \"pwned\");\n");
    symlink(&victim, env.dir.path().join("runs/w")).unwrap();
    let o = run_bounded(&env, &["recipe/w.rhai"], 60);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    let names: Vec<_> = std::fs::read_dir(&victim).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "nothing new in the victim's directory");
}

/// A link planted where TensorBoard's events go (`<out>/runs`) or where the output dir's lock
/// is taken (`<out>/.qscript.lock`): the run stops naming it, and the link's target is neither
/// written nor truncated.
#[test]
fn tensorboard_and_the_lock_never_write_through_a_planted_link() {
    let env = Env::new();
    let victim = env.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("notes"), "mine").unwrap();
    env.write("d.json", r#"[{"instruction": "a", "output": "b"}]"#);
    env.write(
        "tb.rhai",
        r#"let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
train::fit(lora::attach(model::tiny(), #{ r: 2 }), ds, #{ max_steps: 1, save_steps: 0, report_to: "tensorboard" });
"#,
    );
    let out = env.dir.path().join("out-tb");
    std::fs::create_dir(&out).unwrap();
    symlink(&victim, out.join("runs")).unwrap();
    let o = run_bounded(
        &env,
        &["recipe/tb.rhai", "--output-dir", out.to_str().unwrap()],
        120,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    let out = env.dir.path().join("out-lock");
    std::fs::create_dir(&out).unwrap();
    symlink(victim.join("notes"), out.join(".qscript.lock")).unwrap();
    let o = run_bounded(
        &env,
        &["recipe/tb.rhai", "--output-dir", out.to_str().unwrap()],
        120,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".qscript.lock") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("notes")).unwrap(),
        "mine"
    );
    let names: Vec<_> = std::fs::read_dir(&victim).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "nothing new in the victim's directory");
}

/// A recipe named `...rhai` (stem `..`) or `..rhai` (stem `.`) gets a default output dir under `runs/`,
/// never the working directory itself.
#[test]
fn the_default_output_dir_is_never_the_working_directory() {
    let env = Env::new();
    for name in ["...rhai", "..rhai"] {
        env.write(name, "io::write_text(\"planted.txt\", \"pwned\");\n");
        let o = run_bounded(&env, &[&format!("recipe/{name}")], 60);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert!(
            !env.dir.path().join("planted.txt").exists(),
            "{name} wrote into the working directory"
        );
        let written = env.dir.path().join("runs/recipe/planted.txt");
        assert!(written.is_file(), "{name}: {}", stderr(&o));
        std::fs::remove_file(written).unwrap();
    }
}

/// Starts the REPL on a fresh pseudo-terminal, playing the terminal's part (answers to cursor
/// and device queries) until the prompt shows. Returns the child, and the terminal's side,
/// answering on its own thread until `hang_up` is set (then closed: the terminal hung up).
fn repl_on_a_pty(
    env: &Env,
    hang_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::process::Child {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    // Close-on-exec: a child holding the terminal's side open would never see it hang up.
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    let mut cmd = qscript();
    cmd.current_dir(env.dir.path())
        .env("HOME", env.dir.path())
        .env("XDG_STATE_HOME", env.dir.path())
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    let child = cmd.spawn().unwrap();
    drop(cmd);
    let mut master = std::fs::File::from(master);
    rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        while !hang_up.load(Ordering::SeqCst) {
            match master.read(&mut buf) {
                Ok(n) if n > 0 => {
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if text.contains("\x1b[6n") {
                        let _ = master.write_all(b"\x1b[1;1R");
                    }
                    if text.contains("\x1b[c") {
                        let _ = master.write_all(b"\x1b[?62c");
                    }
                    if !told && String::from_utf8_lossy(&seen).contains("Ctrl-D to quit") {
                        told = true;
                        let _ = tx.send(());
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // Dropping `master` closes the terminal's side.
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the REPL showed its banner");
    // Let reedline reach its prompt.
    std::thread::sleep(Duration::from_millis(1500));
    child
}

/// Waits up to `secs` for `child` to end; kills it and fails if it does not.
fn ends_within(mut child: std::process::Child, secs: u64, what: &str) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("the REPL still runs {secs} s after {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lost terminal ends the REPL: its other side closed (a killed terminal window), or a
/// SIGHUP / SIGTERM at the prompt, instead of a process left spinning.
#[test]
fn a_lost_terminal_ends_the_repl() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let hang_up = Arc::new(AtomicBool::new(false));
    let child = repl_on_a_pty(&env, hang_up.clone());
    hang_up.store(true, Ordering::SeqCst);
    ends_within(child, 3, "its terminal hung up");
    for signal in [rustix::process::Signal::HUP, rustix::process::Signal::TERM] {
        let hang_up = Arc::new(AtomicBool::new(false));
        let child = repl_on_a_pty(&env, hang_up.clone());
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        ends_within(child, 3, &format!("{signal:?}"));
        hang_up.store(true, Ordering::SeqCst);
    }
}
