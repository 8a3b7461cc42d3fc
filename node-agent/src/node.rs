//! What the agent knows about its node, and what it does with each observation: which pods
//! are runners, which run a call belongs to, when a destination is new for its run, and what
//! to report. No I/O: the [`crate::agent`] loop feeds it pods, cgroups and observations and
//! carries out the [`Action`]s it returns.
//!
//! - A pod cgroup the kernel reports is either a known pod's (a runner's: its calls go to the
//!   run; anyone else's: the kernel is told to ignore it) or not known yet: its calls are held
//!   (bounded) until the cgroup scan and the pod watch say whose it is, and dropped as
//!   unattributed after [`UNKNOWN_POD_GRACE`].
//! - A run is one runner pod's job. Container-mode job pods (label `runner-pod`) add to their
//!   runner's run. Destinations seen before the job is known are kept unscored and scored when
//!   the identity arrives.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use runwarden_crds::identity::{JobIdentity, MONITOR_LABEL, RUNNER_POD_LABEL, SCALE_SET_LABEL};
use runwarden_detector::{Proto, Severity, Verdict};
use serde::{Deserialize, Serialize};

use crate::events;
use crate::pipeline::Observation;

/// How long calls of a cgroup whose pod is unknown are held before they are dropped (and the
/// cgroup ignored). Pods reach the watch before kubelet starts them; this covers a slow watch.
pub const UNKNOWN_POD_GRACE: Duration = Duration::from_secs(30);
/// Observations held per unknown cgroup.
pub const MAX_HELD_PER_CGROUP: usize = 1024;
/// Distinct destinations kept per run; more are counted, not kept.
pub const MAX_DESTINATIONS_PER_RUN: usize = 4096;
/// Processes and executables remembered per destination.
pub const MAX_PROCESSES: usize = 4;

/// A Kubernetes object a run's Events are about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// What a pod is to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// An ARC runner pod (scale-set label and an `EphemeralRunner` owner).
    Runner,
    /// A pod labelled `runwarden.dev/monitor: "true"` (runners without ARC).
    Labelled,
    /// A container-mode job pod of the runner pod named here (same namespace), accepted only if
    /// that runner held a job when the pod appeared.
    JobPod(String),
    /// A pod in a namespace that hosts runners that is none of the above (or claims to be and
    /// is not): monitored, attributed to no job, and reported. A job with the runner's
    /// ServiceAccount can create pods; they must not borrow another job's identity, nor escape.
    Unidentified(String),
    /// Anything else: not monitored.
    Other,
}

/// A pod on this node, from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod.
    pub pod: ObjectRef,
    /// What it is.
    pub role: Role,
    /// ARC's scale set (label).
    pub scale_set: Option<String>,
    /// Its `EphemeralRunner` (owner reference).
    pub runner: Option<ObjectRef>,
    /// The job: a runner's from its `EphemeralRunner` (filled in by the caller, see
    /// [`Node::runner_job`]), a `Labelled` pod's from its own annotations.
    pub identity: Option<JobIdentity>,
}

impl PodInfo {
    /// Reads a pod's metadata. Only a `Labelled` pod's annotations are read as its job (and
    /// believed only where self-declared identities are allowed): anyone who may patch pods in
    /// a runner namespace could write a runner pod's, so a runner's job comes from its
    /// `EphemeralRunner` status, which only ARC's controller writes.
    pub fn from_meta(meta: &ObjectMeta) -> Option<Self> {
        let pod = ObjectRef { namespace: meta.namespace.clone()?, name: meta.name.clone()?, uid: meta.uid.clone()? };
        let labels = meta.labels.clone().unwrap_or_default();
        let runner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "EphemeralRunner" && o.api_version.starts_with("actions.github.com/"));
        let runner =
            runner.map(|o| ObjectRef { namespace: pod.namespace.clone(), name: o.name.clone(), uid: o.uid.clone() });
        let scale_set = labels.get(SCALE_SET_LABEL).cloned();
        let role = if scale_set.is_some() && runner.is_some() {
            Role::Runner
        } else if let Some(runner_pod) = labels.get(RUNNER_POD_LABEL) {
            Role::JobPod(runner_pod.clone())
        } else if labels.get(MONITOR_LABEL).map(String::as_str) == Some("true") {
            Role::Labelled
        } else {
            Role::Other
        };
        let identity = match role {
            Role::Labelled => meta.annotations.as_ref().and_then(|a| JobIdentity::from_annotations(a).ok()),
            _ => None,
        };
        Some(Self { pod, role, scale_set, runner, identity })
    }

    /// Whether its calls are monitored.
    pub fn monitored(&self) -> bool {
        self.role != Role::Other
    }
}

/// The job of a run, as stored with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// `owner/name`.
    pub repository: String,
    /// Workflow file path.
    pub workflow: String,
    /// Normalised job name.
    pub job: String,
    /// Workflow run id (the pod's UID when unknown).
    pub run_id: String,
    /// The job's `WorkflowBaseline` (in the pod's namespace).
    pub baseline: String,
    /// The git ref its workflow ran from (`refs/pull/42/merge`): whether the run may teach
    /// the baseline (see `spec.learning.trustedRefs`).
    #[serde(default)]
    pub git_ref: Option<String>,
}

impl Job {
    fn new(identity: &JobIdentity, pod_uid: &str) -> Self {
        Self {
            repository: identity.repository.clone(),
            workflow: identity.workflow.clone(),
            job: identity.job.clone(),
            run_id: identity.run_id.clone().unwrap_or_else(|| pod_uid.to_string()),
            baseline: identity.baseline_name(),
            git_ref: identity.git_ref.clone(),
        }
    }
}

/// One destination of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    /// The name the pod's DNS answers gave the address, if any.
    pub host: Option<String>,
    /// The address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Transport.
    pub proto: Proto,
    /// Calls seen (first calls of kernel bursts; exact totals come at run end).
    pub calls: u64,
    /// Process names (`comm`) that called it.
    pub processes: Vec<String>,
    /// Executables that called it.
    pub executables: Vec<String>,
    /// First call, Unix milliseconds.
    pub first_ms: i64,
    /// Last call, Unix milliseconds.
    pub last_ms: i64,
    /// Whether it was scored (the job was known).
    pub scored: bool,
    /// The detector's verdict (`None`: in the baseline).
    pub verdict: Option<Verdict>,
    /// Whether it was reported (verdict at or above the policy's minimum).
    pub reported: bool,
    /// Other names the pod's DNS answers gave the address when it was first called (at most
    /// [`MAX_OTHER_NAMES`]): which one it connected for is ambiguous, so it is scored under the
    /// most suspicious of them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_names: Vec<String>,
}

/// Most other names a destination keeps (see [`Destination::other_names`]).
pub const MAX_OTHER_NAMES: usize = 4;

