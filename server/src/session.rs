//! One sequence generating on its own: prefill the prompt, then decode token
//! by token through the paged KV cache. The continuous-batching engine
//! replaces this for serving; it remains the simplest correct driver for
//! the CLI and benchmarks.

use moe_model::{ExpertProvider, KvCache, LogitsRequest, Model, Sampler, SeqChunk, StepToken, Workspace};
use moe_scheduler::{BlockAllocator, BlockTable};
use moe_types::{SeqId, TokenId};

const BLOCK_SIZE: usize = 16;

/// A single sequence with its own KV cache.
pub struct Session<'m, E> {
    model: &'m Model,
    experts: &'m E,
    kv: KvCache,
    alloc: BlockAllocator,
    table: BlockTable,
    ws: Workspace,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
}

impl<'m, E: ExpertProvider + Sync> Session<'m, E> {
    /// A session able to hold `capacity` tokens (capped at the context length).
    pub fn new(model: &'m Model, experts: &'m E, capacity: usize) -> Self {
        let capacity = capacity.min(model.config().max_position_embeddings).max(1);
        let blocks = capacity.div_ceil(BLOCK_SIZE);
        Self {
            model,
            experts,
            kv: KvCache::new(model.config(), blocks, BLOCK_SIZE),
            alloc: BlockAllocator::new(blocks, BLOCK_SIZE),
            table: BlockTable::new(),
            ws: Workspace::new(),
            cached: 0,
        }
    }

    /// Tokens the session can still take.
    pub fn remaining(&self) -> usize {
        self.alloc.num_blocks() * BLOCK_SIZE - self.cached
    }

    /// Runs `tokens` (a prompt, or one decoded token) and returns the logits
    /// of the last one.
    pub fn step(&mut self, tokens: &[TokenId]) -> moe_model::Result<Vec<f32>> {
        let end = self.cached + tokens.len();
        self.table
            .grow_to(&mut self.alloc, end)
            .map_err(|e| moe_model::ModelError::Input(format!("context full: {e}")))?;
        let step: Vec<StepToken> = tokens.iter().map(|&token| StepToken { seq: SeqId(0), token }).collect();
        self.experts.begin_step(&step);
        let out = self.model.forward(
            &[SeqChunk { tokens, start_pos: self.cached, blocks: self.table.blocks(), logits: LogitsRequest::Last }],
            &mut self.kv,
            self.experts,
            &mut self.ws,
        )?;
        self.cached = end;
        Ok(out.logits)
    }

    /// Prefills `prompt`, then samples until `max_tokens`, an eos id or the
    /// context end; `on_token` sees each token as it is chosen and may stop
    /// generation by returning false.
    pub fn generate(
        &mut self,
        prompt: &[TokenId],
        sampler: &mut Sampler,
        limits: Limits<'_>,
        mut on_token: impl FnMut(TokenId) -> bool,
    ) -> moe_model::Result<usize> {
        let mut logits = self.step(prompt)?;
        let mut n = 0;
        while n < limits.max_tokens {
            let tok = sampler.sample(&logits);
            n += 1;
            if !on_token(tok.id) || limits.eos.contains(&tok.id) || n == limits.max_tokens || self.remaining() == 0 {
                break;
            }
            logits = self.step(&[tok.id])?;
        }
        Ok(n)
    }
}

/// When generation stops.
#[derive(Clone, Copy, Debug)]
pub struct Limits<'a> {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Ids that end generation (the eos token is still reported).
    pub eos: &'a [TokenId],
}
