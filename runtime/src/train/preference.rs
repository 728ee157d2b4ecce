//! Preference objectives with TRL's names and maths: DPO (`loss_type` `sigmoid`, `ipo`, `hinge`,
//! `robust`, with `label_smoothing` and `rpo_alpha`), ORPO and SimPO (reference-free), and KTO
//! (unpaired answers, the KL estimate from mismatched pairs).
//!
//! Each preference example is one row of a batch, its prompt once and both answers after it
//! ([`crate::data::pair_rows`]), so the prompt's tokens run through the model once; the
//! objective reads it as TRL's two rows (prompt + answer each). The loss
//! takes the final hidden states once: the log-probability of every learned token comes from
//! the chunked linear + log-softmax (no full logits), each row's sum (or mean) goes into the
//! objective's formula on the host in f64, and the formula's derivative with respect to each
//! row's sum becomes one weight per token, so the backward is the same chunked pass with
//! per-token weights ([`crate::nn::loss::logp_backward`]). The reference model's
//! log-probabilities are computed once, before training ([`reference_logps`]), by the model as
//! the call starts: with a fresh LoRA adapter that is the base model (TRL's adapters-off
//! reference), and after SFT in the same session it is the SFT policy, with no second copy.

use candle_core::Tensor;
use serde::Deserialize;

use super::objective::{Labels, Metrics, Objective};
use crate::cancel::CancelToken;
use crate::data::batch::collate;
use crate::data::sft::{Example, IGNORE};
use crate::model::Model;
use crate::nn::GradSink;
use crate::nn::loss::{LossOut, logp_backward, token_logps};
use crate::{Error, Result};

/// The options of `train::dpo` and `train::kto` beside HF's TrainingArguments, with TRL's names
/// (and LLaMA-Factory's `pref_beta`, `pref_loss`, `pref_ftx`, `kto_chosen_weight`,
/// `kto_rejected_weight`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PrefConfig {
    /// `sigmoid` (DPO), `ipo`, `hinge`, `robust`, `orpo`, `simpo`; `kto` for KTO.
    #[serde(alias = "pref_loss")]
    pub loss_type: String,
    /// The strength of the reference (DPO's β; ORPO's λ; SimPO's β; KTO's β).
    #[serde(alias = "pref_beta")]
    pub beta: f64,
    /// Robust DPO's (and SimPO's) probability that a label is flipped, in [0, 0.5).
    pub label_smoothing: f64,
    /// The weight of the SFT term (the chosen answers' token loss) added to DPO or SimPO.
    #[serde(alias = "pref_ftx", alias = "cpo_alpha")]
    pub rpo_alpha: Option<f64>,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// KTO: the weight of desirable answers' losses.
    #[serde(alias = "kto_chosen_weight")]
    pub desirable_weight: f64,
    /// KTO: the weight of undesirable answers' losses.
    #[serde(alias = "kto_rejected_weight")]
    pub undesirable_weight: f64,
    /// Accepted for TRL's configs: qscript always computes the reference log-probabilities in
    /// one pass before training (the same values as a reference pass each step).
    pub precompute_ref_log_probs: bool,
}

impl Default for PrefConfig {
    fn default() -> Self {
        Self {
            loss_type: "sigmoid".into(),
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: None,
            simpo_gamma: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            precompute_ref_log_probs: true,
        }
    }
}

/// The option names of [`PrefConfig`] (what `train::dpo` takes beside TrainingArguments).
pub const OPTION_NAMES: &[&str] = &[
    "loss_type",
    "pref_loss",
    "beta",
    "pref_beta",
    "label_smoothing",
    "rpo_alpha",
    "pref_ftx",
    "cpo_alpha",
    "simpo_gamma",
    "desirable_weight",
    "kto_chosen_weight",
    "undesirable_weight",
    "kto_rejected_weight",
    "precompute_ref_log_probs",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    Orpo,
    Simpo,
    Kto,
}

/// See the module doc.
#[derive(Clone, Debug)]
pub struct Preference {
    loss: Loss,
    cfg: PrefConfig,
}

