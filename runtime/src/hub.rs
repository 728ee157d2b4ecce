//! The Hugging Face cache, as `huggingface-cli download` and `from_pretrained` leave it: a hub id
//! (`Qwen/Qwen2.5-0.5B-Instruct`) names `<cache>/models--Qwen--Qwen2.5-0.5B-Instruct`, whose
//! `refs/<revision>` file holds the commit whose files are in `snapshots/<commit>/` (links into
//! the repo's `blobs/`). The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, as `huggingface_hub` has
//! it. HF datasets' own cache of built Arrow files is read too ([`datasets_cache_split`]).
//! Nothing is downloaded: a repo not in the cache is an error that says how to get it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What kind of hub repo an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoType {
    /// A model (`models--org--name`).
    Model,
    /// A dataset (`datasets--org--name`).
    Dataset,
}

impl RepoType {
    fn prefix(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }
}

/// A repo's files at one revision in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The repo's folder (`<cache>/models--org--name`): what a reader of its files needs to
    /// reach (the snapshot's files are links into its `blobs/`).
    pub repo_dir: PathBuf,
    /// The snapshot (`<repo_dir>/snapshots/<commit>`).
    pub dir: PathBuf,
    /// The commit.
    pub commit: String,
}

/// Whether `s` has the shape of a hub id: `org/name`, each part of letters, digits, `-`, `_` and
/// `.`, neither starting with `.` (so `./x`, `../x` and `data/x.json` with more parts are paths).
pub fn looks_like_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

/// A non-empty environment variable as a path.
fn var(k: &str) -> Option<PathBuf> {
    std::env::var_os(k)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    var("HF_HOME").or_else(|| {
        let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))?;
        Some(cache.join("huggingface"))
    })
}

/// The hub cache directory (see the module doc), whether or not it exists.
pub fn cache_root() -> Option<PathBuf> {
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| Some(hf_home()?.join("hub")))
}

/// The snapshot of `id` at `revision` (`main` when none: a branch or tag name in `refs/`, or a
/// commit hash) in the cache at `root`.
pub fn resolve_in(
    root: &Path,
    id: &str,
    kind: RepoType,
    revision: Option<&str>,
) -> Result<Snapshot> {
    let folder = format!("{}--{}", kind.prefix(), id.replace('/', "--"));
    let repo_dir = root.join(&folder);
    let what = match kind {
        RepoType::Model => "model",
        RepoType::Dataset => "dataset",
    };
    let get = match kind {
        RepoType::Model => format!("huggingface-cli download {id}"),
        RepoType::Dataset => format!("huggingface-cli download {id} --repo-type dataset"),
    };
    if !repo_dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "`{id}` is not a local directory, and the {what} is not in the HF cache (`{}` has no \
             `{folder}`; the cache is `$HF_HUB_CACHE`, `$HF_HOME/hub` or \
             `~/.cache/huggingface/hub`); download it with `{get}` (qscript does not download)",
            root.display()
        )));
    }
    let revision = revision.unwrap_or("main");
    let commit = if is_commit_id(revision) {
        revision.to_string()
    } else {
        // `refs/<branch or tag>`: one line, the commit. A name with `..` or a leading `/` would
        // leave `refs/`.
        if revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(Error::InvalidArgument(format!(
                "`revision: \"{revision}\"` is not a branch, tag or commit name"
            )));
        }
        let r = repo_dir.join("refs").join(revision);
        let Some(c) = read_ref(&r) else {
            let mut refs: Vec<String> = std::fs::read_dir(repo_dir.join("refs"))
                .map(|d| {
                    d.filter_map(std::result::Result::ok)
                        .map(|e| format!("`{}`", e.file_name().to_string_lossy()))
                        .collect()
                })
                .unwrap_or_default();
            refs.sort();
            return Err(Error::InvalidArgument(format!(
                "`{id}`: the HF cache has no revision `{revision}` (refs there: {}); \
                 download it with `{get} --revision {revision}`",
                if refs.is_empty() {
                    "none".to_string()
                } else {
                    refs.join(", ")
                }
            )));
        };
        if !is_commit_id(&c) {
            return Err(Error::InvalidArgument(format!(
                "`{id}`: `{}` in the HF cache does not hold a commit (40 hex digits)",
                r.display()
            )));
        }
        c
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "`{id}`: revision `{revision}` is commit {commit}, whose files are not in the HF \
             cache (`{}` is missing); download it with `{get} --revision {revision}`",
            dir.display()
        )));
    }
    Ok(Snapshot {
        repo_dir,
        dir,
        commit,
    })
}

/// Whether `s` is a commit id: 40 hex digits (so a snapshot path made from it stays inside
/// `snapshots/`).
fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The first line of the ref file `path`, trimmed: `None` when it is missing or not a regular
/// file (a FIFO would block, a link to `/dev/zero` never end). Only its first 128 bytes are read;
/// a ref holds one commit id.
fn read_ref(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut head = Vec::new();
    f.take(128).read_to_end(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head);
    Some(text.lines().next().unwrap_or("").trim().to_string())
}

/// HF datasets' own cache, where `datasets.load_dataset` keeps the Arrow files it builds:
/// `$HF_DATASETS_CACHE`, else `$HF_HOME/datasets`, else `~/.cache/huggingface/datasets`.
pub fn datasets_cache_root() -> Option<PathBuf> {
    var("HF_DATASETS_CACHE").or_else(|| Some(hf_home()?.join("datasets")))
}

