//! `moe-faultload`: a bounded load-and-fault test against the real `moe-serve` binary.
//!
//! It starts the server on free loopback ports (REST and gRPC) with an API key, then:
//!
//! 1. **References**: runs every distinct valid request alone (greedy, temperature 0) and keeps
//!    its text and finish reason.
//! 2. **Load**: `--requests` requests from `--clients` concurrent clients over REST and gRPC. About
//!    `--hostile-fraction` of them are malformed or hostile (bad JSON, wrong types, huge numbers,
//!    unknown fields, oversize bodies, invalid UTF-8, bad token ids, absurd `max_tokens`, wrong or
//!    path-like model names, missing or wrong API key, too many stop strings / `logit_bias`
//!    entries / choices, over-long prompts, unknown paths, junk bytes on both ports, undecodable
//!    protobuf), about `--disconnect-fraction` disconnect mid-stream or are cancelled (REST and
//!    gRPC, unary and streaming, plus gRPC deadlines); the rest are valid.
//! 3. **Checks**: no "panicked" on the server's stderr; no 5xx (or gRPC INTERNAL/UNKNOWN) for a
//!    valid request; every valid request returns exactly its reference text and finish reason;
//!    every hostile request gets its expected 4xx / gRPC code; `moe_kv_blocks_used`,
//!    `moe_running_sequences` and `moe_waiting_sequences` on `/metrics` return to zero; the
//!    server's resident memory (VmRSS) in the second half of the run does not exceed the first
//!    half's peak by more than `--rss-tolerance` (fraction, 2%) plus `--rss-slack-mib` (4):
//!    about 5 KiB per request over the second half's 1,000 requests (the growth per request
//!    is printed); unreadable or too few VmRSS samples fail.
//! 4. **Hardening** (`moe_tests::hardening`): 64 concurrent prompts at the body limit are refused
//!    with a bounded rise in VmRSS; 200 half-sent request heads are closed within the header
//!    timeout while `/health` answers; 64 connections over `--max-connections` get an
//!    immediate 503 while an open keep-alive connection keeps working; a slow body gets 408;
//!    no cleartext HTTP/2 on the REST port; a lowercase `bearer` scheme works and a 401 carries
//!    `WWW-Authenticate`; special-token text in chat content is tokenized as text; an oversized
//!    gRPC response is OUT_OF_RANGE; seeded sampling (8 seeds, n = 4, 200 tokens) gives the same texts and log-probabilities alone
//!    and beside 24 other long requests.
//! 5. **SIGTERM under load**: with long requests in flight on every transport, sends SIGTERM; the
//!    in-flight requests must finish with their reference text within `--shutdown-grace-secs`,
//!    new requests on fresh connections must get 503 (the listener keeps accepting while requests
//!    drain) and UNAVAILABLE over gRPC, and the process must exit 0 within the grace period.
//! 6. **A full queue**: a server with `--max-num-seqs 1 --max-waiting 1` gets four long
//!    requests at once; those over the limit get 429 with `Retry-After`, the rest 200.
//! 7. **Streams cut by the grace period**: another server with `--shutdown-grace-secs 0` and
//!    16 streams open (SSE and gRPC) at SIGTERM: each ends with its cause (an SSE error event
//!    of OpenAI's shape and a clean end of the response; gRPC UNAVAILABLE "shutting down"),
//!    none silently, and the process exits 0.
//!
//! Prints a summary (requests by kind, outcomes by kind and status, latency percentiles, RSS) and
//! exits non-zero on any failed check. Everything is deterministic given `--seed` except timing.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use moe_proto::v1 as pb;
use moe_proto::v1::generation_client::GenerationClient;
use moe_types::rng::SplitMix64;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// API key the server is started with.
const API_KEY: &str = "faultload-secret-key";
/// Request body limit the server is started with (`--max-body-bytes`).
const MAX_BODY: usize = 256 * 1024;
/// Prompt limit the server is started with (`--max-prompt-tokens`).
const MAX_PROMPT_TOKENS: usize = 256;
/// `max_tokens` limit the server is started with (`--max-tokens-limit`).
const MAX_TOKENS_LIMIT: usize = 256;
/// Header-read timeout the server is started with (`--header-timeout-secs`).
const HEADER_TIMEOUT_SECS: u64 = 2;
/// Body-read timeout the server is started with (`--body-timeout-secs`).
const BODY_TIMEOUT_SECS: u64 = 2;
/// Connection limit the server is started with (`--max-connections`).
const MAX_CONNECTIONS: usize = 512;
/// `max_tokens` of the valid load requests.
const VALID_MAX_TOKENS: [u32; 2] = [8, 16];
/// `max_tokens` of requests that will be disconnected or cancelled.
const DISCONNECT_MAX_TOKENS: u32 = 96;
/// `max_tokens` of the requests in flight at SIGTERM.
const SIGTERM_MAX_TOKENS: u32 = 128;
/// Failure samples printed.
const MAX_SAMPLES: usize = 12;

const PROMPTS: [&str; 16] = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter of our discontent",
    "MENENIUS:\nWhat work's, my countrymen, in hand?",
    "All:\nSpeak, speak.",
    "HAMLET:\nTo be, or not to be",
    "DUKE VINCENTIO:\nThe duke is",
    "LADY CAPULET:",
    "Second Citizen:\nWould you proceed especially against Caius Marcius?",
    "GLOUCESTER:\nWhy, what's the matter?",
    "QUEEN ELIZABETH:\nMy lord,",
    "BRUTUS:\nThe people",
    "CORIOLANUS:\nWhat's the matter, you dissentious rogues,",
    "PETRUCHIO:\nGood morrow, Kate; for that's your name, I hear.",
    "Nurse:\nNow, by my maidenhead, at twelve year old,",
];

