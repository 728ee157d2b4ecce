//! The `qscript` binary: running recipes, `--set`, `check`, exit codes, the sandbox from the
//! command line, piped REPL input and Ctrl-C.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use insta::assert_snapshot;
use support::{Env, qscript, run_in, stderr, stdout};

const RECIPE: &str = r#"// %% params
let p = params(#{ lr: 1e-4, max_steps: 100, bf16: true, model: "tiny" });
// %% show
print(`lr=${p.lr} max_steps=${p.max_steps} bf16=${p.bf16} model=${p.model}`);
io::write_text("done.txt", "ok");
"#;

fn env_with_recipe() -> Env {
    let env = Env::new();
    env.write("r.rhai", RECIPE);
    env
}

#[test]
fn runs_a_recipe_with_overrides() {
    let env = env_with_recipe();
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/r.rhai",
            "--set",
            "lr=2e-4",
            "--set",
            "max_steps=5",
            "--set",
            "model=/m",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "lr=0.0002 max_steps=5 bf16=true model=/m\n");
    assert!(
        env.dir.path().join("runs/r/done.txt").exists(),
        "default output dir is ./runs/<name>"
    );
}

/// `--config run.yaml` supplies params as TRL's `--config` does, `--set` on top; a JSON file
/// works the same; an unknown or mistyped key names the file and the key.
#[test]
fn a_config_file_supplies_params_under_set() {
    let env = env_with_recipe();
    env.write("run.yaml", "lr: 3.0e-4\nmax_steps: 7\nmodel: /from/yaml\n");
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/r.rhai",
            "--config",
            "recipe/run.yaml",
            "--set",
            "max_steps=9",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "lr=0.0003 max_steps=9 bf16=true model=/from/yaml\n"
    );
    env.write("run.json", r#"{"bf16": false, "max_steps": 2}"#);
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/run.json"],
    );
    assert_eq!(stdout(&o), "lr=0.0001 max_steps=2 bf16=false model=tiny\n");
    env.write("bad.yaml", "lr: 1e-4\nmax_step: 7\n");
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/bad.yaml"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(
            "unknown param `max_step` in `recipe/bad.yaml` (key `max_step`); the recipe declares: "
        ),
        "{e}"
    );
    env.write("typed.yaml", "max_steps: many\n");
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/typed.yaml"],
    );
    let e = stderr(&o);
    assert!(
        e.contains("`recipe/typed.yaml` (key `max_steps`): expected an integer"),
        "{e}"
    );
    env.write("list.yaml", "- 1\n");
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/list.yaml"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("must hold a mapping of params"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn run_subcommand_and_output_dir() {
    let env = env_with_recipe();
    let out = env.dir.path().join("elsewhere");
    let o = run_in(
        env.dir.path(),
        &[
            "run",
            "recipe/r.rhai",
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(out.join("done.txt").exists());
}

#[test]
fn set_values_are_checked_against_the_defaults() {
    let env = env_with_recipe();
    let o = run_in(env.dir.path(), &["recipe/r.rhai", "--set", "max_steps=ten"]);
    assert_eq!(o.status.code(), Some(1));
    assert_snapshot!("set_wrong_type", env.filter(&stderr(&o)));
    let o = run_in(env.dir.path(), &["recipe/r.rhai", "--set", "bf16=1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("`--set bf16=1`: expected `true` or `false`"),
        "{}",
        stderr(&o)
    );
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--set", "learning_rate=1"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "unknown param `learning_rate` in `--set learning_rate=1`; the recipe declares: `bf16`, `lr`, `max_steps`, `model`"
        ),
        "{}",
        stderr(&o)
    );
}

