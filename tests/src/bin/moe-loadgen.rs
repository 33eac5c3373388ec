//! `moe-loadgen`: a closed-loop load generator for an OpenAI-compatible completions server.
//!
//! For each concurrency level `C` it starts `C` clients at once; each client sends its requests
//! one after another as streaming `POST /v1/completions` with `stream_options.include_usage`, and
//! the tool records, per request, the time to first token (TTFT), the gaps between successive
//! token chunks (inter-token latency, ITL), the output tokens reported by the usage chunk (cross-
//! checked against the number of token chunks) and any error. Per level it prints requests,
//! errors, wall time, output tokens/s and p50/p99 of TTFT and ITL; at the end a markdown table of
//! all levels and the throughput ratio of every level to the first. The exit status is non-zero
//! when any request failed.
//!
//! Prompts are deterministic slices (20-200 characters) of a text corpus, chosen from the seed
//! and the request's global index, so that every request of a run gets a different prompt and a
//! rerun with the same arguments sends exactly the same requests.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use moe_types::rng::splitmix64;
use serde_json::{json, Value};

/// Corpus location relative to the repository root (the default `--corpus`).
const DEFAULT_CORPUS: &str = "../shared/corpora/tinyshakespeare.txt";
/// Shortest and longest prompt, in characters.
const PROMPT_MIN_CHARS: usize = 20;
const PROMPT_MAX_CHARS: usize = 200;
/// Distinct error messages printed per level.
const MAX_ERRORS_SHOWN: usize = 5;

#[derive(Parser, Debug)]
#[command(name = "moe-loadgen", about = "Streaming load generator for an OpenAI-compatible /v1/completions server")]
struct Args {
    /// Base URL of the server (with or without a trailing `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name sent in every request.
    #[arg(long, default_value = "tiny-shakespeare-moe")]
    model: String,
    /// Comma-separated concurrency levels, run in order.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Text file prompts are sliced from [default: ../shared/corpora/tinyshakespeare.txt,
    /// relative to the repository root].
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "MOE_LOADGEN_API_KEY")]
    api_key: Option<String>,
    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Base seed: request `i` (counted over the whole run) is sent with `seed = base + i`, and
    /// its prompt is chosen from the same numbers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also send `"ignore_eos": true` (a common extension) so every request generates
    /// `max_tokens` tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Per-request timeout in seconds (connection to the last byte of the stream).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Before the first level, poll `GET /health` until it answers 200, for at most this many
    /// seconds (0: do not wait).
    #[arg(long, default_value_t = 0)]
    wait_ready_secs: u64,
    /// Count a request whose token-chunk count differs from the usage chunk's
    /// `completion_tokens` as failed (by default it is only reported).
    #[arg(long)]
    strict_token_count: bool,
    /// Also write the per-level results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------------------

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SseEvent {
    /// The `event:` field, when the server set one.
    event: Option<String>,
    /// The `data:` lines of the event joined with `\n`.
    data: String,
}

/// Incremental parser for a `text/event-stream` body.
///
/// Bytes are fed as they arrive, so a line (or a multi-byte UTF-8 character) may be split across
/// reads; only complete lines are interpreted. Lines end with `\n` or `\r\n`; an empty line
/// dispatches the event built from the preceding `data:` lines; lines starting with `:` are
/// comments; `id:` and `retry:` are ignored.
#[derive(Debug, Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
    event: Option<String>,
}

impl SseParser {
    /// Feeds bytes and returns every event completed by them.
    fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            if let Some(ev) = self.line(&line) {
                events.push(ev);
            }
        }
        self.buf.drain(..start);
        events
    }

    /// Call at end of stream: interprets an unterminated last line and dispatches an event that
    /// was not followed by a blank line (lenient: the SSE spec would drop it).
    fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(rest.strip_suffix(b"\r").unwrap_or(&rest)).into_owned();
            if let Some(ev) = self.line(&line) {
                return Some(ev);
            }
        }
        self.dispatch()
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        self.data.take().map(|data| SseEvent { event, data })
    }
}

