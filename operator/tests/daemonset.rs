//! The node-agent DaemonSet on a real kube-apiserver: created as configured, with least
//! privilege, and restored after someone edits it.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;
use kube::api::{Patch, PatchParams};
use runwarden_operator::daemonset::{self, AgentConfig};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::json;

async fn wait_for<F: Fn(&DaemonSet) -> bool>(api: &Api<DaemonSet>, what: &str, check: F) -> DaemonSet {
    for _ in 0..200 {
        if let Some(ds) = api.get_opt(daemonset::NAME).await.unwrap()
            && check(&ds)
        {
            return ds;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the DaemonSet did not become {what} within 20s");
}

#[tokio::test]
async fn the_agent_daemonset_is_created_with_least_privilege_and_restored_after_an_edit() {
    let client = ControlPlane::shared().client().await;
    let ns = cluster::test_namespace(&client, "agent").await;
    // The operator's own Deployment, which is to own the DaemonSet.
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "runwarden-operator"},
        "spec": {"selector": {"matchLabels": {"app": "op"}},
                 "template": {"metadata": {"labels": {"app": "op"}},
                              "spec": {"containers": [{"name": "operator", "image": "runwarden-operator"}]}}}
    }))
    .unwrap();
    let deployment = Api::namespaced(client.clone(), &ns).create(&Default::default(), &deployment).await.unwrap();
    let config = AgentConfig {
        namespace: ns.clone(),
        owner_deployment: Some("runwarden-operator".into()),
        image: "registry.example/runwarden-agent:1.0.0".into(),
        node_selector: [("runwarden.dev/runners".to_string(), "true".to_string())].into(),
        ..AgentConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = std::sync::Arc::new(runwarden_operator::metrics::Metrics::default());
    tokio::spawn(daemonset::run(client.clone(), config, metrics.clone(), async move {
        let _ = stopped.await;
    }));

    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
    let ds = wait_for(&api, "created", |_| true).await;
    let owners = ds.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].uid.as_str()),
        ("Deployment", deployment.metadata.uid.as_deref().unwrap())
    );
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_ne!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("runwarden-agent"));
    assert_eq!(pod.node_selector.unwrap()["runwarden.dev/runners"], "true");
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.example/runwarden-agent:1.0.0"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["BPF".to_string(), "PERFMON".to_string(), "NET_ADMIN".to_string()][..]));
    let env = c.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");

    // Someone widens the agent's privileges and swaps its image, as `kubectl edit` would.
    let edit = json!({"spec": {"template": {"spec": {"containers": [{
        "name": "agent", "image": "evil.example/agent:latest",
        "securityContext": {"readOnlyRootFilesystem": false, "capabilities": {"add": ["SYS_ADMIN"]}}
    }]}}}});
    api.patch(
        daemonset::NAME,
        &PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() },
        &Patch::Strategic(edit),
    )
    .await
    .unwrap();
    wait_for(&api, "restored", |ds| {
        let c = &ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        let sc = c.security_context.as_ref().unwrap();
        c.image.as_deref() == Some("registry.example/runwarden-agent:1.0.0")
            && sc.read_only_root_filesystem == Some(true)
            && sc.capabilities.as_ref().unwrap().add.as_deref()
                == Some(&["BPF".to_string(), "PERFMON".to_string(), "NET_ADMIN".to_string()][..])
    })
    .await;

    // Its pods' state (here written by the test: no kubelet runs) is reflected in the metrics.
    let status = json!({"status": {"desiredNumberScheduled": 3, "numberReady": 2, "numberAvailable": 2,
                                   "currentNumberScheduled": 3, "numberMisscheduled": 0}});
    api.patch_status(daemonset::NAME, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics.encode();
        if text.contains("runwarden_operator_agent_pods{state=\"ready\"} 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("runwarden_operator_agent_pods{state=\"desired\"} 3"), "{text}");
    assert!(text.contains("runwarden_operator_agent_pods{state=\"ready\"} 2"), "{text}");

    // Deleted: recreated on the next reconcile of the watch.
    api.delete(daemonset::NAME, &Default::default()).await.unwrap();
    wait_for(&api, "recreated", |ds| ds.metadata.deletion_timestamp.is_none()).await;
    drop(stop);
}
