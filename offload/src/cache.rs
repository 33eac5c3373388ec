//! The fast tier: a fixed number of expert slots, filled by a background
//! loader thread from an [`ExpertSource`], driven by demand (the running
//! layer) and by prefetches (a routing-path predictor's forecasts).
//!
//! Residency of each expert: `Home` (only in the slow tier) -> `Loading` (a
//! slot is reserved, the loader is reading it) -> `Resident` (in a slot) ->
//! back `Home` when evicted. Eviction on the CPU tier is dropping the slot's
//! reference: a guard keeps its own `Arc`, but experts with guards (pins) or
//! used by the running layer are never chosen as victims anyway. The loader
//! serves demand loads (needed now, not predicted) before any prefetch.

use crate::policy::{Candidate, PolicyKind};
use crate::predictor::{Forecast, PathPredictor, PredictorKind, Shape, NO_EXPERT};
use crate::stats::{CacheStats, LayerStats};
use crate::{metric_names as m, ExpertSource, OffloadError};
use moe_model::{ExpertProvider, ExpertWeights, ModelConfig, ModelError, StepToken};
use moe_types::{ExpertId, ExpertSet, LayerId, LayerRouting, SeqId};
use std::collections::VecDeque;
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queued {
    No,
    Demand,
    Prefetch,
}

enum Residency {
    Home,
    Loading,
    Resident(Arc<ExpertWeights>),
}

struct Entry {
    res: Residency,
    pins: u32,
    /// Used by the running layer: never a victim.
    active: bool,
    last_use: u64,
    uses: u64,
    /// Steps in which its layer used it.
    steps_used: u64,
    demand: f32,
    unused_prefetch: bool,
    queued: Queued,
    error: Option<String>,
}

struct State {
    entries: Vec<Entry>,
    experts: usize,
    layers: usize,
    capacity: usize,
    /// Resident + loading.
    occupied: usize,
    demand_q: VecDeque<usize>,
    prefetch_q: Vec<usize>,
    active: Vec<usize>,
    cur_layer: usize,
    /// A step began and none of its layers ran yet.
    between_steps: bool,
    clock: u64,
    policy: PolicyKind,
    predictor: Option<Box<dyn PathPredictor>>,
    /// Latest per-token forecast of each layer, for precision / recall.
    forecasts: Vec<Option<Vec<ExpertId>>>,
    scratch: Vec<Forecast>,
    stats: Vec<LayerStats>,
    /// Steps that ran each layer.
    layer_steps: Vec<u64>,
    load_failures: u64,
    shutdown: bool,
    top_k: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    source: Box<dyn ExpertSource>,
    /// MoE index -> decoder layer.
    layer_of: Vec<LayerId>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fast tier of `slots` experts over a slow tier; implements
/// [`ExpertProvider`] for the forward pass.
pub struct ExpertCache {
    shared: Arc<Shared>,
    loader: Option<JoinHandle<()>>,
    /// Decoder layer -> MoE index.
    moe_of: Vec<Option<usize>>,
    lookahead: usize,
}

/// Keeps an expert pinned (not evictable) while alive.
pub struct CacheGuard<'a> {
    weights: Arc<ExpertWeights>,
    cache: &'a ExpertCache,
    idx: usize,
}

impl Deref for CacheGuard<'_> {
    type Target = ExpertWeights;
    fn deref(&self) -> &ExpertWeights {
        &self.weights
    }
}

impl Drop for CacheGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.cache.shared.lock();
        let e = &mut st.entries[self.idx];
        e.pins = e.pins.saturating_sub(1);
        if e.pins == 0 {
            drop(st);
            self.cache.shared.changed.notify_all();
        }
    }
}