impl Destination {
    /// Counts another call `o` made to it: its time, process and executable.
    fn seen_again(&mut self, o: &Observation) {
        let remember = |list: &mut Vec<String>, v: &str| {
            if !v.is_empty() && !list.iter().any(|x| x == v) && list.len() < MAX_PROCESSES {
                list.push(v.to_string());
            }
        };
        self.calls += 1;
        self.last_ms = self.last_ms.max(millis(o.time));
        remember(&mut self.processes, &o.process);
        if let Some(e) = &o.executable {
            remember(&mut self.executables, e);
        }
    }

    /// The text the detector keys it by: host, or the address.
    pub fn target(&self) -> String {
        self.host.clone().unwrap_or_else(|| self.ip.to_string())
    }

    /// `host:port/PROTO` for people.
    pub fn text(&self) -> String {
        let proto = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        match (self.host.as_deref(), self.ip) {
            (Some(h), IpAddr::V6(ip)) => format!("{h}:{} ([{ip}])/{proto}", self.port),
            (Some(h), ip) => format!("{h}:{} ({ip})/{proto}", self.port),
            (None, IpAddr::V6(ip)) => format!("[{ip}]:{}/{proto}", self.port),
            (None, ip) => format!("{ip}:{}/{proto}", self.port),
        }
    }

    /// The detector's view of it.
    pub fn call(&self) -> runwarden_detector::Call<'_> {
        runwarden_detector::Call {
            host: self.host.as_deref(),
            ip: Some(self.ip),
            port: self.port,
            proto: self.proto,
            process: self.executables.first().or(self.processes.first()).map(String::as_str),
        }
    }
}

/// One runner pod's run (its state is persisted in the agent's state directory).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The runner pod.
    pub pod: ObjectRef,
    /// Its `EphemeralRunner`.
    pub runner: Option<ObjectRef>,
    /// ARC's scale set.
    pub scale_set: Option<String>,
    /// The job, once known.
    pub job: Option<Job>,
    /// When the first call was seen, Unix seconds.
    pub started: i64,
    /// Destinations by `target|port|proto`.
    pub destinations: BTreeMap<String, Destination>,
    /// Destinations not kept past [`MAX_DESTINATIONS_PER_RUN`].
    pub dropped: u64,
    /// Exact calls in all (from the kernel's counts), set at run end.
    pub total_calls: u64,
    /// The kernel's count of records of this run's pods not written because a pod spent its
    /// record budget (their destinations are found later in the kernel's dedupe table).
    #[serde(default)]
    pub throttled: u64,
    /// When the run ended (its pod finished), Unix milliseconds; 0 while it runs.
    #[serde(default)]
    pub finished_ms: i64,
    /// Destinations block mode refused, by the same keys as `destinations` (at most
    /// [`MAX_BLOCKED_PER_RUN`]; past it counted in `dropped`). Kept apart from `destinations`,
    /// which the baseline learns: a baseline never learns what was refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blocked: BTreeMap<String, Refused>,
}

/// A destination block mode refused a run (see [`Run::blocked`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    /// The destination as the run tried it: its calls are the refused attempts; never scored.
    pub destination: Destination,
    /// The policy that refused it, `namespace/name`.
    pub policy: String,
}

/// Most refused destinations a run keeps.
pub const MAX_BLOCKED_PER_RUN: usize = 1024;

/// How to score: the job's baseline and the policy, provided by the caller's caches.
pub trait Scorer {
    /// The least severity the pod's policy reports (`None`: reporting is off for it).
    fn min_severity(&self, pod: &ObjectRef, meta_scale_set: Option<&str>, job: &Job) -> Option<Severity>;
    /// The detector's verdict on `dest`, called by the run of `job` started at `started` in
    /// `pod` (`None`: normal for the job).
    fn score(
        &self,
        pod: &ObjectRef,
        meta_scale_set: Option<&str>,
        job: &Job,
        started: i64,
        dest: &Destination,
    ) -> Option<Verdict>;
}

/// A monitored pod as block mode sees it (see [`Node::subjects`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Its cgroup id.
    pub cgroup: u64,
    /// Its namespace.
    pub namespace: String,
    /// Its run's scale set.
    pub scale_set: Option<String>,
    /// Its run's job, once known.
    pub job: Option<Job>,
    /// A pod of a runner namespace that is no runner's (code in a job may have made it).
    pub unidentified: bool,
}

/// What the agent must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Stop reporting this pod cgroup in the kernel (not a runner).
    Ignore(u64),
    /// Report an anomaly (new) or a repeat of one (`repeat`).
    Report {
        /// The run (its pod, runner, job).
        run: Box<Run>,
        /// The destination's key in the run.
        key: String,
        /// When the call was seen in the kernel.
        seen: SystemTime,
        /// Whether this is a repeat of a reported destination.
        repeat: bool,
    },
    /// A run ended: merge it.
    Finished(Box<Run>),
    /// Scan the pod cgroups: a cgroup is not known.
    Rescan,
    /// A pod of a runner namespace is not what it claims, or claims nothing: say so.
    Unidentified(Box<PodInfo>),
}

#[derive(Debug)]
struct Unknown {
    since: SystemTime,
    held: Vec<Observation>,
}

/// The node's pods, cgroups and runs.
#[derive(Debug, Default)]
pub struct Node {
    /// Pods on this node by UID.
    pods: HashMap<String, PodInfo>,
    /// Pod cgroup id → pod UID (from the last scan).
    cgroups: HashMap<u64, String>,
    /// Pod cgroups the kernel was told to ignore.
    ignored: HashMap<u64, String>,
    /// Cgroups reported but not attributable yet.
    unknown: HashMap<u64, Unknown>,
    /// Runs by runner pod UID.
    runs: HashMap<String, Run>,
    /// Runs changed since [`Node::take_dirty`].
    dirty: std::collections::HashSet<String>,
    /// Whether the pod watch has listed every pod once.
    pub synced: bool,
    /// Observations dropped: no pod after the grace, or past the per-cgroup bound.
    pub unattributed: u64,
    /// New (run, destination) pairs scored, by verdict (see [`VERDICTS`]).
    pub verdicts: [u64; 3],
    /// Whose pods are trusted to say who they are.
    pub trust: Trust,
    /// Namespaces where an ARC runner pod was seen (when `trust.runner_namespaces` is unset).
    seen_runner_namespaces: std::collections::HashSet<String>,
    /// Pods already classified (UID → role): a job pod's standing is decided when it appears.
    classified: HashMap<String, Role>,
    /// Job pods waiting for their runner's job to be known, and since when.
    undecided: HashMap<String, PodInfo>,
    undecided_since: HashMap<String, SystemTime>,
    deciding: bool,
}

