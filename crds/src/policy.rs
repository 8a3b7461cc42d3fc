//! `EgressPolicy`: which runners a policy covers, what they may call, and what happens to a
//! call that is not allowed (reported in `Audit` mode, refused in `Block` mode).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::endpoint::{Condition, EndpointRule, MAX_CONDITIONS, Severity};
use crate::identity;

/// Most allowed endpoints in one policy.
pub const MAX_ALLOWED_ENDPOINTS: usize = 256;
/// Most notifiers of one policy.
pub const MAX_NOTIFIERS: usize = 8;

/// Which runners the policy covers, what they may call, and what happens to other calls.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "runwarden.dev",
    version = "v1alpha1",
    kind = "EgressPolicy",
    namespaced,
    status = "EgressPolicyStatus",
    shortname = "egp",
    category = "runwarden",
    doc = "What the GitHub Actions runners of a namespace may call, and what happens to a call that is not allowed: reported (Audit) or refused (Block).",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Runners","type":"integer","jsonPath":".status.matchedRunners"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.mode != 'Block' || size(self.allowedEndpoints) > 0 || size(self.presets) > 0 || self.includeBaseline"
).message("Block mode with no allowedEndpoints, no presets and includeBaseline false would refuse every call; allow something or use Audit mode").field_path(".mode"))]
pub struct EgressPolicySpec {
    /// Which runner pods of this namespace the policy covers. Empty: all of them.
    #[serde(default)]
    pub selector: RunnerSelector,

    /// `Audit` (the default) reports calls that are not allowed; `Block` also refuses them
    /// (the caller's connect or send fails with EPERM).
    #[serde(default)]
    pub mode: PolicyMode,

    /// Destinations the covered runners may call, in addition to `presets` and, with
    /// `includeBaseline`, what their jobs' baselines learned. At most 256.
    #[serde(default)]
    #[schemars(length(max = MAX_ALLOWED_ENDPOINTS))]
    pub allowed_endpoints: Vec<EndpointRule>,

    /// Named sets of endpoints maintained by runwarden. `github-actions`: the GitHub hosts a
    /// runner needs to receive jobs, download actions and upload logs and artifacts.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub presets: Vec<Preset>,

    /// Whether endpoints learned (or approved) in each job's WorkflowBaseline count as allowed.
    /// Default true.
    #[serde(default = "default_true")]
    pub include_baseline: bool,

    /// Reporting of anomalous calls (calls not in the job's baseline).
    #[serde(default)]
    pub anomaly_detection: AnomalyDetection,

    /// In `Block` mode, what happens while the node's agent is away (restarting, or gone: no
    /// sign of it for 3 s): `false` (the default) keeps the runners held (what they may call
    /// stays allowed, their DNS gets no answer), `true` lets their calls through and their DNS
    /// go to the servers they asked until the agent is back (calls meanwhile are not reported).
    #[serde(default)]
    pub fail_open: bool,
}

fn default_true() -> bool {
    true
}

/// Selects runner pods. Every list that is set must match (AND); within a list any entry may
/// match (OR). Globs use `*` for any run of characters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSelector {
    /// ARC runner scale set names (the `actions.github.com/scale-set-name` label of runner
    /// pods), e.g. `arc-runner-set`. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub scale_sets: Vec<String>,

    /// Repositories of the jobs, as `owner/name` globs, e.g. `acme/*`. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 140)))]
    pub repositories: Vec<String>,

    /// Workflow file paths of the jobs, as globs, e.g. `.github/workflows/release-*.yml`.
    /// At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 255)))]
    pub workflows: Vec<String>,
}

impl RunnerSelector {
    /// Whether the selector selects a runner of scale set `scale_set` running a job of
    /// `repository` and `workflow` (`None`: not known yet, selected only where the selector
    /// does not look at it).
    pub fn selects_job(&self, scale_set: Option<&str>, repository: Option<&str>, workflow: Option<&str>) -> bool {
        let any = |globs: &[String], value: Option<&str>| {
            globs.is_empty() || value.is_some_and(|v| globs.iter().any(|g| glob_match(g, v)))
        };
        any(&self.scale_sets, scale_set) && any(&self.repositories, repository) && any(&self.workflows, workflow)
    }

