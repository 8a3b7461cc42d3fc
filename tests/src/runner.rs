//! Simulated ARC runners on the test node: real pods with ARC's labels, owned by an
//! `EphemeralRunner` whose status is filled in as ARC's listener and runner controller would.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use runwarden_crds::identity::SCALE_SET_LABEL;
use serde_json::json;

use crate::Node;
use crate::install::{SYSTEM, kubectl};
use crate::node::NODE_NAME;

/// `http://HOST:PORT/` for the hosts tests serve: port 443 for `*.github.test` and
/// `*.packages.test` (a job's usual hosts), 8080 for anything else.
pub fn url(host: &str) -> String {
    format!("http://{host}:{}/", port(host))
}

/// The port tests serve `host` on (see [`url`]).
pub fn port(host: &str) -> u16 {
    if host.ends_with(".github.test") || host.ends_with(".packages.test") { 443 } else { 8080 }
}

fn ephemeral_runners(client: &Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "actions.github.com".into(),
        version: "v1alpha1".into(),
        api_version: "actions.github.com/v1alpha1".into(),
        kind: "EphemeralRunner".into(),
        plural: "ephemeralrunners".into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// A workflow job (`acme/<repo>` `ci.yml` `build`) whose runners are in a namespace of its own.
#[derive(Clone)]
pub struct Job {
    /// The namespace of its runners and baseline.
    pub ns: String,
    /// `acme/<repo>`.
    pub repo: String,
    /// The git ref its runs' workflow comes from (`refs/heads/main`).
    pub git_ref: String,
}

/// Creates namespace `ns` and waits up to `within` for the controller-manager to make its
/// `default` ServiceAccount (pods are refused until then).
async fn namespace_with_account(node: &Node, ns: &str, within: Duration) {
    kubectl(node, &["create", "namespace", ns]);
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(node.client().await, ns);
    let started = Instant::now();
    while accounts.get_opt("default").await.unwrap().is_none() {
        assert!(started.elapsed() < within, "no default ServiceAccount in {ns} after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the controller-manager works again after the API server was down: its watches
/// come back with client-go's backoff (up to 30 s each), and until then a new namespace gets
/// no ServiceAccount. A test that stops the API server calls this before others go on.
pub async fn wait_controllers(node: &Node) {
    let started = Instant::now();
    namespace_with_account(node, "controllers-probe", Duration::from_secs(180)).await;
    kubectl(node, &["delete", "namespace", "controllers-probe", "--wait=false"]);
    eprintln!("the controller-manager works again after {:.1}s", started.elapsed().as_secs_f64());
}

impl Job {
    /// Job `acme/<repo>`, with a namespace `arc-<repo>` of its own.
    pub async fn new(node: &Node, repo: &str) -> Job {
        let ns = format!("arc-{repo}");
        namespace_with_account(node, &ns, Duration::from_secs(30)).await;
        Job { ns, repo: format!("acme/{repo}"), git_ref: "refs/heads/main".into() }
    }

    /// The same job, its runs from `git_ref` (`refs/pull/7/merge` for a pull request).
    pub fn from_ref(&self, git_ref: &str) -> Job {
        Job { git_ref: git_ref.into(), ..self.clone() }
    }

    /// Starts run `run_id` as ARC does: an EphemeralRunner given the job (its status filled in as
    /// ARC's listener and runner controller would), and its pod: an init container whose first
    /// instruction calls `init_host`, then the runner container running `script`.
    pub async fn start(&self, node: &Node, run_id: i64, init_host: &str, script: &str) -> String {
        self.start_with(node, run_id, init_host, script, true).await
    }

    /// As [`Job::start`]; with `assign_job` false the runner is never given its job (its
    /// `EphemeralRunner` status stays empty, as when the pod ends before ARC assigns one).
    pub async fn start_with(
        &self,
        node: &Node,
        run_id: i64,
        init_host: &str,
        script: &str,
        assign_job: bool,
    ) -> String {
        let client = node.client().await;
        let name = format!("arc-runner-set-{run_id}");
        let runners = ephemeral_runners(&client, &self.ns);
        let runner: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunner",
            "metadata": {"name": name, "labels": {SCALE_SET_LABEL: "arc-runner-set"}},
            "spec": {"githubConfigUrl": "https://github.com/acme", "githubConfigSecret": "github-app", "runnerScaleSetId": 1,
                     "metadata": {}, "spec": {"containers": [{"name": "runner", "image": "runner"}]}}
        }))
        .unwrap();
        let runner = runners.create(&PostParams::default(), &runner).await.unwrap();
        let status = json!({"status": {
            "phase": "Running", "ready": true, "runnerName": name, "jobRequestId": run_id * 10,
            "jobRepositoryName": self.repo, "jobWorkflowRef": format!("{}/.github/workflows/ci.yml@{}", self.repo, self.git_ref),
            "workflowRunId": run_id, "jobDisplayName": "build"
        }});
        if assign_job {
            runners.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        }

        let busybox = "localhost/runwarden/test-busybox:1";
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {SCALE_SET_LABEL: "arc-runner-set", "actions-ephemeral-runner": "True"}},
            "spec": {
                "nodeName": NODE_NAME,
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "terminationGracePeriodSeconds": 1,
                "initContainers": [{"name": "init", "image": busybox, "imagePullPolicy": "Never",
                                    "command": ["wget", "-q", "-O", "/dev/null", url(init_host)]}],
                "containers": [{"name": "runner", "image": busybox, "imagePullPolicy": "Never",
                                "command": ["sh", "-c", script]}]
            }
        }))
        .unwrap();
        pod.metadata.owner_references = Some(vec![owner_ref(&runner)]);
        Api::<Pod>::namespaced(client, &self.ns).create(&PostParams::default(), &pod).await.unwrap();
        name
    }

    /// A client acting as runner pod `name` with its ServiceAccount's token bound to it, as the
    /// job's code (and ARC's container hooks) in it would; the namespace's runners get ARC's
    /// container-mode Role (pods and batch Jobs: get, list, create, delete).
    pub async fn as_runner(&self, node: &Node, name: &str) -> Client {
        let role = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "arc-runner", "namespace": self.ns},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "create", "delete"]},
                       {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "create", "delete"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "arc-runner", "namespace": self.ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "arc-runner"},
             "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": self.ns}]}
        ]});
        crate::install::kubectl_stdin(node, &["apply", "-f", "-"], &role.to_string());
        let pod = Api::<Pod>::namespaced(node.client().await, &self.ns).get(name).await.unwrap();
        crate::cluster::pod_client(node.control_plane.config().await.unwrap(), &self.ns, &pod).await
    }

    /// Waits for the runner pod's phase `want`.
    pub async fn wait_phase(&self, node: &Node, name: &str, want: &str) {
        let pods: Api<Pod> = Api::namespaced(node.client().await, &self.ns);
        let started = Instant::now();
        loop {
            let phase = pods.get(name).await.unwrap().status.and_then(|s| s.phase).unwrap_or_default();
            if phase == want {
                return;
            }
            assert!(phase != "Failed", "runner pod {name} failed:\n{}", self.logs(node, name));
            assert!(started.elapsed() < Duration::from_secs(60), "runner pod {name} still {phase} after 60s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The job is done: ARC deletes the runner's pod and the EphemeralRunner.
    pub async fn finish(&self, node: &Node, name: &str) {
        let client = node.client().await;
        Api::<Pod>::namespaced(client.clone(), &self.ns).delete(name, &DeleteParams::default()).await.unwrap();
        ephemeral_runners(&client, &self.ns).delete(name, &DeleteParams::default()).await.unwrap();
    }

    /// A whole run whose runner container calls `hosts` in order; returns the runner's name.
    pub async fn run(&self, node: &Node, run_id: i64, init_host: &str, hosts: &[&str]) -> String {
        let script: Vec<String> = hosts.iter().map(|h| format!("wget -q -O /dev/null {}", url(h))).collect();
        let name = self.start(node, run_id, init_host, &script.join(" && ")).await;
        self.wait_phase(node, &name, "Succeeded").await;
        self.finish(node, &name).await;
        name
    }

    /// The runner pod's logs.
    pub fn logs(&self, node: &Node, name: &str) -> String {
        let out = node.kubectl().args(["-n", &self.ns, "logs", name, "--all-containers"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The `AnomalousEgress` Events in the job's namespace.
    pub async fn anomaly_events(&self, node: &Node) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(node.client().await, &self.ns);
        let list = events.list(&Default::default()).await.unwrap().items;
        list.into_iter().filter(|e| e.reason.as_deref() == Some("AnomalousEgress")).collect()
    }

    /// Waits until the job's baseline has recorded run `run_id`; returns the baseline.
    pub async fn wait_merged(&self, node: &Node, run_id: i64) -> WorkflowBaseline {
        let baselines: Api<WorkflowBaseline> = Api::namespaced(node.client().await, &self.ns);
        let started = Instant::now();
        loop {
            let found = baselines.list(&Default::default()).await.unwrap().items;
            let merged = |b: &&WorkflowBaseline| {
                b.status.as_ref().is_some_and(|s| s.recent_runs.iter().any(|r| r.run_id == run_id.to_string()))
            };
            if let Some(b) = found.iter().find(merged) {
                return b.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "run {run_id} not in any baseline after 90s: {found:?}\n{}",
                agent_logs(node)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn owner_ref(runner: &DynamicObject) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "actions.github.com/v1alpha1".into(),
        kind: "EphemeralRunner".into(),
        name: runner.name_any(),
        uid: runner.uid().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The end of the agent's log.
pub fn agent_logs(node: &Node) -> String {
    let out = node
        .kubectl()
        .args(["-n", SYSTEM, "logs", "-l", "app.kubernetes.io/component=agent", "--tail=40"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