impl Preference {
    /// The objective `cfg` names; `kto` for unpaired data (its `loss_type` is then `kto`).
    pub fn new(mut cfg: PrefConfig, kto: bool) -> Result<Self> {
        if kto && cfg.loss_type == "sigmoid" {
            cfg.loss_type = "kto".into();
        }
        let loss = match (cfg.loss_type.as_str(), kto) {
            ("sigmoid", false) => Loss::Sigmoid,
            ("ipo", false) => Loss::Ipo,
            ("hinge", false) => Loss::Hinge,
            ("robust", false) => Loss::Robust,
            ("orpo", false) => Loss::Orpo,
            ("simpo", false) => Loss::Simpo,
            ("kto", true) => Loss::Kto,
            ("kto", false) => {
                return Err(Error::InvalidArgument(
                    "`loss_type: \"kto\"` needs unpaired data (a `label` per answer) and `train::kto`"
                        .into(),
                ));
            }
            (other, true) => {
                return Err(Error::InvalidArgument(format!(
                    "`loss_type: \"{other}\"` is for preference pairs; KTO data trains with `loss_type: \"kto\"`"
                )));
            }
            (other, false) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown `loss_type` `{other}`; use `sigmoid` (DPO), `ipo`, `hinge`, `robust`, `orpo` or `simpo`"
                )));
            }
        };
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(cfg.beta.is_finite() && cfg.beta > 0.0) {
            return bad(format!("`beta` must be above 0, got {}", cfg.beta));
        }
        if !(0.0..0.5).contains(&cfg.label_smoothing) {
            return bad(format!(
                "`label_smoothing` must be in [0, 0.5), got {}",
                cfg.label_smoothing
            ));
        }
        if cfg.label_smoothing > 0.0 && !matches!(loss, Loss::Robust | Loss::Simpo) {
            return bad(format!(
                "`label_smoothing` is for `loss_type` `robust` or `simpo` (TRL's), not `{}`",
                cfg.loss_type
            ));
        }
        if let Some(a) = cfg.rpo_alpha
            && !(a.is_finite() && a >= 0.0)
        {
            return bad(format!("`rpo_alpha` must be 0 or more, got {a}"));
        }
        if cfg.rpo_alpha.is_some_and(|a| a > 0.0) && matches!(loss, Loss::Orpo | Loss::Kto) {
            return bad(format!(
                "`rpo_alpha` adds an SFT term to DPO or SimPO; `{}` has its own",
                cfg.loss_type
            ));
        }
        for (name, w) in [
            ("desirable_weight", cfg.desirable_weight),
            ("undesirable_weight", cfg.undesirable_weight),
        ] {
            if !(w.is_finite() && w > 0.0) {
                return bad(format!("`{name}` must be above 0, got {w}"));
            }
        }
        if !cfg.simpo_gamma.is_finite() {
            return bad(format!(
                "`simpo_gamma` must be a number, got {}",
                cfg.simpo_gamma
            ));
        }
        Ok(Self { loss, cfg })
    }

    /// Whether the objective compares with a reference model (DPO and KTO; not ORPO or SimPO).
    pub fn needs_reference(&self) -> bool {
        !matches!(self.loss, Loss::Orpo | Loss::Simpo)
    }

    /// The loss type, as TRL names it.
    pub fn name(&self) -> &str {
        &self.cfg.loss_type
    }
}

/// `log σ(x)`, stable for any x.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// `σ(x)`.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 - eˣ)` for x < 0 (TRL's `log1mexp`).
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// One example's loss and its derivative with respect to each row's summed log-probability.
struct PerExample {
    loss: f64,
    d_first: f64,
    d_second: f64,
}

/// Each row's learned tokens: their log-probabilities summed, and how many.
#[derive(Clone, Copy, Default)]
struct RowSum {
    sum: f64,
    n: f64,
}

