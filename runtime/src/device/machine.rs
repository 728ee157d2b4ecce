//! The machine a run is planned for ([`Machine`]): this one, whose devices are asked, or GPUs
//! named by `qscript check --gpu` ([`Card`]), so a laptop or CI plans a cluster's run without a
//! GPU (or a CUDA build). Only [`Machine::Here`] asks a device.

use std::fmt;
use std::str::FromStr;

use super::budget::Budget;
use super::spec::DeviceSpec;
use crate::{Error, Result};

const MIB: u64 = 1 << 20;

/// GPUs a plan can name, with the memory `nvidia-smi` reports as their total, and whether they
/// compute in bf16 (`dtype: "auto"` then loads bf16, else f16).
const CARDS: &[(&str, u64, bool)] = &[
    ("h200-141gb", 143_771 * MIB, true),
    ("h100-94gb", 95_830 * MIB, true),
    ("h100-80gb", 81_559 * MIB, true),
    ("a100-80gb", 81_920 * MIB, true),
    ("a100-40gb", 40_960 * MIB, true),
    ("l40s-48gb", 46_068 * MIB, true),
    ("a6000-48gb", 49_140 * MIB, true),
    ("l4-24gb", 23_034 * MIB, true),
    ("a10g-24gb", 23_028 * MIB, true),
    ("rtx4090-24gb", 24_564 * MIB, true),
    ("rtx3090-24gb", 24_576 * MIB, true),
    ("v100-32gb", 32_768 * MIB, false),
    ("v100-16gb", 16_384 * MIB, false),
    ("t4-16gb", 15_360 * MIB, false),
];

/// GPUs of one kind, as `--gpu` names them: a card (`h100-80gb`, or its family alone, `h100`,
/// for the first of that family) or a size (`24GiB`, `40GB`), optionally `N x` before it
/// (`2xh100-80gb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Card {
    /// The card's name as the table spells it, or the size as given.
    pub name: String,
    /// How many.
    pub count: usize,
    /// Memory of each, in bytes.
    pub bytes: u64,
    /// Whether it computes in bf16.
    pub bf16: bool,
}

impl FromStr for Card {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let (count, name) = match t.split_once('x') {
            Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (
                n.parse::<usize>().ok().filter(|&n| (1..=64).contains(&n)),
                rest,
            ),
            _ => (Some(1), t.as_str()),
        };
        let bad = || {
            let names: Vec<&str> = CARDS.iter().map(|c| c.0).collect();
            Error::InvalidArgument(format!(
                "`--gpu {s}`: expected a card ({}), a size (`24GiB`, `40GB`), or either after a \
                 count from 1 to 64 (`2xh100-80gb`)",
                names.join(", ")
            ))
        };
        let count = count.ok_or_else(bad)?;
        let name = name.trim();
        if let Some(&(n, bytes, bf16)) = CARDS
            .iter()
            .find(|c| c.0 == name || c.0.split('-').next() == Some(name))
        {
            return Ok(Card {
                name: n.to_string(),
                count,
                bytes,
                bf16,
            });
        }
        let bytes = crate::bytes::parse_size(name).map_err(|()| bad())?;
        if !(MIB..=(1u64 << 50)).contains(&bytes) {
            return Err(bad());
        }
        // A size keeps the user's spelling.
        let given = s.trim();
        Ok(Card {
            name: given[given.len() - name.len()..].to_string(),
            count,
            bytes,
            bf16: true,
        })
    }
}

impl fmt::Display for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count > 1 {
            write!(f, "{}x ", self.count)?;
        }
        write!(
            f,
            "{} ({} each)",
            self.name,
            crate::bytes::human(self.bytes as f64)
        )
    }
}

/// The machine a run is planned for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Machine {
    /// This machine: its GPUs and memory are asked.
    #[default]
    Here,
    /// GPUs named by the user (`qscript check --gpu`), fresh and empty; the host's memory is
    /// not limited.
    Named(Card),
}

impl Machine {
    /// The GPUs the machine has.
    pub fn gpu_count(&self) -> usize {
        match self {
            Machine::Here => super::gpu_count(),
            Machine::Named(c) => c.count,
        }
    }

