//! `WorkflowRun`: what one run of a workflow job called, as the node agent saw it.
//!
//! One object per finished run of a job on one runner (the combinations of a matrix job share
//! a run id and are told apart by their runner), created by the agent on the runner's node when
//! it merges the run into the job's `WorkflowBaseline`, in the baseline's namespace and owned by
//! it. A record, not a desired state: written once, never updated. The operator keeps the
//! newest runs of each baseline (`--run-history`, Helm value `operator.runHistory`) and deletes
//! the rest.
//!
//! Objects of their own rather than baseline status: a run's every destination (up to
//! [`MAX_RUN_ENDPOINTS`]) would not fit beside the baseline's model under etcd's object limit
//! many times over, and a list of runs is a `kubectl get` (`wfr`) a user already knows, with
//! RBAC of its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::baseline::{MAX_PROCESSES, MAX_REASONS, MAX_RUN_ID};
use crate::endpoint::{Protocol, Severity};

/// Most destinations a run's record lists (anomalies first); the rest are counted in
/// `droppedEndpoints`. About 400 bytes each: a full record stays under 0.5 MiB.
pub const MAX_RUN_ENDPOINTS: usize = 1000;
/// Most other names listed per destination.
pub const MAX_OTHER_NAMES: usize = 4;

/// Label of a run's baseline (its name).
pub const BASELINE_LABEL: &str = "runwarden.dev/baseline";
/// Label of a run's GitHub run id.
pub const RUN_ID_LABEL: &str = "runwarden.dev/run-id";

/// The name of the record of run `run_id` on the runner pod `runner`: `<run id>-<runner>` as a
/// DNS subdomain (a runner runs one job, so it is unique in the namespace).
pub fn record_name(run_id: &str, runner: &str) -> String {
    let name: String = format!("{run_id}-{runner}")
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .take(253)
        .collect();
    name.trim_matches(['-', '.']).to_string()
}

