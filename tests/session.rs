//! Sessions without a terminal: REPL transcripts, notebook cells and re-runs, imports, sandbox
//! refusals, limits and cancellation.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use insta::assert_snapshot;
use qscript_stdlib::Failure;
use support::{Env, transcript};

#[test]
fn repl_multiline_echo_and_functions() {
    let env = Env::new();
    let mut s = env.session();
    let t = transcript(
        &env,
        &mut s,
        "let x = 1 +\n2;\nx * 2\nfn twice(v) {\n  v * 2\n}\ntwice(x)\n\"text\"\n[1, 2]\nprint(`x is ${x}`);\nlet m = #{\n  a: 1,\n  b: \"two\"\n};\nm.b\n",
    );
    assert_snapshot!("repl_multiline", t);
}

#[test]
fn repl_errors_show_position_and_caret() {
    let env = Env::new();
    let mut s = env.session();
    let t = transcript(
        &env,
        &mut s,
        "let x = 1; }\nio::read_txt(\"a\")\nio::read_text(42)\nlet y = undefined_var + 1;\nfn f() {\n  io::read_text(\"/etc/passwd\")\n}\nf()\nlet kind = ();\ntry { f() } catch (e) { kind = e.kind }\nkind\nlet ok = 1;\nok\n",
    );
    assert_snapshot!("repl_errors", t);
}

/// A method of a module called with the wrong argument types shows its real signatures, not a
/// close name (`m.chat(tok, "hello")` once suggested `chars`).
#[test]
fn wrong_argument_types_of_a_method_show_its_signatures() {
    let env = Env::new();
    let mut s = env.session();
    s.eval("let m = model::tiny(); let tok = tokenizer::builtin();")
        .unwrap();
    for code in [r#"m.chat(tok, "hello")"#, r#"chat(m, tok, "hello")"#] {
        let e = s.eval(code).unwrap_err().rendered;
        assert!(
            e.contains(
                "help: wrong argument types; `chat` takes: `model::chat(m: Model, tok: Tokenizer, messages: array) -> string`"
            ),
            "{e}"
        );
    }
}

#[test]
fn repl_help_and_commands() {
    let env = Env::new();
    let mut s = env.session();
    let t = transcript(
        &env,
        &mut s,
        ":help params\n:help io::write_text\n:help nope\n:cells\n:reload\n:bogus\n",
    );
    assert_snapshot!("repl_help", t);
    let t = transcript(&env, &mut s, ":help\n");
    assert!(t.contains(":load") && t.contains("io::read_json"), "{t}");
}

const RECIPE: &str = r#"// %% setup
let counter = 10;
print("cell 1 ran");
// %% step
counter += 1;
print(`cell 2 ran: ${counter}`);
// %% report
print(`cell 3 ran: ${counter}`);
"#;

#[test]
fn an_edit_reruns_from_the_changed_cell_with_the_scope_before_it() {
    let env = Env::new();
    let path = env.write("r.rhai", RECIPE);
    let mut s = env.session();
    let first = s.load_file(&path).unwrap();
    assert!(first.error.is_none());
    assert_eq!(first.reused, 0);
    assert_eq!(
        env.sink.take(),
        "cell 1 ran\ncell 2 ran: 11\ncell 3 ran: 11\n"
    );

    // Unchanged file: nothing runs.
    let again = s.load_file(&path).unwrap();
    assert_eq!((again.reused, again.ran.len()), (3, 0));
    assert_eq!(again.summary(), "nothing changed");

    // Edit cell 2: cells 2 and 3 re-run, from the scope after cell 1 (counter = 10, not 11).
    env.write("r.rhai", &RECIPE.replace("counter += 1;", "counter += 5;"));
    let rerun = s.load_file(&path).unwrap();
    assert!(rerun.error.is_none());
    assert_eq!(rerun.reused, 1);
    assert_eq!(env.sink.take(), "cell 2 ran: 15\ncell 3 ran: 15\n");
    assert!(
        rerun
            .summary()
            .starts_with("re-ran cells 2-3 (cell 2 \"step\" "),
        "{}",
        rerun.summary()
    );

    // Edit only the last cell.
    env.write(
        "r.rhai",
        &RECIPE
            .replace("counter += 1;", "counter += 5;")
            .replace("cell 3 ran", "cell 3 again"),
    );
    let last = s.load_file(&path).unwrap();
    assert_eq!(last.reused, 2);
    assert_eq!(env.sink.take(), "cell 3 again: 15\n");
    assert_eq!(s.eval("counter").unwrap().as_deref(), Some("=> 15 : i64"));
}

