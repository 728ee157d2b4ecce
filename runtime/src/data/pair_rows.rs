//! Preference examples in a batch: one row each, `[shared prompt | first answer | rest of the
//! second answer]`, so the prompt both answers start with runs through the model once. The
//! second answer's tokens see the prompt and themselves, not the first answer, and their
//! positions continue from the prompt's ([`crate::nn::AttnMask::shared`]): every hidden state is
//! the one the answer would get in a row of its own. Objectives read the example as the two rows
//! TRL builds ([`PairView`]): their hidden states are picked from the shared row, and their
//! gradients summed back into it.

use candle_core::{Device, Tensor};

use super::example::{Example, IGNORE, Pref};
use crate::Result;
use crate::nn::ops::move_rows;

/// One example's row.
pub struct PairRow {
    /// The first row's ids, then the second's after the shared tokens.
    pub ids: Vec<u32>,
    /// Their labels.
    pub labels: Vec<i64>,
    /// Where the second answer starts (`None` when it has no tokens of its own).
    pub second_start: Option<usize>,
    /// The tokens both rows start with.
    pub shared: usize,
    /// The two rows' lengths.
    pub lens: [usize; 2],
}

/// The row of preference example `e`, whose second row `p` holds (see the module doc).
pub fn pair_row(e: &Example, p: &Pref) -> PairRow {
    let cp = e.shared_len();
    let first = e.input_ids.len();
    let mut ids = e.input_ids.clone();
    ids.extend(&p.second_ids[cp..]);
    let mut labels = e.labels.clone();
    labels.extend(&p.second_labels[cp..]);
    PairRow {
        second_start: (p.second_ids.len() > cp).then_some(first),
        shared: cp,
        lens: [first, p.second_ids.len()],
        ids,
        labels,
    }
}

/// A batch of preference rows as the objective reads it: two rows an example, `[2 b, seq]`
/// row-major, each position naming the token of the batch (`[b * s]`) whose hidden state it is.
#[derive(Clone, Debug)]
pub struct PairView {
    /// Rows of the view (two an example).
    pub rows: usize,
    /// Tokens a row of the view (the longest row).
    pub seq: usize,
    /// Labels, -100 on padding.
    pub labels: Vec<i64>,
    /// Token ids (`pad_id` on padding).
    pub ids: Vec<u32>,
    /// Real tokens of each row.
    pub lens: Vec<usize>,
    /// The batch token of each position (padding: any token of its example), u32.
    index: Tensor,
    /// The first rows' real positions and their batch tokens (distinct), u32.
    first: (Tensor, Tensor),
    /// The second rows' real positions and their batch tokens (distinct), u32.
    second: (Tensor, Tensor),
}

impl PairView {
    /// The view of the preference examples `prefs` laid out as `rows` (each of `s` tokens) on
    /// `device`.
    pub fn new(
        prefs: &[(&Example, &Pref)],
        rows: &[PairRow],
        s: usize,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let seq = rows
            .iter()
            .map(|r| r.lens[0].max(r.lens[1]))
            .max()
            .unwrap_or(0);
        let n = 2 * rows.len();
        let (mut labels, mut ids) = (vec![IGNORE; n * seq], vec![pad_id; n * seq]);
        let mut index = vec![0u32; n * seq];
        let (mut first, mut second) = ((vec![], vec![]), (vec![], vec![]));
        for (i, (&(e, p), r)) in prefs.iter().zip(rows).enumerate() {
            let base = i * s;
            let sides = [
                (&e.input_ids[..], &e.labels[..]),
                (&p.second_ids[..], &p.second_labels[..]),
            ];
            for (k, (row_ids, row_labels)) in sides.into_iter().enumerate() {
                let at = (2 * i + k) * seq;
                let len = row_ids.len();
                ids[at..at + len].copy_from_slice(row_ids);
                labels[at..at + len].copy_from_slice(row_labels);
                let into = if k == 0 { &mut first } else { &mut second };
                for t in 0..seq {
                    let token = match (k, t < len) {
                        (0, true) => base + t,
                        (_, true) if t < r.shared => base + t,
                        (_, true) => base + r.lens[0] + t - r.shared,
                        (_, false) => base,
                    };
                    index[at + t] = token as u32;
                    if t < len {
                        into.0.push((at + t) as u32);
                        into.1.push(token as u32);
                    }
                }
            }
        }
        let upload = |v: Vec<u32>| {
            let k = v.len();
            Tensor::from_vec(v, k, device)
        };
        Ok(Self {
            rows: n,
            seq,
            labels,
            ids,
            lens: rows.iter().flat_map(|r| r.lens).collect(),
            index: upload(index)?,
            first: (upload(first.0)?, upload(first.1)?),
            second: (upload(second.0)?, upload(second.1)?),
        })
    }

