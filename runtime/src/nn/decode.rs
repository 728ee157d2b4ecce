//! A block's q/k/v in decoding: [`projections`] is the reference op (the projections one by one,
//! each with its bias, as the training path computes them); on a GPU, for the few rows of a
//! decode step, the dense weights go through one matrix-vector kernel instead
//! ([`crate::nn::cuda::gemv`]), one launch where the projections take six (three GEMMs, three
//! bias adds). Adapters are added after the base product. No dropout, no saved state: inference
//! only.
//!
//! Measured (H100, `model_bench decode-ops`, Qwen2.5-7B's shapes): q/k/v 22.3 us as one kernel
//! against 51.9 us one by one at one row, 56.0 against 70.8 at four; the kernel takes at most
//! four rows (each row re-reads its input for every chunk of weights; more were not measured).
//! The same kernels for o and down with the residual added and for gate/up with SwiGLU were
//! slower than cuBLAS (21.0 against 13.7 us, 86.1 against 55.6, 136.3 against 110.4: their
//! accumulators sat in local memory, as they still do in the q/k/v kernel as measured), so those
//! projections stay on cuBLAS until a corrected kernel is measured.

use candle_core::{Result, Tensor};

use super::Linear;

/// The dense weights of `linears` where the decode kernels take them for `x` (`[rows, in]`).
#[cfg(feature = "cuda")]
fn dense<'a>(x: &Tensor, linears: &[&'a Linear]) -> Option<Vec<&'a Tensor>> {
    let ws: Vec<&Tensor> = linears
        .iter()
        .map(|l| l.weight.as_dense())
        .collect::<Option<_>>()?;
    super::cuda::gemv::applies(x, &ws).then_some(ws)
}

/// `l(x)` for each of `linears` (up to three sharing the input: q, k, v), `x` `[rows, in]` ->
/// `[rows, out_i]` each.
pub fn projections(x: &Tensor, linears: &[&Linear]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(ws) = dense(x, linears)
        && linears.len() <= 3
    {
        let pairs: Vec<_> = ws
            .iter()
            .zip(linears)
            .map(|(w, l)| (*w, l.bias.as_ref()))
            .collect();
        let ys = super::cuda::gemv::many(x, &pairs)?;
        return ys
            .into_iter()
            .zip(linears)
            .map(|(y, l)| match &l.lora {
                Some(a) => Ok(a.add_to(y, x)?.0),
                None => Ok(y),
            })
            .collect();
    }
    linears.iter().map(|l| l.forward(x)).collect()
}
