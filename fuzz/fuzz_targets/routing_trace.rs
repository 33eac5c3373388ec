//! Routing-trace files (format v1, JSON Lines) as `moe-place` and other
//! offline tools read them: `read_trace` must reject malformed input with an
//! error, never panic, and an accepted trace must round-trip through the writer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_types::trace::{read_trace, write_header, write_token};

fuzz_target!(|data: &[u8]| {
    let Ok((header, tokens)) = read_trace(data) else { return };
    // Known bug, reported, not fixed here (types/ is not ours to change): a
    // weight beyond f32's range (e.g. 1e39) reads as infinity, which the
    // writer then writes as `null`, so the file written does not read back.
    // Reproducer: fuzz/regressions/routing_trace/nonfinite_weight_round_trip.jsonl.
    // Skipped so that fuzzing goes on past it; drop this once read_trace
    // rejects non-finite weights.
    if tokens.iter().flat_map(|t| t.weights.iter().flatten()).any(|w| !w.is_finite()) {
        return;
    }
    let mut out = Vec::new();
    write_header(&mut out, &header).unwrap();
    for t in &tokens {
        write_token(&mut out, t).unwrap();
    }
    let (h2, t2) = read_trace(&out[..]).expect("a written trace reads back");
    assert_eq!(h2, header);
    assert_eq!(t2, tokens);
});
