//! The Helm chart (`charts/runwarden`): it lints, renders with the default values and with every
//! option on, every rendered object is accepted by a real kube-apiserver (server-side dry run),
//! and the values schema refuses a mistyped value. `tests/tests/node.rs` installs it for real.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use runwarden_tests::{ControlPlane, cluster};

fn chart() -> PathBuf {
    cluster::crd_dir().join("../charts/runwarden")
}

fn run(mut cmd: Command, input: Option<&str>) -> (bool, String) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn helm(args: &[&str]) -> (bool, String) {
    let mut cmd = ControlPlane::shared().helm();
    cmd.args(args);
    run(cmd, None)
}

fn template(values: Option<&str>) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "runwarden", chart.as_str(), "--namespace", "runwarden-system"];
    let file;
    if let Some(v) = values {
        file = chart.clone() + "/ci/" + v;
        args.extend(["-f", file.as_str()]);
    }
    let (ok, out) = helm(&args);
    assert!(ok, "helm template {values:?}: {out}");
    out
}

#[test]
fn the_chart_lints_with_the_default_values_and_with_everything_on() {
    let chart = chart().display().to_string();
    for values in [None, Some("everything-on-values.yaml"), Some("local-values.yaml")] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        let file;
        if let Some(v) = values {
            file = format!("{chart}/ci/{v}");
            args.extend(["-f", file.as_str()]);
        }
        let (ok, out) = helm(&args);
        assert!(ok, "helm lint {values:?}: {out}");
    }
}

#[tokio::test]
async fn every_rendered_object_is_accepted_by_the_api_server() {
    let cp = ControlPlane::shared();
    // The optional ServiceMonitor needs prometheus-operator's CRD, as on a cluster that runs it.
    let monitoring = runwarden_tests::node::prometheus_operator_crd_dir().display().to_string();
    let (ok, out) = run(
        {
            let mut c = cp.kubectl();
            c.args(["apply", "--server-side", "-f", &monitoring]);
            c
        },
        None,
    );
    assert!(ok, "{out}");
    // The release's namespace, and the runner namespaces of the everything-on values.
    for ns in ["runwarden-system", "arc-runners", "arc-big"] {
        let (ok, out) = run(
            {
                let mut c = cp.kubectl();
                c.args(["create", "namespace", ns]);
                c
            },
            None,
        );
        assert!(ok || out.contains("AlreadyExists"), "{out}");
    }
    for values in [None, Some("everything-on-values.yaml")] {
        let rendered = template(values);
        let kinds = rendered.lines().filter(|l| l.starts_with("kind: ")).count();
        assert!(kinds >= 14, "{values:?}: {kinds} objects\n{rendered}");
        let mut cmd = cp.kubectl();
        cmd.args(["apply", "--server-side", "--dry-run=server", "-f", "-"]);
        let (ok, out) = run(cmd, Some(&rendered));
        assert!(ok, "{values:?}: the API server refused what the chart renders:\n{out}");
        assert!(!out.contains("Warning"), "{values:?}: the API server warned about what the chart renders:\n{out}");
        assert_eq!(out.lines().filter(|l| l.contains("(server dry run)")).count(), kinds, "{out}");
    }
}

