//! The gradient sum of one step over the ranks, by buckets: the flat buffer's ranges that each
//! block finishes (its slots), and the rest (embedding, final norm, head). With NCCL a block's
//! range is summed as soon as the window's last backward leaves the block, on NCCL's own stream,
//! so the sum of block `i` runs while the GPU computes the backward of block `i - 1`; the rest
//! and the loss follow at the end, and the compute stream waits for all of it before the
//! optimizer reads the buffer. Through the host (no NCCL) the same buckets are summed at the end,
//! in the same order on every rank.

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::engine::BlockHook;
use super::flat::{DeviceGrads, DeviceParams, Slot};
use crate::Result;
use crate::dist::Group;

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
enum Via<'a> {
    /// Through the host, over the TCP group, at the end of the step.
    Host(&'a Group),
    /// NCCL on the GPU, block by block during the last backward.
    #[cfg(feature = "cuda")]
    Nccl(&'a crate::dist::nccl::Nccl),
}

/// One step's sum of the gradients (and loss) over the ranks. As a [`BlockHook`] on the window's
/// last pass it starts each block's sum (NCCL) when the block's backward is done; [`finish`]
/// sums what is left and leaves every buffer holding the ranks' total.
///
/// [`finish`]: GradSum::finish
pub struct GradSum<'a> {
    via: Via<'a>,
    buckets: Vec<Buckets>,
    /// The blocks whose sums have started (NCCL).
    #[cfg(feature = "cuda")]
    started: Vec<bool>,
}

impl<'a> GradSum<'a> {
    /// The sum over `group` of the buffers `params` lays out (a model of `blocks` blocks), through
    /// NCCL when given.
    pub fn new(
        group: &'a Group,
        #[cfg(feature = "cuda")] nccl: Option<&'a crate::dist::nccl::Nccl>,
        params: &DeviceParams,
        blocks: usize,
    ) -> Self {
        #[cfg(feature = "cuda")]
        let via = nccl.map_or(Via::Host(group), Via::Nccl);
        #[cfg(not(feature = "cuda"))]
        let via = Via::Host(group);
        Self {
            via,
            buckets: params
                .parts
                .iter()
                .map(|p| Buckets::new(&p.slots, blocks))
                .collect(),
            #[cfg(feature = "cuda")]
            started: vec![false; blocks],
        }
    }

    /// Sums what was not summed during the backward, and the loss (a scalar, replaced by the
    /// total); afterwards `bufs` hold the ranks' totals, ready for the optimizer.
    pub fn finish(self, bufs: &mut [Tensor], loss: &mut Tensor) -> Result<()> {
        match self.via {
            Via::Host(g) => {
                for (buf, b) in bufs.iter_mut().zip(&self.buckets) {
                    let mut host = buf.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    for r in b.by_block.iter().flatten().chain(&b.rest) {
                        g.all_reduce_sum(&mut host[r.clone()])?;
                    }
                    *buf = Tensor::from_vec(host, buf.shape(), buf.device())?;
                }
                let mut l = vec![loss.to_dtype(DType::F32)?.to_scalar::<f32>()?];
                g.all_reduce_sum(&mut l)?;
                *loss = Tensor::new(l[0], loss.device())?;
            }
            #[cfg(feature = "cuda")]
            Via::Nccl(n) => {
                let mut me = self;
                for i in 0..me.started.len() {
                    if !me.started[i] {
                        me.start_block(n, bufs, i)?;
                    }
                }
                for (buf, b) in bufs.iter().zip(&me.buckets) {
                    for r in &b.rest {
                        n.start_sum(buf, r.clone())?;
                    }
                }
                let l = loss.to_dtype(DType::F32)?.reshape(1)?.contiguous()?;
                n.start_sum(&l, 0..1)?;
                n.wait()?;
                *loss = l.reshape(())?;
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn start_block(
        &mut self,
        n: &crate::dist::nccl::Nccl,
        bufs: &[Tensor],
        i: usize,
    ) -> Result<()> {
        self.started[i] = true;
        for (buf, b) in bufs.iter().zip(&self.buckets) {
            for r in &b.by_block[i] {
                n.start_sum(buf, r.clone())?;
            }
        }
        Ok(())
    }
}

impl BlockHook for GradSum<'_> {
    fn after_backward(&mut self, layer: usize, grads: &mut DeviceGrads) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Via::Nccl(n) = self.via
            && layer < self.started.len()
        {
            let bufs: Vec<Tensor> = grads.parts.iter().map(|p| p.buf.clone()).collect();
            return self.start_block(n, &bufs, layer);
        }
        let _ = (layer, grads);
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
