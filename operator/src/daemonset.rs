//! The node-agent DaemonSet: built from the operator's configuration, applied with server-side
//! apply (field manager `runwarden-operator`), and re-applied whenever someone changes it, so
//! edits to fields the operator owns (image, security context, volumes, ...) are undone.
//!
//! Privileges are the least the agent needs, named: `BPF` (load programs and maps), `PERFMON`
//! (ring buffers and BTF-based tracing), `NET_ADMIN` (attach `cgroup_skb` and `cgroup/connect`
//! programs and, in Block mode, refuse connections). Not privileged, no host network, no host
//! PID, read-only root filesystem, every other capability dropped. It runs as root because
//! Kubernetes grants added capabilities only to root containers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::metrics::{AgentLabels, Metrics};
use crate::{FIELD_MANAGER, Result};

/// Name of the DaemonSet and of its ServiceAccount.
pub const NAME: &str = "runwarden-agent";
/// Where the host's cgroup v2 mount appears in the agent's container.
const CGROUP_MOUNT: &str = "/host/cgroup";
/// Where the node-local state directory appears in the agent's container.
const STATE_MOUNT: &str = "/var/lib/runwarden";
/// Label selecting the agent's pods.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// How the operator deploys the node agent (from its configuration file or flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentConfig {
    /// Namespace of the DaemonSet (the operator's own).
    pub namespace: String,
    /// Agent image.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// Nodes to run on (runner nodes); empty: all.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations, as Kubernetes objects.
    pub tolerations: Vec<Value>,
    /// Resource requests and limits, as a Kubernetes `ResourceRequirements` object.
    pub resources: Value,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// The host's cgroup v2 mount (`/sys/fs/cgroup` on most nodes).
    pub cgroup_root: String,
    /// Port of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_port: u16,
    /// Node-local directory for the agent's state (unflushed runs survive restarts there).
    pub state_dir: String,
    /// Priority class, e.g. `system-node-critical`.
    pub priority_class_name: Option<String>,
    /// Name of the operator's Deployment in `namespace`: it becomes the DaemonSet's owner, so
    /// uninstalling the operator removes the agent too.
    pub owner_deployment: Option<String>,
    /// The owner reference itself (resolved from `ownerDeployment` at start when absent).
    pub owner: Option<OwnerReference>,
    /// The runner namespaces the agent's write permissions are limited to (the operator's
    /// `runnerNamespaces`; empty: cluster-wide).
    pub runner_namespaces: Vec<String>,
    /// DNS resolvers whose answers name destinations (empty: the agent pod's resolv.conf's).
    pub trusted_resolvers: Vec<String>,
    /// Block mode (experimental): the agents hold runner pods an `EgressPolicy` in `Block` mode
    /// covers to what it allows; their DNS goes to the agent's resolver on [`RESOLVER_PORT`].
    pub block_mode: bool,
    /// Where users reach the run pages (the operator's `uiUrl`): the agents' Events link to
    /// each run's page there.
    pub ui_url: Option<String>,
}

/// The port of the agent's resolver for block-mode pods (UDP and TCP).
pub const RESOLVER_PORT: u16 = 10053;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            namespace: "runwarden-system".into(),
            image: "ghcr.io/runwarden/runwarden-agent:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            resources: json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}),
            log_level: "info".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            metrics_port: 9090,
            state_dir: "/var/lib/runwarden".into(),
            priority_class_name: None,
            owner_deployment: None,
            owner: None,
            runner_namespaces: Vec::new(),
            trusted_resolvers: Vec::new(),
            block_mode: false,
            ui_url: None,
        }
    }
}

/// The agent's command line.
fn args(config: &AgentConfig) -> Vec<String> {
    let mut args = vec![
        format!("--cgroup-root={CGROUP_MOUNT}"),
        format!("--metrics-port={}", config.metrics_port),
        format!("--state-dir={STATE_MOUNT}"),
    ];
    for (flag, list) in
        [("runner-namespaces", &config.runner_namespaces), ("trusted-resolvers", &config.trusted_resolvers)]
    {
        if !list.is_empty() {
            args.push(format!("--{flag}={}", list.join(",")));
        }
    }
    if let Some(url) = &config.ui_url {
        args.push(format!("--ui-url={url}"));
    }
    if config.block_mode {
        args.push("--block-mode".into());
        args.push(format!("--resolver-port={RESOLVER_PORT}"));
    }
    args
}

