//! What would make a run fit its device: the levers a user has (a smaller micro-batch with more
//! accumulation, gradient checkpointing, a 4-bit base, layers on the CPU), each with the peak it
//! would need and what it would cost in speed, and the cheapest combination that fits. Pure
//! arithmetic over [`super::memory::estimate`]: the caller says what a workload needs on its
//! tightest device ([`Need`]).
//!
//! The speed costs are estimates, stated as the fraction of today's tokens/s a lever keeps:
//! checkpointing runs each block's forward twice (a step is about a forward and a backward of
//! twice its cost: 3 units become 4), partial checkpointing (`"auto"`) only the blocks it
//! recomputes, the fewest that fit in 90% of the device; a 4-bit base dequantizes each weight at each product
//! (measured on a 7B: 0.83x); a smaller micro-batch runs smaller products
//! ([`efficiency`]); a layer on the CPU runs some 50 times slower than on a GPU; offloading the
//! checkpointed block inputs costs the waits for copies that did not finish beside the compute.

use std::fmt;

use super::memory::Workload;
use crate::Result;

/// Tokens/s kept with gradient checkpointing (one more forward per step: 3 units become 4).
const CHECKPOINTING_SPEED: f64 = 0.75;
/// Tokens/s kept with a 4-bit base (dequantization at each product): 0.83x of bf16 LoRA measured
/// on a 7B on an H100 with the 16-values-a-thread kernel (benches/README.md; 0.71x before it).
const QUANT4_SPEED: f64 = 0.83;
/// Tokens/s kept with 8-bit optimizer states: the step reads and writes a quarter of the bytes
/// with a little more arithmetic; an estimate (the step is a small part of a training step).
const OPTIM8_SPEED: f64 = 0.99;
/// Tokens/s kept by activation offload over plain checkpointing: the copies run on the copy
/// engines beside the GEMMs (a block's input is a small part of its work). Measured 0.997x on a
/// 7B at 64k tokens on an H100 (benches/README.md); a little kept back for short rows, where the
/// copies' fixed costs weigh more.
const OFFLOAD_SPEED: f64 = 0.99;
/// Share of a device's memory partial checkpointing (`gradient_checkpointing: "auto"`) plans to
/// fill: it can fill a device to the byte, and the estimate is within a few percent of the
/// measured peak; the rest is headroom.
pub const PARTIAL_CHECKPOINTING_SHARE: f64 = 0.9;
/// How many times slower a layer runs on the CPU than on a GPU.
const CPU_LAYER_COST: f64 = 50.0;
/// Tokens in a micro-batch at which the products run at half their peak rate.
const HALF_RATE_TOKENS: f64 = 256.0;

/// One change to a run, as the user would write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lever {
    /// `gradient_checkpointing: true`.
    Checkpointing,
    /// `gradient_checkpointing: "auto"`: the first `recomputed` blocks recomputed, the last ones
    /// keeping their activations.
    PartialCheckpointing {
        /// Blocks recomputed in backward.
        recomputed: usize,
        /// The model's layers.
        layers: usize,
    },
    /// `gradient_checkpointing: "offload"`: checkpointing with the block inputs in host memory.
    Offload,
    /// `per_device_train_batch_size` and `gradient_accumulation_steps` (the same examples a
    /// step).
    MicroBatch {
        /// Examples a micro-batch.
        batch: usize,
        /// Micro-batches a step.
        accumulation: usize,
    },
    /// `load_in_4bit: true` at `model::load` (LoRA on a 4-bit base).
    Quant4,
    /// `optim: "adamw_8bit"`: bitsandbytes' 8-bit AdamW states.
    Optim8,
    /// LoRA instead of full fine-tuning (`lora::attach`, r 16 on every linear layer): it trains
    /// something else, so it is listed, never applied.
    Lora {
        /// The adapters' elements.
        params: usize,
    },
    /// `device_map: "auto"` with a `max_memory` that keeps `on_gpu` of the layers on the GPU.
    CpuLayers {
        /// Layers kept on the GPU.
        on_gpu: usize,
        /// The model's layers.
        layers: usize,
    },
}

