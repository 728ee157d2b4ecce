//! Devices: one `Device` per GPU for the whole process (candle treats two `Device::new_cuda(0)`
//! as different devices), set up once for training (memory pool, event tracking), and the facts
//! the engine reports (memory before training).

use candle_core::Device;

use crate::Result;

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
            return Err(crate::Error::InvalidArgument(format!(
                "rank {local} on this machine needs GPU cuda:{local}, and it has {gpus} GPU(s): \
                 start at most that many ranks (`--nproc-per-node`), or give each rank its GPU \
                 with CUDA_VISIBLE_DEVICES"
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

/// `t` on `device`. Between two GPUs this is a peer copy the host does not wait for (candle's
/// `to_device` goes through the host and waits for the source GPU), so `t` must not be written
/// in place afterwards; otherwise candle's move, which is nothing when `t` is there already.
pub fn to(t: &candle_core::Tensor, device: &Device) -> candle_core::Result<candle_core::Tensor> {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(from), Device::Cuda(dst)) = (t.device(), device)
        && from.id() != dst.id()
    {
        return crate::nn::cuda::peer::copy(t, dst);
    }
    t.to_device(device)
}

/// The `key:` line of a `/proc` status file (`/proc/meminfo`, `/proc/self/status`) in bytes.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The address-space limit (`ulimit -v`), when one is set.
fn address_space_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A number file of cgroup v2 (`memory.max`, `memory.current`), when it holds a number.
fn cgroup_value(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The heap the process may grow to before a script is stopped: half the address-space limit,
/// 90% of the container's memory limit, 95% of the machine's memory, whichever is least.
pub fn heap_budget() -> Option<usize> {
    // The allocator reserves address space well beyond what it hands out (mimalloc's large
    // objects: about 40% more was measured): half the address-space limit in use.
    let budgets = [
        address_space_limit().map(|b| b / 2),
        cgroup_value("memory.max").map(|b| b / 10 * 9),
        proc_kb("/proc/meminfo", "MemTotal:").map(|b| b / 20 * 19),
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
    let human = |b: u64| crate::plan::memory::human(b as f64);
    if let (Some(avail), Some(total)) = (host_available(), proc_kb("/proc/meminfo", "MemTotal:"))
        && (avail < total / 50 || avail < 256 << 20)
    {
        return Some(format!(
            "the machine has {} of its {} memory left",
            human(avail),
            human(total)
        ));
    }
    if let (Some(max), Some(cur)) = (cgroup_value("memory.max"), cgroup_value("memory.current"))
        && cur > max / 20 * 19
    {
        return Some(format!(
            "the container's memory limit of {} is nearly reached",
            human(max)
        ));
    }
    if let Some(max) = address_space_limit()
        && let Some(size) = proc_kb("/proc/self/status", "VmSize:")
        && size > max / 5 * 4
    {
        return Some(format!(
            "the address-space limit of {} (`ulimit -v`) is nearly reached",
            human(max)
        ));
    }
    None
}

/// Bytes of memory the system can still give (Linux's `MemAvailable`; `None` elsewhere).
pub fn host_available() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemAvailable:")
}

/// Free bytes on `device`: a GPU's free memory, or for the CPU the memory the system can still
/// give; `None` when neither says.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match memory(device) {
        Some((used, total)) => Some(total.saturating_sub(used)),
        None if device.is_cpu() => host_available(),
        None => None,
    }
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
            let free = free_bytes(&cuda(i)?).unwrap_or(0);
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
