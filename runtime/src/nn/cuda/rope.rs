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
