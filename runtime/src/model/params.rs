//! The one named-parameter visitor: every tensor of a model under its HF name, in checkpoint
//! order (tied weights once), and the adapters under PEFT's names. Saving, merging, counting and
//! the optimizer's flat buffers all walk the model through here (and [`Model::named`]); the
//! decoder is the only place that holds the tensors.

use candle_core::Tensor;

use super::block::{Norm, Proj};
use super::decoder::Decoder;
use super::load::Model;
use super::module_id::ModuleId;
use crate::Result;
use crate::nn::Weight;

/// What PEFT puts before a module's HF name in an adapter's tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Calls `f` on every weight of `d` by HF name, mutably (a 4-bit weight: on copies of the
/// tensors bitsandbytes saves for it).
pub fn visit_mut(
    d: &mut Decoder,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    f(&ModuleId::Embedding.tensor("weight"), &mut d.embed)?;
    for (i, b) in d.blocks.iter_mut().enumerate() {
        let layer = ModuleId::Layer(i);
        f(&layer.tensor(&Norm::Input.weight()), &mut b.input_norm)?;
        for proj in Proj::ALL {
            let lin = b.proj_mut(proj);
            let name = layer.tensor(&format!("{}.weight", proj.path()));
            match &mut lin.weight {
                Weight::Dense(w) => f(&name, w)?,
                // Visited as the tensors bitsandbytes saves (copies: changing them changes
                // nothing; a 4-bit weight is never trained).
                Weight::Quant4(q) => {
                    for (suffix, mut t) in q.bnb_tensors()? {
                        let part = if suffix.is_empty() {
                            name.clone()
                        } else {
                            format!("{name}.{suffix}")
                        };
                        f(&part, &mut t)?;
                    }
                }
            }
            if let Some(bias) = &mut lin.bias {
                f(&layer.tensor(&format!("{}.bias", proj.path())), bias)?;
            }
        }
        if let Some(w) = &mut b.attn.q_norm {
            f(&layer.tensor(&Norm::Q.weight()), w)?;
        }
        if let Some(w) = &mut b.attn.k_norm {
            f(&layer.tensor(&Norm::K.weight()), w)?;
        }
        f(
            &layer.tensor(&Norm::PostAttention.weight()),
            &mut b.post_norm,
        )?;
    }
    f(&ModuleId::FinalNorm.tensor("weight"), &mut d.norm)?;
    if let Some(h) = &mut d.lm_head {
        f(&ModuleId::Head.tensor("weight"), h)?;
    }
    Ok(())
}

/// What a mutable visitor visits, collected by name (the tensors are shared, not copied).
fn collect<T: Clone>(
    of: &T,
    visit: impl FnOnce(&mut T, &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()>,
) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let mut copy = of.clone();
    // The closure never fails.
    let _ = visit(&mut copy, &mut |n, t| {
        out.push((n.to_string(), t.clone()));
        Ok(())
    });
    out
}

/// Every weight of `d` with its HF name (the tensors are shared, not copied).
pub fn named(d: &Decoder) -> Vec<(String, Tensor)> {
    collect(d, |d, f| visit_mut(d, f))
}

impl Model {
    /// Every weight by HF name (tied weights once), shared with the model.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        named(&self.decoder)
    }
}

/// The adapter tensors of `d` under PEFT's names (shared, not copied).
pub fn adapters(d: &Decoder) -> Vec<(String, Tensor)> {
    collect(d, |d, f| visit_adapters_mut(d, f))
}

/// Calls `f` on the A and B of every adapter of `d`, under PEFT's tensor names, mutably.
pub fn visit_adapters_mut(
    d: &mut Decoder,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    for (i, b) in d.blocks.iter_mut().enumerate() {
        for proj in Proj::ALL {
            if let Some(l) = &mut b.proj_mut(proj).lora {
                let p = format!("{PEFT_PREFIX}{}", ModuleId::Layer(i).tensor(proj.path()));
                f(&format!("{p}.lora_A.weight"), &mut l.a)?;
                f(&format!("{p}.lora_B.weight"), &mut l.b)?;
            }
        }
    }
    Ok(())
}

/// Calls `f` on what training updates: the adapters when `model` has them, else every weight
/// when it was loaded `trainable`, else nothing.
pub fn visit_trainable_mut(
    model: &mut Model,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    if model.lora.is_some() {
        visit_adapters_mut(&mut model.decoder, f)
    } else if model.trainable {
        visit_mut(&mut model.decoder, f)
    } else {
        Ok(())
    }
}

/// The trainable tensors of `model` by name (shared, not copied).
pub fn trainable(model: &Model) -> Vec<(String, Tensor)> {
    collect(model, |m, f| visit_trainable_mut(m, f))
}
