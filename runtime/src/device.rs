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

/// `(used, total)` bytes of a CUDA device; `None` on the CPU (or when the driver does not say).
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

/// `12.3 GiB used of 79.1 GiB on cuda:0`, or `None` on the CPU.
pub fn memory_line(device: &Device) -> Option<String> {
    let (used, total) = memory(device)?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    Some(format!(
        "GPU memory: {:.1} GiB used of {:.1} GiB",
        gib(used),
        gib(total)
    ))
}
