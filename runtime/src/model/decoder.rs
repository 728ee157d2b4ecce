//! One decoder for the Llama family. Differences are driven by the config: Qwen2 adds q/k/v bias,
//! Qwen3 adds q/k RMS norms and an explicit `head_dim`, Llama 3 scales RoPE. Every op on the
//! forward path is differentiable (see [`crate::nn`]).
//!
//! The model is a list of blocks run one after another; later the block boundary is where
//! activation checkpointing and multi-GPU placement happen.

use candle_core::{DType, Device, Result, Tensor};

use super::config::ModelConfig;
use super::rope::Rope;
use crate::nn::Linear;
use crate::nn::linear::{Dropout, mix};
use crate::nn::ops::{apply_rope, rms_norm, silu, softmax_last_dim};

/// Self-attention with GQA.
#[derive(Clone, Debug)]
pub struct Attention {
    /// `q_proj`.
    pub q: Linear,
    /// `k_proj`.
    pub k: Linear,
    /// `v_proj`.
    pub v: Linear,
    /// `o_proj`.
    pub o: Linear,
    /// Qwen3's `q_norm` over the head dimension.
    pub q_norm: Option<Tensor>,
    /// Qwen3's `k_norm`.
    pub k_norm: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `gate_proj`.
    pub gate: Linear,
    /// `up_proj`.
    pub up: Linear,
    /// `down_proj`.
    pub down: Linear,
}

/// One decoder block.
#[derive(Clone, Debug)]
pub struct Block {
    /// `input_layernorm`.
    pub input_norm: Tensor,
    /// `self_attn`.
    pub attn: Attention,
    /// `post_attention_layernorm`.
    pub post_norm: Tensor,
    /// `mlp`.
    pub mlp: Mlp,
}

/// Keys and values of past positions, per layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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

/// Per-forward inputs shared by every block.
pub struct Step<'a> {
    /// RoPE cos table `[seq, head_dim]`.
    pub cos: &'a Tensor,
    /// RoPE sin table.
    pub sin: &'a Tensor,
    /// Additive attention bias `[b, 1, seq, total]` in f32, or `None` when nothing is masked.
    pub bias: Option<&'a Tensor>,
    /// Training: the seed of this forward's dropout masks (`None` = inference, no dropout).
    pub train_seed: Option<u64>,
}

impl Attention {
    /// Builds the attention of a block from its projections and the config.
    pub fn new(
        cfg: &ModelConfig,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        norms: Option<(Tensor, Tensor)>,
    ) -> Self {
        let (q_norm, k_norm) = norms.map_or((None, None), |(a, b)| (Some(a), Some(b)));
        Self {
            q,
            k,
            v,
            o,
            q_norm,
            k_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
        }
    }

    fn project(
        &self,
        lin: &Linear,
        norm: Option<&Tensor>,
        x: &Tensor,
        heads: usize,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let y = lin
            .forward_t(x, dropout)?
            .reshape((b, s, heads, self.head_dim))?;
        let y = match norm {
            Some(w) => rms_norm(&y, w, self.eps)?,
            None => y,
        };
        y.transpose(1, 2)?.contiguous()
    }

    /// # Shapes
    /// `x: [b, seq, hidden]` -> `[b, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let q = apply_rope(
            &self.project(&self.q, self.q_norm.as_ref(), x, self.heads, dropout)?,
            step.cos,
            step.sin,
        )?;
        let k = apply_rope(
            &self.project(&self.k, self.k_norm.as_ref(), x, self.kv_heads, dropout)?,
            step.cos,
            step.sin,
        )?;
        let v = self.project(&self.v, None, x, self.kv_heads, dropout)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let rep = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match step.bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * self.head_dim))?;
        self.o.forward_t(&out, dropout)
    }
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, rep, t, d))?
        .reshape((b, kv * rep, t, d))
}

impl Mlp {
    /// # Shapes
    /// `x: [.., hidden]` -> `[.., hidden]`.
    pub fn forward(&self, x: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        let h = silu(&self.gate.forward_t(x, dropout)?)?.mul(&self.up.forward_t(x, dropout)?)?;
        self.down.forward_t(&h, dropout)
    }
}

