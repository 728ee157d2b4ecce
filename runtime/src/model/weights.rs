//! Where a model's tensors come from: a checkpoint directory (memory-mapped safetensors, one file
//! or sharded with `model.safetensors.index.json`) or tensors in memory (built-in tiny models).
//! Every lookup names the tensor, the checkpoint and both shapes when something is off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A source of named tensors.
pub enum WeightSource {
    /// Memory-mapped safetensors files.
    Files {
        /// The checkpoint directory.
        dir: PathBuf,
        /// One mmap per file.
        files: Vec<MmapedSafetensors>,
        /// Tensor name -> index in `files`.
        routing: HashMap<String, usize>,
    },
    /// Tensors already in memory.
    Memory {
        /// Where they claim to come from (for messages).
        dir: PathBuf,
        /// By HF name.
        tensors: HashMap<String, Tensor>,
    },
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightSource({})", self.dir().display())
    }
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl WeightSource {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let idx: Index = crate::error::read_config(&index)?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no `model.safetensors` or `model.safetensors.index.json` in the checkpoint",
                ),
            ));
        };
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let st = mmap(p)?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push(st);
        }
        Ok(WeightSource::Files {
            dir: dir.to_path_buf(),
            files,
            routing,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        match self {
            WeightSource::Files { dir, .. } | WeightSource::Memory { dir, .. } => dir,
        }
    }

    /// Whether the source has `name`.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Files { routing, .. } => routing.contains_key(name),
            WeightSource::Memory { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// The tensor `name`, checked against `shape`, as `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.into(),
            path: self.dir().into(),
        };
        let t = match self {
            WeightSource::Files { files, routing, .. } => {
                let i = *routing.get(name).ok_or_else(missing)?;
                // Straight from the mapped file to the target device (no intermediate CPU copy).
                files[i].load(name, device)?
            }
            WeightSource::Memory { tensors, .. } => tensors.get(name).ok_or_else(missing)?.clone(),
        };
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                path: self.dir().into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

#[allow(unsafe_code)]
fn mmap(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    // SAFETY: the file is mapped read-only; as with every mmap-based loader (candle, PyTorch), the
    // checkpoint must not be modified while the model is loaded from it.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
