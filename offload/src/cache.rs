//! The CPU fast tier: the [`ResidencyCore`] decides, a loader thread moves.
//!
//! The shell owns the core and the slots' weights behind one mutex; the
//! loader thread takes the core's commands ([`Command::Evict`]: drop the
//! slot's weights; [`Command::Load`]: read the expert from the
//! [`ExpertSource`] with the lock released) and reports back. The forward
//! pass's `get` pins an expert through the core and waits on a condition
//! variable only for the expert it needs. Counters are published to the
//! metrics registry from the core's statistics after each change.

use crate::residency::{Command, Pin, ResidencyConfig, ResidencyCore, ResidencyError, State};
use crate::stats::{CacheStats, Publisher};
use crate::{metric_names as m, ExpertSource, OffloadError, PolicyKind, PredictorKind};
use moe_model::{ExpertPlanner, ExpertProvider, ExpertWeights, ModelConfig, ModelError, StepToken};
use moe_types::{ExpertId, ExpertKey, ExpertSet, LayerId, LayerRouting, MoeLayerId, SeqId};
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// How the cache is set up.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Expert slots in the fast tier (at least one MoE layer's experts).
    pub slots: usize,
    /// Victim choice.
    pub policy: PolicyKind,
    /// Forecasts for prefetching.
    pub predictor: PredictorKind,
    /// MoE layers ahead to forecast and prefetch.
    pub depth: usize,
    /// Forecasts from a distance whose measured precision for the layer is
    /// below this are not prefetched (0: every forecast is).
    pub min_precision: f64,
    /// Loader threads (reads in flight at once, at least 1). With more than
    /// one, one of them is kept for demand loads: prefetches never occupy
    /// every reader.
    pub readers: usize,
}

/// What the mutex guards: the core, the weights in its slots, and what was
/// last published to the metrics registry.
struct Inner {
    core: ResidencyCore,
    /// `[slot]`: the weights of the resident expert in it.
    slots: Vec<Option<Arc<ExpertWeights>>>,
    published: Publisher,
    /// The loaders found nothing they can do now and none is reading
    /// (cleared by every change).
    settled: bool,
    /// Loads being read now, and how many of them are prefetches.
    reading: usize,
    prefetching: usize,
    /// Loader threads.
    readers: usize,
    shutdown: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// A load finished or the loaders settled (waited on by `get` and the
    /// test helpers).
    changed: Condvar,
    /// The core may have a command to issue (waited on by idle loaders; one
    /// is woken at a time, and a loader that takes a command wakes the next,
    /// so a change does not wake every reader).
    work: Condvar,
    source: Box<dyn ExpertSource>,
    /// MoE index -> decoder layer.
    layer_of: Vec<LayerId>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fast tier of `slots` experts over a slow tier; implements
/// [`ExpertProvider`] for the forward pass and [`ExpertPlanner`] for the engine.
pub struct ExpertCache {
    shared: Arc<Shared>,
    loaders: Vec<JoinHandle<()>>,
    /// Decoder layer -> MoE index.
    moe_of: Vec<Option<MoeLayerId>>,
    lookahead: usize,
    /// Whether the predictor reads hidden states (fixed at construction).
    wants_hidden: bool,
}

/// Keeps an expert pinned (not evictable) while alive.
pub struct CacheGuard<'a> {
    weights: Arc<ExpertWeights>,
    cache: &'a ExpertCache,
    key: ExpertKey,
}

impl Deref for CacheGuard<'_> {
    type Target = ExpertWeights;
    fn deref(&self) -> &ExpertWeights {
        &self.weights
    }
}

impl Drop for CacheGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.cache.shared.lock();
        let released = inner.core.unpin(self.key).unwrap_or(false);
        inner.settled &= !released;
        drop(inner);
        if released {
            self.cache.shared.work.notify_one();
        }
    }
}

