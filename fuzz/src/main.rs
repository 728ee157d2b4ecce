//! `qscript-fuzz`: fuzz qscript's untrusted inputs on stable Rust.
//!
//! - `qscript-fuzz list`: the targets and their entry points;
//! - `qscript-fuzz run TARGET --secs N [--seed S]`: a supervised run of one target;
//! - `qscript-fuzz all --secs N`: N seconds spread over every target;
//! - `qscript-fuzz repro FILE --target T`: one input, in-process, its outcome printed;
//! - `qscript-fuzz keep FILE --target T`: an input found by hand saved as a regression;
//! - `qscript-fuzz worker TARGET`: the child a run starts (not for people).
//!
//! Exit status: 0 when nothing was found, 1 on findings, 2 on usage or internal errors.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use qscript_fuzz::bounded::{self, Stop, Verdict};
use qscript_fuzz::supervise::{self, Options, Stats};
use qscript_fuzz::{corpus, targets};

#[derive(Parser)]
#[command(name = "qscript-fuzz", about = "Fuzz qscript's untrusted inputs")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the targets.
    List,
    /// Fuzz one target.
    Run {
        /// The target.
        target: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Fuzz every target, the time spread evenly.
    All {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run one input in-process and print its outcome.
    Repro {
        /// The input file.
        file: PathBuf,
        /// Its target.
        #[arg(long)]
        target: String,
        /// The time bound, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Save an input (found by hand) as `fuzz/regressions/<target>/<short-hash>`.
    Keep {
        /// The input file.
        file: PathBuf,
        /// Its target.
        #[arg(long)]
        target: String,
    },
    /// The worker a run starts.
    #[command(hide = true)]
    Worker {
        target: String,
        #[arg(long, default_value_t = 4096)]
        mem_mb: u64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Seconds to fuzz (for `all`: in total).
    #[arg(long, default_value_t = 60.0)]
    secs: f64,
    /// The RNG's seed (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// One input's time limit, in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The worker's address-space limit in MiB (0: none).
    #[arg(long, default_value_t = 4096)]
    mem_mb: u64,
    /// Where findings are saved (default: `fuzz/regressions`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 10.0)]
    progress: f64,
}

impl RunArgs {
    fn options(&self, secs: f64, seed: u64) -> Options {
        Options {
            duration: Duration::from_secs_f64(secs.max(0.0)),
            seed,
            timeout: Duration::from_secs_f64(self.timeout.max(0.001)),
            mem_mb: self.mem_mb,
            out: self.out.clone().unwrap_or_else(corpus::regressions_root),
            progress: (self.progress > 0.0).then(|| Duration::from_secs_f64(self.progress)),
        }
    }

    fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
    }
}

fn target(name: &str) -> anyhow::Result<&'static targets::Target> {
    targets::find(name).ok_or_else(|| {
        let names: Vec<_> = targets::all().iter().map(|t| t.name).collect();
        anyhow::anyhow!("no target `{name}`; targets: {}", names.join(", "))
    })
}

fn summary(name: &str, s: &Stats) {
    println!(
        "{name}: {} execs in {:.0}s ({:.1}/s), corpus {}, outcomes {}, restarts {}, findings {} ({} new)",
        s.execs,
        s.secs,
        s.execs as f64 / s.secs.max(1e-9),
        s.corpus,
        s.outcomes,
        s.restarts,
        s.findings.len(),
        s.findings.iter().filter(|f| f.new).count()
    );
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; `Ok(false)` when it found something.
fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Cmd::List => {
            for t in targets::all() {
                println!("{:<18} {}", t.name, t.entry);
            }
            Ok(true)
        }
        Cmd::Worker {
            target: name,
            mem_mb,
        } => {
            supervise::worker(target(&name)?, mem_mb)?;
            Ok(true)
        }
        Cmd::Run { target: name, run } => {
            let t = target(&name)?;
            let seed = run.seed();
            println!("fuzzing `{}` for {}s, seed {seed}", t.name, run.secs);
            let s = supervise::fuzz(t, &run.options(run.secs, seed))?;
            summary(t.name, &s);
            Ok(s.findings.is_empty())
        }
        Cmd::All { run } => {
            let all = targets::all();
            let seed = run.seed();
            let each = run.secs / all.len() as f64;
            println!(
                "fuzzing {} targets for {:.1}s each ({}s in all), seed {seed}",
                all.len(),
                each,
                run.secs
            );
            let (mut execs, mut found) = (0, 0);
            for (i, t) in all.iter().enumerate() {
                let s = supervise::fuzz(t, &run.options(each, seed.wrapping_add(i as u64)))?;
                summary(t.name, &s);
                execs += s.execs;
                found += s.findings.len();
            }
            println!("total: {execs} execs, {found} findings");
            Ok(found == 0)
        }
        Cmd::Keep { file, target: name } => {
            let t = target(&name)?;
            let (path, new) =
                corpus::save_finding(&corpus::regressions_root(), t.name, &std::fs::read(&file)?)?;
            println!(
                "{}{}",
                path.display(),
                if new { "" } else { " (already kept)" }
            );
            Ok(true)
        }
        Cmd::Repro {
            file,
            target: name,
            timeout,
        } => {
            let t = target(&name)?;
            let input = std::fs::read(&file)?;
            match bounded::run_all(t, vec![input], Duration::from_secs(timeout)) {
                Ok(v) => {
                    let (verdict, took) = &v[0];
                    match verdict {
                        Verdict::Returned(Ok(())) => println!("ok ({took:.2?})"),
                        Verdict::Returned(Err(e)) => println!("error ({took:.2?}): {e}"),
                        Verdict::Panicked(m) => {
                            println!("PANIC ({took:.2?}): {m}");
                            return Ok(false);
                        }
                    }
                    Ok(true)
                }
                Err(Stop::Hung { limit, .. }) => {
                    println!("HANG: still running after {limit:?}");
                    std::process::exit(1);
                }
                Err(Stop::Setup(e)) => anyhow::bail!("the harness could not start: {e}"),
            }
        }
    }
}
