//! Continuous batching: one thread owns the models and the KV cache ([`Slots`]) and runs every
//! sequence being served. Requests join between steps (each prompt prefilled into a free slot,
//! its first token sampled) and leave when they stop, reach their length or their client goes
//! away; each step decodes one token for every running sequence, one forward per served model
//! (base or adapter) over the span of slots its sequences lie in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use candle_core::{D, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::slots::{Slots, tables_at};
use crate::cancel::CancelToken;
use crate::model::generate::{GenerateOptions, Sampler};
use crate::model::load::Model;
use crate::nn::AttnMask;
use crate::{Error, Result};

/// A model served under a name, whose weights can be replaced while it is served (a run that
/// trains publishes its adapter at each optimizer step; a step of the server uses one version
/// throughout).
pub struct ServedModel {
    /// The name clients ask for (`model` in a request).
    pub name: String,
    /// Its own tokenizer (an adapter saved with the template it was trained with); `None`: the
    /// server's.
    pub tokenizer: Option<Arc<crate::tokenizer::Tokenizer>>,
    current: RwLock<Arc<Model>>,
}

impl ServedModel {
    /// `model` served as `name`.
    pub fn new(name: impl Into<String>, model: Model) -> Self {
        Self {
            name: name.into(),
            tokenizer: None,
            current: RwLock::new(Arc::new(model)),
        }
    }

    /// The same, rendering and decoding with `tokenizer`.
    pub fn with_tokenizer(mut self, tokenizer: Arc<crate::tokenizer::Tokenizer>) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// The version requests use now.
    pub fn current(&self) -> Arc<Model> {
        match self.current.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the weights; sequences running see them from their next token on.
    pub fn publish(&self, model: Model) {
        let m = Arc::new(model);
        match self.current.write() {
            Ok(mut g) => *g = m,
            Err(p) => *p.into_inner() = m,
        }
    }
}

/// A new token's log-probability under the model (the raw logits' log-softmax, before
/// temperature or penalties, as vLLM reports it) and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Of `token` and the `top` most likely tokens under `logits` (`[vocab]`, any float dtype).
    pub fn of(logits: &Tensor, token: u32, top: usize) -> Result<Self> {
        let v: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        if !lse.is_finite() {
            return Err(Error::InvalidArgument(
                "the model's logits are NaN or infinite: no log-probabilities to report".into(),
            ));
        }
        let logprob = v.get(token as usize).map_or(f32::NEG_INFINITY, |x| x - lse);
        if top == 0 {
            return Ok(Self {
                logprob,
                top: Vec::new(),
            });
        }
        let mut ids: Vec<u32> = (0..v.len() as u32).collect();
        let k = top.min(ids.len());
        let by_logit = |a: &u32, b: &u32| v[*b as usize].total_cmp(&v[*a as usize]);
        if k > 0 && k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by_logit);
        }
        ids.truncate(k);
        ids.sort_by(by_logit);
        let top = ids.into_iter().map(|i| (i, v[i as usize] - lse)).collect();
        Ok(Self { logprob, top })
    }
}

/// What a request hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next token, with its log-probabilities when the request asked for them.
    Token(u32, Option<TokenLogprobs>),
    /// The sequence ended.
    Done(Finish),
    /// It failed; the message says why.
    Failed(String),
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

/// One request for the engine.
pub struct Job {
    /// Index of the served model.
    pub model: usize,
    /// The prompt's ids (non-empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Length and sampling.
    pub opts: GenerateOptions,
    /// Where its tokens go; dropping the receiver ends the sequence.
    pub events: UnboundedSender<Event>,
    /// Each token's log-probability and this many alternatives (`None`: none).
    pub logprobs: Option<usize>,
}

/// How many sequences the engine runs and holds.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences decoding now.
    pub running: AtomicUsize,
    /// Requests waiting for a slot.
    pub waiting: AtomicUsize,
}

/// The engine's size.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together at most (the KV cache's slots).
    pub max_seqs: usize,
    /// Positions a sequence may hold: its prompt and new tokens.
    pub max_len: usize,
}

/// Where requests go; cloned by every connection. The engine stops when the last handle is
/// dropped.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: Sender<Job>,
    /// Shared counters.
    pub stats: Arc<Stats>,
    /// The config it runs with.
    pub config: EngineConfig,
}

impl EngineHandle {
    /// Queues `job`; an error when the engine has stopped.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.jobs.send(job).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            Error::InvalidArgument("the server's engine has stopped".into())
        })
    }
}

