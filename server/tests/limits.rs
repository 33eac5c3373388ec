//! Limits and access end to end: defaults bind to loopback, /health and /metrics are public only
//! as configured, the API key guards REST and gRPC (reflection included) alike, gRPC messages
//! are bounded like REST bodies, stop strings are bounded in length, and gRPC streams per
//! connection are capped.

mod common;

use common::{config, TestServer};
use futures_util::StreamExt;
use moe_proto::v1 as pb;
use moe_proto::v1::generation_client::GenerationClient;
use moe_server::config::ServeArgs;
use serde_json::json;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const KEY: &str = "limits-test-key";

async fn channel(s: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", s.grpc_addr)).unwrap().connect().await.unwrap()
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    r
}

fn generate_request(text: String, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text)),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

async fn get_status(s: &TestServer, path: &str, key: Option<&str>) -> u16 {
    let mut r = s.client.get(s.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap().status().as_u16()
}

async fn grpc_health(s: &TestServer, key: bool) -> Result<i32, Code> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(s).await);
    let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let r = if key { h.check(authed(req)).await } else { h.check(req).await };
    r.map(|r| r.into_inner().status).map_err(|e| e.code())
}

#[test]
fn defaults_bind_loopback_with_open_health_and_metrics() {
    let c = ServeArgs::default().resolve().unwrap();
    assert_eq!(c.host, std::net::IpAddr::from([127, 0, 0, 1]));
    assert!(c.public_health && c.public_metrics);
    assert_eq!(c.grpc_max_concurrent_streams, 128);
    assert!(c.api_key.is_none());
    let bad = ServeArgs { grpc_max_concurrent_streams: Some(0), ..Default::default() }.resolve().unwrap();
    assert!(bad.validate().is_err());
}

