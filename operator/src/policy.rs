//! `EgressPolicy`: checks what the schema cannot, reports it in `Ready`, and counts the runners
//! a policy covers.
//!
//! - Notifier secrets must exist and hold their key; otherwise `Ready=False`,
//!   reason `SecretNotFound`, and the message names the field. Secrets are read by name only
//!   (never listed or watched), and only those an administrator listed (Helm value
//!   `notifierSecrets`): others are `SecretNotReadable`, with the value to set. An invalid
//!   policy is checked again every 10 s.
//! - Policies of one namespace whose selectors can select the same runner overlap. For such a
//!   runner the oldest policy applies (by creation time, then name); a newer overlapping policy
//!   is `Ready=True` with reason `Overlapping` and a message naming the policy that wins.
//! - What the installation does not do is never reported as Ready: a `Block` policy is
//!   `Ready=False`, reason `NotEnforced` (calls are reported as in `Audit` mode; none is
//!   refused) unless the node agents enforce block mode (the agent configuration's
//!   `blockMode`, Helm value `agent.blockMode`). The policy still applies to anomaly detection.
//! - `status.matchedRunners` counts the runner pods (ARC's, or labelled
//!   `runwarden.dev/monitor=true`) the selector covers and for which this policy wins: an ARC
//!   runner by its scale-set label and the job its `EphemeralRunner` was given, a labelled pod
//!   by its label and identity annotations.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use runwarden_crds::policy::glob_match;
use runwarden_crds::{Condition, ConditionStatus, EgressPolicy, PolicyMode, RunnerSelector};
use serde_json::json;
use tracing::warn;

use crate::arc::{EphemeralRunner, SCALE_SET_LABEL};
use crate::identity::MONITOR_LABEL;
use crate::metrics::Metrics;
use crate::{Error, FIELD_MANAGER, Result, Scope, instrumented, record_event};

struct Ctx {
    client: Client,
    policies: Store<EgressPolicy>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    scope: Scope,
    /// Whether ARC's `EphemeralRunner` API is installed (runners' jobs can be read).
    arc: bool,
    /// Whether the node agents enforce block mode (the agent configuration's `blockMode`).
    block_mode: bool,
}

/// Runs the `EgressPolicy` controller until `shutdown` completes (`arc`: whether ARC's
/// `EphemeralRunner` API is installed).
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    scope: Scope,
    arc: bool,
    block_mode: bool,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let policies: Api<EgressPolicy> = Api::all(client.clone());
    let controller = Controller::new(policies, watcher::Config::default());
    let store = controller.store();
    metrics.count_watched("EgressPolicy", store.clone());
    let everyone_in = |store: Store<EgressPolicy>| {
        move |ns: Option<String>| -> Vec<ObjectRef<EgressPolicy>> {
            store.state().iter().filter(|p| p.namespace() == ns).map(|p| ObjectRef::from_obj(&**p)).collect()
        }
    };
    let for_pod = everyone_in(store.clone());
    let for_monitored_pod = everyone_in(store.clone());
    let for_runner = everyone_in(store.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
    let mut controller = controller
        .watches(pods.clone(), watcher::Config::default().labels(SCALE_SET_LABEL), move |p| for_pod(p.namespace()))
        .watches(pods, watcher::Config::default().labels(&format!("{MONITOR_LABEL}=true")), move |p| {
            for_monitored_pod(p.namespace())
        });
    if arc {
        // A runner's job decides which policies select it.
        controller =
            controller.watches(Api::<EphemeralRunner>::all(client.clone()), watcher::Config::default(), move |r| {
                for_runner(r.namespace())
            });
    }
    controller
        .with_config(crate::controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            |p, ctx| async move {
                if !ctx.scope.handles(p.namespace().as_deref()) {
                    return Ok(Action::await_change());
                }
                instrumented(&ctx.metrics.clone(), "policies", reconcile(p, ctx)).await
            },
            error_policy,
            Arc::new(Ctx { client, policies: store, recorder, metrics, scope, arc, block_mode }),
        )
        .for_each(|_| async {})
        .await;
}

