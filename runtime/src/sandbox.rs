//! The path policy of a run. Recipes are shared between teams, so a recipe may read only under its
//! own directory, the run's output directory and the paths the user allowed (`--allow-read`), and
//! may write only under the output directory. Every function that takes a path goes through
//! [`Sandbox::resolve_read`] or [`Sandbox::resolve_write`]; symlinks are resolved before the check,
//! so a link that points out of the tree is refused like the path it points to.
//!
//! During a dry run (`qscript check`) writes go to an overlay directory instead of the output
//! directory, and reads of the output directory see the overlay first, so a recipe that writes a
//! file and reads it back checks as it runs while nothing is written under the output directory.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Where a recipe may read and write.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// Where relative reads resolve (the running recipe's directory; `:load` moves it).
    base: Arc<Mutex<PathBuf>>,
    output: PathBuf,
    read_roots: Vec<PathBuf>,
    /// HF cache repos the recipe named by hub id (`model::load("org/name")`): readable, each
    /// its own folder only.
    hub_repos: Arc<Mutex<Vec<PathBuf>>>,
    /// The dry run's overlay of the output directory (see the module doc).
    overlay: Arc<Mutex<Option<PathBuf>>>,
}

impl Sandbox {
    /// A sandbox for a recipe in `base` (relative reads resolve there), writing under `output`
    /// (relative writes resolve there; created on first write), and reading also under each of
    /// `allow_read`.
    pub fn new(base: &Path, output: impl Into<PathBuf>, allow_read: &[PathBuf]) -> Result<Self> {
        let base = base.canonicalize().map_err(|e| Error::io(base, e))?;
        let output = absolute(&output.into())?;
        let mut read_roots = vec![base.clone()];
        for p in allow_read {
            let c = p.canonicalize().map_err(|e| {
                Error::InvalidArgument(format!("`--allow-read {}`: {e}", p.display()))
            })?;
            read_roots.push(c);
        }
        Ok(Self {
            base: Arc::new(Mutex::new(base)),
            output,
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
        let mut repos = self
            .hub_repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !repos.contains(&real) {
            repos.push(real);
        }
        Ok(())
    }

    /// Sends writes to `dir` instead of the output directory (and lets reads of the output
    /// directory see it first), or back to the output directory with `None`.
    pub fn set_overlay(&self, dir: Option<PathBuf>) {
        *self
            .overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dir;
    }

    fn overlay(&self) -> Option<PathBuf> {
        self.overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
        self.base
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `dir` (a recipe's directory, which must be readable) where relative reads resolve,
    /// as running that recipe from the command line does.
    pub fn set_base(&self, dir: &Path) -> Result<()> {
        let real = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if !self.read_roots.iter().any(|r| real.starts_with(r)) {
            return Err(self.refuse_read(dir));
        }
        *self
            .base
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = real;
        Ok(())
    }

    /// The run's output directory (absolute; it may not exist yet).
    pub fn output_dir(&self) -> &Path {
        &self.output
    }

    /// Resolves `path` for reading: relative to the recipe directory, symlinks followed, and
    /// refused unless it lies under a readable root. Only regular files and directories are
    /// read (a FIFO or a device would block the run forever). Outside the sandbox a missing path
    /// and an existing one get the same refusal, so a recipe cannot probe what exists there.
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
            return Err(Error::Sandbox(format!(
                "cannot read `{}`: not a regular file or directory",
                path.display()
            )));
        }
        Ok(real)
    }

    /// Whether `p` lies where this sandbox may read: a readable root, the output directory
    /// (as given or resolved) or the dry run's overlay.
    fn may_read(&self, p: &Path) -> bool {
        let output = self.output.canonicalize().ok();
        let overlay = self.overlay();
        let hub = self
            .hub_repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.read_roots
            .iter()
            .chain(output.as_ref())
            .chain(std::iter::once(&self.output))
            .chain(overlay.as_ref())
            .chain(hub.iter())
            .any(|r| p.starts_with(r))
    }

    fn refuse_read(&self, path: &Path) -> Error {
        Error::Sandbox(format!(
            "cannot read `{}`: it is outside the recipe's sandbox (readable: {}); \
             pass `--allow-read PATH` to allow more",
            path.display(),
            self.readable_list(),
        ))
    }

    /// Resolves `path` for writing: relative to the output directory, refused unless it stays
    /// under it. Writes never follow a symbolic link: the output directory must be a real
    /// directory of this user (a shared bundle may ship `runs/<name>` as a link to someone
    /// else's directory), no directory on the way to the file may be a link, and an existing
    /// file that is a link is not written through. Missing directories are created one by one
    /// after those checks, so a refused write creates nothing.
    pub fn resolve_write(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let refuse = |why: &str| {
            Error::Sandbox(format!(
                "cannot write `{}`: recipes may write only under the output directory `{}`{why}",
                path.display(),
                self.output.display()
            ))
        };
        let target = normalize(&self.output.join(path));
        if !target.starts_with(&self.output) || target == self.output {
            return Err(refuse(""));
        }
        if let Some(o) = self.in_overlay(&target) {
            let parent = o.parent().ok_or_else(|| refuse(""))?;
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            return Ok(o);
        }
        self.ensure_output()?;
        let rel = target
            .strip_prefix(&self.output)
            .map_err(|_| refuse(""))?
            .to_path_buf();
        let mut dir = self.output.clone();
        let parts: Vec<_> = rel.components().collect();
        for c in &parts[..parts.len().saturating_sub(1)] {
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(&format!(
                        " (`{}` is a symbolic link)",
                        dir.display()
                    )));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(refuse(&format!(
                        " (`{}` is not a directory)",
                        dir.display()
                    )));
                }
                Err(_) => std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?,
            }
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse(" (the file there is a symbolic link)"));
        }
        Ok(target)
    }

    /// Creates the output directory (its missing ancestors too) or checks the one there: a real
    /// directory owned by this user, reached through no symbolic link below the recipe's
    /// directory (a bundle's own `runs/...`).
    fn ensure_output(&self) -> Result<()> {
        let out = &self.output;
        let refuse = |why: String| {
            Error::Sandbox(format!(
                "the output directory `{}` {why}; pass another `--output-dir`",
                out.display()
            ))
        };
        let base = self.base();
        if let Ok(rel) = out.strip_prefix(&base) {
            let mut p = base.clone();
            for c in rel.components() {
                p.push(c);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(refuse(format!(
                        "is reached through the symbolic link `{}`",
                        p.display()
                    )));
                }
            }
        }
        match std::fs::symlink_metadata(out) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refuse("is a symbolic link".into()));
            }
            Ok(m) if !m.is_dir() => return Err(refuse("is not a directory".into())),
            Ok(m) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::MetadataExt as _;
                    if m.uid() != rustix::process::geteuid().as_raw() {
                        return Err(refuse("belongs to another user".into()));
                    }
                }
                let _ = m;
            }
            Err(_) => std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?,
        }
        Ok(())
    }

    /// The path a write of `path` would go to, checked without touching the file system (for
    /// `qscript check`, which writes nothing).
    pub fn check_write(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let target = normalize(&self.output.join(path));
        if target.starts_with(&self.output) && target != self.output {
            Ok(target)
        } else {
            Err(Error::Sandbox(format!(
                "cannot write `{}`: recipes may write only under the output directory `{}`",
                path.display(),
                self.output.display()
            )))
        }
    }

    /// Writes `bytes` to `path` (see [`Sandbox::resolve_write`]) atomically: a temporary file in
    /// the same directory, then a rename, so a crash never leaves a half-written file.
    pub fn write_atomic(&self, path: impl AsRef<Path>, bytes: &[u8]) -> Result<PathBuf> {
        let real = self.resolve_write(path)?;
        write_atomic(&real, bytes)?;
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
}

