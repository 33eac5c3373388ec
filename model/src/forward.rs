//! The forward pass over a batch of sequence chunks (prefill and decode
//! mixed), writing keys and values into the paged KV cache.

use crate::config::ExpertAct;
use crate::experts::ExpertProvider;
use crate::kv_cache::KvCache;
use crate::weights::{FfnWeights, Model};
use crate::{ModelError, Result};
use moe_kernels::{matmul_nt, ops};
use moe_types::{BlockId, LayerId, StepRouting, TokenId};

/// Which positions of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsRequest {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The chunk's last token (normal generation).
    Last,
    /// Every token (prompt logprobs, tests).
    All,
}

/// New tokens of one sequence to run this step.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// Tokens to process, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [TokenId],
    /// Tokens of this sequence already in the KV cache.
    pub start_pos: usize,
    /// The sequence's KV blocks; must cover `start_pos + tokens.len()` slots.
    pub blocks: &'a [BlockId],
    /// Which logits to return.
    pub logits: LogitsRequest,
}

/// Where a row of [`ForwardOutput::logits`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitRow {
    /// Index of the chunk in the batch.
    pub chunk: usize,
    /// Token position in its sequence.
    pub pos: usize,
}

/// What a forward step returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[rows.len(), vocab]` logits.
    pub logits: Vec<f32>,
    /// Origin of each logits row.
    pub rows: Vec<LogitRow>,
    /// Routing of every token of the step at every MoE layer, in batch
    /// token order (chunk by chunk).
    pub routing: StepRouting,
    /// With [`Workspace::capture_hidden`]: per MoE layer, the residual
    /// stream entering it (`tokens * hidden_size`, batch order); else empty.
    pub hidden: Vec<Vec<f32>>,
    /// With [`Workspace::capture_hidden`]: per MoE layer, the router's
    /// selection scores (logits, plus its bias if any; `tokens * experts`).
    pub router_logits: Vec<Vec<f32>>,
}

impl ForwardOutput {
    /// Logits row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        let v = self.logits.len() / self.rows.len().max(1);
        &self.logits[i * v..(i + 1) * v]
    }
}

/// Buffers reused across steps so steady-state decoding does not allocate.
#[derive(Default)]
pub struct Workspace {
    pub(crate) h: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) qkv: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    /// Per token: (chunk index, position).
    pub(crate) tok: Vec<(usize, usize)>,
    /// Per chunk, from `kv_rows_at[c]`: the KV-cache offset (row times key
    /// row width) of each of its sequence's positions `0..start + len`; the
    /// same for every layer, so computed once per step.
    pub(crate) kv_rows: Vec<usize>,
    pub(crate) kv_rows_at: Vec<usize>,
    /// The step's per-token addressing (cache rows written, block tables).
    pub(crate) layout: crate::step_layout::StepLayout,
    pub(crate) moe: crate::moe::MoeScratch,
    pub(crate) mla: crate::mla::MlaScratch,
    /// Whether steps return the residual stream entering each MoE layer.
    pub(crate) capture: bool,
    pub(crate) captured_logits: Vec<Vec<f32>>,
}

impl Workspace {
    /// Empty buffers; they grow to the largest step seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether each step's [`ForwardOutput::hidden`] holds the residual
    /// stream entering every MoE layer, and [`ForwardOutput::router_logits`]
    /// the routers' scores (traces for hidden-state predictors).
    pub fn capture_hidden(&mut self, on: bool) {
        self.capture = on;
    }

    /// Whether steps capture hidden states and router scores (see
    /// [`Self::capture_hidden`]).
    pub fn captures_hidden(&self) -> bool {
        self.capture
    }

    /// How latent attention attends (tests pin one form; the default picks
    /// per chunk).
    pub fn set_latent_path(&mut self, path: crate::mla::LatentPath) {
        self.mla.path = path;
    }
}

