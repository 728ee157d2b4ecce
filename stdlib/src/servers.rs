//! The servers a session started (`m.serve(...)`): they live as long as the session (or until
//! `srv.stop()`), whatever the script does with their handles, and are found by the model they
//! serve, so that training that model publishes each step's weights to them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use qscript_runtime::model::Model;
use qscript_runtime::serve::{ServedModel, Server};

/// One running server and the model handle it was started from.
struct Live {
    id: usize,
    source: Arc<Model>,
    server: Server,
}

/// Every server of a session.
#[derive(Default)]
pub struct Servers {
    list: Mutex<Vec<Live>>,
    next: AtomicUsize,
}

impl Servers {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `server` (started from `source`) and returns its id.
    pub fn add(&self, source: Arc<Model>, server: Server) -> usize {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list().push(Live { id, source, server });
        id
    }

    /// Stops server `id`; false when it was not running.
    pub fn stop(&self, id: usize) -> bool {
        let live = {
            let mut list = self.list();
            let i = list.iter().position(|l| l.id == id);
            i.map(|i| list.remove(i))
        };
        live.is_some()
    }

    /// Whether server `id` runs.
    pub fn is_running(&self, id: usize) -> bool {
        self.list().iter().any(|l| l.id == id)
    }

    /// The served models started from `model` (training it publishes to them).
    pub fn serving(&self, model: &Arc<Model>) -> Vec<Arc<ServedModel>> {
        self.list()
            .iter()
            .filter(|l| Arc::ptr_eq(&l.source, model))
            .flat_map(|l| l.server.models.iter().cloned())
            .collect()
    }

    /// Where each running server listens.
    pub fn urls(&self) -> Vec<String> {
        self.list()
            .iter()
            .map(|l| format!("http://{}", l.server.addr))
            .collect()
    }

    /// Stops them all.
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.list());
        drop(all);
    }
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.urls()).finish()
    }
}
