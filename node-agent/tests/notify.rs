//! The agent's anomaly reports reach the policy's notifiers, on a real kube-apiserver: the
//! agent's reporter writes the `AnomalousEgress` Events as it does on a node, the operator's
//! notifier sends them to a webhook receiver and a Slack-format receiver this test runs.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use runwarden_agent::node::{Destination, Job, ObjectRef, Run};
use runwarden_agent::report::{Report, ReportConfig, Reporter};
use runwarden_crds::EgressPolicy;
use runwarden_crds::identity::JobIdentity;
use runwarden_crds::report::NOTIFIED_ANNOTATION;
use runwarden_detector::{Proto, Severity, Verdict};
use runwarden_operator::notify;
use runwarden_tests::services::{HttpSink, Received, SmtpRelay};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::{Value, json};

/// A run of `acme/web` job `build` in `ns` that called `host:port` (a Medium anomaly).
fn run(ns: &str, run_id: &str, host: &str, port: u16) -> (Box<Run>, String) {
    let identity = JobIdentity::from_runner(
        Some("acme/web"),
        Some("acme/web/.github/workflows/ci.yml@refs/heads/main"),
        Some("build"),
        Some(run_id.parse().unwrap()),
    )
    .unwrap();
    let pod = ObjectRef { namespace: ns.into(), name: format!("runner-{run_id}"), uid: format!("uid-{run_id}") };
    let now = Timestamp::now().as_millisecond();
    let dest = Destination {
        host: Some(host.into()),
        ip: "203.0.113.7".parse().unwrap(),
        port,
        proto: Proto::Tcp,
        calls: 1,
        processes: vec!["curl".into()],
        executables: vec!["/usr/bin/curl".into()],
        first_ms: now,
        last_ms: now,
        scored: true,
        verdict: Some(Verdict {
            severity: Severity::Medium,
            score: 0.6,
            reasons: vec!["first call to a domain no job in the cluster calls".into()],
            unfamiliar: true,
        }),
        reported: true,
        other_names: Vec::new(),
    };
    let key = format!("{host}|{port}|tcp");
    let run = Run {
        pod: pod.clone(),
        runner: Some(ObjectRef { uid: String::new(), ..pod }),
        scale_set: Some("big".into()),
        job: Some(Job {
            repository: identity.repository.clone(),
            workflow: identity.workflow.clone(),
            job: identity.job.clone(),
            run_id: run_id.into(),
            baseline: identity.baseline_name(),
            git_ref: identity.git_ref.clone(),
        }),
        started: now / 1000,
        destinations: [(key.clone(), dest)].into(),
        dropped: 0,
        total_calls: 1,
        throttled: 0,
        finished_ms: 0,
        blocked: Default::default(),
    };
    (Box::new(run), key)
}

async fn report(reporter: &mut Reporter, ns: &str, run_id: &str, host: &str, port: u16) {
    let (run, key) = run(ns, run_id, host, port);
    let delivered = reporter.report(&Report { run, key, seen: SystemTime::now(), repeat: false }, false).await;
    assert_eq!(delivered, runwarden_agent::report::Delivery::Done);
}

/// Where the test's users reach the run pages (`operator.ui.url`).
const PAGES: &str = "https://runwarden.example.com";

/// Starts the operator's notifiers; dropping the sender stops them.
fn start_notifiers(
    client: &Client,
    metrics: Arc<runwarden_operator::metrics::Metrics>,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(notify::run(client.clone(), metrics, Default::default(), Some(PAGES.into()), async move {
        let _ = stopped.await;
    }));
    stop
}

/// Waits until `sink` received `n` requests whose path is `path`.
async fn wait_for(sink: &HttpSink, path: &str, n: usize) -> Vec<Received> {
    for _ in 0..300 {
        let got: Vec<_> =
            sink.received().into_iter().filter(|r| r.line.starts_with(&format!("POST {path} "))).collect();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} did not receive {n} request(s) in 30 s: {:?}", sink.received());
}