/// How long a job pod waits for its runner's job to be known before it is unidentified.
pub const JOB_POD_GRACE: Duration = Duration::from_secs(10);

/// Which pods may say who they are.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// The namespaces that hold runners (the agent's `--runner-namespaces`); empty: those
    /// where an ARC runner pod has been seen. Every other pod there is monitored.
    pub runner_namespaces: std::collections::HashSet<String>,
    /// Namespaces whose `runwarden.dev/monitor` pods may declare their own job identity in
    /// annotations (labelled `runwarden.dev/self-declared-identities=true` by an
    /// administrator); elsewhere such pods are unidentified.
    pub self_declared_namespaces: std::collections::HashSet<String>,
}

/// The verdict classes of [`Node::verdicts`]: normal for the job, anomalous below the policy's
/// minimum severity (recorded, not reported), anomalous and reported.
pub const VERDICTS: [&str; 3] = ["normal", "below_threshold", "anomalous"];

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn key(host: Option<&str>, ip: IpAddr, port: u16, proto: Proto) -> String {
    let target = host.map(str::to_string).unwrap_or_else(|| ip.to_string());
    format!("{target}|{port}|{proto:?}")
}

impl Node {
    /// Restores runs kept in the state directory (a restarted agent).
    pub fn restore(&mut self, runs: Vec<Run>) {
        for run in runs {
            self.runs.insert(run.pod.uid.clone(), run);
        }
    }

    /// Whether `namespace` holds runners.
    fn hosts_runners(&self, namespace: &str) -> bool {
        if self.trust.runner_namespaces.is_empty() {
            self.seen_runner_namespaces.contains(namespace)
        } else {
            self.trust.runner_namespaces.contains(namespace)
        }
    }

    /// Decides what a pod is, from what it says and what the node knows: a job pod only if its
    /// runner holds a job (waiting [`JOB_POD_GRACE`] for the runner's job to be known, as the
    /// identity may arrive just after the pod), a self-declared identity only where an
    /// administrator allows it, and any other pod of a runner namespace unidentified. `None`:
    /// not decided yet. Decisions are kept: a pod is judged by what held when it appeared.
    fn classify(&mut self, mut info: PodInfo, now: SystemTime) -> Option<(PodInfo, bool)> {
        let ns = info.pod.namespace.clone();
        if info.role == Role::Runner {
            self.seen_runner_namespaces.insert(ns.clone());
        }
        if let Some(role) = self.classified.get(&info.pod.uid) {
            if let Role::Unidentified(_) = role {
                info.identity = None;
            }
            info.role = role.clone();
            return Some((info, false));
        }
        let role = match &info.role {
            Role::Runner => Role::Runner,
            Role::JobPod(runner) => {
                let runner_pod = self
                    .pods
                    .values()
                    .find(|p| p.pod.namespace == ns && &p.pod.name == runner && p.role == Role::Runner);
                let since = *self.undecided_since.entry(info.pod.uid.clone()).or_insert(now);
                match runner_pod {
                    Some(p) if p.identity.is_some() => Role::JobPod(runner.clone()),
                    _ if now.duration_since(since).unwrap_or_default() < JOB_POD_GRACE => return None,
                    _ => Role::Unidentified(format!(
                        "it is labelled {RUNNER_POD_LABEL}={runner}, but no runner pod {runner} on this node held a job when it appeared"
                    )),
                }
            }
            Role::Labelled if self.trust.self_declared_namespaces.contains(&ns) => Role::Labelled,
            Role::Labelled => Role::Unidentified(format!(
                "it is labelled {MONITOR_LABEL}=true, but namespace {ns} is not one where pods may declare their own job"
            )),
            // Until the pod watch has listed every pod, the runner that makes this namespace a
            // runner namespace may just not be listed yet (an agent restart): wait for the list.
            Role::Other | Role::Unidentified(_) if !self.synced && self.trust.runner_namespaces.is_empty() => {
                return None;
            }
            Role::Other | Role::Unidentified(_) if self.hosts_runners(&ns) => Role::Unidentified(
                "it is neither an ARC runner pod (scale-set label, owned by an EphemeralRunner) nor a job pod of one"
                    .into(),
            ),
            Role::Other | Role::Unidentified(_) => Role::Other,
        };
        self.undecided_since.remove(&info.pod.uid);
        if let Role::Unidentified(_) = role {
            // What it says about its job is its own word: not taken.
            info.identity = None;
        }
        let new_unidentified = matches!(role, Role::Unidentified(_));
        // Kept, Other included: a pod that was not monitored when it appeared (its namespace had
        // no runner yet) had its programs detached, and stays so.
        self.classified.insert(info.pod.uid.clone(), role.clone());
        info.role = role;
        Some((info, new_unidentified))
    }

    /// Decides the pods that waited for their runner's job ([`Node::classify`]); what they
    /// called meanwhile was held and is attributed now.
    fn decide_waiting(&mut self, scorer: &impl Scorer) -> Vec<Action> {
        // Deciding adds pods, which attributes what waited, which decides again: once is enough.
        if std::mem::replace(&mut self.deciding, true) {
            return Vec::new();
        }
        let waiting: Vec<PodInfo> = self.undecided.values().cloned().collect();
        let mut actions = Vec::new();
        for info in waiting {
            if self.undecided.remove(&info.pod.uid).is_some() {
                // Back among the undecided if it still is.
                actions.extend(self.pod(info, scorer));
            }
        }
        self.deciding = false;
        actions
    }

    /// A pod was added or changed.
    pub fn pod(&mut self, info: PodInfo, scorer: &impl Scorer) -> Vec<Action> {
        let Some((info, unidentified)) = self.classify(info.clone(), SystemTime::now()) else {
            // Not decided yet: its calls are held like an unknown pod's.
            self.undecided.insert(info.pod.uid.clone(), info);
            return Vec::new();
        };
        self.undecided.remove(&info.pod.uid);
        let uid = info.pod.uid.clone();
        let is_runner = info.role == Role::Runner;
        let mut actions = Vec::new();
        if unidentified {
            actions.push(Action::Unidentified(Box::new(info.clone())));
        }
        // Its identity may have arrived: fill it in and score what waited for it.
        if info.monitored()
            && let Some(run_uid) = self.run_of(&info)
            && let Some(run) = self.runs.get_mut(&run_uid)
        {
            if run.job.is_none()
                && let Some(identity) = &info.identity
            {
                run.job = Some(Job::new(identity, &run.pod.uid));
                self.dirty.insert(run_uid.clone());
                let keys: Vec<String> = run.destinations.keys().cloned().collect();
                for k in keys {
                    actions.extend(score_destination(run, &k, scorer, SystemTime::now(), &mut self.verdicts));
                }
            }
            if run.runner.is_none() && info.runner.is_some() {
                run.runner.clone_from(&info.runner);
            }
        }
        self.pods.insert(uid.clone(), info);
        // A runner's job may be what a job pod waited for.
        if is_runner && !self.undecided.is_empty() {
            actions.extend(self.decide_waiting(scorer));
        }
        actions.extend(self.attribute_waiting(scorer));
        actions
    }

