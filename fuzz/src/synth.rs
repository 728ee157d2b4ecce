//! Safetensors files generated from scratch, `arbitrary`-driven: tensor names taken from the
//! corpus's files (so the loader finds the tensors it asks for), dtypes valid and not, shapes
//! right, wrong, empty or huge, data offsets consistent, overlapping, reversed or past the end,
//! a header length that lies, and the data bytes (NaN and infinities included).

use arbitrary::{Arbitrary, Unstructured};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

/// Dtype names: safetensors' own, and some it does not know.
const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F6_E2M3", "F4", "E8M0", "C64", "Q4", "", "f32",
];

/// One tensor of a generated header.
#[derive(Arbitrary, Debug)]
struct GenTensor {
    /// Index into the corpus's names (or a made-up name when out of range).
    name: u8,
    dtype: u8,
    /// The corpus shape of that name, or this one.
    keep_shape: bool,
    shape: Vec<u16>,
    /// A dimension made huge.
    huge_dim: Option<(u8, u64)>,
    offsets: Offsets,
}

/// How a tensor's data offsets are set.
#[derive(Arbitrary, Debug)]
enum Offsets {
    /// Right after the previous tensor, exactly its size.
    Packed,
    /// Packed, then shifted or resized by small amounts.
    Skewed(i8, i8),
    /// Anything.
    Raw(u64, u64),
}

/// A generated file.
#[derive(Arbitrary, Debug)]
struct GenFile {
    tensors: Vec<GenTensor>,
    metadata: Option<Vec<(u8, u8)>>,
    /// Spaces after the header JSON (safetensors pads to 8).
    pad: u8,
    /// A header length other than the true one.
    len_lie: Option<u64>,
    /// Bytes added to (positive) or cut from (negative) the data.
    tail: i16,
    /// How the data bytes are filled: zeros, a pattern of NaN / infinity, or noise.
    fill: u8,
}

/// Names and shapes of the tensors in the safetensors files of `corpus`.
fn known(corpus: &[Vec<u8>]) -> Vec<Named> {
    let mut out = Vec::new();
    for bytes in corpus {
        if let Ok((_, meta)) = safetensors_header(bytes) {
            for (name, info) in meta {
                out.push((name, info));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A tensor's name and shape.
type Named = (String, Vec<usize>);

/// A safetensors header's tensors, parsed leniently; with where the data starts.
fn safetensors_header(bytes: &[u8]) -> Result<(usize, Vec<Named>), ()> {
    let n = u64::from_le_bytes(bytes.get(..8).ok_or(())?.try_into().map_err(|_| ())?);
    let end = usize::try_from(n)
        .map_err(|_| ())?
        .checked_add(8)
        .ok_or(())?;
    let v: Map<String, Value> =
        serde_json::from_slice(bytes.get(8..end).ok_or(())?).map_err(|_| ())?;
    let tensors = v
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, t)| {
            let shape = t
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<_>>>()?;
            Some((k, shape))
        })
        .collect();
    Ok((end, tensors))
}

fn bytes_per(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// A safetensors file, from `rng`'s bytes through `arbitrary`, with the names of `corpus`'s
/// files.
pub fn safetensors(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let raw: Vec<u8> = (0..rng.random_range(64..2048))
        .map(|_| rng.random())
        .collect();
    let mut u = Unstructured::new(&raw);
    let Ok(g) = GenFile::arbitrary(&mut u) else {
        return Vec::new();
    };
    build(&g, &known(corpus))
}

fn build(g: &GenFile, names: &[Named]) -> Vec<u8> {
    let mut header = Map::new();
    if let Some(meta) = &g.metadata {
        let m: Map<String, Value> = meta
            .iter()
            .map(|(k, v)| (format!("k{k}"), json!(format!("v{v}"))))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset: u64 = 0;
    for t in &g.tensors {
        let (name, mut shape) = match names.get(usize::from(t.name)) {
            Some((n, s)) if t.keep_shape => (n.clone(), s.clone()),
            Some((n, _)) => (
                n.clone(),
                t.shape.iter().map(|&d| usize::from(d % 64)).collect(),
            ),
            None => (
                format!("t{}", t.name),
                t.shape.iter().map(|&d| usize::from(d % 64)).collect(),
            ),
        };
        if let Some((i, d)) = t.huge_dim
            && !shape.is_empty()
        {
            let i = usize::from(i) % shape.len();
            shape[i] = usize::try_from(d).unwrap_or(usize::MAX);
        }
        let dtype = DTYPES[usize::from(t.dtype) % DTYPES.len()];
        let size = shape
            .iter()
            .try_fold(bytes_per(dtype) as u64, |a, &d| a.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        let (a, b) = match t.offsets {
            Offsets::Packed => (offset, offset.saturating_add(size)),
            Offsets::Skewed(da, db) => (
                offset.saturating_add_signed(i64::from(da)),
                offset
                    .saturating_add(size)
                    .saturating_add_signed(i64::from(db)),
            ),
            Offsets::Raw(a, b) => (a, b),
        };
        offset = offset.max(b.min(1 << 20));
        header.insert(
            name,
            json!({ "dtype": dtype, "shape": shape, "data_offsets": [a, b] }),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).unwrap_or_default();
    text.extend(std::iter::repeat_n(b' ', usize::from(g.pad % 16)));
    let n = g.len_lie.unwrap_or(text.len() as u64);
    let data_len = (offset as usize)
        .saturating_add_signed(isize::from(g.tail))
        .min(1 << 20);
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend((0..data_len).map(|i| match g.fill % 4 {
        0 => 0,
        // f32 NaN, f32 +inf, and bf16 / f16 all-ones (NaN) patterns.
        1 => [0x00, 0x00, 0xc0, 0x7f][i % 4],
        2 => [0x00, 0x00, 0x80, 0x7f][i % 4],
        _ => (i.wrapping_mul(2_654_435_761) >> 13) as u8,
    }));
    out
}
