//! The CUDA side of the op facade: our kernels (`kernels.cu`, compiled to PTX by `build.rs`) and
//! the device setup the engine needs. Every kernel here has a reference op on the CPU that
//! computes the same function, and a test that compares the two on the GPU machine.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{self, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Result, Storage, Tensor};

pub mod accumulate;
pub mod blas;
pub mod peer;
pub mod sdpa;

const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "qscript_kernels";

fn launch_1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Where an NVIDIA library the engine loads at run time may be, in the order tried: the path in
/// `env` (e.g. `QSCRIPT_CUDNN`), the dynamic loader's own search for `soname` (LD_LIBRARY_PATH, the
/// ld.so cache: a system install), then pip wheels (`nvidia/<wheel>/lib/<soname>`, as torch
/// installs them) in the usual Python environments.
pub fn library_candidates(env: &str, soname: &str, wheel: &str) -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(env) {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from(soname));
    let mut roots: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local"));
    }
    roots.extend(["/usr/local", "/usr"].map(PathBuf::from));
    if let Ok(opt) = std::fs::read_dir("/opt") {
        for e in opt.flatten() {
            roots.push(e.path());
            roots.push(e.path().join(".venv"));
        }
    }
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            if py.file_name().to_string_lossy().starts_with("python3") {
                for site in ["site-packages", "dist-packages"] {
                    let lib = py
                        .path()
                        .join(site)
                        .join("nvidia")
                        .join(wheel)
                        .join("lib")
                        .join(soname);
                    if lib.is_file() {
                        out.push(lib);
                    }
                }
            }
        }
    }
    out
}

/// Rows of `row_elems` elements along grid.y (as many as the grid takes; the kernels stride over
/// the rest), each row's elements along grid.x.
fn rows_2d(n: usize, row_elems: usize) -> LaunchConfig {
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

fn wrap(storage: CudaStorage, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// The device address of a contiguous tensor's first element, and its device.
fn addr(t: &Tensor, what: &str) -> Result<(u64, CudaDevice)> {
    if !t.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    first(t, what)
}

/// The device address of a tensor's first element in any layout (the caller passes its strides),
/// and its device.
pub(crate) fn first(t: &Tensor, what: &str) -> Result<(u64, CudaDevice)> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*s else {
        candle_core::bail!("{what} is not on the GPU");
    };
    let stream = c.device.cuda_stream();
    let off = l.start_offset() as u64;
    let (base, size) = match &c.slice {
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::I64(x) => (x.device_ptr(&stream).0, 8),
        CudaStorageSlice::U8(x) => (x.device_ptr(&stream).0, 1),
        _ => candle_core::bail!("{what}: unsupported dtype {:?}", t.dtype()),
    };
    Ok((base + off * size, c.device.clone()))
}

/// A fresh uninitialised `shape` tensor of `dtype` on `dev` (every kernel that uses it writes
/// all of it).
pub(crate) fn empty(dev: &CudaDevice, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // SAFETY: the callers' kernels write every element before the tensor is read.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            DType::I64 => CudaStorage::wrap_cuda_slice(dev.alloc::<i64>(n)?, dev.clone()),
            DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc::<u8>(n)?, dev.clone()),
            other => candle_core::bail!("unsupported dtype {other:?}"),
        }
    };
    Ok(wrap(storage, shape))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("unsupported dtype {other:?} for a fused kernel"),
    })
}

/// A kernel argument: a device address or a scalar.
#[derive(Clone, Copy, Debug)]
enum Arg {
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
}

