//! The `moe-serve generate` command end to end: clear errors with a non-zero
//! exit for broken model directories, and working generation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_moe-serve");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A word-level tokenizer small enough for the 256-entry fixture vocabularies.
const TINY_TOKENIZER: &str = r###"{"version":"1.0","truncation":null,"padding":null,
 "added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                 {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
 "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
 "decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
 "model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"hello":3,"world":4,"the":5},"unk_token":"<unk>"}}"###;

/// A copy of fixture `name` with a tokenizer added, in a fresh temp dir.
fn model_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(repo().join("tests/fixtures").join(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    dir
}

fn generate(model: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["generate", "--prompt", "hello world", "--max-tokens", "8", "--temperature", "0", "--model"])
        .arg(model)
        .args(extra)
        .output()
        .unwrap()
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

#[test]
fn missing_directory() {
    let out = generate(Path::new("/definitely/not/a/model"), &[]);
    assert_fails_with(&out, "/definitely/not/a/model: model directory not found");
}

#[test]
fn malformed_config() {
    let dir = model_copy("mixtral");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"mixtral\", ").unwrap();
    assert_fails_with(&generate(dir.path(), &[]), "malformed config");
}

#[test]
fn unknown_model_type() {
    let dir = model_copy("mixtral");
    let cfg =
        std::fs::read_to_string(dir.path().join("config.json")).unwrap().replace("\"mixtral\"", "\"llama4_text\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    assert_fails_with(&generate(dir.path(), &[]), "unsupported model_type \"llama4_text\"");
}

#[test]
fn truncated_safetensors() {
    let dir = model_copy("mixtral");
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    assert_fails_with(&generate(dir.path(), &[]), "invalid safetensors file");
}

#[test]
fn shape_mismatch() {
    let dir = model_copy("mixtral");
    // the config now promises wider experts than the tensors hold
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 48");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    assert_fails_with(&generate(dir.path(), &[]), "has shape [32, 64], expected [48, 64]");
}

#[test]
fn missing_tensor() {
    let dir = model_copy("mixtral");
    // one more layer than the checkpoint has
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    assert_fails_with(&generate(dir.path(), &[]), "missing tensor model.layers.2.");
}

#[test]
fn bad_sampling_flag() {
    let dir = model_copy("mixtral");
    // the REST and gRPC APIs' rules and messages (frontend::params), the flag named
    assert_fails_with(&generate(dir.path(), &["--top-p", "0"]), "--top-p: `top_p` must be greater than 0");
    assert_fails_with(&generate(dir.path(), &["--top-p", "1.5"]), "--top-p: `top_p` must be between 0 and 1, got 1.5");
}

#[test]
fn generates_from_a_fixture_checkpoint() {
    let dir = model_copy("qwen2_moe");
    let out = generate(dir.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("generated"));
}

