//! A finished run as a `WorkflowRun` record (see [`runwarden_crds::run`]): every destination
//! the run called, anomalies first, with the detector's reasons.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use runwarden_crds::run::{BASELINE_LABEL, MAX_OTHER_NAMES, MAX_RUN_ENDPOINTS, RUN_ID_LABEL};
use runwarden_crds::{Protocol, RunEndpoint, RunVerdict, WorkflowRun, WorkflowRunSpec};
use runwarden_detector::Proto;

use crate::node::{Destination, Job, Refused, Run};

/// The record's name (see [`runwarden_crds::run::record_name`]).
pub fn name(job: &Job, run: &Run) -> String {
    runwarden_crds::run::record_name(&job.run_id, &run.pod.name)
}

/// A label value (at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends), or `None`.
fn label_value(text: &str) -> Option<String> {
    let value: String =
        text.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(63).collect();
    let value = value.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string();
    (!value.is_empty()).then_some(value)
}

fn time_ms(ms: i64) -> Time {
    Time(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn verdict(d: &Destination) -> RunVerdict {
    match (&d.verdict, d.reported, d.scored) {
        (_, true, _) => RunVerdict::Anomalous,
        (Some(_), false, _) => RunVerdict::New,
        (None, false, true) => RunVerdict::Known,
        (None, false, false) => RunVerdict::Unscored,
    }
}

fn endpoint(d: &Destination) -> RunEndpoint {
    let cut = |items: &[String], max: usize, len: usize| -> Vec<String> {
        items.iter().take(max).map(|s| s.chars().take(len).collect()).collect()
    };
    RunEndpoint {
        host: d.host.clone(),
        address: d.ip.to_string(),
        port: d.port,
        protocol: if d.proto == Proto::Udp { Protocol::Udp } else { Protocol::Tcp },
        calls: d.calls,
        processes: cut(&d.processes, runwarden_crds::baseline::MAX_PROCESSES, 64),
        executables: cut(&d.executables, runwarden_crds::baseline::MAX_PROCESSES, 256),
        first_seen: time_ms(d.first_ms),
        last_seen: time_ms(d.last_ms),
        verdict: verdict(d),
        severity: d.verdict.as_ref().map(|v| runwarden_status::api_severity(v.severity)),
        score: d.verdict.as_ref().map(|v| v.score.clamp(0.0, 1.0)),
        reasons: d
            .verdict
            .as_ref()
            .map(|v| cut(&v.reasons, runwarden_crds::baseline::MAX_REASONS, 300))
            .unwrap_or_default(),
        other_names: cut(&d.other_names, MAX_OTHER_NAMES, 253),
    }
}

/// A destination block mode refused, with the policy that refused it as its reason.
fn refused(r: &Refused) -> RunEndpoint {
    let mut e = endpoint(&r.destination);
    e.verdict = RunVerdict::Blocked;
    e.reasons =
        vec![format!("refused in block mode: EgressPolicy {} does not allow it", r.policy).chars().take(300).collect()];
    e
}

/// The record of `run` (of `job`) on `node` under `policy`, owned by its baseline when
/// `baseline_uid` is known (so it goes with the baseline).
pub fn record(run: &Run, job: &Job, node: &str, policy: Option<&str>, baseline_uid: Option<&str>) -> WorkflowRun {
    let mut endpoints: Vec<RunEndpoint> =
        run.destinations.values().map(endpoint).chain(run.blocked.values().map(refused)).collect();
    // Anomalies first, most severe first; then refused; then new; then by calls.
    endpoints.sort_by(|a, b| {
        (a.verdict, std::cmp::Reverse(a.severity), std::cmp::Reverse(a.calls)).cmp(&(
            b.verdict,
            std::cmp::Reverse(b.severity),
            std::cmp::Reverse(b.calls),
        ))
    });
    let count = |v: RunVerdict| endpoints.iter().filter(|e| e.verdict == v).count() as u32;
    let (anomalies, new) = (count(RunVerdict::Anomalous), count(RunVerdict::New));
    let total = endpoints.len();
    let called = run.destinations.len();
    endpoints.truncate(MAX_RUN_ENDPOINTS);
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(BASELINE_LABEL.to_string(), job.baseline.clone());
    if let Some(id) = label_value(&job.run_id) {
        labels.insert(RUN_ID_LABEL.to_string(), id);
    }
    labels.insert("app.kubernetes.io/managed-by".to_string(), "runwarden".to_string());
    let owner_references = baseline_uid.map(|uid| {
        vec![OwnerReference {
            api_version: "runwarden.dev/v1alpha1".into(),
            kind: "WorkflowBaseline".into(),
            name: job.baseline.clone(),
            uid: uid.to_string(),
            ..OwnerReference::default()
        }]
    });
    let mut record = WorkflowRun::new(
        &name(job, run),
        WorkflowRunSpec {
            repository: job.repository.clone(),
            workflow: job.workflow.clone(),
            job: job.job.clone(),
            baseline: job.baseline.clone(),
            run_id: job.run_id.chars().take(runwarden_crds::baseline::MAX_RUN_ID).collect(),
            git_ref: job.git_ref.clone(),
            runner: run.pod.name.clone(),
            ephemeral_runner: run.runner.as_ref().map(|r| r.name.clone()),
            scale_set: run.scale_set.clone(),
            node: node.to_string(),
            policy: policy.map(str::to_string),
            started: time_ms(run.started.saturating_mul(1000)),
            finished: time_ms(run.finished_ms),
            calls: run.total_calls.max(run.destinations.values().map(|d| d.calls).sum()),
            endpoint_count: u32::try_from(called as u64 + run.dropped).unwrap_or(u32::MAX),
            new_endpoint_count: new + anomalies,
            anomaly_count: anomalies,
            blocked_count: run.blocked.len() as u32,
            dropped_endpoints: run.dropped + (total - endpoints.len()) as u64,
            endpoints,
        },
    );
    record.metadata = ObjectMeta {
        name: record.metadata.name.take(),
        namespace: Some(run.pod.namespace.clone()),
        labels: Some(labels),
        owner_references,
        ..ObjectMeta::default()
    };
    record
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use runwarden_detector::{Severity, Verdict};

    use super::*;
    use crate::node::ObjectRef;

    fn destination(host: &str, calls: u64, verdict: Option<(Severity, bool)>) -> Destination {
        Destination {
            host: Some(host.into()),
            ip: "192.0.2.1".parse().unwrap(),
            port: 443,
            proto: Proto::Tcp,
            calls,
            processes: vec!["curl".into()],
            executables: vec!["/usr/bin/curl".into()],
            first_ms: 1_767_225_600_000,
            last_ms: 1_767_225_601_000,
            scored: true,
            verdict: verdict.map(|(severity, _)| Verdict {
                severity,
                score: 0.7,
                reasons: vec!["first call to this host".into()],
                unfamiliar: false,
            }),
            reported: verdict.is_some_and(|(_, reported)| reported),
            other_names: Vec::new(),
        }
    }

    #[test]
    fn anomalies_come_first_most_severe_first_then_refused_then_new_then_by_calls() {
        let pod = ObjectRef { namespace: "arc".into(), name: "Runner_X.".into(), uid: "u".into() };
        let job = Job {
            repository: "acme/web".into(),
            workflow: ".github/workflows/ci.yml".into(),
            job: "build".into(),
            run_id: "4711".into(),
            baseline: "acme-web-ci-build-1234".into(),
            git_ref: None,
        };
        let destinations: BTreeMap<String, Destination> = [
            destination("known.example", 50, None),
            destination("quiet.example", 1, Some((Severity::Low, false))),
            destination("medium.example", 2, Some((Severity::Medium, true))),
            destination("high.example", 1, Some((Severity::High, true))),
        ]
        .into_iter()
        .map(|d| (d.host.clone().unwrap(), d))
        .collect();
        let run = Run {
            pod,
            runner: None,
            scale_set: Some("arc".into()),
            job: Some(job.clone()),
            started: 1_767_225_600,
            destinations,
            dropped: 3,
            total_calls: 60,
            throttled: 0,
            finished_ms: 1_767_225_700_000,
            blocked: [(
                "exfil.example|8080|tcp".to_string(),
                Refused { destination: destination("exfil.example", 4, None), policy: "arc/runners".into() },
            )]
            .into(),
        };
        let r = record(&run, &job, "node-1", Some("runners"), Some("uid-1"));
        let hosts: Vec<_> = r.spec.endpoints.iter().map(|e| e.host.clone().unwrap()).collect();
        assert_eq!(hosts, ["high.example", "medium.example", "exfil.example", "quiet.example", "known.example"]);
        assert_eq!(r.spec.endpoints[0].verdict, RunVerdict::Anomalous);
        assert_eq!(r.spec.endpoints[2].verdict, RunVerdict::Blocked);
        assert_eq!(r.spec.endpoints[2].reasons, ["refused in block mode: EgressPolicy arc/runners does not allow it"]);
        assert_eq!(r.spec.endpoints[3].verdict, RunVerdict::New);
        assert_eq!(r.spec.endpoints[4].verdict, RunVerdict::Known);
        assert_eq!((r.spec.anomaly_count, r.spec.new_endpoint_count, r.spec.endpoint_count), (2, 3, 7));
        assert_eq!(r.spec.blocked_count, 1);
        assert_eq!(r.spec.finished.0.as_millisecond(), 1_767_225_700_000);
        assert_eq!((r.spec.calls, r.spec.dropped_endpoints), (60, 3));
        assert_eq!(r.metadata.name.as_deref(), Some("4711-runner-x"), "a DNS subdomain");
        assert_eq!(r.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }
}
