//! Checks at start that the cluster has what the operator needs, so a missing CRD or a
//! missing permission is one clear log line and an exit code, not a crash loop of API errors.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::core::GroupVersionKind;
use kube::{Api, Client};

use crate::rbac::{CLUSTER, NAMESPACED, Permission};

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

/// Checks the CRDs and every permission in [`crate::rbac`] (`namespace` is the operator's own).
pub async fn check(client: &Client, namespace: &str) -> Result<(), PreflightError> {
    for kind in ["WorkflowBaseline", "EgressPolicy"] {
        let gvk = GroupVersionKind::gvk(runwarden_crds::GROUP, "v1alpha1", kind);
        if kube::discovery::pinned_kind(client, &gvk).await.is_err() {
            return Err(PreflightError::MissingCrd(kind));
        }
    }
    let mut missing = Vec::new();
    let checks = CLUSTER.iter().map(|p| (p, None)).chain(NAMESPACED.iter().map(|p| (p, Some(namespace))));
    for (p, ns) in checks {
        for verb in p.verbs {
            if !allowed(client, p, verb, ns).await? {
                let group = if p.group.is_empty() { "core" } else { p.group };
                let scope = ns.map(|n| format!(" in {n}")).unwrap_or_default();
                missing.push(format!("{verb} {group}/{}{scope}", p.resource));
            }
        }
    }
    if missing.is_empty() { Ok(()) } else { Err(PreflightError::MissingPermissions(missing)) }
}

async fn allowed(client: &Client, p: &Permission, verb: &str, namespace: Option<&str>) -> Result<bool, kube::Error> {
    let (resource, subresource) = match p.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (p.resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(p.group.to_string()),
                resource: Some(resource.to_string()),
                subresource,
                verb: Some(verb.to_string()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
