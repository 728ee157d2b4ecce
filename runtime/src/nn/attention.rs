//! Causal self-attention with GQA, forward and backward, over the mask that says which keys a
//! query sees ([`AttnMask`], in `mask.rs`). The mask is never a dense `[b, 1, s, t]` tensor at the API: it is causal plus, per
//! row, the range of real keys (left or right padding). The reference implementation below builds
//! the additive bias on the device from those ranges (one upload of `2 b` numbers), keeps only the
//! per-row log-sum-exp for backward (not the `s x t` probabilities) and recomputes them there, the
//! way flash attention does; a fused kernel replaces it per device without touching callers.

use candle_core::{D, DType, Result, Tensor};

pub use super::mask::AttnMask;

/// What the backward of [`attention`] needs: the inputs, the output and the per-row softmax
/// statistics of the path that ran.
#[derive(Clone, Debug)]
pub struct AttnSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    rows: Rows,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    mask: AttnMask,
    scale: f64,
}

/// Per-row softmax statistics.
#[derive(Clone, Debug)]
enum Rows {
    /// Row max and log-sum (and the reference path's bias): the softmax kernels and the reference.
    Softmax {
        max: Tensor,
        log_sum: Tensor,
        bias: Option<Tensor>,
    },
    /// cuDNN's row log-sum-exp `[b, h, s]` f32.
    #[cfg(feature = "cuda")]
    Cudnn(Tensor),
    /// Packed rows run as the padded batch of their examples: that pass's saved state, the
    /// layout, and the packed rows' length.
    Unpacked(Box<AttnSaved>, super::unpack::Unpacked, usize),
}

/// Whether cuDNN's fused attention takes these inputs; the first time a GPU input cannot use
/// it for a reason a user can act on, says so once.
#[cfg(feature = "cuda")]
fn cudnn_ok(q: &Tensor, k: &Tensor, mask: &AttnMask) -> bool {
    if !q.device().is_cuda() {
        return false;
    }
    match super::cuda::sdpa::unsupported(q, k, mask) {
        None => true,
        Some(why) => {
            // Decoding (a KV cache, one position) needs no word; a missing cuDNN is noticed
            // where it is looked for.
            let quiet = why.contains("KV cache")
                || why.contains("one position")
                || why.contains("cuDNN 9 not found");
            if !quiet {
                crate::notice::say(format!(
                    "notice: cuDNN attention does not take {why}; using qscript's softmax kernels"
                ));
            }
            false
        }
    }
}

/// Whether the fused softmax kernels serve attention on `q`'s device and dtype under `mask` (not
/// shared keys: the reference's bias says those).
#[cfg(feature = "cuda")]
fn fused_ok(q: &Tensor, mask: &AttnMask) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && (mask.shared.is_none() || mask.segments.is_none())
}

/// The mask as the softmax kernels take it (key ranges uploaded once per call).
#[cfg(feature = "cuda")]
fn row_mask(
    mask: &AttnMask,
    b: usize,
    h: usize,
    s: usize,
    device: &candle_core::Device,
) -> Result<super::cuda::softmax::RowMask> {
    let ranges = match &mask.key_ranges {
        Some(r) => {
            if r.len() != b {
                candle_core::bail!("attention mask has {} rows, the batch has {b}", r.len());
            }
            Some(uploaded_ranges(r, device)?)
        }
        None => None,
    };
    let query_starts = mask
        .segment_starts(b, s)?
        .map(|q| Tensor::from_vec(q, b * s, device))
        .transpose()?;
    Ok(super::cuda::softmax::RowMask {
        s: s as u32,
        rows_per_batch: (h * s) as u64,
        offset: mask.offset as u32,
        causal: mask.causal,
        ranges,
        query_starts,
    })
}