async fn reconcile(policy: Arc<EgressPolicy>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let now = Timestamp::now();

    let (status, reason, mut message) = match missing_secret(&ctx.client, &ns, &policy).await? {
        Some((reason, problem)) => (ConditionStatus::False, reason, problem),
        None if not_enforced(&policy, ctx.block_mode) => (
            ConditionStatus::False,
            "NotEnforced",
            "mode Block is off in this installation (Helm value agent.blockMode): calls that are not allowed are \
             reported as in Audit mode and none is refused"
                .to_string(),
        ),
        None => match winner_over(&policy, &ctx.policies) {
            Some(older) => (
                ConditionStatus::True,
                "Overlapping",
                format!(
                    "selects runners that EgressPolicy {older} (older) also selects; for those runners {older} applies"
                ),
            ),
            None => (ConditionStatus::True, "Valid", allowance(&policy)),
        },
    };
    let (matched, raw) = matched_runners(&ctx.client, &ns, &policy, &ctx.policies, ctx.arc).await?;
    if policy.spec.mode == PolicyMode::Block
        && let Some(first) = raw.first()
    {
        let more = if raw.len() > 1 { format!(" and {} more", raw.len() - 1) } else { String::new() };
        message.push_str(&format!(
            "; runner pod {first}{more} may open raw sockets, which block mode does not see: drop NET_RAW \
             (securityContext.capabilities.drop) in the runners' pod template"
        ));
    }

    let previous = policy.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"));
    let unchanged = previous.is_some_and(|c| c.status == status && c.reason == reason && c.message == message)
        && policy
            .status
            .as_ref()
            .is_some_and(|s| s.matched_runners == matched && s.observed_generation == policy.metadata.generation);
    if unchanged {
        return Ok(Action::requeue(recheck(status)));
    }
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let ready = Condition {
        r#type: "Ready".into(),
        status,
        observed_generation: policy.metadata.generation,
        last_transition_time: since,
        reason: reason.into(),
        message: message.clone(),
    };
    let patch = json!({
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "EgressPolicy",
        "status": {"observedGeneration": policy.metadata.generation, "matchedRunners": matched, "conditions": [ready]},
    });
    let api: Api<EgressPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    publish_invalid(&ctx, &policy, status, reason, previous, message).await;
    Ok(Action::requeue(recheck(status)))
}

/// Invalid policies are checked again soon: the operator does not watch Secrets (that would
/// mean reading every Secret of the cluster), so a created Secret is noticed on the next check.
fn recheck(status: ConditionStatus) -> Duration {
    if status == ConditionStatus::False { Duration::from_secs(10) } else { Duration::from_secs(600) }
}

/// Records a `PolicyInvalid` Event when the policy has just become invalid.
async fn publish_invalid(
    ctx: &Ctx,
    policy: &EgressPolicy,
    status: ConditionStatus,
    reason: &str,
    previous: Option<&Condition>,
    message: String,
) {
    let changed = previous.is_none_or(|c| c.status != status || c.reason != reason);
    if status == ConditionStatus::False && changed {
        // A broken policy is invalid; one asking for what this version does not do says so.
        let event = if reason.starts_with("Secret") { "PolicyInvalid" } else { reason };
        record_event(&ctx.recorder, policy, EventType::Warning, event, "Validate", message).await;
    }
}

/// Whether the policy asks for what this installation does not do: Block with block mode off.
fn not_enforced(policy: &EgressPolicy, block_mode: bool) -> bool {
    policy.spec.mode == PolicyMode::Block && !block_mode
}

/// What a valid policy allows, with its presets resolved.
fn allowance(policy: &EgressPolicy) -> String {
    let from_presets: usize = policy.spec.presets.iter().map(|p| p.endpoints().len()).sum();
    let baseline = if policy.spec.include_baseline { " plus what each job's baseline learned" } else { "" };
    let mode = match policy.spec.mode {
        PolicyMode::Block => "; calls to anything else are refused",
        PolicyMode::Audit => "",
    };
    format!(
        "valid; allows {} endpoints ({} from presets){baseline}{mode}",
        policy.spec.allowed_endpoints.len() + from_presets,
        from_presets
    )
}

