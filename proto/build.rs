//! Compiles `moe/v1/moe.proto` with protox (pure Rust, no protoc) into
//! OUT_DIR, and writes the descriptor set for server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=moe/v1/moe.proto");
    let fds = protox::compile(["moe/v1/moe.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("moe_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