// ---------------------------------------------------------------------------------------------
// One streaming request
// ---------------------------------------------------------------------------------------------

/// What one request measured.
#[derive(Debug, Default)]
struct RequestResult {
    error: Option<String>,
    ttft: Option<Duration>,
    itls: Vec<Duration>,
    /// `usage.completion_tokens` of the usage chunk.
    output_tokens: u64,
    /// Chunks that carried a generated token.
    token_chunks: u64,
    /// The usage chunk and the token-chunk count disagree.
    count_mismatch: bool,
}

/// State of one response stream while its events are interpreted.
#[derive(Debug, Default)]
struct StreamState {
    done: bool,
    usage_completion_tokens: Option<u64>,
    token_chunks: u64,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    itls: Vec<Duration>,
}

impl StreamState {
    /// Interprets one SSE event received at `at`. Errors are server-reported failures.
    fn on_event(&mut self, ev: &SseEvent, at: Instant) -> Result<()> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        if ev.event.as_deref() == Some("error") {
            bail!("server error event: {}", error_message(data));
        }
        if data.is_empty() {
            return Ok(());
        }
        match serde_json::from_str::<Value>(data) {
            Ok(v) => self.on_chunk(&v, at),
            // Tolerate servers that put several `data:` lines in one event.
            Err(e) if data.contains('\n') => {
                for line in data.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    if line == "[DONE]" {
                        self.done = true;
                        continue;
                    }
                    let v: Value =
                        serde_json::from_str(line).with_context(|| format!("bad chunk JSON ({e}): {line}"))?;
                    self.on_chunk(&v, at)?;
                }
                Ok(())
            }
            Err(e) => bail!("bad chunk JSON ({e}): {}", truncate(data, 200)),
        }
    }

    fn on_chunk(&mut self, v: &Value, at: Instant) -> Result<()> {
        if let Some(err) = v.get("error") {
            bail!("server error in stream: {}", error_message(&err.to_string()));
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            let n = usage
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .context("usage chunk without an integer completion_tokens")?;
            self.usage_completion_tokens = Some(n);
        }
        let choices = v.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        if choices.iter().any(is_token_choice) {
            self.token_chunks += 1;
            if self.first_token.is_none() {
                self.first_token = Some(at);
            }
            if let Some(prev) = self.last_token {
                self.itls.push(at.saturating_duration_since(prev));
            }
            self.last_token = Some(at);
        }
        Ok(())
    }
}

/// Whether a streamed choice carries a generated token: it has non-empty text (or chat delta
/// content, or token ids/logprob tokens), or it is a non-final chunk (`finish_reason` null) with a
/// text field -- the server sends one chunk per token even when the token's text is held back
/// (an incomplete UTF-8 sequence, a possible stop string).
fn is_token_choice(choice: &Value) -> bool {
    let text = choice.get("text").or_else(|| choice.get("delta").and_then(|d| d.get("content")));
    let non_empty_text = text.and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    let has_ids = ["token_ids", "tokens"]
        .iter()
        .filter_map(|k| choice.get(k).or_else(|| choice.get("logprobs").and_then(|l| l.get(k))))
        .any(|a| a.as_array().is_some_and(|a| !a.is_empty()));
    let non_final = choice.get("finish_reason").is_none_or(Value::is_null);
    non_empty_text || has_ids || (non_final && text.is_some_and(Value::is_string))
}

/// Extracts `error.message` from an OpenAI error envelope, or returns the text itself.
fn error_message(body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let e = v.get("error").unwrap_or(&v);
        e.get("message").and_then(Value::as_str).map(str::to_string)
    });
    truncate(&msg.unwrap_or_else(|| body.to_string()), 300)
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Shared, read-only state of a run.
struct Ctx {
    client: reqwest::Client,
    endpoint: String,
    args: Args,
    corpus: Corpus,
}

