//! 4-bit base weights as bitsandbytes stores them (QLoRA): NF4 or FP4 codes, two to a byte, and
//! the absmax of each block of 64 values; with double quantization the absmax are themselves
//! stored in 8 bits (bitsandbytes' signed dynamic map) over blocks of 256, less their mean.
//!
//! A [`Quant4`] is made from a float weight on load ([`Quant4::quantize`], `host.rs`: the same
//! codes bitsandbytes gives) or read from a checkpoint bitsandbytes saved
//! ([`Quant4::from_bnb`]); [`Quant4::dequantize`] gives the float weight back with the same f32
//! arithmetic bitsandbytes uses, in candle ops that run on any device. The frozen 4-bit linear
//! layer (`nn::linear`) dequantizes for each product.

mod bnb;
pub mod codebook;
mod host;

pub use bnb::{Fetch, read as read_bnb};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The values per absmax block of 4-bit weights (bitsandbytes' and HF's default).
pub const BLOCKSIZE: usize = 64;
/// The absmax per block of the double-quantized absmax.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Values quantized at a time on load: whole blocks, an even count (256 KiB of f32).
const QUANTIZE_CHUNK: usize = 1 << 16;

/// The 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// Normal float: quantiles of a standard normal (QLoRA's).
    Nf4,
    /// A 4-bit float (e2m1).
    Fp4,
}

impl QuantType {
    /// bitsandbytes' name (`nf4`, `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The type `name` (`bnb_4bit_quant_type`) names.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::InvalidArgument(format!(
                "`bnb_4bit_quant_type: \"{other}\"` is not a 4-bit type; use \"nf4\" or \"fp4\""
            ))),
        }
    }

    /// The 16 values of the code book, by code (bitsandbytes' `quant_map`).
    pub fn code(self) -> [f32; 16] {
        let bits = match self {
            QuantType::Nf4 => codebook::NF4_BITS,
            QuantType::Fp4 => codebook::FP4_BITS,
        };
        bits.map(f32::from_bits)
    }
}

/// How a model's linear layers are quantized on load (HF's `BitsAndBytesConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant4Config {
    /// `bnb_4bit_quant_type`.
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
}

impl Default for Quant4Config {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            double_quant: false,
        }
    }
}

/// The absmax of each block.
#[derive(Clone, Debug)]
pub enum Absmax {
    /// f32, one per block.
    Plain(Tensor),
    /// Double-quantized: 8-bit codes of `absmax - offset` into `code` (the dynamic map), scaled
    /// per block of 256 by `scales`.
    Nested {
        /// u8 `[blocks]`.
        codes: Tensor,
        /// f32 `[ceil(blocks / 256)]`.
        scales: Tensor,
        /// f32 `[256]`.
        code: Tensor,
        /// The mean taken off before quantizing.
        offset: f32,
    },
}

/// A `[out, in]` weight in 4 bits, as bitsandbytes stores it.
#[derive(Clone, Debug)]
pub struct Quant4 {
    /// u8, `ceil(out * in / 2)` of them (`[n]` or bitsandbytes' `[n, 1]`): two codes a byte, the
    /// first in the high nibble.
    pub packed: Tensor,
    /// Each block's absmax.
    pub absmax: Absmax,
    /// f32 `[16]`: the code book (`quant_map`).
    pub code: Tensor,
    /// f32 `[256, 2]`: the two values each byte decodes to.
    table: Tensor,
    /// The code book's kind.
    pub quant_type: QuantType,
    /// `[out, in]`.
    pub shape: (usize, usize),
    /// The dtype the weight had (bitsandbytes records it: `dtype`).
    pub dtype: DType,
    /// Values per absmax block.
    pub blocksize: usize,
}

/// `vals` (f32 `[n]`) times each block's `absmax` (f32 `[ceil(n / bs)]`), in f32.
fn scale_blocks(vals: &Tensor, absmax: &Tensor, bs: usize) -> candle_core::Result<Tensor> {
    let n = vals.dim(0)?;
    let blocks = n.div_ceil(bs);
    let pad = blocks * bs - n;
    let v = if pad > 0 {
        Tensor::cat(&[vals, &Tensor::zeros(pad, DType::F32, vals.device())?], 0)?
    } else {
        vals.clone()
    };
    v.reshape((blocks, bs))?
        .broadcast_mul(&absmax.reshape((blocks, 1))?)?
        .flatten_all()?
        .narrow(0, 0, n)
}

