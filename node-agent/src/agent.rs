//! The agent's cluster mode (what the DaemonSet runs): the programs attached to each pod cgroup
//! as it appears below kubelet's `kubepods` and detached once the pod is known not to be a
//! runner (other pods run none of them), this node's pods watched (metadata only), each
//! new (run, destination) scored against the job's `WorkflowBaseline` and the cluster's, an
//! `AnomalousEgress` Event when it reaches the policy's minimum severity, and the run merged
//! into the baseline when its pod goes.
//!
//! Nothing is lost across restarts and API outages: runs in progress and finished runs not yet
//! merged live in `--state-dir` (`runs/`, `finished/`), rewritten at most every second; a
//! restarted agent resumes them, and merges are retried until the API server takes them.
//!
//! No blind start: a pod's cgroup exists before any of its processes (kubelet makes it, then
//! sets up the sandbox's network, then starts containers), and the agent attaches the programs
//! on its `mkdir` (inotify), so a runner's first process (init containers included) is seen,
//! even before the agent has read the pod from the API; those calls are held until the pod is
//! known. A pod whose cgroup already held a process when the programs were attached (the agent
//! was slow, or missed the `mkdir`) is counted (`runwarden_agent_pods_armed_late_total`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef as StoreRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use runwarden_crds::arc::EphemeralRunner;
use runwarden_crds::identity::{JobIdentity, RUNNER_POD_LABEL, SELF_DECLARED_LABEL};
use runwarden_crds::policy::AbusedServices;
use runwarden_crds::{EgressPolicy, WorkflowBaseline};
use runwarden_detector::{Cluster, Services, Severity, Verdict};
use runwarden_status::merge::{FinishedRun, MergeError, merge_run};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::cgroups;
use crate::ebpf::{LoadError, Options, PodBudget, Probes, ResolverAddress};
use crate::enforce::{self, Allowance, Covered, Enforcer};
use crate::metrics::{Kind, Metrics, ResultLabel, VerdictLabel};
use crate::node::{Action, Destination, Job, Node, ObjectRef, PodInfo, Role, Run, Scorer, Trust};
use crate::pipeline::{Pipeline, PipelineConfig, since_boot};
use crate::report::{Report, ReportConfig, Reporter};
use crate::resolver::Resolver;

/// The flags of the agent's cluster mode (the DaemonSet's container args).
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    /// The host's cgroup mount as this container sees it (a hostPath of /sys/fs/cgroup). Its
    /// cgroup v2 hierarchy is used: the directory itself, or its `unified` child on hybrid hosts.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// kubelet's pod cgroup tree, relative to the cgroup v2 root (`kubepods`,
    /// `kubepods.slice`); found by looking when not given.
    #[arg(long, env = "RUNWARDEN_KUBEPODS_CGROUP")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// Port of /metrics, /healthz and /readyz (all addresses).
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Directory for runs in progress and runs not yet merged (a hostPath: survives restarts).
    #[arg(long, default_value = "/var/lib/runwarden")]
    pub state_dir: PathBuf,
    /// This node's name (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The agent's own pod (the DaemonSet sets it from the downward API): Events that concern
    /// the agent itself (AgentTampered) are also put on it.
    #[arg(long, env = "POD_NAME", requires = "pod_namespace")]
    pub pod_name: Option<String>,
    /// The agent's own namespace (see `--pod-name`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The agent's own pod's UID (see `--pod-name`).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// The DNS resolvers whose answers name runners' destinations (comma-separated addresses).
    /// Default: the nameservers of the agent's own /etc/resolv.conf (its pod uses the cluster's
    /// DNS, as ClusterFirst runner pods do). Answers from any other server, such as one a
    /// process runs inside its pod, name nothing unless a trusted answer agrees.
    #[arg(long, value_delimiter = ',', env = "RUNWARDEN_TRUSTED_RESOLVERS")]
    pub trusted_resolvers: Vec<IpAddr>,
    /// Repeated calls to one destination within this many seconds are counted in the kernel,
    /// not reported one by one.
    #[arg(long, default_value_t = 1.0)]
    pub dedupe_window: f64,
    /// New AnomalousEgress Events per second (sustained; bursts of ten times as many).
    #[arg(long, default_value_t = 10.0)]
    pub events_per_second: f64,
    /// Where the operator's run pages are reached, scheme and host only
    /// (`https://runwarden.example.com`, e.g. an Ingress): Events about a run end with a link to
    /// its page.
    #[arg(long, env = "RUNWARDEN_UI_URL", value_parser = runwarden_crds::run::pages_base)]
    pub ui_url: Option<String>,
    /// Kernel records one pod may write per second (its budget's refill); past its budget a
    /// pod's records are counted, not written, so it cannot crowd out the others.
    #[arg(long, default_value_t = PodBudget::default().per_second)]
    pub pod_records_per_second: u32,
    /// Kernel records one pod may write in a burst.
    #[arg(long, default_value_t = PodBudget::default().burst)]
    pub pod_records_burst: u32,
    /// Logs as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
    /// The namespaces that hold runners, when the agent's write permissions are granted only
    /// there (comma-separated; empty: cluster-wide). Checked at start.
    #[arg(long, value_delimiter = ',', env = "RUNWARDEN_RUNNER_NAMESPACES")]
    pub runner_namespaces: Vec<String>,
    /// Block mode: runner pods an EgressPolicy in `Block` mode covers may call only what it
    /// allows, and resolve only the names it allows (their DNS goes to this agent's resolver).
    /// Experimental: while the agent restarts, its pods are not held.
    #[arg(long, env = "RUNWARDEN_BLOCK_MODE")]
    pub block_mode: bool,
    /// This agent pod's addresses (comma-separated; the node's, as the agent uses the host's
    /// network), where block-mode pods reach its resolver: the first IPv4 one, and the first
    /// IPv6 one for pods that ask IPv6 servers (the DaemonSet sets it from status.podIPs).
    #[arg(long, env = "POD_IPS", value_delimiter = ',')]
    pub pod_ips: Vec<IpAddr>,
    /// Port of the resolver block-mode pods' DNS goes to (UDP and TCP).
    #[arg(long, default_value_t = 10053)]
    pub resolver_port: u16,
    /// The DNS server the resolver asks (`address:port`). Default: the first nameserver of
    /// the agent's /etc/resolv.conf (the cluster's DNS), port 53.
    #[arg(long, env = "RUNWARDEN_DNS_UPSTREAM")]
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// How the resolver answers a name block mode does not allow.
    #[arg(long, value_enum, default_value_t = Refusal::Refused)]
    pub refuse_dns_with: Refusal,
    /// The node's BPF filesystem (a hostPath of /sys/fs/bpf): block mode keeps its state and
    /// its pods' links in `runwarden/` there, so a restarted agent finds its pods still held.
    #[arg(long, env = "RUNWARDEN_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// How a name that may not be resolved is answered.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// REFUSED: the server will not answer (clients try their next server, then fail).
    Refused,
    /// NXDOMAIN: no such name.
    Nxdomain,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The programs could not be loaded or attached.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// No cgroup v2 hierarchy at `--cgroup-root`.
    #[error(
        "{0}: no cgroup v2 hierarchy here or in its `unified` child; mount the host's /sys/fs/cgroup (hostPath) and pass it as --cgroup-root"
    )]
    NoCgroup2(PathBuf),
    /// The state directory is not usable.
    #[error("--state-dir {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    /// The metrics port.
    #[error("--metrics-port {0}: {1}")]
    Listen(u16, std::io::Error),
    /// No in-cluster configuration or kubeconfig.
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// Missing permissions.
    #[error("the agent lacks permissions: {}; apply node-agent/rbac.yaml (or the Helm chart's RBAC)", .0.join(", "))]
    MissingPermissions(Vec<String>),
    /// Block mode cannot start.
    #[error("--block-mode: {0}")]
    BlockMode(String),
}

impl AgentError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::MissingPermissions(_) => 3,
            AgentError::Client(_) => 4,
            _ => 1,
        }
    }
}

