//! Decoding's projections on CUDA (`gemv.cu`): for the few rows of a decode step, the products
//! with a block's weights as matrix-vector kernels that read each weight once, with what follows
//! each product done before it is written: q, k and v with their biases in one launch ([`many`]),
//! o and down with the residual added ([`residual`]), gate and up through SwiGLU ([`swiglu`]).
//! Inference only: nothing here is differentiated. Reference ops: [`crate::nn::decode`]'s, which
//! take these kernels where [`applies`] says so and as [`crate::nn::decode::kernels`] allows.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, ptx};

const PTX: Module = ptx!("gemv");

/// The most rows (tokens) a launch takes (`MAX_ROWS` in `gemv.cu`); more go to cuBLAS.
pub const MAX_ROWS: usize = 4;

/// Whether the kernels take `x` (`[rows, k]`) with `weights` (`[n, k]` each): 16-bit floats on
/// one GPU, at most [`MAX_ROWS`] rows, `k` a multiple of 8, every tensor contiguous and 16-byte
/// aligned.
pub fn applies(x: &Tensor, weights: &[&Tensor]) -> bool {
    let Ok((rows, k)) = x.dims2() else {
        return false;
    };
    let aligned = |t: &Tensor| {
        t.device().same_device(x.device()) && addr(t, "x").is_ok_and(|(p, _)| p.is_multiple_of(16))
    };
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && (1..=MAX_ROWS).contains(&rows)
        && k.is_multiple_of(8)
        && aligned(x)
        && weights
            .iter()
            .all(|w| w.dtype() == x.dtype() && w.dims2().is_ok_and(|(_, wk)| wk == k) && aligned(w))
}

/// `splits` warps an output feature, 8 warps a block.
fn grid(features: usize, splits: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((features * splits).div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels' two forms (see `gemv.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `gemv_many`, up to [`MAX_ROWS`] rows: q/k/v (22.2 us for a 7B's at one row, H100).
    Measured,
    /// `gemv_lean_sS`: one row, `S` warps a feature (1, 2 or 4: split K).
    Lean(usize),
}

/// How many warps share a feature's weight row of `k` values in the lean form: rows of more
/// than 8,192 values (down_proj's) are split in four, so each warp reads at most a few thousand
/// values and the launch has more, shorter pieces of work.
pub fn splits(k: usize) -> usize {
    match k {
        0..=8192 => 1,
        _ => 4,
    }
}

/// The lean kernel of `base` split `splits` ways, for `x` `[rows, k]`: one row only.
fn lean(base: &str, x: &Tensor, splits: usize) -> Result<&'static str> {
    let rows = x.dim(0)?;
    if rows != 1 {
        candle_core::bail!("{base}: the lean form takes one row, not {rows}");
    }
    Ok(match (base, splits) {
        ("gemv_lean", 1) => "gemv_lean_s1",
        ("gemv_lean", 2) => "gemv_lean_s2",
        ("gemv_lean", 4) => "gemv_lean_s4",
        ("gemv_residual", 1) => "gemv_residual_s1",
        ("gemv_residual", 2) => "gemv_residual_s2",
        ("gemv_residual", 4) => "gemv_residual_s4",
        ("gemv_swiglu", 1) => "gemv_swiglu_s1",
        ("gemv_swiglu", 2) => "gemv_swiglu_s2",
        ("gemv_swiglu", 4) => "gemv_swiglu_s4",
        _ => candle_core::bail!("{base}: split {splits} ways (1, 2 or 4)"),
    })
}

