//! One decoder for the Llama family. Differences are driven by the config: Qwen2 adds q/k/v bias,
//! Qwen3 adds q/k RMS norms and an explicit `head_dim`, Llama 3 scales RoPE.
//!
//! The model is a list of blocks ([`super::block`]) run one after another; the block boundary is
//! where the training engine stores inputs, recomputes, and (later) moves hidden states between
//! devices.

use candle_core::{DType, Device, Result, Tensor};

use super::block::{Block, Proj, Step};
use super::config::ModelConfig;
use super::kv_cache::{DecodeCache, KvCache};
use super::rope::Rope;
use crate::nn::ops::rms_norm;
use crate::nn::{AttnMask, Linear};

/// RoPE tables on each device blocks use, copied from the embedding device's once per pass.
pub struct DeviceTables {
    tables: Vec<(Device, Tensor, Tensor)>,
}

impl DeviceTables {
    /// The tables `(cos, sin)` computed on `device`.
    pub fn new((cos, sin): (Tensor, Tensor), device: &Device) -> Self {
        Self {
            tables: vec![(device.clone(), cos, sin)],
        }
    }

    /// The tables on `device`.
    pub fn on(&mut self, device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some((_, c, s)) = self.tables.iter().find(|(d, _, _)| d.same_device(device)) {
            return Ok((c.clone(), s.clone()));
        }
        let (c, s) = (
            crate::device::to(&self.tables[0].1, device)?,
            crate::device::to(&self.tables[0].2, device)?,
        );
        self.tables.push((device.clone(), c.clone(), s.clone()));
        Ok((c, s))
    }
}

/// The decoder: embedding, blocks, final norm and LM head.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// The config it was built from.
    pub cfg: ModelConfig,
    /// `embed_tokens` `[vocab, hidden]`.
    pub embed: Tensor,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final `norm`.
    pub norm: Tensor,
    /// `lm_head`, or `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// RoPE frequencies.
    pub rope: Rope,
}

impl Decoder {
    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// The device of the embedding.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Logits for every position.
    ///
    /// `attention_mask` (1 = token, 0 = padding) covers the cached positions and the new ones,
    /// as in transformers. Positions are `cache.len()..` whatever the padding.
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` (u32), `attention_mask: [b, cached + seq]` -> `[b, seq, vocab]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, attention_mask, cache, None)
    }

    /// [`Decoder::forward`] with `train_seed` keying the LoRA dropout masks (training mode).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        train_seed: Option<crate::nn::dropout::Key>,
    ) -> Result<Tensor> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let mask = match attention_mask {
            Some(m) => AttnMask::from_attention_mask(m, offset)?,
            None => AttnMask::causal(offset),
        };
        let cache = cache.map(|c| c as &mut dyn DecodeCache);
        self.head(&self.hidden(input_ids, &mask, cache, train_seed)?)
    }

    /// The hidden states after the last block (before the final norm) for `input_ids` seen
    /// through `mask` (whose `offset` is the cache length when `cache` is given).
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` -> `[b, seq, hidden]`.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        cache: Option<&mut dyn DecodeCache>,
        train_seed: Option<crate::nn::dropout::Key>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let tables = self.rope_tables(mask, b, s)?;
        self.hidden_with(input_ids, mask, tables, cache, train_seed)
    }

    /// [`Decoder::hidden`] with the RoPE `(cos, sin)` tables given (`[s, d]`, or `[b, s, d]`
    /// for rows at positions of their own, as a server's batch of sequences is).
    pub fn hidden_with(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        tables: (Tensor, Tensor),
        mut cache: Option<&mut dyn DecodeCache>,
        train_seed: Option<crate::nn::dropout::Key>,
    ) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        let mut tables = DeviceTables::new(tables, self.device());
        let mut x = self.embed_tokens(input_ids)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut();
            // Placement: the hidden state follows the blocks over their devices.
            x = crate::device::to(&x, block.device())?;
            let (cos, sin) = tables.on(block.device())?;
            let step = Step {
                cos: &cos,
                sin: &sin,
                mask,
                train_seed,
            };
            x = block.forward(&x, &step, slot, i, None)?;
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        Ok(x)
    }

    /// RoPE `(cos, sin)` for `b` rows of `s` positions seen through `mask`: `[s, d]` for
    /// positions `offset..`, or `[b, s, d]` when rows are packed (positions restart at each
    /// example, as TRL's padding-free packing gives them).
    pub fn rope_tables(&self, mask: &AttnMask, b: usize, s: usize) -> Result<(Tensor, Tensor)> {
        let Some(pos) = mask.positions(b, s)? else {
            return self
                .rope
                .tables(mask.offset, s, self.dtype(), self.device());
        };
        // Tables up to the furthest position a row reaches (what dynamic RoPE scales by).
        let reach = pos.iter().max().map_or(s, |&p| p as usize + 1);
        let (cos, sin) = self.rope.tables(0, reach, self.dtype(), self.device())?;
        let idx = Tensor::from_vec(pos, b * s, self.device())?;
        let d = cos.dim(1)?;
        let rows = |t: &Tensor| t.index_select(&idx, 0)?.reshape((b, s, d));
        Ok((rows(&cos)?, rows(&sin)?))
    }

    /// Embeddings of `input_ids` `[b, seq]` -> `[b, seq, hidden]`.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Final norm and LM head: hidden states -> logits.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let hidden = dims.pop().unwrap_or(1);
        let rows = dims.iter().product::<usize>();
        let head = Linear::new(self.head_weight().clone(), None);
        // A decode step's few rows as `nn::decode` runs a product (a matrix-vector kernel on a
        // GPU where it may, the norm inside it where both are on one device), anything longer
        // as the linear layer does.
        let y = if self.norm.device().same_device(head.weight.device()) {
            let x = crate::device::to(x, self.norm.device())?;
            let norm = Some((&self.norm, self.cfg.rms_norm_eps));
            crate::nn::decode::product(&x.reshape((rows, hidden))?, norm, &head)?
        } else {
            let x = self.normed(x)?;
            crate::nn::decode::product(&x.reshape((rows, hidden))?, None, &head)?
        };
        dims.push(y.dim(1)?);
        y.reshape(dims)
    }

    /// The final norm of `x` (on the norm's device), moved to the head's device.
    pub fn normed(&self, x: &Tensor) -> Result<Tensor> {
        let y = rms_norm(
            &crate::device::to(x, self.norm.device())?,
            &self.norm,
            self.cfg.rms_norm_eps,
        )?;
        crate::device::to(&y, self.head_weight().device())
    }

    /// Number of parameters (tied weights once).
    pub fn num_params(&self) -> usize {
        let lin =
            |l: &Linear| l.weight.elem_count() + l.bias.as_ref().map_or(0, Tensor::elem_count);
        let mut n = self.embed.elem_count()
            + self.norm.elem_count()
            + self.lm_head.as_ref().map_or(0, Tensor::elem_count);
        for b in &self.blocks {
            let a = &b.attn;
            n += b.input_norm.elem_count() + b.post_norm.elem_count();
            n += Proj::ALL.iter().map(|&p| lin(b.proj(p))).sum::<usize>();
            n += a.q_norm.as_ref().map_or(0, Tensor::elem_count)
                + a.k_norm.as_ref().map_or(0, Tensor::elem_count);
        }
        n
    }
}
