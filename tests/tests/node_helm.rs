//! The chart's lifecycle on the real node: `helm upgrade` updates the CRDs (they are templates,
//! not Helm's never-upgraded `crds/`), and `helm uninstall` leaves no agent behind (the operator's
//! Deployment owns the DaemonSet) while the CRDs, and with them every baseline, stay.
//!
//! A test binary of its own: it uninstalls runwarden, which the other real-node tests need.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;
use runwarden_tests::install::{SYSTEM, helm};
use runwarden_tests::{Node, cluster, install};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_updates_the_crds_and_uninstall_leaves_no_agent_but_keeps_the_baselines() {
    let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();
    install::runwarden(node).await;
    let client = node.client().await;

    // A later chart version whose CRD changed (here: a column more in `kubectl get wfb`).
    let chart = cluster::crd_dir().join("../charts/runwarden");
    let next = node.dir.join("chart-next");
    copy_dir(&chart, &next);
    let crd_file = next.join("templates/crds/workflowbaselines.yaml");
    let crd = std::fs::read_to_string(&crd_file).unwrap();
    let changed = crd.replacen(
        "  - additionalPrinterColumns:\n",
        "  - additionalPrinterColumns:\n    - jsonPath: .status.evictedEndpoints\n      name: Evicted\n      type: integer\n",
        1,
    );
    assert_ne!(crd, changed, "the CRD template has printer columns");
    std::fs::write(&crd_file, changed).unwrap();
    helm(node, &["upgrade", "runwarden", &next.display().to_string(), "--namespace", SYSTEM, "--reuse-values"]);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let served = crds.get("workflowbaselines.runwarden.dev").await.unwrap();
    let columns = served.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
    assert!(columns.iter().any(|c| c.name == "Evicted"), "helm upgrade updated the CRD: {columns:?}");

    // A baseline exists; then the release goes.
    let ns = "arc-helm";
    install::kubectl(node, &["create", "namespace", ns]);
    let baseline = r#"{"apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
        "metadata": {"name": "acme-web-ci-build", "namespace": "arc-helm"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"}}"#;
    install::kubectl_stdin(node, &["apply", "-f", "-"], baseline);
    helm(node, &["uninstall", "runwarden", "--namespace", SYSTEM, "--wait"]);

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), SYSTEM);
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let started = Instant::now();
    loop {
        let ds = daemonsets.get_opt("runwarden-agent").await.unwrap();
        let left = pods.list(&ListParams::default().labels("app.kubernetes.io/name=runwarden")).await.unwrap().items;
        if ds.is_none() && left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "after helm uninstall: DaemonSet {:?}, pods {:?}",
            ds.map(|d| d.metadata.name),
            left.iter().map(|p| p.metadata.name.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(crds.get_opt("workflowbaselines.runwarden.dev").await.unwrap().is_some(), "crds.keep: the CRDs stay");
    let kept = install::kubectl(node, &["get", "wfb", "-n", ns, "-o", "name"]);
    assert!(kept.contains("acme-web-ci-build"), "and every baseline with them: {kept}");
}
