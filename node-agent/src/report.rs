//! `AnomalousEgress` Events (`events.k8s.io/v1`) on the runner pod, its `EphemeralRunner`
//! (which outlives the pod) and the job's `WorkflowBaseline`.
//!
//! One Event per (run, destination, object): its name is derived from them, so a restarted
//! agent finds the Event it created before instead of creating another, and repeats of the
//! call are counted in the Event's `series` (patched at most every [`SERIES_EVERY`]).
//!
//! New Events are rate-limited by a token bucket ([`ReportConfig`]) so a flood of unique
//! destinations cannot flood the API server: past it the anomaly is still logged, counted
//! (`runwarden_agent_events{result="rate_limited"}`) and recorded in the run's record.
//!
//! While the API server is unreachable (connection errors, timeouts, 429 and 5xx answers) new
//! Events wait in a retry queue of [`MAX_RETRY`] reports, retried oldest first with a backoff of
//! up to [`MAX_BACKOFF`], and are created when it returns (their names make a retry of a
//! half-created report harmless). Past the bound the oldest is dropped and counted
//! (`result="dropped"`); the anomaly itself stays in the run's record, which reaches the baseline
//! when the run is merged. Rejected Events (other 4xx) are counted `failed` and not retried.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use runwarden_crds::Protocol;
use runwarden_crds::report::{self, AnomalyReport};
use runwarden_detector::Proto;

use crate::metrics::{Metrics, ResultLabel};
use crate::node::{Destination, Job, ObjectRef, PodInfo, Run};

/// Reason of the Events.
pub const REASON: &str = "AnomalousEgress";
/// Reason of the Event for a run that ended before its job was known.
pub const UNATTRIBUTED: &str = "UnattributedEgress";
/// Reason of the Events saying a pod's kernel monitoring was switched off from outside.
pub const TAMPERED: &str = "AgentTampered";
/// Reason of the Event on a pod of a runner namespace that is not identified as a runner's.
pub const UNIDENTIFIED: &str = "UnidentifiedPod";
/// Reason of the Events saying a pod received a DNS answer that looks forged.
pub const SUSPICIOUS_DNS: &str = "SuspiciousDNS";
/// Event reason: block mode refused a runner pod's call.
pub const EGRESS_BLOCKED: &str = "EgressBlocked";
/// Event reason: a runner pod called what its policy does not list, and went ahead (the
/// policy does not refuse: `Audit`, or block mode is off).
pub const EGRESS_NOT_ALLOWED: &str = "EgressNotAllowed";
/// `reportingController` of the Events.
pub const CONTROLLER: &str = "runwarden.dev/agent";
/// Least time between two series updates of one Event.
pub const SERIES_EVERY: Duration = Duration::from_secs(10);
/// Longest Event note the API accepts.
const MAX_NOTE: usize = 1024;
/// Reports kept for retry while the API server is unreachable.
pub const MAX_RETRY: usize = 10_000;
/// Longest wait between two retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether an Event was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Created, found already created, counted, rate-limited or rejected: nothing more to do.
    Done,
    /// The API server could not be reached: try again later.
    Retry,
}

/// Errors worth a retry: the API server unreachable, overloaded or failing.
pub(crate) fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Limits of the reporter, and where its Events link to.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// New Events per second, sustained.
    pub per_second: f64,
    /// New Events in a burst.
    pub burst: f64,
    /// Where the operator's run pages are reached (checked by
    /// [`runwarden_crds::run::pages_base`]): each Event links to its run's page.
    pub pages: Option<String>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self { per_second: 10.0, burst: 100.0, pages: None }
    }
}

/// One anomaly to report: the run as it was and the destination's key in it.
#[derive(Clone, Debug)]
pub struct Report {
    /// The run.
    pub run: Box<Run>,
    /// The destination's key in `run.destinations`.
    pub key: String,
    /// When the call was seen in the kernel.
    pub seen: SystemTime,
    /// A repeat of a reported destination.
    pub repeat: bool,
}

