//! The operator's RBAC: the permissions its code uses and nothing more, as data. The same list
//! generates the manifests (`make generate` writes `operator/rbac.yaml`) and drives the
//! preflight check at start, so they cannot drift apart.

use serde_json::{Value, json};

/// The operator's ServiceAccount (and ClusterRole, Role and bindings).
pub const NAME: &str = "runwarden-operator";

/// One permission: API group, resource (with `/subresource`), verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// API group (`""` for core).
    pub group: &'static str,
    /// Resource, or `resource/subresource`.
    pub resource: &'static str,
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Why the operator needs it (written into the manifest).
    pub why: &'static str,
}

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
        why: "check that notifier Secrets exist (by name only; never listed)",
    },
    Permission {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "BaselineSettled, PolicyInvalid",
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
];

fn rules(perms: &[Permission]) -> Vec<Value> {
    perms.iter().map(|p| json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": p.verbs})).collect()
}

/// ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding for an operator in
/// `namespace`.
pub fn manifests(namespace: &str) -> Vec<Value> {
    let labels = json!({"app.kubernetes.io/name": "runwarden", "app.kubernetes.io/component": "operator"});
    let subject = json!([{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]);
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": NAME, "namespace": namespace, "labels": labels}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": NAME, "labels": labels}, "rules": rules(CLUSTER)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": NAME, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
               "subjects": subject}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": NAME, "namespace": namespace, "labels": labels}, "rules": rules(NAMESPACED)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
               "subjects": subject}),
    ]
}

/// The manifests as one YAML document stream, with each permission's reason as a comment.
pub fn yaml(namespace: &str) -> String {
    let mut out = String::from(
        "# Generated from operator/src/rbac.rs by `make generate`. Do not edit.\n# Why each permission:\n",
    );
    for p in CLUSTER.iter().chain(NAMESPACED) {
        let group = if p.group.is_empty() { "core" } else { p.group };
        out.push_str(&format!("#   {group} {} [{}]: {}\n", p.resource, p.verbs.join(", "), p.why));
    }
    for m in manifests(namespace) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&m).expect("manifests serialize"));
    }
    out
}
