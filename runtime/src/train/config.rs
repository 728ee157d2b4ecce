//! `TrainConfig`: HF TrainingArguments names and defaults. Unknown keys are errors that list the
//! valid ones.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Training options (the subset of HF `TrainingArguments` qscript implements).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Where checkpoints, `metrics.jsonl` and the loss plot go (resolved by the caller).
    pub output_dir: String,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Examples per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Epochs (fractions allowed).
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides `num_train_epochs` when > 0.
    pub max_steps: i64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// `linear`, `cosine`, `cosine_with_min_lr`, `constant`, `constant_with_warmup`.
    pub lr_scheduler_type: String,
    /// HF's `lr_scheduler_kwargs`: for `cosine_with_min_lr`, `min_lr` or `min_lr_rate` (and
    /// `num_cycles`, default 0.5); for `cosine`, `num_cycles`.
    pub lr_scheduler_kwargs: Option<serde_json::Value>,
    /// HF's optimizer name: `adamw_torch` (also `adamw_torch_fused`, `adamw_hf`), all
    /// qscript's AdamW.
    pub optim: String,
    /// HF's NEFTune noise on the embeddings in training (not supported yet: an error when set).
    pub neftune_noise_alpha: Option<f64>,
    /// Warmup as a fraction of the total steps.
    pub warmup_ratio: f64,
    /// Warmup steps (wins over `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Train in bfloat16 (the model should be loaded in bf16; adapters and optimizer stay f32).
    pub bf16: bool,
    /// Train in float16.
    pub fp16: bool,
    /// Recompute each decoder block in backward (`true`), and park the block inputs it keeps
    /// in host memory (`"offload"`; Unsloth's `"unsloth"` is the same).
    pub gradient_checkpointing: Checkpointing,
    /// `gradient_checkpointing: "offload"` by another name (checkpointing on, inputs offloaded).
    pub offload_activations: bool,
    /// When the run would not fit its device, apply the cheapest change that makes it fit and
    /// that training can make (a smaller micro-batch with more accumulation, checkpointing; see
    /// `crate::plan::fit`) and say so; without it such a run is refused with the changes listed.
    pub auto_fit: bool,
    /// Put examples of similar length in the same batch (still shuffled per epoch).
    pub group_by_length: bool,
    /// Train on the examples in the dataset's order, every epoch (LLaMA-Factory's name): for
    /// curricula, and for runs compared step by step with another trainer's.
    pub disable_shuffling: bool,
    /// Round padded lengths up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// TRL's `packing`: concatenate examples into rows of `max_length` tokens (attention never
    /// crosses an example, positions restart per example, the loss is the unpacked one), so no
    /// token is padding.
    pub packing: bool,
    /// TRL's `max_length`: the packed row length with `packing` (default 1024); without it,
    /// longer examples are cut to this many tokens.
    pub max_length: Option<usize>,
    /// Run an accumulation window's micro-batches as fewer, larger ones: the same gradients (the
    /// loss is normalised over the window's tokens and dropout masks are keyed per example), far
    /// fewer kernel launches at small batch sizes. Unset: on a GPU, each pass just large enough
    /// to keep the GPU busy and within the memory measured in the first step; `true`: the whole
    /// window at once; `false`: never. Also spelled `auto_micro_batch`.
    #[serde(alias = "auto_micro_batch")]
    pub merge_micro_batches: Option<bool>,
    /// DeepSpeed's ZeRO stage under data parallel: 0 (off), 1 (each rank keeps the optimizer
    /// moments of its share of the parameters only, and the ranks gather the updated parameters)
    /// or 2 (also only its share of the summed gradients: each block's gradient is summed into
    /// the ranks' shares as soon as a pass's backward leaves the block, then let go).
    pub zero_stage: usize,
    /// With the model's blocks over several GPUs (`device_map`), run each accumulation window's
    /// micro-batches through them in a pipeline, so the GPUs work at once (the default); `false`
    /// runs one micro-batch at a time through all of them, as HF's `device_map` does (the same
    /// gradients; less memory, since one micro-batch's activations are held at a time).
    pub pipeline: bool,
    /// Seed of the data order and of new adapters.
    pub seed: u64,
    /// Log every N optimizer steps.
    pub logging_steps: usize,
    /// `no`, `steps` or `epoch` (at each epoch's end).
    pub eval_strategy: String,
    /// Evaluate every N steps (defaults to `logging_steps`).
    pub eval_steps: Option<usize>,
    /// HF's `save_strategy`: `steps` (every `save_steps`), `epoch` (at each epoch's end) or `no`.
    pub save_strategy: String,
    /// Save a checkpoint every N steps (0 = never).
    pub save_steps: usize,
    /// Keep at most this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Return the best checkpoint's weights at the end (needs eval).
    pub load_best_model_at_end: bool,
    /// `eval_loss` (the only metric so far).
    pub metric_for_best_model: Option<String>,
    /// Stop after this many evaluations without improvement.
    pub early_stopping_patience: Option<usize>,
    /// A checkpoint directory, or `true` for the latest in `output_dir`.
    pub resume_from_checkpoint: Option<serde_json::Value>,
    /// HF's `report_to`: `"tensorboard"` (or a list holding it) writes TensorBoard event files;
    /// `"none"` (the default) writes only `metrics.jsonl`.
    pub report_to: Option<serde_json::Value>,
    /// Where TensorBoard files go (default `output_dir/runs`, resolved by the caller).
    pub logging_dir: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: String::new(),
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler_type: "linear".into(),
            lr_scheduler_kwargs: None,
            optim: "adamw_torch".into(),
            neftune_noise_alpha: None,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            bf16: false,
            fp16: false,
            gradient_checkpointing: Checkpointing::Off,
            offload_activations: false,
            auto_fit: false,
            group_by_length: false,
            disable_shuffling: false,
            pad_to_multiple_of: None,
            packing: false,
            max_length: None,
            merge_micro_batches: None,
            zero_stage: 0,
            pipeline: true,
            seed: 42,
            logging_steps: 10,
            eval_strategy: "no".into(),
            eval_steps: None,
            save_strategy: "steps".into(),
            save_steps: 500,
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            early_stopping_patience: None,
            resume_from_checkpoint: None,
            report_to: None,
            logging_dir: None,
        }
    }
}

