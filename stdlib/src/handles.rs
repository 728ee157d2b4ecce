//! Script handles for engine objects. They are cheap to clone (`Arc`), and operations return new
//! handles rather than mutating their inputs, so re-running a cell never sees a later cell's edits.

use std::sync::Arc;

use qscript_runtime::data::Dataset;
use qscript_runtime::data::sft::Example;
use qscript_runtime::model::Model;
use qscript_runtime::tokenizer::Tokenizer;

/// A loaded model (`Model` in scripts).
#[derive(Clone, Debug)]
pub struct ModelHandle(pub Arc<Model>);

/// A tokenizer (`Tokenizer` in scripts).
#[derive(Clone, Debug)]
pub struct TokenizerHandle(pub Arc<Tokenizer>);

/// Tokenized examples, ready for the trainer.
#[derive(Clone, Debug, Default)]
pub struct Tokenized {
    /// The examples.
    pub examples: Vec<Example>,
    /// Where they came from.
    pub source: String,
    /// Cut at `max_length`.
    pub truncated: usize,
    /// Dropped because every label was masked.
    pub dropped: usize,
}

/// The contents of a dataset: records (maps), or tokenized examples.
#[derive(Clone, Debug)]
pub enum Data {
    /// JSON records.
    Records(Dataset),
    /// `input_ids` / `labels` examples.
    Tokenized(Tokenized),
}

/// A dataset (`Dataset` in scripts).
#[derive(Clone, Debug)]
pub struct DatasetHandle(pub Arc<Data>);

impl DatasetHandle {
    /// From records.
    pub fn records(ds: Dataset) -> Self {
        Self(Arc::new(Data::Records(ds)))
    }

    /// Number of records or examples.
    pub fn len(&self) -> usize {
        match &*self.0 {
            Data::Records(d) => d.len(),
            Data::Tokenized(t) => t.examples.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source description.
    pub fn source(&self) -> &str {
        match &*self.0 {
            Data::Records(d) => &d.source,
            Data::Tokenized(t) => &t.source,
        }
    }

    /// Record `i` as JSON (`input_ids`, `labels`, `attention_mask` for examples).
    pub fn row_json(&self, i: usize) -> Option<serde_json::Value> {
        match &*self.0 {
            Data::Records(d) => d.rows.get(i).cloned(),
            Data::Tokenized(t) => t.examples.get(i).map(|e| {
                serde_json::json!({"input_ids": e.input_ids, "labels": e.labels, "attention_mask": vec![1; e.input_ids.len()]})
            }),
        }
    }

    /// The records or examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self(Arc::new(match &*self.0 {
            Data::Records(d) => Data::Records(Dataset {
                rows: indices.iter().map(|&i| d.rows[i].clone()).collect(),
                source: d.source.clone(),
            }),
            Data::Tokenized(t) => Data::Tokenized(Tokenized {
                examples: indices.iter().map(|&i| t.examples[i].clone()).collect(),
                ..Tokenized {
                    source: t.source.clone(),
                    ..Tokenized::default()
                }
            }),
        }))
    }
}

/// Registers the handle types with their script names.
pub fn register(engine: &mut rhai::Engine) {
    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
    engine.register_type_with_name::<DatasetHandle>("Dataset");
    engine.register_type_with_name::<crate::modules::train::TrainerHandle>("Trainer");
}
