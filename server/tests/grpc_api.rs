//! The gRPC API end to end with a tonic client on 127.0.0.1 port 0.

mod common;

use common::{config, TestServer};
use futures_util::StreamExt;
use moe_proto::v1 as pb;
use moe_proto::v1::generation_client::GenerationClient;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn client(s: &TestServer) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{}", s.grpc_addr)).await.unwrap()
}

fn text_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

async fn wait_freed(s: &TestServer) {
    let engine = s.state.ready().unwrap().engine.clone();
    for _ in 0..300 {
        let st = engine.stats();
        if st.kv_blocks_used.load(Ordering::Relaxed) == 0
            && st.running.load(Ordering::Relaxed) == 0
            && st.in_flight.load(Ordering::Relaxed) == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("KV blocks / sequences were not freed");
}

#[tokio::test]
async fn unary_and_streaming_match_rest() {
    let s = TestServer::default().await;
    let mut c = client(&s).await;
    let resp = c.generate(text_request("ROMEO:", 20)).await.unwrap().into_inner();
    let choice = &resp.choices[0];
    assert_eq!(choice.token_ids.len(), 20);
    assert_eq!(choice.finish_reason, pb::FinishReason::Length as i32);
    let usage = resp.usage.unwrap();
    assert_eq!(usage.completion_tokens, 20);
    // same engine, same validation: REST gives the same greedy text
    let (_, rest) = s
        .post("/v1/completions", json!({"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(rest["choices"][0]["text"].as_str().unwrap(), choice.text);
    assert_eq!(rest["usage"]["prompt_tokens"].as_u64().unwrap() as u32, usage.prompt_tokens);

    let mut req = text_request("ROMEO:", 20);
    req.include_usage = true;
    req.logprobs = Some(2);
    let mut stream = c.generate_stream(req).await.unwrap().into_inner();
    let (mut text, mut tokens, mut finish, mut got_usage) = (String::new(), 0, None, None);
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            pb::generate_stream_response::Event::Token(t) => {
                tokens += 1;
                text.push_str(&t.text);
                let lp = t.logprob.unwrap();
                assert_eq!(lp.top.len(), 2);
                assert_eq!(lp.token_id, t.token_id);
            }
            pb::generate_stream_response::Event::Finish(f) => {
                text.push_str(&f.text);
                finish = Some(f.finish_reason);
            }
            pb::generate_stream_response::Event::Usage(u) => got_usage = Some(u),
        }
    }
    assert_eq!(text, choice.text);
    assert_eq!(tokens, 20);
    assert_eq!(finish, Some(pb::FinishReason::Length as i32));
    assert_eq!(got_usage.unwrap().completion_tokens, 20);
}

#[tokio::test]
async fn cancel_mid_stream_frees_kv() {
    let s = TestServer::default().await;
    let mut c = client(&s).await;
    let mut stream = c.generate_stream(text_request("A long tale", 400)).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().is_ok());
    let engine = s.state.ready().unwrap().engine.clone();
    assert!(engine.stats().kv_blocks_used.load(Ordering::Relaxed) > 0);
    drop(stream);
    wait_freed(&s).await;
}

#[tokio::test]
async fn deadline_stops_generation() {
    let s = TestServer::default().await;
    let mut c = client(&s).await;
    for streaming in [false, true] {
        // the deadline as a client sends it (grpc-timeout), without a
        // client-side timer, so the server's handling is what is tested
        let mut req = Request::new(text_request("A long tale", 450));
        req.metadata_mut().insert("grpc-timeout", "30m".parse().unwrap());
        let status = if streaming {
            match c.generate_stream(req).await {
                Err(e) => e,
                Ok(r) => {
                    let mut st = r.into_inner();
                    loop {
                        match st.next().await {
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => break e,
                            None => panic!("stream ended without hitting the deadline"),
                        }
                    }
                }
            }
        } else {
            c.generate(req).await.unwrap_err()
        };
        if streaming {
            // past the response headers only the server's deadline applies
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
        } else {
            // tonic's client enforces the same header; whichever side fires first
            assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status}");
        }
        wait_freed(&s).await;
    }
    // a client that gives up on its own timer also frees everything
    let mut req = Request::new(text_request("A long tale", 450));
    req.set_timeout(Duration::from_millis(30));
    assert!(c.generate(req).await.is_err());
    wait_freed(&s).await;
}

