//! The training loop. Batches come from the epoch order (seeded, optionally length-grouped); the
//! loss of an accumulation window is the sum of token losses over the number of learned tokens
//! in the whole window, so accumulating k micro-batches equals one batch k times larger.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::optim::{AdamW, AdamWConfig, clip_grad_norm};
use super::schedule::Schedule;
use crate::cancel::CancelToken;
use crate::data::batch::{Batch, collate, epoch_order};
use crate::data::sft::{Example, IGNORE};
use crate::model::Model;
use crate::nn::ops::cross_entropy;
use crate::{Error, Result};

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// Before step 1: the plan, as HF prints it.
    Start {
        /// Training examples.
        examples: usize,
        /// Epochs (as configured).
        epochs: f64,
        /// `per_device_train_batch_size * gradient_accumulation_steps`.
        total_batch: usize,
        /// Optimizer steps.
        total_steps: usize,
        /// Trainable parameters.
        trainable: usize,
        /// Resumed at this step.
        resumed_at: usize,
    },
    /// After each optimizer step.
    Step {
        /// Steps done.
        step: usize,
        /// Of this many.
        total: usize,
        /// Loss of this step.
        loss: f64,
    },
    /// Every `logging_steps`.
    Log(serde_json::Value),
    /// After an evaluation.
    Eval(serde_json::Value),
    /// A checkpoint was written.
    Saved(PathBuf),
}

/// The outcome of `fit`.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// The trained model (new adapter / weight `Var`s; the input model is unchanged).
    pub model: Model,
    /// Optimizer steps done.
    pub steps: usize,
    /// `(step, loss)` of every step.
    pub losses: Vec<(usize, f64)>,
    /// Logged records (also in `metrics.jsonl`).
    pub log_history: Vec<serde_json::Value>,
    /// Mean training throughput.
    pub tokens_per_second: f64,
    /// Whether Ctrl-C stopped the run (a checkpoint was saved first).
    pub interrupted: bool,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
}

/// A copy of `model` whose trainable tensors are fresh `Var`s holding the same values, so training
/// never changes the input handle. Returns the copy and its named trainable vars.
fn fresh_trainables(model: &Model) -> Result<(Model, Vec<(String, Var)>)> {
    let mut m = model.clone();
    if m.lora.is_some() {
        for b in &mut m.decoder.blocks {
            for lin in [
                &mut b.attn.q,
                &mut b.attn.k,
                &mut b.attn.v,
                &mut b.attn.o,
                &mut b.mlp.gate,
                &mut b.mlp.up,
                &mut b.mlp.down,
            ] {
                if let Some(l) = &mut lin.lora {
                    l.a = Var::from_tensor(&l.a.as_tensor().copy()?)?;
                    l.b = Var::from_tensor(&l.b.as_tensor().copy()?)?;
                }
            }
        }
        let vars = crate::lora::adapter_vars(&m);
        return Ok((m, vars));
    }
    if m.vars.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has nothing to train: attach LoRA adapters (`lora::attach`) or load it with `trainable: true`".into(),
        ));
    }
    // Full fine-tuning: rebuild from fresh vars.
    let dir = m.source.clone().unwrap_or_default();
    let tensors: std::collections::HashMap<String, Tensor> = m
        .named
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.copy()?)))
        .collect::<Result<_>>()?;
    let src = crate::model::weights::WeightSource::Memory { dir, tensors };
    let mut rebuilt = Model::build(
        m.decoder.cfg.clone(),
        &src,
        m.decoder.dtype(),
        m.decoder.device(),
        true,
    )?;
    rebuilt.generation = m.generation.clone();
    rebuilt.source = m.source.take();
    let vars = rebuilt.vars.clone();
    Ok((rebuilt, vars))
}

/// The summed token loss of `logits` against the batch labels (shifted), and the token count.
fn loss_of(logits: &Tensor, batch: &Batch) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    let shifted = logits.i((.., ..s - 1))?.reshape((b * (s - 1), v))?;
    let labels = batch.labels.i((.., 1..))?.flatten_all()?;
    let (mean, count) = cross_entropy(&shifted, &labels)?;
    Ok(((mean * count as f64)?, count))
}

