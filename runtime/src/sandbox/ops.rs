//! The engine's file operations under the active sandbox ([`activate`]): each reaches its file
//! from a root's directory handle (reads beneath the root, writes with no link followed), or,
//! with no sandbox active, from the file's nearest existing directory.

use std::path::{Path, PathBuf};

use super::{Sandbox, absolute, cap, nearest_existing_parent, normalize};
use crate::{Error, Result};

/// The capability operations behind the free functions of this file, for a run's sandbox.
impl Sandbox {
    /// `op` on `path` (absolute) beneath each readable root it lies under, deepest first (a
    /// root's handle and `path` relative to it): the first success; else "not found" when a root
    /// that would hold `path` lacks it, and otherwise the sandbox's one refusal.
    fn beneath<T>(
        &self,
        path: &Path,
        op: impl Fn(&cap_std::fs::Dir, &Path) -> std::io::Result<T>,
    ) -> Result<T> {
        let target = normalize(path);
        let mut missing = None;
        for root in self.read_roots_of(&target) {
            let rel = target.strip_prefix(&root).unwrap_or(Path::new(""));
            let dir = if root == self.output {
                self.output_handle(false).map_err(|e| match e {
                    Error::Io { source, .. } => source,
                    // Refused (a link, another user's): as an entry the sandbox refuses.
                    other => std::io::Error::other(other.to_string()),
                })
            } else {
                cap::open_root(&root)
            };
            match dir.and_then(|d| op(&d, rel)) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    missing.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        Err(match missing {
            Some(e) => Error::io(path, e),
            None => self.refuse_read(path),
        })
    }

    /// `path` (absolute) opened for reading through the handle of a readable root it lies
    /// under; a regular file only.
    pub(super) fn open_read(&self, path: &Path) -> Result<std::fs::File> {
        let f = self.beneath(path, cap::open_beneath)?;
        regular(f.into_std(), path)
    }

    /// The directory `path` (absolute) opened through the handle of a readable root it lies
    /// under.
    pub(super) fn open_dir_read(&self, path: &Path) -> Result<cap_std::fs::Dir> {
        self.beneath(path, cap::open_dir_beneath)
    }

    /// Creates the directory `path` and its missing parents, under the output directory (or
    /// the overlay).
    pub(super) fn create_dir_all(&self, path: &Path) -> Result<()> {
        let target = normalize(path);
        if target == self.output {
            return self.output_handle(true).map(|_| ());
        }
        let (root, rel) = self.writable(&target)?;
        cap::walk(&root, &rel, true)
            .map(|_| ())
            .map_err(|s| self.stopped(path, s))
    }

    /// `path`'s parent directory handle (which must exist) and file name, under a writable root.
    pub(super) fn write_parent(
        &self,
        path: &Path,
    ) -> Result<(cap_std::fs::Dir, std::ffi::OsString)> {
        let (root, rel) = self.writable(&normalize(path))?;
        cap::parent_of(&root, &rel, false).map_err(|s| self.stopped(path, s))
    }

    /// Writes `path` through `fill` (see [`write_atomic_with`]).
    pub(super) fn write_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn WriteSeek) -> std::io::Result<()>,
    ) -> Result<()> {
        let (dir, name) = self.write_parent(path)?;
        write_in(&dir, &name, path, fill)
    }
}

/// Writes `name` in `dir` (shown as `path`) through a temporary sibling created new, then a
/// rename; errors name `path`.
fn write_in(
    dir: &cap_std::fs::Dir,
    name: &std::ffi::OsStr,
    path: &Path,
    fill: &mut dyn FnMut(&mut dyn WriteSeek) -> std::io::Result<()>,
) -> Result<()> {
    // A link there is refused, whatever it points to (the rename below would only replace it,
    // but a planted link is a mistake or an attack the user should hear of).
    if dir
        .symlink_metadata(name)
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(Error::Sandbox(format!(
            "`{}` is a symbolic link; nothing is written through it",
            path.display()
        )));
    }
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp{}", std::process::id()));
    // Whatever is at the temporary name (a stale file, or a planted link) goes first; the file is
    // then created new, which never follows a link.
    if dir.symlink_metadata(&tmp).is_ok() {
        dir.remove_file(&tmp).map_err(|e| Error::io(path, e))?;
    }
    let mut how = cap_std::fs::OpenOptions::new();
    how.write(true).create_new(true);
    let f = dir.open_with(&tmp, &how).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(f.into_std());
    let written = fill(&mut w).and_then(|()| std::io::Write::flush(&mut w));
    drop(w);
    if let Err(e) = written {
        let _ = dir.remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    dir.rename(&tmp, dir, name).map_err(|e| Error::io(path, e))
}

/// What an atomic write's fill gets: a writer that can also seek (a format that writes offsets
/// before the data, GGUF's, needs its position).
pub trait WriteSeek: std::io::Write + std::io::Seek {}

impl<T: std::io::Write + std::io::Seek> WriteSeek for T {}

/// `f` (opened as `path`) if it is a regular file.
fn regular(f: std::fs::File, path: &Path) -> Result<std::fs::File> {
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        Ok(f)
    } else {
        Err(Error::Sandbox(format!(
            "cannot read `{}`: not a regular file",
            path.display()
        )))
    }
}

