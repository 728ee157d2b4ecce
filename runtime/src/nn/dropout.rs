//! Dropout from a counter-based RNG: element `i` of the mask keyed `key` is kept when
//! `uniform(key, i) >= p`, a pure function of `(key, i)`. So the mask is made where the tensor
//! lives (a kernel on CUDA, a loop on the CPU, the same numbers on both), recomputation
//! (gradient checkpointing) and resume replay it exactly, and backward re-derives it instead of
//! storing it. Keys come from `(seed, step, layer, call)` through [`mix`], and each example row
//! of a batch draws from its own key (its index in the accumulation window), so the masks do not
//! depend on how a window's examples are split into micro-batches.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Mixes two numbers into a key (splitmix64 of their combination).
pub fn mix(a: u64, b: u64) -> u64 {
    splitmix(
        a ^ b
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9),
    )
}

/// One splitmix64 finalisation round (the CUDA kernel computes the same).
pub fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 32-bit integer hash with full avalanche (Wellons' `lowbias32`; the CUDA kernel computes
/// the same): two multiplies, cheap enough that drawing a mask costs what reading the tensor does.
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// A uniform number in `[0, 1)` for element `i` (below 2^32) of the mask keyed `key` (24 random
/// bits): the key folded to 32 bits, the element's Weyl step, one [`hash32`].
pub fn uniform(key: u64, i: u64) -> f32 {
    let k = (key ^ (key >> 32)) as u32;
    let z = hash32(k ^ (i as u32).wrapping_mul(0x9E37_79B9));
    (z >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The key of one dropout call over a batch: element `j` of the batch's row `r` (each row
/// `row_elems` elements) is kept when `uniform(mix(key, first_row + r), j) >= p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The call's key (seed, step, layer, projection).
    pub key: u64,
    /// The window index of the batch's first example.
    pub first_row: u64,
}

impl Key {
    /// The key `key` for a batch that starts the window.
    pub fn new(key: u64) -> Self {
        Self { key, first_row: 0 }
    }

    /// The same call for another layer or projection.
    pub fn with(self, salt: u64) -> Self {
        Self {
            key: mix(self.key, salt),
            ..self
        }
    }
}

/// The mask keyed `key` for a tensor of `shape` made of rows of `row_elems` elements: `0` with
/// probability `p`, else `1 / (1 - p)`, in `dtype` on `device`.
pub fn mask(
    key: Key,
    p: f64,
    shape: &[usize],
    row_elems: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let row_elems = row_elems.max(1) as u64;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return super::cuda::dropout::mask(
            dev,
            key.key,
            key.first_row,
            row_elems,
            p as f32,
            shape,
            dtype,
        );
    }
    let keep = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    let mut data = vec![0f32; n];
    // One row key per row, not per element (the kernel has no rows to go by and mixes per element).
    data.par_chunks_mut(row_elems as usize)
        .enumerate()
        .for_each(|(r, row)| {
            let k = mix(key.key, key.first_row + r as u64);
            for (j, v) in row.iter_mut().enumerate() {
                *v = if uniform(k, j as u64) < p { 0.0 } else { keep };
            }
        });
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// `x * mask(key)` for `x` made of rows of `row_elems` elements; the backward of dropout is the
/// same call on the incoming gradient.
pub fn apply(x: &Tensor, p: f64, key: Key, row_elems: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda_ok(x) {
        return super::cuda::dropout::axpy(x, p, key.key, key.first_row, row_elems, 1.0, None);
    }
    x.mul(&mask(key, p, x.dims(), row_elems, x.dtype(), x.device())?)
}

/// `dst + alpha * apply(x, ..)` for a `dst` nothing else holds (on the GPU it is added into in
/// place, the mask drawn inside the kernel).
pub fn add_into(
    dst: Tensor,
    x: &Tensor,
    p: f64,
    key: Key,
    row_elems: usize,
    alpha: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda_ok(x) && dst.is_contiguous() && dst.dtype() == x.dtype() {
        return super::cuda::dropout::axpy(
            x,
            p,
            key.key,
            key.first_row,
            row_elems,
            alpha as f32,
            Some(dst),
        );
    }
    let d = apply(x, p, key, row_elems)?;
    dst.add(&if alpha == 1.0 { d } else { (d * alpha)? })
}

#[cfg(feature = "cuda")]
fn cuda_ok(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_a_function_of_the_key_and_drop_about_p() {
        let a = (0..10_000).filter(|&i| uniform(7, i) < 0.1).count();
        assert!((800..1200).contains(&a), "{a}");
        let b: Vec<bool> = (0..64).map(|i| uniform(7, i) < 0.5).collect();
        let c: Vec<bool> = (0..64).map(|i| uniform(7, i) < 0.5).collect();
        let d: Vec<bool> = (0..64).map(|i| uniform(8, i) < 0.5).collect();
        assert_eq!(b, c);
        assert_ne!(b, d);
    }

    #[test]
    fn neighbouring_rows_and_elements_draw_independent_masks() {
        // At p = 0.5 two independent masks agree on half their elements: rows keyed by
        // neighbouring window indices, and neighbouring elements of one row.
        let (rows, cols) = (400u64, 1000u64);
        let drop = |r: u64, j: u64| uniform(mix(11, r), j) < 0.5;
        let (mut rows_agree, mut cols_agree, mut dropped) = (0u64, 0u64, 0u64);
        for r in 0..rows {
            for j in 0..cols {
                dropped += u64::from(drop(r, j));
                rows_agree += u64::from(drop(r, j) == drop(r + 1, j));
                cols_agree += u64::from(drop(r, j) == drop(r, j + 1));
            }
        }
        let n = (rows * cols) as f64;
        for (what, k) in [
            ("dropped", dropped),
            ("rows agree", rows_agree),
            ("cols agree", cols_agree),
        ] {
            let f = k as f64 / n;
            assert!((f - 0.5).abs() < 0.005, "{what}: {f}");
        }
    }

    #[test]
    fn a_row_draws_the_same_mask_in_any_batch() {
        // Rows 1 and 2 of a batch of 3 (rows of 6 elements) are rows 0 and 1 of a batch starting
        // at window row 1: the same masks however the window is split.
        let key = |first_row| Key { key: 9, first_row };
        let all = mask(key(0), 0.5, &[3, 2, 3], 6, DType::F32, &Device::Cpu).unwrap();
        let tail = mask(key(1), 0.5, &[2, 2, 3], 6, DType::F32, &Device::Cpu).unwrap();
        let all = all.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tail = tail.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(all[6..], tail[..]);
        assert_ne!(all[..6], all[6..12]);
    }
}