impl Objective for Preference {
    fn loss(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        labels: Labels<'_>,
        denom: f64,
        sink: Option<&mut dyn GradSink>,
    ) -> candle_core::Result<LossOut> {
        let (rows, seq) = (labels.rows, labels.seq);
        let examples = labels.pref.len();
        if examples == 0 || rows != 2 * examples {
            candle_core::bail!(
                "a preference objective needs preference examples (two rows each); this batch has {rows} rows \
                 for {examples} of them: tokenize the data with `data::preference`"
            );
        }
        // The tokens each row learns (the answer), and for ORPO every real token of a chosen
        // row (TRL's ORPO takes its NLL over the prompt and the answer).
        let mut targets = vec![IGNORE; rows * seq];
        let mut answer = vec![false; rows * seq];
        for r in 0..rows {
            for p in 0..seq.saturating_sub(1) {
                let at = r * seq + p;
                let next = labels.labels[at + 1];
                if next != IGNORE {
                    targets[at] = next;
                    answer[at] = true;
                } else if self.loss == Loss::Orpo && r % 2 == 0 && p + 1 < labels.lens[r] {
                    targets[at] = i64::from(labels.input_ids[at + 1]);
                }
            }
        }
        // The tokens of an SFT term: the chosen rows' answers (ORPO: every real token of them).
        let in_nll: Vec<bool> = (0..rows * seq)
            .map(|at| {
                (at / seq) % 2 == 0
                    && match self.loss {
                        Loss::Orpo => targets[at] != IGNORE,
                        _ => answer[at],
                    }
            })
            .collect();
        let logps = token_logps(hidden, head, &targets)?;
        let mut sums = vec![RowSum::default(); rows];
        let mut nll = RowSum::default();
        for (at, &lp) in logps.iter().enumerate() {
            let r = at / seq;
            if answer[at] {
                sums[r].sum += f64::from(lp);
                sums[r].n += 1.0;
            }
            if in_nll[at] {
                nll.sum += f64::from(lp);
                nll.n += 1.0;
            }
        }
        let (per, mut metrics, kl) = self.per_example(&sums, &labels)?;
        let n = examples as f64;
        // The SFT term: the mean token loss of the chosen rows, weighted like one micro-batch of
        // TRL's (its share of the window: examples / denom once divided).
        let nll_weight = match self.loss {
            Loss::Orpo => 1.0,
            Loss::Sigmoid | Loss::Ipo | Loss::Hinge | Loss::Robust | Loss::Simpo => {
                self.cfg.rpo_alpha.unwrap_or(0.0)
            }
            Loss::Kto => 0.0,
        };
        let nll_mean = if nll.n > 0.0 { -nll.sum / nll.n } else { 0.0 };
        let mut total: f64 = per.iter().map(|p| p.loss).sum();
        if nll_weight > 0.0 {
            total += nll_weight * nll_mean * n;
            metrics.push(("nll_loss", nll_mean, 1.0));
        }
        if let Some(kl) = kl {
            metrics.push(("kl", kl, 1.0));
        }
        let device = hidden.device();
        let loss = Tensor::new((total / denom) as f32, device)?;
        let d_hidden = match sink {
            None => None,
            Some(sink) => {
                let mut weights = vec![0f32; rows * seq];
                for (at, w) in weights.iter_mut().enumerate() {
                    let r = at / seq;
                    let mut g = 0.0;
                    if answer[at] {
                        let e = &per[r / 2];
                        g += if r % 2 == 0 { e.d_first } else { e.d_second };
                    }
                    if in_nll[at] && nll_weight > 0.0 && nll.n > 0.0 {
                        g -= nll_weight * n / nll.n;
                    }
                    *w = (g / denom) as f32;
                }
                // Tokens whose weight is zero (KTO's KL rows) skip the backward's head matmul.
                let live: Vec<i64> = targets
                    .iter()
                    .zip(&weights)
                    .map(|(&t, &w)| if w == 0.0 { IGNORE } else { t })
                    .collect();
                Some(logp_backward(hidden, head, &live, &weights, sink)?)
            }
        };
        Ok(LossOut {
            loss,
            d_hidden,
            count: examples,
            metrics,
        })
    }

    fn normalizer(&self, examples: &[&Example]) -> usize {
        examples.len()
    }

    fn metric_names(&self) -> Vec<&'static str> {
        let mut names = match self.loss {
            Loss::Kto => vec![
                "rewards/chosen",
                "logps/chosen",
                "rewards/rejected",
                "logps/rejected",
                "kl",
            ],
            _ => vec![
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
            ],
        };
        if self.loss == Loss::Orpo {
            names.extend(["log_odds_ratio", "log_odds_chosen", "nll_loss"]);
        } else if self.cfg.rpo_alpha.is_some_and(|a| a > 0.0) {
            names.push("nll_loss");
        }
        names
    }
}

