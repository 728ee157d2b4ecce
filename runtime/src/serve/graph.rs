//! A decode step as a CUDA graph: one client's token costs ~400 kernel launches, each with
//! candle's and the driver's host work and a gap on the GPU; a graph replays them in one launch.
//! Per span of slots (`lo`, rows) and model version, the step is run once eagerly with its inputs
//! in tensors of their own (the token ids, the cache's scatter index, the RoPE positions, the
//! key ranges) and with candle's cache of small host uploads on, then recorded; later steps copy
//! their inputs into those tensors and replay. Attention reads every slot's whole capacity,
//! bounded by the key ranges (`Decode::for_graph`), so nothing the host knows per step is baked
//! in. A model published again while served (a run that trains) is never recorded: its weights
//! change at every optimizer step. A recording that fails turns the graphs off for the process
//! (the eager step is the same computation).
//!
//! On unless `QSCRIPT_DECODE_GRAPH=0` (or [`set_enabled`]). GPU test:
//! `decode_graphs_give_the_eager_tokens`. Measured (H100, a 7B, one client, 128 tokens): 144.6
//! tokens/s with graphs against 135.9 without.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
use candle_core::{Device, Tensor};

use super::slots::{Decode, Slots, tables_on};
use crate::model::kv_cache::DecodeCache;
use crate::model::load::Model;
use crate::nn::AttnMask;

/// Graphs kept at most (spans of slots seen); past it the oldest is dropped.
const MAX_GRAPHS: usize = 16;

/// 0: not read yet; 1: off; 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);
/// Steps replayed from a recording in this process.
static REPLAYS: AtomicU64 = AtomicU64::new(0);

/// Whether decode steps may be recorded: [`set_enabled`], else not `QSCRIPT_DECODE_GRAPH=0`.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("QSCRIPT_DECODE_GRAPH").map_or(true, |v| v != "0");
            set_enabled(on);
            on
        }
    }
}

/// Turns recording on or off for the whole process (from the next step of each server).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Decode steps replayed from a recording so far in this process.
pub fn replays() -> u64 {
    REPLAYS.load(Ordering::Relaxed)
}

/// One recorded step and the tensors it reads and writes.
struct Recorded {
    ids: Tensor,
    index: Tensor,
    positions: Tensor,
    starts: Tensor,
    ends: Tensor,
    /// `[rows, vocab]`, written by each replay.
    logits: Tensor,
    graph: CudaGraph,
    /// The version recorded, kept alive while the graph reads its weights (dropped after it).
    _model: Arc<Model>,
    /// When it was last used (for dropping the oldest).
    used: u64,
}

/// The recorded steps of a server's engine thread, per model version and span (a graph is made,
/// replayed and dropped on the thread that recorded it).
#[derive(Default)]
struct Graphs {
    /// Per served model, span start and rows.
    recorded: HashMap<(usize, usize, usize), Recorded>,
    /// The version last seen per served model: one seen replaced is published by a run that
    /// trains.
    versions: HashMap<usize, Arc<Model>>,
    live: std::collections::HashSet<usize>,
    clock: u64,
    off: bool,
}

/// A cache that appends like the step it wraps but leaves the slots' lengths alone: a recording
/// runs nothing, and the eager run before it already advanced them.
struct NoAdvance<'a, 'b>(&'a mut Decode<'b>);

impl DecodeCache for NoAdvance<'_, '_> {
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.0.append(layer, k, v, offset)
    }

    fn advance(&mut self, _s: usize) {}

    fn rope_append(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
        self.0.rope_append(layer, q, k, v, cos, sin)
    }
}

fn u32s(v: &[u32], dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, v.len(), dev)
}

/// Copies `v` into `dst` (`[v.len()]` u32 or any shape of as many elements).
fn write(dst: &Tensor, v: &[u32]) -> candle_core::Result<()> {
    let src = u32s(v, dst.device())?.reshape(dst.shape())?;
    dst.slice_set(&src, 0, 0)
}

fn ranges_of(mask: &AttnMask, rows: usize) -> (Vec<u32>, Vec<u32>) {
    let r = mask
        .key_ranges
        .clone()
        .unwrap_or_else(|| vec![(0, 1); rows]);
    (
        r.iter().map(|x| x.0 as u32).collect(),
        r.iter().map(|x| x.1 as u32).collect(),
    )
}

thread_local! {
    static GRAPHS: std::cell::RefCell<Graphs> = std::cell::RefCell::new(Graphs::default());
}

