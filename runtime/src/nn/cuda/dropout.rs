//! Dropout on CUDA (`dropout.cu`): the mask of a key, and dropout applied with its mask drawn
//! inside the kernel (never stored) on the way into its destination. Reference op:
//! [`crate::nn::dropout`] (`mask`, `apply` and `add_into` compute the same numbers on the CPU and
//! take these kernels on a GPU). A call's key comes as its two numbers (`Key::key`,
//! `Key::first_row`), so this module does not depend on the facade that calls it.

use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, ptx, rows_2d, vec_ok};

const PTX: Module = ptx!("dropout");

/// [`crate::nn::dropout::mask`] on the device: the mask keyed `key` for a batch whose first row
/// is window row `first_row`.
pub fn mask(
    dev: &CudaDevice,
    key: u64,
    first_row: u64,
    row_elems: u64,
    p: f32,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("dropout: unsupported dtype {dtype:?}");
    }
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p);
    let n64 = n as u64;
    // Every element is written by the kernel before the tensor is read.
    let out = empty(dev, shape, dtype)?;
    let po = addr(&out, "the dropout mask")?.0;
    launch(
        dev,
        &PTX,
        "dropout_mask",
        dtype,
        rows_2d(n, row_elems as usize),
        &[
            Arg::from(po),
            Arg::from(key),
            Arg::from(first_row),
            Arg::from(row_elems),
            Arg::from(p),
            Arg::from(keep),
            Arg::from(n64),
        ],
    )?;
    Ok(out)
}

/// `out = alpha * dropout(x)`, or with `into` given, `into += alpha * dropout(x)` in place (and
/// `into` returned): the mask of [`crate::nn::dropout::mask`] (same key, rows and values) drawn
/// inside the kernel (the call's key `key`, the batch's first window row `first_row`).
pub fn axpy(
    x: &Tensor,
    p: f64,
    key: u64,
    first_row: u64,
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
        &PTX,
        "dropout_axpy",
        x.dtype(),
        grid,
        &[
            Arg::from(po),
            Arg::from(px),
            Arg::from(key),
            Arg::from(first_row),
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
