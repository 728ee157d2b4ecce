//! Running an accumulation window as fewer, larger micro-batches. The math does not change: the
//! loss is normalised over the window's learned tokens whatever the split, padding is masked, and
//! dropout masks are keyed per example of the window. What changes is the number of forward and
//! backward passes: seed 000's batch 1 x accumulation 16 is 16 small, launch-bound passes a step;
//! merged it is a few. A pass grows until it holds enough work to keep the GPU busy (launches
//! then hide behind its kernels, and more tokens buy no speed, only memory), and never past the
//! device memory the first step measured.

use std::ops::Range;

use candle_core::Device;

use crate::device;

/// Forward FLOPs (2 x parameters x tokens) a merged pass aims at: about 5 ms of an H100/H200's
/// bf16 matmul throughput, past which the GPU no longer waits on launches (a 7B model: ~260
/// tokens; 0.5B: ~4,000).
const PASS_FLOPS: f64 = 4e12;
/// The most padded tokens one merged pass takes whatever the model (tiny models).
const MAX_TOKENS: usize = 16_384;
/// The share of the device's memory (what other processes hold excluded) a merged pass may plan for.
const BUDGET: f64 = 0.85;

/// When and how far to merge (`merge_micro_batches`).
#[derive(Clone, Debug)]
pub struct MergePolicy {
    mode: Option<bool>,
    /// The most padded tokens a merged pass takes (from the model's size).
    max_tokens: usize,
    /// Bytes in use before a step, bytes per padded token of a pass, and the byte budget: from
    /// the first step on a GPU.
    measured: Option<(u64, f64, u64)>,
    /// In use before the step being measured.
    before: Option<u64>,
}

impl MergePolicy {
    /// `mode`: `None` merges as far as the work of a pass and measured memory call for (on a
    /// GPU), `Some(true)` merges every window whole, `Some(false)` never merges. `params`: the
    /// model's parameter count (frozen ones included: every pass runs through them).
    pub fn new(mode: Option<bool>, params: usize) -> Self {
        let busy = (PASS_FLOPS / (2.0 * params.max(1) as f64)) as usize;
        Self {
            mode,
            max_tokens: busy.clamp(1, MAX_TOKENS),
            measured: None,
            before: None,
        }
    }

    /// Groups of consecutive micro-batches to run as one pass, for micro-batches of `(rows,
    /// padded length)`, lengths padded up to a multiple of `pad_multiple`.
    pub fn groups(&self, micro: &[(usize, usize)], pad_multiple: usize) -> Vec<Range<usize>> {
        match (self.mode, self.measured) {
            (Some(true), _) => std::iter::once(0..micro.len()).collect(),
            (Some(false), _) | (None, None) => (0..micro.len()).map(|i| i..i + 1).collect(),
            (None, Some((base, per_token, budget))) => {
                let fits = |tokens: usize| {
                    tokens <= self.max_tokens
                        && base as f64 + per_token * tokens as f64 <= budget as f64
                };
                let mut out: Vec<Range<usize>> = Vec::new();
                let (mut rows, mut len) = (0usize, 0usize);
                for (i, &(r, l)) in micro.iter().enumerate() {
                    let l2 = len.max(l).div_ceil(pad_multiple.max(1)) * pad_multiple.max(1);
                    match out.last_mut() {
                        Some(g) if fits((rows + r) * l2) => {
                            g.end = i + 1;
                            rows += r;
                            len = l2;
                        }
                        _ => {
                            out.push(i..i + 1);
                            (rows, len) = (r, l);
                        }
                    }
                }
                out
            }
        }
    }

    /// What the policy will do, for the plan.
    pub fn describe(&self, gpu: bool) -> String {
        match self.mode {
            Some(true) => {
                "each accumulation window as one pass (`merge_micro_batches: true`)".into()
            }
            Some(false) => "as written (`merge_micro_batches: false`)".into(),
            None if gpu => format!(
                "merged into passes of up to {} padded tokens where memory allows \
                 (same gradients; `merge_micro_batches: false` to run them as written)",
                self.max_tokens
            ),
            None => "as written (merging is for GPUs)".into(),
        }
    }

    /// Before a step: whether this step measures (the first on a GPU when merging is automatic).
    pub fn before_step(&mut self, device: &Device) {
        if self.mode.is_none() && self.measured.is_none() {
            self.before = device::pool(device).map(|p| p.in_use);
            if self.before.is_some() {
                device::reset_peak(device);
            }
        }
    }

    /// After a step whose largest pass had `tokens` padded tokens.
    pub fn after_step(&mut self, device: &Device, tokens: usize) {
        let Some(base) = self.before.take() else {
            return;
        };
        let (Some(pool), Some((used, total))) = (device::pool(device), device::memory(device))
        else {
            return;
        };
        let per_token = pool.peak.saturating_sub(base) as f64 / tokens.max(1) as f64;
        let others = used.saturating_sub(pool.reserved);
        let budget = (total.saturating_sub(others) as f64 * BUDGET) as u64;
        self.measured = Some((base, per_token, budget));
    }

    /// After a merged pass ran out of memory: run windows as written from now on.
    pub fn disable(&mut self) {
        self.mode = Some(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_mode_and_the_measured_budget() {
        let micro = [(1, 100), (1, 120), (1, 90), (1, 128)];
        let singles: Vec<Range<usize>> = (0..4).map(|i| i..i + 1).collect();
        let small = 1_000_000;
        assert_eq!(
            MergePolicy::new(Some(false), small).groups(&micro, 8),
            singles
        );
        assert_eq!(
            MergePolicy::new(None, small).groups(&micro, 8),
            singles,
            "not measured yet"
        );
        assert_eq!(
            MergePolicy::new(Some(true), small).groups(&micro, 8),
            vec![0..4]
        );
        // 1 KiB a token over a 1 MiB base, 1.25 MiB budget: 256 tokens a pass at most.
        let mut p = MergePolicy::new(None, small);
        p.measured = Some((1 << 20, 1024.0, (1 << 20) + (256 << 10)));
        // 100 + 120 -> 2 x 120 = 240 fits; + 90 -> 3 x 120 = 360 does not.
        assert_eq!(p.groups(&micro, 8), vec![0..2, 2..4]);
        p.disable();
        assert_eq!(p.groups(&micro, 8), singles);
        // A 7.7B model: a pass is busy at 4e12 / (2 x 7.7e9) = 259 tokens, whatever the memory.
        let mut big = MergePolicy::new(None, 7_700_000_000);
        big.measured = Some((0, 1.0, u64::MAX));
        // 2 x 120 = 240 fits; 3 x 120 = 360 does not; 2 x 128 = 256 fits.
        assert_eq!(big.groups(&micro, 8), vec![0..2, 2..4]);
    }
}
