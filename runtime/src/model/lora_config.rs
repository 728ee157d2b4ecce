//! PEFT's `adapter_config.json` for LoRA ([`LoraConfig`]) and which modules it targets. A
//! model carries its adapters' config; attaching, loading, merging and saving them is
//! [`crate::lora`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `target_modules`: names, or one regex / `all-linear`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Targets {
    /// Module names; a module matches if its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regex (full match on the module path) or `all-linear`.
    Pattern(String),
}

/// As a script writes it: `["q_proj", "v_proj"]` or `"all-linear"`.
impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(n) => {
                let quoted: Vec<String> = n.iter().map(|x| format!("{x:?}")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
            Targets::Pattern(p) => write!(f, "{p:?}"),
        }
    }
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

/// PEFT's `adapter_config.json` for LoRA (fields qscript uses; others are kept when read and
/// ignored).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter input while training.
    pub lora_dropout: f64,
    /// Which linear layers get adapters.
    pub target_modules: Targets,
    /// Only `none` is supported.
    pub bias: String,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `CAUSAL_LM` (PEFT writes `null` when none was given: read as `CAUSAL_LM`).
    #[serde(deserialize_with = "task_type_or_causal_lm")]
    pub task_type: String,
    /// `LORA`.
    pub peft_type: String,
    /// The base checkpoint, for loaders that look.
    pub base_model_name_or_path: Option<String>,
    /// PEFT writes it; always false here.
    pub fan_in_fan_out: bool,
    /// PEFT writes it.
    pub inference_mode: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: Targets::default(),
            bias: "none".into(),
            use_rslora: false,
            task_type: "CAUSAL_LM".into(),
            peft_type: "LORA".into(),
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            inference_mode: true,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks values PEFT would reject.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument("LoRA `r` must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::InvalidArgument(format!(
                "`lora_dropout` must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if self.bias != "none" {
            return Err(Error::InvalidArgument(format!(
                "`bias: \"{}\"` is not supported; use `\"none\"`",
                self.bias
            )));
        }
        if self.fan_in_fan_out {
            return Err(Error::InvalidArgument("`fan_in_fan_out: true` is for GPT-2 style Conv1D layers, which these models do not have".into()));
        }
        Ok(())
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::files::read_config(path)?;
        if cfg.peft_type != "LORA" {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`peft_type` is `{}`; only `LORA` adapters are supported",
                    cfg.peft_type
                ),
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Whether the module at `path` (`model.layers.0.self_attn.q_proj`) is a target.
pub fn is_target(targets: &Targets, path: &str) -> Result<bool> {
    Ok(match targets {
        Targets::Names(names) => names
            .iter()
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        Targets::Pattern(p) if p == "all-linear" => true,
        Targets::Pattern(p) => {
            let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                Error::InvalidArgument(format!("`target_modules` is not a valid regex: {e}"))
            })?;
            re.is_match(path)
        }
    })
}

/// `task_type`, `null` read as `CAUSAL_LM` (PEFT writes `null` when none was given).
fn task_type_or_causal_lm<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(|| "CAUSAL_LM".into()))
}
