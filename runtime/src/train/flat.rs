//! Flat buffers for training: the trainable tensors of a model copied into one buffer (the model
//! then points at views of it, so an optimizer update is one write), and their gradients
//! accumulated in place into one f32 buffer of the same layout. The global norm, clipping and
//! AdamW each run over a whole buffer in a few launches, whatever the number of tensors.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Shape, Tensor, TensorId, Var};

use crate::model::Model;
use crate::model::params::visit_trainable_mut;
use crate::nn::GradSink;
use crate::{Error, Result};

/// One trainable tensor's place in the flat buffers.
#[derive(Clone, Debug)]
pub struct Slot {
    /// HF / PEFT name.
    pub name: String,
    /// First element.
    pub offset: usize,
    /// Its shape.
    pub shape: Shape,
    /// Whether weight decay applies (not to biases and norms).
    pub decay: bool,
}

impl Slot {
    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.elem_count()
    }

    /// Whether the slot is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This slot's part of a flat buffer, shaped like the tensor.
    pub fn of(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat
            .narrow(0, self.offset, self.len())?
            .reshape(&self.shape)?)
    }
}

/// The trainable parameters of one model in one buffer.
#[derive(Debug)]
pub struct FlatParams {
    /// The slots, in visiting order.
    pub slots: Vec<Slot>,
    /// All parameters, flattened, in their own dtype.
    pub data: Var,
    index: HashMap<TensorId, usize>,
}

impl FlatParams {
    /// Copies `tensors` (one dtype, one device) into one buffer; returns it and a view of it per
    /// tensor, in order.
    pub fn new(tensors: &[(String, Tensor)]) -> Result<(Self, Vec<Tensor>)> {
        let Some((first_name, first)) = tensors.first() else {
            return Err(Error::InvalidArgument(
                "the model has nothing to train: attach LoRA adapters (`lora::attach`) or load it with `trainable: true`".into(),
            ));
        };
        let mut slots = Vec::with_capacity(tensors.len());
        let mut parts = Vec::with_capacity(tensors.len());
        let mut offset = 0;
        for (name, t) in tensors {
            if t.dtype() != first.dtype() {
                return Err(Error::InvalidArgument(format!(
                    "trainable tensors of mixed dtypes ({:?} at `{first_name}`, {:?} at `{name}`)",
                    first.dtype(),
                    t.dtype()
                )));
            }
            slots.push(Slot {
                name: name.clone(),
                offset,
                shape: t.shape().clone(),
                decay: !(name.ends_with("bias") || name.contains("norm")),
            });
            offset += t.elem_count();
            parts.push(t.flatten_all()?);
        }
        let data = Var::from_tensor(&Tensor::cat(&parts, 0)?)?;
        let shared = data.as_tensor().detach();
        let views = slots
            .iter()
            .map(|s| s.of(&shared))
            .collect::<Result<Vec<_>>>()?;
        let index = views.iter().enumerate().map(|(i, v)| (v.id(), i)).collect();
        Ok((Self { slots, data, index }, views))
    }

    /// Copies the trainable tensors of `model` (adapters, or every weight when loaded
    /// `trainable`) into one buffer and makes `model` use views of it. Other tensors stay shared
    /// with the caller's model.
    pub fn adopt(model: &mut Model) -> Result<Self> {
        let (flat, views) = Self::new(&crate::model::params::trainable(model))?;
        let mut views = views.into_iter();
        visit_trainable_mut(model, &mut |_, t| {
            if let Some(v) = views.next() {
                *t = v;
            }
            Ok(())
        })?;
        Ok(flat)
    }

    /// Elements in all.
    pub fn len(&self) -> usize {
        self.data.elem_count()
    }

    /// Whether there is nothing to train.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device of the buffer.
    pub fn device(&self) -> &Device {
        self.data.device()
    }

    /// The slot of `t`, when `t` is one of the model's trainable views.
    pub fn slot_of(&self, t: &Tensor) -> Option<&Slot> {
        self.index.get(&t.id()).map(|&i| &self.slots[i])
    }

