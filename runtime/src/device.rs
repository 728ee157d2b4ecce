//! Facts about devices that the engine reports (memory before training).

use candle_core::Device;

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
