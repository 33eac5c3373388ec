//! A server on 127.0.0.1 port 0 over the built-in model, for end-to-end tests.
#![allow(dead_code)]

use moe_server::config::{ServeArgs, ServeConfig};
use moe_server::http::AppState;
use moe_server::serve::{install_metrics, load_ready, run_server};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn config(edit: impl FnOnce(&mut ServeArgs)) -> ServeConfig {
    let mut args = ServeArgs { port: Some(0), kv_cache_tokens: Some(8192), ..Default::default() };
    edit(&mut args);
    args.resolve().unwrap()
}

impl TestServer {
    /// Starts a server; `load` false leaves the model unloaded (503s).
    pub async fn start(cfg: ServeConfig, load: bool) -> Self {
        let metrics = install_metrics().unwrap();
        let state = AppState::new(cfg, metrics);
        if load {
            let cfg = state.cfg.clone();
            let ready = tokio::task::spawn_blocking(move || load_ready(&cfg)).await.unwrap().unwrap();
            state.set_ready(ready);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let glistener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = glistener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run_server(listener, Some(glistener), state.clone(), async move {
            let _ = rx.await;
        }));
        Self { addr, grpc_addr, state, client: reqwest::Client::new(), stop: Some(tx), task: Some(task) }
    }

    pub async fn default() -> Self {
        Self::start(config(|_| {}), true).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Data payloads of an SSE response, `[DONE]` included.
    pub async fn stream(&self, path: &str, body: serde_json::Value) -> Vec<String> {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Concatenated text of a completion stream's chunks for choice `index`,
/// plus its finish reason.
pub fn stream_text(events: &[String], field: &str, index: u64) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if c["index"].as_u64() != Some(index) {
                continue;
            }
            let piece = if field == "text" { &c["text"] } else { &c["delta"]["content"] };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}
