//! A GEMM that accumulates into an existing output (cuBLAS with `beta`): a LoRA path adds into
//! its base projection's output, and weight gradients go straight into their f32 slot of the flat
//! gradient buffer (bf16 operands, f32 accumulator), with no temporary and no separate add.
#![allow(unsafe_code)]

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::{DType, Result, Tensor};

use super::launch::first;

fn data_type(d: DType) -> Result<sys::cudaDataType> {
    Ok(match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        other => candle_core::bail!("gemm: unsupported dtype {other:?}"),
    })
}

/// How cuBLAS (column-major) reads a row-major `[rows, cols]` operand: as is (`N`, the
/// column-major view of a row-major matrix is its transpose, which is what the swapped product
/// below needs) or transposed (`T`, a transposed view), and its leading dimension.
fn operand(t: &Tensor, what: &str) -> Result<(sys::cublasOperation_t, i32)> {
    let (rows, cols) = t.dims2()?;
    let st = t.stride();
    if st[1] == 1 && (st[0] >= cols || rows == 1) {
        Ok((sys::cublasOperation_t::CUBLAS_OP_N, st[0].max(cols) as i32))
    } else if st[0] == 1 && (st[1] >= rows || cols == 1) {
        Ok((sys::cublasOperation_t::CUBLAS_OP_T, st[1].max(rows) as i32))
    } else {
        candle_core::bail!(
            "gemm: {what} {:?} with strides {st:?} is not a matrix cuBLAS reads",
            t.dims()
        )
    }
}

/// `c = alpha * a · b + beta * c`, in place, row-major: `a` `[m, k]`, `b` `[k, n]` (each
/// contiguous or a transposed view), `c` `[m, n]` with unit column stride (a view into a larger
/// buffer is fine). `a` and `b` share a dtype (f32, bf16, f16); `c` has theirs or f32. The product
/// is accumulated in f32. `c` is written where it lies: callers pass a buffer nobody else reads as
/// a value (an output they just made, or a gradient slot).
pub fn gemm(c: &Tensor, a: &Tensor, b: &Tensor, alpha: f32, beta: f32) -> Result<()> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    let (cm, cn) = c.dims2()?;
    if k != k2 || (cm, cn) != (m, n) {
        candle_core::bail!("gemm: {:?} · {:?} into {:?}", a.dims(), b.dims(), c.dims());
    }
    if a.dtype() != b.dtype() || !(c.dtype() == a.dtype() || c.dtype() == DType::F32) {
        candle_core::bail!(
            "gemm: dtypes {:?} · {:?} into {:?}",
            a.dtype(),
            b.dtype(),
            c.dtype()
        );
    }
    let cs = c.stride();
    if cs[1] != 1 && n > 1 {
        candle_core::bail!("gemm: the output {:?} has strides {cs:?}", c.dims());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ: cuBLAS's first operand is `b`.
    let (op_b, ld_b) = operand(b, "b")?;
    let (op_a, ld_a) = operand(a, "a")?;
    let (pa, dev) = first(a, "a")?;
    let (pb, _) = first(b, "b")?;
    let (pc, _) = first(c, "c")?;
    let blas = dev.cublas_handle();
    // SAFETY: the three addresses are live device buffers of the shapes and strides checked above
    // on this device; the handle's stream is the device's stream the tensors were made on; the
    // scalars are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            (&raw const alpha).cast::<c_void>(),
            pb as *const c_void,
            data_type(b.dtype())?,
            ld_b,
            pa as *const c_void,
            data_type(a.dtype())?,
            ld_a,
            (&raw const beta).cast::<c_void>(),
            pc as *mut c_void,
            data_type(c.dtype())?,
            cs[0].max(n) as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(candle_core::Error::wrap)
}