/// Prompt text with its character boundaries indexed once, so choosing a
/// prompt costs nothing next to the request (the load generator shares the
/// machine with the server it measures).
struct Corpus {
    text: String,
    /// Byte offset of every character, then the text's length.
    starts: Vec<usize>,
}

impl Corpus {
    fn new(text: String) -> Self {
        let starts = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
        Self { text, starts }
    }

    fn chars(&self) -> usize {
        self.starts.len() - 1
    }
}

/// Sends request number `index` (global over the run) and measures it.
async fn run_request(ctx: &Ctx, index: u64) -> RequestResult {
    let mut res = RequestResult::default();
    let seed = ctx.args.seed.wrapping_add(index);
    let mut body = json!({
        "model": ctx.args.model,
        "prompt": prompt_for(&ctx.corpus, seed),
        "max_tokens": ctx.args.max_tokens,
        "temperature": ctx.args.temperature,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if ctx.args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let start = Instant::now();
    match stream_request(ctx, &body, start).await {
        Ok(st) => {
            res.ttft = st.first_token.map(|t| t.saturating_duration_since(start));
            res.itls = st.itls;
            res.token_chunks = st.token_chunks;
            match st.usage_completion_tokens {
                Some(n) => {
                    res.output_tokens = n;
                    res.count_mismatch = n != st.token_chunks;
                    if res.count_mismatch && ctx.args.strict_token_count {
                        res.error = Some(format!(
                            "usage says {n} completion tokens, stream had {} token chunks",
                            st.token_chunks
                        ));
                    }
                }
                None => res.error = Some("stream ended without a usage chunk".to_string()),
            }
        }
        Err(e) => res.error = Some(format!("{e:#}")),
    }
    res
}

async fn stream_request(ctx: &Ctx, body: &Value, start: Instant) -> Result<StreamState> {
    let mut req = ctx.client.post(&ctx.endpoint).json(body);
    if let Some(key) = &ctx.args.api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.context("sending request")?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("HTTP {}: {}", status.as_u16(), error_message(&text));
    }
    let mut parser = SseParser::default();
    let mut st = StreamState::default();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("reading response stream")?;
        let at = Instant::now();
        for ev in parser.feed(&chunk) {
            st.on_event(&ev, at)?;
            if st.done {
                return Ok(st);
            }
        }
    }
    if let Some(ev) = parser.finish() {
        st.on_event(&ev, Instant::now())?;
    }
    if !st.done {
        bail!("stream ended without data: [DONE] after {:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(st)
}

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

/// A deterministic slice of 20-200 characters (fewer only if the corpus is shorter) chosen by
/// `key`; different keys give different slices with overwhelming probability.
fn prompt_for(corpus: &Corpus, key: u64) -> &str {
    let h1 = splitmix64(key);
    let h2 = splitmix64(h1 ^ 0x5DEE_CE66_D1CE_4E5B);
    let want = PROMPT_MIN_CHARS + (h2 % (PROMPT_MAX_CHARS - PROMPT_MIN_CHARS + 1) as u64) as usize;
    let chars = corpus.chars();
    let len = want.min(chars);
    let first = (h1 % (chars - len + 1) as u64) as usize;
    &corpus.text[corpus.starts[first]..corpus.starts[first + len]]
}

fn load_corpus(path: Option<&Path>) -> Result<Corpus> {
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        // The default is relative to the repository root: try the current directory (the usual
        // place to run from), then the root this binary was built from.
        None => {
            vec![PathBuf::from(DEFAULT_CORPUS), Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(DEFAULT_CORPUS)]
        }
    };
    let found = candidates.iter().find(|p| p.is_file()).with_context(|| {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!("corpus not found (tried {}); pass --corpus PATH", tried.join(", "))
    })?;
    let text = std::fs::read_to_string(found).with_context(|| format!("reading corpus {}", found.display()))?;
    let corpus = Corpus::new(text);
    if corpus.chars() < PROMPT_MIN_CHARS {
        bail!("corpus {} has fewer than {PROMPT_MIN_CHARS} characters", found.display());
    }
    Ok(corpus)
}

// ---------------------------------------------------------------------------------------------
// Levels and statistics
// ---------------------------------------------------------------------------------------------

/// Aggregated results of one concurrency level.
#[derive(Debug)]
struct LevelReport {
    clients: usize,
    requests: usize,
    errors: usize,
    wall: Duration,
    output_tokens: u64,
    count_mismatches: usize,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
    error_samples: Vec<String>,
}

impl LevelReport {
    fn tokens_per_s(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.output_tokens as f64 / secs
        } else {
            0.0
        }
    }
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100); `None` when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// Runs one level: `clients` concurrent clients, each sending its requests in sequence.
/// `first_index` is the global index of the level's first request.
async fn run_level(ctx: Arc<Ctx>, clients: usize, first_index: u64) -> Result<LevelReport> {
    let per_client = ctx.args.requests_per_client;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(clients);
    for c in 0..clients {
        let ctx = Arc::clone(&ctx);
        handles.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_client);
            for r in 0..per_client {
                let index = first_index + (c * per_client + r) as u64;
                out.push(run_request(&ctx, index).await);
            }
            out
        }));
    }
    let mut results = Vec::with_capacity(clients * per_client);
    for h in handles {
        results.extend(h.await.context("client task panicked")?);
    }
    let wall = start.elapsed();

    let mut report = LevelReport {
        clients,
        requests: results.len(),
        errors: 0,
        wall,
        output_tokens: 0,
        count_mismatches: 0,
        ttft_ms: Vec::new(),
        itl_ms: Vec::new(),
        error_samples: Vec::new(),
    };
    for r in results {
        if let Some(e) = r.error {
            report.errors += 1;
            if report.error_samples.len() < MAX_ERRORS_SHOWN && !report.error_samples.contains(&e) {
                report.error_samples.push(e);
            }
            continue;
        }
        report.output_tokens += r.output_tokens;
        report.count_mismatches += usize::from(r.count_mismatch);
        report.ttft_ms.extend(r.ttft.map(|d| d.as_secs_f64() * 1e3));
        report.itl_ms.extend(r.itls.iter().map(|d| d.as_secs_f64() * 1e3));
    }
    report.ttft_ms.sort_by(f64::total_cmp);
    report.itl_ms.sort_by(f64::total_cmp);
    Ok(report)
}

