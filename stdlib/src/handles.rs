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
    /// The vocabulary size of the tokenizer(s) that made them (0: unknown).
    pub vocab: usize,
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
                    vocab: t.vocab,
                    ..Tokenized::default()
                }
            }),
        }))
    }
}

impl DatasetHandle {
    /// The datasets of `parts` one after another (all records, or all tokenized examples).
    pub fn concat(parts: &[DatasetHandle]) -> Result<Self, String> {
        Self::pick(
            parts,
            &parts
                .iter()
                .enumerate()
                .flat_map(|(d, p)| (0..p.len()).map(move |i| (d, i)))
                .collect::<Vec<_>>(),
        )
    }

    /// Row `i` of dataset `d` of `parts`, for each `(d, i)` of `order`: one dataset of the kind
    /// they all are.
    pub fn pick(parts: &[DatasetHandle], order: &[(usize, usize)]) -> Result<Self, String> {
        let Some(first) = parts.first() else {
            return Err("no datasets given".into());
        };
        let records = matches!(&*first.0, Data::Records(_));
        for (k, p) in parts.iter().enumerate() {
            if matches!(&*p.0, Data::Records(_)) != records {
                let kind = |r: bool| if r { "records" } else { "tokenized examples" };
                return Err(format!(
                    "dataset {k} holds {}, dataset 0 {}; combine datasets of one kind (before or after `data::sft`)",
                    kind(!records),
                    kind(records)
                ));
            }
        }
        let source = parts
            .iter()
            .map(DatasetHandle::source)
            .collect::<Vec<_>>()
            .join(" + ");
        Ok(Self(Arc::new(if records {
            let rows = order
                .iter()
                .map(|&(d, i)| match &*parts[d].0 {
                    Data::Records(r) => r.rows[i].clone(),
                    Data::Tokenized(_) => serde_json::Value::Null,
                })
                .collect();
            Data::Records(Dataset { rows, source })
        } else {
            let mut out = Tokenized {
                source,
                ..Tokenized::default()
            };
            for p in parts {
                if let Data::Tokenized(t) = &*p.0 {
                    out.truncated += t.truncated;
                    out.dropped += t.dropped;
                    out.vocab = out.vocab.max(t.vocab);
                }
            }
            out.examples = order
                .iter()
                .filter_map(|&(d, i)| match &*parts[d].0 {
                    Data::Tokenized(t) => Some(t.examples[i].clone()),
                    Data::Records(_) => None,
                })
                .collect();
            Data::Tokenized(out)
        })))
    }
}

/// `for r in ds { }`: each record (or example) as a map, in order.
#[derive(Clone, Debug)]
pub struct DatasetIter {
    ds: DatasetHandle,
    next: usize,
}

impl Iterator for DatasetIter {
    type Item = rhai::Dynamic;

    fn next(&mut self) -> Option<rhai::Dynamic> {
        let row = self.ds.row_json(self.next)?;
        self.next += 1;
        rhai::serde::to_dynamic(row).ok()
    }
}

impl IntoIterator for DatasetHandle {
    type Item = rhai::Dynamic;
    type IntoIter = DatasetIter;

    fn into_iter(self) -> DatasetIter {
        DatasetIter { ds: self, next: 0 }
    }
}

/// Registers the handle types with their script names.
pub fn register(engine: &mut rhai::Engine) {
    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
    engine.register_type_with_name::<DatasetHandle>("Dataset");
    engine.register_iterator::<DatasetHandle>();
}
