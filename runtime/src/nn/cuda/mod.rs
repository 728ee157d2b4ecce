//! The CUDA side of the op facade: our kernels (`kernels.cu`, compiled to PTX by `build.rs`) and
//! the device setup the engine needs. Every kernel here has a reference op on the CPU that
//! computes the same function, and a test that compares the two on the GPU machine.
#![allow(unsafe_code)]

use candle_core::backprop::BackpropOp;
use candle_core::cuda_backend::cudarc::driver::{self, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
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
