//! A block's projections in decoding, grouped as a decode step runs them: q/k/v of one input
//! ([`projections`]), a projection added to the residual stream ([`residual`]: o, down), and
//! gate/up through SwiGLU ([`swiglu`]); and the LM head ([`product`]). Each function here is the
//! reference op (the projections one by one, then the bias, residual or SwiGLU, as the training
//! path computes them); on a GPU, for the few rows of a decode step, the dense weights go through
//! one matrix-vector kernel a group instead ([`crate::nn::cuda::gemv`]) where [`kernels`] allows
//! it. Adapters are added after the base product (q/k/v, o, down) or keep the group on the
//! reference path (gate/up: SwiGLU follows their sum). No dropout, no saved state: inference only.
//!
//! Measured (H100, `model_bench decode-ops`, Qwen2.5-7B's shapes): q/k/v 22.2 us as one kernel
//! against 57-87 us one by one at one row, 55 against 70-78 at four. At one row (a sequence
//! decoding alone, the latency that matters most) the lean form of the other groups beat cuBLAS:
//! o + residual 17.2 against 21.6 us, gate/up + SwiGLU 93.1 against 106.6, the LM head 348 against
//! 360; down (18,944 values a row) 62.3 against 55.1, hence its split K. At four rows the lean
//! form was 1.5-3x slower than cuBLAS, so with more rows those groups go to cuBLAS. One client
//! serving a 7B: 146.2 tokens/s with these kernels and CUDA graphs, 144.6 with q/k/v alone and
//! graphs, 135.9 with neither (H100). Split K for down (its rows of 18,944 values) is built and
//! not yet run on a GPU, so [`Kernels::Qkv`] stays the default until it is;
//! `QSCRIPT_DECODE_GEMV=all` takes the lean form.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{Result, Tensor};

use super::Linear;
use super::ops::{add_into, swiglu as swiglu_op};

/// Which of a decode step's projection groups go through the matrix-vector kernels on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// q/k/v only; o, down, gate/up and the LM head on cuBLAS (the default).
    Qkv,
    /// q/k/v, and at one row every other group in the lean form (`QSCRIPT_DECODE_GEMV=all`).
    All,
}

/// 0: not read yet; 1: [`Kernels::Qkv`]; 2: [`Kernels::All`].
static KERNELS: AtomicU8 = AtomicU8::new(0);

/// What decoding runs ([`Kernels`]): set by [`set_kernels`], else `QSCRIPT_DECODE_GEMV`
/// (`all`; anything else or nothing: [`Kernels::Qkv`]).
pub fn kernels() -> Kernels {
    match KERNELS.load(Ordering::Relaxed) {
        1 => Kernels::Qkv,
        2 => Kernels::All,
        _ => {
            let k = match std::env::var("QSCRIPT_DECODE_GEMV").as_deref() {
                Ok("all") => Kernels::All,
                _ => Kernels::Qkv,
            };
            set_kernels(k);
            k
        }
    }
}

/// Chooses what decoding runs from now on, for the whole process (benchmarks, GPU tests).
pub fn set_kernels(k: Kernels) {
    let v = match k {
        Kernels::Qkv => 1,
        Kernels::All => 2,
    };
    KERNELS.store(v, Ordering::Relaxed);
}

/// The dense weights of `linears` where the decode kernels take them for `x` (`[rows, in]`).
#[cfg(feature = "cuda")]
fn dense<'a>(x: &Tensor, linears: &[&'a Linear]) -> Option<Vec<&'a Tensor>> {
    let ws: Vec<&Tensor> = linears
        .iter()
        .map(|l| l.weight.as_dense())
        .collect::<Option<_>>()?;
    super::cuda::gemv::applies(x, &ws).then_some(ws)
}

/// The dense weights of `linears` where the lean form takes them ([`Kernels::All`], one row),
/// and the warps a feature for `x`'s row length.
#[cfg(feature = "cuda")]
fn lean<'a>(x: &Tensor, linears: &[&'a Linear]) -> Option<(Vec<&'a Tensor>, usize)> {
    let (1, k) = x.dims2().ok()? else {
        return None;
    };
    if kernels() != Kernels::All {
        return None;
    }
    Some((dense(x, linears)?, super::cuda::gemv::splits(k)))
}

