//! Activation offload: a GPU tensor parked in pinned host memory and brought back, each copy on
//! a side stream of its GPU so the copy engines work while the compute stream runs the GEMMs, and
//! nothing makes the host wait.
//!
//! [`park`] queues the copy out after the work that wrote the tensor and keeps the tensor until
//! [`Parked::release`], which makes the compute stream (on the GPU, through an event) wait for
//! the copy before the tensor's memory goes back to the pool; [`Parked::fetch`] allocates the
//! tensor again and queues the copy back; [`Fetching::ready`] makes the compute stream wait for
//! it. The host buffers come from a per-GPU pool kept between steps (pinning memory is slow), all
//! of a GPU's copies run on its one side stream, so a buffer read by a copy back is written by
//! a later copy out only after it; [`trim`] gives the pool back at the end of a run.
//! On the CPU the tensor already lies in host memory: parking keeps it as it is.

use candle_core::{Result, Tensor};

/// A tensor parked in host memory (or on its way there).
pub struct Parked {
    inner: Inner,
}

enum Inner {
    /// On the CPU: the tensor itself.
    Host(Tensor),
    #[cfg(feature = "cuda")]
    Pinned(cuda::Pinned),
}

/// A parked tensor on its way back to its GPU.
pub struct Fetching {
    inner: FetchInner,
}

enum FetchInner {
    Host(Tensor),
    /// Given out by `ready` (the drop has nothing to wait for).
    Taken,
    #[cfg(feature = "cuda")]
    Copying(Tensor, candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

/// Starts parking `x` in host memory.
pub fn park(x: &Tensor) -> Result<Parked> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        return Ok(Parked {
            inner: Inner::Pinned(cuda::park(x, dev)?),
        });
    }
    Ok(Parked {
        inner: Inner::Host(x.clone()),
    })
}