/// Launches `{name}_{suffix of dtype}` on `grid` with `args` in order.
fn launch(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
    grid: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let full = format!("{name}_{}", suffix(dtype)?);
    let func = dev.get_or_load_custom_func(&full, MODULE, KERNELS)?;
    let mut b = func.builder();
    for a in args {
        match a {
            Arg::U64(x) => b.arg(x),
            Arg::U32(x) => b.arg(x),
            Arg::I32(x) => b.arg(x),
            Arg::F32(x) => b.arg(x),
        };
    }
    // SAFETY: each caller pushes the argument list of the kernel's signature in kernels.cu,
    // with addresses of live buffers of the sizes the kernel reads and writes.
    unsafe { b.launch(grid) }.w()?;
    Ok(())
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

fn rows_grid(rows: usize, width: usize) -> LaunchConfig {
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

/// Cross-entropy of each row of `logits` `[n, vocab]` against `targets` (u32 `[n]`): the per-row
/// losses (f32) and, with `want_grad`, `(softmax - onehot) * inv_denom` in the logits' dtype.
pub fn ce_rows(
    logits: &Tensor,
    targets: &Tensor,
    inv_denom: f32,
    want_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, v) = logits.dims2()?;
    let (pl, dev) = addr(logits, "logits")?;
    let (pt, _) = addr(targets, "targets")?;
    let loss = empty(&dev, &[n], DType::F32)?;
    let d = if want_grad {
        Some(empty(&dev, &[n, v], logits.dtype())?)
    } else {
        None
    };
    let (pd, _) = match &d {
        Some(d) => addr(d, "dlogits")?,
        None => (0, dev.clone()),
    };
    let (ploss, _) = addr(&loss, "loss")?;
    let (v64, g) = (v as u64, i32::from(want_grad));
    let width = 16 / logits.dtype().size_in_bytes();
    let vec = i32::from(
        v.is_multiple_of(width) && pl.is_multiple_of(16) && (pd == 0 || pd.is_multiple_of(16)),
    );
    launch(
        &dev,
        "ce_rows",
        logits.dtype(),
        rows_grid(n, v),
        &[
            Arg::from(pl),
            Arg::from(pt),
            Arg::from(pd),
            Arg::from(ploss),
            Arg::from(v64),
            Arg::from(inv_denom),
            Arg::from(g),
            Arg::from(vec),
        ],
    )?;
    Ok((loss, d))
}

/// The sum of squares of a contiguous f32 buffer, as a device scalar (one read of the buffer).
pub fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    let n = g.elem_count();
    if g.dtype() != DType::F32 {
        candle_core::bail!("sum_of_squares: {:?}, not f32", g.dtype());
    }
    let (pg, dev) = addr(g, "grads")?;
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let out = empty(&dev, &[blocks], DType::F32)?;
    let po = addr(&out, "partials")?.0;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        &dev,
        "sumsq",
        DType::F32,
        cfg,
        &[Arg::from(pg), Arg::from(po), Arg::from(n as u64)],
    )?;
    out.sum_all()
}

/// Which keys each row of attention scores sees, for the softmax kernels.
pub struct RowMask {
    /// Queries per row block.
    pub s: u32,
    /// Rows per batch entry (`heads * s`).
    pub rows_per_batch: u64,
    /// Absolute position of the first query.
    pub offset: u32,
    /// Causal.
    pub causal: bool,
    /// Per batch entry, `[start, end)` of the real keys (u32 tensors on the device).
    pub ranges: Option<(Tensor, Tensor)>,
    /// Packed rows: per `(batch entry, query)`, the first key of the query's example (u32 `[b * s]`).
    pub query_starts: Option<Tensor>,
}

impl RowMask {
    /// The kernels' mask arguments, in their order: `s, rows_per_batch, offset, causal, key
    /// starts, key ends, query starts` (null addresses for what is absent).
    fn args(&self) -> Result<[Arg; 7]> {
        let (ks, ke) = match &self.ranges {
            Some((a, b)) => (addr(a, "key starts")?.0, addr(b, "key ends")?.0),
            None => (0, 0),
        };
        let qs = match &self.query_starts {
            Some(q) => addr(q, "query starts")?.0,
            None => 0,
        };
        Ok([
            Arg::from(self.s),
            Arg::from(self.rows_per_batch),
            Arg::from(self.offset),
            Arg::from(i32::from(self.causal)),
            Arg::from(ks),
            Arg::from(ke),
            Arg::from(qs),
        ])
    }
}

