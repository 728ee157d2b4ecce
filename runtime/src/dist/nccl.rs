//! NCCL for the ranks' sums on GPUs: ranges of the f32 gradient buffers are summed in place on
//! the device, on NCCL's own stream: each sum waits (on the GPU) for the compute stream's work
//! queued before it, so a block's sum runs while the next backward computes, and [`Nccl::wait`]
//! makes the compute stream wait for every sum before the optimizer reads the buffers. NCCL is not linked: `libnccl.so.2` is loaded at run time from where
//! the user has it (the loader's search, then pip wheels such as torch's `nvidia-nccl`), like
//! cuDNN, so a build with the `cuda` feature starts without it. The ranks meet over the TCP
//! [`Group`]: rank 0 makes the NCCL id and sends it to the others.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};

use super::Group;
use crate::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut *mut c_void, c_int, UniqueId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;
type Reduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;
type CommAbort = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// `ncclSum` in nccl.h.
const SUM: c_int = 0;

/// nccl.h's `ncclDataType_t` of a dtype.
fn nccl_type(dtype: candle_core::DType) -> Result<c_int> {
    use candle_core::DType as D;
    Ok(match dtype {
        D::U8 => 1,
        D::U32 => 3,
        D::I64 => 4,
        D::F16 => 6,
        D::F32 => 7,
        D::F64 => 8,
        D::BF16 => 9,
        other => {
            return Err(Error::InvalidArgument(format!(
                "NCCL: unsupported dtype {other:?}"
            )));
        }
    })
}

/// The entry points qscript uses.
struct Lib {
    _library: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    reduce: Reduce,
    comm_abort: CommAbort,
    error_string: GetErrorString,
    version: c_int,
}

/// NCCL, loaded once per process, or why not.
fn lib() -> std::result::Result<&'static Lib, &'static str> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut tried = Vec::new();
        for path in crate::device::libs::library_candidates("QSCRIPT_NCCL", "libnccl.so.2", "nccl")
        {
            // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(l) => match symbols(l) {
                    Ok(lib) => return Ok(lib),
                    Err(e) => tried.push(format!("{}: {e}", path.display())),
                },
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        Err(format!(
            "NCCL not found, so the ranks sum gradients through the host (slower); install it \
             (pip install nvidia-nccl-cu13, or the system package) or set QSCRIPT_NCCL to \
             libnccl.so.2. Tried: {}",
            tried.join("; ")
        ))
    })
    .as_ref()
    .map_err(String::as_str)
}

fn symbols(l: libloading::Library) -> std::result::Result<Lib, libloading::Error> {
    // SAFETY: each symbol is looked up with the signature nccl.h declares for it.
    unsafe {
        let get_unique_id = *l.get::<GetUniqueId>(b"ncclGetUniqueId\0")?;
        let comm_init_rank = *l.get::<CommInitRank>(b"ncclCommInitRank\0")?;
        let all_reduce = *l.get::<AllReduce>(b"ncclAllReduce\0")?;
        let broadcast = *l.get::<Broadcast>(b"ncclBroadcast\0")?;
        let reduce = *l.get::<Reduce>(b"ncclReduce\0")?;
        let comm_abort = *l.get::<CommAbort>(b"ncclCommAbort\0")?;
        let error_string = *l.get::<GetErrorString>(b"ncclGetErrorString\0")?;
        let get_version = *l.get::<GetVersion>(b"ncclGetVersion\0")?;
        let mut version = 0;
        get_version(&raw mut version);
        Ok(Lib {
            _library: l,
            get_unique_id,
            comm_init_rank,
            all_reduce,
            broadcast,
            reduce,
            comm_abort,
            error_string,
            version,
        })
    }
}

fn check(lib: &Lib, what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    let why = unsafe { CStr::from_ptr((lib.error_string)(code)) }.to_string_lossy();
    Err(Error::InvalidArgument(format!(
        "NCCL {what}: {why} (code {code})"
    )))
}

/// One rank's NCCL communicator over the group's ranks, on its own stream of one GPU.
pub struct Nccl {
    lib: &'static Lib,
    comm: *mut c_void,
    dev: CudaDevice,
    /// NCCL's stream, beside the compute stream.
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is used by one thread at a time (the trainer that owns it), which is
// what NCCL asks of a communicator; the raw pointer is never shared.
unsafe impl Send for Nccl {}
// SAFETY: as above: every use takes `&mut self` or happens on the owning trainer's thread.
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl(version {})", self.lib.version)
    }
}

impl Nccl {
    /// The GPU the communicator sums on.
    pub fn device(&self) -> candle_core::Device {
        candle_core::Device::Cuda(self.dev.clone())
    }

