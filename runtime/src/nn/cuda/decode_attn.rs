//! Decoding's attention on CUDA (`decode_attn.cu`): one query position a row against the KV
//! cache, every head of every row in one launch (the composite path's GEMMs, softmax and copies
//! take five or more a layer). Inference only: nothing is saved for a backward. Reference op:
//! [`crate::nn::attention`]'s composite path, which takes this kernel where [`applies`] says so.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, empty, first, launch, ptx};
use crate::nn::AttnMask;

const PTX: Module = ptx!("decode_attn");

/// Whether the kernel takes `q` (`[b, heads, 1, d]`) against `k`/`v` (`[b, kv, t, d]`, any
/// strides but the last) under `mask`: one GPU, a float dtype, `d` 64, 128 or 256, heads a
/// multiple of the KV heads, each row's elements aligned for the kernel's vector loads, and a
/// mask of key ranges and a causal bound only (no packed rows, no shared prompt).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> bool {
    let (Ok((b, h, s, d)), Ok((kb, kv, t, kd))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    let epl = d / 32;
    let size = q.dtype().size_in_bytes();
    let rows_aligned = |x: &Tensor| {
        let stride = x.stride();
        stride[3] == 1
            && stride[..3].iter().all(|s| s.is_multiple_of(epl))
            && first(x, "x").is_ok_and(|(p, _)| p.is_multiple_of((epl * size) as u64))
            && x.device().same_device(q.device())
    };
    q.device().is_cuda()
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && s == 1
        && b < 65_536
        && matches!(d, 64 | 128 | 256)
        && (kb, kd) == (b, d)
        && v.dims() == k.dims()
        && kv > 0
        && h.is_multiple_of(kv)
        && t > 0
        && t < i32::MAX as usize
        && mask.segments.is_none()
        && mask.shared.is_none()
        && mask.key_ranges.as_ref().is_none_or(|r| r.len() == b)
        && q.is_contiguous()
        && rows_aligned(q)
        && rows_aligned(k)
        && rows_aligned(v)
}

/// `softmax(q k^T * scale + mask) v` for one query position a row, `[b, heads, 1, d]`. `ranges`:
/// the mask's key ranges uploaded (starts, ends, u32), when it has them. The caller checked
/// [`applies`].
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    ranges: Option<&(Tensor, Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (_, kv, t, _) = k.dims4()?;
    let (pq, dev) = first(q, "q")?;
    let (pk, _) = first(k, "k")?;
    let (pv, _) = first(v, "v")?;
    if k.stride() != v.stride() {
        candle_core::bail!("decode attention: keys and values lie differently");
    }
    let out = empty(&dev, &[b, h, 1, d], q.dtype())?;
    let (ps, pe) = match ranges {
        Some((s, e)) => (first(s, "starts")?.0, first(e, "ends")?.0),
        None => (0, 0),
    };
    // A causal query at absolute position `offset` sees the keys up to it.
    let limit = if mask.causal {
        (mask.offset + 1).min(t)
    } else {
        t
    };
    let stride = k.stride();
    let args = [
        Arg::from(pq),
        Arg::from(pk),
        Arg::from(pv),
        Arg::from(first(&out, "out")?.0),
        Arg::from(ps),
        Arg::from(pe),
        Arg::I32(h as i32),
        Arg::I32((h / kv) as i32),
        Arg::I32(t as i32),
        Arg::I32(limit as i32),
        Arg::from(stride[0] as u64),
        Arg::from(stride[1] as u64),
        Arg::from(stride[2] as u64),
        Arg::F32(scale as f32),
    ];
    let grid = LaunchConfig {
        grid_dim: (h as u32, b as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = match d / 32 {
        2 => "decode_attn2",
        4 => "decode_attn4",
        _ => "decode_attn8",
    };
    launch(&dev, &PTX, name, q.dtype(), grid, &args)?;
    Ok(out)
}
