//! Run pages: how long the operator takes to render the run list with 10,000 stored runs
//! (500 baselines with their 20 recent runs, as many as `recentRuns` keeps) and a run page with
//! 1,000 destinations (the most a record lists). Prints median and slowest of 20 renders each
//! (asserts nothing): `cargo bench -p runwarden-operator --bench ui`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use runwarden_crds::{WorkflowBaseline, WorkflowRun};
use serde_json::json;

fn baseline(i: usize) -> Arc<WorkflowBaseline> {
    let runs: Vec<serde_json::Value> = (0..20)
        .map(|r| {
            json!({"runId": format!("{}", 100_000 + i * 20 + r), "runner": format!("arc-{i}-{r}"),
                   "time": format!("2026-12-0{}T{:02}:{:02}:00Z", 1 + r % 3, r % 24, i % 60),
                   "calls": 120, "endpoints": 14, "newEndpoints": r % 3, "anomalyCount": usize::from(r % 7 == 0)})
        })
        .collect();
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
            "metadata": {"name": format!("acme-repo{i}-ci-build-{i:04x}"), "namespace": "arc-runners"},
            "spec": {"repository": format!("acme/repo{i}"), "workflow": ".github/workflows/ci.yml", "job": "build"},
            "status": {"observedRuns": 20, "recentRuns": runs}
        }))
        .unwrap(),
    )
}

fn record() -> WorkflowRun {
    let endpoints: Vec<serde_json::Value> = (0..1000)
        .map(|d| {
            let anomalous = d < 10;
            json!({"host": format!("h{d}.cdn.example.net"), "address": format!("10.{}.{}.{}", d / 65536, (d / 256) % 256, d % 256),
                   "port": 443, "protocol": "TCP", "calls": 1 + d, "processes": ["node"], "executables": ["/usr/bin/node"],
                   "firstSeen": "2026-12-03T10:00:01Z", "lastSeen": "2026-12-03T10:03:00Z",
                   "verdict": if anomalous { "Anomalous" } else { "Known" },
                   "severity": if anomalous { Some("High") } else { None }, "score": if anomalous { Some(0.9) } else { None },
                   "reasons": if anomalous { vec!["first call to this host by any job", "a paste site"] } else { vec![] }})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "4711-arc-b", "namespace": "arc-runners"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": "acme-web-ci-build",
                 "runId": "4711", "runner": "arc-b", "node": "node-1", "started": "2026-12-03T10:00:00Z",
                 "finished": "2026-12-03T10:05:00Z", "calls": 500_000, "endpointCount": 1000, "newEndpointCount": 10,
                 "anomalyCount": 10, "endpoints": endpoints}
    }))
    .unwrap()
}

fn measure(what: &str, mut render: impl FnMut() -> usize) {
    let mut times: Vec<Duration> = Vec::new();
    let mut bytes = 0;
    for _ in 0..20 {
        let started = Instant::now();
        bytes = render();
        times.push(started.elapsed());
    }
    times.sort();
    println!("{what}: median {:?}, slowest {:?} ({} KiB of HTML)", times[10], times[19], bytes / 1024);
}

fn main() {
    let baselines: Vec<Arc<WorkflowBaseline>> = (0..500).map(baseline).collect();
    let run = record();
    let now = Timestamp::now();
    measure("run list, 10,000 runs (the newest 1,000 shown)", || {
        runwarden_operator::ui::runs_page(&baselines, now).len()
    });
    measure("run page, 1,000 destinations", || runwarden_operator::ui::run_page(&run, now).len());
    measure("job page, 20 runs", || runwarden_operator::ui::job_page(&baselines[0], now).len());
}
