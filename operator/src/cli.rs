//! `kubectl runwarden` (the `kubectl-runwarden` binary, a kubectl plugin): from what a job's
//! `WorkflowBaseline` learned to an `EgressPolicy` in Git.
//!
//! - `policy BASELINE`: the policy YAML, ready to commit: a selector for the baseline's
//!   repository and workflow (and `--scale-set`s), the endpoints it learned or a person approved
//!   (one rule per host and protocol with its ports; a rotating family as a `*.` wildcard of
//!   its parent; addresses and blocks as CIDRs) plus its `spec.approved`, the `--preset`s (and
//!   nothing they already cover), `includeBaseline: false` (the policy says everything itself),
//!   the mode chosen by `--mode`.
//! - `diff BASELINE POLICY`: what the baseline learned or approved that the policy does not
//!   allow (exit 1 when there is some, like `diff`).
//! - `approve BASELINE HOST:PORT/PROTO` (or `CIDR:PORT/PROTO`): appends the endpoint to the
//!   baseline's `spec.approved` (what the Events' command does), so it stops alerting.
//! - `runs [--job BASELINE]`: the recent runs (`WorkflowRun` records), newest first, as a
//!   table like kubectl's.
//! - `run RUN_ID`: one run's every destination, anomalies first with why and the command that
//!   approves each.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runwarden_crds::{
    EgressPolicy, EgressPolicySpec, EndpointRule, EndpointState, LearnedEndpoint, PolicyMode, Preset, Protocol,
    RunEndpoint, RunVerdict, RunnerSelector, WorkflowBaseline, WorkflowRun,
};

/// How a baseline becomes a policy.
#[derive(Clone, Debug)]
pub struct Promotion {
    /// The policy's name.
    pub name: String,
    /// `Audit` or `Block`.
    pub mode: PolicyMode,
    /// Presets the policy names (endpoints they cover are left out).
    pub presets: Vec<Preset>,
    /// Scale sets the policy selects (none: any).
    pub scale_sets: Vec<String>,
}

/// `TCP` or `UDP`.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// Whether the endpoint is one the job uses: learned, or approved.
fn kept(e: &LearnedEndpoint) -> bool {
    matches!(e.state, EndpointState::Learned | EndpointState::Approved)
}

/// A host standing for a rotating family's shape (`productionresultssa#.blob.core.windows.net`):
/// digits for `#`, a hex id for `%`.
fn family_member(shape: &str) -> String {
    shape.replace('#', "1").replace('%', "0123456789abcdef")
}

/// The rotating family's rule: `*.` its parent (`*.blob.core.windows.net`).
fn family_wildcard(shape: &str) -> Option<String> {
    let (_, parent) = shape.split_once('.')?;
    // A wildcard needs two labels below it (`*.example.com`, never `*.com`).
    parent.contains('.').then(|| format!("*.{parent}"))
}

/// Whether the rules allow the endpoint (for a block or a family: a member of it).
fn allowed_by(rules: &[EndpointRule], e: &LearnedEndpoint) -> bool {
    let (host, ip) = match (&e.host, &e.pattern, &e.cidr) {
        (Some(h), _, _) => (Some(h.clone()), None),
        (_, Some(shape), _) => (Some(family_member(shape)), None),
        (_, _, Some(cidr)) => (None, cidr.split_once('/').and_then(|(a, _)| a.parse::<IpAddr>().ok())),
        _ => return false,
    };
    runwarden_status::rules_allow(rules, host.as_deref(), ip, e.port, e.protocol)
}

