//! The deterministic heart of the engine: requests in, token outputs out,
//! one step at a time. No threads, channels or clocks.

use crate::{EngineError, FinishReason, GenerationRequest};
use moe_model::{KvCache, LogitsRequest, Model, SampledToken, Sampler, SeqChunk, StepBackend, StepToken, Workspace};
use moe_scheduler::{BlockAllocator, GroupingConfig, GroupingMode, PathHints, Scheduler, SchedulerConfig, StepPlan};
use moe_types::hidden_trace::HiddenRecord;
use moe_types::trace::{TraceHeader, TraceToken};
use moe_types::{SeqId, TokenId};
use rayon::prelude::*;
use std::collections::HashMap;

struct Request {
    sampler: Sampler,
    max_tokens: usize,
    min_tokens: usize,
    ignore_eos: bool,
    generated: usize,
}

/// A token produced by a step, and whether it ended its sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// The sequence.
    pub seq: SeqId,
    /// The token.
    pub token: SampledToken,
    /// Set when this token ends the sequence (it has been removed).
    pub finish: Option<FinishReason>,
}

/// Model, experts, KV cache, scheduler and per-request sampling state.
pub struct EngineCore<E> {
    model: Model,
    experts: E,
    kv: KvCache,
    sched: Scheduler,
    ws: Workspace,
    reqs: HashMap<SeqId, Request>,
    eos: Vec<TokenId>,
    last_plan: StepPlan,
    /// Distinct experts per MoE layer in the last step.
    last_distinct: Vec<usize>,
    step_tokens: Vec<StepToken>,
    steps: u64,
    /// Routing records of computed tokens, when recording.
    trace: Option<Vec<TraceToken>>,
    /// Their hidden states, when recording those too (same order).
    hidden: Option<Vec<HiddenRecord>>,
}

impl<E: StepBackend> EngineCore<E> {
    /// An engine with `num_blocks` KV blocks of `block_size` slots.
    pub fn new(model: Model, experts: E, eos: Vec<TokenId>, sched: SchedulerConfig, kv_blocks: (usize, usize)) -> Self {
        let (num_blocks, block_size) = kv_blocks;
        let kv = if experts.host_kv() {
            KvCache::new(model.config(), num_blocks, block_size)
        } else {
            KvCache::without_storage(model.config(), num_blocks, block_size)
        };
        Self {
            model,
            experts,
            kv,
            sched: Scheduler::new(sched, BlockAllocator::new(num_blocks, block_size)),
            ws: Workspace::new(),
            reqs: HashMap::new(),
            eos,
            last_plan: StepPlan::default(),
            last_distinct: Vec::new(),
            step_tokens: Vec::new(),
            steps: 0,
            trace: None,
            hidden: None,
        }
    }

    /// Sets micro-batching and regrouping (see `moe_scheduler::GroupingConfig`).
    pub fn with_grouping(mut self, g: GroupingConfig) -> Result<Self, EngineError> {
        self.sched.set_grouping(g)?;
        Ok(self)
    }

    /// Distinct experts each MoE layer used in the last step.
    pub fn last_distinct_experts(&self) -> &[usize] {
        &self.last_distinct
    }

    /// Starts or stops recording the routing of every computed token.
    pub fn set_recording(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
        if !on {
            self.set_recording_hidden(false);
        }
    }

    /// Starts or stops recording, with the routing, the residual stream
    /// entering each MoE layer of every computed token (needs recording on).
    pub fn set_recording_hidden(&mut self, on: bool) {
        self.ws.capture_hidden(on);
        self.hidden = on.then(Vec::new);
    }

