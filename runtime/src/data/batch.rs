//! Batching for the trainer: dynamic padding to the longest example (rounded up to
//! `pad_to_multiple_of`), labels padded with -100, and the epoch order: shuffled from the seed, or
//! length-grouped like transformers' `LengthGroupedSampler` (mega-batches of 50 batches, each
//! sorted by length, the longest first) and still shuffled per epoch.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::example::Pref;
use super::pair_rows::{PairRow, PairView, pair_row};
use super::sft::{Example, IGNORE};
use crate::Result;

/// One padded batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[b, len]` u32.
    pub input_ids: Tensor,
    /// `[b, len]` u32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[b, len]` i64, -100 on padding and unlearned tokens.
    pub labels: Tensor,
    /// Real (unpadded) tokens in the batch (a preference example's both rows, its shared prompt
    /// counted twice, as TRL counts them).
    pub tokens: usize,
    /// Real tokens of each row (the rest is right padding).
    pub lens: Vec<usize>,
    /// `labels` on the host, row-major (the loss picks its rows from it without a read-back).
    pub labels_host: Vec<i64>,
    /// `input_ids` on the host, row-major.
    pub ids_host: Vec<u32>,
    /// Packed rows: per row, where each example after the first starts (`None`: no row packs
    /// several examples).
    pub segments: Option<Vec<Vec<usize>>>,
    /// Per row, the tokens at its start that each of its packed examples sees (a preference
    /// example's shared prompt); `None`: none.
    pub shared: Option<Vec<usize>>,
    /// Preference examples: what the objective needs of each. Empty for SFT rows.
    pub pref: Vec<PrefRows>,
    /// Preference examples (one row each: [`super::pair_rows`]) as the two rows a pair is to
    /// the objective.
    pub view: Option<PairView>,
}

/// A preference example's two rows, as the objective sees them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefRows {
    /// KTO: whether the first row's answer is desirable; `None` for a pair.
    pub desirable: Option<bool>,
    /// The reference model's log-probabilities of the rows' learned tokens, once computed.
    pub ref_logps: Option<[f64; 2]>,
}

impl Batch {
    /// Which keys each query sees: causal, right padding, and packed examples kept apart.
    pub fn mask(&self) -> crate::nn::AttnMask {
        crate::nn::AttnMask::right_padded(&self.lens)
            .with_segments(self.segments.clone())
            .with_shared(self.shared.clone())
    }
}

/// Pads `examples` on the right to a common length.
pub fn collate(
    examples: &[&Example],
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
    device: &Device,
) -> Result<Batch> {
    let pref = examples.iter().any(|e| e.pref.is_some());
    if pref && examples.iter().any(|e| e.pref.is_none()) {
        return Err(crate::Error::InvalidArgument(
            "a batch mixes preference examples with single rows".into(),
        ));
    }
    // Each example's row: its own, or a preference example's prompt once and both answers.
    let pairs = pref.then(|| {
        let prefs: Vec<(&Example, &Pref)> = examples
            .iter()
            .filter_map(|e| Some((*e, e.pref.as_deref()?)))
            .collect();
        let rows: Vec<PairRow> = prefs.iter().map(|&(e, p)| pair_row(e, p)).collect();
        (prefs, rows)
    });
    let rows: Vec<(&[u32], &[i64])> = match &pairs {
        Some((_, rows)) => rows
            .iter()
            .map(|r| (r.ids.as_slice(), r.labels.as_slice()))
            .collect(),
        None => examples
            .iter()
            .map(|e| (e.input_ids.as_slice(), e.labels.as_slice()))
            .collect(),
    };
    let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let len = match pad_to_multiple_of {
        Some(m) if m > 1 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let b = rows.len();
    let (mut ids, mut mask, mut labels) = (
        Vec::with_capacity(b * len),
        Vec::with_capacity(b * len),
        Vec::with_capacity(b * len),
    );
    let tokens = examples.iter().map(|e| e.tokens()).sum();
    let mut lens = Vec::with_capacity(b);
    for (row_ids, row_labels) in &rows {
        let n = row_ids.len();
        lens.push(n);
        ids.extend(*row_ids);
        ids.extend(std::iter::repeat_n(pad_id, len - n));
        mask.extend(std::iter::repeat_n(1u32, n));
        mask.extend(std::iter::repeat_n(0u32, len - n));
        labels.extend(*row_labels);
        labels.extend(std::iter::repeat_n(IGNORE, len - n));
    }
    // Packed examples, or each pair's second answer after its first, sharing the prompt.
    let (segments, shared, view) = match &pairs {
        Some((prefs, rows)) => (
            Some(
                rows.iter()
                    .map(|r| r.second_start.into_iter().collect())
                    .collect(),
            ),
            Some(rows.iter().map(|r| r.shared).collect()),
            Some(PairView::new(prefs, rows, len, pad_id, device)?),
        ),
        None => (
            examples
                .iter()
                .any(|e| !e.packed.is_empty())
                .then(|| examples.iter().map(|e| e.packed.clone()).collect()),
            None,
            None,
        ),
    };
    Ok(Batch {
        input_ids: Tensor::from_slice(&ids, (b, len), device)?,
        ids_host: ids,
        attention_mask: Tensor::from_vec(mask, (b, len), device)?,
        labels: Tensor::from_slice(&labels, (b, len), device)?,
        tokens,
        lens,
        labels_host: labels,
        segments,
        shared,
        view,
        pref: examples
            .iter()
            .filter_map(|e| e.pref.as_ref())
            .map(|p| PrefRows {
                desirable: p.desirable,
                ref_logps: p.ref_logps,
            })
            .collect(),
    })
}

/// TRL's `packing`: `examples` concatenated into rows of at most `max_len` tokens, best-fit
/// decreasing (the longest example first, each into the fullest row it fits; an example longer
/// than `max_len` gets a row of its own). Each row records where its examples start, so attention
/// stays inside an example and positions restart; the first label of each later example becomes
/// -100, so no token learns to predict across a boundary and the loss is the unpacked one.
/// Deterministic: the same examples give the same rows.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Example> {
    use std::collections::BTreeSet;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row index): the fullest row that fits is the first with room >= len.
    let mut room: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = examples[i].input_ids.len();
        if let Some((left, r)) = room.range((len, 0)..).next().copied() {
            room.remove(&(left, r));
            rows[r].push(i);
            if left > len {
                room.insert((left - len, r));
            }
        } else {
            rows.push(vec![i]);
            if max_len > len {
                room.insert((max_len - len, rows.len() - 1));
            }
        }
    }
    rows.into_iter()
        .map(|row| {
            let mut out = Example {
                input_ids: Vec::new(),
                labels: Vec::new(),
                packed: Vec::new(),
                pref: None,
            };
            for (k, &i) in row.iter().enumerate() {
                let e = &examples[i];
                if k > 0 {
                    out.packed.push(out.input_ids.len());
                }
                let start = out.labels.len();
                out.input_ids.extend(&e.input_ids);
                out.labels.extend(&e.labels);
                if k > 0 && start < out.labels.len() {
                    out.labels[start] = IGNORE;
                }
            }
            out
        })
        .collect()
}

