//! Start-up faults: a model directory that cannot be loaded must make both
//! `moe-serve serve --model DIR` and `moe-serve generate --model DIR` print a
//! clear one-line message naming the problem and exit non-zero (no panic, no
//! server left running).
//!
//! Each case breaks a fresh copy of a fixture checkpoint one way and runs the
//! real binary. `serve` binds port 0 for REST and gRPC, then loads the model
//! in the background; a failed load must end the process.
//!
//! Permission cases: root reads files whatever their mode, so when the tests
//! run as root the binary is started as uid/gid 65534 ("nobody") for those
//! cases; where that user cannot run it, they print SKIPPED with the reason.

#![cfg(unix)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_moe-serve");

/// How long a failing start-up may take before the test gives up on it.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A word-level tokenizer that fits the fixtures' 256-entry vocabularies.
const TINY_TOKENIZER: &str = r###"{"version":"1.0","truncation":null,"padding":null,
 "added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
                 {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
 "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
 "decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
 "model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"hello":3,"world":4,"the":5},"unk_token":"<unk>"}}"###;

/// A temp dir (mode 0755, so another user may enter it) holding `model/`, a
/// loadable copy of fixture `fixture` with a tokenizer added.
struct ModelCopy {
    root: tempfile::TempDir,
}

impl ModelCopy {
    fn new(fixture: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        set_mode(root.path(), 0o755);
        let dir = root.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(repo().join("tests/fixtures").join(fixture)).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() == "reference.safetensors" {
                continue; // the transformers outputs, not part of the checkpoint
            }
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
            set_mode(&dir.join(p.file_name().unwrap()), 0o644);
        }
        std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
        Self { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("model")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    fn edit_config(&self, from: &str, to: &str) {
        let p = self.file("config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "fixture config lacks {from:?}");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    }
}

impl Drop for ModelCopy {
    fn drop(&mut self) {
        // undo any chmod 000 so the temp dir can be removed without root
        set_mode(&self.dir(), 0o755);
        if let Ok(rd) = std::fs::read_dir(self.dir()) {
            for e in rd.flatten() {
                set_mode(&e.path(), 0o644);
            }
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

/// Which command to start.
#[derive(Clone, Copy)]
enum Mode {
    Generate,
    Serve,
}

fn command(mode: Mode, model: &Path) -> Command {
    let mut c = Command::new(BIN);
    match mode {
        Mode::Generate => c.args(["generate", "--prompt", "hello world", "--max-tokens", "4", "--temperature", "0"]),
        Mode::Serve => c.args(["serve", "--port", "0", "--grpc-port", "0"]),
    };
    c.arg("--model").arg(model).env("RUST_LOG", "warn").stdin(Stdio::null());
    c
}

/// Runs `c` to completion, killing it (and failing) if it outlives the deadline.
fn run_bounded(mut c: Command) -> std::io::Result<Output> {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > EXIT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
            panic!("still running after {EXIT_DEADLINE:?} (a failed load must end the process); stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() })
}

/// Asserts a clear failure: non-zero exit, `needle` on stderr, no panic, and
/// the error on one `error:` line.
fn assert_fails_with(mode: Mode, out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let cmd = match mode {
        Mode::Generate => "generate",
        Mode::Serve => "serve",
    };
    assert!(!out.status.success(), "{cmd}: expected a non-zero exit; stderr: {err}");
    assert!(!err.contains("panicked"), "{cmd}: panicked: {err}");
    let line = err.lines().find(|l| l.starts_with("error: "));
    let line = line.unwrap_or_else(|| panic!("{cmd}: no `error:` line on stderr: {err}"));
    assert!(line.contains(needle), "{cmd}: error line lacks {needle:?}: {line}");
    assert!(line.contains("loading model from"), "{cmd}: error line does not say what failed: {line}");
}

/// Both commands fail on `model` with `needle` in the message.
fn check_both(model: &Path, needle: &str) {
    for mode in [Mode::Generate, Mode::Serve] {
        let out = run_bounded(command(mode, model)).unwrap();
        assert_fails_with(mode, &out, needle);
    }
}

// ---- safetensors files -------------------------------------------------

/// The header of a safetensors file: (length field, JSON).
fn header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

#[test]
fn truncated_safetensors_data() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
}

#[test]
fn truncated_safetensors_header() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    // the length field and half the header JSON
    let (n, _) = header(&bytes);
    std::fs::write(&p, &bytes[..8 + n / 2]).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
    // shorter than the length field itself
    std::fs::write(&p, &bytes[..5]).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
    std::fs::write(&p, b"").unwrap();
    check_both(&m.dir(), "invalid safetensors file");
}

#[test]
fn corrupt_safetensors_header() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let good = std::fs::read(&p).unwrap();
    // JSON syntax destroyed
    let mut bytes = good.clone();
    bytes[8..24].copy_from_slice(b"#not json at all");
    std::fs::write(&p, &bytes).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
    // a header length far beyond the file
    let mut bytes = good.clone();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
    // random bytes where a checkpoint should be
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&p, &noise).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
}

#[test]
fn safetensors_offsets_outside_the_file() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (n, mut h) = header(&bytes);
    // the last tensor claims more bytes than the file holds
    let obj = h.as_object_mut().unwrap();
    let last = obj
        .iter_mut()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .unwrap()
        .1;
    let end = last["data_offsets"][1].as_u64().unwrap();
    last["data_offsets"][1] = serde_json::json!(end + 4096);
    std::fs::write(&p, rewrite_header(&bytes, n, &h)).unwrap();
    check_both(&m.dir(), "invalid safetensors file");
}

/// `bytes` with its header replaced by `h`, padded with spaces to the old
/// length so the data offsets stay where they were.
fn rewrite_header(bytes: &[u8], n: usize, h: &serde_json::Value) -> Vec<u8> {
    let mut json = serde_json::to_vec(h).unwrap();
    assert!(json.len() <= n, "edited header grew");
    json.resize(n, b' ');
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn wrong_tensor_shape_in_checkpoint() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (n, mut h) = header(&bytes);
    // same byte count, transposed: a valid file whose tensor does not fit the config
    let name = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
    assert_eq!(h[name]["shape"], serde_json::json!([32, 64]), "fixture changed");
    h[name]["shape"] = serde_json::json!([64, 32]);
    std::fs::write(&p, rewrite_header(&bytes, n, &h)).unwrap();
    check_both(&m.dir(), &format!("tensor {name} has shape [64, 32], expected [32, 64]"));
}

#[test]
fn wrong_shape_implied_by_config() {
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"hidden_size\": 64", "\"hidden_size\": 96");
    check_both(&m.dir(), "has shape [256, 64], expected [256, 96]");
}

#[test]
fn unsupported_tensor_dtype() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (n, mut h) = header(&bytes);
    // F32 -> I32: same size, a dtype no weight may have
    let name = "model.norm.weight";
    assert_eq!(h[name]["dtype"], "F32", "fixture changed");
    h[name]["dtype"] = serde_json::json!("I32");
    std::fs::write(&p, rewrite_header(&bytes, n, &h)).unwrap();
    check_both(&m.dir(), &format!("tensor {name} has unsupported dtype"));
}

// ---- missing files -----------------------------------------------------

#[test]
fn missing_model_directory() {
    check_both(Path::new("/definitely/not/a/model"), "model directory not found");
}

#[test]
fn missing_safetensors_file() {
    let m = ModelCopy::new("mixtral");
    std::fs::remove_file(m.file("model.safetensors")).unwrap();
    check_both(&m.dir(), "no *.safetensors file in the model directory");
}

#[test]
fn missing_shard_listed_in_the_index() {
    let m = ModelCopy::new("qwen2_moe");
    let shard = m.file("model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    check_both(&m.dir(), &format!("cannot read {}", shard.display()));
}

#[test]
fn missing_config_json() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("config.json");
    std::fs::remove_file(&p).unwrap();
    check_both(&m.dir(), &format!("cannot read {}", p.display()));
}

#[test]
fn missing_tokenizer_json() {
    let m = ModelCopy::new("mixtral");
    std::fs::remove_file(m.file("tokenizer.json")).unwrap();
    check_both(&m.dir(), "tokenizer.json not found");
}

#[test]
fn model_path_is_a_file() {
    let m = ModelCopy::new("mixtral");
    check_both(&m.file("config.json"), "model directory not found");
}

// ---- unreadable files and directories ----------------------------------

/// Whether this process runs as root, where permission bits do not stop reads.
fn is_root() -> bool {
    // the owner of a file this process creates is its effective uid
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid() == 0
}

/// `command(mode, model)`, run as an unprivileged user when we are root
/// (uid/gid 65534, "nobody"), so that mode 000 really denies access. `None`
/// (with the reason printed) when that user cannot run the binary here.
fn run_unprivileged(mode: Mode, model: &Path) -> Option<Output> {
    let mut c = command(mode, model);
    if is_root() {
        use std::os::unix::process::CommandExt;
        // (std drops the supplementary groups when root sets a uid)
        c.uid(65534).gid(65534);
        // can "nobody" run the binary at all (every directory above it searchable)?
        let mut probe = Command::new(BIN);
        probe.arg("--version").uid(65534).gid(65534).stdout(Stdio::null()).stderr(Stdio::null());
        match probe.status() {
            Ok(s) if s.success() => {}
            other => {
                moe_types::testing::skip(
                    "startup_faults (permission cases)",
                    &format!("running as root and uid 65534 cannot run {BIN} ({other:?}); mode 000 does not stop root"),
                );
                return None;
            }
        }
    }
    Some(run_bounded(c).unwrap())
}

#[test]
fn unreadable_model_directory() {
    let m = ModelCopy::new("mixtral");
    set_mode(&m.dir(), 0o000);
    for mode in [Mode::Generate, Mode::Serve] {
        let Some(out) = run_unprivileged(mode, &m.dir()) else { return };
        assert_fails_with(mode, &out, &format!("cannot read {}: Permission denied", m.dir().display()));
    }
}

#[test]
fn unreadable_safetensors_file() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("model.safetensors");
    set_mode(&p, 0o000);
    for mode in [Mode::Generate, Mode::Serve] {
        let Some(out) = run_unprivileged(mode, &m.dir()) else { return };
        assert_fails_with(mode, &out, &format!("cannot read {}: Permission denied", p.display()));
    }
}