/// Masked softmax of raw scores `[rows, t]` times `scale`: probabilities (scores' dtype), row max
/// and row log-sum (f32).
pub fn attn_softmax_fwd(
    scores: &Tensor,
    mask: &RowMask,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (r, t) = scores.dims2()?;
    let (px, dev) = addr(scores, "scores")?;
    let p = empty(&dev, &[r, t], scores.dtype())?;
    let mx = empty(&dev, &[r], DType::F32)?;
    let ls = empty(&dev, &[r], DType::F32)?;
    let (pp, pm, pl) = (
        addr(&p, "p")?.0,
        addr(&mx, "max")?.0,
        addr(&ls, "logsum")?.0,
    );
    let mut args = vec![
        Arg::from(px),
        Arg::from(pp),
        Arg::from(pm),
        Arg::from(pl),
        Arg::from(t as u64),
    ];
    args.extend(mask.args()?);
    args.push(Arg::from(scale));
    launch(
        &dev,
        "attn_softmax_fwd",
        scores.dtype(),
        rows_grid(r, t),
        &args,
    )?;
    Ok((p, mx, ls))
}

/// Backward of [`attn_softmax_fwd`]: the recomputed probabilities and
/// `ds = p * (dp - delta) * scale`, both `[rows, t]` in the scores' dtype.
pub fn attn_softmax_bwd(
    scores: &Tensor,
    dp: &Tensor,
    max: &Tensor,
    log_sum: &Tensor,
    delta: &Tensor,
    mask: &RowMask,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (r, t) = scores.dims2()?;
    let (px, dev) = addr(scores, "scores")?;
    let pg = addr(dp, "dp")?.0;
    let (pm, pl, pd) = (
        addr(max, "max")?.0,
        addr(log_sum, "logsum")?.0,
        addr(delta, "delta")?.0,
    );
    let p = empty(&dev, &[r, t], scores.dtype())?;
    let ds = empty(&dev, &[r, t], scores.dtype())?;
    let (pp, pds) = (addr(&p, "p")?.0, addr(&ds, "ds")?.0);
    let mut args = vec![
        Arg::from(px),
        Arg::from(pg),
        Arg::from(pm),
        Arg::from(pl),
        Arg::from(pd),
        Arg::from(pp),
        Arg::from(pds),
        Arg::from(t as u64),
    ];
    args.extend(mask.args()?);
    args.push(Arg::from(scale));
    launch(
        &dev,
        "attn_softmax_bwd",
        scores.dtype(),
        rows_grid(r, t),
        &args,
    )?;
    Ok((p, ds))
}

/// `silu(gate) * up` in one pass.
pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (pg, dev) = addr(gate, "gate")?;
    let pu = addr(up, "up")?.0;
    let h = empty(&dev, gate.dims(), gate.dtype())?;
    let ph = addr(&h, "h")?.0;
    let n = gate.elem_count() as u64;
    launch(
        &dev,
        "swiglu_fwd",
        gate.dtype(),
        launch_1d(n as usize),
        &[Arg::from(pg), Arg::from(pu), Arg::from(ph), Arg::from(n)],
    )?;
    Ok(h)
}

/// `(dgate, dup)` of [`swiglu_fwd`] in one pass.
pub fn swiglu_bwd(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let (pg, dev) = addr(gate, "gate")?;
    let (pu, pd) = (addr(up, "up")?.0, addr(dh, "dh")?.0);
    let dg = empty(&dev, gate.dims(), gate.dtype())?;
    let du = empty(&dev, gate.dims(), gate.dtype())?;
    let (pdg, pdu) = (addr(&dg, "dg")?.0, addr(&du, "du")?.0);
    let n = gate.elem_count() as u64;
    launch(
        &dev,
        "swiglu_bwd",
        gate.dtype(),
        launch_1d(n as usize),
        &[
            Arg::from(pg),
            Arg::from(pu),
            Arg::from(pd),
            Arg::from(pdg),
            Arg::from(pdu),
            Arg::from(n),
        ],
    )?;
    Ok((dg, du))
}

