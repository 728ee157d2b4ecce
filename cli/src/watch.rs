//! `--watch`: run the recipe, then re-run from the first changed cell on every save of the recipe
//! or of a file it imports. A save during a run cancels the run and starts again.
//!
//! A save is a change only when a watched file's content differs from what the current run read:
//! editors and `sed -i` write a file in several events that may reach us in more than one debounced
//! batch, and a late one must not cancel the run that the first one started.

use std::collections::{BTreeMap, BTreeSet};
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

/// Each watched file with the content the current run read (`None`: it could not be read).
type Watched = Arc<Mutex<BTreeMap<PathBuf, Option<Vec<u8>>>>>;

fn content(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

pub fn watch(session: &mut Session, file: &Path) -> anyhow::Result<ExitCode> {
    let watched: Watched = Arc::default();
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
            ) && e
                .paths
                .iter()
                .any(|p| files.get(p).is_some_and(|read| content(p) != *read))
        });
        if relevant {
            if r.load(Ordering::SeqCst) {
                cancel.cancel_superseded();
            }
            let _ = tx.send(());
        }
    })?;

    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let recipe = file.canonicalize()?;
    // After a run: watch the files it read; a file new to the set is taken as the run read it.
    let mut watch_files = |files: BTreeSet<PathBuf>| -> anyhow::Result<()> {
        for f in &files {
            if let Some(d) = f.parent()
                && dirs.insert(d.to_path_buf())
            {
                debouncer.watch(d, RecursiveMode::NonRecursive)?;
            }
        }
        let mut map = watched.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|f, _| files.contains(f));
        for f in files {
            map.entry(f).or_insert_with_key(|f| content(f));
        }
        Ok(())
    };
    // Before a run: what each watched file holds now is what the run will read.
    let read_now = |watched: &Watched| {
        for (f, read) in watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            *read = content(f);
        }
    };
    watch_files(std::iter::once(recipe.clone()).collect())?;
    read_now(&watched);
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
        read_now(&watched);
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
