//! The learned model of one workflow job: its endpoints, the rotating-name patterns it uses, how
//! settled it is, and how it learns from a finished run.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::host;
use crate::index::{BaselineIndex, IndexCell};
use crate::score::{Severity, Verdict};

/// Transport protocol of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One outbound call as the node agent saw it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The DNS name the pod looked up for this address, if it did.
    pub host: Option<&'a str>,
    /// Destination address.
    pub ip: Option<IpAddr>,
    /// Destination port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// Executable that made the call.
    pub process: Option<&'a str>,
}

impl Call<'_> {
    /// The name the endpoint is keyed by: the host, or the address when there is no name.
    pub fn target(&self) -> Option<std::borrow::Cow<'_, str>> {
        match (self.host, self.ip) {
            (Some(h), _) => Some(std::borrow::Cow::Borrowed(h)),
            (None, Some(ip)) => Some(std::borrow::Cow::Owned(ip.to_string())),
            (None, None) => None,
        }
    }
}

/// The run the calls belong to.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a> {
    /// GitHub workflow run id.
    pub id: &'a str,
    /// When the run happened, in seconds since the Unix epoch (the caller's clock).
    pub time: i64,
    /// The event that triggered it: `push`, `pull_request`, `release`, `schedule`, ...
    /// (`unknown` when the runner does not say).
    pub trigger: &'a str,
    /// The git ref its workflow ran from (`refs/heads/main`, `refs/pull/42/merge`), if known.
    pub git_ref: Option<&'a str>,
}

impl Run<'_> {
    /// Whether what this run calls may become normal for every run of the job: not a pull
    /// request, and from a ref `config.trusted_refs` names (a run whose ref is unknown is
    /// judged by its trigger alone).
    pub fn is_trusted(&self, config: &Config) -> bool {
        if self.trigger.starts_with("pull_request") {
            return false;
        }
        self.git_ref.is_none_or(|r| config.trusted_refs.iter().any(|p| ref_matches(p, r)))
    }
}

/// Whether `git_ref` matches `pattern`: exactly, or any ref below `prefix/` for `prefix/*`.
pub fn ref_matches(pattern: &str, git_ref: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => {
            git_ref.len() > prefix.len() + 1 && git_ref.starts_with(prefix) && git_ref[prefix.len()..].starts_with('/')
        }
        None => pattern == git_ref,
    }
}

/// What the user wants done with this job (the `WorkflowBaseline` `spec.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Learn; report once there are enough runs, with less confidence while the baseline churns.
    #[default]
    Auto,
    /// Learn only; never report.
    Learning,
    /// Report from the first run, and keep learning.
    Monitoring,
    /// Do not learn; report everything that is neither learned nor approved.
    Frozen,
}

/// Where the baseline is in its life (the `WorkflowBaseline` `status.phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Too young or still changing.
    Learning,
    /// Settled (or forced to monitor): new calls are reported with full confidence.
    Monitoring,
    /// Learning stopped.
    Frozen,
}

/// How an endpoint came to be in the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Seen in normal runs.
    Learned,
    /// Matches a rule a person approved.
    Approved,
    /// Reported, not approved: reported again every time it is called.
    Anomalous,
    /// New to this job and to every job of the cluster, below the anomaly threshold (typically
    /// first seen while the baseline was young): recorded, not normal, until it recurs in
    /// [`Config::confirm_runs`] runs. Learning never absorbs what it never confirmed.
    Unconfirmed,
    /// Called only by runs of untrusted refs (pull requests, unprotected branches). Runs of
    /// trusted refs judge it as new; runs of untrusted refs find it normal, unless it was
    /// reported (it has a severity), and then it is reported again like an anomaly. It vouches
    /// for nothing (not for its domain, family or lookalikes; other jobs do not count it): a
    /// pull request cannot make a destination normal for the release job.
    Untrusted,
}

impl State {
    /// Whether calls to an endpoint in this state are normal for every run of the job (and
    /// count as known to the cluster).
    pub fn is_normal(self) -> bool {
        matches!(self, State::Learned | State::Approved)
    }
}

