//! Training in a real child process: Ctrl-C (SIGINT) saves a checkpoint and stops cleanly, and
//! `kill -9` while checkpoints are being written never leaves a broken checkpoint behind.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use support::{Env, qscript, run_in, stderr};

const RECIPE: &str = r#"let p = params(#{ max_steps: 100000, save_steps: 0, resume: false });
let tok = tokenizer::builtin();
io::write_text("d.json", `[{"instruction": "a", "output": "bb"}, {"instruction": "c", "output": "dd"}, {"instruction": "e", "output": "ff"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tok);
let peft = lora::attach(model::tiny(#{ hidden: 32 }), #{ r: 2 });
let trained = train::fit(peft, ds, #{ per_device_train_batch_size: 1, max_steps: p.max_steps, logging_steps: 5, save_steps: p.save_steps, save_total_limit: 3, resume_from_checkpoint: p.resume, learning_rate: 1e-3 });
print("finished");
"#;

fn spawn(env: &Env, extra: &[&str]) -> std::process::Child {
    let out = env.out_dir();
    let mut args = vec!["recipe/t.rhai", "--output-dir", out.to_str().unwrap()];
    args.extend(extra);
    qscript()
        .current_dir(env.dir.path())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_line(
    child: &mut std::process::Child,
    needle: &str,
) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "no line with {needle:?}"
        );
        if line.contains(needle) {
            return out;
        }
    }
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_a_resume_continues_from_it() {
    let env = Env::new();
    env.write("t.rhai", RECIPE);
    let mut child = spawn(&env, &[]);
    let _out = wait_for_line(&mut child, "step 10,");
    let err = interrupt(child);
    let ckpts: Vec<_> = std::fs::read_dir(env.out_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let step: usize = ckpts[0].trim_start_matches("checkpoint-").parse().unwrap();
    assert!(step >= 10);
    let ckpt = env.out_dir().join(&ckpts[0]);
    assert!(
        err.contains(&format!(
            "stopped at step {step}; checkpoint `{}`; resume with `--resume`",
            ckpt.display()
        )),
        "{err}"
    );
    let out = env.out_dir();
    let out_s = out.to_str().unwrap();
    // A fresh run into that dir says what is there instead of starting over beside it.
    let o = run_in(env.dir.path(), &["recipe/t.rhai", "--output-dir", out_s]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "holds `checkpoint-{step}`, a checkpoint of an unfinished run (step {step} of 100000): resume it with `--resume`"
        )),
        "{err}"
    );
    // `--resume` from the command line, without editing the recipe.
    let more = format!("max_steps={}", step + 5);
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/t.rhai",
            "--output-dir",
            out_s,
            "--set",
            &more,
            "--resume",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains(&format!("Resumed from step {step}")), "{err}");
    assert!(support::stdout(&o).contains("finished"));
    // metrics.jsonl is one run's: the resumed steps follow the checkpoint's, none twice.
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("step")?
                .as_u64()
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&((step + 5) as u64)), "{steps:?}");
    // Resuming a run that has done all its steps says so.
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/t.rhai",
            "--output-dir",
            out_s,
            "--set",
            &format!("max_steps={step}"),
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "nothing to train: the run in `{out_s}` is finished (step {step} of {step})"
        )),
        "{err}"
    );
    assert!(!err.contains("0.0000 -> 0.0000"), "{err}");
}

#[test]
fn kill_9_while_saving_leaves_every_checkpoint_loadable() {
    let env = Env::new();
    env.write("t.rhai", RECIPE);
    let mut child = spawn(&env, &["--set", "save_steps=1"]);
    let _out = wait_for_line(&mut child, "step 20,");
    std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    // Whatever was being written, resuming from the latest complete checkpoint works.
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/t.rhai",
            "--output-dir",
            env.out_dir().to_str().unwrap(),
            "--set",
            "max_steps=40",
            "--set",
            "resume=true",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("Resumed from step "), "{err}");
}

/// Two runs on one output dir: the second fails at once, naming the first one's pid, and the
/// first one trains on undisturbed.
#[test]
fn a_second_run_on_the_same_output_dir_is_refused() {
    let env = Env::new();
    env.write("t.rhai", RECIPE);
    let mut child = spawn(&env, &[]);
    let _out = wait_for_line(&mut child, "step 5,");
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/t.rhai",
            "--output-dir",
            env.out_dir().to_str().unwrap(),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("is in use by another run (pid {})", child.id())),
        "{err}"
    );
    child.kill().unwrap();
    let _ = child.wait();
}

const DDP: &str = r#"let p = params(#{ batch: 4, max_steps: 6 });
let tok = tokenizer::builtin();
let rows = "[";
for i in 0..11 { if i > 0 { rows += ","; } rows += `{"instruction": "question ${i}?", "output": "answer ${i}."}`; }
io::write_text("d.json", rows + "]");
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tok);
let peft = lora::attach(model::tiny(#{ hidden: 32 }), #{ r: 2, lora_dropout: 0.0 });
train::fit(peft, ds, #{ per_device_train_batch_size: p.batch, gradient_accumulation_steps: 2, max_steps: p.max_steps, logging_steps: 1, save_steps: 3, learning_rate: 1e-2 });
print("finished");
"#;

fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

/// `--nproc-per-node 2` with half the per-device batch gives the single process's losses; rank 0
/// alone writes metrics and checkpoints, and the plan counts both ranks.
#[test]
fn two_ranks_from_the_launcher_give_the_single_process_losses() {
    let env = Env::new();
    env.write("t.rhai", DDP);
    let one = env.dir.path().join("one");
    let o = run_in(
        env.dir.path(),
        &["recipe/t.rhai", "--output-dir", one.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let two = env.dir.path().join("two");
    let o = run_in(
        env.dir.path(),
        &[
            "recipe/t.rhai",
            "--nproc-per-node",
            "2",
            "--set",
            "batch=2",
            "--output-dir",
            two.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        out.matches("finished").count(),
        1,
        "rank 0 alone prints: {out}"
    );
    let err = stderr(&o);
    assert!(
        err.contains("Total train batch size (w. accumulation) = 8"),
        "{err}"
    );
    assert!(
        !err.contains("[rank 1] *****"),
        "rank 1 reports nothing: {err}"
    );
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 6);
    assert_eq!(a.len(), b.len());
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 1e-4,
            "step {}: one process {x}, two ranks {y}",
            s + 1
        );
    }
    assert!(two.join("checkpoint-6").is_dir() && two.join("checkpoint-3").is_dir());
}

/// A rank that dies stops the run: the launcher names it and stops the other rank, no hang.
#[cfg(target_os = "linux")]
#[test]
fn a_rank_that_dies_stops_the_others_and_is_named() {
    let env = Env::new();
    env.write("t.rhai", DDP);
    let out = env.out_dir();
    let mut launcher = qscript()
        .current_dir(env.dir.path())
        .args([
            "recipe/t.rhai",
            "--nproc-per-node",
            "2",
            "--set",
            "max_steps=1000000",
            "--output-dir",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _out = wait_for_line(&mut launcher, "step 3,");
    let pid = launcher.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let ranks: Vec<&str> = children.split_whitespace().collect();
    assert_eq!(ranks.len(), 2, "{children}");
    let killed = std::process::Command::new("kill")
        .args(["-9", ranks[1]])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = launcher.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: rank 1 of 2 was killed (signal 9)"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{}", ranks[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", ranks[0]))
                .is_ok_and(|s| s.contains(") Z ")),
        "rank 0 still runs"
    );
}

/// Ctrl-C on the launcher (SIGINT to it alone: it passes the signal on) stops both ranks at the
/// same step after rank 0's one checkpoint; the launcher exits 130, and `--resume` with two ranks
/// continues from that checkpoint.
#[test]
fn ctrl_c_on_the_launcher_stops_every_rank_after_one_checkpoint() {
    let env = Env::new();
    env.write("t.rhai", DDP);
    let out = env.out_dir();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "recipe/t.rhai",
            "--nproc-per-node",
            "2",
            "--set",
            "batch=2",
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        qscript()
            .current_dir(env.dir.path())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut launcher = run(&["--set", "max_steps=1000000"]);
    let _out = wait_for_line(&mut launcher, "step 4,");
    let err = interrupt(launcher);
    let ckpts: Vec<usize> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect();
    // save_steps 3: the periodic ones, and the one Ctrl-C wrote last.
    let last = *ckpts.iter().max().unwrap();
    assert!(last >= 4, "{ckpts:?}");
    assert!(err.contains(&format!("stopped at step {last}")), "{err}");
    let more = format!("max_steps={}", last + 2);
    let o = run(&["--set", &more, "--resume"])
        .wait_with_output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(losses(&out).len(), last + 2);
}

/// Ctrl-C (SIGINT) to `child`: it stops with 130 and no error; its stderr.
fn interrupt(child: std::process::Child) -> String {
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(!err.contains("error"), "{err}");
    err
}
