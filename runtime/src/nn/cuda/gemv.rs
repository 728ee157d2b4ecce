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

/// `warps` warps, 8 a block.
fn grid(warps: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (warps.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels' two forms (see `gemv.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `gemv_many`, up to [`MAX_ROWS`] rows: q/k/v (22.2 us for a 7B's at one row, H100).
    Measured,
    /// The lean kernels: one row.
    Lean(Lean),
}

/// How the lean form shares out a launch's work: `splits` warps a feature (1, 2 or 4: split K),
/// `features` consecutive features a warp (1 or 2: fewer warps, each with two rows' loads in
/// flight, so a launch of a few thousand features fits the GPU in one wave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lean {
    /// Warps a feature.
    pub splits: usize,
    /// Features a warp.
    pub features: usize,
}

impl Lean {
    /// One warp a feature, one feature a warp.
    pub const ONE: Lean = Lean {
        splits: 1,
        features: 1,
    };

    /// The warps for `n` features.
    fn warps(self, n: usize) -> usize {
        n.div_ceil(self.features) * self.splits
    }
}

/// RMSNorm folded into a lean product: the input row is normalized by `weight` (`[k]`, `eps`)
/// inside the kernel, bit for bit as `nn::ops::rms_norm` writes it, so the norm's own launch and
/// its output's round trip through memory are gone.
#[derive(Debug, Clone, Copy)]
pub struct Norm<'a> {
    /// The norm's weight.
    pub weight: &'a Tensor,
    /// `rms_norm_eps`.
    pub eps: f64,
}

/// Whether the lean kernels take `weight` as the RMSNorm of `x` (`[rows, k]`) folded in: `[k]`,
/// `x`'s dtype and device, contiguous and 16-byte aligned.
pub fn norm_fits(weight: &Tensor, x: &Tensor) -> bool {
    x.dims2().is_ok_and(|(_, k)| weight.dims() == [k])
        && weight.dtype() == x.dtype()
        && weight.device().same_device(x.device())
        && addr(weight, "norm").is_ok_and(|(p, _)| p.is_multiple_of(16))
}

/// The norm's kernel arguments: the weight's address (0: none), eps, and the threads
/// `rms_norm`'s launch gives a row of `k` values (the kernel sums the squares in its order).
fn norm_args(norm: Option<Norm>, x: &Tensor, k: usize) -> Result<[Arg; 3]> {
    let Some(n) = norm else {
        return Ok([Arg::U64(0), Arg::F32(0.0), Arg::I32(0)]);
    };
    if !norm_fits(n.weight, x) {
        candle_core::bail!("gemv: norm weight {:?} for rows of {k}", n.weight.dims());
    }
    let threads = super::launch::rows_grid(1, k).block_dim.0;
    Ok([
        Arg::from(addr(n.weight, "norm")?.0),
        Arg::F32(n.eps as f32),
        Arg::I32(threads as i32),
    ])
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

/// The lean kernel `base` for `shape`, for `x` `[rows, k]`: one row only.
fn lean(base: &str, x: &Tensor, shape: Lean) -> Result<&'static str> {
    let rows = x.dim(0)?;
    if rows != 1 {
        candle_core::bail!("{base}: the lean form takes one row, not {rows}");
    }
    Ok(match (base, shape.splits, shape.features) {
        ("gemv_lean", 1, 1) => "gemv_lean_s1_f1",
        ("gemv_lean", 2, 1) => "gemv_lean_s2_f1",
        ("gemv_lean", 4, 1) => "gemv_lean_s4_f1",
        ("gemv_lean", 1, 2) => "gemv_lean_s1_f2",
        ("gemv_lean", 2, 2) => "gemv_lean_s2_f2",
        ("gemv_lean", 4, 2) => "gemv_lean_s4_f2",
        ("gemv_residual", 1, 1) => "gemv_residual_s1_f1",
        ("gemv_residual", 2, 1) => "gemv_residual_s2_f1",
        ("gemv_residual", 4, 1) => "gemv_residual_s4_f1",
        ("gemv_residual", 1, 2) => "gemv_residual_s1_f2",
        ("gemv_residual", 2, 2) => "gemv_residual_s2_f2",
        ("gemv_residual", 4, 2) => "gemv_residual_s4_f2",
        ("gemv_swiglu", 1, 1) => "gemv_swiglu_s1",
        ("gemv_swiglu", 2, 1) => "gemv_swiglu_s2",
        ("gemv_swiglu", 4, 1) => "gemv_swiglu_s4",
        (_, s, f) => {
            candle_core::bail!("{base}: split {s} ways (1, 2 or 4), {f} features a warp (1 or 2)")
        }
    })
}

