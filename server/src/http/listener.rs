//! The REST listener: HTTP/1.1 only (as the README says; cleartext HTTP/2
//! is not served, so every limit below applies to every request), with the
//! connection limits production HTTP servers have:
//! - a header-read timeout: a connection that does not deliver a whole
//!   request head in time (half a header line, or an idle keep-alive
//!   connection) is closed;
//! - a body-read timeout: a body slower than its length promises ends in a
//!   408 (applied as a layer in [`super::router`]'s caller);
//! - a maximum of open connections: one over it gets an immediate `503`
//!   with `Retry-After` and is closed, while existing connections carry on;
//! - accept errors (out of descriptors) are logged and retried after a short
//!   pause instead of spinning.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The connection limits of the REST listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Longest wait for a request head (also bounds an idle keep-alive).
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// What an over-the-limit connection is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: application/json\r\n\
content-length: 103\r\nconnection: close\r\n\r\n\
{\"error\":{\"message\":\"too many open connections\",\"type\":\"service_unavailable\",\"param\":null,\"code\":null}}";

/// Serves `app` on `listener` until `stop` turns true; then stops accepting,
/// lets each connection finish the response in flight, and returns once
/// every connection has closed.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnLimits, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            // stop (or its sender gone): no more connections
            r = stop.wait_for(|s| *s) => {
                drop(r);
                None
            }
        };
        let Some(accepted) = accepted else { break };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // token chunks are small: do not let Nagle's algorithm delay them
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut tcp = tcp;
                let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(BUSY)).await;
            });
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                _ = conn.as_mut() => false,
                r = stop.wait_for(|s| *s) => {
                    drop(r);
                    true
                }
            };
            if stopping {
                // finish the response in flight, then close
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    }
    drop(listener);
    // every connection has closed when every permit is back
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

#[cfg(test)]
mod tests {
    use super::BUSY;

    #[test]
    fn the_busy_response_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "service_unavailable");
    }
}
