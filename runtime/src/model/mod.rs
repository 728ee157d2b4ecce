//! Models: HF checkpoints in, a differentiable Llama-family decoder, generation.

pub mod block;
pub mod config;
pub mod decoder;
pub mod generate;
pub mod kv_cache;
pub mod load;
pub mod lora_config;
pub mod module_id;
pub mod params;
pub mod qkv;
pub mod rope;
pub mod tiny;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use decoder::Decoder;
pub use generate::GenerateOptions;
pub use kv_cache::KvCache;
pub use load::{LoadOptions, Model, Planned};
pub use module_id::ModuleId;
pub use tiny::{TinyConfig, tiny};
