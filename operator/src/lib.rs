//! runwarden's operator: tells runner pods which workflow job they run, creates each job's
//! `WorkflowBaseline`, and (in later parts) reconciles `EgressPolicy` and the node-agent
//! DaemonSet.
//!
//! - [`identity`]: a runner's job identity, its normalisation and the pod annotations.
//! - [`arc`]: the part of ARC's `EphemeralRunner` API runwarden reads.
//! - [`runners`]: the controllers that annotate runner pods and create baselines.
//! - [`baselines`]: creating a job's `WorkflowBaseline` exactly once.
//! - [`cli`]: `kubectl runwarden`: a baseline as an `EgressPolicy` for Git, a policy's diff, approvals.
//! - [`daemonset`]: the node-agent DaemonSet, applied and kept as configured.
//! - [`lifecycle`]: each `WorkflowBaseline`'s phase, approvals, expiry and conditions.
//! - [`policy`]: `EgressPolicy` validation beyond the schema, overlaps, matched runners.
//! - [`leader`]: leader election on a Lease, so one replica of several reconciles.
//! - [`notify`]: anomaly reports to the policies' webhook and Slack notifiers.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`rbac`]: the permissions the operator uses, as data; [`preflight`] checks them at start.

pub use runwarden_crds::arc;
pub use runwarden_crds::identity;
pub mod baselines;
pub mod cli;
pub mod daemonset;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod preflight;
pub mod rbac;
pub mod runners;
pub mod ui;

use std::sync::Arc;

use kube::Client;
use kube::core::GroupVersionKind;
use kube::discovery::ApiCapabilities;
use tracing::{info, warn};

/// Field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "runwarden-operator";

/// What can go wrong while reconciling; the variant names label failure metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Two identities hash to one baseline name (practically never; reported, not overwritten).
    #[error("WorkflowBaseline {name} already exists for another job than {identity:?}")]
    NameCollision {
        /// The contested name.
        name: String,
        /// The identity that lost.
        identity: Box<identity::JobIdentity>,
    },
}

impl Error {
    /// Every value [`Error::kind`] returns.
    pub const KINDS: [&'static str; 6] =
        ["conflict", "forbidden", "not_found", "api_error", "api_unreachable", "name_collision"];

    /// The error's kind, as the `error` label of failure metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "api_unreachable",
            Error::NameCollision { .. } => "name_collision",
        }
    }
}

/// Records an Event (`events.k8s.io/v1`) about `object`; a failure is logged, not returned:
/// an Event that cannot be written must not fail the reconcile that caused it.
pub(crate) async fn record_event<K: kube::Resource<DynamicType = ()>>(
    recorder: &kube::runtime::events::Recorder,
    object: &K,
    type_: kube::runtime::events::EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        warn!(reason, error = %e, "could not record an Event");
    }
}

/// The namespaces the operator handles: every one, or only the runner namespaces its RBAC is
/// narrowed to (`runnerNamespaces`). Objects elsewhere are left alone: the operator could not
/// write them, and retrying would only log forbidden errors.
#[derive(Clone, Debug, Default)]
pub struct Scope(Arc<Vec<String>>);

impl Scope {
    /// Every namespace when `runner_namespaces` is empty, else only those.
    pub fn new(runner_namespaces: Vec<String>) -> Self {
        Self(Arc::new(runner_namespaces))
    }

    /// Whether objects in `namespace` are the operator's to handle.
    pub fn handles(&self, namespace: Option<&str>) -> bool {
        self.0.is_empty() || namespace.is_some_and(|ns| self.0.iter().any(|n| n == ns))
    }
}

/// Reconciles run at once per controller. Unbounded, a start with thousands of objects holds
/// thousands of requests in flight and the memory they need stays with the process.
pub const RECONCILE_CONCURRENCY: u16 = 8;

/// The configuration every controller runs with.
pub(crate) fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY)
}