impl Preference {
    /// Each example's loss and derivatives, the metrics, and KTO's KL estimate.
    fn per_example(
        &self,
        sums: &[RowSum],
        labels: &Labels<'_>,
    ) -> candle_core::Result<(Vec<PerExample>, Metrics, Option<f64>)> {
        let beta = self.cfg.beta;
        let reference = |i: usize| -> candle_core::Result<[f64; 2]> {
            labels.pref[i].ref_logps.ok_or_else(|| {
                candle_core::Error::Msg(
                    "the reference log-probabilities were not computed for this batch".into(),
                )
            })
        };
        let mut per = Vec::with_capacity(labels.pref.len());
        let mut m: Metrics = Vec::new();
        let mut add = |name: &'static str, v: f64| match m.iter_mut().find(|x| x.0 == name) {
            Some(x) => {
                x.1 += v;
                x.2 += 1.0;
            }
            None => m.push((name, v, 1.0)),
        };
        if self.loss == Loss::Kto {
            // The KL estimate: the mismatched rows' mean log-ratio, at least 0, no gradient.
            let mut kl = 0.0;
            for (i, _) in labels.pref.iter().enumerate() {
                kl += sums[2 * i + 1].sum - reference(i)?[1];
            }
            let kl = (kl / labels.pref.len() as f64).max(0.0);
            for (i, p) in labels.pref.iter().enumerate() {
                let ratio = sums[2 * i].sum - reference(i)?[0];
                let desirable = p.desirable.unwrap_or(true);
                let (x, sign, w) = if desirable {
                    (beta * (ratio - kl), 1.0, self.cfg.desirable_weight)
                } else {
                    (beta * (kl - ratio), -1.0, self.cfg.undesirable_weight)
                };
                let s = sigmoid(x);
                per.push(PerExample {
                    loss: w * (1.0 - s),
                    d_first: -w * s * (1.0 - s) * beta * sign,
                    d_second: 0.0,
                });
                let (reward, logp) = (beta * ratio, sums[2 * i].sum);
                if desirable {
                    add("rewards/chosen", reward);
                    add("logps/chosen", logp);
                } else {
                    add("rewards/rejected", reward);
                    add("logps/rejected", logp);
                }
            }
            return Ok((per, m, Some(kl)));
        }
        for i in 0..labels.pref.len() {
            let (c, r) = (sums[2 * i], sums[2 * i + 1]);
            let (loss, d_c, d_r, rewards, logps) = match self.loss {
                Loss::Orpo | Loss::Simpo => {
                    // Length-normalised log-probabilities, no reference.
                    let (ac, ar) = (c.sum / c.n.max(1.0), r.sum / r.n.max(1.0));
                    let (loss, da_c, da_r) = if self.loss == Loss::Orpo {
                        let lo = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
                        add("log_odds_ratio", log_sigmoid(lo));
                        add("log_odds_chosen", lo);
                        let dl = -beta * sigmoid(-lo);
                        (
                            -beta * log_sigmoid(lo),
                            dl / (1.0 - ac.exp()),
                            -dl / (1.0 - ar.exp()),
                        )
                    } else {
                        let eps = self.cfg.label_smoothing;
                        let z = beta * ((ac - ar) - self.cfg.simpo_gamma / beta);
                        let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
                        let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
                        (loss, beta * dz, -beta * dz)
                    };
                    (
                        loss,
                        da_c / c.n.max(1.0),
                        da_r / r.n.max(1.0),
                        (beta * ac, beta * ar),
                        (ac, ar),
                    )
                }
                _ => {
                    let [rc, rr] = reference(i)?;
                    let (lc, lr) = (c.sum - rc, r.sum - rr);
                    let z = beta * (lc - lr);
                    let (loss, d_c, d_r) = match self.loss {
                        Loss::Sigmoid => {
                            let dz = -sigmoid(-z);
                            (-log_sigmoid(z), beta * dz, -beta * dz)
                        }
                        Loss::Hinge => {
                            let dz = if 1.0 - z > 0.0 { -1.0 } else { 0.0 };
                            ((1.0 - z).max(0.0), beta * dz, -beta * dz)
                        }
                        Loss::Robust => {
                            let eps = self.cfg.label_smoothing;
                            let loss = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z))
                                / (1.0 - 2.0 * eps);
                            let dz =
                                (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps);
                            (loss, beta * dz, -beta * dz)
                        }
                        Loss::Ipo => {
                            // TRL's IPO: the log-ratios per answer token.
                            let (nc, nr) = (c.n.max(1.0), r.n.max(1.0));
                            let d = lc / nc - lr / nr - 1.0 / (2.0 * beta);
                            (d * d, 2.0 * d / nc, -2.0 * d / nr)
                        }
                        _ => unreachable!("handled above"),
                    };
                    (loss, d_c, d_r, (beta * lc, beta * lr), (c.sum, r.sum))
                }
            };
            add("rewards/chosen", rewards.0);
            add("rewards/rejected", rewards.1);
            add(
                "rewards/accuracies",
                if rewards.0 > rewards.1 { 1.0 } else { 0.0 },
            );
            add("rewards/margins", rewards.0 - rewards.1);
            add("logps/chosen", logps.0);
            add("logps/rejected", logps.1);
            per.push(PerExample {
                loss,
                d_first: d_c,
                d_second: d_r,
            });
        }
        Ok((per, m, None))
    }
}