#[test]
fn unreadable_config_json() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("config.json");
    set_mode(&p, 0o000);
    for mode in [Mode::Generate, Mode::Serve] {
        let Some(out) = run_unprivileged(mode, &m.dir()) else { return };
        assert_fails_with(mode, &out, &format!("cannot read {}: Permission denied", p.display()));
    }
}

/// The unprivileged user can run the binary on a readable copy: the
/// permission tests above fail for the reason they name, not another.
#[test]
fn unprivileged_user_loads_a_readable_model() {
    let m = ModelCopy::new("mixtral");
    let Some(out) = run_unprivileged(Mode::Generate, &m.dir()) else { return };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---- malformed config.json ---------------------------------------------

#[test]
fn config_json_truncated() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, &text[..text.len() / 2]).unwrap();
    check_both(&m.dir(), &format!("malformed config {}", p.display()));
}

#[test]
fn config_json_empty_or_not_an_object() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("config.json");
    for text in ["", "[1, 2, 3]", "\u{feff}garbage", "null"] {
        std::fs::write(&p, text).unwrap();
        check_both(&m.dir(), &format!("malformed config {}", p.display()));
    }
}

#[test]
fn config_json_not_utf8() {
    let m = ModelCopy::new("mixtral");
    let p = m.file("config.json");
    std::fs::write(&p, [0xff, 0xfe, b'{', 0x80, b'}']).unwrap();
    check_both(&m.dir(), &format!("cannot read {}", p.display()));
}

#[test]
fn config_json_wrong_field_type() {
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"hidden_size\": 64", "\"hidden_size\": \"sixty-four\"");
    check_both(&m.dir(), "malformed config");
}

#[test]
fn config_json_missing_required_field() {
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"num_hidden_layers\": 2,", "");
    check_both(&m.dir(), "missing field `num_hidden_layers`");
}

#[test]
fn config_json_impossible_values() {
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"num_attention_heads\": 4", "\"num_attention_heads\": 0");
    check_both(&m.dir(), "must be positive");
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 5");
    check_both(&m.dir(), "num_experts_per_tok 5 must be in 1..=4");
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
    check_both(&m.dir(), "malformed config");
    let m = ModelCopy::new("mixtral");
    m.edit_config("\"vocab_size\": 256", "\"vocab_size\": 4");
    check_both(&m.dir(), "has shape [256, 64], expected [4, 64]");
}