thread_local! {
    /// The sandbox of the run on this thread (set by the session around its cells), against
    /// which [`read`] checks the file it actually opened.
    static ACTIVE: std::cell::RefCell<Option<Sandbox>> = const { std::cell::RefCell::new(None) };
}

/// Makes `sb` the sandbox [`read`] checks on this thread (`None`: no check).
pub fn activate(sb: Option<Sandbox>) {
    ACTIVE.with(|a| *a.borrow_mut() = sb);
}

/// The path the open file `f` really is (Linux: the kernel's name for the descriptor), when it
/// can be told.
#[cfg(target_os = "linux")]
fn opened_path(f: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
}

#[cfg(not(target_os = "linux"))]
fn opened_path(_: &std::fs::File) -> Option<PathBuf> {
    None
}

/// `path` opened for reading, a regular file, checked as [`read`] checks it (the file actually
/// opened, against the active sandbox).
pub fn open(path: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Sandbox(format!(
            "cannot read `{}`: not a regular file",
            path.display()
        )));
    }
    match refused(&f, path) {
        Some(e) => Err(e),
        None => Ok(f),
    }
}

/// The active sandbox's refusal of `opened` (the file or directory `path` was opened as), judged
/// by where its descriptor really points; `None` when it may be read or nothing is active.
fn refused(opened: &std::fs::File, path: &Path) -> Option<Error> {
    ACTIVE.with(|a| {
        let a = a.borrow();
        let sb = a.as_ref()?;
        let real = opened_path(opened)?;
        (!sb.may_read(&real)).then(|| sb.refuse_read(path))
    })
}