thread_local! {
    /// The sandbox of the run on this thread (set by the session around its cells), through
    /// whose roots the free functions below open files.
    static ACTIVE: std::cell::RefCell<Option<Sandbox>> = const { std::cell::RefCell::new(None) };
}

/// Makes `sb` the sandbox the free functions of this module go through on this thread (`None`:
/// files are opened by path, and writes still follow no link).
pub fn activate(sb: Option<Sandbox>) {
    ACTIVE.with(|a| *a.borrow_mut() = sb);
}

/// The sandbox active on this thread.
pub fn active() -> Option<Sandbox> {
    ACTIVE.with(|a| a.borrow().clone())
}

/// Runs `f` with `sb` active on this thread (a worker running a script callback), then puts
/// back what was active.
pub fn with_active<R>(sb: Option<Sandbox>, f: impl FnOnce() -> R) -> R {
    let before = ACTIVE.with(|a| std::mem::replace(&mut *a.borrow_mut(), sb));
    let out = f();
    ACTIVE.with(|a| *a.borrow_mut() = before);
    out
}

/// `path` opened for reading, a regular file: through the active sandbox's root handle (a link
/// never leads out of the root), or by path with none active. A FIFO or a device is refused,
/// never waited on.
pub fn open(path: &Path) -> Result<std::fs::File> {
    if let Some(sb) = active() {
        return sb.open_read(&absolute(path)?);
    }
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let f = std::os::unix::fs::OpenOptionsExt::custom_flags(
        std::fs::OpenOptions::new().read(true),
        flags.bits() as i32,
    )
    .open(path)
    .map_err(|e| Error::io(path, e))?;
    regular(f, path)
}

/// The bytes of the regular file `path` (see [`open`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut f = open(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The entries of directory `path` (full paths under `path`, sorted), listed from the directory
/// handle the active sandbox reached beneath a root, so a directory swapped for a link cannot
/// list an outside directory.
pub fn list_dir(path: &Path) -> Result<Vec<PathBuf>> {
    let names: Vec<std::ffi::OsString> = if let Some(sb) = active() {
        let dir = sb.open_dir_read(&absolute(path)?)?;
        dir.entries()
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| Error::io(path, e))?
    } else {
        std::fs::read_dir(path)
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| Error::io(path, e))?
    };
    let mut out: Vec<PathBuf> = names.into_iter().map(|n| path.join(n)).collect();
    out.sort();
    Ok(out)
}

/// The writable root for `path` with no sandbox active: its deepest existing ancestor, so the
/// rest is still walked with no link followed.
fn unsandboxed_root(path: &Path) -> Result<(cap_std::fs::Dir, PathBuf)> {
    let path = absolute(path)?;
    let anchor = nearest_existing_parent(&path);
    let rel = path.strip_prefix(&anchor).unwrap_or(&path).to_path_buf();
    let root = cap::open_root(&anchor).map_err(|e| Error::io(&anchor, e))?;
    Ok((root, rel))
}

/// A write outside any sandbox that stopped on the way to `path`.
fn stopped_unsandboxed(path: &Path, s: cap::Stop) -> Error {
    match s {
        cap::Stop::Link(at) => Error::Sandbox(format!(
            "cannot write `{}`: `{}` on the way is a symbolic link",
            path.display(),
            at.display()
        )),
        cap::Stop::NotDir(at) => Error::Sandbox(format!(
            "cannot write `{}`: `{}` on the way is not a directory",
            path.display(),
            at.display()
        )),
        cap::Stop::Io(e) => Error::io(path, e),
    }
}

/// `path`'s parent directory handle (which must exist) and file name: under the active sandbox's
/// writable roots, or from its deepest existing ancestor with none active.
fn parent_for_write(path: &Path) -> Result<(cap_std::fs::Dir, std::ffi::OsString)> {
    if let Some(sb) = active() {
        return sb.write_parent(&absolute(path)?);
    }
    let (root, rel) = unsandboxed_root(path)?;
    cap::parent_of(&root, &rel, false).map_err(|s| stopped_unsandboxed(path, s))
}

/// Creates directory `path` and its missing parents, with no link followed on the way (under
/// the active sandbox: only under its output directory or overlay).
pub fn create_dir_all(path: &Path) -> Result<()> {
    if let Some(sb) = active() {
        return sb.create_dir_all(&absolute(path)?);
    }
    let (root, rel) = unsandboxed_root(path)?;
    cap::walk(&root, &rel, true)
        .map(|_| ())
        .map_err(|s| stopped_unsandboxed(path, s))
}

/// Writes `bytes` to `path` through a temporary sibling created new and a rename, never through
/// a link (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, &mut |w| w.write_all(bytes))
}

/// Writes `path` from what `fill` writes, through a temporary sibling created new and a rename,
/// so a crash never leaves a half-written file; no link is followed on the way, and errors (a
/// full disk included) name `path`.
pub fn write_atomic_with(
    path: &Path,
    fill: &mut dyn FnMut(&mut dyn WriteSeek) -> std::io::Result<()>,
) -> Result<()> {
    let (dir, name) = parent_for_write(path)?;
    write_in(&dir, &name, path, fill)
}

