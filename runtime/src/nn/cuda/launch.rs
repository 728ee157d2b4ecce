//! The one way our kernels are launched. Each kernel family is a `.rs` + `.cu` pair; `build.rs`
//! compiles each `.cu` to its own PTX module, which the family names with [`ptx!`] and [`launch`]
//! loads once per device (on first use) and launches from, the arguments packed as [`Arg`]s in
//! the kernel's order. Beside it, what every launcher uses: grid shapes, and (from the device
//! code) device addresses of tensors ([`addr`], [`first`]) and fresh outputs ([`empty`]).
#![allow(unsafe_code)]

pub(crate) use crate::device::memory::{addr, empty, first};

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{DType, Result};

/// A kernel family's PTX module: its name among the device's loaded modules, and its code.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Module {
    /// The name the device caches the loaded module under (`qscript_<stem>`).
    pub name: &'static str,
    /// The PTX `build.rs` compiled from `<stem>.cu`.
    pub ptx: &'static str,
}

/// The [`Module`] `build.rs` compiled from the family's `<stem>.cu`.
macro_rules! ptx {
    ($stem:literal) => {
        $crate::nn::cuda::launch::Module {
            name: concat!("qscript_", $stem),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")),
        }
    };
}
pub(crate) use ptx;

/// A kernel argument: a device address or a scalar.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
}

impl From<u64> for Arg {
    fn from(x: u64) -> Self {
        Arg::U64(x)
    }
}
impl From<u32> for Arg {
    fn from(x: u32) -> Self {
        Arg::U32(x)
    }
}
impl From<i32> for Arg {
    fn from(x: i32) -> Self {
        Arg::I32(x)
    }
}
impl From<f32> for Arg {
    fn from(x: f32) -> Self {
        Arg::F32(x)
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("unsupported dtype {other:?} for a fused kernel"),
    })
}

type FuncKey = (DeviceId, &'static str, &'static str, DType);

thread_local! {
    /// Kernels found once per device, thread and name: candle's lookup formats the name, takes
    /// a lock and asks the driver for the function on every call (a decode step launches a few
    /// hundred of ours).
    static FUNCS: RefCell<HashMap<FuncKey, CudaFunction>> = RefCell::new(HashMap::new());
}

/// Launches `{name}_{suffix of dtype}` of `module` on `grid` with `args` in order.
pub(crate) fn launch(
    dev: &CudaDevice,
    module: &Module,
    name: &'static str,
    dtype: DType,
    grid: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let key = (dev.id(), module.name, name, dtype);
    let func = if let Some(f) = FUNCS.with(|f| f.borrow().get(&key).cloned()) {
        f
    } else {
        let full = format!("{name}_{}", suffix(dtype)?);
        let f = dev
            .get_or_load_custom_func(&full, module.name, module.ptx)?
            .into_cuda_function();
        FUNCS.with(|c| c.borrow_mut().insert(key, f.clone()));
        f
    };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    for a in args {
        match a {
            Arg::U64(x) => b.arg(x),
            Arg::U32(x) => b.arg(x),
            Arg::I32(x) => b.arg(x),
            Arg::F32(x) => b.arg(x),
        };
    }
    // SAFETY: each caller pushes the argument list of the kernel's signature in its family's
    // .cu, with addresses of live buffers of the sizes the kernel reads and writes.
    unsafe { b.launch(grid) }.w()?;
    Ok(())
}

/// A grid-stride launch over `n` elements: 256 threads a block.
pub(crate) fn launch_1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows of `row_elems` elements along grid.y (as many as the grid takes; the kernels stride over
/// the rest), each row's elements along grid.x.
pub(crate) fn rows_2d(n: usize, row_elems: usize) -> LaunchConfig {
    let row_elems = row_elems.clamp(1, n.max(1));
    let threads = 256u32;
    let x = row_elems.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    let y = n.div_ceil(row_elems).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A block per row of `width` elements, wider blocks for wider rows.
pub(crate) fn rows_grid(rows: usize, width: usize) -> LaunchConfig {
    let threads = if width >= 4096 {
        1024
    } else if width >= 512 {
        256
    } else {
        128
    };
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether 16-byte loads serve `ptrs` (all aligned) over rows of `width` elements of `dtype`.
pub(crate) fn vec_ok(ptrs: &[u64], width: usize, dtype: DType) -> i32 {
    let per = 16 / dtype.size_in_bytes();
    i32::from(width.is_multiple_of(per) && ptrs.iter().all(|p| p.is_multiple_of(16)))
}