    /// Overwrites slot `i` with `value` (checkpoint restore).
    pub fn set_slot(&self, i: usize, value: &Tensor) -> Result<()> {
        let s = &self.slots[i];
        if value.shape() != &s.shape {
            return Err(Error::InvalidArgument(format!(
                "`{}` has shape {:?}, expected {:?}",
                s.name,
                value.dims(),
                s.shape.dims()
            )));
        }
        let v = value
            .to_dtype(self.data.dtype())?
            .to_device(self.device())?
            .flatten_all()?;
        self.data.as_tensor().slice_set(&v, 0, s.offset)?;
        Ok(())
    }

    /// A zeroed f32 gradient buffer of this layout.
    pub fn zero_grads(&self) -> Result<FlatGrads<'_>> {
        Ok(FlatGrads {
            params: self,
            segments: vec![(
                0..self.len(),
                Some(Tensor::zeros(self.len(), DType::F32, self.device())?),
            )],
        })
    }

    /// Gradients kept by `ranges` (contiguous, whole slots, covering the layout), each range's
    /// f32 buffer made (zeroed) when first written and handed over by [`FlatGrads::take`].
    pub fn segmented_grads(&self, mut ranges: Vec<Range<usize>>) -> FlatGrads<'_> {
        ranges.sort_by_key(|r| r.start);
        FlatGrads {
            params: self,
            segments: ranges.into_iter().map(|r| (r, None)).collect(),
        }
    }
}

/// Gradients of a [`FlatParams`], accumulated in place in f32: one buffer over the layout, or
/// (ZeRO stage 2) one per range that a block finishes, each living only until it is taken.
#[derive(Debug)]
pub struct FlatGrads<'a> {
    params: &'a FlatParams,
    /// Contiguous ranges of the layout, in order, each with its `[range.len()]` f32 buffer once
    /// written.
    segments: Vec<(Range<usize>, Option<Tensor>)>,
}

impl FlatGrads<'_> {
    /// The buffer over the whole layout (zeroed if nothing was written); an error for segmented
    /// gradients.
    pub fn into_buffer(mut self) -> Result<Tensor> {
        match &mut self.segments[..] {
            [(r, b)] if r.start == 0 && r.end == self.params.len() => Ok(match b.take() {
                Some(b) => b,
                None => Tensor::zeros(self.params.len(), DType::F32, self.params.device())?,
            }),
            _ => Err(Error::InvalidArgument(
                "gradients kept by ranges have no whole buffer".into(),
            )),
        }
    }

    /// The device of the gradients.
    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// The buffer over the whole layout, when the gradients are one buffer.
    pub fn buffer(&self) -> Option<&Tensor> {
        match &self.segments[..] {
            [(r, Some(b))] if r.start == 0 && r.end == self.params.len() => Some(b),
            _ => None,
        }
    }

    /// Hands over the buffer of the range that starts at `start`, if it was written; the range
    /// starts again from zero if written later.
    pub fn take(&mut self, start: usize) -> Option<Tensor> {
        self.segments
            .iter_mut()
            .find(|(r, _)| r.start == start)
            .and_then(|(_, b)| b.take())
    }

    /// The buffer holding slot `s` (made if need be) and the slot's offset in it.
    fn segment(&mut self, s: &Slot) -> candle_core::Result<(usize, &Tensor)> {
        let device = self.params.device().clone();
        let (r, b) = self
            .segments
            .iter_mut()
            .find(|(r, _)| r.start <= s.offset && s.offset < r.end)
            .ok_or_else(|| candle_core::Error::Msg(format!("`{}` lies in no range", s.name)))?;
        let at = s.offset - r.start;
        let buf = match b {
            Some(t) => &*t,
            none @ None => none.insert(Tensor::zeros(r.len(), DType::F32, &device)?),
        };
        Ok((at, buf))
    }
}

