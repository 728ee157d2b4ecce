//! In-place adds on CUDA (`accumulate.cu`): kernels that add into buffers that already exist, so
//! a sum never needs a temporary: a gradient into its f32 slot of the flat buffer, embedding rows
//! into theirs, a result into another, a bias into a projection's output, and rows put back where
//! they were picked from. Reference ops: [`crate::nn::ops::add_into`],
//! [`crate::nn::ops::add_bias`] and [`crate::nn::ops::put_rows`] (plain candle adds), and the
//! composite adds of [`crate::train::flat`]'s gradient buffer, which take these kernels on a GPU.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, first, launch, launch_1d, ptx, rows_grid, vec_ok};

const PTX: Module = ptx!("accumulate");

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
        &PTX,
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
        &PTX,
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
        &PTX,
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
        &PTX,
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

/// Row `ids[r]` of `dst` (contiguous `[n, h]`) `= x[from[r]]` (`add`: `+=`; row `r` of `x`
/// when `from` is `None`; distinct ids) in place, and `dst` returned: rows put back where they
/// were picked from, or added there.
pub fn put_rows(
    dst: Tensor,
    ids: &Tensor,
    x: &Tensor,
    from: Option<&Tensor>,
    add: bool,
) -> Result<Tensor> {
    if ids.dtype() != DType::U32 || !ids.device().same_device(dst.device()) {
        candle_core::bail!("put_rows: {:?} ids on another device", ids.dtype());
    }
    rows(dst, Some(ids), x, from, ids.elem_count(), add)
}

/// Rows `from[r]` of `x` (`[n, h]`) as a new `[from.len(), h]` tensor: `index_select` on
/// dimension 0, 16 bytes a thread.
pub fn take_rows(x: &Tensor, from: &Tensor) -> Result<Tensor> {
    let (_, h) = x.dims2()?;
    let n = from.elem_count();
    let (_, dev) = first(x, "x")?;
    let dst = empty(&dev, &[n, h], x.dtype())?;
    rows(dst, None, x, Some(from), n, false)
}

/// [`put_rows`] and [`take_rows`]: `rows` rows of `x` (picked by `from`) into `dst` (at `ids`).
fn rows(
    dst: Tensor,
    ids: Option<&Tensor>,
    x: &Tensor,
    from: Option<&Tensor>,
    rows: usize,
    add: bool,
) -> Result<Tensor> {
    let (xrows, h) = x.dims2()?;
    let (_, dh) = dst.dims2()?;
    if dh != h
        || from.map_or(xrows, Tensor::elem_count) != rows
        || from.is_some_and(|f| f.dtype() != DType::U32 || !f.device().same_device(dst.device()))
        || x.dtype() != dst.dtype()
        || !x.device().same_device(dst.device())
    {
        candle_core::bail!(
            "put_rows: {rows} rows of {xrows} x {h} into {:?}",
            dst.dims()
        );
    }
    if rows == 0 {
        return Ok(dst);
    }
    let x = x.contiguous()?;
    let ids = ids.map(Tensor::contiguous).transpose()?;
    let from = from.map(Tensor::contiguous).transpose()?;
    let (pd, dev) = addr(&dst, "dst")?;
    let px = addr(&x, "x")?.0;
    let index = |t: &Option<Tensor>, what| match t {
        Some(t) => Ok(addr(t, what)?.0),
        None => Ok::<u64, candle_core::Error>(0),
    };
    let (pi, pf) = (index(&ids, "ids")?, index(&from, "from")?);
    launch(
        &dev,
        &PTX,
        "put_rows",
        x.dtype(),
        rows_grid(rows.min(1 << 20), h / 8),
        &[
            Arg::from(pd),
            Arg::from(pi),
            Arg::from(px),
            Arg::from(pf),
            Arg::from(rows as u64),
            Arg::from(h as u64),
            Arg::from(i32::from(add)),
            Arg::from(vec_ok(&[pd, px], h, x.dtype())),
        ],
    )?;
    Ok(dst)
}