/// The key ranges as the kernels read them (starts, ends), uploaded once for every layer of a
/// pass ([`crate::device::memory::kept`]: one upload a layer would stall a decode step 28 times).
#[cfg(feature = "cuda")]
fn uploaded_ranges(r: &[(usize, usize)], device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    crate::device::memory::kept(&RANGES, r, device, || {
        let starts: Vec<u32> = r.iter().map(|x| x.0 as u32).collect();
        let ends: Vec<u32> = r.iter().map(|x| x.1 as u32).collect();
        Ok((
            Tensor::from_vec(starts, r.len(), device)?,
            Tensor::from_vec(ends, r.len(), device)?,
        ))
    })
}

/// Runs `f` with the key ranges `r` read from `starts` and `ends` (`[rows]` u32 each, on the
/// device) wherever attention would upload them: a CUDA graph of a decode step captures these
/// tensors, whose contents the next replay's ranges replace. The tensors are forgotten after `f`.
#[cfg(feature = "cuda")]
pub fn with_ranges_in<R>(
    r: &[(usize, usize)],
    starts: &Tensor,
    ends: &Tensor,
    f: impl FnOnce() -> R,
) -> R {
    RANGES.with(|last| {
        *last.borrow_mut() = Some((
            r.to_vec(),
            starts.device().clone(),
            starts.clone(),
            ends.clone(),
        ));
    });
    let out = f();
    RANGES.with(|last| *last.borrow_mut() = None);
    out
}

#[cfg(feature = "cuda")]
thread_local! {
    /// The last key ranges uploaded on this thread (see [`uploaded_ranges`]).
    static RANGES: std::cell::RefCell<crate::device::memory::Kept<Vec<(usize, usize)>>> =
        const { std::cell::RefCell::new(None) };
}

/// The padded layout of `mask`'s packed rows ([`super::unpack::Unpacked::of`]), made once for
/// every layer of a pass: the last one is kept per thread and reused while the mask, the shape
/// and the device are the same (its index tensors are uploaded from pageable host memory, which
/// waits for the stream: once a layer would stall the host 28 times a pass).
#[cfg(feature = "cuda")]
fn unpacked(
    mask: &AttnMask,
    b: usize,
    s: usize,
    device: &candle_core::Device,
) -> Result<Option<super::unpack::Unpacked>> {
    type Kept = Option<(
        AttnMask,
        (usize, usize),
        candle_core::Device,
        Option<super::unpack::Unpacked>,
    )>;
    thread_local! {
        static LAST: std::cell::RefCell<Kept> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((m, dims, d, u)) = last.as_ref()
            && *dims == (b, s)
            && d.same_device(device)
            && m == mask
        {
            return Ok(u.clone());
        }
        let u = super::unpack::Unpacked::of(mask, b, s, device)?;
        *last = Some((mask.clone(), (b, s), device.clone(), u.clone()));
        Ok(u)
    })
}