/// The Arrow files of `id`'s `split` in the datasets cache at `root`: under the folder
/// `{org}___{name}` (returned first), the files of the most recently written build named
/// `<name>-<split>.arrow` or `<name>-<split>-NNNNN-of-NNNNN.arrow`, sorted. `None` when the cache
/// has no such folder or no file of that split.
pub fn datasets_cache_split(root: &Path, id: &str, split: &str) -> Option<(PathBuf, Vec<PathBuf>)> {
    let folder = root.join(id.replace('/', "___"));
    if !folder.is_dir() {
        return None;
    }
    let mut builds: std::collections::BTreeMap<PathBuf, (std::time::SystemTime, Vec<PathBuf>)> =
        std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(&folder)
        .max_depth(6)
        .into_iter()
        .flatten()
    {
        let p = e.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(stem) = name.strip_suffix(".arrow") else {
            continue;
        };
        let of_split = stem.ends_with(&format!("-{split}"))
            || stem
                .rsplit_once(&format!("-{split}-"))
                .is_some_and(|(_, shard)| shard.contains("-of-"));
        if !of_split || !e.file_type().is_file() {
            continue;
        }
        let dir = p.parent().unwrap_or(&folder).to_path_buf();
        let modified = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .unwrap_or(std::time::UNIX_EPOCH);
        let slot = builds.entry(dir).or_insert((modified, Vec::new()));
        slot.0 = slot.0.max(modified);
        slot.1.push(p.to_path_buf());
    }
    let (_, (_, mut files)) = builds.into_iter().max_by_key(|(_, (t, _))| *t)?;
    files.sort();
    Some((folder, files))
}

/// [`resolve_in`] the cache of [`cache_root`].
pub fn resolve(id: &str, kind: RepoType, revision: Option<&str>) -> Result<Snapshot> {
    let root = cache_root().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "`{id}` is not a local directory, and no HF cache is set (`$HF_HUB_CACHE`, \
             `$HF_HOME` or `$HOME`)"
        ))
    })?;
    resolve_in(&root, id, kind, revision)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_datasets_cache_gives_a_splits_arrow_files() {
        let d = tempfile::tempdir().unwrap();
        let build = d.path().join("org___data/default/0.0.0/abc123");
        std::fs::create_dir_all(&build).unwrap();
        for f in [
            "data-train-00000-of-00002.arrow",
            "data-train-00001-of-00002.arrow",
            "data-test.arrow",
            "dataset_info.json",
        ] {
            std::fs::write(build.join(f), b"x").unwrap();
        }
        let (folder, files) = datasets_cache_split(d.path(), "org/data", "train").unwrap();
        assert_eq!(folder, d.path().join("org___data"));
        assert_eq!(files.len(), 2);
        let (_, test) = datasets_cache_split(d.path(), "org/data", "test").unwrap();
        assert_eq!(test, [build.join("data-test.arrow")]);
        assert!(datasets_cache_split(d.path(), "org/data", "validation").is_none());
        assert!(datasets_cache_split(d.path(), "org/other", "train").is_none());
    }

    #[test]
    fn ids_and_paths() {
        for id in [
            "Qwen/Qwen2.5-0.5B-Instruct",
            "llamafactory/DPO-En-Zh-20k",
            "a/b",
        ] {
            assert!(looks_like_id(id), "{id}");
        }
        for p in [
            "./a",
            "../a/b",
            "data/x/y.json",
            "/abs/b",
            "a",
            "a/",
            "a/.b",
            "a b/c",
        ] {
            assert!(!looks_like_id(p), "{p}");
        }
    }

    #[test]
    fn revisions_resolve_through_refs() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--org--m");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let s = resolve_in(d.path(), "org/m", RepoType::Model, None).unwrap();
        assert_eq!(s.dir, repo.join("snapshots").join(commit));
        assert_eq!(
            resolve_in(d.path(), "org/m", RepoType::Model, Some(commit))
                .unwrap()
                .commit,
            commit
        );
        let e = resolve_in(d.path(), "org/m", RepoType::Model, Some("v2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no revision `v2` (refs there: `main`)"), "{e}");
        let e = resolve_in(d.path(), "org/other", RepoType::Dataset, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no `datasets--org--other`"), "{e}");
        assert!(
            e.contains("huggingface-cli download org/other --repo-type dataset"),
            "{e}"
        );
        let e = resolve_in(d.path(), "org/m", RepoType::Model, Some("../../x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a branch, tag or commit name"), "{e}");
    }

    /// A ref file is read as a commit id and nothing else: one naming `../../..` (a snapshot
    /// outside the cache) or a link to `/dev/zero` (read without end) is refused, in bounded time.
    #[cfg(unix)]
    #[test]
    fn a_ref_that_is_not_a_commit_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::fs::write(repo.join("refs/main"), "../../outside\n").unwrap();
        let e = resolve_in(d.path(), "org/m", RepoType::Model, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hold a commit (40 hex digits)"), "{e}");
        assert!(e.contains("refs/main"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", repo.join("refs/zero")).unwrap();
        let e = resolve_in(d.path(), "org/m", RepoType::Model, Some("zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no revision `zero`"), "{e}");
    }
}
