//! The CUDA side of the op facade: our kernels (`kernels.cu`, compiled to PTX by `build.rs`) and
//! the device setup the engine needs. Every kernel here has a reference op on the CPU that
//! computes the same function, and a test that compares the two on the GPU machine.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{self, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Result, Storage, Tensor};

const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "qscript_kernels";

fn launch_1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn wrap(storage: CudaStorage, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// [`crate::nn::dropout::mask`] on the device.
pub fn dropout_mask(
    dev: &CudaDevice,
    key: u64,
    p: f32,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p);
    let n64 = n as u64;
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let func = dev.get_or_load_custom_func($name, MODULE, KERNELS)?;
            // SAFETY: every element is written by the kernel before the tensor is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut b = func.builder();
            b.arg(&out);
            b.arg(&key);
            b.arg(&p);
            b.arg(&keep);
            b.arg(&n64);
            // SAFETY: the argument list matches the kernel's signature in kernels.cu.
            unsafe { b.launch(launch_1d(n)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let storage = match dtype {
        DType::F32 => run!(f32, "dropout_mask_f32"),
        DType::BF16 => run!(half::bf16, "dropout_mask_bf16"),
        DType::F16 => run!(half::f16, "dropout_mask_f16"),
        other => candle_core::bail!("dropout: unsupported dtype {other:?}"),
    };
    Ok(wrap(storage, shape))
}

/// AdamW's hyper-parameters for one step, as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    /// Learning rate.
    pub lr: f32,
    /// `beta1`.
    pub beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `eps`.
    pub eps: f32,
    /// Weight decay.
    pub wd: f32,
    /// `1 - beta1^t`.
    pub bc1: f32,
    /// `1 - beta2^t`.
    pub bc2: f32,
}

fn flat_f32<'a>(
    t: &'a (candle_core::StorageRef<'_>, &candle_core::Layout),
    what: &str,
) -> Result<&'a driver::CudaSlice<f32>> {
    let (s, l) = t;
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("adamw: `{what}` must be a whole contiguous buffer");
    }
    match &**s {
        Storage::Cuda(c) => c.as_cuda_slice::<f32>(),
        _ => candle_core::bail!("adamw: `{what}` is not on the GPU"),
    }
}

/// One in-place AdamW step over flat buffers: `params` (any float dtype) and the f32 moments
/// `m`, `v` are updated from the f32 gradients `g` scaled by the device scalar `clip`; `decay`
/// marks where weight decay applies. One launch for every trainable tensor.
pub fn adamw(
    params: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    clip: Option<&Tensor>,
    decay: Option<&Tensor>,
    a: AdamWArgs,
) -> Result<()> {
    let n = params.elem_count();
    for (t, what) in [(m, "m"), (v, "v"), (g, "grads")] {
        if t.elem_count() != n || t.dtype() != DType::F32 {
            candle_core::bail!("adamw: `{what}` must be f32 with {n} elements");
        }
    }
    let pguard = params.storage_and_layout();
    let Storage::Cuda(ps) = &*pguard.0 else {
        candle_core::bail!("adamw: the parameters are not on the GPU");
    };
    let dev = ps.device.clone();
    let (ms, vs, gs) = (
        m.storage_and_layout(),
        v.storage_and_layout(),
        g.storage_and_layout(),
    );
    let (ms, vs, gs) = (
        flat_f32(&ms, "m")?,
        flat_f32(&vs, "v")?,
        flat_f32(&gs, "grads")?,
    );
    let cs = clip.map(Tensor::storage_and_layout);
    let ds = decay.map(Tensor::storage_and_layout);
    let cs = cs.as_ref().map(|c| flat_f32(c, "clip")).transpose()?;
    let ds = ds.as_ref().map(|d| flat_f32(d, "decay")).transpose()?;
    let null: u64 = 0;
    let n64 = n as u64;
    let pl = pguard.1;
    if !pl.is_contiguous() || pl.start_offset() != 0 {
        candle_core::bail!("adamw: the parameters must be a whole contiguous buffer");
    }
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let p = ps.as_cuda_slice::<$t>()?;
            let func = dev.get_or_load_custom_func($name, MODULE, KERNELS)?;
            let mut b = func.builder();
            b.arg(p);
            b.arg(ms);
            b.arg(vs);
            b.arg(gs);
            match cs {
                Some(c) => b.arg(c),
                None => b.arg(&null),
            };
            match ds {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
            for x in [&a.lr, &a.beta1, &a.beta2, &a.eps, &a.wd, &a.bc1, &a.bc2] {
                b.arg(x);
            }
            b.arg(&n64);
            // SAFETY: the argument list matches `adamw_*` in kernels.cu; every buffer holds
            // `n` elements (checked above) and the engine runs on one stream.
            unsafe { b.launch(launch_1d(n)) }.w()?;
        }};
    }
    match params.dtype() {
        DType::F32 => run!(f32, "adamw_f32"),
        DType::BF16 => run!(half::bf16, "adamw_bf16"),
        DType::F16 => run!(half::f16, "adamw_f16"),
        other => candle_core::bail!("adamw: unsupported parameter dtype {other:?}"),
    }
    Ok(())
}

/// Once per device, before any tensor lives on it: keep freed memory in the CUDA memory pool
/// (cudarc's pool returns it to the driver at every synchronize otherwise), and stop cudarc from
/// creating two events per allocation (the engine runs on one stream per device).
pub fn prepare(dev: &CudaDevice) -> Result<()> {
    let ctx = dev.cuda_stream().context().clone();
    let mut pool = std::ptr::null_mut();
    // SAFETY: plain driver calls on the context's device; the attribute is a u64 as documented.
    unsafe {
        driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(candle_core::Error::wrap)?;
        let mut threshold = u64::MAX;
        driver::sys::cuMemPoolSetAttribute(
            pool,
            driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
        .result()
        .map_err(candle_core::Error::wrap)?;
        dev.disable_event_tracking();
    }
    Ok(())
}
