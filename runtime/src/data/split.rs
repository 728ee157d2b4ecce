//! Train/test split after a seeded shuffle, as HF datasets' `train_test_split` does: `test_size`
//! is a fraction of the records (`0.1`) or a count (`100`).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::ops::Data;
use crate::{Error, Result};

/// Options of `train_test_split`. Deserialized from a map of `test_size` and `seed` (in key
/// order; the first mistake is reported); a mistake reads as the script function has always said
/// it (`` `seed` must be a non-negative integer ``), a value's type named as scripts name it.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitOptions {
    /// A fraction of the records below 1 (`0.1`, rounded up), or a count (`100`).
    pub test_size: f64,
    /// Seed of the shuffle.
    pub seed: u64,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            test_size: 0.1,
            seed: 0,
        }
    }
}

/// A train/test split.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// The records to train on.
    pub train: Data,
    /// The held-out records.
    pub test: Data,
}

/// `ds` split into train and test records after a shuffle seeded by `opts.seed`; both must be
/// non-empty.
pub fn train_test_split(ds: &Data, opts: &SplitOptions) -> Result<Split> {
    let n = ds.len();
    let n_test = test_count(n, opts.test_size);
    if n_test == 0 || n_test >= n {
        return Err(Error::InvalidArgument(format!(
            "`test_size` {} leaves {n_test} of {n} records for test; both splits must be non-empty",
            opts.test_size
        )));
    }
    let idx = Data::shuffled_indices(n, opts.seed);
    Ok(Split {
        test: ds.subset(&idx[..n_test]),
        train: ds.subset(&idx[n_test..]),
    })
}

/// How many of `n` records `test_size` holds out.
fn test_count(n: usize, test_size: f64) -> usize {
    if test_size < 1.0 {
        (n as f64 * test_size).ceil() as usize
    } else {
        test_size as usize
    }
}

impl<'de> Deserialize<'de> for SplitOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OptionsVisitor)
    }
}

struct OptionsVisitor;

impl<'de> Visitor<'de> for OptionsVisitor {
    type Value = SplitOptions;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of `test_size` and `seed`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SplitOptions, A::Error> {
        let mut o = SplitOptions::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "test_size" => o.test_size = map.next_value::<TestSize>()?.0,
                "seed" => o.seed = map.next_value::<Seed>()?.0,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field `{other}`, expected one of `test_size`, `seed`"
                    )));
                }
            }
        }
        Ok(o)
    }
}

/// `test_size`: any number (NaN too: the split refuses it); anything else is named as scripts
/// name its type.
struct TestSize(f64);

impl<'de> Deserialize<'de> for TestSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TestSizeVisitor)
    }
}

struct TestSizeVisitor;

impl TestSizeVisitor {
    fn not_a_number<E: de::Error>(script_type: &str) -> E {
        E::custom(format!("`test_size` is {script_type}, expected a number"))
    }
}

impl<'de> Visitor<'de> for TestSizeVisitor {
    type Value = TestSize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<TestSize, E> {
        Ok(TestSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<TestSize, E> {
        Ok(TestSize(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<TestSize, E> {
        Ok(TestSize(v as f64))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TestSize, E> {
        Err(Self::not_a_number("bool"))
    }

    fn visit_char<E: de::Error>(self, _: char) -> Result<TestSize, E> {
        Err(Self::not_a_number("char"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<TestSize, E> {
        Err(Self::not_a_number("string"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<TestSize, E> {
        Err(Self::not_a_number("()"))
    }

    fn visit_none<E: de::Error>(self) -> Result<TestSize, E> {
        Err(Self::not_a_number("()"))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<TestSize, E> {
        Err(Self::not_a_number("blob"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<TestSize, A::Error> {
        Err(Self::not_a_number("array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<TestSize, A::Error> {
        Err(Self::not_a_number("map"))
    }
}

/// `seed`: a non-negative integer.
struct Seed(u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SeedVisitor)
    }
}

struct SeedVisitor;

impl<'de> Visitor<'de> for SeedVisitor {
    type Value = Seed;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
        Ok(Seed(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
        u64::try_from(v).map(Seed).map_err(|_| not_a_seed())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_char<E: de::Error>(self, _: char) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_none<E: de::Error>(self) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Seed, E> {
        Err(not_a_seed())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Seed, A::Error> {
        Err(not_a_seed())
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Seed, A::Error> {
        Err(not_a_seed())
    }
}

fn not_a_seed<E: de::Error>() -> E {
    E::custom("`seed` must be a non-negative integer")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::data::Dataset;

    fn parse(v: serde_json::Value) -> Result<SplitOptions, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn options_read_as_they_always_have() {
        assert_eq!(parse(json!({})).unwrap(), SplitOptions::default());
        assert_eq!(
            parse(json!({"test_size": 100, "seed": 3})).unwrap(),
            SplitOptions {
                test_size: 100.0,
                seed: 3
            }
        );
        assert_eq!(parse(json!({"test_size": 0.25})).unwrap().test_size, 0.25);
        assert_eq!(
            parse(json!({"test_size": "0.1"})).unwrap_err(),
            "`test_size` is string, expected a number"
        );
        assert_eq!(
            parse(json!({"test_size": null})).unwrap_err(),
            "`test_size` is (), expected a number"
        );
        assert_eq!(
            parse(json!({"test_size": [1]})).unwrap_err(),
            "`test_size` is array, expected a number"
        );
        for bad in [json!(-1), json!(1.5), json!("1")] {
            assert_eq!(
                parse(json!({ "seed": bad })).unwrap_err(),
                "`seed` must be a non-negative integer"
            );
        }
        // keys in order: the first unknown one is named
        assert_eq!(
            parse(json!({"abc": 1, "test_size": "x"})).unwrap_err(),
            "unknown field `abc`, expected one of `test_size`, `seed`"
        );
    }

    #[test]
    fn split_sizes() {
        let ds = Data::Records(Dataset {
            rows: (0..10).map(|x| json!({ "x": x })).collect(),
            source: "s".into(),
        });
        let s = train_test_split(&ds, &SplitOptions::default()).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (9, 1));
        let o = |test_size| SplitOptions { test_size, seed: 4 };
        let s = train_test_split(&ds, &o(0.25)).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (7, 3));
        let s = train_test_split(&ds, &o(4.0)).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (6, 4));
        assert_eq!(s, train_test_split(&ds, &o(4.0)).unwrap());
        let mut all: Vec<_> = (0..4)
            .map(|i| s.test.row_json(i).unwrap())
            .chain((0..6).map(|i| s.train.row_json(i).unwrap()))
            .map(|r| r["x"].as_i64().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(
            train_test_split(&ds, &o(10.0)).unwrap_err().to_string(),
            "`test_size` 10 leaves 10 of 10 records for test; both splits must be non-empty"
        );
        assert_eq!(
            train_test_split(&ds, &o(0.0)).unwrap_err().to_string(),
            "`test_size` 0 leaves 0 of 10 records for test; both splits must be non-empty"
        );
    }
}