/// RMSNorm over the last dimension, HF's rounding.
pub fn rms_fwd(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let d = w.elem_count();
    let (px, dev) = addr(x, "x")?;
    let pw = addr(w, "weight")?.0;
    let y = empty(&dev, x.dims(), x.dtype())?;
    let py = addr(&y, "y")?.0;
    let d64 = d as u64;
    launch(
        &dev,
        "rms_fwd",
        x.dtype(),
        rows_grid(x.elem_count() / d, d),
        &[
            Arg::from(px),
            Arg::from(pw),
            Arg::from(py),
            Arg::from(d64),
            Arg::from(eps),
        ],
    )?;
    Ok(y)
}

/// `dx` of [`rms_fwd`].
pub fn rms_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    let d = w.elem_count();
    let (px, dev) = addr(x, "x")?;
    let (pw, pg) = (addr(w, "weight")?.0, addr(dy, "dy")?.0);
    let dx = empty(&dev, x.dims(), x.dtype())?;
    let pdx = addr(&dx, "dx")?.0;
    let d64 = d as u64;
    launch(
        &dev,
        "rms_bwd",
        x.dtype(),
        rows_grid(x.elem_count() / d, d),
        &[
            Arg::from(px),
            Arg::from(pw),
            Arg::from(pg),
            Arg::from(pdx),
            Arg::from(d64),
            Arg::from(eps),
        ],
    )?;
    Ok(dx)
}

