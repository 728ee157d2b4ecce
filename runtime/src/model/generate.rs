//! Text generation through the KV cache: greedy when the temperature is 0, else sampling with
//! top-k / top-p (candle-transformers' `LogitsProcessor`), an optional repetition penalty, and
//! stops on any end-of-sequence id.

use candle_core::{DType, IndexOp, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use super::kv_cache::KvCache;
use super::load::Model;
use crate::cancel::CancelToken;
use crate::{Error, Result};

/// How to generate. `None` fields fall back to the model's `generation_config.json`, then to
/// greedy decoding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k sampling.
    pub top_k: Option<usize>,
    /// > 1 discourages repeats (as in transformers).
    pub repetition_penalty: Option<f32>,
    /// Sampling seed.
    pub seed: u64,
    /// Extra stop ids (the tokenizer's eos, for instance).
    pub stop_ids: Vec<u32>,
    /// Generate `max_new_tokens` whatever comes (vLLM's `ignore_eos`: benchmarks): no stop id
    /// ends the sequence.
    pub ignore_eos: bool,
}

/// The most new tokens one call may ask for.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

impl GenerateOptions {
    /// Each option in its range, or an error naming it and the range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!(
                "`max_new_tokens` must be at most {MAX_NEW_TOKENS}, got {}",
                self.max_new_tokens
            ));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return bad(format!(
                "`temperature` must be a number >= 0 (0: greedy), got {t}"
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("`top_p` must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return bad("`top_k` must be at least 1 (leave it out for no top-k)".into());
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return bad(format!(
                "`repetition_penalty` must be a number > 0 (1: none), got {r}"
            ));
        }
        Ok(())
    }
}

impl Model {
    /// What [`Model::generate`] checks before it computes: [`Model::check_request`], and that
    /// the prompt's forward and the KV cache fit the GPU.
    pub fn check_generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<()> {
        self.check_request(prompt, opts)?;
        self.check_generation_memory(prompt.len(), opts.max_new_tokens)
    }

    /// A prompt of ids inside the vocabulary and options in range (what a server checks of a
    /// request: its KV cache is allocated once, already).
    pub fn check_request(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument(
                "`generate` needs a non-empty prompt".into(),
            ));
        }
        opts.validate()?;
        let vocab = self.config().vocab_size;
        if let Some((i, id)) = prompt
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(Error::InvalidArgument(format!(
                "prompt token {i} is id {id}, outside the model's vocabulary (0..{vocab}): is the tokenizer this model's?"
            )));
        }
        Ok(())
    }

    /// Generation on one GPU, planned before anything is computed: the prompt's forward and the
    /// KV cache of every position must fit what the GPU has free (the card `qscript check --gpu`
    /// names, for a dry run); else an error that says how many new tokens would fit.
    fn check_generation_memory(&self, prompt: usize, new: usize) -> Result<()> {
        use crate::device::{DeviceSpec, Machine};
        use crate::plan::memory::{self, Trainable, Workload, human};
        let (device, machine) = match &self.planned {
            Some(p) => (p.device, p.machine.clone()),
            None => (DeviceSpec::of(self.decoder.device()), Machine::Here),
        };
        if !device.is_gpu() || self.placement.is_some() {
            return Ok(());
        }
        let Some(free) = machine.free_bytes(device) else {
            return Ok(());
        };
        let cfg = self.config();
        let dtype = self.decoder.dtype();
        let prefill = memory::estimate(
            cfg,
            dtype,
            &Workload {
                tokens: prompt,
                gradient_checkpointing: false,
                offload_activations: false,
                trainable: Trainable::Nothing,
                weight_decay: false,
                lora: None,
                gpu: true,
                optimizer_shards: 1,
                gradient_shards: 1,
                held_micro_batches: 1,
                quant4: self
                    .quant4()
                    .map(|q| matches!(q.absmax, crate::quant::Absmax::Nested { .. })),
                optim8: false,
                mlp_dropout: false,
                kept_blocks: 0,
            },
        )?;
        // A loaded model's weights and the CUDA runtime already hold their share of the GPU.
        let fixed = if self.planned.is_some() {
            prefill.total()
        } else {
            prefill.total() - prefill.weights - prefill.runtime
        } + (cfg.vocab_size * 4) as u64;
        let kv = |n: usize| memory::kv_cache_bytes(cfg, dtype, 1, prompt + n);
        if fixed + kv(new) <= free {
            return Ok(());
        }
        let fits = (0..=new)
            .rev()
            .step_by(new.div_ceil(64).max(1))
            .find(|&n| fixed + kv(n) <= free);
        let advice = match fits {
            Some(n) if n > 0 => {
                format!("lower `max_new_tokens` (about {n} fit) or shorten the prompt")
            }
            _ => "shorten the prompt, or load the model in 4 bits (`load_in_4bit: true`) or over \
                  more devices (`device_map: \"auto\"`)"
                .into(),
        };
        Err(Error::InvalidArgument(format!(
            "generating {new} tokens after a {prompt}-token prompt needs about {} on {device} \
             (the KV cache {}) and it has {} free: {advice}",
            human((fixed + kv(new)) as f64),
            human(kv(new) as f64),
            human(free as f64),
        )))
    }

    /// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new id.
    /// Returns the new ids (the stop token included when one ended the run).
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        self.check_generate(prompt, opts)?;
        if self.is_shapes_only() {
            // A dry run: the prompt and options are checked; nothing is computed.
            return Ok(Vec::new());
        }
        let mut sampler = self.sampler(opts);
        let mut cache = KvCache::new(self.config().num_hidden_layers);
        let device = self.decoder.device();
        let mut context: Vec<u32> = prompt.to_vec();
        let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
        let mut out = Vec::new();
        for _ in 0..opts.max_new_tokens {
            cancel.check()?;
            // Only the last position's logits are needed: the head runs on one row.
            let mask = crate::nn::AttnMask::causal(cache.len());
            let h = self.decoder.hidden(&input, &mask, Some(&mut cache), None)?;
            let h = h.narrow(1, h.dim(1)? - 1, 1)?;
            let last = self.decoder.head(&h)?.i((0, 0))?;
            let next = sampler.sample(&last, &context, out.len())?;
            out.push(next);
            context.push(next);
            on_token(next)?;
            if sampler.is_stop(next) {
                break;
            }
            input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        }
        Ok(out)
    }

    /// How new tokens are chosen for `opts` (the model's `generation_config.json` filling what
    /// `opts` leaves out) and where generation stops.
    pub fn sampler(&self, opts: &GenerateOptions) -> Sampler {
        let g = &self.generation;
        let sampled = g.do_sample.unwrap_or(false) || opts.temperature.is_some();
        let temperature = opts
            .temperature
            .or(if sampled { g.temperature } else { None })
            .unwrap_or(0.0);
        let top_k = opts.top_k.or(if sampled { g.top_k } else { None });
        let top_p = opts
            .top_p
            .or(if sampled { g.top_p } else { None })
            .filter(|p| *p < 1.0);
        let sampling = if temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match (top_k, top_p) {
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (None, None) => Sampling::All { temperature },
            }
        };
        let penalty = opts
            .repetition_penalty
            .or(g.repetition_penalty)
            .unwrap_or(1.0);
        let mut stops = self.eos_ids();
        stops.extend(&opts.stop_ids);
        if opts.ignore_eos {
            stops.clear();
        }
        Sampler {
            processor: LogitsProcessor::from_sampling(opts.seed, sampling),
            penalty,
            temperature,
            stops,
            source: self.source.as_ref().map_or_else(
                || "the model".to_string(),
                |p| format!("the model from `{}`", p.display()),
            ),
        }
    }
}

