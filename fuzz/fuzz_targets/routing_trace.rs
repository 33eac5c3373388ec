//! Routing-trace files (format v1, JSON Lines) as `moe-place` and other
//! offline tools read them: `read_trace` must reject malformed input with an
//! error, never panic, and an accepted trace must round-trip through the writer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_types::trace::{read_trace, write_header, write_token};

fuzz_target!(|data: &[u8]| {
    let Ok((header, tokens)) = read_trace(data) else { return };
    let mut out = Vec::new();
    write_header(&mut out, &header).unwrap();
    for t in &tokens {
        write_token(&mut out, t).unwrap();
    }
    let (h2, t2) = read_trace(&out[..]).expect("a written trace reads back");
    assert_eq!(h2, header);
    assert_eq!(t2, tokens);
});
