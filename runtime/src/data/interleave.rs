//! Interleaving datasets as HF datasets' `interleave_datasets` does: in turn, or drawn with
//! probabilities (seeded), until one runs out or every one has been used up once. The draws are
//! qscript's own (seeded `StdRng`), not numpy's.

use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::ops::Data;
use crate::{Error, Result};

/// Options of `data::interleave` (HF datasets' `interleave_datasets`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InterleaveOptions {
    /// Chance of drawing from each dataset at each step (none: take them in turn).
    pub probabilities: Option<Vec<f64>>,
    /// Seed of the draws.
    pub seed: Option<u64>,
    /// `first_exhausted` (stop when one runs out, the default) or `all_exhausted` (start the
    /// exhausted ones over until every one has been used up once).
    pub stopping_strategy: Option<String>,
}

/// The datasets of `parts` interleaved (see [`order`]); an error in the options reads
/// ``` `data::interleave`: ... ```.
pub fn interleave(parts: &[&Data], opts: &InterleaveOptions) -> Result<Data> {
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    let order = order(&lens, opts)
        .map_err(|m| Error::InvalidArgument(format!("`data::interleave`: {m}")))?;
    Data::pick(parts, &order)
}

/// The `(dataset, row)` order of `interleave` over datasets of `lens` rows, or what is wrong with
/// the options.
pub fn order(lens: &[usize], o: &InterleaveOptions) -> Result<Vec<(usize, usize)>, String> {
    let all = match o.stopping_strategy.as_deref().unwrap_or("first_exhausted") {
        "first_exhausted" => false,
        "all_exhausted" => true,
        other => {
            return Err(format!(
                "`stopping_strategy` must be `first_exhausted` or `all_exhausted`, got `{other}`"
            ));
        }
    };
    if let Some((k, _)) = lens.iter().enumerate().find(|(_, n)| **n == 0) {
        return Err(format!("dataset {k} is empty"));
    }
    let cumulative = match &o.probabilities {
        None => None,
        Some(p) => {
            if p.len() != lens.len() {
                return Err(format!(
                    "`probabilities` has {} entries for {} datasets",
                    p.len(),
                    lens.len()
                ));
            }
            let sum: f64 = p.iter().sum();
            if p.iter().any(|x| !x.is_finite() || *x < 0.0) || (sum - 1.0).abs() > 1e-6 {
                return Err(format!(
                    "`probabilities` must be non-negative and sum to 1, got {p:?} (sum {sum})"
                ));
            }
            Some(
                p.iter()
                    .scan(0.0, |acc, x| {
                        *acc += x;
                        Some(*acc)
                    })
                    .collect::<Vec<f64>>(),
            )
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed.unwrap_or(0));
    let mut next = vec![0usize; lens.len()];
    let mut done = vec![false; lens.len()];
    let mut order = Vec::new();
    let limit = lens
        .iter()
        .sum::<usize>()
        .saturating_mul(lens.len().max(1))
        .saturating_mul(64);
    for turn in 0.. {
        if order.len() >= limit {
            return Err(
                "`interleave` would not end: a dataset with probability 0 can never be used up"
                    .into(),
            );
        }
        let d = match &cumulative {
            None => turn % lens.len(),
            Some(c) => {
                let u: f64 = rng.random();
                c.iter().position(|&x| u < x).unwrap_or(lens.len() - 1)
            }
        };
        if next[d] == lens[d] {
            done[d] = true;
            if !all || done.iter().all(|&x| x) {
                break;
            }
            next[d] = 0;
        }
        order.push((d, next[d]));
        next[d] += 1;
        if all && next[d] == lens[d] {
            done[d] = true;
            if done.iter().all(|&x| x) {
                break;
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(strategy: &str) -> InterleaveOptions {
        InterleaveOptions {
            stopping_strategy: Some(strategy.into()),
            ..InterleaveOptions::default()
        }
    }

    #[test]
    fn in_turn_until_one_runs_out_or_all_are_used() {
        let first = order(&[2, 3], &InterleaveOptions::default()).unwrap();
        assert_eq!(first, [(0, 0), (1, 0), (0, 1), (1, 1)]);
        let all = order(&[2, 3], &opts("all_exhausted")).unwrap();
        assert_eq!(all, [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 2)]);
    }

    #[test]
    fn draws_are_seeded() {
        let o = InterleaveOptions {
            probabilities: Some(vec![0.7, 0.3]),
            seed: Some(1),
            stopping_strategy: None,
        };
        let a = order(&[50, 50], &o).unwrap();
        assert_eq!(a, order(&[50, 50], &o).unwrap());
        // It stops when one dataset runs out, so one of them is used up.
        let used = |d: usize| a.iter().filter(|(k, _)| *k == d).count();
        assert!(used(0) == 50 || used(1) == 50, "{a:?}");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let err = |lens: &[usize], o: &InterleaveOptions| order(lens, o).unwrap_err();
        assert_eq!(
            err(&[1, 1], &opts("longest")),
            "`stopping_strategy` must be `first_exhausted` or `all_exhausted`, got `longest`"
        );
        assert_eq!(
            err(&[1, 0], &InterleaveOptions::default()),
            "dataset 1 is empty"
        );
        let p = |p: Vec<f64>| InterleaveOptions {
            probabilities: Some(p),
            ..opts("all_exhausted")
        };
        assert_eq!(
            err(&[1, 1], &p(vec![1.0])),
            "`probabilities` has 1 entries for 2 datasets"
        );
        assert!(err(&[1, 1], &p(vec![0.5, 0.6])).contains("must be non-negative and sum to 1"));
        assert_eq!(
            err(&[1, 1], &p(vec![1.0, 0.0])),
            "`interleave` would not end: a dataset with probability 0 can never be used up"
        );
    }
}
