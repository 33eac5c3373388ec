//! Placement-plan files (moe-place's JSON, format v1) as `moe-serve --placement`
//! reads them: `PlacementPlan::read` and the model check must reject malformed
//! input with an error, never panic; an accepted plan that fits a model must
//! round-trip through the writer and pass the same checks again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_types::placement::PlacementPlan;

fuzz_target!(|data: &[u8]| {
    let Ok(plan) = PlacementPlan::read(data) else { return };
    // the shape the server checks against: the plan's own, and a fixed model
    let _ = plan.validate(4, 8);
    let _ = plan.check_memory(16);
    let _ = plan.experts_per_gpu();
    if plan.validate(plan.moe_layers.len(), plan.num_experts).is_ok() {
        let mut out = Vec::new();
        plan.write(&mut out).expect("a valid plan writes");
        let back = PlacementPlan::read(&out[..]).expect("a written plan reads back");
        assert_eq!(back, plan);
        assert!(back.validate(back.moe_layers.len(), back.num_experts).is_ok());
    }
});