/// The logits (`[rows, vocab]`) of the decode step over slots `lo..lo + live.len()` of `model`
/// (`key`: the served model's index; `ids`: each row's token), by replaying its recording, or by
/// running it eagerly and recording it; `None` when graphs do not apply (off, not on a GPU, a
/// model trained while served, a recording that failed before), and the caller runs the step.
pub fn step(
    key: usize,
    model: &Arc<Model>,
    slots: &mut Slots,
    lo: usize,
    live: &[bool],
    ids: &[u32],
) -> crate::Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    GRAPHS.with(|g| g.borrow_mut().step(key, model, slots, lo, live, ids))
}

impl Graphs {
    fn step(
        &mut self,
        key: usize,
        model: &Arc<Model>,
        slots: &mut Slots,
        lo: usize,
        live: &[bool],
        ids: &[u32],
    ) -> crate::Result<Option<Tensor>> {
        if self.off {
            return Ok(None);
        }
        let d = &model.decoder;
        let Device::Cuda(cuda) = d.device().clone() else {
            return Ok(None);
        };
        if d.blocks.iter().any(|b| !b.device().same_device(d.device())) {
            return Ok(None);
        }
        // A version replaced while served: its run trains, so nothing of it is recorded.
        if let Some(old) = self.versions.insert(key, model.clone())
            && !Arc::ptr_eq(&old, model)
        {
            self.live.insert(key);
            self.recorded.retain(|k, _| k.0 != key);
        }
        if self.live.contains(&key) {
            return Ok(None);
        }
        self.clock += 1;
        let rows = live.len();
        let id = (key, lo, rows);
        let capacity = slots.capacity();
        let mut cache = slots.decode(lo, live)?;
        let (starts, ends) = ranges_of(cache.mask(), rows);
        let pos = cache.positions().to_vec();
        if let Some(r) = self.recorded.get_mut(&id) {
            write(&r.ids, ids)?;
            write(&r.index, cache.index())?;
            write(&r.positions, &pos)?;
            write(&r.starts, &starts)?;
            write(&r.ends, &ends)?;
            r.graph
                .launch()
                .map_err(|e| candle_core::Error::Msg(format!("replaying a decode step: {e:?}")))?;
            cache.advance(1);
            r.used = self.clock;
            REPLAYS.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(r.logits.clone()));
        }
        // The step's inputs in tensors of their own, then the step run eagerly (its result is
        // this step's) with candle's uploads cached, then recorded.
        let dev = d.device();
        let ids = u32s(ids, dev)?.reshape((rows, 1))?;
        let index = u32s(cache.index(), dev)?;
        let index = index.reshape((index.dim(0)? / d.cfg.head_dim(), d.cfg.head_dim()))?;
        let positions = u32s(&pos, dev)?;
        let (st, en) = (u32s(&starts, dev)?, u32s(&ends, dev)?);
        let mask = cache.mask().clone();
        let host_ranges = mask.key_ranges.clone().unwrap_or_default();
        let _uploads = cuda.enable_cuda_graph_htod_cache();
        let mut cache = cache.for_graph(index.clone());
        let run = |c: &mut dyn DecodeCache| -> candle_core::Result<Tensor> {
            crate::nn::attention::with_ranges_in(&host_ranges, &st, &en, || {
                let tables = tables_on(d, &positions, capacity)?;
                let h = d.hidden_with(&ids, &mask, tables, Some(c), None)?;
                d.head(&h)?.squeeze(1)
            })
        };
        let logits = run(&mut cache)?;
        let stream = cuda.cuda_stream();
        let recorded = (|| -> candle_core::Result<(Tensor, CudaGraph)> {
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
            let out = run(&mut NoAdvance(&mut cache));
            let graph = stream.end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            let out = out?;
            match graph {
                Ok(Some(g)) => Ok((out, g)),
                Ok(None) => candle_core::bail!("the capture recorded nothing"),
                Err(e) => candle_core::bail!("{e:?}"),
            }
        })();
        match recorded {
            Ok((out, graph)) => {
                // Replayed at once with the same inputs (the cache's writes are the same values
                // at the same places): its logits are this step's, which checks the recording
                // and gives its output memory before anything may free it.
                graph.launch().map_err(|e| {
                    candle_core::Error::Msg(format!("replaying a decode step: {e:?}"))
                })?;
                if self.recorded.len() >= MAX_GRAPHS
                    && let Some(oldest) = self
                        .recorded
                        .iter()
                        .min_by_key(|(_, r)| r.used)
                        .map(|(k, _)| *k)
                {
                    self.recorded.remove(&oldest);
                }
                self.recorded.insert(
                    id,
                    Recorded {
                        ids,
                        index,
                        positions,
                        starts: st,
                        ends: en,
                        logits: out.clone(),
                        graph,
                        _model: model.clone(),
                        used: self.clock,
                    },
                );
                Ok(Some(out))
            }
            Err(e) => {
                self.off = true;
                crate::notice::say(format!(
                    "decode steps run without CUDA graphs: recording one failed ({e})"
                ));
                Ok(Some(logits))
            }
        }
    }
}
