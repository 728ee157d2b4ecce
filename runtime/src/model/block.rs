//! One decoder block of the Llama family, forward and backward, and the one list of its
//! projections ([`Proj`]) and norms ([`Norm`]) that loading, LoRA, saving, merging and the
//! parameter visitor all use.
//! Qwen2 adds q/k/v bias, Qwen3 adds q/k RMS norms over the head dimension.

use candle_core::{DType, Result, Tensor};

use super::config::ModelConfig;
use crate::nn::attention::{AttnSaved, attention, attention_backward};
use crate::nn::decode;
use crate::nn::linear::{LinearSaved, forward_concat};
use crate::nn::ops::{
    add_into, rms_norm, rms_norm_backward_into, rope, rope_bwd, swiglu, swiglu_backward,
};
use crate::nn::{AttnMask, GradSink, Linear};

/// The projections of a block, in HF's order: the only list of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Proj {
    /// Every projection, in order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module path under `model.layers.N.`.
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The last component of the path (`q_proj`), as `target_modules` names it.
    pub fn short(self) -> &'static str {
        let p = self.path();
        p.rsplit('.').next().unwrap_or(p)
    }

    fn index(self) -> u64 {
        self as u64
    }

    /// The key of this projection's dropout masks in `layer` (training only).
    fn key(self, step: &Step, layer: usize) -> Option<crate::nn::dropout::Key> {
        step.train_seed
            .map(|k| k.with(layer as u64).with(self.index()))
    }
}

/// The RMS norms of a block, with HF's names (Qwen3's q/k norms only where the model has them);
/// with [`Proj`], every weight of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Norm {
    /// `input_layernorm`
    Input,
    /// `post_attention_layernorm`
    PostAttention,
    /// Qwen3's `self_attn.q_norm`
    Q,
    /// Qwen3's `self_attn.k_norm`
    K,
}

impl Norm {
    /// The module path under `model.layers.N.`.
    pub fn path(self) -> &'static str {
        match self {
            Norm::Input => "input_layernorm",
            Norm::PostAttention => "post_attention_layernorm",
            Norm::Q => "self_attn.q_norm",
            Norm::K => "self_attn.k_norm",
        }
    }

    /// Its weight's name under `model.layers.N.`.
    pub fn weight(self) -> String {
        format!("{}.weight", self.path())
    }
}

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
    /// q, k and v's one allocation where they have one ([`FusedQkv`]).
    pub(super) qkv: Option<FusedQkv>,
}

/// The one allocation behind q, k and v where they have one (`super::qkv`).
#[derive(Clone, Debug)]
pub struct FusedQkv {
    /// `[q_out + k_out + v_out, in]`: q's rows, then k's, then v's.
    pub weight: Tensor,
    /// Their biases, concatenated the same way (all three have one, or none does).
    pub bias: Option<Tensor>,
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
    /// `rms_norm_eps`.
    pub eps: f64,
}

/// Per-forward inputs shared by every block.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// RoPE cos table `[seq, head_dim]`.
    pub cos: &'a Tensor,
    /// RoPE sin table.
    pub sin: &'a Tensor,
    /// Which keys each query sees.
    pub mask: &'a AttnMask,
    /// Training: the key of this forward's dropout masks (`None` = inference, no dropout).
    pub train_seed: Option<crate::nn::dropout::Key>,
}

/// Bytes of one of the MLP's intermediates (`gate`, `up`, their product) for a whole micro-batch
/// above which a block runs its MLP in row tiles of at most this size (Unsloth's tiled MLP): a
/// long sequence then never holds a sequence-long intermediate, in forward or backward.
pub const MLP_TILE_BYTES: usize = 1 << 30;

/// Rows per MLP tile for `rows` tokens, an MLP of `intermediate` features and `dtype_bytes` a
/// value, when the MLP runs in tiles (its intermediates would exceed `limit` bytes, normally
/// [`MLP_TILE_BYTES`]): a multiple of 256 rows where one fits.
pub fn mlp_tile_rows(
    rows: usize,
    intermediate: usize,
    dtype_bytes: usize,
    limit: usize,
) -> Option<usize> {
    let per_row = (intermediate * dtype_bytes).max(1);
    if rows.saturating_mul(per_row) <= limit {
        return None;
    }
    let t = (limit / per_row).max(1);
    Some(if t >= 256 { t / 256 * 256 } else { t })
}

thread_local! {
    static TILE_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(MLP_TILE_BYTES) };
}

