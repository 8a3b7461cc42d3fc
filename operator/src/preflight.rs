//! Checks at start that the cluster has what the operator needs, so a missing CRD or a
//! missing permission is one clear log line and an exit code, not a crash loop of API errors.

use kube::Client;
use kube::core::GroupVersionKind;

/// What is missing.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// A runwarden CRD is not installed.
    #[error(
        "the {0} CRD (runwarden.dev/v1alpha1) is not installed; install the CRDs with `kubectl apply -f crds/` (or the Helm chart)"
    )]
    MissingCrd(&'static str),
    /// Permissions the operator's ServiceAccount lacks.
    #[error("the operator lacks permissions: {}; apply operator/rbac.yaml (or the Helm chart's RBAC)", .0.join(", "))]
    MissingPermissions(Vec<String>),
    /// The API server could not be asked.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl PreflightError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            PreflightError::MissingCrd(_) => 2,
            PreflightError::MissingPermissions(_) => 3,
            PreflightError::Kube(_) => 4,
        }
    }
}

/// Checks the CRDs and every permission in [`crate::rbac`] (`namespace` is the operator's own;
/// the runner permissions are checked in each of `runner_namespaces`, or cluster-wide).
pub async fn check(client: &Client, namespace: &str, runner_namespaces: &[String]) -> Result<(), PreflightError> {
    for kind in ["WorkflowBaseline", "EgressPolicy"] {
        let gvk = GroupVersionKind::gvk(runwarden_crds::GROUP, "v1alpha1", kind);
        if kube::discovery::pinned_kind(client, &gvk).await.is_err() {
            return Err(PreflightError::MissingCrd(kind));
        }
    }
    let missing = crate::rbac::RBAC.missing(client, namespace, runner_namespaces).await?;
    if missing.is_empty() { Ok(()) } else { Err(PreflightError::MissingPermissions(missing)) }
}
