//! Planning a run before anything loads: the memory it needs per device.

pub mod memory;

pub use memory::{Estimate, Trainable, Workload, estimate};
