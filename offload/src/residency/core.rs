//! The residency state machine (see the module docs of [`super`]).

use crate::policy::{Candidate, PolicyKind};
use crate::predictor::{Forecast, PathPredictor, PredictorKind, Shape, NO_EXPERT};
use crate::stats::{CacheStats, LayerStats};
use crate::OffloadError;
use moe_model::StepToken;
use moe_types::{ExpertId, ExpertKey, ExpertSet, LayerRouting, MoeLayerId, SeqId, SlotId, SlotTable};
use std::collections::VecDeque;

/// How the core is set up.
#[derive(Clone, Debug)]
pub struct ResidencyConfig {
    /// MoE layers.
    pub layers: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Slots of the fast tier (at least one MoE layer's experts).
    pub slots: usize,
    /// Bytes one expert occupies in the fast tier (for the counters).
    pub expert_bytes: u64,
    /// Victim choice.
    pub policy: PolicyKind,
    /// Forecasts for prefetching.
    pub predictor: PredictorKind,
    /// MoE layers ahead to forecast and prefetch.
    pub depth: usize,
    /// Forecasts made at a distance (in MoE layers) whose measured precision
    /// for the layer is below this are scored but not prefetched, so each
    /// layer prefetches only as far ahead as its forecasts are right (a
    /// prior of 3 right in 4 until measured); 0 prefetches every forecast.
    pub min_precision: f64,
}

/// Where one expert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Only in the slow tier.
    Home,
    /// A slot is reserved and a mover is filling it.
    Loading(SlotId),
    /// In its slot, ready to compute with.
    Resident(SlotId),
    /// Chosen as a victim; its slot went to another expert and the mover has
    /// not yet confirmed it let the old bytes go.
    Evicting(SlotId),
}

/// What a mover must do, in the order [`ResidencyCore::poll`] returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Let go of `key`'s bytes in `slot`, then report [`ResidencyCore::evicted`].
    /// A load into the same slot follows; on a device, it must wait for the
    /// computations that read the slot.
    Evict {
        /// The victim.
        key: ExpertKey,
        /// Its slot.
        slot: SlotId,
    },
    /// Read `key` from the slow tier into `slot`, then report
    /// [`ResidencyCore::loaded`].
    Load {
        /// The expert.
        key: ExpertKey,
        /// The slot to fill.
        slot: SlotId,
        /// A prefetch (forecast) rather than a demand load (needed now).
        prefetch: bool,
    },
}

/// The answer to a pin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Pinned in this slot until [`ResidencyCore::unpin`].
    Ready(SlotId),
    /// Not resident yet: a load is queued or running; ask again after the
    /// next report.
    Wait,
    /// The last load of it failed (asked again after waiting).
    Failed(String),
}

/// A request the core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResidencyError {
    /// The expert or layer is outside the model.
    #[error("{0} does not exist")]
    NoSuchExpert(ExpertKey),
    /// A mover reported on an expert the core did not ask it to move.
    #[error("{key} was reported {report} but is {state:?}")]
    UnexpectedReport {
        /// The expert.
        key: ExpertKey,
        /// What was reported.
        report: &'static str,
        /// Its state.
        state: State,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queued {
    No,
    Demand,
    Prefetch,
}

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) state: State,
    pins: u32,
    /// Used by the running layer: never a victim.
    active: bool,
    last_use: u64,
    uses: u64,
    /// Steps in which its layer used it.
    pub(super) steps_used: u64,
    pub(super) demand: f32,
    pub(super) unused_prefetch: bool,
    queued: Queued,
    error: Option<String>,
}

/// Residency of every expert of the model over a fixed number of slots.
pub struct ResidencyCore {
    pub(super) entries: Vec<Entry>,
    table: SlotTable,
    pub(super) experts: usize,
    pub(super) layers: usize,
    demand_q: VecDeque<usize>,
    pub(super) prefetch_q: Vec<usize>,
    active: Vec<usize>,
    pub(super) cur_layer: usize,
    /// A step began and none of its layers ran yet.
    pub(super) between_steps: bool,
    clock: u64,
    policy: PolicyKind,
    pub(super) predictor: Option<Box<dyn PathPredictor>>,
    /// Latest per-token forecast of each layer, for precision / recall.
    pub(super) forecasts: Vec<Option<Vec<ExpertId>>>,
    pub(super) scratch: Vec<Forecast>,
    pub(super) stats: Vec<LayerStats>,
    /// Steps that ran each layer.
    pub(super) layer_steps: Vec<u64>,
    load_failures: u64,
    pub(super) top_k: usize,
    expert_bytes: u64,
    /// Commands issued and not yet taken by the mover.
    pending: VecDeque<Command>,
    /// `[layer][distance - 1]`: forecasts by how far ahead they were made.
    pub(super) by_distance: Vec<Vec<DistanceScore>>,
    pub(super) min_precision: f64,
}

