//! Models: HF checkpoints in, a differentiable Llama-family decoder, generation.

pub mod block;
pub mod config;
pub mod decoder;
pub mod generate;
pub mod load;
pub mod params;
pub mod rope;
pub mod tiny;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use decoder::{Decoder, KvCache};
pub use generate::GenerateOptions;
pub use load::{LoadOptions, Model};
pub use tiny::{TinyConfig, tiny};
