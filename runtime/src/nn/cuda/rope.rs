//! Rotary position embedding on CUDA (`rope.cu`), forward and its transpose in one kernel.
//! Reference ops: [`crate::nn::ops::apply_rope`] and [`crate::nn::ops::rope_backward`]; the
//! dispatching ops [`crate::nn::ops::rope`] and [`crate::nn::ops::rope_bwd`] take this kernel on a
//! GPU.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{Result, Tensor};

use super::launch::{Arg, Module, addr, empty, first, launch, ptx};

const PTX: Module = ptx!("rope");

/// HF's rotary embedding of `x` `[b, s, h, d]` (any strides, `d` contiguous) with `cos`/`sin`
/// `[s, d]` or `[b, s, d]` (contiguous), or with `backward` its transpose; the result is a contiguous
/// `[b, s, h, d]`. One pass: the transposes around it in the composite op are never made.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    let st = x.stride();
    // One table for every row, or one per row (packed rows restart their positions).
    let per_row = cos.dims() == [b, s, d];
    if st[3] != 1 || d % 2 != 0 || !(per_row || cos.dims() == [s, d]) || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} (strides {st:?}) against tables {:?}",
            x.dims(),
            cos.dims()
        );
    }
    let (px, dev) = first(x, "x")?;
    let (pc, ps) = (addr(cos, "cos")?.0, addr(sin, "sin")?.0);
    let y = empty(&dev, &[b, s, h, d], x.dtype())?;
    let py = addr(&y, "y")?.0;
    let u = |v: usize| Arg::from(v as u64);
    launch(
        &dev,
        &PTX,
        "rope",
        x.dtype(),
        // A block per token, its threads over the token's pairs.
        LaunchConfig {
            grid_dim: ((b * s).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (if h * d / 2 >= 256 { 256 } else { 64 }, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::from(px),
            Arg::from(pc),
            Arg::from(ps),
            Arg::from(py),
            u(b),
            u(s),
            u(h),
            u(d),
            u(st[0]),
            u(st[1]),
            u(st[2]),
            u(s * h * d),
            u(h * d),
            u(d),
            u(if per_row { s * d } else { 0 }),
            Arg::from(i32::from(backward)),
        ],
    )?;
    Ok(y)
}

/// A decode step's RoPE and cache write in one launch: `q` `[b, 1, h, d]` and `k`, `v`
/// `[b, 1, kv, d]` (any strides, `d` contiguous; before RoPE), `cos`/`sin` `[b, 1, d]` (each
/// row's position); `k` roped and `v` copied into rows `index[r * kv + j, 0]` of `kc` and `vc`
/// (flat `[*, d]` caches, written in place; `index` `[b * kv, d]` u32, the cache's scatter index).
/// Returns `q` roped, a contiguous `[b, 1, h, d]`: as [`rope`] on `q` and `k` and the scatter.
#[allow(clippy::too_many_arguments)]
pub fn rope_append(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    index: &Tensor,
) -> Result<Tensor> {
    let (b, s, h, d) = q.dims4()?;
    let (kb, ks, kv, kd) = k.dims4()?;
    let ok = s == 1
        && ks == 1
        && kb == b
        && kd == d
        && v.dims() == k.dims()
        && d % 2 == 0
        && [q, k, v]
            .iter()
            .all(|t| t.stride()[3] == 1 && t.dtype() == q.dtype())
        && cos.dims() == [b, 1, d]
        && sin.dims() == [b, 1, d]
        && [kc, vc]
            .iter()
            .all(|c| c.dims2().is_ok_and(|(_, cd)| cd == d) && c.dtype() == q.dtype())
        && index.dims() == [b * kv, d]
        && index.dtype() == candle_core::DType::U32;
    if !ok {
        candle_core::bail!(
            "rope_append: q {:?}, k {:?}, v {:?}, tables {:?}, caches {:?}, index {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            cos.dims(),
            kc.dims(),
            index.dims()
        );
    }
    let (cos, sin, index) = (cos.contiguous()?, sin.contiguous()?, index.contiguous()?);
    let (pq, dev) = first(q, "q")?;
    let (pk, pv) = (first(k, "k")?.0, first(v, "v")?.0);
    let (pkc, pvc) = (addr(kc, "k cache")?.0, addr(vc, "v cache")?.0);
    let y = empty(&dev, &[b, 1, h, d], q.dtype())?;
    let u = |v: usize| Arg::from(v as u64);
    let (qs, ks, vs) = (q.stride(), k.stride(), v.stride());
    launch(
        &dev,
        &PTX,
        "rope_append",
        q.dtype(),
        LaunchConfig {
            grid_dim: ((b * (h + 2 * kv)).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (if d >= 128 { 64 } else { 32 }, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::from(pq),
            u(qs[0]),
            u(qs[2]),
            Arg::from(pk),
            u(ks[0]),
            u(ks[2]),
            Arg::from(pv),
            u(vs[0]),
            u(vs[2]),
            Arg::from(addr(&cos, "cos")?.0),
            Arg::from(addr(&sin, "sin")?.0),
            Arg::from(addr(&y, "y")?.0),
            Arg::from(pkc),
            Arg::from(pvc),
            Arg::from(addr(&index, "index")?.0),
            u(b),
            u(h),
            u(kv),
            u(d),
        ],
    )?;
    Ok(y)
}
