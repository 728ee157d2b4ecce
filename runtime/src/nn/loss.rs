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
    /// Targets that counted (not -100).
    pub count: usize,
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
    let vocab = head.dim(0)?;
    let rows = if hidden.device().is_cuda() {
        // The fused kernel keeps only the chunk's logits and dlogits, in the model's dtype.
        let trained = grads.as_ref().is_some_and(|g| g.wants(head));
        let budget = chunk_budget(vocab, head.dim(1)?, trained);
        (budget / (vocab.max(1) * 2 * hidden.dtype().size_in_bytes())).max(1)
    } else {
        chunk_rows(vocab)
    };
    loss_in_chunks(hidden, head, targets, denom, grads, rows)
}

fn loss_in_chunks(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[i64],
    denom: f64,
    grads: Option<&mut dyn GradSink>,
    step: usize,
) -> Result<LossOut> {
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
        return Ok(LossOut {
            loss: Tensor::zeros((), DType::F32, device)?,
            d_hidden: want.then(|| hidden.zeros_like()).transpose()?,
            count,
        });
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
    let mut grads = grads;
    for start in (0..count).step_by(step) {
        let len = step.min(count - start);
        let hc = picked.narrow(0, start, len)?;
        let target = Tensor::from_slice(&labels[start..start + len], (len, 1), device)?;
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
            let part = rows.sum_all()?;
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
        let part = lse.sub(&shifted.gather(&target, 1)?)?.sum_all()?;
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
            let dlogits = (dlogits / denom)?.to_dtype(dtype)?;
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
    Ok(LossOut {
        loss,
        d_hidden,
        count,
    })
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
        let out = loss_in_chunks(
            hidden.as_tensor(),
            head.as_tensor(),
            &targets,
            3.0,
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
