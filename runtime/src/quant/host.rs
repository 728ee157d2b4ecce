//! Blockwise quantization on the host, as bitsandbytes does it (0.50): 4-bit codes as its
//! reference kernel (`backends/default/ops.py`: each block's values scaled by its absmax, times
//! the reciprocal for a whole block and divided for the last, partial one, clamped to [-1, 1],
//! and given the code whose bucket between the midpoints of the sorted code book holds them; a
//! value on a midpoint takes the lower code); the 8-bit codes of double quantization as its CUDA
//! kernel (its CPU kernel's approximate reciprocal moves a value near a midpoint to the other
//! code now and then). Blocks run in parallel.

use rayon::prelude::*;

/// The smallest absmax divided by (an all-zero block).
const TINY: f32 = 1e-38;

/// The sorted midpoints of `code` and, per bucket, the code index it stands for.
fn buckets(code: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let mut order: Vec<u8> = (0..code.len()).map(|i| i as u8).collect();
    order.sort_by(|a, b| code[*a as usize].total_cmp(&code[*b as usize]));
    // Summed in f32, then halved, as torch computes `(code[:-1] + code[1:]) / 2` (f32::midpoint
    // sums in f64, which rounds some midpoints the other way).
    #[allow(clippy::manual_midpoint)]
    let mids = order
        .windows(2)
        .map(|w| (code[w[0] as usize] + code[w[1] as usize]) / 2.0)
        .collect();
    (mids, order)
}

/// Each block of `blocksize` values of `x` (the last one may be shorter) quantized by `block`,
/// which writes the block's codes and returns its absmax; blocks in parallel.
fn over_blocks(
    x: &[f32],
    blocksize: usize,
    block: impl Fn(&[f32], &mut [u8]) -> f32 + Sync,
) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    x.par_chunks(blocksize)
        .zip(codes.par_chunks_mut(blocksize).zip(absmax.par_iter_mut()))
        .for_each(|(chunk, (q, am))| *am = block(chunk, q));
    (codes, absmax)
}

/// `x` quantized over blocks of `blocksize` with `code`: one code index per value and each
/// block's absmax.
pub fn quantize_blocks(x: &[f32], blocksize: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mids, order) = buckets(code);
    over_blocks(x, blocksize, |chunk, q| {
        let whole = chunk.len() == blocksize;
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let a = absmax.max(TINY);
        let inv = 1.0 / a;
        for (v, c) in chunk.iter().zip(q.iter_mut()) {
            let s = if whole { v * inv } else { v / a }.clamp(-1.0, 1.0);
            *c = order[mids.partition_point(|m| *m < s)];
        }
        absmax
    })
}

/// `x` quantized over blocks of `blocksize` to the 256 values of the sorted 8-bit map `code`,
/// as bitsandbytes' CUDA kernel does (`kQuantizeBlockwise` with `dQuantize`): each value times
/// the reciprocal of its block's absmax, a binary search over the code's midpoints. One code per
/// value and each block's absmax.
pub fn quantize_blocks_8bit(x: &[f32], blocksize: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    over_blocks(x, blocksize, |chunk, q| {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / absmax;
        for (v, c) in chunk.iter().zip(q.iter_mut()) {
            *c = dquantize(code, v * inv);
        }
        absmax
    })
}

/// bitsandbytes' `dQuantize<0>`: the code of `x` in the sorted 256-value map `code`.
fn dquantize(code: &[f32], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let q = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    q as u8
}

/// 4-bit codes packed two to a byte, the first in the high nibble; an odd count ends with the
/// code of 0.0 (bitsandbytes pads the scaled values with a zero).
pub fn pack(codes: &[u8], code_of_zero: u8) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(code_of_zero))
        .collect()
}

/// The code index a scaled 0.0 gets.
pub fn code_of_zero(code: &[f32]) -> u8 {
    let (mids, order) = buckets(code);
    order[mids.partition_point(|m| *m < 0.0)]
}

/// The mean bitsandbytes subtracts before double quantization, in f32 (summed in f64, so the
/// order of the sum does not move it).
pub fn mean(x: &[f32]) -> f32 {
    (x.iter().map(|v| f64::from(*v)).sum::<f64>() / x.len().max(1) as f64) as f32
}
