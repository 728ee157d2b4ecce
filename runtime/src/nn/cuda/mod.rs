//! The CUDA side of the op facade: our kernels, one family per `.rs` + `.cu` pair, and the device
//! setup the engine needs. `build.rs` compiles each family's `.cu` (with `common.cuh`, the device
//! helpers they share) to its own PTX module; `launch.rs` is the one way they are loaded and
//! launched. Every kernel has a reference op on the CPU that computes the same function (named in
//! its family's module docs), and a test in `tests/gpu.rs` that compares the two on the GPU
//! machine.
//!
//! | family | kernels | reference op |
//! |---|---|---|
//! | [`rms_norm`] | forward, `dx`, the weight gradient's rows | [`crate::nn::ops::rms_norm`], [`crate::nn::ops::rms_norm_backward`] |
//! | [`rope`] | forward and its transpose | [`crate::nn::ops::apply_rope`], [`crate::nn::ops::rope_backward`] |
//! | [`swiglu`] | forward, backward | [`crate::nn::ops::swiglu`], [`crate::nn::ops::swiglu_backward`] |
//! | [`softmax`] | attention's masked softmax, forward and backward | [`crate::nn::attention`]'s composite path |
//! | [`cross_entropy`] | per-row losses and the logits' gradient | [`crate::nn::loss::causal_lm_loss`]'s composite path |
//! | [`dropout`] | the mask, dropout added into a destination | [`crate::nn::dropout`] |
//! | [`accumulate`] | in-place adds, row scatter and put | [`crate::nn::ops::add_into`], [`crate::nn::ops::add_bias`], [`crate::nn::ops::put_rows`] |
//! | [`gemv`] | decoding's q/k/v with their biases (inference only) | [`crate::nn::decode::projections`] |
//! | [`decode_attn`] | decoding's attention, one query position a row against the KV cache (inference only) | [`crate::nn::attention`]'s composite path |
//! | [`dequant`] | bitsandbytes' 4-bit codes to the compute dtype | [`crate::quant::Quant4::dequantize`]'s candle path |
//!
//! The optimizer's kernels live with it, launched through `launch.rs` too:
//! [`crate::train::optim::adamw`] (AdamW's step) and [`crate::train::optim::grad_norm`] (the
//! gradients' sum of squares for clipping).
//!
//! Beside them, not ours to launch: [`blas`] (cuBLAS GEMMs into existing outputs), [`sdpa`]
//! (cuDNN's fused attention). Device code lives with the device: [`crate::device::libs`] (where
//! cuDNN and NCCL are found), [`crate::device::pool`] (the memory pool),
//! [`crate::device::memory`] (tensors' device addresses, fresh outputs) and
//! [`crate::device::peer`] (GPU-to-GPU copies).

pub mod accumulate;
pub mod blas;
pub mod cross_entropy;
pub mod decode_attn;
pub mod dequant;
pub mod dropout;
pub mod gemv;
pub(crate) mod launch;
pub mod rms_norm;
pub mod rope;
pub mod sdpa;
pub mod softmax;
pub mod swiglu;
