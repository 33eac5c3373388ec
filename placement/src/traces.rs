//! Reading routing traces: the project's format (`moe_types::trace`) or the plain
//! JSON Lines format below, into one dense [`Routing`].
//!
//! Plain format, one object per (token, MoE layer), for traces from other systems:
//! `{"seq": 3, "token": 41, "layer": 0, "experts": [5, 2]}`: sequence id, position of
//! the token in its sequence, MoE layer index (any integers: the distinct values,
//! sorted, are the MoE layers in order), and the chosen expert ids (strongest first,
//! the same count on every line). Every token must list every layer. The number of
//! experts is the largest id plus one unless given.

use crate::error::{PlaceError, Result};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Routing of many tokens through every MoE layer, stored densely.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Model name (empty when unknown).
    pub model: String,
    /// The model's MoE layer indices, in order.
    pub moe_layers: Vec<u16>,
    /// Experts per layer.
    pub num_experts: usize,
    /// Experts chosen per token per layer.
    pub top_k: usize,
    /// `experts[(t * layers + l) * top_k + i]`: i-th expert of token t at layer l.
    pub experts: Vec<u16>,
}

impl Routing {
    /// MoE layers.
    pub fn num_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// Tokens recorded.
    pub fn num_tokens(&self) -> usize {
        self.experts.len().checked_div(self.num_layers() * self.top_k).unwrap_or(0)
    }

    /// The experts token `t` chose at layer `l`.
    pub fn chosen(&self, t: usize, l: usize) -> &[u16] {
        let at = (t * self.num_layers() + l) * self.top_k;
        &self.experts[at..at + self.top_k]
    }
}

/// One plain line's (layer, experts).
type LayerExperts = (u16, Vec<u16>);

#[derive(Deserialize)]
struct PlainLine {
    seq: u64,
    token: u64,
    layer: u16,
    experts: Vec<u16>,
}

/// Reads a trace in either format; `num_experts` overrides the plain format's guess.
pub fn read_routing(path: &Path, num_experts: Option<usize>) -> Result<Routing> {
    let name = path.display().to_string();
    let io = |source| PlaceError::Io { path: name.clone(), source };
    let mut reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut first = String::new();
    reader.read_line(&mut first).map_err(io)?;
    let is_project = serde_json::from_str::<serde_json::Value>(&first)
        .map(|v| v.get("format").is_some())
        .map_err(|e| PlaceError::Trace { path: name.clone(), message: format!("line 1: {e}") })?;
    let rest = std::io::Cursor::new(first).chain(reader);
    if is_project {
        read_project(rest, &name)
    } else {
        read_plain(rest, &name, num_experts)
    }
}

fn read_project(r: impl BufRead, name: &str) -> Result<Routing> {
    let (h, tokens) =
        moe_types::trace::read_trace(r).map_err(|e| PlaceError::Trace { path: name.into(), message: e.to_string() })?;
    let mut experts = Vec::with_capacity(tokens.len() * h.moe_layers.len() * h.top_k);
    for t in &tokens {
        for per_layer in &t.experts {
            experts.extend_from_slice(per_layer);
        }
    }
    Ok(Routing { model: h.model, moe_layers: h.moe_layers, num_experts: h.num_experts, top_k: h.top_k, experts })
}

fn read_plain(r: impl BufRead, name: &str, num_experts: Option<usize>) -> Result<Routing> {
    let bad = |line: usize, message: String| PlaceError::Trace {
        path: name.into(),
        message: format!("line {line}: {message}"),
    };
    let mut order: Vec<(u64, u64)> = Vec::new();
    let mut per_token: HashMap<(u64, u64), Vec<LayerExperts>> = HashMap::new();
    let mut layers = BTreeSet::new();
    let mut top_k = None;
    for (i, line) in r.lines().enumerate() {
        let line = line.map_err(|e| bad(i + 1, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: PlainLine = serde_json::from_str(&line).map_err(|e| bad(i + 1, e.to_string()))?;
        if *top_k.get_or_insert(p.experts.len()) != p.experts.len() || p.experts.is_empty() {
            return Err(bad(i + 1, format!("{} experts; every line must list the same number (> 0)", p.experts.len())));
        }
        layers.insert(p.layer);
        let entry = per_token.entry((p.seq, p.token)).or_insert_with(|| {
            order.push((p.seq, p.token));
            Vec::new()
        });
        entry.push((p.layer, p.experts));
    }
    let moe_layers: Vec<u16> = layers.into_iter().collect();
    let top_k = top_k.ok_or_else(|| bad(0, "no records".into()))?;
    let mut experts = Vec::with_capacity(order.len() * moe_layers.len() * top_k);
    for key in &order {
        let mut recs = per_token.remove(key).unwrap_or_default();
        recs.sort_by_key(|r| r.0);
        let got: Vec<u16> = recs.iter().map(|r| r.0).collect();
        if got != moe_layers {
            return Err(bad(
                0,
                format!("token (seq {}, token {}) has layers {got:?}, expected {moe_layers:?}", key.0, key.1),
            ));
        }
        for (_, e) in recs {
            experts.extend(e);
        }
    }
    let max_id = experts.iter().copied().max().unwrap_or(0) as usize;
    let num_experts = num_experts.unwrap_or(max_id + 1);
    if max_id >= num_experts {
        return Err(bad(0, format!("expert {max_id} out of range (num_experts {num_experts})")));
    }
    Ok(Routing { model: String::new(), moe_layers, num_experts, top_k, experts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_jsonl_grouping_tokens() {
        let text = "{\"seq\":1,\"token\":0,\"layer\":2,\"experts\":[3,1]}\n\
                    {\"seq\":1,\"token\":0,\"layer\":0,\"experts\":[0,1]}\n\
                    {\"seq\":1,\"token\":1,\"layer\":0,\"experts\":[2,3]}\n\
                    {\"seq\":1,\"token\":1,\"layer\":2,\"experts\":[1,0]}\n";
        let r = read_plain(text.as_bytes(), "t", None).unwrap();
        assert_eq!((r.moe_layers.clone(), r.num_experts, r.top_k, r.num_tokens()), (vec![0, 2], 4, 2, 2));
        assert_eq!((r.chosen(0, 1), r.chosen(1, 0)), (&[3u16, 1][..], &[2u16, 3][..]));
        let e = read_plain(text.lines().take(3).collect::<Vec<_>>().join("\n").as_bytes(), "t", None).unwrap_err();
        assert!(e.to_string().contains("has layers [0]"), "{e}");
    }
}
