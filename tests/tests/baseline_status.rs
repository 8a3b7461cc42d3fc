//! The detector's model, written as a WorkflowBaseline status, is accepted by the real
//! apiserver and reads back unchanged.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use kube::api::{Api, Patch, PatchParams, PostParams};
use runwarden_crds::{WorkflowBaseline, WorkflowBaselineSpec, WorkflowBaselineStatus};
use runwarden_detector::{Baseline, Call, Cluster, Job, Proto, Run, Severity, State};
use runwarden_tests::{ControlPlane, cluster};

#[tokio::test]
async fn a_learned_model_round_trips_through_the_apiserver() {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "model").await;
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let spec: WorkflowBaselineSpec = serde_json::from_value(serde_json::json!({
        "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"
    }))
    .unwrap();
    let mut obj = WorkflowBaseline::new("acme-web-ci-build", spec);
    obj = api.create(&PostParams::default(), &obj).await.unwrap();
    let config = runwarden_status::config(&obj.spec, Severity::Medium).unwrap();

    // Twelve ordinary runs (hosts, rotating shards, addresses of one block), then an attack.
    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for n in 0..13u32 {
        let shard = format!("productionresultssa{}.blob.core.windows.net", n % 5);
        let mut calls = vec![
            Call { host: Some("github.com"), ip: None, port: 443, proto: Proto::Tcp, process: Some("git") },
            Call { host: Some(&shard), ip: None, port: 443, proto: Proto::Tcp, process: Some("Runner.Worker") },
            Call {
                host: None,
                ip: Some([198, 51, 100, (n % 4) as u8].into()),
                port: 443,
                proto: Proto::Udp,
                process: None,
            },
        ];
        if n == 12 {
            calls.push(Call {
                host: None,
                ip: Some([169, 254, 169, 254].into()),
                port: 80,
                proto: Proto::Tcp,
                process: Some("curl"),
            });
        }
        let id = (5000 + n).to_string();
        let run = Run { id: &id, time: 1_767_225_600 + i64::from(n) * 3600, trigger: "push" };
        let job = Job { repository: "acme/web", baseline: &b, config: &config, cluster: &cluster };
        let scored: Vec<_> = calls.iter().map(|c| (*c, job.score(&run, c))).collect();
        b.learn(&config, &run, &scored);
    }
    assert!(!b.patterns.is_empty());
    assert!(b.hosts.values().flatten().any(|e| e.state == State::Anomalous));

    let mut status = WorkflowBaselineStatus::default();
    runwarden_status::write(&b, &config, &mut status);
    let patch = serde_json::json!({ "status": status });
    api.patch_status("acme-web-ci-build", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the apiserver accepts the model's status");
    let stored = api.get("acme-web-ci-build").await.unwrap();
    let back = runwarden_status::read(stored.status.as_ref().unwrap()).unwrap();
    assert_eq!(back, b);
}
