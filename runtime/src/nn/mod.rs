//! Differentiable building blocks. candle's fused `rms_norm`, `softmax_last_dim`, `rope` and SDPA
//! record no backward op (gradients silently stop there), so the training path is built from
//! composite ops that candle's autograd understands. Fused kernels with an explicit backward come
//! later, each checked against these.

pub mod linear;
pub mod ops;

pub use linear::Linear;
