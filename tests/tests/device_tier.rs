//! The GPU backend's whole stack on host memory: the device forward pass
//! (`moe_model::device`) over a `DeviceTier` (the residency core and device
//! mover the GPU tier uses) whose slot device holds experts in host memory,
//! in the backend type the GPU uses (`moe_offload::DeviceBackend`; the CUDA
//! one is `moe_offload::gpu::GpuBackend`). Only the CUDA operations, the
//! pinned-memory copies and `GpuExperts`' staging differ on a GPU. Greedy
//! tokens of concurrent sequences must equal the CPU engine's at every
//! budget, policy and predictor, and no pin may be left behind.

use moe_engine::EngineCore;
use moe_model::device::host::HostDevice;
use moe_model::device::{DeviceExperts, DeviceModel};
use moe_model::{load_model, ExpertPlanner, ExpertWeights, Model, ResidentExperts, StepToken};
use moe_offload::residency::{DeviceTier, ResidencyConfig, ResidencyCore, SlotDevice};
use moe_offload::{DeviceBackend, PolicyKind, PredictorKind};
use moe_scheduler::SchedulerConfig;
use moe_types::{ExpertId, ExpertKey, ExpertSet, LayerId, LayerRouting, MoeLayerId, SeqId, SlotId};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe")
}

/// Slots holding copies of experts, as device slots do; copies "finish" at
/// the next step (only the copy counters see that).
struct HostSlots {
    /// `[moe layer][expert]`: the pinned tier's analogue.
    all: Vec<Vec<ExpertWeights>>,
    slots: Vec<Option<(ExpertKey, ExpertWeights)>>,
    copying: Vec<ExpertKey>,
}

impl SlotDevice for HostSlots {
    type Error = String;

    fn load_into(&mut self, key: ExpertKey, slot: SlotId) -> Result<(), String> {
        let s = &mut self.slots[slot.index()];
        if let Some((old, _)) = s {
            return Err(format!("load of {key} into a slot holding {old}"));
        }
        *s = Some((key, self.all[key.layer.index()][key.expert.index()].clone()));
        self.copying.push(key);
        Ok(())
    }

    fn evict(&mut self, key: ExpertKey) -> Result<SlotId, String> {
        let i = self.slots.iter().position(|s| s.as_ref().is_some_and(|(k, _)| *k == key)).ok_or("not resident")?;
        self.slots[i] = None;
        Ok(SlotId(i as u32))
    }

    fn is_ready(&self, key: ExpertKey) -> Result<bool, String> {
        Ok(!self.copying.contains(&key))
    }
}

/// The GPU tier (`GpuExperts`) with host slots: the planner asks through
/// `&self`, so the tier sits in a `RefCell` (the GPU's in a mutex).
struct HostTier {
    tier: RefCell<DeviceTier<HostSlots>>,
    lookahead: usize,
    wants_hidden: bool,
}

impl DeviceExperts<HostDevice> for HostTier {
    fn lookahead(&self) -> usize {
        self.lookahead
    }

    fn forecast(&mut self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        self.tier.get_mut().forecast(from, layer, ids);
    }

    fn wants_hidden(&self) -> bool {
        self.wants_hidden
    }

    fn hidden(&mut self, layer: LayerId, h: &[f32]) {
        self.tier.get_mut().hidden(layer, h);
    }

    fn prepare(&mut self, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        self.tier.get_mut().prepare(routing, used)
    }

    fn expert(&mut self, layer: LayerId, expert: ExpertId) -> moe_model::Result<&ExpertWeights> {
        let tier = self.tier.get_mut();
        let key = tier.key(layer, expert)?;
        let slot = tier.core().table().slot_of(key).expect("a prepared expert has a slot");
        let (k, w) = tier.device().slots[slot.index()].as_ref().expect("its slot is filled");
        assert_eq!(*k, key, "the slot holds another expert");
        Ok(w)
    }

    fn release(&mut self, layer: LayerId, used: &[ExpertId]) -> moe_model::Result<()> {
        self.tier.get_mut().release(layer, used)
    }
}

impl ExpertPlanner for HostTier {
    fn begin_step(&self, tokens: &[StepToken]) {
        let mut t = self.tier.borrow_mut();
        t.device_mut().copying.clear();
        t.begin_step(tokens);
    }

    fn end_sequence(&self, seq: SeqId) {
        self.tier.borrow_mut().end_sequence(seq);
    }

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        self.tier.borrow().predict_paths(tokens)
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        self.tier.borrow().resident_sets()
    }
}

