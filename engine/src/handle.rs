//! The engine thread and the handle other threads talk to it through.

use crate::core::{check_request, EngineCore};
use crate::metric_names as m;
use crate::{EngineError, EngineEvent, GenerationRequest};
use moe_model::StepBackend;
use moe_types::trace::TraceToken;
use moe_types::SeqId;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// Admission limits enforced at submission.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Most requests admitted and not yet finished (running plus waiting).
    pub max_in_flight: usize,
    /// Capacity of the submission channel.
    pub inbox: usize,
}

/// Gauges readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences holding KV blocks.
    pub running: AtomicUsize,
    /// Sequences waiting for admission.
    pub waiting: AtomicUsize,
    /// KV blocks in use.
    pub kv_blocks_used: AtomicUsize,
    /// KV blocks in total.
    pub kv_blocks_total: AtomicUsize,
    /// Requests submitted and not yet finished or dropped.
    pub in_flight: AtomicUsize,
    /// Steps run.
    pub steps: AtomicU64,
}

enum Command {
    Add { id: SeqId, req: GenerationRequest, events: tmpsc::Sender<EngineEvent> },
}

/// Cheap to clone; submits requests to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    inbox: SyncSender<Command>,
    aborts: Sender<SeqId>,
    stats: Arc<EngineStats>,
    next_id: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    /// Set to end every sequence in flight now (the grace period is over).
    cut: Arc<AtomicBool>,
    limits: EngineLimits,
    vocab: usize,
    max_model_len: usize,
}

/// The events of one request. Dropping it before the end aborts the
/// request on the engine thread (freeing its KV blocks).
pub struct RequestStream {
    id: SeqId,
    events: tmpsc::Receiver<EngineEvent>,
    aborts: Sender<SeqId>,
    stats: Arc<EngineStats>,
    done: bool,
}

impl RequestStream {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await;
        match &ev {
            Some(EngineEvent::Token(_)) => {}
            _ => self.done = true,
        }
        ev
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            // the engine may already be gone; then there is nothing to free
            let _ = self.aborts.send(self.id);
        }
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EngineHandle {
    /// Submits a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream, EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        check_request(&req, self.vocab, self.max_model_len)?;
        let in_flight = self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        if in_flight >= self.limits.max_in_flight {
            self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(in_flight));
        }
        let id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        // one slot per possible token plus the final event: the engine never blocks
        let (tx, rx) = tmpsc::channel(req.max_tokens + 2);
        let stream =
            RequestStream { id, events: rx, aborts: self.aborts.clone(), stats: self.stats.clone(), done: false };
        match self.inbox.try_send(Command::Add { id, req, events: tx }) {
            Ok(()) => Ok(stream),
            Err(TrySendError::Full(_)) => {
                let mut s = stream;
                s.done = true; // never reached the engine
                Err(EngineError::QueueFull(in_flight))
            }
            Err(TrySendError::Disconnected(_)) => {
                let mut s = stream;
                s.done = true;
                Err(EngineError::ShuttingDown)
            }
        }
    }

    /// Gauges.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Longest prompt plus output accepted.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Stops accepting requests (in-flight ones continue).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Ends every sequence in flight with [`EngineError::ShuttingDown`] as
    /// its last event (the shutdown grace period is over), so that each
    /// stream reports why it stopped instead of being cut off.
    pub fn cut_all(&self) {
        self.cut.store(true, Ordering::Release);
    }
}

/// Where recorded routing goes: batches of records, one per step. The
/// engine never waits on it; a full channel drops the batch (counted).
pub type TraceSink = SyncSender<Vec<TraceToken>>;

/// Starts the engine thread. It runs until every handle is dropped and the
/// work in hand is done. With a `trace` sink it records every computed
/// token's routing.
pub fn spawn_engine<E: StepBackend + Send + 'static>(
    mut core: EngineCore<E>,
    limits: EngineLimits,
    trace: Option<TraceSink>,
) -> EngineHandle {
    core.set_recording(trace.is_some());
    let (inbox, rx) = mpsc::sync_channel(limits.inbox.max(1));
    let (aborts, abort_rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let handle = EngineHandle {
        inbox,
        aborts,
        stats: stats.clone(),
        next_id: Arc::new(AtomicU64::new(1)),
        closed: Arc::new(AtomicBool::new(false)),
        cut: Arc::new(AtomicBool::new(false)),
        limits,
        vocab: core.model().config().vocab_size,
        max_model_len: core.max_model_len(),
    };
    let cut = handle.cut.clone();
    std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || {
            // The loop runs on a worker of its own compute pool, so parallel
            // sections start on an awake thread instead of waking the whole
            // pool from outside (one wake-up fewer per section, many per step).
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("moe-compute-{i}"))
                .build()
            {
                Ok(pool) => pool.install(|| run(core, rx, abort_rx, stats, trace, &cut)),
                Err(_) => run(core, rx, abort_rx, stats, trace, &cut),
            }
        })
        .expect("spawning the engine thread");
    handle
}

