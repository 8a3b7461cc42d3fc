//! The operator under exactly the RBAC it ships (operator/rbac.yaml), not as cluster-admin, on a
//! real kube-apiserver: preflight passes and every controller does its work; a ServiceAccount
//! without it fails preflight with the missing permissions named. The committed rbac.yaml is
//! what the code generates.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use runwarden_crds::{EgressPolicy, WorkflowBaseline};
use runwarden_operator::arc::{EphemeralRunner, EphemeralRunnerSpec};
use runwarden_operator::preflight::{self, PreflightError};
use runwarden_operator::{Config, rbac};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

mod common;

/// A client acting as `system:serviceaccount:<ns>:<name>`.
async fn as_service_account(ns: &str, name: &str) -> Client {
    let mut config = ControlPlane::shared().config().await.unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).unwrap()
}

async fn apply_all(admin: &Client, objects: Vec<serde_json::Value>) {
    for obj in objects {
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        let types = obj.types.clone().unwrap();
        let (group, version) = types.api_version.split_once('/').unwrap_or(("", &types.api_version));
        let plural = match types.kind.as_str() {
            "ServiceAccount" => "serviceaccounts",
            "ClusterRole" => "clusterroles",
            "ClusterRoleBinding" => "clusterrolebindings",
            "Role" => "roles",
            "RoleBinding" => "rolebindings",
            other => panic!("unexpected kind {other}"),
        };
        let ar = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = match obj.namespace() {
            Some(ns) => Api::namespaced_with(admin.clone(), &ns, &ar),
            None => Api::all_with(admin.clone(), &ar),
        };
        api.patch(&obj.name_any(), &PatchParams::apply("runwarden-tests").force(), &Patch::Apply(&obj)).await.unwrap();
    }
}

#[test]
fn the_committed_rbac_is_what_the_code_uses() {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let committed = std::fs::read_to_string(std::path::Path::new(&manifest).join("rbac.yaml")).unwrap();
    assert!(committed == rbac::yaml("runwarden-system"), "operator/rbac.yaml is stale; run `make generate`");
    let chart = std::path::Path::new(&manifest).join("../charts/runwarden/templates/operator-rbac.yaml");
    let chart = std::fs::read_to_string(chart).unwrap();
    assert!(
        chart == rbac::RBAC.chart_yaml(),
        "charts/runwarden/templates/operator-rbac.yaml is stale; run `make generate`"
    );
}

#[tokio::test]
async fn the_operator_works_under_exactly_its_rbac_cluster_wide_or_narrowed_to_runner_namespaces() {
    let admin = ControlPlane::shared().client().await;
    cluster::ensure_crds(&admin).await;
    common::install_arc_crd(&admin).await;
    let system = cluster::test_namespace(&admin, "runwarden-system").await;
    let runners = cluster::test_namespace(&admin, "arc-runners").await;

    // Without the RBAC: preflight names what is missing.
    let nobody = as_service_account(&system, "nobody").await;
    match preflight::check(&nobody, &system, &[]).await {
        Err(PreflightError::MissingPermissions(missing)) => {
            assert!(missing.iter().any(|m| m == "create runwarden.dev/workflowbaselines"), "{missing:?}");
            assert!(
                missing.iter().any(|m| m == &format!("update coordination.k8s.io/leases in {system}")),
                "{missing:?}"
            );
        }
        other => panic!("expected missing permissions, got {other:?}"),
    }
    // The shipped RBAC (operator/rbac.yaml): everything cluster-wide.
    does_its_work(&admin, &system, &runners, &[]).await;

    // The chart's RBAC with runnerNamespaces set: writes and Secret reads only there.
    let system = cluster::test_namespace(&admin, "runwarden-system").await;
    let runners = cluster::test_namespace(&admin, "arc-runners").await;
    let elsewhere = cluster::test_namespace(&admin, "other-team").await;
    let narrowed = [runners.clone()];
    let objects = rbac::manifests_for(&system, &narrowed);
    apply_all(&admin, objects).await;
    let operator = as_service_account(&system, rbac::NAME).await;
    match preflight::check(&operator, &system, std::slice::from_ref(&elsewhere)).await {
        Err(PreflightError::MissingPermissions(missing)) => {
            let create = format!("create runwarden.dev/workflowbaselines in {elsewhere}");
            assert!(missing.contains(&create), "{missing:?}");
        }
        other => panic!("a namespace the RBAC does not name fails preflight, got {other:?}"),
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(operator.clone(), &elsewhere);
    match secrets.get_opt("anything").await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("the operator reads no Secret it was not given, got {other:?}"),
    }
    does_its_work(&admin, &system, &runners, &narrowed).await;
}

