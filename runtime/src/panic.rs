//! Panics inside third-party code (a tokenizer, a sort, a parser) caught and turned into errors,
//! with the default hook's text kept off stderr; and the stack budget worker threads get.
//!
//! [`catch`] runs a closure under `catch_unwind` on a thread marked quiet, so a panic it catches
//! prints nothing: the caller reports an error in the project's words instead. Threads that only
//! ever run work for a guarded caller (the worker pools) are marked quiet for good with
//! [`quiet_thread`]. A panic anywhere else still prints as usual.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    /// How many [`catch`] calls this thread is inside (or 1 for good after [`quiet_thread`]).
    static QUIET: Cell<usize> = const { Cell::new(0) };
}

/// Installs, once per process, a panic hook that is silent on quiet threads and otherwise the
/// hook that was there before.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

/// Marks this thread quiet for good: its panics are caught by whoever it works for.
pub fn quiet_thread() {
    install_hook();
    QUIET.with(|q| q.set(q.get() + 1));
}

/// Runs `f`; a panic inside becomes `Err` with the panic's message (for logs and tests, not for
/// users: callers say what failed in their own words) and prints nothing.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    QUIET.with(|q| q.set(q.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get().saturating_sub(1)));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// The stack a worker thread gets: the main thread's (`ulimit -s`, 8 MiB when unlimited or
/// unknown, 8 to 64 MiB), so script callbacks and parsers that are safe on the main thread
/// within their depth limits are safe on a worker too.
pub fn worker_stack_size() -> usize {
    const MIB: u64 = 1 << 20;
    let soft = rustix::process::getrlimit(rustix::process::Resource::Stack).current;
    let bytes = soft.unwrap_or(8 * MIB).clamp(8 * MIB, 64 * MIB);
    usize::try_from(bytes).unwrap_or(8 << 20)
}

/// The worker pool for parallel work done on a script's behalf (data mapping, tokenizing): the
/// main thread's stack budget ([`worker_stack_size`]), quiet threads. `None` when the system
/// cannot start threads; callers then run on rayon's global pool.
pub fn workers() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("qscript-worker-{i}"))
            .stack_size(worker_stack_size())
            .start_handler(|_| quiet_thread())
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs `f` inside [`workers`], so its parallel iterators run there.
pub fn in_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match workers() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_an_error_with_its_message() {
        assert_eq!(catch(|| 2 + 2), Ok(4));
        let e = catch(|| -> () { panic!("boom {}", 1) }).unwrap_err();
        assert_eq!(e, "boom 1");
        assert!(worker_stack_size() >= 8 << 20);
        let deep = in_workers(|| {
            fn down(n: u32) -> u32 {
                let pad = std::hint::black_box([0u8; 1024]);
                if n == 0 {
                    u32::from(pad[0])
                } else {
                    1 + down(n - 1)
                }
            }
            // 4 MiB of frames: over the 2 MiB a plain thread gets.
            use rayon::prelude::*;
            (0..4u32).into_par_iter().map(|_| down(4000)).sum::<u32>()
        });
        assert_eq!(deep, 16_000);
    }
}
