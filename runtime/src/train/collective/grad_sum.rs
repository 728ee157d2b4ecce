//! The gradient sum of one step over the ranks, by buckets: the flat buffer's ranges that each
//! block finishes (its slots), and the rest (embedding, final norm, head). With NCCL a block's
//! range is summed as soon as the window's last backward leaves the block, on NCCL's own stream,
//! so the sum of block `i` runs while the GPU computes the backward of block `i - 1`; the rest
//! and the loss follow at the end, and the compute stream waits for all of it before the
//! optimizer reads the buffer. Through the host (no NCCL) the same buckets are summed at the end,
//! in the same order on every rank.
//!
//! ZeRO stage 2 keeps no whole gradient: each bucket has its own buffer, made when its block's
//! backward first writes it and summed into the ranks' shares (the optimizer's) as soon as every
//! pass's backward leaves the block (a reduce to each owner with NCCL), then let go (with NCCL
//! two buckets later, once the compute stream waits for its reduce). A rank holds its share of
//! the summed gradient, about three block buffers and the rest. Every rank sums the
//! same buckets in the same order: passes are not merged, and a rank with no examples in a
//! micro-batch sums zeros for it.

use std::ops::Range;
#[cfg(feature = "cuda")]
use std::{collections::HashMap, sync::Arc};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaEvent;
use candle_core::{DType, Tensor};

use crate::Result;
use crate::dist::Group;
#[cfg(feature = "cuda")]
use crate::dist::nccl::Nccl;
use crate::train::engine::BlockHook;
use crate::train::flat::{DeviceGrads, DeviceParams, Slot};

/// A flat buffer's ranges by the block whose backward completes them, and the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buckets {
    /// `by_block[i]`: block `i`'s ranges (adjacent slots merged).
    pub by_block: Vec<Vec<Range<usize>>>,
    /// Everything outside the blocks.
    pub rest: Vec<Range<usize>>,
}

/// The block of an HF / PEFT parameter name (`...layers.{i}....`), if any.
fn block_of(name: &str) -> Option<usize> {
    let (_, after) = name.split_once("layers.")?;
    after.split('.').next()?.parse().ok()
}

fn push(ranges: &mut Vec<Range<usize>>, r: Range<usize>) {
    match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => ranges.push(r),
    }
}

impl Buckets {
    /// The buckets of a buffer laid out by `slots`, for a model of `blocks` blocks.
    pub fn new(slots: &[Slot], blocks: usize) -> Self {
        let mut by_block = vec![Vec::new(); blocks];
        let mut rest = Vec::new();
        for s in slots.iter().filter(|s| !s.is_empty()) {
            let r = s.offset..s.offset + s.len();
            match block_of(&s.name).filter(|&i| i < blocks) {
                Some(i) => push(&mut by_block[i], r),
                None => push(&mut rest, r),
            }
        }
        Self { by_block, rest }
    }
}