/// The severity from which a new call is recorded as anomalous (reported again until approved)
/// rather than learned. Fixed, so that the model does not depend on the reporting threshold.
pub const ANOMALY: Severity = Severity::Medium;

/// A destination a person approved (`spec.approved`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Approved {
    /// A host, or `*.suffix` for every name below `suffix`.
    Host(String),
    /// An address range: network address and prefix length.
    Cidr(IpAddr, u8),
}

/// An approval with its port and protocol limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedRule {
    /// What is approved.
    pub target: Approved,
    /// Ports it covers; empty means every port.
    pub ports: Vec<u16>,
    /// Protocol it covers; `None` means both.
    pub proto: Option<Proto>,
}

impl ApprovedRule {
    /// Whether the rule covers `call`.
    pub fn matches(&self, call: &Call<'_>) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&call.port) {
            return false;
        }
        if self.proto.is_some_and(|p| p != call.proto) {
            return false;
        }
        match &self.target {
            Approved::Host(pattern) => call.host.is_some_and(|h| match pattern.strip_prefix("*.") {
                Some(suffix) => {
                    h.len() > suffix.len() + 1 && h.ends_with(suffix) && h[..h.len() - suffix.len()].ends_with('.')
                }
                None => h == pattern,
            }),
            Approved::Cidr(net, len) => call.ip.is_some_and(|ip| in_cidr(ip, *net, *len)),
        }
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Learning and reporting parameters (the `WorkflowBaseline` spec, and the policy's minimum
/// severity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// See [`Mode`].
    pub mode: Mode,
    /// Runs to learn from before reporting with full confidence.
    pub min_runs: u32,
    /// Consecutive runs without anything new for the baseline to count as settled.
    pub settle_after_quiet_runs: u32,
    /// An endpoint expires when unseen for this many runs ...
    pub expire_after_runs: u32,
    /// ... and for this many days.
    pub expire_after_days: u32,
    /// Least severity that is reported (output only: what is learned does not depend on it).
    pub min_severity: Severity,
    /// Runs an [`State::Unconfirmed`] endpoint must be called in before it is learned.
    pub confirm_runs: u32,
    /// Most endpoints kept; past it the least useful learned ones are evicted.
    pub max_endpoints: usize,
    /// Endpoints a person approved.
    pub approved: Vec<ApprovedRule>,
    /// Git refs whose runs are trusted to teach the baseline (see [`Run::is_trusted`]):
    /// exact refs, or `prefix/*`.
    pub trusted_refs: Vec<String>,
}

/// Default of [`Config::trusted_refs`]: the usual default branches and tags. The runner does
/// not say which branch is a repository's default; another one is named in the baseline's spec.
pub const DEFAULT_TRUSTED_REFS: [&str; 3] = ["refs/heads/main", "refs/heads/master", "refs/tags/*"];

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            min_runs: 10,
            settle_after_quiet_runs: 5,
            expire_after_runs: 200,
            expire_after_days: 90,
            min_severity: Severity::Medium,
            confirm_runs: DEFAULT_CONFIRM_RUNS,
            max_endpoints: 500,
            approved: Vec::new(),
            trusted_refs: DEFAULT_TRUSTED_REFS.map(String::from).to_vec(),
        }
    }
}

/// Default of [`Config::confirm_runs`]. On the public replay corpus a benign endpoint that no
/// other job calls recurs in most of its job's runs, while an attack episode lasts one to three
/// consecutive runs: three runs confirm the first and not (the typical) second.
pub const DEFAULT_CONFIRM_RUNS: u32 = 3;

/// An endpoint's host (or address text), port and protocol; for a family, its shape.
type EndpointKey = (String, u16, Proto);

/// Most processes and triggers remembered per endpoint.
pub const MAX_PROCESSES: usize = 4;
/// See [`MAX_PROCESSES`].
pub const MAX_TRIGGERS: usize = 6;
/// Most triggers whose run counts a baseline keeps.
pub const MAX_TRIGGER_KINDS: usize = 16;
/// Runs over which churn (how often a run brought something new) is judged.
pub const CHURN_WINDOW: usize = 10;

