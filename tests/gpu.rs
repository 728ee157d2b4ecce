//! The engine on the GPU against the same engine on the CPU (feature `cuda`, run on the GPU
//! machine from binaries built elsewhere): the dropout kernel draws the CPU's masks bit for bit,
//! every op's forward and backward agree in f32 and within bf16 rounding in bf16 (random shapes,
//! odd lengths, GQA, padding), and 30 LoRA steps give the CPU's losses within 1e-4.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use qscript_runtime::cancel::CancelToken;
use qscript_runtime::data::sft::Example;
use qscript_runtime::lora::{self, LoraConfig, Targets};
use qscript_runtime::model::{LoadOptions, Model, TinyConfig, tiny};
use qscript_runtime::nn::attention::{attention, attention_backward};
use qscript_runtime::nn::ops::{
    apply_rope, rms_norm, rms_norm_backward, rope, rope_backward, rope_bwd, swiglu, swiglu_backward,
};
use qscript_runtime::nn::{AttnMask, dropout};
use qscript_runtime::train::engine::gradients;
use qscript_runtime::train::{TrainConfig, fit};

fn gpu() -> Device {
    qscript_runtime::device::cuda(0).unwrap()
}

/// `‖a − b‖ / ‖b‖` with both on the CPU in f32.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let d = n(&a.sub(&b).unwrap());
    assert!(d.is_finite(), "non-finite result");
    d / n(&b).max(1e-30)
}

#[test]
fn dropout_kernel_draws_the_cpu_masks() {
    // Rows keyed per example (from window row 3), as the engine keys them.
    let key = dropout::Key {
        key: 42,
        first_row: 3,
    };
    for (shape, row_elems, p) in [
        (vec![7usize, 33], 33, 0.1),
        (vec![4, 1024, 896], 1024 * 896, 0.5),
        (vec![3], 3, 0.9),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let g = dropout::mask(key, p, &shape, row_elems, dtype, &gpu()).unwrap();
            let c = dropout::mask(key, p, &shape, row_elems, dtype, &Device::Cpu).unwrap();
            let g = g
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let c = c.to_dtype(DType::F32).unwrap();
            assert_eq!(
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{shape:?} {dtype:?}"
            );
        }
    }
}

/// Each op's forward and backward on the GPU against the CPU reference in f32, on random shapes.
#[test]
fn ops_match_the_cpu_reference_in_f32_and_bf16() {
    let cpu = Device::Cpu;
    for (i, &(b, h, kv, s, d)) in [
        (2usize, 4usize, 2usize, 37usize, 64usize),
        (1, 14, 2, 129, 64),
        (3, 8, 8, 17, 128),
    ]
    .iter()
    .enumerate()
    {
        // f32: qscript's softmax kernels; bf16 and f16: cuDNN's fused attention.
        for (dtype, tol) in [
            (DType::F32, 1e-5f32),
            (DType::BF16, 2e-2),
            (DType::F16, 2e-2),
        ] {
            let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &cpu).unwrap();
            let on = |t: &Tensor| t.to_device(&gpu()).unwrap().to_dtype(dtype).unwrap();
            let (q, k, v) = (r(&[b, h, s, d]), r(&[b, kv, s, d]), r(&[b, kv, s, d]));
            let dy = r(&[b, h, s, d]);
            let lens: Vec<usize> = (0..b).map(|r| s - (r * 5) % s).collect();
            let mask = if i == 1 {
                AttnMask::causal(0)
            } else {
                AttnMask::right_padded(&lens)
            };
            if dtype != DType::F32 {
                let why = qscript_runtime::nn::cuda::sdpa::unsupported(&on(&q), &on(&k), &mask);
                assert!(
                    why.is_none(),
                    "case {i} {dtype:?}: cuDNN attention not used: {why:?}"
                );
            }
            let (mut sc, mut sg) = (None, None);
            let oc = attention(&q, &k, &v, &mask, Some(&mut sc)).unwrap();
            let og = attention(&on(&q), &on(&k), &on(&v), &mask, Some(&mut sg)).unwrap();
            assert!(rel(&og, &oc) < tol, "case {i} {dtype:?} attention forward");
            let gc = attention_backward(sc.as_ref().unwrap(), &dy).unwrap();
            let gg = attention_backward(sg.as_ref().unwrap(), &on(&dy)).unwrap();
            for (n, (a, c)) in
                ["dq", "dk", "dv"]
                    .iter()
                    .zip([(&gg.0, &gc.0), (&gg.1, &gc.1), (&gg.2, &gc.2)])
            {
                assert!(
                    rel(a, c) < tol * 2.0,
                    "case {i} {dtype:?} attention {n}: {}",
                    rel(a, c)
                );
            }
            // The engine's layout: [b, s, h, d] tensors seen as [b, h, s, d] (cuDNN takes them
            // as they lie; its output and gradients lie the same way).
            let bshd = |t: &Tensor| {
                on(&t.transpose(1, 2).unwrap().contiguous().unwrap())
                    .transpose(1, 2)
                    .unwrap()
            };
            let mut sv = None;
            let ov = attention(&bshd(&q), &bshd(&k), &bshd(&v), &mask, Some(&mut sv)).unwrap();
            assert!(
                rel(&ov, &oc) < tol,
                "case {i} {dtype:?} attention forward, [b, s, h, d]"
            );
            let gv = attention_backward(sv.as_ref().unwrap(), &bshd(&dy)).unwrap();
            for (n, (a, c)) in
                ["dq", "dk", "dv"]
                    .iter()
                    .zip([(&gv.0, &gc.0), (&gv.1, &gc.1), (&gv.2, &gc.2)])
            {
                assert!(
                    rel(a, c) < tol * 2.0,
                    "case {i} {dtype:?} attention {n}, [b, s, h, d]: {}",
                    rel(a, c)
                );
            }
            let w = Tensor::randn(1f32, 0.1, d, &cpu).unwrap();
            let x = r(&[b, s, d]);
            let dyx = r(&[b, s, d]);
            assert!(
                rel(
                    &rms_norm(&on(&x), &on(&w), 1e-6).unwrap(),
                    &rms_norm(&x, &w, 1e-6).unwrap()
                ) < tol
            );
            let (dxg, dwg) = rms_norm_backward(&on(&x), &on(&w), 1e-6, &on(&dyx), true).unwrap();
            let (dxc, dwc) = rms_norm_backward(&x, &w, 1e-6, &dyx, true).unwrap();
            assert!(
                rel(&dxg, &dxc) < tol && rel(&dwg.unwrap(), &dwc.unwrap()) < tol,
                "case {i} {dtype:?} rms_norm"
            );
            let (g, u) = (r(&[b, s, d]), r(&[b, s, d]));
            assert!(rel(&swiglu(&on(&g), &on(&u)).unwrap(), &swiglu(&g, &u).unwrap()) < tol);
            let (a1, a2) = swiglu_backward(&on(&g), &on(&u), &on(&dyx)).unwrap();
            let (c1, c2) = swiglu_backward(&g, &u, &dyx).unwrap();
            assert!(
                rel(&a1, &c1) < tol && rel(&a2, &c2) < tol,
                "case {i} {dtype:?} swiglu"
            );
            // Packed rows (segments inside each row, right padding after them), in the
            // engine's layout.
            // As packing makes them: every example starts before its row's padding.
            let starts: Vec<Vec<usize>> = (0..b)
                .map(|r| {
                    [s / 3 + r, s / 2 + r]
                        .into_iter()
                        .filter(|&st| st < lens[r])
                        .collect()
                })
                .collect();
            // And rows whose later examples share the row's first tokens (a preference
            // pair's prompt, then its two answers).
            let answers: Vec<Vec<usize>> = lens.iter().map(|&n| vec![2 * n / 3]).collect();
            let shared: Vec<usize> = lens.iter().map(|&n| n / 3).collect();
            for (what, packed) in [
                (
                    "packed",
                    AttnMask::right_padded(&lens).with_segments(Some(starts.clone())),
                ),
                (
                    "shared prompt",
                    AttnMask::right_padded(&lens)
                        .with_segments(Some(answers.clone()))
                        .with_shared(Some(shared.clone())),
                ),
            ] {
                if dtype != DType::F32 {
                    // Packed rows run as the padded batch of their examples, through cuDNN.
                    let u = qscript_runtime::nn::unpack::Unpacked::of(&packed, b, s, &gpu())
                        .unwrap()
                        .unwrap_or_else(|| {
                            panic!("case {i}: {what} rows not taken as a padded batch")
                        });
                    let why = qscript_runtime::nn::cuda::sdpa::unsupported(
                        &u.gather(&bshd(&q)).unwrap(),
                        &u.gather(&bshd(&k)).unwrap(),
                        &u.mask(),
                    );
                    assert!(
                        why.is_none(),
                        "case {i} {dtype:?}: {what} rows not on cuDNN: {why:?}"
                    );
                }
                let mut sp = None;
                let pc = attention(&q, &k, &v, &packed, Some(&mut sp)).unwrap();
                let mut sq = None;
                let pg =
                    attention(&bshd(&q), &bshd(&k), &bshd(&v), &packed, Some(&mut sq)).unwrap();
                assert!(
                    rel(&pg, &pc) < tol,
                    "case {i} {dtype:?} {what} attention forward"
                );
                let gc = attention_backward(sp.as_ref().unwrap(), &dy).unwrap();
                let gq = attention_backward(sq.as_ref().unwrap(), &bshd(&dy)).unwrap();
                for (n, (a, c)) in
                    ["dq", "dk", "dv"]
                        .iter()
                        .zip([(&gq.0, &gc.0), (&gq.1, &gc.1), (&gq.2, &gc.2)])
                {
                    assert!(
                        rel(a, c) < tol * 2.0,
                        "case {i} {dtype:?} {what} attention {n}: {}",
                        rel(a, c)
                    );
                }
            }
            // The RoPE kernel on [b, s, h, d], from a contiguous tensor and from a transposed
            // view (cuDNN's gradients), against the reference on [b, h, s, d].
            let (cos, sin) = (r(&[s, d]), r(&[s, d]));
            let back = |t: Tensor| t.transpose(1, 2).unwrap();
            let want = apply_rope(&q, &cos, &sin).unwrap();
            let (gc, gs) = (on(&cos), on(&sin));
            let qs = on(&q.transpose(1, 2).unwrap().contiguous().unwrap());
            assert!(
                rel(&back(rope(&qs, &gc, &gs).unwrap()), &want) < tol,
                "case {i} {dtype:?} rope"
            );
            let dwant = rope_backward(&dy, &cos, &sin).unwrap();
            let dview = on(&dy).transpose(1, 2).unwrap();
            assert!(
                rel(&back(rope_bwd(&dview, &gc, &gs).unwrap()), &dwant) < tol,
                "case {i} {dtype:?} rope backward"
            );
            // Per-row tables (packed rows restart their positions).
            let (cr, sr) = (r(&[b, s, d]), r(&[b, s, d]));
            let per = |t: &Tensor| t.unsqueeze(1).unwrap();
            let want = apply_rope(&q, &per(&cr), &per(&sr)).unwrap();
            let got = back(rope(&qs, &on(&cr), &on(&sr)).unwrap());
            assert!(
                rel(&got, &want) < tol,
                "case {i} {dtype:?} rope, per-row tables"
            );
        }
    }
}