impl Lever {
    /// Whether training can apply it to the model it was given (`auto_fit`); the others need
    /// `model::load` options.
    pub fn applies_in_training(self) -> bool {
        matches!(
            self,
            Lever::Checkpointing
                | Lever::PartialCheckpointing { .. }
                | Lever::Offload
                | Lever::MicroBatch { .. }
                | Lever::Optim8
        )
    }
}

impl fmt::Display for Lever {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Lever::Checkpointing => f.write_str("`gradient_checkpointing: true`"),
            Lever::PartialCheckpointing { recomputed, layers } => write!(
                f,
                "`gradient_checkpointing: \"auto\"` ({recomputed} of {layers} blocks recomputed)"
            ),
            Lever::Offload => {
                f.write_str("`gradient_checkpointing: \"offload\"` (block inputs in host memory)")
            }
            Lever::MicroBatch {
                batch,
                accumulation,
            } => write!(
                f,
                "`per_device_train_batch_size: {batch}, gradient_accumulation_steps: {accumulation}`"
            ),
            Lever::Quant4 => f.write_str("`load_in_4bit: true` in `model::load` (QLoRA)"),
            Lever::Optim8 => f.write_str("`optim: \"adamw_8bit\"` (8-bit optimizer states)"),
            Lever::Lora { .. } => f.write_str(
                "LoRA instead of full fine-tuning (`lora::attach`, r 16 on every linear layer)",
            ),
            Lever::CpuLayers { on_gpu, layers } => write!(
                f,
                "{} of {layers} layers on the CPU (`device_map: \"auto\"` with `max_memory`)",
                layers - on_gpu
            ),
        }
    }
}

/// The knobs of a run the levers turn.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// `per_device_train_batch_size` (examples).
    pub batch: usize,
    /// `gradient_accumulation_steps`.
    pub accumulation: usize,
    /// Padded tokens of one example's batch row (a preference example: prompt once, both answers).
    pub example_tokens: usize,
    /// Whether a 4-bit base is possible (LoRA on a dense base).
    pub quant4_possible: bool,
    /// Whether 8-bit optimizer states are possible (32-bit ones now, not sharded by ZeRO).
    pub optim8_possible: bool,
    /// Full fine-tuning: the elements LoRA r 16 on every linear layer would train instead.
    pub lora_instead: Option<usize>,
    /// Whether the block inputs may be offloaded (a GPU, with the host memory for them).
    pub offload_possible: bool,
    /// Whether layers may move to the CPU (one GPU, no `device_map` yet).
    pub cpu_layers_possible: bool,
    /// The model's layers.
    pub layers: usize,
}

/// What a workload needs on the device it is tightest on, and that device's budget; with
/// `on_gpu` `Some(k)`, only `k` of the layers on the GPU.
pub trait Need {
    /// `(bytes needed, bytes the device holds)`.
    fn need(&self, w: &Workload, on_gpu: Option<usize>) -> Result<(u64, u64)>;
}

/// A set of levers, the peak it needs and the speed it keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// The levers, in the order they are written.
    pub levers: Vec<Lever>,
    /// Bytes needed on the tightest device.
    pub need: u64,
    /// What that device holds.
    pub budget: u64,
    /// The fraction of today's tokens/s it keeps (estimated).
    pub speed: f64,
}

impl Proposal {
    /// Whether it fits.
    pub fn fits(&self) -> bool {
        self.need <= self.budget
    }

