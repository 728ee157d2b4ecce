//! `qscript --nproc-per-node N recipe.rhai`: starts N ranks of this binary on this machine with
//! torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`) and waits for them. Rank 0 prints as a single run would; the others' stdout is
//! dropped and their stderr is shown with a `[rank N]` prefix. A rank that fails stops the others
//! and the launcher names it; Ctrl-C reaches every rank, which stop together after rank 0's
//! checkpoint.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The arguments of this run without `--nproc-per-node` (and its value).
pub fn rank_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" {
            skip = true;
        } else if !s.starts_with("--nproc-per-node=") {
            out.push(a);
        }
    }
    out
}

/// A port nothing listens on now (`MASTER_PORT` when it is set).
fn master_port() -> anyhow::Result<u16> {
    if let Ok(p) = std::env::var("MASTER_PORT") {
        return p
            .parse()
            .map_err(|_| anyhow::anyhow!("`MASTER_PORT` is `{p}`; expected a port, 1..65535"));
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `n` ranks running `args` and waits for them: exit 0 when every rank succeeds, 130 when
/// stopped by Ctrl-C, else 1 with the first failed rank named.
pub fn launch(n: usize, args: &[OsString]) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let port = master_port()?.to_string();
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let mut ranks: Vec<Child> = Vec::with_capacity(n);
    let mut forwarders = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            // NVLink multicast stays off (it can take a shared machine's GPUs out of service).
            .env("NCCL_NVLS_ENABLE", "0");
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks);
                anyhow::bail!("cannot start rank {rank} (`{}`): {e}", exe.display());
            }
        };
        if let Some(err) = child.stderr.take() {
            forwarders.push(std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[rank {rank}] {line}");
                }
            }));
        }
        ranks.push(child);
    }
    let mut done: Vec<Option<Exit>> = vec![None; n];
    let mut forwarded = false;
    let mut stopping_since: Option<std::time::Instant> = None;
    let poll = |ranks: &mut [Child], done: &mut [Option<Exit>]| -> anyhow::Result<()> {
        for (r, child) in ranks.iter_mut().enumerate() {
            if done[r].is_none()
                && let Some(status) = child.try_wait()?
            {
                done[r] = Some(Exit::of(status));
            }
        }
        Ok(())
    };
    let code = loop {
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals >= 2 {
            // A second Ctrl-C: stop now.
            stop(&mut ranks);
            break ExitCode::from(130);
        }
        if signals == 1 && !forwarded {
            // The terminal signals every rank itself; a signal sent to the launcher alone is
            // passed on.
            forwarded = true;
            interrupt(&ranks, &done);
        }
        poll(&mut ranks, &mut done)?;
        if done.iter().flatten().any(|e| e.failed()) {
            // The others may be failing because of it: give them a moment, then name the rank
            // that went first (killed by a signal) before those that lost it.
            std::thread::sleep(Duration::from_millis(300));
            poll(&mut ranks, &mut done)?;
            let mut bad: Vec<(usize, Exit)> = done
                .iter()
                .enumerate()
                .filter_map(|(r, e)| e.filter(|e| e.failed()).map(|e| (r, e)))
                .collect();
            bad.sort_by_key(|(r, e)| (matches!(e, Exit::Code(_)), *r));
            stop(&mut ranks);
            let said: Vec<String> = bad
                .iter()
                .map(|(r, e)| format!("rank {r} of {n} {e}"))
                .collect();
            eprintln!(
                "error: {}; the other ranks were stopped",
                said.join(", then ")
            );
            break ExitCode::from(1);
        }
        let stopped = done.iter().flatten().any(|e| e.stopped());
        if done.iter().all(Option::is_some) {
            break if stopped || signals > 0 {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            };
        }
        if stopped {
            // A rank stopped by Ctrl-C: the others stop at the same step (rank 0 after its
            // checkpoint); one that is stuck (still starting up, say) is ended after a while.
            let since = *stopping_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > STOP_GRACE {
                stop(&mut ranks);
                break ExitCode::from(130);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for f in forwarders {
        let _ = f.join();
    }
    Ok(code)
}

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn of(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(-1),
        }
    }

    /// Stopped by Ctrl-C (SIGINT, or the exit code 130 qscript gives after saving).
    fn stopped(self) -> bool {
        matches!(self, Exit::Code(130) | Exit::Signal(2))
    }

    fn failed(self) -> bool {
        self != Exit::Code(0) && !self.stopped()
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "failed (exit code {c})"),
            Exit::Signal(s) => write!(f, "was killed (signal {s})"),
        }
    }
}

/// How long the other ranks get to stop once one stopped for Ctrl-C (rank 0 may be writing a
/// large checkpoint).
const STOP_GRACE: Duration = Duration::from_mins(10);

/// Ctrl-C's the launcher got (the second ends every rank at once).
pub static SIGNALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Ends every rank still running.
fn stop(ranks: &mut [Child]) {
    for c in ranks.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// Sends Ctrl-C's signal to every rank still running (not to one already reaped: its pid may
/// belong to another process by now).
fn interrupt(ranks: &[Child], done: &[Option<Exit>]) {
    for (c, _) in ranks.iter().zip(done).filter(|(_, d)| d.is_none()) {
        if let Some(pid) = i32::try_from(c.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_run_the_same_arguments_without_the_launcher_flag() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            rank_args(args(&["r.rhai", "--nproc-per-node", "4", "--set", "a=1"]).into_iter()),
            args(&["r.rhai", "--set", "a=1"])
        );
        assert_eq!(
            rank_args(args(&["--nproc-per-node=2", "r.rhai"]).into_iter()),
            args(&["r.rhai"])
        );
    }
}