#[derive(Parser, Debug, Clone)]
#[command(name = "moe-faultload", about = "Load-and-fault test against a real moe-serve binary (loopback only)")]
struct Args {
    /// The server binary to start.
    #[arg(long, default_value = "target/debug/moe-serve")]
    server: PathBuf,
    /// Requests in the load phase.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients in the load phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Share of malformed or hostile requests.
    #[arg(long, default_value_t = 0.2)]
    hostile_fraction: f64,
    /// Share of requests disconnected mid-stream or cancelled.
    #[arg(long, default_value_t = 0.1)]
    disconnect_fraction: f64,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The server's `--shutdown-grace-secs`; in-flight requests must finish within it.
    #[arg(long, default_value_t = 20)]
    shutdown_grace_secs: u64,
    /// Requests in flight when SIGTERM is sent.
    #[arg(long, default_value_t = 24)]
    sigterm_inflight: usize,
    /// Allowed RSS growth of the second half over the first half's peak, as a fraction ...
    #[arg(long, default_value_t = 0.02)]
    rss_tolerance: f64,
    /// ... plus this many MiB (with the defaults about 5 MiB over the second half's 1,000
    /// requests: a leak of 5 KiB per request fails; measured here: under 1 KiB).
    #[arg(long, default_value_t = 4)]
    rss_slack_mib: u64,
    /// Start the server with `MALLOC_ARENA_MAX=2`. glibc keeps up to 8 malloc arenas per core,
    /// each holding on to its own peak; capping them tells a leak from that retention.
    #[arg(long)]
    cap_arenas: bool,
    /// Fail if the whole run takes longer than this.
    #[arg(long, default_value_t = 240)]
    time_limit_secs: u64,
    /// Also write the server's stderr to this file.
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Deterministic choices
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (moe-types), seeded apart from other uses of the same seed.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    fn unit(&mut self) -> f64 {
        self.0.unit()
    }
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

struct Server {
    child: Child,
    pid: u32,
    http: SocketAddr,
    grpc: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server with `grace_secs` as its `--shutdown-grace-secs`,
    /// and `extra` flags after the common ones.
    fn start(args: &Args, grace_secs: u64, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(&args.server)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--api-key", API_KEY])
            .args(extra)
            .args(["--shutdown-grace-secs", &grace_secs.to_string()])
            .args(["--max-body-bytes", &MAX_BODY.to_string()])
            .args(["--max-prompt-tokens", &MAX_PROMPT_TOKENS.to_string()])
            .args(["--max-tokens-limit", &MAX_TOKENS_LIMIT.to_string()])
            .args(["--kv-cache-tokens", "32768"])
            .args(["--header-timeout-secs", &HEADER_TIMEOUT_SECS.to_string()])
            .args(["--body-timeout-secs", &BODY_TIMEOUT_SECS.to_string()])
            .args(["--max-connections", &MAX_CONNECTIONS.to_string()])
            .env_remove("MOE_CONFIG")
            .env("RUST_BACKTRACE", "1")
            .envs(args.cap_arenas.then_some(("MALLOC_ARENA_MAX", "2")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", args.server.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let sink = log.clone();
        let mut file = match &args.server_log {
            Some(p) => Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
            None => None,
        };
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).into_owned();
                if let Some(f) = file.as_mut() {
                    let _ = std::io::Write::write_all(f, line.as_bytes());
                }
                if line.starts_with("listening on ") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push_str(&line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).context("the server did not print its addresses")?;
        // "listening on http://127.0.0.1:PORT (REST) and 127.0.0.1:PORT (gRPC)"
        let words: Vec<&str> = line.split_whitespace().collect();
        let http = words.get(2).and_then(|w| w.strip_prefix("http://")).context("no REST address")?.parse()?;
        let grpc = words.get(5).context("no gRPC address")?.parse()?;
        Ok(Self { child, pid, http, grpc, log })
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// What a valid request asks: its family (completion text or chat), prompt and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RefKey {
    chat: bool,
    prompt: usize,
    max_tokens: u32,
    ignore_eos: bool,
}

/// A reference result: text and finish reason of the request run alone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    text: String,
    finish: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Valid,
    Disconnect,
    Hostile,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Valid => "valid",
            Class::Disconnect => "disconnect",
            Class::Hostile => "hostile",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ValidKind {
    RestCompletion,
    RestCompletionStream,
    RestCompletionN2,
    RestTokenIds,
    RestChat,
    RestChatStream,
    GrpcGenerate,
    GrpcStream,
    GrpcTokenIds,
}

const VALID_KINDS: [ValidKind; 9] = [
    ValidKind::RestCompletion,
    ValidKind::RestCompletionStream,
    ValidKind::RestCompletionN2,
    ValidKind::RestTokenIds,
    ValidKind::RestChat,
    ValidKind::RestChatStream,
    ValidKind::GrpcGenerate,
    ValidKind::GrpcStream,
    ValidKind::GrpcTokenIds,
];

impl ValidKind {
    fn name(self) -> &'static str {
        match self {
            ValidKind::RestCompletion => "rest.completion",
            ValidKind::RestCompletionStream => "rest.completion.stream",
            ValidKind::RestCompletionN2 => "rest.completion.n2",
            ValidKind::RestTokenIds => "rest.completion.token_ids",
            ValidKind::RestChat => "rest.chat",
            ValidKind::RestChatStream => "rest.chat.stream",
            ValidKind::GrpcGenerate => "grpc.generate",
            ValidKind::GrpcStream => "grpc.stream",
            ValidKind::GrpcTokenIds => "grpc.generate.token_ids",
        }
    }
    fn chat(self) -> bool {
        matches!(self, ValidKind::RestChat | ValidKind::RestChatStream)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DisconnectKind {
    RestStreamDrop,
    RestAbort,
    RestChatStreamDrop,
    GrpcStreamDrop,
    GrpcCancel,
    GrpcDeadline,
}

const DISCONNECT_KINDS: [DisconnectKind; 6] = [
    DisconnectKind::RestStreamDrop,
    DisconnectKind::RestAbort,
    DisconnectKind::RestChatStreamDrop,
    DisconnectKind::GrpcStreamDrop,
    DisconnectKind::GrpcCancel,
    DisconnectKind::GrpcDeadline,
];

impl DisconnectKind {
    fn name(self) -> &'static str {
        match self {
            DisconnectKind::RestStreamDrop => "rest.stream.drop",
            DisconnectKind::RestAbort => "rest.abort",
            DisconnectKind::RestChatStreamDrop => "rest.chat.stream.drop",
            DisconnectKind::GrpcStreamDrop => "grpc.stream.drop",
            DisconnectKind::GrpcCancel => "grpc.cancel",
            DisconnectKind::GrpcDeadline => "grpc.deadline",
        }
    }
}

/// One malformed or hostile REST request: what is sent and which statuses are right.
struct RestHostile {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    auth: Option<&'static str>,
    expect: &'static [u16],
}

/// One malformed or hostile gRPC request.
enum GrpcHostile {
    /// A well-formed message that must be refused with one of `expect`.
    Message { name: &'static str, req: Box<pb::GenerateRequest>, auth: bool, expect: &'static [tonic::Code] },
    /// Raw bytes as the request message of `Generate`.
    Raw { name: &'static str, bytes: Vec<u8>, expect: &'static [tonic::Code] },
}

/// Junk bytes straight onto a port.
struct Junk {
    name: &'static str,
    grpc_port: bool,
    bytes: Vec<u8>,
}

enum Hostile {
    Rest(RestHostile),
    Grpc(GrpcHostile),
    Junk(Junk),
}

/// Number of distinct hostile cases `hostile_case` knows.
const HOSTILE_CASES: usize = 34;

fn long_prompt() -> String {
    "Now is the winter of our discontent made glorious summer by this sun of York; ".repeat(40)
}

fn rest(name: &'static str, body: Value, expect: &'static [u16]) -> Hostile {
    Hostile::Rest(RestHostile {
        name,
        method: "POST",
        path: "/v1/completions",
        body: body.to_string().into_bytes(),
        auth: Some(API_KEY),
        expect,
    })
}

fn rest_raw(name: &'static str, path: &'static str, body: &[u8], expect: &'static [u16]) -> Hostile {
    Hostile::Rest(RestHostile { name, method: "POST", path, body: body.to_vec(), auth: Some(API_KEY), expect })
}

fn grpc_msg(
    name: &'static str,
    edit: impl FnOnce(&mut pb::GenerateRequest),
    expect: &'static [tonic::Code],
) -> Hostile {
    let mut req = grpc_request("ROMEO:", 4);
    edit(&mut req);
    Hostile::Grpc(GrpcHostile::Message { name, req: Box::new(req), auth: true, expect })
}

/// The `i`-th hostile case (`i < HOSTILE_CASES`).
fn hostile_case(i: usize, rng: &mut Rng) -> Hostile {
    use tonic::Code;
    const BAD: &[u16] = &[400];
    const INVALID: &[Code] = &[Code::InvalidArgument];
    match i {
        0 => rest_raw("rest.bad_json", "/v1/completions", br#"{"prompt": "x", "max_tokens": "#, BAD),
        1 => rest("rest.wrong_type", json!({"prompt": "x", "max_tokens": "ten"}), BAD),
        2 => rest_raw("rest.huge_number", "/v1/completions", br#"{"prompt": "x", "max_tokens": 1e400}"#, BAD),
        3 => rest_raw(
            "rest.huge_integer",
            "/v1/completions",
            br#"{"prompt": "x", "max_tokens": 18446744073709551616, "seed": 1e30}"#,
            BAD,
        ),
        4 => rest("rest.huge_temperature", json!({"prompt": "x", "max_tokens": 4, "temperature": 1e308}), BAD),
        5 => rest("rest.unknown_field", json!({"prompt": "x", "max_tokens": 4, "frobnicate": true}), BAD),
        6 => {
            let body = json!({"prompt": "a".repeat(MAX_BODY + 1 + rng.below(4096)), "max_tokens": 4});
            rest("rest.oversize_body", body, &[413])
        }
        7 => {
            rest_raw("rest.invalid_utf8", "/v1/completions", b"{\"prompt\": \"\xff\xfe\xfd\", \"max_tokens\": 4}", BAD)
        }
        8 => rest("rest.bad_token_ids", json!({"prompt": [99_999_999], "max_tokens": 4}), BAD),
        9 => rest("rest.negative_token_id", json!({"prompt": [[1, 2], [3, -1]], "max_tokens": 4}), BAD),
        10 => rest("rest.absurd_max_tokens", json!({"prompt": "x", "max_tokens": 1_000_000_000}), BAD),
        11 => rest("rest.zero_max_tokens", json!({"prompt": "x", "max_tokens": 0}), BAD),
        12 => rest("rest.wrong_model", json!({"model": "gpt-4o", "prompt": "x", "max_tokens": 4}), &[404]),
        13 => {
            rest("rest.path_model", json!({"model": "../../../../etc/passwd", "prompt": "x", "max_tokens": 4}), &[404])
        }
        14 => Hostile::Rest(RestHostile {
            name: "rest.missing_auth",
            method: "POST",
            path: "/v1/completions",
            body: json!({"prompt": "x", "max_tokens": 4}).to_string().into_bytes(),
            auth: None,
            expect: &[401],
        }),
        15 => Hostile::Rest(RestHostile {
            name: "rest.wrong_auth",
            method: "POST",
            path: "/v1/chat/completions",
            body: json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}).to_string().into_bytes(),
            auth: Some("not-the-key"),
            expect: &[401],
        }),
        16 => rest("rest.too_many_stops", json!({"prompt": "x", "max_tokens": 4, "stop": vec!["a"; 64]}), BAD),
        17 => {
            let bias: serde_json::Map<String, Value> = (0..1000).map(|i| (i.to_string(), json!(1.0))).collect();
            rest("rest.huge_logit_bias", json!({"prompt": "x", "max_tokens": 4, "logit_bias": bias}), BAD)
        }
        18 => rest("rest.huge_n", json!({"prompt": "x", "max_tokens": 4, "n": 100_000}), BAD),
        19 => rest("rest.prompt_too_long", json!({"prompt": long_prompt(), "max_tokens": 4}), BAD),
        20 => rest("rest.not_object", json!([1, 2, 3]), BAD),
        21 => rest_raw(
            "rest.chat_bad_role",
            "/v1/chat/completions",
            br#"{"messages": [{"role": "root", "content": 5}], "max_tokens": 4}"#,
            BAD,
        ),
        22 => Hostile::Rest(RestHostile {
            name: "rest.unknown_path",
            method: "GET",
            path: "/v1/../../etc/passwd",
            body: Vec::new(),
            auth: Some(API_KEY),
            expect: &[404, 400],
        }),
        23 => Hostile::Rest(RestHostile {
            name: "rest.wrong_method",
            method: "GET",
            path: "/v1/completions",
            body: Vec::new(),
            auth: Some(API_KEY),
            expect: &[405],
        }),
        24 => Hostile::Junk(Junk {
            name: "rest.junk_bytes",
            grpc_port: false,
            bytes: b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n".to_vec(),
        }),
        25 => grpc_msg("grpc.wrong_model", |r| r.model = "../etc/passwd".into(), &[Code::NotFound]),
        26 => Hostile::Grpc(GrpcHostile::Message {
            name: "grpc.missing_auth",
            req: Box::new(grpc_request("ROMEO:", 4)),
            auth: false,
            expect: &[Code::Unauthenticated],
        }),
        27 => grpc_msg(
            "grpc.bad_token_ids",
            |r| r.prompt = Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, u32::MAX] })),
            INVALID,
        ),
        28 => grpc_msg("grpc.absurd_max_tokens", |r| r.max_tokens = Some(u32::MAX), INVALID),
        29 => grpc_msg(
            "grpc.bad_params",
            |r| match rng.below(4) {
                0 => r.n = Some(100_000),
                1 => r.temperature = Some(f32::NAN),
                2 => r.stop = vec!["x".into(); 100],
                _ => r.logit_bias = (0..1000).map(|i| (i, 1.0)).collect(),
            },
            INVALID,
        ),
        30 => grpc_msg("grpc.no_prompt", |r| r.prompt = None, INVALID),
        31 => grpc_msg(
            "grpc.oversize_message",
            |r| r.prompt = Some(pb::generate_request::Prompt::Text("b".repeat(MAX_BODY + 1024))),
            // OUT_OF_RANGE: tonic's message-size limit; INVALID_ARGUMENT: the prompt-length check
            &[Code::OutOfRange, Code::ResourceExhausted, Code::InvalidArgument],
        ),
        32 => {
            // field 2 (text, length-delimited) with invalid UTF-8, field 4 (max_tokens) = 4
            let bytes = if rng.below(2) == 0 {
                vec![0x12, 0x03, 0xff, 0xfe, 0xfd, 0x20, 0x04]
            } else {
                (0..64).map(|_| rng.next() as u8).collect()
            };
            // tonic reports undecodable messages as INTERNAL (as grpc-go and grpc-core do)
            Hostile::Grpc(GrpcHostile::Raw {
                name: "grpc.undecodable",
                bytes,
                expect: &[Code::Internal, Code::InvalidArgument],
            })
        }
        _ => Hostile::Junk(Junk {
            name: "grpc.junk_bytes",
            grpc_port: true,
            // not the HTTP/2 preface: the server must drop the connection
            bytes: b"PRI * HTTP/9.9\r\n\r\nXX\r\n\r\n\x00\x00\xff\xff\xff\xff\xff garbage".to_vec(),
        }),
    }
}

