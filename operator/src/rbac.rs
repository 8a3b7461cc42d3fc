//! The operator's RBAC: the permissions its code uses and nothing more, as data. The same list
//! generates the manifests (`make generate` writes `operator/rbac.yaml`) and drives the
//! preflight check at start, so they cannot drift apart.

pub use runwarden_crds::rbac::{Grant, Listed, Optional, Permission, Rbac};
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
    runner: RUNNER,
    listed: Some(NOTIFIER_SECRETS),
    optional: Some(TOKEN_REVIEWS),
};

/// The run pages behind an Ingress (`operator.ui.tokenAuth`): who a request's bearer token is,
/// and what that user may see. Granted and checked only then.
pub const TOKEN_REVIEWS: Optional = Optional {
    permissions: &[
        Permission {
            group: "authentication.k8s.io",
            resource: "tokenreviews",
            verbs: &["create"],
            why: "run pages behind an Ingress (operator.ui.tokenAuth): who a request's bearer token is",
        },
        Permission {
            group: "authorization.k8s.io",
            resource: "subjectaccessreviews",
            verbs: &["create"],
            why: "run pages behind an Ingress: whether that user may get a namespace's baselines",
        },
    ],
    condition: "and .Values.operator.ui.enabled .Values.operator.ui.tokenAuth",
    suffix: "token-reviews",
};

/// The notifier Secrets: readable only where an administrator lists them (chart value
/// `notifierSecrets`), by name; never listed or watched, never cluster-wide. ARC's GitHub App
/// key and every other Secret of the cluster stay out of the operator's reach.
pub const NOTIFIER_SECRETS: Listed = Listed {
    permission: Permission {
        group: "",
        resource: "secrets",
        verbs: &["get"],
        why: "check that notifier Secrets exist and read them when sending",
    },
    value: "notifierSecrets",
    suffix: "notifier-secrets",
};

/// Cluster-wide permissions: reads (runners, pods and baselines live in any namespace).
pub const CLUSTER: &[Permission] = &[
    Permission {
        group: "runwarden.dev",
        resource: "workflowbaselines",
        verbs: &["get", "list", "watch"],
        why: "watch all baselines for their lifecycle",
    },
    Permission {
        group: "runwarden.dev",
        resource: "egresspolicies",
        verbs: &["get", "list", "watch"],
        why: "validate policies",
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
        verbs: &["get", "list", "watch"],
        why: "find runner pods; count matched runners",
    },
    Permission {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["list", "watch"],
        why: "read the agents' AnomalousEgress Events for the notifiers",
    },
    Permission {
        group: "",
        resource: "namespaces",
        verbs: &["get"],
        why: "whether a namespace lets its pods declare their own job (label runwarden.dev/self-declared-identities)",
    },
    Permission {
        group: "runwarden.dev",
        resource: "workflowruns",
        verbs: &["get", "list", "watch"],
        why: "each baseline's run records (metadata only), to keep the newest; a record for its run page",
    },
];

/// Permissions in the namespaces that hold runners (cluster-wide unless they are listed): what
/// the operator writes there.
pub const RUNNER: &[Permission] = &[
    Permission {
        group: "runwarden.dev",
        resource: "workflowbaselines",
        verbs: &["create"],
        why: "create one baseline per job",
    },
    Permission {
        group: "runwarden.dev",
        resource: "workflowbaselines/status",
        verbs: &["get", "update"],
        why: "conflict-aware status writes",
    },
    Permission {
        group: "runwarden.dev",
        resource: "workflowruns",
        verbs: &["delete"],
        why: "delete each baseline's run records past the newest (operator.runHistory)",
    },
    Permission {
        group: "runwarden.dev",
        resource: "egresspolicies/status",
        verbs: &["patch"],
        why: "report Ready, matched runners and the notifiers' deliveries",
    },
    Permission {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "BaselineSettled, PolicyInvalid; mark AnomalousEgress Events notified",
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
/// `namespace`, with the runner permissions cluster-wide.
pub fn manifests(namespace: &str) -> Vec<Value> {
    RBAC.manifests(namespace)
}

/// As [`manifests`], with the runner permissions only in `runner_namespaces` (when not empty).
pub fn manifests_for(namespace: &str, runner_namespaces: &[String]) -> Vec<Value> {
    RBAC.manifests_for(namespace, runner_namespaces)
}

/// What to say when the operator may not read Secret `ns`/`name` (it is not listed).
pub fn secret_not_readable(ns: &str, name: &str) -> String {
    format!(
        "the operator may not read Secret {ns}/{name}: list it in the Helm value notifierSecrets \
         ({{namespace: {ns}, names: [{name}]}}) and upgrade the release"
    )
}

/// Whether `e` is the API server refusing a request for lack of permission.
pub fn forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// The Role and RoleBinding that let the operator in `namespace` read the notifier Secrets
/// `grants` name.
pub fn notifier_secrets(namespace: &str, grants: &[Grant]) -> Vec<Value> {
    RBAC.listed_manifests(namespace, grants)
}

/// The manifests as one YAML document stream, with each permission's reason as a comment.
pub fn yaml(namespace: &str) -> String {
    RBAC.yaml(namespace)
}
