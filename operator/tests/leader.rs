//! Two operator replicas on a real kube-apiserver: one leads and reconciles, the other stands
//! by; when the leader dies the standby takes over within 15 s, and a leader that shuts down
//! hands over at once. The metrics endpoint reports the reconciles.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};
use runwarden_crds::WorkflowBaseline;
use runwarden_operator::metrics::{self, Metrics};
use runwarden_operator::{Config, Stopped};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Replica {
    task: tokio::task::JoinHandle<runwarden_operator::Result<Stopped>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
}

fn replica(client: &Client, ns: &str, identity: &str) -> Replica {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = futures::FutureExt::shared(Box::pin(async move {
        let _ = stopped.await;
    }));
    let metrics = Arc::new(Metrics::default());
    let (client, ns, identity, m) = (client.clone(), ns.to_string(), identity.to_string(), metrics.clone());
    let task = tokio::spawn(async move {
        runwarden_operator::run_elected(client, Config::default(), m, &ns, &identity, shutdown).await
    });
    Replica { task, stop: Some(stop), metrics }
}

async fn holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt("runwarden-operator").await.unwrap().and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty())
}

async fn wait_for_holder(client: &Client, ns: &str, who: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if holder(client, ns).await.as_deref() == Some(who) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{who} did not hold the Lease within {within:?} (holder: {:?})", holder(client, ns).await);
}

/// Creates a monitored pod and waits for the baseline the leader creates for it.
async fn leader_reconciles(client: &Client, ns: &str, job: &str) {
    cluster::allow_self_declared(client, ns).await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("runner-{job}"), "labels": {"runwarden.dev/monitor": "true"},
                     "annotations": {"runwarden.dev/repository": "acme/web",
                                     "runwarden.dev/workflow": ".github/workflows/ci.yml",
                                     "runwarden.dev/job": job}},
        "spec": {"containers": [{"name": "runner", "image": "runner"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.unwrap();
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), ns);
    for _ in 0..300 {
        if baselines.list(&Default::default()).await.unwrap().items.iter().any(|b| b.spec.job == job) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no baseline for job {job}: no replica reconciles");
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_dies() {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "leader").await;

    let a = replica(&client, &ns, "operator-a");
    wait_for_holder(&client, &ns, "operator-a", Duration::from_secs(10)).await;
    let b = replica(&client, &ns, "operator-b");
    leader_reconciles(&client, &ns, "build").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(holder(&client, &ns).await.as_deref(), Some("operator-a"), "the standby does not take a held Lease");
    assert_eq!(a.metrics.leader.get(), 1);
    assert_eq!(b.metrics.leader.get(), 0);

    // The leader crashes: no release, its Lease must expire.
    a.task.abort();
    let failover = wait_for_holder(&client, &ns, "operator-b", Duration::from_secs(15)).await;
    eprintln!("failover after the leader died: {:.1}s", failover.as_secs_f64());
    leader_reconciles(&client, &ns, "test").await;
    assert_eq!(b.metrics.leader.get(), 1);

    // A third replica stands by; the leader shuts down gracefully and hands over at once.
    let c = replica(&client, &ns, "operator-c");
    let mut b = b;
    let _ = b.stop.take().unwrap().send(());
    assert_eq!(b.task.await.unwrap().unwrap(), Stopped::Shutdown);
    let handover = wait_for_holder(&client, &ns, "operator-c", Duration::from_secs(5)).await;
    eprintln!("handover after a graceful shutdown: {:.1}s", handover.as_secs_f64());
    leader_reconciles(&client, &ns, "lint").await;

    // The metrics endpoint reports what the leader did.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metrics::serve(listener, c.metrics.clone()));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/readyz").await.starts_with("HTTP/1.1 503"), "not ready before preflight");
    c.metrics.set_ready();
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    let text = get("/metrics").await;
    assert!(text.contains("runwarden_operator_leader 1"), "{text}");
    assert!(text.contains("runwarden_operator_reconciles_total{controller=\"monitored_pods\"}"), "{text}");
    assert!(text.contains("runwarden_operator_workflow_baselines{phase="), "{text}");
    assert!(text.contains("runwarden_operator_watched_objects{kind=\"WorkflowBaseline\"} 3"), "{text}");
}

/// A holder whose clock is an hour behind keeps renewing: its `renewTime` always looks stale to
/// this replica's wall clock, yet the Lease changes, so it is not taken; once the holder stops,
/// it is taken after the lease duration of this replica's own clock.
#[tokio::test]
async fn a_holder_that_keeps_renewing_is_not_replaced_whatever_its_clock_says() {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let client = ControlPlane::shared().client().await;
    let ns = cluster::test_namespace(&client, "leader-skew").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let behind = || MicroTime(k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1));
    let lease = Lease {
        metadata: kube::api::ObjectMeta { name: Some("runwarden-operator".into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("skewed".into()),
            lease_duration_seconds: Some(10),
            renew_time: Some(behind()),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let patch = json!({"spec": {"renewTime": behind()}});
                let _ = leases
                    .patch("runwarden-operator", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await;
            }
        })
    };
    let elector = runwarden_operator::leader::Elector::new(client.clone(), &ns, "runwarden-operator", "standby");
    let taken = tokio::time::timeout(Duration::from_secs(14), elector.acquire()).await;
    assert!(taken.is_err(), "a renewing holder was replaced because its clock is behind");
    assert_eq!(holder(&client, &ns).await.as_deref(), Some("skewed"));

    renewing.abort();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), elector.acquire()).await.expect("taken once renewals stop").unwrap();
    assert!(started.elapsed() >= Duration::from_secs(8), "not before the lease lasted: {:?}", started.elapsed());
    assert_eq!(holder(&client, &ns).await.as_deref(), Some("standby"));
}

/// A leader whose requests to the API server hang (they are accepted and never answered) steps
/// down before its Lease could have expired for the others.
#[tokio::test]
async fn a_leader_whose_requests_hang_steps_down_before_its_lease_expires() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = Client::try_from(config).unwrap();
    let elector = runwarden_operator::leader::Elector::new(client, "default", "runwarden-operator", "leader");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), elector.keep()).await.expect("keep returns although requests hang");
    let took = started.elapsed();
    assert!(
        took < runwarden_operator::leader::LEASE_DURATION,
        "stepped down after {took:?}, not before the lease ({:?}) ran out",
        runwarden_operator::leader::LEASE_DURATION
    );
    accepting.abort();
}
