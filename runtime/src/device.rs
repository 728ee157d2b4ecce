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

/// The device named `cpu` or `cuda:N`.
pub fn by_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n => match n.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => cuda(i),
            None => Err(crate::Error::InvalidArgument(format!(
                "unknown device `{name}`; use `cpu` or `cuda:N`"
            ))),
        },
    }
}

/// Heap bytes the process holds now, kept by a counting global allocator when the binary
/// installs one (the `qscript` CLI does); 0 otherwise.
pub static HEAP_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The heap the process may grow to before a script is stopped: half the address-space limit,
/// 90% of the container's memory limit, 95% of the machine's memory, whichever is least.
pub fn heap_budget() -> Option<usize> {
    let limit_as = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l
                .lines()
                .find(|x| x.starts_with("Max address space"))?
                .to_string();
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    // The allocator reserves address space well beyond what it hands out (mimalloc's large
    // objects: about 40% more was measured): half the address-space limit in use.
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    });
    let budgets = [
        limit_as.map(|b| b / 2),
        cgroup.map(|b| b / 10 * 9),
        total.map(|b| b / 20 * 19),
    ];
    budgets
        .into_iter()
        .flatten()
        .min()
        .and_then(|b| usize::try_from(b).ok())
}

/// Why the process is about to run out of memory, if it is: the system's available memory
/// nearly gone, the container's memory limit (cgroup v2) nearly reached, or the address-space
/// limit (`ulimit -v`) nearly reached. Cheap enough to call every million script operations.
pub fn memory_pressure() -> Option<String> {
    let kb = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    if let Ok(m) = std::fs::read_to_string("/proc/meminfo")
        && let (Some(avail), Some(total)) = (kb(&m, "MemAvailable:"), kb(&m, "MemTotal:"))
        && (avail < total / 50 || avail < 256 << 20)
    {
        return Some(format!(
            "the machine has {} of its {} memory left",
            crate::plan::memory::human(avail as f64),
            crate::plan::memory::human(total as f64)
        ));
    }
    let read_u64 = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) && cur > max / 20 * 19
    {
        return Some(format!(
            "the container's memory limit of {} is nearly reached",
            crate::plan::memory::human(max as f64)
        ));
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(line) = limits.lines().find(|l| l.starts_with("Max address space"))
        && let Some(Ok(max)) = line.split_whitespace().nth(3).map(str::parse::<u64>)
        && let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(size) = kb(&status, "VmSize:")
        && size > max / 5 * 4
    {
        return Some(format!(
            "the address-space limit of {} (`ulimit -v`) is nearly reached",
            crate::plan::memory::human(max as f64)
        ));
    }
    None
}

/// Bytes of memory the system can still give (Linux's `MemAvailable`; `None` elsewhere).
pub fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What placement may use on each device, in placement order (GPUs by index, then the CPU):
/// `max_memory` where it names a device, else 90% of a GPU's free memory less the CUDA
/// runtime's share, and the memory the system has available.
pub fn budgets(max_memory: &[(String, u64)]) -> Result<Vec<crate::plan::Budget>> {
    let given = |d: &str| max_memory.iter().find(|(n, _)| n == d).map(|(_, b)| *b);
    let mut out = Vec::new();
    if max_memory.is_empty() {
        for i in 0..gpu_count() {
            let name = format!("cuda:{i}");
            let free = memory(&cuda(i)?).map_or(0, |(used, total)| total.saturating_sub(used));
            let bytes = (free as f64 * 0.9) as u64;
            out.push(crate::plan::Budget {
                device: name,
                bytes: bytes.saturating_sub(crate::plan::memory::CUDA_RUNTIME_BYTES),
            });
        }
        out.push(crate::plan::Budget {
            device: "cpu".into(),
            bytes: host_available().unwrap_or(u64::MAX),
        });
        return Ok(out);
    }
    let mut gpus: Vec<(usize, u64)> = Vec::new();
    for (name, bytes) in max_memory {
        if name == "cpu" {
            continue;
        }
        match name
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) if i < gpu_count() => gpus.push((i, *bytes)),
            Some(_) => {
                return Err(crate::Error::InvalidArgument(format!(
                    "`max_memory` names `{name}`; this machine has {} GPU(s)",
                    gpu_count()
                )));
            }
            None => {
                return Err(crate::Error::InvalidArgument(format!(
                    "`max_memory` key `{name}`: use `cpu` or `cuda:N`"
                )));
            }
        }
    }
    gpus.sort_unstable();
    for (i, bytes) in gpus {
        out.push(crate::plan::Budget {
            device: format!("cuda:{i}"),
            bytes,
        });
    }
    if let Some(b) = given("cpu") {
        out.push(crate::plan::Budget {
            device: "cpu".into(),
            bytes: b,
        });
    }
    Ok(out)
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