impl FlatGrads<'_> {
    /// Adds `grad` (rows of `[vocab, h]`) to the rows `ids` of the embedding `param` (its
    /// backward is a scatter-add).
    pub fn add_rows(&mut self, param: &Tensor, ids: &Tensor, grad: &Tensor) -> Result<()> {
        if !self.wants(param) {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(view) = self.gpu_slot(param, grad)? {
            let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
            crate::nn::cuda::accumulate::scatter_rows_f32(&view, &ids, grad)?;
            return Ok(());
        }
        let g = param.zeros_like()?.to_dtype(DType::F32)?.index_add(
            &ids.flatten_all()?,
            &grad.to_dtype(DType::F32)?,
            0,
        )?;
        Ok(self.add(param, &g)?)
    }
}

impl FlatGrads<'_> {
    /// On the GPU, `param`'s slot of the buffer as a view of `param`'s shape that kernels add
    /// into in place (`None` elsewhere, or when `with` is not a float tensor on the GPU).
    #[cfg(feature = "cuda")]
    fn gpu_slot(&mut self, param: &Tensor, with: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let params = self.params;
        let Some(s) = params.slot_of(param) else {
            return Ok(None);
        };
        if !(params.device().is_cuda()
            && params.device().same_device(with.device())
            && matches!(with.dtype(), DType::F32 | DType::BF16 | DType::F16))
        {
            return Ok(None);
        }
        let (at, buf) = self.segment(s)?;
        Ok(Some(buf.narrow(0, at, s.len())?.reshape(&s.shape)?))
    }
}

impl GradSink for FlatGrads<'_> {
    fn wants(&self, param: &Tensor) -> bool {
        self.params.slot_of(param).is_some()
    }

    fn add(&mut self, param: &Tensor, grad: &Tensor) -> candle_core::Result<()> {
        let params = self.params;
        let Some(s) = params.slot_of(param) else {
            return Ok(());
        };
        #[cfg(feature = "cuda")]
        if let Some(view) = self.gpu_slot(param, grad)? {
            return crate::nn::cuda::accumulate::add_f32(&view, grad);
        }
        let (at, buf) = self.segment(s)?;
        let cur = buf.narrow(0, at, s.len())?;
        let sum = cur.add(&grad.to_dtype(DType::F32)?.flatten_all()?)?;
        buf.slice_set(&sum, 0, at)
    }

    fn add_matmul(
        &mut self,
        param: &Tensor,
        a: &Tensor,
        b: &Tensor,
        alpha: f64,
    ) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if a.dtype() == b.dtype()
            && param.rank() == 2
            && let Some(view) = self.gpu_slot(param, a)?
        {
            return crate::nn::cuda::blas::gemm(&view, a, b, alpha as f32, 1.0);
        }
        let g = a.matmul(b)?;
        self.add(param, &if alpha == 1.0 { g } else { (g * alpha)? })
    }

    fn add_col_sums(&mut self, param: &Tensor, x: &Tensor) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(view) = self.gpu_slot(param, x)? {
            let ones = Tensor::ones((1, x.dim(0)?), x.dtype(), x.device())?;
            let n = view.elem_count();
            return crate::nn::cuda::blas::gemm(&view.reshape((1, n))?, &ones, x, 1.0, 1.0);
        }
        self.add(param, &x.to_dtype(DType::F32)?.sum(0)?)
    }
}

/// The trainable tensors of a model whose blocks lie on several devices (`device_map`): one
/// [`FlatParams`] per device, each holding the tensors of the modules on that device, so every
/// block's adapters, gradients and optimizer states stay on its device. A model on one device
/// has one part.
#[derive(Debug)]
pub struct DeviceParams {
    /// One per device, in the order the model first uses them.
    pub parts: Vec<FlatParams>,
}