#[test]
fn set_without_params_is_an_error() {
    let env = Env::new();
    env.write("plain.rhai", "print(1);\n");
    let o = run_in(env.dir.path(), &["recipe/plain.rhai", "--set", "lr=1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("but the recipe declares none"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2_and_user_errors_exit_1() {
    let env = env_with_recipe();
    let o = run_in(env.dir.path(), &["recipe/r.rhai", "--set", "novalue"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("expected `KEY=VALUE`, found `novalue`"),
        "{}",
        stderr(&o)
    );
    let o = run_in(env.dir.path(), &["recipe/r.rhai", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run_in(env.dir.path(), &["recipe/missing.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read recipe `recipe/missing.rhai`"),
        "{}",
        stderr(&o)
    );
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--allow-read", "/no/such/dir"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("`--allow-read /no/such/dir`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn script_errors_show_file_line_and_caret() {
    let env = Env::new();
    env.write(
        "bad.rhai",
        "// %% a\nlet x = 1;\n// %% b\nlet y = lenn(x);\n",
    );
    let o = run_in(env.dir.path(), &["recipe/bad.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert_snapshot!("unknown_function", env.filter(&stderr(&o)));
    env.write("syntax.rhai", "let x = 1;\n// %% b\nlet y = (x + ;\n");
    let o = run_in(env.dir.path(), &["recipe/syntax.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert_snapshot!("syntax_error", env.filter(&stderr(&o)));
}

#[test]
fn check_parses_and_resolves_params_without_running() {
    let env = env_with_recipe();
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/r.rhai", "--set", "lr=3e-4"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_snapshot!("check_ok", env.filter(&stdout(&o)));
    assert!(!env.dir.path().join("runs").exists(), "check runs nothing");
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/r.rhai", "--set", "lr=fast"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("`--set lr=fast`: expected a finite number"),
        "{}",
        stderr(&o)
    );
    env.write(
        "syntax.rhai",
        "let p = params(#{ a: 1 });\n// %% b\nfn f( {\n",
    );
    let o = run_in(env.dir.path(), &["check", "recipe/syntax.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("syntax.rhai:3:"), "{}", stderr(&o));
}

#[test]
fn sandbox_refusals_from_the_command_line() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("secret.txt"), "s").unwrap();
    env.write("passwd.rhai", "print(io::read_text(\"/etc/passwd\"));\n");
    env.write("escape.rhai", "print(io::read_text(\"../secret.txt\"));\n");
    env.write("write.rhai", "io::write_text(\"../../x.txt\", \"x\");\n");
    for name in ["passwd", "escape", "write"] {
        let o = run_in(env.dir.path(), &[&format!("recipe/{name}.rhai")]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(
            stderr(&o).starts_with("error[sandbox]: cannot "),
            "{name}: {}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "{name}");
    }
    let o = run_in(env.dir.path(), &["recipe/escape.rhai", "--allow-read", "."]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "s\n");
}

#[test]
fn an_endless_loop_is_stopped_by_the_operation_limit() {
    let env = Env::new();
    env.write("loop.rhai", "let i = 0;\nwhile true { i += 1; }\n");
    let o = run_in(
        env.dir.path(),
        &["recipe/loop.rhai", "--max-operations", "100000"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("error: the script was stopped after too many operations"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn piped_repl_evaluates_lines_in_order() {
    let env = Env::new();
    let mut child = qscript()
        .current_dir(env.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"let x = [1,\n2, 3];\nx.len()\nprint(\"hi\");\nnope()\nx[0]\n")
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "=> 3 : i64\nhi\n=> 1 : i64\n");
    assert!(
        stderr(&o).contains("function not found: `nope ()`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(1), "an entry failed");
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_a_running_recipe() {
    let env = Env::new();
    env.write(
        "spin.rhai",
        "print(\"started\");\nlet i = 0;\nloop { i += 1; }\n",
    );
    let mut child = qscript()
        .current_dir(env.dir.path())
        .args(["recipe/spin.rhai", "--max-operations", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    // A stop is not an error: exit 130 (as shells report SIGINT), no `error:`, no caret.
    assert_eq!(o.status.code(), Some(130));
    assert_eq!(stderr(&o), "stopped\n");
}

#[test]
fn check_renders_the_first_examples_and_fails_on_bad_data() {
    let env = Env::new();
    let recipe =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/huanhuan_lora.rhai");
    std::fs::copy(&recipe, env.recipe_dir().join("h.rhai")).unwrap();
    std::fs::create_dir(env.recipe_dir().join("data")).unwrap();
    std::fs::copy(
        recipe.parent().unwrap().join("data/huanhuan_demo.json"),
        env.recipe_dir().join("data/huanhuan_demo.json"),
    )
    .unwrap();
    let o = run_in(env.dir.path(), &["check", "recipe/h.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("check: example 0 (record 0), 153 tokens, learned spans in [[...]]:"),
        "{out}"
    );
    assert!(
        out.contains(
            "<|im_start|>assistant\n[[臣妾是宫里的甄嬛，承蒙皇上错爱，封为莞嫔。<|im_end|>\n]]"
        ),
        "{out}"
    );
    assert!(out.contains("ran all 7 cells as a dry run"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("check: steps: 40 examples / batch 4 = 10 micro-batches an epoch; / accumulation 2 = 5 steps an epoch x 20 epochs = 100 steps"),
        "{err}"
    );
    assert!(err.contains("check: memory on cpu"), "{err}");
    assert!(
        !err.contains("Running training") && !env.dir.path().join("runs").exists(),
        "nothing trained or written"
    );
    env.write(
        "bad.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ["d"]}]"#,
    );
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/h.rhai", "--set", "data=bad.json"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("bad.json`: record 1 (alpaca): `output` is an array, expected a string"),
        "{}",
        stderr(&o)
    );
}

/// A byte-order mark does not break a recipe or a JSONL file; bytes that are not UTF-8 are an
/// error naming the file, line and column.
#[test]
fn byte_order_marks_are_dropped_and_non_utf8_text_is_located() {
    let env = Env::new();
    let bom = "\u{feff}";
    env.write("d.jsonl", &format!("{bom}{{\"x\": 1}}\n{{\"x\": 2}}\n"));
    env.write(
        "r.rhai",
        &format!("{bom}let ds = data::load(\"d.jsonl\");\nprint(ds.len());\n"),
    );
    let o = run_in(env.dir.path(), &["recipe/r.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "2\n");
    std::fs::write(
        env.recipe_dir().join("bad.jsonl"),
        b"{\"x\": 1}\n{\"x\": \"caf\xe9\"}\n",
    )
    .unwrap();
    env.write("b.rhai", "let ds = data::load(\"bad.jsonl\");\n");
    let o = run_in(env.dir.path(), &["recipe/b.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("bad.jsonl`: line 2, column 11: not UTF-8 text (byte 0xe9)"),
        "{e}"
    );
    std::fs::write(env.recipe_dir().join("l1.rhai"), b"print(\"caf\xe9\");\n").unwrap();
    let o = run_in(env.dir.path(), &["recipe/l1.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("l1.rhai`: line 1, column 11: not UTF-8 text"),
        "{}",
        stderr(&o)
    );
}

/// Values that grow without end (a string doubling, an array pushed forever, a huge blob) stop
/// with an error that names the limit and its flag, in bounded memory, not an abort. (A map grown
/// by index assignment is not checked by Rhai's limit: not covered yet.)
#[test]
fn growing_values_hit_a_size_limit_the_user_can_raise() {
    let env = Env::new();
    for (name, code, what) in [
        (
            "s.rhai",
            "let s = \"x\";\nloop { s += s; }\n",
            "error: length of string grew over the size limit",
        ),
        (
            "a.rhai",
            "let a = [];\nloop { a.push(1); }\n",
            "error: size of array/blob grew over the size limit",
        ),
        (
            "b.rhai",
            "let b = blob(100000000000);\n",
            "grew over the size limit",
        ),
    ] {
        env.write(name, code);
        let o = run_in(
            env.dir.path(),
            &[
                &format!("recipe/{name}"),
                "--max-operations",
                "0",
                "--max-value-size",
                "100000",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{name}");
        let e = stderr(&o);
        assert!(
            e.contains(what) && e.contains("--max-value-size N"),
            "{name}: {e}"
        );
    }
}

/// A null field says it is null (not missing); a chat template that fails names its file, not
/// the dataset alone.
#[test]
fn null_fields_and_template_failures_are_named() {
    let env = Env::new();
    env.write("n.json", r#"[{"instruction": "a", "output": null}]"#);
    env.write("n.rhai", "data::to_messages(data::load(\"n.json\"));\n");
    let o = run_in(env.dir.path(), &["recipe/n.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("record 0 (alpaca): `output` is null, expected a string"),
        "{}",
        stderr(&o)
    );
    env.write("save.rhai", "tokenizer::builtin().save(\"bt\");\n");
    let saved = env.dir.path().join("saved");
    let o = run_in(
        env.dir.path(),
        &["recipe/save.rhai", "--output-dir", saved.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let tok = env.recipe_dir().join("tok");
    std::fs::create_dir(&tok).unwrap();
    std::fs::copy(saved.join("bt/tokenizer.json"), tok.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(saved.join("bt/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg["chat_template"] =
        "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}".into();
    std::fs::write(tok.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    env.write("ok.json", r#"[{"instruction": "a", "output": "b"}]"#);
    env.write(
        "t.rhai",
        "data::sft(data::to_messages(data::load(\"ok.json\")), tokenizer::load(\"tok\"));\n",
    );
    let o = run_in(env.dir.path(), &["recipe/t.rhai"]);
    let err = env.filter(&stderr(&o));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("error[template]: chat template: `[TMP]/recipe/tok/tokenizer_config.json` fails on record 0 of `[TMP]/recipe/ok.json`: unknown filter"),
        "{err}"
    );
}

/// A chat template that cannot render tool calls does not train empty assistant turns: the
/// turns are left untrained and a warning counts them; Qwen2.5's template renders them.
#[test]
fn tool_calls_a_template_cannot_render_are_counted_not_trained() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("the glaive tool-call demo") else {
        return;
    };
    let env = Env::new();
    std::fs::copy(
        fx.join("datasets/llamafactory/glaive_toolcall_en_demo.json"),
        env.recipe_dir().join("g.json"),
    )
    .unwrap();
    let q = env.recipe_dir().join("qwen");
    std::fs::create_dir(&q).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join("tokenizers/qwen2.5").join(f), q.join(f)).unwrap();
    }
    env.write(
        "t.rhai",
        r#"let ds = data::to_messages(data::load("g.json"));
let a = data::sft(ds, tokenizer::builtin(), #{ max_length: 4096 });
print("qwen");
let b = data::sft(ds, tokenizer::load("qwen"), #{ max_length: 4096 });
"#,
    );
    let o = run_in(env.dir.path(), &["recipe/t.rhai"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: the tokenizer's chat template does not render tool calls: 211 assistant turns with tool calls are not trained"),
        "{err}"
    );
    assert_eq!(
        err.matches("does not render tool calls").count(),
        1,
        "{err}"
    );
}

/// A recipe written for TRL's or LLaMA-Factory's YAML: it declares the keys it reads as params
/// and takes the training options with `train::options`.
const TRL_RECIPE: &str = r#"let p = params(#{ model_name_or_path: "tiny", torch_dtype: "float32", attn_implementation: "eager",
    dataset_name: "d.json", use_peft: false, lora_r: 8, lora_alpha: 16.0, lora_dropout: 0.0, lora_target_modules: ["q_proj"] });
let opts = train::options(#{ learning_rate: 1e-3, max_steps: -1, save_steps: 500 });
print(`lr=${opts.learning_rate} sched=${opts.lr_scheduler_type} accum=${opts.gradient_accumulation_steps} epochs=${opts.num_train_epochs} batch=${opts.per_device_train_batch_size} report=${opts.report_to} save=${opts.save_strategy} optim=${opts.optim} kwargs=${opts.lr_scheduler_kwargs}`);
print(`model=${p.model_name_or_path} data=${p.dataset_name} peft=${p.use_peft} r=${p.lora_r} alpha=${p.lora_alpha} targets=${p.lora_target_modules}`);
let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
let peft = lora::attach(model::tiny(), #{ r: p.lora_r, lora_alpha: p.lora_alpha, target_modules: p.lora_target_modules });
let out = train::fit(peft, ds, opts);
"#;

const LF_RECIPE: &str = r#"let p = params(#{ model_name_or_path: "tiny", stage: "sft", finetuning_type: "lora", lora_rank: 4,
    lora_target: "all", dataset: "d.json", template: "default", cutoff_len: 1024, max_samples: 100 });
let opts = train::options(#{ learning_rate: 1e-3 });
print(`lr=${opts.learning_rate} sched=${opts.lr_scheduler_type} accum=${opts.gradient_accumulation_steps} epochs=${opts.num_train_epochs} warmup=${opts.warmup_ratio} out=${opts.output_dir} resume=${opts.resume_from_checkpoint}`);
print(`stage=${p.stage} rank=${p.lora_rank} target=${p.lora_target} dataset=${p.dataset} template=${p.template} cutoff=${p.cutoff_len}`);
let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());
let out = train::fit(lora::attach(model::tiny(), #{ r: p.lora_rank }), ds, opts);
"#;

const SMALL_DATA: &str = r#"[{"instruction": "hi", "output": "hello"}, {"instruction": "bye", "output": "see you"},
    {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]"#;

/// What a config recipe printed, without the training log (its losses and speeds vary).
fn options_lines(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with("step "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn config_fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/configs")
        .join(name);
    std::fs::read_to_string(p).unwrap()
}

/// TRL's and LLaMA-Factory's YAML files, as their docs give them, run with `--config`: training
/// options reach `train::fit` through `train::options`, the other keys set params, the keys
/// that steer their processes get one note, and `check` labels each value with its source.
#[test]
fn trl_and_llamafactory_yaml_configs_run_as_they_are() {
    let env = Env::new();
    env.write("d.json", SMALL_DATA);
    env.write("trl.rhai", TRL_RECIPE);
    env.write("trl.yaml", &config_fixture("trl_sft.yaml"));
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/trl.rhai",
            "--config",
            "recipe/trl.yaml",
            "--set",
            "learning_rate=5e-4",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_snapshot!("trl_yaml_stdout", options_lines(&stdout(&o)));
    let err = stderr(&o);
    assert!(err.contains("Total optimization steps = 1"), "{err}");

    env.write("lf.rhai", LF_RECIPE);
    env.write("lf.yaml", &config_fixture("llamafactory_lora_sft.yaml"));
    let o = run_in(
        env.dir.path(),
        &["recipe/lf.rhai", "--config", "recipe/lf.yaml"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_snapshot!("llamafactory_yaml_stdout", options_lines(&stdout(&o)));
    let err = stderr(&o);
    assert!(
        err.contains("note: `recipe/lf.yaml`: `dataloader_num_workers`, `ddp_timeout`, `do_train`, `overwrite_cache`, `overwrite_output_dir`, `plot_loss`, `preprocessing_num_workers`, `save_only_model`, `trust_remote_code` steer other tools' processes and have no effect here"),
        "{err}"
    );
    assert!(err.contains("Total optimization steps = 3"), "{err}");

    let o = run_in(
        env.dir.path(),
        &[
            "check",
            "recipe/lf.rhai",
            "--config",
            "recipe/lf.yaml",
            "--set",
            "lora_rank=2",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("  stage              = \"sft\"  (--config recipe/lf.yaml)\n"),
        "{out}"
    );
    assert!(out.contains("  lora_rank          = 2  (--set)\n"), "{out}");
    assert!(
        out.contains("train options for `train::options`:\n  bf16                        = true  (--config recipe/lf.yaml)\n  gradient_accumulation_steps = 8  (--config recipe/lf.yaml)\n"),
        "{out}"
    );
}

/// Unknown keys of a config file are one error that lists each with the closest name; a
/// mistyped `--set` gets a did-you-mean; training options the recipe never takes are an error.
#[test]
fn unknown_config_keys_are_one_error_with_did_you_mean() {
    let env = env_with_recipe();
    env.write(
        "typos.yaml",
        "lr: 3.0e-4\nmax_stepz: 7\ngradient_acumulation_steps: 4\nzzz_unrelated: 1\n",
    );
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/typos.yaml"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("3 unknown params: `gradient_acumulation_steps` (in `recipe/typos.yaml` (key `gradient_acumulation_steps`), did you mean `gradient_accumulation_steps`?), `max_stepz` (in `recipe/typos.yaml` (key `max_stepz`), did you mean `max_steps`?), `zzz_unrelated` (in `recipe/typos.yaml` (key `zzz_unrelated`)); the recipe declares: "),
        "{e}"
    );
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--set", "learning_rte=1e-4"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("unknown param `learning_rte` in `--set learning_rte=1e-4`; the recipe declares: `bf16`, `lr`, `max_steps`, `model`; did you mean `learning_rate`?"),
        "{e}"
    );
    // A training option the recipe does not take (no `train::options`) is not dropped silently.
    env.write("train.yaml", "learning_rate: 3.0e-4\nmax_steps: 3\n");
    let o = run_in(
        env.dir.path(),
        &["recipe/r.rhai", "--config", "recipe/train.yaml"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("unknown param `learning_rate` in `recipe/train.yaml` (key `learning_rate`); the recipe declares: `bf16`, `lr`, `max_steps`, `model`; `learning_rate` is a training option: the recipe takes those through `train::options`"),
        "{e}"
    );
    // A recipe that trains without `train::options` stops at `train::fit`, before training.
    env.write("d.json", SMALL_DATA);
    env.write(
        "fit.rhai",
        "let p = params(#{ r: 4 });\nlet ds = data::sft(data::to_messages(data::load(\"d.json\")), tokenizer::builtin());\ntrain::fit(lora::attach(model::tiny(), #{ r: p.r }), ds, #{ max_steps: 1, save_steps: 0 });\n",
    );
    let o = run_in(
        env.dir.path(),
        &["recipe/fit.rhai", "--set", "learning_rate=1e-4"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("unknown param `learning_rate` in `--set learning_rate=1e-4`; the recipe declares: `r`; `learning_rate` is a training option")
            && e.contains("recipe/fit.rhai:3:8")
            && !e.contains("Total optimization steps"),
        "{e}"
    );
}

/// Puts `files` (relative path, bytes) into a fake HF cache repo at `commit`, laid out as
/// `huggingface_hub` lays it out: blobs by hash, snapshot entries linking to them, `refs/main`.
fn hf_cache_repo(root: &std::path::Path, folder: &str, commit: &str, files: &[(&str, Vec<u8>)]) {
    let repo = root.join(folder);
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::write(&blob, bytes).unwrap();
        let link = snap.join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count() + 2;
        let up = "../".repeat(depth);
        std::os::unix::fs::symlink(format!("{up}blobs/blob{i}"), &link).unwrap();
    }
}

/// Models, tokenizers and datasets by hub id from the HF cache (`$HF_HUB_CACHE`), as
/// `huggingface-cli download` leaves them: the snapshot of `refs/main`, a dataset's split by its
/// file names; the rest of the cache stays unreadable; a repo not in the cache says how to get it.
#[test]
fn hub_ids_load_from_the_hf_cache() {
    let env = Env::new();
    let cache = tempfile::tempdir().unwrap();
    // A tiny model saved as an HF checkpoint, then moved into the cache layout.
    let saved = tempfile::tempdir().unwrap();
    env.write(
        "save.rhai",
        r#"model::tiny(#{ seed: 1 }).save("m", tokenizer::builtin());"#,
    );
    let o = run_in(
        &env.recipe_dir(),
        &["save.rhai", "--output-dir", &saved.path().to_string_lossy()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(saved.path().join("m"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    hf_cache_repo(cache.path(), "models--org--tiny", commit, &files);
    let parquet =
        std::fs::read(qscript_runtime::testing::repo_fixtures().join("data/alpaca-snappy.parquet"))
            .unwrap();
    hf_cache_repo(
        cache.path(),
        "datasets--org--alpaca",
        commit,
        &[
            ("data/train-00000-of-00001.parquet", parquet),
            (
                "data/test.jsonl",
                b"{\"instruction\": \"a\", \"output\": \"b\"}\n".to_vec(),
            ),
            ("README.md", b"# card".to_vec()),
        ],
    );
    std::fs::write(cache.path().join("secret.txt"), "not for recipes").unwrap();
    env.write(
        "hub.rhai",
        &format!(
            r#"let m = model::load("org/tiny", #{{ dtype: "f32", device: "cpu" }});
let tok = tokenizer::load("org/tiny");
let train = data::load("org/alpaca");
let test = data::load("org/alpaca", #{{ split: "test" }});
print(`model ${{m.arch}}, train ${{train.len()}}, test ${{test.len()}}, eos ${{tok.eos_token}}`);
let ds = data::sft(data::to_messages(train), tok);
print(`sft ${{ds.len()}}`);
try {{ io::read_text({:?}); }} catch (e) {{ print(`refused: ${{e}}`); }}
"#,
            cache.path().join("secret.txt").to_string_lossy()
        ),
    );
    let o = qscript()
        .current_dir(env.recipe_dir())
        .env("HF_HUB_CACHE", cache.path())
        .args(["hub.rhai"])
        .output()
        .unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("model Qwen2ForCausalLM, train 2, test 1, eos <|endoftext|>"),
        "{out}"
    );
    assert!(out.contains("sft 2"), "{out}");
    assert!(
        out.contains("refused: ") && out.contains("outside the recipe's sandbox"),
        "{out}"
    );
    assert!(
        err.contains("hub: `org/tiny` from the HF cache") && err.contains("commit 0123456789ab"),
        "{err}"
    );
    // A dataset `datasets.load_dataset` built into its own cache (Arrow stream files), not in
    // the hub cache.
    let dcache = tempfile::tempdir().unwrap();
    let build = dcache.path().join("org___chats/default/0.0.0/0a1b2c");
    std::fs::create_dir_all(&build).unwrap();
    std::fs::copy(
        qscript_runtime::testing::repo_fixtures().join("data/messages-stream.arrow"),
        build.join("chats-train.arrow"),
    )
    .unwrap();
    env.write(
        "built.rhai",
        "let d = data::load(\"org/chats\"); print(`built ${d.len()} ${d[1].messages[1].content}`);",
    );
    let o = qscript()
        .current_dir(env.recipe_dir())
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_DATASETS_CACHE", dcache.path())
        .args(["built.rhai"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("built 2 4"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("hub: `org/chats` (train) from the datasets cache"),
        "{}",
        stderr(&o)
    );
    for (code, want) in [
        (
            r#"model::load("org/missing")"#,
            "`org/missing` is not a local directory, and the model is not in the HF cache",
        ),
        (
            r#"model::load("org/tiny", #{ revision: "v9" })"#,
            "the HF cache has no revision `v9` (refs there: `main`)",
        ),
        (
            r#"data::load("org/alpaca", #{ split: "validation" })"#,
            "the dataset has no `validation` split",
        ),
        (
            r#"data::load("org/missing")"#,
            "huggingface-cli download org/missing --repo-type dataset",
        ),
    ] {
        env.write("bad.rhai", code);
        let o = qscript()
            .current_dir(env.recipe_dir())
            .env("HF_HUB_CACHE", cache.path())
            .args(["bad.rhai"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{code}");
        assert!(stderr(&o).contains(want), "{code}: {}", stderr(&o));
    }
}
