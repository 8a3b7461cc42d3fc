//! The agent's Prometheus metrics (OpenMetrics text, one registry) and its HTTP endpoint:
//! `/metrics`, `/healthz` (the process runs), `/readyz` (programs attached and the pod,
//! baseline and policy caches synced).
//!
//! Labels are bounded: verdicts, severities, results, record kinds. Never a pod, run or address.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

/// One bounded label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// See the metric's help.
    pub kind: &'static str,
}

/// Labels of the calls counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// `known` (in the baseline), `new` (scored below the policy's minimum), `anomalous`
    /// (reported), `unscored` (no job identity yet).
    pub verdict: &'static str,
}

/// Labels of the anomalies counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    /// `info` ... `critical`.
    pub severity: &'static str,
}

/// Labels of result counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// See the metric's help.
    pub result: &'static str,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// New (run, destination) pairs, by verdict.
    pub calls: Family<VerdictLabel, Counter>,
    /// Anomalies reported, by severity.
    pub anomalies: Family<SeverityLabel, Counter>,
    /// Events: `sent`, `series` (a repeat counted), `rate_limited`, `failed`.
    pub events: Family<ResultLabel, Counter>,
    /// Run merges into baselines: `merged`, `duplicate`, `no_baseline` (retried), `failed`
    /// (retried), `conflicts_exhausted` (retried).
    pub merges: Family<ResultLabel, Counter>,
    /// `WorkflowRun` records of merged runs: `created`, `exists` (a retry), `retried` (the API
    /// server was unreachable), `failed` (refused; not retried).
    pub run_records: Family<ResultLabel, Counter>,
    /// Records the kernel could not write (ring buffer full), by kind: `call`, `dns`, `exec`.
    pub kernel_lost: Family<Kind, Gauge>,
    /// Calls of pods the agent could not attribute (cgroup of no known pod), dropped after
    /// [`crate::node::UNKNOWN_POD_GRACE`].
    pub unattributed: Counter,
    /// Calls held because their pod's job is not known yet.
    pub held: Gauge,
    /// Held calls dropped because a pod held more than its bound.
    pub held_dropped: Counter,
    /// Runs that ended before their job was known (reported under the scale set).
    pub unattributed_runs: Counter,
    /// Pods of runner namespaces that are not identified as a runner's (UnidentifiedPod).
    pub unidentified_pods: Counter,
    /// DNS answers: `parsed` (used to name destinations), `malformed`, `unsolicited` (matching
    /// no query the pod sent: transaction id, question, server, port, within 30 s), `uncorroborated` (from an untrusted resolver, such as one
    /// inside the pod, naming what no trusted answer did), `contradicting` (the same,
    /// contradicting a trusted answer: a SuspiciousDNS Event).
    pub dns_answers: Family<ResultLabel, Gauge>,
    /// Runner pods monitored on this node.
    pub pods_monitored: Gauge,
    /// Pods made while the agent ran whose cgroup held a process before the programs were
    /// attached to it: their first calls may have gone unseen.
    pub pods_armed_late: Counter,
    /// Armed pods found with a program detached from their cgroup (`programs`) or their mark
    /// gone from the kernel's monitored set (`mark`), or the programs' settings rewritten
    /// (`config`), and put back.
    pub tampered: Family<Kind, Counter>,
    /// Runs in progress.
    pub runs_in_progress: Gauge,
    /// Finished runs waiting to be merged (kept in the state directory).
    pub runs_unmerged: Gauge,
    /// Seconds from the call in the kernel to its Event accepted by the API server.
    pub detection_latency: Histogram,
    /// Calls refused in block mode (a refused destination's repeats within the dedupe window
    /// count once).
    pub blocked_calls: Counter,
    /// Calls of pods whose policy lists what they may call, to something it does not list, let
    /// through (the policy is in Audit mode, or block mode is off).
    pub would_block_calls: Counter,
    /// Pods held in block mode on this node.
    pub pods_blocking: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("runwarden_agent");
        let m = Self {
            registry: Registry::default(),
            calls: Family::default(),
            anomalies: Family::default(),
            events: Family::default(),
            merges: Family::default(),
            run_records: Family::default(),
            kernel_lost: Family::default(),
            unattributed: Counter::default(),
            held: Gauge::default(),
            held_dropped: Counter::default(),
            unattributed_runs: Counter::default(),
            unidentified_pods: Counter::default(),
            dns_answers: Family::default(),
            pods_monitored: Gauge::default(),
            pods_armed_late: Counter::default(),
            tampered: Family::default(),
            runs_in_progress: Gauge::default(),
            runs_unmerged: Gauge::default(),
            detection_latency: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            blocked_calls: Counter::default(),
            would_block_calls: Counter::default(),
            pods_blocking: Gauge::default(),
            ready: AtomicBool::new(false),
        };
        // Every label value exists from the start at 0, so that increase() sees the first one.
        for verdict in crate::node::VERDICTS {
            let _ = m.calls.get_or_create(&VerdictLabel { verdict });
        }
        for severity in ["info", "low", "medium", "high", "critical"] {
            let _ = m.anomalies.get_or_create(&SeverityLabel { severity });
        }
        for result in ["sent", "series", "rate_limited", "retried", "dropped", "failed"] {
            let _ = m.events.get_or_create(&ResultLabel { result });
        }
        for result in ["merged", "duplicate", "no_baseline", "conflicts_exhausted", "failed"] {
            let _ = m.merges.get_or_create(&ResultLabel { result });
        }
        for result in ["created", "exists", "retried", "failed"] {
            let _ = m.run_records.get_or_create(&ResultLabel { result });
        }
        for kind in ["call", "dns", "exec", "throttled"] {
            let _ = m.kernel_lost.get_or_create(&Kind { kind });
        }
        for kind in ["programs", "mark", "config"] {
            let _ = m.tampered.get_or_create(&Kind { kind });
        }
        for result in ["parsed", "malformed", "unsolicited", "uncorroborated", "contradicting"] {
            let _ = m.dns_answers.get_or_create(&ResultLabel { result });
        }
        registry.register("calls", "New (run, destination) pairs, by verdict", m.calls.clone());
        registry.register("anomalies", "Anomalies reported, by severity", m.anomalies.clone());
        registry.register(
            "events",
            "AnomalousEgress Events: sent, series, rate_limited, retried, dropped, failed",
            m.events.clone(),
        );
        registry.register("merges", "Finished runs merged into WorkflowBaselines, by result", m.merges.clone());
        registry.register("run_records", "WorkflowRun records of merged runs, by result", m.run_records.clone());
        registry.register("kernel_lost_records", "Records the kernel could not write, by kind", m.kernel_lost.clone());
        registry.register("unattributed_calls", "Calls from cgroups of no known pod", m.unattributed.clone());
        registry.register("held_calls", "Destinations held until their pod's job is known", m.held.clone());
        registry.register("held_dropped", "Held destinations dropped past the per-pod bound", m.held_dropped.clone());
        registry.register(
            "unattributed_runs",
            "Runs that ended before their job was known",
            m.unattributed_runs.clone(),
        );
        registry.register(
            "unidentified_pods",
            "Pods of runner namespaces not identified as a runner's (UnidentifiedPod Events)",
            m.unidentified_pods.clone(),
        );
        registry.register("dns_answers", "DNS answers read, by result", m.dns_answers.clone());
        registry.register("pods_monitored", "Runner pods monitored on this node", m.pods_monitored.clone());
        registry.register(
            "tampered",
            "Kernel state changed from outside and put back: programs detached, mark deleted, config rewritten",
            m.tampered.clone(),
        );
        registry.register(
            "pods_armed_late",
            "Pods whose cgroup held a process before the programs were attached (first calls may be unseen)",
            m.pods_armed_late.clone(),
        );
        registry.register("runs_in_progress", "Runs in progress on this node", m.runs_in_progress.clone());
        registry.register("runs_unmerged", "Finished runs waiting to be merged", m.runs_unmerged.clone());
        registry.register(
            "detection_latency_seconds",
            "From a call in the kernel to its Event accepted by the API server",
            m.detection_latency.clone(),
        );
        registry.register(
            "blocked_calls",
            "Calls refused in block mode (repeats of a destination within the dedupe window count once)",
            m.blocked_calls.clone(),
        );
        registry.register(
            "would_block_calls",
            "Calls to what a runner's policy does not list, let through (Audit, or block mode off)",
            m.would_block_calls.clone(),
        );
        registry.register("pods_blocking", "Pods held in block mode on this node", m.pods_blocking.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Marks the agent ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl runwarden_crds::serve::Health for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn ready(&self) -> Result<(), String> {
        if self.is_ready() { Ok(()) } else { Err("programs not attached or caches not synced".into()) }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    runwarden_crds::serve::serve(listener, metrics).await
}