/// `y` (a kernel's base product of `x`) with `l`'s adapter added, where it has one.
#[cfg(feature = "cuda")]
fn with_adapter(l: &Linear, y: Tensor, x: &Tensor) -> Result<Tensor> {
    match &l.lora {
        Some(a) => Ok(a.add_to(y, x)?.0),
        None => Ok(y),
    }
}

/// `l(x)` for each of `linears` (up to three sharing the input: q, k, v), `x` `[rows, in]` ->
/// `[rows, out_i]` each.
pub fn projections(x: &Tensor, linears: &[&Linear]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(ws) = dense(x, linears)
        && linears.len() <= 3
    {
        use super::cuda::gemv::{Form, many};
        let pairs: Vec<_> = ws
            .iter()
            .zip(linears)
            .map(|(w, l)| (*w, l.bias.as_ref()))
            .collect();
        let ys = many(x, &pairs, Form::Measured)?;
        return ys
            .into_iter()
            .zip(linears)
            .map(|(y, l)| with_adapter(l, y, x))
            .collect();
    }
    linears.iter().map(|l| l.forward(x)).collect()
}

/// `l(x)` alone (`x` `[rows, in]`): the LM head of a decode step.
pub fn product(x: &Tensor, l: &Linear) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some((ws, splits)) = lean(x, &[l]) {
        use super::cuda::gemv::{Form, many};
        let y = many(x, &[(ws[0], l.bias.as_ref())], Form::Lean(splits))?.remove(0);
        return with_adapter(l, y, x);
    }
    l.forward(x)
}

/// `res + l(x)` (`x` `[rows, in]`, `res` `[rows, out]`): o_proj and down_proj onto the residual
/// stream.
pub fn residual(x: &Tensor, l: &Linear, res: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if l.bias.is_none()
        && let Some((ws, splits)) = lean(x, &[l])
    {
        let y = super::cuda::gemv::residual(x, ws[0], res, splits)?;
        return with_adapter(l, y, x);
    }
    add_into(l.forward(x)?, res)
}

/// `silu(gate(x)) * up(x)` (`x` `[rows, in]` -> `[rows, intermediate]`).
pub fn swiglu(x: &Tensor, gate: &Linear, up: &Linear) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if [gate, up]
        .iter()
        .all(|l| l.lora.is_none() && l.bias.is_none())
        && let Some((ws, splits)) = lean(x, &[gate, up])
    {
        return super::cuda::gemv::swiglu(x, ws[0], ws[1], splits);
    }
    swiglu_op(&gate.forward(x)?, &up.forward(x)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// On the CPU the grouped ops are the training path's ops, whatever [`kernels`] says.
    #[test]
    fn the_reference_ops_are_the_training_paths() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 0.5, s, &dev).unwrap();
        let (x, res) = (r(&[3, 16]), r(&[3, 8]));
        let gate = Linear::new(r(&[24, 16]), None);
        let up = Linear::new(r(&[24, 16]), None);
        let o = Linear::new(r(&[8, 16]), None);
        let same = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
        };
        for k in [Kernels::Qkv, Kernels::All] {
            set_kernels(k);
            assert_eq!(kernels(), k);
            let want = (o.forward(&x).unwrap() + &res).unwrap();
            assert_eq!(same(&residual(&x, &o, &res).unwrap(), &want), 0.0);
            let g = gate.forward(&x).unwrap();
            let want = (candle_nn_silu(&g) * up.forward(&x).unwrap()).unwrap();
            assert!(same(&swiglu(&x, &gate, &up).unwrap(), &want) < 1e-5);
        }
        set_kernels(Kernels::Qkv);
    }

    fn candle_nn_silu(x: &Tensor) -> Tensor {
        (x / (x.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap()
    }
}
