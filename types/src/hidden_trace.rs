//! The hidden-state trace format, version 1: a binary companion of a
//! routing trace ([`crate::trace`]) holding, for every token of it, the
//! residual stream entering each MoE layer (before that layer's attention)
//! and each MoE layer's router scores (logits, plus the router's bias if it
//! has one: what the top-k selection reads).
//! `moe-serve trace --hidden-states FILE` writes it; the hidden-state
//! predictor's trainer reads it.
//!
//! Layout:
//! - line 1, a JSON header ([`HiddenHeader`]) ended by `\n`:
//!   `{"format":"moe-hidden-trace","version":1,"hidden_size":128,"moe_layers":4,"experts":8,"dtype":"f16"}`
//! - then one record per token, in the routing trace's token order: `seq`
//!   (u64), `pos` (u32), `moe_layers * hidden_size` IEEE half floats (the
//!   hidden states, MoE layer by layer), then `moe_layers * experts` f32 (the
//!   router scores, MoE layer by layer); all little-endian.
//!
//! Size: `12 + 2 * moe_layers * hidden_size + 4 * moe_layers * experts` bytes
//! per token (the built-in model: 1,164; a 48-layer model of width 4096 with
//! 128 experts: 418 KB), so bound the trace with `--max-windows`. Readers reject another `format` or a `version` they
//! do not know.

use crate::trace::TraceError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// The `format` value of every hidden-state trace.
pub const HIDDEN_FORMAT: &str = "moe-hidden-trace";
/// The version this crate writes and reads.
pub const HIDDEN_VERSION: u32 = 1;

/// The header line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HiddenHeader {
    /// [`HIDDEN_FORMAT`].
    pub format: String,
    /// [`HIDDEN_VERSION`] when written by this crate.
    pub version: u32,
    /// Values per hidden state.
    pub hidden_size: usize,
    /// MoE layers per record.
    pub moe_layers: usize,
    /// Experts per MoE layer (router scores per layer).
    pub experts: usize,
    /// Element type of the hidden states: `"f16"`.
    pub dtype: String,
}

impl HiddenHeader {
    /// The header of this version for `moe_layers` layers of `hidden_size`
    /// values and `experts` experts.
    pub fn new(hidden_size: usize, moe_layers: usize, experts: usize) -> Self {
        Self {
            format: HIDDEN_FORMAT.into(),
            version: HIDDEN_VERSION,
            hidden_size,
            moe_layers,
            experts,
            dtype: "f16".into(),
        }
    }

    /// Hidden-state values per record.
    pub fn values(&self) -> usize {
        self.hidden_size * self.moe_layers
    }

    /// Router scores per record.
    pub fn scores(&self) -> usize {
        self.experts * self.moe_layers
    }

    fn record_bytes(&self) -> usize {
        12 + 2 * self.values() + 4 * self.scores()
    }
}

/// One token's hidden states.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenRecord {
    /// Sequence id (as in the routing trace).
    pub seq: u64,
    /// Position in the sequence.
    pub pos: u32,
    /// `moe_layers * hidden_size` values, MoE layer by layer.
    pub values: Vec<f32>,
    /// `moe_layers * experts` router scores, MoE layer by layer.
    pub logits: Vec<f32>,
}

/// Writes the header line.
pub fn write_header(w: &mut (impl Write + ?Sized), h: &HiddenHeader) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, h)?;
    w.write_all(b"\n")
}

/// Writes one record (`r.values` must hold `h.values()` numbers, rounded to
/// half precision here, and `r.logits` `h.scores()`).
pub fn write_record(w: &mut (impl Write + ?Sized), r: &HiddenRecord) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(12 + 2 * r.values.len() + 4 * r.logits.len());
    buf.extend_from_slice(&r.seq.to_le_bytes());
    buf.extend_from_slice(&r.pos.to_le_bytes());
    for &v in &r.values {
        // clamped to half precision's range rather than turned into infinities
        buf.extend_from_slice(&half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_le_bytes());
    }
    for &v in &r.logits {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    w.write_all(&buf)
}

/// A reader of records, one at a time (a trace may not fit in memory).
pub struct HiddenReader<R> {
    r: R,
    header: HiddenHeader,
    buf: Vec<u8>,
    read: usize,
}

impl<R: BufRead> HiddenReader<R> {
    /// Reads and checks the header.
    pub fn new(mut r: R) -> Result<Self, TraceError> {
        let bad = |message: String| TraceError::Format { line: 1, message };
        let mut line = String::new();
        r.read_line(&mut line).map_err(TraceError::Io)?;
        let header: HiddenHeader = serde_json::from_str(&line).map_err(|e| bad(format!("bad header: {e}")))?;
        if header.format != HIDDEN_FORMAT {
            return Err(bad(format!("format {:?} is not {HIDDEN_FORMAT:?}", header.format)));
        }
        if header.version != HIDDEN_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this reader knows {HIDDEN_VERSION})",
                header.version
            )));
        }
        if header.dtype != "f16" || header.values() == 0 || header.experts == 0 {
            return Err(bad(format!(
                "dtype {:?} with {} values per record is not readable",
                header.dtype,
                header.values()
            )));
        }
        let buf = vec![0; header.record_bytes()];
        Ok(Self { r, header, buf, read: 0 })
    }

    /// The header.
    pub fn header(&self) -> &HiddenHeader {
        &self.header
    }

    /// The next record, `None` at the end of the file. An error names the
    /// record (1-based) as its "line".
    pub fn next_record(&mut self) -> Result<Option<HiddenRecord>, TraceError> {
        let mut got = 0;
        while got < self.buf.len() {
            match self.r.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TraceError::Io(e)),
            }
        }
        self.read += 1;
        if got == 0 {
            return Ok(None);
        }
        if got < self.buf.len() {
            let message = format!("truncated: {got} of {} bytes", self.buf.len());
            return Err(TraceError::Format { line: self.read, message });
        }
        let b = &self.buf;
        let seq = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let pos = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let split = 12 + 2 * self.header.values();
        let values = b[12..split].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        let logits = b[split..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Some(HiddenRecord { seq, pos, values, logits }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_half_precision() {
        let h = HiddenHeader::new(3, 2, 2);
        let recs = [
            HiddenRecord {
                seq: 7,
                pos: 0,
                values: vec![0.5, -1.25, 3.0, 0.0, 2.0, -0.125],
                logits: vec![0.1, 2.0, -3.5, 1e-3],
            },
            HiddenRecord { seq: 7, pos: 1, values: vec![1.0; 6], logits: vec![0.0; 4] },
        ];
        let mut buf = Vec::new();
        write_header(&mut buf, &h).unwrap();
        recs.iter().for_each(|r| write_record(&mut buf, r).unwrap());
        let mut rd = HiddenReader::new(&buf[..]).unwrap();
        assert_eq!(rd.header(), &h);
        assert_eq!(rd.next_record().unwrap().as_ref(), Some(&recs[0]));
        assert_eq!(rd.next_record().unwrap().as_ref(), Some(&recs[1]));
        assert_eq!(rd.next_record().unwrap(), None);
        // a cut file and another version are refused with a reason
        let mut rd = HiddenReader::new(&buf[..buf.len() - 3]).unwrap();
        rd.next_record().unwrap();
        assert!(rd.next_record().unwrap_err().to_string().contains("truncated"));
        let other = String::from_utf8_lossy(&buf).replace("\"version\":1", "\"version\":9");
        assert!(HiddenReader::new(other.as_bytes()).is_err());
    }
}
