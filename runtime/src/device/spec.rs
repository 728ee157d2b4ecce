//! How a device is named ([`DeviceSpec`]): the one parser of every place a script names a
//! device: `device`, `device_map`'s values and `max_memory`'s keys.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A device as a script names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    /// `auto`: the first GPU if there is one (the rank's own under data parallel), else the CPU.
    Auto,
    /// `cpu`.
    Cpu,
    /// `cuda:N`, `N` (a GPU's index, as accelerate's maps write it), or `cuda` (`None`: the
    /// first GPU where one device is meant).
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// GPU `ordinal`.
    pub fn gpu(ordinal: usize) -> Self {
        DeviceSpec::Cuda(Some(ordinal))
    }

    /// The one device `device` is (`cpu`, `cuda:N`).
    pub fn of(device: &candle_core::Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::gpu(gpu_id),
            _ => DeviceSpec::Cpu,
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }

    /// Whether this names a GPU (`cuda`, `cuda:N`).
    pub fn is_gpu(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Whether this names one device of the machine (`cpu`, `cuda:N`), as a plan's devices do.
    pub fn is_one_device(self) -> bool {
        matches!(self, DeviceSpec::Cpu | DeviceSpec::Cuda(Some(_)))
    }
}

/// `auto`, `cpu`, `cuda`, `cuda:N`, or `N` (GPU `N`).
impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let ordinal = |n: &str| {
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse::<usize>().ok())
                .flatten()
        };
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .map_or_else(|| ordinal(s), ordinal)
                .map(DeviceSpec::gpu)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown device `{s}`; use `auto`, `cpu` or `cuda:N`"
                    ))
                }),
        }
    }
}

/// As scripts and plans spell it: `auto`, `cpu`, `cuda`, `cuda:N`.
impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(i)) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_to_one_spec() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(None)),
            ("cuda:0", DeviceSpec::gpu(0)),
            ("cuda:12", DeviceSpec::gpu(12)),
            ("3", DeviceSpec::gpu(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec, "{text}");
        }
        for spec in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::gpu(7)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in [
            "", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "-1", "CPU", "cuda0",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "unknown device `{bad}`; use `auto`, `cpu` or `cuda:N`"
                )),
                "{e}"
            );
        }
    }
}
