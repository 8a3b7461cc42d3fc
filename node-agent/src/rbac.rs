//! The agent's RBAC: the permissions its code uses and nothing more, as data. The same list
//! generates the manifests (`make generate` writes `node-agent/rbac.yaml`) and drives the
//! check at start.
//!
//! Kubernetes RBAC cannot narrow a pod list to one node; the agent asks only for its node's
//! pods (field selector `spec.nodeName`), and only their metadata.

use runwarden_crds::rbac::{Permission, Rbac};

/// The agent's ServiceAccount (the DaemonSet's `serviceAccountName`).
pub const NAME: &str = "runwarden-agent";

/// The agent's RBAC: reads cluster-wide (runner pods and baselines live in any namespace),
/// runners' jobs and writes in the runner namespaces (cluster-wide unless they are listed), and
/// Events about itself in its own namespace.
pub const RBAC: Rbac = Rbac {
    name: NAME,
    component: "agent",
    source: "node-agent/src/rbac.rs",
    cluster: &[
        Permission {
            group: "",
            resource: "pods",
            verbs: &["list", "watch"],
            why: "this node's runner pods (metadata only): which cgroups to monitor, their job",
        },
        Permission {
            group: "runwarden.dev",
            resource: "workflowbaselines",
            verbs: &["list", "watch"],
            why: "score calls against the job's baseline and the cluster's",
        },
        Permission {
            group: "",
            resource: "namespaces",
            verbs: &["list", "watch"],
            why: "which namespaces an administrator labelled runwarden.dev/self-declared-identities=true (metadata only)",
        },
        Permission {
            group: "runwarden.dev",
            resource: "egresspolicies",
            verbs: &["list", "watch"],
            why: "the minimum severity each runner's policy reports",
        },
    ],
    namespaced: &[Permission {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        why: "AgentTampered on the agent's own pod, beside the runner's",
    }],
    runner: &[
        Permission {
            group: "actions.github.com",
            resource: "ephemeralrunners",
            verbs: &["list", "watch"],
            why: "the job ARC gave each runner (status, which job code cannot write)",
        },
        Permission {
            group: "batch",
            resource: "jobs",
            verbs: &["list", "watch"],
            why: "which runner a container step's pod belongs to (Jobs labelled runner-pod, metadata only)",
        },
        Permission {
            group: "runwarden.dev",
            resource: "workflowbaselines/status",
            verbs: &["get", "update"],
            why: "merge finished runs (conflict-aware)",
        },
        Permission {
            group: "events.k8s.io",
            resource: "events",
            verbs: &["create", "patch"],
            why: "AnomalousEgress on the pod, its EphemeralRunner and the baseline; repeats in the series",
        },
        Permission {
            group: "runwarden.dev",
            resource: "workflowruns",
            verbs: &["create"],
            why: "the record of each merged run (every destination, anomalies first)",
        },
    ],
    listed: None,
    optional: None,
};
