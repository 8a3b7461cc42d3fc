//! The agent's cluster mode as the DaemonSet runs it: the real binary with the args the
//! operator's DaemonSet gives it, in a mount namespace laid out as its container is (the host's
//! /sys/fs/cgroup at /host/cgroup, a state directory at /var/lib/runwarden), acting as its own
//! ServiceAccount under exactly the RBAC it ships, against a real kube-apiserver; runner pods
//! are Pod objects on the test's node with kubelet-shaped cgroups and real processes (no
//! kubelet: the end-to-end test on a real node covers that).
//!
//! Needs root and the control-plane binaries built by `make setup`; `make test` runs it.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use runwarden_agent::ebpf;
use runwarden_crds::WorkflowBaseline;
use runwarden_crds::identity::JobIdentity;
use runwarden_operator::arc::{EphemeralRunner, EphemeralRunnerSpec};
use runwarden_operator::daemonset::{self, AgentConfig};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

const NODE: &str = "agent-test-node";

/// The agent binary, started as the DaemonSet starts it.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The DaemonSet's container args, as the operator renders them with its write permissions
/// limited to `runner_namespaces` (and every list setting set, so the binary is shown to take
/// each flag the DaemonSet can carry).
fn daemonset_args(runner_namespaces: &[String], block_mode: bool) -> Vec<String> {
    let ds = daemonset::desired(&AgentConfig {
        runner_namespaces: runner_namespaces.to_vec(),
        trusted_resolvers: vec!["127.0.0.53".into(), "10.96.0.10".into()],
        block_mode,
        ..AgentConfig::default()
    });
    let args = &ds["spec"]["template"]["spec"]["containers"][0]["args"];
    serde_json::from_value(args.clone()).unwrap()
}

fn start_agent(kubeconfig: &Path, kubepods: &Path, state: &Path, log: PathBuf, runner_ns: &str) -> AgentProcess {
    start_agent_with(kubeconfig, kubepods, state, log, runner_ns, false, &[])
}

fn start_agent_with(
    kubeconfig: &Path,
    kubepods: &Path,
    state: &Path,
    log: PathBuf,
    runner_ns: &str,
    block_mode: bool,
    env: &[(&str, String)],
) -> AgentProcess {
    let bin = env!("CARGO_BIN_EXE_runwarden-agent");
    // What the container sees: the host's /sys/fs/cgroup (hostPath) at /host/cgroup, the
    // state hostPath at /var/lib/runwarden.
    let script = "set -e; mkdir -p /host/cgroup /var/lib/runwarden; \
                  mount --rbind /sys/fs/cgroup /host/cgroup; mount --bind \"$0\" /var/lib/runwarden; exec \"$@\"";
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(state)
        .arg(bin)
        .args(daemonset_args(&[runner_ns.to_string()], block_mode))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("KUBECONFIG", kubeconfig)
        .env("NODE_NAME", NODE)
        .env("RUNWARDEN_KUBEPODS_CGROUP", kubepods)
        .env("RUNWARDEN_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    AgentProcess { child, log }
}

fn http_get(path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 9090)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

async fn wait_ready(agent: &mut AgentProcess) {
    for _ in 0..300 {
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!("the agent exited ({status}): {}", agent.log());
        }
        if http_get("/readyz").is_some_and(|(c, _)| c == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the agent was not ready within 30s: {}", agent.log());
}

/// A kubeconfig acting as the agent's ServiceAccount.
fn agent_kubeconfig(cp: &ControlPlane, ns: &str) -> PathBuf {
    let text = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let path = cp.dir.join(format!("kubeconfig-agent-{ns}"));
    let user = format!("    as: system:serviceaccount:{ns}:{}\n    token:", runwarden_agent::rbac::NAME);
    std::fs::write(&path, text.replace("    token:", &user)).unwrap();
    path
}

fn apply_yaml(cp: &ControlPlane, yaml: &str) {
    use std::io::Write;
    let mut child =
        cp.kubectl().args(["apply", "-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kubectl apply");
}

/// A runner pod of scale set `arc` on the test node, owned by an EphemeralRunner.
async fn runner_pod(client: &Client, ns: &str, name: &str) -> (Pod, EphemeralRunner) {
    runner_pod_of(client, ns, name, "arc").await
}

/// A runner pod of `scale_set` on the test node, owned by an EphemeralRunner.
async fn runner_pod_of(client: &Client, ns: &str, name: &str, scale_set: &str) -> (Pod, EphemeralRunner) {
    let runners: Api<EphemeralRunner> = Api::namespaced(client.clone(), ns);
    let runner = runners
        .create(&PostParams::default(), &EphemeralRunner::new(name, EphemeralRunnerSpec::default()))
        .await
        .unwrap();
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"actions.github.com/scale-set-name": scale_set}},
        "spec": {"nodeName": NODE, "containers": [{"name": "runner", "image": "runner"}]}
    }))
    .unwrap();
    pod.metadata.owner_references = Some(vec![kube::Resource::controller_owner_ref(&runner, &()).unwrap()]);
    let pod = Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.unwrap();
    (pod, runner)
}