fn grpc_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn with_auth<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(key) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ascii metadata"));
    }
    req
}

/// A codec that sends and receives raw message bytes (for undecodable requests).
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Outcome {
    class: Class,
    kind: &'static str,
    /// "200", "413", "grpc:InvalidArgument", "conn-closed", ...
    status: String,
    latency: Duration,
    ttft: Option<Duration>,
    /// Set when a check failed.
    problem: Option<String>,
}

/// Shared per-run context of the clients.
struct Ctx {
    http: SocketAddr,
    grpc: SocketAddr,
    refs: HashMap<RefKey, Expected>,
    /// Token ids of each prompt (add_special_tokens as the text form).
    prompt_ids: Vec<Vec<u32>>,
}

impl Ctx {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

fn grpc_channel(addr: SocketAddr) -> Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.connect_lazy())
}

fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?)
}

/// Outcome of a REST response's status line and body, for a request expected to succeed.
fn sse_payloads(body: &str) -> Vec<&str> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).collect()
}

/// Text and finish reason of choice `index` in a non-streamed JSON response or an SSE body.
fn rest_text(body: &str, stream: bool, chat: bool, index: u64) -> Result<Expected> {
    let field = |c: &Value| -> Option<String> {
        if chat {
            let v = if stream { &c["delta"]["content"] } else { &c["message"]["content"] };
            v.as_str().map(str::to_string)
        } else {
            c["text"].as_str().map(str::to_string)
        }
    };
    let mut text = String::new();
    let mut finish = None;
    let mut chunks: Vec<Value> = Vec::new();
    if stream {
        if body.contains("event: error") {
            bail!("error event in stream: {}", truncate(body, 300));
        }
        let payloads = sse_payloads(body);
        if payloads.last() != Some(&"[DONE]") {
            bail!("stream did not end with [DONE]: {}", truncate(body, 300));
        }
        for p in payloads.iter().filter(|p| **p != "[DONE]") {
            chunks.push(serde_json::from_str(p).with_context(|| format!("bad chunk {p}"))?);
        }
    } else {
        chunks.push(serde_json::from_str(body).with_context(|| format!("bad JSON body {}", truncate(body, 300)))?);
    }
    for v in &chunks {
        for c in v["choices"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if c["index"].as_u64() != Some(index) {
                continue;
            }
            text.push_str(&field(c).unwrap_or_default());
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    Ok(Expected { text, finish: finish.context("no finish_reason")? })
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn finish_name(f: i32) -> String {
    if f == pb::FinishReason::Stop as i32 { "stop" } else { "length" }.to_string()
}

fn completion_body(key: RefKey, stream: bool) -> Value {
    let mut body = if key.chat {
        json!({"model": "tiny-shakespeare-moe", "messages": [{"role": "user", "content": PROMPTS[key.prompt]}]})
    } else {
        json!({"model": "tiny-shakespeare-moe", "prompt": PROMPTS[key.prompt]})
    };
    body["max_tokens"] = json!(key.max_tokens);
    body["temperature"] = json!(0);
    body["stream"] = json!(stream);
    if key.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body
}

fn rest_path(chat: bool) -> &'static str {
    if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

/// Sends a REST request expected to succeed; returns (status, body, time to first byte of body).
async fn rest_send(client: &reqwest::Client, ctx: &Ctx, path: &str, body: &Value) -> Result<(u16, String, Duration)> {
    let t0 = Instant::now();
    let r = client.post(ctx.url(path)).bearer_auth(API_KEY).json(body).send().await?;
    let status = r.status().as_u16();
    let mut stream = r.bytes_stream();
    let mut bytes = Vec::new();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        first.get_or_insert_with(|| t0.elapsed());
        bytes.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8(bytes).context("response is not UTF-8")?, first.unwrap_or_default()))
}

/// Runs a valid gRPC request; returns its text, finish reason and time to first message.
async fn grpc_generate(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
    stream: bool,
) -> std::result::Result<(Expected, Duration), tonic::Status> {
    let t0 = Instant::now();
    if !stream {
        let resp = client.generate(with_auth(req, Some(API_KEY))).await?.into_inner();
        let c = resp.choices.first().ok_or_else(|| tonic::Status::internal("no choice"))?;
        return Ok((Expected { text: c.text.clone(), finish: finish_name(c.finish_reason) }, t0.elapsed()));
    }
    let mut s = client.generate_stream(with_auth(req, Some(API_KEY))).await?.into_inner();
    let (mut text, mut finish, mut first) = (String::new(), None, None);
    while let Some(msg) = s.next().await {
        first.get_or_insert_with(|| t0.elapsed());
        match msg?.event {
            Some(pb::generate_stream_response::Event::Token(t)) => text.push_str(&t.text),
            Some(pb::generate_stream_response::Event::Finish(f)) => {
                text.push_str(&f.text);
                finish = Some(finish_name(f.finish_reason));
            }
            _ => {}
        }
    }
    let finish = finish.ok_or_else(|| tonic::Status::internal("stream ended without a finish event"))?;
    Ok((Expected { text, finish }, first.unwrap_or_default()))
}

fn grpc_status(s: &tonic::Status) -> String {
    format!("grpc:{:?}", s.code())
}

/// A valid request: it must succeed with its reference text.
async fn run_valid(
    kind: ValidKind,
    key: RefKey,
    ctx: &Ctx,
    http: &reqwest::Client,
    grpc: &mut GenerationClient<Channel>,
) -> Outcome {
    let t0 = Instant::now();
    let expected = &ctx.refs[&key];
    let mut out = Outcome {
        class: Class::Valid,
        kind: kind.name(),
        status: String::new(),
        latency: Duration::ZERO,
        ttft: None,
        problem: None,
    };
    let got: Result<Vec<Expected>> = async {
        match kind {
            ValidKind::GrpcGenerate | ValidKind::GrpcStream | ValidKind::GrpcTokenIds => {
                let mut req = grpc_request(PROMPTS[key.prompt], key.max_tokens);
                if kind == ValidKind::GrpcTokenIds {
                    let ids = ctx.prompt_ids[key.prompt].clone();
                    req.prompt = Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }));
                }
                match grpc_generate(grpc, req, kind == ValidKind::GrpcStream).await {
                    Ok((e, ttft)) => {
                        out.status = "grpc:Ok".into();
                        if kind == ValidKind::GrpcStream {
                            out.ttft = Some(ttft);
                        }
                        Ok(vec![e])
                    }
                    Err(s) => {
                        out.status = grpc_status(&s);
                        bail!("{}: {}", out.status, s.message())
                    }
                }
            }
            _ => {
                let stream = matches!(kind, ValidKind::RestCompletionStream | ValidKind::RestChatStream);
                let mut body = completion_body(key, stream);
                let n = if kind == ValidKind::RestCompletionN2 { 2 } else { 1 };
                body["n"] = json!(n);
                if kind == ValidKind::RestTokenIds {
                    body["prompt"] = json!(ctx.prompt_ids[key.prompt]);
                }
                let (status, text, ttft) = rest_send(http, ctx, rest_path(key.chat), &body).await?;
                out.status = status.to_string();
                if stream {
                    out.ttft = Some(ttft);
                }
                if status != 200 {
                    bail!("status {status}: {}", truncate(&text, 300));
                }
                (0..n).map(|i| rest_text(&text, stream, key.chat, i)).collect()
            }
        }
    }
    .await;
    out.latency = t0.elapsed();
    match got {
        Err(e) => {
            if out.status.is_empty() {
                out.status = "transport-error".into();
            }
            out.problem = Some(format!("{}: {e:#}", kind.name()));
        }
        Ok(results) => {
            for (i, r) in results.iter().enumerate() {
                if r != expected {
                    out.problem = Some(format!(
                        "{} choice {i} differs from the request run alone ({key:?}):\n  alone: {:?} ({})\n  load:  {:?} ({})",
                        kind.name(),
                        expected.text,
                        expected.finish,
                        r.text,
                        r.finish
                    ));
                    break;
                }
            }
        }
    }
    out
}

