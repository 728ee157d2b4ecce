//! CI's short fuzzing run: the supervised fuzzer over every target for `QSCRIPT_FUZZ_SECS`
//! seconds in all (default 60), through the built binary. Any finding fails the test; its input
//! lands in a temporary directory (named in the output) and the seed is printed, so the run can
//! be repeated with `qscript-fuzz all --secs N --seed S` (or this test with `QSCRIPT_FUZZ_SEED`).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::process::Command;

#[test]
fn a_short_supervised_run_finds_nothing() {
    let secs: f64 = std::env::var("QSCRIPT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qscript-fuzz"));
    cmd.args(["all", "--secs", &secs.to_string(), "--timeout", "30"]);
    if let Ok(seed) = std::env::var("QSCRIPT_FUZZ_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let o = cmd
        .args(["--progress", "0", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stdout}");
    assert!(
        o.status.success() && stdout.contains(", 0 findings"),
        "the short run found something (kept in {}):\n{stdout}\n{stderr}",
        out.keep().display()
    );
    // It ran every target, and ran them.
    let total = stdout.lines().find(|l| l.starts_with("total: ")).unwrap();
    let execs: u64 = total["total: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(execs > 20, "{total}");
}
