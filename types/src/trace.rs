//! The routing-trace file format, version 1: what the engine records with
//! `--record-routing FILE` or `moe-serve trace`, and what the routing-path
//! predictor trainer and the placement planner (`moe-place`) read.
//!
//! A trace is JSON Lines (UTF-8, one JSON object per line):
//! - line 1, the [`TraceHeader`]:
//!   `{"format":"moe-routing-trace","version":1,"model":"tiny-shakespeare-moe",
//!     "num_layers":4,"moe_layers":[0,1,2,3],"num_experts":8,"top_k":2}`
//! - every further line, one computed token, a [`TraceToken`]:
//!   `{"step":17,"seq":3,"pos":41,"token":512,"experts":[[3,0],[5,1],[2,7],[6,4]],
//!     "weights":[[0.61,0.39],[0.55,0.45],[0.7,0.3],[0.52,0.48]]}`
//!   `experts[i]` and `weights[i]` belong to MoE layer `moe_layers[i]`, strongest
//!   expert first; `step` is the engine step that computed the token, `seq` the
//!   sequence, `pos` its position in the sequence, `token` its id (the token the
//!   model read at that position, prompt or generated).
//!
//! Readers must reject a different `format` and any `version` they do not know.
//! Version 1 is the first; later versions may add fields (readers ignore
//! unknown fields) but never change the meaning of these.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// The `format` value of every trace.
pub const TRACE_FORMAT: &str = "moe-routing-trace";
/// The version this crate writes and reads.
pub const TRACE_VERSION: u32 = 1;

/// First line of a trace: what model and shape the records describe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Always [`TRACE_FORMAT`].
    pub format: String,
    /// [`TRACE_VERSION`] when written by this crate.
    pub version: u32,
    /// Served model name.
    pub model: String,
    /// Decoder layers of the model.
    pub num_layers: usize,
    /// Indices of the MoE layers, in order; records list experts in this order.
    pub moe_layers: Vec<u16>,
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
}

impl TraceHeader {
    /// A version-1 header.
    pub fn new(model: &str, num_layers: usize, moe_layers: Vec<u16>, num_experts: usize, top_k: usize) -> Self {
        Self {
            format: TRACE_FORMAT.into(),
            version: TRACE_VERSION,
            model: model.into(),
            num_layers,
            moe_layers,
            num_experts,
            top_k,
        }
    }
}

/// The routing of one computed token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceToken {
    /// Engine step that computed the token.
    pub step: u64,
    /// Sequence id.
    pub seq: u64,
    /// Position in the sequence.
    pub pos: u32,
    /// Token id read at that position.
    pub token: u32,
    /// Per MoE layer (header order): chosen experts, strongest first.
    pub experts: Vec<Vec<u16>>,
    /// Per MoE layer: the weights applied to those experts.
    pub weights: Vec<Vec<f32>>,
}

/// Why a trace could not be read.
#[derive(Debug)]
pub enum TraceError {
    /// Reading failed.
    Io(std::io::Error),
    /// A line is not what the format says (1-based line number).
    Format {
        /// Line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceError::Io(e) => write!(f, "reading the trace: {e}"),
            TraceError::Format { line, message } => write!(f, "trace line {line}: {message}"),
        }
    }
}

impl std::error::Error for TraceError {}

/// Writes the header line.
pub fn write_header(w: &mut (impl Write + ?Sized), h: &TraceHeader) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, h)?;
    w.write_all(b"\n")
}

/// Writes one token line.
pub fn write_token(w: &mut (impl Write + ?Sized), t: &TraceToken) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, t)?;
    w.write_all(b"\n")
}

/// The header's own consistency: MoE layers inside the model, ascending and
/// distinct; `top_k` between 1 and `num_experts`.
fn check_header(h: &TraceHeader) -> Result<(), String> {
    if let Some(l) = h.moe_layers.iter().find(|&&l| l as usize >= h.num_layers) {
        return Err(format!("MoE layer {l} is outside the model's {} layers", h.num_layers));
    }
    if h.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
        return Err("moe_layers must be ascending and distinct".into());
    }
    if h.top_k == 0 || h.top_k > h.num_experts {
        return Err(format!("top_k {} must be between 1 and num_experts {}", h.top_k, h.num_experts));
    }
    Ok(())
}

