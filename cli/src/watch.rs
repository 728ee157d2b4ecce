//! `--watch`: run the recipe, then re-run from the first changed cell on every save of the recipe
//! or of a file it imports. A save during a run cancels the run and starts again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use qscript_stdlib::{Failure, RunReport, ScriptError, Session};

use crate::INTERRUPTED;

/// Debounce window: editors write a file in several events (truncate, write, rename).
const DEBOUNCE: Duration = Duration::from_millis(40);

pub fn watch(session: &mut Session, file: &Path) -> anyhow::Result<ExitCode> {
    let watched: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let (tx, rx) = mpsc::channel::<()>();
    let cancel = session.context().cancel.clone();
    let (w, r) = (watched.clone(), running.clone());
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
        let Ok(events) = res else { return };
        let files = w.lock().unwrap_or_else(PoisonError::into_inner);
        let relevant = events.iter().any(|e| {
            matches!(
                e.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            ) && e.paths.iter().any(|p| files.contains(p))
        });
        if relevant {
            if r.load(Ordering::SeqCst) {
                cancel.cancel();
            }
            let _ = tx.send(());
        }
    })?;

    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let recipe = file.canonicalize()?;
    let mut watch_files = |files: BTreeSet<PathBuf>| -> anyhow::Result<()> {
        for f in &files {
            if let Some(d) = f.parent()
                && dirs.insert(d.to_path_buf())
            {
                debouncer.watch(d, RecursiveMode::NonRecursive)?;
            }
        }
        *watched.lock().unwrap_or_else(PoisonError::into_inner) = files;
        Ok(())
    };
    watch_files(std::iter::once(recipe.clone()).collect())?;
    let mut result = session.load_file(file);
    loop {
        running.store(false, Ordering::SeqCst);
        show(&result);
        let mut files: BTreeSet<PathBuf> = session.watched_files().into_iter().collect();
        files.insert(recipe.clone());
        watch_files(files)?;
        eprintln!(
            "[watch] watching {} for changes (Ctrl-C to quit)",
            file.display()
        );
        INTERRUPTED.store(false, Ordering::SeqCst);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if INTERRUPTED.load(Ordering::SeqCst) => {
                    return Ok(ExitCode::SUCCESS);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(ExitCode::from(2)),
            }
        }
        while rx.try_recv().is_ok() {}
        running.store(true, Ordering::SeqCst);
        eprintln!("[watch] change detected");
        result = session.load_file(file);
    }
}

fn show(result: &Result<RunReport, ScriptError>) {
    match result {
        Ok(report) => {
            if let Some(e) = &report.error {
                if e.failure == Failure::Cancelled {
                    eprintln!("[watch] run cancelled");
                } else {
                    eprintln!("{e}");
                }
            }
            eprintln!("[watch] {}", report.summary());
        }
        Err(e) => eprintln!("{e}\n[watch] kept the previous state"),
    }
}