/// Gradient checkpointing: off, on (each block recomputed from its input in backward), or on
/// with the kept block inputs parked in host memory until their backward (activation offload).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every block keeps what its backward reads.
    #[default]
    Off,
    /// Blocks keep their input only, and are recomputed in backward.
    On,
    /// As `On`, with the inputs in pinned host memory, copied out and back beside the compute.
    Offload,
    /// `"auto"`: the plan recomputes as few blocks as the device's memory allows
    /// ([`Checkpointing::KeepLast`] once resolved).
    Auto,
    /// Blocks are recomputed in backward but for the last `n`, which keep what their backward
    /// reads (how `"auto"` resolves).
    KeepLast(usize),
}

impl Checkpointing {
    /// Blocks (some, or all) are recomputed in backward.
    pub fn recompute(self) -> bool {
        self != Self::Off
    }

    /// Whether block `layer` of `layers` is recomputed in backward.
    pub fn recomputes(self, layer: usize, layers: usize) -> bool {
        match self {
            Self::Off => false,
            Self::On | Self::Offload | Self::Auto => true,
            Self::KeepLast(n) => layer + n < layers,
        }
    }

    /// Block inputs are offloaded to host memory.
    pub fn offload(self) -> bool {
        self == Self::Offload
    }
}

impl From<bool> for Checkpointing {
    fn from(on: bool) -> Self {
        if on { Self::On } else { Self::Off }
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::On => s.serialize_bool(true),
            Self::Offload => s.serialize_str("offload"),
            Self::Auto | Self::KeepLast(_) => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Checkpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, \"offload\" or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(
                self,
                v: bool,
            ) -> std::result::Result<Self::Value, E> {
                Ok(v.into())
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match v {
                    "offload" | "unsloth" => Ok(Checkpointing::Offload),
                    "auto" => Ok(Checkpointing::Auto),
                    "true" => Ok(Checkpointing::On),
                    "false" => Ok(Checkpointing::Off),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// HF's `optim` names that are qscript's AdamW (decoupled weight decay, bias correction).
const ADAMW_NAMES: [&str; 3] = ["adamw_torch", "adamw_torch_fused", "adamw_hf"];

/// HF's `optim` names of bitsandbytes' 8-bit AdamW (`paged_` pages nothing here: the states are
/// a quarter of AdamW's and stay on the device).
pub const ADAMW_8BIT_NAMES: [&str; 3] = ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"];

/// Integrations HF's `report_to` knows that qscript does not write (a notice, not an error).
const OTHER_REPORTERS: [&str; 9] = [
    "wandb",
    "mlflow",
    "comet_ml",
    "neptune",
    "clearml",
    "dvclive",
    "azure_ml",
    "codecarbon",
    "swanlab",
];

impl TrainConfig {
    /// The option names `TrainConfig` takes (HF's `TrainingArguments` names), aliases included.
    pub fn option_names() -> Vec<String> {
        let mut names: Vec<String> = match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        names.push("auto_micro_batch".into());
        names.sort();
        names
    }

    /// What `report_to` asks for: TensorBoard, and the integrations HF knows that qscript does
    /// not write; an unknown name is an error.
    fn reporters(&self) -> Result<(bool, Vec<&str>)> {
        let names: Vec<&str> = match &self.report_to {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "`report_to` lists {v}; it takes integration names"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "`report_to` is {other}; use `\"tensorboard\"`, `\"none\"` or a list of names"
                )));
            }
        };
        let mut tb = false;
        let mut others = Vec::new();
        for n in names {
            match n {
                "tensorboard" | "all" => tb = true,
                "none" => {}
                other if OTHER_REPORTERS.contains(&other) => others.push(other),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "`report_to`: unknown integration `{other}`; qscript writes `tensorboard` (or `none`)"
                    )));
                }
            }
        }
        Ok((tb, others))
    }

    /// Whether `report_to` asks for TensorBoard; names qscript does not write get one notice
    /// each (call once per run: the plan does).
    pub fn tensorboard(&self) -> Result<bool> {
        let (tb, others) = self.reporters()?;
        for other in others {
            crate::notice::say(format!(
                "note: `report_to: {other}` is not written by qscript (TensorBoard is, with `report_to: \"tensorboard\"`); metrics are in metrics.jsonl"
            ));
        }
        Ok(tb)
    }

    /// Checks values and combinations.
    pub fn validate(&self) -> Result<()> {
        self.reporters()?;
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1".into());
        }
        if self.learning_rate <= 0.0 || !self.learning_rate.is_finite() {
            return bad(format!(
                "`learning_rate` must be positive, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "`warmup_ratio` must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if let Some(n) = self.max_length
            && !(1..=1 << 20).contains(&n)
        {
            return bad(format!(
                "`max_length` must be in 1..=1048576 tokens, got {n}"
            ));
        }
        let finite = |name: &str, v: f64, ok: bool, range: &str| -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "`{name}` must be {range}, got {v}"
                )))
            }
        };
        finite(
            "num_train_epochs",
            self.num_train_epochs,
            self.num_train_epochs >= 0.0,
            "a number >= 0",
        )?;
        finite(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "a number >= 0",
        )?;
        finite(
            "adam_beta1",
            self.adam_beta1,
            (0.0..1.0).contains(&self.adam_beta1),
            "in [0, 1)",
        )?;
        finite(
            "adam_beta2",
            self.adam_beta2,
            (0.0..1.0).contains(&self.adam_beta2),
            "in [0, 1)",
        )?;
        finite(
            "adam_epsilon",
            self.adam_epsilon,
            self.adam_epsilon > 0.0,
            "a number > 0",
        )?;
        finite(
            "max_grad_norm",
            self.max_grad_norm,
            self.max_grad_norm >= 0.0,
            "a number >= 0 (0 turns clipping off)",
        )?;
        if self.save_total_limit == Some(0) {
            return bad(
                "`save_total_limit` must be at least 1 (leave it out to keep every checkpoint)"
                    .into(),
            );
        }
        if let Some(m) = self.pad_to_multiple_of
            && !(1..=1 << 16).contains(&m)
        {
            return bad(format!(
                "`pad_to_multiple_of` must be in 1..=65536, got {m}"
            ));
        }
        if self.logging_steps == 0 {
            return bad("`logging_steps` must be at least 1".into());
        }
        if self.eval_steps == Some(0) {
            return bad("`eval_steps` must be at least 1".into());
        }
        if self.bf16 && self.fp16 {
            return bad("`bf16` and `fp16` cannot both be true".into());
        }
        if self.group_by_length && self.disable_shuffling {
            return bad(
                "`group_by_length` reorders the examples and `disable_shuffling` keeps their order: \
                 choose one"
                    .into(),
            );
        }
        if !matches!(self.eval_strategy.as_str(), "no" | "steps" | "epoch") {
            return bad(format!(
                "`eval_strategy` `{}` is not supported; use `no`, `steps` or `epoch`",
                self.eval_strategy
            ));
        }
        if !matches!(self.save_strategy.as_str(), "no" | "steps" | "epoch") {
            return bad(format!(
                "`save_strategy` `{}` is not supported; use `steps`, `epoch` or `no`",
                self.save_strategy
            ));
        }
        if !ADAMW_NAMES.contains(&self.optim.as_str()) && !self.eight_bit_optim() {
            return bad(format!(
                "`optim` `{}` is not supported; qscript's optimizer is AdamW: use `adamw_torch` \
                 (also spelled `adamw_torch_fused` or `adamw_hf`), or `adamw_8bit` \
                 (`adamw_bnb_8bit`, `paged_adamw_8bit`) for bitsandbytes' 8-bit states",
                self.optim
            ));
        }
        if self.eight_bit_optim() && self.zero_stage > 0 {
            return bad(format!(
                "`optim` `{}` with `zero_stage` {}: 8-bit states are not sharded over ranks yet; \
                 use `zero_stage: 0` (8-bit states are a quarter of AdamW's already) or \
                 `adamw_torch`",
                self.optim, self.zero_stage
            ));
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            return bad(format!(
                "`neftune_noise_alpha` ({alpha}) is not supported yet; leave it out to train \
                 without NEFTune's embedding noise"
            ));
        }
        if let Some(m) = &self.metric_for_best_model
            && m != "eval_loss"
            && m != "loss"
        {
            return bad(format!(
                "`metric_for_best_model` `{m}` is not supported; use `eval_loss`"
            ));
        }
        if self.zero_stage > 2 {
            return bad(format!(
                "`zero_stage` is {}; 0 (off), 1 (the optimizer state sharded over the ranks) and 2 \
                 (the gradients too) are supported, stage 3 (the weights too) not yet",
                self.zero_stage
            ));
        }
        if self.load_best_model_at_end && self.eval_strategy == "no" {
            return bad(
                "`load_best_model_at_end` needs `eval_strategy: \"steps\"` and an eval dataset"
                    .into(),
            );
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set `max_steps` or a positive `num_train_epochs`".into());
        }
        Ok(())
    }

    /// Checkpointing as the options set it (`offload_activations: true` is `"offload"`).
    pub fn checkpointing(&self) -> Checkpointing {
        if self.offload_activations {
            Checkpointing::Offload
        } else {
            self.gradient_checkpointing
        }
    }

    /// Whether `optim` names bitsandbytes' 8-bit AdamW.
    pub fn eight_bit_optim(&self) -> bool {
        ADAMW_8BIT_NAMES.contains(&self.optim.as_str())
    }

    /// Micro-batches per epoch for `n` examples over `ranks` data-parallel ranks, optimizer steps
    /// per epoch, and total steps.
    pub fn plan(&self, n: usize, ranks: usize) -> (usize, usize, usize) {
        // A micro-batch is one per rank: `per_device_train_batch_size` x ranks examples.
        let micro = n.div_ceil(self.per_device_train_batch_size * ranks.max(1));
        let per_epoch = (micro / self.gradient_accumulation_steps).max(1);
        let total = if self.max_steps > 0 {
            usize::try_from(self.max_steps).unwrap_or(usize::MAX)
        } else {
            (self.num_train_epochs * per_epoch as f64).ceil() as usize
        };
        (micro, per_epoch, total.max(1))
    }

    /// Warmup steps for `total` steps.
    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        }
    }

    /// Whether step `step` of `total` logs (every `logging_steps`, and the last).
    pub fn logs_at(&self, step: usize, total: usize) -> bool {
        step.is_multiple_of(self.logging_steps.max(1)) || step == total
    }

    /// Whether step `step` of `total` evaluates: `eval_strategy: "steps"`: every `eval_steps`
    /// (default `logging_steps`) and the last; `"epoch"`: at each epoch's end (`epoch_end`) and
    /// the last step (where HF's last, maybe partial, epoch ends).
    pub fn evaluates_at(&self, step: usize, total: usize, epoch_end: bool) -> bool {
        let every = self.eval_steps.unwrap_or(self.logging_steps).max(1);
        match self.eval_strategy.as_str() {
            "steps" => step.is_multiple_of(every) || step == total,
            "epoch" => epoch_end || step == total,
            _ => false,
        }
    }

    /// Whether step `step` of `total` writes a checkpoint: `save_strategy: "steps"`: every
    /// `save_steps` (0: never); `"epoch"`: at each epoch's end and the last step; `"no"`: never.
    pub fn saves_at(&self, step: usize, total: usize, epoch_end: bool) -> bool {
        match self.save_strategy.as_str() {
            "steps" => self.save_steps > 0 && step.is_multiple_of(self.save_steps),
            "epoch" => epoch_end || step == total,
            _ => false,
        }
    }
}
