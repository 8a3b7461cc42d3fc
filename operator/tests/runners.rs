//! The operator against a real kube-apiserver with a minimal `EphemeralRunner` CRD (ARC's field
//! names): runner pods are annotated with their job once ARC reports it, container-mode job pods
//! too, and each job gets exactly one `WorkflowBaseline`.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use runwarden_operator::arc::{EphemeralRunner, EphemeralRunnerSpec, EphemeralRunnerStatus};
use runwarden_operator::identity::{JobIdentity, annotations};
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

/// Polls `pod`'s runwarden annotations until they are there or 20 s pass.
async fn wait_for_annotations(client: &Client, ns: &str, pod: &str) -> BTreeMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for _ in 0..200 {
        let p = pods.get(pod).await.unwrap();
        if p.annotations().contains_key(annotations::JOB) {
            return p.annotations().clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pod {ns}/{pod} was not annotated within 20s");
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
async fn a_runner_pod_is_annotated_once_its_runner_gets_a_job_and_not_before() {
    let (client, ns, _stop) = setup("annotate").await;
    let runner = create_runner(&client, &ns, "arc-runner-set-abcde-runner-x1").await;
    create_runner_pod(&client, &ns, &runner).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let before = pods.get(&runner.name_any()).await.unwrap();
    assert!(!before.annotations().contains_key(annotations::REPOSITORY), "annotated before a job was assigned");
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    assert!(baselines.list(&Default::default()).await.unwrap().items.is_empty());

    assign_job(&client, &ns, &runner.name_any(), "test (ubuntu-latest, 18)").await;
    let a = wait_for_annotations(&client, &ns, &runner.name_any()).await;
    assert_eq!(a[annotations::REPOSITORY], "acme/web");
    assert_eq!(a[annotations::WORKFLOW], ".github/workflows/ci.yml");
    assert_eq!(a[annotations::JOB], "test");
    assert_eq!(a[annotations::RUN_ID], "123456");
    assert_eq!(a[annotations::REF], "refs/heads/main");

    let baseline = baselines.get(&expected_identity().baseline_name()).await.expect("the job's baseline exists");
    assert_eq!(baseline.spec.repository, "acme/web");
    assert_eq!(baseline.spec.workflow, ".github/workflows/ci.yml");
    assert_eq!(baseline.spec.job, "test");

    let created = common::wait_for_event(&client, &ns, "BaselineCreated").await;
    assert_eq!(created.regarding.and_then(|r| r.name), Some(baseline.name_any()));
}

#[tokio::test]
async fn a_container_mode_job_pod_is_annotated_like_its_runner() {
    let (client, ns, _stop) = setup("container-mode").await;
    let runner = create_runner(&client, &ns, "arc-runner-set-abcde-runner-c1").await;
    create_runner_pod(&client, &ns, &runner).await;
    assign_job(&client, &ns, &runner.name_any(), "build").await;
    wait_for_annotations(&client, &ns, &runner.name_any()).await;

    // ARC's container hooks create the job pod after the job started.
    let job_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-workflow", runner.name_any()), "labels": {"runner-pod": runner.name_any()}},
        "spec": {"containers": [{"name": "job", "image": "node:20"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &job_pod).await.unwrap();
    let a = wait_for_annotations(&client, &ns, &format!("{}-workflow", runner.name_any())).await;
    assert_eq!(a[annotations::JOB], "build");
    assert_eq!(a[annotations::REPOSITORY], "acme/web");
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
    for n in &names {
        let a = wait_for_annotations(&client, &ns, n).await;
        assert_eq!(a[annotations::JOB], "test");
    }
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let all = baselines.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "{:?}", all.iter().map(ResourceExt::name_any).collect::<Vec<_>>());
    assert_eq!(all[0].name_any(), expected_identity().baseline_name());
}

#[tokio::test]
async fn a_non_arc_pod_labelled_for_monitoring_gets_its_baseline() {
    let (client, ns, _stop) = setup("non-arc").await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "self-hosted-runner-0",
            "labels": {"runwarden.dev/monitor": "true"},
            "annotations": {
                "runwarden.dev/repository": "acme/api",
                "runwarden.dev/workflow": ".github/workflows/release.yml",
                "runwarden.dev/job": "publish (linux)"
            }
        },
        "spec": {"containers": [{"name": "runner", "image": "runner:latest"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pod).await.unwrap();
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    for _ in 0..200 {
        let all = baselines.list(&Default::default()).await.unwrap().items;
        if let Some(b) = all.first() {
            assert_eq!(b.spec.repository, "acme/api");
            assert_eq!(b.spec.workflow, ".github/workflows/release.yml");
            assert_eq!(b.spec.job, "publish");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WorkflowBaseline for the monitored pod within 20s");
}