/// The `EgressPolicy` that allows what `baseline` learned or had approved (see the module).
pub fn policy_from_baseline(baseline: &WorkflowBaseline, p: &Promotion) -> EgressPolicy {
    let preset_rules: Vec<EndpointRule> = p.presets.iter().flat_map(|preset| preset.endpoints()).collect();
    let runs = |e: &LearnedEndpoint| match e.state {
        EndpointState::Approved => "approved".to_string(),
        _ => format!("learned in {} run{}", e.runs_seen, if e.runs_seen == 1 { "" } else { "s" }),
    };
    // (cidr rather than host, the host or cidr, protocol) → ports and why: hosts first.
    let mut hosts: BTreeMap<(bool, String, Protocol), (Vec<u16>, String)> = BTreeMap::new();
    for e in baseline.status.iter().flat_map(|s| &s.endpoints).filter(|e| kept(e)) {
        if allowed_by(&preset_rules, e) {
            continue;
        }
        let (is_cidr, target, why) = match (&e.host, &e.pattern, &e.cidr) {
            (Some(h), _, _) => (false, h.clone(), runs(e)),
            (_, Some(shape), _) => match family_wildcard(shape) {
                Some(w) => (false, w, format!("rotating family {shape}, {} names, {}", e.members, runs(e))),
                None => continue,
            },
            (_, _, Some(cidr)) => (true, cidr.clone(), runs(e)),
            _ => continue,
        };
        let entry = hosts.entry((is_cidr, target, e.protocol)).or_insert_with(|| (Vec::new(), why));
        if !entry.0.contains(&e.port) {
            entry.0.push(e.port);
        }
    }
    let mut allowed: Vec<EndpointRule> = hosts
        .into_iter()
        .map(|((is_cidr, target, protocol), (mut ports, why))| {
            ports.sort_unstable();
            EndpointRule {
                host: (!is_cidr).then(|| target.clone()),
                cidr: is_cidr.then_some(target),
                ports,
                protocol: Some(protocol),
                description: Some(why),
            }
        })
        .collect();
    for rule in &baseline.spec.approved {
        if !allowed.iter().any(|a| a.host == rule.host && a.cidr == rule.cidr && a.ports == rule.ports) {
            allowed.push(EndpointRule {
                description: rule.description.clone().or(Some("approved in the baseline".into())),
                ..rule.clone()
            });
        }
    }
    allowed.truncate(runwarden_crds::policy::MAX_ALLOWED_ENDPOINTS);
    let namespace = baseline.metadata.namespace.clone();
    let mut policy = EgressPolicy::new(
        &p.name,
        EgressPolicySpec {
            selector: RunnerSelector {
                scale_sets: p.scale_sets.clone(),
                repositories: vec![baseline.spec.repository.clone()],
                workflows: vec![baseline.spec.workflow.clone()],
            },
            mode: p.mode,
            allowed_endpoints: allowed,
            presets: p.presets.clone(),
            include_baseline: false,
            anomaly_detection: Default::default(),
            fail_open: false,
        },
    );
    policy.metadata.namespace = namespace;
    policy
}

/// What `baseline` learned or had approved that `policy` does not allow, as
/// `host:port/PROTO (why)` lines. A policy that counts the baseline (`includeBaseline`)
/// allows all of it.
pub fn not_allowed(baseline: &WorkflowBaseline, policy: &EgressPolicy) -> Vec<String> {
    if policy.spec.include_baseline {
        return Vec::new();
    }
    let mut rules = policy.spec.allowed_endpoints.clone();
    rules.extend(policy.spec.presets.iter().flat_map(|p| p.endpoints()));
    let mut out = Vec::new();
    for e in baseline.status.iter().flat_map(|s| &s.endpoints).filter(|e| kept(e)) {
        if allowed_by(&rules, e) {
            continue;
        }
        let target = e.host.as_deref().or(e.pattern.as_deref()).or(e.cidr.as_deref()).unwrap_or_default();
        let state = if e.state == EndpointState::Approved { "approved" } else { "learned" };
        out.push(format!("{target}:{}/{} ({state}, {} runs)", e.port, protocol_name(e.protocol), e.runs_seen));
    }
    for rule in &baseline.spec.approved {
        let covered = rule.ports.iter().copied().chain(rule.ports.is_empty().then_some(0)).all(|port| {
            let protocols = match rule.protocol {
                Some(p) => vec![p],
                None => vec![Protocol::Tcp, Protocol::Udp],
            };
            protocols.into_iter().all(|proto| {
                let ip = rule.cidr.as_deref().and_then(|c| c.split_once('/')).and_then(|(a, _)| a.parse().ok());
                let host =
                    rule.host.as_deref().map(|h| h.strip_prefix("*.").map_or(h.to_string(), |s| format!("x.{s}")));
                runwarden_status::rules_allow(&rules, host.as_deref(), ip, port, proto)
            })
        });
        if !covered {
            let target = rule.host.as_deref().or(rule.cidr.as_deref()).unwrap_or_default();
            out.push(format!("{target} (spec.approved)"));
        }
    }
    out
}

