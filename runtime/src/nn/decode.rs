//! A block's projections in decoding, grouped as a decode step runs them: q/k/v of one input
//! ([`projections`]), a projection added to the residual stream ([`residual`]: o, down), and
//! gate/up through SwiGLU ([`swiglu`]); and the LM head ([`product`]). Each function here is the
//! reference op (the projections one by one, then the bias, residual or SwiGLU, as the training
//! path computes them); on a GPU, for the few rows of a decode step, the dense weights go through
//! one matrix-vector kernel a group instead ([`crate::nn::cuda::gemv`]) where [`kernels`] allows
//! it. Adapters are added after the base product (q/k/v, o, down) or keep the group on the
//! reference path (gate/up: SwiGLU follows their sum). No dropout, no saved state: inference only.
//!
//! Measured (H100, `model_bench decode-ops`, Qwen2.5-7B's shapes, one row): q/k/v 16.6 us as
//! one kernel two features a warp (22.3 one a warp, 68.3 one by one on cuBLAS), o + residual 13.7
//! (19.8 on cuBLAS), gate/up + SwiGLU 93.0 (110.4), down + residual split four ways 50.3 (55.3),
//! the LM head 345 (361); a block's groups 186 us against 221 with q/k/v alone on the kernel. At
//! four rows the lean form was 1.5-3x slower than cuBLAS, so with more rows those groups go to
//! cuBLAS. One client serving a 7B with CUDA graphs: **161.3 tokens/s** with every kernel here
//! ([`Kernels::FUSED`], the default), 148.3 with the lean form one feature a warp and nothing
//! folded, 142.5 with q/k/v alone (H100, 219.9 the bandwidth limit). `QSCRIPT_DECODE_GEMV` picks
//! another setting ([`Kernels::parse`]).

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{Result, Tensor};

use super::Linear;
use super::ops::{add_into, rms_norm, swiglu as swiglu_op};

/// Which of a decode step's projection groups go through the matrix-vector kernels on a GPU, and
/// how. q/k/v always do (at up to four rows); the rest is for one row (a sequence decoding alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// o, down, gate/up and the LM head in the lean form at one row (else cuBLAS).
    pub lean: bool,
    /// The lean form two features a warp for q/k/v (then lean too) and o: launches of a few
    /// thousand features in one wave of the GPU instead of two.
    pub pairs: bool,
    /// The block's two RMSNorms folded into the lean products that read them (q/k/v, gate/up):
    /// two launches a block fewer.
    pub fold_norms: bool,
    /// RoPE of q and k and the KV cache's write of k and v in one launch (the server's decode
    /// steps, `nn::cuda::rope::rope_append`): three launches a block fewer.
    pub rope_append: bool,
}

impl Kernels {
    /// q/k/v only.
    pub const QKV: Kernels = Kernels {
        lean: false,
        pairs: false,
        fold_norms: false,
        rope_append: false,
    };
    /// Every group at one row, one feature a warp, the norms on their own.
    pub const ALL: Kernels = Kernels {
        lean: true,
        pairs: false,
        fold_norms: false,
        rope_append: false,
    };
    /// Every kernel there is (the default): the lean form, two features a warp, the norms
    /// folded, RoPE and the cache write in one launch.
    pub const FUSED: Kernels = Kernels {
        lean: true,
        pairs: true,
        fold_norms: true,
        rope_append: true,
    };

    /// From `QSCRIPT_DECODE_GEMV`'s words (comma-separated): `qkv` (q/k/v alone), plus any of
    /// `all` or `lean`, `pairs`, `norm`, `rope`; `fused` for all four; nothing: [`Kernels::FUSED`].
    pub fn parse(words: &str) -> Kernels {
        if words.trim().is_empty() {
            return Kernels::FUSED;
        }
        let mut k = Kernels::QKV;
        for w in words.split(',').map(str::trim) {
            match w {
                "all" | "lean" => k.lean = true,
                "pairs" => k.pairs = true,
                "norm" => k.fold_norms = true,
                "rope" => k.rope_append = true,
                "fused" => k = Kernels::FUSED,
                _ => {}
            }
        }
        k
    }