/// The first notifier whose Secret (or key) is missing, as a message naming the field.
async fn missing_secret(client: &Client, ns: &str, policy: &EgressPolicy) -> Result<Option<(&'static str, String)>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (i, n) in policy.spec.anomaly_detection.notifiers.iter().enumerate() {
        let mut refs = Vec::new();
        if let Some(w) = &n.webhook {
            refs.push(("webhook.urlSecretRef", &w.url_secret_ref.name, Some(w.url_secret_ref.key.as_str())));
            if let Some(s) = &w.signing_secret_ref {
                refs.push(("webhook.signingSecretRef", &s.name, Some(s.key.as_str())));
            }
        }
        if let Some(s) = &n.slack {
            refs.push((
                "slack.webhookUrlSecretRef",
                &s.webhook_url_secret_ref.name,
                Some(s.webhook_url_secret_ref.key.as_str()),
            ));
        }
        if let Some(e) = &n.email {
            refs.push(("email.smtpSecretRef", &e.smtp_secret_ref.name, Some("host")));
        }
        for (field, name, key) in refs {
            let path = format!("spec.anomalyDetection.notifiers[{i}].{field}");
            let not_found = "SecretNotFound";
            match secrets.get_opt(name).await {
                Err(e) if crate::rbac::forbidden(&e) => {
                    return Ok(Some((
                        "SecretNotReadable",
                        format!("{path}: {}", crate::rbac::secret_not_readable(ns, name)),
                    )));
                }
                Err(e) => return Err(e.into()),
                Ok(None) => {
                    let problem = format!("{path}: Secret {ns}/{name} does not exist; create it or fix the name");
                    return Ok(Some((not_found, problem)));
                }
                Ok(Some(secret)) => {
                    if let Some(key) = key {
                        let has = secret.data.as_ref().is_some_and(|d| d.contains_key(key))
                            || secret.string_data.as_ref().is_some_and(|d| d.contains_key(key));
                        if !has {
                            return Ok(Some((not_found, format!("{path}: Secret {ns}/{name} has no key {key:?}"))));
                        }
                    }
                }
            }
        }
    }
    Ok(None)
}

/// The oldest other policy of the namespace that overlaps `policy` and is older, if any.
fn winner_over(policy: &EgressPolicy, store: &Store<EgressPolicy>) -> Option<String> {
    let age = |p: &EgressPolicy| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any());
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == policy.namespace() && o.name_any() != policy.name_any())
        .filter(|o| age(o) < age(policy) && selectors_overlap(&o.spec.selector, &policy.spec.selector))
        .min_by_key(|o| age(o))
        .map(|o| o.name_any())
}

/// Runner pods of the namespace that `policy` selects and for which no older policy applies.
/// Whether a pod's containers may open raw or packet sockets (`CAP_NET_RAW`, which container
/// runtimes grant unless it is dropped): those sends pass no cgroup `connect`/`sendmsg` hook.
pub fn may_open_raw_sockets(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| {
        let sc = c.security_context.as_ref();
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let dropped =
            caps.and_then(|c| c.drop.as_ref()).is_some_and(|d| d.iter().any(|x| x == "NET_RAW" || x == "ALL"));
        let added = caps.and_then(|c| c.add.as_ref()).is_some_and(|a| a.iter().any(|x| x == "NET_RAW" || x == "ALL"));
        let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
        privileged || added || !dropped
    })
}

/// The runner pods the policy applies to: how many, and the names of those that may open raw
/// sockets.
async fn matched_runners(
    client: &Client,
    ns: &str,
    policy: &EgressPolicy,
    store: &Store<EgressPolicy>,
    arc: bool,
) -> Result<(u32, Vec<String>)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let runners = pods.list(&ListParams::default().labels(SCALE_SET_LABEL)).await?.items;
    let labelled = pods.list(&ListParams::default().labels(&format!("{MONITOR_LABEL}=true"))).await?.items;
    // ARC runners' jobs, by EphemeralRunner UID.
    let jobs: std::collections::HashMap<String, crate::identity::JobIdentity> = if runners.is_empty() || !arc {
        Default::default()
    } else {
        Api::<EphemeralRunner>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|r| Some((r.metadata.uid.clone()?, r.status.as_ref()?.identity().ok()?)))
            .collect()
    };
    let age = |p: &EgressPolicy| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any());
    let older: Vec<_> = store
        .state()
        .into_iter()
        .filter(|o| o.namespace() == policy.namespace() && o.name_any() != policy.name_any() && age(o) < age(policy))
        .collect();
    let wins = |selects: &dyn Fn(&RunnerSelector) -> bool| {
        selects(&policy.spec.selector) && !older.iter().any(|o| selects(&o.spec.selector))
    };
    let arc = runners.iter().filter(|pod| {
        let scale_set = pod.labels().get(SCALE_SET_LABEL).map(String::as_str);
        let job = pod.owner_references().iter().find(|o| o.kind == "EphemeralRunner").and_then(|o| jobs.get(&o.uid));
        let (repository, workflow) = (job.map(|j| j.repository.as_str()), job.map(|j| j.workflow.as_str()));
        wins(&|s: &RunnerSelector| s.selects_job(scale_set, repository, workflow))
    });
    let labelled = labelled.iter().filter(|pod| !pod.labels().contains_key(SCALE_SET_LABEL));
    let matched: Vec<&Pod> =
        arc.chain(labelled.filter(|pod| wins(&|s: &RunnerSelector| s.selects(&pod.metadata)))).collect();
    let raw = matched.iter().filter(|p| may_open_raw_sockets(p)).map(|p| p.name_any()).collect();
    Ok((matched.len() as u32, raw))
}