/// The loss of one micro-batch divided by `denom` (its value) and the gradient of every tensor in
/// `params`. With `checkpoint`, blocks run forward without keeping activations and are recomputed
/// one at a time in backward: each block's backward is that of `sum(out * grad_out)`.
/// `train_seed` seeds the dropout masks, so the recomputation draws the masks of the forward.
pub fn micro_grads(
    model: &Model,
    batch: &Batch,
    denom: f64,
    params: &[Tensor],
    checkpoint: bool,
    train_seed: u64,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let mut out: Vec<Option<Tensor>> = vec![None; params.len()];
    let pick =
        |g: &candle_core::backprop::GradStore, out: &mut Vec<Option<Tensor>>| -> Result<()> {
            for (p, acc) in params.iter().zip(out.iter_mut()) {
                if let Some(gi) = g.get(p) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + gi)?,
                        None => gi.clone(),
                    });
                }
            }
            Ok(())
        };
    let d = &model.decoder;
    if !checkpoint {
        let logits = d.forward_t(
            &batch.input_ids,
            Some(&batch.attention_mask),
            None,
            Some(train_seed),
        )?;
        let scaled = (loss_of(&logits, batch)?.0 / denom)?;
        let value = f64::from(scaled.to_scalar::<f32>()?);
        if value.is_finite() {
            pick(&scaled.backward()?, &mut out)?;
        }
        return Ok((value, out));
    }
    let (b, s) = batch.input_ids.dims2()?;
    let (cos, sin, bias) = d.step_inputs(b, s, 0, Some(&batch.attention_mask))?;
    let step = crate::model::decoder::Step {
        cos: &cos,
        sin: &sin,
        bias: bias.as_ref(),
        train_seed: Some(train_seed),
    };
    let eps = d.cfg.rms_norm_eps;
    let mut xs = vec![d.embed_tokens(&batch.input_ids)?.detach()];
    for (i, blk) in d.blocks.iter().enumerate() {
        let y = blk
            .forward(&xs[xs.len() - 1], eps, &step, None, i)?
            .detach();
        xs.push(y);
    }
    let top = Var::from_tensor(&xs[xs.len() - 1])?;
    let scaled = (loss_of(&d.head(top.as_tensor())?, batch)?.0 / denom)?;
    let value = f64::from(scaled.to_scalar::<f32>()?);
    if !value.is_finite() {
        return Ok((value, out));
    }
    let g = scaled.backward()?;
    pick(&g, &mut out)?;
    let mut grad_out = g
        .get(top.as_tensor())
        .cloned()
        .unwrap_or(top.as_tensor().zeros_like()?);
    for i in (0..d.blocks.len()).rev() {
        let x_in = Var::from_tensor(&xs[i])?;
        let y = d.blocks[i].forward(x_in.as_tensor(), eps, &step, None, i)?;
        let g = y.mul(&grad_out)?.sum_all()?.backward()?;
        pick(&g, &mut out)?;
        grad_out = g
            .get(x_in.as_tensor())
            .cloned()
            .unwrap_or(x_in.as_tensor().zeros_like()?);
    }
    if params.iter().any(|p| p.id() == d.embed.id()) {
        let g = d
            .embed_tokens(&batch.input_ids)?
            .mul(&grad_out)?
            .sum_all()?
            .backward()?;
        pick(&g, &mut out)?;
    }
    Ok((value, out))
}

fn learned_tokens(examples: &[&Example]) -> usize {
    examples
        .iter()
        .map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count())
        .sum()
}