/// The kernels that add into existing buffers against the composite ops: the accumulating GEMM
/// (bf16 operands, transposed views, into f32 and bf16 outputs), dropout with its mask drawn in
/// the kernel (forward and added into a destination), the in-place f32 add and the row scatter.
#[test]
fn accumulating_kernels_match_the_reference() {
    use qscript_runtime::nn::cuda::{accumulate, blas};
    let cpu = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &cpu).unwrap();
    let on = |t: &Tensor, d: DType| t.to_device(&gpu()).unwrap().to_dtype(d).unwrap();
    for &(m, k, n) in &[(37usize, 64usize, 96usize), (1, 130, 7), (256, 8, 640)] {
        let (a, bt, c) = (r(&[m, k]), r(&[n, k]), r(&[m, n]));
        // b is a transposed view, as a weight's `t()` is.
        let want = (&c + (a.matmul(&bt.t().unwrap()).unwrap() * 0.5).unwrap()).unwrap();
        let cg = on(&c, DType::F32);
        let (ag, bg) = (on(&a, DType::BF16), on(&bt, DType::BF16));
        blas::gemm(&cg, &ag, &bg.t().unwrap(), 0.5, 1.0).unwrap();
        assert!(rel(&cg, &want) < 1e-2, "gemm {m}x{k}x{n} into f32");
        let cb = on(&c, DType::BF16);
        blas::gemm(
            &cb,
            &ag.t().unwrap().contiguous().unwrap().t().unwrap(),
            &bg.t().unwrap(),
            0.5,
            1.0,
        )
        .unwrap();
        assert!(rel(&cb, &want) < 2e-2, "gemm {m}x{k}x{n} into bf16");
        let (c32, a32, b32) = (on(&c, DType::F32), on(&a, DType::F32), on(&bt, DType::F32));
        blas::gemm(&c32, &a32, &b32.t().unwrap(), 0.5, 1.0).unwrap();
        assert!(rel(&c32, &want) < 1e-5, "gemm {m}x{k}x{n} in f32");
    }
    let key = dropout::Key {
        key: 9,
        first_row: 2,
    };
    // Rows a multiple of 16 bytes (the vector path) and odd ones (the scalar path).
    for shape in [[3usize, 40, 24], [3, 5, 7]] {
        let x = r(&shape);
        let row = shape[1] * shape[2];
        for dtype in [DType::F32, DType::BF16] {
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            let want = dropout::apply(&x.to_dtype(dtype).unwrap(), 0.3, key, row).unwrap();
            let got = dropout::apply(&on(&x, dtype), 0.3, key, row).unwrap();
            assert!(rel(&got, &want) < tol, "dropout {dtype:?} {shape:?}");
            let base = r(&shape);
            let want = (base.to_dtype(dtype).unwrap() + (want * 2.0).unwrap()).unwrap();
            let got =
                dropout::add_into(on(&base, dtype), &on(&x, dtype), 0.3, key, row, 2.0).unwrap();
            assert!(
                rel(&got, &want) < tol * 2.0,
                "dropout added into {dtype:?} {shape:?}"
            );
        }
    }
    let dst = r(&[10, 6]);
    let x = r(&[10, 6]);
    let dg = on(&dst, DType::F32);
    accumulate::add_f32(&dg, &on(&x, DType::BF16)).unwrap();
    assert!(rel(&dg, &(&dst + &x).unwrap()) < 1e-2, "add_f32");
    let ids = Tensor::new(&[3u32, 0, 3, 9], &cpu).unwrap();
    let rows = r(&[4, 6]);
    let want = dst.index_add(&ids, &rows, 0).unwrap();
    let dg = on(&dst, DType::F32);
    accumulate::scatter_rows_f32(&dg, &ids.to_device(&gpu()).unwrap(), &on(&rows, DType::F32))
        .unwrap();
    assert!(rel(&dg, &want) < 1e-6, "scatter_rows_f32");
}

fn tiny_on(device: &str, layers: usize) -> Model {
    tiny_model(device, layers, false)
}

/// The tiny model in f32 on `device`: LoRA on every linear, or (`full`) every weight trained.
fn tiny_model(device: &str, layers: usize, full: bool) -> Model {
    let dir = save_tiny(layers);
    let opts = LoadOptions {
        dtype: "f32".into(),
        device: device.into(),
        trainable: full,
        ..Default::default()
    };
    load_tiny(dir.path(), &opts)
}

/// A tiny checkpoint of `layers` layers in a temp dir.
fn save_tiny(layers: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny(&TinyConfig {
        hidden: 64,
        layers,
        intermediate: 128,
        seed: 3,
        ..TinyConfig::default()
    })
    .unwrap()
    .save(dir.path())
    .unwrap();
    dir
}

/// The checkpoint at `dir` loaded with `opts`: as is when every weight trains, else with LoRA
/// on every linear.
fn load_tiny(dir: &std::path::Path, opts: &LoadOptions) -> Model {
    let m = Model::load(dir, opts).unwrap();
    if opts.trainable {
        return m;
    }
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Targets::Pattern("all-linear".into()),
        ..LoraConfig::default()
    };
    lora::attach(&m, &cfg, 7).unwrap()
}