struct Series {
    count: i32,
    last_patch: Instant,
    name: String,
}

/// Publishes Events, one task.
pub struct Reporter {
    client: Client,
    node: String,
    config: ReportConfig,
    tokens: f64,
    refilled: Instant,
    series: HashMap<String, Series>,
    metrics: Arc<Metrics>,
}

impl Reporter {
    /// A reporter for the agent on `node`.
    pub fn new(client: Client, node: &str, config: ReportConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            node: node.to_string(),
            tokens: config.burst,
            config,
            refilled: Instant::now(),
            series: HashMap::new(),
            metrics,
        }
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * self.config.per_second;
        self.tokens = (self.tokens + refill).min(self.config.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics.events.get_or_create(&ResultLabel { result }).inc();
    }

    /// Publishes reports from `rx` until it closes, retrying those the API server could not
    /// take (see the module's documentation).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Report>) {
        let mut retry: VecDeque<Report> = VecDeque::new();
        let mut backoff = Duration::from_millis(250);
        loop {
            tokio::select! {
                r = rx.recv() => {
                    let Some(r) = r else { return };
                    // Behind earlier failures: wait for the retry queue, keeping the order.
                    if !retry.is_empty() || self.report(&r, false).await == Delivery::Retry {
                        if retry.len() == MAX_RETRY {
                            retry.pop_front();
                            self.count("dropped");
                        }
                        retry.push_back(r);
                    }
                }
                _ = tokio::time::sleep(backoff), if !retry.is_empty() => {
                    while let Some(r) = retry.front() {
                        if self.report(r, true).await == Delivery::Retry {
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            break;
                        }
                        retry.pop_front();
                        backoff = Duration::from_millis(250);
                        if retry.is_empty() {
                            info!("the API server takes Events again");
                        }
                    }
                }
            }
        }
    }

    /// Publishes (or counts a repeat of) one anomaly's Events. `retrying`: a report that already
    /// passed the rate limit.
    pub async fn report(&mut self, report: &Report, retrying: bool) -> Delivery {
        let Some(dest) = report.run.destinations.get(&report.key) else { return Delivery::Done };
        let run = &report.run;
        let targets = targets(run);
        if report.repeat {
            for (regarding, _) in &targets {
                self.repeat(run, &report.key, regarding).await;
            }
            return Delivery::Done;
        }
        if !retrying && !self.take_token() {
            self.count("rate_limited");
            return Delivery::Done;
        }
        let note = note(run, dest, self.config.pages.as_deref());
        let structured = anomaly_report(run, dest).and_then(|r| serde_json::to_string(&r).ok());
        let mut first = true;
        for (regarding, related) in &targets {
            let name = event_name(run, &report.key, regarding);
            let mut event = warning(&name, REASON, &note, regarding, related.clone(), &self.node);
            // The notifiers read the report from the Event about the baseline (one per anomaly).
            if regarding.kind.as_deref() == Some("WorkflowBaseline")
                && let Some(json) = &structured
            {
                event.metadata.annotations = Some([(report::ANNOTATION.to_string(), json.clone())].into());
            }
            let api: Api<Event> =
                Api::namespaced(self.client.clone(), regarding.namespace.as_deref().unwrap_or("default"));
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    self.count("sent");
                    if first {
                        let latency = SystemTime::now().duration_since(report.seen).unwrap_or_default();
                        self.metrics.detection_latency.observe(latency.as_secs_f64());
                    }
                }
                // Created before a restart or a retry: repeats go to its series.
                Err(kube::Error::Api(s)) if s.code == 409 => self.count("sent"),
                Err(e) if retryable(&e) => {
                    if !retrying {
                        self.count("retried");
                        warn!(event = %name, error = %e, "the API server did not take an AnomalousEgress Event; retrying");
                    }
                    return Delivery::Retry;
                }
                Err(e) => {
                    self.count("failed");
                    warn!(event = %name, error = %e, "could not create an AnomalousEgress Event");
                }
            }
            self.series.insert(name.clone(), Series { count: 1, last_patch: Instant::now(), name });
            first = false;
        }
        Delivery::Done
    }

    async fn repeat(&mut self, run: &Run, key: &str, regarding: &ObjectReference) {
        let name = event_name(run, key, regarding);
        let entry = self.series.entry(name.clone()).or_insert_with(|| Series {
            count: 1,
            last_patch: Instant::now() - SERIES_EVERY,
            name: name.clone(),
        });
        entry.count += 1;
        if entry.last_patch.elapsed() < SERIES_EVERY {
            return;
        }
        entry.last_patch = Instant::now();
        let series = EventSeries { count: entry.count, last_observed_time: MicroTime(Timestamp::now()) };
        let api: Api<Event> = Api::namespaced(self.client.clone(), regarding.namespace.as_deref().unwrap_or("default"));
        let patch = json!({"series": series});
        match api.patch(&entry.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => self.count("series"),
            Err(e) => {
                self.count("failed");
                warn!(event = %name, error = %e, "could not count a repeat in an AnomalousEgress Event");
            }
        }
    }

    /// Forgets the series of a run that ended.
    pub fn forget(&mut self, run: &Run) {
        let prefix = format!("{}.", run.pod.name);
        self.series.retain(|name, _| !name.starts_with(&prefix));
    }
}