/// Whether two selectors can select the same runner: in every dimension, some pair of globs
/// can match one value (an empty list matches everything).
pub fn selectors_overlap(a: &RunnerSelector, b: &RunnerSelector) -> bool {
    let dim = |x: &[String], y: &[String]| {
        x.is_empty() || y.is_empty() || x.iter().any(|g| y.iter().any(|h| globs_intersect(g, h)))
    };
    dim(&a.scale_sets, &b.scale_sets) && dim(&a.repositories, &b.repositories) && dim(&a.workflows, &b.workflows)
}

/// Whether some string matches both globs. Exact when either has at most one `*`; with more it
/// errs towards "yes" (an overlap reported that cannot happen is harmless, a missed one is not).
pub fn globs_intersect(a: &str, b: &str) -> bool {
    match (a.contains('*'), b.contains('*')) {
        (false, false) => a == b,
        (false, true) => glob_match(b, a),
        (true, false) => glob_match(a, b),
        (true, true) => {
            let (a_pre, a_suf) = (a.split('*').next().unwrap_or(""), a.rsplit('*').next().unwrap_or(""));
            let (b_pre, b_suf) = (b.split('*').next().unwrap_or(""), b.rsplit('*').next().unwrap_or(""));
            let compatible_prefix = a_pre.starts_with(b_pre) || b_pre.starts_with(a_pre);
            let compatible_suffix = a_suf.ends_with(b_suf) || b_suf.ends_with(a_suf);
            compatible_prefix && compatible_suffix
        }
    }
}

fn error_policy(_: Arc<EgressPolicy>, error: &Error, _: Arc<Ctx>) -> Action {
    warn!(error = %error, "EgressPolicy reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str) -> EgressPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "p"},
            "spec": {"mode": mode, "presets": ["github-actions"]}
        }))
        .unwrap()
    }

    #[test]
    fn a_block_policy_is_ready_only_where_the_agents_enforce_block_mode() {
        assert!(not_enforced(&policy("Block"), false));
        assert!(!not_enforced(&policy("Block"), true));
        assert!(!not_enforced(&policy("Audit"), false));
        assert!(allowance(&policy("Block")).ends_with("calls to anything else are refused"));
        assert!(!allowance(&policy("Audit")).contains("refused"));
    }

    fn sel(scale_sets: &[&str], repositories: &[&str]) -> RunnerSelector {
        RunnerSelector {
            scale_sets: scale_sets.iter().map(|s| s.to_string()).collect(),
            repositories: repositories.iter().map(|s| s.to_string()).collect(),
            workflows: vec![],
        }
    }

    #[test]
    fn overlapping_selectors_are_found() {
        assert!(selectors_overlap(&sel(&[], &[]), &sel(&["big"], &["acme/*"])));
        assert!(selectors_overlap(&sel(&["big"], &["acme/*"]), &sel(&["big"], &["acme/web"])));
        assert!(selectors_overlap(&sel(&[], &["acme/*"]), &sel(&[], &["*/web"])));
        assert!(!selectors_overlap(&sel(&["big"], &[]), &sel(&["small"], &[])));
        assert!(!selectors_overlap(&sel(&[], &["acme/*"]), &sel(&[], &["other/*"])));
    }
}
