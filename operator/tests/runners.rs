//! The operator against a real kube-apiserver with a minimal `EphemeralRunner` CRD (ARC's field
//! names): each job gets exactly one `WorkflowBaseline` once ARC reports a runner's job, and the
//! operator writes nothing on pods (the node agent reads the job from the `EphemeralRunner`).
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use runwarden_operator::arc::{EphemeralRunner, EphemeralRunnerSpec, EphemeralRunnerStatus};
use runwarden_operator::identity::JobIdentity;
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

mod common;

/// A client, the CRDs (ours and the EphemeralRunner stand-in) and a namespace of the test's own,
/// with the operator running until the returned sender is dropped.
async fn setup(prefix: &str) -> (Client, String, common::Stop) {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    common::install_arc_crd(&client).await;
    let ns = cluster::test_namespace(&client, prefix).await;
    let stop = common::start_operator(&client);
    (client, ns, stop)
}

async fn create_runner(client: &Client, ns: &str, name: &str) -> EphemeralRunner {
    let api: Api<EphemeralRunner> = Api::namespaced(client.clone(), ns);
    let runner =
        EphemeralRunner::new(name, EphemeralRunnerSpec { github_config_url: Some("https://github.com/acme".into()) });
    api.create(&PostParams::default(), &runner).await.expect("creating an EphemeralRunner")
}

/// A runner pod as ARC creates it: named after its EphemeralRunner, owned by it, labelled
/// with the scale set.
async fn create_runner_pod(client: &Client, ns: &str, runner: &EphemeralRunner) -> Pod {
    let owner = runner.controller_owner_ref(&()).expect("a created runner has a uid");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": runner.name_any(), "labels": {"actions.github.com/scale-set-name": "arc-runner-set"}},
        "spec": {"containers": [{"name": "runner", "image": "ghcr.io/actions/actions-runner:latest"}]}
    }))
    .unwrap();
    let mut pod = pod;
    pod.metadata.owner_references = Some(vec![owner]);
    Api::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.expect("creating a runner pod")
}

async fn assign_job(client: &Client, ns: &str, runner: &str, display_name: &str) {
    let api: Api<EphemeralRunner> = Api::namespaced(client.clone(), ns);
    let status = EphemeralRunnerStatus {
        phase: Some("Running".into()),
        job_request_id: Some(9),
        job_id: Some("job-1".into()),
        job_repository_name: Some("acme/web".into()),
        job_workflow_ref: Some("acme/web/.github/workflows/ci.yml@refs/heads/main".into()),
        workflow_run_id: Some(123_456),
        job_display_name: Some(display_name.into()),
        ..EphemeralRunnerStatus::default()
    };
    api.patch_status(runner, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
        .await
        .expect("setting the EphemeralRunner's job");
}

/// Polls until namespace `ns` has a baseline, or 20 s pass.
async fn wait_for_baseline(client: &Client, ns: &str) -> WorkflowBaseline {
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), ns);
    for _ in 0..200 {
        if let Some(b) = baselines.list(&Default::default()).await.unwrap().items.pop() {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WorkflowBaseline in {ns} within 20s");
}

fn expected_identity() -> JobIdentity {
    JobIdentity::from_runner(
        Some("acme/web"),
        Some("acme/web/.github/workflows/ci.yml@refs/heads/main"),
        Some("test"),
        Some(123_456),
    )
    .unwrap()
}

#[tokio::test]
async fn a_job_gets_its_baseline_once_its_runner_gets_one_and_its_pod_is_left_alone() {
    let (client, ns, _stop) = setup("job-baseline").await;
    let runner = create_runner(&client, &ns, "arc-runner-set-abcde-runner-x1").await;
    create_runner_pod(&client, &ns, &runner).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    assert!(baselines.list(&Default::default()).await.unwrap().items.is_empty(), "a baseline before a job");

    assign_job(&client, &ns, &runner.name_any(), "test (ubuntu-latest, 18)").await;
    let baseline = wait_for_baseline(&client, &ns).await;
    assert_eq!(baseline.name_any(), expected_identity().baseline_name());
    assert_eq!(baseline.spec.repository, "acme/web");
    assert_eq!(baseline.spec.workflow, ".github/workflows/ci.yml");
    assert_eq!(baseline.spec.job, "test");

    let created = common::wait_for_event(&client, &ns, "BaselineCreated").await;
    assert_eq!(created.regarding.and_then(|r| r.name), Some(baseline.name_any()));
    // The agent reads the job from the EphemeralRunner: the operator has no right to write pods.
    let pod = Api::<Pod>::namespaced(client.clone(), &ns).get(&runner.name_any()).await.unwrap();
    assert!(
        pod.annotations().keys().all(|k| !k.starts_with("runwarden.dev/")),
        "the runner pod was written: {:?}",
        pod.annotations()
    );
    assert!(pod.managed_fields().iter().all(|m| m.manager.as_deref() != Some("runwarden-operator")));
}

#[tokio::test]
async fn twenty_runners_of_one_job_starting_together_create_one_baseline() {
    let (client, ns, _stop) = setup("twenty").await;
    let mut names = Vec::new();
    for i in 0..20 {
        let runner = create_runner(&client, &ns, &format!("arc-runner-set-xyz-runner-{i}")).await;
        create_runner_pod(&client, &ns, &runner).await;
        names.push(runner.name_any());
    }
    // All at once, as when a matrix of 20 combinations starts.
    let assignments = names.iter().enumerate().map(|(i, n)| {
        let client = client.clone();
        let ns = ns.clone();
        async move { assign_job(&client, &ns, n, &format!("test (node-{i}, os-{})", i % 3)).await }
    });
    futures::future::join_all(assignments).await;
    wait_for_baseline(&client, &ns).await;
    // Every runner's reconcile has had time to try its own create.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let all = baselines.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "{:?}", all.iter().map(ResourceExt::name_any).collect::<Vec<_>>());
    assert_eq!(all[0].name_any(), expected_identity().baseline_name());
}

#[tokio::test]
async fn a_non_arc_pod_labelled_for_monitoring_gets_its_baseline_where_an_administrator_allows_it() {
    let (client, ns, _stop) = setup("non-arc").await;
    // Elsewhere its own word is not taken: no baseline.
    let elsewhere = cluster::test_namespace(&client, "non-arc-unlabelled").await;
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"runwarden.dev/monitor": "true"},
                "annotations": {
                    "runwarden.dev/repository": "acme/api",
                    "runwarden.dev/workflow": ".github/workflows/release.yml",
                    "runwarden.dev/job": "publish (linux)"
                }
            },
            "spec": {"containers": [{"name": "runner", "image": "runner:latest"}]}
        }))
        .unwrap()
    };
    Api::<Pod>::namespaced(client.clone(), &elsewhere).create(&PostParams::default(), &pod("claims")).await.unwrap();
    cluster::allow_self_declared(&client, &ns).await;
    let runner = pod("self-hosted-runner-0");
    Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &runner).await.unwrap();
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    for _ in 0..200 {
        let all = baselines.list(&Default::default()).await.unwrap().items;
        if let Some(b) = all.first() {
            assert_eq!(b.spec.repository, "acme/api");
            assert_eq!(b.spec.workflow, ".github/workflows/release.yml");
            assert_eq!(b.spec.job, "publish");
            let unlabelled: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &elsewhere);
            assert!(unlabelled.list(&Default::default()).await.unwrap().items.is_empty(), "a baseline for a claim");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WorkflowBaseline for the monitored pod within 20s");
}
