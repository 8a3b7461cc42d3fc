//! The runwarden API against a real kube-apiserver: the CRDs install, the examples are accepted,
//! invalid objects are refused with a message naming the field, identity is immutable, the
//! status subresource is separate from spec, `kubectl explain` shows our docs, and the largest
//! object the schema allows stays under 1 MiB.
//!
//! Needs the control-plane binaries built by `make setup`; `make test` runs it.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use runwarden_crds::baseline::*;
use runwarden_crds::endpoint::{Condition, ConditionStatus, MAX_CONDITIONS};
use runwarden_crds::{EgressPolicy, WorkflowBaseline};
use runwarden_tests::{ControlPlane, cluster};
use serde_json::{Value, json};

async fn setup(prefix: &str) -> (Client, String) {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let ns = cluster::test_namespace(&client, prefix).await;
    (client, ns)
}

fn dynamic_api<K: Resource<DynamicType = ()>>(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<K>(&()))
}

/// Creates `obj` (JSON of any runwarden kind) in `ns`.
async fn create(client: &Client, ns: &str, obj: Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(obj).expect("test objects are valid JSON objects");
    let api = match obj.types.as_ref().map(|t| t.kind.as_str()) {
        Some("EgressPolicy") => dynamic_api::<EgressPolicy>(client, ns),
        Some("WorkflowBaseline") => dynamic_api::<WorkflowBaseline>(client, ns),
        other => panic!("not a runwarden kind: {other:?}"),
    };
    api.create(&PostParams::default(), &obj).await
}

/// Asserts the apiserver refused `obj` as invalid, naming `field` and saying `says`.
async fn assert_rejected(obj: Value, field: &str, says: &str) {
    let (client, ns) = setup("invalid").await;
    match create(&client, &ns, obj).await {
        Ok(_) => panic!("the apiserver accepted an object that is invalid at {field}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got: {status:?}");
            assert!(status.message.contains(field), "message does not name {field}: {}", status.message);
            assert!(status.message.contains(says), "message does not say {says:?}: {}", status.message);
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn policy(spec: Value) -> Value {
    json!({"apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy",
           "metadata": {"name": "policy"}, "spec": spec})
}

fn policy_with_endpoint(endpoint: Value) -> Value {
    policy(json!({"allowedEndpoints": [endpoint]}))
}

fn baseline(spec: Value) -> Value {
    let mut full = json!({"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build"});
    merge(&mut full, spec);
    json!({"apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
           "metadata": {"name": "baseline"}, "spec": full})
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

#[tokio::test]
async fn kubectl_apply_installs_both_crds_and_they_become_established() {
    let cp = ControlPlane::shared();
    let out = cp.kubectl().arg("apply").arg("-f").arg(cluster::crd_dir()).output().expect("kubectl runs");
    assert!(out.status.success(), "kubectl apply -f crds/ failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["egresspolicies.runwarden.dev", "workflowbaselines.runwarden.dev"] {
        assert!(stdout.contains(name), "kubectl did not apply {name}: {stdout}");
    }
    let client = cp.client().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    cluster::wait_established(&crds, "egresspolicies.runwarden.dev").await;
    cluster::wait_established(&crds, "workflowbaselines.runwarden.dev").await;
}

#[tokio::test]
async fn every_example_object_is_accepted() {
    let (client, ns) = setup("examples").await;
    let dir = cluster::crd_dir().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 3, "expected at least three examples in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut obj: Value = serde_yaml::from_str(&text).unwrap();
        obj["metadata"]["namespace"] = json!(ns);
        let created = create(&client, &ns, obj).await.unwrap_or_else(|e| panic!("{} was refused: {e}", file.display()));
        assert!(created.metadata.uid.is_some());
    }
}

#[tokio::test]
async fn defaults_are_filled_in_by_the_apiserver() {
    let (client, ns) = setup("defaults").await;
    let policies: Api<EgressPolicy> = Api::namespaced(client.clone(), &ns);
    create(&client, &ns, policy(json!({}))).await.unwrap();
    let p = policies.get("policy").await.unwrap();
    assert_eq!(p.spec.mode, runwarden_crds::PolicyMode::Audit);
    assert!(p.spec.include_baseline);
    assert_eq!(p.spec.anomaly_detection.min_severity, runwarden_crds::Severity::Medium);

    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &ns);
    create(&client, &ns, baseline(json!({}))).await.unwrap();
    let b = baselines.get("baseline").await.unwrap();
    assert_eq!(b.spec.mode, BaselineMode::Auto);
    assert_eq!(b.spec.learning, LearningSpec::default());
    assert_eq!(b.spec.learning.min_runs, 10);
}

// ---- invalid objects: each is refused, and the message names the field ----

#[tokio::test]
async fn host_with_two_wildcards_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "*.*.example.com"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "single '*' wildcard").await;
}