    /// Hidden-state records gathered since the last call, in the order of
    /// [`take_trace`](Self::take_trace)'s records (empty when not recording).
    pub fn take_hidden(&mut self) -> Vec<HiddenRecord> {
        self.hidden.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Routing records gathered since the last call (empty when not recording).
    pub fn take_trace(&mut self) -> Vec<TraceToken> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The trace header describing this engine's model.
    pub fn trace_header(&self, model_name: &str) -> TraceHeader {
        let c = self.model.config();
        TraceHeader::new(
            model_name,
            c.num_layers(),
            c.moe_layers().map(|l| l as u16).collect(),
            c.moe.num_experts,
            c.moe.top_k,
        )
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Longest prompt + output a request may have: the context length,
    /// bounded by the KV cache's total capacity.
    pub fn max_model_len(&self) -> usize {
        let cap = self.kv.num_blocks() * self.kv.block_size();
        self.model.config().max_position_embeddings.min(cap)
    }

    /// Checks a request against the model without adding it.
    pub fn check(&self, req: &GenerationRequest) -> Result<(), EngineError> {
        check_request(req, self.model.config().vocab_size, self.max_model_len())
    }

    /// Adds a request as sequence `id`.
    pub fn add(&mut self, id: SeqId, req: GenerationRequest) -> Result<(), EngineError> {
        self.check(&req)?;
        let sampler = Sampler::new(req.sampling, req.seed, &req.prompt);
        self.sched.add(id, req.prompt);
        let r = Request {
            sampler,
            max_tokens: req.max_tokens,
            min_tokens: req.min_tokens,
            ignore_eos: req.ignore_eos,
            generated: 0,
        };
        self.reqs.insert(id, r);
        Ok(())
    }

    /// Aborts a sequence, freeing its blocks; false if unknown.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.reqs.remove(&id);
        self.experts.end_sequence(id);
        self.sched.remove(id)
    }

    /// The expert provider (for its statistics).
    pub fn experts(&self) -> &E {
        &self.experts
    }

    /// Whether no sequence is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }

    /// The scheduler (for gauges).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// The plan of the last step.
    pub fn last_plan(&self) -> &StepPlan {
        &self.last_plan
    }

    /// Runs `prompts` (sequence ids `0..n`, all in flight together, greedy,
    /// past end-of-sequence tokens) to completion and returns each one's
    /// generated tokens: what benchmarks and tests compare across
    /// configurations. A failed step ends the run with its cause.
    pub fn generate_greedy(
        &mut self,
        prompts: &[Vec<TokenId>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<TokenId>>, EngineError> {
        for (i, p) in prompts.iter().enumerate() {
            let req = GenerationRequest {
                prompt: p.clone(),
                sampling: moe_model::SamplingParams::default(),
                seed: 0,
                max_tokens,
                min_tokens: 0,
                ignore_eos: true,
            };
            self.add(SeqId(i as u64), req)?;
        }
        let mut out = vec![Vec::new(); prompts.len()];
        while !self.is_idle() {
            for o in self.step().map_err(|(_, e)| EngineError::from(&e))? {
                out[o.seq.0 as usize].push(o.token.id);
            }
        }
        Ok(out)
    }

    /// Runs one step. On a model error every sequence of the step is
    /// removed and returned with the error.
    pub fn step(&mut self) -> Result<Vec<StepOutput>, (Vec<SeqId>, moe_model::ModelError)> {
        let plan = self.plan();
        self.execute(plan)
    }

    /// Plans the next step: with regrouping, the expert provider forecasts
    /// the path of each decoding sequence's next token first.
    pub fn plan(&mut self) -> StepPlan {
        let g = self.sched.grouping();
        if g.micro_batch == 0 || g.mode != GroupingMode::Regroup || self.sched.num_running() <= g.micro_batch {
            return self.sched.schedule();
        }
        let decoding: Vec<StepToken> = self
            .sched
            .running()
            .iter()
            .filter_map(|&seq| {
                let toks = self.sched.tokens(seq);
                (self.sched.computed(seq) + 1 == toks.len()).then(|| StepToken { seq, token: toks[toks.len() - 1] })
            })
            .collect();
        let mut hints = PathHints { resident: self.experts.resident_sets(), ..Default::default() };
        for (t, path) in decoding.iter().zip(self.experts.predict_paths(&decoding)) {
            if let Some(p) = path {
                hints.paths.insert(t.seq, p);
            }
        }
        self.sched.schedule_with(&hints)
    }

    /// Runs a planned step.
    pub fn execute(&mut self, plan: StepPlan) -> Result<Vec<StepOutput>, (Vec<SeqId>, moe_model::ModelError)> {
        if plan.chunks.is_empty() {
            self.last_plan = plan;
            return Ok(Vec::new());
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .chunks
            .iter()
            .map(|c| SeqChunk {
                tokens: &self.sched.tokens(c.seq)[c.start..c.start + c.len],
                start_pos: c.start,
                blocks: self.sched.blocks(c.seq),
                logits: if c.sample { LogitsRequest::Last } else { LogitsRequest::None },
            })
            .collect();
        self.step_tokens.clear();
        for (c, ch) in plan.chunks.iter().zip(&chunks) {
            self.step_tokens.extend(ch.tokens.iter().map(|&token| StepToken { seq: c.seq, token }));
        }
        self.experts.begin_step(&self.step_tokens);
        let out = match self.experts.forward_step(&self.model, &chunks, &mut self.kv, &mut self.ws) {
            Ok(o) => o,
            Err(e) => {
                let ids: Vec<SeqId> = plan.chunks.iter().map(|c| c.seq).collect();
                for &id in &ids {
                    self.abort(id);
                }
                self.last_plan = plan;
                return Err((ids, e));
            }
        };
        drop(chunks);
        self.steps += 1;
        self.last_distinct.clear();
        self.last_distinct
            .extend(out.routing.layers.iter().map(|l| l.ids.iter().copied().collect::<moe_types::ExpertSet>().len()));
        if let Some(trace) = &mut self.trace {
            let mut t = 0;
            for c in &plan.chunks {
                let tokens = self.sched.tokens(c.seq);
                for (pos, &token) in tokens.iter().enumerate().skip(c.start).take(c.len) {
                    if let Some(hidden) = &mut self.hidden {
                        let hsz = self.model.config().hidden_size;
                        let ne = self.model.config().moe.num_experts;
                        let values = out.hidden.iter().flat_map(|h| &h[t * hsz..(t + 1) * hsz]).copied().collect();
                        let logits = out.router_logits.iter().flat_map(|s| &s[t * ne..(t + 1) * ne]).copied().collect();
                        hidden.push(HiddenRecord { seq: c.seq.0, pos: pos as u32, values, logits });
                    }
                    trace.push(TraceToken {
                        step: self.steps,
                        seq: c.seq.0,
                        pos: pos as u32,
                        token,
                        experts: out
                            .routing
                            .layers
                            .iter()
                            .map(|l| l.experts_of(t).iter().map(|e| e.0).collect())
                            .collect(),
                        weights: out.routing.layers.iter().map(|l| l.weights_of(t).to_vec()).collect(),
                    });
                    t += 1;
                }
            }
        }
        self.sched.commit(&plan);
        // sample every sequence's next token; samplers are independent (own
        // RNG, own counts), so running them side by side changes nothing
        let mut picked: Vec<(SeqId, Request)> = plan
            .chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| (c.seq, self.reqs.remove(&c.seq).expect("scheduled sequence has a request")))
            .collect();
        let eos = &self.eos;
        let sample = |(row, (_, r)): (usize, &mut (SeqId, Request))| sample_next(r, out.row(row), eos);
        let tokens: Vec<SampledToken> = if picked.len() >= PARALLEL_SAMPLING && rayon::current_num_threads() > 1 {
            picked.par_iter_mut().enumerate().map(sample).collect()
        } else {
            picked.iter_mut().enumerate().map(sample).collect()
        };
        let mut outputs = Vec::with_capacity(tokens.len());
        for ((seq, mut r), token) in picked.into_iter().zip(tokens) {
            r.generated += 1;
            let total = self.sched.tokens(seq).len() + 1;
            let finish = if !r.ignore_eos && self.eos.contains(&token.id) {
                Some(FinishReason::Eos)
            } else if r.generated >= r.max_tokens || total >= self.max_model_len() {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() {
                self.abort(seq);
            } else {
                self.reqs.insert(seq, r);
                self.sched.append_token(seq, token.id);
            }
            outputs.push(StepOutput { seq, token, finish });
        }
        self.last_plan = plan;
        Ok(outputs)
    }
}

/// From this many sequences sampled in one step, they are sampled in parallel.
const PARALLEL_SAMPLING: usize = 4;

/// Samples a request's next token, masking end-of-sequence tokens while the
/// request is still short of its `min_tokens`.
fn sample_next(r: &mut Request, logits: &[f32], eos: &[TokenId]) -> SampledToken {
    let banned = if r.generated < r.min_tokens { eos } else { &[] };
    r.sampler.sample_excluding(logits, banned)
}

/// Shape checks shared by the handle (at submission) and the core.
pub(crate) fn check_request(req: &GenerationRequest, vocab: usize, max_len: usize) -> Result<(), EngineError> {
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Invalid(format!("token id {t} is outside the vocabulary (size {vocab})")));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
    }
    let needed = req.prompt.len() + req.max_tokens;
    if needed > max_len {
        return Err(EngineError::ContextLength {
            needed,
            prompt: req.prompt.len(),
            max_tokens: req.max_tokens,
            limit: max_len,
        });
    }
    Ok(())
}
