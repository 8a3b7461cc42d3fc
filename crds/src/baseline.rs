//! `WorkflowBaseline`: the learned outbound calls of one workflow job.
//!
//! One object per (repository, workflow file, job). The operator creates it the first time the
//! job runs; the node agents merge every finished run into its status; people approve endpoints
//! and choose the mode in its spec. Every list is bounded (see the `MAX_*` constants) so the
//! largest possible object stays under 1 MiB, well below etcd's 1.5 MiB limit.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::endpoint::{Condition, EndpointRule, MAX_CONDITIONS, Protocol, Severity};

/// Most endpoints a person can approve in one baseline.
pub const MAX_APPROVED: usize = 100;
/// Most learned endpoints kept in status; past it the least useful are evicted and counted.
pub const MAX_ENDPOINTS: usize = 500;
/// Most processes remembered per endpoint.
pub const MAX_PROCESSES: usize = 4;
/// Most triggers remembered per endpoint.
pub const MAX_TRIGGERS: usize = 6;
/// Most recent runs kept in status.
pub const MAX_RECENT_RUNS: usize = 20;
/// Runs over which churn is kept (`recentNewEndpoints`).
pub const MAX_CHURN_WINDOW: usize = 10;
/// Most distinct triggers counted (`triggerRuns`).
pub const MAX_TRIGGER_KINDS: usize = 16;
/// Most anomalies listed per run (the rest are counted).
pub const MAX_ANOMALIES_PER_RUN: usize = 8;
/// Most reasons given per anomaly.
pub const MAX_REASONS: usize = 4;
/// Longest run id kept (GitHub's run ids are far shorter).
pub const MAX_RUN_ID: usize = 32;

/// Which job this baseline is for (immutable), how runwarden treats its calls, and the
/// endpoints a person approved.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "runwarden.dev",
    version = "v1alpha1",
    kind = "WorkflowBaseline",
    namespaced,
    status = "WorkflowBaselineStatus",
    shortname = "wfb",
    category = "runwarden",
    doc = "The learned outbound calls of one GitHub Actions workflow job (repository, workflow file, job), and how runwarden treats calls that are not in it.",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository"}"#,
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".spec.job"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Runs","type":"integer","jsonPath":".status.observedRuns"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.endpointCount"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode","priority":1}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastRunTime","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowBaselineSpec {
    /// GitHub repository the job belongs to, as `owner/name` (e.g. `acme/web`). This is the
    /// repository of the workflow run, not the scope of the runner scale set. Immutable.
    #[schemars(length(min = 3, max = 140))]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("repository is immutable; create a new WorkflowBaseline instead"),
        validation = Rule::new(r"self.matches('^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$')")
            .message("must be a GitHub repository as 'owner/name', e.g. 'acme/web'"),
    )]
    pub repository: String,

    /// Path of the workflow file in the repository, without `@ref`, e.g.
    /// `.github/workflows/ci.yml`. Immutable.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("workflow is immutable; create a new WorkflowBaseline instead"),
        validation = Rule::new("!self.contains('@')")
            .message("must be the workflow file path without '@ref', e.g. '.github/workflows/ci.yml'"),
        validation = Rule::new("!self.startsWith('/')").message("must be a path relative to the repository root"),
    )]
    pub workflow: String,

    /// The job within the workflow: its display name with matrix values removed (all
    /// combinations of a matrix job share one baseline). Immutable.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("job is immutable; create a new WorkflowBaseline instead"))]
    pub job: String,

    /// How runwarden treats this job: `Auto` (the default) learns until the baseline has
    /// settled and then reports calls that are not in it; `Learning` only learns and never
    /// reports; `Monitoring` reports from now on and keeps learning; `Frozen` stops learning and
    /// reports every call that is neither learned nor approved.
    #[serde(default)]
    pub mode: BaselineMode,

    /// When the baseline counts as settled and when learned endpoints expire.
    #[serde(default)]
    pub learning: LearningSpec,

    /// Endpoints a person approved for this job. They never raise an alert, whatever was
    /// learned. Meant to be managed in Git next to the workflow. At most 100. Defaults to an
    /// empty list, so that a JSON patch can always append to it (`/spec/approved/-`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_APPROVED), extend("default" = []))]
    pub approved: Vec<EndpointRule>,
}

