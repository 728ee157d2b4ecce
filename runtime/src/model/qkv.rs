//! q, k and v as one product. A frozen base's three weights (and biases) are laid out as the row
//! ranges of one allocation when the model loads, so a forward computes the three with one GEMM
//! of `q + k + v` features (Qwen2.5-7B: 4,608) instead of three, two of them only 512 wide, and
//! one bias add; their adapters' A run side by side (`nn::linear::forward_concat`). Each
//! projection keeps its own weight (a view of its rows), so saving, merging, LoRA targets, the
//! backward and decoding see three projections as before.
//!
//! Only where nothing replaces the weights: a model loaded `trainable` (full fine-tuning puts its
//! weights into the optimizer's flat buffer) is never fused, and [`Attention::settle`] (after
//! a merge) gives the remaining views their own memory once one weight is replaced. The one
//! allocation is used only while the three still are its views ([`Attention::fused`]), so a
//! replaced weight can never be read stale.

use candle_core::{Result, Storage, Tensor};

use super::block::{Attention, FusedQkv};
use crate::nn::Weight;

/// Whether fusion is wanted for models loaded on `device`: on a GPU with `QSCRIPT_FUSED_QKV=1`.
/// Opt-in until its speed is measured (its CPU and GPU gradient tests pass).
pub fn wanted(device: &candle_core::Device) -> bool {
    device.is_cuda() && std::env::var("QSCRIPT_FUSED_QKV").as_deref() == Ok("1")
}

/// The address of `t`'s allocation and `t`'s first element within it.
fn place(t: &Tensor) -> (usize, usize) {
    let (s, l) = t.storage_and_layout();
    (std::ptr::from_ref::<Storage>(&s) as usize, l.start_offset())
}

/// Whether `parts` are, in order, the consecutive contiguous pieces of `whole` from its start.
fn pieces_of(whole: &Tensor, parts: &[&Tensor]) -> bool {
    let (alloc, start) = place(whole);
    let mut at = start;
    for p in parts {
        let (a, off) = place(p);
        if a != alloc || off != at || !p.is_contiguous() {
            return false;
        }
        at += p.elem_count();
    }
    at == start + whole.elem_count()
}

impl Attention {
    /// Lays q's, k's and v's weights (and biases) out as one allocation (see the module doc);
    /// leaves them as they are where they cannot be: a 4-bit or shape-only weight, mixed dtypes
    /// or devices, biases on some only.
    pub fn fuse_qkv(&mut self) -> Result<()> {
        let (Some(wq), Some(wk), Some(wv)) = (
            self.q.weight.as_dense(),
            self.k.weight.as_dense(),
            self.v.weight.as_dense(),
        ) else {
            return Ok(());
        };
        let ws = [wq, wk, wv];
        let fresh = |t: &Tensor| t.is_contiguous() && t.dims2().is_ok();
        let alike = ws
            .iter()
            .all(|w| fresh(w) && w.dtype() == wq.dtype() && w.device().same_device(wq.device()))
            && ws.iter().all(|w| w.dim(1).ok() == wq.dim(1).ok());
        let biases = [&self.q.bias, &self.k.bias, &self.v.bias];
        let some = biases.iter().filter(|b| b.is_some()).count();
        if !alike || (some != 0 && some != 3) || self.qkv.is_some() {
            return Ok(());
        }
        let weight = Tensor::cat(&ws, 0)?;
        let bias = match biases {
            [Some(bq), Some(bk), Some(bv)] => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            _ => None,
        };
        let mut row = 0;
        for lin in [&mut self.q, &mut self.k, &mut self.v] {
            let n = lin.out_features();
            lin.weight = Weight::Dense(weight.narrow(0, row, n)?);
            if let Some(b) = &bias {
                lin.bias = Some(b.narrow(0, row, n)?);
            }
            row += n;
        }
        self.qkv = Some(FusedQkv { weight, bias });
        Ok(())
    }

