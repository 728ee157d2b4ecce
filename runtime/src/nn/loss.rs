//! The causal-LM loss from the final hidden states: `loss(hidden, head, targets, denom)`.
//! Rows whose target is -100 are dropped before the head matmul; the rest go through the head in
//! chunks whose size comes from a memory budget, so the `[tokens, vocab]` logits never exist at
//! once (and never in f32 beyond one chunk). It returns the summed token loss over `denom` on the
//! device, `dHidden`, and adds `dHead` when the head is trained. A fused linear + cross-entropy
//! kernel replaces the chunk body per device without touching callers.

use candle_core::{D, DType, Result, Tensor};

use super::GradSink;

/// Bytes the temporaries of one chunk may take (logits and dlogits in the model's dtype on CUDA;
/// f32 logits, shifted, exp and softmax in the reference). 256 MiB keeps a chunk's GEMM large
/// (over 400 rows of a 152k vocabulary in bf16) while the loss adds little to the step's peak.
pub const CHUNK_BUDGET_BYTES: usize = 256 << 20;

/// The result of [`causal_lm_loss`].
#[derive(Debug)]
pub struct LossOut {
    /// `Σ token losses / denom`, an f32 scalar on the device (read it only when it is needed).
    pub loss: Tensor,
    /// `d loss / d hidden` `[n, h]`, when gradients were asked for.
    pub d_hidden: Option<Tensor>,
    /// Targets that counted (not -100); for a preference objective, examples.
    pub count: usize,
    /// What the objective adds to the log record: `(name, sum, count)` over the batch (the
    /// record shows each sum over its count, over the steps since the last record).
    pub metrics: Vec<(&'static str, f64, f64)>,
}

/// Bytes one chunk's logits and dlogits may take on CUDA: [`CHUNK_BUDGET_BYTES`], or, when the
/// head is trained, twice its f32 gradient (within 256 MiB..1 GiB): every chunk adds into that
/// whole gradient once, so fewer, larger chunks move fewer bytes.
pub fn chunk_budget(vocab: usize, hidden: usize, head_trained: bool) -> usize {
    if head_trained {
        (vocab * hidden * 8).clamp(CHUNK_BUDGET_BYTES, 1 << 30)
    } else {
        CHUNK_BUDGET_BYTES
    }
}

/// Rows per chunk for a vocabulary of `vocab` under [`CHUNK_BUDGET_BYTES`].
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BUDGET_BYTES / (vocab.max(1) * 16)).max(1)
}

/// Cross-entropy of `hidden · headᵀ` against `targets` (-100 = skip), summed and divided by
/// `denom`. With `grads`, also `dHidden` and, if `grads` wants `head`, its gradient.
///
/// # Shapes
/// `hidden: [n, h]`, `head: [vocab, h]`, `targets.len() == n`.
pub fn causal_lm_loss(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[i64],
    denom: f64,
    grads: Option<&mut dyn GradSink>,
) -> Result<LossOut> {
    let trained = grads.as_ref().is_some_and(|g| g.wants(head));
    let rows = rows_for(hidden, head, trained)?;
    loss_in_chunks(hidden, head, targets, Scale::Uniform(denom), grads, rows).map(|(out, _)| out)
}

/// Rows per chunk of the head's logits for `hidden` and `head`: on CUDA the fused kernel keeps
/// only the chunk's logits and dlogits, in the model's dtype, under [`chunk_budget`].
fn rows_for(hidden: &Tensor, head: &Tensor, trained: bool) -> Result<usize> {
    let vocab = head.dim(0)?;
    Ok(if hidden.device().is_cuda() {
        let budget = chunk_budget(vocab, head.dim(1)?, trained);
        (budget / (vocab.max(1) * 2 * hidden.dtype().size_in_bytes())).max(1)
    } else {
        chunk_rows(vocab)
    })
}

/// The log-probability of each target under `hidden · headᵀ` (0 where the target is -100), in
/// f32 on the host, without gradients: what a preference objective sums per sequence.
pub fn token_logps(hidden: &Tensor, head: &Tensor, targets: &[i64]) -> Result<Vec<f32>> {
    let rows = rows_for(hidden, head, false)?;
    let (_, ce) = loss_in_chunks(hidden, head, targets, Scale::Uniform(1.0), None, rows)?;
    let ce = match ce {
        Some(t) => t.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => Vec::new(),
    };
    let mut out = vec![0f32; targets.len()];
    let mut k = 0;
    for (o, &t) in out.iter_mut().zip(targets) {
        if t != -100 {
            *o = -ce[k];
            k += 1;
        }
    }
    Ok(out)
}

