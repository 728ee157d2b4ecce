//! `device_map`: which device holds each top-level module (the embedding, each decoder layer,
//! the final norm, the head), with HF accelerate's names and meanings. Pure arithmetic over the
//! modules' sizes and the devices' budgets (what the devices report comes in as numbers, see
//! [`crate::device::budgets`]), so every plan can be tested without the devices:
//! - `"sequential"` fills the devices in order (GPUs by index, then the CPU), each up to its
//!   budget;
//! - `"balanced"` spreads the modules evenly over the GPUs (each GPU's share of the total, the
//!   last one taking what is left), the CPU only for what does not fit;
//! - `"auto"` is `"balanced"`, as in accelerate;
//! - an explicit map names a device for each module (`"model.layers.3": "cuda:1"`); a prefix
//!   (`"model.layers"`, `"model"`) covers the modules under it, the longest match wins.
//!
//! The result, a [`Placement`], is the one device map: loading puts each module's weights where
//! it says, the engine runs its pipeline stages ([`Placement::pipeline_stages`]), and the run's
//! plan splits the memory estimate over its devices.

use std::fmt;
use std::ops::Range;

use crate::bytes::human;
use crate::device::budget::Budget;
use crate::device::spec::DeviceSpec;
use crate::model::ModuleId;
use crate::{Error, Result};

/// How to place the modules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceMap {
    /// `"auto"`: `"balanced"`.
    Auto,
    /// `"balanced"`.
    Balanced,
    /// `"sequential"`.
    Sequential,
    /// Module name (or prefix) -> device, as given (each device parsed as a [`DeviceSpec`]).
    Explicit(Vec<(String, String)>),
}
impl DeviceMap {
    /// `"auto"`, `"balanced"` or `"sequential"`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Self::Auto),
            "balanced" => Ok(Self::Balanced),
            "sequential" => Ok(Self::Sequential),
            other => Err(Error::InvalidArgument(format!(
                "`device_map: \"{other}\"`: use `\"auto\"`, `\"balanced\"`, `\"sequential\"` or a map of module names to devices"
            ))),
        }
    }
}

/// A top-level module and the bytes it needs on its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Which module.
    pub id: ModuleId,
    /// Bytes on its device (weights, and for training its share of the rest).
    pub bytes: u64,
}

/// A device a placement uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedDevice {
    /// The device (`cpu` or `cuda:N`).
    pub device: DeviceSpec,
    /// Bytes placed on it.
    pub used: u64,
    /// Its budget.
    pub budget: u64,
    /// `device` as plans spell it.
    name: String,
}

/// Where each module goes: the model's device map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Per module in model order: its device.
    pub modules: Vec<(ModuleId, DeviceSpec)>,
    /// Per device used, in budget order: bytes placed and its budget.
    pub devices: Vec<PlacedDevice>,
    /// The budgets are the user's `max_memory`: a run on this placement is checked against
    /// them as well as against what each device holds (a recipe checked for a 16 GiB card on an
    /// 80 GB one plans for 16 GiB).
    pub capped: bool,
}

impl Placement {
    /// The device of `module`.
    pub fn device(&self, module: ModuleId) -> Option<DeviceSpec> {
        self.modules
            .iter()
            .find(|(m, _)| *m == module)
            .map(|(_, d)| *d)
    }

    /// The device (`cpu`, `cuda:N`) of the module HF calls `module` (`model.layers.3`).
    pub fn device_of(&self, module: &str) -> Option<&str> {
        let device = self.device(ModuleId::parse(module)?)?;
        self.devices
            .iter()
            .find(|d| d.device == device)
            .map(|d| d.name.as_str())
    }

    /// The layers on `device`.
    pub fn layers_on(&self, device: DeviceSpec) -> usize {
        self.modules
            .iter()
            .filter(|(m, d)| *d == device && m.layer().is_some())
            .count()
    }

    /// The model's pipeline stages: runs of consecutive layers on one GPU, when the layers lie
    /// over several GPUs (each accumulation window can then run as a pipeline); `None` when they
    /// lie on one device or any of them on the CPU.
    pub fn pipeline_stages(&self) -> Option<Vec<Range<usize>>> {
        let mut runs: Vec<(Range<usize>, DeviceSpec)> = Vec::new();
        for (m, d) in &self.modules {
            let Some(i) = m.layer() else { continue };
            if !d.is_gpu() {
                return None;
            }
            match runs.last_mut() {
                Some((r, on)) if on == d && r.end == i => r.end = i + 1,
                _ => runs.push((i..i + 1, *d)),
            }
        }
        (runs.len() > 1).then(|| runs.into_iter().map(|(r, _)| r).collect())
    }
}

