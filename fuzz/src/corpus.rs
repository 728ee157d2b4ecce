//! The corpus and the findings on disk: `fuzz/corpus/<target>/` (seeds kept in the repository,
//! small files), `fuzz/regressions/<target>/<short-hash>` (every input that crashed, hung or
//! let a panic escape, kept as a regression test).

use std::path::{Path, PathBuf};

use crate::targets::Target;

/// `fuzz/corpus` of this crate.
pub fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// `fuzz/regressions` of this crate.
pub fn regressions_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions")
}

/// The files of `root/<target>/`, sorted by name, with their bytes (none when it is missing).
pub fn files(root: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(target))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

/// Everything a run of `target` starts from: the corpus files, the seeds made at run time and
/// the regressions, each cut to the target's size, without duplicates; never empty.
pub fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = files(&corpus_root(), target.name)
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    out.extend((target.seeds)());
    out.extend(
        files(&regressions_root(), target.name)
            .into_iter()
            .map(|(_, b)| b),
    );
    for s in &mut out {
        s.truncate(target.max_len);
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|s| seen.insert(blake3::hash(s)));
    if out.is_empty() {
        out.push(Vec::new());
    }
    out
}

/// The short name a finding's input is saved under: 16 hex digits of its hash.
pub fn short_hash(input: &[u8]) -> String {
    blake3::hash(input).to_hex()[..16].to_string()
}

/// Saves `input` as `root/<target>/<short-hash>`; returns the path and whether it is new.
pub fn save_finding(root: &Path, target: &str, input: &[u8]) -> std::io::Result<(PathBuf, bool)> {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(short_hash(input));
    let new = !path.exists();
    if new {
        std::fs::write(&path, input)?;
    }
    Ok((path, new))
}