fn print_level(r: &LevelReport) {
    println!(
        "clients={:<3} requests={} errors={} wall={:.2}s output_tokens={} tokens/s={:.1} \
         TTFT p50={} p99={} ms  ITL p50={} p99={} ms",
        r.clients,
        r.requests,
        r.errors,
        r.wall.as_secs_f64(),
        r.output_tokens,
        r.tokens_per_s(),
        fmt_ms(percentile(&r.ttft_ms, 50.0)),
        fmt_ms(percentile(&r.ttft_ms, 99.0)),
        fmt_ms(percentile(&r.itl_ms, 50.0)),
        fmt_ms(percentile(&r.itl_ms, 99.0)),
    );
    if r.count_mismatches > 0 {
        eprintln!(
            "  warning: {} request(s) had a token-chunk count different from usage.completion_tokens",
            r.count_mismatches
        );
    }
    for e in &r.error_samples {
        eprintln!("  error: {e}");
    }
}

fn clients_label(n: usize) -> String {
    if n == 1 {
        "1 client".to_string()
    } else {
        format!("{n} clients")
    }
}

fn ratio(r: &LevelReport, base: &LevelReport) -> Option<f64> {
    let b = base.tokens_per_s();
    (b > 0.0).then(|| r.tokens_per_s() / b)
}

