//! 8-bit AdamW's step on CUDA (`adamw8.cu`): one launch over every quantization block (a thread
//! block each) and one over the tensors small enough for f32 moments. Reference op:
//! [`super::eight_bit::Blockwise8::step_host`].

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result, Tensor};

use super::AdamWConfig;
use super::eight_bit::{BLOCK, Blockwise8};
use crate::nn::cuda::launch::{Arg, Module, first, launch, ptx};
use crate::train::flat::FlatParams;

const PTX: Module = ptx!("adamw8");

/// One step of `s` over `params` from the f32 `grads` scaled by the device scalar `clip`, at
/// learning rate `lr`, step `t` (from 1).
pub fn step(
    s: &mut Blockwise8,
    params: &FlatParams,
    grads: &Tensor,
    clip: Option<&Tensor>,
    cfg: &AdamWConfig,
    lr: f64,
    t: i32,
) -> Result<()> {
    let p = params.data.as_tensor();
    let n = p.elem_count();
    if grads.elem_count() != n || grads.dtype() != DType::F32 || !grads.is_contiguous() {
        candle_core::bail!("adamw8: the gradients must be {n} contiguous f32 values");
    }
    if !p.is_contiguous() || !matches!(p.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("adamw8: the parameters must be a contiguous float buffer");
    }
    let (pp, dev) = first(p, "the parameters")?;
    let pg = first(grads, "the gradients")?.0;
    let pc = match clip {
        Some(c) => first(c, "clip")?.0,
        None => 0,
    };
    let tb = &s.tables;
    let scalars = [
        Arg::from(lr as f32),
        Arg::from(cfg.beta1 as f32),
        Arg::from(cfg.beta2 as f32),
        Arg::from((1.0 - cfg.beta1) as f32),
        Arg::from((1.0 - cfg.beta2) as f32),
        Arg::from(cfg.eps as f32),
        Arg::from(cfg.weight_decay as f32),
        Arg::from((1.0 - cfg.beta1.powi(t)) as f32),
        Arg::from(((1.0 - cfg.beta2.powi(t)) as f32).sqrt()),
    ];
    let grid = |blocks: usize| LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    if !s.blocks.is_empty() {
        let mut args = vec![
            Arg::from(pp),
            Arg::from(pg),
            Arg::from(pc),
            Arg::from(first(&s.codes_m, "codes")?.0),
            Arg::from(first(&s.codes_v, "codes")?.0),
            Arg::from(first(&s.absmax_m, "absmax")?.0),
            Arg::from(first(&s.absmax_v, "absmax")?.0),
            Arg::from(first(&tb.block_starts, "block table")?.0),
            Arg::from(first(&tb.block_lens, "block table")?.0),
            Arg::from(first(&tb.maps, "code books")?.0),
        ];
        args.extend(scalars);
        // Every table was built for these buffers (`Blockwise8::new`); one stream.
        launch(&dev, &PTX, "adamw8", p.dtype(), grid(s.blocks.len()), &args)?;
    }
    if !s.small.is_empty() {
        let mut args = vec![
            Arg::from(pp),
            Arg::from(pg),
            Arg::from(pc),
            Arg::from(first(&s.small_m, "moments")?.0),
            Arg::from(first(&s.small_v, "moments")?.0),
            Arg::from(first(&tb.small_starts, "run table")?.0),
            Arg::from(first(&tb.small_lens, "run table")?.0),
            Arg::from(first(&tb.small_offs, "run table")?.0),
        ];
        args.extend(scalars);
        launch(
            &dev,
            &PTX,
            "adamw32runs",
            p.dtype(),
            grid(s.small.len()),
            &args,
        )?;
    }
    Ok(())
}