/// Places `modules` (in model order) over `budgets` (in preference order: GPUs by index, then
/// the CPU) as `map` says. A plan that cannot fit is an error naming what is short.
pub fn place(modules: &[Module], budgets: &[Budget], map: &DeviceMap) -> Result<Placement> {
    if budgets.is_empty() {
        return Err(Error::InvalidArgument(
            "no device to place the model on".into(),
        ));
    }
    let assigned: Vec<usize> = match map {
        DeviceMap::Explicit(entries) => explicit(modules, budgets, entries)?,
        DeviceMap::Sequential => fill(
            modules,
            &budgets.iter().map(|b| b.bytes).collect::<Vec<_>>(),
        )
        .ok_or_else(|| too_big(modules, budgets))?,
        DeviceMap::Auto | DeviceMap::Balanced => balanced(modules, budgets)
            .or_else(|| {
                fill(
                    modules,
                    &budgets.iter().map(|b| b.bytes).collect::<Vec<_>>(),
                )
            })
            .ok_or_else(|| too_big(modules, budgets))?,
    };
    let mut devices = Vec::new();
    for (b_idx, b) in budgets.iter().enumerate() {
        let used: u64 = modules
            .iter()
            .zip(&assigned)
            .filter(|(_, d)| **d == b_idx)
            .map(|(m, _)| m.bytes)
            .sum();
        if assigned.contains(&b_idx) {
            devices.push(PlacedDevice {
                device: b.device,
                used,
                budget: b.bytes,
                name: b.device.to_string(),
            });
        }
    }
    Ok(Placement {
        modules: modules
            .iter()
            .zip(&assigned)
            .map(|(m, &d)| (m.id, budgets[d].device))
            .collect(),
        devices,
        capped: false,
    })
}

/// Contiguous runs of modules of about equal bytes on each GPU: a module goes to the GPU whose
/// even share of the total holds the middle of its bytes. `None` when a GPU's run exceeds its
/// budget (then the devices fill in order, the CPU taking what is left).
fn balanced(modules: &[Module], budgets: &[Budget]) -> Option<Vec<usize>> {
    let gpus: Vec<usize> = (0..budgets.len())
        .filter(|&i| !budgets[i].device.is_cpu())
        .collect();
    if gpus.is_empty() {
        return None;
    }
    let total: u64 = modules.iter().map(|m| m.bytes).sum();
    let share = (total as f64 / gpus.len() as f64).max(1.0);
    let mut cum = 0u64;
    let mut out = Vec::with_capacity(modules.len());
    let mut used = vec![0u64; budgets.len()];
    for m in modules {
        let mid = cum as f64 + m.bytes as f64 / 2.0;
        let k = ((mid / share) as usize).min(gpus.len() - 1);
        cum += m.bytes;
        used[gpus[k]] += m.bytes;
        out.push(gpus[k]);
    }
    budgets
        .iter()
        .zip(&used)
        .all(|(b, u)| *u <= b.bytes)
        .then_some(out)
}

/// Modules in order onto devices in order, each device up to `caps[i]`; `None` if they do not
/// fit.
fn fill(modules: &[Module], caps: &[u64]) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(modules.len());
    let (mut dev, mut used) = (0usize, 0u64);
    for m in modules {
        while dev < caps.len() && used + m.bytes > caps[dev] {
            dev += 1;
            used = 0;
        }
        if dev == caps.len() {
            return None;
        }
        used += m.bytes;
        out.push(dev);
    }
    Some(out)
}

fn too_big(modules: &[Module], budgets: &[Budget]) -> Error {
    let total: u64 = modules.iter().map(|m| m.bytes).sum();
    let have: u64 = budgets.iter().map(|b| b.bytes).sum();
    let list = budgets
        .iter()
        .map(|b| format!("{} {}", b.device, human(b.bytes as f64)))
        .collect::<Vec<_>>()
        .join(", ");
    Error::InvalidArgument(format!(
        "the model needs {} and the devices allow {} ({list}): raise `max_memory`, add devices, \
         or give `cpu` a share in `max_memory` (the layers placed there run on the CPU)",
        human(total as f64),
        human(have as f64)
    ))
}