/// Runs in progress and finished runs not yet merged, one JSON file each.
#[derive(Clone, Debug)]
pub struct StateDir {
    runs: PathBuf,
    finished: PathBuf,
}

impl StateDir {
    /// Opens (creates) the state directory.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (runs, finished) = (dir.join("runs"), dir.join("finished"));
        std::fs::create_dir_all(&runs)?;
        std::fs::create_dir_all(&finished)?;
        Ok(Self { runs, finished })
    }

    fn write(dir: &Path, uid: &str, run: &Run) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{uid}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(run).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, dir.join(format!("{uid}.json")))
    }

    fn read_all(dir: &Path) -> Vec<Run> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Run>(&b).map_err(|e| e.to_string()))
            {
                Ok(run) => out.push(run),
                // Kept for a person to look at; never silently deleted.
                Err(e) => warn!(file = %path.display(), error = %e, "a state file could not be read; left in place"),
            }
        }
        out
    }

    /// Runs in progress saved before a restart.
    pub fn runs(&self) -> Vec<Run> {
        Self::read_all(&self.runs)
    }

    /// Finished runs not yet merged.
    pub fn finished(&self) -> Vec<Run> {
        Self::read_all(&self.finished)
    }

    /// Saves a run in progress (or removes it when it ended).
    pub fn save(&self, uid: &str, run: Option<&Run>) -> std::io::Result<()> {
        match run {
            Some(run) => Self::write(&self.runs, uid, run),
            None => match std::fs::remove_file(self.runs.join(format!("{uid}.json"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Keeps a finished run until it is merged (written before its in-progress file goes).
    pub fn finish(&self, run: &Run) -> std::io::Result<()> {
        Self::write(&self.finished, &run.pod.uid, run)?;
        self.save(&run.pod.uid, None)
    }

    /// The pods' DNS uplinks kept before a restart (none when the file is missing or unreadable:
    /// they are learned again).
    pub fn uplinks(&self) -> HashMap<u64, u32> {
        let path = self.runs.with_file_name("dns-uplinks.json");
        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Keeps the pods' DNS uplinks (see [`Pipeline::take_changed_uplinks`]).
    pub fn save_uplinks(&self, uplinks: &HashMap<u64, u32>) -> std::io::Result<()> {
        let path = self.runs.with_file_name("dns-uplinks.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(uplinks).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }

    /// Forgets a merged run.
    pub fn merged(&self, uid: &str) {
        let _ = std::fs::remove_file(self.finished.join(format!("{uid}.json")));
    }
}

/// A baseline's model and the resourceVersion it was read from.
type ParsedModel = (Option<String>, Arc<runwarden_detector::Baseline>);
/// A policy's abused services, with the policy's changes they were built from.
type PolicyServices = (AbusedServices, Arc<Services>);

/// Scores with the baseline and policy caches.
struct Caches {
    baselines: Store<WorkflowBaseline>,
    policies: Store<EgressPolicy>,
    cluster: Cluster,
    cluster_built: Option<Instant>,
    /// Parsed models by (namespace, name), with the resourceVersion they were read from.
    models: std::cell::RefCell<HashMap<(String, String), ParsedModel>>,
    /// The built-in abused services, for jobs no policy covers.
    builtin_services: Arc<Services>,
    /// Abused services by policy (namespace, name), with the policy's changes they were built from.
    services: std::cell::RefCell<HashMap<(String, String), PolicyServices>>,
}

impl Caches {
    /// Rebuilds the cluster context at most every five seconds.
    fn refresh(&mut self) {
        if self.cluster_built.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            let all = self.baselines.state();
            self.cluster = runwarden_status::cluster(all.iter().map(|b| b.as_ref()));
            self.cluster_built = Some(Instant::now());
        }
    }
}

/// The policy that applies to the pod's job, if any.
fn applicable_policy(
    policies: &Store<EgressPolicy>,
    pod: &ObjectRef,
    scale_set: Option<&str>,
    job: &Job,
) -> Option<Arc<EgressPolicy>> {
    let policies = policies.state();
    let applicable = runwarden_crds::policy::applicable_to_job(
        policies.iter().map(|p| p.as_ref()),
        &pod.namespace,
        scale_set,
        &job.repository,
        &job.workflow,
    )?;
    policies.iter().find(|p| std::ptr::eq(p.as_ref(), applicable)).cloned()
}

/// The least severity the policy that applies to the pod reports (`None`: reporting is off).
fn min_severity(
    policies: &Store<EgressPolicy>,
    pod: &ObjectRef,
    scale_set: Option<&str>,
    job: &Job,
) -> Option<Severity> {
    match applicable_policy(policies, pod, scale_set, job) {
        Some(p) if !p.spec.anomaly_detection.enabled => None,
        Some(p) => Some(runwarden_status::model_severity(p.spec.anomaly_detection.min_severity)),
        // No policy: anomalies are reported at Medium.
        None => Some(Severity::Medium),
    }
}

impl Caches {
    /// The abused services for the pod's job: the built-in lists as its policy changes them.
    fn services(&self, pod: &ObjectRef, scale_set: Option<&str>, job: &Job) -> Arc<Services> {
        let Some(policy) = applicable_policy(&self.policies, pod, scale_set, job) else {
            return self.builtin_services.clone();
        };
        let spec = &policy.spec.anomaly_detection.abused_services;
        let key = (policy.namespace().unwrap_or_default(), policy.name_any());
        let mut cache = self.services.borrow_mut();
        if let Some((cached, services)) = cache.get(&key)
            && cached == spec
        {
            return services.clone();
        }
        let services = Arc::new(runwarden_status::services(spec));
        // Bounded: policies deleted long ago are rebuilt if they come back.
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(key, (spec.clone(), services.clone()));
        services
    }
}

impl Scorer for Caches {
    fn min_severity(&self, pod: &ObjectRef, scale_set: Option<&str>, job: &Job) -> Option<Severity> {
        min_severity(&self.policies, pod, scale_set, job)
    }

    fn score(
        &self,
        pod: &ObjectRef,
        scale_set: Option<&str>,
        job: &Job,
        started: i64,
        dest: &Destination,
    ) -> Option<Verdict> {
        let namespace = pod.namespace.as_str();
        let found = self.baselines.get(&StoreRef::new(&job.baseline).within(namespace));
        let spec_default;
        let (spec, model) = match &found {
            Some(b) => {
                let key = (namespace.to_string(), job.baseline.clone());
                let version = b.metadata.resource_version.clone();
                let mut models = self.models.borrow_mut();
                let model = match models.get(&key) {
                    Some((v, m)) if *v == version => m.clone(),
                    _ => {
                        let m = Arc::new(
                            b.status.as_ref().and_then(|s| runwarden_status::read(s).ok()).unwrap_or_default(),
                        );
                        models.insert(key, (version, m.clone()));
                        m
                    }
                };
                (&b.spec, model)
            }
            // The operator creates the baseline when the job is known; until it is there, the
            // job's baseline is empty (young: scored as such).
            None => {
                spec_default = serde_json::from_value(serde_json::json!({
                    "repository": job.repository, "workflow": job.workflow, "job": job.job
                }))
                .ok()?;
                (&spec_default, Arc::new(runwarden_detector::Baseline::default()))
            }
        };
        let config = runwarden_status::config(spec, Severity::Medium).ok()?;
        let run = runwarden_detector::Run {
            id: &job.run_id,
            time: started,
            trigger: TRIGGER,
            git_ref: job.git_ref.as_deref(),
        };
        let scored = runwarden_detector::Job {
            repository: &job.repository,
            baseline: &model,
            config: &config,
            cluster: &self.cluster,
            services: &self.services(pod, scale_set, job),
        };
        scored.score(&run, &dest.call())
    }
}

/// Least time between two scans of the pod cgroups.
const MIN_SCAN_GAP: Duration = Duration::from_millis(20);

/// How long a broken watch waits before it tries again: from half a second, doubling to at most
/// 10 s (with jitter), back to the start after a minute without errors. Shorter than
/// kube-runtime's default (30 s): after an API server outage, runs that ended meanwhile must
/// end here soon; the agent makes one watch of each kind, so a node's retries stay few.
fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<watcher::ExponentialBackoff> {
    let delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(delays.into(), Duration::from_secs(60))
}

/// Objects of kind `K` in the runner namespaces (or all), each namespace's in a store of its
/// own (a relist of one namespace must not empty another's).
struct Scoped<K: kube::Resource<DynamicType = ()> + 'static> {
    /// A store per namespace watched (`None`: all namespaces).
    stores: Vec<(Option<String>, Store<K>)>,
}

impl<K> Scoped<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Watches `what` in `namespaces` (all when empty) with the streams `stream` makes for a
    /// namespace (`None`: all), `trim` dropping what the agent does not read before an object is
    /// stored; each object added or changed is sent on `applied`.
    fn watch<S>(
        namespaces: &[String],
        what: &'static str,
        stream: impl Fn(Option<&str>) -> S,
        trim: fn(&mut K),
        applied: Option<mpsc::Sender<K>>,
    ) -> Self
    where
        S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let scopes: Vec<Option<String>> =
            if namespaces.is_empty() { vec![None] } else { namespaces.iter().cloned().map(Some).collect() };
        let mut stores = Vec::new();
        for scope in scopes {
            let (store, writer) = reflector::store();
            let objects =
                stream(scope.as_deref()).backoff(watch_backoff()).modify(trim).reflect(writer).applied_objects();
            let applied = applied.clone();
            tokio::spawn(async move {
                let mut objects = std::pin::pin!(objects);
                while let Some(o) = objects.next().await {
                    match (o, &applied) {
                        (Ok(o), Some(applied)) => {
                            if applied.send(o).await.is_err() {
                                return;
                            }
                        }
                        (Ok(_), None) => {}
                        (Err(e), _) => warn!(error = %e, "watching {what} failed; retrying"),
                    }
                }
            });
            stores.push((scope, store));
        }
        Self { stores }
    }

    /// Object `name` of `namespace` if its UID is `uid`.
    fn get(&self, namespace: &str, name: &str, uid: &str) -> Option<Arc<K>> {
        let (_, store) = self.stores.iter().find(|(ns, _)| ns.as_deref().is_none_or(|ns| ns == namespace))?;
        let found = store.get(&StoreRef::new(name).within(namespace))?;
        (found.meta().uid.as_deref() == Some(uid)).then_some(found)
    }

    /// Waits until every store has listed its objects once.
    async fn wait_until_ready(&self) {
        for (_, store) in &self.stores {
            let _ = store.wait_until_ready().await;
        }
    }
}

/// The jobs ARC gave the runners: their `EphemeralRunner`s, keeping only names, UIDs and status
/// (each agent sees every runner of the runner namespaces: a few hundred bytes each).
fn watch_runner_jobs(
    client: &Client,
    namespaces: &[String],
    applied: mpsc::Sender<EphemeralRunner>,
) -> Scoped<EphemeralRunner> {
    let trim = |r: &mut EphemeralRunner| {
        r.metadata.managed_fields = None;
        r.metadata.annotations = None;
        r.metadata.labels = None;
        r.spec = Default::default();
    };
    let api = |ns: Option<&str>| match ns {
        Some(ns) => Api::<EphemeralRunner>::namespaced(client.clone(), ns),
        None => Api::<EphemeralRunner>::all(client.clone()),
    };
    Scoped::watch(
        namespaces,
        "EphemeralRunners",
        |ns| watcher(api(ns), watcher::Config::default()),
        trim,
        Some(applied),
    )
}

/// The job of the `EphemeralRunner` `runner` (same UID), once ARC has given it one.
fn runner_job(runners: &Scoped<EphemeralRunner>, runner: &ObjectRef) -> Option<JobIdentity> {
    runners.get(&runner.namespace, &runner.name, &runner.uid)?.status.as_ref()?.identity().ok()
}

/// The batch Jobs labelled `runner-pod` (metadata only): ARC's container hooks run a container
/// step in a Job labelled with the runner pod's name, whose pod carries no such label.
fn watch_step_jobs(client: &Client, namespaces: &[String]) -> Scoped<PartialObjectMeta<BatchJob>> {
    let trim = |j: &mut PartialObjectMeta<BatchJob>| {
        j.metadata.managed_fields = None;
        j.metadata.annotations = None;
    };
    let api = |ns: Option<&str>| match ns {
        Some(ns) => Api::<PartialObjectMeta<BatchJob>>::namespaced(client.clone(), ns),
        None => Api::<PartialObjectMeta<BatchJob>>::all(client.clone()),
    };
    let config = watcher::Config::default().labels(RUNNER_POD_LABEL);
    Scoped::watch(namespaces, "runner-pod Jobs", |ns| watcher(api(ns), config.clone()), trim, None)
}

/// The runner pod a pod made by a batch Job belongs to: the `runner-pod` label of its owning
/// Job (which only that runner pod may set, by the chart's admission policy).
fn step_job_runner(jobs: &Scoped<PartialObjectMeta<BatchJob>>, pod: &ObjectMeta) -> Option<String> {
    let owner = pod.owner_references.iter().flatten().find(|o| o.kind == "Job" && o.api_version == "batch/v1")?;
    let job = jobs.get(pod.namespace.as_deref()?, &owner.name, &owner.uid)?;
    job.metadata.labels.as_ref()?.get(RUNNER_POD_LABEL).cloned()
}

/// The trigger of runs: ARC does not say which event started a job, so every run has the same.
pub const TRIGGER: &str = "unknown";

/// Runs the agent until SIGTERM.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let node_name = args.node_name.clone().unwrap_or_default();
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.metrics_port))
        .await
        .map_err(|e| AgentError::Listen(args.metrics_port, e))?;
    tokio::spawn(crate::metrics::serve(listener, metrics.clone()));

    let mount =
        cgroups::cgroup2_root(&args.cgroup_root).ok_or_else(|| AgentError::NoCgroup2(args.cgroup_root.clone()))?;
    let state = StateDir::open(&args.state_dir).map_err(|e| AgentError::StateDir(args.state_dir.clone(), e))?;
    let client = Client::try_default().await?;
    // Without its own namespace the agent puts no Event on its own pod, and does not need
    // the permission.
    let rbac = match &args.pod_namespace {
        Some(_) => crate::rbac::RBAC,
        None => runwarden_crds::rbac::Rbac { namespaced: &[], ..crate::rbac::RBAC },
    };
    let missing = rbac.missing(&client, args.pod_namespace.as_deref().unwrap_or(""), &args.runner_namespaces).await?;
    if !missing.is_empty() {
        return Err(AgentError::MissingPermissions(missing));
    }

    let dedupe_window = Duration::from_secs_f64(args.dedupe_window.clamp(0.0, 3600.0));
    let pod_budget = PodBudget { per_second: args.pod_records_per_second, burst: args.pod_records_burst };
    // The agent runs in a pod, so kubelet's pod cgroups exist; a wrong --kubepods-cgroup or a
    // layout not understood is said, and waited out.
    let parents = loop {
        let parents = cgroups::pod_parents(&mount, args.kubepods_cgroup.as_deref());
        if !parents.is_empty() {
            break parents;
        }
        warn!(cgroup2 = %mount.display(), kubepods = ?args.kubepods_cgroup, "no kubelet pod cgroups found (kubepods, kubepods.slice); looking again in 5 s");
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let pin_dir = args.block_mode.then(|| args.bpffs.join("runwarden"));
    let mut probes = Probes::load(&Options { mount: mount.clone(), dedupe_window, pod_budget, pin_dir })?;
    let mut reader = probes.reader()?;
    probes.watch_pods(&parents)?;
    // Pods made from now on are armed as their cgroup appears; those already there (running
    // unseen before this agent started), now.
    let mut new_pods = cgroups::PodCgroupWatch::new(&mount, &parents)
        .map_err(|e| AgentError::Load(LoadError::Cgroup { path: parents[0].clone(), source: e }))?;
    for dir in cgroups::pod_dirs(&mount, &parents) {
        arm(&mut probes, &dir.path);
    }
    info!(
        cgroup2 = %mount.display(), pod_parents = ?parents, exec_paths = probes.exec_paths(),
        abused_services = runwarden_detector::services::LISTS_VERSION, "programs attached"
    );
    let mut enforcer = Enforcer::new(probes.clients(), probes.allow_list());
    let (answers_tx, mut answers_rx) = mpsc::channel::<(u64, Vec<u8>)>(4096);
    if args.block_mode {
        start_resolver(&args, &mut probes, &enforcer, answers_tx).await?;
    }

    // Caches of baselines and policies (all namespaces), and this node's pods.
    let (baselines, baseline_writer) = reflector::store();
    let (policies, policy_writer) = reflector::store();
    let bl = reflector::reflector(
        baseline_writer,
        watcher(Api::<WorkflowBaseline>::all(client.clone()), watcher::Config::default()),
    )
    .backoff(watch_backoff())
    .touched_objects();
    let pl = reflector::reflector(
        policy_writer,
        watcher(Api::<EgressPolicy>::all(client.clone()), watcher::Config::default()),
    )
    .backoff(watch_backoff())
    .touched_objects();
    tokio::spawn(async move {
        let mut bl = std::pin::pin!(bl);
        while let Some(r) = bl.next().await {
            if let Err(e) = r {
                warn!(error = %e, "watching WorkflowBaselines failed; retrying");
            }
        }
    });
    tokio::spawn(async move {
        let mut pl = std::pin::pin!(pl);
        while let Some(r) = pl.next().await {
            if let Err(e) = r {
                warn!(error = %e, "watching EgressPolicies failed; retrying");
            }
        }
    });
    let (job_tx, mut job_rx) = mpsc::channel(1024);
    let runner_jobs = Arc::new(watch_runner_jobs(&client, &args.runner_namespaces, job_tx));
    let step_jobs = Arc::new(watch_step_jobs(&client, &args.runner_namespaces));
    let caches_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (b, p, ready) = (baselines.clone(), policies.clone(), caches_ready.clone());
        let (r, j) = (runner_jobs.clone(), step_jobs.clone());
        tokio::spawn(async move {
            if b.wait_until_ready().await.is_ok() && p.wait_until_ready().await.is_ok() {
                r.wait_until_ready().await;
                j.wait_until_ready().await;
                ready.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let (pod_tx, mut pod_rx) = mpsc::channel(1024);
    let pods_node = node_name.clone();
    let pods_client = client.clone();
    tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={pods_node}"));
        let pods = watcher(Api::<PartialObjectMeta<Pod>>::all(pods_client), config).backoff(watch_backoff());
        let mut pods = std::pin::pin!(pods);
        while let Some(event) = pods.next().await {
            match event {
                Ok(e) => {
                    if pod_tx.send(e).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "watching this node's pods failed; retrying"),
            }
        }
    });

    // Reporter and merger tasks.
    let (report_tx, report_rx) = mpsc::channel::<Report>(10_000);
    let reporter = Reporter::new(
        client.clone(),
        &node_name,
        ReportConfig {
            per_second: args.events_per_second,
            burst: args.events_per_second * 10.0,
            pages: args.ui_url.clone(),
        },
        metrics.clone(),
    );
    tokio::spawn(reporter.run(report_rx));
    let (merge_tx, merge_rx) = mpsc::unbounded_channel::<Run>();
    for run in state.finished() {
        let _ = merge_tx.send(run);
    }
    tokio::spawn(merger(client.clone(), node_name.clone(), merge_rx, state.clone(), policies.clone(), metrics.clone()));

    // Namespaces a cluster administrator labelled for self-declared identities: known before
    // the first pod is judged.
    let (self_declared, self_declared_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default().labels(&format!("{SELF_DECLARED_LABEL}=true")),
    )
    .backoff(watch_backoff())
    .reflect(self_declared_writer)
    .applied_objects();
    tokio::spawn(async move {
        let mut namespaces = std::pin::pin!(namespaces);
        while let Some(e) = namespaces.next().await {
            if let Err(e) = e {
                warn!(error = %e, "watching namespaces labelled {SELF_DECLARED_LABEL} failed; retrying");
            }
        }
    });
    let _ = self_declared.wait_until_ready().await;
    let self_declared_namespaces = || {
        self_declared.state().iter().filter_map(|n| n.metadata.name.clone()).collect::<std::collections::HashSet<_>>()
    };
    let mut node = Node::default();
    node.trust = Trust {
        runner_namespaces: args.runner_namespaces.iter().cloned().collect(),
        self_declared_namespaces: self_declared_namespaces(),
    };
    node.restore(state.runs());
    let mut caches = Caches {
        baselines: baselines.clone(),
        policies: policies.clone(),
        cluster: Cluster::default(),
        cluster_built: None,
        models: Default::default(),
        builtin_services: Arc::new(Services::builtin().clone()),
        services: Default::default(),
    };
    let trusted_resolvers = if args.trusted_resolvers.is_empty() {
        nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        args.trusted_resolvers.clone()
    };
    if trusted_resolvers.is_empty() {
        warn!(
            "no trusted DNS resolvers (--trusted-resolvers, or nameservers in /etc/resolv.conf): DNS answers name nothing, every call is reported by address"
        );
    } else {
        info!(resolvers = ?trusted_resolvers, "DNS answers name destinations only from these resolvers, or where they agree");
    }
    let mut pipeline =
        Pipeline::new(PipelineConfig { trusted_resolvers: Some(trusted_resolvers), ..PipelineConfig::default() });
    pipeline.restore_uplinks(state.uplinks());
    let mut shutdown = std::pin::pin!(crate::trace::interrupted());
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut last_scan: Option<Instant> = None;
    // When each pod cgroup's tampering was last said in an Event.
    let mut tamper_said: HashMap<u64, Instant> = HashMap::new();
    // When each (pod cgroup, name)'s suspicious DNS answer was last said in an Event.
    let mut dns_said: HashMap<(u64, String), Instant> = HashMap::new();
    let agent_pod = match (&args.pod_name, &args.pod_namespace) {
        (Some(name), Some(namespace)) => Some(crate::node::ObjectRef {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: args.pod_uid.clone().unwrap_or_default(),
        }),
        _ => None,
    };
    let mut allowances: HashMap<AllowanceKey, Arc<Allowance>> = HashMap::new();
    // When each (pod cgroup, destination)'s refusal was last said in an Event.
    let mut blocked_said: HashMap<(u64, String), Instant> = HashMap::new();
    let pages = args.ui_url.as_deref();
    // Pods whose policy lists what they may call without refusing it: cgroup → what it lists.
    let mut audited: HashMap<u64, Arc<Allowance>> = HashMap::new();
    let mut pods_synced = false;
    let mut relisted: Option<std::collections::HashSet<String>> = None;
    let mut observations = Vec::new();
    let mut pod_events = Vec::new();
    let mut runner_jobs_given = Vec::new();
    let mut pod_events_rescan = false;
    loop {
        let mut tick = false;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = reader.drain(|bytes| {
                // The resolver's answers before the calls they name: it sends them before the
                // pod has them, so before any call that follows.
                while let Ok((pod, reply)) = answers_rx.try_recv() {
                    pipeline.resolver_answer(pod, &reply);
                }
                observations.extend(pipeline.record(bytes));
            }) => {}
            Some(e) = pod_rx.recv() => pod_events.push(e),
            Some(runner) = job_rx.recv() => {
                let job = runner.status.as_ref().and_then(|s| s.identity().ok());
                if let (Some(uid), Some(job)) = (runner.metadata.uid, job) {
                    runner_jobs_given.push((uid, job));
                }
            }
            created = new_pods.next() => {
                if let cgroups::PodCgroupEvent::Created(dir) = created {
                    arm_new(&mut probes, &dir.path, &metrics);
                }
                pod_events_rescan = true;
            }
            _ = housekeeping.tick() => tick = true,
        }
        caches.refresh();
        if tick {
            node.trust.self_declared_namespaces = self_declared_namespaces();
        }
        let mut actions = Vec::new();
        // Pods, jobs or cgroups changed: block mode follows at once (policies, every second).
        let changed = pod_events_rescan || !pod_events.is_empty() || !runner_jobs_given.is_empty();
        if std::mem::take(&mut pod_events_rescan) {
            actions.push(Action::Rescan);
        }
        for e in pod_events.drain(..) {
            match e {
                watcher::Event::Apply(m) | watcher::Event::InitApply(m) => {
                    if let (Some(listed), Some(uid)) = (relisted.as_mut(), m.metadata.uid.as_ref()) {
                        listed.insert(uid.clone());
                    }
                    if let Some(mut info) = PodInfo::from_meta(&m.metadata) {
                        // Runners outside the runner namespaces the agent's RBAC is narrowed to
                        // are not its to report (it could not write their Events or baselines).
                        if !args.runner_namespaces.is_empty() && !args.runner_namespaces.contains(&info.pod.namespace) {
                            info.role = Role::Other;
                        }
                        if info.role == Role::Runner {
                            info.identity = info.runner.as_ref().and_then(|r| runner_job(&runner_jobs, r));
                        }
                        if info.role == Role::Other
                            && let Some(runner) = step_job_runner(&step_jobs, &m.metadata)
                        {
                            info.role = Role::JobPod(runner);
                        }
                        actions.extend(node.pod(info, &caches));
                    }
                }
                watcher::Event::Delete(m) => {
                    if let Some(uid) = m.metadata.uid.as_deref() {
                        actions.extend(node.pod_deleted(uid));
                    }
                }
                watcher::Event::InitDone => {
                    // A relist after the watch broke (an API server outage): pods deleted
                    // meanwhile are not in it, and their runs end now.
                    if let Some(listed) = relisted.take() {
                        actions.extend(node.keep_only(&listed));
                    }
                    pods_synced = true;
                    actions.extend(node.synced(&caches));
                    actions.push(Action::Rescan);
                }
                watcher::Event::Init => relisted = Some(std::collections::HashSet::new()),
            }
        }
        for (runner, job) in runner_jobs_given.drain(..) {
            actions.extend(node.runner_job(&runner, job, &caches));
        }
        for o in observations.drain(..) {
            // A refused call is said as such, and is no destination of the run: a baseline
            // never learns what block mode refused (with includeBaseline it would allow it next).
            if o.verdict == crate::events::Verdict::Denied {
                let policy = enforcer.policy_of(o.pod_cgroup_id).unwrap_or_default().to_string();
                say_blocked(&o, &node, &policy, false, &mut blocked_said, &metrics, &client, &node_name, pages);
                node.refused(&o, &policy);
                continue;
            }
            if let Some(allowance) = audited.get(&o.pod_cgroup_id)
                && !allowance.allows(&o.hosts, o.ip, o.port, o.proto)
            {
                let policy = allowance.policy.clone();
                say_blocked(&o, &node, &policy, true, &mut blocked_said, &metrics, &client, &node_name, pages);
            }
            actions.extend(node.observe(o, &caches));
        }
        if tick {
            // A privileged process in a pod can detach the pod's programs or delete its mark by
            // id: noticed within a second, said, and put back.
            match probes.check_pods() {
                Ok(tampered) => {
                    for t in tampered {
                        for (kind, hit) in [("programs", !t.detached.is_empty()), ("mark", t.unmarked)] {
                            if hit {
                                metrics.tampered.get_or_create(&crate::metrics::Kind { kind }).inc();
                            }
                        }
                        let runner = node.run_of_cgroup(t.id);
                        error!(
                            cgroup = %t.dir.display(), detached = ?t.detached, mark_deleted = t.unmarked,
                            pod = runner.as_ref().map(|r| format!("{}/{}", r.0.namespace, r.0.name)),
                            "a pod's kernel monitoring was switched off from outside the agent (a privileged process detached its programs or deleted its mark); attached again: its calls meanwhile may have gone unseen"
                        );
                        // One Event per pod a minute: a pod that keeps detaching is said, not
                        // flooded into the API server (the metric counts every time).
                        let now = Instant::now();
                        let due = tamper_said
                            .get(&t.id)
                            .is_none_or(|last: &Instant| now.duration_since(*last) >= Duration::from_secs(60));
                        if let Some(runner) = runner
                            && due
                        {
                            tamper_said.insert(t.id, now);
                            if tamper_said.len() > 4096 {
                                tamper_said.retain(|_, last| now.duration_since(*last) < Duration::from_secs(60));
                            }
                            let mut what = Vec::new();
                            if !t.detached.is_empty() {
                                what.push(format!("programs detached: {}", t.detached.join(", ")));
                            }
                            if t.unmarked {
                                what.push("its entry deleted from the monitored set".to_string());
                            }
                            let (client, node_name, agent_pod) = (client.clone(), node_name.clone(), agent_pod.clone());
                            let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                            tokio::spawn(async move {
                                let runner = (&runner.0, runner.1.as_ref(), runner.2.as_ref());
                                let what = what.join("; ");
                                crate::report::retrying(|| {
                                    crate::report::tampered(&client, &node_name, agent_pod.as_ref(), runner, &what, at)
                                })
                                .await;
                            });
                        }
                    }
                }
                Err(e) => warn!(error = %e, "could not check the pods' programs"),
            }
            // Answers from resolvers inside a pod that contradict the cluster's: said once per
            // pod and name every ten minutes (the metric counts every one).
            for suspicious in pipeline.take_suspicious() {
                let runner = node.run_of_cgroup(suspicious.pod_cgroup_id);
                warn!(
                    pod = runner.as_ref().map(|r| format!("{}/{}", r.0.namespace, r.0.name)), server = %suspicious.server,
                    loopback = suspicious.loopback, other_interface = suspicious.other_interface, name = %suspicious.name, claimed = ?suspicious.claimed, trusted = ?suspicious.trusted,
                    "a DNS answer from a resolver inside a pod contradicts the cluster's resolver; not used"
                );
                let now = Instant::now();
                let key = (suspicious.pod_cgroup_id, suspicious.name.clone());
                let due = dns_said
                    .get(&key)
                    .is_none_or(|last: &Instant| now.duration_since(*last) >= Duration::from_secs(600));
                let Some(runner) = runner.filter(|_| due) else { continue };
                dns_said.insert(key, now);
                if dns_said.len() > 4096 {
                    dns_said.retain(|_, last| now.duration_since(*last) < Duration::from_secs(600));
                }
                let (client, node_name) = (client.clone(), node_name.clone());
                let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 600;
                tokio::spawn(async move {
                    let runner = (&runner.0, runner.1.as_ref(), runner.2.as_ref());
                    crate::report::retrying(|| {
                        crate::report::suspicious_dns(&client, &node_name, runner, &suspicious, at)
                    })
                    .await;
                });
            }
            match probes.check_config() {
                Ok(false) => {}
                Ok(true) => {
                    metrics.tampered.get_or_create(&crate::metrics::Kind { kind: "config" }).inc();
                    error!(
                        "the kernel programs' settings were rewritten from outside the agent (a privileged process); written again: calls meanwhile may have gone unseen"
                    );
                }
                Err(e) => warn!(error = %e, "could not check the programs' settings"),
            }
            if last_scan.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                actions.push(Action::Rescan);
            }
            // Count exactly what the kernel folded, and recover destinations whose record was
            // lost to a full ring buffer: they are scored and reported like any other.
            if let Ok(table) = probes.dedupe_table() {
                let read_up_to = since_boot().as_nanos() as u64;
                for o in pipeline.totals(&table, read_up_to) {
                    actions.extend(node.observe(o, &caches));
                }
            }
            // Pods past their record budget: their calls were recovered just above; say who.
            for (cgroup, count) in probes.throttled().unwrap_or_default() {
                if let Some(pod) = node.throttled(cgroup, count) {
                    warn!(
                        pod = %pod.name, namespace = %pod.namespace, records = count,
                        "a runner pod spent its kernel record budget (a flood of calls or DNS answers); \
                         its destinations are found from the kernel's dedupe table instead, later"
                    );
                }
            }
        }
        let mut actions = std::collections::VecDeque::from(actions);
        let mut rescan = false;
        loop {
            let Some(action) = actions.pop_front() else {
                // A scan attributes what waited for its cgroup: its actions come after.
                if !std::mem::take(&mut rescan) || last_scan.is_some_and(|t| t.elapsed() < MIN_SCAN_GAP) {
                    break;
                }
                last_scan = Some(Instant::now());
                let dirs = cgroups::pod_dirs(&mount, &parents);
                // A pod whose cgroup appeared unseen (the inotify queue overflowed) is armed
                // here; pods that are not runners are ignored (and disarmed) just below.
                for dir in &dirs {
                    if !probes.armed(dir.id) && !node.ignores(dir.id) {
                        arm_new(&mut probes, &dir.path, &metrics);
                    }
                }
                let found: HashMap<u64, String> = dirs.into_iter().map(|d| (d.id, d.pod_uid)).collect();
                let (gone, more) = node.cgroups(found, &caches);
                for id in gone {
                    let _ = probes.forget_pod(id);
                    pipeline.forget_pod(id);
                }
                actions.extend(more);
                continue;
            };
            match action {
                Action::Rescan => rescan = true,
                Action::Ignore(id) => {
                    if let Err(e) = probes.forget_pod(id) {
                        warn!(cgroup = id, error = %e, "could not detach the programs from a pod that is not a runner");
                    }
                    pipeline.forget_pod(id);
                }
                Action::Report { run, key, seen, repeat } => {
                    if !repeat && let Some(d) = run.destinations.get(&key) {
                        log_anomaly(&run, d, &metrics);
                    }
                    if report_tx.try_send(Report { run, key, seen, repeat }).is_err() {
                        metrics.events.get_or_create(&ResultLabel { result: "rate_limited" }).inc();
                    }
                }
                Action::Unidentified(pod) => {
                    let Role::Unidentified(why) = &pod.role else { continue };
                    metrics.unidentified_pods.inc();
                    warn!(namespace = %pod.pod.namespace, pod = %pod.pod.name, reason = %why, "a pod in a runner namespace is not identified as a runner's: monitored, attributed to no job");
                    let (client, node_name, pod) = (client.clone(), node_name.clone(), pod.clone());
                    tokio::spawn(async move {
                        crate::report::retrying(|| crate::report::unidentified(&client, &node_name, &pod)).await;
                    });
                }
                Action::Finished(run) => {
                    let mut run = *run;
                    let cgroup_ids = node.cgroups_of(&run.pod.uid);
                    run.total_calls = exact_calls(&pipeline, &cgroup_ids, &mut run);
                    run.finished_ms = unix_ms(SystemTime::now());
                    for id in cgroup_ids {
                        pipeline.forget_pod(id);
                    }
                    if let Err(e) = state.finish(&run) {
                        error!(error = %e, "could not keep a finished run in the state directory; merging from memory");
                    }
                    info!(pod = %run.pod.name, namespace = %run.pod.namespace, destinations = run.destinations.len(), "run ended");
                    let _ = merge_tx.send(run);
                }
            }
        }
        // Only once every pod, policy and baseline has been read: until then what an earlier
        // agent left in the kernel holds (a half-read cluster would let pods go).
        let synced = pods_synced && caches_ready.load(std::sync::atomic::Ordering::Relaxed);
        if synced && (tick || changed) {
            let (block, audit) = covered(&node, &caches.policies, &caches.baselines, &mut allowances, args.block_mode);
            audited = audit;
            if args.block_mode {
                for (cgroup, e) in enforcer.apply(&mut probes, block) {
                    let pod = node.run_of_cgroup(cgroup).map(|r| format!("{}/{}", r.0.namespace, r.0.name));
                    error!(pod, cgroup, error = %e, "could not put a pod in block mode");
                }
                probes.let_go_of_the_past();
                metrics.pods_blocking.set(enforcer.blocking() as i64);
            }
        }
        for (uid, run) in node.take_dirty() {
            if let Err(e) = state.save(&uid, run.as_ref()) {
                warn!(pod_uid = %uid, error = %e, "could not save a run in the state directory");
            }
        }
        if tick
            && let Some(uplinks) = pipeline.take_changed_uplinks()
            && let Err(e) = state.save_uplinks(&uplinks)
        {
            warn!(error = %e, "could not keep the pods' DNS uplinks in the state directory");
        }
        if tick {
            if let Err(e) = probes.heartbeat() {
                warn!(error = %e, "could not tell the kernel programs the agent is there");
            }
            record_gauges(&metrics, &node, &pipeline, &probes);
            metrics.set_ready(pods_synced && caches_ready.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    info!("stopping: saving runs in progress");
    for run in node.runs() {
        let _ = state.save(&run.pod.uid, Some(run));
    }
    Ok(())
}

/// Starts the resolver of block-mode pods and points the kernel at it.
async fn start_resolver(
    args: &AgentArgs,
    probes: &mut Probes,
    enforcer: &Enforcer,
    answers: mpsc::Sender<(u64, Vec<u8>)>,
) -> Result<(), AgentError> {
    let address = ResolverAddress {
        ipv4: args.pod_ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }),
        ipv6: args.pod_ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }),
        port: args.resolver_port,
    };
    if address.ipv4.is_none() && address.ipv6.is_none() {
        return Err(AgentError::BlockMode(
            "the agent's pod addresses are not known (POD_IPS from status.podIPs, or --pod-ips)".into(),
        ));
    }
    let upstream = match args.dns_upstream {
        Some(u) => u,
        None => nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
            .first()
            .map(|ip| std::net::SocketAddr::new(*ip, 53))
            .ok_or_else(|| AgentError::BlockMode("no nameserver in /etc/resolv.conf; set --dns-upstream".into()))?,
    };
    let resolver = Arc::new(Resolver {
        gate: Arc::new(enforcer.gate.clone()),
        upstream,
        allow: probes.allow_list(),
        ttl_floor: Duration::from_secs(30),
        refuse_rcode: if args.refuse_dns_with == Refusal::Nxdomain { 3 } else { 5 },
        timeout: Duration::from_secs(2),
        answers: Some(answers),
    });
    // IPv4 on every address (pods reach the node's by the address in POD_IPS, which may be
    // another interface's than the one they come in on); IPv6 on the one address, so the two
    // sockets of a port do not clash (a wildcard IPv6 socket takes IPv4 too).
    let port = args.resolver_port;
    let mut local: Vec<std::net::SocketAddr> = Vec::new();
    if address.ipv4.is_some() {
        local.push((std::net::Ipv4Addr::UNSPECIFIED, port).into());
    }
    if let Some(ip6) = address.ipv6 {
        local.push((ip6, port).into());
    }
    for at in local {
        let udp = tokio::net::UdpSocket::bind(at)
            .await
            .map_err(|e| AgentError::BlockMode(format!("the resolver's UDP port {at}: {e}")))?;
        let tcp = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| AgentError::BlockMode(format!("the resolver's TCP port {at}: {e}")))?;
        tokio::spawn(resolver.clone().serve_udp(udp));
        tokio::spawn(resolver.clone().serve_tcp(tcp));
    }
    probes.set_resolver(Some(&address))?;
    info!(ipv4 = ?address.ipv4, ipv6 = ?address.ipv6, port, %upstream, "block mode: pods' DNS goes through this agent's resolver");
    Ok(())
}

