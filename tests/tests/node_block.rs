//! Block mode on the real node, turned on as a user would (`helm install --set
//! agent.blockMode=true`): a runner pod an EgressPolicy in mode Block selects reaches and
//! resolves only what it allows, from its first instruction, and stays held while its node's
//! agent is replaced.
//!
//! A test binary of its own: block mode restarts the agent, which the other real-node tests
//! count on not happening.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use runwarden_tests::install::{SYSTEM, kubectl, kubectl_stdin};
use runwarden_tests::node::NODE_IP;
use runwarden_tests::runner::{Job, agent_logs};
use runwarden_tests::services::{Dns, Listener};
use runwarden_tests::{Node, install};

/// The runner's steps: each prints what happened. `allowed.packages.test` is allowed, the
/// other host is not, by name nor by address.
fn script(denied_ip: &str) -> String {
    format!(
        "wget -q -O /dev/null http://allowed.packages.test:443/ && echo ALLOWED-OK || echo ALLOWED-FAILED; \
         wget -q -O /dev/null http://denied.exfil.test:8080/ && echo NAME-REACHED || echo NAME-REFUSED; \
         nslookup denied.exfil.test >/dev/null 2>&1 && echo NAME-RESOLVED || echo NAME-UNRESOLVED; \
         wget -q -O /dev/null http://{denied_ip}:8080/ && echo IP-REACHED || echo IP-REFUSED; \
         echo STEPS-DONE; sleep 3600"
    )
}

async fn events(node: &Node, ns: &str, reason: &str) -> Vec<Event> {
    let list = Api::<Event>::namespaced(node.client().await, ns).list(&Default::default()).await.unwrap().items;
    list.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).collect()
}

