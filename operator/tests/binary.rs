//! The `runwarden-operator` binary against a real kube-apiserver: without the CRDs, or without
//! its permissions, it says what is missing in one line and exits with a distinct code.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it. This file has a
//! control plane of its own (the CRDs are absent at first).

use std::process::Command;

use runwarden_tests::{ControlPlane, cluster};

/// Runs the operator binary with `kubeconfig`, returning its exit code and stderr+stdout.
fn run_operator(kubeconfig: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_runwarden-operator"))
        .args(["--metrics-addr", "127.0.0.1:0", "--no-leader-elect"])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", "runwarden-system")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("the operator binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test]
async fn missing_crds_and_missing_permissions_are_clear_exits() {
    let cp = ControlPlane::shared();
    let (code, log) = run_operator(&cp.kubeconfig);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("CRD (runwarden.dev/v1alpha1) is not installed"), "{log}");
    assert!(log.contains("kubectl apply -f crds/"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    let client = cp.client().await;
    cluster::ensure_crds(&client).await;
    // The same kubeconfig, acting as a ServiceAccount that has no RBAC.
    let text = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let limited = cp.dir.join("kubeconfig-nobody");
    std::fs::write(
        &limited,
        text.replace("    token:", "    as: system:serviceaccount:runwarden-system:nobody\n    token:"),
    )
    .unwrap();
    let (code, log) = run_operator(&limited);
    assert_eq!(code, Some(3), "{log}");
    assert!(log.contains("the operator lacks permissions"), "{log}");
    assert!(log.contains("create runwarden.dev/workflowbaselines"), "{log}");
    assert!(log.contains("apply operator/rbac.yaml"), "{log}");

    // With everything but ARC it says so once and keeps running.
    let log_path = cp.dir.join("operator-no-arc.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_runwarden-operator"))
        .args(["--metrics-addr", "127.0.0.1:0", "--no-leader-elect"])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("POD_NAMESPACE", "runwarden-system")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(child.try_wait().unwrap().is_none(), "the operator keeps running without ARC");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("Actions Runner Controller is not installed").count(), 1, "{log}");
}

#[test]
fn it_prints_shell_completions_that_know_its_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_runwarden-operator")).args(["--completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("metrics-addr") && script.contains("no-leader-elect"), "{shell}: {script}");
    }
}
