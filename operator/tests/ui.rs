//! The run pages against a real kube-apiserver, as a user reaches them through
//! `kubectl port-forward`: the recent runs, a run with its anomaly first (reasons, the approve
//! command), the job's baseline; what runners wrote is shown as text, never as markup.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use runwarden_crds::WorkflowRun;
use runwarden_operator::ui::{Access, Reviews};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

mod common;

/// A GET (or another method) as a browser sends it: status, headers and body.
fn request(address: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    request_as(address, method, path, None)
}

/// As [`request`], with `token` as a bearer token (what an Ingress's auth proxy adds).
fn request_as(address: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_pages_show_a_runs_anomaly_first_and_what_runners_wrote_as_text() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, "ui").await;
    let baselines = common::acme_baseline(&client, &ns).await;
    let status = json!({"status": {
        "observedRuns": 6, "recentNewEndpoints": [2, 0, 0, 0, 1],
        "endpoints": [
            {"host": "registry.npmjs.org", "port": 443, "protocol": "TCP", "runsSeen": 6, "state": "Learned", "processes": ["node"]},
            {"host": "paste.example.net", "port": 443, "protocol": "TCP", "runsSeen": 1, "state": "Anomalous",
             "severity": "High", "processes": ["<script>alert(1)</script>"]}
        ],
        "recentRuns": [
            {"runId": "4700", "runner": "arc-a", "time": "2026-12-03T09:05:00Z", "calls": 40, "endpoints": 1},
            {"runId": "4711", "runner": "arc-b", "time": "2026-12-03T10:05:00Z", "calls": 41, "endpoints": 2,
             "newEndpoints": 1, "anomalyCount": 1, "blocked": 1, "gitRef": "refs/pull/7/merge"}
        ]
    }});
    baselines.patch_status("acme-web-ci-build", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let record: WorkflowRun = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "4711-arc-b", "labels": {"runwarden.dev/baseline": "acme-web-ci-build", "runwarden.dev/run-id": "4711"}},
        "spec": {
            "repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": "acme-web-ci-build",
            "runId": "4711", "runner": "arc-b", "ephemeralRunner": "arc-b", "node": "node-1", "policy": "runners",
            "started": "2026-12-03T10:00:00Z", "finished": "2026-12-03T10:05:00Z",
            "calls": 41, "endpointCount": 2, "newEndpointCount": 1, "anomalyCount": 1, "blockedCount": 1,
            "endpoints": [
                {"host": "paste.example.net", "address": "203.0.113.9", "port": 443, "protocol": "TCP", "calls": 1,
                 "processes": ["<script>alert(1)</script>"], "executables": ["/tmp/<b>x</b>"],
                 "firstSeen": "2026-12-03T10:02:00Z", "lastSeen": "2026-12-03T10:02:00Z", "verdict": "Anomalous",
                 "severity": "High", "score": 0.91, "reasons": ["a paste site", "called by \"<img src=x>\""]},
                {"address": "198.51.100.7", "port": 8080, "protocol": "TCP", "calls": 3, "processes": ["wget"],
                 "firstSeen": "2026-12-03T10:02:30Z", "lastSeen": "2026-12-03T10:02:40Z", "verdict": "Blocked",
                 "reasons": ["refused in block mode: EgressPolicy arc/runners does not allow it"]},
                {"host": "registry.npmjs.org", "address": "104.16.1.34", "port": 443, "protocol": "TCP", "calls": 40,
                 "processes": ["node"], "firstSeen": "2026-12-03T10:00:01Z", "lastSeen": "2026-12-03T10:03:00Z", "verdict": "Known"}
            ]
        }
    }))
    .unwrap();
    Api::<WorkflowRun>::namespaced(client.clone(), &ns).create(&PostParams::default(), &record).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(runwarden_operator::ui::run(client.clone(), listener, Access::PortForward));

    // The list: newest first, linking the run and the job.
    let link = format!("/runs/{ns}/4711-arc-b");
    let mut list = String::new();
    for _ in 0..50 {
        list = tokio::task::spawn_blocking(move || request(address, "GET", "/").2).await.unwrap();
        if list.contains(&link) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(list.contains(&link) && list.contains(&format!("/jobs/{ns}/acme-web-ci-build")), "{list}");
    assert!(list.find("4711").unwrap() < list.find("4700").unwrap(), "newest first: {list}");
    let row = &list[list.find(&link).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(
        row.contains("<td>refs/pull/7/merge</td>") && row.ends_with("<td>1</td><td>1</td>"),
        "ref, anomalies, blocked: {row}"
    );

    // The run: its anomaly at the top with why and how to approve it; then every destination.
    let (status, head, run) = tokio::task::spawn_blocking(move || request(address, "GET", &link)).await.unwrap();
    assert_eq!(status, 200, "{run}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    let anomaly = run.find("paste.example.net:443/TCP").expect("the anomaly");
    assert!(anomaly < run.find("registry.npmjs.org").unwrap(), "the anomaly before the known destinations");
    assert!(anomaly < run.find("<h2>Destinations").unwrap(), "{run}");
    assert!(run.contains("<li>a paste site</li>"), "{run}");
    // What block mode refused: after the anomalies, before the table, with the policy.
    let refused = run.find("<h2>Refused in block mode").expect("the refused calls");
    assert!(anomaly < refused && refused < run.find("<h2>Destinations").unwrap(), "{run}");
    assert!(
        run.contains(
            "<b>198.51.100.7:8080/TCP</b> by wget, 3 attempts: refused in block mode: EgressPolicy arc/runners"
        ),
        "{run}"
    );
    assert!(run.contains("<tr class=\"blocked\"><td>Blocked</td>"), "{run}");
    assert!(
        run.contains(&format!("kubectl runwarden approve -n {ns} acme-web-ci-build paste.example.net:443/TCP")),
        "{run}"
    );
    assert!(run.contains("https://github.com/acme/web/actions/runs/4711"), "{run}");
    assert!(run.contains(&format!("kubectl -n {ns} get egresspolicy runners")), "the policy: {run}");
    assert!(run.contains(&format!("kubectl -n {ns} get ephemeralrunner arc-b")), "the EphemeralRunner: {run}");
    for raw in ["<script>", "<img", "<b>x"] {
        assert!(!run.contains(raw), "{raw} from a runner is text, not markup: {run}");
    }
    assert!(
        run.contains("&lt;script&gt;alert(1)&lt;/script&gt;") || run.contains("/tmp/&lt;b&gt;x&lt;/b&gt;"),
        "{run}"
    );

    // The job: the anomalous endpoint first, the churn chart, its runs.
    let job = format!("/jobs/{ns}/acme-web-ci-build");
    let (status, _, page) = tokio::task::spawn_blocking(move || request(address, "GET", &job)).await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.find("paste.example.net").unwrap() < page.find("registry.npmjs.org").unwrap(), "{page}");
    assert!(page.contains("<svg class=\"churn\""), "{page}");
    assert!(!page.contains("<script>"), "{page}");

    // What is not there, and what is not a GET.
    let missing = format!("/runs/{ns}/9999-arc-z");
    let (status, _, _) = tokio::task::spawn_blocking(move || request(address, "GET", &missing)).await.unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = tokio::task::spawn_blocking(move || request(address, "POST", "/")).await.unwrap();
    assert_eq!(status, 405);
    assert!(runwarden_operator::ui::check_address(&"0.0.0.0:8090".parse().unwrap(), false).is_err());
    assert!(runwarden_operator::ui::check_address(&"127.0.0.1:8090".parse().unwrap(), false).is_ok());
    assert!(runwarden_operator::ui::check_address(&"0.0.0.0:8090".parse().unwrap(), true).is_ok());
}

/// A baseline with one recent run, and that run's record, in `ns`.
async fn job_with_a_run(client: &kube::Client, ns: &str) {
    let baselines = common::acme_baseline(client, ns).await;
    let status = json!({"status": {"recentRuns": [{"runId": "4711", "runner": "arc-b", "time": "2026-12-03T10:05:00Z", "calls": 1, "endpoints": 1}]}});
    baselines.patch_status("acme-web-ci-build", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let record: WorkflowRun = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "4711-arc-b"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": "acme-web-ci-build",
                 "runId": "4711", "runner": "arc-b", "node": "node-1", "started": "2026-12-03T10:00:00Z",
                 "finished": "2026-12-03T10:05:00Z", "calls": 1, "endpointCount": 0, "newEndpointCount": 0, "anomalyCount": 0}
    }))
    .unwrap();
    Api::<WorkflowRun>::namespaced(client.clone(), ns).create(&PostParams::default(), &record).await.unwrap();
}

