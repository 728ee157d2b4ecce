//! Datasets, from files to the trainer's batches:
//!
//! - [`records`]: records from JSON, JSONL, parquet, Arrow and text files, named by a path or a glob the sandbox allows;
//! - [`info`]: entries of LLaMA-Factory's `dataset_info.json`;
//! - [`formats`]: alpaca, ShareGPT, messages and conversation records to chat messages;
//! - [`example`]: one tokenized example (one row, or a preference example's two);
//! - [`pref_records`]: preference and KTO records in their shapes, read into TRL's terms;
//! - [`pref`]: preference and KTO records to tokenized pairs;
//! - [`sft`]: SFT tokenization with label masks, length statistics, the learned spans shown;
//! - [`tokenized`]: the tokenized dataset the trainer takes ([`TokenizedDataset`]);
//! - [`ops`]: a dataset of either kind ([`Data`]) and select, shuffle, concat and column edits;
//! - [`interleave`] and [`split`]: interleaving datasets, and the seeded train/test split;
//! - [`batch`]: padding, packing and the epoch order.

pub mod batch;
pub mod example;
pub mod formats;
pub mod info;
pub mod interleave;
pub mod ops;
pub mod pair_rows;
pub mod pref;
pub mod pref_records;
pub mod records;
pub mod sft;
pub mod split;
pub mod tokenized;

pub use ops::Data;
pub use records::{Dataset, load_files};
pub use tokenized::TokenizedDataset;
