//! The server's KV cache: per layer, one key and one value buffer `[slots + 1, kv heads,
//! capacity, head dim]` allocated once for every sequence the server may run at a time, each
//! sequence in a slot with a length of its own. A prefill writes one sequence's prompt into its
//! slot; a decode step writes one position for each row of a span of slots in one scatter, and
//! attention reads the span as a view (no copy). The extra slot at the end takes the writes of
//! idle rows (a span's free slots or another adapter's sequences), which nothing reads.

use candle_core::{Device, Result, Tensor};

use crate::model::decoder::Decoder;
use crate::model::kv_cache::{DecodeCache, kv_append};
use crate::nn::AttnMask;

/// Every slot's keys and values, and how many positions each holds.
pub struct Slots {
    /// Per layer `(k, v)`, each `[slots + 1, kv, capacity, d]` on the layer's device.
    layers: Vec<(Tensor, Tensor)>,
    lens: Vec<usize>,
    capacity: usize,
    kv: usize,
    d: usize,
}

impl Slots {
    /// Buffers for `slots` sequences of up to `capacity` positions each, every layer on its
    /// block's device in the decoder's dtype.
    pub fn new(decoder: &Decoder, slots: usize, capacity: usize) -> Result<Self> {
        let (kv, d) = (decoder.cfg.num_kv_heads(), decoder.cfg.head_dim());
        let mut layers = Vec::with_capacity(decoder.blocks.len());
        for b in &decoder.blocks {
            let fresh = || Tensor::zeros((slots + 1, kv, capacity, d), decoder.dtype(), b.device());
            layers.push((fresh()?, fresh()?));
        }
        Ok(Self {
            layers,
            lens: vec![0; slots],
            capacity,
            kv,
            d,
        })
    }

    /// Bytes the buffers take for `slots` sequences of `capacity` positions of `decoder`.
    pub fn bytes(decoder: &Decoder, slots: usize, capacity: usize) -> usize {
        let per_layer =
            2 * (slots + 1) * decoder.cfg.num_kv_heads() * capacity * decoder.cfg.head_dim();
        per_layer * decoder.blocks.len() * decoder.dtype().size_in_bytes()
    }

    /// Positions one slot holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences the cache holds at most.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Positions cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Empties `slot` for the next sequence (its stale values are never read: every read is
    /// masked to the slot's length).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// The cache a prefill of `slot` writes into (one row, the positions after its length).
    pub fn prefill(&mut self, slot: usize) -> Prefill<'_> {
        Prefill { slots: self, slot }
    }

    /// The cache of one decode step over the slots `lo..lo + rows.len()`: row `r` is live
    /// (`rows[r]`: one new position at the slot's length) or idle (its write goes to the spare
    /// slot and its output is not used). Idle rows read the first position of their slot.
    pub fn decode(&mut self, lo: usize, rows: &[bool]) -> Result<Decode<'_>> {
        let n = self.lens.len();
        if lo + rows.len() > n {
            candle_core::bail!("decode rows {lo}..{} of {n} slots", lo + rows.len());
        }
        let mut index = Vec::with_capacity(rows.len() * self.kv * self.d);
        let mut ranges = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len());
        for (r, &live) in rows.iter().enumerate() {
            let slot = lo + r;
            let (target, pos) = if live {
                let pos = self.lens[slot];
                if pos >= self.capacity {
                    candle_core::bail!("slot {slot} is full ({} positions)", self.capacity);
                }
                (slot, pos)
            } else {
                (n, 0)
            };
            for h in 0..self.kv {
                let row = ((target * self.kv + h) * self.capacity + pos) as u32;
                index.extend(std::iter::repeat_n(row, self.d));
            }
            ranges.push((0, if live { pos + 1 } else { 1 }));
            positions.push(if live { pos as u32 } else { 0 });
        }
        let keys = ranges.iter().map(|r| r.1).max().unwrap_or(1);
        Ok(Decode {
            slots: self,
            lo,
            rows: rows.to_vec(),
            index,
            on_device: Vec::new(),
            keys,
            mask: AttnMask {
                causal: false,
                offset: 0,
                key_ranges: Some(ranges),
                segments: None,
                shared: None,
            },
            positions,
        })
    }
}

/// One sequence's prefill into its slot.
pub struct Prefill<'a> {
    slots: &'a mut Slots,
    slot: usize,
}

impl DecodeCache for Prefill<'_> {
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let need = offset + s;
        if need > self.slots.capacity {
            candle_core::bail!(
                "{need} positions do not fit a slot of {}",
                self.slots.capacity
            );
        }
        // The slot's row of the buffers, written as generation's cache writes (it never grows:
        // the capacity was checked above).
        let (kb, vb) = &self.slots.layers[layer];
        let mut row = Some((kb.narrow(0, self.slot, 1)?, vb.narrow(0, self.slot, 1)?));
        kv_append(&mut row, k, v, offset)
    }

    fn advance(&mut self, s: usize) {
        self.slots.lens[self.slot] += s;
    }
}

