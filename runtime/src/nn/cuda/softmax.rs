//! Attention's masked softmax on CUDA (`softmax.cu`), for attention without cuDNN: the forward
//! (probabilities, row max and log-sum) and the backward from the saved row statistics. Reference
//! op: the composite path of [`crate::nn::attention::attention`] and
//! [`crate::nn::attention::attention_backward`] (an additive mask bias and candle's softmax),
//! which take these kernels on a GPU.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, ptx, rows_grid};

const PTX: Module = ptx!("softmax");

/// Which keys each row of attention scores sees, for the softmax kernels.
pub struct RowMask {
    /// Queries per row block.
    pub s: u32,
    /// Rows per batch entry (`heads * s`).
    pub rows_per_batch: u64,
    /// Absolute position of the first query.
    pub offset: u32,
    /// Causal.
    pub causal: bool,
    /// Per batch entry, `[start, end)` of the real keys (u32 tensors on the device).
    pub ranges: Option<(Tensor, Tensor)>,
    /// Packed rows: per `(batch entry, query)`, the first key of the query's example (u32 `[b * s]`).
    pub query_starts: Option<Tensor>,
}

impl RowMask {
    /// The kernels' mask arguments, in their order: `s, rows_per_batch, offset, causal, key
    /// starts, key ends, query starts` (null addresses for what is absent).
    fn args(&self) -> Result<[Arg; 7]> {
        let (ks, ke) = match &self.ranges {
            Some((a, b)) => (addr(a, "key starts")?.0, addr(b, "key ends")?.0),
            None => (0, 0),
        };
        let qs = match &self.query_starts {
            Some(q) => addr(q, "query starts")?.0,
            None => 0,
        };
        Ok([
            Arg::from(self.s),
            Arg::from(self.rows_per_batch),
            Arg::from(self.offset),
            Arg::from(i32::from(self.causal)),
            Arg::from(ks),
            Arg::from(ke),
            Arg::from(qs),
        ])
    }
}

/// Masked softmax of raw scores `[rows, t]` times `scale`: probabilities (scores' dtype), row max
/// and row log-sum (f32).
pub fn attn_softmax_fwd(
    scores: &Tensor,
    mask: &RowMask,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (r, t) = scores.dims2()?;
    let (px, dev) = addr(scores, "scores")?;
    let p = empty(&dev, &[r, t], scores.dtype())?;
    let mx = empty(&dev, &[r], DType::F32)?;
    let ls = empty(&dev, &[r], DType::F32)?;
    let (pp, pm, pl) = (
        addr(&p, "p")?.0,
        addr(&mx, "max")?.0,
        addr(&ls, "logsum")?.0,
    );
    let mut args = vec![
        Arg::from(px),
        Arg::from(pp),
        Arg::from(pm),
        Arg::from(pl),
        Arg::from(t as u64),
    ];
    args.extend(mask.args()?);
    args.push(Arg::from(scale));
    launch(
        &dev,
        &PTX,
        "attn_softmax_fwd",
        scores.dtype(),
        rows_grid(r, t),
        &args,
    )?;
    Ok((p, mx, ls))
}

/// Backward of [`attn_softmax_fwd`]: the recomputed probabilities and
/// `ds = p * (dp - delta) * scale`, both `[rows, t]` in the scores' dtype.
pub fn attn_softmax_bwd(
    scores: &Tensor,
    dp: &Tensor,
    max: &Tensor,
    log_sum: &Tensor,
    delta: &Tensor,
    mask: &RowMask,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (r, t) = scores.dims2()?;
    let (px, dev) = addr(scores, "scores")?;
    let pg = addr(dp, "dp")?.0;
    let (pm, pl, pd) = (
        addr(max, "max")?.0,
        addr(log_sum, "logsum")?.0,
        addr(delta, "delta")?.0,
    );
    let p = empty(&dev, &[r, t], scores.dtype())?;
    let ds = empty(&dev, &[r, t], scores.dtype())?;
    let (pp, pds) = (addr(&p, "p")?.0, addr(&ds, "ds")?.0);
    let mut args = vec![
        Arg::from(px),
        Arg::from(pg),
        Arg::from(pm),
        Arg::from(pl),
        Arg::from(pd),
        Arg::from(pp),
        Arg::from(pds),
        Arg::from(t as u64),
    ];
    args.extend(mask.args()?);
    args.push(Arg::from(scale));
    launch(
        &dev,
        &PTX,
        "attn_softmax_bwd",
        scores.dtype(),
        rows_grid(r, t),
        &args,
    )?;
    Ok((p, ds))
}
