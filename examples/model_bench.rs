//! Embedding the runtime from Rust, and the model measurements of the GPU machine:
//!
//! ```sh
//! # bf16 logits against a reference file written by scripts/gpu_reference.py
//! model_bench logits DIR REF.safetensors
//! # load time, then greedy decoding tokens/s at batch 1 (after one warm-up run)
//! model_bench speed DIR [NEW_TOKENS] [PROMPT_LEN]
//! # training throughput on fixed-length random rows, the shape of ../shared/bench/hf_peft_lora.py
//! model_bench train DIR [--batch 8] [--seq 512] [--steps 10] [--warmup 3] [--ckpt] [--full]
//!     [--offload]   # checkpointing with the block inputs in host memory
//!     [--auto-ckpt] # `gradient_checkpointing: "auto"`: only the blocks the GPU needs recomputed
//!     [--accum 1] [--device-map auto] [--no-pipeline]   # under torchrun: data parallel
//!     [--dpo]   # `--batch` preference pairs of two `--seq` rows (prompt seq/2 + answer), DPO
//!               # sigmoid beta 0.1 with the reference pass over the timed steps' pairs timed too
//! ```
//! Prints one JSON line per measurement. Build with `--features cuda` for the GPU.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use qscript_runtime::cancel::CancelToken;
use qscript_runtime::model::{GenerateOptions, LoadOptions, Model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = LoadOptions {
        dtype: "bf16".into(),
        device: "auto".into(),
        trainable: false,
        ..Default::default()
    };
    match args.first().map(String::as_str) {
        Some("logits") => logits(Path::new(&args[1]), Path::new(&args[2]), &opts),
        Some("speed") => {
            let new_tokens = args.get(2).map_or(Ok(128), |s| s.parse())?;
            let prompt_len = args.get(3).map_or(Ok(32), |s| s.parse())?;
            speed(Path::new(&args[1]), new_tokens, prompt_len, &opts)
        }
        Some("export") => export(
            Path::new(&args[1]),
            Path::new(&args[2]),
            args.iter().any(|a| a == "--4bit"),
        ),
        Some("train") => train(Path::new(&args[1]), &args[2..]),
        Some("decode-ops") => decode_ops(),
        _ => anyhow::bail!(
            "usage: model_bench logits DIR REF | speed DIR [NEW] [PROMPT] | export BASE OUT [--4bit] | train DIR [OPTIONS] | decode-ops"
        ),
    }
}

fn sync(d: &Device) -> anyhow::Result<()> {
    d.synchronize()?;
    Ok(())
}

