//! The operator's RBAC: the permissions its code uses and nothing more, as data. The same list
//! generates the manifests (`make generate` writes `operator/rbac.yaml`) and drives the
//! preflight check at start, so they cannot drift apart.

pub use runwarden_crds::rbac::{Permission, Rbac};
use serde_json::Value;

/// The operator's ServiceAccount (and ClusterRole, Role and bindings).
pub const NAME: &str = "runwarden-operator";

/// The operator's RBAC.
pub const RBAC: Rbac = Rbac {
    name: NAME,
    component: "operator",
    source: "operator/src/rbac.rs",
    cluster: CLUSTER,
    namespaced: NAMESPACED,
};

/// Cluster-wide permissions (runners, pods and baselines live in any namespace).
pub const CLUSTER: &[Permission] = &[
    Permission {
        group: "runwarden.dev",
        resource: "workflowbaselines",
        verbs: &["get", "list", "watch", "create"],
        why: "create one baseline per job; watch all for their lifecycle",
    },
    Permission {
        group: "runwarden.dev",
        resource: "workflowbaselines/status",
        verbs: &["get", "update"],
        why: "conflict-aware status writes",
    },
    Permission {
        group: "runwarden.dev",
        resource: "egresspolicies",
        verbs: &["get", "list", "watch"],
        why: "validate policies",
    },
    Permission {
        group: "runwarden.dev",
        resource: "egresspolicies/status",
        verbs: &["patch"],
        why: "report Ready and matched runners",
    },
    Permission {
        group: "actions.github.com",
        resource: "ephemeralrunners",
        verbs: &["get", "list", "watch"],
        why: "read which job a runner was given",
    },
    Permission {
        group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "patch"],
        why: "annotate runner pods with their job; count matched runners",
    },
    Permission {
        group: "",
        resource: "secrets",
        verbs: &["get"],
        why: "check that notifier Secrets exist and read them when sending (by name only; never listed)",
    },
    Permission {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "BaselineSettled, PolicyInvalid; read the agents' AnomalousEgress Events for the notifiers and mark them sent",
    },
];

/// Permissions in the operator's own namespace.
pub const NAMESPACED: &[Permission] = &[
    Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        why: "leader election",
    },
    Permission {
        group: "apps",
        resource: "daemonsets",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "deploy and keep the node agent",
    },
    Permission {
        group: "apps",
        resource: "deployments",
        verbs: &["get"],
        why: "make the operator's own Deployment the node agent DaemonSet's owner",
    },
];

/// ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding for an operator in
/// `namespace`.
pub fn manifests(namespace: &str) -> Vec<Value> {
    RBAC.manifests(namespace)
}

/// The manifests as one YAML document stream, with each permission's reason as a comment.
pub fn yaml(namespace: &str) -> String {
    RBAC.yaml(namespace)
}