/// What the job knows about one port and protocol of a host (or address).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Destination port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// Learned or anomalous.
    pub state: State,
    /// Runs that called it.
    pub runs_seen: u32,
    /// Run id of the first run that called it.
    pub first_run: String,
    /// When it was first called (Unix seconds).
    pub first_time: i64,
    /// Run id of the last run that called it.
    pub last_run: String,
    /// When it was last called (Unix seconds).
    pub last_time: i64,
    /// The baseline's run count when it was last called (for expiry by runs).
    pub last_run_index: u32,
    /// Executables that called it (at most [`MAX_PROCESSES`]).
    pub processes: Vec<String>,
    /// Triggers of the runs that called it (at most [`MAX_TRIGGERS`]).
    pub triggers: Vec<String>,
    /// For anomalous endpoints: the severity they were last reported with.
    pub severity: Option<Severity>,
}

impl Endpoint {
    /// Whether calls to it are normal for a run of a trusted ref or not (see [`State`]).
    pub fn is_normal_for(&self, trusted: bool) -> bool {
        self.state.is_normal()
            || (self.state == State::Untrusted && !trusted && self.severity.is_none_or(|s| s < ANOMALY))
    }
}

/// A family learned from several members of the same shape: rotating hosts
/// (`productionresultssa#.blob.core.windows.net`) or addresses of one block (`203.0.113.0/24`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pattern {
    /// The shape: first label with `#` for digit runs and `%` for hex ids, then the parent; or
    /// an address block in CIDR notation.
    pub shape: String,
    /// Destination port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// Distinct hosts seen with this shape.
    pub siblings: u32,
    /// Runs that called a host of this shape.
    pub runs_seen: u32,
    /// The baseline's run count when a host of this shape was last called.
    pub last_run_index: u32,
    /// When a host of this shape was last called (Unix seconds).
    pub last_time: i64,
}

/// The model of one workflow job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Finished runs learned from.
    pub runs: u32,
    /// Endpoints by host (or address text), then port and protocol.
    pub hosts: BTreeMap<String, Vec<Endpoint>>,
    /// Rotating-host families.
    pub patterns: Vec<Pattern>,
    /// New endpoints learned in each of the last [`CHURN_WINDOW`] runs, oldest first.
    pub recent_new: VecDeque<u32>,
    /// Runs per trigger.
    pub triggers: BTreeMap<String, u32>,
    /// Learned (or unconfirmed) endpoints evicted by the size cap.
    pub evicted: u32,
    /// Anomalous endpoints evicted by the size cap when it was full of them (oldest reported
    /// first). Each was reported when it was called; called again, it is new again.
    #[serde(default)]
    pub evicted_anomalous: u32,
    /// What scoring derives from the fields above, built on first use (not part of the value).
    #[serde(skip)]
    pub index: IndexCell,
}

/// What a run changed in the baseline, for the cluster-wide index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// Hosts (or addresses) this job learned for the first time.
    pub new_hosts: Vec<String>,
    /// Hosts (or addresses) this job no longer has (expired, evicted or folded into a pattern).
    pub removed_hosts: Vec<String>,
    /// Shapes of patterns created by this run.
    pub new_patterns: Vec<String>,
    /// New endpoints learned (the run's contribution to churn).
    pub new_endpoints: u32,
}

impl Baseline {
    /// Its index for scoring (built now if it is not yet).
    pub fn index(&self) -> &BaselineIndex {
        self.index.get(self)
    }

    /// The endpoint of `call`, if this job has one for it.
    pub fn endpoint(&self, target: &str, port: u16, proto: Proto) -> Option<&Endpoint> {
        self.hosts.get(target)?.iter().find(|e| e.port == port && e.proto == proto)
    }