#[tokio::test]
async fn host_with_a_wildcard_inside_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "api.*.example.com"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "only as the leading label").await;
}

#[tokio::test]
async fn uppercase_host_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "API.GitHub.com"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "must be lowercase").await;
}

#[tokio::test]
async fn wildcard_over_a_top_level_domain_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "*.com"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "at least two labels").await;
}

#[tokio::test]
async fn host_label_starting_with_a_dash_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "-bad.example.com"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "must be a DNS name").await;
}

#[tokio::test]
async fn host_label_longer_than_63_characters_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": format!("{}.example.com", "a".repeat(64))}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "must be a DNS name").await;
}

#[tokio::test]
async fn host_longer_than_253_characters_is_rejected() {
    let long = format!("{}.com", vec!["a".repeat(60); 5].join("."));
    let obj = policy_with_endpoint(json!({"host": long}));
    assert_rejected(obj, "spec.allowedEndpoints[0].host", "253").await;
}

#[tokio::test]
async fn malformed_cidr_is_rejected() {
    let obj = policy_with_endpoint(json!({"cidr": "10.0.0.0/33"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].cidr", "must be a CIDR").await;
}

#[tokio::test]
async fn cidr_with_host_bits_set_is_rejected() {
    let obj = policy_with_endpoint(json!({"cidr": "10.1.2.3/8"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].cidr", "bits set after the prefix").await;
}

#[tokio::test]
async fn endpoint_with_both_host_and_cidr_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "api.github.com", "cidr": "140.82.112.0/20"}));
    assert_rejected(obj, "spec.allowedEndpoints[0]", "exactly one of host or cidr").await;
}

#[tokio::test]
async fn endpoint_with_neither_host_nor_cidr_is_rejected() {
    let obj = policy_with_endpoint(json!({"ports": [443]}));
    assert_rejected(obj, "spec.allowedEndpoints[0]", "exactly one of host or cidr").await;
}

#[tokio::test]
async fn port_zero_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "api.github.com", "ports": [0]}));
    assert_rejected(obj, "spec.allowedEndpoints[0].ports[0]", "greater than or equal to 1").await;
}

#[tokio::test]
async fn port_above_65535_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "api.github.com", "ports": [70000]}));
    assert_rejected(obj, "spec.allowedEndpoints[0].ports[0]", "less than or equal to 65535").await;
}

#[tokio::test]
async fn unknown_protocol_is_rejected() {
    let obj = policy_with_endpoint(json!({"host": "api.github.com", "protocol": "ICMP"}));
    assert_rejected(obj, "spec.allowedEndpoints[0].protocol", "Unsupported value: \"ICMP\"").await;
}

#[tokio::test]
async fn unknown_policy_mode_is_rejected() {
    assert_rejected(policy(json!({"mode": "Enforce"})), "spec.mode", "Unsupported value: \"Enforce\"").await;
}

#[tokio::test]
async fn more_than_256_allowed_endpoints_are_rejected() {
    let endpoints: Vec<Value> = (0..257).map(|i| json!({"host": format!("h{i}.example.com")})).collect();
    assert_rejected(policy(json!({"allowedEndpoints": endpoints})), "spec.allowedEndpoints", "at most 256 items").await;
}

#[tokio::test]
async fn block_mode_that_allows_nothing_is_rejected() {
    let obj = policy(json!({"mode": "Block", "includeBaseline": false}));
    assert_rejected(obj, "spec.mode", "would refuse every call").await;
}

#[tokio::test]
async fn notifier_with_two_destinations_is_rejected() {
    let secret = json!({"name": "s", "key": "url"});
    let obj = policy(json!({"anomalyDetection": {"notifiers": [
        {"name": "both", "webhook": {"urlSecretRef": secret}, "slack": {"webhookUrlSecretRef": secret}}
    ]}}));
    assert_rejected(obj, "spec.anomalyDetection.notifiers[0]", "exactly one of webhook, slack or email").await;
}

