//! Where a model's tensors come from: a checkpoint directory (memory-mapped safetensors, one file
//! or sharded with `model.safetensors.index.json`) or tensors in memory (built-in tiny models).
//! Every lookup names the tensor, the checkpoint and both shapes when something is off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load as _;
use candle_core::{DType, Device, Tensor};

use crate::cancel::CancelToken;
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
        /// Polled before each tensor.
        cancel: CancelToken,
    },
    /// The safetensors headers only (`qscript check`): names, shapes and dtypes, no data read.
    /// Tensors come back as zero-stride views of one element, with the right shape and dtype.
    Headers {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Tensor name -> (file, shape, dtype in the file).
        tensors: HashMap<String, (PathBuf, Vec<usize>, safetensors::Dtype)>,
        /// Polled before each tensor.
        cancel: CancelToken,
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
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`: each
    /// file's header parsed once; `cancel` polled before each file and each tensor.
    pub fn open(dir: &Path, cancel: &CancelToken) -> Result<Self> {
        let paths = Self::paths(dir)?;
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            cancel.check()?;
            let st = Mapped::open(p)?;
            for name in st.names() {
                routing.insert(name, i);
            }
            files.push(st);
        }
        Ok(WeightSource::Files {
            dir: dir.to_path_buf(),
            files,
            routing,
            cancel: cancel.clone(),
        })
    }

    /// Reads only the headers of the same files (see [`WeightSource::Headers`]), checking each
    /// one against its file's size.
    pub fn headers(dir: &Path, cancel: &CancelToken) -> Result<Self> {
        let mut tensors = HashMap::new();
        for p in Self::paths(dir)? {
            cancel.check()?;
            for (name, shape, dtype) in read_header(&p)? {
                tensors.insert(name, (p.clone(), shape, dtype));
            }
        }
        Ok(WeightSource::Headers {
            dir: dir.to_path_buf(),
            tensors,
            cancel: cancel.clone(),
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
        let t = match self {
            WeightSource::Headers {
                tensors, cancel, ..
            } => {
                cancel.check()?;
                let (path, found, st_dtype) =
                    tensors.get(name).ok_or_else(|| self.missing(name))?;
                self.check_shape(name, found, shape)?;
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
            _ => self.load(name, device)?,
        };
        self.check_shape(name, t.dims(), shape)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// The tensor `name` as stored, which must be `dtype` (bitsandbytes' u8 codes, f32 absmax)
    /// and `shape` (`None`: any), on `device`; nothing is converted.
    pub fn get_stored(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self {
            WeightSource::Headers {
                tensors, cancel, ..
            } => {
                cancel.check()?;
                let (_, found, st_dtype) = tensors.get(name).ok_or_else(|| self.missing(name))?;
                let stored = match st_dtype {
                    safetensors::Dtype::U8 => DType::U8,
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F16 => DType::F16,
                    _ => DType::F64,
                };
                if stored != dtype {
                    return Err(self.wrong_dtype(name, stored, dtype));
                }
                // Shapes and dtype, no data: one element seen with zero strides.
                Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(found.as_slice())?
            }
            _ => self.load(name, device)?,
        };
        if t.dtype() != dtype {
            return Err(self.wrong_dtype(name, t.dtype(), dtype));
        }
        if let Some(shape) = shape {
            self.check_shape(name, t.dims(), shape)?;
        }
        Ok(t)
    }

    /// The tensor `name` of a source with data, as stored, on `device` (from a mapped file
    /// straight to the device, no intermediate CPU copy).
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            WeightSource::Files {
                files,
                routing,
                cancel,
                ..
            } => {
                cancel.check()?;
                let i = *routing.get(name).ok_or_else(|| self.missing(name))?;
                Ok(files[i].load(name, device)?)
            }
            WeightSource::Memory { tensors, .. } => Ok(tensors
                .get(name)
                .ok_or_else(|| self.missing(name))?
                .to_device(device)?),
            WeightSource::Headers { .. } => Err(self.missing(name)),
        }
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.into(),
            path: self.dir().into(),
        }
    }

    /// An error unless `found` is `want`.
    fn check_shape(&self, name: &str, found: &[usize], want: &[usize]) -> Result<()> {
        if found == want {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            name: name.into(),
            path: self.dir().into(),
            expected: want.to_vec(),
            found: found.to_vec(),
        })
    }

    /// Whether tensors come back as shapes only (`qscript check`).
    pub fn is_headers(&self) -> bool {
        matches!(self, WeightSource::Headers { .. })
    }

    fn wrong_dtype(&self, name: &str, found: DType, want: DType) -> Error {
        Error::Safetensors {
            path: self.dir().into(),
            message: format!("`{name}` is {found:?}; a 4-bit checkpoint stores it as {want:?}"),
        }
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

/// Loads one tensor view, naming the file and the tensor when it cannot be (a dtype candle does
/// not hold, such as `BOOL`).
fn load_view(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> Result<Tensor> {
    view.load(device).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!(
            "tensor `{name}` ({:?} {:?}): {e}",
            view.dtype(),
            view.shape()
        ),
    })
}

/// Every tensor of a safetensors file read into memory (`bytes`, read through the sandbox from
/// `path`): the header parsed once, each tensor named with the file when it cannot be loaded, and
/// `cancel` polled between tensors.
pub fn load_all(
    path: &Path,
    bytes: &[u8],
    device: &Device,
    cancel: &CancelToken,
) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.iter() {
        cancel.check()?;
        out.insert(name.to_string(), load_view(path, name, &view, device)?);
    }
    Ok(out)
}

/// Writes `tensors` as the safetensors file `path`, through the sandbox's writer (a temporary
/// sibling created new, then a rename, no link followed), so a crash never leaves a half-written
/// `path`. Every failure, a full disk included, names `path`.
///
/// The safetensors crate writes only to a path it opens itself, so its layout is written here:
/// the header's length (u64, little-endian), the JSON header padded with spaces to 8 bytes, then
/// each tensor's bytes in the header's order (names sorted). The crate reads it back in tests.
pub fn save_file<S: std::hash::BuildHasher>(
    tensors: &HashMap<String, Tensor, S>,
    path: &Path,
) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for n in &names {
        let t = &tensors[*n];
        let len = safetensors::View::data_len(t);
        header.insert(
            (*n).clone(),
            serde_json::json!({
                "dtype": safetensors::View::dtype(t),
                "shape": safetensors::View::shape(t),
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    head.resize(head.len().next_multiple_of(8), b' ');
    crate::sandbox::write_atomic_with(path, &mut |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for n in &names {
            w.write_all(&safetensors::View::data(&tensors[*n]))?;
        }
        Ok(())
    })
}

/// A memory-mapped safetensors file, mapped from the descriptor the sandbox checked (so the
/// weights read are the file that passed the check, whatever happens to its path afterwards).
/// Its header is parsed once, when it is opened.
pub struct Mapped {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the tensors' bytes begin (after the header).
    data_start: usize,
    metadata: safetensors::tensor::Metadata,
}

impl Mapped {
    #[allow(unsafe_code)]
    fn open(path: &Path) -> Result<Self> {
        let file = crate::sandbox::open(path)?;
        // SAFETY: the file is mapped read-only; as with every mmap-based loader (candle,
        // PyTorch), the checkpoint must not be modified while the model is loaded from it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + n,
            metadata,
        })
    }

    fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let bad = |message: String| Error::Safetensors {
            path: self.path.clone(),
            message,
        };
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        // `read_metadata` validated the offsets against the file's length.
        let (a, b) = info.data_offsets;
        let data = self
            .map
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| bad(format!("`{name}` has data offsets {a}..{b}")))?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| bad(format!("`{name}`: {e}")))?;
        load_view(&self.path, name, &view, device)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A safetensors file of one `BOOL` tensor `w` of 4 elements.
    fn bool_file(path: &Path) {
        let header = br#"{"w":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[1, 0, 1, 0]);
        std::fs::write(path, bytes).unwrap();
    }

    /// A dtype candle does not hold is an error naming the file and the tensor, whether the
    /// weights are mapped (`model::load`) or read whole (adapters, checkpoints).
    #[test]
    fn an_unsupported_dtype_names_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        bool_file(&file);
        let src = WeightSource::open(dir.path(), &CancelToken::new()).unwrap();
        let e = src
            .get("w", &[4], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors`") && e.contains("tensor `w`"),
            "{e}"
        );
        assert!(e.contains("BOOL"), "{e}");
        let bytes = std::fs::read(&file).unwrap();
        let e = load_all(&file, &bytes, &Device::Cpu, &CancelToken::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors`") && e.contains("tensor `w`"),
            "{e}"
        );
    }

    /// A file of many tensors is parsed once when opened (not once per tensor), and the
    /// per-tensor loop stops at a cancel.
    #[test]
    fn headers_are_parsed_once_and_the_tensor_loop_polls_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: HashMap<String, Tensor> = (0..2400)
            .map(|i| {
                let t = Tensor::full(i as f32, 4, &Device::Cpu).unwrap();
                (format!("model.layers.{i}.w"), t)
            })
            .collect();
        let file = dir.path().join("model.safetensors");
        save_file(&tensors, &file).unwrap();
        let cancel = CancelToken::new();
        let src = WeightSource::open(dir.path(), &cancel).unwrap();
        let start = std::time::Instant::now();
        for i in 0..2400 {
            let t = src
                .get(
                    &format!("model.layers.{i}.w"),
                    &[4],
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
            assert_eq!(t.to_vec1::<f32>().unwrap()[0], i as f32);
        }
        // Re-parsing a 2,400-entry header per tensor took seconds in a debug build.
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        cancel.cancel();
        let e = src.get("model.layers.0.w", &[4], DType::F32, &Device::Cpu);
        assert!(matches!(e, Err(Error::Cancelled)), "{e:?}");
        assert!(matches!(
            WeightSource::open(dir.path(), &cancel),
            Err(Error::Cancelled)
        ));
    }

    /// A write that fails for want of space (ENOSPC, injected) names the file being written and
    /// leaves nothing behind; so does a write into a directory that is not there. What is
    /// written, the safetensors crate reads back.
    #[test]
    fn a_failed_write_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let e = crate::sandbox::write_atomic_with(&path, &mut |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::from_raw_os_error(28))
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(&format!("`{}`: ", path.display())), "{e}");
        assert!(e.contains("No space left"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w".to_string(), t.clone()), ("b".to_string(), b)]);
        save_file(&tensors, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("w").unwrap();
        assert_eq!(w.shape(), [2, 3]);
        assert_eq!(w.dtype(), safetensors::Dtype::F32);
        assert_eq!(
            w.data(),
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
        );
        assert_eq!(st.tensor("b").unwrap().dtype(), safetensors::Dtype::BF16);
        let gone = dir.path().join("gone/model.safetensors");
        let t = Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w".to_string(), t)]);
        let e = save_file(&tensors, &gone).unwrap_err().to_string();
        assert!(e.starts_with(&format!("`{}`: ", gone.display())), "{e}");
    }
}
