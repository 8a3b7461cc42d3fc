//! Helpers for tests that talk to the control plane.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

/// The committed CRD manifests (`crds/` of the checkout being tested).
///
/// Cargo sets `CARGO_MANIFEST_DIR` when it runs a test or binary; that wins over the value
/// compiled in, which may name another checkout when several share one target directory.
pub fn crd_dir() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(manifest_dir).join("../crds")
}

/// The CRDs as committed in `crds/*.yaml`, in file-name order.
pub fn committed_crds() -> Vec<(String, CustomResourceDefinition)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crd_dir())
        .expect("crds/ exists")
        .map(|e| e.expect("crds/ is readable").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a CRD file is readable");
            let crd = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not a CRD: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), crd)
        })
        .collect()
}

/// Installs the committed CRDs once per test binary (server-side apply) and waits until the
/// apiserver serves them (`Established`).
pub async fn ensure_crds(client: &Client) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED.get_or_init(|| install_crds(client)).await;
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("runwarden-tests").force();
    for (file, crd) in committed_crds() {
        let name = crd.metadata.name.clone().expect("a CRD has a name");
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("crds/{file} was refused by the apiserver: {e}"));
        wait_established(&api, &name).await;
    }
}

/// Waits until the CRD `name` has condition `Established=True`.
pub async fn wait_established(api: &Api<CustomResourceDefinition>, name: &str) {
    for _ in 0..300 {
        let crd = api.get(name).await.expect("the CRD exists");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("CRD {name} not Established after 30s");
}

/// Creates a namespace of the test's own (`<prefix>-xxxxx`) with its `default` ServiceAccount
/// (there is no controller-manager to create it) and returns its name.
///
/// Namespaces are not deleted: without a controller-manager deletion never finishes, and the
/// whole control plane goes away with the test binary.
pub async fn test_namespace(client: &Client, prefix: &str) -> String {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.generate_name = Some(format!("{prefix}-"));
    let ns = namespaces.create(&PostParams::default(), &ns).await.expect("creating a test namespace");
    let name = ns.metadata.name.expect("the apiserver names a generated namespace");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("default".into());
    accounts.create(&PostParams::default(), &sa).await.expect("creating the default ServiceAccount");
    name
}

/// A client that acts as pod `pod` of `namespace` with a token of its ServiceAccount bound to
/// it (what a process in the pod holds, and what ARC's container hooks use): requests carry
/// the pod's name and UID in their user's extra (`authentication.kubernetes.io/pod-name`).
pub async fn pod_client(config: kube::Config, namespace: &str, pod: &k8s_openapi::api::core::v1::Pod) -> Client {
    use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
    let admin = Client::try_from(config.clone()).expect("the admin client builds");
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin, namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .expect("a token bound to the pod")
        .status
        .expect("the token request's status")
        .token;
    let mut config = config;
    config.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    Client::try_from(config).expect("the pod's client builds")
}

/// Labels namespace `ns` `runwarden.dev/self-declared-identities=true`, as a cluster
/// administrator does to let its `runwarden.dev/monitor` pods declare their own job.
pub async fn allow_self_declared(client: &Client, ns: &str) {
    let label = json!({"metadata": {"labels": {runwarden_crds::identity::SELF_DECLARED_LABEL: "true"}}});
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("labelling the namespace");
}
