//! The WorkflowBaseline lifecycle on a real kube-apiserver: conditions and phase follow the
//! runs the agents merge, spec changes (mode, approvals) reach the status, and a
//! `BaselineSettled` Event is recorded.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use runwarden_crds::baseline::{BaselinePhase, EndpointState};
use runwarden_crds::{ConditionStatus, WorkflowBaseline, WorkflowBaselineSpec, WorkflowBaselineStatus, WorkflowRun};
use runwarden_detector::{Call, Proto, Run, Severity, Verdict};
use runwarden_status::merge::{FinishedRun, merge_run};
use runwarden_tests::{ControlPlane, cluster};

mod common;

const NAME: &str = "acme-web-ci-build";

async fn wait_for(
    api: &Api<WorkflowBaseline>,
    what: &str,
    check: impl Fn(&WorkflowBaselineStatus) -> bool,
) -> WorkflowBaselineStatus {
    for _ in 0..200 {
        if let Some(s) = api.get(NAME).await.unwrap().status
            && check(&s)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the baseline did not become {what} within 20s: {:#?}", api.get(NAME).await.unwrap().status);
}

fn condition(s: &WorkflowBaselineStatus, kind: &str) -> Option<(ConditionStatus, String)> {
    s.conditions.iter().find(|c| c.r#type == kind).map(|c| (c.status, c.reason.clone()))
}

async fn merge(api: &Api<WorkflowBaseline>, n: u32, extra: Option<(Call<'_>, Option<Verdict>)>) {
    let id = (100 + n).to_string();
    let mut calls =
        vec![(Call { host: Some("github.com"), ip: None, port: 443, proto: Proto::Tcp, process: Some("git") }, None)];
    calls.extend(extra);
    let finished = FinishedRun {
        run: Run { id: &id, time: 1_767_225_600 + i64::from(n) * 600, trigger: "push", git_ref: None },
        runner: "arc-runner-0",
        calls: &calls,
        total_calls: calls.len() as u32,
        finished: 1_767_225_600 + i64::from(n) * 600 + 60,
        blocked: 0,
    };
    merge_run(api, NAME, Severity::Medium, &finished).await.unwrap();
}

#[tokio::test]
async fn the_operator_keeps_phase_conditions_and_approvals_true() {
    let client: Client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "lifecycle").await;
    let api: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let spec: WorkflowBaselineSpec = serde_json::from_value(serde_json::json!({
        "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build",
        "learning": {"minRuns": 3, "settleAfterQuietRuns": 2}
    }))
    .unwrap();
    api.create(&PostParams::default(), &WorkflowBaseline::new(NAME, spec)).await.unwrap();
    let _stop = common::start_operator(&client);

    let s = wait_for(&api, "reconciled", |s| s.observed_generation == Some(1)).await;
    assert_eq!(s.phase, Some(BaselinePhase::Learning));
    assert_eq!(condition(&s, "Settled"), Some((ConditionStatus::False, "TooFewRuns".into())));
    assert_eq!(condition(&s, "Ready"), Some((ConditionStatus::True, "Reconciled".into())));

    for n in 0..4 {
        merge(&api, n, None).await;
    }
    let s = wait_for(&api, "settled", |s| condition(s, "Settled").is_some_and(|c| c.0 == ConditionStatus::True)).await;
    assert_eq!(s.phase, Some(BaselinePhase::Monitoring));
    assert_eq!(s.observed_runs, 4);
    common::wait_for_event(&client, &ns, "BaselineSettled").await;

    // A reported call stays anomalous until a person approves it in the spec.
    let paste = Call { host: Some("paste.example"), ip: None, port: 443, proto: Proto::Tcp, process: Some("curl") };
    let verdict =
        Verdict { severity: Severity::Medium, score: 0.62, reasons: vec!["first call".into()], unfamiliar: true };
    merge(&api, 4, Some((paste, Some(verdict)))).await;
    let s = api.get(NAME).await.unwrap().status.unwrap();
    let state = |s: &WorkflowBaselineStatus| {
        s.endpoints.iter().find(|e| e.host.as_deref() == Some("paste.example")).map(|e| e.state)
    };
    assert_eq!(state(&s), Some(EndpointState::Anomalous));
    let approve = serde_json::json!({"spec": {"approved": [{"host": "paste.example", "ports": [443]}]}});
    api.patch(NAME, &PatchParams::default(), &Patch::Merge(&approve)).await.unwrap();
    wait_for(&api, "approved", |s| state(s) == Some(EndpointState::Approved) && s.observed_generation == Some(2)).await;

    // Frozen by a person: the phase follows without a run.
    let freeze = serde_json::json!({"spec": {"mode": "Frozen"}});
    api.patch(NAME, &PatchParams::default(), &Patch::Merge(&freeze)).await.unwrap();
    let s = wait_for(&api, "frozen", |s| s.phase == Some(BaselinePhase::Frozen)).await;
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(s.observed_runs, 5, "no run was lost or added by the operator's writes");
}

/// A baseline keeps its newest `WorkflowRun` records (`operator.runHistory`, 50 by default):
/// older ones are deleted as new ones come, and all go with the baseline.
#[tokio::test]
async fn a_baseline_keeps_its_newest_run_records() {
    let client: Client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "run-history").await;
    let api: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let spec: WorkflowBaselineSpec = serde_json::from_value(serde_json::json!({
        "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"
    }))
    .unwrap();
    let baseline = api.create(&PostParams::default(), &WorkflowBaseline::new(NAME, spec)).await.unwrap();
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let record = |n: usize| -> WorkflowRun {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {
                "name": format!("{:03}-arc-runner-{n}", 900 + n),
                "labels": {"runwarden.dev/baseline": NAME},
                "ownerReferences": [{"apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline", "name": NAME, "uid": baseline.metadata.uid}]
            },
            "spec": {
                "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": NAME,
                "runId": (900 + n).to_string(), "runner": format!("arc-runner-{n}"), "node": "n1",
                "started": "2026-12-03T10:00:00Z", "finished": "2026-12-03T10:05:00Z",
                "calls": 3, "endpointCount": 1, "newEndpointCount": 0, "anomalyCount": 0,
                "endpoints": [{"host": "github.com", "address": "140.82.112.3", "port": 443, "protocol": "TCP",
                    "calls": 3, "firstSeen": "2026-12-03T10:00:01Z", "lastSeen": "2026-12-03T10:04:00Z", "verdict": "Known"}]
            }
        }))
        .unwrap()
    };
    let history = runwarden_operator::lifecycle::RUN_HISTORY;
    for n in 0..history + 3 {
        runs.create(&PostParams::default(), &record(n)).await.unwrap();
    }
    let _stop = common::start_operator(&client);
    let mut names = Vec::new();
    for _ in 0..100 {
        names = runs
            .list_metadata(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .collect();
        if names.len() == history {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names.len(), history, "{names:?}");
    assert!(
        !names.iter().any(|n| n.ends_with("-arc-runner-0") || n.ends_with("-arc-runner-2")),
        "the oldest went: {names:?}"
    );
    // A new record wakes the baseline: the oldest left goes.
    runs.create(&PostParams::default(), &record(history + 3)).await.unwrap();
    let gone = format!("{:03}-arc-runner-3", 903);
    for _ in 0..100 {
        if runs.get_opt(&gone).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(runs.get_opt(&gone).await.unwrap().is_none(), "the oldest record is deleted when a new one comes");
    assert_eq!(runs.list_metadata(&Default::default()).await.unwrap().items.len(), history);
}
