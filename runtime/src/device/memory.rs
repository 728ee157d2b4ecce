//! A GPU tensor's memory, as the code that hands it to CUDA sees it: the device address of its
//! first element ([`addr`], [`first`]) and fresh uninitialised tensors ([`empty`]), for our
//! kernels, cuBLAS, cuDNN, NCCL and peer copies; and small per-call index tensors uploaded once
//! while they stay the same ([`kept`]).
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{DType, Result, Storage, Tensor};

fn wrap(storage: CudaStorage, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// The last upload kept in a thread's slot: what it was made from, its device, its tensors.
pub(crate) type Kept<K> = Option<(K, candle_core::Device, Tensor, Tensor)>;

/// The two tensors `upload` makes for `key` on `device`, or the ones the slot kept from the last
/// call with an equal key (compared borrowed: a hit copies nothing) and the same device. A copy
/// from pageable host memory waits for the stream to drain, so an upload at every layer's call
/// would leave the GPU idle while the host queues the next kernels; the tensors are only read,
/// and stream order keeps a replaced pair alive for the kernels already queued.
pub(crate) fn kept<K, Q>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Kept<K>>>,
    key: &Q,
    device: &candle_core::Device,
    upload: impl FnOnce() -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)>
where
    Q: PartialEq + ToOwned<Owned = K> + ?Sized,
    K: std::borrow::Borrow<Q>,
{
    slot.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((k, d, a, b)) = last.as_ref()
            && k.borrow() == key
            && d.same_device(device)
        {
            return Ok((a.clone(), b.clone()));
        }
        let (a, b) = upload()?;
        *last = Some((key.to_owned(), device.clone(), a.clone(), b.clone()));
        Ok((a, b))
    })
}

/// The device address of a contiguous tensor's first element, and its device.
pub(crate) fn addr(t: &Tensor, what: &str) -> Result<(u64, CudaDevice)> {
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
