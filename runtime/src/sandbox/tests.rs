#![allow(clippy::unwrap_used)]
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
        let (inside, outside, flag) = (inside.to_path_buf(), outside.to_path_buf(), stop.clone());
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

/// A walk lists through the sandbox: a link loop is entered once, a link out of the tree is
/// listed as refused ([`Kind::Other`]) and not entered, and a cancel stops it.
#[cfg(unix)]
#[test]
fn a_walk_enters_each_directory_once_and_never_leaves_the_tree() {
    let (d, sb) = setup();
    let base = sb.base();
    std::fs::create_dir_all(base.join("a/b")).unwrap();
    std::fs::write(base.join("a/b/f.json"), "[]").unwrap();
    std::os::unix::fs::symlink(base.join("a"), base.join("a/b/loop")).unwrap();
    std::fs::create_dir(d.path().join("outside")).unwrap();
    std::fs::write(d.path().join("outside/s.json"), "[]").unwrap();
    std::os::unix::fs::symlink(d.path().join("outside"), base.join("a/out")).unwrap();
    activate(Some(sb.clone()));
    let cancel = crate::cancel::CancelToken::new();
    let all = walk(&base.join("a"), usize::MAX, &cancel).unwrap();
    let names: Vec<String> = all
        .iter()
        .map(|(p, _)| p.strip_prefix(&base).unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["a/b", "a/b/f.json", "a/b/loop", "a/out"]);
    assert_eq!(all[3].1, Kind::Other, "the link out of the tree is refused");
    assert!(matches!(all[1].1, Kind::File));
    cancel.cancel();
    assert!(matches!(
        walk(&base.join("a"), usize::MAX, &cancel),
        Err(Error::Cancelled)
    ));
    activate(None);
}