/// Counts and logs a call block mode refused (or, `would`, that it would refuse: the policy
/// lists what its pods may call but does not refuse), and says it in an Event on the runner pod
/// and its `EphemeralRunner` (linking to the run's page under `pages`): once per pod and
/// destination every ten minutes (the metric counts every record).
#[allow(clippy::too_many_arguments, reason = "one call site per kind; the arguments are the Event")]
fn say_blocked(
    o: &crate::pipeline::Observation,
    node: &Node,
    policy: &str,
    would: bool,
    said: &mut HashMap<(u64, String), Instant>,
    metrics: &Metrics,
    client: &Client,
    node_name: &str,
    pages: Option<&str>,
) {
    if would {
        metrics.would_block_calls.inc();
    } else {
        metrics.blocked_calls.inc();
    }
    let runner = node.run_of_cgroup(o.pod_cgroup_id);
    let proto = if o.proto == crate::events::Proto::Tcp { "TCP" } else { "UDP" };
    let destination = std::net::SocketAddr::new(o.ip, o.port).to_string() + "/" + proto;
    let policy = policy.to_string();
    let what = if would { "call its policy does not allow (not refused: Audit)" } else { "call refused in block mode" };
    warn!(
        pod = runner.as_ref().map(|r| format!("{}/{}", r.0.namespace, r.0.name)), %destination, hosts = ?o.hosts,
        process = %o.process, %policy, "{what}"
    );
    let now = Instant::now();
    // Refused and let through are said apart (a policy switched to Audit says its first).
    let key = (o.pod_cgroup_id, format!("{}{destination}", if would { "~" } else { "" }));
    let due = said.get(&key).is_none_or(|last| now.duration_since(*last) >= Duration::from_secs(600));
    let Some(runner) = runner.filter(|_| due) else { return };
    if said.len() >= 4096 {
        said.retain(|_, last| now.duration_since(*last) < Duration::from_secs(600));
        if said.len() >= 4096 {
            // A flood of destinations (a job trying address after address): each is counted and
            // logged, at most 4,096 Events in ten minutes, and the table stays bounded.
            return;
        }
    }
    said.insert(key, now);
    let blocked = crate::report::Blocked {
        destination,
        host: o.hosts.first().cloned(),
        port: o.port,
        protocol: proto,
        process: o.process.clone(),
        policy,
        would,
        unidentified: node.unidentified(o.pod_cgroup_id),
    };
    let (client, node_name, pages) = (client.clone(), node_name.to_string(), pages.map(str::to_string));
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 600;
    tokio::spawn(async move {
        let runner = (&runner.0, runner.1.as_ref(), runner.2.as_ref());
        let pages = pages.as_deref();
        crate::report::retrying(|| crate::report::blocked(&client, &node_name, runner, &blocked, at, pages)).await;
    });
}

