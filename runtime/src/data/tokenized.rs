//! Tokenized examples ready for the trainer: what [`crate::data::sft::sft`] made, with where they
//! came from and the vocabulary of the tokenizer that made them (the trainer checks it against the
//! model's embedding).

use serde_json::Value;

use super::sft::{Example, SftReport};

/// Tokenized examples, ready for the trainer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizedDataset {
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

impl TokenizedDataset {
    /// The columns an example shows as a record.
    pub const COLUMNS: [&'static str; 3] = ["input_ids", "labels", "attention_mask"];

    /// The examples of an SFT report, made from `source` by a tokenizer of `vocab` tokens.
    pub fn from_report(report: SftReport, source: impl Into<String>, vocab: usize) -> Self {
        Self {
            examples: report.examples,
            source: source.into(),
            truncated: report.truncated,
            dropped: report.dropped,
            vocab,
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Example `i` as a record: `input_ids`, `labels` and `attention_mask` (all ones); a
    /// preference example as TRL shows it: `prompt_ids`, `chosen_ids` and `rejected_ids`, or
    /// KTO's `prompt_ids`, `completion_ids` and `label`.
    pub fn row_json(&self, i: usize) -> Option<Value> {
        self.examples.get(i).map(|e| match &e.pref {
            Some(p) => {
                let pl = p.prompt_len.min(e.input_ids.len());
                let prompt = &e.input_ids[..pl];
                let answer = &e.input_ids[pl..];
                match p.desirable {
                    None => serde_json::json!({"prompt_ids": prompt, "chosen_ids": answer, "rejected_ids": p.second_ids.get(pl..).unwrap_or_default()}),
                    Some(d) => serde_json::json!({"prompt_ids": prompt, "completion_ids": answer, "label": d}),
                }
            }
            None => serde_json::json!({"input_ids": e.input_ids, "labels": e.labels, "attention_mask": vec![1; e.input_ids.len()]}),
        })
    }

    /// The examples at `indices`, in that order, with the same source and vocabulary. The
    /// truncated and dropped counts describe the tokenization, not a subset, so they are 0.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            examples: indices.iter().map(|&i| self.examples[i].clone()).collect(),
            source: self.source.clone(),
            vocab: self.vocab,
            ..Self::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ex(ids: &[u32]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: ids.iter().map(|&i| i64::from(i)).collect(),
            packed: Vec::new(),
            pref: None,
        }
    }

    #[test]
    fn rows_and_subsets() {
        let t = TokenizedDataset {
            examples: vec![ex(&[1, 2]), ex(&[3])],
            source: "s".into(),
            truncated: 1,
            dropped: 2,
            vocab: 10,
        };
        assert_eq!(
            t.row_json(0).unwrap(),
            serde_json::json!({"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1, 1]})
        );
        assert!(t.row_json(2).is_none());
        let s = t.subset(&[1, 0, 1]);
        assert_eq!(s.examples, [ex(&[3]), ex(&[1, 2]), ex(&[3])]);
        assert_eq!((s.source.as_str(), s.vocab), ("s", 10));
        assert_eq!((s.truncated, s.dropped), (0, 0));
    }
}