/// Waits until `check` holds, up to `within`; panics with `what` and the agent's log.
async fn wait_until<F: std::future::Future<Output = bool>>(
    node: &Node,
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} after {within:?}\n{}", agent_logs(node));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn exec(node: &Node, ns: &str, pod: &str, script: &str) -> String {
    let out = node.kubectl().args(["-n", ns, "exec", pod, "-c", "runner", "--", "sh", "-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_policy_holds_its_runners_from_their_first_instruction_and_across_agent_restarts() {
    let node = tokio::task::spawn_blocking(Node::shared).await.unwrap();
    let dns = Dns::start(SocketAddr::from((NODE_IP, 53))).expect("serving DNS on the node's address");
    let mut listeners = Vec::new();
    for (i, (name, port)) in
        [("api.github.test", 443), ("allowed.packages.test", 443), ("denied.exfil.test", 8080)].into_iter().enumerate()
    {
        let ip = node.add_address(220 + i as u8).unwrap();
        dns.insert(name, ip);
        listeners.push((name, ip, Listener::start(SocketAddr::from((ip, port))).unwrap()));
    }
    let denied_ip = listeners[2].1.to_string();
    let pages = "https://runwarden.example";
    let ui = ["--set", "operator.ui.enabled=true", "--set", &format!("operator.ui.url={pages}")];
    install::runwarden_with(node, &[&["--set", "agent.blockMode=true"][..], &ui[..]].concat()).await;

    let job = Job::new(node, "blocked").await;
    let policy = format!(
        r#"{{"apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy",
            "metadata": {{"name": "runners", "namespace": "{ns}"}},
            "spec": {{"selector": {{"scaleSets": ["arc-runner-set"]}}, "mode": "Block", "includeBaseline": false,
                      "allowedEndpoints": [{{"host": "*.github.test", "ports": [443], "protocol": "TCP"}},
                                           {{"host": "allowed.packages.test", "ports": [443], "protocol": "TCP"}}]}}}}"#,
        ns = job.ns
    );
    kubectl_stdin(node, &["apply", "-f", "-"], &policy);
    // Ready, and saying so, where the agents enforce it.
    let ready = || async {
        let out = kubectl(
            node,
            &[
                "-n",
                &job.ns,
                "get",
                "egp",
                "runners",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"Ready\")].message}",
            ],
        );
        out.starts_with("True") && out.contains("refused")
    };
    wait_until(node, "the Block policy is not Ready", Duration::from_secs(30), ready).await;

    // A runner whose first instruction (its init container's) calls a host the policy allows,
    // and whose steps call one it does not.
    let runner = job.start(node, 1, "api.github.test", &script(&denied_ip)).await;
    let started = Instant::now();
    while !job.logs(node, &runner).contains("STEPS-DONE") {
        let pod = Api::<Pod>::namespaced(node.client().await, &job.ns).get(&runner).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the runner's steps did not finish: {:?}\n{}\n{}",
            pod.status.map(|s| (s.phase, s.init_container_statuses)),
            job.logs(node, &runner),
            agent_logs(node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = job.logs(node, &runner);
    for want in ["ALLOWED-OK", "NAME-REFUSED", "NAME-UNRESOLVED", "IP-REFUSED"] {
        assert!(log.contains(want), "{want} in the runner's output:\n{log}\n{}", agent_logs(node));
    }
    assert_eq!(listeners[2].2.count(), 0, "nothing reached the denied host");
    let blocked = || async {
        events(node, &job.ns, "EgressBlocked")
            .await
            .iter()
            .any(|e| e.note.as_deref().is_some_and(|n| n.contains(&format!("{denied_ip}:8080/TCP"))))
    };
    wait_until(node, "no EgressBlocked Event for the denied address", Duration::from_secs(30), blocked).await;
    // It links to the run's page.
    let run_page = format!("{pages}/runs/{}/{}", job.ns, runwarden_crds::run::record_name("1", &runner));
    let notes: Vec<String> = events(node, &job.ns, "EgressBlocked").await.into_iter().filter_map(|e| e.note).collect();
    assert!(notes.iter().all(|n| n.ends_with(&format!(" Run page: {run_page}"))), "{notes:?}");

    // A runner whose very first instruction calls the denied address: refused, so its init
    // container fails.
    let first = job.start(node, 2, &denied_ip, "echo never").await;
    let failed = || async {
        let pod = Api::<Pod>::namespaced(node.client().await, &job.ns).get(&first).await.unwrap();
        pod.status.and_then(|s| s.phase).as_deref() == Some("Failed")
    };
    wait_until(node, "the runner's first call was not refused", Duration::from_secs(60), failed).await;
    assert_eq!(listeners[2].2.count(), 0, "nothing reached the denied host");

    // The node's agent is replaced (deleted; the DaemonSet makes another): the runner stays held
    // meanwhile and after.
    let agents = Api::<Pod>::namespaced(node.client().await, SYSTEM);
    let selector = ListParams::default().labels("app.kubernetes.io/component=agent");
    let old = agents.list(&selector).await.unwrap().items.remove(0);
    let old_name = old.metadata.name.clone().unwrap();
    agents.delete(&old_name, &DeleteParams::default().grace_period(0)).await.unwrap();
    let probe = format!("wget -q -O /dev/null http://{denied_ip}:8080/ && echo IP-REACHED || echo IP-REFUSED");
    assert!(exec(node, &job.ns, &runner, &probe).contains("IP-REFUSED"), "held while the agent is replaced");
    let replaced = || async {
        agents.list(&selector).await.unwrap().items.iter().any(|p| {
            p.metadata.name.as_deref() != Some(old_name.as_str())
                && p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| c.iter().all(|c| c.ready))
        })
    };
    wait_until(node, "no new agent is ready", Duration::from_secs(90), replaced).await;
    assert!(exec(node, &job.ns, &runner, &probe).contains("IP-REFUSED"), "held by the new agent");
    let allowed = "wget -q -O /dev/null http://allowed.packages.test:443/ && echo ALLOWED-OK || echo ALLOWED-FAILED";
    let resolves = || async { exec(node, &job.ns, &runner, allowed).contains("ALLOWED-OK") };
    wait_until(node, "the new agent does not answer the runner's DNS", Duration::from_secs(30), resolves).await;
    assert_eq!(listeners[2].2.count(), 0, "nothing reached the denied host");
    job.finish(node, &runner).await;

    // The run's record lists the refused destination as such, with the policy; the baseline
    // counts it and does not learn it (includeBaseline would allow it next).
    let baseline = job.wait_merged(node, 1).await;
    let status = baseline.status.unwrap();
    let run = status.recent_runs.iter().find(|r| r.run_id == "1").unwrap();
    assert_eq!(run.blocked, 1, "{run:?}");
    let learned: Vec<_> = status.endpoints.iter().map(|e| (e.host.clone(), e.cidr.clone(), e.port)).collect();
    assert!(!learned.iter().any(|e| e.2 == 8080), "a refused call is not learned: {learned:?}");
    assert!(status.endpoints.iter().any(|e| e.host.as_deref() == Some("allowed.packages.test")), "{learned:?}");
    let records = Api::<runwarden_crds::WorkflowRun>::namespaced(node.client().await, &job.ns);
    let name = runwarden_crds::run::record_name("1", &runner);
    let started = Instant::now();
    let record = loop {
        if let Some(r) = records.get_opt(&name).await.unwrap() {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no record of run 1\n{}", agent_logs(node));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!((record.spec.blocked_count, record.spec.policy.as_deref()), (1, Some("runners")), "{record:?}");
    let refused = record.spec.endpoints.iter().find(|e| e.address == denied_ip).expect("the refused address listed");
    assert_eq!((refused.port, refused.verdict), (8080, runwarden_crds::RunVerdict::Blocked), "{refused:?}");
    assert!(refused.calls >= 1 && refused.processes.iter().any(|p| p == "wget"), "{refused:?}");
    assert!(refused.reasons[0].contains(&format!("EgressPolicy {}/runners", job.ns)), "{refused:?}");
    let allowed = record.spec.endpoints.iter().find(|e| e.host.as_deref() == Some("allowed.packages.test"));
    assert!(allowed.is_some_and(|e| e.verdict != runwarden_crds::RunVerdict::Blocked), "{record:?}");
}