#[test]
fn every_option_renders_where_it_belongs() {
    let rendered = template(Some("everything-on-values.yaml"));
    for expected in [
        "kind: ServiceMonitor",
        "kind: PrometheusRule",
        "alert: RunwardenAgentNotRunning",
        "{{ $labels.pod }}",
        "grafana_dashboard: \"1\"",
        "\"uid\": \"runwarden\"",
        "kind: PodDisruptionBudget",
        "replicas: 3",
        "localhost/runwarden/runwarden-operator@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        r#"image: "localhost/runwarden/runwarden-agent:dev""#,
        r#"nodeSelector: {"actions.github.com/runner-node":"true"}"#,
        "stateDir: \"/var/lib/runwarden-test\"",
        r#"runnerNamespaces: ["arc-runners","arc-big"]"#,
        r#"trustedResolvers: ["10.96.0.10","169.254.20.10","fd00::a"]"#,
    ] {
        assert!(rendered.contains(expected), "{expected:?} not rendered:\n{rendered}");
    }
    assert!(!rendered.contains("helm.sh/resource-policy"), "crds.keep false");
    // With runner namespaces, writes are granted only there; Secrets only as listed, by name.
    let objects: Vec<serde_yaml::Value> =
        rendered.split("\n---").filter_map(|d| serde_yaml::from_str(d).ok()).collect();
    let rules = |kind: &str, name: &str, ns: Option<&str>| -> String {
        objects
            .iter()
            .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .filter(|o| ns.is_none_or(|n| o["metadata"]["namespace"] == n))
            .map(|o| serde_yaml::to_string(&o["rules"]).unwrap())
            .collect()
    };
    let operator = "runwarden-operator";
    assert!(!rules("ClusterRole", operator, None).contains("secrets"), "{}", rules("ClusterRole", operator, None));
    assert!(!rules("ClusterRole", operator, None).contains("create"), "{}", rules("ClusterRole", operator, None));
    for ns in ["arc-runners", "arc-big"] {
        let role = rules("Role", operator, Some(ns));
        assert!(role.contains("workflowbaselines") && !role.contains("secrets"), "{ns}: {role}");
    }
    let secrets = "runwarden-operator-notifier-secrets";
    let listed = rules("Role", secrets, Some("arc-runners"));
    assert!(
        listed.contains("secrets") && listed.contains("resourceNames:\n  - slack-webhook\n  - siem-hook"),
        "{listed}"
    );
    let whole = rules("Role", secrets, Some("arc-big"));
    assert!(whole.contains("secrets") && !whole.contains("resourceNames"), "{whole}");
    assert!(!rendered.contains("- pods\n  verbs:\n  - patch"), "nobody patches pods");
    let defaults = template(None);
    assert!(!defaults.contains("- secrets"), "no Secret is readable unless listed");
    assert!(!defaults.contains("kind: ServiceMonitor"), "off by default");
    assert!(!defaults.contains("kind: PrometheusRule") && !defaults.contains("runwarden-dashboard"), "off by default");
    assert!(defaults.contains("helm.sh/resource-policy: keep"), "CRDs kept at uninstall by default");
    assert!(defaults.contains(r#"image: "ghcr.io/runwarden/runwarden-operator:0.1.0""#), "tag defaults to appVersion");
}

/// The run pages: off by default; on, served on loopback only (port-forward); with token
/// authentication, on every address behind a Service, with the review permissions they need and
/// only then.
#[test]
fn the_run_pages_get_what_each_access_mode_needs_and_nothing_more() {
    let chart = chart().display().to_string();
    let render = |sets: &str| {
        let mut args = vec!["template", "runwarden", chart.as_str(), "--namespace", "runwarden-system"];
        if !sets.is_empty() {
            args.extend(["--set", sets]);
        }
        let (ok, out) = helm(&args);
        assert!(ok, "{sets}: {out}");
        out
    };
    let off = render("");
    assert!(!off.contains("uiAddress") && !off.contains("- tokenreviews") && !off.contains("runwarden-ui"), "{off}");
    let port_forward = render("operator.ui.enabled=true");
    assert!(port_forward.contains("uiAddress: \"127.0.0.1:8090\""), "{port_forward}");
    assert!(!port_forward.contains("- tokenreviews") && !port_forward.contains("name: runwarden-ui"), "{port_forward}");
    let token = render("operator.ui.enabled=true,operator.ui.tokenAuth=true");
    for expected in [
        "uiAddress: \"0.0.0.0:8090\"",
        "uiTokenAuth: true",
        "name: runwarden-ui",
        "- {name: ui, containerPort: 8090, protocol: TCP}",
        "name: runwarden-operator-token-reviews",
        "- tokenreviews",
        "- subjectaccessreviews",
    ] {
        assert!(token.contains(expected), "{expected:?} not rendered:\n{token}");
    }
    // Links to the pages: rendered for the operator (which hands it to the agents), refused
    // when the pages are off, or with a path the pages are not served under.
    let linked = render("operator.ui.enabled=true,operator.ui.url=https://runwarden.example.com");
    assert!(linked.contains("uiUrl: \"https://runwarden.example.com\""), "{linked}");
    let (ok, out) = helm(&["template", "runwarden", &chart, "--set", "operator.ui.url=https://runwarden.example.com"]);
    assert!(!ok && out.contains("operator.ui.enabled=true"), "{out}");
    let (ok, out) = helm(&[
        "template",
        "runwarden",
        &chart,
        "--set",
        "operator.ui.enabled=true,operator.ui.url=https://example.com/runwarden",
    ]);
    assert!(!ok && out.contains("url"), "{out}");
}

#[test]
fn the_values_schema_refuses_a_mistyped_value() {
    let chart = chart().display().to_string();
    let (ok, out) = helm(&["template", "runwarden", &chart, "--set", "operator.replica=2"]);
    assert!(!ok && out.contains("replica"), "{out}");
    let (ok, out) = helm(&["template", "runwarden", &chart, "--set", "agent.image.pullPolicy=Sometimes"]);
    assert!(!ok && out.contains("pullPolicy"), "{out}");
}

#[test]
fn every_alert_is_documented_with_what_to_do_and_links_there() {
    let committed = std::fs::read_to_string(runwarden_tests::docs::root().join("docs/operations.md")).unwrap();
    let expected = runwarden_tests::docs::operations().unwrap();
    assert!(committed == expected, "docs/operations.md's alerts are stale; run `make generate`");
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("files/alerts.yaml")).unwrap()).unwrap();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(committed.contains(&format!("### {name}\n")), "{name} has a section in docs/operations.md");
            let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
            assert_eq!(
                url,
                format!("https://github.com/runwarden/runwarden/blob/main/docs/operations.md#{}", name.to_lowercase()),
                "{name}'s runbook_url is its section"
            );
        }
    }
}

