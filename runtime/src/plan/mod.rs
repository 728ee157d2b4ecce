//! Planning a run before anything loads: the memory it needs per device, and where each module
//! goes (`device_map`).

pub mod fit;
pub mod memory;
pub mod placement;

pub use memory::{Estimate, Trainable, Workload, estimate};
pub use placement::{DeviceMap, Module, PlacedDevice, Placement, place};