#[tokio::test]
async fn email_notifier_with_a_bad_address_is_rejected() {
    let obj = policy(json!({"anomalyDetection": {"notifiers": [
        {"name": "mail", "email": {"to": ["not-an-address"], "from": "a@example.com", "smtpSecretRef": {"name": "s"}}}
    ]}}));
    assert_rejected(obj, "spec.anomalyDetection.notifiers[0].email.to", "email address").await;
}

#[tokio::test]
async fn an_abused_service_with_a_wildcard_or_unknown_category_is_rejected() {
    let obj = policy(
        json!({"anomalyDetection": {"abusedServices": {"add": [{"host": "*.paste.example", "category": "Paste"}]}}}),
    );
    assert_rejected(obj, "spec.anomalyDetection.abusedServices.add[0].host", "no '*.'").await;
    let obj = policy(
        json!({"anomalyDetection": {"abusedServices": {"add": [{"host": "paste.example", "category": "Pastes"}]}}}),
    );
    assert_rejected(obj, "spec.anomalyDetection.abusedServices.add[0].category", "Unsupported value").await;
    let obj = policy(json!({"anomalyDetection": {"abusedServices": {"ignore": ["ipify.org", "IPInfo.io"]}}}));
    assert_rejected(obj, "spec.anomalyDetection.abusedServices.ignore", "lowercase domain name").await;
}

#[tokio::test]
async fn unknown_minimum_severity_is_rejected() {
    let obj = policy(json!({"anomalyDetection": {"minSeverity": "Severe"}}));
    assert_rejected(obj, "spec.anomalyDetection.minSeverity", "Unsupported value: \"Severe\"").await;
}

#[tokio::test]
async fn unknown_preset_is_rejected() {
    let obj = policy(json!({"presets": ["all-of-the-internet"]}));
    assert_rejected(obj, "spec.presets[0]", "Unsupported value").await;
}

#[tokio::test]
async fn repository_that_is_not_owner_slash_name_is_rejected() {
    assert_rejected(baseline(json!({"repository": "acme"})), "spec.repository", "'owner/name'").await;
}

#[tokio::test]
async fn workflow_with_a_ref_is_rejected() {
    let obj = baseline(json!({"workflow": ".github/workflows/ci.yml@refs/heads/main"}));
    assert_rejected(obj, "spec.workflow", "without '@ref'").await;
}

#[tokio::test]
async fn a_trusted_ref_that_is_not_a_full_ref_or_prefix_is_rejected() {
    for bad in ["main", "refs/heads/rel*", "refs/*/main"] {
        let obj = baseline(json!({"learning": {"trustedRefs": ["refs/heads/main", bad]}}));
        assert_rejected(obj, "spec.learning.trustedRefs", "a full ref (refs/heads/main) or a prefix ending in /*")
            .await;
    }
}

#[tokio::test]
async fn baseline_without_a_job_is_rejected() {
    let mut obj = baseline(json!({}));
    obj["spec"].as_object_mut().unwrap().remove("job");
    assert_rejected(obj, "spec.job", "Required value").await;
}

#[tokio::test]
async fn min_runs_of_zero_is_rejected() {
    let obj = baseline(json!({"learning": {"minRuns": 0}}));
    assert_rejected(obj, "spec.learning.minRuns", "greater than or equal to 1").await;
}

#[tokio::test]
async fn min_runs_above_1000_is_rejected() {
    let obj = baseline(json!({"learning": {"minRuns": 5000}}));
    assert_rejected(obj, "spec.learning.minRuns", "less than or equal to 1000").await;
}

#[tokio::test]
async fn expiry_of_zero_days_is_rejected() {
    let obj = baseline(json!({"learning": {"expireAfterDays": 0}}));
    assert_rejected(obj, "spec.learning.expireAfterDays", "greater than or equal to 1").await;
}

#[tokio::test]
async fn unknown_baseline_mode_is_rejected() {
    assert_rejected(baseline(json!({"mode": "Paused"})), "spec.mode", "Unsupported value: \"Paused\"").await;
}

#[tokio::test]
async fn approved_endpoint_with_a_bad_host_is_rejected() {
    let obj = baseline(json!({"approved": [{"host": "evil.*"}]}));
    assert_rejected(obj, "spec.approved[0].host", "single '*' wildcard").await;
}

// ---- identity, status, explain, size ----