    /// The communicator of `group`'s ranks on `dev`, or `None` (with a notice) when any rank
    /// has no NCCL: then every rank sums through the group instead. Every rank must call this.
    pub fn connect(group: &Group, dev: &CudaDevice) -> Result<Option<Self>> {
        let lib = lib();
        if group.any(lib.is_err())? {
            if let Err(why) = lib {
                crate::notice::say(format!("notice: {why}"));
            } else {
                crate::notice::say(
                    "notice: another rank has no NCCL; the ranks sum gradients through the host",
                );
            }
            return Ok(None);
        }
        let Ok(lib) = lib else {
            return Ok(None);
        };
        let mut id = UniqueId { internal: [0; 128] };
        if group.rank() == 0 {
            // SAFETY: `id` is a writable ncclUniqueId.
            check(lib, "id", unsafe { (lib.get_unique_id)(&raw mut id) })?;
        }
        let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        group.broadcast(&mut bytes)?;
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        dev.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let mut comm = std::ptr::null_mut();
        let (size, rank) = (
            c_int::try_from(group.size()).unwrap_or(c_int::MAX),
            c_int::try_from(group.rank()).unwrap_or(c_int::MAX),
        );
        // SAFETY: `comm` receives the communicator; the id is the one every rank got from rank 0.
        check(lib, "init", unsafe {
            (lib.comm_init_rank)(&raw mut comm, size, id, rank)
        })?;
        let stream = dev
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(Self {
            lib,
            comm,
            dev: dev.clone(),
            stream,
        }))
    }

    /// The address of `t`'s elements `range` (a contiguous tensor on this rank's GPU) and
    /// NCCL's type for them, after NCCL's stream is made to wait for the compute stream's work
    /// queued so far (which may still be writing them).
    fn queue(&self, t: &Tensor, range: &Range<usize>) -> Result<(*mut c_void, c_int)> {
        if !t.is_contiguous() {
            return Err(Error::InvalidArgument(
                "NCCL: the buffer must be contiguous".into(),
            ));
        }
        if range.end > t.elem_count() || range.start > range.end {
            return Err(Error::InvalidArgument(format!(
                "NCCL: range {range:?} is outside a buffer of {}",
                t.elem_count()
            )));
        }
        let kind = nccl_type(t.dtype())?;
        let (base, dev) = crate::device::memory::first(t, "NCCL's buffer")?;
        if dev.id() != self.dev.id() {
            return Err(Error::InvalidArgument(
                "NCCL: the buffer is on another device than the communicator".into(),
            ));
        }
        self.stream
            .join(&self.dev.cuda_stream())
            .map_err(candle_core::Error::wrap)?;
        let at = base + (range.start * t.dtype().size_in_bytes()) as u64;
        Ok((at as *mut c_void, kind))
    }

    /// Queues the sum over the ranks of `t`'s elements `range` (a contiguous tensor on this
    /// rank's GPU), in place, on NCCL's stream after the compute stream's work so far. Every rank
    /// must start the same operations in the same order; [`Nccl::wait`] before reading `t`.
    pub fn start_sum(&self, t: &Tensor, range: Range<usize>) -> Result<()> {
        let (ptr, kind) = self.queue(t, &range)?;
        // SAFETY: `ptr` holds `range.len()` elements of the buffer on this rank's GPU; NCCL reads
        // and writes them in place on its stream, after the compute work that wrote them; the
        // buffer outlives the sum because the compute stream, which frees it, waits for NCCL's
        // stream in `wait` first.
        check(self.lib, "all-reduce", unsafe {
            (self.lib.all_reduce)(
                ptr,
                ptr,
                range.len(),
                kind,
                SUM,
                self.comm,
                self.stream.cu_stream().cast(),
            )
        })
    }

    /// Queues the copy of rank `root`'s elements `range` of `t` into every rank's `t`, in place,
    /// as [`Nccl::start_sum`] does.
    pub fn start_broadcast(&self, t: &Tensor, range: Range<usize>, root: usize) -> Result<()> {
        let (ptr, kind) = self.queue(t, &range)?;
        let root = c_int::try_from(root).unwrap_or(c_int::MAX);
        // SAFETY: as in `start_sum`; the root sends from, and the others receive into, the same
        // range of their own buffer.
        check(self.lib, "broadcast", unsafe {
            (self.lib.broadcast)(
                ptr,
                ptr,
                range.len(),
                kind,
                root,
                self.comm,
                self.stream.cu_stream().cast(),
            )
        })
    }

    /// Queues the sum over the ranks of `t`'s elements `range` into rank `root`'s `into`
    /// (a tensor and the offset there; the other ranks pass `None`), as [`Nccl::start_sum`] does.
    pub fn start_reduce(
        &self,
        t: &Tensor,
        range: Range<usize>,
        into: Option<(&Tensor, usize)>,
        root: usize,
    ) -> Result<()> {
        let (send, kind) = self.queue(t, &range)?;
        let recv = match into {
            Some((r, at)) => {
                if r.dtype() != t.dtype() {
                    return Err(Error::InvalidArgument(
                        "NCCL reduce: the two buffers differ in dtype".into(),
                    ));
                }
                self.queue(r, &(at..at + range.len()))?.0
            }
            None => send,
        };
        let root = c_int::try_from(root).unwrap_or(c_int::MAX);
        // SAFETY: `send` holds `range.len()` elements of `t` and `recv` as many of the root's
        // `into` (the others' `recv` is not written: NCCL writes only at the root), both on this
        // rank's GPU and kept alive by the caller until `wait` (or the event of `record`).
        check(self.lib, "reduce", unsafe {
            (self.lib.reduce)(
                send,
                recv,
                range.len(),
                kind,
                SUM,
                root,
                self.comm,
                self.stream.cu_stream().cast(),
            )
        })
    }

    /// An event after every operation queued on NCCL's stream so far.
    pub fn record(&self) -> Result<CudaEvent> {
        Ok(self
            .stream
            .record_event(None)
            .map_err(candle_core::Error::wrap)?)
    }

    /// The compute stream waits (on the GPU) for `event` (see [`Nccl::record`]).
    pub fn compute_waits(&self, event: &CudaEvent) -> Result<()> {
        self.dev
            .cuda_stream()
            .wait(event)
            .map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    /// The compute stream waits (on the GPU) for every sum started so far.
    pub fn wait(&self) -> Result<()> {
        self.dev
            .cuda_stream()
            .join(&self.stream)
            .map_err(candle_core::Error::wrap)?;
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // No wait for queued operations: after an error on this rank they may never complete
        // (the peers stop issuing theirs), and the abort is what lets this rank exit. A run that
        // ends normally has waited for them already (`wait`).
        // SAFETY: the communicator was made by `ncclCommInitRank` and is not used after this.
        unsafe { (self.lib.comm_abort)(self.comm) };
    }
}
