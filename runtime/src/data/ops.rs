//! Datasets of either kind, records or tokenized examples, and the operations that keep their
//! kind: select, shuffle, subsets, concat and picking rows across datasets (interleave's second
//! half), and column edits of records. Each returns a new dataset; none edits its input.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Map, Value};

use super::records::Dataset;
use super::tokenized::TokenizedDataset;
use crate::{Error, Result};

/// The contents of a dataset: records (JSON objects), or tokenized examples.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// JSON records.
    Records(Dataset),
    /// `input_ids` / `labels` examples.
    Tokenized(TokenizedDataset),
}

impl Data {
    /// Number of records or examples.
    pub fn len(&self) -> usize {
        match self {
            Data::Records(d) => d.len(),
            Data::Tokenized(t) => t.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source description.
    pub fn source(&self) -> &str {
        match self {
            Data::Records(d) => &d.source,
            Data::Tokenized(t) => &t.source,
        }
    }

    /// Column names: the records' in first-seen order, or an example's fixed ones.
    pub fn columns(&self) -> Vec<String> {
        match self {
            Data::Records(d) => d.columns(),
            Data::Tokenized(_) => TokenizedDataset::COLUMNS.map(String::from).to_vec(),
        }
    }

    /// Record `i` as JSON (`input_ids`, `labels`, `attention_mask` for examples).
    pub fn row_json(&self, i: usize) -> Option<Value> {
        match self {
            Data::Records(d) => d.rows.get(i).cloned(),
            Data::Tokenized(t) => t.row_json(i),
        }
    }

    /// The records or examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        match self {
            Data::Records(d) => Data::Records(Dataset {
                rows: indices.iter().map(|&i| d.rows[i].clone()).collect(),
                source: d.source.clone(),
            }),
            Data::Tokenized(t) => Data::Tokenized(t.subset(indices)),
        }
    }

    /// The records in `start..end`; an end past the last record stops at it, and a start past the
    /// end gives an empty dataset.
    pub fn select(&self, start: usize, end: usize) -> Self {
        let end = end.min(self.len());
        self.subset(&(start.min(end)..end).collect::<Vec<_>>())
    }

