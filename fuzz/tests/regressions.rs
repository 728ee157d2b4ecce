//! Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` run through its target
//! in-process: no panic may escape the entry point, and each input must finish within the bound
//! (a hang fails the test). The process's address space is limited as a worker's is, so an
//! input that allocates without bound aborts this test instead of the machine.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use qscript_fuzz::bounded::{Stop, Verdict, run_all};
use qscript_fuzz::{corpus, targets};

/// One input's bound (a debug build; a release worker's is 10 s).
const LIMIT: Duration = Duration::from_mins(1);

#[test]
fn corpus_and_regressions_end_in_errors_not_crashes() {
    let gib4 = 4u64 << 30;
    rustix::process::setrlimit(
        rustix::process::Resource::As,
        rustix::process::Rlimit {
            current: Some(gib4),
            maximum: None,
        },
    )
    .unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for t in targets::all() {
        let mut files = corpus::files(&corpus::corpus_root(), t.name);
        files.extend(corpus::files(&corpus::regressions_root(), t.name));
        if files.is_empty() {
            continue;
        }
        let (paths, inputs): (Vec<_>, Vec<_>) = files.into_iter().unzip();
        ran += inputs.len();
        match run_all(t, inputs, LIMIT) {
            Ok(verdicts) => {
                for (p, (v, took)) in paths.iter().zip(verdicts) {
                    if let Verdict::Panicked(m) = v {
                        failures.push(format!("{}: panic escaped: {m}", p.display()));
                    } else if took > LIMIT {
                        failures.push(format!("{}: took {took:?}", p.display()));
                    }
                }
            }
            Err(Stop::Hung { index, limit }) => {
                // The hung thread cannot be stopped: report and end here.
                panic!("{}: still running after {limit:?}", paths[index].display());
            }
            Err(Stop::Setup(e)) => failures.push(format!("{}: harness: {e}", t.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        ran > 0,
        "no corpus found under {}",
        corpus::corpus_root().display()
    );
}

/// Every target has a seed corpus in the repository.
#[test]
fn every_target_has_a_corpus() {
    for t in targets::all() {
        assert!(
            !corpus::files(&corpus::corpus_root(), t.name).is_empty(),
            "no fuzz/corpus/{}/",
            t.name
        );
    }
}