fn rows(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 9 + (i * 7) % 23;
            let ids: Vec<u32> = (0..len).map(|j| ((i * 31 + j * 17) % 250) as u32).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(j, &t)| if j < 3 { -100 } else { i64::from(t) })
                .collect();
            Example {
                input_ids: ids,
                labels,
                packed: Vec::new(),
                pref: None,
            }
        })
        .collect()
}

#[test]
fn engine_gradients_on_the_gpu_equal_the_cpu() {
    for full in [false, true] {
        engine_gradients_agree(full);
    }
}

/// LoRA, or full fine-tuning (every weight, bias, norm and the embedding through the GPU's
/// in-place gradient kernels).
fn engine_gradients_agree(full: bool) {
    let (c, g) = (tiny_model("cpu", 2, full), tiny_model("cuda:0", 2, full));
    let ex = rows(3);
    let refs: Vec<&Example> = ex.iter().collect();
    let bc = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &Device::Cpu).unwrap();
    let bg = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &gpu()).unwrap();
    let mask = AttnMask::right_padded(&bc.lens);
    for recompute in [false, true] {
        let (lc, gc) = gradients(
            &c,
            &bc.input_ids,
            &mask,
            &bc.labels_host,
            Some(dropout::Key::new(5)),
            recompute,
        )
        .unwrap();
        let (lg, gg) = gradients(
            &g,
            &bg.input_ids,
            &mask,
            &bg.labels_host,
            Some(dropout::Key::new(5)),
            recompute,
        )
        .unwrap();
        assert!((lc - lg).abs() < 1e-5, "loss {lc} vs {lg}");
        assert_eq!(gg.len(), gc.len());
        for ((n, a), (_, b)) in gg.iter().zip(&gc) {
            assert!(rel(a, b) < 1e-4, "full {full}, {n}: {}", rel(a, b));
        }
    }
}

/// The 4-bit dequantization kernel gives its reference op's values bit for bit (NF4 and FP4,
/// with and without double quantization, partial blocks, odd counts; f32, bf16, f16), and the
/// bf16 weights bitsandbytes' own `dequantize_4bit` gave for the same codes.
#[test]
fn dequant_kernel_matches_the_reference_and_bitsandbytes() {
    use qscript_runtime::quant::{Quant4, Quant4Config, QuantType};
    let fx = qscript_runtime::testing::repo_fixtures().join("bnb/quant.safetensors");
    let t = candle_core::safetensors::load(&fx, &gpu()).unwrap();
    let bits = |x: &Tensor| -> Vec<u32> {
        x.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
            .collect()
    };
    let mut cases = 0;
    for (name, w) in &t {
        let Some(case) = name.strip_suffix(".w") else {
            continue;
        };
        let cfg = Quant4Config {
            quant_type: QuantType::parse(&case[..3]).unwrap(),
            double_quant: case.contains("_dq_"),
        };
        let q = Quant4::quantize(w, &cfg, &gpu()).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let k = q.dequantize(dtype).unwrap();
            let r = q.dequantize_ops(dtype).unwrap();
            assert_eq!(k.dtype(), dtype);
            assert_eq!(bits(&k), bits(&r), "{case} {dtype:?}");
        }
        if !case.contains("_dq_") {
            // Same codes as bitsandbytes (double quantization's absmax codes may differ by one:
            // those fixtures come from its CPU kernel).
            let k = q.dequantize(DType::BF16).unwrap();
            assert_eq!(
                bits(&k),
                bits(&t[&format!("{case}.deq")]),
                "{case} vs bitsandbytes"
            );
        }
        cases += 1;
    }
    assert_eq!(cases, 16);
}

/// A QLoRA step on the GPU (4-bit base quantized on load, the kernel dequantizing) gives the
/// CPU's loss and adapter gradients.
#[test]
fn qlora_gradients_on_the_gpu_equal_the_cpu() {
    let dir = save_tiny(2);
    let quant = Some(qscript_runtime::quant::Quant4Config {
        quant_type: qscript_runtime::quant::QuantType::Nf4,
        double_quant: true,
    });
    let load = |device: &str| {
        load_tiny(
            dir.path(),
            &LoadOptions {
                dtype: "f32".into(),
                device: device.into(),
                quant,
                ..Default::default()
            },
        )
    };
    let (c, g) = (load("cpu"), load("cuda:0"));
    assert!(g.quant4().is_some_and(|q| q.device().is_cuda()));
    let ex = rows(3);
    let refs: Vec<&Example> = ex.iter().collect();
    let bc = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &Device::Cpu).unwrap();
    let bg = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &gpu()).unwrap();
    let mask = AttnMask::right_padded(&bc.lens);
    let (lc, gc) = gradients(&c, &bc.input_ids, &mask, &bc.labels_host, None, true).unwrap();
    let (lg, gg) = gradients(&g, &bg.input_ids, &mask, &bg.labels_host, None, true).unwrap();
    assert!((lc - lg).abs() < 1e-5, "loss {lc} vs {lg}");
    assert_eq!(gg.len(), gc.len());
    for ((n, a), (_, b)) in gg.iter().zip(&gc) {
        assert!(rel(a, b) < 1e-4, "{n}: {}", rel(a, b));
    }
}

/// Preference training on the GPU: the per-token log-probabilities (the fused cross-entropy
/// kernel without gradients) and their per-token-weighted backward give the CPU's values, and
/// DPO / ORPO / KTO losses, metrics and gradients through the engine equal the CPU's (LoRA and
/// full fine-tuning, the head trained).
#[test]
fn preference_objectives_on_the_gpu_equal_the_cpu() {
    use qscript_runtime::data::example::Pref;
    use qscript_runtime::nn::loss::{logp_backward, token_logps};
    use qscript_runtime::train::engine::objective_gradients;
    use qscript_runtime::train::preference::{PrefConfig, Preference, reference_logps};
    struct Head(Tensor, Option<Tensor>);
    impl qscript_runtime::nn::GradSink for Head {
        fn wants(&self, p: &Tensor) -> bool {
            p.id() == self.0.id()
        }
        fn add(&mut self, _: &Tensor, g: &Tensor) -> candle_core::Result<()> {
            let g = g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            self.1 = Some(match self.1.take() {
                Some(a) => (a + g)?,
                None => g,
            });
            Ok(())
        }
    }
    let cpu = Device::Cpu;
    let (n, h, vocab) = (21usize, 24usize, 259usize);
    let hidden = Tensor::randn(0f32, 1.0, (n, h), &cpu).unwrap();
    let head = (Tensor::randn(0f32, 1.0, (vocab, h), &cpu).unwrap() * 0.5).unwrap();
    let targets: Vec<i64> = (0..n)
        .map(|i| {
            if i % 5 == 2 {
                -100
            } else {
                ((i * 41) % vocab) as i64
            }
        })
        .collect();
    let weights: Vec<f32> = (0..n).map(|i| (i as f32 - 7.0) * 0.1).collect();
    for dtype in [DType::F32, DType::BF16] {
        let run = |dev: &Device| {
            let hd = hidden.to_device(dev).unwrap().to_dtype(dtype).unwrap();
            let wd = head.to_device(dev).unwrap().to_dtype(dtype).unwrap();
            let lp = token_logps(&hd, &wd, &targets).unwrap();
            let mut sink = Head(wd.clone(), None);
            let dh = logp_backward(&hd, &wd, &targets, &weights, &mut sink).unwrap();
            let dh = dh.to_device(&cpu).unwrap().to_dtype(DType::F32).unwrap();
            (lp, dh, sink.1.unwrap())
        };
        let ((lc, dc, hc), (lg, dg, hg)) = (run(&cpu), run(&gpu()));
        let tol = if dtype == DType::F32 { 1e-5 } else { 3e-2 };
        for (a, b) in lc.iter().zip(&lg) {
            assert!(
                (a - b).abs() <= tol * a.abs().max(1.0),
                "logp {dtype:?}: {a} vs {b}"
            );
        }
        assert!(
            rel(&dg, &dc) < tol * 2.0,
            "dHidden {dtype:?}: {}",
            rel(&dg, &dc)
        );
        assert!(
            rel(&hg, &hc) < tol * 2.0,
            "dHead {dtype:?}: {}",
            rel(&hg, &hc)
        );
    }
    // Through the engine: pairs (and KTO answers) of the tiny model on both devices.
    let pairs: Vec<Example> = rows(6)
        .chunks(2)
        .enumerate()
        .map(|(k, two)| {
            let mut e = two[0].clone();
            e.pref = Some(Box::new(Pref {
                prompt_len: 3,
                second_ids: two[1].input_ids.clone(),
                second_labels: two[1].labels.clone(),
                desirable: None,
                ref_logps: None,
            }));
            let _ = k;
            e
        })
        .collect();
    for (loss, full, kto) in [
        ("sigmoid", false, false),
        ("orpo", true, false),
        ("kto", false, true),
    ] {
        let (c, g) = (tiny_model("cpu", 2, full), tiny_model("cuda:0", 2, full));
        let mut ex = pairs.clone();
        for (i, e) in ex.iter_mut().enumerate() {
            if let Some(p) = &mut e.pref {
                p.desirable = kto.then_some(i % 2 == 0);
            }
        }
        let objective = Preference::new(
            PrefConfig {
                loss_type: loss.into(),
                ..PrefConfig::default()
            },
            kto,
        )
        .unwrap();
        let cancel = qscript_runtime::cancel::CancelToken::new();
        let (mut ec, mut eg) = (ex.clone(), ex);
        if objective.needs_reference() {
            reference_logps(&c, &mut ec, 2, 0, &cancel).unwrap();
            reference_logps(&g, &mut eg, 2, 0, &cancel).unwrap();
        }
        let rc: Vec<&Example> = ec.iter().collect();
        let rg: Vec<&Example> = eg.iter().collect();
        let bc = qscript_runtime::data::batch::collate(&rc, 0, None, &Device::Cpu).unwrap();
        let bg = qscript_runtime::data::batch::collate(&rg, 0, None, &gpu()).unwrap();
        let (lc, gc, mc) = objective_gradients(&c, &objective, &bc, 3.0).unwrap();
        let (lg, gg, mg) = objective_gradients(&g, &objective, &bg, 3.0).unwrap();
        assert!(
            (lc - lg).abs() < 1e-5 * lc.abs().max(1.0),
            "{loss}: loss {lc} vs {lg}"
        );
        for ((name, a, _), (_, b, _)) in mc.iter().zip(&mg) {
            assert!(
                (a - b).abs() < 1e-4 * a.abs().max(1.0),
                "{loss}: {name} {a} vs {b}"
            );
        }
        for ((name, a), (_, b)) in gg.iter().zip(&gc) {
            assert!(rel(a, b) < 1e-4, "{loss}, {name}: {}", rel(a, b));
        }
    }
}

