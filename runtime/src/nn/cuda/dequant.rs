//! 4-bit weights dequantized on CUDA (`dequant.cu`): bitsandbytes' codes and absmax straight to
//! the compute dtype in one pass, reading half a byte and writing one value per weight. Reference
//! op: the candle path of [`crate::quant::Quant4::dequantize`] (the same f32 products, rounded
//! once), which a test on the GPU machine compares value for value.

use candle_core::{DType, Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, launch_1d, ptx};
use crate::quant::{Absmax, Quant4};

const PTX: Module = ptx!("dequant");

/// `q` as an `[out, in]` matrix of `dtype` (f32, bf16 or f16).
pub fn dequant4(q: &Quant4, dtype: DType) -> Result<Tensor> {
    let (pp, dev) = addr(&q.packed, "codes")?;
    let pc = addr(&q.code, "code book")?.0;
    let (pa, pq, ps, p256, offset) = match &q.absmax {
        Absmax::Plain(a) => (addr(a, "absmax")?.0, 0, 0, 0, 0.0f32),
        Absmax::Nested {
            codes,
            scales,
            code,
            offset,
        } => (
            0,
            addr(codes, "absmax codes")?.0,
            addr(scales, "absmax scales")?.0,
            addr(code, "absmax code book")?.0,
            *offset,
        ),
    };
    let (rows, cols) = q.shape;
    let n = (rows * cols) as u64;
    let out = empty(&dev, &[rows, cols], dtype)?;
    let po = addr(&out, "out")?.0;
    launch(
        &dev,
        &PTX,
        "dequant4",
        dtype,
        launch_1d(n.div_ceil(2) as usize),
        &[
            Arg::from(pp),
            Arg::from(pc),
            Arg::from(pa),
            Arg::from(pq),
            Arg::from(ps),
            Arg::from(p256),
            Arg::from(offset),
            Arg::from(po),
            Arg::from(n),
            Arg::from(q.blocksize as u32),
        ],
    )?;
    Ok(out)
}