/// kubelet's cgroups of a BestEffort pod with one container.
fn pod_cgroup(kubepods: &Path, uid: &str) -> PathBuf {
    let container = kubepods.join("besteffort").join(format!("pod{uid}")).join("a".repeat(64));
    std::fs::create_dir_all(&container).unwrap();
    container
}

/// Runs python in `cgroup` connecting to 127.0.0.1:`port` as its first instruction.
fn connect_from(cgroup: &Path, port: u16) {
    let script = format!(
        "import socket\ntry:\n  socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\nexcept OSError:\n  pass\n"
    );
    common::python(cgroup, None, &script);
}

async fn events_for(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<Event> {
    events_of(client, ns, "AnomalousEgress", kind, name).await
}

async fn events_of(client: &Client, ns: &str, reason: &str, kind: &str, name: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect()
}

#[test]
fn the_committed_rbac_is_what_the_code_uses() {
    let committed = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac.yaml")).unwrap();
    assert!(
        committed == runwarden_agent::rbac::RBAC.yaml("runwarden-system"),
        "node-agent/rbac.yaml is stale; run `make generate`"
    );
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/runwarden/templates/agent-rbac.yaml");
    assert!(
        std::fs::read_to_string(chart).unwrap() == runwarden_agent::rbac::RBAC.chart_yaml(),
        "charts/runwarden/templates/agent-rbac.yaml is stale; run `make generate`"
    );
}

/// One agent at a time: each serves its metrics on port 9090 of the machine.
static ONE_AGENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CRDs (ARC's EphemeralRunner too), the agent's namespace and a runner namespace, and the
/// agent's RBAC with its writes granted only in the runner namespace, as the chart renders it
/// with `runnerNamespaces` set (the DaemonSet's args say so too).
async fn setup(cp: &ControlPlane) -> (Client, String, String) {
    let admin = cp.client().await;
    cluster::ensure_crds(&admin).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(admin.clone());
    crds.patch(
        "ephemeralrunners.actions.github.com",
        &PatchParams::apply("runwarden-tests").force(),
        &Patch::Apply(EphemeralRunner::crd()),
    )
    .await
    .unwrap();
    cluster::wait_established(&crds, "ephemeralrunners.actions.github.com").await;
    let system = cluster::test_namespace(&admin, "runwarden-system").await;
    let ns = cluster::test_namespace(&admin, "arc-runners").await;
    let rbac = runwarden_agent::rbac::RBAC.manifests_for(&system, std::slice::from_ref(&ns));
    let stream: String = rbac.iter().map(|m| format!("---\n{}", serde_yaml::to_string(m).unwrap())).collect();
    let cluster_role = rbac.iter().find(|m| m["kind"] == "ClusterRole").unwrap();
    assert!(!cluster_role["rules"].to_string().contains("events"), "no write is cluster-wide: {cluster_role}");
    apply_yaml(cp, &stream);
    (admin, system, ns)
}

#[tokio::test]
async fn a_runner_pods_new_call_becomes_an_event_and_its_run_lands_in_the_baseline() {
    common::require_root();
    let _one = ONE_AGENT.lock().await;
    let cp = ControlPlane::shared();
    let (admin, system, ns) = setup(cp).await;

    // kubelet's pod cgroups for this test, and a listener the runner calls.
    let mount = ebpf::cgroup2_mount().unwrap();
    let relative = PathBuf::from(format!("runwarden-test-{}-cluster", std::process::id()));
    let kubepods = mount.join(&relative).join("kubepods");
    std::fs::create_dir_all(kubepods.join("besteffort")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let state = tempdir("agent-state");
    let mut agent =
        start_agent(&agent_kubeconfig(cp, &system), &relative.join("kubepods"), &state, cp.dir.join("agent.log"), &ns);
    wait_ready(&mut agent).await;

    // A runner pod whose first instruction calls out, before its job is known.
    let (pod, runner) = runner_pod(&admin, &ns, "runner-a").await;
    let container = pod_cgroup(&kubepods, &pod.uid().unwrap());
    connect_from(&container, port);
    // A pod that is not a runner, calling the same listener: nothing is reported for it.
    let other: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"}, "spec": {"nodeName": NODE, "containers": [{"name": "web", "image": "web"}]}
    }))
    .unwrap();
    let other = Api::<Pod>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &other).await.unwrap();
    connect_from(&pod_cgroup(&kubepods, &other.uid().unwrap()), port);

    // The job arrives (ARC's status on the EphemeralRunner) and its baseline reports from the
    // first run.
    let identity = JobIdentity::from_runner(
        Some("acme/web"),
        Some("acme/web/.github/workflows/ci.yml@refs/heads/main"),
        Some("build"),
        Some(4711),
    )
    .unwrap();
    let baseline: WorkflowBaseline = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
        "metadata": {"name": identity.baseline_name()},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "mode": "Monitoring"}
    }))
    .unwrap();
    Api::<WorkflowBaseline>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &baseline).await.unwrap();
    // Annotations claiming another job, written on the runner pod by whoever may patch pods
    // there, are not its job; ARC's status on the EphemeralRunner is.
    let forged = JobIdentity { repository: "acme/release".into(), ..identity.clone() };
    let annotations = json!({"metadata": {"annotations": forged.annotations()}});
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .patch("runner-a", &PatchParams::default(), &Patch::Merge(&annotations))
        .await
        .unwrap();
    let job = json!({"status": {"jobRepositoryName": "acme/web", "jobDisplayName": "build", "workflowRunId": 4711,
                                "jobWorkflowRef": "acme/web/.github/workflows/ci.yml@refs/heads/main"}});
    Api::<EphemeralRunner>::namespaced(admin.clone(), &ns)
        .patch_status("runner-a", &PatchParams::default(), &Patch::Merge(&job))
        .await
        .unwrap();

    let dest = format!("127.0.0.1:{port}/TCP");
    let mut found = (vec![], vec![], vec![]);
    for _ in 0..100 {
        found = (
            events_for(&admin, &ns, "Pod", "runner-a").await,
            events_for(&admin, &ns, "EphemeralRunner", &runner.name_any()).await,
            events_for(&admin, &ns, "WorkflowBaseline", &identity.baseline_name()).await,
        );
        if !found.0.is_empty() && !found.1.is_empty() && !found.2.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !found.0.is_empty() && !found.1.is_empty() && !found.2.is_empty(),
        "Events on pod, runner and baseline: {found:?}\n{}",
        agent.log()
    );
    let note = found.0[0].note.clone().unwrap_or_default();
    assert!(note.contains(&dest), "{note}");
    assert!(note.contains("python3") && note.contains("run 4711 of acme/web"), "{note}");
    assert_eq!(found.0.len(), 1, "one Event per (run, destination) on the pod");
    assert!(events_for(&admin, &ns, "Pod", "web").await.is_empty(), "nothing for a pod that is not a runner");

    // The agent is killed in the middle of the run and comes back: the run goes on from its
    // state directory, and a call made after the restart joins it.
    drop(agent);
    let mut agent = start_agent(
        &agent_kubeconfig(cp, &system),
        &relative.join("kubepods"),
        &state,
        cp.dir.join("agent-2.log"),
        &ns,
    );
    wait_ready(&mut agent).await;
    let second = TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = second.local_addr().unwrap().port();
    connect_from(&container, port2);
    for _ in 0..50 {
        if events_for(&admin, &ns, "Pod", "runner-a").await.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The run ends (the pod object goes, as when kubelet confirms its containers stopped): it
    // lands in the baseline.
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .delete("runner-a", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let baselines = Api::<WorkflowBaseline>::namespaced(admin.clone(), &ns);
    let mut status = None;
    for _ in 0..150 {
        status = baselines.get(&identity.baseline_name()).await.unwrap().status;
        if status.as_ref().is_some_and(|s| !s.recent_runs.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_default();
    assert_eq!(status.observed_runs, 1, "{status:?}\n{}", agent.log());
    let run = &status.recent_runs[0];
    assert_eq!(run.run_id, "4711");
    assert_eq!(run.runner.as_deref(), Some("runner-a"));
    for p in [port, port2] {
        assert!(
            run.anomalies.iter().any(|a| a.endpoint == format!("127.0.0.1:{p}/TCP")),
            "before and after the restart: {run:?}"
        );
    }
    assert_eq!(run.endpoints, 2, "{run:?}");

    let (_, metrics) = http_get("/metrics").unwrap();
    assert!(
        metrics.contains("runwarden_agent_events_total{result=\"sent\"} 3"),
        "the restarted agent's own: {metrics}"
    );
    assert!(metrics.contains("runwarden_agent_merges_total{result=\"merged\"} 1"), "{metrics}");

    // Its record, as `kubectl get wfr` shows it: every destination, the anomalies first with
    // why, owned by the baseline (deleted with it).
    let records = Api::<runwarden_crds::WorkflowRun>::namespaced(admin.clone(), &ns);
    let mut listed = Vec::new();
    for _ in 0..50 {
        listed = records.list(&Default::default()).await.unwrap().items;
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), 1, "{}", agent.log());
    let record = &listed[0];
    let baseline = baselines.get(&identity.baseline_name()).await.unwrap();
    let owner = &record.metadata.owner_references.as_ref().expect("owned by its baseline")[0];
    assert_eq!((owner.kind.as_str(), Some(&owner.uid)), ("WorkflowBaseline", baseline.metadata.uid.as_ref()));
    let labels = record.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("runwarden.dev/run-id").map(String::as_str), Some("4711"));
    let spec = &record.spec;
    assert_eq!((spec.run_id.as_str(), spec.runner.as_str(), spec.node.as_str()), ("4711", "runner-a", NODE));
    assert_eq!((spec.endpoint_count, spec.anomaly_count), (2, 2), "{spec:?}");
    for (e, p) in spec.endpoints.iter().zip([port, port2]) {
        assert_eq!(e.verdict, runwarden_crds::RunVerdict::Anomalous, "{e:?}");
        assert!(!e.reasons.is_empty() && e.processes.contains(&"python3".to_string()), "{e:?}");
        assert!(spec.endpoints.iter().any(|e| e.address == "127.0.0.1" && e.port == p), "{spec:?}");
    }
    assert!(spec.calls >= 2 && spec.started <= spec.finished, "{spec:?}");
    let (_, metrics) = http_get("/metrics").unwrap();
    assert!(metrics.contains("runwarden_agent_run_records_total{result=\"created\"} 1"), "{metrics}");
    drop(agent);
    common::remove_tree(&mount.join(&relative));
    let _ = std::fs::remove_dir_all(&state);
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("runwarden-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Block mode as the DaemonSet runs it with `agent.blockMode` on: a runner pod an EgressPolicy
/// in Block mode selects by its scale set (its job not known yet) may call and resolve only
/// what the policy allows; a policy change reaches the running pod; Audit lets it go.
#[tokio::test]
async fn block_mode_holds_a_runner_to_its_policy_and_follows_its_changes() {
    common::require_root();
    let _one = ONE_AGENT.lock().await;
    let cp = ControlPlane::shared();
    let (admin, system, ns) = setup(cp).await;
    let mount = ebpf::cgroup2_mount().unwrap();
    let relative = PathBuf::from(format!("runwarden-test-{}-block", std::process::id()));
    let kubepods = mount.join(&relative).join("kubepods");
    std::fs::create_dir_all(kubepods.join("besteffort")).unwrap();

    // The pod's network: a namespace whose resolv.conf names the host end, where the cluster's
    // DNS (the test's server) listens; the agent's resolver is reached at the same address.
    let net = common::NetNs::new();
    let (h4, h6) = (net.host_v4, net.host_v6);
    let dns = common::DnsServer::start(h4.into());
    // Addresses that are only connected to over UDP (no packet leaves), and the host end.
    for (name, ip) in
        [("allowed.test", [192, 0, 2, 10]), ("denied.test", [192, 0, 2, 66]), ("a.wild.test", h4.octets())]
    {
        dns.set(name, common::Zone::Records(vec![(name.into(), runwarden_agent::dns::RecordData::A(ip.into()))]));
    }
    let listener = TcpListener::bind((h4, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();

    let policy = |allowed_host: bool, mode: &str| {
        let mut allowed = vec![
            json!({"host": "*.wild.test"}),
            json!({"cidr": format!("{h4}/32"), "ports": [port], "protocol": "TCP"}),
        ];
        if allowed_host {
            allowed.push(json!({"host": "allowed.test", "ports": [443], "protocol": "UDP"}));
        }
        json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": "arc-egress", "namespace": ns},
            "spec": {"selector": {"scaleSets": ["arc"]}, "mode": mode, "includeBaseline": false, "allowedEndpoints": allowed}
        })
    };
    let policies: Api<runwarden_crds::EgressPolicy> = Api::namespaced(admin.clone(), &ns);
    let apply = PatchParams::apply("runwarden-tests").force();
    policies.patch("arc-egress", &apply, &Patch::Apply(policy(true, "Block"))).await.unwrap();

    // The node's BPF filesystem (the DaemonSet mounts the host's /sys/fs/bpf): one of the
    // test's own, outliving each agent process as the node's does.
    let bpffs = tempdir("agent-block-bpffs");
    std::fs::create_dir_all(&bpffs).unwrap();
    assert!(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs).status().unwrap().success());
    let env = [
        ("POD_IPS", format!("{h4},{h6}")),
        ("RUNWARDEN_DNS_UPSTREAM", format!("{h4}:53")),
        ("RUNWARDEN_BPFFS", bpffs.display().to_string()),
    ];
    let state = tempdir("agent-block-state");
    let start = |log: &str| {
        start_agent_with(
            &agent_kubeconfig(cp, &system),
            &relative.join("kubepods"),
            &state,
            cp.dir.join(log),
            &ns,
            true,
            &env,
        )
    };
    let mut agent = start("agent-block.log");
    wait_ready(&mut agent).await;

    // A runner pod on the node (no address in its status: the kernel says which pod a query
    // comes from).
    let (pod, _runner) = runner_pod(&admin, &ns, "runner-b").await;
    let container = pod_cgroup(&kubepods, &pod.uid().unwrap());
    let elsewhere = "attempt(V4, U, ('198.51.100.7', 443))".to_string();
    let mut held = false;
    for _ in 0..50 {
        if common::steps(&container, &net, std::slice::from_ref(&elsewhere)) == ["EPERM"] {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held, "the runner pod was not put in block mode: {}", agent.log());

    let closed = port.wrapping_add(1).max(1);
    let steps = [
        "resolve('allowed.test')".to_string(),
        "attempt(V4, U, ('192.0.2.10', 443))".into(),
        "attempt(V4, U, ('192.0.2.10', 444))".into(),
        "resolve('denied.test')".into(),
        "attempt(V4, U, ('192.0.2.66', 443))".into(),
        format!("attempt(V4, T, ('{h4}', {port}))"),
        format!("attempt(V4, T, ('{h4}', {closed}))"),
        "resolve('a.wild.test')".into(),
        format!("attempt(V4, T, ('{h4}', {closed}))"),
        // A server asked over IPv6: the resolver's IPv6 address (POD_IPS) answers for it.
        format!("ask('{h6}', 'allowed.test')"),
        format!("ask('{h6}', 'denied.test')"),
    ];
    let got = common::steps(&container, &net, &steps);
    let (h4s, allowed6, denied6) = (h4.to_string(), format!("{h6} 53 0 192.0.2.10"), format!("{h6} 53 5 -"));
    assert_eq!(
        got,
        [
            "192.0.2.10",
            "ok",
            "EPERM",
            "unresolved",
            "EPERM",
            "ok",
            "EPERM",
            h4s.as_str(),
            "ECONNREFUSED",
            allowed6.as_str(),
            denied6.as_str()
        ]
        .map(String::from),
        "{steps:#?}\n{}",
        agent.log()
    );

    // Each refusal said once on the pod and its EphemeralRunner, with the rule that allows it;
    // no anomaly for it (a refused call is no destination of the run).
    let note = event_note(&admin, &ns, "EgressBlocked", "runner-b", "192.0.2.66:443/UDP", &agent).await;
    assert!(note.contains(&format!("EgressPolicy {ns}/arc-egress")) && note.contains("python3"), "{note}");
    assert!(note.contains("{cidr: 192.0.2.66/32, ports: [443], protocol: UDP}"), "{note}");
    assert!(!events_of(&admin, &ns, "EgressBlocked", "EphemeralRunner", "runner-b").await.is_empty());
    assert!(
        events_for(&admin, &ns, "Pod", "runner-b")
            .await
            .iter()
            .all(|e| { !e.note.as_deref().unwrap_or_default().contains("192.0.2.66") })
    );

    // A runner the policy does not select (another scale set): in Audit, nothing refused.
    let (audited, _) = runner_pod_of(&admin, &ns, "runner-c", "other").await;
    let audited = pod_cgroup(&kubepods, &audited.uid().unwrap());
    assert_eq!(common::steps(&audited, &net, std::slice::from_ref(&elsewhere)), ["ok"]);

    // The agent dies: the block-mode pod stays held (its programs and state are pinned), gets no
    // DNS answer (fail closed) but keeps what it resolved; the audited pod is not touched.
    drop(agent);
    let without_agent = [elsewhere.clone(), steps[1].clone(), steps[0].clone()];
    assert_eq!(common::steps(&container, &net, &without_agent), ["EPERM", "ok", "unresolved"]);
    assert_eq!(common::steps(&audited, &net, std::slice::from_ref(&elsewhere)), ["ok"]);
    // A new agent takes over without letting go: held all along, and DNS answers again.
    let mut agent = start("agent-block-2.log");
    wait_ready(&mut agent).await;
    assert_eq!(common::steps(&container, &net, &without_agent), ["EPERM", "ok", "192.0.2.10"], "{}", agent.log());
    // Once it has read the cluster, only its own links hold the pod (the old ones let go).
    let mut pinned = Vec::new();
    for _ in 0..30 {
        pinned = walk(&bpffs).into_iter().filter(|p| p.to_string_lossy().contains("/links/")).collect();
        if pinned.len() == 11 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The three every armed pod has and block mode's eight.
    assert_eq!(pinned.len(), 11, "one pinned link per program of the one block-mode pod: {pinned:#?}");
    assert_eq!(common::steps(&audited, &net, std::slice::from_ref(&elsewhere)), ["ok"]);

    // The policy no longer allows allowed.test: the address it resolved is taken back.
    let changed = std::time::Instant::now();
    policies.patch("arc-egress", &apply, &Patch::Apply(policy(false, "Block"))).await.unwrap();
    let mut took = None;
    for _ in 0..50 {
        if common::steps(&container, &net, &steps[1..2]) == ["EPERM"] {
            took = Some(changed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = took.unwrap_or_else(|| panic!("the policy change did not reach the pod: {}", agent.log()));
    eprintln!("a policy change reached the running pod in {took:?}");
    assert_eq!(common::steps(&container, &net, &steps[..1]), ["unresolved"]);

    // A pod of the namespace that is no runner's (code in a job may have made it with the
    // runner's ServiceAccount): held to nothing while a policy of the namespace blocks.
    let stray: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stray"}, "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "c"}]}
    }))
    .unwrap();
    let stray = Api::<Pod>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &stray).await.unwrap();
    let stray_cgroup = pod_cgroup(&kubepods, &stray.uid().unwrap());
    let mut stray_held = false;
    for _ in 0..50 {
        if common::steps(&stray_cgroup, &net, std::slice::from_ref(&elsewhere)) == ["EPERM"] {
            stray_held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stray_held, "a pod that is no runner's got out: {}", agent.log());
    event_note(&admin, &ns, "EgressBlocked", "stray", "no way out", &agent).await;

    let (_, metrics) = http_get("/metrics").unwrap();
    assert!(metrics.contains("runwarden_agent_pods_blocking 2"), "{metrics}");
    let blocked = counter(&metrics, "runwarden_agent_blocked_calls_total");
    // This agent's since it started: the refused call before the policy change, and the one
    // after it.
    assert!(blocked >= 2, "refused calls counted: {blocked}\n{metrics}");

    // Audit: nothing is refused any more.
    policies.patch("arc-egress", &apply, &Patch::Apply(policy(false, "Audit"))).await.unwrap();
    let mut freed = false;
    for _ in 0..50 {
        if common::steps(&container, &net, std::slice::from_ref(&elsewhere)) == ["ok"] {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "Audit mode still refused: {}", agent.log());
    assert_eq!(common::steps(&stray_cgroup, &net, std::slice::from_ref(&elsewhere)), ["ok"], "no policy blocks");
    assert_eq!(common::steps(&container, &net, &steps[3..4]), ["192.0.2.66"], "its DNS is its own again");
    // In Audit, what the policy does not list goes ahead, and is said.
    assert_eq!(common::steps(&container, &net, &steps[4..5]), ["ok"]);
    let note = event_note(&admin, &ns, "EgressNotAllowed", "runner-b", "192.0.2.66:443/UDP", &agent).await;
    assert!(note.starts_with("let through") && note.contains("would refuse it in mode Block"), "{note}");
    let (_, metrics) = http_get("/metrics").unwrap();
    assert!(counter(&metrics, "runwarden_agent_would_block_calls_total") >= 1, "{metrics}");
    // Audit took the pod out of block mode: nothing of it stays pinned.
    let pinned: Vec<PathBuf> = walk(&bpffs).into_iter().filter(|p| p.to_string_lossy().contains("/links/")).collect();
    assert!(pinned.is_empty(), "{pinned:#?}");
    drop(agent);
    drop(listener);
    common::remove_tree(&mount.join(&relative));
    let _ = std::fs::remove_dir_all(&state);
    let _ = Command::new("umount").arg(&bpffs).status();
    let _ = std::fs::remove_dir_all(&bpffs);
}

/// The note of an Event `reason` on pod `pod` that contains `needle`, waited for up to 5 s.
async fn event_note(client: &Client, ns: &str, reason: &str, pod: &str, needle: &str, agent: &AgentProcess) -> String {
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = events_of(client, ns, reason, "Pod", pod).await;
        if let Some(note) = seen.iter().filter_map(|e| e.note.clone()).find(|n| n.contains(needle)) {
            return note;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {reason} Event on pod {pod} saying {needle:?}: {seen:?}\n{}", agent.log());
}

/// A counter's value in the agent's metrics (0 when it is not there).
fn counter(metrics: &str, name: &str) -> u64 {
    let prefix = format!("{name} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