/// `t` `[b, h, t, d]` as the matmuls take it: as it is when it is a window of positions of a
/// contiguous buffer (the KV cache's: rows of `d` contiguous, heads evenly spaced), else a
/// contiguous copy.
fn batched(t: &Tensor) -> Result<Tensor> {
    let (_, h, _, d) = t.dims4()?;
    let st = t.stride();
    if st[3] == 1 && st[2] == d && st[0] == st[1] * h {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Attention inputs prepared for either pass: `q` regrouped as `[b, kv, rep * s, d]` so GQA needs
/// no copy of K/V.
fn grouped(q: &Tensor, kv_heads: usize) -> Result<(Tensor, usize, usize, usize, usize)> {
    let (b, h, s, d) = q.dims4()?;
    let rep = h / kv_heads;
    Ok((q.reshape((b, kv_heads, rep * s, d))?, b, h, s, d))
}

/// `softmax(q kᵀ * scale + mask) v` in f32 softmax arithmetic, GQA without copying K/V.
/// With `saved`, records what [`attention_backward`] needs.
///
/// # Shapes
/// `q: [b, heads, s, d]`, `k`/`v`: `[b, kv_heads, t, d]` -> `[b, heads, s, d]`. Transposed views
/// of `[b, s, heads, d]` tensors (the projections' layout) are taken as they are by cuDNN, and
/// its output and gradients then lie the same way.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    saved: Option<&mut Option<AttnSaved>>,
) -> Result<Tensor> {
    let kv = k.dim(1)?;
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    // Decoding (one query position a row, nothing to save): one kernel a layer.
    #[cfg(feature = "cuda")]
    if saved.is_none() && super::cuda::decode_attn::applies(q, k, v, mask) {
        let ranges = match &mask.key_ranges {
            Some(r) => Some(uploaded_ranges(r, q.device())?),
            None => None,
        };
        return super::cuda::decode_attn::forward(q, k, v, mask, ranges.as_ref(), scale);
    }
    #[cfg(feature = "cuda")]
    if mask.segments.is_some()
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
    {
        let (b, _, s, _) = q.dims4()?;
        if let Some(u) = unpacked(mask, b, s, q.device())?
            && cudnn_ok(q, k, &u.mask())
        {
            return attention_unpacked(&u, q, k, v, saved);
        }
    }
    #[cfg(feature = "cuda")]
    if cudnn_ok(q, k, mask) {
        match super::cuda::sdpa::forward(q, k, v, mask, scale) {
            Ok((qc, kc, vc, out, lse)) => {
                if let Some(slot) = saved {
                    *slot = Some(AttnSaved {
                        q: qc,
                        k: kc,
                        v: vc,
                        out: out.clone(),
                        rows: Rows::Cudnn(lse),
                        mask: mask.clone(),
                        scale,
                    });
                }
                return Ok(out);
            }
            // A shape cuDNN has no plan for (the shim remembers it): the softmax kernels.
            Err(e) => crate::notice::say(format!(
                "notice: {e}; using qscript's softmax kernels for this shape"
            )),
        }
    }
    let (q, k, v) = (&q.contiguous()?, &batched(k)?, &batched(v)?);
    let (qg, b, h, s, d) = grouped(q, kv)?;
    let t = k.dim(2)?;
    let rep = h / kv;
    let (out, max, log_sum, bias) = forward_parts(&qg, k, v, mask, scale, (b, kv, rep, s, t))?;
    let out = out.reshape((b, h, s, d))?;
    if let Some(slot) = saved {
        *slot = Some(AttnSaved {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            out: out.clone(),
            rows: Rows::Softmax { max, log_sum, bias },
            mask: mask.clone(),
            scale,
        });
    }
    Ok(out)
}

/// The output `[b, kv, rep * s, d]`, row max, row log-sum and (reference path) the bias: the
/// fused softmax kernel on CUDA, the composite ops elsewhere.
fn forward_parts(
    qg: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    dims: (usize, usize, usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let (b, _, _, s, t) = dims;
    #[cfg(feature = "cuda")]
    if fused_ok(qg, mask) {
        let (_, kv, rep, _, _) = dims;
        let rm = row_mask(mask, b, kv * rep, s, qg.device())?;
        let raw = qg.matmul(&k.t()?)?.reshape((b * kv * rep * s, t))?;
        let (probs, max, log_sum) =
            super::cuda::softmax::attn_softmax_fwd(&raw, &rm, scale as f32)?;
        let out = probs.reshape((b, kv, rep * s, t))?.matmul(v)?;
        return Ok((out, max, log_sum, None));
    }
    let bias = mask.bias(b, s, t, qg.device())?;
    let scores = logits(qg, k, bias.as_ref(), scale, dims)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let probs = e.broadcast_div(&sum)?.to_dtype(qg.dtype())?;
    Ok((probs.matmul(v)?, max, sum.log()?, bias))
}

/// Scaled, masked scores in f32 `[b, kv, rep * s, t]`.
fn logits(
    qg: &Tensor,
    k: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    dims: (usize, usize, usize, usize, usize),
) -> Result<Tensor> {
    let (b, kv, rep, s, t) = dims;
    let scores = (qg.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    match bias {
        Some(bias) => scores
            .reshape((b, kv, rep, s, t))?
            .broadcast_add(bias)?
            .reshape((b, kv, rep * s, t)),
        None => Ok(scores),
    }
}

/// [`attention`] over packed rows as the padded batch `u` of their examples (on CUDA that batch
/// takes cuDNN's fused attention, so packed rows need no `s x s` buffer either).
pub fn attention_unpacked(
    u: &super::unpack::Unpacked,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: Option<&mut Option<AttnSaved>>,
) -> Result<Tensor> {
    let s = q.dim(2)?;
    let dev = q.device();
    let span = crate::profile::span("attn.gather", dev);
    let (qg, kg, vg) = (u.gather(q)?, u.gather(k)?, u.gather(v)?);
    drop(span);
    let mut inner = None;
    let want = saved.is_some();
    let span = crate::profile::span("attn.padded", dev);
    let out = attention(&qg, &kg, &vg, &u.mask(), want.then_some(&mut inner))?;
    drop(span);
    if let (Some(slot), Some(inner)) = (saved, inner) {
        // The padded batch's own saved tensors (the packed q, k, v are not kept a second time).
        *slot = Some(AttnSaved {
            q: inner.q.clone(),
            k: inner.k.clone(),
            v: inner.v.clone(),
            out: inner.out.clone(),
            mask: inner.mask.clone(),
            scale: inner.scale,
            rows: Rows::Unpacked(Box::new(inner), u.clone(), s),
        });
    }
    let _span = crate::profile::span("attn.scatter", dev);
    u.scatter(&out, s)
}

/// Gradients `(dq, dk, dv)` of [`attention`] from `d_out`; the probabilities are recomputed from
/// the saved row max and log-sum.
pub fn attention_backward(saved: &AttnSaved, d_out: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let AttnSaved {
        q,
        k,
        v,
        out,
        rows,
        scale,
        ..
    } = saved;
    let (max, log_sum, bias) = match rows {
        Rows::Softmax { max, log_sum, bias } => (max, log_sum, bias),
        Rows::Unpacked(inner, u, s) => {
            let s = *s;
            let dev = d_out.device();
            let span = crate::profile::span("attn.bwd.gather", dev);
            let d_padded = u.gather_grad(d_out)?;
            drop(span);
            let span = crate::profile::span("attn.bwd.padded", dev);
            let (dq, dk, dv) = attention_backward(inner, &d_padded)?;
            drop(span);
            let _span = crate::profile::span("attn.bwd.scatter", dev);
            return Ok((
                u.scatter_sum(&dq, s)?,
                u.scatter_sum(&dk, s)?,
                u.scatter_sum(&dv, s)?,
            ));
        }
        #[cfg(feature = "cuda")]
        Rows::Cudnn(lse) => {
            return super::cuda::sdpa::backward(q, k, v, out, lse, d_out, &saved.mask, *scale);
        }
    };
    let kv = k.dim(1)?;
    let (qg, b, h, s, d) = grouped(q, kv)?;
    let t = k.dim(2)?;
    let rep = h / kv;
    let dout = d_out.contiguous()?.reshape((b, kv, rep * s, d))?;
    let dtype = q.dtype();
    #[cfg(feature = "cuda")]
    if fused_ok(q, &saved.mask) {
        let rm = row_mask(&saved.mask, b, h, s, q.device())?;
        let rows = b * h * s;
        let raw = qg.matmul(&k.t()?)?.reshape((rows, t))?;
        let dp = dout.matmul(&v.t()?)?.reshape((rows, t))?;
        let delta = (dout.to_dtype(DType::F32)?
            * out.reshape((b, kv, rep * s, d))?.to_dtype(DType::F32)?)?
        .sum(D::Minus1)?
        .reshape(rows)?;
        let (p, ds) = super::cuda::softmax::attn_softmax_bwd(
            &raw,
            &dp,
            max,
            log_sum,
            &delta,
            &rm,
            *scale as f32,
        )?;
        let (p, ds) = (
            p.reshape((b, kv, rep * s, t))?,
            ds.reshape((b, kv, rep * s, t))?,
        );
        let dv = p.t()?.matmul(&dout)?;
        let dq = ds.matmul(k)?.reshape((b, h, s, d))?;
        let dk = ds.t()?.matmul(&qg)?;
        return Ok((dq, dk, dv));
    }
    let scores = logits(&qg, k, bias.as_ref(), *scale, (b, kv, rep, s, t))?;
    // Row max and log-sum kept apart: a fully masked row's max is f32::MIN, and adding the
    // log-sum to it would round away.
    let probs = scores.broadcast_sub(max)?.broadcast_sub(log_sum)?.exp()?;
    let dv = probs.to_dtype(dtype)?.t()?.matmul(&dout)?;
    let dp = dout.matmul(&v.t()?)?.to_dtype(DType::F32)?;
    let delta = (dout.to_dtype(DType::F32)?
        * out.reshape((b, kv, rep * s, d))?.to_dtype(DType::F32)?)?
    .sum_keepdim(D::Minus1)?;
    let ds = (probs * dp.broadcast_sub(&delta)?)?;
    let ds = (ds * *scale)?.to_dtype(dtype)?;
    let dq = ds.matmul(k)?.reshape((b, h, s, d))?;
    let dk = ds.t()?.matmul(&qg)?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
        let (b, h, s, d) = q.dims4().unwrap();
        let kv = k.dim(1).unwrap();
        let rep = h / kv;
        let expand = |x: &Tensor| {
            let (b, kv, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kv, rep, t, d))
                .unwrap()
                .reshape((b, kv * rep, t, d))
                .unwrap()
        };
        let (k, v) = (expand(k), expand(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let scores = scores.broadcast_add(bias).unwrap();
        let p = crate::nn::ops::softmax_last_dim(&scores).unwrap();
        p.matmul(&v).unwrap().reshape((b, h, s, d)).unwrap()
    }

    #[test]
    fn forward_and_backward_match_autograd_with_gqa_and_padding() {
        let dev = candle_core::Device::Cpu;
        let (b, h, kv, s, d) = (2, 6, 2, 5, 4);
        let q = Var::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, kv, s, d), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, kv, s, d), &dev).unwrap();
        for mask in [
            AttnMask::causal(0),
            AttnMask::right_padded(&[5, 3]),
            AttnMask {
                causal: true,
                offset: 0,
                key_ranges: Some(vec![(2, 5), (0, 5)]),
                segments: None,
                shared: None,
            },
            AttnMask::right_padded(&[5, 4]).with_segments(Some(vec![vec![2], vec![1, 3]])),
        ] {
            let bias = mask.bias(b, s, s, &dev).unwrap().unwrap();
            let bias = bias.reshape((b, 1, s, s)).unwrap();
            let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias);
            let mut saved = None;
            let got = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask,
                Some(&mut saved),
            )
            .unwrap();
            let diff = crate::testing::max_abs_diff;
            assert!(diff(&got, &want) < 1e-5);
            let g = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
            let grads = want.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let (dq, dk, dv) = attention_backward(saved.as_ref().unwrap(), &g).unwrap();
            // Fully masked query rows (left padding) have no defined gradient in either.
            assert!(diff(&dq, grads.get(q.as_tensor()).unwrap()) < 1e-4);
            assert!(diff(&dk, grads.get(k.as_tensor()).unwrap()) < 1e-4);
            assert!(diff(&dv, grads.get(v.as_tensor()).unwrap()) < 1e-4);
        }
    }
}