/// How [`open_write`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Created, or appended to when it exists (`metrics.jsonl`).
    Append,
    /// Created new; an existing file is an error (TensorBoard's event file).
    CreateNew,
    /// Created, or opened as it is, nothing truncated (a lock file).
    Keep,
}

/// `path` opened for writing as `mode` says, never through a link: a link there is an error
/// naming it, whatever it points to.
pub fn open_write(path: &Path, mode: WriteMode) -> Result<std::fs::File> {
    let (dir, name) = parent_for_write(path)?;
    let mut how = cap_std::fs::OpenOptions::new();
    match mode {
        WriteMode::Append => how.create(true).append(true),
        WriteMode::CreateNew => how.write(true).create_new(true),
        WriteMode::Keep => how.create(true).read(true).write(true),
    };
    cap::open_nofollow(&dir, &name, &mut how, Path::new(&name))
        .map(cap_std::fs::File::into_std)
        .map_err(|s| match s {
            cap::Stop::Link(_) => Error::Sandbox(format!(
                "`{}` is a symbolic link; nothing is written through it",
                path.display()
            )),
            cap::Stop::NotDir(_) => Error::Sandbox(format!(
                "cannot write `{}`: not a regular file",
                path.display()
            )),
            cap::Stop::Io(e) => Error::io(path, e),
        })
}

/// Renames `from` to `to` (both in one writable root), with no link followed on the way to
/// either.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    let (a, an) = parent_for_write(from)?;
    let (b, bn) = parent_for_write(to)?;
    a.rename(&an, &b, &bn).map_err(|e| Error::io(to, e))
}

/// Removes `path` and everything under it; a link there is removed itself, never followed.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    let (dir, name) = parent_for_write(path)?;
    let linked = dir
        .symlink_metadata(&name)
        .map_err(|e| Error::io(path, e))?
        .file_type()
        .is_symlink();
    if linked {
        dir.remove_file(&name)
    } else {
        dir.remove_dir_all(&name)
    }
    .map_err(|e| Error::io(path, e))
}

/// Whether `path` exists as written (a link counts as itself, and is not followed), looked up
/// through the writable root it lies under.
pub fn exists_for_write(path: &Path) -> Result<bool> {
    let (dir, name) = parent_for_write(path)?;
    Ok(dir.symlink_metadata(&name).is_ok())
}

/// What an entry is, looked up through the active sandbox: links inside a root followed, none
/// out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory, with its device and inode (a walk enters each once).
    Dir {
        /// The device it is on.
        dev: u64,
        /// Its inode.
        ino: u64,
    },
    /// Anything else, or an entry the sandbox refuses (a link out of its root).
    Other,
}

fn kind_of(is_file: bool, is_dir: bool, dev: u64, ino: u64) -> Kind {
    if is_file {
        Kind::File
    } else if is_dir {
        Kind::Dir { dev, ino }
    } else {
        Kind::Other
    }
}

impl Sandbox {
    /// What `path` (absolute) is, looked up through the handle of a readable root it lies under.
    pub(super) fn kind(&self, path: &Path) -> Result<Kind> {
        use cap_std::fs::MetadataExt as _;
        let m = self.beneath(path, |dir, rel| {
            if rel.as_os_str().is_empty() {
                dir.dir_metadata()
            } else {
                dir.metadata(rel)
            }
        })?;
        Ok(kind_of(m.is_file(), m.is_dir(), m.dev(), m.ino()))
    }
}

/// What `path` is (see [`Kind`]); with no sandbox active, by path, links followed.
pub fn kind(path: &Path) -> Result<Kind> {
    if let Some(sb) = active() {
        return sb.kind(&absolute(path)?);
    }
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(kind_of(m.is_file(), m.is_dir(), m.dev(), m.ino()))
}

/// Every entry below directory `path`, at most `max_depth` levels down, sorted, with its kind:
/// listed and looked up through the active sandbox (a link is followed only inside its root; an
/// entry the sandbox refuses is [`Kind::Other`] and not entered; each directory is entered
/// once, so a link loop ends). `cancel` is polled at every entry.
pub fn walk(
    path: &Path,
    max_depth: usize,
    cancel: &crate::cancel::CancelToken,
) -> Result<Vec<(PathBuf, Kind)>> {
    let mut seen = std::collections::HashSet::new();
    if let Kind::Dir { dev, ino } = kind(path)? {
        seen.insert((dev, ino));
    }
    let mut out = Vec::new();
    let mut stack = vec![(path.to_path_buf(), 1usize)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in list_dir(&dir)? {
            cancel.check()?;
            let k = match kind(&entry) {
                Ok(k) => k,
                Err(Error::Sandbox(_)) => Kind::Other,
                // A dangling link: nothing there.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Kind::Dir { dev, ino } = k
                && depth < max_depth
                && seen.insert((dev, ino))
            {
                stack.push((entry.clone(), depth + 1));
            }
            out.push((entry, k));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
