//! `qscript --watch` on a real temp file: re-runs from the edited cell, keeps the state on a parse
//! error, and restarts a run that a save interrupts.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use support::{Env, qscript};

/// Lines from the child's stdout and stderr, tagged, in arrival order.
fn lines(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(format!("out: {l}"));
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("err: {l}"));
        }
    });
    rx
}

/// Collects lines until each of `needles` was seen in some line; panics after 20 s with what it
/// saw. stdout and stderr are read by two threads, so only the order within a stream is kept.
fn until(rx: &Receiver<String>, needles: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<String> = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if needles.iter().all(|n| seen.iter().any(|l| l.contains(n))) {
            return seen;
        }
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    panic!("not all of {needles:?} seen; saw:\n{}", seen.join("\n"));
}

fn outs(seen: &[String]) -> Vec<&str> {
    seen.iter()
        .filter_map(|l| l.strip_prefix("out: "))
        .collect()
}

/// Saves the way editors do: write a temp file, then rename it over the target.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("rhai.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RECIPE: &str = "// %% one\nlet n = 1;\nprint(\"one\");\n// %% two\nprint(`two ${n}`);\n// %% three\nprint(\"three\");\n";

#[test]
fn watch_reruns_from_the_edited_cell() {
    let env = Env::new();
    let path = env.write("w.rhai", RECIPE);
    let child = qscript()
        .current_dir(env.dir.path())
        .args(["--watch", "recipe/w.rhai"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let rx = lines(&mut child.0);
    let seen = until(&rx, &["[watch] watching", "out: three"]);
    assert_eq!(outs(&seen), ["one", "two 1", "three"], "{seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("[watch] ran cells 1-3")),
        "{seen:?}"
    );

    save(&path, &RECIPE.replace("two ${n}", "TWO ${n + 1}"));
    let seen = until(&rx, &["[watch] watching", "out: three", "re-ran cells 2-3"]);
    assert_eq!(outs(&seen), ["TWO 2", "three"], "{seen:?}");

    // A save that does not parse keeps the state.
    save(
        &path,
        &RECIPE.replace("print(\"three\");", "print(\"three\""),
    );
    let seen = until(&rx, &["kept the previous state", "[watch] watching"]);
    assert!(seen.iter().any(|l| l.contains("w.rhai:8:1")), "{seen:?}");
    assert!(outs(&seen).is_empty(), "{seen:?}");

    // Fixing it runs only the last cell.
    save(
        &path,
        &RECIPE
            .replace("two ${n}", "TWO ${n + 1}")
            .replace("\"three\"", "\"3\""),
    );
    let seen = until(&rx, &["re-ran cell 3 ", "out: 3", "[watch] watching"]);
    assert_eq!(outs(&seen), ["3"], "{seen:?}");

    // A plain in-place write works too (it may take more than one event to settle).
    let last = RECIPE
        .replace("two ${n}", "TWO ${n + 1}")
        .replace("\"three\"", "\"III\"");
    std::fs::write(&path, last).unwrap();
    let seen = until(&rx, &["out: III"]);
    assert!(
        outs(&seen).iter().all(|l| *l == "III" || l.is_empty()),
        "{seen:?}"
    );
}

/// A recipe whose second cell runs until it is cancelled, under `--watch`, once that cell has
/// started: the temp dir, the recipe's path, the child and its lines.
fn slow_run() -> (Env, std::path::PathBuf, Kill, Receiver<String>) {
    let env = Env::new();
    let path = env.write("s.rhai", SLOW);
    let child = qscript()
        .current_dir(env.dir.path())
        .args(["--watch", "recipe/s.rhai", "--max-operations", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let rx = lines(&mut child.0);
    until(&rx, &["out: slow started"]);
    (env, path, child, rx)
}

const SLOW: &str = "// %% one\nprint(\"one\");\n// %% slow\nprint(\"slow started\");\nlet i = 0;\nloop { i += 1; }\n";

#[test]
fn a_save_during_a_run_cancels_it_and_starts_again() {
    let (_env, path, _child, rx) = slow_run();
    save(&path, &SLOW.replace("loop { i += 1; }", "print(\"fast\");"));
    let seen = until(
        &rx,
        &[
            "[watch] run cancelled",
            "[watch] re-ran cell 2 ",
            "out: fast",
        ],
    );
    assert_eq!(
        outs(&seen),
        ["slow started", "fast"],
        "cell one is not re-run: {seen:?}"
    );
}

/// Lines that arrive within `d`.
fn for_a_while(rx: &Receiver<String>, d: Duration) -> Vec<String> {
    let deadline = Instant::now() + d;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn a_save_that_changes_nothing_leaves_the_run_alone() {
    // Editors and `sed -i` save in several events that can arrive after the re-run they caused
    // has started; only a change of content may cancel a run.
    let (_env, path, _child, rx) = slow_run();
    save(&path, SLOW);
    std::fs::write(&path, SLOW).unwrap();
    let seen = for_a_while(&rx, Duration::from_millis(800));
    assert!(seen.is_empty(), "the run was disturbed: {seen:?}");
    // A real edit still cancels it.
    save(&path, &SLOW.replace("loop { i += 1; }", "print(\"fast\");"));
    let seen = until(&rx, &["[watch] run cancelled", "out: fast"]);
    assert_eq!(outs(&seen), ["slow started", "fast"], "{seen:?}");
}
