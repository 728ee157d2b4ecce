//! The device's CUDA memory pool, where every tensor's memory comes from: set up once per device
//! ([`prepare`]), its usage and peak read ([`pool_usage`], [`reset_pool_peak`]) and its handle for
//! peer access (`nn/cuda/peer.rs`).
#![allow(unsafe_code)]

use candle_core::Result;
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver;

/// The device's default memory pool: the one cudarc's stream-ordered allocations come from.
pub(crate) fn default_pool(dev: &CudaDevice) -> Result<driver::sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: a plain driver query on the context's device.
    unsafe {
        driver::sys::cuDeviceGetDefaultMemPool(
            &raw mut pool,
            dev.cuda_stream().context().cu_device(),
        )
    }
    .result()
    .map_err(candle_core::Error::wrap)?;
    Ok(pool)
}

/// A u64 attribute of `pool` (all the ones used here are u64, as documented).
fn pool_attribute(
    pool: driver::sys::CUmemoryPool,
    attr: driver::sys::CUmemPool_attribute,
) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: `pool` is a live pool and the attribute is a u64.
    unsafe { driver::sys::cuMemPoolGetAttribute(pool, attr, (&raw mut v).cast()) }
        .result()
        .map_err(candle_core::Error::wrap)?;
    Ok(v)
}

fn set_pool_attribute(
    pool: driver::sys::CUmemoryPool,
    attr: driver::sys::CUmemPool_attribute,
    mut v: u64,
) -> Result<()> {
    // SAFETY: as above.
    unsafe { driver::sys::cuMemPoolSetAttribute(pool, attr, (&raw mut v).cast()) }
        .result()
        .map_err(candle_core::Error::wrap)
}

/// Once per device, before any tensor lives on it: keep freed memory in the CUDA memory pool
/// (cudarc's pool returns it to the driver at every synchronize otherwise), and stop cudarc from
/// creating two events per allocation (the engine runs on one stream per device).
pub fn prepare(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    set_pool_attribute(
        pool,
        driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )?;
    // SAFETY: called before any allocation on this device is shared between streams.
    unsafe { dev.disable_event_tracking() };
    Ok(())
}

/// Bytes in the device's memory pool: held by live tensors, held by the pool in all (kept for
/// reuse), and the most held by live tensors since the last [`reset_pool_peak`].
pub fn pool_usage(dev: &CudaDevice) -> Result<(u64, u64, u64)> {
    use driver::sys::CUmemPool_attribute as A;
    let pool = default_pool(dev)?;
    Ok((
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    ))
}

/// Starts a new peak: the pool's high-water mark becomes what live tensors hold now.
pub fn reset_pool_peak(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    set_pool_attribute(
        pool,
        driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        0,
    )
}
