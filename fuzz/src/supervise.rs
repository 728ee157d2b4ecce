//! The supervised run: a parent makes inputs and feeds them to a child worker
//! (`qscript-fuzz worker TARGET`), which runs each in-process and answers. The worker limits its
//! address space, so a runaway allocation fails there; the parent bounds each input's time. A
//! panic escaping the entry point, a signal (abort, stack overflow), an out-of-memory death or a
//! timeout is a finding: the input is saved under `<out>/<target>/<short-hash>`, the reason
//! printed, and a fresh worker started.
//!
//! Protocol (the worker's stdin and a duplicate of its original stdout; its fd 1 is pointed at
//! stderr so stray prints cannot corrupt it): the parent sends `u32 LE length, bytes`; the worker
//! answers `Ready` once, then per input a tag byte (`0` returned, `1` panicked), a `u64 LE` hash
//! of the outcome's normalized message (an outcome never seen grows the corpus) and a
//! length-prefixed message.

use std::collections::{HashSet, VecDeque};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::targets::{Outcome, Target};

/// Options of a supervised run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long to fuzz.
    pub duration: Duration,
    /// The RNG's seed (printed, so a run can be repeated).
    pub seed: u64,
    /// One input's time limit.
    pub timeout: Duration,
    /// The worker's address-space limit, in MiB (0: none).
    pub mem_mb: u64,
    /// Where findings are saved (`<out>/<target>/<short-hash>`).
    pub out: PathBuf,
    /// Print progress every this often (`None`: only the summary).
    pub progress: Option<Duration>,
}

/// One finding.
#[derive(Clone, Debug)]
pub struct Finding {
    /// Why: `panic: ...`, `out of memory`, `stack overflow`, `signal 6`, `timeout after 10s`.
    pub reason: String,
    /// Where the input was saved.
    pub path: PathBuf,
    /// False when that file was already there (a known regression failing again).
    pub new: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Inputs run.
    pub execs: u64,
    /// Seconds spent.
    pub secs: f64,
    /// Inputs kept in the in-memory corpus (seeds and inputs with a new outcome).
    pub corpus: usize,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    /// Workers started after a death.
    pub restarts: u64,
    /// Findings (one per distinct reason).
    pub findings: Vec<Finding>,
    /// Inputs that failed, all reasons counted.
    pub failures: u64,
}

/// A worker's answer.
enum Answer {
    Ready,
    Returned(u64),
    Panicked(String),
}

/// How a worker failed an input.
enum Death {
    Crashed(String),
    Hung,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<Option<Answer>>,
    tail: Arc<Mutex<Vec<u8>>>,
}

/// The most stderr a worker's tail keeps.
const TAIL: usize = 16 << 10;

