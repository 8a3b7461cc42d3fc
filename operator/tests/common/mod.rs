//! Helpers shared by the operator's tests (each test binary uses some of them).
#![allow(dead_code)] // Each test file compiles this module on its own and uses a subset.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt};
use runwarden_operator::arc::EphemeralRunner;
use runwarden_tests::cluster;
use tokio::sync::OnceCell;

/// Dropping it stops the operator started by [`start_operator`].
pub type Stop = tokio::sync::oneshot::Sender<()>;

/// Starts every controller of the operator (default configuration, no leader election) on this
/// test's runtime, until the returned [`Stop`] is dropped.
pub fn start_operator(client: &Client) -> Stop {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = futures::FutureExt::shared(Box::pin(async move {
        let _ = stopped.await;
    }));
    tokio::spawn(runwarden_operator::run(
        client.clone(),
        runwarden_operator::Config::default(),
        Default::default(),
        shutdown,
    ));
    stop
}

/// Installs the minimal `EphemeralRunner` CRD (ARC's field names) once per test binary.
pub async fn install_arc_crd(client: &Client) {
    static ARC: OnceCell<()> = OnceCell::const_new();
    ARC.get_or_init(|| async {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch(
            "ephemeralrunners.actions.github.com",
            &PatchParams::apply("runwarden-tests").force(),
            &Patch::Apply(EphemeralRunner::crd()),
        )
        .await
        .expect("the EphemeralRunner CRD installs");
        cluster::wait_established(&crds, "ephemeralrunners.actions.github.com").await;
    })
    .await;
}

/// Waits up to 10 s for an Event with `reason` in `ns`.
pub async fn wait_for_event(client: &Client, ns: &str, reason: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    for _ in 0..100 {
        let list = events.list(&Default::default()).await.unwrap();
        if let Some(e) = list.items.into_iter().find(|e| e.reason.as_deref() == Some(reason)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {reason} Event in {ns} within 10s");
}

/// Creates the WorkflowBaseline `acme-web-ci-build` (acme/web, ci.yml, job build) in `ns`, as
/// the operator would for that job; its API.
pub async fn acme_baseline(client: &Client, ns: &str) -> Api<runwarden_crds::WorkflowBaseline> {
    let baselines: Api<runwarden_crds::WorkflowBaseline> = Api::namespaced(client.clone(), ns);
    let baseline: runwarden_crds::WorkflowBaseline = serde_json::from_value(serde_json::json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline", "metadata": {"name": "acme-web-ci-build"},
        "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"}
    }))
    .unwrap();
    baselines.create(&kube::api::PostParams::default(), &baseline).await.unwrap();
    baselines
}

/// A token of ServiceAccount `name` of `ns` (what a user of that account sends).
pub async fn service_account_token(client: &Client, ns: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &kube::api::PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}
