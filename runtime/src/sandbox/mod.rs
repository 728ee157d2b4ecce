//! The file policy of a run. Recipes are shared between teams, so a recipe may read only under
//! its own directory, the run's output directory, the HF cache repos it named and the paths the
//! user allowed (`--allow-read`), and may write only under the output directory.
//!
//! The policy is a capability, not a path check: every file the engine opens or creates while a
//! run is active ([`activate`]) is reached from a directory handle of one of those roots
//! (`cap.rs`). Reads resolve beneath their root, so no link leads out of it; writes follow no
//! symbolic link at all, the output directory's own path included below the directory it hangs
//! from (the recipe's or the working directory: a bundle may ship `runs/<name>` as a link). The
//! path checks ([`Sandbox::resolve_read`], [`Sandbox::resolve_write`]) come first and give the
//! messages; a refusal reads the same whether the target exists or not.
//!
//! During a dry run (`qscript check`) writes go to an overlay directory instead of the output
//! directory, and reads of the output directory see the overlay first, so a recipe that writes a
//! file and reads it back checks as it runs while nothing is written under the output directory.

mod cap;
mod ops;
#[cfg(test)]
mod tests;

pub use ops::{
    Kind, WriteMode, WriteSeek, activate, active, create_dir_all, exists_for_write, kind, list_dir,
    open, open_write, read, remove_dir_all, rename, walk, with_active, write_atomic,
    write_atomic_with,
};

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Where a recipe may read and write.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// Where relative reads resolve (the running recipe's directory; `:load` moves it).
    base: Arc<Mutex<PathBuf>>,
    /// The output directory: `anchor` joined with `below`.
    output: PathBuf,
    /// The real directory the output directory hangs from (the recipe's directory, the working
    /// directory, or the parent the user named), opened as a root.
    anchor: PathBuf,
    /// The output directory's path below `anchor`, walked with no link followed.
    below: PathBuf,
    read_roots: Vec<PathBuf>,
    /// HF cache repos the recipe named by hub id (`model::load("org/name")`): readable, each
    /// its own folder only.
    hub_repos: Arc<Mutex<Vec<PathBuf>>>,
    /// The dry run's overlay of the output directory (see the module doc).
    overlay: Arc<Mutex<Option<PathBuf>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sandbox {
    /// A sandbox for a recipe in `base` (relative reads resolve there), writing under `output`
    /// (relative writes resolve there; created on first write), and reading also under each of
    /// `allow_read`.
    pub fn new(base: &Path, output: impl Into<PathBuf>, allow_read: &[PathBuf]) -> Result<Self> {
        let base = base.canonicalize().map_err(|e| Error::io(base, e))?;
        let (anchor, below) = output_anchor(&absolute(&output.into())?, &base)?;
        let mut read_roots = vec![base.clone()];
        for p in allow_read {
            let c = p.canonicalize().map_err(|e| {
                Error::InvalidArgument(format!("`--allow-read {}`: {e}", p.display()))
            })?;
            read_roots.push(c);
        }
        Ok(Self {
            base: Arc::new(Mutex::new(base)),
            output: anchor.join(&below),
            anchor,
            below,
            read_roots,
            hub_repos: Arc::new(Mutex::new(Vec::new())),
            overlay: Arc::new(Mutex::new(None)),
        })
    }

    /// Lets the recipe read the HF cache folder of a repo it named by hub id
    /// ([`crate::hub::Snapshot::repo_dir`]), and nothing else of the cache.
    pub fn allow_hub_repo(&self, repo_dir: &Path) -> Result<()> {
        let real = repo_dir
            .canonicalize()
            .map_err(|e| Error::io(repo_dir, e))?;
        let mut repos = lock(&self.hub_repos);
        if !repos.contains(&real) {
            repos.push(real);
        }
        Ok(())
    }

    /// Sends writes to `dir` instead of the output directory (and lets reads of the output
    /// directory see it first), or back to the output directory with `None`.
    pub fn set_overlay(&self, dir: Option<PathBuf>) {
        *lock(&self.overlay) = dir;
    }

    fn overlay(&self) -> Option<PathBuf> {
        lock(&self.overlay).clone()
    }

    /// `p` as the run shows it: a path in the dry run's overlay as the output-directory path it
    /// stands for; any other path as it is.
    pub fn shown(&self, p: &Path) -> PathBuf {
        match self.overlay() {
            Some(o) if p.starts_with(&o) => self
                .output
                .join(p.strip_prefix(&o).unwrap_or(Path::new(""))),
            _ => p.to_path_buf(),
        }
    }

    /// Where `target` (a path under the output directory) lies in the overlay, if one is set.
    fn in_overlay(&self, target: &Path) -> Option<PathBuf> {
        let rel = target.strip_prefix(&self.output).ok()?;
        Some(self.overlay()?.join(rel))
    }

    /// The directory relative reads resolve against (the recipe's).
    pub fn base(&self) -> PathBuf {
        lock(&self.base).clone()
    }

    /// Makes `dir` (a recipe's directory, which must be readable) where relative reads resolve,
    /// as running that recipe from the command line does.
    pub fn set_base(&self, dir: &Path) -> Result<()> {
        let real = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if !self.read_roots.iter().any(|r| real.starts_with(r)) {
            return Err(self.refuse_read(dir));
        }
        *lock(&self.base) = real;
        Ok(())
    }

    /// The run's output directory (absolute, below the real directory it hangs from; it may not
    /// exist yet).
    pub fn output_dir(&self) -> &Path {
        &self.output
    }

    /// Resolves `path` for reading: relative to the recipe directory, symlinks followed, and
    /// refused unless it lies under a readable root. Only regular files and directories are
    /// read (a FIFO or a device would block the run forever). Outside the sandbox a missing path
    /// and an existing one get the same refusal, so a recipe cannot probe what exists there.
    /// The open itself goes through the root's handle ([`open`], [`read`], [`list_dir`]).
    pub fn resolve_read(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let joined = self.base().join(path);
        let target = normalize(&joined);
        if let Some(o) = self.in_overlay(&target)
            && std::fs::symlink_metadata(&o).is_ok()
        {
            // Written earlier in this dry run (the overlay is the run's own temporary dir).
            return Ok(o);
        }
        if self.overlay().is_some_and(|o| target.starts_with(o)) {
            // A path inside the overlay itself (a file of a directory written in this dry run).
            return Ok(target);
        }
        if target.starts_with(&self.output) {
            // The output directory is read through its own handle: the path as written, never
            // where a link on the way points.
            return match self.output_entry_kind(&target) {
                Ok(true) => Ok(target),
                Ok(false) => Err(not_file_or_dir(path)),
                Err(e @ Error::Io { .. }) => Err(e),
                // The output directory itself is refused (a link, another user's): said as it
                // is, the same whatever lies behind it.
                Err(Error::Sandbox(m)) if !m.is_empty() => Err(Error::Sandbox(format!(
                    "cannot read `{}`: {m}",
                    path.display()
                ))),
                Err(_) => Err(self.refuse_read(path)),
            };
        }
        let real = match joined.canonicalize() {
            Ok(r) => r,
            // A missing file is "not found" only where it would be readable: through a link
            // (`l/../etc/shadow` with `l -> /`) its deepest existing directory says where it
            // would be, and outside, a missing file is refused like an existing one.
            Err(e) if self.may_read(&target) && self.may_read(&resolved_prefix(&joined)) => {
                return Err(Error::io(&joined, e));
            }
            Err(_) => return Err(self.refuse_read(path)),
        };
        if !self.may_read(&real) {
            return Err(self.refuse_read(path));
        }
        let meta = std::fs::metadata(&real).map_err(|e| Error::io(&joined, e))?;
        if !(meta.is_file() || meta.is_dir()) {
            return Err(not_file_or_dir(path));
        }
        Ok(real)
    }

    /// Whether `target` (under the output directory) is a regular file or a directory, looked
    /// up through the output directory's handle.
    fn output_entry_kind(&self, target: &Path) -> Result<bool> {
        let out = self.output_handle(false)?;
        let rel = target.strip_prefix(&self.output).unwrap_or(Path::new(""));
        if rel.as_os_str().is_empty() {
            return Ok(true);
        }
        let m = out.metadata(rel).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::io(target, e),
            _ => Error::Sandbox(String::new()),
        })?;
        Ok(m.is_file() || m.is_dir())
    }

    /// The readable roots `p` lies under, deepest first.
    fn read_roots_of(&self, p: &Path) -> Vec<PathBuf> {
        let hub = lock(&self.hub_repos).clone();
        let mut roots: Vec<PathBuf> = self
            .read_roots
            .iter()
            .chain(hub.iter())
            .chain(self.overlay().as_ref())
            .chain(std::iter::once(&self.output))
            .filter(|r| p.starts_with(r))
            .cloned()
            .collect();
        roots.sort_by_key(|r| std::cmp::Reverse(r.components().count()));
        roots.dedup();
        roots
    }

    /// Whether `p` lies where this sandbox may read: a readable root, a hub repo, the output
    /// directory or the dry run's overlay.
    fn may_read(&self, p: &Path) -> bool {
        !self.read_roots_of(p).is_empty()
    }

    fn refuse_read(&self, path: &Path) -> Error {
        Error::Sandbox(format!(
            "cannot read `{}`: it is outside the recipe's sandbox (readable: {}); \
             pass `--allow-read PATH` to allow more",
            path.display(),
            self.readable_list(),
        ))
    }

    fn refuse_write(&self, path: &Path, why: &str) -> Error {
        Error::Sandbox(format!(
            "cannot write `{}`: recipes may write only under the output directory `{}`{why}",
            path.display(),
            self.output.display()
        ))
    }

    /// Resolves `path` for writing: relative to the output directory, refused unless it stays
    /// under it. Writes never follow a symbolic link: the output directory must be a real
    /// directory of this user (a shared bundle may ship `runs/<name>` as a link to someone
    /// else's directory), no directory on the way to the file may be a link, and an existing
    /// file that is a link is not written through. Missing directories are created one by one
    /// through the output directory's handle, so a refused write creates nothing.
    pub fn resolve_write(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let target = normalize(&self.output.join(path));
        if !target.starts_with(&self.output) || target == self.output {
            return Err(self.refuse_write(path, ""));
        }
        if let Some(o) = self.in_overlay(&target) {
            let parent = o.parent().unwrap_or(&o);
            self.create_dir_all(parent)?;
            return Ok(o);
        }
        let (root, rel) = self.writable(&target)?;
        let (dir, name) = cap::parent_of(&root, &rel, true).map_err(|s| self.stopped(path, s))?;
        if dir
            .symlink_metadata(&name)
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(self.refuse_write(path, " (the file there is a symbolic link)"));
        }
        Ok(target)
    }

    /// The path a write of `path` would go to, checked without touching the file system (for
    /// `qscript check`, which writes nothing).
    pub fn check_write(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let target = normalize(&self.output.join(path));
        if target.starts_with(&self.output) && target != self.output {
            Ok(target)
        } else {
            Err(self.refuse_write(path, ""))
        }
    }

    /// Writes `bytes` to `path` (see [`Sandbox::resolve_write`]) atomically: a temporary file in
    /// the same directory, then a rename, so a crash never leaves a half-written file.
    pub fn write_atomic(&self, path: impl AsRef<Path>, bytes: &[u8]) -> Result<PathBuf> {
        let real = self.resolve_write(path)?;
        self.write_with(&real, &mut |w| w.write_all(bytes))?;
        Ok(real)
    }

    fn readable_list(&self) -> String {
        self.read_roots
            .iter()
            .chain(std::iter::once(&self.output))
            .map(|p| format!("`{}`", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The output directory's handle: reached from its anchor with no link followed, created
    /// when `create` (and missing), a directory of this user.
    fn output_handle(&self, create: bool) -> Result<cap_std::fs::Dir> {
        let out = &self.output;
        let refuse = |why: String| {
            Error::Sandbox(format!(
                "the output directory `{}` {why}; pass another `--output-dir`",
                out.display()
            ))
        };
        let anchor = cap::open_root(&self.anchor).map_err(|e| Error::io(&self.anchor, e))?;
        let dir = cap::walk(&anchor, &self.below, create).map_err(|s| match s {
            cap::Stop::Link(at) if at == self.below => refuse("is a symbolic link".into()),
            cap::Stop::Link(at) => refuse(format!(
                "is reached through the symbolic link `{}`",
                self.anchor.join(at).display()
            )),
            cap::Stop::NotDir(at) if at == self.below => refuse("is not a directory".into()),
            cap::Stop::NotDir(at) => refuse(format!(
                "is reached through `{}`, which is not a directory",
                self.anchor.join(at).display()
            )),
            cap::Stop::Io(e) => Error::io(out, e),
        })?;
        #[cfg(unix)]
        {
            let st = rustix::fs::fstat(&dir).map_err(|e| Error::io(out, e.into()))?;
            if st.st_uid != rustix::process::geteuid().as_raw() {
                return Err(refuse("belongs to another user".into()));
            }
        }
        Ok(dir)
    }

    /// The writable root `target` (absolute, normalised) lies under, and its path below it: the
    /// dry run's overlay, or the output directory.
    fn writable(&self, target: &Path) -> Result<(cap_std::fs::Dir, PathBuf)> {
        if let Some(o) = self.overlay() {
            let inside = target
                .strip_prefix(&o)
                .ok()
                .map(Path::to_path_buf)
                .or_else(|| {
                    target
                        .strip_prefix(&self.output)
                        .ok()
                        .map(Path::to_path_buf)
                });
            if let Some(rel) = inside {
                // The overlay is the run's own temporary directory, made by the engine.
                std::fs::create_dir_all(&o).map_err(|e| Error::io(&o, e))?;
                let root = cap::open_root(&o).map_err(|e| Error::io(&o, e))?;
                return Ok((root, rel));
            }
        }
        match target.strip_prefix(&self.output) {
            Ok(rel) if !rel.as_os_str().is_empty() => {
                Ok((self.output_handle(true)?, rel.to_path_buf()))
            }
            _ => Err(self.refuse_write(target, "")),
        }
    }

    /// A write that stopped on the way to `path`, as an error.
    fn stopped(&self, path: &Path, s: cap::Stop) -> Error {
        match s {
            cap::Stop::Link(at) => {
                self.refuse_write(path, &format!(" (`{}` is a symbolic link)", at.display()))
            }
            cap::Stop::NotDir(at) => {
                self.refuse_write(path, &format!(" (`{}` is not a directory)", at.display()))
            }
            cap::Stop::Io(e) => Error::io(path, e),
        }
    }
}

fn not_file_or_dir(path: &Path) -> Error {
    Error::Sandbox(format!(
        "cannot read `{}`: not a regular file or directory",
        path.display()
    ))
}

/// The nearest ancestor of `p` (not `p` itself) that exists.
fn nearest_existing_parent(p: &Path) -> PathBuf {
    let mut a = p.parent().unwrap_or(Path::new("/")).to_path_buf();
    while std::fs::symlink_metadata(&a).is_err() {
        match a.parent() {
            Some(up) => a = up.to_path_buf(),
            None => break,
        }
    }
    a
}

/// Where a path that does not exist would be: its longest existing prefix resolved (links
/// followed), then the rest of it, normalised.
fn resolved_prefix(p: &Path) -> PathBuf {
    let comps: Vec<Component<'_>> = p.components().collect();
    for k in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..k].iter().collect();
        if let Ok(real) = prefix.canonicalize() {
            let rest: PathBuf = comps[k..].iter().collect();
            return normalize(&real.join(rest));
        }
    }
    normalize(p)
}

/// Where the output directory `out` hangs from, and its path below: the deepest of the recipe's
/// directory and the working directory it lies under (a bundle's `runs/<name>` is walked with
/// no link followed), else its nearest existing ancestor (a path the user named). The anchor is
/// the real directory; `below` is never empty.
fn output_anchor(out: &Path, base: &Path) -> Result<(PathBuf, PathBuf)> {
    let cwd = std::env::current_dir().ok().map(|c| normalize(&c));
    let from = [Some(base.to_path_buf()), cwd]
        .into_iter()
        .flatten()
        .filter(|a| out.starts_with(a) && out != a)
        .max_by_key(|a| a.components().count());
    let from = from.unwrap_or_else(|| nearest_existing_parent(out));
    let anchor = from.canonicalize().map_err(|e| Error::io(&from, e))?;
    let below = out.strip_prefix(&from).unwrap_or(out).to_path_buf();
    if below.as_os_str().is_empty() {
        return Err(Error::Sandbox(format!(
            "the output directory `{}` cannot be `/`; pass another `--output-dir`",
            out.display()
        )));
    }
    Ok((anchor, below))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(p)
    };
    Ok(normalize(&abs))
}

/// Removes `.` and resolves `..` lexically (no file-system access).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
