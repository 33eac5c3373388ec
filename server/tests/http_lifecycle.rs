//! Disconnects free resources at once; SIGTERM-style shutdown drains
//! in-flight requests and refuses new ones. (Own test binary: it reads the
//! process-wide metrics.)

mod common;

use common::{config, TestServer};
use futures_util::StreamExt;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn disconnect_mid_stream_frees_kv_and_sequences() {
    let s = TestServer::default().await;
    let engine = s.state.ready().unwrap().engine.clone();
    let mut resps = Vec::new();
    for i in 0..4 {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": format!("Tale {i}"), "max_tokens": 400, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        resps.push(r.bytes_stream());
    }
    for r in resps.iter_mut() {
        assert!(r.next().await.is_some(), "no first chunk");
    }
    assert!(engine.stats().kv_blocks_used.load(Ordering::Relaxed) > 0);
    let steps_at_drop = engine.stats().steps.load(Ordering::Relaxed);
    drop(resps);
    let mut ok = false;
    for _ in 0..300 {
        let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if gauge(&m, "moe_running_sequences") == 0.0
            && gauge(&m, "moe_kv_blocks_used") == 0.0
            && gauge(&m, "moe_waiting_sequences") == 0.0
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "gauges did not return to zero");
    // the sequences were aborted, not run to their 400 tokens
    let steps = engine.stats().steps.load(Ordering::Relaxed) - steps_at_drop;
    assert!(steps < 200, "{steps} steps ran after the clients left");
    assert_eq!(engine.stats().in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_and_refuses_new() {
    let mut s = TestServer::start(config(|a| a.shutdown_grace_secs = Some(30)), true).await;
    let client = s.client.clone();
    let url = s.url("/v1/completions");
    let inflight = tokio::spawn(async move {
        let r = client
            .post(url)
            .json(&json!({"prompt": "ROMEO:", "max_tokens": 400, "ignore_eos": true}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    });
    // wait until it runs, then shut down
    let engine = s.state.ready().unwrap().engine.clone();
    while engine.stats().running.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.shutdown();
    while !s.state.is_shutting_down() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // new work is refused with 503 while in-flight requests drain (the listener
    // stays open until then), on a new connection too
    let fresh = reqwest::Client::new();
    let r = fresh.post(s.url("/v1/completions")).json(&json!({"prompt": "x", "max_tokens": 2})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let (st, v) = inflight.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 400);
    let r = s.task.take().unwrap().await.unwrap();
    assert!(r.is_ok());
}

/// Streams still running when the grace period ends are ended with their
/// cause, not cut: SSE gets an error event (OpenAI shape) and a clean end of
/// the response; a gRPC stream ends with UNAVAILABLE and a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_the_grace_period_end_with_an_error() {
    use moe_proto::v1 as pb;
    let mut s = TestServer::start(
        config(|a| {
            a.shutdown_grace_secs = Some(1);
            a.max_num_seqs = Some(1); // one runs, the others wait: they cannot finish in time
        }),
        true,
    )
    .await;
    let body = json!({"prompt": "ROMEO:", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let mut sse = Vec::new();
    for _ in 0..30 {
        sse.push(s.client.post(s.url("/v1/completions")).json(&body).send().await.unwrap());
    }
    let mut g =
        moe_proto::v1::generation_client::GenerationClient::connect(format!("http://{}", s.grpc_addr)).await.unwrap();
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("ROMEO:".into())),
        max_tokens: Some(400),
        ignore_eos: true,
        ..Default::default()
    };
    let mut grpc = g.generate_stream(req).await.unwrap().into_inner();
    s.shutdown();
    let mut ended = 0;
    for r in sse {
        assert_eq!(r.status().as_u16(), 200);
        // the body ends cleanly (a cut connection would fail the read): with
        // [DONE] if it finished within the grace period, else with the error
        let text = r.text().await.expect("the response ends cleanly");
        let last = text.trim_end().rsplit("\n\n").next().unwrap().trim_start_matches("data: ").to_string();
        if last == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last:?}"));
        assert_eq!(v["error"]["type"], "service_unavailable", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("shutting down"), "{v}");
        ended += 1;
    }
    assert!(ended > 0, "every stream finished within the grace period: the test proves nothing");
    let status = loop {
        match grpc.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the gRPC stream ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("shutting down"), "{status}");
    let r = s.task.take().unwrap().await.unwrap();
    assert!(r.is_ok());
}
