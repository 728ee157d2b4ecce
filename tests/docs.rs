//! Every script function has docs with a ```rhai example, and every example runs.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use support::Env;

#[test]
fn every_function_has_a_running_example() {
    let env = Env::new();
    let session = env.session();
    let functions = session.functions().to_vec();
    assert!(functions.len() >= 5, "{functions:?}");
    let mut failures = Vec::new();
    for f in &functions {
        let examples = f.examples();
        if examples.is_empty() {
            failures.push(format!("{}: no ```rhai example in its docs", f.signature));
        }
        for code in examples {
            let env = Env::new();
            let mut s = env.session();
            if let Err(e) = s.eval(&code) {
                failures.push(format!("{}: example failed:\n{code}\n{e}", f.signature));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