/// The forecasts of one layer made at one distance: the latest, until the
/// layer runs, and the running score.
#[derive(Clone, Debug, Default)]
pub(super) struct DistanceScore {
    pub(super) latest: Option<Vec<ExpertId>>,
    pub(super) predicted: u64,
    pub(super) right: u64,
}

impl ResidencyCore {
    /// An empty fast tier (every expert `Home`).
    pub fn new(cfg: ResidencyConfig) -> Result<Self, OffloadError> {
        let (n, ne) = (cfg.layers, cfg.experts);
        if n == 0 {
            return Err(OffloadError::Config("the model has no MoE layers to offload".into()));
        }
        if cfg.slots < ne {
            return Err(OffloadError::Config(format!(
                "the expert cache must hold at least one layer's {ne} experts (got {} slots)",
                cfg.slots
            )));
        }
        let shape = Shape { layers: n, experts: ne, top_k: cfg.top_k, depth: cfg.depth.max(1) };
        let predictor = cfg.predictor.build(shape)?;
        if cfg.policy == PolicyKind::Predictive && predictor.is_none() {
            return Err(OffloadError::Config("the predictive policy needs a predictor (--predictor)".into()));
        }
        let entry = Entry {
            state: State::Home,
            pins: 0,
            active: false,
            last_use: 0,
            uses: 0,
            steps_used: 0,
            demand: 0.0,
            unused_prefetch: false,
            queued: Queued::No,
            error: None,
        };
        Ok(Self {
            entries: vec![entry; n * ne],
            table: SlotTable::new(cfg.slots, n, ne),
            experts: ne,
            layers: n,
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
            top_k: cfg.top_k,
            expert_bytes: cfg.expert_bytes,
            pending: VecDeque::new(),
            by_distance: vec![vec![DistanceScore::default(); shape.depth]; n],
            min_precision: cfg.min_precision,
        })
    }

    /// MoE layers ahead for which the model should run look-ahead gating.
    pub fn lookahead(&self) -> usize {
        self.predictor.as_ref().map_or(0, |p| p.lookahead())
    }

    /// Whether the predictor reads the hidden states entering MoE layers.
    pub fn wants_hidden(&self) -> bool {
        self.predictor.as_ref().is_some_and(|p| p.wants_hidden())
    }

    /// The residual stream entering MoE layer `layer` (before its attention)
    /// for the step's tokens: forecasts from it are applied at once.
    pub fn hidden(&mut self, layer: MoeLayerId, h: &[f32]) {
        if let Some(p) = self.predictor.as_mut() {
            p.hidden(layer, h, &mut self.scratch);
            self.apply_forecasts();
        }
    }

    /// Slots of the fast tier.
    pub fn slots(&self) -> usize {
        self.table.slots()
    }

    /// Bytes of the experts in slots now (resident or loading).
    pub fn occupied_bytes(&self) -> u64 {
        self.occupied() as u64 * self.expert_bytes
    }

    /// Bytes every slot full would hold.
    pub fn capacity_bytes(&self) -> u64 {
        self.slots() as u64 * self.expert_bytes
    }

    /// Slots holding a resident or loading expert.
    pub fn occupied(&self) -> usize {
        self.table.slots() - self.table.free_slots()
    }

    /// The slot table (read only).
    pub fn table(&self) -> &SlotTable {
        &self.table
    }

    /// Where `key` is.
    pub fn state(&self, key: ExpertKey) -> Option<State> {
        self.index(key).ok().map(|i| self.entries[i].state)
    }

    /// Pins held on `key` by computations.
    pub fn pins(&self, key: ExpertKey) -> u32 {
        self.index(key).map_or(0, |i| self.entries[i].pins)
    }

    /// Whether `key` is used by the running layer (never a victim).
    pub fn in_use(&self, key: ExpertKey) -> bool {
        self.index(key).is_ok_and(|i| self.entries[i].active)
    }

    /// Demand loads queued and not yet issued.
    pub fn demand_queued(&self) -> usize {
        self.demand_q.len()
    }

