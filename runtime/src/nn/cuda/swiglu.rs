//! SwiGLU on CUDA (`swiglu.cu`), forward and backward in one pass each. Reference ops:
//! [`crate::nn::ops::swiglu`] and [`crate::nn::ops::swiglu_backward`], which take these kernels
//! on a GPU.

use candle_core::{Result, Tensor};

use super::launch::{Arg, Module, addr, empty, launch, launch_1d, ptx};

const PTX: Module = ptx!("swiglu");

/// `silu(gate) * up` in one pass.
pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (pg, dev) = addr(gate, "gate")?;
    let pu = addr(up, "up")?.0;
    let h = empty(&dev, gate.dims(), gate.dtype())?;
    let ph = addr(&h, "h")?.0;
    let n = gate.elem_count() as u64;
    launch(
        &dev,
        &PTX,
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
        &PTX,
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