/// Packed rows on the GPU (softmax kernels with per-query example starts, per-row RoPE
/// tables) give the CPU's unpacked loss and gradients.
#[test]
fn packed_rows_on_the_gpu_give_the_unpacked_gradients() {
    use qscript_runtime::data::batch::{collate, pack};
    let (c, g) = (tiny_on("cpu", 2), tiny_on("cuda:0", 2));
    let ex = rows(7);
    let packed = pack(&ex, 64);
    assert!(packed.len() < ex.len() && packed.iter().any(|r| !r.packed.is_empty()));
    let run = |m: &Model, rows: &[Example], dev: &Device| {
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = collate(&refs, 0, None, dev).unwrap();
        gradients(
            m,
            &batch.input_ids,
            &batch.mask(),
            &batch.labels_host,
            None,
            false,
        )
        .unwrap()
    };
    let (lc, gc) = run(&c, &ex, &Device::Cpu);
    let (lg, gg) = run(&g, &packed, &gpu());
    assert!((lc - lg).abs() < 1e-5, "loss {lc} vs {lg}");
    for ((n, a), (_, b)) in gg.iter().zip(&gc) {
        assert!(rel(a, b) < 1e-4, "{n}: {}", rel(a, b));
    }
}

#[test]
fn thirty_lora_steps_give_the_cpu_losses() {
    let data = rows(24);
    let run = |device: &str| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            output_dir: dir.path().to_string_lossy().into_owned(),
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 2,
            max_steps: 30,
            learning_rate: 5e-3,
            logging_steps: 1,
            save_steps: 0,
            gradient_checkpointing: qscript_runtime::train::Checkpointing::On,
            ..TrainConfig::default()
        };
        fit(
            &tiny_on(device, 2),
            &data,
            None,
            &cfg,
            0,
            &CancelToken::new(),
            &mut |_| Ok(()),
        )
        .unwrap()
        .losses
    };
    let (c, g) = (run("cpu"), run("cuda:0"));
    assert_eq!(c.len(), 30);
    for ((s, a), (_, b)) in c.iter().zip(&g) {
        assert!((a - b).abs() < 1e-4, "step {s}: cpu {a} vs cuda {b}");
    }
    assert!(c[29].1 < c[0].1, "the loss falls: {c:?}");
}

/// GPU + CPU offload (`device_map: "auto"` with a `max_memory` that leaves the GPU room for the
/// embedding and one layer): the later layers, the norm and their adapters, gradients and Adam
/// moments on the CPU, hidden states moved at the boundary; the losses of the model on the GPU
/// alone, LoRA and full fine-tuning.
#[test]
fn gpu_and_cpu_offload_train_like_one_device() {
    use qscript_runtime::plan::DeviceMap;
    let data = rows(16);
    let dir = save_tiny(3);
    for full in [false, true] {
        let load = |map: Option<DeviceMap>, max_memory: Vec<(String, u64)>| {
            let opts = LoadOptions {
                dtype: "f32".into(),
                device: "cuda:0".into(),
                trainable: full,
                device_map: map,
                max_memory,
                quant: None,
            };
            load_tiny(dir.path(), &opts)
        };
        // The embedding and the first layer on the GPU, the rest on the CPU (a `max_memory` that
        // small would also bound the run's need on the GPU, which its CUDA runtime alone passes).
        let on = |m: &str, d: &str| (m.to_string(), d.to_string());
        let offload = load(
            Some(DeviceMap::Explicit(vec![
                on("", "cpu"),
                on("model.embed_tokens", "cuda:0"),
                on("model.layers.0", "cuda:0"),
            ])),
            Vec::new(),
        );
        let p = offload.placement.as_ref().unwrap();
        assert_eq!(p.device_of("model.embed_tokens"), Some("cuda:0"), "{p}");
        assert_eq!(p.device_of("model.layers.2"), Some("cpu"), "{p}");
        let run = |m: &Model| {
            let out = tempfile::tempdir().unwrap();
            let cfg = TrainConfig {
                output_dir: out.path().to_string_lossy().into_owned(),
                per_device_train_batch_size: 4,
                max_steps: 8,
                learning_rate: 5e-3,
                logging_steps: 1,
                save_steps: 4,
                ..TrainConfig::default()
            };
            fit(
                m,
                &data,
                None,
                &cfg,
                0,
                &CancelToken::new(),
                &mut |_| Ok(()),
            )
            .unwrap()
            .losses
        };
        let (one, split) = (run(&load(None, Vec::new())), run(&offload));
        assert_eq!(one.len(), 8);
        for ((s, a), (_, b)) in one.iter().zip(&split) {
            assert!(
                (a - b).abs() < 1e-4,
                "full {full} step {s}: one device {a}, offload {b}"
            );
        }
    }
}

