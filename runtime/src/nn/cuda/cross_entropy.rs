//! Cross-entropy of logit rows on CUDA (`cross_entropy.cu`): per-row losses and the logits'
//! gradient in one kernel. Reference op: the composite path of
//! [`crate::nn::loss::causal_lm_loss`] (log-sum-exp and gather in f32), which takes this kernel on
//! a GPU.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, ptx, rows_grid};

const PTX: Module = ptx!("cross_entropy");

/// Cross-entropy of each row of `logits` `[n, vocab]` against `targets` (u32 `[n]`): the per-row
/// losses (f32) and, with `want_grad`, `(softmax - onehot) * inv_denom` in the logits' dtype.
pub fn ce_rows(
    logits: &Tensor,
    targets: &Tensor,
    inv_denom: f32,
    want_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, v) = logits.dims2()?;
    let (pl, dev) = addr(logits, "logits")?;
    let (pt, _) = addr(targets, "targets")?;
    let loss = empty(&dev, &[n], DType::F32)?;
    let d = if want_grad {
        Some(empty(&dev, &[n, v], logits.dtype())?)
    } else {
        None
    };
    let (pd, _) = match &d {
        Some(d) => addr(d, "dlogits")?,
        None => (0, dev.clone()),
    };
    let (ploss, _) = addr(&loss, "loss")?;
    let (v64, g) = (v as u64, i32::from(want_grad));
    let width = 16 / logits.dtype().size_in_bytes();
    let vec = i32::from(
        v.is_multiple_of(width) && pl.is_multiple_of(16) && (pd == 0 || pd.is_multiple_of(16)),
    );
    launch(
        &dev,
        &PTX,
        "ce_rows",
        logits.dtype(),
        rows_grid(n, v),
        &[
            Arg::from(pl),
            Arg::from(pt),
            Arg::from(pd),
            Arg::from(ploss),
            Arg::from(v64),
            Arg::from(inv_denom),
            Arg::from(g),
            Arg::from(vec),
        ],
    )?;
    Ok((loss, d))
}