/// Reports a run that ended before its job was known, under its runner scale set: one Warning
/// Event (`UnattributedEgress`) on the pod and on its `EphemeralRunner`, listing what it called
/// (unscored: there is no baseline to score against). Named from the pod, so a retry does not
/// duplicate it. `Retry` when the API server could not be reached.
pub async fn unattributed(client: &Client, node: &str, run: &Run) -> Delivery {
    let mut destinations: Vec<String> = run.destinations.values().map(Destination::text).collect();
    destinations.sort();
    let mut note = match (&run.scale_set, &run.runner) {
        (Some(scale_set), _) => format!(
            "runner {} of scale set {scale_set} ended before its job was known; its {} destination(s) were not \
             scored or learned: {}",
            run.pod.name,
            destinations.len(),
            destinations.join(", ")
        ),
        // An unidentified pod (see UnidentifiedPod).
        (None, None) => format!(
            "pod {}, not identified as a runner's, ended; its {} destination(s) were not scored or learned: {}",
            run.pod.name,
            destinations.len(),
            destinations.join(", ")
        ),
        (None, Some(_)) => format!(
            "runner {} ended before its job was known; its {} destination(s) were not scored or learned: {}",
            run.pod.name,
            destinations.len(),
            destinations.join(", ")
        ),
    };
    cut_note(&mut note);
    for (regarding, related) in targets(run) {
        let name = event_name(run, UNATTRIBUTED, &regarding);
        let event = warning(&name, UNATTRIBUTED, &note, &regarding, related, node);
        let api: Api<Event> = Api::namespaced(client.clone(), regarding.namespace.as_deref().unwrap_or("default"));
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) if retryable(&e) => return Delivery::Retry,
            Err(e) => warn!(event = %name, error = %e, "could not create an UnattributedEgress Event"),
        }
    }
    Delivery::Done
}

/// Says that a runner's kernel monitoring was switched off from outside the agent (and put
/// back): a Warning Event (`AgentTampered`) on the runner pod, on its `EphemeralRunner`, and on
/// the agent's own pod (`agent`, when the agent knows it) with the runner pod as the related
/// object. `what` says what was found and `at` (Unix seconds) names the occurrence. `Retry`
/// when the API server could not be reached.
pub async fn tampered(
    client: &Client,
    node: &str,
    agent: Option<&ObjectRef>,
    runner: (&ObjectRef, Option<&ObjectRef>, Option<&Job>),
    what: &str,
    at: u64,
) -> Delivery {
    let (pod, _, job) = runner;
    let note = format!(
        "the kernel monitoring of runner pod {}/{}{} was switched off from outside runwarden ({what}) by a \
         process with CAP_SYS_ADMIN on the node, typically a privileged container of that pod; it was put back \
         within a second, and calls made meanwhile may have gone unseen",
        pod.namespace,
        pod.name,
        job_text(job)
    );
    about_runner(client, node, TAMPERED, "Monitor", &note, runner, agent, &at.to_string()).await
}