    /// The workload and knobs with its levers applied.
    fn apply(levers: &[Lever], base: &Workload, k: &Knobs) -> (Workload, Option<usize>) {
        let mut w = *base;
        let mut on_gpu = None;
        for lever in levers {
            match *lever {
                Lever::Checkpointing => {
                    w.gradient_checkpointing = true;
                    w.kept_blocks = 0;
                }
                Lever::PartialCheckpointing { recomputed, layers } => {
                    w.gradient_checkpointing = true;
                    w.kept_blocks = layers.saturating_sub(recomputed);
                }
                Lever::Offload => {
                    w.gradient_checkpointing = true;
                    w.offload_activations = true;
                    w.kept_blocks = 0;
                }
                Lever::MicroBatch { batch, .. } => w.tokens = batch * k.example_tokens,
                Lever::Quant4 => w.quant4 = Some(true),
                Lever::Optim8 => w.optim8 = true,
                Lever::Lora { params } => {
                    w.trainable = super::memory::Trainable::Adapters(params);
                    w.lora = Some((16, 7));
                }
                Lever::CpuLayers { on_gpu: n, .. } => on_gpu = Some(n),
            }
        }
        (w, on_gpu)
    }
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.levers.iter().map(Lever::to_string).collect();
        write!(
            f,
            "{}: about {} of {} ({}), ~{:.2}x the speed",
            names.join(" + "),
            crate::bytes::human(self.need as f64),
            crate::bytes::human(self.budget as f64),
            if self.fits() { "fits" } else { "does not fit" },
            self.speed
        )
    }
}

/// The share of its peak rate a micro-batch of `tokens` runs the products at.
pub fn efficiency(tokens: usize) -> f64 {
    let t = tokens.max(1) as f64;
    t / (t + HALF_RATE_TOKENS)
}

/// What the levers would do to a run that needs more than its device holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Solution {
    /// Each lever alone (the micro-batch at the largest size that fits, else 1; on the CPU the
    /// fewest layers that fit), cheapest first.
    pub alone: Vec<Proposal>,
    /// The cheapest combination that fits, if one does.
    pub best: Option<Proposal>,
    /// The cheapest that fits of those training can apply itself (`auto_fit`).
    pub best_in_training: Option<Proposal>,
}