    /// Whether any load is queued, waiting to be polled or being moved.
    pub fn busy(&self) -> bool {
        !self.demand_q.is_empty()
            || !self.prefetch_q.is_empty()
            || !self.pending.is_empty()
            || self.entries.iter().any(|e| matches!(e.state, State::Loading(_) | State::Evicting(_)))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            layers: self.stats.clone(),
            slots: self.table.slots(),
            resident: self.entries.iter().filter(|e| matches!(e.state, State::Resident(_))).count(),
            load_failures: self.load_failures,
            by_distance: self.by_distance.iter().map(|l| l.iter().map(|d| (d.predicted, d.right)).collect()).collect(),
        }
    }

    /// The counters, per MoE layer.
    pub fn stats_per_layer(&self) -> &[LayerStats] {
        &self.stats
    }

    /// The counters of one layer.
    pub fn layer_stats(&self, layer: MoeLayerId) -> Option<&LayerStats> {
        self.stats.get(layer.index())
    }

    /// Loads that failed so far.
    pub fn load_failures(&self) -> u64 {
        self.load_failures
    }

    /// Adds time a computation waited for `layer`'s experts.
    pub fn add_stall(&mut self, layer: MoeLayerId, ns: u64) {
        if let Some(s) = self.stats.get_mut(layer.index()) {
            s.stall_ns += ns;
        }
    }

    fn index(&self, key: ExpertKey) -> Result<usize, ResidencyError> {
        if key.layer.index() < self.layers && key.expert.index() < self.experts {
            Ok(key.flat(self.experts))
        } else {
            Err(ResidencyError::NoSuchExpert(key))
        }
    }

    fn key(&self, idx: usize) -> ExpertKey {
        ExpertKey::from_flat(idx, self.experts)
    }

    fn clear_active(&mut self) {
        for idx in std::mem::take(&mut self.active) {
            self.entries[idx].active = false;
        }
    }

    /// A step begins over `tokens` (batch order): the running layer's
    /// experts are released and the predictor forecasts the first layers.
    pub fn begin_step(&mut self, tokens: &[StepToken]) {
        self.clear_active();
        self.between_steps = true;
        if let Some(p) = self.predictor.as_mut() {
            p.begin_step(tokens, &mut self.scratch);
            self.apply_forecasts();
        }
    }

    /// A sequence ended.
    pub fn end_sequence(&mut self, seq: SeqId) {
        if let Some(p) = self.predictor.as_mut() {
            p.end_sequence(seq);
        }
    }

    /// Look-ahead gating: while MoE layer `from` runs, `layer`'s router chose `ids`.
    pub fn gating(&mut self, from: MoeLayerId, layer: MoeLayerId, ids: &[ExpertId]) {
        if let Some(p) = self.predictor.as_mut() {
            p.gating(from, layer, ids, &mut self.scratch);
            self.apply_forecasts();
        }
    }

    /// MoE layer `layer` is about to run with `routing` (per token) over the
    /// distinct experts `used`: counts hits and misses, marks them as the
    /// running layer's (never victims until the next layer or step), queues
    /// demand loads for the missing ones and feeds the predictor.
    pub fn prepare(
        &mut self,
        layer: MoeLayerId,
        routing: &LayerRouting,
        used: &[ExpertId],
    ) -> Result<(), ResidencyError> {
        let moe = layer.index();
        let ne = self.experts;
        for &id in used.iter().chain(&routing.ids) {
            self.index(ExpertKey { layer, expert: id })?;
        }
        self.clear_active();
        self.cur_layer = moe;
        self.between_steps = false;
        self.clock += 1;
        self.layer_steps[moe] += 1;
        self.score_forecast(moe, routing);
        // this layer's forecasts are consumed: experts predicted but not used
        // keep no demand (and go first under the predictive policy)
        self.drop_prefetches_of(moe);
        for e in 0..ne {
            self.entries[moe * ne + e].demand = 0.0;
        }
        for id in &routing.ids {
            self.entries[moe * ne + id.index()].uses += 1;
        }
        let (mut hits, mut misses) = (0u64, 0u64);
        for id in used {
            let idx = moe * ne + id.index();
            self.active.push(idx);
            let clock = self.clock;
            let e = &mut self.entries[idx];
            e.active = true;
            e.steps_used += 1;
            e.last_use = clock;
            match e.state {
                State::Resident(_) => {
                    hits += 1;
                    if e.unused_prefetch {
                        e.unused_prefetch = false;
                        self.stats[moe].prefetch_used += 1;
                    }
                }
                State::Loading(_) => {
                    misses += 1;
                    self.stats[moe].late += 1;
                }
                State::Home | State::Evicting(_) => {
                    misses += 1;
                    self.enqueue_demand(idx);
                }
            }
        }
        self.stats[moe].hits += hits;
        self.stats[moe].misses += misses;
        if let Some(p) = self.predictor.as_mut() {
            p.observe(layer, &routing.ids, &mut self.scratch);
            self.apply_forecasts();
        }
        Ok(())
    }

    /// Pins `key` for a computation if it is resident. `waited`: the caller
    /// already waited for it once (then a failed load is reported instead of
    /// being retried).
    pub fn pin(&mut self, key: ExpertKey, waited: bool) -> Result<Pin, ResidencyError> {
        let idx = self.index(key)?;
        let e = &mut self.entries[idx];
        Ok(match e.state {
            State::Resident(slot) => {
                e.pins += 1;
                Pin::Ready(slot)
            }
            State::Loading(_) => Pin::Wait,
            State::Home | State::Evicting(_) => {
                if let (Some(err), true) = (&e.error, waited) {
                    return Ok(Pin::Failed(err.clone()));
                }
                self.enqueue_demand(idx);
                Pin::Wait
            }
        })
    }

    /// Releases one pin of `key`; true when it has no pins left.
    pub fn unpin(&mut self, key: ExpertKey) -> Result<bool, ResidencyError> {
        let idx = self.index(key)?;
        let e = &mut self.entries[idx];
        e.pins = e.pins.saturating_sub(1);
        Ok(e.pins == 0)
    }

    /// The next command for the mover, if any: commands already issued
    /// first, then a demand load, then the most urgent prefetch the policy
    /// admits. `None` when nothing is queued or no slot can be freed now
    /// (every slot pinned or in use by the running layer). With
    /// `prefetch_ok` false only demand loads are issued (a mover keeping
    /// capacity for them); commands already issued are returned either way.
    pub fn poll(&mut self, prefetch_ok: bool) -> Option<Command> {
        if self.pending.is_empty() {
            self.issue(prefetch_ok);
        }
        self.pending.pop_front()
    }

    fn issue(&mut self, prefetch_ok: bool) {
        while let Some(&idx) = self.demand_q.front() {
            match self.entries[idx].state {
                State::Home => {}
                State::Evicting(_) => return, // wait for the mover to let it go
                State::Loading(_) | State::Resident(_) => {
                    self.demand_q.pop_front();
                    self.entries[idx].queued = Queued::No;
                    continue;
                }
            }
            let Some(slot) = self.reserve(None) else { return };
            self.demand_q.pop_front();
            self.start_load(idx, slot, false);
            return;
        }
        if !prefetch_ok {
            return;
        }
        loop {
            let best = self.prefetch_q.iter().enumerate().min_by(|(_, &a), (_, &b)| {
                let key = |i: usize| (self.distance(i / self.experts), -self.entries[i].demand, i);
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(ka.2.cmp(&kb.2))
            });
            let Some((pos, &idx)) = best else { return };
            self.prefetch_q.swap_remove(pos);
            self.entries[idx].queued = Queued::No;
            if self.entries[idx].state != State::Home || self.entries[idx].demand <= 0.0 {
                continue;
            }
            if let Some(slot) = self.reserve(Some(self.value(idx))) {
                self.stats[idx / self.experts].prefetch_issued += 1;
                self.start_load(idx, slot, true);
                return;
            }
        }
    }

    fn start_load(&mut self, idx: usize, slot: SlotId, prefetch: bool) {
        let key = self.key(idx);
        let e = &mut self.entries[idx];
        e.queued = Queued::No;
        e.state = State::Loading(slot);
        // the slot was free in the table (reserve freed or found it)
        self.table.place(key, slot).expect("reserve hands out a free slot");
        self.pending.push_back(Command::Load { key, slot, prefetch });
    }

    /// Finds a free slot or evicts a victim for one; a prefetch (with its
    /// predicted value) only evicts what the policy admits.
    fn reserve(&mut self, prefetch_value: Option<f64>) -> Option<SlotId> {
        if let Some(slot) = self.table.first_free() {
            return Some(slot);
        }
        let predictive = self.policy == PolicyKind::Predictive;
        let candidates = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.state, State::Resident(_)) && e.pins == 0 && !e.active)
            .map(|(slot, e)| Candidate {
                slot,
                last_use: e.last_use,
                uses: e.uses,
                value: if predictive { self.value(slot) } else { 0.0 },
                unused_prefetch: e.unused_prefetch,
            });
        let victim = self.policy.victim(candidates)?;
        if let Some(d) = prefetch_value {
            if !self.policy.admits_prefetch(d, &victim) {
                return None;
            }
        }
        let idx = victim.slot;
        let key = self.key(idx);
        let layer = idx / self.experts;
        let slot = self.table.evict(key).expect("a resident expert holds a slot");
        let v = &mut self.entries[idx];
        v.state = State::Evicting(slot);
        if v.unused_prefetch {
            v.unused_prefetch = false;
            self.stats[layer].prefetch_wasted += 1;
        }
        self.pending.push_back(Command::Evict { key, slot });
        Some(slot)
    }

    /// The mover let go of an evicted expert's bytes.
    pub fn evicted(&mut self, key: ExpertKey) -> Result<(), ResidencyError> {
        let idx = self.index(key)?;
        let e = &mut self.entries[idx];
        match e.state {
            State::Evicting(_) => {
                e.state = State::Home;
                Ok(())
            }
            state => Err(ResidencyError::UnexpectedReport { key, report: "evicted", state }),
        }
    }

    /// The mover finished (or failed) a load of `key`.
    pub fn loaded(&mut self, key: ExpertKey, prefetch: bool, result: Result<(), String>) -> Result<(), ResidencyError> {
        let idx = self.index(key)?;
        let State::Loading(slot) = self.entries[idx].state else {
            return Err(ResidencyError::UnexpectedReport { key, report: "loaded", state: self.entries[idx].state });
        };
        let layer = idx / self.experts;
        self.clock += 1;
        let clock = self.clock;
        let e = &mut self.entries[idx];
        match result {
            Ok(()) => {
                e.state = State::Resident(slot);
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
                s.bytes_loaded += self.expert_bytes;
            }
            Err(err) => {
                e.state = State::Home;
                e.error = Some(err);
                self.table.evict(key).expect("a loading expert holds a slot");
                self.load_failures += 1;
            }
        }
        Ok(())
    }

    fn enqueue_demand(&mut self, idx: usize) {
        let e = &mut self.entries[idx];
        if e.queued == Queued::Demand {
            return;
        }
        if e.queued == Queued::Prefetch {
            self.prefetch_q.retain(|&i| i != idx);
        }
        let e = &mut self.entries[idx];
        e.queued = Queued::Demand;
        e.error = None;
        self.demand_q.push_back(idx);
    }

    /// Drops the queued prefetches of MoE layer `layer`.
    pub(super) fn drop_prefetches_of(&mut self, layer: usize) {
        let ne = self.experts;
        let entries = &mut self.entries;
        self.prefetch_q.retain(|&i| {
            let keep = i / ne != layer;
            if !keep {
                entries[i].queued = Queued::No;
            }
            keep
        });
    }

    /// Queues a prefetch of `idx` if it is home and not queued.
    pub(super) fn queue_prefetch(&mut self, idx: usize) {
        let en = &mut self.entries[idx];
        if en.state == State::Home && en.queued == Queued::No {
            en.queued = Queued::Prefetch;
            self.prefetch_q.push(idx);
        }
    }

    /// For each token that may run next, the experts it is forecast to use
    /// at each MoE layer (`None`: no forecast), for regrouping.
    pub fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        let (k, n) = (self.top_k, self.layers);
        tokens
            .iter()
            .map(|&t| {
                let ids = self.predictor.as_ref()?.path(t)?;
                let sets = (0..n)
                    .map(|j| {
                        ids.get(j * k..(j + 1) * k).unwrap_or(&[]).iter().copied().filter(|&e| e != NO_EXPERT).collect()
                    })
                    .collect();
                Some(sets)
            })
            .collect()
    }

    /// Resident or loading experts, per MoE layer.
    pub fn resident_sets(&self) -> Vec<ExpertSet> {
        let mut sets = vec![ExpertSet::new(); self.layers];
        for (i, e) in self.entries.iter().enumerate() {
            if matches!(e.state, State::Resident(_) | State::Loading(_)) {
                sets[i / self.experts].insert(ExpertId((i % self.experts) as u16));
            }
        }
        sets
    }

    /// Checks every invariant; `Err` names the first one broken.
    pub fn check(&self) -> Result<(), String> {
        self.table.check()?;
        let mut held = 0;
        for (i, e) in self.entries.iter().enumerate() {
            let key = self.key(i);
            match e.state {
                State::Loading(s) | State::Resident(s) => {
                    held += 1;
                    if self.table.slot_of(key) != Some(s) {
                        return Err(format!("{key} is {:?} but the table says {:?}", e.state, self.table.slot_of(key)));
                    }
                }
                State::Home | State::Evicting(_) => {
                    if self.table.slot_of(key).is_some() {
                        return Err(format!("{key} is {:?} but holds a slot", e.state));
                    }
                    if e.pins > 0 {
                        return Err(format!("{key} is {:?} with {} pins", e.state, e.pins));
                    }
                }
            }
        }
        if held > self.table.slots() {
            return Err(format!("{held} experts hold slots, more than the {}", self.table.slots()));
        }
        Ok(())
    }
}