/// Reads and checks a whole trace.
pub fn read_trace(r: impl BufRead) -> Result<(TraceHeader, Vec<TraceToken>), TraceError> {
    let mut lines = r.lines().enumerate();
    let bad = |line: usize, message: String| TraceError::Format { line: line + 1, message };
    let (_, first) = lines.next().ok_or_else(|| bad(0, "empty file: no header".into()))?;
    let header: TraceHeader =
        serde_json::from_str(&first.map_err(TraceError::Io)?).map_err(|e| bad(0, format!("bad header: {e}")))?;
    if header.format != TRACE_FORMAT {
        return Err(bad(0, format!("format {:?} is not {TRACE_FORMAT:?}", header.format)));
    }
    if header.version != TRACE_VERSION {
        return Err(bad(0, format!("version {} is not supported (this reader knows {TRACE_VERSION})", header.version)));
    }
    check_header(&header).map_err(|m| bad(0, m))?;
    let mut tokens = Vec::new();
    for (i, line) in lines {
        let line = line.map_err(TraceError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        let t: TraceToken = serde_json::from_str(&line).map_err(|e| bad(i, e.to_string()))?;
        let layers = header.moe_layers.len();
        if t.experts.len() != layers || t.weights.len() != layers {
            return Err(bad(i, format!("{} expert lists for {layers} MoE layers", t.experts.len())));
        }
        for (e, w) in t.experts.iter().zip(&t.weights) {
            if e.len() != header.top_k || w.len() != header.top_k {
                return Err(bad(i, format!("{} experts per layer, top_k is {}", e.len(), header.top_k)));
            }
            if let Some(x) = e.iter().find(|&&x| x as usize >= header.num_experts) {
                return Err(bad(i, format!("expert {x} out of range (num_experts {})", header.num_experts)));
            }
            if e.iter().enumerate().any(|(j, x)| e[..j].contains(x)) {
                return Err(bad(i, format!("expert listed twice in {e:?}")));
            }
            if let Some(x) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                return Err(bad(i, format!("weight {x} is not a finite non-negative number")));
            }
        }
        tokens.push(t);
    }
    Ok((header, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let h = TraceHeader::new("m", 2, vec![0, 1], 4, 2);
        let t = TraceToken {
            step: 1,
            seq: 2,
            pos: 3,
            token: 4,
            experts: vec![vec![1, 0], vec![3, 2]],
            weights: vec![vec![0.6, 0.4], vec![0.5, 0.5]],
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &h).unwrap();
        write_token(&mut buf, &t).unwrap();
        let (h2, toks) = read_trace(&buf[..]).unwrap();
        assert_eq!((h2, toks), (h.clone(), vec![t.clone()]));

        let text = String::from_utf8(buf).unwrap();
        let e = read_trace(text.replace("\"version\":1", "\"version\":9").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("version 9 is not supported"), "{e}");
        let e = read_trace(text.replace("[3,2]", "[3,7]").as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "trace line 2: expert 7 out of range (num_experts 4)");
        assert!(read_trace(&b""[..]).is_err());
        let e = read_trace(text.replace("[3,2]", "[3,3]").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("expert listed twice"), "{e}");
        let e = read_trace(text.replace("\"top_k\":2", "\"top_k\":0").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("top_k 0 must be between 1"), "{e}");
        let e = read_trace(text.replace("[0,1]", "[0,5]").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("MoE layer 5 is outside"), "{e}");
    }

    /// Found by the `routing_trace` fuzz target: a weight beyond f32's range
    /// read as infinity, which the writer cannot write back.
    #[test]
    fn nonfinite_weight_round_trip() {
        let text = concat!(
            r#"{"format":"moe-routing-trace","version":1,"model":"m","num_layers":1,"moe_layers":[0],"num_experts":2,"top_k":1}"#,
            "\n",
            r#"{"step":0,"seq":0,"pos":0,"token":0,"experts":[[1]],"weights":[[1e39]]}"#,
            "\n"
        );
        // (the JSON parser itself now refuses it as out of f32's range)
        let e = read_trace(text.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("trace line 2:") && e.contains("out of range"), "{e}");
        let negative = text.replace("1e39", "-0.5");
        let e = read_trace(negative.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("weight -0.5 is not a finite non-negative number"), "{e}");
    }
}
