//! The op facade: every op the decoder runs, each with its forward and its explicit backward.
//! The implementations here are the reference ones (composite candle ops: the CPU path and the
//! oracle that every fused kernel is tested against); a device with a fused kernel for an op
//! takes it inside the op's function, so callers never change. candle's own fused `rms_norm`,
//! `softmax_last_dim`, `rope` and SDPA record no backward op, and its autograd keeps every
//! activation and computes a gradient for every frozen operand, so the training engine does not
//! use autograd at all: it calls these backward functions block by block.
//!
//! | op | forward | backward |
//! |---|---|---|
//! | RMSNorm | [`ops::rms_norm`] | [`ops::rms_norm_backward`] |
//! | RoPE | [`ops::rope`] (reference [`ops::apply_rope`]) | [`ops::rope_bwd`] (reference [`ops::rope_backward`]) |
//! | SwiGLU | [`ops::swiglu`] | [`ops::swiglu_backward`] |
//! | attention | [`attention::attention`] | [`attention::attention_backward`] (cuDNN's fused SDPA on a GPU with cuDNN, else our softmax kernels) |
//! | linear + LoRA | [`Linear::forward_t`] | [`Linear::backward`] |
//! | a block's q/k/v in decoding | [`decode::projections`] | none (inference only) |
//! | dropout | [`dropout::apply`] | the same mask, re-derived from its key |
//! | causal-LM loss | [`loss::causal_lm_loss`] (from the final hidden states) | returns dHidden |

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
pub mod dropout;
pub mod linear;
pub mod loss;
pub mod mask;
pub mod ops;
pub mod unpack;

use candle_core::{Result, Tensor};

pub use linear::{Linear, Weight};
pub use mask::AttnMask;

/// Where backward functions put parameter gradients. `wants` says whether a tensor is trained
/// (asked before its gradient is computed, so frozen weights cost nothing); `add` accumulates.
pub trait GradSink {
    /// Whether `param` gets a gradient.
    fn wants(&self, param: &Tensor) -> bool;
    /// Adds `grad` (any float dtype, `param`'s shape) to `param`'s gradient.
    fn add(&mut self, param: &Tensor, grad: &Tensor) -> Result<()>;
    /// Adds `alpha * a · b` (`[m, k] · [k, n]`, `param` `[m, n]`) to `param`'s gradient; a sink
    /// on the GPU runs the GEMM straight into its buffer.
    fn add_matmul(&mut self, param: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
        let g = a.matmul(b)?;
        self.add(param, &if alpha == 1.0 { g } else { (g * alpha)? })
    }
    /// Adds the column sums of `x` `[rows, n]` (a bias's gradient) to `param`'s (`[n]`).
    fn add_col_sums(&mut self, param: &Tensor, x: &Tensor) -> Result<()> {
        self.add(param, &x.to_dtype(candle_core::DType::F32)?.sum(0)?)
    }
}

/// A sink that wants nothing: inference-only backward (input gradients only).
#[derive(Debug, Default)]
pub struct NoGrads;

impl GradSink for NoGrads {
    fn wants(&self, _: &Tensor) -> bool {
        false
    }
    fn add(&mut self, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
}
