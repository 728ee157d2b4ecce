//! The sum of squares of the flat gradient buffer on CUDA (`grad_norm.cu`, compiled by `build.rs`
//! and launched through `nn::cuda`'s one launcher), for the global-norm clipping before the
//! optimizer step: one read of the buffer, no squared copy. Reference op: the composite path of
//! the optimizer's `sum_of_squares` (rows of partial sums), which takes this kernel on a GPU.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result, Tensor};

use crate::nn::cuda::launch::{Arg, Module, addr, empty, launch, ptx};

const PTX: Module = ptx!("grad_norm");

/// The sum of squares of a contiguous f32 buffer, as a device scalar (one read of the buffer).
pub fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    let n = g.elem_count();
    if g.dtype() != DType::F32 {
        candle_core::bail!("sum_of_squares: {:?}, not f32", g.dtype());
    }
    let (pg, dev) = addr(g, "grads")?;
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let out = empty(&dev, &[blocks], DType::F32)?;
    let po = addr(&out, "partials")?.0;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        &dev,
        &PTX,
        "sumsq",
        DType::F32,
        cfg,
        &[Arg::from(pg), Arg::from(po), Arg::from(n as u64)],
    )?;
    out.sum_all()
}
