//! runwarden on a real node: the operator as a Deployment and the agent as the operator's
//! DaemonSet, from the images `make images` builds, on the harness's single-node cluster
//! (kubelet, containerd, runc, kube-proxy). Runner pods are real containers with ARC's labels and
//! an `EphemeralRunner` owner (ARC's CRDs as ARC generates them) whose status the test fills in
//! as ARC's listener would; they resolve names through the test's DNS server and call its
//! listeners on the node's bridge.
//!
//! Needs root and `make setup images` (`make test` does both).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use runwarden_crds::identity::SCALE_SET_LABEL;
use runwarden_tests::node::{NODE_IP, NODE_NAME};
use runwarden_tests::services::{Dns, Listener};
use runwarden_tests::{Node, cluster};
use serde_json::json;
use tokio::sync::OnceCell;

const SYSTEM: &str = "runwarden-system";
const RUNNERS: &str = "arc-runners";
/// The hosts runner pods call: the job's usual ones on 443, and one it never called, on a
/// non-standard port. (A new host on 443 in a baseline younger than the detector's `min_runs`
/// scores Low, below the default Medium: the detector issue's "young baseline" case.)
const HOSTS: [(&str, u16); 3] = [("api.github.test", 443), ("cdn.packages.test", 443), ("new.exfil.test", 8080)];

fn repo() -> PathBuf {
    cluster::crd_dir().join("..")
}