    /// The pattern (rotating-host family or address block) `target` belongs to, if any.
    pub fn pattern(&self, target: &str, port: u16, proto: Proto) -> Option<&Pattern> {
        if self.patterns.is_empty() {
            return None;
        }
        let (shape, _) = host::family(target)?;
        self.patterns.iter().find(|p| p.shape == shape && p.port == port && p.proto == proto)
    }

    /// Number of endpoints (patterns count as one each).
    pub fn endpoint_count(&self) -> usize {
        self.hosts.values().map(Vec::len).sum::<usize>() + self.patterns.len()
    }

    /// Share of the last [`CHURN_WINDOW`] runs that brought a new endpoint.
    pub fn churn(&self) -> f64 {
        if self.recent_new.is_empty() {
            return 1.0;
        }
        self.recent_new.iter().filter(|&&n| n > 0).count() as f64 / self.recent_new.len() as f64
    }

    /// Whether the baseline has stopped changing: enough runs, and the last
    /// `settle_after_quiet_runs` brought nothing new.
    pub fn is_settled(&self, config: &Config) -> bool {
        let quiet = config.settle_after_quiet_runs as usize;
        self.runs >= config.min_runs
            && self.recent_new.len() >= quiet.min(CHURN_WINDOW)
            && self.recent_new.iter().rev().take(quiet).all(|&n| n == 0)
    }

    /// The phase to show for this baseline.
    pub fn phase(&self, config: &Config) -> Phase {
        match config.mode {
            Mode::Frozen => Phase::Frozen,
            Mode::Monitoring => Phase::Monitoring,
            Mode::Learning => Phase::Learning,
            Mode::Auto if self.is_settled(config) => Phase::Monitoring,
            Mode::Auto => Phase::Learning,
        }
    }

