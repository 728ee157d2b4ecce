//! ZeRO (DeepSpeed's stages 1 and 2): each rank keeps the optimizer moments of its share of the
//! parameters (`zero_stage: 1`), and with stage 2 only its share of the summed gradients too
//! (see [`super::grad_sum`]). After each step every rank has updated its share of the
//! parameters, and the ranks gather them; a checkpoint gathers the whole moments first.

use super::sum_shares;
use crate::dist::Group;
#[cfg(feature = "cuda")]
use crate::dist::nccl::Nccl;
use crate::train::flat::DeviceParams;
use crate::train::optim::{AdamW, AdamWConfig, DeviceAdamW};
use crate::{Error, Result};

/// Whether `opt`'s moments are sharded over the ranks.
pub fn sharded(opt: &DeviceAdamW) -> bool {
    opt.parts.iter().any(|o| o.shard.is_some())
}

/// The optimizer of a rank under ZeRO `stage` (1 or 2): the moments of its `share` of the
/// parameters only (one flat part: a model on one device).
pub fn optimizer(
    params: &DeviceParams,
    cfg: AdamWConfig,
    stage: usize,
    share: impl Fn(usize) -> (usize, usize),
) -> Result<DeviceAdamW> {
    let [part] = &params.parts[..] else {
        return Err(Error::InvalidArgument(format!(
            "`zero_stage: {stage}` with a model over several devices (`device_map`) is not supported yet"
        )));
    };
    Ok(DeviceAdamW {
        parts: vec![AdamW::over(part, cfg, Some(share(part.len())))?],
    })
}

/// Through the host: the ranks sum their shares (zeros elsewhere) so every rank holds all.
pub(super) fn sum_shares_into_params(
    g: &Group,
    params: &DeviceParams,
    opt: &DeviceAdamW,
) -> Result<()> {
    for (part, o) in params.parts.iter().zip(&opt.parts) {
        let Some((a, b)) = o.shard else { continue };
        let data = part.data.as_tensor();
        let mine = data.narrow(0, a, b - a)?;
        let full = sum_shares(g, part.len(), a, &mine)?.to_dtype(data.dtype())?;
        part.data.set(&full)?;
    }
    Ok(())
}

/// With NCCL: each rank's share broadcast from it.
#[cfg(feature = "cuda")]
pub(super) fn broadcast_shards(nccl: &Nccl, g: &Group, params: &DeviceParams) -> Result<()> {
    for part in &params.parts {
        let data = part.data.as_tensor();
        for r in 0..g.size() {
            let (a, b) = crate::dist::share(part.len(), g.size(), r);
            nccl.start_broadcast(data, a..b, r)?;
        }
    }
    nccl.wait()
}

/// The whole moments: every rank's share summed into place.
pub(super) fn gather_moments(
    g: &Group,
    params: &DeviceParams,
    opt: &DeviceAdamW,
) -> Result<DeviceAdamW> {
    let mut parts = Vec::with_capacity(opt.parts.len());
    for (part, o) in params.parts.iter().zip(&opt.parts) {
        let a = o.shard.map_or(0, |s| s.0);
        let (m, v) = o.moments()?;
        parts.push(o.with_moments(
            sum_shares(g, part.len(), a, &m)?,
            sum_shares(g, part.len(), a, &v)?,
        ));
    }
    Ok(DeviceAdamW { parts })
}