/// Says that a process in a runner pod received a DNS answer from a resolver that is not
/// trusted (one inside the pod, or a packet that came over its loopback) contradicting what the
/// cluster's resolver answered it: what forging a name looks like. A Warning Event
/// (`SuspiciousDNS`) on the runner pod and its `EphemeralRunner`, once per name and `at`.
pub async fn suspicious_dns(
    client: &Client,
    node: &str,
    runner: (&ObjectRef, Option<&ObjectRef>, Option<&Job>),
    s: &crate::pipeline::SuspiciousDns,
    at: u64,
) -> Delivery {
    let (pod, _, job) = runner;
    let list = |ips: &[std::net::IpAddr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let via = if s.loopback {
        ", over the pod's loopback"
    } else if s.other_interface {
        ", on another interface than the pod's own (a bridge inside the pod, such as a nested container's)"
    } else {
        ""
    };
    let note = format!(
        "runner pod {}/{}{} received an answer from {}{via} saying {} is {}, while the cluster's resolver answered \
         it {}: a process in the pod may be forging names to hide where it connects. The answer was not used: calls \
         to those addresses are judged as bare addresses",
        pod.namespace,
        pod.name,
        job_text(job),
        s.server,
        s.name,
        list(&s.claimed),
        list(&s.trusted)
    );
    about_runner(client, node, SUSPICIOUS_DNS, "Resolve", &note, runner, None, &format!("{}\n{at}", s.name)).await
}

/// A call block mode refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// `ip:port/PROTO`.
    pub destination: String,
    /// The name the pod looked the address up by, if any.
    pub host: Option<String>,
    /// Port and protocol, for the rule that would allow it.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// The process that called.
    pub process: String,
    /// The policy that holds the pod, `namespace/name`.
    pub policy: String,
    /// Whether the call went ahead (the policy would refuse it in block mode).
    pub would: bool,
    /// Whether the pod is no runner's (held to nothing where a policy of its namespace blocks).
    pub unidentified: bool,
}

/// Says that block mode refused a runner pod's call: a Warning Event (`EgressBlocked`) on the
/// pod and its `EphemeralRunner`, once per destination and `at`, naming the process, the policy
/// and the rule that would allow it.
pub async fn blocked(
    client: &Client,
    node: &str,
    runner: (&ObjectRef, Option<&ObjectRef>, Option<&Job>),
    b: &Blocked,
    at: u64,
    pages: Option<&str>,
) -> Delivery {
    let (pod, _, job) = runner;
    let what = match &b.host {
        Some(host) => format!("{host} ({})", b.destination),
        None => b.destination.clone(),
    };
    let rule = match &b.host {
        Some(host) => format!("{{host: {host}, ports: [{}], protocol: {}}}", b.port, b.protocol),
        None => {
            let ip = b.destination.rsplit_once(':').map_or(b.destination.as_str(), |(ip, _)| ip);
            let bits = if ip.contains(':') { 128 } else { 32 };
            format!("{{cidr: {}/{bits}, ports: [{}], protocol: {}}}", ip.trim_matches(['[', ']']), b.port, b.protocol)
        }
    };
    let (ns, name) = b.policy.split_once('/').unwrap_or(("", b.policy.as_str()));
    let (verb, outcome, reason) = if b.would {
        ("let through", "would refuse it in mode Block", EGRESS_NOT_ALLOWED)
    } else {
        ("refused", "(mode Block) does not allow it", EGRESS_BLOCKED)
    };
    let process = if b.process.is_empty() { "a process" } else { b.process.as_str() };
    let note = if b.unidentified {
        format!(
            "refused a call of pod {}/{} to {what} by {process}: it is not identified as a runner's in a namespace \
             where EgressPolicy {} blocks, and such a pod may call nothing (code in a job can make pods with the \
             runner's ServiceAccount; they are no way out). Run other workloads outside runner namespaces",
            pod.namespace, pod.name, b.policy,
        )
    } else {
        format!(
            "{verb} a call of runner pod {}/{}{} to {what} by {process}: EgressPolicy {} {outcome}. To allow it, add \
             {rule} to spec.allowedEndpoints (kubectl edit egresspolicy {name} -n {ns}, or the manifest in Git).{}",
            pod.namespace,
            pod.name,
            job_text(job),
            b.policy,
            page_link(pages, pod, job),
        )
    };
    about_runner(client, node, reason, "Connect", &note, runner, None, &format!("{}\n{at}", b.destination)).await
}

