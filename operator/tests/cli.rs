//! `kubectl runwarden` against a real kube-apiserver, as a user runs it: the binary with a
//! kubeconfig. A baseline's learned endpoints become a policy the API server accepts; its diff
//! is empty until an approval adds what it does not allow.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kube::api::{Api, Patch, PatchParams, PostParams};
use runwarden_crds::{EgressPolicy, PolicyMode};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

mod common;

fn plugin(cp: &ControlPlane, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-runwarden")).args(args).env("KUBECONFIG", &cp.kubeconfig).output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn a_baseline_becomes_a_policy_the_api_server_takes_and_approvals_show_in_the_diff() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "cli").await;
    let baselines = common::acme_baseline(&client, &ns).await;
    let status = json!({"status": {"endpoints": [
        {"host": "registry.npmjs.org", "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
        {"host": "api.github.com", "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
        {"pattern": "productionresultssa#.blob.core.windows.net", "members": 4, "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
        {"cidr": "10.0.5.0/24", "members": 3, "port": 5432, "protocol": "TCP", "runsSeen": 5, "state": "Learned"},
        {"host": "evil.example.net", "port": 8080, "protocol": "TCP", "runsSeen": 1, "state": "Anomalous", "severity": "High"}
    ]}});
    baselines.patch_status("acme-web-ci-build", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    // The policy, printed, applied as a user commits and applies it.
    let out = plugin(
        cp,
        &[
            "-n",
            &ns,
            "policy",
            "acme-web-ci-build",
            "--name",
            "web-build",
            "--mode",
            "block",
            "--preset",
            "github-actions",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let yaml = String::from_utf8(out.stdout).unwrap();
    let mut apply = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    apply.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let applied = apply.wait_with_output().unwrap();
    assert!(applied.status.success(), "the API server takes it:\n{yaml}\n{}", text(&applied));
    let policy = Api::<EgressPolicy>::namespaced(client.clone(), &ns).get("web-build").await.unwrap();
    assert_eq!(policy.spec.mode, PolicyMode::Block);
    assert!(yaml.contains("registry.npmjs.org") && yaml.contains("10.0.5.0/24"), "{yaml}");
    assert!(!yaml.contains("evil.example.net"), "an anomaly is not allowed: {yaml}");
    assert!(!yaml.contains("api.github.com"), "the preset covers it: {yaml}");

    // Nothing left out; then an approval the policy does not allow shows, and exits 1.
    let diff = plugin(cp, &["-n", &ns, "diff", "acme-web-ci-build", "web-build"]);
    assert!(diff.status.success() && diff.stdout.is_empty(), "{}", text(&diff));
    let approve = plugin(cp, &["-n", &ns, "approve", "acme-web-ci-build", "cache.example.org:8443/TCP"]);
    assert!(approve.status.success(), "{}", text(&approve));
    let approved = baselines.get("acme-web-ci-build").await.unwrap().spec.approved;
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!((approved[0].host.as_deref(), approved[0].ports.as_slice()), (Some("cache.example.org"), &[8443][..]));
    let diff = plugin(cp, &["-n", &ns, "diff", "acme-web-ci-build", "web-build"]);
    assert_eq!(diff.status.code(), Some(1), "{}", text(&diff));
    assert_eq!(String::from_utf8_lossy(&diff.stdout), "cache.example.org (spec.approved)\n");

    // What is wrong is said, with exit 2.
    let missing = plugin(cp, &["-n", &ns, "policy", "no-such-baseline"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("WorkflowBaseline no-such-baseline in namespace"), "{}", text(&missing));
    let bad = plugin(cp, &["-n", &ns, "approve", "acme-web-ci-build", "cache.example.org"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("HOST:PORT/PROTO"), "{}", text(&bad));
}

/// A finished run's record as the agent writes it, with one anomaly and one destination block
/// mode refused (`anomalous`) or neither.
fn record(ns: &str, run_id: &str, runner: &str, finished: &str, anomalous: bool) -> runwarden_crds::WorkflowRun {
    let mut endpoints = vec![json!({
        "host": "registry.npmjs.org", "address": "104.16.1.34", "port": 443, "protocol": "TCP", "calls": 40,
        "processes": ["node"], "executables": ["/usr/bin/node"],
        "firstSeen": "2026-12-03T10:00:01Z", "lastSeen": "2026-12-03T10:03:00Z", "verdict": "Known"
    })];
    if anomalous {
        endpoints.insert(
            0,
            json!({
                "host": "paste.example.net", "address": "203.0.113.9", "port": 443, "protocol": "TCP", "calls": 1,
                "processes": ["curl"], "executables": ["/usr/bin/curl"],
                "firstSeen": "2026-12-03T10:02:00Z", "lastSeen": "2026-12-03T10:02:00Z", "verdict": "Anomalous",
                "severity": "High", "score": 0.91, "reasons": ["first call to this host by any job", "a paste site"]
            }),
        );
        endpoints.insert(
            1,
            json!({
                "address": "198.51.100.7", "port": 8080, "protocol": "TCP", "calls": 3,
                "processes": ["wget"], "executables": ["/bin/busybox"],
                "firstSeen": "2026-12-03T10:02:30Z", "lastSeen": "2026-12-03T10:02:40Z", "verdict": "Blocked",
                "reasons": ["refused in block mode: EgressPolicy arc/runners does not allow it"]
            }),
        );
    }
    serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": format!("{run_id}-{runner}"), "namespace": ns,
            "labels": {"runwarden.dev/baseline": "acme-web-ci-build", "runwarden.dev/run-id": run_id}},
        "spec": {
            "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": "acme-web-ci-build",
            "runId": run_id, "runner": runner, "node": "node-1", "policy": "runners", "started": "2026-12-03T10:00:00Z", "finished": finished,
            "calls": 41, "endpointCount": 1 + usize::from(anomalous), "newEndpointCount": usize::from(anomalous),
            "anomalyCount": usize::from(anomalous), "blockedCount": usize::from(anomalous), "endpoints": endpoints
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn runs_are_listed_newest_first_and_a_run_shows_its_anomalies_with_the_approval() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "cli-runs").await;
    let baselines = common::acme_baseline(&client, &ns).await;
    let runs: Api<runwarden_crds::WorkflowRun> = Api::namespaced(client.clone(), &ns);
    for r in [
        record(&ns, "4700", "arc-a", "2026-12-03T09:05:00Z", false),
        record(&ns, "4711", "arc-b", "2026-12-03T10:05:00Z", true),
    ] {
        runs.create(&PostParams::default(), &r).await.unwrap();
    }

    let out = plugin(cp, &["-n", &ns, "runs"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Vec<&str>> = listed.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        lines[0],
        ["RUN", "REPOSITORY", "JOB", "CALLS", "ENDPOINTS", "NEW", "ANOMALIES", "BLOCKED", "FINISHED"],
        "{listed}"
    );
    assert_eq!(&lines[1][..8], ["4711", "acme/web", "build", "41", "2", "1", "1", "1"], "newest first: {listed}");
    assert_eq!(&lines[2][..8], ["4700", "acme/web", "build", "41", "1", "0", "0", "0"], "{listed}");
    let wide = plugin(cp, &["-n", &ns, "runs", "--job", "acme-web-ci-build", "-o", "wide"]);
    assert!(String::from_utf8_lossy(&wide.stdout).contains(".github/workflows/ci.yml"), "{}", text(&wide));
    let as_json = plugin(cp, &["-n", &ns, "runs", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&as_json.stdout).expect("JSON");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2), "{list}");

    // The run: the anomaly first, its reasons, and the approval a user copies.
    let out = plugin(cp, &["-n", &ns, "run", "4711"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8(out.stdout).unwrap();
    let table_start = shown.find("VERDICT").expect("a destinations table");
    let first_row = shown[table_start..].lines().nth(1).unwrap();
    assert!(first_row.starts_with("Anomalous") && first_row.contains("paste.example.net:443/TCP"), "{shown}");
    assert!(shown.contains("- a paste site") && shown.contains("/usr/bin/curl"), "{shown}");
    let second_row = shown[table_start..].lines().nth(2).unwrap();
    assert!(second_row.starts_with("Blocked") && second_row.contains("198.51.100.7:8080/TCP"), "refused next: {shown}");
    assert!(shown.contains("1 destinations refused in block mode"), "{shown}");
    assert!(shown.contains("Policy:     runners\n"), "{shown}");
    let refused = &shown[shown.find("Refused in block mode").expect("{shown}")..];
    assert!(
        refused.contains("198.51.100.7:8080/TCP (3 attempts)") && refused.contains("EgressPolicy arc/runners"),
        "{shown}"
    );
    let approve_line =
        shown.lines().find_map(|l| l.trim().strip_prefix("approve: kubectl runwarden ")).expect("{shown}");
    let approve: Vec<&str> = approve_line.split_whitespace().collect();
    let approved = plugin(cp, &approve);
    assert!(approved.status.success(), "{}", text(&approved));
    let spec = baselines.get("acme-web-ci-build").await.unwrap().spec;
    assert_eq!(spec.approved[0].host.as_deref(), Some("paste.example.net"));

    let missing = plugin(cp, &["-n", &ns, "run", "9999"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("no WorkflowRun of run 9999"), "{}", text(&missing));
}
