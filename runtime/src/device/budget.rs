//! What placement may use on each device ([`Budget`]), from `max_memory` and what the devices
//! report. Pure arithmetic: [`super::budgets`] asks the devices and passes their answers in.

use super::spec::DeviceSpec;
use crate::{Error, Result};

/// What the CUDA context, cuBLAS and cuDNN hold outside the memory pool (the driver's figure
/// for a process minus its pool's peak, measured on the H200 with CUDA 13: 0.69-0.80 GiB).
pub const CUDA_RUNTIME_BYTES: u64 = 800 << 20;

/// A device and the bytes a plan may use on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `cuda:N` or `cpu`.
    pub device: DeviceSpec,
    /// Bytes.
    pub bytes: u64,
}

/// `max_memory` as scripts write it: each key a device (`cpu`, `cuda:N`, or `N` for GPU `N`).
pub fn max_memory(entries: &[(String, u64)]) -> Result<Vec<(DeviceSpec, u64)>> {
    entries
        .iter()
        .map(|(name, bytes)| match name.parse::<DeviceSpec>() {
            Ok(d) if d.is_one_device() => Ok((d, *bytes)),
            _ => Err(Error::InvalidArgument(format!(
                "`max_memory` key `{name}`: use `cpu` or `cuda:N`"
            ))),
        })
        .collect()
}

/// What placement may use on each device, in placement order (GPUs by index, then the CPU):
/// `max_memory` where it names a device (only those devices then), else 90% of a GPU's free
/// bytes (`free(i)`, asked only then) less the CUDA runtime's share, and on the CPU what the
/// system has available (`host`; unlimited when unknown). `gpus`: the GPUs the machine has.
pub fn budgets(
    max_memory: &[(DeviceSpec, u64)],
    gpus: usize,
    mut free: impl FnMut(usize) -> Result<u64>,
    host: Option<u64>,
) -> Result<Vec<Budget>> {
    let mut out = Vec::new();
    if max_memory.is_empty() {
        for i in 0..gpus {
            let bytes = (free(i)? as f64 * 0.9) as u64;
            out.push(Budget {
                device: DeviceSpec::gpu(i),
                bytes: bytes.saturating_sub(CUDA_RUNTIME_BYTES),
            });
        }
        out.push(Budget {
            device: DeviceSpec::Cpu,
            bytes: host.unwrap_or(u64::MAX),
        });
        return Ok(out);
    }
    let mut on_gpus: Vec<(usize, u64)> = Vec::new();
    for (device, bytes) in max_memory {
        match *device {
            DeviceSpec::Cuda(Some(i)) if i < gpus => on_gpus.push((i, *bytes)),
            DeviceSpec::Cuda(_) => {
                return Err(Error::InvalidArgument(format!(
                    "`max_memory` names `{device}`; this machine has {gpus} GPU(s)"
                )));
            }
            _ => {}
        }
    }
    on_gpus.sort_unstable();
    out.extend(on_gpus.into_iter().map(|(i, bytes)| Budget {
        device: DeviceSpec::gpu(i),
        bytes,
    }));
    if let Some((_, bytes)) = max_memory.iter().find(|(d, _)| d.is_cpu()) {
        out.push(Budget {
            device: DeviceSpec::Cpu,
            bytes: *bytes,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn budgets_follow_max_memory_else_what_is_free() {
        let free = |i: usize| Ok((i as u64 + 1) * 10 * GIB);
        let probed = budgets(&[], 2, free, Some(64 * GIB)).unwrap();
        assert_eq!(
            probed,
            vec![
                Budget {
                    device: DeviceSpec::gpu(0),
                    bytes: 9 * GIB - CUDA_RUNTIME_BYTES
                },
                Budget {
                    device: DeviceSpec::gpu(1),
                    bytes: 18 * GIB - CUDA_RUNTIME_BYTES
                },
                Budget {
                    device: DeviceSpec::Cpu,
                    bytes: 64 * GIB
                },
            ]
        );
        let given =
            max_memory(&[("cpu".into(), 5), ("1".into(), 7), ("cuda:0".into(), 6)]).unwrap();
        let asked = |_: usize| -> Result<u64> { panic!("a GPU was asked with max_memory given") };
        let b = budgets(&given, 2, asked, None).unwrap();
        let devices: Vec<String> = b
            .iter()
            .map(|b| format!("{} {}", b.device, b.bytes))
            .collect();
        assert_eq!(devices, ["cuda:0 6", "cuda:1 7", "cpu 5"]);
        let e = budgets(&given, 1, asked, None).unwrap_err().to_string();
        assert!(
            e.contains("`max_memory` names `cuda:1`; this machine has 1 GPU(s)"),
            "{e}"
        );
        for bad in ["cuda", "auto", "gpu0"] {
            let e = max_memory(&[(bad.into(), 1)]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`max_memory` key `{bad}`: use `cpu` or `cuda:N`")),
                "{e}"
            );
        }
    }
}