/// AdamW (`cfg`) over `params` on the CPU and on the GPU, `steps` steps of the same gradients
/// (`grad(len)`, clipped at `clip`): after each, the parameters agree within `tol` and the moments
/// within `moments_tol`.
#[allow(clippy::too_many_arguments)]
fn adamw_agrees(
    params: &[(&str, Tensor)],
    cfg: qscript_runtime::train::optim::AdamWConfig,
    steps: usize,
    clip: f64,
    grad: &dyn Fn(usize) -> Tensor,
    tol: f32,
    moments_tol: f32,
    what: &str,
) {
    use qscript_runtime::train::flat::FlatParams;
    use qscript_runtime::train::optim::{AdamW, clip_factor};
    let named = |d: &Device| -> Vec<(String, Tensor)> {
        params
            .iter()
            .map(|(n, t)| ((*n).to_string(), t.to_device(d).unwrap()))
            .collect()
    };
    let (fc, vc) = FlatParams::new(&named(&Device::Cpu)).unwrap();
    let (fg, vg) = FlatParams::new(&named(&gpu())).unwrap();
    let (mut oc, mut og) = (
        AdamW::new(&fc, cfg.clone()).unwrap(),
        AdamW::new(&fg, cfg).unwrap(),
    );
    for step in 0..steps {
        let g = grad(fc.len());
        let (_, cc) = clip_factor(&g, clip).unwrap();
        let gg = g.to_device(&gpu()).unwrap();
        let (_, cg) = clip_factor(&gg, clip).unwrap();
        oc.step(&fc, &g, cc.as_ref(), 1e-2).unwrap();
        og.step(&fg, &gg, cg.as_ref(), 1e-2).unwrap();
        for (a, b) in vg.iter().zip(&vc) {
            assert!(rel(a, b) < tol, "{what} step {step}: {}", rel(a, b));
        }
        let ((gm, gv), (cm, cv)) = (og.moments().unwrap(), oc.moments().unwrap());
        let (dm, dv) = (rel(&gm, &cm), rel(&gv, &cv));
        assert!(
            dm < moments_tol && dv < moments_tol,
            "{what} step {step} moments: m {dm} v {dv}"
        );
    }
}

/// A random `shape` tensor of `dtype` on the CPU.
fn randn_as(std: f32, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The fused AdamW kernel against the reference ops: f32 LoRA-style and bf16 parameters, with
/// clipping and weight decay on part of the buffer.
#[test]
fn fused_adamw_matches_the_reference() {
    use qscript_runtime::train::optim::AdamWConfig;
    for dtype in [DType::F32, DType::BF16] {
        let params = [
            ("layer.weight", randn_as(1.0, &[37, 11], dtype)),
            ("layer.bias", randn_as(1.0, &[5], dtype)),
        ];
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let grad = |n: usize| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        adamw_agrees(
            &params,
            cfg,
            3,
            0.5,
            &grad,
            tol,
            1e-5,
            &format!("{dtype:?}"),
        );
    }
}

/// The 8-bit AdamW kernel (`optim: "adamw_8bit"`) against its reference op (checked against
/// bitsandbytes on the CPU): a tensor of 8-bit states with a partial last block, one under
/// `min_8bit_size` with f32 states, f32 and bf16 parameters, clipping and weight decay.
#[test]
fn eight_bit_adamw_kernel_matches_the_reference() {
    use qscript_runtime::train::optim::AdamWConfig;
    for dtype in [DType::F32, DType::BF16] {
        let params = [
            ("layer.weight", randn_as(0.5, &[50, 100], dtype)),
            ("layer.norm", randn_as(0.5, &[300], dtype)),
        ];
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            eight_bit: true,
            ..AdamWConfig::default()
        };
        // Gradients of growing size along the buffer, so blocks see different absmax.
        let grad = |n: usize| {
            let scale = Tensor::arange(0f32, n as f32, &Device::Cpu)
                .unwrap()
                .affine(2.0 / n as f64, 0.01)
                .unwrap();
            (Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap() * scale).unwrap()
        };
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        // A value on a code's edge may round the other way with the GPU's fused multiply-add.
        adamw_agrees(
            &params,
            cfg,
            4,
            5.0,
            &grad,
            tol,
            1e-3,
            &format!("{dtype:?}"),
        );
    }
}

/// The step's small fused kernels against the reference ops, on 16-byte vector paths and on
/// odd sizes that take the scalar ones: the in-place add and bias add, the row put-back of the
/// loss's `dHidden`, the gradient's sum of squares, and the cross-entropy rows (loss and
/// `dHidden`, rows with label -100 skipped) in f32 and bf16.
#[test]
fn small_fused_kernels_match_the_reference() {
    use qscript_runtime::nn::NoGrads;
    use qscript_runtime::nn::loss::causal_lm_loss;
    use qscript_runtime::nn::ops::{add_bias, add_into, move_rows, put_rows, take_rows};
    let cpu = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &cpu).unwrap();
    let on = |t: &Tensor, d: DType| t.to_device(&gpu()).unwrap().to_dtype(d).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        for &(rows, d) in &[(33usize, 64usize), (5, 37)] {
            let (a, b, bias) = (r(&[rows, d]), r(&[rows, d]), r(&[d]));
            let (ad, bd, biasd) = (
                a.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
                bias.to_dtype(dtype).unwrap(),
            );
            let want = (&ad + &bd).unwrap();
            let got = add_into(on(&a, dtype), &on(&b, dtype)).unwrap();
            assert!(rel(&got, &want) < tol, "add_into {dtype:?} {rows}x{d}");
            let want = ad.broadcast_add(&biasd).unwrap();
            let got = add_bias(on(&a, dtype), &on(&bias, dtype)).unwrap();
            assert!(rel(&got, &want) < tol, "add_bias {dtype:?} {rows}x{d}");
            let ids = Tensor::new(&[7u32, 0, 3], &cpu).unwrap();
            let x = r(&[3, d]).to_dtype(dtype).unwrap();
            let want = Tensor::zeros((9, d), dtype, &cpu)
                .unwrap()
                .index_add(&ids, &x, 0)
                .unwrap();
            let got = put_rows(
                Tensor::zeros((9, d), dtype, &gpu()).unwrap(),
                &ids.to_device(&gpu()).unwrap(),
                &x.to_device(&gpu()).unwrap(),
            )
            .unwrap();
            assert!(rel(&got, &want) < 1e-7, "put_rows {dtype:?} {d}");
            // Rows picked (with repeats) into a new tensor: index_select.
            let pick = Tensor::new(&[2u32, 0, 2, 1], &cpu).unwrap();
            let want = x.index_select(&pick, 0).unwrap();
            let got = take_rows(
                &x.to_device(&gpu()).unwrap(),
                &pick.to_device(&gpu()).unwrap(),
            )
            .unwrap();
            assert!(rel(&got, &want) < 1e-7, "take_rows {dtype:?} {d}");
            // Rows picked from `x` by `from` and added in place (a shared prompt's gradients
            // summed over its copies).
            let from = Tensor::new(&[2u32, 2, 0], &cpu).unwrap();
            let base = r(&[9, d]).to_dtype(dtype).unwrap();
            let want = base
                .index_add(&ids, &x.index_select(&from, 0).unwrap(), 0)
                .unwrap();
            let got = move_rows(
                base.to_device(&gpu()).unwrap(),
                &ids.to_device(&gpu()).unwrap(),
                &x.to_device(&gpu()).unwrap(),
                Some(&from.to_device(&gpu()).unwrap()),
                true,
            )
            .unwrap();
            assert!(rel(&got, &want) < tol, "move_rows {dtype:?} {d}");
        }
        for vocab in [256usize, 259] {
            let (n, h) = (13, 24);
            let (hidden, head) = (r(&[n, h]), (r(&[vocab, h]) * 0.5).unwrap());
            let targets: Vec<i64> = (0..n)
                .map(|i| {
                    if i % 4 == 1 {
                        -100
                    } else {
                        ((i * 37) % vocab) as i64
                    }
                })
                .collect();
            let run = |dev: &Device| {
                let (hd, wd) = (
                    hidden.to_device(dev).unwrap().to_dtype(dtype).unwrap(),
                    head.to_device(dev).unwrap().to_dtype(dtype).unwrap(),
                );
                let mut sink = NoGrads;
                causal_lm_loss(&hd, &wd, &targets, 9.0, Some(&mut sink)).unwrap()
            };
            let (c, g) = (run(&cpu), run(&gpu()));
            let (lc, lg) = (
                c.loss.to_scalar::<f32>().unwrap(),
                g.loss.to_device(&cpu).unwrap().to_scalar::<f32>().unwrap(),
            );
            assert!(
                (lc - lg).abs() < 1e-4 * lc.abs().max(1.0),
                "ce loss {dtype:?} V={vocab}: {lc} vs {lg}"
            );
            assert_eq!(c.count, g.count);
            let dt = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(
                rel(g.d_hidden.as_ref().unwrap(), c.d_hidden.as_ref().unwrap()) < dt,
                "ce dHidden {dtype:?} V={vocab}"
            );
        }
    }
    for n in [1usize << 20, 1001] {
        let g = r(&[n]);
        let want = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let (norm, _) =
            qscript_runtime::train::optim::clip_factor(&on(&g, DType::F32), 1.0).unwrap();
        let got = norm.to_device(&cpu).unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (got * got - want).abs() < 1e-4 * want,
            "sum of squares of {n}: {} vs {want}",
            got * got
        );
    }
}