/// Behind an Ingress (token authentication): no token, or one the cluster does not know, gets
/// 401; a user sees the runs of the namespaces where it may get baselines, and 403 elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_authentication_a_user_sees_only_the_namespaces_it_may_read() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    let (mine, other) =
        (cluster::test_namespace(&client, "ui-mine").await, cluster::test_namespace(&client, "ui-other").await);
    for ns in [&mine, &other] {
        job_with_a_run(&client, ns).await;
    }
    // The team's account may read baselines in its namespace only.
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "baseline-reader", "namespace": mine},
         "rules": [{"apiGroups": ["runwarden.dev"], "resources": ["workflowbaselines"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "baseline-reader", "namespace": mine},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "baseline-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": mine}]}
    ]});
    for item in rbac["items"].as_array().unwrap() {
        let kind = item["kind"].as_str().unwrap();
        let resource = if kind == "Role" { "roles" } else { "rolebindings" };
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            client.clone(),
            &mine,
            &kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
                resource,
            ),
        );
        api.create(&PostParams::default(), &serde_json::from_value(item.clone()).unwrap()).await.unwrap();
    }
    let token = common::service_account_token(&client, &mine, "default").await;

    // Reached as through an Ingress: at the machine's own address, not loopback.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let loopback = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
    let address = SocketAddr::new(machine_address(), loopback.port());
    let access = Access::Token(std::sync::Arc::new(Reviews::new(client.clone())));
    tokio::spawn(runwarden_operator::ui::run(client.clone(), listener, access));
    let get = |path: String, token: Option<String>| {
        tokio::task::spawn_blocking(move || request_as(address, "GET", &path, token.as_deref()))
    };

    let (status, head, _) = get("/".into(), None).await.unwrap();
    assert_eq!(status, 401, "no token");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert_eq!(get("/".into(), Some("not-a-token".into())).await.unwrap().0, 401, "a token the cluster does not know");

    let (mine_link, other_link) = (format!("/runs/{mine}/4711-arc-b"), format!("/runs/{other}/4711-arc-b"));
    let mut list = String::new();
    for _ in 0..50 {
        list = get("/".into(), Some(token.clone())).await.unwrap().2;
        if list.contains(&mine_link) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(list.contains(&mine_link), "its namespace's run: {list}");
    assert!(!list.contains(&other_link), "not another namespace's: {list}");
    assert_eq!(get(mine_link, Some(token.clone())).await.unwrap().0, 200);
    assert_eq!(get(other_link.clone(), Some(token.clone())).await.unwrap().0, 403);
    assert_eq!(get(format!("/jobs/{other}/acme-web-ci-build"), Some(token)).await.unwrap().0, 403);
    assert_eq!(get(other_link.clone(), None).await.unwrap().0, 401);
    // From loopback (kubectl port-forward, which needs pods/portforward on the operator): no
    // token needed.
    let local = tokio::task::spawn_blocking(move || request(loopback, "GET", &other_link)).await.unwrap();
    assert_eq!(local.0, 200, "{}", local.2);
}

/// This machine's own address on its default route (no packet is sent to find it).
pub fn machine_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect("192.0.2.1:9").unwrap();
    let ip = probe.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "an address other than loopback: {ip}");
    ip
}
