//! bitsandbytes' checkpoint layout of a 4-bit weight, as transformers saves a quantized model:
//! `<name>` the codes (u8 `[n/2, 1]`), `<name>.absmax`, `<name>.quant_map`, with double
//! quantization `<name>.nested_absmax` and `<name>.nested_quant_map`, and
//! `<name>.quant_state.bitsandbytes__<type>` (the rest of the state as JSON bytes: type,
//! blocksize, dtype, shape, nested offset).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Absmax, NESTED_BLOCKSIZE, Quant4, QuantType};
use crate::{Error, Result};

/// The JSON of `quant_state.bitsandbytes__<type>`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f32>,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s.trim_start_matches("torch.") {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// Reads one tensor of a 4-bit weight: `(suffix, dtype, shape)` -> the stored tensor (`None`:
/// any shape).
pub type Fetch<'a> = dyn Fn(&str, DType, Option<&[usize]>) -> Result<Tensor> + 'a;

/// The suffix of the state tensor for each type.
fn state_suffix(t: QuantType) -> String {
    format!("quant_state.bitsandbytes__{}", t.name())
}

/// Reads the 4-bit weight `name` (`[out, in]`) that bitsandbytes saved, through `fetch` (suffix
/// `""` is the codes), checking every part against the shape; `has(suffix)` says which parts
/// the checkpoint holds. Errors name the tensor.
pub fn read(
    name: &str,
    shape: (usize, usize),
    has: &dyn Fn(&str) -> bool,
    fetch: &Fetch<'_>,
) -> Result<Quant4> {
    let bad = |m: String| Error::InvalidArgument(format!("`{name}`: {m}"));
    let quant_type = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .find(|t| has(&state_suffix(*t)))
        .ok_or_else(|| {
            bad("a 4-bit weight without `quant_state.bitsandbytes__nf4` (or `__fp4`)".into())
        })?;
    let suffix = state_suffix(quant_type);
    let raw = fetch(&suffix, DType::U8, None)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let state: State = serde_json::from_slice(&raw)
        .map_err(|e| bad(format!("`{suffix}` is not bitsandbytes' state JSON: {e}")))?;
    if state.quant_type != quant_type.name() {
        return Err(bad(format!(
            "`{suffix}` says quant_type `{}`",
            state.quant_type
        )));
    }
    if state.shape != [shape.0, shape.1] {
        return Err(bad(format!(
            "the state's shape {:?} is not the model's [{}, {}]",
            state.shape, shape.0, shape.1
        )));
    }
    let dtype = parse_dtype(&state.dtype).ok_or_else(|| {
        bad(format!(
            "the state's dtype `{}` is not a float",
            state.dtype
        ))
    })?;
    let n = shape.0 * shape.1;
    if !(2..=4096).contains(&state.blocksize) {
        return Err(bad(format!(
            "blocksize {} is outside 2..=4096",
            state.blocksize
        )));
    }
    let blocks = n.div_ceil(state.blocksize);
    let packed = fetch("", DType::U8, Some(&[n.div_ceil(2), 1]))?;
    let absmax = if has("nested_absmax") {
        let nb = state.nested_blocksize.unwrap_or(NESTED_BLOCKSIZE);
        if nb != NESTED_BLOCKSIZE {
            return Err(bad(format!(
                "nested blocksize {nb}; bitsandbytes writes {NESTED_BLOCKSIZE}"
            )));
        }
        Absmax::Nested {
            codes: fetch("absmax", DType::U8, Some(&[blocks]))?,
            scales: fetch("nested_absmax", DType::F32, Some(&[blocks.div_ceil(nb)]))?,
            code: fetch("nested_quant_map", DType::F32, Some(&[256]))?,
            offset: state
                .nested_offset
                .ok_or_else(|| bad("double quantization without `nested_offset`".into()))?,
        }
    } else {
        Absmax::Plain(fetch("absmax", DType::F32, Some(&[blocks]))?)
    };
    Quant4::from_parts(
        name,
        packed,
        absmax,
        quant_type,
        shape,
        dtype,
        state.blocksize,
    )
}

impl Quant4 {
    /// The tensors bitsandbytes saves for this weight, by suffix of its name (`""`: the codes),
    /// on the CPU.
    pub fn bnb_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let n2 = self.packed.elem_count();
        let mut out = vec![
            (String::new(), cpu(&self.packed)?.reshape((n2, 1))?),
            ("quant_map".to_string(), cpu(&self.code)?),
        ];
        let mut state = State {
            quant_type: self.quant_type.name().into(),
            blocksize: self.blocksize,
            dtype: dtype_name(self.dtype).into(),
            shape: vec![self.shape.0, self.shape.1],
            nested_blocksize: None,
            nested_dtype: None,
            nested_offset: None,
        };
        match &self.absmax {
            Absmax::Plain(a) => out.push(("absmax".into(), cpu(a)?)),
            Absmax::Nested {
                codes,
                scales,
                code,
                offset,
            } => {
                out.push(("absmax".into(), cpu(codes)?));
                out.push(("nested_absmax".into(), cpu(scales)?));
                out.push(("nested_quant_map".into(), cpu(code)?));
                state.nested_blocksize = Some(NESTED_BLOCKSIZE);
                state.nested_dtype = Some("float32".into());
                state.nested_offset = Some(*offset);
            }
        }
        let json = serde_json::to_vec(&state).unwrap_or_default();
        let len = json.len();
        out.push((
            state_suffix(self.quant_type),
            Tensor::from_vec(json, len, &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// A shapes-only 4-bit weight (`qscript check`): every part the right size, no data.
    pub fn planned(shape: (usize, usize), cfg: &super::Quant4Config, dtype: DType) -> Result<Self> {
        let zeros = |n: usize, d: DType| -> Result<Tensor> {
            Ok(Tensor::zeros((), d, &Device::Cpu)?.broadcast_as(n)?)
        };
        let n = shape.0 * shape.1;
        let blocks = n.div_ceil(super::BLOCKSIZE);
        let absmax = if cfg.double_quant {
            Absmax::Nested {
                codes: zeros(blocks, DType::U8)?,
                scales: zeros(blocks.div_ceil(NESTED_BLOCKSIZE), DType::F32)?,
                code: zeros(256, DType::F32)?,
                offset: 0.0,
            }
        } else {
            Absmax::Plain(zeros(blocks, DType::F32)?)
        };
        Self::from_parts(
            "planned",
            zeros(n.div_ceil(2), DType::U8)?,
            absmax,
            cfg.quant_type,
            shape,
            dtype,
            super::BLOCKSIZE,
        )
    }
}