/// The order of examples for `epoch`: a permutation of `0..lengths.len()` from `seed` and `epoch`;
/// with `group_by_length`, examples of similar length end up in the same batch.
pub fn epoch_order(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    if !group_by_length {
        return idx;
    }
    let mega = (batch_size.max(1) * 50).max(1);
    let mut megabatches: Vec<Vec<usize>> = idx.chunks(mega).map(<[usize]>::to_vec).collect();
    for m in &mut megabatches {
        m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    // The longest example goes first, so an out-of-memory error shows at step 1.
    if let Some((k, _)) = megabatches
        .iter()
        .enumerate()
        .max_by_key(|(_, m)| m.first().map_or(0, |&i| lengths[i]))
    {
        let longest = megabatches[k][0];
        megabatches[k][0] = megabatches[0][0];
        megabatches[0][0] = longest;
    }
    megabatches.concat()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_a_multiple_with_ignored_labels() {
        let a = Example {
            input_ids: vec![1, 2, 3],
            labels: vec![IGNORE, 2, 3],
            packed: Vec::new(),
            pref: None,
        };
        let b = Example {
            input_ids: vec![4],
            labels: vec![4],
            packed: Vec::new(),
            pref: None,
        };
        let batch = collate(&[&a, &b], 0, Some(8), &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.dims(), [2, 8]);
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap()[1],
            [4, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap()[0],
            [1, 1, 1, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap()[0],
            [IGNORE, 2, 3, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
        );
        assert_eq!(batch.tokens, 4);
        assert_eq!(
            collate(&[&a, &b], 0, None, &Device::Cpu)
                .unwrap()
                .input_ids
                .dims(),
            [2, 3]
        );
    }

    #[test]
    fn epoch_orders_are_seeded_permutations_and_grouping_groups() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 1).collect();
        let a = epoch_order(&lengths, 4, false, 42, 0);
        assert_eq!(a, epoch_order(&lengths, 4, false, 42, 0));
        assert_ne!(a, epoch_order(&lengths, 4, false, 42, 1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        let g = epoch_order(&lengths, 4, true, 42, 0);
        assert_eq!(lengths[g[0]], 500, "longest first");
        // Within a batch of a grouped order, lengths are close; in a shuffled order they are not.
        let spread = |o: &[usize]| -> usize {
            o.chunks(4)
                .map(|c| {
                    c.iter().map(|&i| lengths[i]).max().unwrap()
                        - c.iter().map(|&i| lengths[i]).min().unwrap()
                })
                .sum()
        };
        assert!(
            spread(&g) * 5 < spread(&a),
            "{} vs {}",
            spread(&g),
            spread(&a)
        );
        assert_ne!(
            g,
            epoch_order(&lengths, 4, true, 42, 1),
            "still shuffled per epoch"
        );
    }
}