impl Block {
    /// Pre-norm residual block; `layer` seeds its dropout masks when training.
    ///
    /// # Shapes
    /// `x: [b, seq, hidden]` -> `[b, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        eps: f64,
        step: &Step,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        layer: usize,
    ) -> Result<Tensor> {
        let dropout = step.train_seed.map(|s| Dropout::new(mix(s, layer as u64)));
        let h = self.attn.forward(
            &rms_norm(x, &self.input_norm, eps)?,
            step,
            cache,
            dropout.as_ref(),
        )?;
        let x = x.add(&h)?;
        let h = self
            .mlp
            .forward(&rms_norm(&x, &self.post_norm, eps)?, dropout.as_ref())?;
        x.add(&h)
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
    pub lm_head: Option<Linear>,
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

    /// [`Decoder::forward`] for training: `train_seed` seeds the LoRA dropout masks.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let x = self.embed_tokens(input_ids)?;
        let (cos, sin, bias) = self.step_inputs(b, s, offset, attention_mask)?;
        let step = Step {
            cos: &cos,
            sin: &sin,
            bias: bias.as_ref(),
            train_seed,
        };
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, self.cfg.rms_norm_eps, &step, slot, i)?;
        }
        if let Some(c) = cache {
            c.len += s;
        }
        self.head(&x)
    }

    /// Embeddings of `input_ids` `[b, seq]` -> `[b, seq, hidden]`.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))
    }

    /// RoPE tables and the attention bias for `b` sequences of `s` new tokens after `offset`.
    pub fn step_inputs(
        &self,
        b: usize,
        s: usize,
        offset: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let device = self.device().clone();
        let (cos, sin) = self.rope.tables(offset, s, self.dtype(), &device)?;
        let bias = attention_bias(b, s, offset, attention_mask, &device)?;
        Ok((cos, sin, bias))
    }

    /// Final norm and LM head: hidden states -> logits.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?;
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => Linear::new(self.embed.clone(), None).forward(&x),
        }
    }

    /// Number of parameters (tied weights once).
    pub fn num_params(&self) -> usize {
        let lin =
            |l: &Linear| l.weight.elem_count() + l.bias.as_ref().map_or(0, Tensor::elem_count);
        let mut n =
            self.embed.elem_count() + self.norm.elem_count() + self.lm_head.as_ref().map_or(0, lin);
        for b in &self.blocks {
            let a = &b.attn;
            n += b.input_norm.elem_count() + b.post_norm.elem_count();
            n += lin(&a.q) + lin(&a.k) + lin(&a.v) + lin(&a.o);
            n += a.q_norm.as_ref().map_or(0, Tensor::elem_count)
                + a.k_norm.as_ref().map_or(0, Tensor::elem_count);
            n += lin(&b.mlp.gate) + lin(&b.mlp.up) + lin(&b.mlp.down);
        }
        n
    }
}

/// The additive bias `[b, 1, seq, offset + seq]` for causal masking and padding, or `None` when
/// no position is masked (one new token, no padding).
fn attention_bias(
    b: usize,
    s: usize,
    offset: usize,
    mask: Option<&Tensor>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let t = offset + s;
    let pad: Option<Vec<Vec<u32>>> = match mask {
        Some(m) => {
            let (mb, mt) = m.dims2()?;
            if mb != b || mt != t {
                candle_core::bail!(
                    "attention_mask has shape [{mb}, {mt}], expected [{b}, {t}] (batch, cached + new tokens)"
                );
            }
            Some(m.to_dtype(DType::U32)?.to_vec2()?)
        }
        None => None,
    };
    if s == 1
        && pad
            .as_ref()
            .is_none_or(|p| p.iter().flatten().all(|&v| v != 0))
    {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(b * s * t);
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let visible = j <= offset + i && pad.as_ref().is_none_or(|p| p[bi][j] != 0);
                data.push(if visible { 0f32 } else { f32::MIN });
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (b, 1, s, t), device)?))
}