impl Worker {
    fn spawn(target: &Target, mem_mb: u64) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["worker", target.name, "--mem-mb", &mem_mb.to_string()])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                t.extend_from_slice(&buf[..n]);
                if t.len() > TAIL {
                    let cut = t.len() - TAIL;
                    t.drain(..cut);
                }
            }
        });
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let a = read_answer(&mut r);
                let end = a.is_none();
                if tx.send(a).is_err() || end {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            answers,
            tail,
        })
    }

    /// Waits for the worker's `Ready` (its harness built).
    fn ready(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(Answer::Ready)) = self.answers.recv_timeout(Duration::from_mins(5)) {
            return Ok(());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::bail!("the worker did not start:\n{}", self.tail_text())
    }

    fn tail_text(&self) -> String {
        let t = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&t).into_owned()
    }

    /// Runs one input.
    fn exec(&mut self, input: &[u8], timeout: Duration) -> Result<Answer, Death> {
        let len = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let sent = self
            .stdin
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.stdin.write_all(input))
            .and_then(|()| self.stdin.flush());
        if sent.is_err() {
            return Err(Death::Crashed(self.death()));
        }
        match self.answers.recv_timeout(timeout) {
            Ok(Some(a)) => Ok(a),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => Err(Death::Crashed(self.death())),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(Death::Hung)
            }
        }
    }

    /// Why the worker died, from its exit status and the end of its stderr.
    fn death(&mut self) -> String {
        use std::os::unix::process::ExitStatusExt as _;
        let status = self.child.wait().ok();
        // Let the stderr reader take the last words.
        std::thread::sleep(Duration::from_millis(50));
        let tail = self.tail_text();
        let how = match status {
            Some(s) if s.signal().is_some() => format!("signal {}", s.signal().unwrap_or(0)),
            Some(s) => format!("exit {}", s.code().unwrap_or(-1)),
            None => "lost".into(),
        };
        if tail.contains("memory allocation of") {
            let line = tail
                .lines()
                .rfind(|l| l.contains("memory allocation of"))
                .unwrap_or("");
            format!("out of memory ({how}): {line}")
        } else if tail.contains("has overflowed its stack") {
            format!("stack overflow ({how})")
        } else if let Some(p) = tail.lines().rfind(|l| l.contains("panicked at")) {
            format!("panic while panicking or in a hook ({how}): {p}")
        } else {
            let last = tail.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            format!("{how}: {last}")
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_u32(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn read_answer(r: &mut impl Read) -> Option<Answer> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).ok()?;
    let mut h = [0u8; 8];
    r.read_exact(&mut h).ok()?;
    let n = read_u32(r)? as usize;
    let mut msg = vec![0u8; n];
    r.read_exact(&mut msg).ok()?;
    let msg = String::from_utf8_lossy(&msg).into_owned();
    Some(match tag[0] {
        2 => Answer::Ready,
        1 => Answer::Panicked(msg),
        _ => Answer::Returned(u64::from_le_bytes(h)),
    })
}

fn write_answer(w: &mut impl Write, tag: u8, hash: u64, msg: &str) -> std::io::Result<()> {
    let bytes = msg.as_bytes();
    let bytes = &bytes[..bytes.len().min(1 << 16)];
    w.write_all(&[tag])?;
    w.write_all(&hash.to_le_bytes())?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// A hash of what an outcome says, paths and numbers aside: inputs that reach a message not
/// seen before are kept to mutate further.
pub fn outcome_hash(o: &Outcome) -> u64 {
    let text = match o {
        Ok(()) => return 0,
        Err(e) => e,
    };
    // What the message says, not what it quotes: quoted names and values, paths and numbers
    // dropped, the first 24 words kept.
    let mut unquoted = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '`' => quoted = !quoted,
            _ if quoted => {}
            _ => unquoted.push(c),
        }
    }
    let norm: String = unquoted
        .split_whitespace()
        .filter(|w| !w.contains('/') && !w.starts_with('"'))
        .take(24)
        .map(|w| {
            w.chars()
                .filter(|c| !c.is_ascii_digit())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let h = blake3::hash(norm.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// The worker's side: limits its address space, builds the harness, then answers inputs from
/// stdin until it closes.
pub fn worker(target: &Target, mem_mb: u64) -> anyhow::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    if mem_mb > 0 {
        let bytes = mem_mb.saturating_mul(1 << 20);
        setrlimit(
            Resource::As,
            Rlimit {
                current: Some(bytes),
                maximum: Some(bytes),
            },
        )?;
    }
    // Answers go to a copy of stdout; fd 1 becomes stderr, so a stray print cannot break the
    // protocol.
    let mut answers = std::fs::File::from(rustix::io::dup(std::io::stdout())?);
    rustix::stdio::dup2_stdout(std::io::stderr())?;
    let mut h = (target.harness)()?;
    write_answer(&mut answers, 2, 0, "")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(n) = read_u32(&mut stdin) {
        let mut input = vec![0u8; n as usize];
        stdin.read_exact(&mut input)?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run(&input))) {
            Ok(o) => write_answer(&mut answers, 0, outcome_hash(&o), "")?,
            Err(p) => {
                let msg = crate::bounded::panic_message(p.as_ref());
                write_answer(&mut answers, 1, 0, &msg)?;
                // A panic may leave the harness half-changed: start afresh.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The reason's signature: one finding per signature and run.
fn signature(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(160)
        .collect()
}

/// Fuzzes `target` for `opts.duration`.
pub fn fuzz(target: &'static Target, opts: &Options) -> anyhow::Result<Stats> {
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut corpus = crate::corpus::seeds(target);
    let mut queue: VecDeque<Vec<u8>> = corpus.iter().cloned().collect();
    let mut seen = HashSet::new();
    let mut signatures = HashSet::new();
    let mut stats = Stats::default();
    let mut worker = Worker::spawn(target, opts.mem_mb)?;
    worker.ready()?;
    let mut last_print = Instant::now();
    while start.elapsed() < opts.duration {
        let input = queue
            .pop_front()
            .unwrap_or_else(|| crate::mutate::next(&mut rng, &corpus, target));
        stats.execs += 1;
        let reason = match worker.exec(&input, opts.timeout) {
            Ok(Answer::Returned(h)) => {
                if seen.insert(h) && corpus.len() < 4096 {
                    corpus.push(input.clone());
                }
                None
            }
            Ok(Answer::Ready) => None,
            Ok(Answer::Panicked(msg)) => {
                let at = worker
                    .tail_text()
                    .lines()
                    .rfind(|l| l.contains("panicked at"))
                    .map(str::to_string)
                    .unwrap_or_default();
                Some(format!(
                    "panic: {} ({at})",
                    msg.lines().next().unwrap_or("")
                ))
            }
            Err(Death::Crashed(why)) => Some(why),
            Err(Death::Hung) => Some(format!("timeout after {}s", opts.timeout.as_secs_f64())),
        };
        if let Some(reason) = reason {
            stats.failures += 1;
            if signatures.insert(signature(&reason)) {
                let (path, new) = crate::corpus::save_finding(&opts.out, target.name, &input)?;
                println!(
                    "finding [{}]{}: {reason}\n  input: {} ({} bytes)",
                    target.name,
                    if new { " (new)" } else { "" },
                    path.display(),
                    input.len()
                );
                stats.findings.push(Finding { reason, path, new });
            }
            drop(worker);
            stats.restarts += 1;
            worker = Worker::spawn(target, opts.mem_mb)?;
            worker.ready()?;
        }
        if let Some(every) = opts.progress
            && last_print.elapsed() >= every
        {
            last_print = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "[{}] {:.0}s execs {} ({:.1}/s) corpus {} outcomes {} findings {}",
                target.name,
                secs,
                stats.execs,
                stats.execs as f64 / secs,
                corpus.len(),
                seen.len(),
                stats.findings.len()
            );
        }
    }
    stats.secs = start.elapsed().as_secs_f64();
    stats.corpus = corpus.len();
    stats.outcomes = seen.len();
    Ok(stats)
}
