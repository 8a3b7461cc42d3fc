//! runwarden's operator: tells runner pods which workflow job they run, creates each job's
//! `WorkflowBaseline`, and (in later parts) reconciles `EgressPolicy` and the node-agent
//! DaemonSet.
//!
//! - [`identity`]: a runner's job identity, its normalisation and the pod annotations.
//! - [`arc`]: the part of ARC's `EphemeralRunner` API runwarden reads.
//! - [`runners`]: the controllers that annotate runner pods and create baselines.
//! - [`baselines`]: creating a job's `WorkflowBaseline` exactly once.

pub mod arc;
pub mod baselines;
pub mod identity;
pub mod runners;

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

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether ARC's `EphemeralRunner` API is served by this cluster.
pub async fn arc_installed(client: &Client) -> bool {
    let gvk = GroupVersionKind::gvk("actions.github.com", "v1alpha1", "EphemeralRunner");
    let found: Result<(kube::discovery::ApiResource, ApiCapabilities), _> =
        kube::discovery::pinned_kind(client, &gvk).await;
    found.is_ok()
}

/// Runs every controller until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static) {
    let monitored = runners::run_monitored_pods(client.clone(), shutdown.clone());
    if arc_installed(&client).await {
        info!("watching ARC EphemeralRunners");
        futures::join!(runners::run_ephemeral_runners(client, shutdown), monitored);
    } else {
        warn!(
            "Actions Runner Controller is not installed (no actions.github.com/v1alpha1 EphemeralRunner); \
             only pods labelled runwarden.dev/monitor=true are attributed"
        );
        monitored.await;
    }
}
