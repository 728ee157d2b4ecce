//! Devices: naming them ([`DeviceSpec`], the one parser), one `Device` per GPU for the whole
//! process (candle treats two `Device::new_cuda(0)` as different devices), set up once for
//! training (memory pool, event tracking), moving tensors between them, and what they report
//! (free memory, the pool's use, the budgets placement may use). Every question this crate asks
//! a GPU is asked here; the planner (`crate::plan`) takes the answers as numbers.

pub mod budget;
pub mod host;
#[cfg(feature = "cuda")]
pub mod libs;
pub mod machine;
#[cfg(feature = "cuda")]
pub mod memory;
pub mod offload;
#[cfg(feature = "cuda")]
pub mod peer;
#[cfg(feature = "cuda")]
pub mod pool;
pub mod spec;
pub mod trace;

use candle_core::Device;

pub use budget::{Budget, CUDA_RUNTIME_BYTES};
pub use host::{HEAP_BYTES, heap_budget, host_available, host_room, memory_pressure};
pub use machine::{Card, Machine};
pub use spec::DeviceSpec;

use crate::{Error, Result};

/// The device `spec` names: `auto` (see [`auto`]), the CPU, or a GPU (`cuda`: the first).
pub fn resolve(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Auto => auto(),
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => cuda(ordinal.unwrap_or(0)),
    }
}

/// The first GPU if there is one (and this is a CUDA build), else the CPU; under data parallel
/// (`WORLD_SIZE` above 1) the rank's own GPU, `LOCAL_RANK`.
pub fn auto() -> Result<Device> {
    if candle_core::utils::cuda_is_available() {
        let local =
            crate::dist::World::from_vars(|k| std::env::var(k).ok())?.map_or(0, |w| w.local_rank);
        // A launcher that gives each rank its own GPU through CUDA_VISIBLE_DEVICES leaves one.
        let own = std::env::var("CUDA_VISIBLE_DEVICES")
            .is_ok_and(|v| !v.contains(',') && !v.trim().is_empty());
        if own {
            return cuda(0);
        }
        let gpus = gpu_count();
        if local > 0 && local >= gpus {
            return Err(Error::InvalidArgument(format!(
                "rank {local} on this machine needs GPU {}, and it has {gpus} GPU(s): \
                 start at most that many ranks (`--nproc-per-node`), or give each rank its GPU \
                 with CUDA_VISIBLE_DEVICES",
                DeviceSpec::gpu(local)
            )));
        }
        cuda(local)
    } else {
        Ok(Device::Cpu)
    }
}

/// GPU `ordinal`, created and prepared on first use, the same `Device` afterwards.
pub fn cuda(ordinal: usize) -> Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut map = DEVICES
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| Error::InvalidArgument("device registry poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        pool::prepare(d)?;
    }
    map.insert(ordinal, device.clone());
    Ok(device)
}

/// Servers of this process decoding on its devices (see [`turn`]).
static SERVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a server of this process as running (`true`) or stopped (`false`).
pub fn serving(on: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    if on {
        SERVING.fetch_add(1, SeqCst);
    } else {
        SERVING.fetch_sub(1, SeqCst);
    }
}

/// Turns at the devices while this process serves: a training step and a server's decode step
/// (a recipe serving the model it trains) take turns instead of running at once; each holds the
/// guard for one step. `None` (no turn to take) while nothing serves, so the ranks of a
/// data-parallel run in one process never wait on each other here.
pub fn turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    (SERVING.load(std::sync::atomic::Ordering::SeqCst) > 0).then(|| {
        TURN.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
}

/// GPUs this process sees (0 in a build without CUDA or without a driver).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        if result::init().is_ok() {
            return result::device::get_count().map_or(0, |n| usize::try_from(n).unwrap_or(0));
        }
    }
    0
}

/// `t` on `device`. Between two GPUs this is a peer copy the host does not wait for (candle's
/// `to_device` goes through the host and waits for the source GPU), so `t` must not be written
/// in place afterwards; otherwise candle's move, which is nothing when `t` is there already.
pub fn to(t: &candle_core::Tensor, device: &Device) -> candle_core::Result<candle_core::Tensor> {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(from), Device::Cuda(dst)) = (t.device(), device)
        && from.id() != dst.id()
    {
        return peer::copy(t, dst);
    }
    t.to_device(device)
}