    /// The order of `0..n` shuffled from `seed` (the shuffle of [`Data::shuffle`] and the split).
    pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rng);
        idx
    }

    /// The records in an order shuffled from `seed`.
    pub fn shuffle(&self, seed: u64) -> Self {
        self.subset(&Self::shuffled_indices(self.len(), seed))
    }

    /// The datasets of `parts` one after another (all records, or all tokenized examples).
    pub fn concat(parts: &[&Data]) -> Result<Self> {
        let order: Vec<(usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(d, p)| (0..p.len()).map(move |i| (d, i)))
            .collect();
        Self::pick(parts, &order)
    }

    /// Row `i` of dataset `d` of `parts`, for each `(d, i)` of `order`: one dataset of the kind
    /// they all are. Its source joins theirs with ` + `; tokenized examples keep the sum of the
    /// truncated and dropped counts and the largest vocabulary.
    pub fn pick(parts: &[&Data], order: &[(usize, usize)]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidArgument("no datasets given".into()));
        };
        let records = matches!(first, Data::Records(_));
        for (k, p) in parts.iter().enumerate() {
            if matches!(p, Data::Records(_)) != records {
                let kind = |r: bool| if r { "records" } else { "tokenized examples" };
                return Err(Error::InvalidArgument(format!(
                    "dataset {k} holds {}, dataset 0 {}; combine datasets of one kind (before or after `data::sft`)",
                    kind(!records),
                    kind(records)
                )));
            }
        }
        let source = parts
            .iter()
            .map(|p| p.source())
            .collect::<Vec<_>>()
            .join(" + ");
        Ok(if records {
            let rows = order
                .iter()
                .map(|&(d, i)| match parts[d] {
                    Data::Records(r) => r.rows[i].clone(),
                    Data::Tokenized(_) => Value::Null,
                })
                .collect();
            Data::Records(Dataset { rows, source })
        } else {
            let mut out = TokenizedDataset {
                source,
                ..TokenizedDataset::default()
            };
            for p in parts {
                if let Data::Tokenized(t) = p {
                    out.truncated += t.truncated;
                    out.dropped += t.dropped;
                    out.vocab = out.vocab.max(t.vocab);
                }
            }
            out.examples = order
                .iter()
                .filter_map(|&(d, i)| match parts[d] {
                    Data::Tokenized(t) => Some(t.examples[i].clone()),
                    Data::Records(_) => None,
                })
                .collect();
            Data::Tokenized(out)
        })
    }

    /// The records without the columns `names`.
    pub fn remove_columns(&self, names: &[String]) -> Result<Self> {
        self.edit_records(|m| {
            for n in names {
                m.remove(n);
            }
        })
    }

    /// The records with column `from` renamed to `to`.
    pub fn rename_column(&self, from: &str, to: &str) -> Result<Self> {
        self.edit_records(|m| {
            if let Some(v) = m.remove(from) {
                m.insert(to.to_string(), v);
            }
        })
    }

    /// The records, each edited by `f`; tokenized examples are refused.
    fn edit_records(&self, f: impl Fn(&mut Map<String, Value>)) -> Result<Self> {
        let Data::Records(d) = self else {
            return Err(Error::InvalidArgument(
                "tokenized examples have fixed columns".into(),
            ));
        };
        let mut rows = d.rows.clone();
        for r in &mut rows {
            if let Some(m) = r.as_object_mut() {
                f(m);
            }
        }
        Ok(Data::Records(Dataset {
            rows,
            source: d.source.clone(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::data::sft::Example;

    fn records(source: &str, xs: &[i64]) -> Data {
        Data::Records(Dataset {
            rows: xs.iter().map(|x| json!({ "x": x })).collect(),
            source: source.into(),
        })
    }

    fn xs(d: &Data) -> Vec<i64> {
        (0..d.len())
            .map(|i| d.row_json(i).unwrap()["x"].as_i64().unwrap())
            .collect()
    }

    fn tokenized(source: &str, n: u32, vocab: usize) -> Data {
        Data::Tokenized(TokenizedDataset {
            examples: (0..n)
                .map(|i| Example {
                    input_ids: vec![i],
                    labels: vec![i64::from(i)],
                    packed: Vec::new(),
                    pref: None,
                })
                .collect(),
            source: source.into(),
            truncated: 1,
            dropped: 2,
            vocab,
        })
    }

    #[test]
    fn select_clamps_to_the_records() {
        let d = records("a", &[1, 2, 3]);
        assert_eq!(xs(&d.select(1, 3)), [2, 3]);
        assert_eq!(xs(&d.select(1, 99)), [2, 3]);
        assert!(d.select(5, 9).is_empty());
        assert!(d.select(2, 1).is_empty());
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let d = records("a", &(0..50).collect::<Vec<_>>());
        let s = d.shuffle(7);
        assert_eq!(s, d.shuffle(7));
        assert_ne!(xs(&s), xs(&d));
        let mut sorted = xs(&s);
        sorted.sort_unstable();
        assert_eq!(sorted, xs(&d));
        assert_eq!(s.source(), "a");
    }

    #[test]
    fn concat_and_pick_keep_one_kind() {
        let (a, b) = (records("a", &[1, 2]), records("b", &[3]));
        let c = Data::concat(&[&a, &b]).unwrap();
        assert_eq!((xs(&c), c.source()), (vec![1, 2, 3], "a + b"));
        let p = Data::pick(&[&a, &b], &[(1, 0), (0, 1)]).unwrap();
        assert_eq!(xs(&p), [3, 2]);
        let (t, u) = (tokenized("t", 2, 10), tokenized("u", 1, 12));
        let Data::Tokenized(tu) = Data::concat(&[&t, &u]).unwrap() else {
            panic!("not tokenized");
        };
        assert_eq!(tu.examples.len(), 3);
        assert_eq!((tu.truncated, tu.dropped, tu.vocab), (2, 4, 12));
        assert_eq!(
            Data::concat(&[&a, &t]).unwrap_err().to_string(),
            "dataset 1 holds tokenized examples, dataset 0 records; combine datasets of one kind (before or after `data::sft`)"
        );
        assert_eq!(
            Data::concat(&[]).unwrap_err().to_string(),
            "no datasets given"
        );
    }

    #[test]
    fn column_edits_apply_to_records_only() {
        let d = Data::Records(Dataset {
            rows: vec![json!({"a": 1, "b": 2})],
            source: "s".into(),
        });
        assert_eq!(d.remove_columns(&["b".into()]).unwrap().columns(), ["a"]);
        assert_eq!(d.rename_column("a", "c").unwrap().columns(), ["b", "c"]);
        assert_eq!(
            tokenized("t", 1, 0)
                .rename_column("a", "b")
                .unwrap_err()
                .to_string(),
            "tokenized examples have fixed columns"
        );
        assert_eq!(
            tokenized("t", 1, 0).columns(),
            ["input_ids", "labels", "attention_mask"]
        );
    }
}
