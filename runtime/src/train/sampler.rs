//! What the loop iterates over: the examples as the options train them (packed into rows, or
//! cut at `max_length`), and each epoch's accumulation windows of micro-batches (seeded order,
//! optionally grouped by length; one micro-batch for all ranks, each taking its share).

use std::sync::Arc;

use super::TrainConfig;
use super::checkpoint::TrainerState;
use crate::data::batch::{epoch_order, pack};
use crate::data::sft::Example;

/// The examples as `cfg` trains them: packed into rows (`packing`), or cut at `max_length`.
pub fn prepare(examples: Arc<Vec<Example>>, cfg: &TrainConfig) -> Arc<Vec<Example>> {
    if cfg.packing {
        let max = cfg.max_length.unwrap_or(1024);
        let rows = pack(&examples, max);
        let tokens: usize = rows.iter().map(|r| r.input_ids.len()).sum();
        crate::notice::say(format!(
            "packing: {} examples into {} rows of up to {max} tokens ({:.1}% filled)",
            examples.len(),
            rows.len(),
            100.0 * tokens as f64 / (rows.len().max(1) * max) as f64
        ));
        return Arc::new(rows);
    }
    match cfg.max_length {
        Some(max) if examples.iter().any(|e| e.longest() > max) => Arc::new(
            examples
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.truncate(max);
                    e
                })
                .collect(),
        ),
        _ => examples,
    }
}

/// The remaining accumulation windows of `state`'s epoch over examples of `lengths` (each a
/// list of micro-batches of example indices, a micro-batch for all `ranks`); when the epoch is
/// used up, moves to the next one.
pub fn next_windows(
    lengths: &[usize],
    cfg: &TrainConfig,
    ranks: usize,
    micro_per_epoch: usize,
    state: &mut TrainerState,
) -> Vec<Vec<Vec<usize>>> {
    // One micro-batch for all ranks: each takes its share (see `Compute::shard`).
    let batch = cfg.per_device_train_batch_size * ranks;
    for _ in 0..2 {
        let order = if cfg.disable_shuffling {
            (0..lengths.len()).collect()
        } else {
            epoch_order(
                lengths,
                batch,
                cfg.group_by_length,
                cfg.seed,
                state.epoch as u64,
            )
        };
        let micro: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
        let k = cfg.gradient_accumulation_steps;
        let full_windows_only = micro_per_epoch >= k;
        let out: Vec<Vec<Vec<usize>>> = micro
            .chunks(k)
            .scan(0usize, |consumed, w| {
                let start = *consumed;
                *consumed += w.len();
                Some((start, w))
            })
            .filter(|(start, w)| {
                *start >= state.micro_in_epoch && (!full_windows_only || w.len() == k)
            })
            .map(|(_, w)| w.to_vec())
            .collect();
        if !out.is_empty() {
            return out;
        }
        state.epoch += 1;
        state.micro_in_epoch = 0;
    }
    Vec::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `disable_shuffling` trains in the dataset's order, each epoch; with `group_by_length` it
    /// is refused by name.
    #[test]
    fn disabled_shuffling_keeps_the_dataset_order() {
        let cfg = TrainConfig {
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 2,
            disable_shuffling: true,
            ..TrainConfig::default()
        };
        let lengths = [5, 9, 3, 7, 4, 8, 6, 2];
        let mut state = TrainerState::default();
        let first = next_windows(&lengths, &cfg, 1, 4, &mut state);
        assert_eq!(
            first,
            vec![vec![vec![0, 1], vec![2, 3]], vec![vec![4, 5], vec![6, 7]]]
        );
        state.micro_in_epoch = 4;
        assert_eq!(next_windows(&lengths, &cfg, 1, 4, &mut state), first);
        assert_eq!(state.epoch, 1);
        let shuffled = TrainConfig {
            disable_shuffling: false,
            ..cfg.clone()
        };
        let mut state = TrainerState::default();
        assert_ne!(next_windows(&lengths, &shuffled, 1, 4, &mut state), first);
        let both = TrainConfig {
            group_by_length: true,
            ..cfg
        };
        let e = both.validate().unwrap_err().to_string();
        assert!(
            e.contains("`group_by_length`") && e.contains("`disable_shuffling`"),
            "{e}"
        );
    }
}