    /// The `EphemeralRunner` with UID `runner_uid` was given its job: its pod's calls (those that
    /// waited unscored too) are the job's from now on. A runner's job never changes once known.
    pub fn runner_job(&mut self, runner_uid: &str, identity: JobIdentity, scorer: &impl Scorer) -> Vec<Action> {
        let pod = self.pods.values().find(|p| {
            p.role == Role::Runner && p.identity.is_none() && p.runner.as_ref().is_some_and(|r| r.uid == runner_uid)
        });
        match pod {
            Some(pod) => {
                let info = PodInfo { identity: Some(identity), ..pod.clone() };
                self.pod(info, scorer)
            }
            None => Vec::new(),
        }
    }

    /// A pod was deleted: its run (if it is a runner) ends.
    pub fn pod_deleted(&mut self, uid: &str) -> Vec<Action> {
        self.pods.remove(uid);
        self.classified.remove(uid);
        self.undecided.remove(uid);
        self.undecided_since.remove(uid);
        match self.runs.remove(uid) {
            Some(run) => {
                self.dirty.insert(uid.to_string());
                vec![Action::Finished(Box::new(run))]
            }
            None => Vec::new(),
        }
    }

    /// The monitored pod of pod cgroup `cgroup` and the pod, `EphemeralRunner` and job of the
    /// run its calls belong to (for saying its monitoring was switched off).
    pub fn run_of_cgroup(&self, cgroup: u64) -> Option<(ObjectRef, Option<ObjectRef>, Option<Job>)> {
        let pod = self.pods.get(self.cgroups.get(&cgroup)?)?;
        let run_uid = self.run_of(pod)?;
        match self.runs.get(&run_uid) {
            Some(run) => Some((run.pod.clone(), run.runner.clone(), run.job.clone())),
            None => {
                let owner = self.pods.get(&run_uid).unwrap_or(pod);
                let job = owner.identity.as_ref().map(|i| Job::new(i, &owner.pod.uid));
                Some((owner.pod.clone(), owner.runner.clone(), job))
            }
        }
    }

    /// Every monitored pod with a known cgroup, with what picks its policy: block mode covers
    /// these (runners and their job pods by their policy, unidentified pods by their namespace's).
    pub fn subjects(&self) -> Vec<Subject> {
        let mut out = Vec::new();
        for (&cgroup, uid) in &self.cgroups {
            let Some(pod) = self.pods.get(uid) else { continue };
            match pod.role {
                Role::Other => continue,
                Role::Unidentified(_) => {
                    let namespace = pod.pod.namespace.clone();
                    out.push(Subject { cgroup, namespace, scale_set: None, job: None, unidentified: true });
                    continue;
                }
                _ => {}
            }
            let Some(run_uid) = self.run_of(pod) else { continue };
            let owner = self.pods.get(&run_uid).unwrap_or(pod);
            let job = self
                .runs
                .get(&run_uid)
                .and_then(|r| r.job.clone())
                .or_else(|| owner.identity.as_ref().map(|i| Job::new(i, &owner.pod.uid)));
            out.push(Subject {
                cgroup,
                namespace: pod.pod.namespace.clone(),
                scale_set: owner.scale_set.clone(),
                job,
                unidentified: false,
            });
        }
        out
    }

    /// Whether the pod of cgroup `cgroup` is one of a runner namespace that is no runner's.
    pub fn unidentified(&self, cgroup: u64) -> bool {
        let pod = self.cgroups.get(&cgroup).and_then(|uid| self.pods.get(uid));
        pod.is_some_and(|p| matches!(p.role, Role::Unidentified(_)))
    }

    /// The kernel counted `count` records of the pod cgroup `cgroup` not written (its budget was
    /// spent). Returns the run's pod the first time its run is throttled, for a warning.
    pub fn throttled(&mut self, cgroup: u64, count: u64) -> Option<ObjectRef> {
        let uid = self.cgroups.get(&cgroup)?;
        let pod = self.pods.get(uid)?.clone();
        let run_uid = self.run_of(&pod)?;
        let run = self.runs.get_mut(&run_uid)?;
        if count <= run.throttled {
            return None;
        }
        let first = run.throttled == 0;
        run.throttled = count;
        self.dirty.insert(run_uid);
        first.then(|| run.pod.clone())
    }

    /// The pod watch listed `listed` (every pod on the node): pods known before and missing from
    /// the list were deleted while the watch was down, and are handled as deleted.
    pub fn keep_only(&mut self, listed: &std::collections::HashSet<String>) -> Vec<Action> {
        let gone: Vec<String> = self.pods.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
        gone.iter().flat_map(|uid| self.pod_deleted(uid)).collect()
    }

    /// The pod watch listed every pod: runs restored from the state directory whose pod is
    /// gone ended while the agent was away.
    pub fn synced(&mut self, scorer: &impl Scorer) -> Vec<Action> {
        self.synced = true;
        let gone: Vec<String> = self.runs.keys().filter(|uid| !self.pods.contains_key(*uid)).cloned().collect();
        let mut actions: Vec<Action> = gone.iter().flat_map(|uid| self.pod_deleted(uid)).collect();
        actions.extend(self.attribute_waiting(scorer));
        actions
    }

    /// Whether the pod cgroup `id` is ignored (a pod that is not a runner: the kernel programs
    /// are detached from it).
    pub fn ignores(&self, id: u64) -> bool {
        self.ignored.contains_key(&id)
    }

    /// The pod cgroups found by a scan (id → pod UID). Cgroups that are gone are returned so
    /// the kernel can forget them.
    pub fn cgroups(&mut self, found: HashMap<u64, String>, scorer: &impl Scorer) -> (Vec<u64>, Vec<Action>) {
        let gone: Vec<u64> = self.ignored.keys().filter(|id| !found.contains_key(id)).copied().collect();
        for id in &gone {
            self.ignored.remove(id);
        }
        self.cgroups = found;
        (gone, self.attribute_waiting(scorer))
    }