/// A group of one rank over TCP (rank 0 listening on a free port).
fn group_of_one() -> qscript_runtime::dist::Group {
    use qscript_runtime::dist::{Group, World};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let world = World {
        rank: 0,
        size: 1,
        local_rank: 0,
        local_size: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    Group::connect(&world, std::time::Duration::from_secs(10)).unwrap()
}

/// NCCL with a world of one (all one GPU allows): it loads, forms a communicator over the TCP
/// group and sums ranges of a gradient-sized buffer in place on its own stream, after the
/// compute stream's work that wrote them (the sum of one rank is its own buffer), and a range
/// past the end is refused.
#[test]
fn nccl_with_a_world_of_one_sums_in_place() {
    use qscript_runtime::dist::nccl::Nccl;
    let group = group_of_one();
    let Device::Cuda(dev) = gpu() else {
        unreachable!()
    };
    let nccl = Nccl::connect(&group, &dev)
        .unwrap()
        .expect("NCCL was not found on the GPU machine");
    let m = Tensor::randn(0f32, 1.0, (1024, 1024), &gpu()).unwrap();
    // Written by a product still running when the sums are queued.
    let x = m.matmul(&m).unwrap().flatten_all().unwrap();
    for r in [0..1000, 1000..(1 << 19), (1 << 19)..(1 << 20)] {
        nccl.start_sum(&x, r).unwrap();
    }
    nccl.wait().unwrap();
    let want = m.matmul(&m).unwrap().flatten_all().unwrap();
    assert_eq!(x.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
    let err = nccl
        .start_sum(&x, 0..(1 << 20) + 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside a buffer"), "{err}");
}

/// Data parallel with NCCL in a world of one: the trainer sums each block's gradients on NCCL's
/// stream as the last backward leaves the block, the rest and the loss at the end; the losses are
/// those of the run without ranks, LoRA and full fine-tuning (also with ZeRO stage 1, whose
/// parameters come back by NCCL broadcasts, and stage 2, whose every pass reduces each block's
/// buffer into the rank's share and lets it go), with accumulation.
#[test]
fn a_world_of_one_over_nccl_trains_like_one_process() {
    let data = rows(16);
    for (full, zero) in [(false, 0), (true, 0), (true, 1), (false, 2), (true, 2)] {
        let run = |ranks: bool| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = TrainConfig {
                output_dir: dir.path().to_string_lossy().into_owned(),
                per_device_train_batch_size: 4,
                gradient_accumulation_steps: 2,
                max_steps: 6,
                learning_rate: 5e-3,
                logging_steps: 1,
                save_steps: 0,
                // Unmerged passes: the last one's backward starts the block sums.
                merge_micro_batches: Some(false),
                zero_stage: if ranks { zero } else { 0 },
                ..TrainConfig::default()
            };
            let group = ranks.then(|| std::sync::Arc::new(group_of_one()));
            qscript_runtime::dist::set_thread_group(group);
            let out = fit(
                &tiny_model("cuda:0", 3, full),
                &data,
                None,
                &cfg,
                0,
                &CancelToken::new(),
                &mut |_| Ok(()),
            )
            .unwrap()
            .losses;
            qscript_runtime::dist::set_thread_group(None);
            out
        };
        let (one, ranked) = (run(false), run(true));
        assert_eq!(one.len(), 6);
        for ((s, a), (_, b)) in one.iter().zip(&ranked) {
            assert!(
                (a - b).abs() < 1e-6,
                "full {full}, zero {zero}, step {s}: {a} vs {b}"
            );
        }
    }
}

/// The peer copy between GPUs (`device::to`), on two streams of the one GPU here: it waits on the
/// GPU for the work that wrote the source (a large product still running when the copy is
/// queued), and the source's memory is not reused before the copy has read it (the source is
/// dropped at once and the first stream goes on allocating and writing).
#[test]
fn peer_copies_wait_for_their_source_and_keep_it() {
    use candle_core::cuda_backend::CudaDevice;
    let a = gpu();
    let b = Device::Cuda(CudaDevice::new_with_stream(0).unwrap());
    let m = Tensor::randn(0f32, 1.0, (2048, 2048), &a).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let m = m.to_dtype(dtype).unwrap();
        let mut x = m.clone();
        for _ in 0..8 {
            x = x.matmul(&m).unwrap().affine(1e-2, 0.0).unwrap();
        }
        let moved = qscript_runtime::device::to(&x, &b).unwrap();
        let want = x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        drop(x);
        for i in 0..16 {
            let _ = Tensor::full(i as f32, (2048, 2048), &a).unwrap();
        }
        assert!(moved.device().same_device(&b));
        let got = moved
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, want, "{dtype:?}");
    }
    let ids = Tensor::new(&[3u32, 1, 4, 1, 5], &a).unwrap();
    let back = qscript_runtime::device::to(&ids, &b).unwrap();
    assert_eq!(back.to_vec1::<u32>().unwrap(), vec![3, 1, 4, 1, 5]);
}

/// Activation offload's copies are ordered on the GPU: a tensor parked while the work that
/// writes it is still queued, its device memory let go and overwritten at once, comes back
/// with its values; a parked tensor dropped unfetched (a failed step) frees nothing early.
#[test]
fn offloaded_tensors_come_back_whole() {
    use qscript_runtime::device::offload::{park, trim};
    let a = gpu();
    let m = Tensor::randn(0f32, 1.0, (2048, 2048), &a).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let m = m.to_dtype(dtype).unwrap();
        let mut x = m.clone();
        for _ in 0..8 {
            x = x.matmul(&m).unwrap().affine(1e-2, 0.0).unwrap();
        }
        let want = x.copy().unwrap();
        let mut parked = park(&x).unwrap();
        parked.release().unwrap();
        drop(x);
        for i in 0..16 {
            let _ = Tensor::full(i as f32, (2048, 2048), &a).unwrap();
        }
        let back = parked.fetch().unwrap().ready().unwrap();
        // Parked, never fetched: dropped with its copy out still queued.
        drop(park(&want).unwrap());
        let d = back
            .to_dtype(DType::F32)
            .unwrap()
            .sub(&want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{dtype:?}");
    }
    trim().unwrap();
}

/// `gradient_checkpointing: "offload"` gives plain checkpointing's loss and gradients on the GPU
/// (the same kernels on the same inputs, the inputs through host memory): bit for bit but for the
/// embedding's gradient, whose rows are summed by atomic adds in any order (1.2e-8 apart on an
/// H100); LoRA and full fine-tuning, dropout on.
#[test]
fn activation_offload_gives_the_checkpointed_gradients() {
    use qscript_runtime::train::Checkpointing;
    for full in [false, true] {
        let g = tiny_model("cuda:0", 6, full);
        let ex = rows(8);
        let refs: Vec<&Example> = ex.iter().collect();
        let b = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &gpu()).unwrap();
        let mask = AttnMask::right_padded(&b.lens);
        let run = |ckpt: Checkpointing| {
            gradients(
                &g,
                &b.input_ids,
                &mask,
                &b.labels_host,
                Some(dropout::Key::new(9)),
                ckpt,
            )
            .unwrap()
        };
        let (l1, g1) = run(Checkpointing::On);
        let (l2, g2) = run(Checkpointing::Offload);
        assert_eq!(l1, l2, "full {full}");
        for ((n, a), (_, b)) in g1.iter().zip(&g2) {
            let bound = if n.contains("embed_tokens") {
                1e-6
            } else {
                0.0
            };
            assert!(rel(b, a) <= bound, "full {full}, {n}: {}", rel(b, a));
        }
    }
    qscript_runtime::device::offload::trim().unwrap();
}