/// What the user wants runwarden to do with a job's calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BaselineMode {
    /// Learn until the baseline settles, then report new calls (phase moves from `Learning` to
    /// `Monitoring` by itself).
    #[default]
    Auto,
    /// Learn only; never report.
    Learning,
    /// Report new calls now, even if the baseline is young, and keep learning.
    Monitoring,
    /// Stop learning; report every call that is neither learned nor approved.
    Frozen,
}

/// Learning parameters of a baseline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LearningSpec {
    /// Finished runs to learn from before any call of this job is reported (in `Auto` mode).
    /// Between 1 and 1000; default 10.
    #[serde(default = "default_min_runs")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_runs: u32,

    /// Consecutive runs that bring no new endpoint for the baseline to count as settled (in
    /// `Auto` mode it then starts reporting). Between 1 and 100; default 5.
    #[serde(default = "default_quiet_runs")]
    #[schemars(range(min = 1, max = 100))]
    pub settle_after_quiet_runs: u32,

    /// A learned endpoint expires when it was not called in this many consecutive runs
    /// and not for `expireAfterDays` days (both must hold, so endpoints used only on rare
    /// triggers such as releases survive busy weeks). Between 1 and 100000; default 200.
    #[serde(default = "default_expire_runs")]
    #[schemars(range(min = 1, max = 100000))]
    pub expire_after_runs: u32,

    /// See `expireAfterRuns`. Between 1 and 3650; default 90.
    #[serde(default = "default_expire_days")]
    #[schemars(range(min = 1, max = 3650))]
    pub expire_after_days: u32,

    /// Runs a destination that no job of the cluster knew must be called in before it is
    /// learned; until then it is `Unconfirmed` and every call to it is shown (at least `Low`),
    /// so an attack in a young baseline is not learned on first sight. 1 learns at once.
    /// Between 1 and 100; default 3.
    #[serde(default = "default_confirm_runs")]
    #[schemars(range(min = 1, max = 100))]
    pub confirm_runs: u32,

    /// Git refs whose runs may teach the baseline what is normal for every run: exact refs, or
    /// `prefix/*` for every ref below a prefix. Runs of other refs (pull requests above all:
    /// `refs/pull/N/merge`) are scored like any run, get no allowance for a young baseline,
    /// and what they call is recorded as `Untrusted`. ARC does not say which branch is the
    /// default: name yours if it is not main or master. Default `refs/heads/main`,
    /// `refs/heads/master`, `refs/tags/*`; at most 32.
    #[serde(default = "default_trusted_refs")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 255)))]
    #[x_kube(validation = Rule::new("self.all(r, r.startsWith('refs/') && !r.contains('*') || r.endsWith('/*') && r.indexOf('*') == size(r) - 1)").message("every entry is a full ref (refs/heads/main) or a prefix ending in /* (refs/tags/*)"))]
    pub trusted_refs: Vec<String>,
}

fn default_min_runs() -> u32 {
    10
}
fn default_quiet_runs() -> u32 {
    5
}
fn default_expire_runs() -> u32 {
    200
}
fn default_expire_days() -> u32 {
    90
}
fn default_confirm_runs() -> u32 {
    3
}
fn default_trusted_refs() -> Vec<String> {
    ["refs/heads/main", "refs/heads/master", "refs/tags/*"].map(String::from).to_vec()
}

