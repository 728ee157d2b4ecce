//! Packed rows as the padded batch of their examples. The examples of `[b, s]` packed rows
//! (segment starts, then right padding) are laid out one per row of an `[n, m]` batch, so attention
//! over packed rows runs on the padded path (cuDNN's fused attention with per-row key lengths: no
//! `s x s` buffer) and its results go back in place. Every token belongs to one example; the last
//! example of a row takes the row's padding too, its padding queries seeing its keys, as the packed
//! mask says. A row's shared keys (a prompt with its answers after it, [`AttnMask::shared`]) are
//! copied in front of each later example; their outputs come back from the first example's copy,
//! and their gradients are the sum over the copies.

use candle_core::{Device, Result, Tensor};

use super::AttnMask;
use super::ops::{move_rows, put_rows, take_rows};

/// How packed rows map onto the padded batch of their examples.
#[derive(Clone, Debug)]
pub struct Unpacked {
    /// Destination token (in the `[n * m]` axis) of every source token (`[b * s]`), u32.
    ids: Tensor,
    /// Shared keys copied in front of later examples: destination and source token of each
    /// copy (u32), in sets whose sources are distinct (the second example of each row, the
    /// third, ...); empty when no row shares keys.
    copies: Vec<(Tensor, Tensor)>,
    /// Examples, with filler ones up to a multiple of 8 (so batches share a few plans).
    pub n: usize,
    /// Tokens a row: the longest example, rounded up to a multiple of 64.
    pub m: usize,
    /// Real keys of each example (1 for the filler ones, whose queries and keys are zeros).
    pub lens: Vec<usize>,
}