/// Free bytes on `device`: a GPU's free memory with what its pool keeps for reuse and no
/// tensor holds (this process's to use; the driver counts it as used), or for the CPU what this
/// process can still allocate ([`host_room`]: the system's available memory, within the
/// container's and the address-space limits); `None` when neither says.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match memory(device) {
        Some((used, total)) => {
            let kept = pool(device).map_or(0, |p| p.reserved.saturating_sub(p.in_use));
            Some(total.saturating_sub(used) + kept)
        }
        None if device.is_cpu() => host_room(),
        None => None,
    }
}

/// What placement may use on each device (see [`budget::budgets`]): `max_memory` where it
/// names a device, else what each GPU has free (each GPU is set up to be asked) and what the
/// system has available. Only what the answer needs is asked.
pub fn budgets(max_memory: &[(DeviceSpec, u64)]) -> Result<Vec<Budget>> {
    let probe = max_memory.is_empty();
    let gpus = if probe || max_memory.iter().any(|(d, _)| d.is_gpu()) {
        gpu_count()
    } else {
        0
    };
    budget::budgets(
        max_memory,
        gpus,
        |i| Ok(free_bytes(&cuda(i)?).unwrap_or(0)),
        if probe { host_room() } else { None },
    )
}

/// An error unless `bytes` fit in what `device` has free (a GPU's free memory, the system's
/// available memory for the CPU): `what` would otherwise abort the process on a failed
/// allocation.
pub fn check_fits(bytes: f64, device: &Device, what: &str) -> Result<()> {
    let Some(free) = free_bytes(device) else {
        return Ok(());
    };
    let name = if device.is_cpu() {
        "available to this process"
    } else {
        "free on the GPU"
    };
    if !bytes.is_finite() || bytes > free as f64 {
        return Err(Error::InvalidArgument(format!(
            "{what} needs {} and {} is {name}",
            crate::bytes::human(bytes),
            crate::bytes::human(free as f64)
        )));
    }
    Ok(())
}

/// `(used, total)` bytes of a CUDA device as the driver sees it (the pool's reserve included);
/// `None` on the CPU (or when the driver does not say).
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device()
        && let Ok((free, total)) = d.cuda_stream().context().mem_get_info()
    {
        return Some(((total - free) as u64, total as u64));
    }
    let _ = device;
    None
}

/// What the engine's memory pool on a GPU holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Bytes held by live tensors.
    pub in_use: u64,
    /// Bytes the pool holds in all (freed memory is kept for reuse).
    pub reserved: u64,
    /// The most bytes held by live tensors since [`reset_peak`].
    pub peak: u64,
}

/// The memory pool of a GPU; `None` on the CPU.
pub fn pool(device: &Device) -> Option<PoolUsage> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device()
        && let Ok((in_use, reserved, peak)) = pool::pool_usage(d)
    {
        return Some(PoolUsage {
            in_use,
            reserved,
            peak: peak.max(in_use),
        });
    }
    let _ = device;
    None
}

/// Starts measuring a new peak on a GPU (nothing on the CPU).
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device() {
        // A driver that cannot reset it only makes the peak cover more; nothing to report.
        let _ = pool::reset_pool_peak(d);
    }
    let _ = device;
}

/// Bytes as GiB for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// `GPU memory: 1.2 GiB in use (2.0 GiB held by the pool), 139.8 GiB total`, or `None` on the CPU.
pub fn memory_line(device: &Device) -> Option<String> {
    let (used, total) = memory(device)?;
    Some(match pool(device) {
        Some(p) => format!(
            "GPU memory: {:.1} GiB in use ({:.1} GiB held by the pool), {:.1} GiB total",
            gib(p.in_use),
            gib(p.reserved),
            gib(total)
        ),
        None => format!(
            "GPU memory: {:.1} GiB used of {:.1} GiB",
            gib(used),
            gib(total)
        ),
    })
}