impl ExpertCache {
    /// Starts a cache for `model` over `source` (the loader threads start
    /// now; the fast tier starts empty).
    pub fn new(model: &ModelConfig, source: Box<dyn ExpertSource>, cfg: CacheConfig) -> Result<Self, OffloadError> {
        cfg.predictor.check_width(model.hidden_size)?;
        let moe_layers: Vec<usize> = model.moe_layers().collect();
        let core = ResidencyCore::new(ResidencyConfig {
            layers: moe_layers.len(),
            experts: model.moe.num_experts,
            top_k: model.moe.top_k,
            slots: cfg.slots,
            expert_bytes: source.expert_bytes() as u64,
            policy: cfg.policy,
            predictor: cfg.predictor,
            depth: cfg.depth,
            min_precision: cfg.min_precision,
        })?;
        if cfg.readers == 0 {
            return Err(OffloadError::Config("at least one expert reader is needed".into()));
        }
        let lookahead = core.lookahead();
        let wants_hidden = core.wants_hidden();
        let mut moe_of = vec![None; model.num_layers()];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(MoeLayerId(i as u16));
        }
        metrics::gauge!(m::SLOTS).set(cfg.slots as f64);
        let inner = Inner {
            slots: vec![None; cfg.slots],
            published: Publisher::new(moe_layers.len()),
            settled: false,
            reading: 0,
            prefetching: 0,
            readers: cfg.readers,
            core,
            shutdown: false,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            work: Condvar::new(),
            source,
            layer_of: moe_layers.iter().map(|&l| LayerId(l as u16)).collect(),
        });
        let mut cache = Self { shared, loaders: Vec::with_capacity(cfg.readers), moe_of, lookahead, wants_hidden };
        for i in 0..cfg.readers {
            let s = cache.shared.clone();
            let loader = std::thread::Builder::new()
                .name(format!("expert-loader-{i}"))
                .spawn(move || loader_loop(&s))
                // dropping `cache` stops the loaders already started
                .map_err(|e| OffloadError::Config(format!("cannot start a loader thread: {e}")))?;
            cache.loaders.push(loader);
        }
        Ok(cache)
    }

    /// Bytes of the experts in the fast tier now (resident or being loaded).
    pub fn resident_bytes(&self) -> u64 {
        self.shared.lock().core.occupied_bytes()
    }

    /// The most expert bytes the fast tier holds: its slots times the bytes
    /// of one expert.
    pub fn budget_bytes(&self) -> u64 {
        self.shared.lock().core.capacity_bytes()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.shared.lock().core.stats()
    }

    /// Where one expert is (tests and debugging); `None` outside the model's
    /// MoE layers.
    pub fn residency(&self, layer: LayerId, expert: ExpertId) -> Option<State> {
        let moe = self.moe(layer).ok()?;
        self.shared.lock().core.state(ExpertKey { layer: moe, expert })
    }

    /// Blocks until the loader has nothing queued or in flight (trace replays
    /// that want counts independent of timing).
    pub fn wait_idle(&self) {
        let mut inner = self.shared.lock();
        while inner.core.busy() && !inner.shutdown {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the loaders can do nothing more now: no load in flight,
    /// and whatever is queued waits for a pin to be released (tests).
    pub fn wait_settled(&self) {
        let mut inner = self.shared.lock();
        while !inner.settled && !inner.shutdown {
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn moe(&self, layer: LayerId) -> Result<MoeLayerId, ModelError> {
        self.moe_of.get(layer.index()).copied().flatten().ok_or_else(|| ModelError::ExpertUnavailable {
            layer: layer.index(),
            expert: 0,
            message: "not an MoE layer".into(),
        })
    }

    fn key(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertKey, ModelError> {
        Ok(ExpertKey { layer: self.moe(layer)?, expert })
    }

    /// Runs `f` on the core, publishes the counters and wakes a loader.
    fn update<T>(&self, f: impl FnOnce(&mut ResidencyCore) -> T) -> T {
        let mut inner = self.shared.lock();
        let out = f(&mut inner.core);
        inner.settled = false;
        inner.publish();
        drop(inner);
        self.shared.work.notify_one();
        out
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        self.shared.work.notify_all();
        for h in self.loaders.drain(..) {
            let _ = h.join();
        }
    }
}

/// The CPU mover (one per reader thread): executes the core's commands
/// until shut down. Evictions run under the lock; a load's read runs with the
/// lock released, so several loads are read at once.
fn loader_loop(shared: &Shared) {
    let mut inner = shared.lock();
    loop {
        if inner.shutdown {
            return;
        }
        // the last free reader is kept for demand loads
        let prefetch_ok = inner.readers == 1 || inner.prefetching + 1 < inner.readers;
        match inner.core.poll(prefetch_ok) {
            Some(Command::Evict { key, slot }) => {
                // a guard keeps its own reference: the weights live on until it drops
                inner.slots[slot.index()] = None;
                if let Err(err) = inner.core.evicted(key) {
                    tracing::error!(%err, "residency core refused an eviction report");
                }
            }
            Some(Command::Load { key, slot, prefetch }) => {
                inner.reading += 1;
                inner.prefetching += usize::from(prefetch);
                inner.publish();
                drop(inner);
                // another reader may take the next command meanwhile
                shared.work.notify_one();
                let loaded = shared.source.load(shared.layer_of[key.layer.index()], key.expert);
                inner = shared.lock();
                inner.reading -= 1;
                inner.prefetching -= usize::from(prefetch);
                let report = match loaded {
                    Ok(w) => {
                        inner.slots[slot.index()] = Some(Arc::new(w));
                        Ok(())
                    }
                    Err(err) => {
                        tracing::warn!(%err, "expert load failed");
                        Err(err.to_string())
                    }
                };
                if let Err(err) = inner.core.loaded(key, prefetch, report) {
                    tracing::error!(%err, "residency core refused a load report");
                }
                inner.publish();
                shared.changed.notify_all();
            }
            None => {
                inner.settled = inner.reading == 0;
                inner.publish();
                shared.changed.notify_all();
                inner = shared.work.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

impl Inner {
    /// Publishes what changed in the core's counters since the last call.
    fn publish(&mut self) {
        self.published.publish(&self.core);
    }
}

fn unavailable(layer: LayerId, expert: ExpertId, message: impl Into<String>) -> ModelError {
    ModelError::ExpertUnavailable { layer: layer.index(), expert: expert.index(), message: message.into() }
}

fn refused(layer: LayerId, err: ResidencyError) -> ModelError {
    match err {
        ResidencyError::NoSuchExpert(k) => unavailable(layer, k.expert, "no such expert"),
        ResidencyError::UnexpectedReport { key, .. } => unavailable(layer, key.expert, err.to_string()),
    }
}

impl ExpertPlanner for ExpertCache {
    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        self.shared.lock().core.predict_paths(tokens)
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        self.shared.lock().core.resident_sets()
    }

    fn begin_step(&self, tokens: &[StepToken]) {
        self.update(|core| core.begin_step(tokens));
    }

    fn end_sequence(&self, seq: SeqId) {
        self.shared.lock().core.end_sequence(seq);
    }
}

impl ExpertProvider for ExpertCache {
    type Guard<'a> = CacheGuard<'a>;

    fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn forecast(&self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let (Ok(from), Ok(layer)) = (self.moe(from), self.moe(layer)) else { return };
        self.update(|core| core.gating(from, layer, ids));
    }

    fn wants_hidden(&self) -> bool {
        self.wants_hidden
    }

    fn hidden(&self, layer: LayerId, h: &[f32]) {
        let Ok(layer) = self.moe(layer) else { return };
        self.update(|core| core.hidden(layer, h));
    }

    fn prepare(&self, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        let moe = self.moe(routing.layer)?;
        self.update(|core| core.prepare(moe, routing, used)).map_err(|e| refused(routing.layer, e))
    }

    fn get(&self, layer: LayerId, expert: ExpertId) -> moe_model::Result<CacheGuard<'_>> {
        let key = self.key(layer, expert)?;
        let mut inner = self.shared.lock();
        let mut waited: Option<Instant> = None;
        loop {
            match inner.core.pin(key, waited.is_some()).map_err(|e| refused(layer, e))? {
                Pin::Ready(slot) => {
                    let Some(weights) = inner.slots[slot.index()].clone() else {
                        let _ = inner.core.unpin(key);
                        return Err(unavailable(layer, expert, "resident without weights"));
                    };
                    if let Some(t0) = waited {
                        inner.core.add_stall(key.layer, t0.elapsed().as_nanos() as u64);
                    }
                    return Ok(CacheGuard { weights, cache: self, key });
                }
                Pin::Failed(message) => return Err(unavailable(layer, expert, message)),
                Pin::Wait => {
                    inner.settled = false;
                    self.shared.work.notify_one();
                }
            }
            waited.get_or_insert_with(Instant::now);
            inner = self.shared.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }
}
