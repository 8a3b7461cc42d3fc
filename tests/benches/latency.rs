//! Detection latency on the real node: a runner pod calls somewhere new → the agent's
//! `AnomalousEgress` Event on that pod is visible in the API (a watch delivers it). The call's
//! time is when the listener accepted the connection. 50 trials: one runner pod calls 50 hosts
//! it never called (each its own domain and address, port 8080), 0.3 s apart. Prints p50, p90,
//! p99 and max; asserts nothing.
//!
//! `make bench` runs it (root; `make images` first). Goal (issue: agent in the cluster): p99 < 1 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use runwarden_tests::node::NODE_IP;
use runwarden_tests::runner::Job;
use runwarden_tests::services::{Dns, Listener};
use runwarden_tests::{Node, install};

const TRIALS: u8 = 50;

fn host(i: u8) -> String {
    format!("c2.exfil{i}.test")
}

#[tokio::main]
async fn main() {
    let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();
    install::runwarden(node).await;
    let dns = Dns::start(SocketAddr::from((NODE_IP, 53))).expect("serving DNS on the node's address");
    let listeners: Vec<Listener> = (0..TRIALS)
        .map(|i| {
            let ip = node.add_address(200 + i).unwrap();
            dns.insert(&host(i), ip);
            Listener::start(SocketAddr::from((ip, 8080))).unwrap()
        })
        .collect();

    let job = Job::new(node, "latency").await;
    let events: Api<Event> = Api::namespaced(node.client().await, &job.ns);
    let mut stream = Box::pin(watcher::watcher(events, watcher::Config::default()).default_backoff());
    let script = format!(
        "for i in $(seq 0 {}); do wget -q -O /dev/null http://c2.exfil$i.test:8080/; sleep 0.3; done; sleep 3600",
        TRIALS - 1
    );
    let name = job.start(node, 301, &host(0), &script).await;

    // Trial → when its Event on the pod arrived.
    let mut seen: HashMap<u8, SystemTime> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < usize::from(TRIALS) && Instant::now() < deadline {
        let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await else { continue };
        let (watcher::Event::Apply(e) | watcher::Event::InitApply(e)) = ev else { continue };
        let now = SystemTime::now();
        let on_pod = e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some("Pod"));
        let note = e.note.unwrap_or_default();
        if let (true, Some(i)) = (on_pod, (0..TRIALS).find(|i| note.contains(&format!("{}:8080 ", host(*i))))) {
            seen.entry(i).or_insert(now);
        }
    }
    job.finish(node, &name).await;

    let mut latencies: Vec<f64> = (0..TRIALS)
        .filter_map(|i| {
            let accepted = listeners[usize::from(i)].first_accept()?;
            let event = seen.get(&i)?;
            Some(event.duration_since(accepted).unwrap_or_default().as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!("detection latency, call accepted → AnomalousEgress Event on the pod delivered by a watch");
    if latencies.is_empty() {
        println!("  no Event arrived for any of {TRIALS} calls");
        return;
    }
    println!(
        "  {} of {TRIALS} trials: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    std::process::exit(0);
}
