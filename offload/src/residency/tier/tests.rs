//! The device tier as the GPU forward pass drives it, on a fake device:
//! what it decides must keep the device's slots equal to the core's table,
//! every expert a layer computes with in a slot, and no pin behind, also
//! when a copy fails.

use super::*;
use crate::residency::fake_device::FakeDevice;
use crate::residency::ResidencyConfig;
use crate::{PolicyKind, PredictorKind};
use moe_types::rng::SplitMix64;
use moe_types::{SeqId, SlotId};

const LAYERS: usize = 4;
/// Decoder layer 0 is dense.
const MOE_LAYERS: [usize; 3] = [1, 2, 3];
const EXPERTS: usize = 6;
const SLOTS: usize = 9;

fn tier(predictor: PredictorKind, policy: PolicyKind) -> DeviceTier<FakeDevice> {
    let core = ResidencyCore::new(ResidencyConfig {
        layers: MOE_LAYERS.len(),
        experts: EXPERTS,
        top_k: 2,
        slots: SLOTS,
        expert_bytes: 1,
        policy,
        predictor,
        depth: 1,
        min_precision: 0.0,
    })
    .unwrap();
    DeviceTier::new(core, FakeDevice::new(SLOTS), LAYERS, &MOE_LAYERS)
}

fn routing(layer: usize, ids: &[u16]) -> (LayerRouting, Vec<ExpertId>) {
    let mut used: Vec<u16> = ids.to_vec();
    used.sort_unstable();
    used.dedup();
    let r = LayerRouting {
        layer: LayerId(layer as u16),
        top_k: 2,
        ids: ids.iter().map(|&e| ExpertId(e)).collect(),
        weights: vec![0.5; ids.len()],
    };
    (r, used.into_iter().map(ExpertId).collect())
}

fn no_pins(t: &DeviceTier<FakeDevice>) -> bool {
    (0..MOE_LAYERS.len()).all(|l| {
        (0..EXPERTS).all(|e| t.core().pins(ExpertKey { layer: MoeLayerId(l as u16), expert: ExpertId(e as u16) }) == 0)
    })
}

fn consistent(t: &DeviceTier<FakeDevice>) {
    for s in 0..SLOTS {
        assert_eq!(t.device().slots[s], t.core().table().owner(SlotId(s as u32)), "slot {s}");
    }
    t.core().check().unwrap();
}

#[test]
fn steps_keep_the_device_equal_to_the_core_and_leave_no_pin() {
    for (predictor, policy) in [
        (PredictorKind::None, PolicyKind::Lru),
        (PredictorKind::PreviousToken, PolicyKind::Predictive),
        (PredictorKind::LookAhead, PolicyKind::Predictive),
    ] {
        let mut t = tier(predictor.clone(), policy);
        let mut rng = SplitMix64::new(11);
        for step in 0..200u32 {
            // two sequences decoding side by side
            let tokens = [StepToken { seq: SeqId(0), token: step % 7 }, StepToken { seq: SeqId(1), token: step % 3 }];
            t.begin_step(&tokens);
            for (i, &l) in MOE_LAYERS.iter().enumerate() {
                let ids: Vec<u16> = (0..4).map(|_| (rng.next_u64() % EXPERTS as u64) as u16).collect();
                let (r, used) = routing(l, &ids);
                t.prepare(&r, &used).unwrap();
                for &e in &used {
                    let key = t.key(LayerId(l as u16), e).unwrap();
                    assert!(t.device().slots.contains(&Some(key)), "{predictor:?}: {key} computed without a slot");
                }
                if let Some(&next) = MOE_LAYERS.get(i + 1) {
                    let ahead: Vec<ExpertId> =
                        (0..4).map(|_| ExpertId((rng.next_u64() % EXPERTS as u64) as u16)).collect();
                    t.forecast(LayerId(l as u16), LayerId(next as u16), &ahead);
                }
                t.device_mut().finish((rng.next_u64() % 3) as usize);
                t.release(LayerId(l as u16), &used).unwrap();
                consistent(&t);
            }
            assert!(no_pins(&t), "{predictor:?}: a pin was left behind");
        }
        let c = t.copy_stats();
        assert!(c.loads > 0 && c.ready + c.waited > 0, "{predictor:?}: {c:?}");
        assert_eq!(c.prefetches > 0, predictor != PredictorKind::None, "{predictor:?}: {c:?}");
    }
}

#[test]
fn a_failed_copy_is_the_layers_error_and_releases_its_pins() {
    let mut t = tier(PredictorKind::None, PolicyKind::Lru);
    let bad = ExpertKey { layer: MoeLayerId(1), expert: ExpertId(4) };
    t.device_mut().refuse = Some(bad);
    let (r, used) = routing(2, &[0, 4, 1, 0]);
    match t.prepare(&r, &used) {
        Err(ModelError::ExpertUnavailable { layer: 2, expert: 4, message }) => {
            assert!(message.contains("cannot copy"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(no_pins(&t), "the experts pinned before the failure were not released");
    consistent(&t);
    // the next try succeeds once the device copies it again
    t.device_mut().refuse = None;
    t.prepare(&r, &used).unwrap();
    t.release(LayerId(2), &used).unwrap();
    assert!(no_pins(&t));
}

#[test]
fn a_full_tier_loads_every_expert_and_dense_layers_have_none() {
    let core = ResidencyCore::new(ResidencyConfig {
        layers: MOE_LAYERS.len(),
        experts: EXPERTS,
        top_k: 2,
        slots: MOE_LAYERS.len() * EXPERTS,
        expert_bytes: 1,
        policy: PolicyKind::Lru,
        predictor: PredictorKind::None,
        depth: 1,
        min_precision: 0.0,
    })
    .unwrap();
    let mut t = DeviceTier::new(core, FakeDevice::new(MOE_LAYERS.len() * EXPERTS), LAYERS, &MOE_LAYERS);
    t.load_all(MOE_LAYERS.len(), EXPERTS).unwrap();
    assert!(t.device().slots.iter().all(Option::is_some));
    assert_eq!(t.copy_stats().loads, (MOE_LAYERS.len() * EXPERTS) as u64);
    assert!(no_pins(&t));
    assert!(matches!(t.moe(LayerId(0)), Err(ModelError::Input(_))));
    let (r, used) = routing(3, &[5, 2]);
    t.prepare(&r, &used).unwrap();
    assert_eq!(t.core().stats().total().misses, 0);
}
