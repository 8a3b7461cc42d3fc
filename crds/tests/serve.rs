//! The shared metrics/health endpoint: answers, refuses what it does not serve, and drops a
//! client that never sends its request.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use runwarden_crds::serve::{HEADER_TIMEOUT, Health, serve};

struct Fixed(AtomicBool);

impl Health for Fixed {
    fn metrics(&self) -> String {
        "# TYPE x counter\nx_total 1\n# EOF\n".into()
    }
    fn ready(&self) -> Result<(), String> {
        if self.0.load(Ordering::Relaxed) { Ok(()) } else { Err("caches not synced".into()) }
    }
}

fn request(port: u16, head: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_answers_metrics_health_and_readiness_and_drops_silent_clients() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let health = Arc::new(Fixed(AtomicBool::new(false)));
    tokio::spawn(serve(listener, health.clone()));
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");

    let (metrics, healthz, not_ready, post) = tokio::task::spawn_blocking(move || {
        (
            request(port, &get("/metrics")),
            request(port, &get("/healthz")),
            request(port, &get("/readyz")),
            request(port, "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
        )
    })
    .await
    .unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("x_total 1"), "{metrics}");
    assert!(metrics.contains("application/openmetrics-text"), "{metrics}");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("caches not synced"), "{not_ready}");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    health.0.store(true, Ordering::Relaxed);
    let ready = tokio::task::spawn_blocking(move || request(port, &get("/readyz"))).await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // A client that connects and says nothing is dropped after the header timeout.
    let silent = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(silent < HEADER_TIMEOUT + Duration::from_secs(3), "closed after {silent:?}");
}
