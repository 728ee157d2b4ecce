//! Fused attention through cuDNN (`sdpa.cpp`): forward and backward without an `s x t` buffer,
//! GQA without copying K/V, causal and right padding as per-row key lengths. cuDNN is found at run
//! time where users have it (`QSCRIPT_CUDNN`, the system's `libcudnn.so.9`, or a pip wheel's
//! `nvidia/cudnn/lib`); without it attention uses the fused softmax kernels, after a one-line
//! notice that says why.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::{DType, Result, Tensor};

use super::launch::{addr, empty};
use crate::device::memory::{Kept, kept};
use crate::nn::AttnMask;

unsafe extern "C" {
    fn qs_sdpa_load(path: *const c_char, min: c_int, err: *mut c_char, n: usize) -> c_int;
    fn qs_sdpa_run(
        context: *mut c_void,
        stream: *mut c_void,
        sm: c_int,
        b: i64,
        hq: i64,
        hkv: i64,
        s: i64,
        t: i64,
        d: i64,
        scale: f32,
        bf16: c_int,
        causal: c_int,
        backward: c_int,
        bshd: c_int,
        ptrs: *const *mut c_void,
        q_lens: *mut c_void,
        kv_lens: *mut c_void,
        workspace: *mut c_void,
        workspace_size: *mut i64,
        err: *mut c_char,
        n: usize,
    ) -> c_int;
}

/// The oldest cuDNN the shim was run against (9.14; 9.19 too).
const MIN_VERSION: c_int = 91400;

/// The cuDNN version loaded (e.g. 91900), or why there is none; tried once per process.
pub fn cudnn() -> std::result::Result<i32, &'static str> {
    static LOADED: OnceLock<std::result::Result<i32, String>> = OnceLock::new();
    let r = LOADED.get_or_init(|| {
        let mut tried = Vec::new();
        for path in crate::device::libs::library_candidates("QSCRIPT_CUDNN", "libcudnn.so.9", "cudnn") {
            let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) else {
                continue;
            };
            let mut err = [0 as c_char; 512];
            // SAFETY: a NUL-terminated path and a buffer of the length given.
            let v = unsafe { qs_sdpa_load(c.as_ptr(), MIN_VERSION, err.as_mut_ptr(), err.len()) };
            if v >= MIN_VERSION {
                return Ok(v);
            }
            // SAFETY: the shim writes a NUL-terminated message into `err`.
            let why = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            tried.push(if v > 0 {
                format!("{}: version {v} (9.14 or newer needed)", path.display())
            } else {
                format!("{}: {why}", path.display())
            });
        }
        let why = format!(
            "cuDNN 9 not found, so attention uses qscript's softmax kernels (slower, more memory); \
             install it (pip install nvidia-cudnn-cu13, or the system package) or set QSCRIPT_CUDNN \
             to libcudnn.so.9. Tried: {}",
            tried.join("; ")
        );
        crate::notice::say(format!("notice: {why}"));
        Err(why)
    });
    r.as_ref().copied().map_err(String::as_str)
}

/// Why cuDNN attention cannot take these inputs, if it cannot (`None`: it can).
pub fn unsupported(q: &Tensor, k: &Tensor, mask: &AttnMask) -> Option<String> {
    let (Ok((_, h, s, d)), Ok((_, kv, t, _))) = (q.dims4(), k.dims4()) else {
        return Some("inputs that are not [b, heads, s, d]".into());
    };
    if !matches!(q.dtype(), DType::BF16 | DType::F16) {
        return Some(format!("dtype {:?} (bf16 or f16 only)", q.dtype()));
    }
    if d % 8 != 0 || d > 256 {
        return Some(format!("head dim {d} (a multiple of 8, at most 256)"));
    }
    if s != t || mask.offset != 0 {
        return Some("queries after a KV cache".into());
    }
    if kv == 0 || h % kv != 0 {
        return Some(format!("{h} heads over {kv} KV heads"));
    }
    if s == 1 {
        return Some("one position".into());
    }
    if mask.segments.is_some() {
        // cuDNN's ragged (THD) layout serves packed rows; not wired until it is checked on a GPU.
        return Some("packed rows".into());
    }
    if let Some(r) = &mask.key_ranges {
        if r.iter().any(|&(start, _)| start != 0) {
            return Some("left padding".into());
        }
        if r.iter().any(|&(_, end)| end == 0) {
            return Some("an empty row".into());
        }
    }
    cudnn().err().map(str::to_string)
}

fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("cuDNN attention: tensor is not on the GPU"),
    }
}

/// How the `[b, h, s, d]` tensors of a pass lie in memory: contiguous, or as transposed views of
/// contiguous `[b, s, h, d]` tensors (the projections' own layout: no copies around attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Bhsd,
    Bshd,
}

impl Layout {
    /// `Bshd` when every tensor already lies that way, else `Bhsd`.
    fn of(ts: &[&Tensor]) -> Result<Self> {
        for t in ts {
            if !t.transpose(1, 2)?.is_contiguous() {
                return Ok(Layout::Bhsd);
            }
        }
        Ok(Layout::Bshd)
    }

    /// `t` laid out this way (a copy only when it lies otherwise).
    fn put(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Layout::Bhsd => t.contiguous(),
            Layout::Bshd => t.transpose(1, 2)?.contiguous()?.transpose(1, 2),
        }
    }

    /// A fresh `[b, h, s, d]` tensor laid out this way.
    fn empty(
        self,
        dev: &CudaDevice,
        (b, h, s, d): (usize, usize, usize, usize),
        dtype: DType,
    ) -> Result<Tensor> {
        match self {
            Layout::Bhsd => empty(dev, &[b, h, s, d], dtype),
            Layout::Bshd => empty(dev, &[b, s, h, d], dtype)?.transpose(1, 2),
        }
    }

    /// The address of `t`'s first element (`t` laid out this way).
    fn addr(self, t: &Tensor, what: &str) -> Result<u64> {
        Ok(match self {
            Layout::Bhsd => addr(t, what)?.0,
            Layout::Bshd => addr(&t.transpose(1, 2)?, what)?.0,
        })
    }
}

/// One pass as `sdpa.cpp` takes it.
struct Pass {
    /// `(b, heads, kv heads, s, t, head dim)`.
    dims: (usize, usize, usize, usize, usize, usize),
    scale: f32,
    dtype: DType,
    causal: bool,
    backward: bool,
    layout: Layout,
}

impl Pass {
    fn of(
        q: &Tensor,
        kv: usize,
        mask: &AttnMask,
        scale: f64,
        backward: bool,
        layout: Layout,
    ) -> Result<Self> {
        let (b, h, s, d) = q.dims4()?;
        Ok(Self {
            dims: (b, h, kv, s, s, d),
            scale: scale as f32,
            dtype: q.dtype(),
            causal: mask.causal,
            backward,
            layout,
        })
    }
}

/// Runs one pass; `ptrs` as `sdpa.cpp` orders them.
fn run(dev: &CudaDevice, p: &Pass, ptrs: &[u64], lens: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let (b, hq, hkv, s, t, d) = p.dims;
    let (scale, dtype, causal, backward) = (p.scale, p.dtype, p.causal, p.backward);
    let bshd = c_int::from(p.layout == Layout::Bshd);
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let major = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(candle_core::Error::wrap)?;
    let minor = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .map_err(candle_core::Error::wrap)?;
    let ptrs: Vec<*mut c_void> = ptrs.iter().map(|&p| p as *mut c_void).collect();
    let (q_lens, kv_lens) = match lens {
        Some((q, kv)) => (addr(q, "query lengths")?.0, addr(kv, "key lengths")?.0),
        None => (0, 0),
    };
    let call = |workspace: u64, size: &mut i64, err: &mut [c_char; 1024]| {
        // SAFETY: every pointer is a live device buffer of the shape the shim describes to
        // cuDNN (laid out as `bshd` says, checked by `Layout::addr`), the stream is this device's, and `err` has the
        // length given.
        unsafe {
            qs_sdpa_run(
                ctx.cu_ctx().cast(),
                stream.cu_stream().cast(),
                major * 10 + minor,
                b as i64,
                hq as i64,
                hkv as i64,
                s as i64,
                t as i64,
                d as i64,
                scale,
                c_int::from(dtype == DType::BF16),
                c_int::from(causal),
                c_int::from(backward),
                bshd,
                ptrs.as_ptr(),
                q_lens as *mut c_void,
                kv_lens as *mut c_void,
                workspace as *mut c_void,
                size,
                err.as_mut_ptr(),
                err.len(),
            )
        }
    };
    let fail = |err: &[c_char; 1024]| {
        // SAFETY: the shim writes a NUL-terminated message.
        let why = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        candle_core::Error::Msg(format!(
            "cuDNN attention ({}, b {b}, heads {hq}/{hkv}, s {s}, head dim {d}, {dtype:?}): {why}",
            if backward { "backward" } else { "forward" }
        ))
    };
    let mut err = [0 as c_char; 1024];
    let mut size = 0i64;
    if call(0, &mut size, &mut err) != 0 {
        return Err(fail(&err));
    }
    let ws = empty(dev, &[(size.max(4) as usize).div_ceil(4)], DType::F32)?;
    let (ws_ptr, _) = addr(&ws, "workspace")?;
    if call(ws_ptr, &mut size, &mut err) != 0 {
        return Err(fail(&err));
    }
    Ok(())
}

