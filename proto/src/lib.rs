//! The gRPC protocol `moe.v1` (see `moe/v1/moe.proto`, every field documented
//! there): generated message types, the `Generation` server and client, and
//! the encoded descriptor set for server reflection. Generated code lives in
//! OUT_DIR; nothing here is written by hand except this file.

#![allow(clippy::all, missing_docs)]

/// Package `moe.v1`.
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// Encoded `FileDescriptorSet` of the protocol, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moe_descriptor.bin"));
