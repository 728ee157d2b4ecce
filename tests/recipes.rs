//! Every recipe and example runs end to end.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::path::Path;

use support::{run_in, stderr};

fn scripts(dir: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .collect();
    v.sort();
    v
}

#[test]
fn recipes_and_examples_run() {
    let out = tempfile::tempdir().unwrap();
    let all: Vec<_> = scripts("recipes")
        .into_iter()
        .chain(scripts("examples"))
        .collect();
    assert!(all.len() >= 4, "{all:?}");
    for script in all {
        let o = run_in(
            out.path(),
            &[
                script.to_str().unwrap(),
                "--output-dir",
                out.path().join("o").to_str().unwrap(),
            ],
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}:\n{}",
            script.display(),
            stderr(&o)
        );
    }
}