impl Unpacked {
    /// The layout of `mask`'s packed rows over `[b, s]`, or `None` when the rows are not packed,
    /// or the mask is one the padded path does not express (left padding, an empty row, an
    /// example starting in the padding or inside the shared keys), or its examples padded to the
    /// longest would hold over 4x the tokens.
    pub fn of(mask: &AttnMask, b: usize, s: usize, device: &Device) -> Result<Option<Self>> {
        let Some(rows) = &mask.segments else {
            return Ok(None);
        };
        if rows.len() != b || !mask.causal || mask.offset != 0 {
            return Ok(None);
        }
        // (row start, start, tokens, real keys, shared keys in front, which of its row) of each
        // example.
        let mut examples = Vec::new();
        for (r, starts) in rows.iter().enumerate() {
            let (lo, len) = mask.key_ranges.as_ref().map_or((0, s), |k| k[r]);
            let shared = if starts.is_empty() {
                0
            } else {
                mask.shared_of(r)
            };
            if lo != 0
                || len == 0
                || len > s
                || starts.iter().any(|&st| st == 0 || st >= len || st < shared)
            {
                return Ok(None);
            }
            let mut bounds: Vec<usize> = std::iter::once(0).chain(starts.iter().copied()).collect();
            if bounds.windows(2).any(|w| w[1] <= w[0]) {
                return Ok(None);
            }
            bounds.push(s);
            let last = bounds.len() - 2;
            for (i, w) in bounds.windows(2).enumerate() {
                let keys = if i == last { len - w[0] } else { w[1] - w[0] };
                let front = if i == 0 { 0 } else { shared };
                examples.push((r * s, w[0], w[1] - w[0], keys, front, i));
            }
        }
        let longest = examples.iter().map(|e| e.4 + e.2).max().unwrap_or(1);
        // Rounded so that batches share a few cuDNN plans, unless that costs more than it saves.
        let (mut n, mut m) = (examples.len().div_ceil(8) * 8, longest.div_ceil(64) * 64);
        if n * m > 2 * b * s {
            (n, m) = (examples.len(), longest);
        }
        if n * m > 4 * b * s {
            return Ok(None);
        }
        let mut ids = vec![0u32; b * s];
        let mut sets: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        let mut lens = Vec::with_capacity(n);
        for (e, &(row, start, tokens, keys, front, i)) in examples.iter().enumerate() {
            if front > 0 {
                if sets.len() < i {
                    sets.resize(i, (Vec::new(), Vec::new()));
                }
                let (to, from) = &mut sets[i - 1];
                to.extend((0..front).map(|t| (e * m + t) as u32));
                from.extend((0..front).map(|t| (row + t) as u32));
            }
            for t in 0..tokens {
                ids[row + start + t] = (e * m + front + t) as u32;
            }
            lens.push(front + keys);
        }
        lens.resize(n, 1);
        let copies = sets
            .into_iter()
            .filter(|(to, _)| !to.is_empty())
            .map(|(to, from)| {
                let k = to.len();
                Ok((
                    Tensor::from_vec(to, k, device)?,
                    Tensor::from_vec(from, k, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            ids: Tensor::from_vec(ids, b * s, device)?,
            copies,
            n,
            m,
            lens,
        }))
    }

    /// The padded batch's mask: causal, each example's real keys from position 0.
    pub fn mask(&self) -> AttnMask {
        AttnMask::right_padded(&self.lens)
    }

    /// `t` `[b, h, s, d]` (any layout) as `[n, h, m, d]` (a transposed view of a contiguous
    /// `[n, m, h, d]`), zeros outside the examples, the shared keys copied in front of each later
    /// example.
    pub fn gather(&self, t: &Tensor) -> Result<Tensor> {
        self.gather_with(t, true)
    }

    /// [`Unpacked::scatter`]'s transpose (the backward of taking the outputs back): as
    /// [`Unpacked::gather`], without the copies (their outputs were not taken).
    pub fn gather_grad(&self, t: &Tensor) -> Result<Tensor> {
        self.gather_with(t, false)
    }

    fn gather_with(&self, t: &Tensor, copies: bool) -> Result<Tensor> {
        let (b, h, s, d) = t.dims4()?;
        let rows = t.transpose(1, 2)?.contiguous()?.reshape((b * s, h * d))?;
        let zeros = Tensor::zeros((self.n * self.m, h * d), t.dtype(), t.device())?;
        let mut out = put_rows(zeros, &self.ids, &rows)?;
        for (to, from) in self.copies.iter().filter(|_| copies) {
            out = move_rows(out, to, &rows, Some(from), false)?;
        }
        out.reshape((self.n, self.m, h, d))?.transpose(1, 2)
    }

    /// [`Unpacked::gather`]'s inverse on `t` `[n, h, m, d]`: `[b, h, s, d]` for `s`-token rows (a
    /// transposed view of a contiguous `[b, s, h, d]`); a shared key's output is its first copy's.
    pub fn scatter(&self, t: &Tensor, s: usize) -> Result<Tensor> {
        self.scatter_with(t, s, false)
    }

    /// [`Unpacked::gather`]'s transpose (the backward of the copies): as [`Unpacked::scatter`],
    /// a shared key's gradient summed over its copies.
    pub fn scatter_sum(&self, t: &Tensor, s: usize) -> Result<Tensor> {
        self.scatter_with(t, s, true)
    }

    fn scatter_with(&self, t: &Tensor, s: usize, sum: bool) -> Result<Tensor> {
        let (_, h, _, d) = t.dims4()?;
        let b = self.ids.elem_count() / s.max(1);
        let flat = t
            .transpose(1, 2)?
            .contiguous()?
            .reshape((self.n * self.m, h * d))?;
        let mut out = take_rows(&flat, &self.ids)?;
        for (to, from) in self.copies.iter().filter(|_| sum) {
            out = move_rows(out, from, &flat, Some(to), true)?;
        }
        out.reshape((b, s, h, d))?.transpose(1, 2)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nn::attention::{attention, attention_backward, attention_unpacked};

    /// The padded batch of the examples gives the packed reference's outputs and gradients at
    /// every position (padding included), with GQA and rows of one and of several examples.
    #[test]
    fn the_padded_batch_of_examples_equals_packed_attention() {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (3, 4, 2, 23, 8);
        let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (q, k, v, dy) = (
            r(&[b, h, s, d]),
            r(&[b, kv, s, d]),
            r(&[b, kv, s, d]),
            r(&[b, h, s, d]),
        );
        let mask = AttnMask::right_padded(&[23, 19, 11]).with_segments(Some(vec![
            vec![5, 12],
            vec![],
            vec![3, 4, 10],
        ]));
        let u = Unpacked::of(&mask, b, s, &dev).unwrap().unwrap();
        // 8 examples of at most 23 tokens (row 1 is one example): not rounded up to 64 rows of
        // tokens (that would be over 2x the rows' 69 tokens).
        assert_eq!((u.n, u.m), (8, 23));
        assert_eq!(u.lens, [5, 7, 11, 19, 3, 1, 6, 1]);
        // The padded batch's outputs and dq, dk, dv against the masked reference's.
        let same = |what: &str, mask: &AttnMask, u: &Unpacked| {
            let diff = crate::testing::max_abs_diff;
            let (mut sp, mut su) = (None, None);
            let want = attention(&q, &k, &v, mask, Some(&mut sp)).unwrap();
            let got = attention_unpacked(u, &q, &k, &v, Some(&mut su)).unwrap();
            assert!(
                diff(&got, &want) < 1e-5,
                "{what} forward {}",
                diff(&got, &want)
            );
            let gw = attention_backward(sp.as_ref().unwrap(), &dy).unwrap();
            let gg = attention_backward(su.as_ref().unwrap(), &dy).unwrap();
            for (n, (a, c)) in
                ["dq", "dk", "dv"]
                    .iter()
                    .zip([(&gg.0, &gw.0), (&gg.1, &gw.1), (&gg.2, &gw.2)])
            {
                assert!(diff(a, c) < 1e-5, "{what} {n} {}", diff(a, c));
            }
        };
        same("packed", &mask, &u);
        // Rows sharing a prompt ([prompt | answer | answer], and a row of one example): the
        // prompt copied in front of each later answer, its gradients summed over the copies.
        let mask = AttnMask::right_padded(&[23, 19, 11])
            .with_segments(Some(vec![vec![9, 15], vec![], vec![6]]))
            .with_shared(Some(vec![5, 4, 6]));
        let u = Unpacked::of(&mask, b, s, &dev).unwrap().unwrap();
        assert_eq!(u.lens, [9, 11, 13, 19, 6, 11]);
        assert_eq!(u.copies.len(), 2);
        same("shared", &mask, &u);
        // An answer may not start inside the shared prompt.
        let inside = AttnMask::right_padded(&[23, 19, 11])
            .with_segments(Some(vec![vec![4], vec![], vec![]]))
            .with_shared(Some(vec![5, 0, 0]));
        assert!(Unpacked::of(&inside, b, s, &dev).unwrap().is_none());
        // What the padded path cannot say falls back: an example starting in the padding.
        let odd = AttnMask::right_padded(&[23, 19, 11]).with_segments(Some(vec![
            vec![5],
            vec![19],
            vec![],
        ]));
        assert!(Unpacked::of(&odd, b, s, &dev).unwrap().is_none());
    }
}
