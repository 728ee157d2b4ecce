//! Where a model's tensors come from: a checkpoint directory (memory-mapped safetensors, one file
//! or sharded with `model.safetensors.index.json`) or tensors in memory (built-in tiny models).
//! Every lookup names the tensor, the checkpoint and both shapes when something is off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load as _;
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A source of named tensors.
pub enum WeightSource {
    /// Memory-mapped safetensors files.
    Files {
        /// The checkpoint directory.
        dir: PathBuf,
        /// One mapping per file.
        files: Vec<Mapped>,
        /// Tensor name -> index in `files`.
        routing: HashMap<String, usize>,
    },
    /// The safetensors headers only (`qscript check`): names, shapes and dtypes, no data read.
    /// Tensors come back as zero-stride views of one element, with the right shape and dtype.
    Headers {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Tensor name -> (file, shape, dtype in the file).
        tensors: HashMap<String, (PathBuf, Vec<usize>, safetensors::Dtype)>,
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
        let paths = Self::paths(dir)?;
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let st = Mapped::open(p)?;
            for name in st.names()? {
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

    /// Reads only the headers of the same files (see [`WeightSource::Headers`]), checking each
    /// one against its file's size.
    pub fn headers(dir: &Path) -> Result<Self> {
        let mut tensors = HashMap::new();
        for p in Self::paths(dir)? {
            for (name, shape, dtype) in read_header(&p)? {
                tensors.insert(name, (p.clone(), shape, dtype));
            }
        }
        Ok(WeightSource::Headers {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    /// The weight files of a checkpoint directory.
    fn paths(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let idx: Index = crate::files::read_config(&index)?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            // A shard is a file of the checkpoint directory: a name with a directory in it
            // (absolute, `../`) would read weights from anywhere.
            if let Some(bad) = names.iter().find(|n| {
                let p = Path::new(n.as_str());
                p.components().count() != 1
                    || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
            }) {
                return Err(Error::Config {
                    path: index,
                    message: format!(
                        "shard `{bad}` is not a file name in the checkpoint directory"
                    ),
                });
            }
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
        Ok(paths)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        match self {
            WeightSource::Files { dir, .. }
            | WeightSource::Headers { dir, .. }
            | WeightSource::Memory { dir, .. } => dir,
        }
    }

    /// Whether the source has `name`.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Files { routing, .. } => routing.contains_key(name),
            WeightSource::Headers { tensors, .. } => tensors.contains_key(name),
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
            WeightSource::Headers { tensors, .. } => {
                let (path, found, st_dtype) = tensors.get(name).ok_or_else(missing)?;
                if found.as_slice() != shape {
                    return Err(Error::ShapeMismatch {
                        name: name.into(),
                        path: self.dir().into(),
                        expected: shape.to_vec(),
                        found: found.clone(),
                    });
                }
                if !matches!(
                    st_dtype,
                    safetensors::Dtype::F32
                        | safetensors::Dtype::F16
                        | safetensors::Dtype::BF16
                        | safetensors::Dtype::F64
                ) {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        message: format!(
                            "`{name}` is {st_dtype:?}; qscript loads float weights (f32, f16, bf16, f64)"
                        ),
                    });
                }
                // Shapes and dtype, no data: one element seen with zero strides.
                return Ok(Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape)?);
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

/// The tensors a safetensors file declares, from its header alone: each tensor's bytes must lie
/// inside the file, and the file must end where the last one does.
fn read_header(path: &Path) -> Result<Vec<(String, Vec<usize>, safetensors::Dtype)>> {
    use std::io::Read as _;
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut f = crate::sandbox::open(path)?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    // safetensors' own limit on a header.
    if n > 100_000_000 || n + 8 > size {
        return Err(bad(format!(
            "header of {n} bytes in a file of {size} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    let mut end = 0u64;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("`{name}` has shape {:?}", info.shape)))?;
        let bytes = elems
            .checked_mul(info.dtype.bitsize())
            .map(|b| b.div_ceil(8));
        if b < a || bytes != Some(b - a) {
            return Err(bad(format!(
                "`{name}` ({:?} {:?}) has data offsets {a}..{b}",
                info.dtype, info.shape
            )));
        }
        end = end.max(b as u64);
        out.push((name, info.shape.clone(), info.dtype));
    }
    if 8 + n + end != size {
        return Err(bad(format!(
            "the header describes {} bytes of tensors, the file holds {} (truncated or padded)",
            end,
            size - 8 - n
        )));
    }
    Ok(out)
}

/// A memory-mapped safetensors file, mapped from the descriptor the sandbox checked (so the
/// weights read are the file that passed the check, whatever happens to its path afterwards).
pub struct Mapped {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl Mapped {
    #[allow(unsafe_code)]
    fn open(path: &Path) -> Result<Self> {
        let file = crate::sandbox::open(path)?;
        // SAFETY: the file is mapped read-only; as with every mmap-based loader (candle,
        // PyTorch), the checkpoint must not be modified while the model is loaded from it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let m = Self {
            path: path.to_path_buf(),
            map,
        };
        m.parsed()?;
        Ok(m)
    }

    fn parsed(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.map).map_err(|e| Error::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .parsed()?
            .names()
            .into_iter()
            .map(str::to_string)
            .collect())
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| Error::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(view.load(device)?)
    }
}