/// Checks the address the run pages are reached at (Helm value `operator.ui.url`, e.g. an
/// Ingress's `https://runwarden.example.com`): `https://` or `http://` and a host (with a port
/// if need be), nothing else: the pages link to each other from the root of their host, and a
/// message must not read anything in it as markup or a second link. Returned without a
/// trailing `/`.
pub fn pages_base(url: &str) -> Result<String, String> {
    let url = url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("the run pages' URL {url:?} must start with https:// or http://"))?;
    let bad = |c: char| {
        c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@' | '<' | '>' | '"' | '\'' | '`' | '|' | '\\')
    };
    if let Some(c) = url.chars().find(|c| bad(*c)) {
        return Err(format!("the run pages' URL {url:?} may not contain {c:?}: give scheme, host and path only"));
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(format!("the run pages' URL {url:?} has no host"));
    }
    if !path.is_empty() {
        return Err(format!(
            "the run pages' URL {url:?} has a path: they are served from the root of their host (an Ingress \
             rule for a host of their own), so give scheme and host only"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// A name as it goes into a page's path: only `[A-Za-z0-9._-]` (Kubernetes names are).
fn segment(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).collect()
}

/// The page of run `run_id` on runner pod `runner` in `namespace` (its record's), under `base`
/// (from [`pages_base`]).
pub fn run_page_url(base: &str, namespace: &str, run_id: &str, runner: &str) -> String {
    format!("{base}/runs/{}/{}", segment(namespace), record_name(run_id, runner))
}

/// The page of the job whose baseline is `baseline` in `namespace`, under `base`.
pub fn job_page_url(base: &str, namespace: &str, baseline: &str) -> String {
    format!("{base}/jobs/{}/{}", segment(namespace), segment(baseline))
}

/// One finished run of a workflow job on one runner: every destination it called, which were
/// new or anomalous, and why.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "runwarden.dev",
    version = "v1alpha1",
    kind = "WorkflowRun",
    namespaced,
    shortname = "wfr",
    category = "runwarden",
    doc = "What one run of a GitHub Actions workflow job called, as runwarden's node agent saw it: every destination, which were new or anomalous, and why. Written once by the agent; the oldest are deleted by the operator.",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository"}"#,
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow","priority":1}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".spec.job"}"#,
    printcolumn = r#"{"name":"Run","type":"string","jsonPath":".spec.runId"}"#,
    printcolumn = r#"{"name":"Calls","type":"integer","jsonPath":".spec.calls"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".spec.endpointCount"}"#,
    printcolumn = r#"{"name":"Anomalies","type":"integer","jsonPath":".spec.anomalyCount"}"#,
    printcolumn = r#"{"name":"Blocked","type":"integer","jsonPath":".spec.blockedCount"}"#,
    printcolumn = r#"{"name":"Runner","type":"string","jsonPath":".spec.runner","priority":1}"#,
    printcolumn = r#"{"name":"Finished","type":"date","jsonPath":".spec.finished"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunSpec {
    /// GitHub repository of the run, `owner/name`.
    #[schemars(length(min = 3, max = 140))]
    pub repository: String,
    /// Path of the workflow file in the repository.
    #[schemars(length(min = 1, max = 255))]
    pub workflow: String,
    /// The job (its display name with matrix values removed).
    #[schemars(length(min = 1, max = 256))]
    pub job: String,
    /// The job's `WorkflowBaseline` in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub baseline: String,
    /// GitHub workflow run id.
    #[schemars(length(min = 1, max = MAX_RUN_ID))]
    pub run_id: String,
    /// The git ref the workflow ran from, when ARC said it (`refs/heads/main`,
    /// `refs/pull/42/merge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub git_ref: Option<String>,
    /// The runner pod that ran the job.
    #[schemars(length(min = 1, max = 253))]
    pub runner: String,
    /// Its `EphemeralRunner`, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub ephemeral_runner: Option<String>,
    /// ARC's runner scale set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub scale_set: Option<String>,
    /// The node the runner ran on.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The `EgressPolicy` in this namespace that applied to the job when the run ended (none:
    /// anomalies reported at the default minimum, nothing refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub policy: Option<String>,
    /// When the runner's first call was seen.
    pub started: Time,
    /// When the run ended (the runner pod finished).
    pub finished: Time,
    /// Outbound calls in all (each connect or datagram destination, before deduplication),
    /// not counting those block mode refused.
    pub calls: u64,
    /// Distinct destinations called (refused ones not included).
    pub endpoint_count: u32,
    /// Destinations that were not in the baseline (scored as new).
    pub new_endpoint_count: u32,
    /// Destinations reported as anomalous.
    pub anomaly_count: u32,
    /// Destinations block mode refused (an `EgressPolicy` in mode `Block` does not allow
    /// them): listed with verdict `Blocked`, never learned into the baseline.
    #[serde(default)]
    pub blocked_count: u32,
    /// Destinations not listed: past [`MAX_RUN_ENDPOINTS`] here, or past what the agent keeps
    /// per run.
    #[serde(default)]
    pub dropped_endpoints: u64,
    /// The destinations, anomalies first (most severe first), then refused ones, then new
    /// ones, then by calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RUN_ENDPOINTS))]
    pub endpoints: Vec<RunEndpoint>,
}

/// One destination of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunEndpoint {
    /// The name the pod's DNS answers gave the address, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub host: Option<String>,
    /// The address called.
    #[schemars(length(min = 2, max = 45))]
    pub address: String,
    /// The port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// Calls to it (refused attempts, for a `Blocked` one).
    pub calls: u64,
    /// Process names (`comm`, which the process can set) that called it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROCESSES), inner(length(max = 64)))]
    pub processes: Vec<String>,
    /// Executables that called it (paths, from the kernel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROCESSES), inner(length(max = 256)))]
    pub executables: Vec<String>,
    /// First call.
    pub first_seen: Time,
    /// Last call.
    pub last_seen: Time,
    /// How it compared with the baseline.
    pub verdict: RunVerdict,
    /// The detector's severity, for new destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// How suspicious, from 0 to 1, for new destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub score: Option<f64>,
    /// Why, one short sentence each, strongest first (for a `Blocked` one: the policy that
    /// refused it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_REASONS), inner(length(max = 300)))]
    pub reasons: Vec<String>,
    /// Other names the pod's DNS gave the address when it was first called (which one the
    /// call was for is ambiguous).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_OTHER_NAMES), inner(length(max = 253)))]
    pub other_names: Vec<String>,
}

/// How a destination compared with the job's baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum RunVerdict {
    /// Reported: new, and at least as severe as the policy's minimum.
    Anomalous,
    /// Refused by block mode: the call did not happen, and is not learned.
    Blocked,
    /// Not in the baseline, below what the policy reports.
    New,
    /// In the baseline.
    Known,
    /// Called before the job was known (not scored).
    Unscored,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_url_is_scheme_host_and_path_and_links_name_only_name_characters() {
        assert_eq!(pages_base(" https://runwarden.example.com/ ").unwrap(), "https://runwarden.example.com");
        assert_eq!(pages_base("http://127.0.0.1:8090").unwrap(), "http://127.0.0.1:8090");
        for bad in [
            "https://rw.example/runwarden",
            "runwarden.example.com",
            "ftp://x",
            "https://",
            "https:///runs",
            "https://x/?a=1",
            "https://x/#top",
            "https://user@x",
            "https://x/<b>",
            "https://x/a b",
            "https://x/a|b",
        ] {
            assert!(pages_base(bad).is_err(), "{bad}");
        }
        let base = "https://rw.example";
        assert_eq!(
            run_page_url(base, "arc-runners", "4711", "Runner_X"),
            "https://rw.example/runs/arc-runners/4711-runner-x"
        );
        assert_eq!(
            job_page_url(base, "arc-runners", "acme-web-ci-build"),
            "https://rw.example/jobs/arc-runners/acme-web-ci-build"
        );
        assert_eq!(job_page_url(base, "a/../b", "c?d"), "https://rw.example/jobs/a..b/cd");
    }
}
