//! Benchmark (not a test): the latency from saving a recipe to the start of the re-run of its last
//! cell under `qscript --watch`, with a first cell that takes seconds (it must not re-run).
//!
//! ```sh
//! cargo bench --bench watch_latency
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SAVES: usize = 20;

fn recipe(n: usize) -> String {
    format!(
        "// %% slow first cell (seconds)\nprint(\"slow cell ran\");\nlet i = 0;\nwhile i < 20_000_000 {{ i += 1; }}\n\
         // %% last cell\nprint(\"last cell {n}\");\n"
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.rhai");
    std::fs::write(&path, recipe(0)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qscript"))
        .current_dir(dir.path())
        .args(["--watch", "bench.rhai", "--max-operations", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || out.next().unwrap().unwrap();
    let t0 = Instant::now();
    assert_eq!(next(), "slow cell ran");
    assert_eq!(next(), "last cell 0");
    let first_run = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));

    let mut latencies = Vec::new();
    for n in 1..=SAVES {
        let tmp = dir.path().join(".bench.rhai.tmp");
        std::fs::write(&tmp, recipe(n)).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, &path).unwrap();
        let line = next();
        latencies.push(t.elapsed());
        assert_eq!(
            line,
            format!("last cell {n}"),
            "the slow cell must not re-run"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let _ = child.kill();
    let _ = child.wait();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("first run (both cells): {:.0} ms", ms(first_run));
    println!(
        "save -> last cell re-runs, {SAVES} saves: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(latencies[0]),
        ms(latencies[SAVES / 2]),
        ms(latencies[SAVES - 1]),
    );
}
