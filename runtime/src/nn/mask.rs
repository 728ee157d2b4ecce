//! Which keys each query of attention may see: causal, plus per row the range of real keys (left
//! or right padding) and, for packed rows, where each example starts. Never a dense tensor at the
//! API; each attention path builds what it needs from it (see [`super::attention`]).

use candle_core::{DType, Device, Result, Tensor};

/// Which keys each query may attend to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttnMask {
    /// Query `i` (at absolute position `offset + i`) sees keys `j <= offset + i`.
    pub causal: bool,
    /// Absolute position of the first query (the KV cache length).
    pub offset: usize,
    /// Per row, the keys `[start, end)` that are real tokens; `None`: every key is real.
    pub key_ranges: Option<Vec<(usize, usize)>>,
    /// Packed rows: per row, where each example after the first starts (a query sees only the
    /// keys of its own example); `None`: one example a row.
    pub segments: Option<Vec<Vec<usize>>>,
    /// Per row of packed rows, the keys at its start that every example of the row sees: a
    /// prompt shared by the answers after it (`[prompt | answer 1 | answer 2]`, where answer 2
    /// sees the prompt and itself, and its positions continue from the prompt's). `None`: 0.
    pub shared: Option<Vec<usize>>,
}

impl AttnMask {
    /// Causal, no padding.
    pub fn causal(offset: usize) -> Self {
        Self {
            causal: true,
            offset,
            key_ranges: None,
            segments: None,
            shared: None,
        }
    }

    /// Causal with right padding: row `r` has `lens[r]` real tokens from position 0.
    pub fn right_padded(lens: &[usize]) -> Self {
        Self {
            causal: true,
            offset: 0,
            key_ranges: Some(lens.iter().map(|&n| (0, n)).collect()),
            segments: None,
            shared: None,
        }
    }

    /// The same mask over packed rows: row `r`'s examples start at 0 and at each of
    /// `starts[r]` (rows with no starts hold one example).
    pub fn with_segments(mut self, starts: Option<Vec<Vec<usize>>>) -> Self {
        self.segments = starts.filter(|s| s.iter().any(|r| !r.is_empty()));
        self
    }

    /// The same packed rows with `shared[r]` keys at the start of row `r` seen by each of its
    /// examples (see [`AttnMask::shared`]); each later example must start at or after them.
    pub fn with_shared(mut self, shared: Option<Vec<usize>>) -> Self {
        self.shared = shared.filter(|s| s.iter().any(|&n| n > 0));
        self
    }

    /// The shared keys of row `r` (0 when none).
    pub fn shared_of(&self, r: usize) -> usize {
        self.shared
            .as_ref()
            .and_then(|s| s.get(r))
            .copied()
            .unwrap_or(0)
    }

    /// Per position of `b` rows of `s`, the first key its query may see (the start of its
    /// example), when rows are packed.
    pub fn segment_starts(&self, b: usize, s: usize) -> Result<Option<Vec<u32>>> {
        let Some(rows) = &self.segments else {
            return Ok(None);
        };
        if rows.len() != b {
            candle_core::bail!("packed segments for {} rows, the batch has {b}", rows.len());
        }
        let mut out = Vec::with_capacity(b * s);
        for starts in rows {
            let mut cur = 0usize;
            let mut next = starts.iter().copied().peekable();
            for i in 0..s {
                while next.peek().is_some_and(|&st| st <= i) {
                    cur = next.next().unwrap_or(cur);
                }
                out.push(cur as u32);
            }
        }
        Ok(Some(out))
    }

    /// RoPE positions of packed rows (restarting at each example, or after the row's shared
    /// keys), `b * s` of them; `None` when rows are not packed (positions `offset..`).
    pub fn positions(&self, b: usize, s: usize) -> Result<Option<Vec<u32>>> {
        Ok(self.segment_starts(b, s)?.map(|starts| {
            starts
                .iter()
                .enumerate()
                .map(|(i, &st)| {
                    let from = if st == 0 {
                        0
                    } else {
                        self.shared_of(i / s) as u32
                    };
                    from + (i % s) as u32 - st
                })
                .collect()
        }))
    }