/// The reference log-probabilities of every preference example's two rows under `model` as it
/// is now (no gradients), `batch` examples at a time, polling `cancel` between batches.
pub fn reference_logps(
    model: &Model,
    examples: &mut [Example],
    batch: usize,
    pad_id: u32,
    cancel: &CancelToken,
) -> Result<()> {
    let d = &model.decoder;
    let device = d.device().clone();
    for chunk in examples.chunks_mut(batch.max(1)) {
        cancel.check()?;
        let _span = crate::profile::span("reference pass", &device);
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = collate(&refs, pad_id, None, &device)?;
        let hidden = super::engine::final_hidden(model, &b)?;
        let (hidden, labels) = Labels::of(&b)?.viewed(&hidden, b.view.as_ref())?;
        let (rows, seq) = (labels.rows, labels.seq);
        let targets = super::objective::shifted_targets(labels.labels, rows, seq);
        let logps = token_logps(&hidden, d.head_weight(), &targets)?;
        let mut sums = vec![0f64; rows];
        for (at, lp) in logps.iter().enumerate() {
            sums[at / seq] += f64::from(*lp);
        }
        for (k, e) in chunk.iter_mut().enumerate() {
            if let Some(p) = &mut e.pref {
                p.ref_logps = Some([sums[2 * k], sums[2 * k + 1]]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let e = |cfg: PrefConfig, kto| Preference::new(cfg, kto).unwrap_err().to_string();
        let bad = PrefConfig {
            loss_type: "sigmod".into(),
            ..PrefConfig::default()
        };
        assert!(e(bad, false).contains("unknown `loss_type` `sigmod`"));
        let bad = PrefConfig {
            beta: 0.0,
            ..PrefConfig::default()
        };
        assert!(e(bad, false).contains("`beta` must be above 0, got 0"));
        let bad = PrefConfig {
            loss_type: "robust".into(),
            label_smoothing: 0.5,
            ..PrefConfig::default()
        };
        assert!(e(bad, false).contains("`label_smoothing` must be in [0, 0.5), got 0.5"));
        let bad = PrefConfig {
            loss_type: "ipo".into(),
            ..PrefConfig::default()
        };
        assert!(e(bad, true).contains("is for preference pairs"));
        assert!(
            Preference::new(PrefConfig::default(), true)
                .unwrap()
                .needs_reference()
        );
    }

    /// The closed-form derivatives equal finite differences of the losses.
    #[test]
    fn derivatives_match_finite_differences() {
        use crate::data::batch::PrefRows;
        let pref = [
            PrefRows {
                desirable: None,
                ref_logps: Some([-7.0, -6.5]),
            },
            PrefRows {
                desirable: None,
                ref_logps: Some([-3.0, -9.0]),
            },
        ];
        let kto = [
            PrefRows {
                desirable: Some(true),
                ref_logps: Some([-7.0, -6.5]),
            },
            PrefRows {
                desirable: Some(false),
                ref_logps: Some([-3.0, -9.0]),
            },
        ];
        for (loss, data) in [
            ("sigmoid", &pref),
            ("ipo", &pref),
            ("hinge", &pref),
            ("robust", &pref),
            ("orpo", &pref),
            ("simpo", &pref),
            ("kto", &kto),
        ] {
            let o = Preference::new(
                PrefConfig {
                    loss_type: loss.into(),
                    beta: 0.3,
                    label_smoothing: if loss == "robust" { 0.1 } else { 0.0 },
                    ..PrefConfig::default()
                },
                loss == "kto",
            )
            .unwrap();
            let labels = Labels {
                labels: &[],
                rows: 4,
                seq: 0,
                input_ids: &[],
                lens: &[],
                pref: data,
            };
            let at = |s: [f64; 4]| {
                let sums: Vec<RowSum> = s.iter().map(|&sum| RowSum { sum, n: 3.0 }).collect();
                o.per_example(&sums, &labels).unwrap().0
            };
            let s = [-6.0, -6.8, -4.0, -8.0];
            let per = at(s);
            for row in 0..4 {
                // KTO's KL rows carry no gradient (TRL detaches the estimate).
                if loss == "kto" && row % 2 == 1 {
                    continue;
                }
                let h = 1e-6;
                let (mut up, mut down) = (s, s);
                up[row] += h;
                down[row] -= h;
                let f = |p: Vec<PerExample>| p.iter().map(|e| e.loss).sum::<f64>();
                let numeric = (f(at(up)) - f(at(down))) / (2.0 * h);
                let e = &per[row / 2];
                let analytic = if row % 2 == 0 { e.d_first } else { e.d_second };
                assert!(
                    (numeric - analytic).abs() < 1e-6,
                    "{loss} row {row}: {numeric} vs {analytic}"
                );
            }
        }
    }
}