/// HF's rotary embedding of `x` `[b, s, h, d]` (any strides, `d` contiguous) with `cos`/`sin`
/// `[s, d]` or `[b, s, d]` (contiguous), or with `backward` its transpose; the result is a contiguous
/// `[b, s, h, d]`. One pass: the transposes around it in the composite op are never made.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    let st = x.stride();
    // One table for every row, or one per row (packed rows restart their positions).
    let per_row = cos.dims() == [b, s, d];
    if st[3] != 1 || d % 2 != 0 || !(per_row || cos.dims() == [s, d]) || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} (strides {st:?}) against tables {:?}",
            x.dims(),
            cos.dims()
        );
    }
    let (px, dev) = first(x, "x")?;
    let (pc, ps) = (addr(cos, "cos")?.0, addr(sin, "sin")?.0);
    let y = empty(&dev, &[b, s, h, d], x.dtype())?;
    let py = addr(&y, "y")?.0;
    let u = |v: usize| Arg::from(v as u64);
    launch(
        &dev,
        "rope",
        x.dtype(),
        // A block per token, its threads over the token's pairs.
        LaunchConfig {
            grid_dim: ((b * s).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (if h * d / 2 >= 256 { 256 } else { 64 }, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::from(px),
            Arg::from(pc),
            Arg::from(ps),
            Arg::from(py),
            u(b),
            u(s),
            u(h),
            u(d),
            u(st[0]),
            u(st[1]),
            u(st[2]),
            u(s * h * d),
            u(h * d),
            u(d),
            u(if per_row { s * d } else { 0 }),
            Arg::from(i32::from(backward)),
        ],
    )?;
    Ok(y)
}

/// [`crate::nn::dropout::mask`] on the device.
pub fn dropout_mask(
    dev: &CudaDevice,
    key: crate::nn::dropout::Key,
    row_elems: u64,
    p: f32,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = 1.0 / (1.0 - p);
    let n64 = n as u64;
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let func = dev.get_or_load_custom_func($name, MODULE, KERNELS)?;
            // SAFETY: every element is written by the kernel before the tensor is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut b = func.builder();
            b.arg(&out);
            b.arg(&key.key);
            b.arg(&key.first_row);
            b.arg(&row_elems);
            b.arg(&p);
            b.arg(&keep);
            b.arg(&n64);
            // SAFETY: the argument list matches the kernel's signature in kernels.cu.
            unsafe { b.launch(rows_2d(n, row_elems as usize)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let storage = match dtype {
        DType::F32 => run!(f32, "dropout_mask_f32"),
        DType::BF16 => run!(half::bf16, "dropout_mask_bf16"),
        DType::F16 => run!(half::f16, "dropout_mask_f16"),
        other => candle_core::bail!("dropout: unsupported dtype {other:?}"),
    };
    Ok(wrap(storage, shape))
}

/// AdamW's hyper-parameters for one step, as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    /// Learning rate.
    pub lr: f32,
    /// `beta1`.
    pub beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta1`, computed in f64.
    pub om1: f32,
    /// `1 - beta2`, computed in f64.
    pub om2: f32,
    /// `eps`.
    pub eps: f32,
    /// Weight decay.
    pub wd: f32,
    /// `1 - beta1^t`.
    pub bc1: f32,
    /// `1 - beta2^t`.
    pub bc2: f32,
}

fn flat_f32<'a>(
    t: &'a (candle_core::StorageRef<'_>, &candle_core::Layout),
    what: &str,
) -> Result<&'a driver::CudaSlice<f32>> {
    let (s, l) = t;
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("adamw: `{what}` must be a whole contiguous buffer");
    }
    match &**s {
        Storage::Cuda(c) => c.as_cuda_slice::<f32>(),
        _ => candle_core::bail!("adamw: `{what}` is not on the GPU"),
    }
}

/// One in-place AdamW step over flat buffers: `params` (any float dtype) and the f32 moments
/// `m`, `v` are updated from the f32 gradients `g` scaled by the device scalar `clip`; `decay`
/// (u32 words, see `train::optim::decay_bits`) marks where weight decay applies. One launch for every
/// trainable tensor.
pub fn adamw(
    params: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    clip: Option<&Tensor>,
    decay: Option<&Tensor>,
    a: AdamWArgs,
) -> Result<()> {
    let n = params.elem_count();
    for (t, what) in [(m, "m"), (v, "v"), (g, "grads")] {
        if t.elem_count() != n || t.dtype() != DType::F32 {
            candle_core::bail!("adamw: `{what}` must be f32 with {n} elements");
        }
    }
    let pguard = params.storage_and_layout();
    let Storage::Cuda(ps) = &*pguard.0 else {
        candle_core::bail!("adamw: the parameters are not on the GPU");
    };
    let dev = ps.device.clone();
    let (ms, vs, gs) = (
        m.storage_and_layout(),
        v.storage_and_layout(),
        g.storage_and_layout(),
    );
    let (ms, vs) = (flat_f32(&ms, "m")?, flat_f32(&vs, "v")?);
    // The gradients and parameters may be a window of a larger flat buffer (a ZeRO shard).
    let gl = gs.1;
    if !gl.is_contiguous() {
        candle_core::bail!("adamw: the gradients must be contiguous");
    }
    let gs = match &*gs.0 {
        Storage::Cuda(c) => c.as_cuda_slice::<f32>()?,
        _ => candle_core::bail!("adamw: the gradients are not on the GPU"),
    };
    let gs = gs.slice(gl.start_offset()..gl.start_offset() + n);
    let cs = clip.map(Tensor::storage_and_layout);
    let ds = decay.map(Tensor::storage_and_layout);
    let cs = cs.as_ref().map(|c| flat_f32(c, "clip")).transpose()?;
    let ds = match &ds {
        Some((s, l))
            if l.is_contiguous()
                && l.start_offset() == 0
                && l.shape().elem_count() == n.div_ceil(32) =>
        {
            match &**s {
                Storage::Cuda(c) => Some(c.as_cuda_slice::<u32>()?),
                _ => candle_core::bail!("adamw: the decay bits are not on the GPU"),
            }
        }
        Some(_) => candle_core::bail!(
            "adamw: the decay bits must be {} contiguous u32 words",
            n.div_ceil(32)
        ),
        None => None,
    };
    let null: u64 = 0;
    let n64 = n as u64;
    let pl = pguard.1;
    if !pl.is_contiguous() {
        candle_core::bail!("adamw: the parameters must be contiguous");
    }
    let po = pl.start_offset();
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let p = ps.as_cuda_slice::<$t>()?.slice(po..po + n);
            let func = dev.get_or_load_custom_func($name, MODULE, KERNELS)?;
            let mut b = func.builder();
            b.arg(&p);
            b.arg(ms);
            b.arg(vs);
            b.arg(&gs);
            match cs {
                Some(c) => b.arg(c),
                None => b.arg(&null),
            };
            match ds {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
            for x in [
                &a.lr, &a.beta1, &a.beta2, &a.om1, &a.om2, &a.eps, &a.wd, &a.bc1, &a.bc2,
            ] {
                b.arg(x);
            }
            b.arg(&n64);
            // SAFETY: the argument list matches `adamw_*` in kernels.cu; every buffer holds
            // `n` elements (checked above) and the engine runs on one stream.
            unsafe { b.launch(launch_1d(n)) }.w()?;
        }};
    }
    match params.dtype() {
        DType::F32 => run!(f32, "adamw_f32"),
        DType::BF16 => run!(half::bf16, "adamw_bf16"),
        DType::F16 => run!(half::f16, "adamw_f16"),
        other => candle_core::bail!("adamw: unsupported parameter dtype {other:?}"),
    }
    Ok(())
}

/// The device's default memory pool: the one cudarc's stream-ordered allocations come from.
pub(crate) fn default_pool(dev: &CudaDevice) -> Result<driver::sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: a plain driver query on the context's device.
    unsafe {
        driver::sys::cuDeviceGetDefaultMemPool(
            &raw mut pool,
            dev.cuda_stream().context().cu_device(),
        )
    }
    .result()
    .map_err(candle_core::Error::wrap)?;
    Ok(pool)
}

/// A u64 attribute of `pool` (all the ones used here are u64, as documented).
fn pool_attribute(
    pool: driver::sys::CUmemoryPool,
    attr: driver::sys::CUmemPool_attribute,
) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: `pool` is a live pool and the attribute is a u64.
    unsafe { driver::sys::cuMemPoolGetAttribute(pool, attr, (&raw mut v).cast()) }
        .result()
        .map_err(candle_core::Error::wrap)?;
    Ok(v)
}

fn set_pool_attribute(
    pool: driver::sys::CUmemoryPool,
    attr: driver::sys::CUmemPool_attribute,
    mut v: u64,
) -> Result<()> {
    // SAFETY: as above.
    unsafe { driver::sys::cuMemPoolSetAttribute(pool, attr, (&raw mut v).cast()) }
        .result()
        .map_err(candle_core::Error::wrap)
}

/// Once per device, before any tensor lives on it: keep freed memory in the CUDA memory pool
/// (cudarc's pool returns it to the driver at every synchronize otherwise), and stop cudarc from
/// creating two events per allocation (the engine runs on one stream per device).
pub fn prepare(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    set_pool_attribute(
        pool,
        driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )?;
    // SAFETY: called before any allocation on this device is shared between streams.
    unsafe { dev.disable_event_tracking() };
    Ok(())
}

/// Bytes in the device's memory pool: held by live tensors, held by the pool in all (kept for
/// reuse), and the most held by live tensors since the last [`reset_pool_peak`].
pub fn pool_usage(dev: &CudaDevice) -> Result<(u64, u64, u64)> {
    use driver::sys::CUmemPool_attribute as A;
    let pool = default_pool(dev)?;
    Ok((
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        pool_attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    ))
}

/// Starts a new peak: the pool's high-water mark becomes what live tensors hold now.
pub fn reset_pool_peak(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    set_pool_attribute(
        pool,
        driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        0,
    )
}
