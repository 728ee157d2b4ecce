//! Capability file operations: every file is reached from a directory handle of a root, never
//! by its full path. Reads resolve beneath the root (cap-std: `openat2` with `RESOLVE_BENEATH`
//! where the kernel has it), so a link may lead elsewhere inside the root but never out of it
//! (the HF cache's snapshot files are links to its blobs). Writes resolve with no symbolic link
//! followed at all: each directory on the way is opened with `O_NOFOLLOW`, one component at a
//! time, and the file itself is created new or opened with `O_NOFOLLOW`.

use std::io;
use std::path::{Component, Path, PathBuf};

use cap_fs_ext::{DirExt as _, FollowSymlinks, OpenOptionsFollowExt as _};
use cap_std::fs::{Dir, File, OpenOptions, OpenOptionsExt as _};

/// Opens the root directory at `p`, a path the user chose (a recipe's directory,
/// `--allow-read`, the output directory's anchor): the one place a path is opened as a whole.
pub(super) fn open_root(p: &Path) -> io::Result<Dir> {
    Dir::open_ambient_dir(p, cap_std::ambient_authority())
}

/// Why a walk without links stopped.
#[derive(Debug)]
pub(super) enum Stop {
    /// The component ending at this relative path is a symbolic link.
    Link(PathBuf),
    /// The component ending at this relative path is not a directory.
    NotDir(PathBuf),
    /// Anything else (missing with `create` off, permissions, a full disk).
    Io(io::Error),
}

/// The names of `rel`, a relative path with no `..`; `None` when it has other components.
fn names(rel: &Path) -> Option<Vec<&std::ffi::OsStr>> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// The directory `rel` below `root`, each component opened with no link followed; missing ones
/// created when `create` is on.
pub(super) fn walk(root: &Dir, rel: &Path, create: bool) -> Result<Dir, Stop> {
    let parts = names(rel).ok_or_else(|| {
        Stop::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a plain relative path",
        ))
    })?;
    let mut dir = root.try_clone().map_err(Stop::Io)?;
    let mut at = PathBuf::new();
    for name in parts {
        at.push(name);
        let next = match dir.open_dir_nofollow(name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                match dir.create_dir(name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Stop::Io(e)),
                }
                dir.open_dir_nofollow(name)
            }
            other => other,
        };
        dir = match next {
            Ok(d) => d,
            Err(e) => return Err(classify(&dir, name, at, e)),
        };
    }
    Ok(dir)
}

/// What stopped opening `name` in `dir`: a link, a non-directory or the error itself.
fn classify(dir: &Dir, name: &std::ffi::OsStr, at: PathBuf, e: io::Error) -> Stop {
    match dir.symlink_metadata(name) {
        Ok(m) if m.file_type().is_symlink() => Stop::Link(at),
        Ok(m) if !m.is_dir() => Stop::NotDir(at),
        _ => Stop::Io(e),
    }
}

/// `rel` split into its parent directory (opened with no link followed, created when `create`)
/// and its file name.
pub(super) fn parent_of(
    root: &Dir,
    rel: &Path,
    create: bool,
) -> Result<(Dir, std::ffi::OsString), Stop> {
    let name = rel
        .file_name()
        .filter(|_| names(rel).is_some())
        .ok_or_else(|| {
            Stop::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file path",
            ))
        })?;
    let parent = walk(root, rel.parent().unwrap_or(Path::new("")), create)?;
    Ok((parent, name.to_os_string()))
}

/// Opens `name` in `dir` for writing with `how`, never through a link.
pub(super) fn open_nofollow(
    dir: &Dir,
    name: &std::ffi::OsStr,
    how: &mut OpenOptions,
    at: &Path,
) -> Result<File, Stop> {
    how.follow(FollowSymlinks::No);
    dir.open_with(name, how)
        .map_err(|e| classify_file(dir, name, at.to_path_buf(), e))
}

/// What stopped opening the file `name`: a link, or the error itself.
fn classify_file(dir: &Dir, name: &std::ffi::OsStr, at: PathBuf, e: io::Error) -> Stop {
    match dir.symlink_metadata(name) {
        Ok(m) if m.file_type().is_symlink() => Stop::Link(at),
        _ => Stop::Io(e),
    }
}

/// Opens `rel` beneath `root` for reading: links inside the root are followed, none out of it;
/// a FIFO or a device is opened without blocking (the caller refuses anything but a regular
/// file).
pub(super) fn open_beneath(root: &Dir, rel: &Path) -> io::Result<File> {
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let mut how = OpenOptions::new();
    how.read(true).custom_flags(flags.bits() as i32);
    if rel.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "a directory, not a file",
        ));
    }
    root.open_with(rel, &how)
}

/// The directory `rel` beneath `root` (links inside the root followed, none out of it); `root`
/// itself for an empty `rel`.
pub(super) fn open_dir_beneath(root: &Dir, rel: &Path) -> io::Result<Dir> {
    if rel.as_os_str().is_empty() {
        root.try_clone()
    } else {
        root.open_dir(rel)
    }
}