/// The entries of directory `path` (full paths under `path`, sorted), listed from the directory
/// actually opened: under an active sandbox that directory is checked first (where the
/// descriptor really points) and listed through the descriptor (Linux: `/proc/self/fd/N` names
/// the open directory itself, not a path), so a directory swapped for a link between a check and
/// the listing cannot list an outside directory.
pub fn list_dir(path: &Path) -> Result<Vec<PathBuf>> {
    let dir = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = dir.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Err(Error::Sandbox(format!(
            "cannot list `{}`: not a directory",
            path.display()
        )));
    }
    if let Some(e) = refused(&dir, path) {
        return Err(e);
    }
    #[cfg(target_os = "linux")]
    let listed = {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
    };
    #[cfg(not(target_os = "linux"))]
    let listed = path.to_path_buf();
    let mut out = std::fs::read_dir(&listed)
        .map_err(|e| Error::io(path, e))?
        .map(|e| e.map(|e| path.join(e.file_name())))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(path, e))?;
    out.sort();
    Ok(out)
}

/// The bytes of the regular file `path`. Under an active sandbox the check is on the file
/// actually opened (where the descriptor really points), so a directory swapped for a link
/// between the sandbox's check and this open cannot leak a file from outside.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut f = open(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    // Whatever is at the temporary name (a stale file, or a planted link) goes first; the file is
    // then created new, which never follows a link.
    if std::fs::symlink_metadata(&tmp).is_ok() {
        std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    // Errors name the file being written, not its temporary (a full disk says which file).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(path, e))?;
    if let Err(e) = std::io::Write::write_all(&mut f, bytes) {
        drop(f);
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Sandbox) {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("recipe");
        std::fs::create_dir(&recipe).unwrap();
        std::fs::write(recipe.join("data.txt"), "hi").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "s").unwrap();
        let sb = Sandbox::new(&recipe, dir.path().join("out"), &[]).unwrap();
        (dir, sb)
    }

    /// Swaps directory `inside` for a link to `outside` and back, in a loop on a thread, until
    /// stopped.
    #[cfg(target_os = "linux")]
    struct Swapper {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    #[cfg(target_os = "linux")]
    impl Swapper {
        fn start(inside: &Path, outside: &Path) -> Self {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (inside, outside, flag) =
                (inside.to_path_buf(), outside.to_path_buf(), stop.clone());
            let parked = inside.with_extension("real");
            let thread = std::thread::spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::rename(&inside, &parked);
                    let _ = std::os::unix::fs::symlink(&outside, &inside);
                    let _ = std::fs::remove_file(&inside);
                    let _ = std::fs::rename(&parked, &inside);
                }
            });
            Self { stop, thread }
        }

        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread.join().unwrap();
        }
    }

    /// A directory swapped for a link to the outside, in a loop, while reads run: every read
    /// returns the inside file or an error, never the outside one.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_directory_swapped_for_a_link_never_leaks_the_outside() {
        let (d, sb) = setup();
        let inside = d.path().join("recipe/data");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("f.txt"), "inside").unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f.txt"), "SECRET").unwrap();
        let swapper = Swapper::start(&inside, &outside);
        activate(Some(sb.clone()));
        let mut seen = 0;
        for _ in 0..3000 {
            if let Ok(real) = sb.resolve_read("data/f.txt")
                && let Ok(bytes) = read(&real)
            {
                assert_eq!(bytes, b"inside", "an outside file was read");
                seen += 1;
            }
        }
        swapper.stop();
        // Once the swapping stops, the inside file reads as usual (`seen` counts the reads that
        // won the race; under load it may be none).
        let real = sb.resolve_read("data/f.txt").unwrap();
        assert_eq!(read(&real).unwrap(), b"inside");
        activate(None);
        let _ = seen;
    }

    /// Listing a directory swapped for a link to the outside, in a loop: every listing names the
    /// inside entries or fails, never the outside ones.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_swapped_directory_never_lists_the_outside() {
        let (d, sb) = setup();
        let inside = d.path().join("recipe/data");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("inside.txt"), "x").unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("SECRET.txt"), "s").unwrap();
        let swapper = Swapper::start(&inside, &outside);
        activate(Some(sb.clone()));
        for _ in 0..3000 {
            if let Ok(real) = sb.resolve_read("data")
                && let Ok(names) = list_dir(&real)
            {
                assert!(
                    names.iter().all(|n| !n.ends_with("SECRET.txt")),
                    "an outside directory was listed: {names:?}"
                );
            }
        }
        swapper.stop();
        let real = sb.resolve_read("data").unwrap();
        assert_eq!(list_dir(&real).unwrap(), [real.join("inside.txt")]);
        // A link to the outside, listed directly, is refused.
        std::os::unix::fs::symlink(&outside, d.path().join("recipe/link")).unwrap();
        assert!(list_dir(&d.path().join("recipe/link")).is_err());
        activate(None);
    }

    #[test]
    fn an_overlay_takes_the_writes_and_shows_them_to_reads() {
        let (d, sb) = setup();
        let overlay = d.path().join("overlay");
        sb.set_overlay(Some(overlay.clone()));
        let w = sb.write_atomic("sub/a.txt", b"x").unwrap();
        assert_eq!(w, overlay.join("sub/a.txt"));
        assert!(
            !d.path().join("out").exists(),
            "nothing under the output dir"
        );
        let out = d.path().join("out/sub/a.txt");
        assert_eq!(sb.resolve_read(&out).unwrap(), w);
        assert!(sb.resolve_write("../escape.txt").is_err());
        sb.set_overlay(None);
        assert!(sb.resolve_read(&out).is_err(), "gone with the overlay");
    }

    #[test]
    fn reads_inside_and_refuses_outside() {
        let (_d, sb) = setup();
        assert!(sb.resolve_read("data.txt").is_ok());
        let e = sb.resolve_read("/etc/passwd").unwrap_err();
        assert!(
            e.to_string().contains("outside the recipe's sandbox"),
            "{e}"
        );
        assert!(matches!(
            sb.resolve_read("../secret.txt"),
            Err(Error::Sandbox(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn refuses_symlinks_out_of_the_tree() {
        let (d, sb) = setup();
        std::os::unix::fs::symlink(d.path().join("secret.txt"), sb.base().join("link")).unwrap();
        assert!(matches!(sb.resolve_read("link"), Err(Error::Sandbox(_))));
        std::fs::create_dir_all(sb.output_dir()).unwrap();
        std::os::unix::fs::symlink(d.path(), sb.output_dir().join("escape")).unwrap();
        assert!(matches!(
            sb.resolve_write("escape/x.txt"),
            Err(Error::Sandbox(_))
        ));
    }

    /// Through a link to `/`, an outside file is refused with the same message whether it
    /// exists or not; a missing file inside is still "not found".
    #[cfg(unix)]
    #[test]
    fn a_missing_file_through_a_link_is_refused_like_an_existing_one() {
        let (d, sb) = setup();
        std::os::unix::fs::symlink(d.path(), sb.base().join("l")).unwrap();
        let name = d.path().file_name().unwrap().to_string_lossy().into_owned();
        let up = format!("l/../{name}");
        let a = sb.resolve_read(format!("{up}/secret.txt")).unwrap_err();
        let b = sb.resolve_read(format!("{up}/missing.txt")).unwrap_err();
        assert!(matches!(a, Error::Sandbox(_)), "{a}");
        assert!(matches!(b, Error::Sandbox(_)), "{b}");
        assert_eq!(
            a.to_string().replace("secret", "X"),
            b.to_string().replace("missing", "X")
        );
        let e = sb.resolve_read("missing.txt").unwrap_err();
        assert_eq!(e.kind(), "io", "{e}");
    }

    #[test]
    fn writes_only_under_output() {
        let (_d, sb) = setup();
        let p = sb.write_atomic("sub/a.txt", b"x").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x");
        assert!(sb.resolve_read(&p).is_ok(), "output dir is readable");
        assert!(matches!(
            sb.resolve_write("../x.txt"),
            Err(Error::Sandbox(_))
        ));
        assert!(matches!(
            sb.resolve_write("/tmp/x.txt"),
            Err(Error::Sandbox(_))
        ));
    }

    #[test]
    fn allow_read_extends_and_names_bad_paths() {
        let (d, _) = setup();
        let sb = Sandbox::new(
            &d.path().join("recipe"),
            d.path().join("out"),
            &[d.path().into()],
        )
        .unwrap();
        assert!(sb.resolve_read("../secret.txt").is_ok());
        let e = Sandbox::new(d.path(), d.path().join("o"), &["/no/such".into()]).unwrap_err();
        assert!(e.to_string().contains("--allow-read /no/such"), "{e}");
    }
}