#[tokio::test]
async fn identity_fields_cannot_change_after_creation() {
    let (client, ns) = setup("immutable").await;
    create(&client, &ns, baseline(json!({}))).await.unwrap();
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let changes = [
        ("repository", json!("acme/other"), "repository is immutable"),
        ("workflow", json!(".github/workflows/other.yml"), "workflow is immutable"),
        ("job", json!("test"), "job is immutable"),
    ];
    for (field, value, says) in changes {
        let patch = json!({"spec": {field: value}});
        let err = api
            .patch("baseline", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err(&format!("changing spec.{field} must be refused"));
        let kube::Error::Api(status) = err else { panic!("unexpected error: {err}") };
        assert_eq!(status.code, 422);
        assert!(status.message.contains(&format!("spec.{field}")), "{}", status.message);
        assert!(status.message.contains(says), "{}", status.message);
    }
    // Mutable fields still change.
    let patch = json!({"spec": {"mode": "Frozen"}});
    let b = api.patch("baseline", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    assert_eq!(b.spec.mode, BaselineMode::Frozen);
    assert_eq!(b.spec.repository, "acme/web");
}

#[tokio::test]
async fn status_and_spec_are_written_separately() {
    let (client, ns) = setup("status").await;
    create(&client, &ns, baseline(json!({}))).await.unwrap();
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let created = api.get("baseline").await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    // A status write does not change spec or generation.
    let status = json!({"status": {"phase": "Monitoring", "observedRuns": 12, "endpointCount": 0},
                        "spec": {"mode": "Frozen"}});
    let after_status = api.patch_status("baseline", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(after_status.status.as_ref().unwrap().observed_runs, 12);
    assert_eq!(after_status.spec.mode, BaselineMode::Auto, "the status subresource must ignore spec");
    assert_eq!(after_status.metadata.generation, Some(1));

    // A spec write does not change status, and bumps generation.
    let spec = json!({"spec": {"mode": "Learning"}, "status": {"observedRuns": 999}});
    let after_spec = api.patch("baseline", &PatchParams::default(), &Patch::Merge(&spec)).await.unwrap();
    assert_eq!(after_spec.spec.mode, BaselineMode::Learning);
    let st = after_spec.status.unwrap();
    assert_eq!(st.observed_runs, 12, "the main resource must ignore status");
    assert_eq!(st.phase, Some(BaselinePhase::Monitoring));
    assert_eq!(after_spec.metadata.generation, Some(2));
}

#[tokio::test]
async fn status_over_its_bounds_is_rejected() {
    let (client, ns) = setup("status-bounds").await;
    create(&client, &ns, baseline(json!({}))).await.unwrap();
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let endpoint = json!({"host": "a.example.com", "port": 443, "protocol": "TCP", "state": "Learned"});
    let status = json!({"status": {"endpoints": vec![endpoint; MAX_ENDPOINTS + 1]}});
    let err = api.patch_status("baseline", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!("unexpected error: {err}") };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("status.endpoints"), "{}", status.message);
    assert!(status.message.contains(&format!("at most {MAX_ENDPOINTS} items")), "{}", status.message);
}

#[tokio::test]
async fn a_status_endpoint_with_both_a_host_and_a_pattern_is_rejected() {
    let (client, ns) = setup("status-endpoint").await;
    create(&client, &ns, baseline(json!({}))).await.unwrap();
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let endpoint = json!({"host": "a.example.com", "pattern": "a#.example.com", "port": 443, "protocol": "TCP",
                          "state": "Learned"});
    let status = json!({"status": {"endpoints": [endpoint]}});
    let err = api.patch_status("baseline", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!("unexpected error: {err}") };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("status.endpoints[0]"), "{}", status.message);
    assert!(status.message.contains("exactly one of host, cidr or pattern"), "{}", status.message);
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let client = ControlPlane::shared().client().await;
    cluster::ensure_crds(&client).await;
    let out = ControlPlane::shared()
        .kubectl()
        .args(["explain", "workflowbaseline.spec.learning"])
        .output()
        .expect("kubectl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl explain failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("When the baseline counts as settled and when learned endpoints expire"), "{text}");
    assert!(text.contains("minRuns"), "{text}");
    assert!(text.contains("Finished runs to learn from before any call of this job is reported"), "{text}");

    let out = ControlPlane::shared().kubectl().args(["explain", "egp.spec.mode"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refuses them"), "{text}");
}

/// A valid DNS name of the maximum length, 253 characters.
fn longest_host() -> String {
    let label = "a".repeat(63);
    format!("{label}.{label}.{label}.{}", "b".repeat(61))
}

fn time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-28T10:00:00Z".parse().unwrap())
}

/// Every list full and every string at its maximum length.
fn largest_status() -> WorkflowBaselineStatus {
    let s = |n: usize| "x".repeat(n);
    // Exactly one of host, cidr and pattern may be set: the longest is a host or a pattern.
    let endpoint = LearnedEndpoint {
        host: Some(s(253)),
        cidr: None,
        pattern: None,
        members: u32::MAX,
        port: 65535,
        protocol: runwarden_crds::Protocol::Udp,
        runs_seen: u32::MAX,
        first_seen_run: Some(s(32)),
        first_seen_time: Some(time()),
        last_seen_run: Some(s(32)),
        last_seen_time: Some(time()),
        processes: vec![s(64); MAX_PROCESSES],
        triggers: vec![s(32); MAX_TRIGGERS],
        last_seen_run_number: u32::MAX,
        state: EndpointState::Anomalous,
        severity: Some(runwarden_crds::Severity::Critical),
    };
    let anomaly = Anomaly {
        endpoint: s(300),
        process: Some(s(64)),
        severity: runwarden_crds::Severity::Critical,
        score: 0.987_654_321_012_345_6,
        reasons: vec![s(160); MAX_REASONS],
    };
    let run = RunRecord {
        run_id: s(32),
        runner: Some(s(63)),
        time: time(),
        trigger: Some(s(32)),
        git_ref: Some(s(255)),
        calls: u32::MAX,
        endpoints: u32::MAX,
        new_endpoints: u32::MAX,
        anomaly_count: u32::MAX,
        blocked: u32::MAX,
        anomalies: vec![anomaly; MAX_ANOMALIES_PER_RUN],
    };
    let condition = |i: usize| Condition {
        r#type: format!("{}{i}", s(63)),
        status: ConditionStatus::Unknown,
        observed_generation: Some(i64::MAX),
        last_transition_time: time(),
        reason: s(128),
        message: s(1024),
    };
    WorkflowBaselineStatus {
        phase: Some(BaselinePhase::Monitoring),
        observed_runs: u32::MAX,
        observed_generation: Some(i64::MAX),
        last_run_time: Some(time()),
        endpoint_count: MAX_ENDPOINTS as u32,
        evicted_endpoints: u32::MAX,
        evicted_anomalies: u32::MAX,
        endpoints: vec![endpoint; MAX_ENDPOINTS],
        recent_new_endpoints: vec![u32::MAX; MAX_CHURN_WINDOW],
        trigger_runs: (0..MAX_TRIGGER_KINDS)
            .map(|i| TriggerRuns { trigger: format!("{}{i:02}", s(30)), runs: u32::MAX })
            .collect(),
        recent_runs: vec![run; MAX_RECENT_RUNS],
        conditions: (0..MAX_CONDITIONS).map(condition).collect(),
    }
}

#[tokio::test]
async fn the_largest_baseline_the_schema_allows_is_accepted_and_under_1_mib() {
    let (client, ns) = setup("largest").await;
    let approved: Vec<Value> = (0..MAX_APPROVED)
        .map(|_| {
            json!({"host": longest_host(), "ports": (1..=16).collect::<Vec<u16>>(),
                        "protocol": "TCP", "description": "d".repeat(200)})
        })
        .collect();
    let obj = baseline(json!({
        "repository": format!("{}/{}", "o".repeat(39), "r".repeat(100)),
        "workflow": "w".repeat(255),
        "job": "j".repeat(256),
        "approved": approved,
    }));
    create(&client, &ns, obj).await.expect("the largest spec is accepted");
    let api: Api<WorkflowBaseline> = Api::namespaced(client, &ns);
    let patch = json!({"status": largest_status()});
    api.patch_status("baseline", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the largest status is accepted");
    let stored = api.get("baseline").await.unwrap();
    assert_eq!(stored.status.as_ref().unwrap().endpoints.len(), MAX_ENDPOINTS);
    let size = serde_json::to_vec(&stored).unwrap().len();
    eprintln!("largest WorkflowBaseline: {size} bytes of JSON");
    assert!(size < 1024 * 1024, "the largest baseline is {size} bytes, over 1 MiB");
}
