//! Kernels that add into buffers that already exist, so a sum never needs a temporary: a gradient
//! into its f32 slot of the flat buffer, embedding rows into theirs, and dropout applied with its
//! mask drawn in place (never stored) on the way into its destination.

use candle_core::{DType, Result, Tensor};

use super::{Arg, addr, empty, launch, launch_1d, rows_grid};
use crate::nn::dropout::Key;

/// `dst += x` in place: `dst` a contiguous f32 buffer (a gradient slot), `x` any float dtype with
/// as many elements.
pub fn add_f32(dst: &Tensor, x: &Tensor) -> Result<()> {
    let n = x.elem_count();
    if dst.dtype() != DType::F32 || dst.elem_count() != n {
        candle_core::bail!(
            "add_f32: {:?} into {:?} {:?}",
            x.dims(),
            dst.dtype(),
            dst.dims()
        );
    }
    let x = x.contiguous()?;
    let (pd, dev) = addr(dst, "dst")?;
    let px = addr(&x, "x")?.0;
    launch(
        &dev,
        "acc_f32",
        x.dtype(),
        launch_1d(n),
        &[Arg::from(pd), Arg::from(px), Arg::from(n as u64)],
    )
}

/// Row `ids[r]` of `dst` (f32 `[vocab, h]`, contiguous) `+= x[r]` (`x` `[rows, h]`), in place.
pub fn scatter_rows_f32(dst: &Tensor, ids: &Tensor, x: &Tensor) -> Result<()> {
    let (rows, h) = x.dims2()?;
    let (vocab, dh) = dst.dims2()?;
    if dst.dtype() != DType::F32 || dh != h || ids.elem_count() != rows || ids.dtype() != DType::U32
    {
        candle_core::bail!(
            "scatter_rows_f32: {rows} rows of {h} into {vocab} x {dh}, {} ids",
            ids.elem_count()
        );
    }
    let (x, ids) = (x.contiguous()?, ids.contiguous()?);
    let (pd, dev) = addr(dst, "dst")?;
    let (pi, px) = (addr(&ids, "ids")?.0, addr(&x, "x")?.0);
    launch(
        &dev,
        "scatter_rows_f32",
        x.dtype(),
        launch_1d(rows * h),
        &[
            Arg::from(pd),
            Arg::from(pi),
            Arg::from(px),
            Arg::from(rows as u64),
            Arg::from(h as u64),
        ],
    )
}

/// `out = alpha * dropout(x)`, or with `into` given, `into += alpha * dropout(x)` in place (and
/// `into` returned): the mask of [`crate::nn::dropout::mask`] (same key, rows and values) drawn
/// inside the kernel.
pub fn dropout_axpy(
    x: &Tensor,
    p: f64,
    key: Key,
    row_elems: usize,
    alpha: f32,
    into: Option<Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (px, dev) = addr(&x, "x")?;
    let (out, acc) = match into {
        Some(t) if t.is_contiguous() && t.dims() == x.dims() && t.dtype() == x.dtype() => (t, 1),
        Some(t) => candle_core::bail!("dropout: adding {:?} into {:?}", x.dims(), t.dims()),
        None => (empty(&dev, x.dims(), x.dtype())?, 0),
    };
    let po = addr(&out, "out")?.0;
    let n = x.elem_count();
    launch(
        &dev,
        "dropout_axpy",
        x.dtype(),
        launch_1d(n),
        &[
            Arg::from(po),
            Arg::from(px),
            Arg::from(key.key),
            Arg::from(key.first_row),
            Arg::from(row_elems.max(1) as u64),
            Arg::from(p as f32),
            Arg::from((1.0 / (1.0 - p)) as f32),
            Arg::from(alpha),
            Arg::from(acc),
            Arg::from(n as u64),
        ],
    )?;
    Ok(out)
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