impl Parked {
    /// Lets the device memory of the parked tensor go: later work on its GPU waits for the copy
    /// out, on the GPU. The tensor's memory returns to the pool when nothing else holds it.
    pub fn release(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p.release(),
        }
    }

    /// Starts bringing the tensor back to its device.
    pub fn fetch(self) -> Result<Fetching> {
        match self.inner {
            Inner::Host(t) => Ok(Fetching {
                inner: FetchInner::Host(t),
            }),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => {
                let (t, done) = p.fetch()?;
                Ok(Fetching {
                    inner: FetchInner::Copying(t, done),
                })
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl Drop for Fetching {
    /// Dropped before [`Fetching::ready`] (a step that failed half-way): the tensor's memory
    /// goes back to the compute stream's pool only after the copy back into it is done.
    fn drop(&mut self) {
        if let FetchInner::Copying(t, done) = &self.inner {
            let _ = cuda::wait_for(t, done);
        }
    }
}

impl Fetching {
    /// The tensor, for work queued on its device after this call (which waits for the copy back
    /// on the GPU).
    pub fn ready(mut self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let FetchInner::Copying(t, done) = &self.inner {
            cuda::wait_for(t, done)?;
        }
        match std::mem::replace(&mut self.inner, FetchInner::Taken) {
            FetchInner::Host(t) => Ok(t),
            #[cfg(feature = "cuda")]
            FetchInner::Copying(t, _) => Ok(t),
            FetchInner::Taken => Err(candle_core::Error::Msg(
                "an offloaded tensor fetched twice".into(),
            )),
        }
    }
}

/// Gives the pinned host buffers back (after every copy that uses them is done). The next
/// offloaded run pins them again.
pub fn trim() -> Result<()> {
    #[cfg(feature = "cuda")]
    cuda::trim()?;
    Ok(())
}

/// Pinned host bytes the pool holds now (0 on the CPU).
pub fn pinned_bytes() -> u64 {
    #[cfg(feature = "cuda")]
    {
        cuda::pinned_bytes()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, result, sys};
    use candle_core::{DType, Result, Tensor};

    use crate::device::trace;

    /// A copy's name in a trace: its direction and size.
    fn copy_name(way: &str, bytes: usize) -> String {
        format!("copy {way} {:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }

    fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
        candle_core::Error::wrap(e)
    }

    /// Page-locked host memory from `cuMemHostAlloc`.
    struct HostBuf {
        ptr: *mut std::ffi::c_void,
        bytes: usize,
    }

    // SAFETY: the buffer is plain host memory; every access to it is a copy queued on the one
    // side stream of its GPU, which orders them.
    unsafe impl Send for HostBuf {}

    impl Drop for HostBuf {
        fn drop(&mut self) {
            // SAFETY: `ptr` came from `malloc_host`, and `trim` synchronized the side streams.
            let _ = unsafe { result::free_host(self.ptr) };
        }
    }

    /// Per GPU: its side stream and its free host buffers.
    #[derive(Default)]
    struct Pool {
        side: HashMap<usize, Arc<CudaStream>>,
        free: HashMap<usize, Vec<HostBuf>>,
        pinned: u64,
    }

    fn pool() -> std::sync::MutexGuard<'static, Pool> {
        static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
        POOL.get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ordinal(dev: &CudaDevice) -> usize {
        dev.cuda_stream().context().ordinal()
    }

    /// The side stream of `dev`, made on first use.
    fn side(dev: &CudaDevice) -> Result<Arc<CudaStream>> {
        let mut p = pool();
        let o = ordinal(dev);
        if let Some(s) = p.side.get(&o) {
            return Ok(s.clone());
        }
        let s = dev.cuda_stream().context().new_stream().map_err(wrap)?;
        p.side.insert(o, s.clone());
        Ok(s)
    }

    /// A free buffer of at least `bytes` on GPU `o`'s list (the smallest that fits), or a new one.
    fn take(o: usize, dev: &CudaDevice, bytes: usize) -> Result<HostBuf> {
        let mut p = pool();
        let list = p.free.entry(o).or_default();
        let best = list
            .iter()
            .enumerate()
            .filter(|(_, b)| b.bytes >= bytes)
            .min_by_key(|(_, b)| b.bytes)
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(list.swap_remove(i));
        }
        // A longer batch than any before: the free buffers too small for it go (after the side
        // stream's copies that may still read them), so the pool holds about one set of the
        // largest inputs, not one per length seen; the new one has room to grow by a quarter.
        if list.iter().any(|b| b.bytes < bytes) {
            if let Some(s) = p.side.get(&o) {
                s.synchronize().map_err(wrap)?;
            }
            let list = p.free.entry(o).or_default();
            let before: u64 = list.iter().map(|b| b.bytes as u64).sum();
            list.retain(|b| b.bytes >= bytes);
            let after: u64 = list.iter().map(|b| b.bytes as u64).sum();
            p.pinned = p.pinned.saturating_sub(before - after);
        }
        let bytes = bytes.max(1).saturating_add(bytes / 4);
        dev.cuda_stream().context().bind_to_thread().map_err(wrap)?;
        // SAFETY: a plain allocation; the buffer is written by the copy out before any read.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| {
            candle_core::Error::Msg(format!(
                "activation offload could not pin {} of host memory ({e}): the host has too \
                 little free memory for the block inputs; use `gradient_checkpointing: true` \
                 without offload, or a smaller micro-batch",
                crate::bytes::human(bytes as f64)
            ))
        })?;
        p.pinned += bytes as u64;
        Ok(HostBuf { ptr, bytes })
    }

    fn give(o: usize, buf: HostBuf) {
        pool().free.entry(o).or_default().push(buf);
    }

    /// A tensor's copy in host memory.
    pub(super) struct Pinned {
        dev: CudaDevice,
        /// Until the copy back is queued (then the buffer is the pool's again).
        buf: Option<HostBuf>,
        dims: Vec<usize>,
        dtype: DType,
        /// The device tensor until released.
        source: Option<Tensor>,
        /// Recorded on the side stream after the copy out.
        copied: CudaEvent,
    }

    pub(super) fn park(x: &Tensor, dev: &CudaDevice) -> Result<Pinned> {
        let x = x.contiguous()?;
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        let side = side(dev)?;
        let (src, _) = crate::device::memory::first(&x, "the offloaded tensor")?;
        let buf = take(ordinal(dev), dev, bytes)?;
        let queued = (|| {
            // The copy starts after the work that wrote `x`.
            side.join(&dev.cuda_stream()).map_err(wrap)?;
            let span = trace::span_on(trace::Track::Copy, || copy_name("out", bytes), &side);
            // SAFETY: `src` holds `bytes` bytes (`x` is kept until `release`, which orders its
            // free after this copy), `buf` at least as many; the stream is live.
            unsafe { sys::cuMemcpyDtoHAsync_v2(buf.ptr, src, bytes, side.cu_stream()) }
                .result()
                .map_err(wrap)?;
            drop(span);
            side.record_event(None).map_err(wrap)
        })();
        let copied = match queued {
            Ok(e) => e,
            Err(e) => {
                // A copy may be queued: the buffer goes back to the pool, which frees it only
                // after the side stream is done.
                give(ordinal(dev), buf);
                return Err(e);
            }
        };
        Ok(Pinned {
            dev: dev.clone(),
            buf: Some(buf),
            dims: x.dims().to_vec(),
            dtype: x.dtype(),
            source: Some(x),
            copied,
        })
    }

    impl Pinned {
        pub(super) fn release(&mut self) -> Result<()> {
            if let Some(t) = self.source.take() {
                // The compute stream, where the tensor's memory is freed and reused, waits for
                // the copy out first.
                self.dev.cuda_stream().wait(&self.copied).map_err(wrap)?;
                drop(t);
            }
            Ok(())
        }

        pub(super) fn fetch(mut self) -> Result<(Tensor, CudaEvent)> {
            self.release()?;
            // What may fail comes before the buffer is taken: on failure the drop gives it back
            // to the pool (freed only after the side stream is done), never frees it under a
            // queued copy.
            let out = crate::device::memory::empty(&self.dev, &self.dims, self.dtype)?;
            let (dst, _) = crate::device::memory::first(&out, "the fetched tensor")?;
            let side = side(&self.dev)?;
            let buf = self.buf.take().ok_or_else(|| {
                candle_core::Error::Msg("an offloaded tensor fetched twice".into())
            })?;
            // The copy back writes memory the compute stream just allocated.
            side.join(&self.dev.cuda_stream()).map_err(wrap)?;
            let bytes = out.elem_count() * self.dtype.size_in_bytes();
            let span = trace::span_on(trace::Track::Copy, || copy_name("back", bytes), &side);
            // SAFETY: `dst` is `bytes` fresh bytes of `out`, the buffer holds the copy out
            // (queued earlier on this stream); the buffer goes back to the pool, where its next
            // user queues its copy on this same stream, after this one.
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, buf.ptr, bytes, side.cu_stream()) }
                .result()
                .map_err(wrap)?;
            drop(span);
            let done = side.record_event(None).map_err(wrap)?;
            give(ordinal(&self.dev), buf);
            Ok((out, done))
        }
    }

    impl Drop for Pinned {
        /// A parked tensor never fetched (a step that failed half-way): the device memory is
        /// let go after the copy out, the buffer returns to the pool (freed only by `trim`, after
        /// the side stream is done with it).
        fn drop(&mut self) {
            let _ = self.release();
            if let Some(buf) = self.buf.take() {
                give(ordinal(&self.dev), buf);
            }
        }
    }

    pub(super) fn wait_for(t: &Tensor, done: &CudaEvent) -> Result<()> {
        if let candle_core::Device::Cuda(dev) = t.device() {
            dev.cuda_stream().wait(done).map_err(wrap)?;
        }
        Ok(())
    }

    pub(super) fn trim() -> Result<()> {
        let mut p = pool();
        for s in p.side.values() {
            s.synchronize().map_err(wrap)?;
        }
        p.free.clear();
        p.pinned = 0;
        Ok(())
    }

    pub(super) fn pinned_bytes() -> u64 {
        pool().pinned
    }
}
