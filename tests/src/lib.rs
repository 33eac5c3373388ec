//! Cross-crate tests live in `tests/tests/`; this library holds what the
//! test binaries share: [`hardening`], the hardening phase of `moe-faultload`.

pub mod hardening;