/// The gradient of `Σ_t weights[t] · log p(targets[t])` into `hidden` (returned) and into the
/// head when `grads` wants it: the backward of [`token_logps`] once an objective knows how much
/// each token's log-probability counts.
pub fn logp_backward(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[i64],
    weights: &[f32],
    grads: &mut dyn GradSink,
) -> Result<Tensor> {
    if weights.len() != targets.len() {
        candle_core::bail!(
            "logp_backward: {} weights for {} targets",
            weights.len(),
            targets.len()
        );
    }
    let rows = rows_for(hidden, head, grads.wants(head))?;
    // A token's loss is -log p: its gradient is the cross-entropy's, times -weight.
    let scales: Vec<f32> = targets
        .iter()
        .zip(weights)
        .filter(|(t, _)| **t != -100)
        .map(|(_, w)| -w)
        .collect();
    let (out, _) = loss_in_chunks(
        hidden,
        head,
        targets,
        Scale::PerTarget(&scales),
        Some(grads),
        rows,
    )?;
    out.d_hidden
        .ok_or_else(|| candle_core::Error::Msg("logp_backward: no gradient".into()))
}

/// How each token's cross-entropy gradient is scaled.
#[derive(Clone, Copy)]
enum Scale<'a> {
    /// Every token by `1 / denom` (the loss is the sum over `denom`).
    Uniform(f64),
    /// Each counted token (targets not -100, in order) by its own factor.
    PerTarget(&'a [f32]),
}

