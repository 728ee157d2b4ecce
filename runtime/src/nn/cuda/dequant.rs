//! 4-bit weights dequantized on CUDA (`dequant.cu`): bitsandbytes' codes and absmax straight to
//! the compute dtype in one pass, reading half a byte and writing one value per weight (16 values
//! a thread with vector loads and stores where the shape allows, else a byte a thread). Reference
//! op: the candle path of `quant::Quant4::dequantize` (the same f32 products, rounded
//! once), which a test on the GPU machine compares value for value.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, launch_1d, ptx};

const PTX: Module = ptx!("dequant");

/// A 4-bit weight's parts as the kernel reads them (`quant::Quant4` lays them out).
#[derive(Debug)]
pub struct Dequant4<'a> {
    /// u8, two codes a byte, the first in the high nibble.
    pub packed: &'a Tensor,
    /// f32 `[16]`: the code book.
    pub code: &'a Tensor,
    /// f32, each block's absmax; or, double-quantized, `(u8 codes, f32 scales per 256 blocks,
    /// f32 [256] code book, offset)`.
    pub absmax: Absmax4<'a>,
    /// `[out, in]`.
    pub shape: (usize, usize),
    /// Values per absmax block.
    pub blocksize: usize,
}

/// Each block's absmax, plain or double-quantized.
#[derive(Debug)]
pub enum Absmax4<'a> {
    /// f32, one per block.
    Plain(&'a Tensor),
    /// u8 codes, f32 scales per 256 blocks, the f32 `[256]` code book, the offset.
    Nested(&'a Tensor, &'a Tensor, &'a Tensor, f32),
}

/// The weight `q` describes as an `[out, in]` matrix of `dtype` (f32, bf16 or f16).
pub fn dequant4(q: &Dequant4<'_>, dtype: DType) -> Result<Tensor> {
    let (pp, dev) = addr(q.packed, "codes")?;
    let pc = addr(q.code, "code book")?.0;
    let (pa, pq, ps, p256, offset) = match q.absmax {
        Absmax4::Plain(a) => (addr(a, "absmax")?.0, 0, 0, 0, 0.0f32),
        Absmax4::Nested(codes, scales, code, offset) => (
            0,
            addr(codes, "absmax codes")?.0,
            addr(scales, "absmax scales")?.0,
            addr(code, "absmax code book")?.0,
            offset,
        ),
    };
    let (rows, cols) = q.shape;
    let n = (rows * cols) as u64;
    let out = empty(&dev, &[rows, cols], dtype)?;
    let po = addr(&out, "out")?.0;
    // 16 values a thread where the shape allows it (every real weight does), else a byte a
    // thread; the two kernels differ only in their last two arguments.
    let groups = n / 16;
    let vector = n.is_multiple_of(16)
        && q.blocksize.is_multiple_of(16)
        && q.blocksize > 0
        && pp.is_multiple_of(8)
        && po.is_multiple_of(16)
        // The kernel's u32 grid-stride counter never wraps.
        && groups <= u64::from(u32::MAX / 2);
    let (kernel, threads, [count, block]) = if vector {
        (
            "dequant4v",
            groups,
            [
                Arg::from(groups as u32),
                Arg::from((q.blocksize / 16) as u32),
            ],
        )
    } else {
        (
            "dequant4",
            n.div_ceil(2),
            [Arg::from(n), Arg::from(q.blocksize as u32)],
        )
    };
    launch(
        &dev,
        &PTX,
        kernel,
        dtype,
        launch_1d(threads as usize),
        &[
            Arg::from(pp),
            Arg::from(pc),
            Arg::from(pa),
            Arg::from(pq),
            Arg::from(ps),
            Arg::from(p256),
            Arg::from(offset),
            Arg::from(po),
            count,
            block,
        ],
    )?;
    Ok(out)
}
