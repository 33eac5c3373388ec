//! Reading expert bytes from disk so that the expert budget is the only copy
//! in memory: `O_DIRECT` reads through an aligned bounce buffer (the page
//! cache is bypassed), or ordinary reads followed by
//! `posix_fadvise(DONTNEED)` on the range read (the page cache copy is
//! released). `Cached` keeps the page cache copy (for measurement only).

use crate::OffloadError;
use rustix::fs::{fadvise, Advice, OFlags};
use std::fs::File;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;

/// Alignment of `O_DIRECT` offsets, lengths and buffers (covers 512-byte
/// and 4 KiB logical blocks), and of the ranges released from the page cache.
const ALIGN: u64 = 4096;

/// How expert reads treat the kernel's page cache (`--disk-io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DiskIo {
    /// `O_DIRECT`: bypass the page cache (falls back to `Release` on a file
    /// system that refuses it, such as tmpfs).
    Direct,
    /// Read, then drop the range from the page cache (`posix_fadvise(DONTNEED)`).
    Release,
    /// Read through the page cache and leave the copy there.
    Cached,
}

impl DiskIo {
    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Release => "release",
            Self::Cached => "cached",
        }
    }

    /// Opens `path` for expert reads in this mode. `Release` turns the
    /// descriptor's read-ahead off: pages read ahead of a range would arrive
    /// after the range was released, and stay.
    pub(crate) fn open(self, path: &Path) -> std::io::Result<File> {
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        if self == Self::Direct {
            opts.custom_flags(OFlags::DIRECT.bits() as i32);
        }
        let file = opts.open(path)?;
        if self == Self::Release {
            fadvise(&file, 0, None, Advice::Random)?;
        }
        Ok(file)
    }

    /// The mode that works for `path`: `Direct` becomes `Release` where the
    /// file system refuses `O_DIRECT` (logged once, here).
    pub(crate) fn usable_for(self, path: &Path) -> Result<Self, OffloadError> {
        if self != Self::Direct {
            return Ok(self);
        }
        match self.open(path) {
            Ok(_) => Ok(self),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                tracing::warn!(path = %path.display(), "O_DIRECT refused by the file system: using --disk-io release");
                Ok(Self::Release)
            }
            Err(e) => Err(OffloadError::Config(format!("cannot open {}: {e}", path.display()))),
        }
    }

    /// Drops every clean page of `path` from the page cache (except in
    /// `Cached` mode): what indexing the file and loading the non-expert
    /// weights read through it is not kept twice. Pages mapped by a process
    /// stay.
    pub(crate) fn release_file(self, path: &Path) -> std::io::Result<()> {
        if self == Self::Cached {
            return Ok(());
        }
        let file = File::open(path)?;
        fadvise(&file, 0, None, Advice::DontNeed)?;
        Ok(())
    }

    /// Fills `dst` with the file's bytes from `offset`, leaving no page-cache
    /// copy unless the mode is `Cached`. `file` was opened by [`Self::open`].
    pub(crate) fn read_into(self, file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        match self {
            Self::Cached => file.read_exact_at(dst, offset),
            Self::Release => {
                file.read_exact_at(dst, offset)?;
                let (start, end) = aligned(offset, dst.len());
                // whole pages around the range: the neighbours' bytes are
                // other experts', not needed in the page cache either
                if let Some(len) = NonZeroU64::new(end - start) {
                    fadvise(file, start, Some(len), Advice::DontNeed)?;
                }
                Ok(())
            }
            Self::Direct => read_direct(file, offset, dst),
        }
    }
}

/// The whole `ALIGN` blocks covering `len` bytes at `offset`: `(start, end)`.
fn aligned(offset: u64, len: usize) -> (u64, u64) {
    (offset / ALIGN * ALIGN, (offset + len as u64).div_ceil(ALIGN) * ALIGN)
}

/// An `O_DIRECT` read of `dst.len()` bytes at `offset` through an aligned
/// bounce buffer (the file's end may fall inside the last block).
fn read_direct(file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let (start, end) = aligned(offset, dst.len());
    let span = (end - start) as usize;
    let mut bounce = vec![0u8; span + ALIGN as usize];
    let pad = bounce.as_ptr().align_offset(ALIGN as usize);
    let buf = &mut bounce[pad..pad + span];
    let need = (offset - start) as usize + dst.len();
    let mut got = 0;
    while got < need {
        match file.read_at(&mut buf[got..], start + got as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            // a short read at the file's end is not block-aligned: it ends the loop
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if got % ALIGN as usize != 0 && got < need {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let at = (offset - start) as usize;
    dst.copy_from_slice(&buf[at..at + dst.len()]);
    Ok(())
}

impl FromStr for DiskIo {
    type Err = OffloadError;

    fn from_str(s: &str) -> Result<Self, OffloadError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(Self::Direct),
            "release" => Ok(Self::Release),
            "cached" => Ok(Self::Cached),
            _ => Err(OffloadError::Config(format!("unknown disk io mode {s:?}: expected direct, release or cached"))),
        }
    }
}

moe_types::setting_from_str!(named DiskIo);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn every_mode_reads_the_same_bytes_at_unaligned_offsets_and_the_file_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.bin");
        let data: Vec<u8> = (0..3 * ALIGN as usize + 123).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::File::create(&path).and_then(|mut f| f.write_all(&data)).expect("write");
        for mode in [DiskIo::Direct, DiskIo::Release, DiskIo::Cached] {
            let mode = mode.usable_for(&path).expect("usable");
            let file = mode.open(&path).expect("open");
            for (off, len) in [(0usize, 10usize), (7, 4096), (4095, 2), (5000, data.len() - 5000), (0, data.len())] {
                let mut got = vec![0u8; len];
                mode.read_into(&file, off as u64, &mut got).expect("read");
                assert_eq!(got, data[off..off + len], "{mode} at {off}+{len}");
            }
            let mut past = vec![0u8; 200];
            assert!(mode.read_into(&file, data.len() as u64 - 100, &mut past).is_err(), "{mode}: past the end");
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [DiskIo::Direct, DiskIo::Release, DiskIo::Cached] {
            assert_eq!(m.name().parse::<DiskIo>().expect("parse"), m);
        }
        let err = "mmap".parse::<DiskIo>().expect_err("unknown");
        assert!(err.to_string().contains("direct, release or cached"), "{err}");
    }
}
