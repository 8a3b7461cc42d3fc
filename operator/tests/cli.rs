//! `kubectl runwarden` against a real kube-apiserver, as a user runs it: the binary with a
//! kubeconfig. A baseline's learned endpoints become a policy the API server accepts; its diff
//! is empty until an approval adds what it does not allow.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kube::api::{Api, Patch, PatchParams, PostParams};
use runwarden_crds::{EgressPolicy, PolicyMode, WorkflowBaseline};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

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
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let baseline: WorkflowBaseline = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline", "metadata": {"name": "acme-web-ci-build"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"}
    }))
    .unwrap();
    baselines.create(&PostParams::default(), &baseline).await.unwrap();
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