#[tokio::test]
async fn key_guards_rest_and_grpc_health_and_metrics_open_by_default() {
    let s = TestServer::start(config(|a| a.api_key = Some(KEY.into())), true).await;
    // the API needs the key on both protocols
    assert_eq!(get_status(&s, "/v1/models", None).await, 401);
    assert_eq!(get_status(&s, "/v1/models", Some("wrong")).await, 401);
    assert_eq!(get_status(&s, "/v1/models", Some(KEY)).await, 200);
    let mut g = GenerationClient::new(channel(&s).await);
    assert_eq!(g.list_models(pb::ListModelsRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    assert!(g.list_models(authed(pb::ListModelsRequest {})).await.is_ok());
    // probes and scrapes need none by default
    assert_eq!(get_status(&s, "/health", None).await, 200);
    assert_eq!(get_status(&s, "/metrics", None).await, 200);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(grpc_health(&s, false).await, Ok(serving));
    // reflection is API surface: guarded
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut r = ServerReflectionClient::new(channel(&s).await);
    let e = r.server_reflection_info(futures_util::stream::iter(vec![req()])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut resp =
        r.server_reflection_info(authed(futures_util::stream::iter(vec![req()]))).await.unwrap().into_inner();
    assert!(resp.next().await.unwrap().is_ok());
}

#[tokio::test]
async fn health_and_metrics_behind_the_key_when_not_public() {
    let s = TestServer::start(
        config(|a| {
            a.api_key = Some(KEY.into());
            a.public_health = Some(false);
            a.public_metrics = Some(false);
        }),
        true,
    )
    .await;
    for path in ["/health", "/metrics"] {
        assert_eq!(get_status(&s, path, None).await, 401, "{path}");
        assert_eq!(get_status(&s, path, Some(KEY)).await, 200, "{path}");
    }
    assert_eq!(grpc_health(&s, false).await, Err(Code::Unauthenticated));
    assert!(grpc_health(&s, true).await.is_ok());
    // only one of them public
    let s = TestServer::start(
        config(|a| {
            a.api_key = Some(KEY.into());
            a.public_metrics = Some(false);
        }),
        true,
    )
    .await;
    assert_eq!(get_status(&s, "/health", None).await, 200);
    assert_eq!(get_status(&s, "/metrics", None).await, 401);
}

#[tokio::test]
async fn grpc_messages_are_bounded_like_rest_bodies() {
    let s = TestServer::start(config(|a| a.max_body_bytes = Some(64 * 1024)), true).await;
    let big = "a".repeat(100 * 1024);
    let (status, _) = s.post("/v1/completions", json!({"prompt": big, "max_tokens": 2})).await;
    assert_eq!(status, 413);
    let mut g = GenerationClient::new(channel(&s).await);
    let e = g.generate(generate_request(big, 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    // within the limit it goes through to the prompt checks
    let e = g.generate(generate_request("a ".repeat(20 * 1024), 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(g.generate(generate_request("ROMEO:".into(), 2)).await.is_ok());
    // responses are bounded by the same setting: 30k token ids fit a request of
    // 64 KiB, their text does not fit a response
    let ids: Vec<u32> = (0..30_000).map(|i| 200 + (i % 400)).collect();
    let req = pb::DetokenizeRequest { model: String::new(), token_ids: ids };
    let e = g.detokenize(req).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("response") && e.message().contains("65536"), "{e}");
    let req = pb::DetokenizeRequest { model: String::new(), token_ids: vec![300, 301] };
    assert!(g.detokenize(req).await.is_ok());
}

#[tokio::test]
async fn stop_strings_are_bounded_in_length() {
    let s = TestServer::default().await;
    let max = moe_server::frontend::params::MAX_STOP_BYTES;
    let (status, v) =
        s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2, "stop": ["a".repeat(max + 1)]})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "stop");
    let (status, v) =
        s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2, "stop": ["a".repeat(max)]})).await;
    assert_eq!(status, 200, "{v}");
    let mut g = GenerationClient::new(channel(&s).await);
    let mut req = generate_request("x".into(), 2);
    req.stop = vec!["b".repeat(max + 1)];
    assert_eq!(g.generate(req).await.unwrap_err().code(), Code::InvalidArgument);
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS the gRPC server advertises, read with a bare h2 client.
async fn advertised_max_streams(s: &TestServer) -> usize {
    let tcp = tokio::net::TcpStream::connect(s.grpc_addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    // until the server's SETTINGS arrive the client assumes no limit
    for _ in 0..200 {
        let n = send.current_max_send_streams();
        if n != usize::MAX {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        send = send.ready().await.unwrap();
    }
    panic!("no SETTINGS_MAX_CONCURRENT_STREAMS from the server");
}

#[tokio::test]
async fn grpc_streams_per_connection_are_capped() {
    let s = TestServer::start(config(|a| a.grpc_max_concurrent_streams = Some(3)), true).await;
    assert_eq!(advertised_max_streams(&s).await, 3);
    let s = TestServer::default().await;
    assert_eq!(advertised_max_streams(&s).await, 128);
    // calls beyond the cap wait for a free stream rather than fail
    let s = TestServer::start(config(|a| a.grpc_max_concurrent_streams = Some(1)), true).await;
    let mut g = GenerationClient::new(channel(&s).await);
    // (one call first: streams opened before the server's SETTINGS arrive are refused with
    // REFUSED_STREAM, which clients may retry)
    g.generate(generate_request("ROMEO:".into(), 1)).await.unwrap();
    let calls = (0..4).map(|i| {
        let mut g = g.clone();
        async move { g.generate(generate_request(format!("Tale {i}"), 4)).await }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().into_inner().choices[0].token_ids.len(), 4);
    }
}

/// A prompt far over the token limit is refused from a bounded prefix, not
/// tokenized in full (peak memory per request is bounded; see the
/// load-and-fault note's figures); `/tokenize` is bounded the same way.
#[tokio::test]
async fn a_huge_prompt_is_refused_without_tokenizing_it_all() {
    let s = TestServer::start(config(|a| a.max_prompt_tokens = Some(1000)), true).await;
    let huge = "hello world ".repeat(150_000); // 1.8 MB, about 300k tokens
    for (path, body) in
        [("/v1/completions", json!({"prompt": huge, "max_tokens": 2})), ("/tokenize", json!({"prompt": huge}))]
    {
        let (status, v) = s.post(path, body).await;
        assert_eq!(status, 400, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("more than 1001 tokens; the limit is 1000"), "{path}: {msg}");
        assert_eq!(v["error"]["code"], "context_length_exceeded");
    }
    // below the probe length the count is exact
    let (status, v) = s.post("/v1/completions", json!({"prompt": "hello world ".repeat(600), "max_tokens": 2})).await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("the prompt has ") && !msg.contains("more than"), "{msg}");
}