/// What the levers would do to a run of `base` and `k` (see [`Solution`]).
pub fn solve(base: &Workload, k: &Knobs, need: &dyn Need) -> Result<Solution> {
    let eval_as_is = |levers: Vec<Lever>| -> Result<Proposal> {
        let (w, on_gpu) = Proposal::apply(&levers, base, k);
        let (need, budget) = need.need(&w, on_gpu)?;
        let speed = levers.iter().map(|l| speed(*l, k, base)).product();
        Ok(Proposal {
            levers,
            need,
            budget,
            speed,
        })
    };
    // Partial checkpointing with the other levers: the fewest blocks recomputed that fit in
    // `PARTIAL_CHECKPOINTING_SHARE` of the device (the need shrinks with each one), else all
    // but one.
    let eval = |levers: Vec<Lever>| -> Result<Proposal> {
        let Some(at) = levers
            .iter()
            .position(|l| matches!(l, Lever::PartialCheckpointing { .. }))
        else {
            return eval_as_is(levers);
        };
        let with = |recomputed: usize| {
            let mut l = levers.clone();
            l[at] = Lever::PartialCheckpointing {
                recomputed,
                layers: k.layers,
            };
            eval_as_is(l)
        };
        let recomputed = fewest_recomputed(1..k.layers - 1, |r| {
            let p = with(r)?;
            Ok(p.need as f64 <= p.budget as f64 * PARTIAL_CHECKPOINTING_SHARE)
        })?;
        with(recomputed)
    };
    // The micro-batches the levers try: the divisors of the batch, largest first (the same
    // examples a step), as `batch` with its accumulation.
    let batches: Vec<Lever> = (1..k.batch)
        .rev()
        .filter(|b| k.batch.is_multiple_of(*b))
        .map(|b| Lever::MicroBatch {
            batch: b,
            accumulation: k.accumulation * (k.batch / b),
        })
        .collect();
    // Groups of levers that exclude each other (checkpointing, or checkpointing with offload).
    let mut basics: Vec<Vec<Lever>> = Vec::new();
    let mut ckpt = Vec::new();
    if !base.gradient_checkpointing && k.layers > 1 {
        ckpt.push(Lever::PartialCheckpointing {
            recomputed: k.layers - 1,
            layers: k.layers,
        });
    }
    if !base.gradient_checkpointing {
        ckpt.push(Lever::Checkpointing);
    }
    if k.offload_possible && !base.offload_activations {
        ckpt.push(Lever::Offload);
    }
    if !ckpt.is_empty() {
        basics.push(ckpt);
    }
    if k.quant4_possible && base.quant4.is_none() {
        basics.push(vec![Lever::Quant4]);
    }
    if k.optim8_possible && !base.optim8 {
        basics.push(vec![Lever::Optim8]);
    }
    if let Some(params) = k.lora_instead {
        basics.push(vec![Lever::Lora { params }]);
    }
    // Every subset of the groups (one lever of each group taken), with each micro-batch or none.
    let mut combos: Vec<Vec<Lever>> = vec![vec![]];
    for group in &basics {
        let mut with: Vec<Vec<Lever>> = Vec::new();
        for lever in group {
            with.extend(combos.iter().map(|c| {
                let mut c = c.clone();
                c.push(*lever);
                c
            }));
        }
        combos.extend(with);
    }
    let mut tried: Vec<Proposal> = Vec::new();
    for c in &combos {
        for mb in std::iter::once(None).chain(batches.iter().map(Some)) {
            let mut levers = c.clone();
            levers.extend(mb);
            if levers.is_empty() {
                continue;
            }
            tried.push(eval(levers)?);
        }
    }
    // Layers on the CPU, last: with every other lever on, the most layers the GPU holds.
    if k.cpu_layers_possible && k.layers > 1 {
        // The last of each group: the one that saves the most.
        let mut rest: Vec<Lever> = basics.iter().filter_map(|g| g.last()).copied().collect();
        rest.extend(batches.last());
        for keep in [vec![], rest] {
            if let Some(p) = cpu_layers(&keep, k, &eval)? {
                tried.push(p);
            }
        }
    }
    let mut alone: Vec<Proposal> = Vec::new();
    for p in &tried {
        if p.levers.len() != 1 {
            continue;
        }
        let kind = std::mem::discriminant(&p.levers[0]);
        match alone
            .iter_mut()
            .find(|a| std::mem::discriminant(&a.levers[0]) == kind)
        {
            // One entry a kind: the first that fits (the largest micro-batch), else the last.
            Some(a) if !a.fits() => *a = p.clone(),
            Some(_) => {}
            None => alone.push(p.clone()),
        }
    }
    alone.sort_by(|a, b| b.speed.total_cmp(&a.speed));
    let cheapest = |only_training: bool| {
        tried
            .iter()
            .filter(|p| p.fits())
            // LoRA trains something else: listed, never chosen.
            .filter(|p| !p.levers.iter().any(|l| matches!(l, Lever::Lora { .. })))
            .filter(|p| !only_training || p.levers.iter().all(|l| l.applies_in_training()))
            .max_by(|a, b| a.speed.total_cmp(&b.speed))
            .cloned()
    };
    Ok(Solution {
        best: cheapest(false),
        best_in_training: cheapest(true),
        alone,
    })
}

/// With `levers` on, the most layers that fit on the GPU (the rest on the CPU), or `None` when
/// not even one does.
fn cpu_layers(
    levers: &[Lever],
    k: &Knobs,
    eval: &dyn Fn(Vec<Lever>) -> Result<Proposal>,
) -> Result<Option<Proposal>> {
    let with = |on_gpu: usize| {
        let mut l = levers.to_vec();
        l.push(Lever::CpuLayers {
            on_gpu,
            layers: k.layers,
        });
        eval(l)
    };
    // Binary search on the layers kept: the need grows with them.
    let (mut lo, mut hi) = (0usize, k.layers - 1);
    if !with(0)?.fits() {
        return Ok(None);
    }
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if with(mid)?.fits() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    with(lo).map(Some)
}

