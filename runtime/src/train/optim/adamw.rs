//! AdamW's step on CUDA (`adamw.cu`, compiled by `build.rs` and launched through
//! `nn::cuda`'s one launcher): one in-place launch over the flat parameter buffer for every
//! trainable tensor. Reference op: the composite path of [`super::AdamW::step`], which takes this
//! kernel on a GPU.

use candle_core::{DType, Result, Tensor};

use crate::nn::cuda::launch::{Arg, Module, first, launch, launch_1d, ptx};

const PTX: Module = ptx!("adamw");

/// AdamW's hyper-parameters for one step, as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    /// Learning rate.
    pub lr: f32,
    /// `beta1`.
    pub beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta1`, computed in f64.
    pub om1: f32,
    /// `1 - beta2`, computed in f64.
    pub om2: f32,
    /// `eps`.
    pub eps: f32,
    /// Weight decay.
    pub wd: f32,
    /// `1 - beta1^t`.
    pub bc1: f32,
    /// `1 - beta2^t`.
    pub bc2: f32,
}

/// The device address of `t`, a whole contiguous f32 buffer on the GPU.
fn flat_f32(t: &Tensor, what: &str) -> Result<u64> {
    if !t.is_contiguous() || t.layout().start_offset() != 0 || t.dtype() != DType::F32 {
        candle_core::bail!("adamw: `{what}` must be a whole contiguous buffer");
    }
    if !t.device().is_cuda() {
        candle_core::bail!("adamw: `{what}` is not on the GPU");
    }
    Ok(first(t, what)?.0)
}

/// One in-place AdamW step over flat buffers: `params` (any float dtype) and the f32 moments
/// `m`, `v` are updated from the f32 gradients `g` scaled by the device scalar `clip`; `decay`
/// (u32 words, see `super::decay_bits`) marks where weight decay applies. One launch for every
/// trainable tensor.
pub fn adamw(
    params: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    clip: Option<&Tensor>,
    decay: Option<&Tensor>,
    a: AdamWArgs,
) -> Result<()> {
    let n = params.elem_count();
    for (t, what) in [(m, "m"), (v, "v"), (g, "grads")] {
        if t.elem_count() != n || t.dtype() != DType::F32 {
            candle_core::bail!("adamw: `{what}` must be f32 with {n} elements");
        }
    }
    if !params.device().is_cuda() {
        candle_core::bail!("adamw: the parameters are not on the GPU");
    }
    let (pm, pv) = (flat_f32(m, "m")?, flat_f32(v, "v")?);
    // The gradients and parameters may be a window of a larger flat buffer (a ZeRO shard).
    if !g.is_contiguous() {
        candle_core::bail!("adamw: the gradients must be contiguous");
    }
    if !g.device().is_cuda() {
        candle_core::bail!("adamw: the gradients are not on the GPU");
    }
    let pg = first(g, "the gradients")?.0;
    let pc = match clip {
        Some(c) => flat_f32(c, "clip")?,
        None => 0,
    };
    let pd = match decay {
        Some(d)
            if d.is_contiguous()
                && d.layout().start_offset() == 0
                && d.dtype() == DType::U32
                && d.elem_count() == n.div_ceil(32) =>
        {
            if !d.device().is_cuda() {
                candle_core::bail!("adamw: the decay bits are not on the GPU");
            }
            first(d, "the decay bits")?.0
        }
        Some(_) => candle_core::bail!(
            "adamw: the decay bits must be {} contiguous u32 words",
            n.div_ceil(32)
        ),
        None => 0,
    };
    if !params.is_contiguous() {
        candle_core::bail!("adamw: the parameters must be contiguous");
    }
    let dtype = params.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("adamw: unsupported parameter dtype {dtype:?}");
    }
    let (pp, dev) = first(params, "the parameters")?;
    // Every buffer holds `n` elements (checked above) and the engine runs on one stream.
    launch(
        &dev,
        &PTX,
        "adamw",
        dtype,
        launch_1d(n),
        &[
            Arg::from(pp),
            Arg::from(pm),
            Arg::from(pv),
            Arg::from(pg),
            Arg::from(pc),
            Arg::from(pd),
            Arg::from(a.lr),
            Arg::from(a.beta1),
            Arg::from(a.beta2),
            Arg::from(a.om1),
            Arg::from(a.om2),
            Arg::from(a.eps),
            Arg::from(a.wd),
            Arg::from(a.bc1),
            Arg::from(a.bc2),
            Arg::from(n as u64),
        ],
    )
}