/// Mean token loss of `data` (no gradients kept).
pub fn evaluate(model: &Model, data: &[Example], cfg: &TrainConfig, pad_id: u32) -> Result<f64> {
    let device = model.decoder.device().clone();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in data.chunks(cfg.per_device_eval_batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, cfg.pad_to_multiple_of, &device)?;
        let logits = model
            .decoder
            .forward(&batch.input_ids, Some(&batch.attention_mask), None)?
            .detach();
        let (b, s, v) = logits.dims3()?;
        if s < 2 {
            continue;
        }
        let shifted = logits.i((.., ..s - 1))?.reshape((b * (s - 1), v))?;
        let (mean, n) = cross_entropy(&shifted, &batch.labels.i((.., 1..))?.flatten_all()?)?;
        total += f64::from(mean.to_scalar::<f32>()?) * n as f64;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// Trains `model` on `train` (and evaluates on `eval`), reporting through `on_event`.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    model: &Model,
    train: &[Example],
    eval: Option<&[Example]>,
    cfg: &TrainConfig,
    pad_id: u32,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&Event) -> Result<()>,
) -> Result<TrainReport> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(Error::InvalidArgument(
            "the training dataset is empty".into(),
        ));
    }
    if cfg.eval_strategy == "steps" && eval.is_none_or(<[Example]>::is_empty) {
        return Err(Error::InvalidArgument("`eval_strategy: \"steps\"` needs an eval dataset: `train::fit(model, train, opts, eval)`".into()));
    }
    let out_dir = PathBuf::from(&cfg.output_dir);
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let (model, vars) = fresh_trainables(model)?;
    let device: Device = model.decoder.device().clone();
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let params: Vec<Tensor> = opt
        .slots
        .iter()
        .map(|s| s.var.as_tensor().clone())
        .collect();
    let (micro_per_epoch, _, total) = cfg.plan(train.len());
    let sched = Schedule::new(
        &cfg.lr_scheduler_type,
        cfg.learning_rate,
        cfg.warmup(total),
        total,
    )?;
    let mut state = TrainerState::default();
    if let Some(dir) = resume_dir(cfg, &out_dir)? {
        state = checkpoint::restore(&dir, &model, &mut opt)?;
    }
    let json = serde_json::to_string_pretty(cfg).unwrap_or_default();
    crate::sandbox::write_atomic(&out_dir.join("training_args.json"), json.as_bytes())?;
    on_event(&Event::Start {
        examples: train.len(),
        epochs: cfg.num_train_epochs,
        total_batch: cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
        total_steps: total,
        trainable,
        resumed_at: state.global_step,
    })?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_dir.join("metrics.jsonl"))
        .map_err(|e| Error::io(out_dir.join("metrics.jsonl"), e))?;
    let lengths: Vec<usize> = train.iter().map(|e| e.input_ids.len()).collect();
    let mut report = TrainReport {
        model: model.clone(),
        steps: state.global_step,
        losses: Vec::new(),
        log_history: state.log_history.clone(),
        tokens_per_second: 0.0,
        interrupted: false,
        last_checkpoint: None,
    };
    let started = Instant::now();
    let (mut tokens_seen, mut window_log) = (0usize, Vec::<(f64, f64)>::new());
    let mut last_log = Instant::now();
    let mut tokens_since_log = 0usize;
    'epochs: while state.global_step < total {
        let order = epoch_order(
            &lengths,
            cfg.per_device_train_batch_size,
            cfg.group_by_length,
            cfg.seed,
            state.epoch as u64,
        );
        let micro: Vec<&[usize]> = order.chunks(cfg.per_device_train_batch_size).collect();
        let windows: Vec<&[&[usize]]> = micro.chunks(cfg.gradient_accumulation_steps).collect();
        let mut consumed = 0;
        for window in windows {
            if consumed < state.micro_in_epoch {
                consumed += window.len();
                continue;
            }
            if window.len() < cfg.gradient_accumulation_steps
                && micro_per_epoch >= cfg.gradient_accumulation_steps
            {
                break; // HF drops the incomplete last window of an epoch
            }
            if cancel.is_cancelled() {
                let path = checkpoint::save(&out_dir, &model, &opt, &state)?;
                on_event(&Event::Saved(path.clone()))?;
                report.last_checkpoint = Some(path);
                report.interrupted = true;
                break 'epochs;
            }
            let examples: Vec<Vec<&Example>> = window
                .iter()
                .map(|ix| ix.iter().map(|&i| &train[i]).collect())
                .collect();
            let window_tokens: usize = examples.iter().map(|e| learned_tokens(e)).sum();
            let mut grads: Vec<Option<Tensor>> = vec![None; opt.slots.len()];
            let mut loss_sum = 0f64;
            for (k, ex) in examples.iter().enumerate() {
                let batch = collate(ex, pad_id, cfg.pad_to_multiple_of, &device)?;
                tokens_seen += batch.tokens;
                tokens_since_log += batch.tokens;
                let (value, micro) = micro_grads(
                    &model,
                    &batch,
                    window_tokens.max(1) as f64,
                    &params,
                    cfg.gradient_checkpointing,
                    crate::nn::linear::mix(
                        cfg.seed,
                        (state.global_step * cfg.gradient_accumulation_steps + k) as u64,
                    ),
                )?;
                if !value.is_finite() {
                    return Err(Error::InvalidArgument(format!(
                        "the loss is {value} at step {} (micro-batch {k} of the window, examples {:?}); lower `learning_rate` or check the data",
                        state.global_step + 1,
                        window[k]
                    )));
                }
                loss_sum += value;
                for (acc, g) in grads.iter_mut().zip(micro) {
                    if let Some(g) = g {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g,
                        });
                    }
                }
            }
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&opt.slots)
                .map(|(g, s)| {
                    g.map_or_else(|| Tensor::zeros(s.var.shape(), DType::F32, &device), Ok)
                })
                .collect::<candle_core::Result<_>>()?;
            let (grad_norm, grads) = clip_grad_norm(&grads, cfg.max_grad_norm)?;
            let lr = sched.lr(state.global_step);
            opt.step(&grads, lr)?;
            state.global_step += 1;
            consumed += window.len();
            state.micro_in_epoch = consumed;
            report.losses.push((state.global_step, loss_sum));
            window_log.push((loss_sum, grad_norm));
            on_event(&Event::Step {
                step: state.global_step,
                total,
                loss: loss_sum,
            })?;
            let epoch_f = state.epoch as f64 + consumed as f64 / micro_per_epoch.max(1) as f64;
            if state.global_step % cfg.logging_steps.max(1) == 0 || state.global_step == total {
                let n = window_log.len().max(1) as f64;
                let secs = last_log.elapsed().as_secs_f64().max(1e-9);
                let rec = json!({
                    "step": state.global_step,
                    "epoch": (epoch_f * 1000.0).round() / 1000.0,
                    "loss": window_log.iter().map(|w| w.0).sum::<f64>() / n,
                    "grad_norm": window_log.iter().map(|w| w.1).sum::<f64>() / n,
                    "learning_rate": lr,
                    "tokens_per_second": (tokens_since_log as f64 / secs).round(),
                });
                window_log.clear();
                tokens_since_log = 0;
                last_log = Instant::now();
                writeln!(metrics, "{rec}")
                    .map_err(|e| Error::io(out_dir.join("metrics.jsonl"), e))?;
                state.log_history.push(rec.clone());
                on_event(&Event::Log(rec))?;
            }
            let eval_every = cfg.eval_steps.unwrap_or(cfg.logging_steps).max(1);
            let mut stop = false;
            if cfg.eval_strategy == "steps"
                && (state.global_step % eval_every == 0 || state.global_step == total)
            {
                let eval_loss = evaluate(&model, eval.unwrap_or_default(), cfg, pad_id)?;
                let rec = json!({"step": state.global_step, "eval_loss": eval_loss});
                writeln!(metrics, "{rec}")
                    .map_err(|e| Error::io(out_dir.join("metrics.jsonl"), e))?;
                state.log_history.push(rec.clone());
                on_event(&Event::Eval(rec))?;
                if state.best_metric.is_none_or(|b| eval_loss < b) {
                    state.best_metric = Some(eval_loss);
                    state.best_model_checkpoint = Some(format!("checkpoint-{}", state.global_step));
                    state.evals_without_improvement = 0;
                    if cfg.load_best_model_at_end {
                        let path = save_and_rotate(&out_dir, &model, &opt, &state, cfg)?;
                        on_event(&Event::Saved(path.clone()))?;
                        report.last_checkpoint = Some(path);
                    }
                } else {
                    state.evals_without_improvement += 1;
                    stop = cfg
                        .early_stopping_patience
                        .is_some_and(|p| state.evals_without_improvement >= p);
                }
            }
            if cfg.save_steps > 0 && state.global_step % cfg.save_steps == 0 {
                let path = save_and_rotate(&out_dir, &model, &opt, &state, cfg)?;
                on_event(&Event::Saved(path.clone()))?;
                report.last_checkpoint = Some(path);
            }
            if stop || state.global_step >= total {
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.micro_in_epoch = 0;
    }
    report.steps = state.global_step;
    report.log_history.clone_from(&state.log_history);
    report.tokens_per_second = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    report.model = model;
    if cfg.load_best_model_at_end
        && let Some(best) = &state.best_model_checkpoint
    {
        let dir = out_dir.join(best);
        if dir.is_dir() {
            checkpoint::restore(&dir, &report.model, &mut opt)?;
        }
    }
    write_plot(
        &out_dir.join("loss.svg"),
        &report.losses,
        &state.log_history,
    )?;
    Ok(report)
}