fn logits(dir: &Path, reference: &Path, opts: &LoadOptions) -> anyhow::Result<()> {
    let m = Model::load(dir, opts)?;
    let dev = m.decoder.device().clone();
    let r = candle_core::safetensors::load(reference, &Device::Cpu)?;
    let ids = r["input_ids"].to_dtype(DType::U32)?.to_device(&dev)?;
    let want = r["logits"].to_dtype(DType::F32)?;
    let got = m
        .decoder
        .forward(&ids, None, None)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let diff = got.sub(&want)?.abs()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let max_abs = diff.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mean_abs = diff.mean_all()?.to_scalar::<f32>()?;
    // Also the fraction of positions whose argmax agrees.
    let (a, b) = (
        got.argmax(2)?.flatten_all()?.to_vec1::<u32>()?,
        want.argmax(2)?.flatten_all()?.to_vec1::<u32>()?,
    );
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    let ref_vs_f32 = r.get("logits_f32").map(|f| {
        let d = want
            .sub(&f.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        d.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    });
    println!(
        "{}",
        serde_json::json!({"system": "qscript", "check": "bf16 logits vs transformers bf16", "model": m.to_string(),
            "max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "mean_abs_diff": mean_abs, "logit_scale": scale,
            "argmax_agreement": agree, "hf_bf16_vs_hf_f32_max_abs": ref_vs_f32,
            "first": got.i((0, 0, 0..4))?.to_vec1::<f32>()?})
    );
    Ok(())
}

/// Writes what `scripts/verify_exports.py` loads with PEFT and transformers: a LoRA adapter with
/// random B on the checkpoint `base` (with `four_bit`, on its NF4 quantization with double
/// quantization: QLoRA), the merged model, qscript's logits for both and its greedy continuation
/// on the adapter.
fn export(base: &Path, out: &Path, four_bit: bool) -> anyhow::Result<()> {
    use qscript_runtime::lora::{self, LoraConfig, Targets};
    let cpu = LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable: false,
        quant: four_bit.then_some(qscript_runtime::quant::Quant4Config {
            quant_type: qscript_runtime::quant::QuantType::Nf4,
            double_quant: true,
        }),
        ..Default::default()
    };
    let m = Model::load(base, &cpu)?;
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Targets::Pattern("all-linear".into()),
        ..LoraConfig::default()
    };
    let mut peft = lora::attach(&m, &cfg, 3)?;
    qscript_runtime::model::params::visit_adapters_mut(&mut peft.decoder, &mut |name, t| {
        if name.ends_with("lora_B.weight") {
            *t = t.randn_like(0.0, 0.05)?;
        }
        Ok(())
    })?;
    lora::save_adapter(&peft, &out.join("adapter"))?;
    let merged = lora::merge(&peft)?;
    merged.save(&out.join("merged"))?;
    let vocab = m.config().vocab_size as u32;
    // A sentence where the base has a tokenizer (greedy text of a real model reads as text),
    // else fixed ids.
    let prompt: Vec<u32> =
        match qscript_runtime::tokenizer::Tokenizer::load(base, &CancelToken::new()) {
            Ok(tok) => tok.encode("Once upon a time, there was a little girl named", true)?,
            Err(_) => [3u32, 17, 42, 99, 5, 64, 11].map(|i| i % vocab).to_vec(),
        };
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut t = std::collections::HashMap::new();
    t.insert("input_ids".to_string(), ids.to_dtype(DType::I64)?);
    t.insert(
        "adapter_logits".to_string(),
        peft.decoder.forward(&ids, None, None)?,
    );
    t.insert(
        "merged_logits".to_string(),
        merged.decoder.forward(&ids, None, None)?,
    );
    // Greedy text on the adapter: 24 new tokens with no stop token, for PEFT's to equal.
    peft.generation.eos_token_id = None;
    peft.decoder.cfg.eos_token_id = None;
    let g = GenerateOptions {
        max_new_tokens: 24,
        ..Default::default()
    };
    let greedy = peft.generate(&prompt, &g, &CancelToken::new(), &mut |_| Ok(()))?;
    t.insert(
        "greedy_ids".to_string(),
        Tensor::new(greedy.as_slice(), &Device::Cpu)?.to_dtype(DType::I64)?,
    );
    candle_core::safetensors::save(&t, out.join("qscript_logits.safetensors"))?;
    println!("wrote {}", out.display());
    Ok(())
}