/// How the ranks' sums travel.
#[derive(Clone, Copy)]
pub(super) enum Via<'a> {
    /// Through the host, over the TCP group.
    Host(&'a Group),
    /// NCCL on the GPU, on its own stream.
    #[cfg(feature = "cuda")]
    Nccl(&'a Nccl),
}

impl Via<'_> {
    /// `t` (a scalar) summed over the ranks, on `t`'s device; with NCCL the compute stream then
    /// waits for every operation NCCL has queued.
    pub(super) fn sum_scalar(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Via::Host(g) => {
                let mut v = vec![t.to_dtype(DType::F32)?.to_scalar::<f32>()?];
                g.all_reduce_sum(&mut v)?;
                Ok(Tensor::new(v[0], t.device())?)
            }
            #[cfg(feature = "cuda")]
            Via::Nccl(n) => {
                let l = t.to_dtype(DType::F32)?.reshape(1)?.contiguous()?;
                n.start_sum(&l, 0..1)?;
                n.wait()?;
                Ok(l.reshape(())?)
            }
        }
    }

    /// `values` summed over the ranks in place (one exchange).
    pub(super) fn sum_values(self, values: &mut [f32]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        match self {
            Via::Host(g) => g.all_reduce_sum(values),
            #[cfg(feature = "cuda")]
            Via::Nccl(n) => {
                let t = Tensor::from_slice(values, values.len(), &n.device())?;
                n.start_sum(&t, 0..values.len())?;
                n.wait()?;
                values.copy_from_slice(&t.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }
}

/// ZeRO stage 2's state for one step: this rank's share of the summed gradient.
struct Sharded {
    /// Every rank's share `[start, end)` of the layout (the optimizer's shards).
    shares: Vec<(usize, usize)>,
    rank: usize,
    /// This rank's share of the summed gradients, `[end - start]` f32.
    mine: Tensor,
    /// NCCL: the last bucket buffers reduced, each with the event after its reduces (a buffer
    /// is let go once the compute stream waits for its event, two buckets later: the free is
    /// then ordered after the reduce on the GPU, with no wait on the host), and the last reduce
    /// into `mine` of each bucket (by its start).
    #[cfg(feature = "cuda")]
    pending: std::collections::VecDeque<(Tensor, Arc<CudaEvent>)>,
    #[cfg(feature = "cuda")]
    last: HashMap<usize, Arc<CudaEvent>>,
}

/// One step's sum of the gradients (and loss) over the ranks. As a [`BlockHook`] it starts each
/// block's sum when the block's backward is done (on the window's last pass; under ZeRO stage 2
/// on every pass); [`finish`] sums what is left and gives the buffers the optimizer steps on.
///
/// [`finish`]: GradSum::finish
pub struct GradSum<'a> {
    via: Via<'a>,
    buckets: Vec<Buckets>,
    /// The blocks whose sums have started (NCCL, whole buffers).
    started: Vec<bool>,
    /// ZeRO stage 2.
    sharded: Option<Sharded>,
}

impl<'a> GradSum<'a> {
    /// The sum over `group` of the gradients `params` lays out (a model of `blocks` blocks),
    /// travelling `via`; with `zero2` (ZeRO stage 2, one device) kept as this rank's share.
    pub(super) fn new(
        group: &Group,
        via: Via<'a>,
        params: &DeviceParams,
        blocks: usize,
        zero2: bool,
    ) -> Result<Self> {
        let sharded = match (zero2, &params.parts[..]) {
            (false, _) => None,
            (true, [part]) => {
                let shares: Vec<_> = (0..group.size())
                    .map(|q| crate::dist::share(part.len(), group.size(), q))
                    .collect();
                let (a, b) = shares[group.rank()];
                Some(Sharded {
                    mine: Tensor::zeros(b - a, DType::F32, part.device())?,
                    shares,
                    rank: group.rank(),
                    #[cfg(feature = "cuda")]
                    pending: std::collections::VecDeque::new(),
                    #[cfg(feature = "cuda")]
                    last: HashMap::new(),
                })
            }
            (true, _) => {
                return Err(crate::Error::InvalidArgument(
                    "`zero_stage: 2` with a model over several devices (`device_map`) is not supported".into(),
                ));
            }
        };
        Ok(Self {
            via,
            buckets: params
                .parts
                .iter()
                .map(|p| Buckets::new(&p.slots, blocks))
                .collect(),
            started: vec![false; blocks],
            sharded,
        })
    }

    /// Fresh gradients for a window: one zeroed buffer per part, or (ZeRO stage 2) a buffer per
    /// bucket, each made when first written.
    pub fn grads<'p>(&self, params: &'p DeviceParams) -> Result<DeviceGrads<'p>> {
        match (&self.sharded, &params.parts[..], self.buckets.first()) {
            (Some(_), [part], Some(b)) => {
                let ranges = b
                    .by_block
                    .iter()
                    .flatten()
                    .chain(&b.rest)
                    .cloned()
                    .collect();
                Ok(DeviceGrads {
                    parts: vec![part.segmented_grads(ranges)],
                })
            }
            _ => params.zero_grads(),
        }
    }

    /// Whether every pass's backward sums its blocks (ZeRO stage 2), not only the window's last.
    pub fn every_pass(&self) -> bool {
        self.sharded.is_some()
    }

    /// ZeRO stage 2: the sums of a pass this rank has no examples for (zeros), so that every rank
    /// sums the same buckets in the same order.
    pub fn empty_pass(&mut self, grads: &mut DeviceGrads) -> Result<()> {
        for layer in (0..self.started.len()).rev() {
            self.after_backward(layer, grads)?;
        }
        Ok(())
    }

    /// Sums what was not summed during the backward, and the loss (a scalar, replaced by the
    /// total); returns the buffers the optimizer steps on: the ranks' totals per part, or (ZeRO
    /// stage 2) this rank's share of them.
    pub fn finish(mut self, mut grads: DeviceGrads, loss: &mut Tensor) -> Result<Vec<Tensor>> {
        if self.sharded.is_some() {
            let rest = self
                .buckets
                .first()
                .map(|b| b.rest.clone())
                .unwrap_or_default();
            for r in rest {
                let buf = take_or_zeros(&mut grads, &r)?;
                self.reduce(r, buf)?;
            }
            *loss = self.via.sum_scalar(loss)?;
            // The compute stream waited for every reduce (`sum_scalar`): the bucket buffers still
            // held may go.
            return Ok(self
                .sharded
                .take()
                .map(|sh| vec![sh.mine])
                .unwrap_or_default());
        }
        let mut bufs = grads
            .parts
            .into_iter()
            .map(crate::train::flat::FlatGrads::into_buffer)
            .collect::<Result<Vec<_>>>()?;
        match self.via {
            Via::Host(g) => {
                for (buf, b) in bufs.iter_mut().zip(&self.buckets) {
                    let mut host = buf.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    for r in b.by_block.iter().rev().flatten().chain(&b.rest) {
                        g.all_reduce_sum(&mut host[r.clone()])?;
                    }
                    *buf = Tensor::from_vec(host, buf.shape(), buf.device())?;
                }
            }
            #[cfg(feature = "cuda")]
            Via::Nccl(n) => {
                // In the backward's order (the last block first), as a rank whose last pass
                // started them did.
                for i in (0..self.started.len()).rev() {
                    if !self.started[i] {
                        self.start_block(n, &bufs, i)?;
                    }
                }
                for (buf, b) in bufs.iter().zip(&self.buckets) {
                    for r in &b.rest {
                        n.start_sum(buf, r.clone())?;
                    }
                }
            }
        }
        *loss = self.via.sum_scalar(loss)?;
        Ok(bufs)
    }

    #[cfg(feature = "cuda")]
    fn start_block(&mut self, n: &Nccl, bufs: &[Tensor], i: usize) -> Result<()> {
        self.started[i] = true;
        for (buf, b) in bufs.iter().zip(&self.buckets) {
            for r in &b.by_block[i] {
                n.start_sum(buf, r.clone())?;
            }
        }
        Ok(())
    }

    /// ZeRO stage 2: the bucket `r` (its buffer `buf`) summed over the ranks into each owner's
    /// share: this rank's part of the sum is added to `mine`.
    fn reduce(&mut self, r: Range<usize>, buf: Tensor) -> Result<()> {
        let via = self.via;
        let Some(sh) = self.sharded.as_mut() else {
            return Ok(());
        };
        let (a, b) = sh.shares[sh.rank];
        let (lo, hi) = (r.start.max(a), r.end.min(b));
        match via {
            Via::Host(g) => {
                let mut host = buf.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                g.all_reduce_sum(&mut host)?;
                if lo < hi {
                    let part = Tensor::from_slice(
                        &host[lo - r.start..hi - r.start],
                        hi - lo,
                        sh.mine.device(),
                    )?;
                    let sum = sh.mine.narrow(0, lo - a, hi - lo)?.add(&part)?;
                    sh.mine.slice_set(&sum, 0, lo - a)?;
                }
            }
            #[cfg(feature = "cuda")]
            Via::Nccl(n) => {
                if lo < hi {
                    // This rank's running total goes into its own part of the bucket, and the
                    // reduce to this rank then writes the new total over it.
                    if let Some(e) = sh.last.get(&r.start) {
                        n.compute_waits(e)?;
                    }
                    crate::nn::cuda::accumulate::add_f32(
                        &buf.narrow(0, lo - r.start, hi - lo)?,
                        &sh.mine.narrow(0, lo - a, hi - lo)?,
                    )?;
                }
                for (q, &(qa, qb)) in sh.shares.iter().enumerate() {
                    let (l, h) = (r.start.max(qa), r.end.min(qb));
                    if l < h {
                        let into = (q == sh.rank).then(|| (&sh.mine, l - a));
                        n.start_reduce(&buf, l - r.start..h - r.start, into, q)?;
                    }
                }
                let done = Arc::new(n.record()?);
                sh.pending.push_back((buf, done.clone()));
                sh.last.insert(r.start, done);
                while sh.pending.len() > 2 {
                    if let Some((old, e)) = sh.pending.pop_front() {
                        n.compute_waits(&e)?;
                        drop(old);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The buffer of the bucket `r` (zeros when nothing wrote it).
fn take_or_zeros(grads: &mut DeviceGrads, r: &Range<usize>) -> Result<Tensor> {
    let part = grads
        .parts
        .first_mut()
        .ok_or_else(|| crate::Error::InvalidArgument("no gradients".into()))?;
    match part.take(r.start) {
        Some(b) => Ok(b),
        None => Ok(Tensor::zeros(r.len(), DType::F32, part.device())?),
    }
}

impl Drop for GradSum<'_> {
    /// A step that ends early (an error) still leaves the compute stream behind NCCL's, so no
    /// buffer NCCL reads or writes is freed (stream-ordered) before it is done with it.
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Via::Nccl(n) = self.via {
            let _ = n.wait();
        }
    }
}

impl BlockHook for GradSum<'_> {
    fn after_backward(&mut self, layer: usize, grads: &mut DeviceGrads) -> Result<()> {
        if layer >= self.started.len() {
            return Ok(());
        }
        if self.sharded.is_some() {
            let ranges = self
                .buckets
                .first()
                .map(|b| b.by_block[layer].clone())
                .unwrap_or_default();
            for r in ranges {
                let buf = take_or_zeros(grads, &r)?;
                self.reduce(r, buf)?;
            }
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Via::Nccl(n) = self.via {
            let bufs: Vec<Tensor> = grads
                .parts
                .iter()
                .filter_map(|p| p.buffer().cloned())
                .collect();
            return self.start_block(n, &bufs, layer);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn slot(name: &str, offset: usize, len: usize) -> Slot {
        Slot {
            name: name.into(),
            offset,
            shape: candle_core::Shape::from(len),
            decay: true,
        }
    }

    #[test]
    fn buckets_tile_the_buffer_once_by_block() {
        let slots = [
            slot("model.embed_tokens.weight", 0, 10),
            slot(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                10,
                4,
            ),
            slot(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                14,
                4,
            ),
            slot("model.layers.1.mlp.up_proj.weight", 18, 6),
            slot("model.layers.10.mlp.up_proj.weight", 24, 2),
            slot("model.norm.weight", 26, 3),
            slot("lm_head.weight", 29, 5),
        ];
        let b = Buckets::new(&slots, 11);
        assert_eq!(b.by_block[0], vec![10..18]);
        assert_eq!(b.by_block[1], vec![18..24]);
        assert_eq!(b.by_block[10], vec![24..26]);
        assert!(b.by_block[2..10].iter().all(Vec::is_empty));
        assert_eq!(b.rest, vec![0..10, 26..34]);
        // A layer the model does not have (a wrong count) lands in the rest, still summed once.
        let b = Buckets::new(&slots, 2);
        assert_eq!(b.rest, vec![0..10, 24..34]);
        let mut seen = [0u8; 34];
        for r in b.by_block.iter().flatten().chain(&b.rest) {
            for i in r.clone() {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
