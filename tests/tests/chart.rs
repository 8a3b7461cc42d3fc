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
