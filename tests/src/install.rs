//! Installing runwarden on the test node as a user would: the images, ARC's CRDs with kubectl,
//! then `helm install` of `charts/runwarden` (CRDs, RBAC, the operator); then waiting for the
//! operator and the agent DaemonSet it deploys.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::{Api, Client};

use crate::{Node, cluster};

/// runwarden's namespace.
pub const SYSTEM: &str = "runwarden-system";

fn repo() -> PathBuf {
    cluster::crd_dir().join("..")
}

/// Runs helm against the node, panicking with its output when it fails.
pub fn helm(node: &Node, args: &[&str]) -> String {
    let out = node.control_plane.helm().args(args).output().expect("running helm (`make setup` builds it)");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kubectl against the node, panicking with its stderr when it fails.
pub fn kubectl(node: &Node, args: &[&str]) -> String {
    kubectl_stdin(node, args, "")
}

/// Runs kubectl with `input` on stdin.
pub fn kubectl_stdin(node: &Node, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = node
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs runwarden and waits until it runs. Panics with what went wrong.
pub async fn runwarden(node: &Node) {
    runwarden_with(node, &[]).await;
}

/// As [`runwarden`], with more `helm install` arguments (`--set`s).
pub async fn runwarden_with(node: &Node, extra: &[&str]) {
    for image in ["runwarden-agent.tar", "runwarden-operator.tar"] {
        node.import_image(&crate::node::image_dir().join(image)).unwrap_or_else(|e| panic!("{e} (run `make images`)"));
    }
    let client = node.client().await;
    let arc = crate::node::arc_crd_dir();
    kubectl(node, &["apply", "--server-side", "-f", &arc.display().to_string()]);
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    cluster::wait_established(&crds, "ephemeralrunners.actions.github.com").await;
    // The chart with the local images; the agent's state directory inside the node's, so that it
    // goes with the node and no test run resumes another's runs.
    let chart = repo().join("charts/runwarden");
    let state = node.dir.join("agent-state");
    helm(
        node,
        &[
            "install",
            "runwarden",
            &chart.display().to_string(),
            "--namespace",
            SYSTEM,
            "--create-namespace",
            "-f",
            &chart.join("ci/local-values.yaml").display().to_string(),
            "--set",
            &format!("agent.stateDir={}", state.display()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    wait_installed(node, &client).await;
}

/// Lets the operator read notifier Secrets `names` of `namespace`, as a user does: `helm upgrade`
/// with the chart value `notifierSecrets` (this one namespace replaces what was listed).
pub fn list_notifier_secrets(node: &Node, namespace: &str, names: &[&str]) {
    let chart = repo().join("charts/runwarden");
    let mut set = format!("notifierSecrets[0].namespace={namespace}");
    for (i, n) in names.iter().enumerate() {
        set.push_str(&format!(",notifierSecrets[0].names[{i}]={n}"));
    }
    helm(node, &["upgrade", "runwarden", &chart.display().to_string(), "-n", SYSTEM, "--reuse-values", "--set", &set]);
}

/// Waits until the operator's Deployment is available and its agent DaemonSet has a ready pod on
/// the node.
pub async fn wait_installed(node: &Node, client: &Client) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), SYSTEM);
    let started = Instant::now();
    loop {
        let operator = deployments.get_opt("runwarden-operator").await.unwrap();
        let agent = daemonsets.get_opt("runwarden-agent").await.unwrap();
        let operator_ready = operator.and_then(|d| d.status).and_then(|s| s.available_replicas).unwrap_or(0) >= 1;
        let agent_ready = agent.and_then(|d| d.status).is_some_and(|s| s.number_ready >= 1);
        if operator_ready && agent_ready {
            eprintln!("runwarden installed: operator and agent ready in {:.1}s", started.elapsed().as_secs_f64());
            return;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let pods = kubectl(node, &["get", "pods", "-A", "-o", "wide"]);
            let describe = node.kubectl().args(["-n", SYSTEM, "describe", "pods"]).output().unwrap();
            let logs = node
                .kubectl()
                .args(["-n", SYSTEM, "logs", "-l", "app.kubernetes.io/name=runwarden", "--tail=30"])
                .output()
                .unwrap();
            panic!(
                "runwarden not ready after 180s (operator {operator_ready}, agent {agent_ready})\n{pods}\n{}\n{}\n{}\nkubelet:\n{}",
                String::from_utf8_lossy(&describe.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr),
                node.log_tail("kubelet", 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