/// Applies the operator's RBAC for an operator in `system` (runner permissions in
/// `runner_namespaces`, or cluster-wide), runs it as its ServiceAccount, and checks that every
/// controller did its work on a runner in `runners`; then stops it.
async fn does_its_work(admin: &Client, system: &str, runners: &str, runner_namespaces: &[String]) {
    let admin = admin.clone();
    let (system, runners) = (system.to_string(), runners.to_string());
    apply_all(&admin, rbac::manifests_for(&system, runner_namespaces)).await;
    // The notifier Secrets an administrator listed; a Secret of the same namespace that is not
    // listed (ARC's GitHub App key lives in such a place) stays unreadable.
    let listed = rbac::Grant { namespace: runners.clone(), names: vec!["missing".into(), "hook".into()] };
    apply_all(&admin, rbac::notifier_secrets(&system, &[listed])).await;
    let app_key: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "github-app"}, "stringData": {"private-key": "not for runwarden"}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &runners)
        .create(&PostParams::default(), &app_key)
        .await
        .unwrap();
    let operator = as_service_account(&system, rbac::NAME).await;
    match Api::<k8s_openapi::api::core::v1::Secret>::namespaced(operator.clone(), &runners).get_opt("github-app").await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("an unlisted Secret of a runner namespace is not readable, got {other:?}"),
    }
    preflight::check(&operator, &system, runner_namespaces).await.expect("preflight passes under the shipped RBAC");
    // The operator's Deployment, as the chart installs it: it owns the agent DaemonSet.
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "runwarden-operator"},
        "spec": {"selector": {"matchLabels": {"app": "op"}},
                 "template": {"metadata": {"labels": {"app": "op"}}, "spec": {"containers": [{"name": "op", "image": "op"}]}}}
    }))
    .unwrap();
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &system)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let config = Config {
        manage_agent: true,
        agent: runwarden_operator::daemonset::AgentConfig {
            namespace: system.clone(),
            owner_deployment: Some("runwarden-operator".into()),
            runner_namespaces: runner_namespaces.to_vec(),
            ..Default::default()
        },
        runner_namespaces: runner_namespaces.to_vec(),
        run_history: None,
        ui_address: None,
        ui_token_auth: false,
        ui_url: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = futures::FutureExt::shared(Box::pin(async move {
        let _ = stopped.await;
    }));
    let (op, sys) = (operator.clone(), system.clone());
    let task = tokio::spawn(async move {
        runwarden_operator::run_elected(op, config, Default::default(), &sys, "operator-0", shutdown).await
    });

    // Every controller, as the admin sees its results.
    let runner_api: Api<EphemeralRunner> = Api::namespaced(admin.clone(), &runners);
    let runner = runner_api
        .create(&PostParams::default(), &EphemeralRunner::new("runner-0", EphemeralRunnerSpec::default()))
        .await
        .unwrap();
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "runner-0", "labels": {"actions.github.com/scale-set-name": "arc"}},
        "spec": {"containers": [{"name": "runner", "image": "runner"}]}
    }))
    .unwrap();
    pod.metadata.owner_references = Some(vec![kube::Resource::controller_owner_ref(&runner, &()).unwrap()]);
    Api::<Pod>::namespaced(admin.clone(), &runners).create(&PostParams::default(), &pod).await.unwrap();
    let job = json!({"status": {"jobRepositoryName": "acme/web", "jobDisplayName": "build",
                                "jobWorkflowRef": "acme/web/.github/workflows/ci.yml@refs/heads/main", "workflowRunId": 5}});
    runner_api.patch_status("runner-0", &PatchParams::default(), &Patch::Merge(&job)).await.unwrap();
    let policy: EgressPolicy = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "audit"},
        "spec": {"selector": {"repositories": ["acme/*"]}, "anomalyDetection": {"notifiers": [{"name": "hook", "webhook": {"urlSecretRef": {"name": "missing", "key": "url"}}}]}}
    }))
    .unwrap();
    Api::<EgressPolicy>::namespaced(admin.clone(), &runners).create(&PostParams::default(), &policy).await.unwrap();
    let policy: EgressPolicy = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "steals"},
        "spec": {"selector": {"scaleSets": ["none"]}, "anomalyDetection": {"notifiers": [{"name": "hook", "webhook": {"urlSecretRef": {"name": "github-app", "key": "private-key"}}}]}}
    }))
    .unwrap();
    Api::<EgressPolicy>::namespaced(admin.clone(), &runners).create(&PostParams::default(), &policy).await.unwrap();

    let mut done = [false; 6];
    for _ in 0..300 {
        let p = Api::<EgressPolicy>::namespaced(admin.clone(), &runners).get("audit").await.unwrap();
        // The runner's job, read from its EphemeralRunner, is what the selector selects.
        done[0] = p.status.as_ref().is_some_and(|s| s.matched_runners == 1);
        let baselines =
            Api::<WorkflowBaseline>::namespaced(admin.clone(), &runners).list(&Default::default()).await.unwrap();
        done[1] = baselines.items.iter().any(|b| b.status.as_ref().is_some_and(|s| !s.conditions.is_empty()));
        let steals = Api::<EgressPolicy>::namespaced(admin.clone(), &runners).get("steals").await.unwrap();
        done[2] = p.status.is_some_and(|s| s.conditions.iter().any(|c| c.reason == "SecretNotFound"))
            && steals.status.is_some_and(|s| {
                s.conditions.iter().any(|c| c.reason == "SecretNotReadable" && c.message.contains("notifierSecrets"))
            });
        let ds = Api::<DaemonSet>::namespaced(admin.clone(), &system).get_opt("runwarden-agent").await.unwrap();
        // Owned by the operator's Deployment, so uninstalling the operator removes the agent.
        done[3] = ds.is_some_and(|ds| ds.owner_references().iter().any(|o| o.uid == deployment.uid().unwrap()));
        let lease = Api::<Lease>::namespaced(admin.clone(), &system).get_opt("runwarden-operator").await.unwrap();
        done[4] = lease.and_then(|l| l.spec?.holder_identity).as_deref() == Some("operator-0");
        let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(admin.clone(), &runners);
        done[5] = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("PolicyInvalid"));
        if done.iter().all(|d| *d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        done, [true; 6],
        "runner matched by its job, baseline created and reconciled, policies validated (listed Secret missing, unlisted one not readable), DaemonSet applied with its owner, Lease held, \
         Event recorded"
    );
    assert!(!task.is_finished(), "the operator is still running: {:?}", task);

    // The run pages behind an Ingress, as the same ServiceAccount: who a token is (TokenReview),
    // what it may see (SubjectAccessReview), the baselines and the record it reads.
    let record: runwarden_crds::WorkflowRun = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "5-runner-0"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build", "baseline": "b",
                 "runId": "5", "runner": "runner-0", "node": "n", "started": "2026-12-03T10:00:00Z",
                 "finished": "2026-12-03T10:05:00Z", "calls": 1, "endpointCount": 0, "newEndpointCount": 0, "anomalyCount": 0}
    }))
    .unwrap();
    Api::<runwarden_crds::WorkflowRun>::namespaced(admin.clone(), &runners)
        .create(&PostParams::default(), &record)
        .await
        .unwrap();
    apply_all(&admin, vec![
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "reader", "namespace": runners},
               "rules": [{"apiGroups": ["runwarden.dev"], "resources": ["workflowbaselines"], "verbs": ["get"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader", "namespace": runners},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": runners}]}),
    ])
    .await;
    let token = common::service_account_token(&admin, &runners, "default").await;
    // Reached as through an Ingress: at the machine's own address, not loopback.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect("192.0.2.1:9").unwrap();
    let address = std::net::SocketAddr::new(probe.local_addr().unwrap().ip(), listener.local_addr().unwrap().port());
    let access = runwarden_operator::ui::Access::Token(std::sync::Arc::new(runwarden_operator::ui::Reviews::new(
        operator.clone(),
    )));
    let pages = tokio::spawn(runwarden_operator::ui::run(operator.clone(), listener, access));
    let path = format!("/runs/{runners}/5-runner-0");
    let status = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.lines().next().unwrap_or_default().to_string()
    })
    .await
    .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "a reader's run page, served under the operator's RBAC");
    pages.abort();
    drop(stop);
    let stopped = tokio::time::timeout(Duration::from_secs(30), task).await;
    assert!(stopped.is_ok(), "the operator stops when asked");
}