    /// The one device `spec` means here: `auto` the first GPU if there is one (the rank's own
    /// under data parallel), else the CPU; `cuda` GPU 0. A GPU the machine lacks is an error.
    pub fn resolve(&self, spec: DeviceSpec) -> Result<DeviceSpec> {
        let Machine::Named(card) = self else {
            return Ok(DeviceSpec::of(&super::resolve(spec)?));
        };
        let local = || {
            crate::dist::World::from_vars(|k| std::env::var(k).ok())
                .map(|w| w.map_or(0, |w| w.local_rank))
        };
        let ordinal = match spec {
            DeviceSpec::Cpu => return Ok(DeviceSpec::Cpu),
            DeviceSpec::Auto => local()?,
            DeviceSpec::Cuda(i) => i.unwrap_or(0),
        };
        if ordinal >= card.count {
            return Err(Error::InvalidArgument(format!(
                "`{spec}` means GPU {ordinal}, and the planned machine (`--gpu {card}`) has {} \
                 GPU(s)",
                card.count
            )));
        }
        Ok(DeviceSpec::gpu(ordinal))
    }

    /// Whether `device` (one device, as [`Machine::resolve`] gives) computes in bf16.
    pub fn supports_bf16(&self, device: DeviceSpec) -> bool {
        match self {
            _ if device.is_cpu() => true,
            Machine::Here => super::resolve(device).is_ok_and(|d| d.supports_bf16()),
            Machine::Named(c) => c.bf16,
        }
    }

    /// Free bytes on `device` (one device): asked here (see [`super::free_bytes`]), a named
    /// card's whole memory; `None` when nothing says.
    pub fn free_bytes(&self, device: DeviceSpec) -> Option<u64> {
        match self {
            Machine::Here => super::resolve(device)
                .ok()
                .and_then(|d| super::free_bytes(&d)),
            Machine::Named(c) if device.is_gpu() => Some(c.bytes),
            Machine::Named(_) => None,
        }
    }

    /// What placement may use on each device (see [`super::budget::budgets`]).
    pub fn budgets(&self, max_memory: &[(DeviceSpec, u64)]) -> Result<Vec<Budget>> {
        match self {
            Machine::Here => super::budgets(max_memory),
            Machine::Named(c) => super::budget::budgets(max_memory, c.count, |_| Ok(c.bytes), None),
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Machine::Here => f.write_str("this machine"),
            Machine::Named(c) => write!(f, "{c}, named by `--gpu`"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cards_parse_by_name_family_size_and_count() {
        let c: Card = "h100-80gb".parse().unwrap();
        assert_eq!(
            (c.name.as_str(), c.count, c.bytes),
            ("h100-80gb", 1, 81_559 * MIB)
        );
        let c: Card = "2xA100".parse().unwrap();
        assert_eq!(
            (c.name.as_str(), c.count, c.bytes),
            ("a100-80gb", 2, 81_920 * MIB)
        );
        let c: Card = "rtx4090-24gb".parse().unwrap();
        assert_eq!(c.bytes, 24_564 * MIB);
        let c: Card = "24GiB".parse().unwrap();
        assert_eq!((c.count, c.bytes, c.bf16), (1, 24 << 30, true));
        assert!(!"v100".parse::<Card>().unwrap().bf16);
        for bad in ["h900", "0xh100", "65xh100", "", "12", "1KiB", "x24GiB"] {
            let e = bad.parse::<Card>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`--gpu {bad}`: expected a card (h200-141gb")),
                "{e}"
            );
            assert!(
                e.contains("rtx4090-24gb") && e.contains("from 1 to 64"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_named_machine_resolves_and_budgets_without_asking_a_gpu() {
        let m = Machine::Named("2xrtx4090-24gb".parse().unwrap());
        assert_eq!(m.gpu_count(), 2);
        assert_eq!(m.resolve(DeviceSpec::Auto).unwrap(), DeviceSpec::gpu(0));
        assert_eq!(
            m.resolve(DeviceSpec::Cuda(None)).unwrap(),
            DeviceSpec::gpu(0)
        );
        assert_eq!(m.resolve(DeviceSpec::Cpu).unwrap(), DeviceSpec::Cpu);
        let e = m.resolve(DeviceSpec::gpu(2)).unwrap_err().to_string();
        assert!(
            e.contains("`cuda:2` means GPU 2, and the planned machine (`--gpu 2x rtx4090-24gb"),
            "{e}"
        );
        assert_eq!(m.free_bytes(DeviceSpec::gpu(1)), Some(24_564 * MIB));
        assert_eq!(m.free_bytes(DeviceSpec::Cpu), None);
        let b = m.budgets(&[]).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].device, DeviceSpec::Cpu);
        let limited = m.budgets(&[(DeviceSpec::gpu(1), 5 << 30)]).unwrap();
        assert_eq!(
            (limited[0].device, limited[0].bytes),
            (DeviceSpec::gpu(1), 5 << 30)
        );
    }
}
