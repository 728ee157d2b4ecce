//! The block inputs a micro-batch keeps from its forward for its backward. Without offload they
//! stay where they are. With activation offload (`gradient_checkpointing: "offload"`) each one
//! is parked in host memory as soon as its block starts ([`crate::device::offload`]), its device
//! copy let go when the next block's input arrives (the copy out ran beside that block's
//! forward), and in backward block `i`'s input is fetched back while block `i + 1` runs its
//! backward. So the device holds about two blocks' inputs at a time instead of every layer's. The
//! last block's input is never parked: its backward comes first.

use candle_core::Tensor;

use crate::Result;
use crate::device::offload::{Fetching, Parked, park};

enum Kept {
    Device(Tensor),
    Parked(Parked),
    Fetching(Fetching),
    Taken,
}

/// One micro-batch's block inputs, in block order.
pub(super) struct BlockInputs {
    offload: bool,
    /// Blocks in the model (the last one's input stays on its device).
    blocks: usize,
    kept: Vec<Kept>,
}

impl BlockInputs {
    pub(super) fn new(offload: bool, blocks: usize) -> Self {
        Self {
            offload,
            blocks,
            kept: Vec::with_capacity(blocks),
        }
    }

    /// Keeps the input of the next block.
    pub(super) fn push(&mut self, x: Tensor) -> Result<()> {
        let i = self.kept.len();
        if !self.offload || i + 1 >= self.blocks {
            self.kept.push(Kept::Device(x));
        } else {
            self.kept.push(Kept::Parked(park(&x)?));
        }
        // The previous input's copy out had this block's forward to finish.
        if let Some(Kept::Parked(p)) = i.checked_sub(1).and_then(|j| self.kept.get_mut(j)) {
            p.release()?;
        }
        Ok(())
    }

    /// Block `i`'s input, for its recompute; starts bringing block `i - 1`'s back.
    pub(super) fn take(&mut self, i: usize) -> Result<Tensor> {
        if let Some(j) = i.checked_sub(1)
            && matches!(self.kept.get(j), Some(Kept::Parked(_)))
            && let Kept::Parked(p) = std::mem::replace(&mut self.kept[j], Kept::Taken)
        {
            self.kept[j] = Kept::Fetching(p.fetch()?);
        }
        let slot = self
            .kept
            .get_mut(i)
            .ok_or_else(|| crate::Error::InvalidArgument(format!("no kept input of block {i}")))?;
        match std::mem::replace(slot, Kept::Taken) {
            Kept::Device(t) => Ok(t),
            Kept::Fetching(f) => Ok(f.ready()?),
            Kept::Parked(p) => Ok(p.fetch()?.ready()?),
            Kept::Taken => Err(crate::Error::InvalidArgument(format!(
                "the input of block {i} was taken twice"
            ))),
        }
    }

    /// Forgets the inputs of blocks `i..` (their backward is done).
    pub(super) fn truncate(&mut self, i: usize) {
        self.kept.truncate(i);
    }
}
