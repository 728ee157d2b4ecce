//! One-line notices from the engine for the user (cuDNN not found, a shape that falls back to a
//! slower path). The engine never prints: it queues each distinct notice once per process, and
//! the scripting layer prints what is queued through its output (at training events and after
//! each cell).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

#[derive(Default)]
struct Queue {
    said: HashSet<String>,
    pending: Vec<String>,
}

fn queue() -> &'static Mutex<Queue> {
    static Q: OnceLock<Mutex<Queue>> = OnceLock::new();
    Q.get_or_init(Mutex::default)
}

/// Queues `message` unless it was queued before in this process.
pub fn say(message: impl Into<String>) {
    let message = message.into();
    let mut q = queue().lock().unwrap_or_else(PoisonError::into_inner);
    if q.said.insert(message.clone()) {
        q.pending.push(message);
    }
}

/// The notices queued since the last call, oldest first.
pub fn take() -> Vec<String> {
    std::mem::take(
        &mut queue()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_notice_is_given_once() {
        say("notice test: a");
        say("notice test: a");
        say("notice test: b");
        let got: Vec<String> = take()
            .into_iter()
            .filter(|m| m.starts_with("notice test"))
            .collect();
        assert_eq!(got, ["notice test: a", "notice test: b"]);
        say("notice test: a");
        assert!(take().iter().all(|m| m != "notice test: a"));
    }
}