thread_local! {
    /// The last per-row lengths uploaded on this thread: (queries a row, key lengths).
    static LENS: std::cell::RefCell<Kept<(usize, Vec<u32>)>> = const { std::cell::RefCell::new(None) };
}

/// Per-row key lengths for the shim (queries are never padded: every query row is computed, so a
/// padding row sees the real keys, as in the reference), uploaded once for every layer of a pass
/// ([`kept`]).
fn lens(
    mask: &AttnMask,
    b: usize,
    s: usize,
    dev: &candle_core::Device,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(r) = &mask.key_ranges else {
        return Ok(None);
    };
    if r.len() != b {
        candle_core::bail!("attention mask has {} rows, the batch has {b}", r.len());
    }
    let key = (s, r.iter().map(|x| x.1 as u32).collect::<Vec<u32>>());
    kept(&LENS, &key, dev, || {
        Ok((
            Tensor::from_vec(vec![s as u32; b], b, dev)?,
            Tensor::from_slice(&key.1, b, dev)?,
        ))
    })
    .map(Some)
}

/// `(q, k, v, out [b, h, s, d], lse [b, h, s] f32)`: `q` `[b, heads, s, d]`, `k`, `v`
/// `[b, kv heads, s, d]`, each contiguous or a transposed view of a contiguous `[b, s, heads, d]`
/// (then all of them, and `out`, stay that way: no copies); the inputs as the backward takes
/// them.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = device_of(q)?;
    let (b, h, s, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let layout = Layout::of(&[q, k, v])?;
    let (q, k, v) = (layout.put(q)?, layout.put(k)?, layout.put(v)?);
    let out = layout.empty(&dev, (b, h, s, d), q.dtype())?;
    let lse = empty(&dev, &[b, h, s], DType::F32)?;
    let lens = lens(mask, b, s, q.device())?;
    let ptrs = [
        layout.addr(&q, "q")?,
        layout.addr(&k, "k")?,
        layout.addr(&v, "v")?,
        layout.addr(&out, "out")?,
        addr(&lse, "lse")?.0,
    ];
    run(
        &dev,
        &Pass::of(&q, kv, mask, scale, false, layout)?,
        &ptrs,
        lens.as_ref().map(|(a, b)| (a, b)),
    )?;
    Ok((q, k, v, out, lse))
}

/// `(dq, dk, dv)` from the inputs, output and `lse` that [`forward`] returned, and `d_out`; the
/// gradients lie as the inputs do.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = device_of(q)?;
    let (b, _, s, _) = q.dims4()?;
    let kv = k.dim(1)?;
    let layout = Layout::of(&[q, k, v, out])?;
    let dims4 = |t: &Tensor| t.dims4();
    let d_out = layout.put(d_out)?;
    let dq = layout.empty(&dev, dims4(q)?, q.dtype())?;
    let dk = layout.empty(&dev, dims4(k)?, k.dtype())?;
    let dv = layout.empty(&dev, dims4(v)?, v.dtype())?;
    let lens = lens(mask, b, s, q.device())?;
    let ptrs = [
        layout.addr(q, "q")?,
        layout.addr(k, "k")?,
        layout.addr(v, "v")?,
        layout.addr(out, "out")?,
        layout.addr(&d_out, "d_out")?,
        addr(lse, "lse")?.0,
        layout.addr(&dq, "dq")?,
        layout.addr(&dk, "dk")?,
        layout.addr(&dv, "dv")?,
    ];
    run(
        &dev,
        &Pass::of(q, kv, mask, scale, true, layout)?,
        &ptrs,
        lens.as_ref().map(|(a, b)| (a, b)),
    )?;
    Ok((dq, dk, dv))
}