#[test]
fn a_parse_error_keeps_the_state_and_a_fix_resumes() {
    let env = Env::new();
    let path = env.write("r.rhai", RECIPE);
    let mut s = env.session();
    s.load_file(&path).unwrap();
    env.sink.take();
    env.write("r.rhai", &RECIPE.replace("counter += 1;", "counter += ;"));
    let err = s.load_file(&path).unwrap_err();
    assert_snapshot!("reload_parse_error", env.filter(&err.rendered));
    assert_eq!(env.sink.take(), "", "nothing ran");
    assert!(
        s.cells().iter().all(|c| c.elapsed.is_some()),
        "old cells kept"
    );
    assert_eq!(s.eval("counter").unwrap().as_deref(), Some("=> 11 : i64"));

    env.write("r.rhai", &RECIPE.replace("counter += 1;", "counter += 2;"));
    let fixed = s.load_file(&path).unwrap();
    assert_eq!(fixed.reused, 1);
    assert_eq!(env.sink.take(), "cell 2 ran: 12\ncell 3 ran: 12\n");
}

#[test]
fn a_failed_cell_runs_again_on_the_next_load_and_functions_carry_over() {
    let env = Env::new();
    let src = "// %% a\nfn inc(v) { v + 1 }\nlet n = 1;\n// %% b\nlet m = inc(n);\nif m > 1 { throw \"boom\" }\n";
    let path = env.write("r.rhai", src);
    let mut s = env.session();
    let r = s.load_file(&path).unwrap();
    let e = r.error.unwrap();
    assert!(e.rendered.contains("boom"), "{}", e.rendered);
    assert_eq!(s.cells()[1].elapsed, None);
    env.write("r.rhai", &src.replace("m > 1", "m > 5"));
    let r = s.load_file(&path).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.reused, 1, "cell a is reused, its function still defined");
    assert_eq!(s.eval("m").unwrap().as_deref(), Some("=> 2 : i64"));
}

#[test]
fn changing_an_imported_file_reruns_the_cells_that_import_it() {
    let env = Env::new();
    env.write("lib.rhai", "export const SCALE = 2;\n");
    let src = "// %% a\nprint(\"a\");\n// %% b\nimport \"lib\" as lib;\nprint(`b ${lib::SCALE}`);\n// %% c\nprint(\"c\");\n";
    let path = env.write("r.rhai", src);
    let mut s = env.session();
    s.load_file(&path).unwrap();
    assert_eq!(env.sink.take(), "a\nb 2\nc\n");
    assert_eq!(s.watched_files().len(), 2);
    env.write("lib.rhai", "export const SCALE = 3;\n");
    let r = s.load_file(&path).unwrap();
    assert_eq!(r.reused, 1);
    assert_eq!(env.sink.take(), "b 3\nc\n");
}

#[test]
fn imports_go_through_the_sandbox() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("outside.rhai"), "export const X = 1;").unwrap();
    let path = env.write("r.rhai", "import \"../outside\" as o;\n");
    let mut s = env.session();
    let e = s.load_file(&path).unwrap().error.unwrap();
    assert!(
        e.rendered.contains("error[sandbox]: cannot read"),
        "{}",
        e.rendered
    );
}