/// A request that is disconnected or cancelled part way. It must not fail with a server error
/// before the client leaves.
async fn run_disconnect(
    kind: DisconnectKind,
    rng: &mut Rng,
    ctx: &Ctx,
    http: &reqwest::Client,
    grpc: &mut GenerationClient<Channel>,
) -> Outcome {
    let t0 = Instant::now();
    let prompt = rng.below(PROMPTS.len());
    let after = 1 + rng.below(4);
    let delay = Duration::from_millis(5 + rng.below(60) as u64);
    let key = RefKey {
        chat: kind == DisconnectKind::RestChatStreamDrop,
        prompt,
        max_tokens: DISCONNECT_MAX_TOKENS,
        ignore_eos: true,
    };
    let status: Result<String> = async {
        match kind {
            DisconnectKind::RestStreamDrop | DisconnectKind::RestChatStreamDrop => {
                let r = http
                    .post(ctx.url(rest_path(key.chat)))
                    .bearer_auth(API_KEY)
                    .json(&completion_body(key, true))
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let mut s = r.bytes_stream();
                for _ in 0..after {
                    if s.next().await.is_none() {
                        break;
                    }
                }
                Ok(status.to_string()) // dropping `s` closes the connection mid-stream
            }
            DisconnectKind::RestAbort => {
                let fut = http
                    .post(ctx.url("/v1/completions"))
                    .bearer_auth(API_KEY)
                    .json(&completion_body(key, false))
                    .send();
                match tokio::time::timeout(delay, fut).await {
                    Ok(r) => Ok(r?.status().as_u16().to_string()),
                    Err(_) => Ok("client-abort".into()),
                }
            }
            DisconnectKind::GrpcStreamDrop => {
                let mut req = grpc_request(PROMPTS[prompt], DISCONNECT_MAX_TOKENS);
                req.ignore_eos = true;
                let mut s = match grpc.generate_stream(with_auth(req, Some(API_KEY))).await {
                    Ok(s) => s.into_inner(),
                    Err(e) => return Ok(grpc_status(&e)),
                };
                for _ in 0..after {
                    match s.next().await {
                        Some(Err(e)) => return Ok(grpc_status(&e)),
                        None => break,
                        Some(Ok(_)) => {}
                    }
                }
                Ok("grpc:dropped".into())
            }
            DisconnectKind::GrpcCancel => {
                let mut req = grpc_request(PROMPTS[prompt], DISCONNECT_MAX_TOKENS);
                req.ignore_eos = true;
                match tokio::time::timeout(delay, grpc.generate(with_auth(req, Some(API_KEY)))).await {
                    Ok(Ok(_)) => Ok("grpc:Ok".into()),
                    Ok(Err(e)) => Ok(grpc_status(&e)),
                    Err(_) => Ok("client-cancel".into()),
                }
            }
            DisconnectKind::GrpcDeadline => {
                let mut req = grpc_request(PROMPTS[prompt], DISCONNECT_MAX_TOKENS);
                req.ignore_eos = true;
                let mut req = with_auth(req, Some(API_KEY));
                req.set_timeout(delay);
                match grpc.generate(req).await {
                    Ok(_) => Ok("grpc:Ok".into()),
                    Err(e) => Ok(grpc_status(&e)),
                }
            }
        }
    }
    .await;
    let (status, problem) = match status {
        Ok(s) => {
            let bad = s.starts_with('5')
                || ["grpc:Internal", "grpc:Unknown", "grpc:DataLoss", "grpc:Unavailable"].contains(&s.as_str());
            let problem = bad.then(|| format!("{}: server error {s} before the client left", kind.name()));
            (s, problem)
        }
        Err(e) => ("transport-error".into(), Some(format!("{}: {e:#}", kind.name()))),
    };
    Outcome { class: Class::Disconnect, kind: kind.name(), status, latency: t0.elapsed(), ttft: None, problem }
}