    /// From an HF `attention_mask` `[b, t]` (1 = token, 0 = padding) whose ones are contiguous in
    /// each row (left or right padding), for queries after `offset` cached positions.
    pub fn from_attention_mask(mask: &Tensor, offset: usize) -> Result<Self> {
        let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut ranges = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let start = row.iter().position(|&v| v != 0).unwrap_or(row.len());
            let end = row.iter().rposition(|&v| v != 0).map_or(start, |p| p + 1);
            if row[start..end].contains(&0) {
                candle_core::bail!(
                    "attention_mask row {r} has padding between tokens; only left or right padding is supported"
                );
            }
            ranges.push((start, end));
        }
        let full = ranges.iter().all(|&(s, e)| s == 0 && e == rows[0].len());
        Ok(Self {
            causal: true,
            offset,
            key_ranges: (!full).then_some(ranges),
            segments: None,
            shared: None,
        })
    }

    /// The additive f32 bias `[b, 1, 1, s, t]` for `s` queries over `t` keys, or `None` when
    /// nothing is masked. Built on `device` from two index vectors.
    pub(super) fn bias(
        &self,
        b: usize,
        s: usize,
        t: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let causal = self.causal && !(s == 1 && t == self.offset + 1);
        if !causal && self.key_ranges.is_none() && self.segments.is_none() {
            return Ok(None);
        }
        let keys = Tensor::arange(0u32, t as u32, device)?.reshape((1, 1, t))?;
        let mut visible: Option<Tensor> = None;
        if causal {
            let q = Tensor::arange(self.offset as u32, (self.offset + s) as u32, device)?
                .reshape((1, s, 1))?;
            visible = Some(keys.broadcast_le(&q)?.broadcast_as((b, s, t))?);
        }
        if let Some(ranges) = &self.key_ranges {
            if ranges.len() != b {
                candle_core::bail!(
                    "attention mask has {} rows, the batch has {b}",
                    ranges.len()
                );
            }
            let starts: Vec<u32> = ranges.iter().map(|r| r.0 as u32).collect();
            let ends: Vec<u32> = ranges.iter().map(|r| r.1 as u32).collect();
            let starts = Tensor::from_vec(starts, (b, 1, 1), device)?;
            let ends = Tensor::from_vec(ends, (b, 1, 1), device)?;
            let inside = keys
                .broadcast_ge(&starts)?
                .mul(&keys.broadcast_lt(&ends)?)?
                .broadcast_as((b, s, t))?;
            visible = Some(match visible {
                Some(v) => v.mul(&inside)?,
                None => inside,
            });
        }
        if let Some(starts) = self.segment_starts(b, s)? {
            // Same example: the key is at or after the query's example start (causal keeps it
            // at or before the query), or among the row's shared keys.
            let starts = Tensor::from_vec(starts, (b, s, 1), device)?;
            let mut same = keys.broadcast_ge(&starts)?;
            if self.shared.is_some() {
                let shared: Vec<u32> = (0..b).map(|r| self.shared_of(r) as u32).collect();
                let shared = Tensor::from_vec(shared, (b, 1, 1), device)?;
                same = same.broadcast_maximum(&keys.broadcast_lt(&shared)?)?;
            }
            visible = Some(match visible {
                Some(v) => v.mul(&same)?,
                None => same,
            });
        }
        let Some(visible) = visible else {
            return Ok(None);
        };
        let zero = Tensor::zeros((b, s, t), DType::F32, device)?;
        let masked = Tensor::full(f32::MIN, (b, s, t), device)?;
        Ok(Some(
            visible
                .where_cond(&zero, &masked)?
                .reshape((b, 1, 1, s, t))?,
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `[prompt | answer 1 | answer 2]`: the second answer sees the prompt and itself, not the
    /// first answer, and its positions continue from the prompt's.
    #[test]
    fn a_shared_prompt_is_seen_by_each_answer() {
        let dev = Device::Cpu;
        // Prompt 0..2, answer 1 at 2..4, answer 2 at 4..6 (one padding key after it).
        let mask = AttnMask::right_padded(&[6])
            .with_segments(Some(vec![vec![4]]))
            .with_shared(Some(vec![2]));
        let bias = mask.bias(1, 7, 7, &dev).unwrap().unwrap();
        let seen: Vec<Vec<u8>> = bias
            .reshape((7, 7))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|&v| u8::from(v == 0.0)).collect())
            .collect();
        let want: [[u8; 7]; 7] = [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 1, 1, 0],
        ];
        assert_eq!(seen, want.map(|r| r.to_vec()).to_vec());
        assert_eq!(
            mask.positions(1, 7).unwrap().unwrap(),
            [0, 1, 2, 3, 2, 3, 4]
        );
        // Without shared keys the second example starts from nothing.
        let packed = AttnMask::right_padded(&[6]).with_segments(Some(vec![vec![4]]));
        assert_eq!(
            packed.positions(1, 7).unwrap().unwrap(),
            [0, 1, 2, 3, 0, 1, 2]
        );
    }
}