/// Whether the map entry `entry` (a module name or a prefix of names; `""` covers all) covers
/// the module `module`.
fn covers(entry: &str, module: ModuleId) -> bool {
    let name = module.hf_name();
    entry.is_empty()
        || name == entry
        || name
            .strip_prefix(entry)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn explicit(
    modules: &[Module],
    budgets: &[Budget],
    entries: &[(String, String)],
) -> Result<Vec<usize>> {
    // Per entry: the index of its device's budget.
    let mut on = Vec::with_capacity(entries.len());
    for (name, dev) in entries {
        let covers = modules.iter().any(|m| covers(name, m.id));
        if !covers {
            return Err(Error::InvalidArgument(format!(
                "`device_map`: `{name}` names no module of this model (its modules: `{}`, `{}` .. `{}`, `{}`, `{}`)",
                ModuleId::Embedding,
                ModuleId::Layer(0),
                ModuleId::Layer(modules.len().saturating_sub(4)),
                ModuleId::FinalNorm,
                ModuleId::Head,
            )));
        }
        let spec = dev.parse::<DeviceSpec>().ok();
        let Some(b) = budgets.iter().position(|b| Some(b.device) == spec) else {
            let known = budgets
                .iter()
                .map(|b| format!("`{}`", b.device))
                .collect::<Vec<_>>()
                .join(", ");
            let dev = spec.map_or_else(|| dev.clone(), |s| s.to_string());
            return Err(Error::InvalidArgument(format!(
                "`device_map`: `{name}` is mapped to `{dev}`, which is not a device here ({known})"
            )));
        };
        on.push(b);
    }
    let mut out = Vec::with_capacity(modules.len());
    for m in modules {
        let best = entries
            .iter()
            .zip(&on)
            .filter(|((n, _), _)| covers(n, m.id))
            .max_by_key(|((n, _), _)| n.len())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "`device_map` gives no device for `{}`; map every module (or a prefix such as `model.layers`)",
                    m.id
                ))
            })?;
        out.push(*best.1);
    }
    let mut used = vec![0u64; budgets.len()];
    for (m, &d) in modules.iter().zip(&out) {
        used[d] += m.bytes;
    }
    for (b, u) in budgets.iter().zip(&used) {
        if *u > b.bytes {
            return Err(Error::InvalidArgument(format!(
                "`device_map` puts {} on {}, whose budget is {}",
                human(*u as f64),
                b.device,
                human(b.bytes as f64)
            )));
        }
    }
    Ok(out)
}

/// `cuda:0: model.embed_tokens, model.layers.0-13 (7.10 GiB of 20.00 GiB)` per device.
impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, d) in self.devices.iter().enumerate() {
            let on: Vec<ModuleId> = self
                .modules
                .iter()
                .filter(|(_, dev)| *dev == d.device)
                .map(|(m, _)| *m)
                .collect();
            if k > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {} ({} of {})",
                d.name,
                ranges(&on),
                human(d.used as f64),
                human(d.budget as f64)
            )?;
        }
        Ok(())
    }
}