    /// Whether the selector selects the pod with this metadata by its scale-set label and the
    /// job annotations of a self-declared runner ([`crate::identity::annotations`]).
    pub fn selects(&self, pod: &ObjectMeta) -> bool {
        let (labels, annotations) = (pod.labels.as_ref(), pod.annotations.as_ref());
        let annotation = |k| annotations.and_then(|a| a.get(k)).map(String::as_str);
        self.selects_job(
            labels.and_then(|l| l.get(identity::SCALE_SET_LABEL)).map(String::as_str),
            annotation(identity::annotations::REPOSITORY),
            annotation(identity::annotations::WORKFLOW),
        )
    }
}

/// The oldest policy (by creation time, then name): of several that select one runner in its
/// namespace, it applies, and later ones report `Overlapping`.
fn oldest<'a>(policies: impl Iterator<Item = &'a EgressPolicy>) -> Option<&'a EgressPolicy> {
    policies.min_by_key(|p| (p.metadata.creation_timestamp.clone().map(|t| t.0), p.metadata.name.clone()))
}

/// The policy that applies to a job's runner in `namespace`, from what identifies it: its scale
/// set, repository and workflow (what a selector looks at), whether or not the pod still exists.
pub fn applicable_to_job<'a>(
    policies: impl IntoIterator<Item = &'a EgressPolicy>,
    namespace: &str,
    scale_set: Option<&str>,
    repository: &str,
    workflow: &str,
) -> Option<&'a EgressPolicy> {
    oldest(policies.into_iter().filter(|p| {
        p.metadata.namespace.as_deref() == Some(namespace)
            && p.spec.selector.selects_job(scale_set, Some(repository), Some(workflow))
    }))
}

/// The policy that applies to a runner in `namespace` of scale set `scale_set` before its job is
/// known: of the policies that select it on what is known (its scale set), the oldest. A
/// policy that looks at repositories or workflows selects no runner whose job is not known.
pub fn applicable_to_runner<'a>(
    policies: impl IntoIterator<Item = &'a EgressPolicy>,
    namespace: &str,
    scale_set: Option<&str>,
) -> Option<&'a EgressPolicy> {
    oldest(policies.into_iter().filter(|p| {
        p.metadata.namespace.as_deref() == Some(namespace) && p.spec.selector.selects_job(scale_set, None, None)
    }))
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(glob: &str, value: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || !value[first.len()..].ends_with(last) || value.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// What happens to a call that is not allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyMode {
    /// Report it.
    #[default]
    Audit,
    /// Refuse it in the kernel and report it.
    Block,
}

/// A named set of endpoints maintained by runwarden.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Preset {
    /// The GitHub hosts an Actions runner needs.
    #[serde(rename = "github-actions")]
    GithubActions,
}

impl Preset {
    /// The endpoints of the preset, as rules (HTTPS unless noted).
    pub fn endpoints(self) -> Vec<EndpointRule> {
        let https = |host: &str, why: &str| EndpointRule {
            host: Some(host.to_string()),
            ports: vec![443],
            protocol: Some(crate::Protocol::Tcp),
            description: Some(why.to_string()),
            ..EndpointRule::default()
        };
        match self {
            Preset::GithubActions => vec![
                https("github.com", "git, job messages"),
                https("api.github.com", "REST API, action downloads"),
                https("codeload.github.com", "action and repository archives"),
                https("pipelines.actions.githubusercontent.com", "runner registration and job messages"),
                https("*.actions.githubusercontent.com", "runner service (pipelines*, results-receiver, broker)"),
                https("objects.githubusercontent.com", "release and action assets"),
                https("objects-origin.githubusercontent.com", "release and action assets"),
                https("release-assets.githubusercontent.com", "release assets"),
                https("github-releases.githubusercontent.com", "release assets"),
                https("raw.githubusercontent.com", "raw file downloads by actions"),
                https("*.blob.core.windows.net", "logs, artifacts and caches (productionresultssa*)"),
                https("ghcr.io", "GitHub Container Registry"),
                https("pkg-containers.githubusercontent.com", "GitHub Container Registry layers"),
            ],
        }
    }
}