impl Default for LearningSpec {
    fn default() -> Self {
        Self {
            min_runs: default_min_runs(),
            settle_after_quiet_runs: default_quiet_runs(),
            expire_after_runs: default_expire_runs(),
            expire_after_days: default_expire_days(),
            confirm_runs: default_confirm_runs(),
            trusted_refs: default_trusted_refs(),
        }
    }
}

/// What runwarden has learned about the job, written by the operator and the node agents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowBaselineStatus {
    /// `Learning` (young or still changing: calls are recorded, not reported), `Monitoring`
    /// (calls not in the baseline are reported) or `Frozen` (no learning; everything new is
    /// reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::schema::field_doc_wins)]
    pub phase: Option<BaselinePhase>,

    /// Finished runs merged into this baseline.
    #[serde(default)]
    pub observed_runs: u32,

    /// `metadata.generation` of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,

    /// When the last merged run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_time: Option<Time>,

    /// Number of entries in `endpoints` (shown by `kubectl get`).
    #[serde(default)]
    pub endpoint_count: u32,

    /// Learned endpoints removed because the list reached its limit of 500 (least recently
    /// and least often seen first). Non-zero means the job calls unusually many destinations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub evicted_endpoints: u32,

    /// Anomalous endpoints removed because the list was full of them (the first reported
    /// first). Each was reported when called (see `recentRuns`); called again, one is reported
    /// again as new. Non-zero means this job called hundreds of unknown destinations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub evicted_anomalies: u32,

    /// Destinations this job calls, one entry per host (or CIDR), port and protocol. At most 500.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENDPOINTS))]
    pub endpoints: Vec<LearnedEndpoint>,

    /// New endpoints learned in each of the most recent runs, oldest first (how much the
    /// baseline still changes). At most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CHURN_WINDOW))]
    pub recent_new_endpoints: Vec<u32>,

    /// Runs merged per trigger (`push`, `release`, ...): endpoints first seen on a trigger
    /// this job rarely runs under are judged with that in mind. At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_TRIGGER_KINDS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["trigger".into()]))]
    pub trigger_runs: Vec<TriggerRuns>,

    /// The most recent runs, newest last. At most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RECENT_RUNS))]
    pub recent_runs: Vec<RunRecord>,

    /// `Settled` (the baseline has stopped changing), `Ready` (the operator has reconciled the
    /// current spec) and others, in the standard condition shape. At most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many runs had one trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TriggerRuns {
    /// The workflow trigger, e.g. `push`.
    #[schemars(length(min = 1, max = 32))]
    pub trigger: String,
    /// Runs merged with this trigger.
    pub runs: u32,
}

/// Where a baseline is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BaselinePhase {
    /// Too young or still changing: calls are recorded, not reported.
    Learning,
    /// Calls that are neither learned nor approved are reported.
    Monitoring,
    /// Learning stopped by a person: everything new is reported.
    Frozen,
}

/// One destination the job calls: exactly one of `host`, `cidr` or `pattern`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.host), has(self.cidr), has(self.pattern)].filter(x, x).size() == 1")
    .message("set exactly one of host, cidr or pattern"))]
pub struct LearnedEndpoint {
    /// DNS name called, as the pod looked it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,

    /// Address called without a DNS name (`/32` or `/128`), or a block of such addresses
    /// learned from several of them (`/24` or `/64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 43))]
    pub cidr: Option<String>,

    /// A family of rotating names learned from several siblings of one shape: the first label
    /// with `#` for a run of digits and `%` for a long hex id, then the parent, e.g.
    /// `productionresultssa#.blob.core.windows.net`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pattern: Option<String>,

    /// For a `pattern` or a block `cidr`: how many distinct names or addresses were seen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub members: u32,

    /// Destination port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// `TCP` or `UDP`.
    pub protocol: Protocol,

    /// Runs in which the job called this endpoint.
    #[serde(default)]
    pub runs_seen: u32,

    /// GitHub workflow run id of the first run that called it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_RUN_ID))]
    pub first_seen_run: Option<String>,

