//! The operator's Prometheus metrics (OpenMetrics text, one registry) and its small HTTP
//! endpoint: `/metrics`, `/healthz` (the process runs), `/readyz` (preflight passed).
//!
//! Labels are bounded: controller names, error kinds, phases, pod states.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runwarden_crds::WorkflowBaseline;
use runwarden_crds::baseline::BaselinePhase;
use tokio::net::TcpListener;

/// The controllers whose reconciles are counted.
pub const CONTROLLERS: [&str; 4] = ["baselines", "monitored_pods", "policies", "runners"];

/// Labels of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `runners`, `monitored_pods`, `baselines`, `policies`.
    pub controller: &'static str,
}

/// Labels of failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// As in [`ControllerLabels`].
    pub controller: &'static str,
    /// The error kind ([`crate::Error::kind`]).
    pub error: &'static str,
}

/// Labels of the baseline gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `Learning`, `Monitoring`, `Frozen`, or `New` before the first reconcile.
    pub phase: &'static str,
}

/// Labels of the watched-objects gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `WorkflowBaseline`, `EgressPolicy`, `EphemeralRunner`.
    pub kind: &'static str,
}

/// Labels of the agent pod gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// `desired`, `ready`, `available`.
    pub state: &'static str,
}

/// Labels of the notification counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    /// `webhook`, `slack`, `email` ([`crate::notify::TYPES`]).
    pub r#type: &'static str,
    /// `sent`, `failed`, `retried`, `rate_limited`, `duplicate`.
    pub result: &'static str,
}

/// Counts the objects of one controller cache.
type StoreSize = Box<dyn Fn() -> usize + Send + Sync>;

/// Every metric of the operator.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, by controller.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciles failed, by controller and error kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, by controller.
    pub durations: Family<ControllerLabels, Histogram>,
    /// WorkflowBaselines by phase (counted when scraped).
    pub baselines: Family<PhaseLabels, Gauge>,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// Node-agent pods of the DaemonSet, desired and ready (from its status).
    pub agent_pods: Family<AgentLabels, Gauge>,
    /// Objects in the controllers' caches, by kind (counted when scraped).
    pub watched: Family<KindLabels, Gauge>,
    /// Reports given to notifiers, by notifier type and result.
    pub notifications: Family<NotificationLabels, Counter>,
    baseline_store: Mutex<Option<Store<WorkflowBaseline>>>,
    stores: Mutex<Vec<(&'static str, StoreSize)>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("runwarden_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 8))
        });
        let baselines = Family::<PhaseLabels, Gauge>::default();
        let leader = Gauge::default();
        let agent_pods = Family::<AgentLabels, Gauge>::default();
        let watched = Family::<KindLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        // Every controller's series exist from the start at 0, so that rate() and increase() see
        // the first reconcile and the first error.
        for controller in CONTROLLERS {
            let _ = reconciles.get_or_create(&ControllerLabels { controller });
            for error in crate::Error::KINDS {
                let _ = errors.get_or_create(&ErrorLabels { controller, error });
            }
        }
        registry.register("reconcile_errors", "Reconciles that failed", errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent in a reconcile", durations.clone());
        registry.register("workflow_baselines", "WorkflowBaselines by phase", baselines.clone());
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        registry.register("agent_pods", "Node-agent pods by state", agent_pods.clone());
        registry.register("watched_objects", "Objects in the controllers' caches", watched.clone());
        let notifications = Family::<NotificationLabels, Counter>::default();
        for r#type in crate::notify::TYPES {
            for result in crate::notify::RESULTS {
                let _ = notifications.get_or_create(&NotificationLabels { r#type, result });
            }
        }
        registry.register("notifications", "Anomaly reports given to notifiers, by result", notifications.clone());
        Self {
            registry,
            reconciles,
            errors,
            durations,
            baselines,
            leader,
            agent_pods,
            watched,
            notifications,
            baseline_store: Mutex::new(None),
            stores: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one reconcile of `controller` that took `took`, failed with `error` if any.
    pub fn observe(&self, controller: &'static str, took: Duration, error: Option<&crate::Error>) {
        self.reconciles.get_or_create(&ControllerLabels { controller }).inc();
        self.durations.get_or_create(&ControllerLabels { controller }).observe(took.as_secs_f64());
        if let Some(e) = error {
            self.errors.get_or_create(&ErrorLabels { controller, error: e.kind() }).inc();
        }
    }

    /// Where baselines are counted from when scraped.
    pub fn count_baselines_from(&self, store: Store<WorkflowBaseline>) {
        self.count_watched("WorkflowBaseline", store.clone());
        *self.baseline_store.lock().unwrap() = Some(store);
    }

    /// Counts the objects of `store` as watched objects of `kind` when scraped.
    pub fn count_watched<K>(&self, kind: &'static str, store: Store<K>)
    where
        K: kube::Resource + Clone + Send + Sync + 'static,
        K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
    {
        self.stores.lock().unwrap().push((kind, Box::new(move || store.state().len())));
    }

    /// Marks the operator ready (preflight passed).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        if let Some(store) = self.baseline_store.lock().unwrap().as_ref() {
            let mut counts = [0i64; 4];
            for b in store.state() {
                let i = match b.status.as_ref().and_then(|s| s.phase) {
                    Some(BaselinePhase::Learning) => 0,
                    Some(BaselinePhase::Monitoring) => 1,
                    Some(BaselinePhase::Frozen) => 2,
                    None => 3,
                };
                counts[i] += 1;
            }
            for (phase, n) in ["Learning", "Monitoring", "Frozen", "New"].into_iter().zip(counts) {
                self.baselines.get_or_create(&PhaseLabels { phase }).set(n);
            }
        }
        for (kind, count) in self.stores.lock().unwrap().iter() {
            self.watched.get_or_create(&KindLabels { kind }).set(count() as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl runwarden_crds::serve::Health for Metrics {
    fn metrics(&self) -> String {
        self.encode()
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) { Ok(()) } else { Err("preflight checks not passed yet".into()) }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    runwarden_crds::serve::serve(listener, metrics).await
}