fn kubectl(node: &Node, args: &[&str]) -> String {
    let out = node.kubectl().args(args).stderr(Stdio::piped()).output().expect("running kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_stdin(node: &Node, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = node
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the tests share: the node with runwarden installed, the DNS server and the listeners.
struct World {
    node: &'static Node,
    dns: Dns,
    /// name → listener, for the hosts runner pods call.
    hosts: Vec<(String, Listener)>,
}

impl World {
    fn host(&self, name: &str) -> &Listener {
        &self.hosts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no host {name}")).1
    }
}

/// Installs runwarden once per test binary, as a user would with kubectl.
async fn world() -> &'static World {
    static WORLD: OnceCell<World> = OnceCell::const_new();
    WORLD
        .get_or_init(|| async {
            assert_eq!(unsafe_geteuid(), 0, "the real-node tests need root (a kubelet, containerd, eBPF)");
            let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();
            for image in ["runwarden-agent.tar", "runwarden-operator.tar"] {
                node.import_image(&runwarden_tests::node::image_dir().join(image))
                    .unwrap_or_else(|e| panic!("{e} (run `make images`)"));
            }
            let dns = Dns::start(SocketAddr::from((NODE_IP, 53))).expect("serving DNS on the node's address");
            let mut hosts = Vec::new();
            for (i, (name, port)) in HOSTS.into_iter().enumerate() {
                let ip = node.add_address(200 + i as u8).unwrap();
                dns.insert(name, ip);
                hosts.push((name.to_string(), Listener::start(SocketAddr::from((ip, port))).unwrap()));
            }

            let client = node.client().await;
            cluster::ensure_crds(&client).await;
            let arc = runwarden_tests::node::arc_crd_dir();
            kubectl(node, &["apply", "--server-side", "-f", &arc.display().to_string()]);
            kubectl(node, &["wait", "--for=condition=Established", "crd/ephemeralrunners.actions.github.com"]);
            let r = |p: &str| repo().join(p).display().to_string();
            kubectl(node, &["apply", "-f", &r("deploy/namespace.yaml")]);
            kubectl(node, &["apply", "-f", &r("operator/rbac.yaml"), "-f", &r("node-agent/rbac.yaml")]);
            // As shipped, except the agent's state directory: inside the node's, so that it goes
            // with the node and no test run resumes another's runs.
            let operator = std::fs::read_to_string(r("deploy/operator.yaml")).unwrap();
            let state = node.dir.join("agent-state").display().to_string();
            assert!(
                operator.contains("stateDir: /var/lib/runwarden"),
                "deploy/operator.yaml sets the agent's stateDir"
            );
            let operator = operator.replace("stateDir: /var/lib/runwarden", &format!("stateDir: {state}"));
            kubectl_stdin(node, &["apply", "-f", "-"], &operator);
            kubectl(node, &["create", "namespace", RUNNERS]);
            wait_installed(node, &client).await;
            World { node, dns, hosts }
        })
        .await
}

fn unsafe_geteuid() -> u32 {
    #[allow(unsafe_code)] // geteuid has no preconditions.
    // SAFETY: geteuid only reads the caller's credentials.
    unsafe {
        libc::geteuid()
    }
}

/// Waits until the operator's Deployment is available and its agent DaemonSet has a ready pod on
/// the node.
async fn wait_installed(node: &Node, client: &Client) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), SYSTEM);
    let started = Instant::now();
    loop {
        let operator = deployments.get_opt("runwarden-operator").await.unwrap();
        let agent = daemonsets.get_opt("runwarden-agent").await.unwrap();
        let operator_ready = operator.and_then(|d| d.status).and_then(|s| s.available_replicas).unwrap_or(0) >= 1;
        let agent_ready = agent.and_then(|d| d.status).is_some_and(|s| s.number_ready >= 1);
        if operator_ready && agent_ready {
            eprintln!("runwarden installed: operator and agent ready in {:.1}s", started.elapsed().as_secs_f64());
            return;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let pods = kubectl(node, &["get", "pods", "-A", "-o", "wide"]);
            let describe = node.kubectl().args(["-n", SYSTEM, "describe", "pods"]).output().unwrap();
            let logs = node
                .kubectl()
                .args(["-n", SYSTEM, "logs", "-l", "app.kubernetes.io/name=runwarden", "--tail=30"])
                .output()
                .unwrap();
            panic!(
                "runwarden not ready after 180s (operator {operator_ready}, agent {agent_ready})\n{pods}\n{}\n{}\n{}\nkubelet:\n{}",
                String::from_utf8_lossy(&describe.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr),
                node.log_tail("kubelet", 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ephemeral_runners(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "actions.github.com".into(),
        version: "v1alpha1".into(),
        api_version: "actions.github.com/v1alpha1".into(),
        kind: "EphemeralRunner".into(),
        plural: "ephemeralrunners".into(),
    };
    Api::namespaced_with(client.clone(), RUNNERS, &resource)
}

/// One workflow run of job `acme/web ci.yml build` on a runner of scale set `arc-runner-set`, as
/// ARC does it: an EphemeralRunner given the job, its pod (an init container, then the runner
/// container) calling `hosts` (of [`HOSTS`]) in order, and at the end the pod and the runner gone.
/// Returns the runner's name.
async fn workflow_run(world: &World, run_id: i64, init_host: &str, hosts: &[&str]) -> String {
    let client = world.node.client().await;
    let name = format!("arc-runner-set-{run_id}");
    let runners = ephemeral_runners(&client);
    let runner: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunner",
        "metadata": {"name": name, "labels": {SCALE_SET_LABEL: "arc-runner-set"}},
        "spec": {"githubConfigUrl": "https://github.com/acme", "githubConfigSecret": "github-app", "runnerScaleSetId": 1,
                 "metadata": {}, "spec": {"containers": [{"name": "runner", "image": "runner"}]}}
    }))
    .unwrap();
    let runner = runners.create(&PostParams::default(), &runner).await.unwrap();
    // ARC's listener assigns the job; the runner controller writes it into the status.
    let status = json!({"status": {
        "phase": "Running", "ready": true, "runnerName": name, "jobRequestId": run_id * 10,
        "jobRepositoryName": "acme/web", "jobWorkflowRef": "acme/web/.github/workflows/ci.yml@refs/heads/main",
        "workflowRunId": run_id, "jobDisplayName": "build"
    }});
    runners.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    let url = |host: &str| {
        let port = HOSTS.iter().find(|(h, _)| *h == host).expect("a host of HOSTS").1;
        format!("http://{host}:{port}/")
    };
    let wget = |host: &str| format!("wget -q -O /dev/null {}", url(host));
    let script: Vec<String> = hosts.iter().map(|h| wget(h)).collect();
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {SCALE_SET_LABEL: "arc-runner-set", "actions-ephemeral-runner": "True"}},
        "spec": {
            "nodeName": NODE_NAME,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            // The first instruction of the pod calls out.
            "initContainers": [{"name": "init", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                                "command": ["wget", "-q", "-O", "/dev/null", url(init_host)]}],
            "containers": [{"name": "runner", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script.join(" && ")]}]
        }
    }))
    .unwrap();
    pod.metadata.owner_references = Some(vec![owner_ref(&runner)]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), RUNNERS);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let started = Instant::now();
    loop {
        let phase = pods.get(&name).await.unwrap().status.and_then(|s| s.phase).unwrap_or_default();
        match phase.as_str() {
            "Succeeded" => break,
            "Failed" => panic!("runner pod {name} failed:\n{}", pod_logs(world.node, &name)),
            _ if started.elapsed() > Duration::from_secs(60) => panic!("runner pod {name} still {phase} after 60s"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // The job is done: ARC deletes the runner's pod and the EphemeralRunner.
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    runners.delete(&name, &DeleteParams::default()).await.unwrap();
    name
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

fn pod_logs(node: &Node, name: &str) -> String {
    let out = node.kubectl().args(["-n", RUNNERS, "logs", name, "--all-containers"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn agent_logs(node: &Node) -> String {
    let out = node
        .kubectl()
        .args(["-n", SYSTEM, "logs", "-l", "app.kubernetes.io/component=agent", "--tail=40"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn anomaly_events(client: &Client) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), RUNNERS);
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("AnomalousEgress"))
        .collect()
}

fn regarding(e: &Event) -> (String, String) {
    let r = e.regarding.clone().unwrap_or_default();
    (r.kind.unwrap_or_default(), r.name.unwrap_or_default())
}

/// Waits until the job's baseline has recorded run `run_id`; returns the baseline.
async fn wait_merged(world: &World, run_id: i64) -> WorkflowBaseline {
    let baselines: Api<WorkflowBaseline> = Api::namespaced(world.node.client().await, RUNNERS);
    let started = Instant::now();
    loop {
        let found = baselines.list(&Default::default()).await.unwrap().items;
        if let Some(b) = found
            .iter()
            .find(|b| b.status.as_ref().is_some_and(|s| s.recent_runs.iter().any(|r| r.run_id == run_id.to_string())))
        {
            return b.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run {run_id} not in any baseline after 60s: {found:?}\n{}",
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_learns_its_hosts_then_a_new_host_raises_events_on_pod_runner_and_baseline() {
    let world = world().await;
    let client = world.node.client().await;

    // Five runs calling the same hosts: the baseline learns them, nothing is raised.
    for run in 1..=5 {
        workflow_run(world, 100 + run, "api.github.test", &["cdn.packages.test"]).await;
        wait_merged(world, 100 + run).await;
    }
    assert!(world.host("api.github.test").count() >= 5 && world.host("cdn.packages.test").count() >= 5);
    assert!(world.dns.queries.load(std::sync::atomic::Ordering::Relaxed) >= 10, "pods resolve through the test DNS");
    let quiet = anomaly_events(&client).await;
    assert!(quiet.is_empty(), "runs calling the learned hosts raise nothing: {quiet:?}");

    // Run 6 calls a host the job never called.
    let runner = workflow_run(world, 106, "api.github.test", &["cdn.packages.test", "new.exfil.test"]).await;
    let baseline = wait_merged(world, 106).await;
    let events = anomaly_events(&client).await;
    let on = |kind: &str, name: &str| events.iter().filter(|e| regarding(e) == (kind.into(), name.into())).count();
    assert_eq!(on("Pod", &runner), 1, "one Event on the runner pod: {events:?}");
    assert_eq!(on("EphemeralRunner", &runner), 1, "one on its EphemeralRunner: {events:?}");
    assert_eq!(on("WorkflowBaseline", &baseline.name_any()), 1, "one on the baseline: {events:?}");
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.contains("new.exfil.test"), "the Event names the new host: {note}");
    assert!(note.contains("wget"), "and the process that called it: {note}");
    assert!(!events.iter().any(|e| e.note.as_deref().unwrap_or("").contains("cdn.packages.test")), "{events:?}");

    let status = baseline.status.unwrap();
    assert_eq!(status.observed_runs, 6, "{status:?}");
    let last = status.recent_runs.iter().find(|r| r.run_id == "106").unwrap();
    assert!(last.anomalies.iter().any(|a| a.endpoint.starts_with("new.exfil.test:8080")), "{last:?}");
}