fn speed(
    dir: &Path,
    new_tokens: usize,
    prompt_len: usize,
    opts: &LoadOptions,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let m = Model::load(dir, opts)?;
    let dev = m.decoder.device().clone();
    sync(&dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 100 + (i * 37) % 900)
        .collect();
    let g = GenerateOptions {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let mut m = m;
    m.generation.eos_token_id = None;
    m.decoder.cfg.eos_token_id = None;
    let cancel = CancelToken::new();
    m.generate(&prompt, &g, &cancel, &mut |_| Ok(()))?;
    sync(&dev)?;
    let t1 = Instant::now();
    let out = m.generate(&prompt, &g, &cancel, &mut |_| Ok(()))?;
    sync(&dev)?;
    let gen_s = t1.elapsed().as_secs_f64();
    let _ = Tensor::zeros(1, DType::F32, &dev)?;
    println!(
        "{}",
        serde_json::json!({"system": "qscript", "dir": dir, "model": m.to_string(), "load_s": (load_s * 100.0).round() / 100.0,
            "decode_tok_per_s": ((out.len() as f64 / gen_s) * 10.0).round() / 10.0, "new_tokens": out.len()})
    );
    Ok(())
}

/// Trains like `hf_peft_lora.py` does (LoRA r8 alpha 32 dropout 0.1 on q/k/v/o, or `--full`;
/// `--rank R`, `--all-linear`, and `--4bit` for QLoRA as `benches/hf_qlora.py` trains;
/// AdamW lr 1e-4, weight decay 0.01, clipping at 0.3) on random rows of exactly `--seq` tokens
/// with labels = ids, and prints tokens/s, step time, MFU (the peer's formula) and the loss.
fn train(dir: &Path, args: &[String]) -> anyhow::Result<()> {
    use qscript_runtime::data::sft::Example;
    use qscript_runtime::lora::{self, LoraConfig, Targets};
    use qscript_runtime::train::{TrainConfig, Trainer};
    use rand::{Rng, SeedableRng};
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let (batch, seq) = (value("--batch", 8)?, value("--seq", 512)?);
    let (steps, warmup) = (value("--steps", 10)?, value("--warmup", 3)?);
    let (offload, auto_ckpt) = (flag("--offload"), flag("--auto-ckpt"));
    let (ckpt, full, dpo) = (
        flag("--ckpt") || offload || auto_ckpt,
        flag("--full"),
        flag("--dpo"),
    );
    let accum = value("--accum", 1)?;
    let device_map = match args.iter().position(|a| a == "--device-map") {
        Some(i) => Some(qscript_runtime::plan::DeviceMap::from_name(
            args.get(i + 1).map_or("", String::as_str),
        )?),
        None => None,
    };
    // `--4bit`: QLoRA's base (nf4, double quantization, bf16 compute), as benches/hf_qlora.py.
    let quant = flag("--4bit").then_some(qscript_runtime::quant::Quant4Config {
        quant_type: qscript_runtime::quant::QuantType::Nf4,
        double_quant: true,
    });
    let opts = LoadOptions {
        dtype: "bf16".into(),
        device: "auto".into(),
        trainable: full,
        device_map,
        quant,
        ..Default::default()
    };
    let load_started = std::time::Instant::now();
    let base = Model::load(dir, &opts)?;
    let load_secs = load_started.elapsed().as_secs_f64();
    let model = if full {
        base
    } else {
        let cfg = LoraConfig {
            r: value("--rank", 8)?,
            lora_alpha: 32.0,
            // TRL's DPOTrainer turns dropout off (`disable_dropout`).
            lora_dropout: if dpo { 0.0 } else { 0.1 },
            // `--all-linear`: every linear layer of the blocks (QLoRA's usual targets).
            target_modules: if flag("--all-linear") {
                Targets::Pattern("all-linear".into())
            } else {
                Targets::Names(
                    ["q_proj", "k_proj", "v_proj", "o_proj"]
                        .map(String::from)
                        .to_vec(),
                )
            },
            ..LoraConfig::default()
        };
        lora::attach(&base, &cfg, 0)?
    };
    let c = model.config().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    // Under data parallel (torchrun) each rank takes `batch` of every micro-batch.
    let ranks = qscript_runtime::dist::planned_size();
    let mut random = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..c.vocab_size as u32))
            .collect()
    };
    let per_epoch = 4 * batch * accum * ranks;
    let rows: Vec<Example> = if dpo {
        // Each pair: a prompt of seq/2 tokens shared by two answers of seq - seq/2.
        let prompt_len = seq / 2;
        (0..(warmup + steps) * batch * accum * ranks)
            .map(|_| {
                let prompt = random(prompt_len);
                let row = |answer: Vec<u32>| -> (Vec<u32>, Vec<i64>) {
                    let ids: Vec<u32> = prompt.iter().copied().chain(answer).collect();
                    let labels = ids
                        .iter()
                        .enumerate()
                        .map(|(k, &t)| if k < prompt_len { -100 } else { i64::from(t) })
                        .collect();
                    (ids, labels)
                };
                let (input_ids, labels) = row(random(seq - prompt_len));
                let (second_ids, second_labels) = row(random(seq - prompt_len));
                Example {
                    input_ids,
                    labels,
                    pref: Some(Box::new(qscript_runtime::data::example::Pref {
                        prompt_len,
                        second_ids,
                        second_labels,
                        desirable: None,
                        ref_logps: None,
                    })),
                    ..Example::default()
                }
            })
            .collect()
    } else {
        (0..per_epoch)
            .map(|_| {
                let ids = random(seq);
                let labels = ids.iter().map(|&i| i64::from(i)).collect();
                Example::new(ids, labels)
            })
            .collect()
    };
    let out = tempfile::tempdir()?;
    let cfg = TrainConfig {
        output_dir: out.path().to_string_lossy().into_owned(),
        per_device_train_batch_size: batch,
        gradient_accumulation_steps: accum,
        pipeline: !flag("--no-pipeline"),
        max_steps: (warmup + steps) as i64,
        learning_rate: 1e-4,
        // the peer steps a plain torch AdamW: no schedule
        lr_scheduler_type: "constant".into(),
        weight_decay: 0.01,
        max_grad_norm: 0.3,
        logging_steps: 1_000_000,
        save_steps: 0,
        gradient_checkpointing: if offload {
            qscript_runtime::train::Checkpointing::Offload
        } else if auto_ckpt {
            qscript_runtime::train::Checkpointing::Auto
        } else {
            ckpt.into()
        },
        ..TrainConfig::default()
    };
    // DPO: the reference pass over the pairs of the timed steps is timed with them (TRL without
    // `precompute_ref_log_probs` runs the reference forward inside each step).
    let mut rows = rows;
    let mut ref_secs = 0.0;
    let mut t = if dpo {
        use qscript_runtime::train::preference::{PrefConfig, Preference, reference_logps};
        let timed = warmup * batch * accum * ranks;
        let (early, later) = rows.split_at_mut(timed);
        let cancel = qscript_runtime::cancel::CancelToken::new();
        reference_logps(&model, early, batch, 0, &cancel)?;
        sync(model.decoder.device())?;
        let t0 = Instant::now();
        reference_logps(&model, later, batch, 0, &cancel)?;
        sync(model.decoder.device())?;
        ref_secs = t0.elapsed().as_secs_f64();
        let objective = Preference::new(PrefConfig::default(), false)?;
        let collective = qscript_runtime::train::collective::from_env(&model)?;
        Trainer::start(
            &model,
            qscript_runtime::train::plan::RunData::new(std::sync::Arc::new(rows), None),
            &cfg,
            0,
            collective,
            std::sync::Arc::new(objective),
            qscript_runtime::train::Mode::Train,
        )?
    } else {
        Trainer::new(
            &model,
            std::sync::Arc::new(std::mem::take(&mut rows)),
            None,
            &cfg,
            0,
        )?
    };
    // The plan's estimate of the memory pool's peak (without the CUDA runtime's share, which
    // the pool does not hold), beside the measured one.
    let est = &t.plan().memory;
    let estimate = (est.total() - est.runtime) as f64 / (1u64 << 30) as f64;
    // The share of blocks recomputed in backward (`"auto"` as the plan resolved it).
    let layers = c.num_hidden_layers;
    let resolved = t
        .plan()
        .fitted
        .as_ref()
        .map_or(cfg.checkpointing(), |(f, _)| f.checkpointing());
    let recomputed = (0..layers)
        .filter(|&l| resolved.recomputes(l, layers))
        .count() as f64
        / layers.max(1) as f64;
    let dev = model.decoder.device().clone();
    // Every device the model lies on (one per stage), each waited for around the timed steps.
    let stages = qscript_runtime::train::engine::stages(&model, None);
    let devices: Vec<Device> = stages
        .iter()
        .map(|r| model.decoder.blocks[r.start].device().clone())
        .collect();
    let sync_all = || -> anyhow::Result<()> {
        sync(&dev)?;
        devices.iter().try_for_each(sync)
    };
    let mut windows = Vec::new();
    let mut run = |t: &mut Trainer, n: usize| -> anyhow::Result<f64> {
        for _ in 0..n {
            if windows.is_empty() {
                windows = t.windows();
                windows.reverse();
            }
            let w = windows.pop().ok_or_else(|| anyhow::anyhow!("no batches"))?;
            t.step(&w)?;
        }
        Ok(t.read_step()?.0)
    };
    run(&mut t, warmup)?;
    sync_all()?;
    let _ = qscript_runtime::profile::report();
    qscript_runtime::device::trace::clear();
    let t0 = Instant::now();
    let loss = run(&mut t, steps)?;
    sync_all()?;
    let dt = (t0.elapsed().as_secs_f64() + ref_secs) / steps as f64;
    let profile = qscript_runtime::profile::report();
    if !profile.is_empty() {
        eprintln!("profile over {steps} steps (synchronized spans):\n{profile}");
    }
    // `QSCRIPT_TRACE=FILE`: the timed steps' GPU timeline (blocks, offload's copies).
    if let Some(summary) = qscript_runtime::device::trace::finish()? {
        eprintln!("trace over {steps} steps: {summary}\n{}", summary.table());
    }
    // Tokens of one optimizer step over every rank (a pair is two rows).
    let tokens = (batch * seq * accum * ranks * if dpo { 2 } else { 1 }) as f64;
    let n_params = model.decoder.num_params() as f64;
    let (v, h) = (c.vocab_size as f64, c.hidden_size as f64);
    let n_nonembed = n_params - v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
    let n_matmul = n_nonembed + v * h;
    let lin = (2.0 + recomputed + if full { 1.0 } else { 0.0 } + if dpo { 1.0 } else { 0.0 })
        * 2.0
        * n_matmul;
    let attn_fwd = c.num_hidden_layers as f64 * 4.0 * seq as f64 * h / 2.0;
    let attn = attn_fwd * (3.0 + recomputed);
    // What runs: a pair's prompt goes through the model once (one row: prompt, both answers).
    let computed = if dpo {
        (batch * (2 * seq - seq / 2) * accum * ranks) as f64
    } else {
        tokens
    };
    let flops = computed * (lin + attn);
    let gpus = (ranks * devices.len().max(1)) as f64;
    if qscript_runtime::dist::rank() != 0 {
        return Ok(());
    }
    let mem =
        qscript_runtime::device::memory(&dev).map(|(used, _)| qscript_runtime::device::gib(used));
    let peak = qscript_runtime::device::pool(&dev).map(|p| qscript_runtime::device::gib(p.peak));
    println!(
        "{}",
        serde_json::json!({"system": if dpo { "qscript-dpo" } else if full { "qscript-full" } else if quant.is_some() { "qscript-qlora" } else { "qscript-lora" }, "model": model.to_string(),
            "load_s": (load_secs * 100.0).round() / 100.0,
            "ref_pass_ms_per_step": (ref_secs / steps as f64 * 1e5).round() / 100.0,
            "seq": seq, "batch": batch, "accum": accum, "ranks": ranks,
            "pipeline": cfg.pipeline && devices.len() > 1, "grad_ckpt": ckpt, "offload": offload, "recomputed_share": recomputed, "step_ms": (dt * 1e5).round() / 100.0,
            "tokens_per_s": (tokens / dt * 10.0).round() / 10.0, "mfu": ((flops / dt / (989e12 * gpus)) * 1e4).round() / 1e4,
            "loss": loss, "device_used_gib_at_end": mem, "pool_peak_gib": peak,
            "pool_estimate_gib": (estimate * 100.0).round() / 100.0})
    );
    Ok(())
}

