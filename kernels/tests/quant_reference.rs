//! Dequantization and Q8_0 quantization against the `gguf` Python
//! package's reference (`gguf.quants`), bit for bit. Fixtures made by
//! `scripts/gen_quant_fixtures.py`.

use moe_kernels::quant::quantize_rows;
use moe_kernels::QuantFormat;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn dequantization_is_bit_exact_against_gguf_quants() {
    for format in QuantFormat::ALL {
        let blocks = fixture(&format!("{}.blocks", format.name()));
        let want = f32s(&fixture(&format!("{}.values", format.name())));
        assert_eq!(blocks.len() / format.block_bytes() * format.block_values(), want.len(), "{format}");
        let mut got = vec![f32::NAN; want.len()];
        format.dequantize(&blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{format} value {i}: {g} vs {w}");
        }
    }
}

#[test]
fn q8_0_quantization_is_bit_exact_against_gguf_quants() {
    let x = f32s(&fixture("q8_0_input.values"));
    let want = fixture("q8_0_input.blocks");
    assert_eq!(quantize_rows(QuantFormat::Q8_0, &x, 256).unwrap(), want);
}