/// `h W_i^T + b_i` for each of up to three `(W_i, b_i)`, in one launch (`x` `[rows, k]` ->
/// `[rows, n_i]` each), `h` = `x` or, with `norm` (the lean form only), its RMSNorm. The caller
/// checked [`applies`].
pub fn many(
    x: &Tensor,
    ws: &[(&Tensor, Option<&Tensor>)],
    form: Form,
    norm: Option<Norm>,
) -> Result<Vec<Tensor>> {
    if ws.is_empty() || ws.len() > 3 {
        candle_core::bail!("gemv many: 1 to 3 weights, not {}", ws.len());
    }
    let (rows, k) = x.dims2()?;
    let (px, dev) = addr(x, "x")?;
    let mut outs = Vec::with_capacity(ws.len());
    let mut args = vec![Arg::from(px)];
    match form {
        Form::Measured if norm.is_some() => {
            candle_core::bail!("gemv many: the measured form takes no norm")
        }
        Form::Measured => args.push(Arg::I32(rows as i32)),
        Form::Lean(_) => args.extend(norm_args(norm, x, k)?),
    }
    args.push(Arg::from(k as u64));
    let per_warp = match form {
        Form::Measured => 1,
        Form::Lean(l) => l.features,
    };
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
        if !n.is_multiple_of(per_warp) {
            candle_core::bail!("gemv many: {n} features, {per_warp} a warp");
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
    let (name, warps) = match form {
        Form::Measured => ("gemv_many", features),
        Form::Lean(l) => (lean("gemv_lean", x, l)?, l.warps(features)),
    };
    launch(&dev, &PTX, name, x.dtype(), grid(warps), &args)?;
    Ok(outs)
}

/// `res + x W^T` (`x` `[1, k]`, `W` `[n, k]`, `res` `[1, n]`) in the lean form `shape`. The
/// caller checked [`applies`].
pub fn residual(x: &Tensor, w: &Tensor, res: &Tensor, shape: Lean) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let n = w.dims2()?.0;
    if res.dims() != [rows, n] || res.dtype() != x.dtype() || !n.is_multiple_of(shape.features) {
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
        lean("gemv_residual", x, shape)?,
        x.dtype(),
        grid(shape.warps(n)),
        &args,
    )?;
    Ok(y)
}

/// `silu(h Wg^T) * (h Wu^T)` (`x` `[1, k]`, `Wg` and `Wu` `[n, k]` -> `[1, n]`), `h` = `x` or,
/// with `norm`, its RMSNorm; `splits` warps a feature. The caller checked [`applies`].
pub fn swiglu(
    x: &Tensor,
    wg: &Tensor,
    wu: &Tensor,
    splits: usize,
    norm: Option<Norm>,
) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let n = wg.dims2()?.0;
    if wu.dims2()?.0 != n {
        candle_core::bail!("gemv swiglu: gate {:?}, up {:?}", wg.dims(), wu.dims());
    }
    let (px, dev) = addr(x, "x")?;
    let y = empty(&dev, &[rows, n], x.dtype())?;
    let [pg, eps, threads] = norm_args(norm, x, k)?;
    let args = [
        Arg::from(px),
        pg,
        eps,
        threads,
        Arg::from(k as u64),
        Arg::from(addr(wg, "gate")?.0),
        Arg::from(addr(wu, "up")?.0),
        Arg::from(n as u64),
        Arg::from(addr(&y, "y")?.0),
    ];
    let shape = Lean {
        splits,
        features: 1,
    };
    launch(
        &dev,
        &PTX,
        lean("gemv_swiglu", x, shape)?,
        x.dtype(),
        grid(shape.warps(n)),
        &args,
    )?;
    Ok(y)
}