/// Starts the engine's thread over `models` (one base and its adapters), allocating its KV cache
/// first (an error if it cannot be). What is served and the sizes were checked by
/// [`super::Server::start`], the one caller.
pub(super) fn start(
    models: Vec<Arc<ServedModel>>,
    config: EngineConfig,
    cancel: CancelToken,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let base = models
        .first()
        .ok_or_else(|| Error::InvalidArgument("nothing to serve".into()))?
        .current();
    let slots = Slots::new(&base.decoder, config.max_seqs, config.max_len)?;
    drop(base);
    let (tx, rx) = std::sync::mpsc::channel();
    let stats = Arc::new(Stats::default());
    let mut engine = Engine {
        models,
        slots,
        free: (0..config.max_seqs).rev().collect(),
        running: Vec::new(),
        waiting: VecDeque::new(),
        stats: stats.clone(),
        cancel,
    };
    crate::device::serving(true);
    let thread = std::thread::Builder::new()
        .name("qscript-serve".into())
        .spawn(move || {
            engine.run(&rx);
            crate::device::serving(false);
        })
        .map_err(|e| {
            crate::device::serving(false);
            Error::InvalidArgument(format!("cannot start the server's engine: {e}"))
        })?;
    Ok((
        EngineHandle {
            jobs: tx,
            stats,
            config,
        },
        thread,
    ))
}

/// A sequence being decoded.
struct Seq {
    slot: usize,
    model: usize,
    sampler: Sampler,
    /// Prompt and tokens so far (the repetition penalty reads it).
    context: Vec<u32>,
    generated: usize,
    max_new: usize,
    events: UnboundedSender<Event>,
    /// Alternatives a token's log-probabilities list (`None`: none asked).
    logprobs: Option<usize>,
    /// The newest token's, until it is delivered.
    last_logprobs: Option<TokenLogprobs>,
}

impl Seq {
    /// The last token, the next step's input.
    fn last(&self) -> u32 {
        self.context.last().copied().unwrap_or(0)
    }
}

struct Engine {
    models: Vec<Arc<ServedModel>>,
    slots: Slots,
    /// Free slots, the lowest last (taken first, so spans stay short).
    free: Vec<usize>,
    running: Vec<Seq>,
    waiting: VecDeque<Job>,
    stats: Arc<Stats>,
    cancel: CancelToken,
}