/// `model.layers.3`, `model.layers.4`, `model.layers.5` -> `model.layers.3-5`.
fn ranges(modules: &[ModuleId]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(usize, usize)> = None;
    let flush = |run: &mut Option<(usize, usize)>, out: &mut Vec<String>| {
        if let Some((a, b)) = run.take() {
            out.push(ModuleId::layer_range(a, b));
        }
    };
    for m in modules {
        if let Some(i) = m.layer() {
            if let Some((a, b)) = run
                && b + 1 == i
            {
                run = Some((a, i));
            } else {
                flush(&mut run, &mut out);
                run = Some((i, i));
            }
        } else {
            flush(&mut run, &mut out);
            out.push(m.hf_name());
        }
    }
    flush(&mut run, &mut out);
    out.join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A 7B-like model: a 1 GiB embedding and head, 28 layers of 0.5 GiB, a tiny norm.
    fn model() -> Vec<Module> {
        ModuleId::all(28, false)
            .into_iter()
            .map(|id| Module {
                id,
                bytes: match id {
                    ModuleId::Embedding | ModuleId::Head => GIB,
                    ModuleId::Layer(_) => GIB / 2,
                    ModuleId::FinalNorm => 1 << 20,
                },
            })
            .collect()
    }

    fn gpus(n: usize, gib: u64) -> Vec<Budget> {
        (0..n)
            .map(|i| Budget {
                device: DeviceSpec::gpu(i),
                bytes: gib * GIB,
            })
            .collect()
    }

    #[test]
    fn plans_for_fixed_budgets() {
        let m = model();
        let mut out = String::new();
        for (title, budgets, map) in [
            ("1 GPU of 80 GiB, auto", gpus(1, 80), DeviceMap::Auto),
            (
                "2 GPUs of 80 GiB, balanced",
                gpus(2, 80),
                DeviceMap::Balanced,
            ),
            (
                "2 GPUs of 80 GiB, sequential",
                gpus(2, 80),
                DeviceMap::Sequential,
            ),
            ("4 GPUs of 80 GiB, auto", gpus(4, 80), DeviceMap::Auto),
            ("8 GPUs of 80 GiB, auto", gpus(8, 80), DeviceMap::Auto),
            (
                "1 GPU limited to 6 GiB, CPU offload",
                {
                    let mut b = gpus(1, 6);
                    b.push(Budget {
                        device: DeviceSpec::Cpu,
                        bytes: 64 * GIB,
                    });
                    b
                },
                DeviceMap::Auto,
            ),
            (
                "explicit: the last 4 layers, norm and head on cuda:1",
                gpus(2, 80),
                DeviceMap::Explicit(
                    [
                        ("model", "cuda:0"),
                        ("model.layers.24", "cuda:1"),
                        ("model.layers.25", "cuda:1"),
                        ("model.layers.26", "cuda:1"),
                        ("model.layers.27", "cuda:1"),
                        ("model.norm", "cuda:1"),
                        ("lm_head", "cuda:1"),
                    ]
                    .iter()
                    .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
                    .collect(),
                ),
            ),
        ] {
            let p = place(&m, &budgets, &map).unwrap();
            out.push_str(&format!("## {title}\n{p}\n"));
        }
        insta::assert_snapshot!("placement_plans", out);
    }

    #[test]
    fn plans_that_cannot_fit_say_so() {
        let m = model();
        let e = place(&m, &gpus(2, 7), &DeviceMap::Auto)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("the model needs 16.00 GiB and the devices allow 14.00 GiB"),
            "{e}"
        );
        let e = place(
            &m,
            &gpus(2, 80),
            &DeviceMap::Explicit(vec![("model.layer".into(), "cuda:0".into())]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("`model.layer` names no module"), "{e}");
        let e = place(
            &m,
            &gpus(1, 80),
            &DeviceMap::Explicit(vec![("model".into(), "cuda:3".into())]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("`cuda:3`, which is not a device here (`cuda:0`)"),
            "{e}"
        );
        let e = place(
            &m,
            &gpus(1, 80),
            &DeviceMap::Explicit(vec![("model".into(), "cuda:0".into())]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("no device for `lm_head`"), "{e}");
        assert!(DeviceMap::from_name("balance").is_err());
    }

    #[test]
    fn pipeline_stages_are_the_layers_runs_over_gpus() {
        let m = model();
        let stages = |budgets: Vec<Budget>, map: DeviceMap| {
            place(&m, &budgets, &map).unwrap().pipeline_stages()
        };
        assert_eq!(stages(gpus(1, 80), DeviceMap::Auto), None);
        let two = stages(gpus(2, 80), DeviceMap::Auto).unwrap();
        assert_eq!(two.len(), 2, "{two:?}");
        assert_eq!(
            (two[0].start, two[0].end, two[1].end),
            (0, two[1].start, 28)
        );
        let mut offload = gpus(2, 6);
        offload.push(Budget {
            device: DeviceSpec::Cpu,
            bytes: 64 * GIB,
        });
        assert_eq!(stages(offload, DeviceMap::Sequential), None);
        let back = DeviceMap::Explicit(
            [
                ("model", "cuda:0"),
                ("model.layers.10", "cuda:1"),
                ("lm_head", "1"),
            ]
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect(),
        );
        assert_eq!(stages(gpus(2, 80), back), Some(vec![0..10, 10..11, 11..28]));
        let p = place(&m, &gpus(2, 80), &DeviceMap::Auto).unwrap();
        assert_eq!(p.device_of("model.embed_tokens"), Some("cuda:0"));
        assert_eq!(p.device_of("lm_head"), Some("cuda:1"));
        assert_eq!(p.device_of("model.layer"), None);
        assert_eq!(
            p.layers_on(DeviceSpec::gpu(0)) + p.layers_on(DeviceSpec::gpu(1)),
            28
        );
    }
}