fn print_summary(reports: &[LevelReport]) {
    let Some(base) = reports.first() else { return };
    println!();
    println!(
        "| clients | requests | errors | wall s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tok/s vs {} |",
        clients_label(base.clients)
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {} | {} | {} | {} | {} |",
            r.clients,
            r.requests,
            r.errors,
            r.wall.as_secs_f64(),
            r.tokens_per_s(),
            fmt_ms(percentile(&r.ttft_ms, 50.0)),
            fmt_ms(percentile(&r.ttft_ms, 99.0)),
            fmt_ms(percentile(&r.itl_ms, 50.0)),
            fmt_ms(percentile(&r.itl_ms, 99.0)),
            ratio(r, base).map_or_else(|| "-".to_string(), |x| format!("{x:.2}x")),
        );
    }
    println!();
    for r in &reports[1..] {
        println!(
            "tokens/s at {} / tokens/s at {} = {}",
            clients_label(r.clients),
            clients_label(base.clients),
            ratio(r, base).map_or_else(|| "n/a (no tokens at the first level)".to_string(), |x| format!("{x:.2}")),
        );
    }
}

fn report_json(reports: &[LevelReport]) -> Value {
    let base = reports.first();
    let levels: Vec<Value> = reports
        .iter()
        .map(|r| {
            json!({
                "clients": r.clients,
                "requests": r.requests,
                "errors": r.errors,
                "wall_s": r.wall.as_secs_f64(),
                "output_tokens": r.output_tokens,
                "output_tokens_per_s": r.tokens_per_s(),
                "ttft_p50_ms": percentile(&r.ttft_ms, 50.0),
                "ttft_p99_ms": percentile(&r.ttft_ms, 99.0),
                "itl_p50_ms": percentile(&r.itl_ms, 50.0),
                "itl_p99_ms": percentile(&r.itl_ms, 99.0),
                "token_count_mismatches": r.count_mismatches,
                "tokens_per_s_vs_first": base.and_then(|b| ratio(r, b)),
                "error_samples": r.error_samples,
            })
        })
        .collect();
    json!({ "levels": levels })
}

