//! The detector's model in the `WorkflowBaseline` API.
//!
//! The status of a `WorkflowBaseline` is the persisted form of the detector's [`Baseline`]:
//! [`write`] puts a model into a status and [`read`] takes it back out, without loss within
//! the API's bounds. [`config`] turns the spec (mode, learning, approved endpoints) into the
//! detector's [`Config`].
//!
//! [`merge::merge_run`] merges a finished run into a baseline on the API server, safely with
//! concurrent writers.
//!
//! Both the node agent (which merges finished runs) and the operator (which compacts and
//! expires baselines) use this crate; it depends on the API types and the detector and on
//! nothing else of ours.

pub mod merge;

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runwarden_crds::baseline::{
    self as api, BaselineMode, BaselinePhase, EndpointState, LearnedEndpoint, TriggerRuns, WorkflowBaselineSpec,
    WorkflowBaselineStatus,
};
use runwarden_crds::{EndpointRule, Protocol};
use runwarden_detector::model::{self, CHURN_WINDOW, Endpoint, Pattern};
use runwarden_detector::{Approved, ApprovedRule, Baseline, Cluster, Config, Mode, Phase, Proto, Severity, State};

// The model's bounds are the API's: what the detector keeps always fits the status.
const _: () = assert!(model::MAX_PROCESSES == api::MAX_PROCESSES);
const _: () = assert!(model::MAX_TRIGGERS == api::MAX_TRIGGERS);
const _: () = assert!(CHURN_WINDOW == api::MAX_CHURN_WINDOW);
const _: () = assert!(model::MAX_TRIGGER_KINDS == api::MAX_TRIGGER_KINDS);