fn job_text(job: Option<&Job>) -> String {
    job.map(|j| format!(" (job {} {} run {})", j.repository, j.workflow, j.run_id)).unwrap_or_default()
}

/// A Warning Event `reason` on a runner pod, its `EphemeralRunner` and, when given, `also`
/// (with the pod as the related object); named from the pod, the reason and `key`, so a retry
/// does not duplicate it.
#[allow(clippy::too_many_arguments, reason = "one call site each; the arguments are the Event")]
async fn about_runner(
    client: &Client,
    node: &str,
    reason: &str,
    action: &str,
    note: &str,
    runner: (&ObjectRef, Option<&ObjectRef>, Option<&Job>),
    also: Option<&ObjectRef>,
    key: &str,
) -> Delivery {
    let (pod, ephemeral, _) = runner;
    let mut note = note.to_string();
    cut_note(&mut note);
    let runner_pod = reference("v1", "Pod", pod);
    let mut targets = vec![(runner_pod.clone(), None)];
    if let Some(r) = ephemeral {
        targets.push((reference("actions.github.com/v1alpha1", "EphemeralRunner", r), Some(runner_pod.clone())));
    }
    if let Some(a) = also {
        targets.push((reference("v1", "Pod", a), Some(runner_pod.clone())));
    }
    for (regarding, related) in targets {
        let text = format!("{}\n{reason}\n{key}\n{:?}", pod.uid, regarding.kind);
        let name = format!(
            "{}.{:016x}",
            regarding.name.as_deref().unwrap_or("runwarden"),
            runwarden_crds::identity::fnv1a(text.as_bytes())
        );
        let mut event = warning(&name, reason, &note, &regarding, related, node);
        event.action = Some(action.into());
        let api: Api<Event> = Api::namespaced(client.clone(), regarding.namespace.as_deref().unwrap_or("default"));
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) if retryable(&e) => return Delivery::Retry,
            Err(e) => warn!(event = %name, reason, error = %e, "could not create an Event"),
        }
    }
    Delivery::Done
}

/// Says that a pod of a runner namespace is not identified as a runner's (`pod.role` says
/// why): a Warning Event (`UnidentifiedPod`) on it. Its calls are monitored and reported under
/// no job when it ends.
pub async fn unidentified(client: &Client, node: &str, pod: &PodInfo) -> Delivery {
    let why = match &pod.role {
        crate::node::Role::Unidentified(why) => why.as_str(),
        _ => "",
    };
    let note = format!(
        "pod {}/{} runs in a namespace that holds runners but is not identified as a runner's: {why}. Its calls are \
         monitored, attributed to no job, and listed when it ends; none is learned into a baseline",
        pod.pod.namespace, pod.pod.name
    );
    about_runner(client, node, UNIDENTIFIED, "Identify", &note, (&pod.pod, None, None), None, "").await
}