/// What an allowance is built from: the policy and the baseline, at their versions.
type AllowanceKey = (String, Option<String>, Option<String>);

/// The pods block mode covers now, with what each may call (`block_mode`: the agent enforces
/// it), and the pods whose policy lists what they may call without refusing anything (`Audit`,
/// or `Block` where block mode is off): for those, what it would refuse is reported.
fn covered(
    node: &Node,
    policies: &Store<EgressPolicy>,
    baselines: &Store<WorkflowBaseline>,
    cache: &mut HashMap<AllowanceKey, Arc<Allowance>>,
    block_mode: bool,
) -> (Vec<Covered>, HashMap<u64, Arc<Allowance>>) {
    let all = policies.state();
    let mut out = Vec::new();
    let mut audited = HashMap::new();
    for s in node.subjects() {
        if s.unidentified {
            // Held to nothing where a policy of its namespace blocks: no way out for a job.
            let blocking = all
                .iter()
                .find(|p| p.metadata.namespace.as_deref() == Some(s.namespace.as_str()) && enforce::blocks(p));
            if block_mode && let Some(p) = blocking {
                let name = format!("{}/{}", s.namespace, p.name_any());
                out.push(Covered { cgroup: s.cgroup, allowance: Arc::new(Allowance::nothing(name)) });
            }
            continue;
        }
        let policy = match &s.job {
            Some(job) => runwarden_crds::policy::applicable_to_job(
                all.iter().map(|p| p.as_ref()),
                &s.namespace,
                s.scale_set.as_deref(),
                &job.repository,
                &job.workflow,
            ),
            None => runwarden_crds::policy::applicable_to_runner(
                all.iter().map(|p| p.as_ref()),
                &s.namespace,
                s.scale_set.as_deref(),
            ),
        };
        let Some(policy) = policy else { continue };
        let enforced = block_mode && enforce::blocks(policy);
        if !enforced && !enforce::lists_endpoints(policy) {
            continue;
        }
        let baseline = s
            .job
            .as_ref()
            .filter(|_| policy.spec.include_baseline)
            .and_then(|j| baselines.get(&StoreRef::new(&j.baseline).within(&s.namespace)));
        let key = (
            policy.metadata.uid.clone().unwrap_or_default(),
            policy.metadata.resource_version.clone(),
            baseline.as_ref().and_then(|b| b.metadata.resource_version.clone()),
        );
        if cache.len() > 1024 {
            cache.clear();
        }
        let allowance =
            cache.entry(key).or_insert_with(|| Arc::new(Allowance::build(policy, baseline.as_deref()))).clone();
        if enforced {
            out.push(Covered { cgroup: s.cgroup, allowance });
        } else {
            audited.insert(s.cgroup, allowance);
        }
    }
    (out, audited)
}

