//! Test support: a check that cannot run on this machine (no GPU, no
//! AVX-512, a file system that keeps pages) says why, and, where the test
//! command set `MOE_SKIPPED_TESTS` to a file, records the reason there, so
//! `scripts/test.sh` counts and lists every skip after the run (Rust's
//! harness has no run-time skip, and passing tests' output is hidden).

/// Reports that `check` did not run, and why.
pub fn skip(check: &str, reason: &str) {
    eprintln!("skipped: {check}: {reason}");
    if let Ok(path) = std::env::var("MOE_SKIPPED_TESTS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{check}: {reason}");
        }
    }
}