    /// Learns from a finished run: `calls` with the verdicts they got while it ran (`None` for
    /// calls that were normal). A new call scored at or above [`ANOMALY`] is recorded as
    /// anomalous; one that no job of the cluster knew is recorded as unconfirmed until it recurs
    /// in `config.confirm_runs` runs; everything else new is learned (nothing in `Frozen` mode).
    /// The reporting threshold (`config.min_severity`) plays no part.
    pub fn learn(&mut self, config: &Config, run: &Run<'_>, calls: &[(Call<'_>, Option<Verdict>)]) -> Learned {
        self.index.clear();
        let mut out = Learned::default();
        self.runs = self.runs.saturating_add(1);
        *self.triggers.entry(run.trigger.to_string()).or_default() += 1;
        if self.triggers.len() > MAX_TRIGGER_KINDS {
            // Keep the triggers with the most runs; a dropped one reads as rare, which it is.
            let rarest = self
                .triggers
                .iter()
                .filter(|(t, _)| t.as_str() != run.trigger)
                .min_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(t, _)| t.clone());
            if let Some(t) = rarest {
                self.triggers.remove(&t);
            }
        }
        let index = self.runs;
        let trusted = run.is_trusted(config);
        let mut touched_patterns: Vec<usize> = Vec::new();
        let mut confirmed: Vec<EndpointKey> = Vec::new();

        for (call, verdict) in calls {
            let Some(target) = call.target() else { continue };
            if let Some(list) = self.hosts.get_mut(target.as_ref())
                && let Some(e) = list.iter_mut().find(|e| e.port == call.port && e.proto == call.proto)
            {
                let anomaly = verdict.as_ref().is_some_and(|v| v.severity >= ANOMALY);
                if !trusted && e.state == State::Unconfirmed {
                    // Runs of untrusted refs do not count towards confirming (a pull request
                    // repeated three times must not make a destination normal); an anomaly
                    // verdict still marks it.
                    if anomaly {
                        e.state = State::Anomalous;
                        e.severity = verdict.as_ref().map(|v| v.severity);
                    }
                    continue;
                }
                if e.last_run_index != index {
                    e.runs_seen = e.runs_seen.saturating_add(1);
                }
                e.last_run_index = index;
                e.last_run = run.id.to_string();
                e.last_time = run.time;
                remember(&mut e.processes, call.process, MAX_PROCESSES);
                remember(&mut e.triggers, Some(run.trigger), MAX_TRIGGERS);
                if let Some(v) = verdict
                    && (e.state != State::Untrusted || v.severity >= ANOMALY)
                {
                    e.severity = Some(v.severity);
                }
                let approved = config.approved.iter().any(|r| r.matches(call));
                if approved {
                    e.state = State::Approved;
                    e.severity = None;
                } else if e.state == State::Approved {
                    // The approval was withdrawn; the endpoint was in use and accepted meanwhile.
                    e.state = State::Learned;
                } else if e.state == State::Unconfirmed {
                    if anomaly || config.mode == Mode::Frozen {
                        e.state = State::Anomalous;
                    } else if e.runs_seen >= config.confirm_runs {
                        e.state = State::Learned;
                        e.severity = None;
                        confirmed.push((target.to_string(), call.port, call.proto));
                    }
                } else if e.state == State::Untrusted && trusted {
                    // First called by a trusted run: judged as new for it (what untrusted runs
                    // were reported for does not carry over).
                    e.severity = verdict.as_ref().map(|v| v.severity);
                    if anomaly || config.mode == Mode::Frozen {
                        e.state = State::Anomalous;
                    } else if verdict.as_ref().is_some_and(|v| v.unfamiliar) && config.confirm_runs > 1 {
                        e.state = State::Unconfirmed;
                        e.runs_seen = 1;
                    } else {
                        e.state = State::Learned;
                        e.severity = None;
                        confirmed.push((target.to_string(), call.port, call.proto));
                    }
                }
                continue;
            }
            if let Some((shape, _)) = host::family(&target)
                && let Some(i) =
                    self.patterns.iter().position(|p| p.shape == shape && p.port == call.port && p.proto == call.proto)
            {
                if !touched_patterns.contains(&i) {
                    touched_patterns.push(i);
                    let p = &mut self.patterns[i];
                    p.runs_seen = p.runs_seen.saturating_add(1);
                    p.last_run_index = index;
                    p.last_time = run.time;
                }
                continue;
            }
            let state = if config.approved.iter().any(|r| r.matches(call)) {
                State::Approved
            } else if config.mode == Mode::Frozen {
                State::Anomalous
            } else if !trusted {
                State::Untrusted
            } else if verdict.as_ref().is_some_and(|v| v.severity >= ANOMALY) {
                State::Anomalous
            } else if verdict.as_ref().is_some_and(|v| v.unfamiliar) && config.confirm_runs > 1 {
                State::Unconfirmed
            } else {
                State::Learned
            };
            let key = target.into_owned();
            let is_new_host = !self.hosts.contains_key(&key);
            let e = Endpoint {
                port: call.port,
                proto: call.proto,
                state,
                runs_seen: 1,
                first_run: run.id.to_string(),
                first_time: run.time,
                last_run: run.id.to_string(),
                last_time: run.time,
                last_run_index: index,
                processes: call.process.map(|p| vec![p.to_string()]).unwrap_or_default(),
                triggers: vec![run.trigger.to_string()],
                severity: verdict
                    .as_ref()
                    .filter(|v| !state.is_normal() && (state != State::Untrusted || v.severity >= ANOMALY))
                    .map(|v| v.severity),
            };
            self.hosts.entry(key.clone()).or_default().push(e);
            if state == State::Unconfirmed {
                out.new_endpoints += 1;
            } else if state.is_normal() {
                out.new_endpoints += 1;
                if is_new_host || self.hosts[&key].iter().filter(|e| e.state.is_normal()).count() == 1 {
                    out.new_hosts.push(key.clone());
                }
                self.fold_family(&key, call.port, call.proto, &mut out);
            }
        }
        confirmed.extend(self.confirm_families(config));
        // Endpoints confirmed by this run are learned now: known to the cluster, and members of
        // their rotating family.
        for (key, port, proto) in confirmed {
            if self.hosts.get(&key).is_some_and(|l| l.iter().filter(|e| e.state.is_normal()).count() == 1) {
                out.new_hosts.push(key.clone());
            }
            self.fold_family(&key, port, proto, &mut out);
        }

        self.recent_new.push_back(out.new_endpoints);
        while self.recent_new.len() > CHURN_WINDOW {
            self.recent_new.pop_front();
        }
        self.expire(config, run.time, &mut out);
        self.evict(config, &mut out);
        out
    }

    /// A family recurs as a family: unconfirmed members of one shape (rotating names, one
    /// address block) are confirmed together once the family was called in enough distinct runs
    /// (counted from the members' first and last runs, so never more than there were). Returns
    /// the endpoints it learned.
    fn confirm_families(&mut self, config: &Config) -> Vec<EndpointKey> {
        #[derive(Default)]
        struct Family<'a> {
            runs: std::collections::BTreeSet<&'a str>,
            members: Vec<String>,
        }
        let mut families: BTreeMap<EndpointKey, Family<'_>> = BTreeMap::new();
        for (h, list) in &self.hosts {
            for e in list.iter().filter(|e| e.state == State::Unconfirmed) {
                if let Some((shape, _)) = host::family(h) {
                    let family = families.entry((shape, e.port, e.proto)).or_default();
                    family.runs.insert(&e.first_run);
                    family.runs.insert(&e.last_run);
                    family.members.push(h.clone());
                }
            }
        }
        let ready: Vec<EndpointKey> = families
            .into_iter()
            .filter(|(_, f)| f.members.len() > 1 && f.runs.len() >= config.confirm_runs as usize)
            .flat_map(|((_, port, proto), f)| f.members.into_iter().map(move |h| (h, port, proto)))
            .collect();
        let mut learned = Vec::new();
        for (h, port, proto) in ready {
            let found = self.hosts.get_mut(&h).and_then(|l| {
                l.iter_mut().find(|e| e.port == port && e.proto == proto && e.state == State::Unconfirmed)
            });
            if let Some(e) = found {
                e.state = State::Learned;
                e.severity = None;
                learned.push((h, port, proto));
            }
        }
        learned
    }

    /// Folds the learned members of `target`'s family ([`host::family`]) into a pattern once
    /// enough distinct members were seen.
    fn fold_family(&mut self, target: &str, port: u16, proto: Proto, out: &mut Learned) {
        let Some((shape, needed)) = host::family(target) else { return };
        let siblings: Vec<String> = self
            .hosts
            .iter()
            .filter(|(h, list)| {
                list.iter().any(|e| e.port == port && e.proto == proto && e.state == State::Learned)
                    && host::family(h).is_some_and(|(s, _)| s == shape)
            })
            .map(|(h, _)| h.clone())
            .collect();
        if siblings.len() < needed {
            return;
        }
        let mut pattern =
            Pattern { shape: shape.clone(), port, proto, siblings: 0, runs_seen: 0, last_run_index: 0, last_time: 0 };
        for h in siblings {
            let list = self.hosts.get_mut(&h).expect("sibling was just found");
            if let Some(pos) = list.iter().position(|e| e.port == port && e.proto == proto && e.state == State::Learned)
            {
                let e = list.remove(pos);
                pattern.siblings += 1;
                pattern.runs_seen = pattern.runs_seen.max(e.runs_seen);
                pattern.last_run_index = pattern.last_run_index.max(e.last_run_index);
                pattern.last_time = pattern.last_time.max(e.last_time);
            }
            if list.is_empty() {
                self.hosts.remove(&h);
                out.removed_hosts.push(h);
            }
        }
        out.new_patterns.push(shape);
        self.patterns.push(pattern);
    }

    /// Brings the baseline up to date without a run: applies the current approvals (anomalous
    /// endpoints a person approved become `Approved`; approvals withdrawn turn back into
    /// `Learned`) and expires endpoints unseen for long enough by `now` (Unix seconds). The
    /// operator calls it when a spec changes and now and then for jobs that stopped running.
    pub fn refresh(&mut self, config: &Config, now: i64) -> Learned {
        self.index.clear();
        let mut out = Learned::default();
        for (target, list) in &mut self.hosts {
            let (host, ip) = match target.parse::<IpAddr>() {
                Ok(ip) => (None, Some(ip)),
                Err(_) => (Some(target.as_str()), None),
            };
            for e in list.iter_mut() {
                let call = Call { host, ip, port: e.port, proto: e.proto, process: None };
                let approved = config.approved.iter().any(|r| r.matches(&call));
                match (e.state, approved) {
                    (State::Learned | State::Anomalous | State::Unconfirmed | State::Untrusted, true) => {
                        if !e.state.is_normal() {
                            out.new_hosts.push(target.clone());
                        }
                        e.state = State::Approved;
                        e.severity = None;
                    }
                    (State::Approved, false) => e.state = State::Learned,
                    _ => {}
                }
            }
        }
        out.new_hosts.dedup();
        self.expire(config, now, &mut out);
        out
    }

    /// Removes endpoints not called for `expire_after_runs` runs and `expire_after_days` days.
    fn expire(&mut self, config: &Config, now: i64, out: &mut Learned) {
        let runs = self.runs;
        let stale = |last_index: u32, last_time: i64| {
            runs.saturating_sub(last_index) >= config.expire_after_runs
                && now.saturating_sub(last_time) >= i64::from(config.expire_after_days) * 86_400
        };
        self.hosts.retain(|h, list| {
            // Only what counted as known leaves the cluster's index.
            let known = list.iter().any(|e| e.state.is_normal());
            list.retain(|e| !stale(e.last_run_index, e.last_time));
            if known && !list.iter().any(|e| e.state.is_normal()) {
                out.removed_hosts.push(h.clone());
            }
            !list.is_empty()
        });
        self.patterns.retain(|p| !stale(p.last_run_index, p.last_time));
    }

    /// Keeps at most `max_endpoints`: evicts learned and unconfirmed endpoints seen in the fewest
    /// runs, the least recently called first (an evicted unconfirmed endpoint is simply new
    /// again). Anomalous endpoints are what a person must see: they go only when nothing else
    /// is left to evict, the first reported first, and are counted apart (called again, one is
    /// scored as new, so it is reported again).
    fn evict(&mut self, config: &Config, out: &mut Learned) {
        let excess = self.endpoint_count().saturating_sub(config.max_endpoints);
        if excess == 0 {
            return;
        }
        let mut candidates: Vec<(bool, i64, u32, u32, String, u16, Proto)> = self
            .hosts
            .iter()
            .flat_map(|(h, list)| {
                list.iter().filter(|e| e.state != State::Approved).map(|e| {
                    let anomalous = e.state == State::Anomalous;
                    // Anomalous ones last, oldest reported first; the others by use.
                    let (first, runs, last) =
                        if anomalous { (e.first_time, 0, 0) } else { (0, e.runs_seen, e.last_run_index) };
                    (anomalous, first, runs, last, h.clone(), e.port, e.proto)
                })
            })
            .collect();
        candidates.sort();
        for (anomalous, _, _, _, h, port, proto) in candidates.into_iter().take(excess) {
            if let Some(list) = self.hosts.get_mut(&h) {
                let known = list.iter().any(|e| e.state.is_normal());
                list.retain(|e| !(e.port == port && e.proto == proto));
                if known && !list.iter().any(|e| e.state.is_normal()) {
                    out.removed_hosts.push(h.clone());
                }
                if list.is_empty() {
                    self.hosts.remove(&h);
                }
            }
            if anomalous {
                self.evicted_anomalous = self.evicted_anomalous.saturating_add(1);
            } else {
                self.evicted = self.evicted.saturating_add(1);
            }
        }
    }
}

fn remember(list: &mut Vec<String>, value: Option<&str>, max: usize) {
    if let Some(v) = value
        && list.len() < max
        && !list.iter().any(|x| x == v)
    {
        list.push(v.to_string());
    }
}