/// Attaches the programs to a pod cgroup; a pod that is gone already needs none.
fn arm(probes: &mut Probes, dir: &Path) -> bool {
    match probes.arm_pod(dir) {
        Ok(_) => true,
        Err(e) => {
            if dir.exists() {
                error!(cgroup = %dir.display(), error = %e, "could not attach the programs to a pod's cgroup: its calls go unseen");
            }
            false
        }
    }
}

/// Arms a pod cgroup made while the agent runs, and says so when a process ran in it first.
fn arm_new(probes: &mut Probes, dir: &Path, metrics: &Metrics) {
    // Read after attaching: a process that started in between is counted too (never one
    // missed, at worst one counted that was seen).
    if arm(probes, dir) && cgroups::populated(dir) {
        metrics.pods_armed_late.inc();
        warn!(cgroup = %dir.display(), "a pod's cgroup held a process before the programs were attached: its first calls may have gone unseen");
    }
}

/// The run's calls in all, repeats included: the pipeline's exact counts of its pods' cgroups,
/// or the calls the run itself counted when the pipeline no longer has them (a restart).
fn exact_calls(pipeline: &Pipeline, cgroups: &[u64], run: &mut Run) -> u64 {
    // Each destination's count too: the kernel's totals include the repeats it folded.
    // Refused calls are counted apart (the kernel keys them by verdict): they are the refused
    // destinations' attempts, not the run's calls.
    let mut counted = 0;
    let mut by_destination: HashMap<(IpAddr, u16, bool, bool), u64> = HashMap::new();
    for c in pipeline.calls().iter().filter(|c| cgroups.contains(&c.last.pod_cgroup_id)) {
        let refused = c.last.verdict == crate::events::Verdict::Denied;
        if !refused {
            counted += c.calls;
        }
        let udp = c.last.proto == crate::events::Proto::Udp;
        *by_destination.entry((c.last.ip, c.last.port, udp, refused)).or_default() += c.calls;
    }
    let destinations = run.destinations.values_mut().map(|d| (d, false));
    for (d, refused) in destinations.chain(run.blocked.values_mut().map(|r| (&mut r.destination, true))) {
        let udp = d.proto == runwarden_detector::Proto::Udp;
        if let Some(calls) = by_destination.get(&(d.ip, d.port, udp, refused)) {
            d.calls = d.calls.max(*calls);
        }
    }
    counted.max(run.destinations.values().map(|d| d.calls).sum())
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn log_anomaly(run: &Run, d: &Destination, metrics: &Metrics) {
    let severity = d.verdict.as_ref().map_or(Severity::Info, |v| v.severity);
    metrics.anomalies.get_or_create(&crate::metrics::SeverityLabel { severity: severity_name(severity) }).inc();
    let job = run.job.as_ref();
    warn!(
        reason = crate::report::REASON,
        namespace = %run.pod.namespace,
        pod = %run.pod.name,
        runner = run.runner.as_ref().map(|r| r.name.as_str()),
        repository = job.map(|j| j.repository.as_str()),
        workflow = job.map(|j| j.workflow.as_str()),
        job = job.map(|j| j.job.as_str()),
        run_id = job.map(|j| j.run_id.as_str()),
        dest = %d.text(),
        process = d.processes.first().map(String::as_str),
        executable = d.executables.first().map(String::as_str),
        severity = severity_name(severity),
        reasons = ?d.verdict.as_ref().map(|v| &v.reasons),
        "anomalous egress"
    );
}

/// `info` ... `critical`.
pub fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
    }
}