impl DeviceParams {
    /// Gathers `model`'s trainable tensors by device and points the model at the views (see
    /// [`FlatParams::adopt`]).
    pub fn adopt(model: &mut Model) -> Result<Self> {
        let all = crate::model::params::trainable(model);
        if all.is_empty() {
            // The single-device constructor says what to do.
            return Ok(Self {
                parts: vec![FlatParams::new(&all)?.0],
            });
        }
        let mut groups: Vec<(Device, Vec<(String, Tensor)>)> = Vec::new();
        for (name, t) in all {
            match groups.iter_mut().find(|(d, _)| d.same_device(t.device())) {
                Some((_, g)) => g.push((name, t)),
                None => groups.push((t.device().clone(), vec![(name, t)])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut views = Vec::new();
        for (_, g) in &groups {
            let (p, v) = FlatParams::new(g)?;
            parts.push(p);
            views.push(v.into_iter());
        }
        // The model visits its trainable tensors in the same order `trainable` listed them.
        let order: Vec<usize> = {
            let mut order = Vec::new();
            visit_trainable_mut(model, &mut |_, t| {
                let k = groups
                    .iter()
                    .position(|(d, _)| d.same_device(t.device()))
                    .unwrap_or(0);
                order.push(k);
                Ok(())
            })?;
            order
        };
        let mut i = 0;
        visit_trainable_mut(model, &mut |_, t| {
            if let Some(v) = order.get(i).and_then(|&k| views[k].next()) {
                *t = v;
            }
            i += 1;
            Ok(())
        })?;
        Ok(Self { parts })
    }

    /// Trainable elements in all.
    pub fn len(&self) -> usize {
        self.parts.iter().map(FlatParams::len).sum()
    }

    /// Whether there is nothing to train.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every slot with the index of its part.
    pub fn slots(&self) -> impl Iterator<Item = (usize, &Slot)> {
        self.parts
            .iter()
            .enumerate()
            .flat_map(|(k, p)| p.slots.iter().map(move |s| (k, s)))
    }

    /// Zeroed f32 gradient buffers, one per part.
    pub fn zero_grads(&self) -> Result<DeviceGrads<'_>> {
        Ok(DeviceGrads {
            parts: self
                .parts
                .iter()
                .map(FlatParams::zero_grads)
                .collect::<Result<_>>()?,
        })
    }
}

/// Gradients of a [`DeviceParams`]: each tensor's gradient lands in its own device's buffer.
#[derive(Debug)]
pub struct DeviceGrads<'a> {
    /// One per part of the params.
    pub parts: Vec<FlatGrads<'a>>,
}

impl<'a> DeviceGrads<'a> {
    fn part(&mut self, param: &Tensor) -> Option<&mut FlatGrads<'a>> {
        let k = self.parts.iter().position(|p| p.wants(param))?;
        self.parts.get_mut(k)
    }

    /// See [`FlatGrads::add_rows`].
    pub fn add_rows(&mut self, param: &Tensor, ids: &Tensor, grad: &Tensor) -> Result<()> {
        match self.part(param) {
            Some(p) => p.add_rows(param, ids, grad),
            None => Ok(()),
        }
    }
}

impl GradSink for DeviceGrads<'_> {
    fn wants(&self, param: &Tensor) -> bool {
        self.parts.iter().any(|p| p.wants(param))
    }

    fn add(&mut self, param: &Tensor, grad: &Tensor) -> candle_core::Result<()> {
        match self.part(param) {
            Some(p) => p.add(param, grad),
            None => Ok(()),
        }
    }

    fn add_matmul(
        &mut self,
        param: &Tensor,
        a: &Tensor,
        b: &Tensor,
        alpha: f64,
    ) -> candle_core::Result<()> {
        match self.part(param) {
            Some(p) => p.add_matmul(param, a, b, alpha),
            None => Ok(()),
        }
    }

    fn add_col_sums(&mut self, param: &Tensor, x: &Tensor) -> candle_core::Result<()> {
        match self.part(param) {
            Some(p) => p.add_col_sums(param, x),
            None => Ok(()),
        }
    }
}