/// The DaemonSet the operator wants, as the server-side-apply body.
pub fn desired(config: &AgentConfig) -> Value {
    let labels = json!({
        "app.kubernetes.io/name": "runwarden",
        COMPONENT_LABEL: "agent",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
    });
    let selector = json!({"app.kubernetes.io/name": "runwarden", COMPONENT_LABEL: "agent"});
    let port = config.metrics_port;
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10});
    let mut pod_spec = json!({
        "serviceAccountName": NAME,
        "automountServiceAccountToken": true,
        "hostNetwork": false,
        "hostPID": false,
        "dnsPolicy": "ClusterFirst",
        "nodeSelector": config.node_selector,
        "tolerations": config.tolerations,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "agent",
            "image": config.image,
            "imagePullPolicy": config.image_pull_policy,
            "args": args(config),
            "env": [
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "POD_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
                {"name": "RUNWARDEN_LOG", "value": config.log_level},
            ],
            "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
            "livenessProbe": probe("/healthz"),
            "readinessProbe": probe("/readyz"),
            "resources": config.resources,
            "securityContext": {
                "privileged": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsUser": 0,
                "runAsNonRoot": false,
                "capabilities": {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]},
            },
            "volumeMounts": [
                {"name": "cgroup", "mountPath": CGROUP_MOUNT, "readOnly": true},
                {"name": "state", "mountPath": STATE_MOUNT},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "cgroup", "hostPath": {"path": config.cgroup_root, "type": "Directory"}},
            {"name": "state", "hostPath": {"path": config.state_dir, "type": "DirectoryOrCreate"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        ],
    });
    if config.block_mode {
        let ports = pod_spec["containers"][0]["ports"].as_array_mut().expect("ports are a list");
        for protocol in ["UDP", "TCP"] {
            ports.push(json!({"name": format!("dns-{}", protocol.to_lowercase()), "containerPort": RESOLVER_PORT, "protocol": protocol}));
        }
        // Block mode's state and its pods' links are pinned on the node's BPF filesystem, so
        // they outlive an agent restart.
        pod_spec["containers"][0]["volumeMounts"]
            .as_array_mut()
            .expect("mounts are a list")
            .push(json!({"name": "bpffs", "mountPath": "/sys/fs/bpf"}));
        pod_spec["volumes"]
            .as_array_mut()
            .expect("volumes are a list")
            .push(json!({"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}}));
    }
    if let Some(pc) = &config.priority_class_name {
        pod_spec["priorityClassName"] = json!(pc);
    }
    let mut metadata = json!({"name": NAME, "namespace": config.namespace, "labels": labels});
    if let Some(owner) = &config.owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    })
}

/// Resolves `ownerDeployment` into an owner reference (once, at start).
pub async fn resolve_owner(client: &Client, config: &mut AgentConfig) -> Result<()> {
    if config.owner.is_some() {
        return Ok(());
    }
    if let Some(name) = &config.owner_deployment {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &config.namespace);
        let d = deployments.get(name).await?;
        config.owner = d.controller_owner_ref(&()).map(|mut o| {
            o.controller = Some(false);
            o
        });
    }
    Ok(())
}

/// Applies the desired DaemonSet.
pub async fn apply(client: &Client, config: &AgentConfig) -> Result<DaemonSet> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &config.namespace);
    let ds = api.patch(NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(desired(config))).await?;
    Ok(ds)
}

/// Keeps the DaemonSet as configured until `shutdown` completes: applies it at start, whenever
/// it changes or is deleted, and every five minutes.
pub async fn run(
    client: Client,
    mut config: AgentConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    if let Err(e) = resolve_owner(&client, &mut config).await {
        warn!(deployment = ?config.owner_deployment, error = %e, "could not read the operator's Deployment; the DaemonSet gets no owner");
    }
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &config.namespace);
    let events = watcher(api, watcher::Config::default().fields(&format!("metadata.name={NAME}"))).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut every = tokio::time::interval(Duration::from_secs(300));
    loop {
        let why = tokio::select! {
            _ = &mut shutdown => return,
            _ = every.tick() => "periodic",
            event = events.next() => match event {
                // Our own apply comes back as a change; applying again is a no-op.
                Some(Ok(watcher::Event::Apply(ds) | watcher::Event::InitApply(ds))) => {
                    record_pods(&metrics, &ds);
                    "changed"
                }
                Some(Ok(watcher::Event::InitDone)) => "listed",
                Some(Ok(watcher::Event::Delete(_))) => "deleted",
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the node-agent DaemonSet failed; retrying");
                    continue;
                }
                None => return,
            },
        };
        match apply(&client, &config).await {
            Ok(_) => debug!(reason = why, "node-agent DaemonSet applied"),
            Err(e) => {
                warn!(error = %e, "could not apply the node-agent DaemonSet; retrying in 10s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Reflects the DaemonSet's pod counts in the metrics.
fn record_pods(metrics: &Metrics, ds: &DaemonSet) {
    if let Some(s) = &ds.status {
        for (state, n) in [
            ("desired", s.desired_number_scheduled),
            ("ready", s.number_ready),
            ("available", s.number_available.unwrap_or(0)),
        ] {
            metrics.agent_pods.get_or_create(&AgentLabels { state }).set(i64::from(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_gets_named_capabilities_and_no_host_namespaces() {
        let ds = desired(&AgentConfig::default());
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], false);
        assert_eq!(pod["hostPID"], false);
        let sc = &pod["containers"][0]["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["capabilities"]["add"], json!(["BPF", "PERFMON", "NET_ADMIN"]));
    }

    #[test]
    fn configuration_reaches_the_pod() {
        let config = AgentConfig {
            image: "registry.example/agent:1.2.3".into(),
            cgroup_root: "/sys/fs/cgroup/unified".into(),
            node_selector: [("runner".to_string(), "true".to_string())].into(),
            tolerations: vec![json!({"key": "runners", "operator": "Exists", "effect": "NoSchedule"})],
            metrics_port: 9464,
            priority_class_name: Some("system-node-critical".into()),
            ..AgentConfig::default()
        };
        let ds = desired(&config);
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["image"], "registry.example/agent:1.2.3");
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/sys/fs/cgroup/unified");
        assert_eq!(pod["nodeSelector"]["runner"], "true");
        assert_eq!(pod["tolerations"][0]["key"], "runners");
        assert_eq!(pod["containers"][0]["ports"][0]["containerPort"], 9464);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(pod["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    }
}