/// `x W_i^T + b_i` for each of up to three `(W_i, b_i)`, in one launch (`x` `[rows, k]` ->
/// `[rows, n_i]` each). The caller checked [`applies`].
pub fn many(x: &Tensor, ws: &[(&Tensor, Option<&Tensor>)], form: Form) -> Result<Vec<Tensor>> {
    if ws.is_empty() || ws.len() > 3 {
        candle_core::bail!("gemv many: 1 to 3 weights, not {}", ws.len());
    }
    let (rows, k) = x.dims2()?;
    let (px, dev) = addr(x, "x")?;
    let mut outs = Vec::with_capacity(ws.len());
    let mut args = vec![Arg::from(px), Arg::I32(rows as i32), Arg::from(k as u64)];
    let mut features = 0;
    // The biases as the kernel reads them, alive until it is launched.
    let biases = ws
        .iter()
        .map(|(_, b)| b.map(Tensor::contiguous).transpose())
        .collect::<Result<Vec<_>>>()?;
    for (w, b) in ws.iter().map(|(w, _)| w).zip(&biases) {
        let n = w.dims2()?.0;
        if let Some(b) = b
            && (b.dims() != [n] || b.dtype() != x.dtype())
        {
            candle_core::bail!("gemv many: bias {:?} for {n} features", b.dims());
        }
        let y = empty(&dev, &[rows, n], x.dtype())?;
        let pb = match b {
            Some(b) => addr(b, "bias")?.0,
            None => 0,
        };
        args.extend([
            Arg::from(addr(w, "weight")?.0),
            Arg::from(pb),
            Arg::from(addr(&y, "y")?.0),
            Arg::from(n as u64),
        ]);
        features += n;
        outs.push(y);
    }
    // The kernel takes three; the ones not given have no features.
    for _ in ws.len()..3 {
        args.extend([Arg::U64(0), Arg::U64(0), Arg::U64(0), Arg::U64(0)]);
    }
    let (name, splits) = match form {
        Form::Measured => ("gemv_many", 1),
        Form::Lean(s) => (lean("gemv_lean", x, s)?, s),
    };
    launch(&dev, &PTX, name, x.dtype(), grid(features, splits), &args)?;
    Ok(outs)
}

/// `res + x W^T` (`x` `[1, k]`, `W` `[n, k]`, `res` `[1, n]`), `splits` warps a feature. The
/// caller checked [`applies`].
pub fn residual(x: &Tensor, w: &Tensor, res: &Tensor, splits: usize) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let n = w.dims2()?.0;
    if res.dims() != [rows, n] || res.dtype() != x.dtype() {
        candle_core::bail!("gemv residual: {:?} onto [{rows}, {n}]", res.dims());
    }
    let res = res.contiguous()?;
    let (px, dev) = addr(x, "x")?;
    let y = empty(&dev, &[rows, n], x.dtype())?;
    let args = [
        Arg::from(px),
        Arg::from(k as u64),
        Arg::from(addr(w, "weight")?.0),
        Arg::from(n as u64),
        Arg::from(addr(&res, "res")?.0),
        Arg::from(addr(&y, "y")?.0),
    ];
    launch(
        &dev,
        &PTX,
        lean("gemv_residual", x, splits)?,
        x.dtype(),
        grid(n, splits),
        &args,
    )?;
    Ok(y)
}

/// `silu(x Wg^T) * (x Wu^T)` (`x` `[1, k]`, `Wg` and `Wu` `[n, k]` -> `[1, n]`), `splits` warps a
/// feature. The caller checked [`applies`].
pub fn swiglu(x: &Tensor, wg: &Tensor, wu: &Tensor, splits: usize) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let n = wg.dims2()?.0;
    if wu.dims2()?.0 != n {
        candle_core::bail!("gemv swiglu: gate {:?}, up {:?}", wg.dims(), wu.dims());
    }
    let (px, dev) = addr(x, "x")?;
    let y = empty(&dev, &[rows, n], x.dtype())?;
    let args = [
        Arg::from(px),
        Arg::from(k as u64),
        Arg::from(addr(wg, "gate")?.0),
        Arg::from(addr(wu, "up")?.0),
        Arg::from(n as u64),
        Arg::from(addr(&y, "y")?.0),
    ];
    launch(
        &dev,
        &PTX,
        lean("gemv_swiglu", x, splits)?,
        x.dtype(),
        grid(n, splits),
        &args,
    )?;
    Ok(y)
}