/// Why a spec or status could not be turned into the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An approved endpoint the schema should have refused.
    #[error("spec.approved[{index}]: {reason}")]
    InvalidApproved {
        /// Its position in `spec.approved`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A status endpoint that names no destination, or an unparsable one.
    #[error("status.endpoints[{index}]: {reason}")]
    InvalidEndpoint {
        /// Its position in `status.endpoints`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The detector's configuration for a baseline with this spec, reporting at `min_severity`
/// (from the EgressPolicy that covers the job).
pub fn config(spec: &WorkflowBaselineSpec, min_severity: Severity) -> Result<Config> {
    let approved =
        spec.approved.iter().enumerate().map(|(index, rule)| approved_rule(index, rule)).collect::<Result<_>>()?;
    Ok(Config {
        mode: match spec.mode {
            BaselineMode::Auto => Mode::Auto,
            BaselineMode::Learning => Mode::Learning,
            BaselineMode::Monitoring => Mode::Monitoring,
            BaselineMode::Frozen => Mode::Frozen,
        },
        min_runs: spec.learning.min_runs,
        settle_after_quiet_runs: spec.learning.settle_after_quiet_runs,
        expire_after_runs: spec.learning.expire_after_runs,
        expire_after_days: spec.learning.expire_after_days,
        min_severity,
        confirm_runs: spec.learning.confirm_runs,
        max_endpoints: api::MAX_ENDPOINTS,
        approved,
        trusted_refs: spec.learning.trusted_refs.clone(),
    })
}

/// Whether any of `rules` (a policy's allowed endpoints, a baseline's approvals) covers a call
/// to `host` (the name looked up, if any) at `ip`, `port`, `protocol`. A rule that is not valid
/// covers nothing.
pub fn rules_allow(
    rules: &[EndpointRule],
    host: Option<&str>,
    ip: Option<IpAddr>,
    port: u16,
    protocol: Protocol,
) -> bool {
    let call = runwarden_detector::Call { host, ip, port, proto: proto(protocol), process: None };
    rules.iter().enumerate().filter_map(|(i, r)| approved_rule(i, r).ok()).any(|r| r.matches(&call))
}

fn approved_rule(index: usize, rule: &EndpointRule) -> Result<ApprovedRule> {
    let invalid = |reason: String| Error::InvalidApproved { index, reason };
    let target = match (&rule.host, &rule.cidr) {
        (Some(host), None) => Approved::Host(host.clone()),
        (None, Some(cidr)) => {
            let (net, len) = parse_cidr(cidr).ok_or_else(|| invalid(format!("cidr {cidr:?} is not a CIDR")))?;
            Approved::Cidr(net, len)
        }
        _ => return Err(invalid("set exactly one of host or cidr".into())),
    };
    Ok(ApprovedRule { target, ports: rule.ports.clone(), proto: rule.protocol.map(proto) })
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn proto(p: Protocol) -> Proto {
    match p {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
    }
}

fn protocol(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

/// The API's severity for the detector's.
pub fn api_severity(s: Severity) -> runwarden_crds::Severity {
    match s {
        Severity::Info => runwarden_crds::Severity::Info,
        Severity::Low => runwarden_crds::Severity::Low,
        Severity::Medium => runwarden_crds::Severity::Medium,
        Severity::High => runwarden_crds::Severity::High,
        Severity::Critical => runwarden_crds::Severity::Critical,
    }
}

/// The detector's severity for the API's.
pub fn model_severity(s: runwarden_crds::Severity) -> Severity {
    match s {
        runwarden_crds::Severity::Info => Severity::Info,
        runwarden_crds::Severity::Low => Severity::Low,
        runwarden_crds::Severity::Medium => Severity::Medium,
        runwarden_crds::Severity::High => Severity::High,
        runwarden_crds::Severity::Critical => Severity::Critical,
    }
}

/// The abused services for runners of a policy: the built-in lists with the policy's
/// `anomalyDetection.abusedServices` applied.
pub fn services(spec: &runwarden_crds::policy::AbusedServices) -> runwarden_detector::Services {
    use runwarden_crds::policy::AbusedServiceCategory as C;
    use runwarden_detector::Category;
    let category = |c: C| match c {
        C::Paste => Category::Paste,
        C::IpEcho => Category::IpEcho,
        C::RequestCatcher => Category::RequestCatcher,
        C::Tunnel => Category::Tunnel,
        C::MiningPool => Category::MiningPool,
        C::FileDrop => Category::FileDrop,
        C::SecretValidation => Category::SecretValidation,
        C::DynamicDns => Category::DynamicDns,
    };
    runwarden_detector::Services::builtin()
        .with(spec.add.iter().map(|a| (a.host.as_str(), category(a.category))), spec.ignore.iter().map(String::as_str))
}

/// A run id as the status stores it: the API keeps at most 32 characters (GitHub's run ids
/// are numbers far shorter; a runner without ARC may have none and use a longer stand-in).
fn stored_run_id(id: &str) -> String {
    id.chars().take(api::MAX_RUN_ID).collect()
}

fn time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn seconds(t: Option<&Time>) -> i64 {
    t.map_or(0, |t| t.0.as_second())
}

/// What the cluster's baselines know (the detector's [`Cluster`] context): every learned or
/// approved host and every rotating family of each baseline. A baseline whose status does not
/// read is skipped.
pub fn cluster<'a>(baselines: impl IntoIterator<Item = &'a runwarden_crds::WorkflowBaseline>) -> Cluster {
    let mut cluster = Cluster::default();
    for b in baselines {
        let Some(model) = b.status.as_ref().and_then(|s| read(s).ok()) else { continue };
        for (host, endpoints) in &model.hosts {
            if endpoints.iter().any(|e| e.state.is_normal()) {
                cluster.add_host(&b.spec.repository, host);
            }
        }
        for p in &model.patterns {
            cluster.add_shape(&p.shape);
        }
    }
    cluster
}

/// Writes the model `b` into `status`: phase, counts, endpoints, churn and trigger history.
/// Leaves what the model does not own (`recentRuns`, `conditions`, `observedGeneration`,
/// `lastRunTime`) as it is.
pub fn write(b: &Baseline, config: &Config, status: &mut WorkflowBaselineStatus) {
    status.phase = Some(match b.phase(config) {
        Phase::Learning => BaselinePhase::Learning,
        Phase::Monitoring => BaselinePhase::Monitoring,
        Phase::Frozen => BaselinePhase::Frozen,
    });
    status.observed_runs = b.runs;
    status.evicted_endpoints = b.evicted;
    status.evicted_anomalies = b.evicted_anomalous;
    status.endpoints = b
        .hosts
        .iter()
        .flat_map(|(target, list)| list.iter().map(move |e| endpoint_status(target, e)))
        .chain(b.patterns.iter().map(pattern_status))
        .collect();
    status.endpoint_count = status.endpoints.len() as u32;
    status.recent_new_endpoints = b.recent_new.iter().copied().collect();
    let mut triggers: Vec<TriggerRuns> =
        b.triggers.iter().map(|(trigger, &runs)| TriggerRuns { trigger: trigger.clone(), runs }).collect();
    if triggers.len() > api::MAX_TRIGGER_KINDS {
        // Keep the triggers with the most runs; a dropped one reads as rare, which it is.
        triggers.sort_by(|a, b| b.runs.cmp(&a.runs).then_with(|| a.trigger.cmp(&b.trigger)));
        triggers.truncate(api::MAX_TRIGGER_KINDS);
        triggers.sort_by(|a, b| a.trigger.cmp(&b.trigger));
    }
    status.trigger_runs = triggers;
}

fn endpoint_status(target: &str, e: &Endpoint) -> LearnedEndpoint {
    let (host, cidr) = match target.parse::<IpAddr>() {
        Ok(ip) => (None, Some(format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }))),
        Err(_) => (Some(target.to_string()), None),
    };
    LearnedEndpoint {
        host,
        cidr,
        pattern: None,
        members: 0,
        port: e.port,
        protocol: protocol(e.proto),
        runs_seen: e.runs_seen,
        first_seen_run: Some(stored_run_id(&e.first_run)),
        first_seen_time: Some(time(e.first_time)),
        last_seen_run: Some(stored_run_id(&e.last_run)),
        last_seen_time: Some(time(e.last_time)),
        last_seen_run_number: e.last_run_index,
        processes: e.processes.clone(),
        triggers: e.triggers.clone(),
        state: match e.state {
            State::Learned => EndpointState::Learned,
            State::Approved => EndpointState::Approved,
            State::Anomalous => EndpointState::Anomalous,
            State::Unconfirmed => EndpointState::Unconfirmed,
            State::Untrusted => EndpointState::Untrusted,
        },
        severity: e.severity.map(api_severity),
    }
}

fn pattern_status(p: &Pattern) -> LearnedEndpoint {
    let is_block = p.shape.contains('/');
    LearnedEndpoint {
        host: None,
        cidr: is_block.then(|| p.shape.clone()),
        pattern: (!is_block).then(|| p.shape.clone()),
        members: p.siblings,
        port: p.port,
        protocol: protocol(p.proto),
        runs_seen: p.runs_seen,
        first_seen_run: None,
        first_seen_time: None,
        last_seen_run: None,
        last_seen_time: Some(time(p.last_time)),
        last_seen_run_number: p.last_run_index,
        processes: Vec::new(),
        triggers: Vec::new(),
        state: EndpointState::Learned,
        severity: None,
    }
}

/// Reads the model back out of `status`.
pub fn read(status: &WorkflowBaselineStatus) -> Result<Baseline> {
    let mut b = Baseline {
        runs: status.observed_runs,
        evicted: status.evicted_endpoints,
        evicted_anomalous: status.evicted_anomalies,
        recent_new: status.recent_new_endpoints.iter().copied().collect(),
        triggers: status.trigger_runs.iter().map(|t| (t.trigger.clone(), t.runs)).collect(),
        ..Baseline::default()
    };
    for (index, e) in status.endpoints.iter().enumerate() {
        let invalid = |reason: String| Error::InvalidEndpoint { index, reason };
        let single_address = e
            .cidr
            .as_deref()
            .and_then(parse_cidr)
            .filter(|(ip, len)| e.members == 0 && *len == if ip.is_ipv4() { 32 } else { 128 });
        let family = match (&e.host, &e.cidr, &e.pattern, single_address) {
            (Some(host), None, None, _) => {
                b.hosts.entry(host.clone()).or_default().push(endpoint(e));
                continue;
            }
            (None, Some(_), None, Some((ip, _))) => {
                b.hosts.entry(ip.to_string()).or_default().push(endpoint(e));
                continue;
            }
            (None, Some(block), None, None) => {
                parse_cidr(block).ok_or_else(|| invalid(format!("cidr {block:?} is not a CIDR")))?;
                block.clone()
            }
            (None, None, Some(shape), _) => shape.clone(),
            _ => return Err(invalid("set exactly one of host, cidr or pattern".into())),
        };
        b.patterns.push(Pattern {
            shape: family,
            port: e.port,
            proto: proto(e.protocol),
            siblings: e.members,
            runs_seen: e.runs_seen,
            last_run_index: e.last_seen_run_number,
            last_time: seconds(e.last_seen_time.as_ref()),
        });
    }
    Ok(b)
}

fn endpoint(e: &LearnedEndpoint) -> Endpoint {
    Endpoint {
        port: e.port,
        proto: proto(e.protocol),
        state: match e.state {
            EndpointState::Learned => State::Learned,
            EndpointState::Approved => State::Approved,
            EndpointState::Anomalous => State::Anomalous,
            EndpointState::Unconfirmed => State::Unconfirmed,
            EndpointState::Untrusted => State::Untrusted,
        },
        runs_seen: e.runs_seen,
        first_run: e.first_seen_run.clone().unwrap_or_default(),
        first_time: seconds(e.first_seen_time.as_ref()),
        last_run: e.last_seen_run.clone().unwrap_or_default(),
        last_time: seconds(e.last_seen_time.as_ref()),
        last_run_index: e.last_seen_run_number,
        processes: e.processes.clone(),
        triggers: e.triggers.clone(),
        severity: e.severity.map(model_severity),
    }
}