impl Model {
    /// Runs one step: every chunk's tokens through every layer, appending
    /// their keys and values to `kv`. Experts are reached only through
    /// `experts`.
    pub fn forward<E: ExpertProvider + Sync>(
        &self,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
        experts: &E,
        ws: &mut Workspace,
    ) -> Result<ForwardOutput> {
        self.validate(chunks, kv.block_size(), kv.num_blocks())?;
        let cfg = &self.cfg;
        let hsz = cfg.hidden_size;
        ws.tok.clear();
        for (c, ch) in chunks.iter().enumerate() {
            ws.tok.extend((0..ch.tokens.len()).map(|i| (c, ch.start_pos + i)));
        }
        let t = ws.tok.len();
        let (bs, kvw) = (kv.block_size(), kv.widths().0);
        // the same addressing the GPU pass uploads (crate::step_layout)
        ws.layout.fill(chunks, bs).map_err(|_| ModelError::Input("step too large to address".into()))?;
        ws.kv_rows.clear();
        ws.kv_rows_at.clear();
        let mut first = 0;
        for ch in chunks {
            ws.kv_rows_at.push(ws.kv_rows.len());
            let end = ch.start_pos + ch.tokens.len();
            // this chunk's block table, as the layout holds it
            let table = &ws.layout.blocks[ws.layout.block_off[first] as usize..];
            ws.kv_rows.extend((0..end).map(|p| (table[p / bs] as usize * bs + p % bs) * kvw));
            first += ch.tokens.len();
        }
        let half = self.rope.half();
        ws.cos.resize(t * half, 0.0);
        ws.sin.resize(t * half, 0.0);
        for (i, &(_, pos)) in ws.tok.iter().enumerate() {
            self.rope.angles(pos, &mut ws.cos[i * half..(i + 1) * half], &mut ws.sin[i * half..(i + 1) * half]);
        }
        ws.h.resize(t * hsz, 0.0);
        for (i, &id) in chunks.iter().flat_map(|c| c.tokens).enumerate() {
            self.embed.row_to_f32(id as usize, &mut ws.h[i * hsz..(i + 1) * hsz]);
        }
        ws.xn.resize(t * hsz, 0.0);
        ws.out.resize(t * hsz, 0.0);
        let mut routing = StepRouting::default();
        let mut hidden = Vec::new();
        ws.captured_logits.clear();
        let show = experts.wants_hidden();
        for (l, layer) in self.layers.iter().enumerate() {
            if matches!(layer.ffn, FfnWeights::Moe { .. }) {
                if show {
                    experts.hidden(LayerId(l as u16), &ws.h);
                }
                if ws.capture {
                    hidden.push(ws.h.clone());
                }
            }
            ops::rms_norm(&ws.h, &layer.input_norm, cfg.rms_norm_eps, &mut ws.xn);
            self.attention(l, chunks, kv, ws)?;
            ops::add_inplace(&mut ws.h, &ws.out);
            ops::rms_norm(&ws.h, &layer.post_attn_norm, cfg.rms_norm_eps, &mut ws.xn);
            match &layer.ffn {
                FfnWeights::Dense(mlp) => {
                    crate::moe::mlp(mlp, ExpertAct::Swiglu, &ws.xn, t, ws.moe.ffn_mut(), &mut ws.out)?
                }
                FfnWeights::Moe { router, shared } => {
                    let r = self.moe_block(l, router, shared.as_ref(), experts, ws)?;
                    routing.layers.push(r);
                }
            }
            ops::add_inplace(&mut ws.h, &ws.out);
        }
        let mut out = self.logits(chunks, ws, routing)?;
        out.hidden = hidden;
        out.router_logits = std::mem::take(&mut ws.captured_logits);
        Ok(out)
    }

    fn logits(&self, chunks: &[SeqChunk<'_>], ws: &mut Workspace, routing: StepRouting) -> Result<ForwardOutput> {
        let hsz = self.cfg.hidden_size;
        let rows = crate::step_layout::logit_rows(chunks);
        // gather the chosen rows into xn, normalise, project
        for (r, &(t, _)) in rows.iter().enumerate() {
            ws.xn[r * hsz..(r + 1) * hsz].copy_from_slice(&ws.h[t * hsz..(t + 1) * hsz]);
        }
        let n = rows.len();
        ops::rms_norm_inplace(&mut ws.xn[..n * hsz], &self.final_norm, self.cfg.rms_norm_eps);
        let mut logits = vec![0.0; n * self.cfg.vocab_size];
        matmul_nt(&ws.xn[..n * hsz], n, self.lm_head(), &mut logits)?;
        Ok(ForwardOutput {
            logits,
            rows: rows.into_iter().map(|(_, r)| r).collect(),
            routing,
            hidden: Vec::new(),
            router_logits: Vec::new(),
        })
    }

    /// Checks every chunk against the vocabulary, the context length and a
    /// cache of `num_blocks` blocks of `block_size` slots.
    pub(crate) fn validate(&self, chunks: &[SeqChunk<'_>], block_size: usize, num_blocks: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        for (c, ch) in chunks.iter().enumerate() {
            if ch.tokens.is_empty() {
                return bad(format!("chunk {c} has no tokens"));
            }
            if let Some(&id) = ch.tokens.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return bad(format!("token id {id} is outside the vocabulary of {}", self.cfg.vocab_size));
            }
            let end = ch.start_pos + ch.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return bad(format!(
                    "position {} exceeds the context length {}",
                    end - 1,
                    self.cfg.max_position_embeddings
                ));
            }
            if ch.blocks.len() * block_size < end {
                return bad(format!(
                    "chunk {c} needs {end} KV slots but holds {} blocks of {}",
                    ch.blocks.len(),
                    block_size
                ));
            }
            if let Some(b) = ch.blocks.iter().find(|b| b.index() >= num_blocks) {
                return bad(format!("KV block {b} does not exist (cache has {num_blocks})"));
            }
        }
        Ok(())
    }
}