    /// The view's hidden states `[rows * seq, h]` from the batch's `hidden` (`[b * s, h]`).
    pub fn pick(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        hidden.index_select(&self.index, 0)
    }

    /// [`PairView::pick`]'s backward: the gradient `d` of the view's hidden states as the batch's
    /// (`tokens` rows), a shared token's summed over both rows.
    pub fn unpick(&self, d: &Tensor, tokens: usize) -> candle_core::Result<Tensor> {
        let h = d.dim(1)?;
        let out = Tensor::zeros((tokens, h), d.dtype(), d.device())?;
        let out = move_rows(out, &self.first.1, d, Some(&self.first.0), false)?;
        move_rows(out, &self.second.1, d, Some(&self.second.0), true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::batch::collate;

    fn pair(first: &[u32], second: &[u32], prompt: usize) -> Example {
        let labels = |ids: &[u32]| -> Vec<i64> {
            ids.iter()
                .enumerate()
                .map(|(k, &t)| if k < prompt { IGNORE } else { i64::from(t) })
                .collect()
        };
        Example {
            input_ids: first.to_vec(),
            labels: labels(first),
            pref: Some(Box::new(Pref {
                prompt_len: prompt,
                second_ids: second.to_vec(),
                second_labels: labels(second),
                ..Pref::default()
            })),
            ..Example::default()
        }
    }

    /// A pair is one row, its shared tokens once; the view gives back TRL's two rows (ids,
    /// labels, lengths), and the gradient of a token both rows share is the sum of both.
    #[test]
    fn a_pair_is_one_row_read_back_as_two() {
        // Prompt [5, 6, 7]; the answers share their first token too (8).
        let a = pair(&[5, 6, 7, 8, 9], &[5, 6, 7, 8, 10, 11], 3);
        // The second answer has nothing after the shared tokens.
        let b = pair(&[5, 6, 12, 13], &[5, 6, 12], 2);
        let batch = collate(&[&a, &b], 0, Some(4), &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.dims2().unwrap(), (2, 8));
        assert_eq!(batch.lens, [7, 4]);
        assert_eq!(batch.segments, Some(vec![vec![5], vec![]]));
        assert_eq!(batch.shared, Some(vec![4, 3]));
        assert_eq!(batch.tokens, 5 + 6 + 4 + 3);
        assert_eq!(a.row_len(), 7);
        assert_eq!(
            &batch.ids_host[..8],
            &[5, 6, 7, 8, 9, 10, 11, 0],
            "first answer, then the second's own tokens"
        );
        let v = batch.view.as_ref().unwrap();
        assert_eq!((v.rows, v.seq), (4, 6));
        assert_eq!(v.lens, [5, 6, 4, 3]);
        assert_eq!(&v.ids[6..12], &[5, 6, 7, 8, 10, 11]);
        assert_eq!(&v.labels[6..12], &[IGNORE, IGNORE, IGNORE, 8, 10, 11]);
        // Each view position's hidden state is its batch token's (row 1 of the batch starts at 8).
        let hidden = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((16, 1))
            .unwrap();
        let seen: Vec<f32> = v
            .pick(&hidden)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&seen[6..12], &[0.0, 1.0, 2.0, 3.0, 5.0, 6.0]);
        assert_eq!(&seen[18..21], &[8.0, 9.0, 10.0]);
        let ones = Tensor::ones((24, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let back: Vec<f32> = v
            .unpick(&ones, 16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            back,
            [
                2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0
            ]
        );
    }
}