/// Says something with `say` until it is said: up to five tries, 1, 2, 4 and 8 s apart while
/// the API server is away.
pub async fn retrying<F: Future<Output = Delivery>>(mut say: impl FnMut() -> F) {
    for attempt in 0..5u32 {
        if say().await == Delivery::Done {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
    }
}

/// A Warning Event of the agent on `node` about `regarding`.
fn warning(
    name: &str,
    reason: &str,
    note: &str,
    regarding: &ObjectReference,
    related: Option<ObjectReference>,
    node: &str,
) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: regarding.namespace.clone(),
            labels: Some([("app.kubernetes.io/name".to_string(), "runwarden".to_string())].into()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        action: Some("Connect".into()),
        reason: Some(reason.into()),
        note: Some(note.to_string()),
        type_: Some("Warning".into()),
        regarding: Some(regarding.clone()),
        related,
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(format!("{CONTROLLER}/{node}")),
        ..Event::default()
    }
}

/// Cuts a note to the longest the API accepts, at a character boundary.
fn cut_note(note: &mut String) {
    if note.len() > MAX_NOTE {
        let keep = cut(note, MAX_NOTE - 3).len();
        note.truncate(keep);
        note.push_str("...");
    }
}

/// The longest start of `text` of at most `max` bytes that ends at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut at = max.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

/// A reference to `o`, of `kind` in `api_version`.
fn reference(api_version: &str, kind: &str, o: &ObjectRef) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: Some(o.namespace.clone()),
        name: Some(o.name.clone()),
        uid: (!o.uid.is_empty()).then(|| o.uid.clone()),
        ..ObjectReference::default()
    }
}

/// The objects a run's Events are about: the pod, its `EphemeralRunner` and the baseline
/// (each with the pod as the related object).
fn targets(run: &Run) -> Vec<(ObjectReference, Option<ObjectReference>)> {
    let pod = reference("v1", "Pod", &run.pod);
    let mut out = vec![(pod.clone(), None)];
    if let Some(runner) = &run.runner {
        out.push((reference("actions.github.com/v1alpha1", "EphemeralRunner", runner), Some(pod.clone())));
    }
    if let Some(job) = &run.job {
        let baseline =
            ObjectRef { namespace: run.pod.namespace.clone(), name: job.baseline.clone(), uid: String::new() };
        out.push((reference("runwarden.dev/v1alpha1", "WorkflowBaseline", &baseline), Some(pod)));
    }
    out
}

/// `<object>.<hash of run, destination and object kind>`: stable across restarts.
fn event_name(run: &Run, key: &str, regarding: &ObjectReference) -> String {
    let run_id = run.job.as_ref().map_or(run.pod.uid.as_str(), |j| j.run_id.as_str());
    let text = format!("{}\n{run_id}\n{key}\n{:?}", run.pod.uid, regarding.kind);
    let hash = runwarden_crds::identity::fnv1a(text.as_bytes());
    format!("{}.{hash:016x}", regarding.name.as_deref().unwrap_or("runwarden"))
}

/// ` Run page: <url>.` for a run whose job is known, when the run pages' address is given.
fn page_link(pages: Option<&str>, pod: &ObjectRef, job: Option<&Job>) -> String {
    match (pages, job) {
        (Some(base), Some(job)) => {
            format!(" Run page: {}", runwarden_crds::run::run_page_url(base, &pod.namespace, &job.run_id, &pod.name))
        }
        _ => String::new(),
    }
}

/// What a person reads in `kubectl get events`: what called where, why it is unusual, how to
/// approve it, and the run's page when `pages` is given (the reasons are cut first when it is
/// too long).
pub fn note(run: &Run, dest: &Destination, pages: Option<&str>) -> String {
    let severity = dest.verdict.as_ref().map_or("unknown".to_string(), |v| format!("{:?}", v.severity).to_lowercase());
    let process = match (dest.processes.first(), dest.executables.first()) {
        (Some(p), Some(e)) => format!("{p} ({e})"),
        (Some(p), None) => p.clone(),
        (None, Some(e)) => e.clone(),
        (None, None) => "unknown process".into(),
    };
    let job = run.job.as_ref().map_or("job not known yet".to_string(), |j| {
        format!("run {} of {} {} job {:?}", j.run_id, j.repository, j.workflow, j.job)
    });
    let approve =
        anomaly_report(run, dest).map(|r| format!(" To approve: {}", r.approve_command())).unwrap_or_default();
    let link = page_link(pages, &run.pod, run.job.as_ref());
    let mut note = format!("{severity}: {} by {process} in {job}: ", dest.text());
    let mut reasons = dest.verdict.as_ref().map(|v| v.reasons.join("; ")).unwrap_or_default();
    reasons.push('.');
    let room = MAX_NOTE.saturating_sub(note.len() + approve.len() + link.len());
    if reasons.len() > room {
        reasons = cut(&reasons, room.saturating_sub(3)).to_string() + "...";
    }
    note.push_str(&reasons);
    note.push_str(&approve);
    note.push_str(&link);
    cut_note(&mut note);
    note
}

