//! What REST and gRPC share: request validation and limits ([`params`]),
//! the generation driver over the engine ([`generation`]), text assembly with
//! stop strings ([`text`]) and the one error type with its mappings to HTTP
//! and gRPC ([`error`]).

pub mod auth;
pub mod error;
pub mod generation;
pub mod harmony;
pub mod params;
pub mod state;
pub mod text;