/// Decoding's projection groups (`nn::decode`: q/k/v with their biases, o and down onto the
/// residual, gate/up through SwiGLU) on Qwen2.5-7B's shapes in bf16 on the GPU, timed as the
/// matrix-vector kernels run them (each form) and one by one (cuBLAS, then the epilogue's
/// kernel): microseconds a call and the weights' bytes a second; then a block (its norms and four groups) as
/// `nn::decode` takes it under each `Kernels` setting.
#[cfg(not(feature = "cuda"))]
fn decode_ops() -> anyhow::Result<()> {
    anyhow::bail!("decode-ops times CUDA kernels: build with --features cuda")
}

/// See the CPU build's `decode_ops`.
#[cfg(feature = "cuda")]
fn decode_ops() -> anyhow::Result<()> {
    use qscript_runtime::nn::cuda::gemv::{self, Form, Lean, Norm};
    use qscript_runtime::nn::ops::{add_into, rms_norm, swiglu};
    use qscript_runtime::nn::{Linear, decode};
    let dev = qscript_runtime::device::cuda(0)?;
    let (h, kv, inter) = (3584usize, 512usize, 18944usize);
    let w = |o: usize, i: usize| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, (o, i), &dev)?.to_dtype(DType::BF16)?)
    };
    let bias = |o: usize| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, o, &dev)?.to_dtype(DType::BF16)?)
    };
    let q = Linear::new(w(h, h)?, Some(bias(h)?));
    let k = Linear::new(w(kv, h)?, Some(bias(kv)?));
    let v = Linear::new(w(kv, h)?, Some(bias(kv)?));
    let o = Linear::new(w(h, h)?, None);
    let gate = Linear::new(w(inter, h)?, None);
    let up = Linear::new(w(inter, h)?, None);
    let down = Linear::new(w(h, inter)?, None);
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
        for _ in 0..20 {
            f()?;
        }
        sync(&dev)?;
        let t = Instant::now();
        let n = 200u32;
        for _ in 0..n {
            f()?;
        }
        sync(&dev)?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    };
    let dense = |l: &Linear| -> anyhow::Result<Tensor> {
        l.weight
            .as_dense()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("a dense weight"))
    };
    let (wq, wk, wv) = (dense(&q)?, dense(&k)?, dense(&v)?);
    let (wo, wg, wu, wd) = (dense(&o)?, dense(&gate)?, dense(&up)?, dense(&down)?);
    let vocab = 152_064usize;
    let head = Linear::new(w(vocab, h)?, None);
    let wh = dense(&head)?;
    // Each group: the kernel(s) against cuBLAS one by one with the separate epilogue kernels.
    for rows in [1usize, 4] {
        let x = Tensor::randn(0f32, 1.0, (rows, h), &dev)?.to_dtype(DType::BF16)?;
        let xi = Tensor::randn(0f32, 1.0, (rows, inter), &dev)?.to_dtype(DType::BF16)?;
        let res = Tensor::randn(0f32, 1.0, (rows, h), &dev)?.to_dtype(DType::BF16)?;
        let qkv = [
            (&wq, q.bias.as_ref()),
            (&wk, k.bias.as_ref()),
            (&wv, v.bias.as_ref()),
        ];
        // (group, weight elements, (how it ran, microseconds a call))
        type Case<'a> = (&'a str, usize, Vec<(String, f64)>);
        // The lean form (one row only): split K 1, 2 and 4 ways, one or two features a warp.
        let shapes: Vec<Lean> = if rows == 1 {
            [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]
                .iter()
                .map(|&(splits, features)| Lean { splits, features })
                .collect()
        } else {
            Vec::new()
        };
        let each = |f: &dyn Fn(Lean) -> candle_core::Result<Tensor>,
                    pairs: bool|
         -> anyhow::Result<Vec<(String, f64)>> {
            shapes
                .iter()
                .filter(|sh| pairs || sh.features == 1)
                .map(|&sh| {
                    Ok((
                        format!("lean s{} f{}", sh.splits, sh.features),
                        time(&|| f(sh))?,
                    ))
                })
                .collect()
        };
        let with = |mut v: Vec<(String, f64)>, cublas: f64| {
            v.push(("one by one".to_string(), cublas));
            v
        };
        let gn = Tensor::randn(0f32, 1.0, h, &dev)?.to_dtype(DType::BF16)?;
        let norm = Some(Norm {
            weight: &gn,
            eps: 1e-6,
        });
        let mut qkv_runs = vec![(
            "measured form".to_string(),
            time(&|| Ok(gemv::many(&x, &qkv, Form::Measured, None)?.remove(0)))?,
        )];
        qkv_runs.extend(each(
            &|sh| Ok(gemv::many(&x, &qkv, Form::Lean(sh), None)?.remove(0)),
            true,
        )?);
        qkv_runs.extend(
            each(
                &|sh| Ok(gemv::many(&x, &qkv, Form::Lean(sh), norm)?.remove(0)),
                true,
            )?
            .into_iter()
            .map(|(n, us)| (format!("{n} + norm"), us)),
        );
        let mut gu_runs = each(&|sh| gemv::swiglu(&x, &wg, &wu, sh.splits, None), false)?;
        gu_runs.extend(
            each(&|sh| gemv::swiglu(&x, &wg, &wu, sh.splits, norm), false)?
                .into_iter()
                .map(|(n, us)| (format!("{n} + norm"), us)),
        );
        let cases: Vec<Case> = vec![
            (
                "rms_norm",
                h,
                vec![("kernel".to_string(), time(&|| rms_norm(&x, &gn, 1e-6))?)],
            ),
            (
                "q/k/v + bias",
                (h + 2 * kv) * h,
                with(
                    qkv_runs,
                    time(&|| {
                        let _ = (k.forward(&x)?, v.forward(&x)?);
                        q.forward(&x)
                    })?,
                ),
            ),
            (
                "o + residual",
                h * h,
                with(
                    each(&|sh| gemv::residual(&x, &wo, &res, sh), true)?,
                    time(&|| add_into(o.forward(&x)?, &res))?,
                ),
            ),
            (
                "gate/up + SwiGLU",
                2 * inter * h,
                with(
                    gu_runs,
                    time(&|| swiglu(&gate.forward(&x)?, &up.forward(&x)?))?,
                ),
            ),
            (
                "down + residual",
                inter * h,
                with(
                    each(&|sh| gemv::residual(&xi, &wd, &res, sh), true)?,
                    time(&|| add_into(down.forward(&xi)?, &res))?,
                ),
            ),
            (
                "LM head",
                vocab * h,
                with(
                    each(
                        &|sh| Ok(gemv::many(&x, &[(&wh, None)], Form::Lean(sh), None)?.remove(0)),
                        true,
                    )?,
                    time(&|| head.forward(&x))?,
                ),
            ),
        ];
        for (name, elems, runs) in cases {
            let gbs = |us: f64| ((elems * 2) as f64 / us / 1e3).round();
            let runs: serde_json::Map<String, serde_json::Value> = runs
                .into_iter()
                .map(|(form, us)| {
                    (
                        form,
                        serde_json::json!({"us": (us * 10.0).round() / 10.0, "gb_s": gbs(us)}),
                    )
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"op": name, "rows": rows, "runs": runs})
            );
        }
    }
    // What `nn::decode` takes for a block (its two norms and its projections) under each setting.
    let settings = [
        ("qkv", decode::Kernels::QKV),
        ("all", decode::Kernels::ALL),
        ("all,pairs", decode::Kernels::parse("all,pairs")),
        ("all,norm", decode::Kernels::parse("all,norm")),
        ("fused", decode::Kernels::FUSED),
    ];
    let g_in = Tensor::randn(0f32, 1.0, h, &dev)?.to_dtype(DType::BF16)?;
    let g_post = Tensor::randn(0f32, 1.0, h, &dev)?.to_dtype(DType::BF16)?;
    for (name, setting) in settings {
        decode::set_kernels(setting);
        let x = Tensor::randn(0f32, 1.0, (1, h), &dev)?.to_dtype(DType::BF16)?;
        let us = time(&|| {
            let _ = decode::normed_projections(&x, &g_in, 1e-6, &[&q, &k, &v])?;
            let mid = decode::residual(&x, &o, &x)?;
            let act = decode::swiglu(&mid, Some((&g_post, 1e-6)), &gate, &up)?;
            decode::residual(&act, &down, &mid)
        })?;
        println!(
            "{}",
            serde_json::json!({"op": "a block", "kernels": name, "us": (us * 10.0).round() / 10.0})
        );
    }
    decode::set_kernels(decode::Kernels::FUSED);
    Ok(())
}