/// Reporting of calls that are not in the job's baseline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnomalyDetection {
    /// Whether anomalous calls are reported at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Least severity that is reported (`Info`, `Low`, `Medium`, `High`, `Critical`).
    /// Default `Medium`.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,

    /// Where reports go besides Kubernetes Events and metrics. At most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NOTIFIERS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub notifiers: Vec<Notifier>,

    /// The built-in lists of abused services (paste hosts, IP-echo services, request catchers,
    /// tunnels, mining pools, file drops, secret-validation APIs, dynamic DNS), extended or
    /// overridden for the runners this policy covers. A call to a listed service that the job
    /// has not learned or approved is reported at least High.
    #[serde(default, skip_serializing_if = "AbusedServices::is_empty")]
    pub abused_services: AbusedServices,
}

/// Most entries in `abusedServices.add` and in `abusedServices.ignore`.
pub const MAX_ABUSED_SERVICES: usize = 256;

/// A domain as a list entry: lowercase, two or more labels, no wildcard.
const DOMAIN_RULE: &str =
    r"self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\.)+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')";
/// [`DOMAIN_RULE`] for every entry of a list.
const IGNORE_RULE: &str =
    r"self.all(d, d.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\.)+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'))";

/// Changes to the built-in abused-service lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbusedServices {
    /// Services to add (for example an internal paste host, or a tunnel provider the lists
    /// do not know). A domain covers every name below it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ABUSED_SERVICES))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["host".into()]))]
    pub add: Vec<AbusedService>,

    /// Domains that are never treated as abused services here, built-in or added (for example
    /// `ipify.org` for a job that legitimately checks its address). A domain covers every name
    /// below it. Calls to them are still scored like any other new host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ABUSED_SERVICES), inner(length(min = 3, max = 253)))]
    #[x_kube(validation = Rule::new(IGNORE_RULE).message("every entry must be a lowercase domain name such as 'ipify.org' (it covers every name below it; no '*.')"))]
    pub ignore: Vec<String>,
}

impl AbusedServices {
    fn is_empty(&self) -> bool {
        self.add.is_empty() && self.ignore.is_empty()
    }
}

/// One abused service to add.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbusedService {
    /// The service's domain; it covers every name below it (`paste.example.com` covers
    /// `eu.paste.example.com`).
    #[schemars(length(min = 3, max = 253))]
    #[x_kube(validation = Rule::new(DOMAIN_RULE).message("must be a lowercase domain name such as 'paste.example.com' (it covers every name below it; no '*.')"))]
    pub host: String,
    /// What kind of service it is (shown in reports).
    pub category: AbusedServiceCategory,
}

/// Kinds of abused services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AbusedServiceCategory {
    /// Paste and gist hosts.
    Paste,
    /// Services that tell a process its public address.
    IpEcho,
    /// Request catchers, out-of-band testing hosts, bot and webhook APIs.
    RequestCatcher,
    /// Tunnel services.
    Tunnel,
    /// Cryptocurrency mining pools.
    MiningPool,
    /// Anonymous file drops.
    FileDrop,
    /// APIs that tell whether a stolen key works.
    SecretValidation,
    /// Dynamic DNS and address-in-name services.
    DynamicDns,
}

fn default_min_severity() -> Severity {
    Severity::Medium
}

impl Default for AnomalyDetection {
    fn default() -> Self {
        Self {
            enabled: true,
            min_severity: default_min_severity(),
            notifiers: Vec::new(),
            abused_services: AbusedServices::default(),
        }
    }
}

/// A destination for reports: exactly one of `webhook`, `slack` or `email`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.webhook), has(self.slack), has(self.email)].filter(x, x).size() == 1")
    .message("set exactly one of webhook, slack or email"))]