impl ExpertCache {
    /// Starts a cache for `model` over `source` (the loader thread starts now;
    /// the fast tier starts empty).
    pub fn new(model: &ModelConfig, source: Box<dyn ExpertSource>, cfg: CacheConfig) -> Result<Self, OffloadError> {
        let moe_layers: Vec<usize> = model.moe_layers().collect();
        let (ne, k) = (model.moe.num_experts, model.moe.top_k);
        if moe_layers.is_empty() {
            return Err(OffloadError::Config("the model has no MoE layers to offload".into()));
        }
        if cfg.slots < ne {
            return Err(OffloadError::Config(format!(
                "the expert cache must hold at least one layer's {ne} experts (got {} slots)",
                cfg.slots
            )));
        }
        let shape = Shape { layers: moe_layers.len(), experts: ne, top_k: k, depth: cfg.depth.max(1) };
        let predictor = cfg.predictor.build(shape)?;
        if cfg.policy == PolicyKind::Predictive && predictor.is_none() {
            return Err(OffloadError::Config("the predictive policy needs a predictor (--predictor)".into()));
        }
        let lookahead = predictor.as_ref().map_or(0, |p| p.lookahead());
        let mut moe_of = vec![None; model.num_layers()];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(i);
        }
        let n = moe_layers.len();
        let entries = (0..n * ne)
            .map(|_| Entry {
                res: Residency::Home,
                pins: 0,
                active: false,
                last_use: 0,
                uses: 0,
                steps_used: 0,
                demand: 0.0,
                unused_prefetch: false,
                queued: Queued::No,
                error: None,
            })
            .collect();
        let state = State {
            entries,
            experts: ne,
            layers: n,
            capacity: cfg.slots,
            occupied: 0,
            demand_q: VecDeque::new(),
            prefetch_q: Vec::new(),
            active: Vec::new(),
            cur_layer: n - 1,
            between_steps: true,
            clock: 0,
            policy: cfg.policy,
            predictor,
            forecasts: vec![None; n],
            scratch: Vec::new(),
            stats: vec![LayerStats::default(); n],
            layer_steps: vec![0; n],
            load_failures: 0,
            shutdown: false,
            top_k: k,
        };
        metrics::gauge!(m::SLOTS).set(cfg.slots as f64);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            source,
            layer_of: moe_layers.iter().map(|&l| LayerId(l as u16)).collect(),
        });
        let s = shared.clone();
        let loader = std::thread::Builder::new()
            .name("expert-loader".into())
            .spawn(move || loader_loop(&s))
            .map_err(|e| OffloadError::Config(format!("cannot start the loader thread: {e}")))?;
        Ok(Self { shared, loader: Some(loader), moe_of, lookahead })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let st = self.shared.lock();
        CacheStats {
            layers: st.stats.clone(),
            slots: st.capacity,
            resident: st.entries.iter().filter(|e| matches!(e.res, Residency::Resident(_))).count(),
            load_failures: st.load_failures,
        }
    }

    /// The residency state of one expert: `home`, `loading` or `resident`
    /// (tests and debugging).
    pub fn residency(&self, layer: LayerId, expert: ExpertId) -> Option<&'static str> {
        let moe = self.moe(layer).ok()?;
        let st = self.shared.lock();
        st.entries.get(moe * st.experts + expert.index()).map(|e| match e.res {
            Residency::Home => "home",
            Residency::Loading => "loading",
            Residency::Resident(_) => "resident",
        })
    }

    /// Blocks until the loader has nothing queued or in flight (replay tests).
    #[doc(hidden)]
    pub fn wait_idle(&self) {
        let mut st = self.shared.lock();
        while !st.demand_q.is_empty()
            || !st.prefetch_q.is_empty()
            || st.entries.iter().any(|e| matches!(e.res, Residency::Loading))
        {
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn moe(&self, layer: LayerId) -> Result<usize, ModelError> {
        self.moe_of.get(layer.index()).copied().flatten().ok_or_else(|| ModelError::ExpertUnavailable {
            layer: layer.index(),
            expert: 0,
            message: "not an MoE layer".into(),
        })
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(h) = self.loader.take() {
            let _ = h.join();
        }
    }
}

/// What the loader does next.
enum Job {
    Load { idx: usize, prefetch: bool },
    Wait,
}

fn loader_loop(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        match st.next_job() {
            Job::Load { idx, prefetch } => {
                let (moe, e) = (idx / st.experts, idx % st.experts);
                drop(st);
                let loaded = shared.source.load(shared.layer_of[moe], ExpertId(e as u16));
                let bytes = shared.source.expert_bytes() as u64;
                st = shared.lock();
                st.finish(idx, prefetch, loaded, bytes);
                shared.changed.notify_all();
            }
            Job::Wait => {
                shared.changed.notify_all();
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            #[allow(unreachable_patterns)]
            Job::Wait => st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

fn label(layer: usize) -> String {
    layer.to_string()
}

impl State {
    fn next_job(&mut self) -> Job {
        while let Some(&idx) = self.demand_q.front() {
            if !matches!(self.entries[idx].res, Residency::Home) {
                self.demand_q.pop_front();
                self.entries[idx].queued = Queued::No;
                continue;
            }
            if !self.reserve(None) {
                return Job::Wait; // every slot is pinned or active: wait for a release
            }
            self.demand_q.pop_front();
            let e = &mut self.entries[idx];
            e.queued = Queued::No;
            e.res = Residency::Loading;
            return Job::Load { idx, prefetch: false };
        }
        loop {
            let best = self.prefetch_q.iter().enumerate().min_by(|(_, &a), (_, &b)| {
                let key = |i: usize| (self.distance(i / self.experts), -self.entries[i].demand, i);
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(ka.2.cmp(&kb.2))
            });
            let Some((pos, &idx)) = best else { return Job::Wait };
            self.prefetch_q.swap_remove(pos);
            self.entries[idx].queued = Queued::No;
            let demand = self.entries[idx].demand;
            if !matches!(self.entries[idx].res, Residency::Home) || demand <= 0.0 {
                continue;
            }
            if self.reserve(Some(self.value(idx))) {
                self.entries[idx].res = Residency::Loading;
                let layer = idx / self.experts;
                self.stats[layer].prefetch_issued += 1;
                metrics::counter!(m::PREFETCH_ISSUED, "layer" => label(layer)).increment(1);
                return Job::Load { idx, prefetch: true };
            }
        }
    }

    /// MoE layers from the running one to `layer`, going forward (1 = next).
    fn distance(&self, layer: usize) -> usize {
        if self.between_steps {
            layer + 1
        } else {
            (layer + self.layers - self.cur_layer) % self.layers
        }
    }

    /// The predictive policy's value of expert `idx`: the chance it is used
    /// at its layer's next run over the distance to that run, in layers.
    fn value(&self, idx: usize) -> f64 {
        let layer = idx / self.experts;
        let e = &self.entries[idx];
        let base = (e.steps_used as f64 + 1.0) / (self.layer_steps[layer] as f64 + 2.0);
        let chance = if self.forecasts[layer].is_some() {
            if e.demand > 0.0 {
                // the predictor's precision at this layer so far (prior 3/4)
                let s = &self.stats[layer];
                (s.predicted_right as f64 + 3.0) / (s.predicted as f64 + 4.0)
            } else {
                0.25 * base // forecast, not predicted
            }
        } else if e.unused_prefetch {
            0.5 * base // predicted last time, not used: error correction
        } else {
            base
        };
        let d = match self.distance(layer) {
            0 => self.layers,
            d => d,
        };
        chance / d as f64
    }

    /// Frees or finds a slot; a prefetch (with its predicted value) only
    /// evicts what the policy admits.
    fn reserve(&mut self, prefetch_value: Option<f64>) -> bool {
        if self.occupied < self.capacity {
            self.occupied += 1;
            return true;
        }
        let predictive = self.policy == PolicyKind::Predictive;
        let candidates = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.res, Residency::Resident(_)) && e.pins == 0 && !e.active)
            .map(|(slot, e)| Candidate {
                slot,
                last_use: e.last_use,
                uses: e.uses,
                value: if predictive { self.value(slot) } else { 0.0 },
                unused_prefetch: e.unused_prefetch,
            });
        let Some(victim) = self.policy.victim(candidates) else { return false };
        if let Some(d) = prefetch_value {
            if !self.policy.admits_prefetch(d, &victim) {
                return false;
            }
        }
        let layer = victim.slot / self.experts;
        let v = &mut self.entries[victim.slot];
        v.res = Residency::Home;
        if v.unused_prefetch {
            v.unused_prefetch = false;
            self.stats[layer].prefetch_wasted += 1;
            metrics::counter!(m::PREFETCH_WASTED, "layer" => label(layer)).increment(1);
        }
        true
    }

    fn finish(&mut self, idx: usize, prefetch: bool, loaded: Result<ExpertWeights, OffloadError>, bytes: u64) {
        let layer = idx / self.experts;
        self.clock += 1;
        let clock = self.clock;
        let e = &mut self.entries[idx];
        match loaded {
            Ok(w) => {
                e.res = Residency::Resident(Arc::new(w));
                e.error = None;
                e.last_use = clock;
                if prefetch {
                    if e.active {
                        self.stats[layer].prefetch_used += 1; // late, but used
                    } else {
                        e.unused_prefetch = true;
                    }
                }
                let s = &mut self.stats[layer];
                s.loads += 1;
                s.bytes_loaded += bytes;
                metrics::counter!(m::BYTES_LOADED).increment(bytes);
            }
            Err(err) => {
                tracing::warn!(%err, "expert load failed");
                e.res = Residency::Home;
                e.error = Some(err.to_string());
                self.occupied -= 1;
                self.load_failures += 1;
                metrics::counter!(m::LOAD_FAILURES).increment(1);
            }
        }
        metrics::gauge!(m::RESIDENT).set((self.occupied) as f64);
    }

    fn enqueue_demand(&mut self, idx: usize) {
        let e = &mut self.entries[idx];
        if e.queued == Queued::Demand {
            return;
        }
        if e.queued == Queued::Prefetch {
            self.prefetch_q.retain(|&i| i != idx);
        }
        e.queued = Queued::Demand;
        e.error = None;
        self.demand_q.push_back(idx);
    }

    /// Records forecasts: per-token (for accuracy), demand per expert, and
    /// prefetches of predicted experts not resident, most demanded first.
    fn apply_forecasts(&mut self) {
        let mut out = std::mem::take(&mut self.scratch);
        for f in out.drain(..) {
            let j = f.layer;
            if j >= self.layers || (!self.between_steps && j == self.cur_layer) {
                continue; // the running layer's routing is already known
            }
            let ne = self.experts;
            let mut counts = vec![0u32; ne];
            f.ids.iter().filter(|&&id| id != NO_EXPERT && id.index() < ne).for_each(|id| counts[id.index()] += 1);
            let stale: Vec<usize> = self.prefetch_q.iter().copied().filter(|&i| i / ne == j).collect();
            self.prefetch_q.retain(|&i| i / ne != j);
            stale.into_iter().for_each(|i| self.entries[i].queued = Queued::No);
            let mut order: Vec<usize> = (0..ne).filter(|&e| counts[e] > 0).collect();
            order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
            for (e, &c) in counts.iter().enumerate() {
                self.entries[j * ne + e].demand = c as f32;
            }
            for e in order {
                let idx = j * ne + e;
                let en = &mut self.entries[idx];
                if matches!(en.res, Residency::Home) && en.queued == Queued::No {
                    en.queued = Queued::Prefetch;
                    self.prefetch_q.push(idx);
                }
            }
            self.forecasts[j] = Some(f.ids);
        }
        self.scratch = out;
    }

    /// Precision / recall of the latest forecast of `layer` against its routing.
    fn score_forecast(&mut self, layer: usize, routing: &LayerRouting) {
        let k = self.top_k;
        let s = &mut self.stats[layer];
        s.actual += routing.ids.len() as u64;
        if let Some(f) = self.forecasts[layer].take() {
            if f.len() == routing.ids.len() {
                for (pred, actual) in f.chunks_exact(k).zip(routing.ids.chunks_exact(k)) {
                    for p in pred.iter().filter(|&&p| p != NO_EXPERT) {
                        s.predicted += 1;
                        s.predicted_right += u64::from(actual.contains(p));
                    }
                }
            }
        }
        let l = label(layer);
        metrics::gauge!(m::PREDICTOR_PRECISION, "layer" => l.clone()).set(s.precision());
        metrics::gauge!(m::PREDICTOR_RECALL, "layer" => l).set(s.recall());
    }
}

impl ExpertProvider for ExpertCache {
    type Guard<'a> = CacheGuard<'a>;

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        let st = self.shared.lock();
        let (k, n) = (st.top_k, st.layers);
        tokens
            .iter()
            .map(|&t| {
                let ids = st.predictor.as_ref()?.path(t)?;
                let sets = (0..n)
                    .map(|j| {
                        ids.get(j * k..(j + 1) * k).unwrap_or(&[]).iter().copied().filter(|&e| e != NO_EXPERT).collect()
                    })
                    .collect();
                Some(sets)
            })
            .collect()
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        let st = self.shared.lock();
        let mut sets = vec![ExpertSet::new(); st.layers];
        for (i, e) in st.entries.iter().enumerate() {
            if matches!(e.res, Residency::Resident(_) | Residency::Loading) {
                sets[i / st.experts].insert(ExpertId((i % st.experts) as u16));
            }
        }
        sets
    }

    fn begin_step(&self, tokens: &[StepToken]) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        for idx in std::mem::take(&mut st.active) {
            st.entries[idx].active = false;
        }
        st.between_steps = true;
        if let Some(p) = st.predictor.as_mut() {
            p.begin_step(tokens, &mut st.scratch);
            st.apply_forecasts();
        }
        self.shared.changed.notify_all();
    }

    fn end_sequence(&self, seq: SeqId) {
        if let Some(p) = self.shared.lock().predictor.as_mut() {
            p.end_sequence(seq);
        }
    }

    fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn forecast(&self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let (Ok(from), Ok(layer)) = (self.moe(from), self.moe(layer)) else { return };
        let mut st = self.shared.lock();
        let st = &mut *st;
        if let Some(p) = st.predictor.as_mut() {
            p.gating(from, layer, ids, &mut st.scratch);
            st.apply_forecasts();
        }
        self.shared.changed.notify_all();
    }

    fn prepare(&self, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        let moe = self.moe(routing.layer)?;
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let ne = st.experts;
        for idx in std::mem::take(&mut st.active) {
            st.entries[idx].active = false;
        }
        st.cur_layer = moe;
        st.between_steps = false;
        st.clock += 1;
        st.layer_steps[moe] += 1;
        st.score_forecast(moe, routing);
        // this layer's forecasts are consumed: experts predicted but not used
        // keep no demand (and go first under the predictive policy)
        let stale: Vec<usize> = st.prefetch_q.iter().copied().filter(|&i| i / ne == moe).collect();
        st.prefetch_q.retain(|&i| i / ne != moe);
        for i in stale {
            st.entries[i].queued = Queued::No;
        }
        for e in 0..ne {
            st.entries[moe * ne + e].demand = 0.0;
        }
        for id in &routing.ids {
            if let Some(e) = st.entries.get_mut(moe * ne + id.index()) {
                e.uses += 1;
            }
        }
        let (mut hits, mut misses) = (0u64, 0u64);
        for id in used {
            let idx = moe * ne + id.index();
            if id.index() >= ne {
                return Err(ModelError::ExpertUnavailable {
                    layer: routing.layer.index(),
                    expert: id.index(),
                    message: "no such expert".into(),
                });
            }
            st.active.push(idx);
            let clock = st.clock;
            let e = &mut st.entries[idx];
            e.active = true;
            e.steps_used += 1;
            e.last_use = clock;
            match e.res {
                Residency::Resident(_) => {
                    hits += 1;
                    if e.unused_prefetch {
                        e.unused_prefetch = false;
                        st.stats[moe].prefetch_used += 1;
                        metrics::counter!(m::PREFETCH_USED, "layer" => label(moe)).increment(1);
                    }
                }
                Residency::Loading => {
                    misses += 1;
                    st.stats[moe].late += 1;
                }
                Residency::Home => {
                    misses += 1;
                    st.enqueue_demand(idx);
                }
            }
        }
        st.stats[moe].hits += hits;
        st.stats[moe].misses += misses;
        metrics::counter!(m::HITS, "layer" => label(moe)).increment(hits);
        metrics::counter!(m::MISSES, "layer" => label(moe)).increment(misses);
        if let Some(p) = st.predictor.as_mut() {
            p.observe(moe, &routing.ids, &mut st.scratch);
            st.apply_forecasts();
        }
        drop(guard);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn get(&self, layer: LayerId, expert: ExpertId) -> moe_model::Result<CacheGuard<'_>> {
        let moe = self.moe(layer)?;
        let mut st = self.shared.lock();
        let idx = moe * st.experts + expert.index();
        if expert.index() >= st.experts {
            return Err(ModelError::ExpertUnavailable {
                layer: layer.index(),
                expert: expert.index(),
                message: "no such expert".into(),
            });
        }
        let mut waited: Option<Instant> = None;
        loop {
            let e = &mut st.entries[idx];
            match &e.res {
                Residency::Resident(w) => {
                    e.pins += 1;
                    let weights = w.clone();
                    if let Some(t0) = waited {
                        let ns = t0.elapsed().as_nanos() as u64;
                        st.stats[moe].stall_ns += ns;
                        metrics::counter!(m::STALL_MICROSECONDS).increment(ns / 1000);
                    }
                    return Ok(CacheGuard { weights, cache: self, idx });
                }
                Residency::Loading => {}
                Residency::Home => {
                    if let (Some(err), Some(_)) = (&e.error, waited) {
                        return Err(ModelError::ExpertUnavailable {
                            layer: layer.index(),
                            expert: expert.index(),
                            message: err.clone(),
                        });
                    }
                    st.enqueue_demand(idx);
                    self.shared.changed.notify_all();
                }
            }
            waited.get_or_insert_with(Instant::now);
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}
