//! Merging runs into a WorkflowBaseline on a real kube-apiserver: concurrent writers lose no
//! run, and a run merged twice counts once.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use kube::Client;
use kube::api::{Api, PostParams};
use runwarden_crds::{WorkflowBaseline, WorkflowBaselineSpec};
use runwarden_detector::{Call, Proto, Run, Severity};
use runwarden_status::merge::{FinishedRun, merge_run};
use runwarden_tests::{ControlPlane, cluster};

async fn baseline(prefix: &str) -> (Client, Api<WorkflowBaseline>) {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, prefix).await;
    let api: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    let spec: WorkflowBaselineSpec = serde_json::from_value(serde_json::json!({
        "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "test"
    }))
    .unwrap();
    api.create(&PostParams::default(), &WorkflowBaseline::new("acme-web-ci-test", spec)).await.unwrap();
    (client, api)
}

/// Runner `w`'s run `n`: the common host and one of its own.
async fn merge(api: &Api<WorkflowBaseline>, w: usize, n: usize) -> bool {
    merge_as(api, w, &format!("{}", 9000 + n), &format!("arc-runner-{w}"), n).await
}

async fn merge_as(api: &Api<WorkflowBaseline>, w: usize, id: &str, runner: &str, n: usize) -> bool {
    // Letters, not digits: digit-numbered siblings would fold into one rotating-name pattern.
    let own = format!("mirror-{}.example.org", char::from(b'a' + w as u8));
    let calls = [
        (Call { host: Some("github.com"), ip: None, port: 443, proto: Proto::Tcp, process: Some("git") }, None),
        (Call { host: Some(&own), ip: None, port: 443, proto: Proto::Tcp, process: Some("curl") }, None),
    ];
    let finished = FinishedRun {
        run: Run { id, time: 1_767_225_600 + (n * 60) as i64, trigger: "push", git_ref: None },
        runner,
        calls: &calls,
        total_calls: 7,
        finished: 1_767_225_600 + (n * 60) as i64 + 30,
        blocked: 0,
    };
    merge_run(api, "acme-web-ci-test", Severity::Medium, &finished).await.expect("merging a run").is_some()
}

#[tokio::test]
async fn ten_concurrent_writers_lose_no_run() {
    let (_client, api) = baseline("merge").await;
    let writers = (0..10).map(|w| {
        let api = api.clone();
        tokio::spawn(async move {
            for n in 0..5 {
                assert!(merge(&api, w, n).await);
            }
        })
    });
    for r in futures::future::join_all(writers).await {
        r.unwrap();
    }
    let status = api.get("acme-web-ci-test").await.unwrap().status.unwrap();
    assert_eq!(status.observed_runs, 50, "every writer's five runs are counted");
    let model = runwarden_status::read(&status).unwrap();
    for w in 0..10 {
        let e = model.endpoint(&format!("mirror-{}.example.org", char::from(b'a' + w as u8)), 443, Proto::Tcp);
        assert_eq!(e.map(|e| e.runs_seen), Some(5), "writer {w}'s host");
    }
    assert_eq!(model.endpoint("github.com", 443, Proto::Tcp).unwrap().runs_seen, 50);
    assert_eq!(status.recent_runs.len(), 20);
}

#[tokio::test]
async fn a_run_merged_twice_counts_once() {
    let (_client, api) = baseline("merge-twice").await;
    assert!(merge(&api, 1, 1).await);
    assert!(!merge(&api, 1, 1).await, "the second merge of the same run and runner is a no-op");
    // The same run id on another runner (another matrix combination) is another run.
    assert!(merge(&api, 2, 1).await);
    let status = api.get("acme-web-ci-test").await.unwrap().status.unwrap();
    assert_eq!(status.observed_runs, 2);
    assert_eq!(status.recent_runs[0].calls, 7);
    // When the run ended, not when it started.
    assert_eq!(status.recent_runs[0].time.0.as_second(), 1_767_225_600 + 60 + 30);
    assert_eq!(status.last_run_time.unwrap().0.as_second(), 1_767_225_600 + 60 + 30);
}

#[tokio::test]
async fn a_run_with_a_long_runner_name_merged_twice_counts_once() {
    let (_client, api) = baseline("merge-long").await;
    // ARC names runners `<scale set>-<hash>-runner-<suffix>`: long scale-set names pass 63.
    let runner = format!("{}-7k2xq-runner-9fz4c", "a".repeat(70));
    let run_id = "1".repeat(40);
    assert!(merge_as(&api, 1, &run_id, &runner, 1).await);
    assert!(!merge_as(&api, 1, &run_id, &runner, 1).await, "a retried merge is a no-op");
    let status = api.get("acme-web-ci-test").await.unwrap().status.unwrap();
    assert_eq!(status.observed_runs, 1);
}