impl Engine {
    fn run(&mut self, jobs: &Receiver<Job>) {
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => self.waiting.push_back(j),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(j) = jobs.try_recv() {
                self.waiting.push_back(j);
            }
            // A training step of this process (serving while training) and this step take turns.
            let turn = crate::device::turn();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            drop(turn);
            self.stats
                .running
                .store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// Prefills waiting requests into free slots.
    fn admit(&mut self) {
        while !self.free.is_empty()
            && let Some(job) = self.waiting.pop_front()
        {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            let Some(slot) = self.free.pop() else { break };
            self.slots.clear(slot);
            match self.prefill(&job, slot) {
                Ok(seq) => {
                    if let Some(seq) = self.deliver(seq) {
                        self.running.push(seq);
                    }
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                    self.release(slot);
                }
            }
        }
    }

    /// The prompt's keys and values into `slot`, and its first new token sampled.
    fn prefill(&mut self, job: &Job, slot: usize) -> Result<Seq> {
        let model = self
            .models
            .get(job.model)
            .ok_or_else(|| Error::InvalidArgument(format!("no served model {}", job.model)))?
            .current();
        model.check_request(&job.prompt, &job.opts)?;
        let room = self.slots.capacity().saturating_sub(job.prompt.len());
        if room == 0 {
            return Err(Error::InvalidArgument(format!(
                "the prompt has {} tokens; the context holds {}",
                job.prompt.len(),
                self.slots.capacity()
            )));
        }
        let d = &model.decoder;
        let s = job.prompt.len();
        let input = Tensor::new(job.prompt.as_slice(), d.device())?.unsqueeze(0)?;
        let mask = AttnMask::causal(0);
        let tables = d.rope_tables(&mask, 1, s)?;
        let mut cache = self.slots.prefill(slot);
        let h = d.hidden_with(&input, &mask, tables, Some(&mut cache), None)?;
        let h = h.narrow(1, s - 1, 1)?;
        let logits = d.head(&h)?.squeeze(1)?.squeeze(0)?;
        let mut sampler = model.sampler(&job.opts);
        let first = sampler.sample(&logits, &job.prompt, 0)?;
        let last_logprobs = job
            .logprobs
            .map(|k| TokenLogprobs::of(&logits, first, k))
            .transpose()?;
        let mut context = job.prompt.clone();
        context.push(first);
        Ok(Seq {
            slot,
            model: job.model,
            sampler,
            context,
            generated: 1,
            max_new: job.opts.max_new_tokens.min(room),
            events: job.events.clone(),
            logprobs: job.logprobs,
            last_logprobs,
        })
    }

    /// Sends `seq`'s newest token and returns it if it goes on.
    fn deliver(&mut self, mut seq: Seq) -> Option<Seq> {
        let tok = seq.last();
        if seq
            .events
            .send(Event::Token(tok, seq.last_logprobs.take()))
            .is_err()
        {
            self.release(seq.slot);
            return None;
        }
        let finish = if seq.sampler.is_stop(tok) {
            Some(Finish::Stop)
        } else if seq.generated >= seq.max_new {
            Some(Finish::Length)
        } else {
            None
        };
        match finish {
            Some(f) => {
                let _ = seq.events.send(Event::Done(f));
                self.release(seq.slot);
                None
            }
            None => Some(seq),
        }
    }

    fn release(&mut self, slot: usize) {
        self.slots.clear(slot);
        self.free.push(slot);
        // Lowest last: the next sequence takes the lowest free slot.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// One token for every running sequence, one forward per served model.
    fn step(&mut self) {
        let running = std::mem::take(&mut self.running);
        let mut groups: Vec<(usize, Vec<Seq>)> = Vec::new();
        for seq in running {
            match groups.iter_mut().find(|(m, _)| *m == seq.model) {
                Some((_, g)) => g.push(seq),
                None => groups.push((seq.model, vec![seq])),
            }
        }
        for (model, mut group) in groups {
            match self.decode(model, &mut group) {
                Ok(tokens) => {
                    for (mut seq, (tok, lp)) in group.into_iter().zip(tokens) {
                        seq.context.push(tok);
                        seq.last_logprobs = lp;
                        seq.generated += 1;
                        if let Some(seq) = self.deliver(seq) {
                            self.running.push(seq);
                        }
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for seq in group {
                        let _ = seq.events.send(Event::Failed(msg.clone()));
                        self.release(seq.slot);
                    }
                }
            }
        }
    }

    /// The next token of each sequence of `group` (all of one model), with its
    /// log-probabilities where the sequence asked for them.
    fn decode(
        &mut self,
        served: usize,
        group: &mut [Seq],
    ) -> Result<Vec<(u32, Option<TokenLogprobs>)>> {
        let model = self.models[served].current();
        let d = &model.decoder;
        let lo = group.iter().map(|s| s.slot).min().unwrap_or(0);
        let hi = group.iter().map(|s| s.slot).max().unwrap_or(0);
        let span = hi - lo + 1;
        let mut live = vec![false; span];
        let mut ids = vec![0u32; span];
        for s in group.iter() {
            live[s.slot - lo] = true;
            ids[s.slot - lo] = s.last();
        }
        // Rows of the span in the group's order.
        let order = || {
            let rows: Vec<u32> = group.iter().map(|s| (s.slot - lo) as u32).collect();
            Tensor::from_slice(&rows, rows.len(), d.device())
        };
        // Recorded as a CUDA graph where it may be (off with `QSCRIPT_DECODE_GRAPH=0`).
        #[cfg(feature = "cuda")]
        if let Some(logits) = super::graph::step(served, &model, &mut self.slots, lo, &live, &ids)?
        {
            let logits = if span == 1 {
                logits
            } else {
                logits.index_select(&order()?, 0)?
            };
            return pick(group, &logits);
        }
        let capacity = self.slots.capacity();
        // One sequence alone: plain causal attention after its cached positions and RoPE rows
        // cut from the table (nothing to upload but the token and the cache's row).
        let single = span == 1;
        let at = self.slots.len(lo);
        let mut cache = self.slots.decode(lo, &live)?;
        let (mask, tables) = if single {
            let mask = AttnMask::causal(at);
            let tables = d.rope_tables(&mask, 1, 1)?;
            (mask, tables)
        } else {
            (
                cache.mask().clone(),
                tables_at(d, cache.positions(), capacity)?,
            )
        };
        let input = Tensor::from_vec(ids, (span, 1), d.device())?;
        let h = d.hidden_with(&input, &mask, tables, Some(&mut cache), None)?;
        // Only the live rows go through the head, in the group's order.
        let h = if single {
            h
        } else {
            h.index_select(&order()?, 0)?
        };
        let logits = d.head(&h)?.squeeze(1)?;
        pick(group, &logits)
    }
}

/// Each sequence's next token from its row of `logits` (`[group, vocab]`), with its
/// log-probabilities where it asked for them.
fn pick(group: &mut [Seq], logits: &Tensor) -> Result<Vec<(u32, Option<TokenLogprobs>)>> {
    let greedy = if group.iter().all(|s| s.sampler.is_plain_greedy()) {
        Some(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(group.len());
    for (i, seq) in group.iter_mut().enumerate() {
        let tok = match &greedy {
            Some(g) => g[i],
            None => seq
                .sampler
                .sample(&logits.get(i)?, &seq.context, seq.generated)?,
        };
        let lp = seq
            .logprobs
            .map(|k| TokenLogprobs::of(&logits.get(i)?, tok, k))
            .transpose()?;
        out.push((tok, lp));
    }
    Ok(out)
}
