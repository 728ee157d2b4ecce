//! NCCL for the ranks' sums on GPUs: the f32 gradient buffers are summed in place on the device,
//! on the compute stream (so the sum is ordered after the backward that wrote them, and the
//! optimizer after the sum). NCCL is not linked: `libnccl.so.2` is loaded at run time from where
//! the user has it (the loader's search, then pip wheels such as torch's `nvidia-nccl`), like
//! cuDNN, so a build with the `cuda` feature starts without it. The ranks meet over the TCP
//! [`Group`]: rank 0 makes the NCCL id and sends it to the others.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;

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
type CommAbort = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// `ncclFloat32` and `ncclSum` in nccl.h.
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

/// The entry points qscript uses.
struct Lib {
    _library: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    comm_abort: CommAbort,
    error_string: GetErrorString,
    version: c_int,
}

/// NCCL, loaded once per process, or why not.
fn lib() -> std::result::Result<&'static Lib, &'static str> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut tried = Vec::new();
        for path in crate::nn::cuda::library_candidates("QSCRIPT_NCCL", "libnccl.so.2", "nccl") {
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

/// One rank's NCCL communicator over the group's ranks, on one GPU's compute stream.
pub struct Nccl {
    lib: &'static Lib,
    comm: *mut c_void,
    dev: CudaDevice,
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
        Ok(Some(Self {
            lib,
            comm,
            dev: dev.clone(),
        }))
    }

    /// `t` (a contiguous f32 tensor on this rank's GPU, held by nothing else) summed over the
    /// ranks, in place, on the compute stream.
    pub fn sum(&self, t: &Tensor) -> Result<()> {
        if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
            return Err(Error::InvalidArgument(
                "NCCL sum: the buffer must be contiguous f32".into(),
            ));
        }
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*storage else {
            return Err(Error::InvalidArgument(
                "NCCL sum: the buffer is not on a GPU".into(),
            ));
        };
        let stream = self.dev.cuda_stream();
        let slice = c.as_cuda_slice::<f32>()?;
        let (base, _guard) =
            candle_core::cuda_backend::cudarc::driver::DevicePtr::device_ptr(slice, &stream);
        let ptr = (base + 4 * layout.start_offset() as u64) as *mut c_void;
        // SAFETY: `ptr` holds `n` f32 on this rank's GPU; NCCL reads and writes them in place on
        // the compute stream, ordered after the kernels that wrote them.
        check(self.lib, "all-reduce", unsafe {
            (self.lib.all_reduce)(
                ptr,
                ptr,
                n,
                FLOAT32,
                SUM,
                self.comm,
                stream.cu_stream().cast(),
            )
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by `ncclCommInitRank` and is not used after this.
        unsafe { (self.lib.comm_abort)(self.comm) };
    }
}