/// Runs `f` with the blocks this thread runs tiling their MLP above `bytes` instead of
/// [`MLP_TILE_BYTES`] (tests and benchmarks: a small model's MLP in tiles).
pub fn with_mlp_tile_bytes<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let before = TILE_BYTES.with(|c| c.replace(bytes));
    let out = f();
    TILE_BYTES.with(|c| c.set(before));
    out
}

/// What a block's backward needs from its forward.
#[derive(Debug, Default)]
pub struct BlockSaved {
    x: Option<Tensor>,
    lin: [Option<LinearSaved>; 7],
    q_pre: Option<Tensor>,
    k_pre: Option<Tensor>,
    attn: Option<AttnSaved>,
    mid: Option<Tensor>,
    gate: Option<Tensor>,
    up: Option<Tensor>,
    /// The MLP ran in tiles of this many rows: backward recomputes it tile by tile from `mid`
    /// (nothing of it is saved).
    tile: Option<usize>,
}

fn missing() -> candle_core::Error {
    candle_core::Error::Msg("block backward called without a saved forward".into())
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
            qkv: None,
        }
    }
}

impl Block {
    /// The device of the block's weights (`device_map` may put blocks on different devices).
    pub fn device(&self) -> &candle_core::Device {
        self.input_norm.device()
    }