pub struct Notifier {
    /// Name of the notifier, unique in this policy (used in metrics and logs).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,

    /// POST each report as JSON to a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookNotifier>,

    /// Post each report to a Slack incoming webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackNotifier>,

    /// Send each report by email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailNotifier>,
}

/// A generic JSON webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookNotifier {
    /// Secret key (in this namespace) holding the URL; URLs often carry credentials.
    pub url_secret_ref: SecretKeyRef,

    /// Secret key (in this namespace) holding a shared key: each request then carries
    /// `X-Runwarden-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, so the receiver can
    /// check that runwarden sent it (the body holds its time, against replays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretKeyRef>,
}

/// A Slack incoming webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlackNotifier {
    /// Secret key (in this namespace) holding the incoming-webhook URL.
    pub webhook_url_secret_ref: SecretKeyRef,
}

/// Email through an SMTP relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmailNotifier {
    /// Recipients. Between 1 and 16.
    #[schemars(length(min = 1, max = 16), inner(length(min = 3, max = 254)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^[^@ ]+@[^@ ]+$'))").message("every recipient must be an email address"))]
    pub to: Vec<String>,

    /// Sender address.
    #[schemars(length(min = 3, max = 254))]
    #[x_kube(validation = Rule::new("self.matches('^[^@ ]+@[^@ ]+$')").message("must be an email address"))]
    pub from: String,

    /// Secret (in this namespace) describing the SMTP relay: `host`; optionally `port`
    /// (default 587), `username` and `password`, `tls` (`starttls`, the default: the relay must
    /// offer STARTTLS and nothing is sent in clear; `tls`: TLS from the first byte, usually port
    /// 465; `none`: no encryption, for a relay on a trusted network) and `ca.crt` (PEM CA
    /// certificates to trust instead of the system's).
    pub smtp_secret_ref: SecretRef,
}

/// A key of a Secret in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the operator found when it last reconciled the policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicyStatus {
    /// `metadata.generation` of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,

    /// Runner pods the policy currently covers.
    #[serde(default)]
    pub matched_runners: u32,

    /// `Ready` (the policy is valid and loaded by the node agents; when `False`, the reason and
    /// message name the offending field) and others. At most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// What each notifier delivered since the operator started (counts) and its last failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NOTIFIERS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub notifiers: Vec<NotifierStatus>,
}

/// Deliveries of one notifier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifierStatus {
    /// The notifier's name in the spec.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Reports delivered.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub sent: i64,
    /// Reports given up on after retries, or refused by the receiver.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub failed: i64,
    /// Reports not sent because the notifier was over its rate.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub rate_limited: i64,
    /// When a report was last delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_time: Option<Time>,
    /// When a delivery last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Why it last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        assert!(glob_match("acme/*", "acme/web"));
        assert!(!glob_match("acme/*", "other/web"));
        assert!(glob_match(".github/workflows/release-*.yml", ".github/workflows/release-npm.yml"));
        assert!(glob_match("*-runners-*", "arc-runners-big"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("exact", "exact"));
    }

    fn policy(name: &str, created: &str, scale_sets: &[&str]) -> EgressPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": name, "namespace": "arc", "creationTimestamp": created},
            "spec": {"selector": {"scaleSets": scale_sets}}
        }))
        .unwrap()
    }

    #[test]
    fn the_oldest_selecting_policy_of_the_runners_namespace_applies() {
        let policies = [
            policy("newer", "2026-02-01T00:00:00Z", &[]),
            policy("older-other-set", "2026-01-01T00:00:00Z", &["small"]),
            policy("older", "2026-01-15T00:00:00Z", &["big"]),
        ];
        let applies = |ns| applicable_to_job(&policies, ns, Some("big"), "acme/web", ".github/workflows/ci.yml");
        assert_eq!(applies("arc").and_then(|p| p.metadata.name.as_deref()), Some("older"));
        assert!(applies("other").is_none());
    }
}