/// The fewest blocks to recompute in `range` for which `fits` holds (recomputing more keeps fewer
/// activations, so `fits` turns true from some count on), else `range.end`: partial
/// checkpointing's search, for the solver's lever and for `gradient_checkpointing: "auto"`.
pub fn fewest_recomputed(
    range: std::ops::Range<usize>,
    mut fits: impl FnMut(usize) -> Result<bool>,
) -> Result<usize> {
    let (mut lo, mut hi) = (range.start, range.end);
    while lo < hi {
        let mid = usize::midpoint(lo, hi);
        if fits(mid)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// The fraction of tokens/s `lever` keeps on a run of `base`.
fn speed(lever: Lever, k: &Knobs, base: &Workload) -> f64 {
    match lever {
        Lever::Checkpointing => CHECKPOINTING_SPEED,
        // A recomputed block is one more forward of its share of the step (3 units become 3 +
        // the share).
        Lever::PartialCheckpointing { recomputed, layers } => {
            let share = recomputed as f64 / layers.max(1) as f64;
            3.0 / (3.0 + share)
        }
        Lever::Offload if base.gradient_checkpointing => OFFLOAD_SPEED,
        Lever::Offload => CHECKPOINTING_SPEED * OFFLOAD_SPEED,
        Lever::Quant4 => QUANT4_SPEED,
        Lever::Optim8 => OPTIM8_SPEED,
        // No gradients of the weights to compute: at least as fast.
        Lever::Lora { .. } => 1.0,
        Lever::MicroBatch { batch, .. } => {
            efficiency(batch * k.example_tokens) / efficiency(k.batch * k.example_tokens)
        }
        Lever::CpuLayers { on_gpu, layers } => {
            let l = layers as f64;
            l / (on_gpu as f64 + (l - on_gpu as f64) * CPU_LAYER_COST)
        }
    }
}

impl Solution {
    /// The levers as `check` and the start of training list them, cheapest first, and the
    /// cheapest that fits.
    pub fn describe(&self) -> String {
        let mut out = String::from(
            "what would make it fit (estimated peak; speed as a share of this run's):",
        );
        for p in &self.alone {
            out.push_str(&format!("\n  - {p}"));
        }
        let auto = "`auto_fit: true` (or `qscript --fit`) applies it";
        match (&self.best, &self.best_in_training) {
            (Some(b), Some(t)) if b == t => {
                out.push_str(&format!("\nthe cheapest that fits: {b}; {auto}"));
            }
            (Some(b), t) => {
                out.push_str(&format!("\nthe cheapest that fits: {b}"));
                if let Some(t) = t {
                    out.push_str(&format!(
                        "\nthe cheapest training can apply to the model as loaded: {t}; {auto}"
                    ));
                }
            }
            (None, _) => out.push_str(
                "\nnothing here fits, even together: a larger device, more devices, or a \
                 smaller model",
            ),
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::plan::memory::Trainable;

    /// A device of 20 units: weights 10 (3 in 4 bits), a unit a token (a tenth with
    /// checkpointing), a layer on the CPU takes a tenth of the whole off.
    struct Linear;

    impl Need for Linear {
        fn need(&self, w: &Workload, on_gpu: Option<usize>) -> Result<(u64, u64)> {
            let weights = if w.quant4.is_some() { 3.0 } else { 10.0 };
            // A kept block (partial checkpointing) holds a tenth of a token's units.
            let kept = w.kept_blocks as f64 / 10.0;
            let act = w.tokens as f64
                * if w.gradient_checkpointing {
                    0.1 + 0.9 * kept
                } else {
                    1.0
                };
            let share = on_gpu.map_or(1.0, |k| k as f64 / 10.0);
            Ok((((weights + act) * share).ceil() as u64, 20))
        }
    }

    fn base(tokens: usize) -> Workload {
        Workload {
            tokens,
            gradient_checkpointing: false,
            offload_activations: false,
            trainable: Trainable::Adapters(1),
            weight_decay: false,
            lora: Some((8, 4)),
            gpu: true,
            optimizer_shards: 1,
            gradient_shards: 1,
            held_micro_batches: 1,
            quant4: None,
            optim8: false,
            mlp_dropout: false,
            kept_blocks: 0,
        }
    }

    fn knobs(batch: usize) -> Knobs {
        Knobs {
            batch,
            accumulation: 2,
            example_tokens: 4,
            quant4_possible: true,
            optim8_possible: false,
            lora_instead: None,
            offload_possible: false,
            cpu_layers_possible: true,
            layers: 10,
        }
    }

    #[test]
    fn the_cheapest_that_fits_wins_and_each_lever_is_listed_once() {
        // 8 examples of 4 tokens: 42 units of 20.
        let s = solve(&base(32), &knobs(8), &Linear).unwrap();
        let names: Vec<String> = s.alone.iter().map(|p| p.levers[0].to_string()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        // Partial checkpointing: the fewest blocks recomputed that fit in 90% of the device (9
        // of 10: 17 units; 8 would need 19), cheaper than recomputing every block.
        let part = s
            .alone
            .iter()
            .position(|p| matches!(p.levers[0], Lever::PartialCheckpointing { .. }))
            .unwrap();
        let full = s
            .alone
            .iter()
            .position(|p| p.levers[0] == Lever::Checkpointing)
            .unwrap();
        assert_eq!(
            s.alone[part].levers[0],
            Lever::PartialCheckpointing {
                recomputed: 9,
                layers: 10
            }
        );
        assert!(s.alone[part].fits() && s.alone[part].need == 17 && part < full);
        // Cheapest first: the speeds never rise down the list.
        assert!(s.alone.windows(2).all(|w| w[0].speed >= w[1].speed));
        // The micro-batch alone: the largest that fits (2 examples: 18 units), with the same
        // examples a step.
        let mb = s
            .alone
            .iter()
            .find(|p| matches!(p.levers[0], Lever::MicroBatch { .. }))
            .unwrap();
        assert_eq!(
            mb.levers[0],
            Lever::MicroBatch {
                batch: 2,
                accumulation: 8
            }
        );
        assert!(mb.fits() && mb.need == 18);
        // Layers on the CPU alone: the most that fit (4 of 10 layers: 17 units).
        let cpu = s
            .alone
            .iter()
            .find(|p| matches!(p.levers[0], Lever::CpuLayers { .. }))
            .unwrap();
        assert_eq!(
            cpu.levers[0],
            Lever::CpuLayers {
                on_gpu: 4,
                layers: 10
            }
        );
        let best = s.best.clone().unwrap();
        assert!(best.fits());
        let all_fitting_speeds = s.alone.iter().filter(|p| p.fits()).map(|p| p.speed);
        assert!(all_fitting_speeds.into_iter().all(|v| v <= best.speed));
        let t = s.best_in_training.clone().unwrap();
        assert!(t.levers.iter().all(|l| l.applies_in_training()));
        let text = s.describe();
        assert!(text.starts_with("what would make it fit"), "{text}");
        assert!(text.contains("the cheapest that fits: "), "{text}");
    }

    #[test]
    fn nothing_fitting_is_said_and_lora_is_never_chosen() {
        struct Never;
        impl Need for Never {
            fn need(&self, _: &Workload, _: Option<usize>) -> Result<(u64, u64)> {
                Ok((100, 20))
            }
        }
        let mut k = knobs(1);
        k.lora_instead = Some(10);
        k.cpu_layers_possible = false;
        let s = solve(&base(4), &k, &Never).unwrap();
        assert!(s.best.is_none() && s.best_in_training.is_none());
        assert!(s.describe().contains("nothing here fits, even together"));
        let s = solve(&base(4), &k, &Linear).unwrap();
        assert!(
            s.best
                .iter()
                .all(|b| !b.levers.iter().any(|l| matches!(l, Lever::Lora { .. })))
        );
        assert!(
            s.alone
                .iter()
                .any(|p| matches!(p.levers[0], Lever::Lora { .. }))
        );
    }
}
