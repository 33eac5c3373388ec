//! The machine's memory as procfs tells it: what a new allocation can use
//! (`MemAvailable`) and this process's resident set. `None` where procfs is
//! absent (the checks that use them are then skipped).

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's resident set size (`/proc/self/statm`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Bytes as GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses to hold `bytes` more in memory when the machine does not have
/// them available now: `what` names the holder and `fix` says what to do.
pub fn check_fits(bytes: u64, what: &str, fix: &str) -> anyhow::Result<()> {
    if let Some(avail) = available_bytes() {
        anyhow::ensure!(
            bytes <= avail,
            "{what} need {}, more than the {} of memory available now (MemAvailable): {fix}",
            gib(bytes),
            gib(avail)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfs_figures_are_read_where_procfs_exists() {
        if !std::path::Path::new("/proc/self/statm").exists() {
            moe_types::testing::skip("memory::procfs_figures", "no procfs");
            return;
        }
        let rss = rss_bytes().expect("rss");
        assert!(rss > 1 << 20, "{rss}");
        let avail = available_bytes().expect("MemAvailable");
        assert!(avail > 0);
        let err = check_fits(u64::MAX / 2, "the experts", "pass a smaller --expert-cache").expect_err("too much");
        assert!(err.to_string().contains("pass a smaller --expert-cache"), "{err}");
        check_fits(1, "one byte", "").expect("fits");
    }
}
