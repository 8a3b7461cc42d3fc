//! Scale: the operator binary against a real kube-apiserver holding 1,000 WorkflowBaselines and
//! 200 ARC runners with jobs. Prints (asserts nothing):
//! - time from the operator's start until every runner has been reconciled and every baseline
//!   carries the operator's conditions,
//! - steady-state CPU over 30 s with nothing changing, and RSS (current and peak),
//! - API requests the operator made (apiserver_request_total before and after, minus this
//!   bench's own polling) per reconcile (from the operator's own metrics).
//!
//! `make bench-operator` (or `cargo bench -p runwarden-operator --bench scale`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use runwarden_crds::{WorkflowBaseline, WorkflowBaselineSpec};
use runwarden_operator::arc::{EphemeralRunner, EphemeralRunnerSpec};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

/// Sizes, overridable for exploring (`RUNWARDEN_SCALE_BASELINES`, `RUNWARDEN_SCALE_RUNNERS`).
fn size(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The operator's /metrics (empty until it listens).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

async fn apiserver_requests(client: &Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

async fn in_chunks<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    futures::stream::iter(futures).buffer_unordered(32).collect::<Vec<_>>().await;
}

#[tokio::main]
async fn main() {
    let baselines_wanted = size("RUNWARDEN_SCALE_BASELINES", 1000);
    let runners_wanted = size("RUNWARDEN_SCALE_RUNNERS", 200);
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "ephemeralrunners.actions.github.com",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(EphemeralRunner::crd()),
    )
    .await
    .unwrap();
    cluster::wait_established(&crds, "ephemeralrunners.actions.github.com").await;
    let ns = cluster::test_namespace(&client, "scale").await;
    let _ = cluster::test_namespace(&client, "runwarden-system").await;

    let setup = Instant::now();
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    in_chunks((0..baselines_wanted).map(|i| {
        let baselines = baselines.clone();
        async move {
            let spec: WorkflowBaselineSpec = serde_json::from_value(json!({
                "repository": format!("org{}/repo{}", i % 37, i % 101),
                "workflow": format!(".github/workflows/w{}.yml", i % 7),
                "job": format!("job-{i}"),
            }))
            .unwrap();
            baselines
                .create(&PostParams::default(), &WorkflowBaseline::new(&format!("baseline-{i}"), spec))
                .await
                .unwrap();
        }
    }))
    .await;
    let runners: Api<EphemeralRunner> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    in_chunks((0..runners_wanted).map(|i| {
        let (runners, pods) = (runners.clone(), pods.clone());
        async move {
            let name = format!("arc-runner-{i}");
            let r = runners
                .create(&PostParams::default(), &EphemeralRunner::new(&name, EphemeralRunnerSpec::default()))
                .await
                .unwrap();
            let mut pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"actions.github.com/scale-set-name": "arc"}},
                "spec": {"containers": [{"name": "runner", "image": "runner"}]}
            }))
            .unwrap();
            pod.metadata.owner_references = Some(vec![kube::Resource::controller_owner_ref(&r, &()).unwrap()]);
            pods.create(&PostParams::default(), &pod).await.unwrap();
            let job = json!({"status": {"jobRepositoryName": "acme/web", "workflowRunId": 1000 + i,
                "jobWorkflowRef": "acme/web/.github/workflows/ci.yml@refs/heads/main",
                "jobDisplayName": format!("test (shard-{})", i % 10)}});
            runners.patch_status(&name, &PatchParams::default(), &Patch::Merge(&job)).await.unwrap();
        }
    }))
    .await;
    eprintln!(
        "setup: {baselines_wanted} baselines, {runners_wanted} runners with jobs in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    let before = apiserver_requests(&client).await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut operator = Command::new(env!("CARGO_BIN_EXE_runwarden-operator"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}"), "--no-leader-elect"])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("POD_NAMESPACE", "runwarden-system")
        .env("RUNWARDEN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = operator.id();
    let started = Instant::now();
    let mut polls = 0u32;
    loop {
        polls += 1;
        let runners_reconciled = scrape(metrics_port)
            .lines()
            .find(|l| l.starts_with("runwarden_operator_reconciles_total{controller=\"runners\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
        let reconciled = baselines
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|b| b.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
            .count();
        if runners_reconciled >= runners_wanted && reconciled >= baselines_wanted + usize::from(runners_wanted > 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not reconciled after 10 min: {runners_reconciled} runners, {reconciled} baselines"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let after = apiserver_requests(&client).await;

    let ticks_per_second = 100.0; // USER_HZ on Linux
    let cpu_start = proc_cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle_cpu = (proc_cpu_ticks(pid) - cpu_start) as f64 / ticks_per_second / 30.0 * 100.0;
    let rss = proc_kib(pid, "VmRSS:");
    let peak = proc_kib(pid, "VmHWM:");

    let reconciles: f64 = scrape(metrics_port)
        .lines()
        .filter(|l| l.starts_with("runwarden_operator_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let requests = after - before - f64::from(polls) - 2.0;
    let _ = operator.kill();
    let _ = operator.wait();

    println!("operator scale: {baselines_wanted} WorkflowBaselines, {runners_wanted} runner pods");
    println!("  start to all reconciled:      {:.1} s", converged.as_secs_f64());
    println!("  steady-state CPU (30 s idle): {idle_cpu:.2} % of one core");
    println!("  RSS: {:.1} MiB now, {:.1} MiB peak", rss as f64 / 1024.0, peak as f64 / 1024.0);
    println!(
        "  API requests: {requests:.0} for {reconciles:.0} reconciles = {:.2} per reconcile",
        requests / reconciles
    );
}
