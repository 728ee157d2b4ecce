//! The top-level modules of a decoder ([`ModuleId`]): the embedding, each layer, the final norm
//! and the head, the units that placement (`device_map`) puts on devices. The one place that
//! spells their HF names; the names inside a layer are [`super::block`]'s.

use std::fmt;

/// A top-level module of the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleId {
    /// `model.embed_tokens`.
    Embedding,
    /// `model.layers.N`.
    Layer(usize),
    /// `model.norm`.
    FinalNorm,
    /// `lm_head` (absent when tied to the embedding).
    Head,
}

/// The prefix of every layer's name.
const LAYERS: &str = "model.layers";

impl ModuleId {
    /// The modules of a model of `layers` layers in model order; the head unless `tied`.
    pub fn all(layers: usize, tied: bool) -> Vec<ModuleId> {
        let mut out = vec![ModuleId::Embedding];
        out.extend((0..layers).map(ModuleId::Layer));
        out.push(ModuleId::FinalNorm);
        if !tied {
            out.push(ModuleId::Head);
        }
        out
    }

    /// HF's name: `model.embed_tokens`, `model.layers.7`, `model.norm`, `lm_head`.
    pub fn hf_name(self) -> String {
        match self {
            ModuleId::Embedding => "model.embed_tokens".into(),
            ModuleId::Layer(i) => format!("{LAYERS}.{i}"),
            ModuleId::FinalNorm => "model.norm".into(),
            ModuleId::Head => "lm_head".into(),
        }
    }

    /// The module HF calls `name` (the inverse of [`ModuleId::hf_name`]).
    pub fn parse(name: &str) -> Option<ModuleId> {
        match name {
            "model.embed_tokens" => Some(ModuleId::Embedding),
            "model.norm" => Some(ModuleId::FinalNorm),
            "lm_head" => Some(ModuleId::Head),
            _ => name
                .strip_prefix(LAYERS)?
                .strip_prefix('.')?
                .parse()
                .ok()
                .map(ModuleId::Layer),
        }
    }

    /// The HF name of the tensor or submodule `path` under this module
    /// (`Layer(3).tensor("mlp.up_proj.weight")`: `model.layers.3.mlp.up_proj.weight`).
    pub fn tensor(self, path: &str) -> String {
        format!("{self}.{path}")
    }

    /// The layer's index, for a layer.
    pub fn layer(self) -> Option<usize> {
        match self {
            ModuleId::Layer(i) => Some(i),
            _ => None,
        }
    }

    /// `model.layers.3-5` for the layers `3..=5` (`model.layers.3` for one).
    pub fn layer_range(first: usize, last: usize) -> String {
        if first == last {
            ModuleId::Layer(first).hf_name()
        } else {
            format!("{LAYERS}.{first}-{last}")
        }
    }
}

/// HF's name.
impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hf_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_module() {
        for m in ModuleId::all(12, false) {
            assert_eq!(ModuleId::parse(&m.hf_name()), Some(m));
        }
        assert_eq!(ModuleId::all(2, true).len(), 4);
        assert_eq!(
            ModuleId::Layer(3).tensor("mlp.up_proj.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
        for bad in [
            "model.layers",
            "model.layers.",
            "model.layers.x",
            "model.layers3",
            "model",
            "",
        ] {
            assert_eq!(ModuleId::parse(bad), None, "{bad}");
        }
        assert_eq!(ModuleId::layer_range(3, 5), "model.layers.3-5");
        assert_eq!(ModuleId::layer_range(4, 4), "model.layers.4");
    }
}