#[test]
fn sandbox_refusals_are_catchable_errors_of_kind_sandbox() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("secret.txt"), "s").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        env.dir.path().join("secret.txt"),
        env.recipe_dir().join("link.txt"),
    )
    .unwrap();
    let mut s = env.session();
    let kind = |s: &mut qscript_stdlib::Session, code: &str| {
        let code =
            format!("let k = \"no error\";\ntry {{ {code}; }} catch (e) {{ k = e.kind; }}\nk");
        s.eval(&code).unwrap().unwrap()
    };
    assert_eq!(
        kind(&mut s, r#"io::read_text("/etc/passwd")"#),
        r#"=> "sandbox" : string"#
    );
    assert_eq!(
        kind(&mut s, r#"io::read_text("../secret.txt")"#),
        r#"=> "sandbox" : string"#
    );
    #[cfg(unix)]
    assert_eq!(
        kind(&mut s, r#"io::read_text("link.txt")"#),
        r#"=> "sandbox" : string"#
    );
    assert_eq!(
        kind(&mut s, r#"io::write_text("../escape.txt", "x")"#),
        r#"=> "sandbox" : string"#
    );
    assert_eq!(
        kind(&mut s, r#"io::write_text("/tmp/qscript-escape.txt", "x")"#),
        r#"=> "sandbox" : string"#
    );
    assert_eq!(
        kind(&mut s, r#"io::read_text("missing.txt")"#),
        r#"=> "io" : string"#
    );
    assert!(!env.dir.path().join("escape.txt").exists());
    // Inside the tree everything works, and the output dir is readable.
    assert_eq!(
        kind(&mut s, r#"io::write_text("ok.txt", "x")"#),
        r#"=> "no error" : string"#
    );
    assert!(env.out_dir().join("ok.txt").exists());
}

#[test]
fn allow_read_opens_more_paths() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("data.json"), r#"{"a": [1, 2]}"#).unwrap();
    let mut opts = env.options();
    opts.allow_read.push(env.dir.path().to_path_buf());
    let mut s = env.session_with(&opts);
    assert_eq!(
        s.eval(r#"io::read_json("../data.json").a.len()"#)
            .unwrap()
            .as_deref(),
        Some("=> 2 : i64")
    );
}

#[test]
fn a_bad_json_file_names_file_line_and_column() {
    let env = Env::new();
    env.write("bad.json", "{\n  \"a\": 1,\n  oops\n}");
    let mut s = env.session();
    let e = s.eval(r#"io::read_json("bad.json")"#).unwrap_err();
    assert!(
        e.rendered
            .contains("bad.json`: invalid JSON: key must be a string at line 3 column 3"),
        "{}",
        e.rendered
    );
}

#[test]
fn runaway_scripts_are_stopped() {
    let env = Env::new();
    let mut opts = env.options();
    opts.max_operations = 100_000;
    let mut s = env.session_with(&opts);
    let e = s.eval("let i = 0;\nloop { i += 1; }").unwrap_err();
    assert_snapshot!("operation_limit", e.rendered);
    let e = s.eval("fn down(n) { down(n + 1) }\ndown(0)").unwrap_err();
    assert!(
        e.rendered
            .contains("error: calls nested deeper than 64 levels"),
        "{}",
        e.rendered
    );
}

#[test]
fn the_cancel_token_stops_a_running_evaluation() {
    let env = Env::new();
    let mut opts = env.options();
    opts.max_operations = 0;
    let mut s = env.session_with(&opts);
    let cancel = s.context().cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        cancel.cancel();
    });
    let e = s.eval("let i = 0;\nloop { i += 1; }").unwrap_err();
    t.join().unwrap();
    assert_eq!(e.failure, Failure::Cancelled);
    // The session goes on.
    assert_eq!(s.eval("i > 0").unwrap().as_deref(), Some("=> true : bool"));
}

/// Bad values of train and generation options and of `--set`: each error names the option and
/// its valid range or type (no serde or Rust type names), table-driven and snapshotted.
#[test]
fn bad_option_values_name_the_option_and_the_range() {
    let env = Env::new();
    let mut s = env.session();
    s.eval(
        r#"io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
let m = lora::attach(model::tiny(), #{ r: 2 });
let tok = tokenizer::builtin();"#,
    )
    .unwrap();
    let cases = [
        r#"train::fit(m, ds, #{ max_steps: "10" })"#,
        "train::fit(m, ds, #{ per_device_train_batch_size: -1 })",
        "train::fit(m, ds, #{ num_train_epochs: -1.0 })",
        "train::fit(m, ds, #{ adam_beta1: 5.0 })",
        "train::fit(m, ds, #{ adam_epsilon: 0.0 })",
        "train::fit(m, ds, #{ max_grad_norm: -1.0 })",
        "train::fit(m, ds, #{ weight_decay: -0.1 })",
        "train::fit(m, ds, #{ save_total_limit: 0 })",
        "train::fit(m, ds, #{ pad_to_multiple_of: 1000000000 })",
        "train::fit(m, ds, #{ warmup_ratio: 2.0 })",
        "train::fit(m, ds, #{ logging_steps: 0 })",
        "train::fit(m, ds, #{ max_length: 0, packing: true })",
        "train::fit(m, ds, #{ bf16: \"yes\" })",
        "train::fit(m, ds, #{ zero_stage: 3 })",
        "train::fit(m, ds, #{ pipeline: 1 })",
        "train::fit(m, ds, #{ gradient_checkpointing: \"yes\" })",
        "m.generate(tok, \"hi\", #{ top_k: 0 })",
        "m.generate(tok, \"hi\", #{ temperature: -1.0 })",
        "m.generate(tok, \"hi\", #{ top_p: 2.0 })",
        "m.generate(tok, \"hi\", #{ repetition_penalty: 0.0 })",
        "m.generate(tok, \"hi\", #{ max_new_tokens: \"5\" })",
        "m.generate(tok, [1, 2, 99999])",
    ];
    let mut out = Vec::new();
    for c in cases {
        let e = s.eval(c).unwrap_err();
        let head = e.rendered.lines().next().unwrap_or("").to_string();
        assert!(
            !head.contains("i64") && !head.contains("usize") && !head.contains("f64"),
            "{head}"
        );
        out.push(format!("{c}\n  {head}"));
    }
    assert_snapshot!("bad_option_values", out.join("\n"));
    // `--set` with a non-finite number
    let mut opts = env.options();
    opts.overrides = vec![("lr".into(), "nan".into())];
    let mut s = env.session_with(&opts);
    let e = s.eval("let p = params(#{ lr: 1e-4 });").unwrap_err();
    assert!(
        e.rendered
            .contains("`--set lr=nan`: expected a finite number"),
        "{}",
        e.rendered
    );
}

/// `:help` speaks the script's language: `train::fit`'s signatures without Rust types, found by
/// its short name too; a method's module function likewise.
#[test]
fn help_finds_short_names_and_shows_script_types() {
    let env = Env::new();
    let mut s = env.session();
    let full = transcript(&env, &mut s, ":help train::fit\n");
    let short = transcript(&env, &mut s, ":help fit\n");
    assert_eq!(
        full.lines().skip(1).collect::<Vec<_>>(),
        short.lines().skip(1).collect::<Vec<_>>()
    );
    let sigs: Vec<&str> = full.lines().filter(|l| !l.starts_with("    ")).collect();
    assert_snapshot!("help_train_fit", sigs.join("\n"));
    for bad in [
        "Handle",
        "&mut",
        "&str",
        "EvalAltResult",
        "Res<",
        "rhai::",
        "super::",
    ] {
        assert!(!full.contains(bad), "{bad} in {full}");
    }
    let m = transcript(&env, &mut s, ":help to_messages\n");
    assert!(
        m.contains("data::to_messages(ds: Dataset) -> Dataset"),
        "{m}"
    );
    let list = transcript(&env, &mut s, ":help\n");
    assert!(!list.contains('$'), "{list}");
}

/// Tab after `ds.` offers the methods of the variable's type (and only callable ones), by their
/// short names; a function name completes with its module.
#[test]
fn completion_after_a_dot_offers_the_methods_of_the_variables_type() {
    let env = Env::new();
    let mut s = env.session();
    s.eval(r#"io::write_text("d.json", `[{"x": 1}]`); let ds = data::load(io::output_dir() + "/d.json"); let name = "abc";"#)
        .unwrap();
    let vars = s.variable_types();
    assert!(
        vars.contains(&("ds".to_string(), "Dataset".to_string())),
        "{vars:?}"
    );
    let (_, ds_methods) = qscript_stdlib::repl::complete(s.functions(), &vars, "ds.", 3);
    for m in [
        "len",
        "to_messages",
        "sft",
        "shuffle",
        "train_test_split",
        "columns",
    ] {
        assert!(
            ds_methods.iter().any(|c| c == m),
            "{m} not in {ds_methods:?}"
        );
    }
    for not in ["load", "from_info", "fit", "data::to_messages"] {
        assert!(
            !ds_methods.iter().any(|c| c == not),
            "{not} in {ds_methods:?}"
        );
    }
    let (start, to) = qscript_stdlib::repl::complete(s.functions(), &vars, "let c = ds.to_m", 15);
    assert_eq!((start, to), (11, vec!["to_messages".to_string()]));
    let (_, fit) = qscript_stdlib::repl::complete(s.functions(), &vars, "train::fi", 9);
    assert_eq!(fit, ["train::fit"]);
}

/// `:load FILE` resolves the recipe's relative paths against its own directory, as running it
/// from the command line does; a failed cell is reported as failed.
#[test]
fn load_resolves_relative_paths_against_the_recipes_directory() {
    let env = Env::new();
    let sub = env.recipe_dir().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("words.txt"), "hello from sub").unwrap();
    std::fs::write(
        sub.join("r.rhai"),
        "let t = io::read_text(\"words.txt\");\nprint(t);\n// %% second\nio::read_text(\"missing.txt\");\n",
    )
    .unwrap();
    let mut s = env.session();
    let report = s.load_file(&sub.join("r.rhai")).unwrap();
    let out = env.sink.take();
    assert!(out.contains("hello from sub"), "{out}");
    let e = report.error.expect("the second cell fails");
    assert_eq!(report.ran.len(), 2, "both cells ran, the second failed");
    assert!(e.rendered.contains("missing.txt"), "{}", e.rendered);
}

/// Ctrl-C during `qscript check`'s dry run of `train::fit`: the dry loop stops at a step boundary
/// like a real run, and names no checkpoint (it wrote none).
#[test]
fn ctrl_c_in_a_dry_run_stops_it_and_names_no_checkpoint() {
    let env = Env::new();
    let mut s = env.session();
    s.eval(
        r#"io::write_text("d.json", `[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
let m = lora::attach(model::tiny(), #{ r: 2 });"#,
    )
    .unwrap();
    s.context()
        .check_mode
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let cancel = s.context().cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel();
    });
    let e = s
        .eval("train::fit(m, ds, #{ max_steps: 1000000000, per_device_train_batch_size: 1, output_dir: \"dry\" })")
        .unwrap_err();
    t.join().unwrap();
    assert!(e.rendered.contains("stopped at step"), "{}", e.rendered);
    assert!(!e.rendered.contains("checkpoint"), "{}", e.rendered);
}

/// Ctrl-C during training in the REPL says how to resume there (the option), not with a
/// command-line flag the REPL has no place for.
#[test]
fn a_training_stopped_in_the_repl_says_how_to_resume_there() {
    let env = support::Env::new();
    let mut s = env.session();
    s.context()
        .in_repl
        .store(true, std::sync::atomic::Ordering::Relaxed);
    env.write("d.json", r#"[{"instruction": "hi", "output": "hello"}]"#);
    s.eval(r#"let ds = data::sft(data::to_messages(data::load("d.json")), tokenizer::builtin());"#)
        .unwrap();
    let cancel = s.context().cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        cancel.cancel();
    });
    let e = s
        .eval(r"train::fit(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 100000, save_steps: 0, logging_steps: 1000 })")
        .unwrap_err();
    stopper.join().unwrap();
    assert!(
        e.rendered
            .contains("run the call again with `resume_from_checkpoint: true` in its options"),
        "{}",
        e.rendered
    );
}

/// `:load` keeps what the REPL held: a recipe loaded after some lines sees their variables and
/// functions, and they are still there after it runs (a reload of the same recipe too).
#[test]
fn loading_a_recipe_keeps_the_repl_variables() {
    let env = support::Env::new();
    let mut s = env.session();
    s.eval("let keep = 41; fn twice(x) { x * 2 }").unwrap();
    let path = env.write(
        "r.rhai",
        "// %% a\nlet got = keep + 1;\n// %% b\nlet t = twice(got);\n",
    );
    let r = s.load_file(&path).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(s.eval("t").unwrap().as_deref(), Some("=> 84 : i64"));
    assert_eq!(s.eval("keep").unwrap().as_deref(), Some("=> 41 : i64"));
    std::fs::write(
        &path,
        "// %% a\nlet got = keep + 2;\n// %% b\nlet t = twice(got);\n",
    )
    .unwrap();
    let r = s.load_file(&path).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(s.eval("t").unwrap().as_deref(), Some("=> 86 : i64"));
}

/// A shared recipe's helper-module pattern: an `import` in one cell is visible in the cells
/// after it; the module runs once (not again for each cell), and an edited module runs anew.
#[test]
fn an_import_carries_to_the_next_cells() {
    let env = support::Env::new();
    let mut s = env.session();
    env.write(
        "helper.rhai",
        "print(\"helper ran\");\nfn greet(x) { `hi ${x}` }\n",
    );
    let path = env.write(
        "r.rhai",
        "// %% imports\nimport \"helper\" as h;\n// %% use\nlet a = h::greet(\"a\");\n// %% again\nlet b = h::greet(\"b\");\n",
    );
    let r = s.load_file(&path).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(
        s.eval("a + \" \" + b").unwrap().as_deref(),
        Some("=> \"hi a hi b\" : string")
    );
    let log = env.sink.take();
    assert_eq!(log.matches("helper ran").count(), 1, "{log}");
    // The module edited: the cells from the first that imports it run again, with the new one.
    env.write("helper.rhai", "fn greet(x) { `hello ${x}` }\n");
    let r = s.load_file(&path).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(
        s.eval("b").unwrap().as_deref(),
        Some("=> \"hello b\" : string")
    );
}
