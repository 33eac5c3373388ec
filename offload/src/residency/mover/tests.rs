//! The device mover against a fake device whose copies finish only when the
//! test says so, and which refuses any load into an occupied slot (so a load
//! issued before its slot's eviction would fail the test).

use super::*;
use crate::residency::fake_device::FakeDevice;
use crate::residency::{Pin, ResidencyConfig};
use crate::{PolicyKind, PredictorKind};
use moe_model::StepToken;
use moe_types::rng::SplitMix64;
use moe_types::{ExpertId, LayerId, LayerRouting, MoeLayerId, SeqId};

fn core(layers: usize, experts: usize, slots: usize, predictor: PredictorKind) -> ResidencyCore {
    ResidencyCore::new(ResidencyConfig {
        layers,
        experts,
        top_k: 2,
        slots,
        expert_bytes: 1,
        policy: PolicyKind::Lru,
        predictor,
        depth: 1,
        min_precision: 0.0,
    })
    .unwrap()
}

/// Runs one layer the way the GPU tier does: prepare, pump, pin every used
/// expert (ready at once: loads are reported when queued), note whether each
/// copy was still running, unpin. Returns how many were still running.
fn run_layer(core: &mut ResidencyCore, mover: &mut DeviceMover<FakeDevice>, layer: u16, ids: &[u16]) -> usize {
    let used: Vec<ExpertId> = {
        let mut v: Vec<u16> = ids.to_vec();
        v.sort_unstable();
        v.dedup();
        v.into_iter().map(ExpertId).collect()
    };
    let routing = LayerRouting {
        layer: LayerId(layer),
        top_k: 2,
        ids: ids.iter().map(|&e| ExpertId(e)).collect(),
        weights: vec![0.5; ids.len()],
    };
    core.prepare(MoeLayerId(layer), &routing, &used).unwrap();
    mover.pump(core).unwrap();
    let mut waited = 0;
    for &e in &used {
        let key = ExpertKey { layer: MoeLayerId(layer), expert: e };
        assert_eq!(core.pin(key, false).unwrap(), Pin::Ready(core.table().slot_of(key).unwrap()));
        waited += usize::from(mover.needed(key).unwrap());
    }
    for &e in &used {
        core.unpin(ExpertKey { layer: MoeLayerId(layer), expert: e }).unwrap();
    }
    waited
}

#[test]
fn device_slots_always_match_the_core_and_evictions_precede_loads() {
    let (layers, experts, slots) = (3usize, 6usize, 9usize);
    for predictor in [PredictorKind::None, PredictorKind::PreviousToken] {
        let mut core = core(layers, experts, slots, predictor.clone());
        let mut mover = DeviceMover::new(FakeDevice::new(slots));
        let mut rng = SplitMix64::new(7);
        for step in 0..300 {
            core.begin_step(&[StepToken { seq: SeqId(0), token: step % 5 }]);
            mover.pump(&mut core).unwrap();
            for l in 0..layers as u16 {
                let ids: Vec<u16> = (0..4).map(|_| (rng.next_u64() % experts as u64) as u16).collect();
                run_layer(&mut core, &mut mover, l, &ids);
                // the device finishes some copies, in order
                mover.device_mut().finish((rng.next_u64() % 3) as usize);
                mover.reap().unwrap();
                for s in 0..slots {
                    assert_eq!(mover.device().slots[s], core.table().owner(SlotId(s as u32)), "{predictor:?} slot {s}");
                }
                core.check().unwrap();
            }
        }
        let st = mover.stats();
        assert!(st.loads > 0 && st.waited > 0 && st.ready > 0, "{st:?}");
        assert_eq!(st.prefetches > 0, predictor != PredictorKind::None, "{st:?}");
    }
}

#[test]
fn a_copy_the_device_refuses_is_a_failed_load_for_the_core() {
    let mut core = core(1, 4, 4, PredictorKind::None);
    let mut dev = FakeDevice::new(4);
    let bad = ExpertKey { layer: MoeLayerId(0), expert: ExpertId(2) };
    dev.refuse = Some(bad);
    let mut mover = DeviceMover::new(dev);
    let routing =
        LayerRouting { layer: LayerId(0), top_k: 2, ids: vec![ExpertId(1), ExpertId(2)], weights: vec![0.5; 2] };
    core.prepare(MoeLayerId(0), &routing, &[ExpertId(1), ExpertId(2)]).unwrap();
    mover.pump(&mut core).unwrap();
    let good = ExpertKey { layer: MoeLayerId(0), expert: ExpertId(1) };
    assert!(matches!(core.pin(good, false).unwrap(), Pin::Ready(_)));
    // the first ask re-queues it; asked again after waiting, the error comes back
    assert_eq!(core.pin(bad, false).unwrap(), Pin::Wait);
    mover.pump(&mut core).unwrap();
    match core.pin(bad, true).unwrap() {
        Pin::Failed(msg) => assert!(msg.contains("cannot copy"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(core.load_failures(), 2);
    core.check().unwrap();
}

#[test]
fn needed_tells_running_copies_from_finished_ones() {
    let mut core = core(1, 4, 4, PredictorKind::None);
    let mut mover = DeviceMover::new(FakeDevice::new(4));
    assert_eq!(run_layer(&mut core, &mut mover, 0, &[0, 1]), 2, "both copies still running");
    mover.device_mut().finish(1);
    // expert 0's copy finished, 1's still runs; 3 is new
    assert_eq!(run_layer(&mut core, &mut mover, 0, &[0, 1, 3]), 2);
    mover.device_mut().finish(10);
    mover.reap().unwrap();
    assert_eq!(mover.in_flight(), 0);
    assert_eq!(run_layer(&mut core, &mut mover, 0, &[0, 1, 3]), 0);
    assert_eq!(mover.stats(), CopyStats { loads: 3, prefetches: 0, waited: 4, ready: 4 });
}
