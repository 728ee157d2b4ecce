#![allow(clippy::unwrap_used)]
//! Against bitsandbytes' own output (`scripts/make_bnb_goldens.py`): the codes and absmax its
//! `quantize_4bit` stores, and the bf16 weights its `dequantize_4bit` gives back.

use super::*;

struct Fixture(std::collections::HashMap<String, Tensor>, Vec<String>);

fn fixture() -> Fixture {
    let path = crate::testing::repo_fixtures().join("bnb/quant.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<String> = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("cases"))
            .unwrap(),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    Fixture(tensors, cases)
}

impl Fixture {
    fn get(&self, case: &str, part: &str) -> Tensor {
        self.0[&format!("{case}.{part}")].clone()
    }

    fn has(&self, case: &str, part: &str) -> bool {
        self.0.contains_key(&format!("{case}.{part}"))
    }

    fn config(case: &str) -> Quant4Config {
        Quant4Config {
            quant_type: QuantType::parse(&case[..3]).unwrap(),
            double_quant: case.contains("_dq_"),
        }
    }
}

/// The bits of `t`'s values (bf16 widens to f32 exactly), a zero's sign dropped: bitsandbytes'
/// own kernels disagree on it for FP4's code 8 (its CPU kernel gives -0.0 for some shapes and
/// 0.0 for others).
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
        .collect()
}

/// `a == b`, or a panic naming the first difference (not the whole vectors).
fn same<T: PartialEq + std::fmt::Debug>(a: &[T], b: &[T], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        let n = (0..a.len()).filter(|&i| a[i] != b[i]).count();
        panic!(
            "{what}: {n} of {} differ; first at {i}: {:?} != {:?}",
            a.len(),
            a[i],
            b[i]
        );
    }
}

/// Quantizing bitsandbytes' inputs gives its codes and absmax, byte for byte and bit for bit.
#[test]
fn quantizing_gives_bitsandbytes_codes() {
    let fx = fixture();
    assert_eq!(fx.1.len(), 16);
    for case in &fx.1 {
        let w = fx.get(case, "w");
        let q = Quant4::quantize(&w, &Fixture::config(case), &Device::Cpu).unwrap();
        same(
            &q.packed.to_vec1::<u8>().unwrap(),
            &fx.get(case, "packed").to_vec1::<u8>().unwrap(),
            &format!("{case}: codes"),
        );
        match &q.absmax {
            Absmax::Plain(a) => same(
                &a.to_vec1::<f32>().unwrap(),
                &fx.get(case, "absmax").to_vec1::<f32>().unwrap(),
                &format!("{case}: absmax"),
            ),
            Absmax::Nested {
                codes,
                scales,
                code,
                offset,
            } => {
                assert_eq!(
                    *offset,
                    fx.get(case, "offset").to_vec1::<f32>().unwrap()[0],
                    "{case}: offset"
                );
                assert_eq!(
                    code.to_vec1::<f32>().unwrap(),
                    fx.get(case, "nested_quant_map").to_vec1::<f32>().unwrap()
                );
                same(
                    &scales.to_vec1::<f32>().unwrap(),
                    &fx.get(case, "nested_absmax").to_vec1::<f32>().unwrap(),
                    &format!("{case}: nested absmax"),
                );
                // These fixtures come from bitsandbytes' CPU kernel, whose approximate reciprocal
                // moves a value near a midpoint to the next code now and then; ours are its CUDA
                // kernel's. Within one code, and rarely apart.
                let (ours, theirs) = (
                    codes.to_vec1::<u8>().unwrap(),
                    fx.get(case, "absmax").to_vec1::<u8>().unwrap(),
                );
                let apart = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                assert!(
                    ours.iter().zip(&theirs).all(|(a, b)| a.abs_diff(*b) <= 1)
                        && apart * 50 <= ours.len(),
                    "{case}: {apart} of {} absmax codes apart",
                    ours.len()
                );
            }
        }
        assert_eq!(
            q.code.to_vec1::<f32>().unwrap(),
            fx.get(case, "quant_map").to_vec1::<f32>().unwrap()
        );
    }
}

/// Dequantizing what bitsandbytes stored gives its bf16 weights bit for bit.
#[test]
fn dequantizing_gives_bitsandbytes_weights() {
    let fx = fixture();
    for case in &fx.1 {
        let w = fx.get(case, "w");
        let shape = w.dims2().unwrap();
        let absmax = if fx.has(case, "nested_absmax") {
            Absmax::Nested {
                codes: fx.get(case, "absmax"),
                scales: fx.get(case, "nested_absmax"),
                code: fx.get(case, "nested_quant_map"),
                offset: fx.get(case, "offset").to_vec1::<f32>().unwrap()[0],
            }
        } else {
            Absmax::Plain(fx.get(case, "absmax"))
        };
        let q = Quant4::from_parts(
            case,
            fx.get(case, "packed"),
            absmax,
            Fixture::config(case).quant_type,
            shape,
            DType::BF16,
            BLOCKSIZE,
        )
        .unwrap();
        let deq = q.dequantize(DType::BF16).unwrap();
        assert_eq!(deq.dims2().unwrap(), shape);
        same(&bits(&deq), &bits(&fx.get(case, "deq")), case);
    }
}

/// Stored parts that do not fit the shape are named.
#[test]
fn parts_that_do_not_fit_are_named() {
    let packed = Tensor::zeros(10, DType::U8, &Device::Cpu).unwrap();
    let absmax = Absmax::Plain(Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
    let e = Quant4::from_parts(
        "q_proj.weight",
        packed,
        absmax,
        QuantType::Nf4,
        (4, 8),
        DType::BF16,
        64,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`q_proj.weight`") && e.contains("16 u8"), "{e}");
    assert!(QuantType::parse("int4").is_err());
}

/// Quantizing in chunks on load gives the codes and absmax of the whole weight at once (a weight
/// over two chunks, with a partial last block).
#[test]
fn chunked_quantization_is_the_whole_weights() {
    let w = Tensor::randn(0f32, 0.02, (3000, 700), &Device::Cpu).unwrap();
    let cfg = Quant4Config {
        quant_type: QuantType::Nf4,
        double_quant: false,
    };
    let q = Quant4::quantize(&w, &cfg, &Device::Cpu).unwrap();
    let x = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let code = QuantType::Nf4.code();
    let (codes, absmax) = host::quantize_blocks(&x, BLOCKSIZE, &code);
    assert_eq!(
        q.packed.to_vec1::<u8>().unwrap(),
        host::pack(&codes, host::code_of_zero(&code))
    );
    let Absmax::Plain(a) = &q.absmax else {
        panic!("plain absmax");
    };
    assert_eq!(a.to_vec1::<f32>().unwrap(), absmax);
}
