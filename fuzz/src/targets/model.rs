//! Checkpoint files: safetensors weights and their index, `config.json`,
//! `generation_config.json`, and a PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`). Each is written into a checkpoint directory whose other files
//! are a real (tiny, built-in) model's, then loaded as `model::load` and `qscript check` load it.

use std::path::Path;

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::lora;
use qscript_runtime::model::generate::GenerateOptions;
use qscript_runtime::model::load::{LoadOptions, Model};
use qscript_runtime::model::lora_config::LoraConfig;
use qscript_runtime::model::tiny::{TinyConfig, tiny};

use super::{Harness, Outcome, Scratch, Shape, Target, err, fixture_files};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[
    &SAFETENSORS,
    &INDEX,
    &MODEL_CONFIG,
    &GENERATION_CONFIG,
    &ADAPTER_CONFIG,
    &ADAPTER_MODEL,
];

/// Tokens every checkpoint target's mutator knows.
const CHECKPOINT_DICT: &[&str] = &[
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "\"F32\"",
    "\"BF16\"",
    "\"F16\"",
    "\"F64\"",
    "\"BOOL\"",
    "\"I64\"",
    "\"U8\"",
    "\"F8_E4M3\"",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "\"num_hidden_layers\"",
    "\"hidden_size\"",
    "\"vocab_size\"",
    "\"num_attention_heads\"",
    "\"num_key_value_heads\"",
    "\"head_dim\"",
    "\"intermediate_size\"",
    "\"rope_scaling\"",
    "\"rope_theta\"",
    "\"rms_norm_eps\"",
    "\"tie_word_embeddings\"",
    "\"architectures\"",
    "\"LlamaForCausalLM\"",
    "\"Qwen3ForCausalLM\"",
    "\"weight_map\"",
    "\"temperature\"",
    "\"top_p\"",
    "\"top_k\"",
    "\"do_sample\"",
    "\"eos_token_id\"",
    "\"repetition_penalty\"",
    "\"target_modules\"",
    "\"lora_alpha\"",
    "\"use_rslora\"",
    "\"all-linear\"",
    "\"r\"",
    "1e12",
    "-1",
    "NaN",
    "1e309",
    "\\u0000",
    "../",
];

/// A small model: its files are the checkpoint around each input.
fn base() -> TinyConfig {
    TinyConfig {
        hidden: 16,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        intermediate: 24,
        vocab: 64,
        max_positions: 64,
        ..TinyConfig::default()
    }
}

/// A checkpoint directory of the base model (`config.json`, `generation_config.json`,
/// `model.safetensors`).
fn checkpoint() -> anyhow::Result<(Scratch, Model)> {
    let s = Scratch::new()?;
    let m = tiny(&base())?;
    m.save(s.path())?;
    Ok((s, m))
}

/// The base checkpoint's file `name`.
fn base_file(name: &str) -> Vec<Vec<u8>> {
    checkpoint()
        .ok()
        .and_then(|(s, _)| std::fs::read(s.path().join(name)).ok())
        .into_iter()
        .collect()
}

/// Loads the checkpoint in `dir` as `qscript check` does (headers only) and as `model::load`
/// does (weights mapped, on the CPU), then greedy- or sample-decodes two tokens with its
/// generation defaults.
fn load_both(dir: &Path) -> Outcome {
    let opts = LoadOptions::default();
    Model::load_shapes(dir, &opts).map_err(err)?;
    let m = Model::load(dir, &opts).map_err(err)?;
    let decode = GenerateOptions {
        max_new_tokens: 2,
        ..GenerateOptions::default()
    };
    m.generate(&[1, 2], &decode, &CancelToken::new(), &mut |_| Ok(()))
        .map_err(err)?;
    Ok(())
}

/// A harness that writes each input to `file` of a base checkpoint and loads it.
struct InCheckpoint {
    scratch: Scratch,
    file: &'static str,
}

impl Harness for InCheckpoint {
    fn run(&mut self, input: &[u8]) -> Outcome {
        self.scratch.put(self.file, input)?;
        load_both(self.scratch.path())
    }
}

fn in_checkpoint(file: &'static str) -> anyhow::Result<Box<dyn Harness>> {
    let (scratch, _) = checkpoint()?;
    Ok(Box::new(InCheckpoint { scratch, file }))
}

/// `model.safetensors`.
pub static SAFETENSORS: Target = Target {
    name: "safetensors",
    entry: "Model::load_shapes + Model::load (weights::WeightSource::headers / open) on `model.safetensors`",
    max_len: 256 << 10,
    shape: Shape::Safetensors,
    dict: CHECKPOINT_DICT,
    seeds: || base_file("model.safetensors"),
    harness: || in_checkpoint("model.safetensors"),
};