/// The `nameserver` addresses of a resolv.conf.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next()?.split('%').next()?.parse().ok())
        .collect()
}

fn record_gauges(metrics: &Metrics, node: &Node, pipeline: &Pipeline, probes: &Probes) {
    metrics.pods_monitored.set(node.monitored_pods() as i64);
    metrics.runs_in_progress.set(node.runs().count() as i64);
    metrics.held.set(node.held() as i64);
    let stats = pipeline.stats();
    for (result, n) in [
        ("parsed", stats.dns_answers - stats.malformed_dns - stats.unsolicited_dns - stats.uncorroborated_dns),
        ("malformed", stats.malformed_dns),
        ("unsolicited", stats.unsolicited_dns),
        ("uncorroborated", stats.uncorroborated_dns - stats.contradicting_dns),
        ("contradicting", stats.contradicting_dns),
    ] {
        metrics.dns_answers.get_or_create(&ResultLabel { result }).set(n as i64);
    }
    if let Ok(k) = probes.stats() {
        for (kind, n) in
            [("call", k.lost_calls), ("dns", k.lost_dns), ("exec", k.lost_exec), ("throttled", k.throttled)]
        {
            metrics.kernel_lost.get_or_create(&Kind { kind }).set(n as i64);
        }
    }
    for (verdict, n) in crate::node::VERDICTS.into_iter().zip(node.verdicts) {
        let counter = metrics.calls.get_or_create(&VerdictLabel { verdict });
        counter.inc_by(n.saturating_sub(counter.get()));
    }
    let unattributed = metrics.unattributed.get();
    if node.unattributed > unattributed {
        metrics.unattributed.inc_by(node.unattributed - unattributed);
    }
}