fn count(metrics: &runwarden_operator::metrics::Metrics, kind: &str, result: &str) -> u64 {
    let line = format!("runwarden_operator_notifications_total{{type=\"{kind}\",result=\"{result}\"}} ");
    metrics.encode().lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn anomalies_reach_the_webhook_and_slack_once_per_job_and_destination_signed_retried_and_after_a_restart() {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "notify").await;
    let sink = HttpSink::start(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let relay = SmtpRelay::start("runwarden", "relay-pass");
    let secret = |name: &str, data: Value| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for s in [
        secret("hooks", json!({"url": format!("http://{}/hook", sink.addr), "key": "s3cret"})),
        secret("slack", json!({"url": format!("http://{}/slack", sink.addr)})),
        secret("broken", json!({"url": "ftp://example.org/"})),
        secret(
            "smtp",
            json!({"host": "localhost", "port": relay.port.to_string(), "username": "runwarden",
                              "password": "relay-pass", "ca.crt": relay.certificate}),
        ),
        // The same relay without its CA: its certificate is not trusted, and nothing is sent.
        secret(
            "smtp-untrusted",
            json!({"host": "localhost", "port": relay.port.to_string(), "username": "runwarden",
                                        "password": "relay-pass"}),
        ),
    ] {
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let policy: EgressPolicy = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "audit"},
        "spec": {"selector": {"repositories": ["acme/*"]}, "anomalyDetection": {"notifiers": [
            {"name": "siem", "webhook": {"urlSecretRef": {"name": "hooks", "key": "url"},
                                         "signingSecretRef": {"name": "hooks", "key": "key"}}},
            {"name": "team", "slack": {"webhookUrlSecretRef": {"name": "slack", "key": "url"}}},
            {"name": "broken", "webhook": {"urlSecretRef": {"name": "broken", "key": "url"}}},
            {"name": "security", "email": {"to": ["sec@example.org", "oncall@example.org"], "from": "runwarden@example.org",
                                           "smtpSecretRef": {"name": "smtp"}}},
            {"name": "untrusted", "email": {"to": ["sec@example.org"], "from": "runwarden@example.org",
                                            "smtpSecretRef": {"name": "smtp-untrusted"}}}
        ]}}
    }))
    .unwrap();
    Api::<EgressPolicy>::namespaced(client.clone(), &ns).create(&PostParams::default(), &policy).await.unwrap();

    let metrics = Arc::new(runwarden_operator::metrics::Metrics::default());
    let stop = start_notifiers(&client, metrics.clone());
    let agent_metrics = Arc::new(runwarden_agent::metrics::Metrics::default());
    let config = ReportConfig { pages: Some(PAGES.into()), ..ReportConfig::default() };
    let mut reporter = Reporter::new(client.clone(), "node-1", config, agent_metrics);
    let run_page = format!("{PAGES}/runs/{ns}/1001-runner-1001");

    // Run 1 calls somewhere new: the webhook gets the report as signed JSON, Slack a message.
    report(&mut reporter, &ns, "1001", "paste.example.net", 443).await;
    let hook = wait_for(&sink, "/hook", 1).await;
    let body: Value = serde_json::from_slice(&hook[0].body).unwrap();
    assert_eq!(body["kind"], "AnomalousEgress");
    assert_eq!(body["report"]["host"], "paste.example.net");
    assert_eq!(body["report"]["runId"], "1001");
    assert_eq!(body["report"]["repository"], "acme/web");
    assert_eq!(body["report"]["processes"][0], "curl");
    assert_eq!(body["report"]["severity"], "medium");
    assert!(body["report"]["reasons"][0].as_str().unwrap().contains("no job in the cluster"), "{body}");
    let command = body["approve"]["command"].as_str().unwrap();
    assert!(command.starts_with(&format!("kubectl -n {ns} patch workflowbaseline ")), "{command}");
    assert!(command.contains(r#""value":{"host":"paste.example.net","ports":[443],"protocol":"TCP"}"#), "{command}");
    assert!(body["objects"].as_array().unwrap().iter().any(|o| o["kind"] == "EphemeralRunner"), "{body}");
    // Links to the run's page (the record's name: run id and runner) and the job's.
    assert_eq!(body["links"]["run"], run_page.as_str(), "{body}");
    let baseline = body["report"]["baseline"].as_str().unwrap();
    assert_eq!(body["links"]["job"], format!("{PAGES}/jobs/{ns}/{baseline}"), "{body}");
    assert_eq!(
        hook[0].headers.get("x-runwarden-signature-256"),
        Some(&notify::signature(b"s3cret", &hook[0].body)),
        "the body is signed with the Secret's key"
    );
    let slack = wait_for(&sink, "/slack", 1).await;
    let message: Value = serde_json::from_slice(&slack[0].body).unwrap();
    let text = message.to_string();
    assert!(message["text"].as_str().unwrap().contains("paste.example.net:443/TCP"), "{text}");
    assert!(text.contains("`paste.example.net:443/TCP`") && text.contains("`curl`"), "names as code: {text}");
    assert!(text.contains("If it is expected, approve it"), "{text}");
    assert!(text.contains(&format!("<{run_page}|Every call of run 1001 and why>")), "{text}");
    // And the relay an email, over STARTTLS (the relay accepts nothing before it) and logged in.
    let mail = wait_for_mail(&relay, 1).await;
    assert!(mail[0].contains("X-Envelope-To: sec@example.org,oncall@example.org"), "{}", mail[0]);
    assert!(mail[0].contains("X-Authenticated: True"), "{}", mail[0]);
    assert!(
        mail[0].contains("Subject: [runwarden] MEDIUM: acme/web job build called paste.example.net:443/TCP"),
        "{}",
        mail[0]
    );
    assert!(mail[0].contains("curl (/usr/bin/curl) in run 1001 of acme/web"), "{}", mail[0]);
    assert!(mail[0].contains(&format!("kubectl -n {ns} patch workflowbaseline")), "{}", mail[0]);
    assert!(mail[0].contains(&format!("Every call of the run and why: {run_page}\r\n")), "{}", mail[0]);

    // The Event about the baseline is marked, so that no restart sends it again.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let mut marked = false;
    for _ in 0..50 {
        marked = events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("WorkflowBaseline")
                && e.annotations().contains_key(NOTIFIED_ANNOTATION)
        });
        if marked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(marked, "the baseline's Event is marked notified");
    // Every Event of the anomaly (pod, EphemeralRunner, baseline) ends with the run's page.
    let notes: Vec<String> =
        events.list(&Default::default()).await.unwrap().items.into_iter().filter_map(|e| e.note).collect();
    assert_eq!(notes.len(), 3, "{notes:?}");
    for note in &notes {
        assert!(note.ends_with(&format!(" Run page: {run_page}")), "{note}");
    }

    // Run 2 calls the same destination: a new Event, not a new notification.
    report(&mut reporter, &ns, "1002", "paste.example.net", 443).await;
    for _ in 0..50 {
        if count(&metrics, "webhook", "duplicate") >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&metrics, "webhook", "duplicate"), 2, "both webhooks count the repeat");
    assert_eq!(count(&metrics, "slack", "duplicate"), 1);
    assert_eq!(wait_for(&sink, "/hook", 1).await.len(), 1, "no second report for the same job and destination");

    // The receiver is busy twice: the report is retried and arrives.
    sink.fail_next(2);
    report(&mut reporter, &ns, "1003", "ip.example.org", 8443).await;
    let hook = wait_for(&sink, "/hook", 4).await;
    let last: Value = serde_json::from_slice(&hook[3].body).unwrap();
    assert_eq!(last["report"]["host"], "ip.example.org");
    assert_eq!(count(&metrics, "webhook", "retried"), 2);
    wait_for(&sink, "/slack", 2).await;

    // What each notifier did is in the policy's status; a broken one says why.
    let policies: Api<EgressPolicy> = Api::namespaced(client.clone(), &ns);
    let mut statuses = Vec::new();
    for _ in 0..100 {
        statuses = policies.get("audit").await.unwrap().status.map(|s| s.notifiers).unwrap_or_default();
        if statuses.iter().any(|s| s.name == "siem" && s.sent == 2)
            && statuses.iter().any(|s| s.name == "team" && s.sent == 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = |name: &str| statuses.iter().find(|s| s.name == name).cloned().unwrap_or_default();
    assert_eq!((status("siem").sent, status("siem").failed), (2, 0), "{statuses:?}");
    assert_eq!((status("team").sent, status("team").failed), (2, 0), "{statuses:?}");
    let broken = status("broken");
    assert_eq!((broken.sent, broken.failed), (0, 2), "{statuses:?}");
    assert!(broken.last_error.unwrap_or_default().contains("must start with https:// or http://"), "{statuses:?}");
    let untrusted = status("untrusted");
    assert_eq!((untrusted.sent, untrusted.failed), (0, 2), "{statuses:?}");
    assert!(untrusted.last_error.unwrap_or_default().contains("certificate"), "{statuses:?}");
    assert!(status("siem").last_sent_time.is_some());

    // A forged Event (not the agent's, though it is about the job and holds a well-formed
    // report) sends nothing.
    let first: Value = serde_json::from_slice(&hook[0].body).unwrap();
    let mut forged_report = first["report"].clone();
    forged_report["host"] = json!("forged.example.com");
    let forged = Event {
        metadata: ObjectMeta {
            name: Some("forged".into()),
            annotations: Some([(runwarden_crds::report::ANNOTATION.to_string(), forged_report.to_string())].into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        action: Some("Connect".into()),
        reason: Some("AnomalousEgress".into()),
        type_: Some("Warning".into()),
        regarding: Some(ObjectReference {
            api_version: Some("runwarden.dev/v1alpha1".into()),
            kind: Some("WorkflowBaseline".into()),
            name: forged_report["baseline"].as_str().map(String::from),
            namespace: Some(ns.clone()),
            ..Default::default()
        }),
        reporting_controller: Some("someone/else".into()),
        reporting_instance: Some("someone/else".into()),
        ..Default::default()
    };
    events.create(&PostParams::default(), &forged).await.unwrap();

    // The operator stops; an anomaly is reported meanwhile; a new operator sends it, and only it.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    report(&mut reporter, &ns, "1004", "drop.example.com", 443).await;
    let restarted = Arc::new(runwarden_operator::metrics::Metrics::default());
    let _stop = start_notifiers(&client, restarted.clone());
    let hook = wait_for(&sink, "/hook", 5).await;
    let last: Value = serde_json::from_slice(&hook[4].body).unwrap();
    assert_eq!(last["report"]["host"], "drop.example.com");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(wait_for(&sink, "/hook", 5).await.len(), 5, "nothing sent twice after the restart, nothing forged sent");
    assert_eq!(count(&restarted, "webhook", "sent"), 1);
    let mail = wait_for_mail(&relay, 3).await;
    assert!(mail[1].contains("ip.example.org") && mail[2].contains("drop.example.com"), "{mail:?}");
    assert_eq!(mail.len(), 3, "one email per new destination: {mail:?}");
    let statuses = policies.get("audit").await.unwrap().status.map(|s| s.notifiers).unwrap_or_default();
    assert!(statuses.iter().any(|s| s.name == "security" && s.sent >= 2 && s.failed == 0), "{statuses:?}");
}

/// Waits until `relay` accepted `n` messages.
async fn wait_for_mail(relay: &SmtpRelay, n: usize) -> Vec<String> {
    for _ in 0..300 {
        let got = relay.messages();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the relay did not accept {n} message(s) in 30 s: {:?}", relay.messages());
}