#[test]
fn default_model_speaks_and_same_seed_repeats() {
    let run = |seed: &str| {
        let out = Command::new(BIN)
            .args(["generate", "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "0.8", "--seed", seed])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run("7");
    assert_eq!(a, run("7"), "same seed, different text");
    assert_ne!(a, run("8"), "different seeds, same text");
    let words = a.split_whitespace().count();
    assert!(words >= 10, "too little text: {a:?}");
}

/// The real binary on SIGTERM: the in-flight request finishes and the
/// process exits cleanly (refusing new work is tested in http_lifecycle.rs).
#[test]
fn sigterm_drains_then_exits() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--grpc-port", "0", "--shutdown-grace-secs", "20"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut line, mut port) = (String::new(), None);
    while port.is_none() {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited early");
        if let Some(rest) = line.strip_prefix("listening on http://127.0.0.1:") {
            port = rest.split_whitespace().next().and_then(|p| p.parse::<u16>().ok());
        }
    }
    let port = port.unwrap();
    let post = move |body: &str| -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    // wait for the model
    for _ in 0..200 {
        if post(r#"{"prompt": "x", "max_tokens": 1}"#).starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let inflight = std::thread::spawn(move || post(r#"{"prompt": "ROMEO:", "max_tokens": 300, "ignore_eos": true}"#));
    std::thread::sleep(std::time::Duration::from_millis(20));
    // the shell's built-in kill: no procps needed on the test machine
    let term = format!("kill -TERM {}", child.id());
    assert!(Command::new("sh").args(["-c", &term]).status().unwrap().success());
    let resp = inflight.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"completion_tokens\":300"), "{resp}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    assert!(!rest.contains("panicked"), "{rest}");
}

/// `moe-serve trace` records a readable, versioned trace of a text file.
#[test]
fn trace_command_records_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(
        &input,
        "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
            .repeat(4),
    )
    .unwrap();
    let output = dir.path().join("trace.jsonl");
    let out = Command::new(BIN)
        .args(["trace", "--window", "16", "--max-windows", "3", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (header, tokens) =
        moe_types::trace::read_trace(std::io::BufReader::new(std::fs::File::open(&output).unwrap())).unwrap();
    assert_eq!(header.model, "tiny-shakespeare-moe");
    assert_eq!((header.moe_layers.len(), header.num_experts, header.top_k), (4, 8, 2));
    assert_eq!(tokens.len(), 48, "3 windows of 16 tokens");
    for seq in 0..3 {
        let positions: Vec<u32> = tokens.iter().filter(|t| t.seq == seq).map(|t| t.pos).collect();
        assert_eq!(positions, (0..16).collect::<Vec<_>>());
    }
    let err = Command::new(BIN).args(["trace", "--input", "/no/such/file", "--output"]).arg(&output).output().unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("reading /no/such/file"));
}

/// `trace --hidden-states` writes one hidden-state record per traced token,
/// in the same order, and `train-predictor --hidden-states` fits probes from
/// them that `--predictor hidden` can load.
#[test]
fn hidden_states_are_traced_and_train_probes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "First Citizen:\nBefore we proceed any further, hear me speak.\n".repeat(40)).unwrap();
    let (trace, hidden, probes) =
        (dir.path().join("t.jsonl"), dir.path().join("t.hidden"), dir.path().join("p.safetensors"));
    let out = Command::new(BIN)
        .args(["trace", "--window", "32", "--max-windows", "12", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&trace)
        .arg("--hidden-states")
        .arg(&hidden)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, tokens) =
        moe_types::trace::read_trace(std::io::BufReader::new(std::fs::File::open(&trace).unwrap())).unwrap();
    let f = std::io::BufReader::new(std::fs::File::open(&hidden).unwrap());
    let mut r = moe_types::hidden_trace::HiddenReader::new(f).unwrap();
    assert_eq!((r.header().hidden_size, r.header().moe_layers, r.header().experts), (128, 4, 8));
    for t in &tokens {
        let rec = r.next_record().unwrap().expect("a record per token");
        assert_eq!((rec.seq, rec.pos), (t.seq, t.pos));
        assert!(rec.values.iter().all(|v| v.is_finite()) && rec.values.iter().any(|&v| v != 0.0));
        // the recorded router scores choose the traced experts
        for (m, chosen) in t.experts.iter().enumerate() {
            let s = &rec.logits[m * 8..(m + 1) * 8];
            let best = (0..8).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
            assert_eq!(best as u16, chosen[0], "token {} layer {m}", t.pos);
        }
    }
    assert!(r.next_record().unwrap().is_none());
    let out = Command::new(BIN)
        .args(["train-predictor", "--trace"])
        .arg(&trace)
        .arg("--hidden-states")
        .arg(&hidden)
        .arg("--output")
        .arg(&probes)
        .args(["--probe-units", "16", "--epochs", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("held-out recall per MoE layer"), "{err}");
    let p = moe_offload::predictor::HiddenProbes::load(&probes).unwrap();
    assert_eq!((p.layers, p.experts, p.hidden, p.distances, p.units()), (4, 8, 128, 3, 16));
}