fn run<E: StepBackend>(
    mut core: EngineCore<E>,
    rx: Receiver<Command>,
    aborts: Receiver<SeqId>,
    stats: Arc<EngineStats>,
    trace: Option<TraceSink>,
    cut: &AtomicBool,
) {
    let mut streams: std::collections::HashMap<SeqId, tmpsc::Sender<EngineEvent>> = Default::default();
    let mut disconnected = false;
    loop {
        if cut.swap(false, Ordering::AcqRel) {
            // every stream ends with its cause; no sequence is left behind
            for (id, tx) in streams.drain() {
                let _ = tx.try_send(EngineEvent::Error(EngineError::ShuttingDown));
                core.abort(id);
            }
        }
        while let Ok(id) = aborts.try_recv() {
            core.abort(id);
            streams.remove(&id);
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => accept(&mut core, &mut streams, cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        publish(&core, &stats);
        if core.is_idle() {
            if disconnected {
                return;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(cmd) => accept(&mut core, &mut streams, cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => disconnected = true,
            }
            continue;
        }
        let t = Instant::now();
        let deferrals = core.scheduler().deferrals();
        let plan = core.plan();
        let planned = t.elapsed().as_secs_f64();
        let result = core.execute(plan);
        let plan = core.last_plan();
        let step_secs = t.elapsed().as_secs_f64();
        metrics::histogram!(m::STEP_TIME).record(step_secs);
        metrics::histogram!(m::SCHEDULER_TIME).record(planned);
        metrics::counter!(m::DEFERRALS).increment(core.scheduler().deferrals() - deferrals);
        for (layer, &n) in core.last_distinct_experts().iter().enumerate() {
            metrics::histogram!(m::DISTINCT_EXPERTS, "layer" => layer.to_string()).record(n as f64);
        }
        metrics::histogram!(m::BATCH_TOKENS).record(plan.num_tokens() as f64);
        metrics::histogram!(m::BATCH_SEQS).record(plan.chunks.len() as f64);
        if !plan.preempted.is_empty() {
            metrics::counter!(m::PREEMPTIONS).increment(plan.preempted.len() as u64);
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Some(sink) = &trace {
            let records = core.take_trace();
            if !records.is_empty() {
                let n = records.len() as u64;
                if sink.try_send(records).is_err() {
                    metrics::counter!(m::TRACE_DROPPED).increment(n);
                }
            }
        }
        match result {
            Ok(outputs) => {
                for o in outputs {
                    let Some(tx) = streams.get(&o.seq) else { continue };
                    let sent = tx.try_send(EngineEvent::Token(o.token)).is_ok();
                    if let Some(reason) = o.finish {
                        let _ = tx.try_send(EngineEvent::Finished(reason));
                        streams.remove(&o.seq);
                    } else if !sent {
                        // the client went away
                        core.abort(o.seq);
                        streams.remove(&o.seq);
                    }
                }
            }
            Err((ids, e)) => {
                tracing::error!(error = %e, sequences = ids.len(), "forward step failed");
                let cause = EngineError::from(&e);
                for id in ids {
                    if let Some(tx) = streams.remove(&id) {
                        let _ = tx.try_send(EngineEvent::Error(cause.clone()));
                    }
                }
            }
        }
    }
}

fn accept<E: StepBackend>(
    core: &mut EngineCore<E>,
    streams: &mut std::collections::HashMap<SeqId, tmpsc::Sender<EngineEvent>>,
    cmd: Command,
) {
    let Command::Add { id, req, events } = cmd;
    if events.is_closed() {
        return; // dropped before it arrived
    }
    match core.add(id, req) {
        Ok(()) => {
            streams.insert(id, events);
        }
        Err(e) => {
            let _ = events.try_send(EngineEvent::Error(e));
        }
    }
}

fn publish<E: StepBackend>(core: &EngineCore<E>, stats: &EngineStats) {
    let s = core.scheduler();
    let (used, total) = s.blocks_used();
    stats.running.store(s.num_running(), Ordering::Relaxed);
    stats.waiting.store(s.num_waiting(), Ordering::Relaxed);
    stats.kv_blocks_used.store(used, Ordering::Relaxed);
    stats.kv_blocks_total.store(total, Ordering::Relaxed);
    metrics::gauge!(m::RUNNING).set(s.num_running() as f64);
    metrics::gauge!(m::WAITING).set(s.num_waiting() as f64);
    metrics::gauge!(m::KV_BLOCKS_USED).set(used as f64);
    metrics::gauge!(m::KV_BLOCKS_TOTAL).set(total as f64);
}