/// The chunked cross-entropy; with it, each counted token's cross-entropy (`[count]`, f32).
fn loss_in_chunks(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[i64],
    scale: Scale<'_>,
    grads: Option<&mut dyn GradSink>,
    step: usize,
) -> Result<(LossOut, Option<Tensor>)> {
    let denom = match scale {
        Scale::Uniform(d) => d,
        Scale::PerTarget(_) => 1.0,
    };
    let (n, h) = hidden.dims2()?;
    let vocab = head.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("loss: {} targets for {n} hidden rows", targets.len());
    }
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t == -100 {
            continue;
        }
        let Some(t) = u32::try_from(t).ok().filter(|&t| (t as usize) < vocab) else {
            candle_core::bail!(
                "label {t} at token {i} is outside the vocabulary (0..{vocab}); labels are token ids or -100"
            );
        };
        rows.push(i as u32);
        labels.push(t);
    }
    let device = hidden.device();
    let count = rows.len();
    let want = grads.is_some();
    if count == 0 {
        return Ok((
            LossOut {
                loss: Tensor::zeros((), DType::F32, device)?,
                d_hidden: want.then(|| hidden.zeros_like()).transpose()?,
                count,
                metrics: Vec::new(),
            },
            None,
        ));
    }
    if let Scale::PerTarget(w) = scale
        && w.len() != count
    {
        candle_core::bail!("loss: {} scales for {count} counted targets", w.len());
    }
    let all = count == n;
    let idx = Tensor::from_vec(rows, count, device)?;
    let picked = if all {
        hidden.clone()
    } else {
        hidden.index_select(&idx, 0)?
    };
    let dtype = hidden.dtype();
    let mut total: Option<Tensor> = None;
    let mut d_rows = Vec::new();
    let mut token_ce = Vec::new();
    let mut grads = grads;
    // Uploaded once, not a chunk at a time: a copy from pageable host memory waits for the stream.
    let targets = Tensor::from_vec(labels, (count, 1), device)?;
    let scales = match scale {
        Scale::PerTarget(w) => Some(Tensor::from_slice(w, (count, 1), device)?),
        Scale::Uniform(_) => None,
    };
    for start in (0..count).step_by(step) {
        let len = step.min(count - start);
        let hc = picked.narrow(0, start, len)?;
        let target = targets.narrow(0, start, len)?;
        // A per-token scale multiplies each row of dlogits.
        let column = scales
            .as_ref()
            .map(|c| c.narrow(0, start, len))
            .transpose()?;
        #[cfg(feature = "cuda")]
        if crate::nn::ops::fused(&hc, head) {
            let logits = hc.matmul(&head.t()?)?;
            let sink = grads.as_deref_mut();
            let (rows, dlogits) = super::cuda::cross_entropy::ce_rows(
                &logits,
                &target,
                (1.0 / denom) as f32,
                sink.is_some(),
            )?;
            let dlogits = match (&column, dlogits) {
                (Some(c), Some(d)) => Some(d.broadcast_mul(&c.to_dtype(d.dtype())?)?),
                (_, d) => d,
            };
            let part = rows.sum_all()?;
            token_ce.push(rows.flatten_all()?);
            total = Some(match total {
                Some(t) => t.add(&part)?,
                None => part,
            });
            if let (Some(sink), Some(dlogits)) = (sink, dlogits) {
                if sink.wants(head) {
                    sink.add_matmul(head, &dlogits.t()?, &hc, 1.0)?;
                }
                d_rows.push(dlogits.matmul(head)?);
            }
            continue;
        }
        let logits = hc.matmul(&head.t()?)?.to_dtype(DType::F32)?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let ce = lse.sub(&shifted.gather(&target, 1)?)?;
        let part = ce.sum_all()?;
        token_ce.push(ce.flatten_all()?);
        total = Some(match total {
            Some(t) => t.add(&part)?,
            None => part,
        });
        if let Some(sink) = grads.as_deref_mut() {
            let minus_one = Tensor::full(-1f32, (len, 1), device)?;
            let dlogits = shifted
                .broadcast_sub(&lse)?
                .exp()?
                .scatter_add(&target, &minus_one, 1)?;
            let dlogits = match &column {
                Some(c) => dlogits.broadcast_mul(c)?,
                None => (dlogits / denom)?,
            }
            .to_dtype(dtype)?;
            if sink.wants(head) {
                sink.add_matmul(head, &dlogits.t()?, &hc, 1.0)?;
            }
            d_rows.push(dlogits.matmul(head)?);
        }
    }
    let loss = (total.unwrap_or(Tensor::zeros((), DType::F32, device)?) / denom)?;
    let d_hidden = if want {
        let d = Tensor::cat(&d_rows, 0)?;
        Some(if all {
            d
        } else {
            crate::nn::ops::put_rows(Tensor::zeros((n, h), dtype, device)?, &idx, &d)?
        })
    } else {
        None
    };
    Ok((
        LossOut {
            loss,
            d_hidden,
            count,
            metrics: Vec::new(),
        },
        Some(Tensor::cat(&token_ce, 0)?),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    struct Head<'a>(&'a Tensor, Option<Tensor>);
    impl GradSink for Head<'_> {
        fn wants(&self, p: &Tensor) -> bool {
            p.id() == self.0.id()
        }
        fn add(&mut self, _: &Tensor, g: &Tensor) -> Result<()> {
            self.1 = Some(match self.1.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
            Ok(())
        }
    }

    /// Values and gradients equal autograd through the reference cross-entropy, with skipped
    /// rows and several chunks.
    #[test]
    fn matches_the_reference_cross_entropy() {
        let dev = Device::Cpu;
        let hidden = Var::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let head = Var::randn(0f32, 1.0, (11, 5), &dev).unwrap();
        let targets = [3i64, -100, 0, 10, -100, 4, 4];
        let logits = hidden
            .as_tensor()
            .matmul(&head.as_tensor().t().unwrap())
            .unwrap();
        let labels = Tensor::new(&targets, &dev).unwrap();
        let (mean, n) = crate::nn::ops::cross_entropy(&logits, &labels).unwrap();
        let want = (mean * (n as f64 / 3.0)).unwrap();
        let g = want.backward().unwrap();
        let mut sink = Head(head.as_tensor(), None);
        let (out, _) = loss_in_chunks(
            hidden.as_tensor(),
            head.as_tensor(),
            &targets,
            Scale::Uniform(3.0),
            Some(&mut sink),
            2,
        )
        .unwrap();
        assert_eq!(out.count, 5);
        let diff = crate::testing::max_abs_diff;
        assert!(diff(&out.loss, &want) < 1e-5);
        assert!(
            diff(
                out.d_hidden.as_ref().unwrap(),
                g.get(hidden.as_tensor()).unwrap()
            ) < 1e-5
        );
        assert!(diff(sink.1.as_ref().unwrap(), g.get(head.as_tensor()).unwrap()) < 1e-5);
        let e = causal_lm_loss(hidden.as_tensor(), head.as_tensor(), &[11; 7], 1.0, None);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("outside the vocabulary")
        );
    }
}