    /// The projection `p`.
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.attn.q,
            Proj::K => &self.attn.k,
            Proj::V => &self.attn.v,
            Proj::O => &self.attn.o,
            Proj::Gate => &self.mlp.gate,
            Proj::Up => &self.mlp.up,
            Proj::Down => &self.mlp.down,
        }
    }

    /// The projection `p`, mutably.
    pub fn proj_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::Q => &mut self.attn.q,
            Proj::K => &mut self.attn.k,
            Proj::V => &mut self.attn.v,
            Proj::O => &mut self.attn.o,
            Proj::Gate => &mut self.mlp.gate,
            Proj::Up => &mut self.mlp.up,
            Proj::Down => &mut self.mlp.down,
        }
    }

    fn linear(
        &self,
        p: Proj,
        x: &Tensor,
        step: &Step,
        layer: usize,
        saved: &mut Option<&mut BlockSaved>,
    ) -> Result<Tensor> {
        let slot = saved.as_deref_mut().map(|s| &mut s.lin[p as usize]);
        self.proj(p).forward_t(x, p.key(step, layer), slot)
    }

    /// Pre-norm residual block. With `saved`, records what [`Block::backward`] needs; `cache`
    /// (inference) holds the keys and values of past positions.
    ///
    /// # Shapes
    /// `x: [b, seq, hidden]` -> `[b, seq, hidden]`.
    pub fn forward<'c>(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&mut (dyn super::kv_cache::DecodeCache + 'c)>,
        layer: usize,
        saved: Option<&mut BlockSaved>,
    ) -> Result<Tensor> {
        self.run(x, step, cache, layer, saved, true)?
            .ok_or_else(|| candle_core::Error::Msg("a block's forward gave no output".into()))
    }

    /// What [`Block::backward`] needs, recomputed from the block's input (gradient
    /// checkpointing). A tiled MLP is left for the backward, which recomputes it tile by tile.
    pub fn recompute(&self, x: &Tensor, step: &Step, layer: usize) -> Result<BlockSaved> {
        let mut sv = BlockSaved::default();
        self.run(x, step, None, layer, Some(&mut sv), false)?;
        Ok(sv)
    }

    /// Rows per MLP tile for `rows` tokens in `dtype` ([`mlp_tile_rows`]); never where training
    /// draws dropout masks in the MLP's adapters (a tile would need its rows' masks).
    fn mlp_tile(&self, rows: usize, dtype: DType, step: &Step) -> Option<usize> {
        let m = &self.mlp;
        let dropout =
            step.train_seed.is_some() && [&m.gate, &m.up, &m.down].iter().any(|l| l.has_dropout());
        if dropout {
            return None;
        }
        mlp_tile_rows(
            rows,
            m.up.out_features(),
            dtype.size_in_bytes(),
            TILE_BYTES.with(std::cell::Cell::get),
        )
    }

    /// The forward; with `output` off (a recompute) the output may be left out.
    fn run<'c>(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&mut (dyn super::kv_cache::DecodeCache + 'c)>,
        layer: usize,
        mut saved: Option<&mut BlockSaved>,
        output: bool,
    ) -> Result<Option<Tensor>> {
        let a = &self.attn;
        let (b, s, _) = x.dims3()?;
        let hd = a.head_dim;
        let dev = x.device();
        let span = crate::profile::span("fwd.norm+qkv+rope", dev);
        // Decoding (generation, serving: a KV cache, nothing saved): the projections grouped as
        // `nn::decode` runs them (on a GPU, one kernel a group for a decode step's few rows).
        let infer = cache.is_some() && saved.is_none() && step.train_seed.is_none();
        let hidden = x.dim(2)?;
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, hd));
        let (q, k, v) = if infer {
            let x2 = x.reshape((b * s, hidden))?;
            let mut qkv =
                decode::normed_projections(&x2, &self.input_norm, self.eps, &[&a.q, &a.k, &a.v])?
                    .into_iter();
            let mut next = |n: usize| match qkv.next() {
                Some(t) => heads(t, n),
                None => Err(candle_core::Error::Msg(
                    "q/k/v: a projection is missing".into(),
                )),
            };
            (next(a.heads)?, next(a.kv_heads)?, next(a.kv_heads)?)
        } else if let Some(f) = a.fused() {
            // One product for the three ([`FusedQkv`]), seen as [b, s, heads of q | k | v, d].
            let h = rms_norm(x, &self.input_norm, self.eps)?;
            let slots = saved.as_deref_mut().map(|sv| &mut sv.lin[..3]);
            let keys = [Proj::Q, Proj::K, Proj::V].map(|p| p.key(step, layer));
            let lins = [&a.q, &a.k, &a.v];
            let y = forward_concat(&lins, &f.weight, f.bias.as_ref(), &h, &keys, slots)?
                .reshape((b, s, a.heads + 2 * a.kv_heads, hd))?;
            (
                y.narrow(2, 0, a.heads)?,
                y.narrow(2, a.heads, a.kv_heads)?,
                // Its own memory: what attention keeps of it must not hold all of `y`.
                y.narrow(2, a.heads + a.kv_heads, a.kv_heads)?
                    .contiguous()?,
            )
        } else {
            let h = rms_norm(x, &self.input_norm, self.eps)?;
            let q = heads(self.linear(Proj::Q, &h, step, layer, &mut saved)?, a.heads)?;
            let k = heads(
                self.linear(Proj::K, &h, step, layer, &mut saved)?,
                a.kv_heads,
            )?;
            let v = heads(
                self.linear(Proj::V, &h, step, layer, &mut saved)?,
                a.kv_heads,
            )?;
            (q, k, v)
        };
        let norm_heads = |t: Tensor, w: Option<&Tensor>| match w {
            Some(w) => rms_norm(&t, w, self.eps),
            None => Ok(t),
        };
        if let Some(sv) = saved.as_deref_mut()
            && a.q_norm.is_some()
        {
            // Their own memory (a fused product's q and k are views of all three).
            sv.q_pre = Some(q.contiguous()?);
            sv.k_pre = Some(k.contiguous()?);
        }
        let qn = norm_heads(q, a.q_norm.as_ref())?;
        let kn = norm_heads(k, a.k_norm.as_ref())?;
        // Decoding: RoPE and the cache write in one pass where the cache runs one.
        let mut cache = cache;
        let roped = match cache.as_mut() {
            Some(c) if infer => c.rope_append(layer, &qn, &kn, &v, step.cos, step.sin)?,
            _ => None,
        };
        // [b, s, h, d] as the projections lay them out, seen as [b, h, s, d]: attention takes
        // these views (cuDNN with no copies), so nothing is transposed here.
        let (q, k, v) = if let Some((q, k, v)) = roped {
            (q.transpose(1, 2)?, k, v)
        } else {
            let q = rope(&qn, step.cos, step.sin)?.transpose(1, 2)?;
            let k = rope(&kn, step.cos, step.sin)?.transpose(1, 2)?;
            let v = v.transpose(1, 2)?;
            match cache {
                Some(c) => {
                    let (k, v) = c.append(layer, &k, &v, step.mask.offset)?;
                    (q, k, v)
                }
                None => (q, k, v),
            }
        };
        drop(span);
        let span = crate::profile::span("fwd.attention", dev);
        let attn_slot = saved.as_deref_mut().map(|s| &mut s.attn);
        let out = attention(&q, &k, &v, step.mask, attn_slot)?
            .transpose(1, 2)?
            .reshape((b, s, a.heads * hd))?;
        drop(span);
        let span = crate::profile::span("fwd.o+mlp", dev);
        let rows = b * s;
        let mid = if infer {
            decode::residual(
                &out.reshape((rows, a.heads * hd))?,
                &a.o,
                &x.reshape((rows, hidden))?,
            )?
            .reshape((b, s, hidden))?
        } else {
            add_into(self.linear(Proj::O, &out, step, layer, &mut saved)?, x)?
        };
        if let Some(t) = self.mlp_tile(rows, x.dtype(), step) {
            let y = if output {
                Some(add_into(self.mlp_tiled(&mid, t)?, &mid)?)
            } else {
                None
            };
            drop(span);
            if let Some(sv) = saved {
                sv.x = Some(x.clone());
                sv.mid = Some(mid);
                sv.tile = Some(t);
            }
            return Ok(y);
        }
        if infer {
            let m = &self.mlp;
            let norm = Some((&self.post_norm, self.eps));
            let act = decode::swiglu(&mid.reshape((rows, hidden))?, norm, &m.gate, &m.up)?;
            let y = decode::residual(&act, &m.down, &mid.reshape((rows, hidden))?)?;
            drop(span);
            return Ok(Some(y.reshape((b, s, hidden))?));
        }
        let h2 = rms_norm(&mid, &self.post_norm, self.eps)?;
        let gate = self.linear(Proj::Gate, &h2, step, layer, &mut saved)?;
        let up = self.linear(Proj::Up, &h2, step, layer, &mut saved)?;
        let act = swiglu(&gate, &up)?;
        // A recompute needs no output: the block's output is the next block's kept input, so the
        // down projection's GEMM (a third of the MLP's) is skipped and only what its backward
        // reads is kept (not where its adapter draws a dropout mask the backward must replay).
        let y = if output || self.mlp.down.has_dropout() {
            let down = self.linear(Proj::Down, &act, step, layer, &mut saved)?;
            Some(add_into(down, &mid)?)
        } else {
            if let Some(sv) = saved.as_deref_mut() {
                let flat = act.reshape((rows, act.dim(2)?))?;
                sv.lin[Proj::Down as usize] = Some(self.mlp.down.saved_for(&flat)?);
            }
            None
        };
        drop(span);
        if let Some(sv) = saved {
            sv.x = Some(x.clone());
            sv.mid = Some(mid);
            sv.gate = Some(gate);
            sv.up = Some(up);
        }
        Ok(y)
    }

    /// `down(swiglu(gate(h), up(h)))` with `h` the post-attention norm of `mid`, in tiles of
    /// `tile` rows (inference or a forward whose backward recomputes it): `[b, s, hidden]`.
    fn mlp_tiled(&self, mid: &Tensor, tile: usize) -> Result<Tensor> {
        let (b, s, hidden) = mid.dims3()?;
        let rows = b * s;
        let mid2 = mid.reshape((rows, hidden))?;
        let m = &self.mlp;
        let mut parts = Vec::with_capacity(rows.div_ceil(tile));
        for r0 in (0..rows).step_by(tile) {
            let h = rms_norm(
                &mid2.narrow(0, r0, tile.min(rows - r0))?,
                &self.post_norm,
                self.eps,
            )?;
            let act = swiglu(&m.gate.forward(&h)?, &m.up.forward(&h)?)?;
            parts.push(m.down.forward(&act)?);
        }
        Tensor::cat(&parts, 0)?.reshape((b, s, hidden))
    }

    /// The MLP's backward in tiles of `tile` rows, each recomputed from `mid` first: the gradient
    /// into `mid` through the post-attention norm (`[b, s, hidden]`), the MLP's parameter
    /// gradients added to `grads`.
    fn mlp_backward_tiled(
        &self,
        mid: &Tensor,
        dy: &Tensor,
        tile: usize,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let (b, s, hidden) = mid.dims3()?;
        let rows = b * s;
        let (mid2, dy2) = (mid.reshape((rows, hidden))?, dy.reshape((rows, hidden))?);
        let m = &self.mlp;
        let mut parts = Vec::with_capacity(rows.div_ceil(tile));
        for r0 in (0..rows).step_by(tile) {
            let n = tile.min(rows - r0);
            let mt = mid2.narrow(0, r0, n)?;
            let h = rms_norm(&mt, &self.post_norm, self.eps)?;
            let (mut sg, mut su) = (None, None);
            let gate = m.gate.forward_t(&h, None, Some(&mut sg))?;
            let up = m.up.forward_t(&h, None, Some(&mut su))?;
            let (sg, su) = (sg.ok_or_else(missing)?, su.ok_or_else(missing)?);
            let sd = m.down.saved_for(&swiglu(&gate, &up)?)?;
            let dh = m.down.backward(&sd, &dy2.narrow(0, r0, n)?, grads)?;
            let (dgate, dup) = swiglu_backward(&gate, &up, &dh.reshape(gate.shape())?)?;
            let dh2 = m.gate.backward(&sg, &dgate, grads)?;
            let dh2 = m.up.backward_into(&su, &dup, Some(dh2), grads)?;
            parts.push(rms_norm_backward_into(
                &mt,
                &self.post_norm,
                self.eps,
                &dh2,
                grads,
            )?);
        }
        Tensor::cat(&parts, 0)?.reshape((b, s, hidden))
    }

    /// Backward of [`Block::forward`] from `dy`: returns `dx` and adds parameter gradients to
    /// `grads`.
    pub fn backward(
        &self,
        saved: &BlockSaved,
        dy: &Tensor,
        step: &Step,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let a = &self.attn;
        let x = saved.x.as_ref().ok_or_else(missing)?;
        let (b, s, hidden) = x.dims3()?;
        let hd = a.head_dim;
        let lin = |p: Proj| saved.lin[p as usize].as_ref().ok_or_else(missing);
        let mid = saved.mid.as_ref().ok_or_else(missing)?;
        let dev = x.device();
        let span = crate::profile::span("bwd.mlp+o", dev);
        let dmid = if let Some(t) = saved.tile {
            self.mlp_backward_tiled(mid, dy, t, grads)?
        } else {
            let (gate, up) = (
                saved.gate.as_ref().ok_or_else(missing)?,
                saved.up.as_ref().ok_or_else(missing)?,
            );
            let dh = self.mlp.down.backward(lin(Proj::Down)?, dy, grads)?;
            let shape = gate.shape().clone();
            let (dgate, dup) = swiglu_backward(gate, up, &dh.reshape(&shape)?)?;
            // The gate's and up's dx sum inside the second GEMM.
            let dh2 = self.mlp.gate.backward(lin(Proj::Gate)?, &dgate, grads)?;
            let dh2 = self
                .mlp
                .up
                .backward_into(lin(Proj::Up)?, &dup, Some(dh2), grads)?;
            rms_norm_backward_into(
                mid,
                &self.post_norm,
                self.eps,
                &dh2.reshape((b, s, hidden))?,
                grads,
            )?
        };
        let dmid = add_into(dmid, dy)?;
        // attention
        let dout = a.o.backward(lin(Proj::O)?, &dmid, grads)?;
        let dout = dout.reshape((b, s, a.heads, hd))?.transpose(1, 2)?;
        drop(span);
        let span = crate::profile::span("bwd.attention", dev);
        let (dq, dk, dv) = attention_backward(saved.attn.as_ref().ok_or_else(missing)?, &dout)?;
        drop(span);
        let _span = crate::profile::span("bwd.rope+qkv+norm", dev);
        // Back to [b, s, h, d]: cuDNN's gradients already lie that way.
        let mut dq = rope_bwd(&dq.transpose(1, 2)?, step.cos, step.sin)?;
        let mut dk = rope_bwd(&dk.transpose(1, 2)?, step.cos, step.sin)?;
        if let (Some(w), Some(wk)) = (&a.q_norm, &a.k_norm) {
            let qp = saved.q_pre.as_ref().ok_or_else(missing)?;
            let kp = saved.k_pre.as_ref().ok_or_else(missing)?;
            dq = rms_norm_backward_into(qp, w, self.eps, &dq, grads)?;
            dk = rms_norm_backward_into(kp, wk, self.eps, &dk, grads)?;
        }
        let dv = dv.transpose(1, 2)?.contiguous()?;
        // q's, k's and v's dx sum inside their GEMMs.
        let dh =
            a.q.backward(lin(Proj::Q)?, &dq.reshape((b, s, a.heads * hd))?, grads)?;
        let dh = a.k.backward_into(
            lin(Proj::K)?,
            &dk.reshape((b, s, a.kv_heads * hd))?,
            Some(dh),
            grads,
        )?;
        let dh = a.v.backward_into(
            lin(Proj::V)?,
            &dv.reshape((b, s, a.kv_heads * hd))?,
            Some(dh),
            grads,
        )?;
        let dx = rms_norm_backward_into(
            x,
            &self.input_norm,
            self.eps,
            &dh.reshape((b, s, hidden))?,
            grads,
        )?;
        add_into(dx, &dmid)
    }
}
