//! EgressPolicy reconciliation on a real kube-apiserver: what the schema cannot check is
//! reported in `Ready` with the field named, overlaps say which policy wins, and matched
//! runners are counted.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use runwarden_crds::{ConditionStatus, EgressPolicy};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

mod common;

async fn setup(prefix: &str) -> (Client, String, common::Stop) {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, prefix).await;
    let stop = common::start_operator(&client);
    (client, ns, stop)
}

async fn create_policy(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    let p: EgressPolicy = serde_json::from_value(json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    Api::<EgressPolicy>::namespaced(client.clone(), ns).create(&PostParams::default(), &p).await.unwrap();
}

/// Waits until the policy's Ready condition has `reason`; returns (status, message, matched).
async fn ready(client: &Client, ns: &str, name: &str, reason: &str) -> (ConditionStatus, String, u32) {
    let api: Api<EgressPolicy> = Api::namespaced(client.clone(), ns);
    for _ in 0..200 {
        if let Some(s) = api.get(name).await.unwrap().status
            && let Some(c) = s.conditions.iter().find(|c| c.r#type == "Ready" && c.reason == reason)
        {
            return (c.status, c.message.clone(), s.matched_runners);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("EgressPolicy {name} never got Ready reason {reason}: {:#?}", api.get(name).await.unwrap().status);
}

async fn runner_pod(client: &Client, ns: &str, name: &str, scale_set: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"actions.github.com/scale-set-name": scale_set}},
        "spec": {"containers": [{"name": "runner", "image": "runner"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.unwrap();
}

#[tokio::test]
async fn a_policy_naming_a_missing_secret_is_not_ready_and_says_which_field() {
    let (client, ns, _stop) = setup("policy-secret").await;
    create_policy(
        &client,
        &ns,
        "audit",
        json!({"presets": ["github-actions"], "anomalyDetection": {"notifiers": [
            {"name": "slack", "slack": {"webhookUrlSecretRef": {"name": "runwarden-slack", "key": "url"}}}
        ]}}),
    )
    .await;
    let (status, message, _) = ready(&client, &ns, "audit", "SecretNotFound").await;
    assert_eq!(status, ConditionStatus::False);
    assert!(message.contains("spec.anomalyDetection.notifiers[0].slack.webhookUrlSecretRef"), "{message}");
    assert!(message.contains("runwarden-slack"), "{message}");

    common::wait_for_event(&client, &ns, "PolicyInvalid").await;

    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "runwarden-slack"}, "stringData": {"url": "https://hooks.slack.example/x"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
    // The Secret is there: the Slack notifier is sent to (see node-agent/tests/notify.rs).
    let (status, _, _) = ready(&client, &ns, "audit", "Valid").await;
    assert_eq!(status, ConditionStatus::True);

    // An email notifier's Secret must name the relay's host.
    let api: Api<EgressPolicy> = Api::namespaced(client.clone(), &ns);
    let mail = Secret {
        metadata: kube::api::ObjectMeta { name: Some("relay".into()), ..Default::default() },
        string_data: Some([("port".to_string(), "587".to_string())].into()),
        ..Default::default()
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets.create(&PostParams::default(), &mail).await.unwrap();
    let patch = json!({"spec": {"anomalyDetection": {"notifiers": [
        {"name": "slack", "slack": {"webhookUrlSecretRef": {"name": "runwarden-slack", "key": "url"}}},
        {"name": "security-team", "email": {"to": ["sec@example.org"], "from": "runwarden@example.org",
                                            "smtpSecretRef": {"name": "relay"}}}
    ]}}});
    api.patch("audit", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    let (status, message, _) = ready(&client, &ns, "audit", "SecretNotFound").await;
    assert_eq!(status, ConditionStatus::False);
    assert!(
        message.contains("notifiers[1].email.smtpSecretRef: Secret") && message.contains("no key \"host\""),
        "{message}"
    );
    let host = json!({"stringData": {"host": "smtp.example.org"}});
    secrets.patch("relay", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&host)).await.unwrap();
    let (status, _, _) = ready(&client, &ns, "audit", "Valid").await;
    assert_eq!(status, ConditionStatus::True);

    // Without notifiers the policy is valid.
    let patch = json!({"spec": {"anomalyDetection": {"notifiers": []}}});
    api.patch("audit", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    let (status, message, _) = ready(&client, &ns, "audit", "Valid").await;
    assert_eq!(status, ConditionStatus::True);
    let presets = runwarden_crds::Preset::GithubActions.endpoints().len();
    assert!(message.contains(&format!("allows {presets} endpoints ({presets} from presets)")), "{message}");
}

#[tokio::test]
async fn a_block_policy_is_not_ready_where_block_mode_is_off() {
    let (client, ns, _stop) = setup("policy-block").await;
    // A runner that may open raw sockets (containers get NET_RAW unless it is dropped), and one
    // that may not.
    runner_pod(&client, &ns, "raw", "arc").await;
    let dropped: Pod = serde_json::from_value(json!({
        "metadata": {"name": "dropped", "labels": {"actions.github.com/scale-set-name": "arc"}},
        "spec": {"containers": [{"name": "runner", "image": "runner",
                                 "securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &dropped).await.unwrap();
    create_policy(&client, &ns, "block", json!({"mode": "Block", "presets": ["github-actions"]})).await;
    let (status, message, matched) = ready(&client, &ns, "block", "NotEnforced").await;
    assert_eq!(status, ConditionStatus::False, "Ready never claims protection that does not happen");
    assert!(message.contains("none is refused"), "{message}");
    assert_eq!(matched, 2);
    // Block mode does not see raw sockets: the policy says which runners could use them.
    assert!(message.contains("runner pod raw may open raw sockets") && message.contains("drop NET_RAW"), "{message}");
    assert!(!message.contains("dropped"), "{message}");
    common::wait_for_event(&client, &ns, "NotEnforced").await;
}

#[tokio::test]
async fn overlapping_policies_say_which_one_applies_and_runners_are_counted_once() {
    let (client, ns, _stop) = setup("policy-overlap").await;
    for (name, set) in [("r1", "big"), ("r2", "big"), ("r3", "small")] {
        runner_pod(&client, &ns, name, set).await;
    }
    create_policy(&client, &ns, "aaa-everything", json!({"mode": "Audit"})).await;
    create_policy(&client, &ns, "bbb-big-only", json!({"mode": "Audit", "selector": {"scaleSets": ["big"]}})).await;
    create_policy(&client, &ns, "ccc-other", json!({"selector": {"scaleSets": ["gpu-*"]}})).await;

    let (status, message, matched) = ready(&client, &ns, "bbb-big-only", "Overlapping").await;
    assert_eq!(status, ConditionStatus::True);
    assert!(message.contains("aaa-everything"), "{message}");
    assert_eq!(matched, 0, "the older policy applies to the runners both select");
    let (_, _, matched) = ready(&client, &ns, "aaa-everything", "Valid").await;
    assert_eq!(matched, 3);
    let (_, message, _) = ready(&client, &ns, "ccc-other", "Overlapping").await;
    assert!(message.contains("aaa-everything"), "{message}");

    // A new runner pod is counted without any change to the policy.
    runner_pod(&client, &ns, "r4", "small").await;
    let api: Api<EgressPolicy> = Api::namespaced(client.clone(), &ns);
    for _ in 0..200 {
        let p = api.get("aaa-everything").await.unwrap();
        if p.status.is_some_and(|s| s.matched_runners == 4) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("matchedRunners of {} did not follow the new pod", api.get("aaa-everything").await.unwrap().name_any());
}