/// An endpoint as people write it: `HOST:PORT/PROTO` or `CIDR:PORT/PROTO` (`/TCP` when left
/// out), as the baseline's approval it becomes.
pub fn approval(endpoint: &str) -> Result<EndpointRule, String> {
    let (rest, protocol) = match endpoint.rsplit_once('/') {
        Some((rest, p)) if p.eq_ignore_ascii_case("tcp") => (rest, Protocol::Tcp),
        Some((rest, p)) if p.eq_ignore_ascii_case("udp") => (rest, Protocol::Udp),
        _ => (endpoint, Protocol::Tcp),
    };
    let (target, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?}: write HOST:PORT/PROTO, e.g. api.example.com:443/TCP"))?;
    let port: u16 =
        port.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("{endpoint:?}: {port:?} is not a port"))?;
    let target = target.trim_matches(['[', ']']);
    let rule = if target.parse::<IpAddr>().is_ok() {
        let bits = if target.contains(':') { 128 } else { 32 };
        EndpointRule { cidr: Some(format!("{target}/{bits}")), ..EndpointRule::default() }
    } else if target.contains('/') {
        EndpointRule { cidr: Some(target.to_string()), ..EndpointRule::default() }
    } else {
        EndpointRule { host: Some(target.to_ascii_lowercase()), ..EndpointRule::default() }
    };
    Ok(EndpointRule { ports: vec![port], protocol: Some(protocol), ..rule })
}

/// `host:port/PROTO` (or `address:port/PROTO`) of a run's destination.
pub fn destination(e: &RunEndpoint) -> String {
    let target = e
        .host
        .clone()
        .unwrap_or_else(|| if e.address.contains(':') { format!("[{}]", e.address) } else { e.address.clone() });
    format!("{target}:{}/{}", e.port, protocol_name(e.protocol))
}

/// How long ago `t` was, as kubectl says it (`45s`, `12m`, `5h`, `3d`).
pub fn age(t: &Time, now: Timestamp) -> String {
    let seconds = (now.as_second() - t.0.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Columns padded as kubectl pads them (three spaces apart), the header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(w - cell.chars().count() + 3));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The `runs` table: newest first; `wide` adds the workflow and the runner; `namespaces` the
/// namespace column (`-A`).
pub fn runs_table(runs: &[WorkflowRun], now: Timestamp, wide: bool, namespaces: bool) -> String {
    let mut sorted: Vec<&WorkflowRun> = runs.iter().collect();
    sorted.sort_by(|a, b| b.spec.finished.0.cmp(&a.spec.finished.0).then_with(|| a.spec.runner.cmp(&b.spec.runner)));
    let mut header = Vec::new();
    if namespaces {
        header.push("NAMESPACE");
    }
    header.extend(["RUN", "REPOSITORY"]);
    if wide {
        header.push("WORKFLOW");
    }
    header.push("JOB");
    if wide {
        header.push("RUNNER");
    }
    header.extend(["CALLS", "ENDPOINTS", "NEW", "ANOMALIES", "BLOCKED", "FINISHED"]);
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|r| {
            let s = &r.spec;
            let mut row = Vec::new();
            if namespaces {
                row.push(r.metadata.namespace.clone().unwrap_or_default());
            }
            row.extend([s.run_id.clone(), s.repository.clone()]);
            if wide {
                row.push(s.workflow.clone());
            }
            row.push(s.job.clone());
            if wide {
                row.push(s.runner.clone());
            }
            row.extend([
                s.calls.to_string(),
                s.endpoint_count.to_string(),
                s.new_endpoint_count.to_string(),
                s.anomaly_count.to_string(),
                s.blocked_count.to_string(),
                age(&s.finished, now),
            ]);
            row
        })
        .collect();
    table(&header, &rows)
}

