//! RMSNorm on CUDA (`rms_norm.cu`): the forward, `dx`, and the per-row terms of the weight
//! gradient (summed into its slot of the flat gradient buffer by a GEMM). Reference ops:
//! [`crate::nn::ops::rms_norm`] and [`crate::nn::ops::rms_norm_backward`], which take these
//! kernels on a GPU.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, ptx, rows_grid};

const PTX: Module = ptx!("rms_norm");

/// RMSNorm over the last dimension, HF's rounding.
pub fn rms_fwd(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = w.elem_count();
    let (px, dev) = addr(x, "x")?;
    let pw = addr(w, "weight")?.0;
    let y = empty(&dev, x.dims(), x.dtype())?;
    let py = addr(&y, "y")?.0;
    let d64 = d as u64;
    launch(
        &dev,
        &PTX,
        "rms_fwd",
        x.dtype(),
        rows_grid(x.elem_count() / d, d),
        &[
            Arg::from(px),
            Arg::from(pw),
            Arg::from(py),
            Arg::from(d64),
            Arg::from(eps),
        ],
    )?;
    Ok(y)
}

/// `dx` of [`rms_fwd`].
pub fn rms_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    let d = w.elem_count();
    let (px, dev) = addr(x, "x")?;
    let (pw, pg) = (addr(w, "weight")?.0, addr(dy, "dy")?.0);
    let dx = empty(&dev, x.dims(), x.dtype())?;
    let pdx = addr(&dx, "dx")?.0;
    let d64 = d as u64;
    launch(
        &dev,
        &PTX,
        "rms_bwd",
        x.dtype(),
        rows_grid(x.elem_count() / d, d),
        &[
            Arg::from(px),
            Arg::from(pw),
            Arg::from(pg),
            Arg::from(pdx),
            Arg::from(d64),
            Arg::from(eps),
        ],
    )?;
    Ok(dx)
}

/// The per-row terms `dy * T(xhat)` (f32 `[rows, d]`) of RMSNorm's weight gradient.
pub fn rms_dw_rows(x: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let (px, dev) = addr(&x, "x")?;
    let pg = addr(&dy, "dy")?.0;
    let out = empty(&dev, &[rows, d], DType::F32)?;
    let po = addr(&out, "out")?.0;
    launch(
        &dev,
        &PTX,
        "rms_dw_rows",
        x.dtype(),
        rows_grid(rows, d),
        &[
            Arg::from(px),
            Arg::from(pg),
            Arg::from(po),
            Arg::from(d as u64),
            Arg::from(eps),
        ],
    )?;
    Ok(out)
}