/// One decode step over a span of slots (see [`Slots::decode`]).
pub struct Decode<'a> {
    slots: &'a mut Slots,
    lo: usize,
    rows: Vec<bool>,
    /// The scatter's row index, `[rows * kv, d]`, on the host...
    index: Vec<u32>,
    /// ... and on each device a layer lies on.
    on_device: Vec<(Device, Tensor)>,
    /// Keys the span's attention reads (the longest live row's).
    keys: usize,
    mask: AttnMask,
    positions: Vec<u32>,
}

impl Decode<'_> {
    /// Which keys each row's query sees: its own slot's positions.
    pub fn mask(&self) -> &AttnMask {
        &self.mask
    }

    /// Each row's position (RoPE), `[rows]`.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// The scatter's row index (`[rows * kv, d]`, u32) as the host computed it: what a CUDA
    /// graph's step copies into the tensor it captured.
    pub fn index(&self) -> &[u32] {
        &self.index
    }

    /// The step as a CUDA graph records it: the scatter reads `index` (a tensor whose contents
    /// each replay replaces) and attention sees every slot's whole capacity, bounded by the
    /// rows' key ranges alone (the longest row's length would be baked into the graph).
    pub fn for_graph(mut self, index: Tensor) -> Self {
        self.on_device = vec![(index.device().clone(), index)];
        self.keys = self.slots.capacity;
        self
    }

    fn index_on(&mut self, device: &Device) -> Result<Tensor> {
        if let Some((_, t)) = self.on_device.iter().find(|(d, _)| d.same_device(device)) {
            return Ok(t.clone());
        }
        let rows = self.index.len() / self.slots.d.max(1);
        let t = Tensor::from_slice(&self.index, (rows, self.slots.d), device)?;
        self.on_device.push((device.clone(), t.clone()));
        Ok(t)
    }
}

impl DecodeCache for Decode<'_> {
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        _offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, kv, s, d) = k.dims4()?;
        if b != self.rows.len() || s != 1 {
            candle_core::bail!(
                "a decode step of {} rows takes one position each, got [{b}, {kv}, {s}, {d}]",
                self.rows.len()
            );
        }
        let index = self.index_on(k.device())?;
        let (kb, vb) = self.slots.layers[layer].clone();
        let flat =
            |t: &Tensor| t.reshape(((self.slots.lens.len() + 1) * kv * self.slots.capacity, d));
        flat(&kb)?.scatter_set(&index, &k.contiguous()?.reshape((b * kv, d))?, 0)?;
        flat(&vb)?.scatter_set(&index, &v.contiguous()?.reshape((b * kv, d))?, 0)?;
        let view = |t: &Tensor| t.narrow(0, self.lo, b)?.narrow(2, 0, self.keys);
        Ok((view(&kb)?, view(&vb)?))
    }

    fn rope_append(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        #[cfg(feature = "cuda")]
        if crate::nn::decode::kernels().rope_append && q.device().is_cuda() {
            let (b, s, kv, d) = k.dims4()?;
            if b == self.rows.len() && s == 1 {
                let index = self.index_on(k.device())?;
                let (kb, vb) = self.slots.layers[layer].clone();
                let flat = |t: &Tensor| {
                    t.reshape(((self.slots.lens.len() + 1) * kv * self.slots.capacity, d))
                };
                let (kc, vc) = (flat(&kb)?, flat(&vb)?);
                // One sequence decoding alone has the shared `[1, d]` tables: its row's.
                let row = |t: &Tensor| match t.rank() {
                    2 if b == 1 => t.reshape((1, 1, d)),
                    _ => Ok(t.clone()),
                };
                let (cos, sin) = (row(cos)?, row(sin)?);
                let q = crate::nn::cuda::rope::rope_append(q, k, v, &cos, &sin, &kc, &vc, &index)?;
                let view = |t: &Tensor| t.narrow(0, self.lo, b)?.narrow(2, 0, self.keys);
                return Ok(Some((q, view(&kb)?, view(&vb)?)));
            }
        }
        let _ = (layer, q, k, v, cos, sin);
        Ok(None)
    }

    fn advance(&mut self, _s: usize) {
        for (r, &live) in self.rows.iter().enumerate() {
            if live {
                self.slots.lens[self.lo + r] += 1;
            }
        }
    }
}

/// Positions as the RoPE tables index them: `cos`/`sin` rows for `positions`, `[b, 1, d]`.
pub fn tables_at(
    decoder: &Decoder,
    positions: &[u32],
    capacity: usize,
) -> Result<(Tensor, Tensor)> {
    let idx = Tensor::from_slice(positions, positions.len(), decoder.device())?;
    tables_on(decoder, &idx, capacity)
}

/// [`tables_at`] for positions already on the device (`[b]` u32).
pub fn tables_on(
    decoder: &Decoder,
    positions: &Tensor,
    capacity: usize,
) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = decoder
        .rope
        .tables(0, capacity, decoder.dtype(), decoder.device())?;
    let (b, d) = (positions.dim(0)?, cos.dim(1)?);
    let rows = |t: &Tensor| t.index_select(positions, 0)?.reshape((b, 1, d));
    Ok((rows(&cos)?, rows(&sin)?))
}