    /// Attributes held observations whose cgroup and pod are now known; ignores cgroups of pods
    /// that are not runners; drops what waited past the grace.
    fn attribute_waiting(&mut self, scorer: &impl Scorer) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.undecided.is_empty() {
            actions.extend(self.decide_waiting(scorer));
        }
        // Known cgroups of pods that are not monitored: ignore them in the kernel.
        for (id, uid) in &self.cgroups {
            if !self.ignored.contains_key(id) && self.pods.get(uid).is_some_and(|p| !p.monitored()) {
                self.ignored.insert(*id, uid.clone());
                actions.push(Action::Ignore(*id));
            }
        }
        let ids: Vec<u64> = self.unknown.keys().copied().collect();
        let now = SystemTime::now();
        for id in ids {
            let pod = self.cgroups.get(&id).and_then(|uid| self.pods.get(uid)).cloned();
            match pod {
                Some(pod) => {
                    let held = self.unknown.remove(&id).map(|u| u.held).unwrap_or_default();
                    if pod.monitored() {
                        for o in held {
                            actions.extend(self.observe_pod(&pod, o, scorer));
                        }
                    }
                }
                None => {
                    let expired = self.unknown.get(&id).is_some_and(|u| {
                        self.synced && now.duration_since(u.since).unwrap_or_default() > UNKNOWN_POD_GRACE
                    });
                    if expired && let Some(u) = self.unknown.remove(&id) {
                        self.unattributed += u.held.len() as u64;
                        self.ignored.insert(id, String::new());
                        actions.push(Action::Ignore(id));
                    }
                }
            }
        }
        actions
    }

    /// One call seen in the kernel.
    pub fn observe(&mut self, o: Observation, scorer: &impl Scorer) -> Vec<Action> {
        let pod = self.cgroups.get(&o.pod_cgroup_id).and_then(|uid| self.pods.get(uid)).cloned();
        match pod {
            Some(pod) if pod.monitored() => self.observe_pod(&pod, o, scorer),
            Some(_) => {
                // Reported before the kernel was told to ignore it.
                if self.ignored.insert(o.pod_cgroup_id, String::new()).is_none() {
                    vec![Action::Ignore(o.pod_cgroup_id)]
                } else {
                    Vec::new()
                }
            }
            None => {
                let first = !self.unknown.contains_key(&o.pod_cgroup_id);
                let unknown = self
                    .unknown
                    .entry(o.pod_cgroup_id)
                    .or_insert_with(|| Unknown { since: SystemTime::now(), held: Vec::new() });
                if unknown.held.len() < MAX_HELD_PER_CGROUP {
                    unknown.held.push(o);
                } else {
                    self.unattributed += 1;
                }
                if first { vec![Action::Rescan] } else { Vec::new() }
            }
        }
    }

    /// The runner pod UID whose run a monitored pod's calls belong to.
    fn run_of(&self, pod: &PodInfo) -> Option<String> {
        match &pod.role {
            Role::JobPod(runner) => Some(
                self.pods
                    .values()
                    .find(|p| p.pod.namespace == pod.pod.namespace && &p.pod.name == runner && p.role == Role::Runner)
                    .map(|p| p.pod.uid.clone())
                    .unwrap_or_else(|| pod.pod.uid.clone()),
            ),
            Role::Other => None,
            _ => Some(pod.pod.uid.clone()),
        }
    }

    /// The run a monitored pod's calls belong to (its uid), begun at `time` if it has not begun
    /// yet, and marked changed.
    fn run_for(&mut self, pod: &PodInfo, time: SystemTime) -> Option<String> {
        let run_uid = self.run_of(pod)?;
        let owner =
            if run_uid == pod.pod.uid { pod.clone() } else { self.pods.get(&run_uid).cloned().unwrap_or(pod.clone()) };
        self.dirty.insert(run_uid.clone());
        self.runs.entry(run_uid.clone()).or_insert_with(|| Run {
            pod: owner.pod.clone(),
            runner: owner.runner.clone(),
            scale_set: owner.scale_set.clone(),
            job: owner.identity.as_ref().map(|i| Job::new(i, &owner.pod.uid)),
            started: millis(time) / 1000,
            destinations: BTreeMap::new(),
            dropped: 0,
            total_calls: 0,
            throttled: 0,
            finished_ms: 0,
            blocked: BTreeMap::new(),
        });
        Some(run_uid)
    }

    /// Notes a call block mode refused (policy `policy`, `namespace/name`) in its run: listed
    /// in the run's record as refused, never among the destinations its baseline learns.
    pub fn refused(&mut self, o: &Observation, policy: &str) {
        let Some(pod) = self.cgroups.get(&o.pod_cgroup_id).and_then(|uid| self.pods.get(uid)).cloned() else {
            return;
        };
        if !pod.monitored() {
            return;
        }
        let Some(run) = self.run_for(&pod, o.time).and_then(|uid| self.runs.get_mut(&uid)) else { return };
        let k = destination_key(o);
        let full = run.blocked.len() >= MAX_BLOCKED_PER_RUN;
        match run.blocked.get_mut(&k) {
            Some(r) => {
                r.destination.seen_again(o);
                policy.clone_into(&mut r.policy);
            }
            None if full => run.dropped += 1,
            None => {
                let (k, destination) = destination_of(o);
                run.blocked.insert(k, Refused { destination, policy: policy.to_string() });
            }
        }
    }

    fn observe_pod(&mut self, pod: &PodInfo, o: Observation, scorer: &impl Scorer) -> Vec<Action> {
        let Some(uid) = self.run_for(pod, o.time) else { return Vec::new() };
        let Some(run) = self.runs.get_mut(&uid) else { return Vec::new() };
        let k = destination_key(&o);
        let full = run.destinations.len() >= MAX_DESTINATIONS_PER_RUN;
        match run.destinations.get_mut(&k) {
            Some(d) => {
                d.seen_again(&o);
                if d.reported {
                    return vec![Action::Report { run: Box::new(run.clone()), key: k, seen: o.time, repeat: true }];
                }
                Vec::new()
            }
            None if full => {
                run.dropped += 1;
                Vec::new()
            }
            None => {
                let (k, destination) = destination_of(&o);
                run.destinations.insert(k.clone(), destination);
                score_destination(run, &k, scorer, o.time, &mut self.verdicts)
            }
        }
    }

    /// Runs changed since the last call (to persist), and whether each still runs.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Run>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().map(|uid| (uid.clone(), self.runs.get(&uid).cloned())).collect()
    }

    /// Runs in progress.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    /// Monitored pods on the node.
    pub fn monitored_pods(&self) -> usize {
        self.pods.values().filter(|p| p.monitored()).count()
    }

    /// Destinations waiting for their pod's job, and observations waiting for their pod.
    pub fn held(&self) -> usize {
        let unscored: usize = self.runs.values().map(|r| r.destinations.values().filter(|d| !d.scored).count()).sum();
        unscored + self.unknown.values().map(|u| u.held.len()).sum::<usize>()
    }

    /// Pod cgroups of pods this node's runs belong to (their calls are the runs').
    pub fn cgroups_of(&self, run_uid: &str) -> Vec<u64> {
        self.cgroups
            .iter()
            .filter(|(_, uid)| {
                self.pods.get(*uid).is_some_and(|p| self.run_of(p).as_deref() == Some(run_uid))
                    || uid.as_str() == run_uid
            })
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The destination `o` called, as its first call makes it, and its key in a run.
fn destination_of(o: &Observation) -> (String, Destination) {
    let proto = match o.proto {
        events::Proto::Tcp => Proto::Tcp,
        events::Proto::Udp => Proto::Udp,
    };
    let host = o.hosts.first().cloned();
    let other_names: Vec<String> = o.hosts.iter().take(o.questions).skip(1).take(MAX_OTHER_NAMES).cloned().collect();
    let k = destination_key(o);
    let at = millis(o.time);
    let mut d = Destination {
        host,
        ip: o.ip,
        port: o.port,
        proto,
        calls: 0,
        processes: Vec::new(),
        executables: Vec::new(),
        first_ms: at,
        last_ms: at,
        scored: false,
        verdict: None,
        reported: false,
        other_names,
    };
    d.seen_again(o);
    (k, d)
}

/// The key of the destination `o` called in a run (see [`Run::destinations`]).
fn destination_key(o: &Observation) -> String {
    let proto = match o.proto {
        events::Proto::Tcp => Proto::Tcp,
        events::Proto::Udp => Proto::Udp,
    };
    // An ambiguous address (answered for several question names) is keyed by the address:
    // which of its names it stands for is decided when it is scored, and the names' other
    // addresses are other destinations.
    let host = if o.questions > 1 && o.hosts.len() > 1 { None } else { o.hosts.first().map(String::as_str) };
    key(host, o.ip, o.port, proto)
}

/// How suspicious a verdict is, for comparing names: normal (`None`) least.
fn suspicion(v: Option<&Verdict>) -> (u8, f64) {
    v.map_or((0, 0.0), |v| (1 + v.severity as u8, v.score))
}

/// Scores destination `k` of `run` when its job is known; a report when it is anomalous.
fn score_destination(
    run: &mut Run,
    k: &str,
    scorer: &impl Scorer,
    seen: SystemTime,
    verdicts: &mut [u64; 3],
) -> Vec<Action> {
    let Some(job) = run.job.clone() else { return Vec::new() };
    let Some(d) = run.destinations.get(k) else { return Vec::new() };
    if d.scored {
        return Vec::new();
    }
    let mut verdict = scorer.score(&run.pod, run.scale_set.as_deref(), &job, run.started, d);
    // An address answered for several names: the pod chose the order of its lookups, so the
    // call is judged under the most suspicious name, not the first.
    let mut worst_host = None;
    for name in &d.other_names {
        let candidate = Destination { host: Some(name.clone()), ..d.clone() };
        let v = scorer.score(&run.pod, run.scale_set.as_deref(), &job, run.started, &candidate);
        if suspicion(v.as_ref()) > suspicion(verdict.as_ref()) {
            verdict = v;
            worst_host = Some(name.clone());
        }
    }
    if let Some(v) = verdict.as_mut()
        && !d.other_names.is_empty()
    {
        let mut names: Vec<&str> = d.host.iter().chain(&d.other_names).map(String::as_str).collect();
        names.retain(|n| Some(*n) != worst_host.as_deref().or(d.host.as_deref()));
        v.reasons.push(format!("the address was also answered for {}", names.join(", ")));
    }
    let min = scorer.min_severity(&run.pod, run.scale_set.as_deref(), &job);
    let reported = matches!((&verdict, min), (Some(v), Some(min)) if v.severity >= min);
    verdicts[match (&verdict, reported) {
        (None, _) => 0,
        (Some(_), false) => 1,
        (Some(_), true) => 2,
    }] += 1;
    let d = run.destinations.get_mut(k).expect("looked up above");
    if let Some(worst) = worst_host {
        let shown = d.host.replace(worst.clone());
        d.other_names.retain(|n| *n != worst);
        d.other_names.extend(shown);
    }
    d.scored = true;
    d.verdict = verdict;
    d.reported = reported;
    if reported {
        vec![Action::Report { run: Box::new(run.clone()), key: k.to_string(), seen, repeat: false }]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::events::{Hook, Verdict as KernelVerdict};

    /// A node whose pod watch has listed every pod.
    fn listed() -> Node {
        Node { synced: true, ..Node::default() }
    }

    struct Fixed;
    impl Scorer for Fixed {
        fn min_severity(&self, _: &ObjectRef, _: Option<&str>, _: &Job) -> Option<Severity> {
            Some(Severity::Medium)
        }
        fn score(&self, _: &ObjectRef, _: Option<&str>, _: &Job, _: i64, dest: &Destination) -> Option<Verdict> {
            (dest.host.as_deref() != Some("github.com")).then(|| Verdict {
                severity: Severity::High,
                score: 0.8,
                reasons: vec!["first call to this host".into()],
                unfamiliar: true,
            })
        }
    }

    fn meta(uid: &str, name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(serde_json::json!({
            "name": name, "namespace": "arc", "uid": uid, "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunner",
                                 "name": name, "uid": format!("er-{uid}"), "controller": true}]
        }))
        .unwrap()
    }

    fn web_build() -> JobIdentity {
        JobIdentity::from_runner(
            Some("acme/web"),
            Some("acme/web/.github/workflows/ci.yml@refs/heads/main"),
            Some("build"),
            Some(77),
        )
        .unwrap()
    }

    /// A runner pod, with its job (as the caller fills it in from the EphemeralRunner) or not.
    fn runner(uid: &str, identity: bool) -> PodInfo {
        let mut info = PodInfo::from_meta(&meta(
            uid,
            "runner-0",
            serde_json::json!({SCALE_SET_LABEL: "arc"}),
            serde_json::json!({}),
        ))
        .unwrap();
        info.identity = identity.then(web_build);
        info
    }

    #[test]
    fn a_runners_job_comes_from_its_ephemeral_runner_never_from_its_pods_annotations() {
        let annotated = meta("u1", "runner-0", serde_json::json!({SCALE_SET_LABEL: "arc"}), identity_annotations());
        let info = PodInfo::from_meta(&annotated).unwrap();
        assert_eq!((info.role.clone(), info.identity.clone()), (Role::Runner, None), "annotations are not its job");
        let mut node = listed();
        node.pod(info, &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        assert!(node.observe(call(10, "evil.example", 443), &Fixed).is_empty(), "held until the job is known");
        assert!(node.runner_job("er-other", web_build(), &Fixed).is_empty(), "another runner's job");
        let actions = node.runner_job("er-u1", web_build(), &Fixed);
        assert!(
            matches!(&actions[..], [Action::Report { run, .. }] if run.job.as_ref().is_some_and(|j| j.repository == "acme/web" && j.run_id == "77")),
            "scored as the EphemeralRunner's job: {actions:?}"
        );
        let other = JobIdentity { repository: "acme/release".into(), ..web_build() };
        assert!(node.runner_job("er-u1", other, &Fixed).is_empty(), "a runner's job never changes");
        assert_eq!(node.runs().next().unwrap().job.as_ref().unwrap().repository, "acme/web");
    }

    fn call(cgroup: u64, host: &str, port: u16) -> Observation {
        Observation {
            time: SystemTime::now(),
            pid: 1,
            process: "curl".into(),
            executable: Some("/usr/bin/curl".into()),
            cgroup_id: cgroup,
            pod_cgroup_id: cgroup,
            pod: None::<Arc<crate::cgroups::PodCgroup>>,
            ip: "192.0.2.1".parse().unwrap(),
            port,
            proto: events::Proto::Tcp,
            hook: Hook::Connect,
            verdict: KernelVerdict::Allowed,
            hosts: vec![host.into()],
            questions: 1,
        }
    }

    #[test]
    fn pods_are_told_apart_by_labels_and_owner() {
        assert_eq!(runner("u1", false).role, Role::Runner);
        let job_pod = PodInfo::from_meta(&meta(
            "u2",
            "runner-0-workflow",
            serde_json::json!({"runner-pod": "runner-0"}),
            serde_json::json!({}),
        ))
        .unwrap();
        assert_eq!(job_pod.role, Role::JobPod("runner-0".into()));
        let other =
            PodInfo::from_meta(&meta("u3", "web", serde_json::json!({"app": "web"}), serde_json::json!({}))).unwrap();
        assert_eq!(other.role, Role::Other);
    }

    #[test]
    fn calls_before_the_job_is_known_are_held_and_scored_when_it_arrives() {
        let mut node = listed();
        node.pod(runner("u1", false), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        assert!(node.observe(call(10, "evil.example", 443), &Fixed).is_empty(), "no job yet: held");
        assert_eq!(node.held(), 1);
        let actions = node.pod(runner("u1", true), &Fixed);
        assert!(
            matches!(&actions[..], [Action::Report { repeat: false, run, .. }] if run.job.as_ref().unwrap().run_id == "77"),
            "{actions:?}"
        );
        assert_eq!(node.held(), 0);
        // Known destinations are not reported; repeats of a reported one are.
        assert!(node.observe(call(10, "github.com", 443), &Fixed).is_empty());
        assert!(matches!(
            &node.observe(call(10, "evil.example", 443), &Fixed)[..],
            [Action::Report { repeat: true, .. }]
        ));
    }

    #[test]
    fn an_address_answered_for_several_names_is_judged_under_the_most_suspicious() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        // The pod looked up a name its job knows, then its own, both on one shared address.
        let ambiguous = Observation {
            hosts: vec!["github.com".into(), "evil.example".into(), "edge.cdn.example".into()],
            questions: 2,
            ..call(10, "github.com", 443)
        };
        let actions = node.observe(ambiguous, &Fixed);
        let [Action::Report { run, key, .. }] = &actions[..] else { panic!("reported: {actions:?}") };
        let d = &run.destinations[key];
        assert_eq!(d.host.as_deref(), Some("evil.example"), "{d:?}");
        assert_eq!(d.other_names, ["github.com"], "the CNAME alias is no candidate: {d:?}");
        assert!(
            d.verdict.as_ref().unwrap().reasons.iter().any(|r| r == "the address was also answered for github.com")
        );

        // One question and its alias: nothing ambiguous, the known name stands.
        let plain = Observation {
            hosts: vec!["github.com".into(), "edge.cdn.example".into()],
            questions: 1,
            ip: "192.0.2.9".parse().unwrap(),
            ..call(10, "github.com", 443)
        };
        assert!(node.observe(plain, &Fixed).is_empty());
    }

    #[test]
    fn an_unknown_cgroup_is_held_until_the_scan_and_the_watch_know_it() {
        let mut node = listed();
        assert_eq!(node.observe(call(11, "evil.example", 443), &Fixed), vec![Action::Rescan]);
        node.cgroups(HashMap::from([(11, "u1".to_string())]), &Fixed);
        let actions = node.pod(runner("u1", true), &Fixed);
        assert!(matches!(&actions[..], [Action::Report { .. }]), "{actions:?}");
    }

    #[test]
    fn cgroups_of_other_pods_are_ignored_in_the_kernel() {
        let mut node = listed();
        let other = PodInfo::from_meta(&meta("u3", "web", serde_json::json!({}), serde_json::json!({}))).unwrap();
        node.pod(other, &Fixed);
        let (_, actions) = node.cgroups(HashMap::from([(12, "u3".to_string())]), &Fixed);
        assert_eq!(actions, vec![Action::Ignore(12)]);
        let (gone, _) = node.cgroups(HashMap::new(), &Fixed);
        assert_eq!(gone, vec![12], "a pod cgroup that is gone is forgotten");
    }

    #[test]
    fn a_runner_that_goes_ends_its_run() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        node.observe(call(10, "github.com", 443), &Fixed);
        let actions = node.pod_deleted("u1");
        assert!(matches!(&actions[..], [Action::Finished(run)] if run.destinations.len() == 1));
    }

    #[test]
    fn a_refused_call_is_in_the_run_apart_from_what_its_baseline_learns() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        // Refused before the run made any other call: the run begins with it.
        let refused = Observation { verdict: KernelVerdict::Denied, ..call(10, "evil.example", 8080) };
        node.refused(&refused, "arc/runners");
        node.refused(&Observation { process: "wget".into(), ..refused.clone() }, "arc/runners");
        node.observe(call(10, "github.com", 443), &Fixed);
        assert!(node.take_dirty().iter().any(|(uid, run)| uid == "u1" && run.is_some()), "kept in the state");
        let actions = node.pod_deleted("u1");
        let [Action::Finished(run)] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(run.destinations.keys().collect::<Vec<_>>(), ["github.com|443|Tcp"], "never a destination");
        let r = &run.blocked["evil.example|8080|Tcp"];
        assert_eq!((r.destination.calls, r.policy.as_str()), (2, "arc/runners"));
        assert_eq!(r.destination.processes, ["curl", "wget"]);
        // Bounded: past the bound a refusal is counted, not kept.
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        for port in 0..=MAX_BLOCKED_PER_RUN as u16 {
            node.refused(&Observation { port, ..refused.clone() }, "arc/runners");
        }
        let run = node.runs().next().unwrap();
        assert_eq!((run.blocked.len(), run.dropped), (MAX_BLOCKED_PER_RUN, 1));
    }

    #[test]
    fn a_runner_deleted_while_the_watch_was_down_ends_its_run_at_the_relist() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.pod(runner("u2", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string()), (11, "u2".to_string())]), &Fixed);
        node.observe(call(10, "github.com", 443), &Fixed);
        node.observe(call(11, "github.com", 443), &Fixed);
        let actions = node.keep_only(&["u2".to_string()].into());
        assert!(matches!(&actions[..], [Action::Finished(run)] if run.pod.uid == "u1"), "{actions:?}");
        assert!(node.keep_only(&["u2".to_string()].into()).is_empty(), "u2 is still there");
    }

    #[test]
    fn a_throttled_pod_is_named_once_and_its_count_kept_in_the_run() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string())]), &Fixed);
        node.observe(call(10, "github.com", 443), &Fixed);
        assert_eq!(node.throttled(10, 5).map(|p| p.uid), Some("u1".to_string()));
        assert_eq!(node.throttled(10, 9), None, "named once");
        assert_eq!(node.runs().next().unwrap().throttled, 9);
        assert_eq!(node.throttled(11, 3), None, "an unknown cgroup");
    }

    fn pod_in(ns: &str, uid: &str, name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> PodInfo {
        let mut m = meta(uid, name, labels, annotations);
        m.namespace = Some(ns.into());
        m.owner_references = None;
        PodInfo::from_meta(&m).unwrap()
    }

    fn identity_annotations() -> serde_json::Value {
        serde_json::json!({"runwarden.dev/repository": "acme/release", "runwarden.dev/workflow": ".github/workflows/release.yml",
                           "runwarden.dev/job": "publish", "runwarden.dev/run-id": "99"})
    }

    #[test]
    fn any_other_pod_of_a_runner_namespace_is_monitored_as_unidentified() {
        let mut node = listed();
        node.pod(runner("u1", true), &Fixed);
        // A pod the job made, claiming the release job in annotations: monitored, no job.
        let made = pod_in("arc", "u3", "helper", serde_json::json!({}), identity_annotations());
        let actions = node.pod(made, &Fixed);
        assert!(matches!(&actions[..], [Action::Unidentified(p)] if p.pod.uid == "u3"), "{actions:?}");
        node.cgroups(HashMap::from([(10, "u1".to_string()), (30, "u3".to_string())]), &Fixed);
        assert!(node.observe(call(30, "exfil.example", 443), &Fixed).is_empty(), "held: no job to score against");
        let ended = node.pod_deleted("u3");
        assert!(
            matches!(&ended[..], [Action::Finished(run)] if run.job.is_none() && run.destinations.len() == 1),
            "its calls end up reported under no job, never learned: {ended:?}"
        );
        // A pod of a namespace without runners is none of the agent's business.
        let web = pod_in("web", "u4", "web", serde_json::json!({}), serde_json::json!({}));
        assert!(node.pod(web, &Fixed).is_empty());
        let (_, actions) = node.cgroups(HashMap::from([(40, "u4".to_string())]), &Fixed);
        assert_eq!(actions, [Action::Ignore(40)]);
    }

    #[test]
    fn a_job_pod_borrows_nothing_from_a_runner_without_a_job() {
        let mut node = listed();
        node.pod(runner("u1", false), &Fixed);
        let job_pod =
            || pod_in("arc", "u2", "job", serde_json::json!({"runner-pod": "runner-0"}), serde_json::json!({}));
        assert!(node.pod(job_pod(), &Fixed).is_empty(), "undecided: the runner's job may be just about to be known");
        node.cgroups(HashMap::from([(10, "u1".to_string()), (20, "u2".to_string())]), &Fixed);
        assert!(node.observe(call(20, "poison.example", 443), &Fixed).len() <= 1, "held meanwhile");
        // The runner got no job within the grace: the pod is unidentified, for good.
        node.undecided_since.insert("u2".into(), SystemTime::now() - JOB_POD_GRACE - Duration::from_secs(1));
        let (_, actions) = node.cgroups(HashMap::from([(10, "u1".to_string()), (20, "u2".to_string())]), &Fixed);
        assert!(actions.iter().any(|a| matches!(a, Action::Unidentified(p) if p.pod.uid == "u2")), "{actions:?}");
        node.pod(runner("u1", true), &Fixed);
        node.pod(job_pod(), &Fixed);
        let runner_run = node.runs.get("u1");
        assert!(
            runner_run.is_none_or(|r| !r.destinations.keys().any(|k| k.starts_with("poison.example"))),
            "the runner's job learns nothing of it: {runner_run:?}"
        );
        assert!(node.runs.get("u2").is_some_and(|r| r.job.is_none()));
    }

    #[test]
    fn a_job_pod_whose_runners_job_is_known_just_after_joins_the_run() {
        let mut node = listed();
        node.pod(runner("u1", false), &Fixed);
        let job_pod = pod_in("arc", "u2", "job", serde_json::json!({"runner-pod": "runner-0"}), serde_json::json!({}));
        node.pod(job_pod, &Fixed);
        node.cgroups(HashMap::from([(10, "u1".to_string()), (20, "u2".to_string())]), &Fixed);
        node.observe(call(20, "evil.example", 443), &Fixed);
        let actions = node.pod(runner("u1", true), &Fixed);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Report { run, .. } if run.pod.uid == "u1" && run.job.is_some())),
            "the held call is the runner's job's: {actions:?}"
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Unidentified(_))));
    }

    #[test]
    fn a_self_declared_identity_counts_only_where_an_administrator_allows_it() {
        let labelled = |ns: &str, uid: &str| {
            pod_in(ns, uid, "self-hosted", serde_json::json!({"runwarden.dev/monitor": "true"}), identity_annotations())
        };
        let mut node = Node {
            trust: Trust { self_declared_namespaces: ["ci".to_string()].into(), ..Trust::default() },
            ..Node::default()
        };
        assert!(node.pod(labelled("ci", "u5"), &Fixed).is_empty());
        assert_eq!(node.pods["u5"].role, Role::Labelled);
        assert!(node.pods["u5"].identity.is_some());
        let actions = node.pod(labelled("arc", "u6"), &Fixed);
        assert!(matches!(&actions[..], [Action::Unidentified(p)] if p.identity.is_none()), "{actions:?}");
    }

    #[test]
    fn after_a_restart_pods_listed_before_their_namespaces_runner_are_still_unidentified() {
        let mut node = Node::default();
        let made = pod_in("arc", "u3", "helper", serde_json::json!({}), serde_json::json!({}));
        assert!(node.pod(made, &Fixed).is_empty(), "not decided before the list is complete");
        node.pod(runner("u1", true), &Fixed);
        let actions = node.synced(&Fixed);
        assert!(actions.iter().any(|a| matches!(a, Action::Unidentified(p) if p.pod.uid == "u3")), "{actions:?}");
    }
}
