//! The KV cache of generation: per layer, preallocated key and value buffers that each step
//! writes its new positions into. Each block appends its own keys and values through
//! [`DecodeCache`]; the decoder counts the positions once every block did. [`KvCache`] holds one
//! sequence's (or a batch that advances together); the server's cache of many sequences of their
//! own lengths (`crate::serve::slots`) is the other implementation.

use candle_core::{Result, Tensor};

/// Where the blocks keep the keys and values of past positions while decoding.
pub trait DecodeCache {
    /// Stores layer `layer`'s new keys and values `k`, `v` (`[b, kv heads, s, d]`, any layout;
    /// the queries' first position is `offset`) and returns every key and value they attend to.
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)>;

    /// Counts `s` more positions as cached (after every layer appended them).
    fn advance(&mut self, s: usize);

    /// RoPE of the step's queries and keys and the cache write in one pass, where the cache
    /// has one (a decode step on a GPU): `q` `[b, s, h, d]`, `k` and `v` `[b, s, kv, d]` before
    /// RoPE (any layout, `d` contiguous), `cos`/`sin` the step's tables. Returns the roped
    /// queries (`[b, s, h, d]`) and every key and value they attend to; `None`: the caller
    /// ropes and [`DecodeCache::append`]s.
    fn rope_append(
        &mut self,
        _layer: usize,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _cos: &Tensor,
        _sin: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }
}

/// Keys and values of past positions, per layer: preallocated `[b, kv heads, capacity, d]`
/// buffers that each step writes its new positions into (no concatenation per token), grown by
/// doubling when a step would pass the end. Not `Clone`: the buffers are written in place.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

/// Writes `k`, `v` (`[b, kv, s, d]`, any layout) at position `offset` of the layer's buffers in
/// `slot` (made or grown as needed) and returns views of positions `0..offset + s`.
pub(crate) fn kv_append(
    slot: &mut Option<(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, kv, s, d) = k.dims4()?;
    let need = offset + s;
    let cap = slot.as_ref().map_or(Ok(0), |(kb, _)| kb.dim(2))?;
    if cap < need {
        let grown = need.next_power_of_two().max(256);
        let fresh = || Tensor::zeros((b, kv, grown, d), k.dtype(), k.device());
        let (kb, vb) = (fresh()?, fresh()?);
        if let Some((ok, ov)) = slot.take()
            && offset > 0
        {
            kb.slice_set(&ok.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
            vb.slice_set(&ov.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
        }
        *slot = Some((kb, vb));
    }
    let Some((kb, vb)) = slot.as_ref() else {
        candle_core::bail!("KV cache slot missing after growth");
    };
    // slice_set writes along dim 2 of a contiguous buffer from a contiguous source (for one new
    // position, a copy of `kv * d` elements).
    kb.slice_set(&k.contiguous()?, 2, offset)?;
    vb.slice_set(&v.contiguous()?, 2, offset)?;
    Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
}

impl KvCache {
    /// An empty cache for `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DecodeCache for KvCache {
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!(
                "KV cache has {} layers, asked for {layer}",
                self.layers.len()
            );
        };
        kv_append(slot, k, v, offset)
    }

    fn advance(&mut self, s: usize) {
        self.len += s;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Appending step by step (across a growth of the buffers, from transposed views as the
    /// block passes them) gives the concatenation of every step's keys and values.
    #[test]
    fn the_kv_cache_holds_every_appended_position() {
        let dev = Device::Cpu;
        let mut slot = None;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        let mut offset = 0;
        for s in [200usize, 1, 1, 60, 1] {
            // [b, s, kv, d] seen as [b, kv, s, d]
            let k = Tensor::randn(0f32, 1.0, (2, s, 3, 4), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, s, 3, 4), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let (ka, va) = kv_append(&mut slot, &k, &v, offset).unwrap();
            ks.push(k);
            vs.push(v);
            offset += s;
            let want_k = Tensor::cat(&ks, 2).unwrap();
            let want_v = Tensor::cat(&vs, 2).unwrap();
            assert_eq!(ka.dims(), want_k.dims());
            assert_eq!(crate::testing::max_abs_diff(&ka, &want_k), 0.0);
            assert_eq!(crate::testing::max_abs_diff(&va, &want_v), 0.0);
        }
        assert_eq!(slot.as_ref().unwrap().0.dim(2).unwrap(), 512);
    }
}
