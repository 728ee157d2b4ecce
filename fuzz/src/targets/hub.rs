//! The HF cache's `refs/<revision>` file, read when a hub id resolves to a snapshot
//! (`model::load("org/name")`, `data::load` of a hub dataset).

use qscript_runtime::hub::{RepoType, resolve_in};

use super::{Harness, Outcome, Scratch, Shape, Target, err};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&HUB_REF];

/// The commit of the snapshot the cache holds.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Cache {
    scratch: Scratch,
}

impl Harness for Cache {
    fn run(&mut self, input: &[u8]) -> Outcome {
        self.scratch.put("models--org--m/refs/main", input)?;
        resolve_in(self.scratch.path(), "org/m", RepoType::Model, None).map_err(err)?;
        Ok(())
    }
}

/// `refs/main` of a cached model.
pub static HUB_REF: Target = Target {
    name: "hub_ref",
    entry: "hub::resolve_in on the HF cache's `refs/main`",
    max_len: 4 << 10,
    shape: Shape::Plain,
    dict: &["../", "/", "\n", "\0", COMMIT, "snapshots"],
    seeds: || vec![format!("{COMMIT}\n").into_bytes()],
    harness: || {
        let scratch = Scratch::new()?;
        let repo = scratch.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots").join(COMMIT))?;
        std::fs::create_dir_all(repo.join("refs"))?;
        Ok(Box::new(Cache { scratch }))
    },
};