/// The report the operator's notifiers send, on the Event about the baseline; `None` before the
/// job is known or for a destination the detector did not score.
pub fn anomaly_report(run: &Run, dest: &Destination) -> Option<AnomalyReport> {
    let job = run.job.as_ref()?;
    let verdict = dest.verdict.as_ref()?;
    let first_seen = Timestamp::from_millisecond(dest.first_ms).map(|t| t.to_string()).unwrap_or_default();
    let report = AnomalyReport {
        namespace: run.pod.namespace.clone(),
        repository: job.repository.clone(),
        workflow: job.workflow.clone(),
        job: job.job.clone(),
        run_id: job.run_id.clone(),
        scale_set: run.scale_set.clone(),
        pod: run.pod.name.clone(),
        runner: run.runner.as_ref().map(|r| r.name.clone()),
        baseline: job.baseline.clone(),
        host: dest.host.clone(),
        address: dest.ip.to_string(),
        port: dest.port,
        protocol: match dest.proto {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        },
        processes: dest.processes.clone(),
        executables: dest.executables.clone(),
        severity: format!("{:?}", verdict.severity).to_lowercase(),
        score: verdict.score,
        reasons: verdict.reasons.clone(),
        first_seen,
    };
    Some(report.bounded())
}

#[cfg(test)]
mod tests {
    use runwarden_detector::{Severity, Verdict};

    use super::*;

    #[test]
    fn a_note_links_to_its_runs_page_whole_however_long_the_reasons() {
        let pod = ObjectRef { namespace: "arc".into(), name: "arc-runner-x".into(), uid: "u1".into() };
        let dest = Destination {
            host: Some("paste.example.net".into()),
            ip: "203.0.113.7".parse().unwrap(),
            port: 443,
            proto: Proto::Tcp,
            calls: 1,
            processes: vec!["curl".into()],
            executables: vec![],
            first_ms: 1_767_225_600_000,
            last_ms: 1_767_225_600_000,
            scored: true,
            verdict: Some(Verdict {
                severity: Severity::High,
                score: 0.9,
                reasons: vec!["x".repeat(300); 8],
                unfamiliar: true,
            }),
            reported: true,
            other_names: vec![],
        };
        let run = Run {
            pod: pod.clone(),
            runner: None,
            scale_set: None,
            job: Some(Job {
                repository: "acme/web".into(),
                workflow: ".github/workflows/ci.yml".into(),
                job: "build".into(),
                run_id: "4711".into(),
                baseline: "acme-web-ci-build".into(),
                git_ref: None,
            }),
            started: 1_767_225_600,
            destinations: Default::default(),
            dropped: 0,
            total_calls: 1,
            throttled: 0,
            finished_ms: 0,
            blocked: Default::default(),
        };
        let linked = note(&run, &dest, Some("https://rw.example"));
        assert!(linked.len() <= MAX_NOTE, "{}", linked.len());
        assert!(linked.ends_with(" Run page: https://rw.example/runs/arc/4711-arc-runner-x"), "{linked}");
        assert!(linked.contains("To approve: kubectl -n arc patch workflowbaseline"), "{linked}");
        assert!(!note(&run, &dest, None).contains("Run page"));
        // Before the job is known there is no record to link to.
        let unknown = Run { job: None, ..run };
        assert!(!note(&unknown, &dest, Some("https://rw.example")).contains("Run page"));
    }
}
