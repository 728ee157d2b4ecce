//! Devices: one `Device` per GPU for the whole process (candle treats two `Device::new_cuda(0)`
//! as different devices), set up once for training (memory pool, event tracking), and the facts
//! the engine reports (memory before training).

use candle_core::Device;

use crate::Result;

/// The first GPU if there is one (and this is a CUDA build), else the CPU.
pub fn auto() -> Result<Device> {
    if candle_core::utils::cuda_is_available() {
        cuda(0)
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
        .map_err(|_| crate::Error::InvalidArgument("device registry poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        crate::nn::cuda::prepare(d)?;
    }
    map.insert(ordinal, device.clone());
    Ok(device)
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
        && let Ok((in_use, reserved, peak)) = crate::nn::cuda::pool_usage(d)
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
        let _ = crate::nn::cuda::reset_pool_peak(d);
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
