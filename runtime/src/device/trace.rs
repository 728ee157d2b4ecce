//! A timeline of GPU work, off unless `QSCRIPT_TRACE` names a file: spans of work on a GPU's
//! streams, timed by CUDA events recorded in the streams themselves (nothing synchronizes, so
//! the run keeps its speed, unlike `crate::profile`). [`finish`] writes them as a Chrome trace
//! (chrome://tracing, ui.perfetto.dev) and sums up what matters for activation offload: how much
//! of the copies' time the compute stream was busy with other work, and how long the compute
//! stream stood idle between its spans (where it would wait for a copy). The engine marks each
//! block's forward, recompute and backward; the offload marks its copies on the side stream.
//! On the CPU, and in builds without CUDA, spans are nothing.

use candle_core::Device;

/// Which stream a span ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// The GPU's compute stream (the engine's work).
    Compute,
    /// The side stream of activation offload's copies.
    Copy,
}

impl Track {
    fn id(self) -> u32 {
        match self {
            Track::Compute => 1,
            Track::Copy => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Track::Compute => "compute stream",
            Track::Copy => "copy stream (offload)",
        }
    }
}

fn path() -> Option<&'static std::path::Path> {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var_os("QSCRIPT_TRACE")
            .filter(|v| !v.is_empty())
            .map(Into::into)
    })
    .as_deref()
}

/// Whether spans are recorded (`QSCRIPT_TRACE` is set).
pub fn enabled() -> bool {
    path().is_some()
}

/// A span being timed; it ends when dropped (after the work it covers was queued).
#[must_use = "a span ends when it is dropped"]
pub struct Span {
    #[cfg(feature = "cuda")]
    open: Option<cuda::Open>,
}

/// Starts a span of `dev`'s compute stream (nothing unless tracing, on a GPU).
pub fn span(name: impl FnOnce() -> String, dev: &Device) -> Span {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev
        && enabled()
    {
        return Span {
            open: cuda::open(Track::Compute, name(), d.cuda_stream()),
        };
    }
    let _ = (name, dev);
    Span {
        #[cfg(feature = "cuda")]
        open: None,
    }
}

/// Starts a span of another stream of a GPU (offload's copies).
#[cfg(feature = "cuda")]
pub(crate) fn span_on(
    track: Track,
    name: impl FnOnce() -> String,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Span {
    Span {
        open: enabled()
            .then(|| cuda::open(track, name(), stream.clone()))
            .flatten(),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(o) = self.open.take() {
            cuda::close(o);
        }
    }
}

/// One finished span, in milliseconds from the first span's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed {
    /// The stream it ran on.
    pub track: Track,
    /// What ran (`forward 3`, `copy out 224.0 MiB`).
    pub name: String,
    /// When it started.
    pub start_ms: f64,
    /// When it ended.
    pub end_ms: f64,
}

/// What a timeline says about overlap, and where the compute stream's time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Per kind of compute span (its name without the layer number: `forward`, `fwd.attention`),
    /// its total time and count, longest first. Spans nest (a block's forward holds its parts).
    pub by_name: Vec<(String, f64, usize)>,
    /// Spans in the timeline.
    pub spans: usize,
    /// The copies' time.
    pub copy_ms: f64,
    /// The part of the copies' time the compute stream was busy with a span.
    pub copy_overlapped_ms: f64,
    /// From the compute stream's first span's start to its last one's end.
    pub compute_window_ms: f64,
    /// The time within that window covered by no compute span.
    pub compute_idle_ms: f64,
}

impl Summary {
    /// The compute spans' kinds as lines: `name  total ms  count`.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (n, ms, k) in &self.by_name {
            let _ = writeln!(out, "{n:24} {ms:10.1} ms {k:6} spans");
        }
        out
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
        write!(
            f,
            "{} spans; copies {:.1} ms, {:.1}% of it beside compute work; compute stream idle \
             {:.2} ms of {:.1} ms ({:.2}%) between its spans",
            self.spans,
            self.copy_ms,
            pct(self.copy_overlapped_ms, self.copy_ms),
            self.compute_idle_ms,
            self.compute_window_ms,
            pct(self.compute_idle_ms, self.compute_window_ms)
        )
    }
}

/// Sums up spans: the union of the compute spans, the copies' time inside it, its gaps.
pub fn summarize(spans: &[Timed]) -> Summary {
    let mut compute: Vec<(f64, f64)> = spans
        .iter()
        .filter(|s| s.track == Track::Compute)
        .map(|s| (s.start_ms, s.end_ms.max(s.start_ms)))
        .collect();
    compute.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut union: Vec<(f64, f64)> = Vec::new();
    for (a, b) in compute {
        match union.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => union.push((a, b)),
        }
    }
    let busy: f64 = union.iter().map(|(a, b)| b - a).sum();
    let window = match (union.first(), union.last()) {
        (Some(f), Some(l)) => l.1 - f.0,
        _ => 0.0,
    };
    let (mut copy, mut overlapped) = (0.0, 0.0);
    for s in spans.iter().filter(|s| s.track == Track::Copy) {
        let (a, b) = (s.start_ms, s.end_ms.max(s.start_ms));
        copy += b - a;
        overlapped += union
            .iter()
            .map(|(u0, u1)| (b.min(*u1) - a.max(*u0)).max(0.0))
            .sum::<f64>();
    }
    let mut by_name: Vec<(String, f64, usize)> = Vec::new();
    for s in spans.iter().filter(|s| s.track == Track::Compute) {
        let kind = s
            .name
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ');
        let dt = (s.end_ms - s.start_ms).max(0.0);
        match by_name.iter_mut().find(|(n, _, _)| n == kind) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => by_name.push((kind.to_string(), dt, 1)),
        }
    }
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    Summary {
        by_name,
        spans: spans.len(),
        copy_ms: copy,
        copy_overlapped_ms: overlapped,
        compute_window_ms: window,
        compute_idle_ms: (window - busy).max(0.0),
    }
}

