//! Kernels that add into buffers that already exist, so a sum never needs a temporary: a gradient
//! into its f32 slot of the flat buffer, embedding rows into theirs, and dropout applied with its
//! mask drawn in place (never stored) on the way into its destination.

use candle_core::{DType, Result, Tensor};

use super::{Arg, addr, empty, launch, launch_1d, rows_2d, rows_grid};
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

/// Whether 16-byte loads serve `ptrs` (all aligned) over rows of `width` elements of `dtype`.
fn vec_ok(ptrs: &[u64], width: usize, dtype: DType) -> i32 {
    let per = 16 / dtype.size_in_bytes();
    i32::from(width.is_multiple_of(per) && ptrs.iter().all(|p| p.is_multiple_of(16)))
}

/// `dst += x` in place (`dst` contiguous, `x` of its dtype and element count) and `dst` returned:
/// a sum without a new buffer, for a `dst` nothing else holds (a result just computed).
pub fn add_into(dst: Tensor, x: &Tensor) -> Result<Tensor> {
    let n = dst.elem_count();
    if x.elem_count() != n || x.dtype() != dst.dtype() || !x.device().same_device(dst.device()) {
        candle_core::bail!(
            "add_into: {:?} {:?} into {:?} {:?}",
            x.dtype(),
            x.dims(),
            dst.dtype(),
            dst.dims()
        );
    }
    let x = x.contiguous()?;
    let (pd, dev) = addr(&dst, "dst")?;
    let px = addr(&x, "x")?.0;
    launch(
        &dev,
        "add_into",
        dst.dtype(),
        launch_1d(n.div_ceil(16 / dst.dtype().size_in_bytes())),
        &[
            Arg::from(pd),
            Arg::from(px),
            Arg::from(n as u64),
            Arg::from(vec_ok(&[pd, px], n, dst.dtype())),
        ],
    )?;
    Ok(dst)
}

/// `y [.., d] += bias [d]` in place and `y` returned (`y` contiguous, nothing else holding it).
pub fn add_bias(y: Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = bias.elem_count();
    let n = y.elem_count();
    if y.dims().last() != Some(&d)
        || bias.dtype() != y.dtype()
        || !bias.device().same_device(y.device())
    {
        candle_core::bail!("add_bias: bias {:?} on {:?}", bias.dims(), y.dims());
    }
    let bias = bias.contiguous()?;
    let (py, dev) = addr(&y, "y")?;
    let pb = addr(&bias, "bias")?.0;
    let rows = n / d.max(1);
    launch(
        &dev,
        "bias_add",
        y.dtype(),
        rows_grid(rows.min(1 << 20), d / 8),
        &[
            Arg::from(py),
            Arg::from(pb),
            Arg::from(rows as u64),
            Arg::from(d as u64),
            Arg::from(vec_ok(&[py, pb], d, y.dtype())),
        ],
    )?;
    Ok(y)
}

/// Row `ids[r]` of `dst` (contiguous `[n, h]`) `= x[r]` (`[rows, h]`, distinct ids) in place, and
/// `dst` returned: rows put back where they were picked from.
pub fn put_rows(dst: Tensor, ids: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, h) = x.dims2()?;
    let (_, dh) = dst.dims2()?;
    if dh != h
        || ids.elem_count() != rows
        || ids.dtype() != DType::U32
        || x.dtype() != dst.dtype()
        || !x.device().same_device(dst.device())
        || !ids.device().same_device(dst.device())
    {
        candle_core::bail!(
            "put_rows: {rows} rows of {h} into {:?}, {} ids",
            dst.dims(),
            ids.elem_count()
        );
    }
    let (x, ids) = (x.contiguous()?, ids.contiguous()?);
    let (pd, dev) = addr(&dst, "dst")?;
    let (pi, px) = (addr(&ids, "ids")?.0, addr(&x, "x")?.0);
    launch(
        &dev,
        "put_rows",
        x.dtype(),
        rows_grid(rows.min(1 << 20), h),
        &[
            Arg::from(pd),
            Arg::from(pi),
            Arg::from(px),
            Arg::from(rows as u64),
            Arg::from(h as u64),
        ],
    )?;
    Ok(dst)
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
    let row_elems = row_elems.max(1);
    let vec = vec_ok(&[po, px], row_elems, x.dtype()) & i32::from(n.is_multiple_of(row_elems));
    let per = if vec == 1 {
        16 / x.dtype().size_in_bytes()
    } else {
        1
    };
    let mut grid = rows_2d(n, row_elems);
    grid.grid_dim.0 = grid.grid_dim.0.div_ceil(per as u32).max(1);
    launch(
        &dev,
        "dropout_axpy",
        x.dtype(),
        grid,
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
            Arg::from(vec),
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