/// Polls `GET {base}/health` until it answers 200 or `secs` pass.
async fn wait_ready(client: &reqwest::Client, base: &str, secs: u64) -> Result<()> {
    let url = format!("{base}/health");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ok = client.get(&url).timeout(Duration::from_secs(5)).send().await.is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer 200 within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(args: Args) -> Result<bool> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency must be a list of positive integers");
    }
    if args.requests_per_client == 0 {
        bail!("--requests-per-client must be positive");
    }
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be >= 0");
    }
    let corpus = load_corpus(args.corpus.as_deref())?;
    let trimmed = args.url.trim_end_matches('/');
    let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_secs))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building HTTP client")?;
    if args.wait_ready_secs > 0 {
        wait_ready(&client, &base, args.wait_ready_secs).await?;
    }
    println!(
        "moe-loadgen: {base}/v1/completions model={} levels={:?} requests/client={} max_tokens={} temperature={} seed={}",
        args.model, args.concurrency, args.requests_per_client, args.max_tokens, args.temperature, args.seed
    );
    let levels = args.concurrency.clone();
    let per_client = args.requests_per_client as u64;
    let json_out = args.json_out.clone();
    let ctx = Arc::new(Ctx { client, endpoint: format!("{base}/v1/completions"), args, corpus });

    let mut reports = Vec::with_capacity(levels.len());
    let mut next_index = 0u64;
    for &clients in &levels {
        let report = run_level(Arc::clone(&ctx), clients, next_index).await?;
        next_index += clients as u64 * per_client;
        print_level(&report);
        reports.push(report);
    }
    print_summary(&reports);
    if let Some(path) = json_out {
        let text = serde_json::to_string_pretty(&report_json(&reports))?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: usize = reports.iter().map(|r| r.errors).sum();
    if failed > 0 {
        eprintln!("moe-loadgen: {failed} request(s) failed");
    }
    Ok(failed == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moe-loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("moe-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent { event: None, data: s.to_string() }
    }

    #[test]
    fn sse_split_across_reads() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":\r\n\r\n: comment\n\nevent: error\ndata: x\n\ndata: [DONE]\n\n";
        // Feed one byte at a time and all at once: same events.
        let mut p = SseParser::default();
        let mut byte_events = Vec::new();
        for b in body.iter() {
            byte_events.extend(p.feed(std::slice::from_ref(b)));
        }
        let mut q = SseParser::default();
        let whole = q.feed(body);
        assert_eq!(byte_events, whole);
        assert_eq!(
            whole,
            vec![
                data("{\"a\":1}"),
                data("{\"b\":"),
                SseEvent { event: Some("error".into()), data: "x".into() },
                data("[DONE]")
            ]
        );
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_multiline_and_unterminated() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: a\ndata:b\n").is_empty());
        assert_eq!(p.feed(b"\n"), vec![data("a\nb")]);
        assert!(p.feed(b"data: [DONE]").is_empty());
        assert_eq!(p.finish(), Some(data("[DONE]")));
    }

    #[test]
    fn sse_utf8_split() {
        let mut p = SseParser::default();
        let s = "data: é\n\n".as_bytes();
        assert!(p.feed(&s[..7]).is_empty());
        assert_eq!(p.feed(&s[7..]), vec![data("é")]);
    }

    #[test]
    fn stream_state_counts_tokens_and_usage() {
        let mut st = StreamState::default();
        let t0 = Instant::now();
        let chunk = |text: &str, fin: Value| {
            data(&json!({"choices":[{"index":0,"text":text,"finish_reason":fin}],"usage":null}).to_string())
        };
        st.on_event(&chunk("Hello", Value::Null), t0).unwrap();
        st.on_event(&chunk("", Value::Null), t0 + Duration::from_millis(10)).unwrap();
        st.on_event(&chunk(" world", Value::Null), t0 + Duration::from_millis(30)).unwrap();
        st.on_event(&chunk("", json!("length")), t0 + Duration::from_millis(40)).unwrap();
        let usage = json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}});
        st.on_event(&data(&usage.to_string()), t0 + Duration::from_millis(41)).unwrap();
        assert!(!st.done);
        st.on_event(&data("[DONE]"), t0 + Duration::from_millis(42)).unwrap();
        assert!(st.done);
        assert_eq!(st.token_chunks, 3);
        assert_eq!(st.usage_completion_tokens, Some(3));
        assert_eq!(st.first_token, Some(t0));
        assert_eq!(st.itls, vec![Duration::from_millis(10), Duration::from_millis(20)]);
    }

    #[test]
    fn stream_errors() {
        let mut st = StreamState::default();
        let err = json!({"error":{"message":"boom","type":"server_error","param":null,"code":null}});
        let e = st.on_event(&data(&err.to_string()), Instant::now()).unwrap_err();
        assert!(format!("{e}").contains("boom"));
        let ev = SseEvent { event: Some("error".into()), data: err.to_string() };
        assert!(st.on_event(&ev, Instant::now()).is_err());
        assert!(st.on_event(&data("{not json"), Instant::now()).is_err());
    }

    #[test]
    fn prompts_are_deterministic_and_bounded() {
        let corpus = Corpus::new("First Citizen:\nBefore we proceed any further, hear me speak.\n".repeat(200));
        let mut seen = std::collections::HashSet::new();
        for k in 0..500 {
            let p = prompt_for(&corpus, k);
            assert_eq!(p, prompt_for(&corpus, k));
            let n = p.chars().count();
            assert!((PROMPT_MIN_CHARS..=PROMPT_MAX_CHARS).contains(&n), "{n}");
            seen.insert((p.as_ptr() as usize, n));
        }
        assert!(seen.len() > 490);
        let short = Corpus::new("ééééééééééééééééééééééé".into()); // 23 two-byte chars
        for k in 0..50 {
            let p = prompt_for(&short, k);
            assert!(p.chars().count() >= PROMPT_MIN_CHARS);
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn error_envelope() {
        assert_eq!(error_message(r#"{"error":{"message":"no such model","type":"x"}}"#), "no such model");
        assert_eq!(error_message("plain"), "plain");
    }
}
