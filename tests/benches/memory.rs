//! The node agent's memory on the real node with 100 runner pods and 1,000 baselines in its
//! watch: 1,000 `WorkflowBaseline`s with 30 learned endpoints each, then 100 runner pods (10
//! jobs × 10 runs) that each call 10 hosts and stay running. Prints the agent's resident set
//! (VmRSS) and its peak (VmHWM) read from /proc; asserts nothing.
//!
//! `make bench` runs it (root; `make images` first). Goal (issue: agent in the cluster): RSS ≤ 64 MiB.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use runwarden_crds::WorkflowBaseline;
use runwarden_tests::install::kubectl;
use runwarden_tests::node::NODE_IP;
use runwarden_tests::runner::Job;
use runwarden_tests::services::{Dns, Listener};
use runwarden_tests::{Node, install};
use serde_json::json;

const BASELINES: usize = 1_000;
const JOBS: usize = 10;
const RUNS_PER_JOB: usize = 10;
const HOSTS: u8 = 20;

fn host(i: u8) -> String {
    format!("h{i}.svc{}.test", i % 5)
}

/// (VmRSS, VmHWM) of the agent process, in KiB.
fn agent_memory() -> Option<(u64, u64)> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "runwarden-agent" {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            };
            return Some((field("VmRSS:")?, field("VmHWM:")?));
        }
    }
    None
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();
    install::runwarden(node).await;
    let dns = Dns::start(SocketAddr::from((NODE_IP, 53))).expect("serving DNS on the node's address");
    let mut listeners = Vec::new();
    for i in 0..HOSTS {
        let ip = node.add_address(200 + i).unwrap();
        dns.insert(&host(i), ip);
        listeners.push(Listener::start(SocketAddr::from((ip, 8080))).unwrap());
    }
    let (idle, _) = agent_memory().expect("the agent runs");

    // 1,000 baselines with 30 learned endpoints each.
    kubectl(node, &["create", "namespace", "baselines"]);
    let client = node.client().await;
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), "baselines");
    let started = Instant::now();
    for b in 0..BASELINES {
        let name = format!("acme-repo{b}-ci-build");
        let object: WorkflowBaseline = serde_json::from_value(json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
            "metadata": {"name": name},
            "spec": {"repository": format!("acme/repo{b}"), "workflow": ".github/workflows/ci.yml", "job": "build"}
        }))
        .unwrap();
        baselines.create(&PostParams::default(), &object).await.unwrap();
        let endpoints: Vec<_> = (0..30)
            .map(|e| {
                json!({"host": format!("api{e}.service{}.example.com", (b + e) % 97), "port": 443, "protocol": "TCP",
                            "state": "Learned", "runsSeen": 12, "processes": ["curl", "git"]})
            })
            .collect();
        let status = json!({"status": {"observedRuns": 12, "endpointCount": 30, "endpoints": endpoints}});
        baselines.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    }
    eprintln!("{BASELINES} baselines written in {:.1}s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (with_baselines, _) = agent_memory().expect("the agent runs");

    // 100 runner pods, each calling 10 hosts and then staying.
    let started = Instant::now();
    let mut running = Vec::new();
    for j in 0..JOBS {
        let job = Job::new(node, &format!("mem{j}")).await;
        for r in 0..RUNS_PER_JOB {
            let calls: Vec<String> = (0..10)
                .map(|k| format!("wget -q -O /dev/null http://{}:8080/", host(((j + r + k) % HOSTS as usize) as u8)))
                .collect();
            let script = format!("{}; sleep 3600", calls.join("; "));
            let run_id = (1000 + j * 100 + r) as i64;
            let name = job.start(node, run_id, &host(0), &script).await;
            running.push((job.ns.clone(), name));
        }
    }
    let pods: Api<Pod> = Api::all(client.clone());
    loop {
        let list = pods.list(&Default::default()).await.unwrap().items;
        let ready =
            list.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count();
        let calls: u64 = listeners.iter().map(Listener::count).sum();
        if ready >= running.len() && calls >= (running.len() * 11) as u64 {
            break;
        }
        if started.elapsed() >= Duration::from_secs(600) {
            let mut phases = std::collections::BTreeMap::<String, usize>::new();
            for p in &list {
                *phases.entry(p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()).or_default() += 1;
            }
            let stuck: Vec<String> = list
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running"))
                .take(3)
                .map(|p| format!("{}: {:?}", p.metadata.name.clone().unwrap_or_default(), p.status))
                .collect();
            panic!("{ready} pods running, {calls} calls after 600s; phases {phases:?}; e.g. {stuck:#?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("{} runner pods running and their calls made in {:.1}s", running.len(), started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, peak) = agent_memory().expect("the agent runs");
    println!("node agent memory (VmRSS) on the real node");
    println!("  idle: {:.1} MiB", mib(idle));
    println!("  with {BASELINES} baselines (30 endpoints each) in its watch: {:.1} MiB", mib(with_baselines));
    println!(
        "  and {} runner pods running, 11 destinations each: {:.1} MiB (peak {:.1} MiB)",
        running.len(),
        mib(rss),
        mib(peak)
    );
    std::process::exit(0);
}