async fn run_hostile(
    case: Hostile,
    ctx: &Ctx,
    http: &reqwest::Client,
    grpc: &mut GenerationClient<Channel>,
) -> Outcome {
    let t0 = Instant::now();
    let (kind, status, problem) = match case {
        Hostile::Rest(h) => {
            let mut rb = match h.method {
                "GET" => http.get(ctx.url(h.path)),
                _ => http.post(ctx.url(h.path)).header("content-type", "application/json").body(h.body),
            };
            if let Some(k) = h.auth {
                rb = rb.bearer_auth(k);
            }
            match rb.send().await {
                Ok(r) => {
                    let st = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    let problem = (!h.expect.contains(&st))
                        .then(|| format!("{}: status {st}, expected {:?}: {}", h.name, h.expect, truncate(&body, 200)));
                    (h.name, st.to_string(), problem)
                }
                // the server may answer 413 and close before the whole body is sent
                Err(e) if h.expect.contains(&413) && (e.is_request() || e.is_body()) => {
                    (h.name, "conn-closed".to_string(), None)
                }
                Err(e) => (h.name, "transport-error".to_string(), Some(format!("{}: {e:#}", h.name))),
            }
        }
        Hostile::Grpc(GrpcHostile::Message { name, req, auth, expect }) => {
            let r = grpc.generate(with_auth(*req, auth.then_some(API_KEY))).await;
            match r {
                Ok(_) => (name, "grpc:Ok".into(), Some(format!("{name}: accepted, expected {expect:?}"))),
                Err(s) => {
                    let problem = (!expect.contains(&s.code()))
                        .then(|| format!("{name}: {:?} ({}), expected {expect:?}", s.code(), s.message()));
                    (name, grpc_status(&s), problem)
                }
            }
        }
        Hostile::Grpc(GrpcHostile::Raw { name, bytes, expect }) => {
            let r: std::result::Result<String, tonic::Status> = async {
                let channel = grpc_channel(ctx.grpc).map_err(|e| tonic::Status::unknown(e.to_string()))?;
                let mut g = tonic::client::Grpc::new(channel);
                g.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static("/moe.v1.Generation/Generate");
                g.unary(with_auth(bytes, Some(API_KEY)), path, RawCodec).await?;
                Ok("grpc:Ok".into())
            }
            .await;
            match r {
                Ok(s) => (name, s, Some(format!("{name}: accepted, expected {expect:?}"))),
                Err(s) => {
                    let problem = (!expect.contains(&s.code()))
                        .then(|| format!("{name}: {:?} ({}), expected {expect:?}", s.code(), s.message()));
                    (name, grpc_status(&s), problem)
                }
            }
        }
        Hostile::Junk(j) => {
            let addr = if j.grpc_port { ctx.grpc } else { ctx.http };
            let r: Result<String> = async {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(&j.bytes).await?;
                let mut buf = vec![0u8; 4096];
                let mut first = String::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => {
                            if first.is_empty() {
                                first = String::from_utf8_lossy(&buf[..n.min(12)]).into_owned();
                            }
                        }
                        Err(_) => bail!("the connection stayed open 5 s after junk bytes"),
                    }
                }
                // "HTTP/1.1 400" from hyper on the REST port; a GOAWAY frame and close on gRPC
                Ok(if first.starts_with("HTTP/1.1 ") { first[9..12].to_string() } else { "conn-closed".into() })
            }
            .await;
            match r {
                Ok(s) => {
                    // REST answers junk with a 4xx status line; the gRPC port drops the connection
                    let ok = if j.grpc_port { s == "conn-closed" || s.starts_with('4') } else { s.starts_with('4') };
                    let problem = (!ok).then(|| format!("{}: {s}, expected a 4xx", j.name));
                    (j.name, s, problem)
                }
                Err(e) => (j.name, "timeout".into(), Some(format!("{}: {e:#}", j.name))),
            }
        }
    };
    Outcome { class: Class::Hostile, kind, status, latency: t0.elapsed(), ttft: None, problem }
}

/// What request `i` of the load phase is.
enum Planned {
    Valid(ValidKind, RefKey),
    Disconnect(DisconnectKind),
    Hostile(usize),
}

