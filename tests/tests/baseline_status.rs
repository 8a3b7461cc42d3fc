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
        let run = Run { id: &id, time: 1_767_225_600 + i64::from(n) * 3600, trigger: "push", git_ref: None };
        let job = Job {
            repository: "acme/web",
            baseline: &b,
            config: &config,
            cluster: &cluster,
            services: runwarden_detector::Services::builtin(),
        };
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

/// A job calling hundreds of unknown destinations (a scanner, an exfiltration loop) under
/// dozens of triggers: every list of the model stays within the CRD's limits, the apiserver
/// accepts the status, and what was dropped is counted.
#[tokio::test]
async fn a_baseline_driven_past_every_cap_still_fits_its_object() {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "caps").await;
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let spec: WorkflowBaselineSpec = serde_json::from_value(serde_json::json!({
        "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "mode": "Monitoring"
    }))
    .unwrap();
    api.create(&PostParams::default(), &WorkflowBaseline::new("acme-web-ci-build", spec.clone())).await.unwrap();
    let config = runwarden_status::config(&spec, Severity::Medium).unwrap();

    let mut b = Baseline::default();
    let cluster = Cluster::default();
    for n in 0..40u32 {
        let hosts: Vec<String> = (0..30).map(|i| format!("h{n}x{i}.scan-example.net")).collect();
        let calls: Vec<Call<'_>> = hosts
            .iter()
            .map(|h| Call { host: Some(h), ip: None, port: 8443, proto: Proto::Tcp, process: Some("curl") })
            .collect();
        let (id, trigger) = ((9000 + n).to_string(), format!("trigger-{n}"));
        let run = Run { id: &id, time: 1_767_225_600 + i64::from(n) * 60, trigger: &trigger, git_ref: None };
        let job = Job {
            repository: "acme/web",
            baseline: &b,
            config: &config,
            cluster: &cluster,
            services: runwarden_detector::Services::builtin(),
        };
        let scored: Vec<_> = calls.iter().map(|c| (*c, job.score(&run, c))).collect();
        b.learn(&config, &run, &scored);
    }
    assert!(b.endpoint_count() <= runwarden_crds::baseline::MAX_ENDPOINTS, "{}", b.endpoint_count());
    assert!(b.hosts.values().flatten().all(|e| e.state == State::Anomalous));
    assert_eq!(b.evicted_anomalous, 40 * 30 - runwarden_crds::baseline::MAX_ENDPOINTS as u32);
    // The first reported went first: the newest run's are all there.
    assert!(b.endpoint("h39x0.scan-example.net", 8443, Proto::Tcp).is_some());
    assert!(b.endpoint("h0x0.scan-example.net", 8443, Proto::Tcp).is_none());
    assert_eq!(b.triggers.len(), runwarden_crds::baseline::MAX_TRIGGER_KINDS, "{:?}", b.triggers);

    let mut status = WorkflowBaselineStatus::default();
    runwarden_status::write(&b, &config, &mut status);
    assert_eq!(status.evicted_anomalies, b.evicted_anomalous);
    let patch = serde_json::json!({ "status": status });
    api.patch_status("acme-web-ci-build", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the apiserver accepts a baseline at every cap");
    let back = runwarden_status::read(api.get("acme-web-ci-build").await.unwrap().status.as_ref().unwrap()).unwrap();
    assert!(back == b, "the stored status reads back as the model");
}
