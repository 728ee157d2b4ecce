//! A block's projections in inference, grouped as decoding runs them: q/k/v of one input, a
//! projection added to the residual stream (o, down), and gate/up through SwiGLU. Each function
//! here is the reference op (the projections one by one, then the bias, residual or SwiGLU as the
//! training path computes them); on a GPU, for the few rows of a decode step, the dense weights
//! go through one matrix-vector kernel a group instead ([`crate::nn::cuda::gemv`]), which reads
//! each weight once and launches 4 kernels a block where the projections take 12. Adapters are
//! added after the base product (q/k/v, o, down) or keep the group on the reference path
//! (gate/up: SwiGLU follows the sum). No dropout, no saved state: inference only.

use candle_core::{Result, Tensor};

use super::Linear;
use super::ops::{add_into, swiglu as swiglu_op};

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

/// `res + l(x)` (`x` `[rows, in]`, `res` `[rows, out]`): o_proj and down_proj onto the residual
/// stream.
pub fn residual(x: &Tensor, l: &Linear, res: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ws) = dense(x, &[l])
        && l.bias.is_none()
    {
        let y = super::cuda::gemv::residual(x, ws[0], res)?;
        return match &l.lora {
            Some(a) => Ok(a.add_to(y, x)?.0),
            None => Ok(y),
        };
    }
    add_into(l.forward(x)?, res)
}

/// `silu(gate(x)) * up(x)` (`x` `[rows, in]` -> `[rows, intermediate]`).
pub fn swiglu(x: &Tensor, gate: &Linear, up: &Linear) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ws) = dense(x, &[gate, up])
        && [gate, up]
            .iter()
            .all(|l| l.lora.is_none() && l.bias.is_none())
    {
        return super::cuda::gemv::swiglu(x, ws[0], ws[1]);
    }
    swiglu_op(&gate.forward(x)?, &up.forward(x)?)
}