fn plan(i: usize, args: &Args) -> (Planned, Rng) {
    let mut rng = Rng::new(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
    let u = rng.unit();
    let p = if u < args.hostile_fraction {
        Planned::Hostile(rng.below(HOSTILE_CASES))
    } else if u < args.hostile_fraction + args.disconnect_fraction {
        Planned::Disconnect(DISCONNECT_KINDS[rng.below(DISCONNECT_KINDS.len())])
    } else {
        let kind = VALID_KINDS[rng.below(VALID_KINDS.len())];
        let key = RefKey {
            chat: kind.chat(),
            prompt: rng.below(PROMPTS.len()),
            max_tokens: VALID_MAX_TOKENS[rng.below(VALID_MAX_TOKENS.len())],
            ignore_eos: false,
        };
        Planned::Valid(kind, key)
    };
    (p, rng)
}

async fn run_one(
    i: usize,
    args: &Args,
    ctx: &Ctx,
    http: &reqwest::Client,
    grpc: &mut GenerationClient<Channel>,
) -> Outcome {
    let (p, mut rng) = plan(i, args);
    match p {
        Planned::Valid(kind, key) => run_valid(kind, key, ctx, http, grpc).await,
        Planned::Disconnect(kind) => run_disconnect(kind, &mut rng, ctx, http, grpc).await,
        Planned::Hostile(case) => {
            let h = hostile_case(case, &mut rng);
            run_hostile(h, ctx, http, grpc).await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and memory
// ---------------------------------------------------------------------------------------------

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const GAUGES: [&str; 3] = ["moe_kv_blocks_used", "moe_running_sequences", "moe_waiting_sequences"];

async fn read_gauges(client: &reqwest::Client, ctx: &Ctx) -> Result<Vec<(String, f64)>> {
    let text = client.get(ctx.url("/metrics")).bearer_auth(API_KEY).send().await?.error_for_status()?.text().await?;
    GAUGES
        .iter()
        .map(|g| Ok((g.to_string(), gauge(&text, g).with_context(|| format!("{g} missing from /metrics"))?)))
        .collect()
}

/// Polls until every gauge is zero (or `within` passes); returns the last reading and the wait.
async fn wait_gauges_zero(
    client: &reqwest::Client,
    ctx: &Ctx,
    within: Duration,
) -> Result<(Vec<(String, f64)>, Duration)> {
    let t0 = Instant::now();
    loop {
        let g = read_gauges(client, ctx).await?;
        if g.iter().all(|(_, v)| *v == 0.0) || t0.elapsed() > within {
            return Ok((g, t0.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

async fn wait_ready(client: &reqwest::Client, base: &str) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return Ok(t0.elapsed());
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("/health did not answer 200 within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs every distinct valid request alone, one after another.
async fn references(ctx: &mut Ctx, args: &Args, client: &reqwest::Client) -> Result<Duration> {
    let t0 = Instant::now();
    for p in PROMPTS {
        let r = client
            .post(ctx.url("/tokenize"))
            .bearer_auth(API_KEY)
            .json(&json!({"prompt": p}))
            .send()
            .await?
            .error_for_status()?;
        let v: Value = r.json().await?;
        let ids = v["tokens"].as_array().context("tokenize: no tokens")?;
        ctx.prompt_ids.push(ids.iter().map(|t| t.as_u64().map(|t| t as u32)).collect::<Option<_>>().context("ids")?);
    }
    let mut keys: Vec<RefKey> = Vec::new();
    for i in 0..args.requests {
        if let (Planned::Valid(_, key), _) = plan(i, args) {
            keys.push(key);
        }
    }
    for prompt in 0..PROMPTS.len() {
        keys.push(RefKey { chat: false, prompt, max_tokens: SIGTERM_MAX_TOKENS, ignore_eos: true });
    }
    keys.sort();
    keys.dedup();
    for key in keys {
        let (status, body, _) = rest_send(client, ctx, rest_path(key.chat), &completion_body(key, false)).await?;
        if status != 200 {
            bail!("reference request {key:?} failed: {status} {body}");
        }
        let e = rest_text(&body, false, key.chat, 0)?;
        ctx.refs.insert(key, e);
    }
    Ok(t0.elapsed())
}

struct LoadResult {
    outcomes: Vec<(usize, Outcome)>,
    wall: Duration,
    /// (requests completed, VmRSS KiB) samples.
    rss: Vec<(usize, u64)>,
}

async fn load(ctx: Arc<Ctx>, args: &Args, server: &Server) -> Result<LoadResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (ctx, next, done, results, args) = (ctx.clone(), next.clone(), done.clone(), results.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let http = http_client()?;
            let mut grpc = GenerationClient::new(grpc_channel(ctx.grpc)?);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.requests {
                    return anyhow::Ok(());
                }
                let o = run_one(i, &args, &ctx, &http, &mut grpc).await;
                results.lock().unwrap_or_else(|p| p.into_inner()).push((i, o));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // sample the server's RSS while the clients run
    let mut rss = Vec::new();
    let total = args.requests;
    let sampler = async {
        while done.load(Ordering::Relaxed) < total {
            if let Some(kib) = server.rss_kib() {
                rss.push((done.load(Ordering::Relaxed), kib));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let joined = async {
        let mut errs = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errs.push(format!("client failed: {e:#}")),
                Err(e) => errs.push(format!("client task panicked: {e}")),
            }
        }
        errs
    };
    let ((), errs) = tokio::join!(sampler, joined);
    if !errs.is_empty() {
        bail!("{}", errs.join("; "));
    }
    if let Some(kib) = server.rss_kib() {
        rss.push((total, kib));
    }
    let outcomes = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(LoadResult { outcomes, wall: t0.elapsed(), rss })
}

struct SigtermResult {
    inflight: Vec<Outcome>,
    refused: Vec<Outcome>,
    drain: Duration,
    exit: Option<i32>,
    exit_after: Duration,
}

async fn sigterm(ctx: Arc<Ctx>, args: &Args, server: &mut Server) -> Result<SigtermResult> {
    let http = http_client()?;
    // a gRPC connection opened before SIGTERM, to see what an existing connection gets
    let warm = grpc_channel(ctx.grpc)?;
    let mut warm_client = GenerationClient::new(warm.clone());
    warm_client.list_models(with_auth(pb::ListModelsRequest {}, Some(API_KEY))).await?;
    let kinds =
        [ValidKind::RestCompletionStream, ValidKind::RestCompletion, ValidKind::GrpcStream, ValidKind::GrpcGenerate];
    let mut tasks = Vec::new();
    for i in 0..args.sigterm_inflight {
        let ctx = ctx.clone();
        let kind = kinds[i % kinds.len()];
        let key = RefKey { chat: false, prompt: i % PROMPTS.len(), max_tokens: SIGTERM_MAX_TOKENS, ignore_eos: true };
        tasks.push(tokio::spawn(async move {
            let http = http_client().expect("client");
            let mut grpc = GenerationClient::new(grpc_channel(ctx.grpc).expect("channel"));
            let o = if matches!(kind, ValidKind::GrpcStream | ValidKind::GrpcGenerate) {
                let t0 = Instant::now();
                let mut req = grpc_request(PROMPTS[key.prompt], key.max_tokens);
                req.ignore_eos = true;
                let r = grpc_generate(&mut grpc, req, kind == ValidKind::GrpcStream).await;
                let mut o = Outcome {
                    class: Class::Valid,
                    kind: kind.name(),
                    status: "grpc:Ok".into(),
                    latency: t0.elapsed(),
                    ttft: None,
                    problem: None,
                };
                match r {
                    Ok((e, _)) if e == ctx.refs[&key] => {}
                    Ok((e, _)) => o.problem = Some(format!("in flight at SIGTERM: text differs: {:?}", e.text)),
                    Err(s) => {
                        o.status = grpc_status(&s);
                        o.problem = Some(format!("in flight at SIGTERM: {:?} {}", s.code(), s.message()));
                    }
                }
                o
            } else {
                run_valid(kind, key, &ctx, &http, &mut grpc).await
            };
            (o, Instant::now())
        }));
    }
    // wait until they all run
    let t_wait = Instant::now();
    loop {
        let g = read_gauges(&http, &ctx).await?;
        let running = g.iter().find(|(n, _)| n == "moe_running_sequences").map_or(0.0, |(_, v)| *v);
        if running as usize >= args.sigterm_inflight || t_wait.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = Command::new("kill").args(["-TERM", &server.pid.to_string()]).status()?;
    let t_term = Instant::now();
    if !status.success() {
        bail!("kill -TERM {} failed", server.pid);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // new requests: REST on fresh connections, gRPC on a fresh and on the warm connection
    let mut refused = Vec::new();
    for i in 0..4 {
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build()?;
        let t0 = Instant::now();
        let key = RefKey { chat: false, prompt: i, max_tokens: 8, ignore_eos: false };
        let r =
            fresh.post(ctx.url("/v1/completions")).bearer_auth(API_KEY).json(&completion_body(key, false)).send().await;
        let (status, problem) = match r {
            Ok(r) if r.status().as_u16() == 503 => ("503".to_string(), None),
            Ok(r) => {
                let s = r.status().as_u16().to_string();
                (s.clone(), Some(format!("new REST request after SIGTERM got {s}, expected 503")))
            }
            // the listener stays open while requests drain: a refused connection breaks the promise
            Err(e) => {
                ("transport-error".to_string(), Some(format!("new REST request after SIGTERM: {e:#}, expected 503")))
            }
        };
        refused.push(Outcome {
            class: Class::Valid,
            kind: "sigterm.new.rest",
            status,
            latency: t0.elapsed(),
            ttft: None,
            problem,
        });
    }
    for (i, channel) in [grpc_channel(ctx.grpc)?, warm].into_iter().enumerate() {
        let mut c = GenerationClient::new(channel);
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.generate(with_auth(grpc_request("ROMEO:", 4), Some(API_KEY))),
        )
        .await;
        let kind = if i == 0 { "sigterm.new.grpc.fresh" } else { "sigterm.new.grpc.existing" };
        let (status, problem) = match r {
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => (grpc_status(&s), None),
            Ok(Err(s)) => {
                (grpc_status(&s), Some(format!("{kind}: {:?} {}, expected UNAVAILABLE", s.code(), s.message())))
            }
            Ok(Ok(_)) => ("grpc:Ok".into(), Some(format!("{kind}: accepted after SIGTERM"))),
            Err(_) => ("timeout".into(), Some(format!("{kind}: no answer within 10 s"))),
        };
        refused.push(Outcome { class: Class::Valid, kind, status, latency: t0.elapsed(), ttft: None, problem });
    }
    let mut inflight = Vec::new();
    let mut last = t_term;
    for t in tasks {
        let (o, at) = t.await.context("in-flight task panicked")?;
        last = last.max(at);
        inflight.push(o);
    }
    let drain = last.duration_since(t_term);
    // the process must exit on its own within the grace period (plus a margin)
    let deadline = t_term + Duration::from_secs(args.shutdown_grace_secs + 5);
    let exit = loop {
        if let Some(st) = server.child.try_wait()? {
            break st.code();
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(SigtermResult { inflight, refused, drain, exit, exit_after: t_term.elapsed() })
}

/// A full queue (phase 6): a server admitting one running and one waiting
/// sequence gets four long requests at once; those over the limit must get
/// 429 with `Retry-After`, and the others 200. Returns (statuses, failure).
async fn queue_full(args: &Args) -> Result<(Vec<u16>, Option<String>)> {
    let server = Server::start(args, 0, &["--max-num-seqs", "1", "--max-waiting", "1"])?;
    let base = format!("http://{}", server.http);
    let client = http_client()?;
    wait_ready(&client, &base).await?;
    let sends = (0..4).map(|i| {
        let body = json!({"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": true, "temperature": 0});
        let req = client.post(format!("{base}/v1/completions")).bearer_auth(API_KEY).json(&body).send();
        async move {
            match req.await {
                Ok(r) => {
                    let retry = r.headers().contains_key("retry-after");
                    let status = r.status().as_u16();
                    let _ = r.bytes().await;
                    (status, retry)
                }
                Err(_) => (0, false),
            }
        }
    });
    let got = futures_util::future::join_all(sends).await;
    let statuses: Vec<u16> = got.iter().map(|g| g.0).collect();
    let refused = got.iter().filter(|g| g.0 == 429).count();
    let failure = if refused == 0 {
        Some(format!("a full queue: no 429 among {statuses:?}"))
    } else if got.iter().any(|g| g.0 == 429 && !g.1) {
        Some("a full queue: a 429 without Retry-After".to_string())
    } else if got.iter().any(|g| g.0 != 429 && g.0 != 200) {
        Some(format!("a full queue: statuses {statuses:?}, expected 200 or 429"))
    } else {
        None
    };
    Ok((statuses, failure))
}

/// Streams cut by the end of the grace period (phase 7).
struct CutResult {
    /// Streams ended with their cause (SSE error event, gRPC UNAVAILABLE).
    cut: usize,
    /// Streams that finished before the cut.
    finished: usize,
    /// Streams that ended any other way.
    problems: Vec<String>,
    exit: Option<i32>,
}

/// Streams open at SIGTERM on a server with `--shutdown-grace-secs 0`: each
/// must end with its cause (a last SSE event holding an error in OpenAI's
/// shape, then a clean end of the response; gRPC UNAVAILABLE), not silently.
async fn grace_cut(args: &Args) -> Result<CutResult> {
    const SSE_STREAMS: usize = 12;
    const GRPC_STREAMS: usize = 4;
    let server = Server::start(args, 0, &[])?;
    let base = format!("http://{}", server.http);
    let client = http_client()?;
    wait_ready(&client, &base).await?;
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let shutting_down = |m: &str| m.contains("shutting down");
    let mut tasks: Vec<tokio::task::JoinHandle<std::result::Result<bool, String>>> = Vec::new();
    for i in 0..SSE_STREAMS {
        let (c, url, started) = (client.clone(), format!("{base}/v1/completions"), started.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": PROMPTS[i % PROMPTS.len()], "max_tokens": MAX_TOKENS_LIMIT,
                "ignore_eos": true, "stream": true, "temperature": 0});
            let sent = c.post(url).bearer_auth(API_KEY).json(&body).send().await;
            let mut r = match sent {
                Ok(r) if r.status() == 200 => r,
                other => {
                    started.add_permits(1);
                    return Err(format!("SSE {i}: {:?}", other.map(|r| r.status())));
                }
            };
            let (mut text, mut signalled) = (String::new(), false);
            let end = loop {
                let chunk = r.chunk().await;
                if !signalled {
                    started.add_permits(1);
                    signalled = true;
                }
                match chunk {
                    Ok(Some(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = end {
                return Err(format!("SSE {i}: the response broke off ({e}): {}", truncate(&text, 200)));
            }
            match sse_payloads(&text).last() {
                Some(&"[DONE]") => Ok(false),
                Some(last) => {
                    let v: Value = serde_json::from_str(last).unwrap_or_default();
                    let msg = v["error"]["message"].as_str().unwrap_or_default();
                    if v["error"]["type"] == "service_unavailable" && shutting_down(msg) {
                        Ok(true)
                    } else {
                        Err(format!("SSE {i}: ended with neither [DONE] nor its cause: {}", truncate(last, 200)))
                    }
                }
                None => Err(format!("SSE {i}: no events: {}", truncate(&text, 200))),
            }
        }));
    }
    for i in 0..GRPC_STREAMS {
        let (grpc, started) = (server.grpc, started.clone());
        tasks.push(tokio::spawn(async move {
            let mut g = GenerationClient::new(grpc_channel(grpc).map_err(|e| e.to_string())?);
            let mut req = grpc_request(PROMPTS[i % PROMPTS.len()], MAX_TOKENS_LIMIT as u32);
            req.ignore_eos = true;
            let s = g.generate_stream(with_auth(req, Some(API_KEY))).await;
            let mut s = match s {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    started.add_permits(1);
                    return Err(format!("gRPC {i}: {e}"));
                }
            };
            let (mut signalled, mut finished) = (false, false);
            loop {
                let msg = s.next().await;
                if !signalled {
                    started.add_permits(1);
                    signalled = true;
                }
                match msg {
                    None => {
                        return if finished {
                            Ok(false)
                        } else {
                            Err(format!("gRPC {i}: ended without a finish or status"))
                        }
                    }
                    Some(Ok(m)) => finished |= matches!(m.event, Some(pb::generate_stream_response::Event::Finish(_))),
                    Some(Err(st)) if st.code() == tonic::Code::Unavailable && shutting_down(st.message()) => {
                        return Ok(true)
                    }
                    Some(Err(st)) => return Err(format!("gRPC {i}: {:?} {}", st.code(), st.message())),
                }
            }
        }));
    }
    // every stream has its first bytes: SIGTERM, and the grace period is over at once
    let n = (SSE_STREAMS + GRPC_STREAMS) as u32;
    tokio::time::timeout(Duration::from_secs(60), started.acquire_many(n))
        .await
        .context("the streams did not start within 60 s")??
        .forget();
    let status = Command::new("kill").args(["-TERM", &server.pid.to_string()]).status()?;
    if !status.success() {
        bail!("kill -TERM {} failed", server.pid);
    }
    let mut res = CutResult { cut: 0, finished: 0, problems: Vec::new(), exit: None };
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(15), t).await {
            Ok(Ok(Ok(true))) => res.cut += 1,
            Ok(Ok(Ok(false))) => res.finished += 1,
            Ok(Ok(Err(e))) => res.problems.push(e),
            Ok(Err(e)) => res.problems.push(format!("a stream task failed: {e}")),
            Err(_) => res.problems.push("a stream did not end within 15 s of the cut".into()),
        }
    }
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(10);
    res.exit = loop {
        if let Some(st) = server.child.try_wait()? {
            break st.code();
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn pcts(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let f = |p| percentile(&v, p).map_or("-".to_string(), |x| format!("{x:.1}"));
    format!("n={} p50={} p90={} p99={} max={} ms", v.len(), f(50.0), f(90.0), f(99.0), f(100.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut server = Server::start(&args, args.shutdown_grace_secs, &[])?;
    let base = format!("http://{}", server.http);
    let probe = http_client()?;
    let ready_after = wait_ready(&probe, &base).await?;
    println!(
        "moe-faultload: {} pid {} REST {} gRPC {} (ready after {:.1}s); {} requests, {} clients, seed {}",
        args.server.display(),
        server.pid,
        server.http,
        server.grpc,
        ready_after.as_secs_f64(),
        args.requests,
        args.clients,
        args.seed
    );
    let mut ctx = Ctx { http: server.http, grpc: server.grpc, refs: HashMap::new(), prompt_ids: Vec::new() };
    let ref_time = references(&mut ctx, &args, &probe).await?;
    println!("references: {} distinct requests run alone in {:.1}s", ctx.refs.len(), ref_time.as_secs_f64());
    let ctx = Arc::new(ctx);
    let Some(rss_before) = server.rss_kib() else {
        bail!("cannot read the server's VmRSS (/proc/{}/status): the memory checks cannot run", server.pid)
    };

    // ---- load ----
    let lr = load(ctx.clone(), &args, &server).await?;
    let Some(rss_after) = server.rss_kib() else { bail!("cannot read the server's VmRSS after the load") };
    if lr.rss.len() < 10 {
        failures.push(format!("only {} VmRSS samples during the load: the leak check cannot run", lr.rss.len()));
    }
    let half = args.requests / 2;
    let first_peak = lr.rss.iter().filter(|(d, _)| *d < half).map(|(_, k)| *k).max().unwrap_or(rss_before);
    let second_peak = lr.rss.iter().filter(|(d, _)| *d >= half).map(|(_, k)| *k).max().unwrap_or(rss_after);
    let rss_mid = lr.rss.iter().find(|(d, _)| *d >= half).map_or(0, |(_, k)| *k);
    let allowed = (first_peak as f64 * (1.0 + args.rss_tolerance)) as u64 + args.rss_slack_mib * 1024;

    // ---- checks after the load ----
    let (gauges, gauge_wait) = wait_gauges_zero(&probe, &ctx, Duration::from_secs(15)).await?;
    let mut by_kind: BTreeMap<(Class, &str), BTreeMap<String, usize>> = BTreeMap::new();
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut ttft = Vec::new();
    let mut class_count: BTreeMap<Class, (usize, usize)> = BTreeMap::new();
    let mut outcomes = lr.outcomes;
    outcomes.sort_by_key(|(i, _)| *i);
    for (_, o) in &outcomes {
        *by_kind.entry((o.class, o.kind)).or_default().entry(o.status.clone()).or_default() += 1;
        let e = class_count.entry(o.class).or_default();
        e.0 += 1;
        if let Some(p) = &o.problem {
            e.1 += 1;
            failures.push(p.clone());
        }
        let bucket = match (o.class, o.kind.starts_with("grpc")) {
            (Class::Valid, false) => "valid REST",
            (Class::Valid, true) => "valid gRPC",
            (Class::Disconnect, _) => "disconnect/cancel",
            (Class::Hostile, _) => "hostile",
        };
        lat.entry(bucket).or_default().push(ms(o.latency));
        if o.class == Class::Valid && o.problem.is_none() {
            if let Some(t) = o.ttft {
                ttft.push(ms(t));
            }
        }
    }
    for (name, v) in &gauges {
        if *v != 0.0 {
            failures.push(format!("{name} is {v} after the load (waited {:.1}s)", gauge_wait.as_secs_f64()));
        }
    }
    let second_half = args.requests - half;
    let growth_per_request = second_peak.saturating_sub(first_peak) as f64 / second_half.max(1) as f64;
    let allowed_per_request = allowed.saturating_sub(first_peak) as f64 / second_half.max(1) as f64;
    if second_peak > allowed {
        failures.push(format!(
            "RSS grew: second-half peak {} KiB > first-half peak {} KiB x {:.2} + {} MiB ({growth_per_request:.2} \
             KiB per request over {second_half} requests)",
            second_peak,
            first_peak,
            1.0 + args.rss_tolerance,
            args.rss_slack_mib
        ));
    }

    // ---- summary of the load ----
    println!(
        "\nload: {} requests in {:.1}s ({:.0} req/s), {} clients",
        outcomes.len(),
        lr.wall.as_secs_f64(),
        outcomes.len() as f64 / lr.wall.as_secs_f64(),
        args.clients
    );
    for (class, (n, bad)) in &class_count {
        println!("  {:<11} {:>5} requests, {} failed checks", class.name(), n, bad);
    }
    println!("\noutcomes by kind (status: count):");
    for ((class, kind), statuses) in &by_kind {
        let total: usize = statuses.values().sum();
        let s: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("  {:<10} {:<28} {:>4}  {}", class.name(), kind, total, s.join(", "));
    }
    println!("\nlatency (request start to last byte):");
    for (bucket, v) in lat {
        println!("  {:<18} {}", bucket, pcts(v));
    }
    println!("  {:<18} {}", "valid TTFT (stream)", pcts(ttft));
    println!(
        "\nmemory (VmRSS): before load {} MiB; first-half peak {} MiB; at half {} MiB; second-half peak {} MiB; \
         after load {} MiB; allowed second-half peak {} MiB (+{:.0}% + {} MiB); growth {growth_per_request:.2} KiB \
         per request over the second half's {second_half} (allowed {allowed_per_request:.2})",
        rss_before / 1024,
        first_peak / 1024,
        rss_mid / 1024,
        second_peak / 1024,
        rss_after / 1024,
        allowed / 1024,
        args.rss_tolerance * 100.0,
        args.rss_slack_mib
    );
    let deciles: Vec<String> = (1..=10)
        .filter_map(|q| lr.rss.iter().find(|(d, _)| *d >= q * args.requests / 10).map(|(_, k)| format!("{}", k / 1024)))
        .collect();
    if args.cap_arenas {
        println!("(server started with MALLOC_ARENA_MAX=2)");
    }
    println!("VmRSS MiB at each tenth of the requests: {}", deciles.join(" "));
    let g: Vec<String> = gauges.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("gauges after load: {} (zero after {:.2}s)", g.join(" "), gauge_wait.as_secs_f64());

    // ---- hardening: big prompts, stalled connections, HTTP/2, auth, special tokens, gRPC bounds ----
    let target = moe_tests::hardening::Target {
        http: server.http,
        grpc: server.grpc,
        pid: server.pid,
        api_key: API_KEY.into(),
        max_body: MAX_BODY,
        header_timeout: Duration::from_secs(HEADER_TIMEOUT_SECS),
        body_timeout: Duration::from_secs(BODY_TIMEOUT_SECS),
        max_connections: MAX_CONNECTIONS,
    };
    println!("\nhardening:");
    for c in moe_tests::hardening::run(&target).await {
        println!("  {}", c.report);
        failures.extend(c.failure);
    }

    // ---- SIGTERM under load ----
    let st = sigterm(ctx.clone(), &args, &mut server).await?;
    let ok_inflight = st.inflight.iter().filter(|o| o.problem.is_none()).count();
    let refused: Vec<String> = st.refused.iter().map(|o| format!("{}={}", o.kind, o.status)).collect();
    println!(
        "\nSIGTERM with {} requests in flight (grace {}s): {}/{} completed with their reference text, last one \
         {:.2}s after SIGTERM; new requests: {}; server exit code {:?} after {:.2}s",
        st.inflight.len(),
        args.shutdown_grace_secs,
        ok_inflight,
        st.inflight.len(),
        st.drain.as_secs_f64(),
        refused.join(" "),
        st.exit,
        st.exit_after.as_secs_f64()
    );
    failures.extend(st.inflight.iter().chain(&st.refused).filter_map(|o| o.problem.clone()));
    if st.drain > Duration::from_secs(args.shutdown_grace_secs) {
        failures.push(format!("in-flight requests took {:.1}s, beyond the grace period", st.drain.as_secs_f64()));
    }
    match st.exit {
        Some(0) => {}
        other => failures.push(format!("server exit after SIGTERM: {other:?} (expected 0 within the grace period)")),
    }

    // ---- panics ----
    let log = server.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    if !panics.is_empty() {
        failures.push(format!("server panicked {} time(s): {}", panics.len(), panics[0]));
    }
    println!("server stderr: {} lines, {} with \"panicked\"", log.lines().count(), panics.len());

    // ---- a full queue ----
    let (statuses, failure) = queue_full(&args).await?;
    println!("\nfull queue (--max-num-seqs 1 --max-waiting 1, 4 requests at once): statuses {statuses:?}");
    failures.extend(failure);

    // ---- streams cut by the grace period ----
    let cut = grace_cut(&args).await?;
    println!(
        "\ngrace period 0 with {} streams open at SIGTERM: {} ended with their cause (SSE error event, gRPC \
         UNAVAILABLE), {} had finished, {} ended otherwise; exit {:?}",
        cut.cut + cut.finished + cut.problems.len(),
        cut.cut,
        cut.finished,
        cut.problems.len(),
        cut.exit
    );
    failures.extend(cut.problems.iter().map(|p| format!("grace cut: {p}")));
    if cut.cut == 0 {
        failures.push("grace cut: no stream was cut, so the check proves nothing".into());
    }
    if cut.exit != Some(0) {
        failures.push(format!("grace cut: server exit {:?} (expected 0)", cut.exit));
    }

    if let Some(path) = &args.json_out {
        let j = json!({
            "requests": outcomes.len(),
            "wall_s": lr.wall.as_secs_f64(),
            "by_kind": by_kind.iter().map(|((c, k), s)| json!({"class": c.name(), "kind": k, "statuses": s})).collect::<Vec<_>>(),
            "rss_kib": {"before": rss_before, "first_half_peak": first_peak, "second_half_peak": second_peak, "after": rss_after},
            "sigterm": {"inflight": st.inflight.len(), "completed": ok_inflight, "drain_s": st.drain.as_secs_f64(), "exit": st.exit, "new": refused},
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")?;
    }
    println!("total time {:.1}s", started.elapsed().as_secs_f64());
    if failures.is_empty() {
        println!("moe-faultload: PASS");
        return Ok(true);
    }
    println!("\nmoe-faultload: FAIL ({} failed checks)", failures.len());
    for f in failures.iter().take(MAX_SAMPLES) {
        println!("  - {f}");
    }
    if !panics.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        println!("server stderr tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(false)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&(args.hostile_fraction + args.disconnect_fraction)) || args.clients == 0 {
        eprintln!("moe-faultload: fractions must sum to at most 1 and --clients must be positive");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moe-faultload: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let limit = Duration::from_secs(args.time_limit_secs);
    match rt.block_on(async { tokio::time::timeout(limit, run(args)).await }) {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("moe-faultload: {e:#}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("moe-faultload: the run exceeded --time-limit-secs ({}s)", limit.as_secs());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_parse() {
        let m = "# TYPE moe_kv_blocks_used gauge\nmoe_kv_blocks_used 3\nmoe_kv_blocks_used_total 9\nmoe_running_sequences{a=\"b\"} 0\n";
        assert_eq!(gauge(m, "moe_kv_blocks_used"), Some(3.0));
        assert_eq!(gauge(m, "moe_running_sequences"), Some(0.0));
        assert_eq!(gauge(m, "moe_waiting_sequences"), None);
    }

    #[test]
    fn plan_is_deterministic_and_mixed() {
        let args = Args::parse_from(["moe-faultload"]);
        let (mut h, mut d, mut v) = (0, 0, 0);
        for i in 0..2000 {
            match plan(i, &args).0 {
                Planned::Hostile(c) => {
                    assert!(c < HOSTILE_CASES);
                    h += 1
                }
                Planned::Disconnect(_) => d += 1,
                Planned::Valid(..) => v += 1,
            }
        }
        assert!((300..500).contains(&h), "{h}");
        assert!((120..280).contains(&d), "{d}");
        assert_eq!(h + d + v, 2000);
        // every hostile case can be built
        let mut rng = Rng::new(0);
        for c in 0..HOSTILE_CASES {
            let _ = hostile_case(c, &mut rng);
        }
    }

    #[test]
    fn rest_text_reads_json_and_sse() {
        let body = r#"{"choices":[{"index":0,"text":"ab","finish_reason":"length"}]}"#;
        assert_eq!(rest_text(body, false, false, 0).unwrap(), Expected { text: "ab".into(), finish: "length".into() });
        let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n\
                   data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(rest_text(sse, true, true, 0).unwrap(), Expected { text: "ab".into(), finish: "stop".into() });
        assert!(rest_text("data: {}\n\n", true, false, 0).is_err());
    }
}
