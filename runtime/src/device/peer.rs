//! Tensors moved from one GPU to another without the host. candle's `to_device` between two GPUs
//! reads the tensor back to the host and uploads it again, which waits for everything queued on
//! the source GPU; a model over several GPUs then has one GPU working at a time whatever the
//! schedule. Here the copy is a peer copy queued on the destination's stream: it waits (on the
//! GPU, through an event) for the work that wrote the source, the destination's later work waits
//! for it, and the host never waits, so the pipelined schedule keeps every GPU busy. The source
//! stays alive until the copy is done (its memory is freed on its own stream, which never waits
//! for the destination), held in a list that lets go of each copy once its event has passed.
//! So a source must not be written in place after it was copied (every caller moves a fresh
//! tensor: a block's output, a gradient, a table). Each pair of GPUs is linked once: each
//! reads the other's memory pool directly (NVLink or PCIe) where the hardware allows.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{self, CudaEvent, sys};
use candle_core::{Result, Tensor};

/// Sources of copies still in flight, with the event each copy's end records.
fn in_flight() -> &'static Mutex<Vec<(Tensor, CudaEvent)>> {
    static LIST: OnceLock<Mutex<Vec<(Tensor, CudaEvent)>>> = OnceLock::new();
    LIST.get_or_init(Mutex::default)
}

/// Lets each GPU of the pair read the other's memory directly (NVLink or PCIe) once: access to
/// the other's context (`cuCtxEnablePeerAccess`) and to its memory pool, where the tensors live
/// (`cuMemPoolSetAccess`; the context's access does not reach pool memory). A pair that cannot
/// still copies, staged by the driver.
fn link(src: &CudaDevice, dst: &CudaDevice) -> Result<()> {
    static LINKED: OnceLock<Mutex<HashSet<(usize, usize)>>> = OnceLock::new();
    let (a, b) = (
        src.cuda_stream().context().ordinal(),
        dst.cuda_stream().context().ordinal(),
    );
    if a == b {
        return Ok(());
    }
    let mut linked = LINKED
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("peer link registry poisoned".into()))?;
    let pair = (a.min(b), a.max(b));
    if linked.contains(&pair) {
        return Ok(());
    }
    for (me, peer) in [(src, dst), (dst, src)] {
        let (mc, pc) = (
            me.cuda_stream().context().clone(),
            peer.cuda_stream().context().clone(),
        );
        let mut can = 0;
        // SAFETY: both are valid device handles of this process.
        unsafe { sys::cuDeviceCanAccessPeer(&raw mut can, mc.cu_device(), pc.cu_device()) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        if can == 0 {
            continue;
        }
        mc.bind_to_thread().map_err(candle_core::Error::wrap)?;
        // SAFETY: `pc` is a live context; enabling access twice only returns an error we allow.
        let r = unsafe { sys::cuCtxEnablePeerAccess(pc.cu_ctx(), 0) };
        if r != sys::CUresult::CUDA_SUCCESS
            && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
        {
            r.result().map_err(candle_core::Error::wrap)?;
        }
        // `me` reads and writes `peer`'s pool.
        let desc = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: i32::try_from(mc.ordinal()).unwrap_or(i32::MAX),
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let pool = super::pool::default_pool(peer)?;
        // SAFETY: `pool` is the peer device's default pool and `desc` one valid access entry.
        unsafe { sys::cuMemPoolSetAccess(pool, &raw const desc, 1) }
            .result()
            .map_err(candle_core::Error::wrap)?;
    }
    linked.insert(pair);
    Ok(())
}

/// `t` (on a GPU) copied to `dst`, queued on `dst`'s stream after the work that wrote `t`; the
/// host does not wait. `dst` may be another stream of the same GPU.
pub fn copy(t: &Tensor, dst: &CudaDevice) -> Result<Tensor> {
    let t = t.contiguous()?;
    let (from, src) = super::memory::first(&t, "the peer copy's source")?;
    link(&src, dst)?;
    // The copy writes every byte of it.
    let out = super::memory::empty(dst, t.dims(), t.dtype())?;
    let to = super::memory::first(&out, "the peer copy's destination")?.0;
    let (src_stream, dst_stream) = (src.cuda_stream(), dst.cuda_stream());
    dst_stream
        .join(&src_stream)
        .map_err(candle_core::Error::wrap)?;
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    // SAFETY: `from` holds `bytes` bytes of the source (kept alive below until the copy's event
    // passes) and `to` as many of the fresh buffer; both contexts are live.
    unsafe {
        driver::result::memcpy_peer_async(
            dst_stream.context().cu_ctx(),
            to,
            src_stream.context().cu_ctx(),
            from,
            bytes,
            dst_stream.cu_stream(),
        )
    }
    .map_err(candle_core::Error::wrap)?;
    let done = dst_stream
        .record_event(None)
        .map_err(candle_core::Error::wrap)?;
    let mut list = in_flight()
        .lock()
        .map_err(|_| candle_core::Error::Msg("peer copy list poisoned".into()))?;
    list.retain(|(_, e)| !e.is_complete());
    list.push((t.clone(), done));
    drop(list);
    Ok(out)
}
