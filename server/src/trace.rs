//! Routing traces: the background writer behind `serve --record-routing`,
//! and `moe-serve trace`, which records a trace from a text file without a
//! server. The format is `moe_types::trace` (versioned JSON Lines).

use crate::offload::ServedModel;
use anyhow::Context;
use moe_engine::{EngineCore, GenerationRequest, TraceSink};
use moe_model::SamplingParams;
use moe_scheduler::SchedulerConfig;
use moe_types::hidden_trace;
use moe_types::trace::{write_header, write_token, TraceHeader};
use moe_types::SeqId;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Creates `path`, writes the header, and starts a thread writing the
/// engine's record batches; it ends when the engine drops the sink.
pub fn start_writer(path: &Path, header: &TraceHeader) -> anyhow::Result<TraceSink> {
    let file = std::fs::File::create(path).with_context(|| format!("creating routing trace {}", path.display()))?;
    let mut w = BufWriter::new(file);
    write_header(&mut w, header)?;
    w.flush()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<moe_types::trace::TraceToken>>(4096);
    let shown = path.display().to_string();
    std::thread::Builder::new().name("moe-trace-writer".into()).spawn(move || {
        for batch in rx {
            let written = batch.iter().try_for_each(|t| write_token(&mut w, t)).and_then(|_| w.flush());
            if let Err(e) = written {
                tracing::error!(file = %shown, error = %e, "routing trace write failed; recording stops");
                return;
            }
        }
    })?;
    Ok(tx)
}

/// What `moe-serve trace` records.
#[derive(Clone, Debug)]
pub struct TraceArgs {
    /// Tokens per sequence (the text is cut into windows of this length).
    pub window: usize,
    /// Stop after this many windows (0: the whole text).
    pub max_windows: usize,
}

/// Runs `text` through the model in windows and writes every token's routing
/// to `out`, and with `hidden` the residual stream entering each of its MoE
/// layers (`moe_types::hidden_trace`, same token order). Returns the number
/// of tokens recorded.
pub fn record_text(
    m: ServedModel,
    name: &str,
    text: &str,
    args: &TraceArgs,
    out: &mut dyn Write,
    mut hidden: Option<&mut dyn Write>,
) -> anyhow::Result<usize> {
    let ids = m.codec.encode(text, false)?;
    let max_len = m.model.config().max_position_embeddings;
    let m_hidden = m.model.config().hidden_size;
    anyhow::ensure!(
        args.window >= 1 && args.window < max_len,
        "--window must be between 1 and {} (the context minus one)",
        max_len - 1
    );
    let sched = SchedulerConfig { max_num_seqs: 16, max_batched_tokens: 2048 };
    let blocks = (16 * (args.window + 1)).div_ceil(16) + 16;
    let mut core = EngineCore::new(m.model, m.experts, Vec::new(), sched, (blocks, 16));
    core.set_recording(true);
    write_header(out, &core.trace_header(name))?;
    if let Some(h) = hidden.as_mut() {
        core.set_recording_hidden(true);
        let c = core.trace_header(name);
        hidden_trace::write_header(*h, &hidden_trace::HiddenHeader::new(m_hidden, c.moe_layers.len(), c.num_experts))?;
    }
    let mut windows = ids.chunks(args.window).filter(|w| !w.is_empty());
    let (mut next_id, mut recorded) = (0u64, 0usize);
    loop {
        // keep up to 16 windows in flight; each is a prompt with one new token
        while core.scheduler().num_running() + core.scheduler().num_waiting() < 16 {
            if args.max_windows > 0 && next_id as usize >= args.max_windows {
                break;
            }
            let Some(w) = windows.next() else { break };
            let req = GenerationRequest {
                prompt: w.to_vec(),
                sampling: SamplingParams::default(),
                seed: 0,
                max_tokens: 1,
                min_tokens: 0,
                ignore_eos: true,
            };
            core.add(SeqId(next_id), req)?;
            next_id += 1;
        }
        if core.is_idle() {
            break;
        }
        core.step().map_err(|(_, e)| e)?;
        for t in core.take_trace() {
            write_token(out, &t)?;
            recorded += 1;
        }
        if let Some(h) = hidden.as_mut() {
            for r in core.take_hidden() {
                hidden_trace::write_record(*h, &r)?;
            }
        }
    }
    out.flush()?;
    if let Some(h) = hidden.as_mut() {
        h.flush()?;
    }
    Ok(recorded)
}