/// The two values each byte decodes to, high nibble first.
fn byte_table(code: &[f32; 16], device: &Device) -> candle_core::Result<Tensor> {
    let t: Vec<f32> = (0..256usize)
        .flat_map(|b| [code[b >> 4], code[b & 15]])
        .collect();
    Tensor::from_vec(t, (256, 2), device)
}

impl Quant4 {
    /// `w` (`[out, in]`, any float dtype and device) quantized as bitsandbytes'
    /// `quantize_4bit` does (blocks of 64; the absmax double-quantized when `cfg` asks), kept on
    /// `device`.
    pub fn quantize(w: &Tensor, cfg: &Quant4Config, device: &Device) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let dtype = w.dtype();
        let code = cfg.quant_type.code();
        let zero = host::code_of_zero(&code);
        // In chunks of whole blocks, so the host never holds the weight in f32: its codes and
        // absmax grow as the chunks go.
        let flat = w.flatten_all()?;
        let n = out * inp;
        let mut packed = Vec::with_capacity(n.div_ceil(2));
        let mut absmax = Vec::with_capacity(n.div_ceil(BLOCKSIZE));
        let mut start = 0;
        while start < n {
            let len = QUANTIZE_CHUNK.min(n - start);
            let x = flat
                .narrow(0, start, len)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let (codes, am) = host::quantize_blocks(&x, BLOCKSIZE, &code);
            packed.extend(host::pack(&codes, zero));
            absmax.extend(am);
            start += len;
        }
        let n_packed = packed.len();
        let absmax = if cfg.double_quant {
            let offset = host::mean(&absmax);
            let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let dynamic = codebook::DYNAMIC_BITS.map(f32::from_bits);
            let (codes, scales) = host::quantize_blocks_8bit(&centered, NESTED_BLOCKSIZE, &dynamic);
            let n_scales = scales.len();
            Absmax::Nested {
                codes: Tensor::from_vec(codes, absmax.len(), device)?,
                scales: Tensor::from_vec(scales, n_scales, device)?,
                code: Tensor::from_vec(dynamic.to_vec(), 256, device)?,
                offset,
            }
        } else {
            let n = absmax.len();
            Absmax::Plain(Tensor::from_vec(absmax, n, device)?)
        };
        Ok(Self {
            packed: Tensor::from_vec(packed, n_packed, device)?,
            absmax,
            code: Tensor::from_vec(code.to_vec(), 16, device)?,
            table: byte_table(&code, device)?,
            quant_type: cfg.quant_type,
            shape: (out, inp),
            dtype,
            blocksize: BLOCKSIZE,
        })
    }

    /// A weight from its stored parts (a checkpoint bitsandbytes saved, or a fixture), every
    /// size checked against `shape`; `what` names it in errors.
    pub fn from_parts(
        what: &str,
        packed: Tensor,
        absmax: Absmax,
        quant_type: QuantType,
        shape: (usize, usize),
        dtype: DType,
        blocksize: usize,
    ) -> Result<Self> {
        let bad = |m: String| Error::InvalidArgument(format!("`{what}`: {m}"));
        let n = shape.0 * shape.1;
        if !(2..=4096).contains(&blocksize) {
            return Err(bad(format!("blocksize {blocksize} is outside 2..=4096")));
        }
        let len = |t: &Tensor| t.elem_count();
        if packed.dtype() != DType::U8 || len(&packed) != n.div_ceil(2) {
            return Err(bad(format!(
                "the 4-bit codes are {} {:?} values; a {}x{} weight needs {} u8",
                len(&packed),
                packed.dtype(),
                shape.0,
                shape.1,
                n.div_ceil(2)
            )));
        }
        let blocks = n.div_ceil(blocksize);
        match &absmax {
            Absmax::Plain(a) if a.dtype() != DType::F32 || len(a) != blocks => {
                return Err(bad(format!(
                    "`absmax` holds {} {:?} values; {blocks} f32 expected",
                    len(a),
                    a.dtype()
                )));
            }
            Absmax::Nested {
                codes,
                scales,
                code,
                offset,
            } => {
                if codes.dtype() != DType::U8 || len(codes) != blocks {
                    return Err(bad(format!(
                        "`absmax` holds {} {:?} values; {blocks} u8 expected (double quantization)",
                        len(codes),
                        codes.dtype()
                    )));
                }
                if scales.dtype() != DType::F32 || len(scales) != blocks.div_ceil(NESTED_BLOCKSIZE)
                {
                    return Err(bad(format!(
                        "`nested_absmax` holds {} values; {} f32 expected",
                        len(scales),
                        blocks.div_ceil(NESTED_BLOCKSIZE)
                    )));
                }
                if code.dtype() != DType::F32 || len(code) != 256 {
                    return Err(bad(format!(
                        "`nested_quant_map` holds {} values; 256 f32 expected",
                        len(code)
                    )));
                }
                if !offset.is_finite() {
                    return Err(bad(format!("`nested_offset` {offset} is not finite")));
                }
            }
            Absmax::Plain(_) => {}
        }
        let device = packed.device().clone();
        let code = quant_type.code();
        Ok(Self {
            packed,
            absmax,
            code: Tensor::from_vec(code.to_vec(), 16, &device)?,
            table: byte_table(&code, &device)?,
            quant_type,
            shape,
            dtype,
            blocksize,
        })
    }

    /// Each block's absmax in f32 (double quantization undone as bitsandbytes undoes it:
    /// `code[q] * scale`, then `+ offset`, in f32).
    pub fn absmax_f32(&self) -> candle_core::Result<Tensor> {
        match &self.absmax {
            Absmax::Plain(a) => Ok(a.clone()),
            Absmax::Nested {
                codes,
                scales,
                code,
                offset,
            } => {
                // u32 ids: candle reads an id of u8::MAX as padding (a zero row).
                let vals = code.index_select(&codes.to_dtype(DType::U32)?, 0)?;
                let off = Tensor::new(&[*offset], vals.device())?;
                scale_blocks(&vals, scales, NESTED_BLOCKSIZE)?.broadcast_add(&off)
            }
        }
    }

    /// The weight in `dtype`, `[out, in]`: each code's value times its block's absmax in f32,
    /// then cast (bitsandbytes' `dequantize_4bit`, value for value). On a GPU one kernel does it
    /// (`nn::cuda::dequant`); elsewhere, and as its reference, [`Quant4::dequantize_ops`].
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.device().is_cuda() && self.packed.is_contiguous() {
            use crate::nn::cuda::dequant::{Absmax4, Dequant4, dequant4};
            let absmax = match &self.absmax {
                Absmax::Plain(a) => Absmax4::Plain(a),
                Absmax::Nested {
                    codes,
                    scales,
                    code,
                    offset,
                } => Absmax4::Nested(codes, scales, code, *offset),
            };
            let parts = Dequant4 {
                packed: &self.packed,
                code: &self.code,
                absmax,
                shape: self.shape,
                blocksize: self.blocksize,
            };
            return dequant4(&parts, dtype);
        }
        self.dequantize_ops(dtype)
    }

    /// [`Quant4::dequantize`] in candle ops (any device): the reference of the GPU kernel.
    pub fn dequantize_ops(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let n = self.shape.0 * self.shape.1;
        let vals = self
            .table
            .index_select(&self.packed.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .flatten_all()?
            .narrow(0, 0, n)?;
        scale_blocks(&vals, &self.absmax_f32()?, self.blocksize)?
            .reshape(self.shape)?
            .to_dtype(dtype)
    }

    /// The device the codes are on.
    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Bytes held: codes, absmax (and their scales) and the code books.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let absmax = match &self.absmax {
            Absmax::Plain(a) => size(a),
            Absmax::Nested {
                codes,
                scales,
                code,
                ..
            } => size(codes) + size(scales) + size(code),
        };
        size(&self.packed) + absmax + size(&self.code) + size(&self.table)
    }
}

#[cfg(test)]
mod tests;