#[test]
fn the_documented_evidence_table_is_the_detectors() {
    let root = runwarden_tests::docs::root();
    let source = std::fs::read_to_string(root.join("detector/src/score.rs")).unwrap();
    let doc = std::fs::read_to_string(root.join("docs/detector.md")).unwrap();
    let rows: Vec<&str> = source.lines().filter_map(|l| l.strip_prefix("//! |")).collect();
    assert!(rows.len() > 10, "the table in detector/src/score.rs: {rows:?}");
    for row in rows {
        assert!(doc.contains(&format!("|{row}")), "docs/detector.md lacks the evidence row |{row}");
    }
}

/// The chart's admission policy on a real kube-apiserver: only a runner pod itself (a request
/// with its ServiceAccount token) may label a pod, or a batch Job's pods, `runner-pod=<it>`.
#[tokio::test]
async fn only_a_runner_pod_itself_may_name_it_in_a_job_pods_label() {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams, PostParams};
    use serde_json::json;

    let cp = ControlPlane::shared();
    let admin = cp.client().await;
    let ns = cluster::test_namespace(&admin, "admission").await;
    // The policy as the chart installs it, its binding narrowed to this namespace.
    let chart = chart().display().to_string();
    let set = format!("runnerNamespaces={{{ns}}}");
    let args = ["template", "runwarden", &chart, "--show-only", "templates/admission.yaml", "--set", &set];
    let (ok, policy) = helm(&args);
    assert!(ok, "{policy}");
    let mut apply = cp.kubectl();
    apply.args(["apply", "--server-side", "-f", "-"]);
    let (ok, out) = run(apply, Some(&policy));
    assert!(ok, "{out}");

    // ARC's container-mode role for the runners' ServiceAccount, and two runner pods.
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "runner", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "create", "delete"]},
                   {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "create", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "runner", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "runner"},
         "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": ns}]}
    ]});
    let mut apply = cp.kubectl();
    apply.args(["apply", "-f", "-"]);
    let (ok, out) = run(apply, Some(&rbac.to_string()));
    assert!(ok, "{out}");
    let pod = |name: &str, labels: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": "runner", "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    };
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let runner_a = pods.create(&PostParams::default(), &pod("runner-a", json!({}))).await.unwrap();
    pods.create(&PostParams::default(), &pod("runner-b", json!({}))).await.unwrap();
    let as_a = cluster::pod_client(cp.config().await.unwrap(), &ns, &runner_a).await;
    let pods_a: Api<Pod> = Api::namespaced(as_a.clone(), &ns);

    // The policy takes a moment to load; meanwhile nothing is denied.
    let denied = |r: Result<Pod, kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("runner-pod=") => Some(s.message),
        Err(e) => panic!("{e}"),
        Ok(_) => None,
    };
    let borrowing = pod("borrowing", json!({"runner-pod": "runner-b"}));
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let started = std::time::Instant::now();
    let message = loop {
        if let Some(m) = denied(pods_a.create(&dry, &borrowing).await) {
            break m;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the policy never denied");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(message.contains("this request came from pod runner-a"), "{message}");

    // What ARC's hooks do is allowed: runner-a labels its own job pod, and makes unlabelled ones.
    pods_a.create(&PostParams::default(), &pod("runner-a-workflow", json!({"runner-pod": "runner-a"}))).await.unwrap();
    pods_a.create(&PostParams::default(), &pod("helper", json!({}))).await.unwrap();
    // Nobody else may name runner-a: not another runner, not a user without a pod.
    let as_b = cluster::pod_client(cp.config().await.unwrap(), &ns, &pods.get("runner-b").await.unwrap()).await;
    let naming_a = pod("naming-a", json!({"runner-pod": "runner-a"}));
    assert!(denied(Api::<Pod>::namespaced(as_b, &ns).create(&PostParams::default(), &naming_a).await).is_some());
    let m = denied(pods.create(&PostParams::default(), &naming_a).await).expect("denied without a pod");
    assert!(m.contains("no pod of this namespace"), "{m}");
    // Jobs: runner-a labels its container step's Job as ARC's hooks do; naming runner-b on a
    // Job or in its pod template is refused.
    let job = |name: &str, own: serde_json::Value, template: serde_json::Value| -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": own},
            "spec": {"template": {"metadata": {"labels": template},
                     "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
        }))
        .unwrap()
    };
    let jobs_a: Api<Job> = Api::namespaced(as_a, &ns);
    jobs_a.create(&PostParams::default(), &job("step", json!({"runner-pod": "runner-a"}), json!({}))).await.unwrap();
    for (own, template) in
        [(json!({"runner-pod": "runner-b"}), json!({})), (json!({}), json!({"runner-pod": "runner-b"}))]
    {
        match jobs_a.create(&PostParams::default(), &job("borrowing-job", own, template)).await {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("runner-pod=runner-b") => {}
            other => panic!("a Job may not name another runner: {other:?}"),
        }
    }

    for kind in ["validatingadmissionpolicybinding", "validatingadmissionpolicy"] {
        let mut delete = cp.kubectl();
        delete.args(["delete", kind, "runwarden-job-pods"]);
        let (ok, out) = run(delete, None);
        assert!(ok, "{out}");
    }
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin).delete(&ns, &DeleteParams::default()).await;
}