fn save_and_rotate(
    out: &Path,
    model: &Model,
    opt: &AdamW,
    state: &TrainerState,
    cfg: &TrainConfig,
) -> Result<PathBuf> {
    let path = checkpoint::save(out, model, opt, state)?;
    if let Some(limit) = cfg.save_total_limit {
        checkpoint::rotate(
            out,
            limit,
            state
                .best_model_checkpoint
                .as_deref()
                .filter(|_| cfg.load_best_model_at_end),
        )?;
    }
    Ok(path)
}

fn resume_dir(cfg: &TrainConfig, out: &Path) -> Result<Option<PathBuf>> {
    match &cfg.resume_from_checkpoint {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Bool(true)) => match checkpoint::list(out).pop() {
            Some((_, p)) => Ok(Some(p)),
            None => Err(Error::InvalidArgument(format!(
                "`resume_from_checkpoint: true` but there is no checkpoint in `{}`",
                out.display()
            ))),
        },
        Some(serde_json::Value::String(p)) => {
            let p = PathBuf::from(p);
            let p = if p.is_absolute() { p } else { out.join(p) };
            if p.join("trainer_state.json").is_file() {
                Ok(Some(p))
            } else {
                Err(Error::InvalidArgument(format!(
                    "`resume_from_checkpoint`: `{}` is not a checkpoint",
                    p.display()
                )))
            }
        }
        Some(other) => Err(Error::InvalidArgument(format!(
            "`resume_from_checkpoint` must be a path or `true`, got {other}"
        ))),
    }
}

/// A small SVG with the step losses and the learning rate.
fn write_plot(path: &Path, losses: &[(usize, f64)], log: &[serde_json::Value]) -> Result<()> {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let series = |pts: &[(f64, f64)]| -> String {
        let (xmax, ymin, ymax) = pts
            .iter()
            .fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
                (x.max(p.0), lo.min(p.1), hi.max(p.1))
            });
        let span = (ymax - ymin).max(1e-12);
        pts.iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + x / xmax * (w - 2.0 * pad),
                    h - pad - (y - ymin) / span * (h - 2.0 * pad)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let loss_pts: Vec<(f64, f64)> = losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    let lr_pts: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("learning_rate")?.as_f64()?)))
        .collect();
    let (first, last) = (
        loss_pts.first().map_or(0.0, |p| p.1),
        loss_pts.last().map_or(0.0, |p| p.1),
    );
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<text x=\"{pad}\" y=\"20\">loss {first:.4} → {last:.4} over {} steps (blue); learning rate (orange, own scale)</text>\
<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\
<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"1\" points=\"{}\"/></svg>\n",
        loss_pts.len(),
        series(&loss_pts),
        series(&lr_pts)
    );
    crate::sandbox::write_atomic(path, svg.as_bytes())
}