/// `model.safetensors.index.json`, beside one shard holding the base model's weights.
pub static INDEX: Target = Target {
    name: "safetensors_index",
    entry: "Model::load_shapes + Model::load on `model.safetensors.index.json` (sharded weights)",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: CHECKPOINT_DICT,
    seeds: || {
        let Ok((s, m)) = checkpoint() else {
            return Vec::new();
        };
        drop(s);
        let map: serde_json::Map<String, serde_json::Value> = m
            .named()
            .into_iter()
            .map(|(n, _)| (n, serde_json::json!(SHARD)))
            .collect();
        vec![
            serde_json::to_vec_pretty(&serde_json::json!({
                "metadata": {"total_size": 1234},
                "weight_map": map,
            }))
            .unwrap_or_default(),
        ]
    },
    harness: || {
        let (scratch, _) = checkpoint()?;
        let p = scratch.path();
        std::fs::rename(p.join("model.safetensors"), p.join(SHARD))?;
        Ok(Box::new(InCheckpoint {
            scratch,
            file: "model.safetensors.index.json",
        }))
    },
};

/// The shard the index target's checkpoint holds.
const SHARD: &str = "model-00001-of-00001.safetensors";

/// `config.json`, beside the base model's weights.
pub static MODEL_CONFIG: Target = Target {
    name: "model_config",
    entry: "ModelConfig::from_file via Model::load_shapes + Model::load on `config.json`",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: CHECKPOINT_DICT,
    seeds: || {
        let mut out = base_file("config.json");
        out.extend(fixture_files(
            &[
                "configs/Llama-3.2-1B/config.json",
                "configs/Qwen2.5-0.5B-Instruct/config.json",
                "configs/Qwen3-4B/config.json",
                "configs/Qwen1.5-7B/config.json",
                "models/stories260K/hf/config.json",
            ],
            64 << 10,
        ));
        out
    },
    harness: || in_checkpoint("config.json"),
};

/// `generation_config.json`, beside the base model.
pub static GENERATION_CONFIG: Target = Target {
    name: "generation_config",
    entry: "GenerationConfig (Model::load's checkpoint files) and Model::generate with its defaults",
    max_len: 16 << 10,
    shape: Shape::Json,
    dict: CHECKPOINT_DICT,
    seeds: || {
        let mut out = base_file("generation_config.json");
        out.extend(fixture_files(
            &["models/stories260K/hf/generation_config.json"],
            16 << 10,
        ));
        out.push(
            br#"{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [1, 2], "bos_token_id": 1}"#
                .to_vec(),
        );
        out
    },
    harness: || in_checkpoint("generation_config.json"),
};

/// A PEFT adapter directory of the base model (LoRA on every linear layer, r 4), and the base
/// model.
fn adapter() -> anyhow::Result<(Scratch, Model)> {
    let s = Scratch::new()?;
    let m = tiny(&base())?;
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::default()
    };
    lora::save_adapter(&lora::attach(&m, &cfg, 0)?, s.path())?;
    Ok((s, m))
}

/// A harness that writes each input to `file` of an adapter directory and loads the adapter
/// onto the base model, as `lora::load` does.
struct InAdapter {
    scratch: Scratch,
    model: Model,
    file: &'static str,
}

impl Harness for InAdapter {
    fn run(&mut self, input: &[u8]) -> Outcome {
        self.scratch.put(self.file, input)?;
        let m = lora::load_adapter(&self.model, self.scratch.path()).map_err(err)?;
        lora::merge(&m).map_err(err)?;
        Ok(())
    }
}

fn in_adapter(file: &'static str) -> anyhow::Result<Box<dyn Harness>> {
    let (scratch, model) = adapter()?;
    Ok(Box::new(InAdapter {
        scratch,
        model,
        file,
    }))
}

fn adapter_file(name: &str) -> Vec<Vec<u8>> {
    adapter()
        .ok()
        .and_then(|(s, _)| std::fs::read(s.path().join(name)).ok())
        .into_iter()
        .collect()
}

/// `adapter_config.json`, beside a matching `adapter_model.safetensors`.
pub static ADAPTER_CONFIG: Target = Target {
    name: "adapter_config",
    entry: "LoraConfig::from_file via lora::load_adapter (+ lora::merge) on `adapter_config.json`",
    max_len: 16 << 10,
    shape: Shape::Json,
    dict: CHECKPOINT_DICT,
    seeds: || adapter_file("adapter_config.json"),
    harness: || in_adapter("adapter_config.json"),
};

/// `adapter_model.safetensors`, beside its `adapter_config.json`.
pub static ADAPTER_MODEL: Target = Target {
    name: "adapter_model",
    entry: "weights::load_all via lora::load_adapter (+ lora::merge) on `adapter_model.safetensors`",
    max_len: 64 << 10,
    shape: Shape::Safetensors,
    dict: CHECKPOINT_DICT,
    seeds: || adapter_file("adapter_model.safetensors"),
    harness: || in_adapter("adapter_model.safetensors"),
};
