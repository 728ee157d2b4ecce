//! Datasets: records from JSON and JSONL files, and (next) formats, SFT tokenization and batching.

pub mod batch;
pub mod formats;
pub mod info;
pub mod records;
pub mod sft;

pub use records::{Dataset, load_files};