/// `GpuBackend` with the host device in place of the GPU: the same type.
type HostBackend = DeviceBackend<HostDevice, HostTier>;

fn backend(
    model: &Model,
    experts: &[Vec<ExpertWeights>],
    slots: usize,
    policy: PolicyKind,
    predictor: PredictorKind,
) -> HostBackend {
    let cfg = model.config();
    let moe_layers: Vec<usize> = cfg.moe_layers().collect();
    let core = ResidencyCore::new(ResidencyConfig {
        layers: moe_layers.len(),
        experts: cfg.moe.num_experts,
        top_k: cfg.moe.top_k,
        slots,
        expert_bytes: 1,
        policy,
        predictor,
        depth: 1,
        min_precision: 0.5,
    })
    .unwrap();
    let (lookahead, wants_hidden) = (core.lookahead(), core.wants_hidden());
    let all = moe_layers.iter().map(|&l| experts[l].clone()).collect();
    let dev = HostSlots { all, slots: vec![None; slots], copying: Vec::new() };
    let mut tier = DeviceTier::new(core, dev, cfg.num_layers(), &moe_layers);
    if slots == moe_layers.len() * cfg.moe.num_experts {
        // as GpuExperts does for a tier with a slot for every expert
        tier.load_all(moe_layers.len(), cfg.moe.num_experts).unwrap();
    }
    let model = DeviceModel::new(HostDevice, model, 64, 16).unwrap();
    DeviceBackend::new(model, HostTier { tier: RefCell::new(tier), lookahead, wants_hidden })
}

#[test]
fn the_gpu_stack_on_host_memory_keeps_greedy_tokens_at_every_budget() {
    let dir = model_dir();
    let loaded = load_model(&dir, &mut ()).unwrap();
    let prompts: Vec<Vec<u32>> =
        ["ROMEO:\nWhat light", "KING HENRY:\nOnce more", "First Citizen:\nWe are", "JULIET:\nO"]
            .iter()
            .map(|p| loaded.codec.encode(p, true).unwrap())
            .collect();
    let model = loaded.model;
    let experts = loaded.experts.into_weights();
    let sched = SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64 };
    let cpu = ResidentExperts::from_weights(experts.clone());
    let want = EngineCore::new(model.clone(), cpu, vec![], sched, (64, 16)).generate_greedy(&prompts, 24).unwrap();

    let total = model.config().moe_layers().count() * model.config().moe.num_experts;
    let (learned, hidden) = (dir.join("path_predictor.safetensors"), dir.join("hidden_predictor.safetensors"));
    let cases = [
        (total, PolicyKind::Lru, PredictorKind::None),
        (total / 2, PolicyKind::Lru, PredictorKind::None),
        (total / 4, PolicyKind::Predictive, PredictorKind::LookAhead),
        (total / 2, PolicyKind::Predictive, PredictorKind::PreviousToken),
        (total / 2, PolicyKind::Predictive, PredictorKind::Learned(learned.clone())),
        (total / 4, PolicyKind::Predictive, PredictorKind::Hidden(hidden.clone())),
        (
            total / 2,
            PolicyKind::Predictive,
            PredictorKind::Combined(vec![PredictorKind::Hidden(hidden), PredictorKind::Learned(learned)]),
        ),
    ];
    for (slots, policy, predictor) in cases {
        let label = format!("{slots} slots, {policy:?}, {}", predictor.name());
        let be = backend(&model, &experts, slots, policy, predictor);
        let mut core = EngineCore::new(model.clone(), be, vec![], sched, (64, 16));
        let got = core.generate_greedy(&prompts, 24).unwrap();
        assert_eq!(got, want, "{label}: greedy tokens differ from the CPU engine's");
        let tier = core.experts().experts().tier.borrow();
        let st = tier.core().stats().total();
        assert_eq!(st.misses > 0, slots < total, "{label}: {st:?}");
        let layers = model.config().moe_layers().count();
        for l in 0..layers {
            for e in 0..model.config().moe.num_experts {
                let key = ExpertKey { layer: MoeLayerId(l as u16), expert: ExpertId(e as u16) };
                assert_eq!(tier.core().pins(key), 0, "{label}: {key} still pinned");
            }
        }
        tier.core().check().unwrap();
        eprintln!("{label}: hit ratio {:.3}, copies {:?}", st.hit_ratio(), tier.copy_stats());
    }
}