/// Creates the `WorkflowRun` record of a merged run (naming the policy that applies to its job),
/// owned by its baseline: `true` if created, `false` if it was already there.
async fn write_record(
    client: &Client,
    node_name: &str,
    run: &Run,
    job: &Job,
    policies: &Store<EgressPolicy>,
) -> Result<bool, kube::Error> {
    let baselines: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &run.pod.namespace);
    let uid = baselines.get_status(&job.baseline).await?.metadata.uid;
    let policy = applicable_policy(policies, &run.pod, run.scale_set.as_deref(), job).map(|p| p.name_any());
    let record = crate::record::record(run, job, node_name, policy.as_deref(), uid.as_deref());
    let api: Api<runwarden_crds::WorkflowRun> = Api::namespaced(client.clone(), &run.pod.namespace);
    match api.create(&kube::api::PostParams::default(), &record).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Merges finished runs into their baselines, retrying (every ten seconds) what the API server
/// did not take: it is unreachable, the baseline does not exist yet, or writers kept conflicting.
async fn merger(
    client: Client,
    node_name: String,
    mut rx: mpsc::UnboundedReceiver<Run>,
    state: StateDir,
    policies: Store<EgressPolicy>,
    metrics: Arc<Metrics>,
) {
    let mut waiting: Vec<Run> = Vec::new();
    let mut retry = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(mut run) => {
                    // Kept before runs said when they ended: now is the closest.
                    if run.finished_ms == 0 {
                        run.finished_ms = unix_ms(SystemTime::now());
                    }
                    waiting.push(run)
                }
                None => return,
            },
            _ = retry.tick() => {}
        }
        let mut still = Vec::new();
        for run in waiting.drain(..) {
            let count = |result| metrics.merges.get_or_create(&ResultLabel { result }).inc();
            let Some(job) = run.job.clone() else {
                // Ended before its job was known: reported under the scale set, not merged.
                if crate::report::unattributed(&client, &node_name, &run).await == crate::report::Delivery::Retry {
                    still.push(run);
                    continue;
                }
                metrics.unattributed_runs.inc();
                warn!(
                    namespace = %run.pod.namespace, pod = %run.pod.name, scale_set = run.scale_set.as_deref(),
                    destinations = ?run.destinations.values().map(Destination::text).collect::<Vec<_>>(),
                    "a runner ended before its job was known: its calls are reported under its scale set and not learned"
                );
                state.merged(&run.pod.uid);
                continue;
            };
            // Reporting off: nothing the run saw counts as reported.
            let min = min_severity(&policies, &run.pod, run.scale_set.as_deref(), &job).unwrap_or(Severity::Critical);
            let calls: Vec<(runwarden_detector::Call<'_>, Option<Verdict>)> =
                run.destinations.values().map(|d| (d.call(), d.verdict.clone())).collect();
            let finished = FinishedRun {
                run: runwarden_detector::Run {
                    id: &job.run_id,
                    time: run.started,
                    trigger: TRIGGER,
                    git_ref: job.git_ref.as_deref(),
                },
                runner: &run.pod.name,
                calls: &calls,
                total_calls: run.total_calls.min(u64::from(u32::MAX)) as u32,
                finished: run.finished_ms / 1000,
                blocked: run.blocked.len() as u32,
            };
            let api: Api<WorkflowBaseline> = Api::namespaced(client.clone(), &run.pod.namespace);
            match merge_run(&api, &job.baseline, min, &finished).await {
                Ok(Some(_)) => {
                    count("merged");
                    info!(baseline = %job.baseline, run_id = %job.run_id, "run merged into its baseline");
                }
                Ok(None) => {
                    count("duplicate");
                }
                Err(MergeError::Kube(kube::Error::Api(s))) if s.code == 404 => {
                    count("no_baseline");
                    still.push(run);
                    continue;
                }
                Err(MergeError::TooManyConflicts(_)) => {
                    count("conflicts_exhausted");
                    still.push(run);
                    continue;
                }
                Err(e) => {
                    count("failed");
                    warn!(baseline = %job.baseline, error = %e, "could not merge a run; retrying");
                    still.push(run);
                    continue;
                }
            }
            // Its record, once merged (a retry merges nothing twice: the baseline knows the run).
            let recorded = |result| {
                metrics.run_records.get_or_create(&ResultLabel { result }).inc();
            };
            match write_record(&client, &node_name, &run, &job, &policies).await {
                Ok(true) => recorded("created"),
                Ok(false) => recorded("exists"),
                Err(e) if crate::report::retryable(&e) => {
                    recorded("retried");
                    still.push(run);
                    continue;
                }
                Err(e) => {
                    recorded("failed");
                    warn!(baseline = %job.baseline, run_id = %job.run_id, error = %e, "the API server refused the run's WorkflowRun record; not retried");
                }
            }
            state.merged(&run.pod.uid);
        }
        waiting = still;
        metrics.runs_unmerged.set(waiting.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_dns_uplinks_survive_a_restart_in_the_state_directory() {
        let dir = std::env::temp_dir().join(format!("runwarden-uplinks-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        assert!(state.uplinks().is_empty(), "none kept yet");
        let kept = HashMap::from([(4242_u64, 2_u32), (u64::MAX, 7)]);
        state.save_uplinks(&kept).unwrap();
        assert_eq!(StateDir::open(&dir).unwrap().uplinks(), kept);
        std::fs::write(dir.join("dns-uplinks.json"), b"{not json").unwrap();
        assert!(state.uplinks().is_empty(), "an unreadable file is learned again, not fatal");
        let _ = std::fs::remove_dir_all(dir);
    }
}
