//! The host's memory: what the process holds, the limits it runs under, what the system can
//! still give.

/// Heap bytes the process holds now, kept by a counting global allocator when the binary
/// installs one (the `qscript` CLI does); 0 otherwise.
pub static HEAP_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

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
    let human = |b: u64| crate::bytes::human(b as f64);
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

/// Bytes this process can still allocate: what the system can give ([`host_available`]), or
/// less where the container's memory limit (cgroup v2) or the address-space limit (`ulimit -v`)
/// leaves less. Of the address space left, half counts, as in [`heap_budget`] (the allocator
/// reserves more than it hands out). `None` when nothing says.
pub fn host_room() -> Option<u64> {
    room(
        host_available(),
        cgroup_value("memory.max").zip(cgroup_value("memory.current")),
        address_space_limit(),
        proc_kb("/proc/self/status", "VmSize:"),
    )
}

/// [`host_room`] from what the system has available, the cgroup's `(max, current)`, the
/// address-space limit and the address space mapped now.
fn room(
    available: Option<u64>,
    cgroup: Option<(u64, u64)>,
    address_limit: Option<u64>,
    mapped: Option<u64>,
) -> Option<u64> {
    let cgroup = cgroup.map(|(max, cur)| max.saturating_sub(cur));
    let address_space = address_limit.map(|max| max.saturating_sub(mapped.unwrap_or(0)) / 2);
    [available, cgroup, address_space]
        .into_iter()
        .flatten()
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room left is the tightest of the machine's, the container's and the address space's
    /// (half of what is left of it): under `ulimit -v 4G` a 6.5 GB model on a machine with 20 GB
    /// available once passed the check and aborted on its allocation.
    #[test]
    fn the_room_is_the_tightest_limit() {
        const G: u64 = 1 << 30;
        assert_eq!(
            room(Some(20 * G), None, Some(4 * G), Some(G)),
            Some(3 * G / 2)
        );
        assert_eq!(
            room(Some(20 * G), Some((8 * G, 7 * G)), None, None),
            Some(G)
        );
        assert_eq!(
            room(Some(2 * G), Some((8 * G, G)), Some(64 * G), Some(G)),
            Some(2 * G)
        );
        assert_eq!(room(None, None, Some(4 * G), Some(5 * G)), Some(0));
        assert_eq!(room(None, None, None, Some(G)), None);
    }
}