    fn bits(self) -> u8 {
        1 | u8::from(self.lean) << 1
            | u8::from(self.pairs) << 2
            | u8::from(self.fold_norms) << 3
            | u8::from(self.rope_append) << 4
    }

    fn from_bits(b: u8) -> Kernels {
        Kernels {
            lean: b & 2 != 0,
            pairs: b & 4 != 0,
            fold_norms: b & 8 != 0,
            rope_append: b & 16 != 0,
        }
    }
}

/// [`Kernels::bits`]; 0: not read yet.
static KERNELS: AtomicU8 = AtomicU8::new(0);

/// What decoding runs ([`Kernels`]): set by [`set_kernels`], else `QSCRIPT_DECODE_GEMV`
/// ([`Kernels::parse`]; nothing: [`Kernels::FUSED`]).
pub fn kernels() -> Kernels {
    match KERNELS.load(Ordering::Relaxed) {
        0 => {
            let k = Kernels::parse(&std::env::var("QSCRIPT_DECODE_GEMV").unwrap_or_default());
            set_kernels(k);
            k
        }
        b => Kernels::from_bits(b),
    }
}

/// Chooses what decoding runs from now on, for the whole process (benchmarks, GPU tests).
pub fn set_kernels(k: Kernels) {
    KERNELS.store(k.bits(), Ordering::Relaxed);
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

/// The dense weights of `linears` where the lean form takes them (one row, and `wanted`), and its
/// shape of work for `x`'s row length: split K for long rows, two features a warp where
/// [`Kernels::pairs`] asks for it (`pairs`: the group takes them) and every output's features
/// pair up.
#[cfg(feature = "cuda")]
fn lean<'a>(
    x: &Tensor,
    linears: &[&'a Linear],
    wanted: bool,
    pairs: bool,
) -> Option<(Vec<&'a Tensor>, super::cuda::gemv::Lean)> {
    let (1, k) = x.dims2().ok()? else {
        return None;
    };
    if !wanted {
        return None;
    }
    let ws = dense(x, linears)?;
    let even = ws.iter().all(|w| w.dims2().is_ok_and(|(n, _)| n % 2 == 0));
    let shape = super::cuda::gemv::Lean {
        splits: super::cuda::gemv::splits(k),
        features: if pairs && kernels().pairs && even {
            2
        } else {
            1
        },
    };
    Some((ws, shape))
}

/// `y` (a kernel's base product of `x`) with `l`'s adapter added, where it has one.
#[cfg(feature = "cuda")]
fn with_adapter(l: &Linear, y: Tensor, x: &Tensor) -> Result<Tensor> {
    match &l.lora {
        Some(a) => Ok(a.add_to(y, x)?.0),
        None => Ok(y),
    }
}

/// Where a norm (`weight`, `eps`) of `x` runs inside the lean product of `linears`: with
/// [`Kernels::fold_norms`], no adapters (they read the normed input), a norm weight the kernel
/// takes, and the lean form (`wanted`, `pairs` as [`lean`] takes them).
#[cfg(feature = "cuda")]
fn folded<'a, 'n>(
    x: &Tensor,
    (weight, eps): (&'n Tensor, f64),
    linears: &[&'a Linear],
    wanted: bool,
    pairs: bool,
) -> Option<(
    Vec<&'a Tensor>,
    super::cuda::gemv::Lean,
    super::cuda::gemv::Norm<'n>,
)> {
    if !kernels().fold_norms
        || linears.iter().any(|l| l.lora.is_some())
        || !super::cuda::gemv::norm_fits(weight, x)
    {
        return None;
    }
    let (ws, shape) = lean(x, linears, wanted, pairs)?;
    Some((ws, shape, super::cuda::gemv::Norm { weight, eps }))
}

/// Each weight of `ws` with its layer's bias, as the kernels take them.
#[cfg(feature = "cuda")]
fn with_biases<'a>(
    ws: &[&'a Tensor],
    linears: &[&'a Linear],
) -> Vec<(&'a Tensor, Option<&'a Tensor>)> {
    ws.iter()
        .zip(linears)
        .map(|(w, l)| (*w, l.bias.as_ref()))
        .collect()
}

/// `l(x)` for each of `linears` (up to three sharing the input: q, k, v), `x` `[rows, in]` ->
/// `[rows, out_i]` each.
pub fn projections(x: &Tensor, linears: &[&Linear]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(ws) = dense(x, linears)
        && linears.len() <= 3
    {
        use super::cuda::gemv::{Form, many};
        let pairs = with_biases(&ws, linears);
        // The lean form at one row where it runs two features a warp (q/k/v in one wave).
        let form = match lean(x, linears, kernels().pairs, true) {
            Some((_, shape)) if shape.features == 2 => Form::Lean(shape),
            _ => Form::Measured,
        };
        let ys = many(x, &pairs, form, None)?;
        return ys
            .into_iter()
            .zip(linears)
            .map(|(y, l)| with_adapter(l, y, x))
            .collect();
    }
    linears.iter().map(|l| l.forward(x)).collect()
}

/// [`projections`] of `rms_norm(x, norm, eps)` (the block's input norm, then q/k/v): on a GPU at
/// one row with [`Kernels::fold_norms`] and no adapters, the norm runs inside the product's kernel.
pub fn normed_projections(
    x: &Tensor,
    norm: &Tensor,
    eps: f64,
    linears: &[&Linear],
) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if linears.len() <= 3
        && let Some((ws, shape, fold)) = folded(x, (norm, eps), linears, true, true)
    {
        use super::cuda::gemv::{Form, many};
        return many(x, &with_biases(&ws, linears), Form::Lean(shape), Some(fold));
    }
    projections(&rms_norm(x, norm, eps)?, linears)
}

/// `l(h)` alone, `h` = `x` (`[rows, in]`) or, given `norm` (weight and eps), `rms_norm(x)`: the
/// final norm and LM head of a decode step. On a GPU at one row with [`Kernels::fold_norms`], the
/// norm runs inside the product's kernel.
pub fn product(x: &Tensor, norm: Option<(&Tensor, f64)>, l: &Linear) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(norm) = norm
        && let Some((ws, shape, fold)) = folded(x, norm, &[l], kernels().lean, false)
    {
        use super::cuda::gemv::{Form, many};
        let w = [(ws[0], l.bias.as_ref())];
        return Ok(many(x, &w, Form::Lean(shape), Some(fold))?.remove(0));
    }
    let h = normed(x, norm)?;
    #[cfg(feature = "cuda")]
    if let Some((ws, shape)) = lean(&h, &[l], kernels().lean, false) {
        use super::cuda::gemv::{Form, many};
        let y = many(&h, &[(ws[0], l.bias.as_ref())], Form::Lean(shape), None)?.remove(0);
        return with_adapter(l, y, &h);
    }
    l.forward(&h)
}

/// `x`, or its RMSNorm by `norm`'s weight and eps.
fn normed(x: &Tensor, norm: Option<(&Tensor, f64)>) -> Result<Tensor> {
    match norm {
        Some((w, eps)) => rms_norm(x, w, eps),
        None => Ok(x.clone()),
    }
}

/// `res + l(x)` (`x` `[rows, in]`, `res` `[rows, out]`): o_proj and down_proj onto the residual
/// stream.
pub fn residual(x: &Tensor, l: &Linear, res: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if l.bias.is_none()
        && let Some((ws, shape)) = lean(x, &[l], kernels().lean, true)
    {
        let y = super::cuda::gemv::residual(x, ws[0], res, shape)?;
        return with_adapter(l, y, x);
    }
    add_into(l.forward(x)?, res)
}

/// `silu(gate(h)) * up(h)` with `h` = `x` or, given `norm` (weight and eps), `rms_norm(x)` (`x`
/// `[rows, in]` -> `[rows, intermediate]`): on a GPU at one row with [`Kernels::fold_norms`], the
/// norm runs inside the product's kernel.
pub fn swiglu(
    x: &Tensor,
    norm: Option<(&Tensor, f64)>,
    gate: &Linear,
    up: &Linear,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    let plain = [gate, up]
        .iter()
        .all(|l| l.lora.is_none() && l.bias.is_none());
    #[cfg(feature = "cuda")]
    if let Some(norm) = norm
        && plain
        && let Some((ws, shape, fold)) = folded(x, norm, &[gate, up], kernels().lean, false)
    {
        return super::cuda::gemv::swiglu(x, ws[0], ws[1], shape.splits, Some(fold));
    }
    let h = normed(x, norm)?;
    #[cfg(feature = "cuda")]
    if plain && let Some((ws, shape)) = lean(&h, &[gate, up], kernels().lean, false) {
        return super::cuda::gemv::swiglu(&h, ws[0], ws[1], shape.splits, None);
    }
    swiglu_op(&gate.forward(&h)?, &up.forward(&h)?)
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
        let (g_in, g_post) = (r(&[16]), r(&[16]));
        let (q, k) = (
            Linear::new(r(&[8, 16]), Some(r(&[8]))),
            Linear::new(r(&[4, 16]), None),
        );
        for setting in [Kernels::QKV, Kernels::ALL, Kernels::FUSED] {
            set_kernels(setting);
            assert_eq!(kernels(), setting);
            let want = (o.forward(&x).unwrap() + &res).unwrap();
            assert_eq!(same(&residual(&x, &o, &res).unwrap(), &want), 0.0);
            let g = gate.forward(&x).unwrap();
            let want = (candle_nn_silu(&g) * up.forward(&x).unwrap()).unwrap();
            assert!(same(&swiglu(&x, None, &gate, &up).unwrap(), &want) < 1e-5);
            let h = rms_norm(&x, &g_post, 1e-6).unwrap();
            let g = gate.forward(&h).unwrap();
            let want = (candle_nn_silu(&g) * up.forward(&h).unwrap()).unwrap();
            let got = swiglu(&x, Some((&g_post, 1e-6)), &gate, &up).unwrap();
            assert!(same(&got, &want) < 1e-5);
            let h = rms_norm(&x, &g_in, 1e-6).unwrap();
            let got = normed_projections(&x, &g_in, 1e-6, &[&q, &k]).unwrap();
            assert_eq!(same(&got[0], &q.forward(&h).unwrap()), 0.0);
            assert_eq!(same(&got[1], &k.forward(&h).unwrap()), 0.0);
        }
        set_kernels(Kernels::FUSED);
    }

    /// `QSCRIPT_DECODE_GEMV`'s words.
    #[test]
    fn the_kernel_settings_parse() {
        assert_eq!(Kernels::parse(""), Kernels::FUSED);
        assert_eq!(Kernels::parse("qkv"), Kernels::QKV);
        assert_eq!(Kernels::parse("all"), Kernels::ALL);
        assert_eq!(Kernels::parse("fused"), Kernels::FUSED);
        let k = Kernels::parse("lean, norm");
        assert!(k.lean && k.fold_norms && !k.pairs && !k.rope_append);
        assert!(Kernels::parse("rope").rope_append);
        for k in [Kernels::QKV, Kernels::ALL, Kernels::FUSED, k] {
            assert_eq!(Kernels::from_bits(k.bits()), k);
        }
    }

    fn candle_nn_silu(x: &Tensor) -> Tensor {
        (x / (x.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap()
    }
}