    /// The one allocation, while q, k and v are still its views.
    pub fn fused(&self) -> Option<&FusedQkv> {
        let f = self.qkv.as_ref()?;
        self.intact(f).then_some(f)
    }

    /// Whether q's, k's and v's weights and biases are still `f`'s pieces.
    fn intact(&self, f: &FusedQkv) -> bool {
        let lins = [&self.q, &self.k, &self.v];
        let ws: Option<Vec<&Tensor>> = lins.iter().map(|l| l.weight.as_dense()).collect();
        let bs: Option<Vec<&Tensor>> = lins.iter().map(|l| l.bias.as_ref()).collect();
        let weights = ws.is_some_and(|ws| pieces_of(&f.weight, &ws));
        let biases = match (&f.bias, bs) {
            (Some(b), Some(bs)) => pieces_of(b, &bs),
            (None, _) => lins.iter().all(|l| l.bias.is_none()),
            (Some(_), None) => false,
        };
        weights && biases
    }

    /// Once a weight or bias of q, k or v has been replaced (a merge), gives the others their
    /// own memory and drops the one allocation, so it is not kept alive for the pieces left.
    pub fn settle(&mut self) -> Result<()> {
        let Some(f) = &self.qkv else {
            return Ok(());
        };
        if self.intact(f) {
            return Ok(());
        }
        let (fw, fb) = (f.weight.clone(), f.bias.clone());
        let alloc = |t: &Tensor, of: &Tensor| place(t).0 == place(of).0;
        for lin in [&mut self.q, &mut self.k, &mut self.v] {
            if let Some(w) = lin.weight.as_dense()
                && alloc(w, &fw)
            {
                lin.weight = Weight::Dense(w.copy()?);
            }
            if let (Some(b), Some(fb)) = (&lin.bias, &fb)
                && alloc(b, fb)
            {
                lin.bias = Some(b.copy()?);
            }
        }
        self.qkv = None;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::lora_config::{LoraConfig, Targets};
    use crate::model::{Model, TinyConfig, tiny};
    use crate::nn::AttnMask;
    use crate::testing::{max_abs, max_abs_diff};
    use crate::train::engine::gradients;

    /// `model` with LoRA on `targets`, its B random (PEFT starts it at zero: A would get no
    /// gradient), `dropout` on the adapters' input.
    fn adapted(base: &Model, targets: Targets, dropout: f64) -> Model {
        let cfg = LoraConfig {
            r: 4,
            lora_dropout: dropout,
            target_modules: targets,
            ..LoraConfig::default()
        };
        let mut m = crate::lora::attach(base, &cfg, 1).unwrap();
        crate::model::params::visit_adapters_mut(&mut m.decoder, &mut |n, t| {
            if n.contains("lora_B") {
                *t = Tensor::randn(0f32, 0.2, t.dims(), t.device())?;
            }
            Ok(())
        })
        .unwrap();
        m
    }

    fn fused(m: &Model) -> Model {
        let mut f = m.clone();
        for b in &mut f.decoder.blocks {
            b.attn.fuse_qkv().unwrap();
            let q = b.attn.qkv.clone().unwrap();
            assert!(b.attn.intact(&q));
        }
        f
    }

    /// One product (q/k/v with biases, Qwen3's head norms, adapters on all three or on some)
    /// gives the loss and every adapter's gradient of the three products apart.
    #[test]
    fn one_product_gives_the_losses_and_gradients_of_three() {
        let ids = Tensor::new(
            &[[3u32, 17, 42, 99, 5, 64], [11, 23, 8, 1, 30, 77]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mask = AttnMask::right_padded(&[6, 4]);
        let labels: Vec<i64> = vec![3, 17, 42, 99, 5, 64, 11, 23, 8, 1, -100, -100];
        for arch in ["qwen2", "qwen3", "llama"] {
            let base = tiny(&TinyConfig {
                arch: arch.into(),
                ..TinyConfig::default()
            })
            .unwrap();
            let names = |v: &[&str]| Targets::Names(v.iter().map(ToString::to_string).collect());
            for targets in [
                Targets::Pattern("all-linear".into()),
                names(&["q_proj", "v_proj"]),
                names(&["o_proj"]),
            ] {
                let what = format!("{arch} {targets}");
                let m = adapted(&base, targets, 0.0);
                let f = fused(&m);
                let (l0, g0) = gradients(&m, &ids, &mask, &labels, None, false).unwrap();
                let (l1, g1) = gradients(&f, &ids, &mask, &labels, None, false).unwrap();
                assert!(
                    (l0 - l1).abs() < 1e-6 * l0.abs(),
                    "{what}: loss {l0} vs {l1}"
                );
                assert_eq!(g0.len(), g1.len());
                for ((n0, a), (n1, b)) in g0.iter().zip(&g1) {
                    assert_eq!(n0, n1);
                    let e = max_abs_diff(a, b);
                    assert!(e <= 1e-5 * max_abs(a).max(1e-3), "{what}: {n0} off by {e}");
                }
            }
        }
    }

    /// Adapters that draw dropout masks while training take their own masked input (a mask is
    /// keyed per projection): the loss and gradients of the model never fused.
    #[test]
    fn dropout_masks_are_each_projections_own() {
        let base = tiny(&TinyConfig::default()).unwrap();
        let m = adapted(&base, Targets::Pattern("all-linear".into()), 0.2);
        let f = fused(&m);
        let ids = Tensor::new(&[[3u32, 17, 42, 99]], &candle_core::Device::Cpu).unwrap();
        let mask = AttnMask::causal(0);
        let labels = vec![3i64, 17, 42, 99];
        let key = Some(crate::nn::dropout::Key::new(7));
        let (l0, g0) = gradients(&m, &ids, &mask, &labels, key, false).unwrap();
        let (l1, g1) = gradients(&f, &ids, &mask, &labels, key, false).unwrap();
        assert!((l0 - l1).abs() < 1e-6 * l0.abs(), "loss {l0} vs {l1}");
        for ((n, a), (_, b)) in g0.iter().zip(&g1) {
            let e = max_abs_diff(a, b);
            assert!(e <= 1e-5 * max_abs(a).max(1e-3), "{n} off by {e}");
        }
        // The masks are drawn: without them the gradients differ.
        let (_, g2) = gradients(&f, &ids, &mask, &labels, None, false).unwrap();
        assert!(
            g1.iter()
                .zip(&g2)
                .any(|((_, a), (_, b))| max_abs_diff(a, b) > 1e-4)
        );
    }

    /// A merge replaces q's and v's weights: the fused allocation is let go, k gets its own
    /// memory, and the merged weights are those of the model never fused.
    #[test]
    fn a_merge_lets_the_one_allocation_go() {
        let base = tiny(&TinyConfig::default()).unwrap();
        let names = Targets::Names(vec!["q_proj".into(), "v_proj".into()]);
        let m = adapted(&base, names, 0.0);
        let f = fused(&m);
        let (want, got) = (
            crate::lora::merge(&m).unwrap(),
            crate::lora::merge(&f).unwrap(),
        );
        for (b, fb) in got.decoder.blocks.iter().zip(&f.decoder.blocks) {
            assert!(b.attn.qkv.is_none());
            let whole = &fb.attn.qkv.as_ref().unwrap().weight;
            let k = b.attn.k.weight.as_dense().unwrap();
            assert_ne!(place(k).0, place(whole).0, "k still holds the allocation");
        }
        for ((n, a), (_, b)) in want.named().iter().zip(got.named().iter()) {
            assert_eq!(max_abs_diff(a, b), 0.0, "{n}");
        }
        // A weight replaced by hand: the allocation is no longer used.
        let mut g = f.clone();
        let a = &mut g.decoder.blocks[0].attn;
        a.k.weight = Weight::Dense(a.k.weight.as_dense().unwrap().copy().unwrap());
        let q = a.qkv.clone().unwrap();
        assert!(!a.intact(&q));
    }
}
