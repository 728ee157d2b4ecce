//! The objective: what a batch's loss is, over the model's final hidden states. The engine runs
//! the blocks forward, hands the normed hidden states and the head to the objective, and runs
//! the blocks backward from the gradient it returns; the loop divides each window's loss by the
//! objective's [`Objective::normalizer`]. Supervised fine-tuning is [`CausalLm`]; preference
//! training (DPO, IPO, ORPO, SimPO, KTO) is [`super::preference::Preference`].

use candle_core::Tensor;

use crate::data::batch::{Batch, PrefRows};
use crate::data::pair_rows::PairView;
use crate::data::sft::{Example, IGNORE};
use crate::nn::GradSink;
use crate::nn::loss::{LossOut, causal_lm_loss};

/// A batch's labels as the objective sees them: `[rows, seq]` row-major, [`IGNORE`] where
/// nothing is learned.
#[derive(Clone, Copy, Debug)]
pub struct Labels<'a> {
    /// The labels.
    pub labels: &'a [i64],
    /// Rows of the batch.
    pub rows: usize,
    /// Tokens a row.
    pub seq: usize,
    /// The batch's token ids, `[rows, seq]` row-major.
    pub input_ids: &'a [u32],
    /// Real (unpadded) tokens of each row.
    pub lens: &'a [usize],
    /// Preference examples, two rows each (empty for one row an example).
    pub pref: &'a [PrefRows],
}

impl<'a> Labels<'a> {
    /// `batch`'s labels, `[b, s]` as its rows lie.
    pub fn of(batch: &'a Batch) -> candle_core::Result<Self> {
        let (rows, seq) = batch.input_ids.dims2()?;
        Ok(Self {
            labels: &batch.labels_host,
            rows,
            seq,
            input_ids: &batch.ids_host,
            lens: &batch.lens,
            pref: &batch.pref,
        })
    }

    /// The final hidden states `hidden` (`[rows * seq, h]`) and these labels as the objective
    /// reads them: as they are, or a preference batch's two rows a pair (`view`).
    pub fn viewed(
        self,
        hidden: &Tensor,
        view: Option<&'a PairView>,
    ) -> candle_core::Result<(Tensor, Self)> {
        let Some(v) = view else {
            return Ok((hidden.clone(), self));
        };
        let labels = Self {
            labels: &v.labels,
            rows: v.rows,
            seq: v.seq,
            input_ids: &v.ids,
            lens: &v.lens,
            pref: self.pref,
        };
        Ok((v.pick(hidden)?, labels))
    }
}

/// An objective's metrics: `(name, sum, count)`.
pub type Metrics = Vec<(&'static str, f64, f64)>;

/// Adds `more` into `into`, name by name.
pub fn add_metrics(into: &mut Metrics, more: Metrics) {
    for (name, sum, count) in more {
        match into.iter_mut().find(|m| m.0 == name) {
            Some(m) => {
                m.1 += sum;
                m.2 += count;
            }
            None => into.push((name, sum, count)),
        }
    }
}

/// See the module doc.
pub trait Objective: Send + Sync + std::fmt::Debug {
    /// The loss of a batch from its final (normed) hidden states `hidden` (`[rows * seq,
    /// hidden]`, on the head's device) and the head weight `head`, divided by `denom`: a device
    /// scalar, the count it sums over, and with `sink` the gradient into `hidden` (the head's
    /// own gradient, when it trains, goes into `sink`).
    fn loss(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        labels: Labels<'_>,
        denom: f64,
        sink: Option<&mut dyn GradSink>,
    ) -> candle_core::Result<LossOut>;

    /// What a window's loss is divided by, so that accumulating k micro-batches equals one batch
    /// k times larger: the whole window's count.
    fn normalizer(&self, examples: &[&Example]) -> usize;

    /// The names of the metrics [`Objective::loss`] reports, in one order (the ranks sum them
    /// in this layout, whichever of them a rank's share gave).
    fn metric_names(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// Supervised fine-tuning (and continued pretraining): the mean cross-entropy of each learned
/// token given the ones before it, through the fused linear + cross-entropy (no full logits).
#[derive(Clone, Copy, Debug, Default)]
pub struct CausalLm;

impl Objective for CausalLm {
    fn loss(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        labels: Labels<'_>,
        denom: f64,
        sink: Option<&mut dyn GradSink>,
    ) -> candle_core::Result<LossOut> {
        let targets = shifted_targets(labels.labels, labels.rows, labels.seq);
        causal_lm_loss(hidden, head, &targets, denom, sink)
    }

    fn normalizer(&self, examples: &[&Example]) -> usize {
        examples
            .iter()
            .map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count())
            .sum()
    }
}

/// Targets for the hidden state at each position: the next token's label, [`IGNORE`] at the end
/// of each row. `labels` is `[b, s]` row-major.
pub fn shifted_targets(labels: &[i64], b: usize, s: usize) -> Vec<i64> {
    let mut out = vec![IGNORE; b * s];
    for r in 0..b {
        for p in 0..s.saturating_sub(1) {
            out[r * s + p] = labels[r * s + p + 1];
        }
    }
    out
}