/// One run as `run RUN_ID` prints it: what ran where, then every destination, anomalies first,
/// each anomaly's reasons and the command that approves it.
pub fn run_details(run: &WorkflowRun, now: Timestamp) -> String {
    let s = &run.spec;
    let ns = run.metadata.namespace.clone().unwrap_or_default();
    let mut out = String::new();
    let field =
        |out: &mut String, name: &str, value: &str| out.push_str(&format!("{:<12}{value}\n", format!("{name}:")));
    field(&mut out, "Name", &run.metadata.name.clone().unwrap_or_default());
    field(&mut out, "Namespace", &ns);
    field(&mut out, "Repository", &s.repository);
    field(&mut out, "Workflow", &s.workflow);
    field(&mut out, "Job", &s.job);
    field(&mut out, "Run", &s.run_id);
    if let Some(r) = &s.git_ref {
        field(&mut out, "Ref", r);
    }
    field(&mut out, "Runner", &format!("{} on {}", s.runner, s.node));
    field(&mut out, "Baseline", &s.baseline);
    field(&mut out, "Policy", s.policy.as_deref().unwrap_or("<none>"));
    field(&mut out, "Finished", &format!("{} ({} ago)", s.finished.0, age(&s.finished, now)));
    field(
        &mut out,
        "Calls",
        &format!(
            "{} to {} endpoints: {} new, {} anomalous{}{}",
            s.calls,
            s.endpoint_count,
            s.new_endpoint_count,
            s.anomaly_count,
            if s.blocked_count > 0 {
                format!("; {} destinations refused in block mode", s.blocked_count)
            } else {
                String::new()
            },
            if s.dropped_endpoints > 0 { format!(" ({} not listed)", s.dropped_endpoints) } else { String::new() }
        ),
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .endpoints
        .iter()
        .map(|e| {
            vec![
                format!("{:?}", e.verdict),
                e.severity.map(|v| format!("{v:?}")).unwrap_or_else(|| "-".into()),
                destination(e),
                e.address.clone(),
                e.calls.to_string(),
                e.executables.first().or(e.processes.first()).cloned().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(&["VERDICT", "SEVERITY", "DESTINATION", "ADDRESS", "CALLS", "PROCESS"], &rows));
    let anomalies: Vec<&RunEndpoint> = s.endpoints.iter().filter(|e| e.verdict == RunVerdict::Anomalous).collect();
    if !anomalies.is_empty() {
        out.push_str("\nAnomalies:\n");
        for e in anomalies {
            out.push_str(&format!("  {}", destination(e)));
            if let Some(score) = e.score {
                out.push_str(&format!(" (score {score:.2})"));
            }
            out.push('\n');
            for reason in &e.reasons {
                out.push_str(&format!("    - {reason}\n"));
            }
            out.push_str(&format!(
                "    approve: kubectl runwarden approve -n {ns} {} {}\n",
                s.baseline,
                destination(e)
            ));
        }
    }
    let refused: Vec<&RunEndpoint> = s.endpoints.iter().filter(|e| e.verdict == RunVerdict::Blocked).collect();
    if !refused.is_empty() {
        out.push_str("\nRefused in block mode (not learned):\n");
        for e in refused {
            out.push_str(&format!("  {} ({} attempts)\n", destination(e), e.calls));
            for reason in &e.reasons {
                out.push_str(&format!("    - {reason}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> WorkflowBaseline {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "WorkflowBaseline",
            "metadata": {"name": "acme-web-ci-build", "namespace": "arc"},
            "spec": {"repository": "acme/web", "workflow": ".github/workflows/ci.yml", "job": "build",
                     "approved": [{"host": "mirror.example.org", "ports": [443], "protocol": "TCP"}]},
            "status": {"endpoints": [
                {"host": "registry.npmjs.org", "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
                {"host": "registry.npmjs.org", "port": 80, "protocol": "TCP", "runsSeen": 2, "state": "Learned"},
                {"host": "api.github.com", "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
                {"pattern": "productionresultssa#.blob.core.windows.net", "members": 4, "port": 443, "protocol": "TCP", "runsSeen": 9, "state": "Learned"},
                {"cidr": "10.0.5.0/24", "members": 3, "port": 5432, "protocol": "TCP", "runsSeen": 5, "state": "Learned"},
                {"host": "evil.example.net", "port": 8080, "protocol": "TCP", "runsSeen": 1, "state": "Anomalous", "severity": "High"},
                {"host": "pr-only.example.net", "port": 443, "protocol": "TCP", "runsSeen": 3, "state": "Untrusted"}
            ]}
        }))
        .unwrap()
    }

    fn promote(presets: Vec<Preset>) -> EgressPolicy {
        policy_from_baseline(
            &baseline(),
            &Promotion { name: "web-build".into(), mode: PolicyMode::Block, presets, scale_sets: vec!["arc".into()] },
        )
    }

    #[test]
    fn a_baseline_becomes_a_policy_of_what_it_learned_and_approved() {
        let p = promote(vec![]);
        assert_eq!(p.metadata.namespace.as_deref(), Some("arc"));
        assert_eq!(p.spec.selector.repositories, ["acme/web"]);
        assert_eq!(p.spec.selector.workflows, [".github/workflows/ci.yml"]);
        assert_eq!(p.spec.selector.scale_sets, ["arc"]);
        assert_eq!(p.spec.mode, PolicyMode::Block);
        assert!(!p.spec.include_baseline);
        let rules: Vec<(Option<&str>, Option<&str>, &[u16])> = p
            .spec
            .allowed_endpoints
            .iter()
            .map(|r| (r.host.as_deref(), r.cidr.as_deref(), r.ports.as_slice()))
            .collect();
        assert!(rules.contains(&(Some("registry.npmjs.org"), None, &[80, 443][..])), "one rule, both ports: {rules:?}");
        assert!(rules.contains(&(Some("*.blob.core.windows.net"), None, &[443][..])), "{rules:?}");
        assert!(rules.contains(&(None, Some("10.0.5.0/24"), &[5432][..])), "{rules:?}");
        assert!(rules.contains(&(Some("mirror.example.org"), None, &[443][..])), "{rules:?}");
        assert!(
            !rules.iter().any(|r| r.0 == Some("evil.example.net") || r.0 == Some("pr-only.example.net")),
            "{rules:?}"
        );
        // What it allows is what the baseline has: nothing missing.
        assert!(not_allowed(&baseline(), &p).is_empty(), "{:?}", not_allowed(&baseline(), &p));
    }

    #[test]
    fn endpoints_a_preset_covers_are_left_to_it() {
        let p = promote(vec![Preset::GithubActions]);
        assert!(!p.spec.allowed_endpoints.iter().any(|r| r.host.as_deref() == Some("api.github.com")));
        assert!(!p.spec.allowed_endpoints.iter().any(|r| r.host.as_deref() == Some("*.blob.core.windows.net")));
        assert!(not_allowed(&baseline(), &p).is_empty());
    }

    #[test]
    fn the_diff_lists_what_a_policy_does_not_allow() {
        let mut p = promote(vec![]);
        p.spec.allowed_endpoints.retain(|r| r.host.as_deref() != Some("registry.npmjs.org"));
        p.spec.allowed_endpoints.retain(|r| r.host.as_deref() != Some("mirror.example.org"));
        let missing = not_allowed(&baseline(), &p);
        assert_eq!(
            missing,
            [
                "registry.npmjs.org:443/TCP (learned, 9 runs)",
                "registry.npmjs.org:80/TCP (learned, 2 runs)",
                "mirror.example.org (spec.approved)"
            ]
        );
        p.spec.include_baseline = true;
        assert!(not_allowed(&baseline(), &p).is_empty());
    }

    #[test]
    fn an_approval_is_written_as_people_write_endpoints() {
        let r = approval("API.example.com:443/TCP").unwrap();
        assert_eq!(
            (r.host.as_deref(), r.ports.as_slice(), r.protocol),
            (Some("api.example.com"), &[443][..], Some(Protocol::Tcp))
        );
        let r = approval("10.1.2.3:53/udp").unwrap();
        assert_eq!((r.cidr.as_deref(), r.protocol), (Some("10.1.2.3/32"), Some(Protocol::Udp)));
        assert_eq!(approval("[2001:db8::1]:443").unwrap().cidr.as_deref(), Some("2001:db8::1/128"));
        assert!(approval("api.example.com").is_err());
        assert!(approval("api.example.com:0/TCP").is_err());
    }
}