/// Runs `reconcile` and records it in the metrics of `controller`.
pub(crate) async fn instrumented<T>(
    metrics: &metrics::Metrics,
    controller: &'static str,
    reconcile: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = std::time::Instant::now();
    let result = reconcile.await;
    metrics.observe(controller, started.elapsed(), result.as_ref().err());
    result
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether ARC's `EphemeralRunner` API is served by this cluster.
pub async fn arc_installed(client: &Client) -> bool {
    let gvk = GroupVersionKind::gvk("actions.github.com", "v1alpha1", "EphemeralRunner");
    let found: Result<(kube::discovery::ApiResource, ApiCapabilities), _> =
        kube::discovery::pinned_kind(client, &gvk).await;
    found.is_ok()
}

/// The operator's configuration file (`--config`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// Whether the operator deploys the node agent (the Helm chart may do it instead).
    pub manage_agent: bool,
    /// How the node agent is deployed.
    pub agent: daemonset::AgentConfig,
    /// The namespaces that hold runners, when the operator's and the agent's write permissions
    /// (and Secret reads) are granted only there; empty: cluster-wide. Runners, baselines and
    /// policies elsewhere are then not handled.
    pub runner_namespaces: Vec<String>,
    /// How many `WorkflowRun` records each baseline keeps (the newest); default
    /// [`lifecycle::RUN_HISTORY`].
    pub run_history: Option<usize>,
    /// Where the run pages are served (a loopback address, reached with `kubectl
    /// port-forward`; see [`ui`]); `None`: not served.
    pub ui_address: Option<std::net::SocketAddr>,
    /// Every request to the run pages needs a bearer token, and sees only the namespaces where
    /// its user may get baselines (for an Ingress; see [`ui`]).
    pub ui_token_auth: bool,
    /// Where users reach the run pages (`https://host[/prefix]`: an Ingress, or the address
    /// they port-forward to): Events and notifier messages link to each run's page there.
    pub ui_url: Option<String>,
}

/// Runs every controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let agent = async {
        if config.manage_agent {
            daemonset::run(client.clone(), config.agent.clone(), metrics.clone(), shutdown.clone()).await;
        }
    };
    let scope = Scope::new(config.runner_namespaces.clone());
    let arc = arc_installed(&client).await;
    let monitored = runners::run_monitored_pods(client.clone(), metrics.clone(), scope.clone(), shutdown.clone());
    let run_history = config.run_history.unwrap_or(lifecycle::RUN_HISTORY);
    let lifecycle = lifecycle::run(client.clone(), metrics.clone(), scope.clone(), run_history, shutdown.clone());
    let policies =
        policy::run(client.clone(), metrics.clone(), scope.clone(), arc, config.agent.block_mode, shutdown.clone());
    let notifiers =
        notify::run(client.clone(), metrics.clone(), scope.clone(), config.ui_url.clone(), shutdown.clone());
    let runners = async {
        if arc {
            info!("watching ARC EphemeralRunners");
            runners::run_ephemeral_runners(client.clone(), metrics.clone(), scope.clone(), shutdown.clone()).await;
        } else {
            warn!(
                "Actions Runner Controller is not installed (no actions.github.com/v1alpha1 EphemeralRunner); \
                 only pods labelled runwarden.dev/monitor=true are attributed"
            );
        }
    };
    futures::join!(agent, monitored, lifecycle, policies, notifiers, runners);
}

/// Why a leader-elected operator stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved; the Lease was released.
    Shutdown,
    /// Another replica took the Lease (or it could not be renewed): this replica must exit.
    LostLease,
}

/// Waits to lead (Lease `runwarden-operator` in `namespace`), then runs every controller until
/// `shutdown` resolves or leadership is lost.
pub async fn run_elected(
    client: Client,
    config: Config,
    metrics: Arc<metrics::Metrics>,
    namespace: &str,
    identity: &str,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) -> Result<Stopped> {
    let elector = leader::Elector::new(client.clone(), namespace, "runwarden-operator", identity);
    tokio::select! {
        acquired = elector.acquire() => acquired?,
        _ = shutdown.clone() => return Ok(Stopped::Shutdown),
    }
    metrics.leader.set(1);
    let stopped = tokio::select! {
        _ = run(client, config, metrics.clone(), shutdown) => {
            elector.release().await;
            Stopped::Shutdown
        }
        _ = elector.keep() => Stopped::LostLease,
    };
    metrics.leader.set(0);
    Ok(stopped)
}
