//! Harmony chat completions end to end: the built-in model with four of its
//! vocabulary entries renamed to harmony's markup tokens (and made special),
//! nudged by `logit_bias` to emit them. Whatever it emits, the response's
//! `content` and `reasoning_content` must be the split that the harmony
//! rules give for the tokens it returned (as logprobs), streaming or not.

mod common;

use common::{config, TestServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const MARKUP: [&str; 4] = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>"];

/// The built-in model in a temp dir, its last four vocabulary entries
/// renamed to the harmony markup (special tokens); returns the dir and their ids.
fn harmony_model(tmp: &Path) -> (PathBuf, Vec<u64>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.join(p.file_name().unwrap())).unwrap();
    }
    let path = tmp.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let n = t["model"]["vocab"].as_object().unwrap().len() as u64;
    let ids: Vec<u64> = (n - 4..n).collect();
    for (name, &id) in MARKUP.iter().zip(&ids) {
        let vocab = t["model"]["vocab"].as_object_mut().unwrap();
        let old = vocab.iter().find(|(_, v)| v.as_u64() == Some(id)).map(|(k, _)| k.clone()).unwrap();
        vocab.remove(&old);
        vocab.insert(name.to_string(), json!(id));
        // merges that make or use the old entry would name a missing token
        let parts = |m: &Value| -> Vec<String> {
            match m {
                Value::String(s) => s.split(' ').map(str::to_string).collect(),
                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                _ => vec![],
            }
        };
        t["model"]["merges"].as_array_mut().unwrap().retain(|m| {
            let p = parts(m);
            p.concat() != old && !p.contains(&old)
        });
        t["added_tokens"].as_array_mut().unwrap().push(json!({"id": id, "content": name, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(&path, t.to_string()).unwrap();
    (tmp.to_path_buf(), ids)
}

/// The harmony split of a token sequence, by the rules the server follows:
/// a channel named `final` (or text outside markup) is content, any other
/// channel reasoning; markup, roles and channel names are not shown.
fn split(tokens: &[String]) -> (String, String) {
    let (mut content, mut reasoning) = (String::new(), String::new());
    let mut state = "body-content";
    let mut name = String::new();
    for t in tokens {
        match t.as_str() {
            "<|channel|>" => {
                state = "channel";
                name.clear();
            }
            "<|message|>" => {
                let reasoning_channel = state == "channel" && name.split_whitespace().next() != Some("final");
                state = if reasoning_channel { "body-reasoning" } else { "body-content" };
            }
            "<|start|>" | "<|end|>" => state = "header",
            text => match state {
                "body-content" => content.push_str(text),
                "body-reasoning" => reasoning.push_str(text),
                "channel" => name.push_str(text),
                _ => {}
            },
        }
    }
    (content, reasoning)
}

#[tokio::test]
async fn final_channel_is_content_and_the_others_reasoning() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ids) = harmony_model(tmp.path());
    let s = TestServer::start(config(|a| a.model = Some(dir)), true).await;
    // start, end: rarely; channel, message: often
    let bias: serde_json::Map<String, Value> =
        ids.iter().zip([3.0, 3.0, 7.0, 7.0]).map(|(id, b)| (id.to_string(), json!(b))).collect();
    let (mut both, mut tried) = (0, 0);
    for seed in 0..32 {
        let body = json!({"messages": [{"role": "user", "content": "Speak, what is the question?"}],
            "max_tokens": 48, "temperature": 1.0, "seed": seed, "logit_bias": bias, "logprobs": true});
        let (st, out) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(st, 200, "{out}");
        let msg = &out["choices"][0]["message"];
        let tokens: Vec<String> = out["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_string())
            .collect();
        let (content, reasoning) = split(&tokens);
        assert_eq!(msg["content"].as_str(), Some(content.as_str()), "seed {seed}: {tokens:?}");
        assert_eq!(msg["reasoning_content"].as_str(), Some(reasoning.as_str()), "seed {seed}: {tokens:?}");
        tried += 1;
        both += usize::from(!content.is_empty() && !reasoning.is_empty());
        // streamed deltas add up to the same split
        let mut b = body;
        b["stream"] = json!(true);
        let (mut sc, mut sr) = (String::new(), String::new());
        for ev in s.stream("/v1/chat/completions", b).await.iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(ev).unwrap();
            let d = &v["choices"][0]["delta"];
            sc.push_str(d["content"].as_str().unwrap_or(""));
            sr.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        }
        assert_eq!((sc, sr), (content, reasoning), "seed {seed}: streamed");
    }
    assert!(both > 0, "none of {tried} completions had both channels: the test proves nothing");
}

#[tokio::test]
async fn a_model_without_the_markup_has_no_reasoning_field() {
    let s = TestServer::default().await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0});
    let (st, out) = s.post("/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{out}");
    assert!(out["choices"][0]["message"].get("reasoning_content").is_none(), "{out}");
}