/// One sequence's choice of new tokens: greedy or sampled (its own seeded generator), the
/// repetition penalty, and the ids that end it.
pub struct Sampler {
    processor: LogitsProcessor,
    penalty: f32,
    temperature: f64,
    stops: Vec<u32>,
    /// The model as errors name it.
    source: String,
}

impl Sampler {
    /// Whether the next token is the logits' argmax and nothing else (no penalty): a batch of
    /// such sequences can take its argmax on the device in one call.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && (self.penalty - 1.0).abs() <= f32::EPSILON
    }

    /// Whether `id` ends the sequence.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stops.contains(&id)
    }

    /// The next token from one position's `logits` `[vocab]` after `context` (the prompt and
    /// the tokens so far); `step` counts new tokens from 0, for the error.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32], step: usize) -> Result<u32> {
        let last = logits.to_dtype(DType::F32)?;
        let last = if (self.penalty - 1.0).abs() > f32::EPSILON {
            candle_transformers::utils::apply_repeat_penalty(&last, self.penalty, context)?
        } else {
            last
        };
        self.processor
            .sample(&last)
            .map_err(|_| self.error(&last, step))
    }

    /// Why sampling new token `step` (from 0) failed, in the model's terms: its logits are NaN
    /// or infinite, or `temperature` is so small that the scaled logits overflow. (candle's own
    /// words, "A weight is negative, too large or not a valid number", name neither.)
    fn error(&self, logits: &Tensor, step: usize) -> Error {
        let (source, temperature) = (&self.source, self.temperature);
        let finite = crate::train::checkpoint::all_finite(logits).unwrap_or(false);
        Error::InvalidArgument(if finite {
            format!(
                "generating new token {}: sampling at `temperature` {temperature:?} overflows the \
                 logits of {source}; use a larger temperature, or 0 for greedy decoding",
                step + 1
            )
        } else {
            format!(
                "generating new token {}: the logits of {source} are NaN or infinite (do its \
                 weights hold NaN or infinite values?)",
                step + 1
            )
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::tiny::{TinyConfig, tiny};

    /// Sampling from NaN logits (a checkpoint of NaN weights) or at a temperature that
    /// overflows them is an error naming the model and the cause, not candle's "A weight is
    /// negative, too large or not a valid number".
    #[test]
    fn a_sampling_failure_names_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny(&TinyConfig {
            hidden: 16,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            intermediate: 24,
            vocab: 64,
            ..TinyConfig::default()
        })
        .unwrap();
        let sample = |m: &Model, temperature: f64| {
            let opts = GenerateOptions {
                max_new_tokens: 2,
                temperature: Some(temperature),
                ..GenerateOptions::default()
            };
            m.generate(&[1, 2], &opts, &CancelToken::new(), &mut |_| Ok(()))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        sample(&m, 1.0).unwrap();
        let e = sample(&m, 1e-300).unwrap_err();
        assert!(
            e.contains("sampling at `temperature` 1e-300 overflows"),
            "{e}"
        );
        m.save(dir.path()).unwrap();
        let file = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let tensors = crate::model::weights::load_all(
            &file,
            &bytes,
            &candle_core::Device::Cpu,
            &CancelToken::new(),
        )
        .unwrap();
        let nan: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.affine(0.0, f64::NAN).unwrap()))
            .collect();
        crate::model::weights::save_file(&nan, &file).unwrap();
        let m = Model::load(dir.path(), &crate::model::load::LoadOptions::default()).unwrap();
        let e = sample(&m, 1.0).unwrap_err();
        assert!(
            e.contains("generating new token 1: the logits of the model from"),
            "{e}"
        );
        assert!(e.contains("are NaN or infinite"), "{e}");
    }
}