/// The tiled MLP on the GPU (tiles forced small) gives the untiled loss and gradients, with
/// checkpointing and offload.
#[test]
fn the_tiled_mlp_on_the_gpu_gives_the_untiled_gradients() {
    use qscript_runtime::model::block::with_mlp_tile_bytes;
    use qscript_runtime::train::Checkpointing;
    for full in [false, true] {
        let dir = save_tiny(3);
        let m = Model::load(
            dir.path(),
            &LoadOptions {
                dtype: "f32".into(),
                device: "cuda:0".into(),
                trainable: full,
                ..Default::default()
            },
        )
        .unwrap();
        let g = if full {
            m
        } else {
            let cfg = LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: Targets::Pattern("all-linear".into()),
                ..LoraConfig::default()
            };
            lora::attach(&m, &cfg, 7).unwrap()
        };
        let ex = rows(8);
        let refs: Vec<&Example> = ex.iter().collect();
        let b = qscript_runtime::data::batch::collate(&refs, 0, Some(8), &gpu()).unwrap();
        let mask = AttnMask::right_padded(&b.lens);
        for ckpt in [Checkpointing::On, Checkpointing::Offload] {
            let run = || gradients(&g, &b.input_ids, &mask, &b.labels_host, None, ckpt).unwrap();
            let (l1, g1) = run();
            // 128 intermediate features in f32: 16 rows a tile.
            let (l2, g2) = with_mlp_tile_bytes(128 * 4 * 16, run);
            assert!((l1 - l2).abs() < 1e-5, "full {full}: loss {l1} vs {l2}");
            for ((n, a), (_, b)) in g1.iter().zip(&g2) {
                assert!(
                    rel(b, a) < 1e-5,
                    "full {full}, {ckpt:?}, {n}: {}",
                    rel(b, a)
                );
            }
        }
    }
    qscript_runtime::device::offload::trim().unwrap();
}

/// Decoding's q/k/v (`nn::decode::projections`: one matrix-vector kernel with their biases)
/// equal the projections one by one on the CPU in f32, in bf16 and f16, for 1 to 4 rows, widths
/// of one pass of the kernel's loop and of several (the last partial), three projections of
/// different sizes, with and without an adapter; the kernel alone equals the reference too;
/// past 4 rows the same function takes cuBLAS. Then a bf16 model decoding token by token (the
/// kernel) gives the logits of its whole-sequence forward (cuBLAS).
/// Decoding's attention kernel (`nn::cuda::decode_attn`) against the composite path on the CPU
/// in f32, from the same rounded inputs: GQA and not, head sizes 64/128/256, a KV cache read as
/// a view of a larger buffer (the server's slots), a causal bound, key ranges with a start, and a
/// row that sees one key.
#[test]
fn decode_attention_matches_the_reference() {
    use qscript_runtime::nn::cuda::decode_attn;
    let cpu = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &cpu).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for &(d, heads, kv, b, cap) in &[
            (128usize, 28usize, 4usize, 1usize, 300usize),
            (64, 8, 8, 3, 64),
            (256, 4, 2, 2, 1000),
            (128, 12, 2, 5, 37),
        ] {
            let t = cap - 3;
            let round = |x: &Tensor| x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            // The cache: `[b + 1, kv, cap, d]` buffers read as the first b rows' first t keys.
            let (kbuf, vbuf) = (
                round(&r(&[b + 1, kv, cap, d])),
                round(&r(&[b + 1, kv, cap, d])),
            );
            // q as the projections lay it out, `[b, 1, heads, d]` seen as `[b, heads, 1, d]`.
            let q = round(&r(&[b, 1, heads, d])).transpose(1, 2).unwrap();
            let on = |x: &Tensor| x.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
            let view = |x: &Tensor| x.narrow(0, 0, b).unwrap().narrow(2, 0, t).unwrap();
            let (kg, vg) = (view(&on(&kbuf)), view(&on(&vbuf)));
            let (kc, vc) = (view(&kbuf), view(&vbuf));
            let qg = on(&q).transpose(1, 2).unwrap().contiguous().unwrap();
            let qg = qg.transpose(1, 2).unwrap();
            let ranges: Vec<(usize, usize)> = (0..b)
                .map(|i| match i % 3 {
                    0 => (0, t),
                    1 => (3, t / 2),
                    _ => (0, 1),
                })
                .collect();
            let masks = [
                AttnMask::causal(t - 1),
                AttnMask::causal(t / 2),
                AttnMask {
                    causal: false,
                    offset: 0,
                    key_ranges: Some(ranges),
                    segments: None,
                    shared: None,
                },
            ];
            for (i, mask) in masks.iter().enumerate() {
                let what = format!("{dtype:?} d {d} heads {heads}/{kv} b {b} t {t} mask {i}");
                assert!(decode_attn::applies(&qg, &kg, &vg, mask), "{what}");
                let got = attention(&qg, &kg, &vg, mask, None).unwrap();
                let want = attention(&q, &kc, &vc, mask, None).unwrap();
                assert_eq!(got.dims(), want.dims(), "{what}");
                let e = rel(&got, &want);
                assert!(e < tol, "{what}: {e}");
            }
        }
    }
}

