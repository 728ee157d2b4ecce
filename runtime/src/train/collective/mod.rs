//! The ranks of a run, as the training loop sees them: one [`Collective`] handed to the trainer.
//! [`Single`] is one process (or, in `qscript check --nproc-per-node N`, the plan of N ranks that
//! never meet); [`Ranks`] is a data-parallel group whose sums travel through the host over TCP,
//! or through NCCL on the GPUs when every rank has it. The gradient sum of a step
//! ([`grad_sum`]) and ZeRO's shards and gathers ([`zero`]) live here, so the loop and the plan
//! hold no transport, no `cfg(feature = "cuda")` and no process-wide group.

pub mod grad_sum;
pub mod zero;

use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{DType, Tensor};

use super::flat::DeviceParams;
use super::optim::DeviceAdamW;
use crate::Result;
use crate::dist::Group;
#[cfg(feature = "cuda")]
use crate::dist::nccl::Nccl;
use crate::model::Model;
pub use grad_sum::GradSum;

/// What the trainer needs of the ranks. Every rank calls each method at the same point of the
/// run (the sums are collective).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;

    /// Ranks in the run (the plan's batch is split over them).
    fn size(&self) -> usize;

    /// Whether this process writes (metrics, checkpoints, logs): rank 0.
    fn lead(&self) -> bool {
        self.rank() == 0
    }

    /// Whether `flag` is set on any rank.
    fn any(&self, flag: bool) -> Result<bool>;

    /// Rank 0's `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;

    /// `t` (a scalar) summed over the ranks, on `t`'s device.
    fn sum_scalar(&self, t: &Tensor) -> Result<Tensor>;

    /// `values` (host numbers, the same length on every rank) summed over the ranks in place.
    fn sum_values(&self, values: &mut [f32]) -> Result<()>;

    /// The sum of one step's gradients over the ranks (`None` for one process): laid out as
    /// `params`, for a model of `blocks` blocks, kept as this rank's share with `zero2`.
    fn grad_sum<'a>(
        &'a self,
        params: &DeviceParams,
        blocks: usize,
        zero2: bool,
    ) -> Result<Option<GradSum<'a>>>;

    /// This rank's share `[start, end)` of a buffer of `len` elements (ZeRO's shards).
    fn share(&self, len: usize) -> (usize, usize) {
        crate::dist::share(len, self.size(), self.rank())
    }

    /// ZeRO, after a step: every rank updated its share of the parameters (`opt`'s shards);
    /// each sends its share to the others so that every rank holds all of them.
    fn gather_shards(&self, params: &DeviceParams, opt: &DeviceAdamW) -> Result<()>;

    /// ZeRO: the whole moments (every rank's share summed into place), as an optimizer a
    /// checkpoint can save; `None` when they are not sharded.
    fn gather_moments(
        &self,
        params: &DeviceParams,
        opt: &DeviceAdamW,
    ) -> Result<Option<DeviceAdamW>>;
}

/// One process. It plans for `ranks` ranks (`qscript check --nproc-per-node N`), and sums
/// nothing: a real run of one process has one rank.
#[derive(Clone, Copy, Debug)]
pub struct Single {
    ranks: usize,
}

impl Single {
    /// A run of one process.
    pub fn new() -> Self {
        Self { ranks: 1 }
    }

    /// The plan of a run of `ranks` ranks, made by one process that computes nothing.
    pub fn planning(ranks: usize) -> Self {
        Self {
            ranks: ranks.max(1),
        }
    }
}

impl Default for Single {
    fn default() -> Self {
        Self::new()
    }
}

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        self.ranks
    }

    fn any(&self, flag: bool) -> Result<bool> {
        Ok(flag)
    }

    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }

    fn sum_scalar(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn sum_values(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn grad_sum<'a>(&'a self, _: &DeviceParams, _: usize, _: bool) -> Result<Option<GradSum<'a>>> {
        Ok(None)
    }

    fn gather_shards(&self, _: &DeviceParams, _: &DeviceAdamW) -> Result<()> {
        Ok(())
    }

    fn gather_moments(&self, _: &DeviceParams, _: &DeviceAdamW) -> Result<Option<DeviceAdamW>> {
        Ok(None)
    }
}

/// The data-parallel ranks of a run (see [`crate::dist`]): sums through the host over the TCP
/// group, or through NCCL when every rank has it and one GPU.
pub struct Ranks {
    group: Arc<Group>,
    #[cfg(feature = "cuda")]
    nccl: Option<Nccl>,
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ranks({} of {})", self.group.rank(), self.group.size())
    }
}

impl Ranks {
    /// The ranks of `group` training `model`: with NCCL when the model lies on one GPU and every
    /// rank has NCCL (each rank takes the same branch: the same recipe puts its model on a GPU).
    pub fn connect(group: Arc<Group>, model: &Model) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let nccl = match model.decoder.device() {
            Device::Cuda(d) if model.placement.is_none() => Nccl::connect(&group, d)?,
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = model;
        Ok(Self {
            group,
            #[cfg(feature = "cuda")]
            nccl,
        })
    }

    /// How the sums travel.
    fn via(&self) -> grad_sum::Via<'_> {
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl {
            return grad_sum::Via::Nccl(n);
        }
        grad_sum::Via::Host(&self.group)
    }
}

impl Collective for Ranks {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn size(&self) -> usize {
        self.group.size()
    }

    fn any(&self, flag: bool) -> Result<bool> {
        self.group.any(flag)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.group.broadcast(bytes)
    }

    fn sum_scalar(&self, t: &Tensor) -> Result<Tensor> {
        self.via().sum_scalar(t)
    }

    fn sum_values(&self, values: &mut [f32]) -> Result<()> {
        self.via().sum_values(values)
    }

    fn grad_sum<'a>(
        &'a self,
        params: &DeviceParams,
        blocks: usize,
        zero2: bool,
    ) -> Result<Option<GradSum<'a>>> {
        GradSum::new(&self.group, self.via(), params, blocks, zero2).map(Some)
    }

    fn gather_shards(&self, params: &DeviceParams, opt: &DeviceAdamW) -> Result<()> {
        if !zero::sharded(opt) {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return zero::broadcast_shards(nccl, &self.group, params);
        }
        zero::sum_shares_into_params(&self.group, params, opt)
    }

    fn gather_moments(
        &self,
        params: &DeviceParams,
        opt: &DeviceAdamW,
    ) -> Result<Option<DeviceAdamW>> {
        if !zero::sharded(opt) {
            return Ok(None);
        }
        zero::gather_moments(&self.group, params, opt).map(Some)
    }
}

/// The collective of a run started from this process's environment: this thread's group or the
/// one torchrun's variables describe (see [`crate::dist::group`]), else one process.
pub fn from_env(model: &Model) -> Result<Arc<dyn Collective>> {
    Ok(match crate::dist::group()? {
        Some(g) => Arc::new(Ranks::connect(g, model)?),
        None => Arc::new(Single::new()),
    })
}

/// A buffer of `len` elements (f32, on `share`'s device) from every rank's `share` of it, rank r's
/// at its own `start`: each rank contributes zeros elsewhere and the ranks sum.
fn sum_shares(g: &Group, len: usize, start: usize, share: &Tensor) -> Result<Tensor> {
    let mut host = vec![0f32; len];
    let mine = share.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    host[start..start + mine.len()].copy_from_slice(&mine);
    g.all_reduce_sum(&mut host)?;
    Ok(Tensor::from_vec(host, len, share.device())?)
}