/// The spans as a Chrome trace (JSON).
pub fn chrome_trace(spans: &[Timed]) -> serde_json::Value {
    let mut events: Vec<serde_json::Value> = [Track::Compute, Track::Copy]
        .iter()
        .map(|t| {
            serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": t.id(),
                "args": {"name": t.label()}})
        })
        .collect();
    events.extend(spans.iter().map(|s| {
        serde_json::json!({"name": s.name, "ph": "X", "pid": 1, "tid": s.track.id(),
            "ts": s.start_ms * 1e3, "dur": (s.end_ms - s.start_ms).max(0.0) * 1e3})
    }));
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// Drops the spans recorded so far (a benchmark's warm-up steps).
pub fn clear() {
    #[cfg(feature = "cuda")]
    cuda::clear();
}

/// Waits for the recorded spans, writes the trace to `QSCRIPT_TRACE` and returns its summary;
/// `None` when tracing is off or nothing was recorded. The spans are cleared.
pub fn finish() -> crate::Result<Option<Summary>> {
    let Some(path) = path() else {
        return Ok(None);
    };
    #[cfg(feature = "cuda")]
    let spans = cuda::take()?;
    #[cfg(not(feature = "cuda"))]
    let spans: Vec<Timed> = Vec::new();
    if spans.is_empty() {
        return Ok(None);
    }
    let text = chrome_trace(&spans).to_string();
    std::fs::write(path, text).map_err(|source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(summarize(&spans)))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, sys};

    use super::{Timed, Track};

    /// Spans kept at most (a long run's first ones; the rest are not recorded).
    const MAX_SPANS: usize = 200_000;

    pub(super) struct Open {
        track: Track,
        name: String,
        stream: Arc<CudaStream>,
        start: CudaEvent,
    }

    struct Done {
        track: Track,
        name: String,
        start: CudaEvent,
        end: CudaEvent,
    }

    fn done() -> std::sync::MutexGuard<'static, Vec<Done>> {
        static DONE: OnceLock<Mutex<Vec<Done>>> = OnceLock::new();
        DONE.get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn timed(stream: &CudaStream) -> Option<CudaEvent> {
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }

    pub(super) fn open(track: Track, name: String, stream: Arc<CudaStream>) -> Option<Open> {
        if done().len() >= MAX_SPANS {
            return None;
        }
        let start = timed(&stream)?;
        Some(Open {
            track,
            name,
            stream,
            start,
        })
    }

    pub(super) fn close(o: Open) {
        if let Some(end) = timed(&o.stream) {
            done().push(Done {
                track: o.track,
                name: o.name,
                start: o.start,
                end,
            });
        }
    }

    pub(super) fn clear() {
        done().clear();
    }

    pub(super) fn take() -> crate::Result<Vec<Timed>> {
        let spans = std::mem::take(&mut *done());
        let Some(origin) = spans.first().map(|d| &d.start) else {
            return Ok(Vec::new());
        };
        let ms = |e: &CudaEvent| {
            origin.elapsed_ms(e).map(f64::from).map_err(|e| {
                crate::Error::from(candle_core::Error::Msg(format!(
                    "timing the trace's spans: {e:?}"
                )))
            })
        };
        spans
            .iter()
            .map(|d| {
                Ok(Timed {
                    track: d.track,
                    name: d.name.clone(),
                    start_ms: ms(&d.start)?,
                    end_ms: ms(&d.end)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(track: Track, a: f64, b: f64) -> Timed {
        Timed {
            track,
            name: String::new(),
            start_ms: a,
            end_ms: b,
        }
    }

    #[test]
    fn the_summary_counts_overlap_and_gaps() {
        let spans = [
            s(Track::Compute, 0.0, 4.0),
            s(Track::Compute, 3.0, 6.0),
            // a gap of 2 ms
            s(Track::Compute, 8.0, 10.0),
            // half inside the first union, half in the gap
            s(Track::Copy, 5.0, 7.0),
            // all inside
            s(Track::Copy, 8.5, 9.5),
        ];
        let sum = summarize(&spans);
        assert_eq!(sum.spans, 5);
        assert!((sum.compute_window_ms - 10.0).abs() < 1e-9);
        assert!((sum.compute_idle_ms - 2.0).abs() < 1e-9);
        assert!((sum.copy_ms - 3.0).abs() < 1e-9);
        assert!((sum.copy_overlapped_ms - 2.0).abs() < 1e-9);
        let trace = chrome_trace(&spans);
        let events = trace["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 2 + 5);
        assert_eq!(events[2]["dur"], 4000.0);
        assert!(sum.to_string().contains("66.7% of it beside compute work"));
        // Kinds of compute spans, the layer number dropped, longest first.
        let named = [
            Timed {
                name: "forward 0".into(),
                ..s(Track::Compute, 0.0, 2.0)
            },
            Timed {
                name: "forward 12".into(),
                ..s(Track::Compute, 2.0, 5.0)
            },
            Timed {
                name: "fwd.attention".into(),
                ..s(Track::Compute, 2.5, 3.0)
            },
        ];
        let sum = summarize(&named);
        assert_eq!(
            sum.by_name,
            vec![("forward".into(), 5.0, 2), ("fwd.attention".into(), 0.5, 1)]
        );
        assert!(sum.table().starts_with("forward "));
    }

    #[test]
    fn without_a_gpu_spans_are_nothing() {
        let span = span(|| "x".into(), &Device::Cpu);
        drop(span);
        assert_eq!(summarize(&[]).spans, 0);
    }
}