#[test]
fn decode_projections_match_the_reference() {
    use qscript_runtime::nn::cuda::gemv;
    use qscript_runtime::nn::linear::LoraAdapter;
    use qscript_runtime::nn::{Linear, decode};
    let cpu = Device::Cpu;
    let r = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        // One row (the lean form, split K) with short, long and uneven rows; then 2 to 5 rows.
        let cases = [
            (4096usize, 1usize),
            (20008, 1),
            (200, 1),
            (1032, 2),
            (200, 3),
            (2056, 4),
            (64, 5),
        ];
        for &(k, rows) in &cases {
            let std = 1.0 / (k as f32).sqrt();
            // Even counts (two features a warp take them), none a multiple of 8 warps a block.
            let (n0, n1, n2) = (38usize, 20usize, 26usize);
            let x = r(&[rows, k], 1.0);
            let ws = [r(&[n0, k], std), r(&[n1, k], std), r(&[n2, k], std)];
            let bs = [r(&[n0], 0.5), r(&[n1], 0.5)];
            let lora = LoraAdapter::new(r(&[4, k], std), r(&[n1, 4], 0.5), 2.0, 0.0).unwrap();
            // On the GPU: q (bias), k (bias, adapter), v (neither).
            let mut lk = Linear::new(on(&ws[1]), Some(on(&bs[1])));
            lk.lora = Some(
                LoraAdapter::new(
                    lora.a.to_device(&gpu()).unwrap(),
                    lora.b.to_device(&gpu()).unwrap(),
                    2.0,
                    0.0,
                )
                .unwrap(),
            );
            let lin = [
                Linear::new(on(&ws[0]), Some(on(&bs[0]))),
                lk,
                Linear::new(on(&ws[2]), None),
            ];
            let xg = on(&x);
            let wsg: Vec<Tensor> = ws.iter().map(&on).collect();
            let taken = gemv::applies(&xg, &wsg.iter().collect::<Vec<_>>());
            assert_eq!(taken, rows <= gemv::MAX_ROWS, "{dtype:?} k {k} rows {rows}");
            let got = decode::projections(&xg, &[&lin[0], &lin[1], &lin[2]]).unwrap();
            // The reference in f32 from the same rounded inputs.
            let x32 = f32_of(&x);
            let mm = |w: &Tensor| x32.matmul(&f32_of(w).t().unwrap()).unwrap();
            let delta = x32
                .matmul(&lora.a.t().unwrap())
                .unwrap()
                .matmul(&lora.b.t().unwrap())
                .unwrap()
                .affine(2.0, 0.0)
                .unwrap();
            let want = [
                mm(&ws[0]).broadcast_add(&f32_of(&bs[0])).unwrap(),
                (mm(&ws[1]).broadcast_add(&f32_of(&bs[1])).unwrap() + delta).unwrap(),
                mm(&ws[2]),
            ];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.dims(), w.dims());
                assert!(
                    rel(g, w) < 1e-2,
                    "projection {i} {dtype:?} k {k} rows {rows}: {}",
                    rel(g, w)
                );
            }
            // The kernel alone (no adapter): what `projections` ran where it applies.
            if taken {
                let pairs = [
                    (&wsg[0], lin[0].bias.as_ref()),
                    (&wsg[1], lin[1].bias.as_ref()),
                    (&wsg[2], None),
                ];
                let base = [
                    want[0].clone(),
                    mm(&ws[1]).broadcast_add(&f32_of(&bs[1])).unwrap(),
                    want[2].clone(),
                ];
                // The lean form at one row: split K 1, 2 and 4 ways, one or two features a warp.
                let shapes: Vec<gemv::Lean> = if rows == 1 {
                    [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]
                        .iter()
                        .map(|&(splits, features)| gemv::Lean { splits, features })
                        .collect()
                } else {
                    Vec::new()
                };
                let forms = std::iter::once(gemv::Form::Measured)
                    .chain(shapes.iter().map(|&s| gemv::Form::Lean(s)));
                for form in forms {
                    let alone = gemv::many(&xg, &pairs, form, None).unwrap();
                    for (i, (g, w)) in alone.iter().zip(&base).enumerate() {
                        assert!(
                            rel(g, w) < 1e-2,
                            "kernel {i} {form:?} {dtype:?} k {k} rows {rows}"
                        );
                    }
                }
                // o/down onto the residual, gate/up through SwiGLU (the lean form).
                let res = r(&[rows, n0], 1.0);
                let want_res = (mm(&ws[0]) + f32_of(&res)).unwrap();
                let wu = r(&[n0, k], std);
                let g = mm(&ws[0]);
                let silu = (&g / (g.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
                let want_sw = (silu * mm(&wu)).unwrap();
                // A norm folded into the product: exactly the norm's kernel, then the product.
                let gn = on(&r(&[k], 1.0));
                let norm = Some(gemv::Norm {
                    weight: &gn,
                    eps: 1e-6,
                });
                let hn = qscript_runtime::nn::ops::rms_norm(&xg, &gn, 1e-6).unwrap();
                let exact = |a: &Tensor, b: &Tensor| {
                    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap();
                    d.to_scalar::<f32>().unwrap() == 0.0
                };
                for &sh in &shapes {
                    let what = format!("{dtype:?} k {k} {sh:?}");
                    let got = gemv::residual(&xg, &wsg[0], &on(&res), sh).unwrap();
                    let e = rel(&got, &want_res);
                    assert!(e < 1e-2, "residual {what}: {e}");
                    let folded = gemv::many(&xg, &pairs, gemv::Form::Lean(sh), norm).unwrap();
                    let apart = gemv::many(&hn, &pairs, gemv::Form::Lean(sh), None).unwrap();
                    for (i, (a, b)) in folded.iter().zip(&apart).enumerate() {
                        assert!(exact(a, b), "norm folded into projection {i} {what}");
                    }
                    if sh.features == 1 {
                        let got = gemv::swiglu(&xg, &wsg[0], &on(&wu), sh.splits, None).unwrap();
                        let e = rel(&got, &want_sw);
                        assert!(e < 2e-2, "swiglu {what}: {e}");
                        let folded = gemv::swiglu(&xg, &wsg[0], &on(&wu), sh.splits, norm).unwrap();
                        let apart = gemv::swiglu(&hn, &wsg[0], &on(&wu), sh.splits, None).unwrap();
                        assert!(exact(&folded, &apart), "norm folded into swiglu {what}");
                    }
                }
                // Two features a warp need an even count.
                if rows == 1 {
                    let odd = on(&r(&[37, k], std));
                    let pair = gemv::Lean {
                        splits: 1,
                        features: 2,
                    };
                    assert!(
                        gemv::many(&xg, &[(&odd, None)], gemv::Form::Lean(pair), None).is_err()
                    );
                }
                // More than one row is the measured form's alone.
                if rows > 1 {
                    let one = gemv::Lean::ONE;
                    assert!(gemv::residual(&xg, &wsg[0], &on(&res), one).is_err());
                }
            }
        }
    }
    // A tiny bf16 model: decoding token by token equals the whole sequence's forward.
    let dir = save_tiny(2);
    let opts = LoadOptions {
        dtype: "bf16".into(),
        device: "cuda".into(),
        ..Default::default()
    };
    let m = Model::load(dir.path(), &opts).unwrap();
    // 12 tokens: the whole forward has more rows than the kernels take.
    let ids: Vec<u32> = vec![3, 17, 42, 99, 5, 64, 11, 23, 8, 1, 30, 77];
    let whole = m
        .decoder
        .forward(
            &Tensor::new(ids.as_slice(), &gpu())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            None,
        )
        .unwrap();
    // Under each setting: q/k/v alone through the kernel, every group through one, q/k/v two
    // features a warp, and everything (two features a warp, the norms folded).
    let settings = [
        decode::Kernels::QKV,
        decode::Kernels::ALL,
        decode::Kernels::parse("pairs"),
        decode::Kernels::FUSED,
    ];
    for setting in settings {
        decode::set_kernels(setting);
        let mut cache = qscript_runtime::model::KvCache::new(m.config().num_hidden_layers);
        for (t, &id) in ids.iter().enumerate() {
            let step = m
                .decoder
                .forward(
                    &Tensor::new(&[[id]], &gpu()).unwrap(),
                    None,
                    Some(&mut cache),
                )
                .unwrap();
            let want = whole.narrow(1, t, 1).unwrap();
            assert!(
                rel(&step, &want) < 2e-2,
                "decode step {t} ({setting:?}): {}",
                rel(&step, &want)
            );
        }
    }
    decode::set_kernels(decode::Kernels::FUSED);
}

/// Decode steps recorded as CUDA graphs give the tokens of the steps run as they are: greedy
/// completions of five concurrent requests over four slots (spans of slots that change as rows
/// join and leave, idle rows among them), graphs off and then on; and steps were replayed.
#[test]
fn decode_graphs_give_the_eager_tokens() {
    use qscript_runtime::serve::engine::ServedModel;
    use qscript_runtime::serve::{ServeOptions, Server, graph};
    use qscript_runtime::tokenizer::Tokenizer;
    // Head size 128: decoding's attention kernel applies, as on a real model.
    let model = tiny(&TinyConfig {
        hidden: 256,
        heads: 2,
        kv_heads: 1,
        layers: 2,
        intermediate: 512,
        seed: 5,
        embed_std: 1.0,
        dtype: "bf16".into(),
        device: "cuda".into(),
        ..TinyConfig::default()
    })
    .unwrap();
    let run = |graphs: bool| -> Vec<String> {
        graph::set_enabled(graphs);
        let opts = ServeOptions {
            port: 0,
            max_seqs: 4,
            max_len: Some(256),
            ..ServeOptions::default()
        };
        let served = vec![std::sync::Arc::new(ServedModel::new("tiny", model.clone()))];
        let server = Server::start(
            served,
            std::sync::Arc::new(Tokenizer::builtin().unwrap()),
            &opts,
        )
        .unwrap();
        let url = format!("http://{}/v1/completions", server.addr);
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let body = serde_json::json!({"model": "tiny", "temperature": 0,
                        "prompt": format!("prompt {i}: {}", "xy".repeat(i)),
                        "max_tokens": 16 + 3 * i});
                    let mut r = ureq::post(&url).send_json(&body).unwrap();
                    let v: serde_json::Value = r.body_mut().read_json().unwrap();
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    // cuBLAS and the q/k/v kernel (the default), every group through the kernels, and with two
    // features a warp and the norms folded.
    use qscript_runtime::nn::decode::{Kernels, kernels, set_kernels};
    let was = kernels();
    for k in [Kernels::QKV, Kernels::ALL, Kernels::FUSED] {
        set_kernels(k);
        let eager = run(false);
        let before = graph::replays();
        let graphed = run(true);
        graph::set_enabled(false);
        assert!(
            graph::replays() > before,
            "{k:?}: no decode step was replayed"
        );
        assert_eq!(graphed, eager, "{k:?}");
        assert!(
            eager.iter().any(|t| !t.is_empty()),
            "{k:?}: every completion was empty"
        );
    }
    // RoPE and the cache write in one launch give the tokens of RoPE and the scatter apart (the
    // same rounding, bit for bit).
    set_kernels(Kernels {
        rope_append: false,
        ..Kernels::FUSED
    });
    let apart = run(false);
    set_kernels(Kernels::FUSED);
    assert_eq!(run(false), apart, "rope_append");
    set_kernels(was);
}
