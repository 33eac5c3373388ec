//! The REST listener's connection limits, over raw TCP: HTTP/1.1 only (no
//! cleartext HTTP/2), a header-read timeout for half-sent heads and idle
//! keep-alive connections, a body-read timeout (408), and a connection limit
//! that refuses extra connections at once with 503 while existing ones and
//! `/health` keep working.

mod common;
use common::{config, TestServer};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes); returns what arrived and when it closed.
async fn read_to_close(tcp: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while t0.elapsed() < limit {
        match tokio::time::timeout(limit - t0.elapsed(), tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into(), Some(t0.elapsed())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&buf).into(), None)
}

async fn health(s: &TestServer) -> u16 {
    s.client.get(s.url("/health")).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_heads_and_bodies_time_out_and_idle_connections_close() {
    let s = TestServer::start(
        config(|a| {
            a.header_timeout_secs = Some(1);
            a.body_timeout_secs = Some(1);
        }),
        true,
    )
    .await;
    // half a header line
    let mut half = TcpStream::connect(s.addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    // nothing at all
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    // a body slower than its Content-Length
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(
        b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pro",
    )
    .await
    .unwrap();
    assert_eq!(health(&s).await, 200, "the server answers meanwhile");
    for (name, tcp) in [("half head", &mut half), ("idle", &mut idle)] {
        let (_, closed) = read_to_close(tcp, Duration::from_secs(10)).await;
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after 10 s"));
        assert!(closed < Duration::from_secs(5), "{name}: closed after {closed:?}");
    }
    let (text, closed) = read_to_close(&mut slow, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "slow body: {text:?}");
    assert!(closed.is_some(), "slow body: the connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_at_once_and_health_recovers() {
    let s = TestServer::start(config(|a| a.max_connections = Some(3)), true).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let the server accept them
    let mut extra = TcpStream::connect(s.addr).await.unwrap();
    let t0 = Instant::now();
    let (text, closed) = read_to_close(&mut extra, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 503") && text.contains("retry-after: 1"), "{text:?}");
    assert!(closed.is_some() && t0.elapsed() < Duration::from_secs(2), "refused slowly: {:?}", t0.elapsed());
    // an existing connection still works
    held[0].write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = held[0].read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    // freeing connections lets new ones in
    held.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(health(&s).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_is_not_served() {
    let s = TestServer::default().await;
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    // HTTP/2 with prior knowledge: the handshake or the first request must fail
    let served = async {
        let (mut client, conn) = h2::client::handshake(tcp).await.ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(s.url("/health")).body(()).ok()?;
        let (resp, _) = client.send_request(req, true).ok()?;
        resp.await.ok()
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), served).await.expect("no answer in 10 s");
    assert!(resp.is_none(), "HTTP/2 got a response: {resp:?}");
    assert_eq!(health(&s).await, 200, "HTTP/1.1 still works");
}