    /// When it was first called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen_time: Option<Time>,

    /// GitHub workflow run id of the last run that called it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_RUN_ID))]
    pub last_seen_run: Option<String>,

    /// When it was last called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_time: Option<Time>,

    /// `observedRuns` when it was last called (expiry counts runs from there).
    #[serde(default)]
    pub last_seen_run_number: u32,

    /// Executables that made the call (file names, e.g. `curl`, `node`). At most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROCESSES), inner(length(max = 64)))]
    pub processes: Vec<String>,

    /// Workflow triggers of the runs that made the call (`push`, `pull_request`, `release`,
    /// `schedule`, `workflow_dispatch`, ...). At most 6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_TRIGGERS), inner(length(max = 32)))]
    pub triggers: Vec<String>,

    /// `Learned` (seen in normal runs), `Approved` (a person approved it) or `Anomalous`
    /// (reported and not yet approved: it keeps being reported).
    pub state: EndpointState,

    /// For an `Anomalous` endpoint: the severity it was reported with; it is reported at least
    /// as severely every time it is called again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::schema::field_doc_wins)]
    pub severity: Option<Severity>,
}

/// How an endpoint came to be in the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EndpointState {
    /// Seen in runs while learning, or often enough to be normal.
    Learned,
    /// Matches an entry of `spec.approved`.
    Approved,
    /// Reported as anomalous and not approved: reported again whenever it is called.
    Anomalous,
    /// New to this job and to every job of the cluster, below the anomaly threshold (first seen
    /// while the baseline was young, typically): shown when called, and learned only once it
    /// recurs in enough runs.
    Unconfirmed,
    /// Called only by runs of untrusted refs (pull requests, branches not in
    /// `spec.learning.trustedRefs`). Runs of trusted refs judge it as new; runs of untrusted
    /// refs find it normal unless it was reported (it has a `severity`), and then it is reported
    /// again. It counts for nothing elsewhere: a pull request cannot make a destination normal
    /// for the release job, nor familiar to other jobs.
    Untrusted,
}

/// Summary of one finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// GitHub workflow run id.
    #[schemars(length(min = 1, max = MAX_RUN_ID))]
    pub run_id: String,

    /// The runner (pod) that ran the job: the combinations of a matrix job share a run id and
    /// are told apart by their runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub runner: Option<String>,

    /// When the run finished.
    pub time: Time,

    /// The event that triggered the run (`push`, `pull_request`, `release`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub trigger: Option<String>,

    /// The git ref the workflow ran from, when ARC said it (`refs/heads/main`,
    /// `refs/pull/42/merge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub git_ref: Option<String>,

    /// Outbound calls the run made (each connect or datagram destination, before
    /// deduplication), not counting those block mode refused.
    #[serde(default)]
    pub calls: u32,

    /// Distinct endpoints the run called.
    #[serde(default)]
    pub endpoints: u32,

    /// Endpoints the run called that were not in the baseline before it.
    #[serde(default)]
    pub new_endpoints: u32,

    /// Anomalies reported during the run, including those not listed in `anomalies`.
    #[serde(default)]
    pub anomaly_count: u32,

    /// Destinations block mode refused the run (never learned).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocked: u32,

    /// The most severe anomalies reported during the run. At most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ANOMALIES_PER_RUN))]
    pub anomalies: Vec<Anomaly>,
}

/// A call that was reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    /// The destination as `host:port/PROTOCOL` (or `address:port/PROTOCOL`).
    #[schemars(length(min = 1, max = 300))]
    pub endpoint: String,

    /// Executable that made the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub process: Option<String>,

    /// `Info`, `Low`, `Medium`, `High` or `Critical`.
    pub severity: Severity,

    /// How suspicious the call is, from 0 (normal) to 1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub score: f64,

    /// Why it was reported, in words a person can check. At most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_REASONS), inner(length(max = 160)))]
    pub reasons: Vec<String>,
}