#[tokio::test]
async fn bad_input_maps_to_status_codes() {
    let s = TestServer::default().await;
    let mut c = client(&s).await;
    let mut req = text_request("x", 4);
    req.temperature = Some(5.0);
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("temperature:"), "{}", e.message());
    let mut req = text_request("x", 4);
    req.model = "gpt-4".into();
    assert_eq!(c.generate(req).await.unwrap_err().code(), Code::NotFound);
    let req = pb::GenerateRequest { max_tokens: Some(4), ..Default::default() };
    assert_eq!(c.generate(req).await.unwrap_err().code(), Code::InvalidArgument);
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 99_999_999] })),
        ..Default::default()
    };
    let e = c.generate(req).await.unwrap_err();
    assert!(e.message().starts_with("token_ids:"), "{}", e.message());
    let e = c.generate(text_request("x", 100_000)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("max_tokens:"), "{}", e.message());
}

#[tokio::test]
async fn tokenize_detokenize_and_model_info() {
    let s = TestServer::default().await;
    let mut c = client(&s).await;
    let t = c
        .tokenize(pb::TokenizeRequest { text: "To be, or not".into(), add_special_tokens: false, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.token_ids.is_empty());
    let d = c
        .detokenize(pb::DetokenizeRequest { token_ids: t.token_ids, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.text, "To be, or not");
    let info = c.model_info(pb::ModelInfoRequest::default()).await.unwrap().into_inner();
    assert_eq!(info.architecture, "mixtral");
    assert!(info.num_experts >= 2 && info.top_k >= 1 && info.context_length > 0);
    let list = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.models[0].name, info.name);
}

#[tokio::test]
async fn auth_and_health() {
    let mut s = TestServer::start(config(|a| a.api_key = Some("sesame".into())), true).await;
    let mut c = client(&s).await;
    assert_eq!(c.generate(text_request("x", 2)).await.unwrap_err().code(), Code::Unauthenticated);
    let mut req = Request::new(text_request("x", 2));
    req.metadata_mut().insert("authorization", "Bearer sesame".parse().unwrap());
    assert!(c.generate(req).await.is_ok());
    let mut req = Request::new(text_request("x", 2));
    req.metadata_mut().insert("authorization", "bearer sesame".parse().unwrap());
    assert!(c.generate(req).await.is_ok(), "the scheme is case-insensitive, as over REST");
    let mut req = Request::new(text_request("x", 2));
    req.metadata_mut().insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(c.generate(req).await.unwrap_err().code(), Code::Unauthenticated);

    // health needs no key; SERVING once loaded, NOT_SERVING while shutting down
    let channel = Channel::from_shared(format!("http://{}", s.grpc_addr)).unwrap().connect().await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |svc: &str| tonic_health::pb::HealthCheckRequest { service: svc.into() };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut status = 0;
    for _ in 0..100 {
        status = h.check(check("moe.v1.Generation")).await.unwrap().into_inner().status;
        if status == serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, serving);
    s.shutdown();
    let mut not_serving = false;
    for _ in 0..100 {
        match h.check(check("")).await {
            Ok(r)
                if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 =>
            {
                not_serving = true;
                break;
            }
            Err(_) => {
                not_serving = true; // already closed
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(not_serving);
}

#[tokio::test]
async fn unloaded_model_is_unavailable() {
    let s = TestServer::start(config(|_| {}), false).await;
    let mut c = client(&s).await;
    assert_eq!(c.generate(text_request("x", 2)).await.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test]
async fn reflection_lists_services_and_metrics_are_labelled() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let s = TestServer::default().await;
    let channel = Channel::from_shared(format!("http://{}", s.grpc_addr)).unwrap().connect().await.unwrap();
    let mut r = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r.server_reflection_info(futures_util::stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.next().await.unwrap().unwrap().message_response else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["moe.v1.Generation", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    // gRPC calls share /metrics with REST, labelled by protocol
    let mut c = client(&s).await;
    c.generate(text_request("x", 2)).await.unwrap();
    let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        m.lines().any(|l| l.starts_with("moe_requests_total")
            && l.contains("protocol=\"grpc\"")
            && l.contains("endpoint=\"Generate\"")),
        "{m}"
    );
}
