//! Block mode on this node: which pods an `EgressPolicy` in `Block` mode covers and what each
//! may call, kept in step with the kernel ([`crate::ebpf::Probes::set_blocking`], the pods'
//! allowed ranges) and with the resolver ([`Enforced`] is its [`Gate`]).
//!
//! A pod is covered by the policy that applies to it (the oldest of its namespace that selects
//! it, as for anomaly reports): before its job is known, by what its scale set alone selects,
//! so there is no window in which a runner is not held to the scale set's policy; once known,
//! by the job's. What it may call: the policy's `allowedEndpoints`, its presets and, with
//! `includeBaseline`, the endpoints its job's baseline learned or a person approved (hosts,
//! rotating families, address blocks) and the baseline's `spec.approved`. Names are allowed
//! through the resolver (their addresses for their TTL); ranges go into the kernel for good.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use runwarden_crds::{EgressPolicy, EndpointRule, EndpointState, PolicyMode, WorkflowBaseline};

use crate::ebpf::{AllowList, Allowed, Clients, LoadError, Probes, ResolvedKey, monotonic_ns, name_key};
use crate::events::Proto;
use crate::resolver::{Gate, Scope, Transport};

/// A name rule: an exact name, every name below a suffix (`*.example.com`), or a rotating
/// family's shape (learned by a baseline).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Name {
    Exact(String),
    Below(String),
    Shape(String),
}

impl Name {
    fn matches(&self, name: &str) -> bool {
        match self {
            Name::Exact(n) => n == name,
            Name::Below(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            Name::Shape(shape) => runwarden_detector::host::family(name).is_some_and(|(s, _)| &s == shape),
        }
    }
}

/// What one pod may call in block mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    names: Vec<(Name, Scope)>,
    /// Ranges allowed for good.
    pub ranges: Vec<Allowed>,
    /// The policy it comes from, `namespace/name`.
    pub policy: String,
    /// The policy's `failOpen`: while the agent is away, the pod's calls go ahead.
    pub fail_open: bool,
}

fn proto(p: Option<runwarden_crds::Protocol>) -> Option<Proto> {
    p.map(|p| match p {
        runwarden_crds::Protocol::Tcp => Proto::Tcp,
        runwarden_crds::Protocol::Udp => Proto::Udp,
    })
}

/// An address range from a rule's `cidr` (validated by the API server; anything else is
/// skipped, so a bad entry allows nothing).
fn range(cidr: &str, scope: &Scope) -> Option<Allowed> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= if addr.is_ipv4() { 32 } else { 128 }).then(|| Allowed {
        addr,
        prefix,
        protocol: scope.protocol,
        ports: scope.ports.clone(),
        ttl: None,
    })
}

impl Allowance {
    /// Nothing at all but the pod's own addresses (and DNS, which the resolver refuses): for a
    /// pod of a runner namespace that is no runner's, where a policy blocks (code in a job can
    /// make pods with the runner's ServiceAccount: they must not be a way out).
    pub fn nothing(policy: String) -> Self {
        Allowance { policy, ..Allowance::default() }
    }

    /// What `policy` allows a pod whose job's baseline is `baseline` (if known).
    pub fn build(policy: &EgressPolicy, baseline: Option<&WorkflowBaseline>) -> Self {
        let mut out = Allowance {
            policy: format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or_default(),
                policy.metadata.name.as_deref().unwrap_or_default()
            ),
            fail_open: policy.spec.fail_open,
            ..Allowance::default()
        };
        let mut rules: Vec<EndpointRule> = policy.spec.allowed_endpoints.clone();
        for preset in &policy.spec.presets {
            rules.extend(preset.endpoints());
        }
        if policy.spec.include_baseline
            && let Some(baseline) = baseline
        {
            rules.extend(baseline.spec.approved.iter().cloned());
            for e in baseline.status.iter().flat_map(|s| &s.endpoints) {
                if !matches!(e.state, EndpointState::Learned | EndpointState::Approved) {
                    continue;
                }
                let scope = Scope { protocol: proto(Some(e.protocol)), ports: vec![e.port] };
                if let Some(host) = &e.host {
                    out.names.push((Name::Exact(host.clone()), scope));
                } else if let Some(shape) = &e.pattern {
                    out.names.push((Name::Shape(shape.clone()), scope));
                } else if let Some(r) = e.cidr.as_deref().and_then(|c| range(c, &scope)) {
                    out.ranges.push(r);
                }
            }
        }
        for rule in rules {
            let scope = Scope { protocol: proto(rule.protocol), ports: rule.ports.clone() };
            if let Some(host) = rule.host {
                let name = match host.strip_prefix("*.") {
                    Some(suffix) => Name::Below(suffix.to_string()),
                    None => Name::Exact(host),
                };
                out.names.push((name, scope));
            } else if let Some(r) = rule.cidr.as_deref().and_then(|c| range(c, &scope)) {
                out.ranges.push(r);
            }
        }
        out
    }

    /// Whether a call to `ip`:`port` over `proto`, looked up as one of `hosts`, is allowed, as
    /// the kernel and the resolver would judge it in block mode: an address in the pod, DNS (it
    /// goes to the resolver), a range, or a name the resolver would have allowed for it.
    pub fn allows(&self, hosts: &[String], ip: IpAddr, port: u16, proto: Proto) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() || ip.is_unspecified() || port == 53 {
            return true;
        }
        let fits = |protocol: Option<Proto>, ports: &[u16]| {
            protocol.is_none_or(|p| p == proto) && (ports.is_empty() || ports.contains(&port))
        };
        hosts.iter().any(|h| self.names.iter().any(|(n, s)| n.matches(h) && fits(s.protocol, &s.ports)))
            || self.ranges.iter().any(|r| in_range(ip, r.addr, r.prefix) && fits(r.protocol, &r.ports))
    }

    /// What the addresses of `name` allow (empty: the name may not be resolved).
    pub fn scopes(&self, name: &str) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = Vec::new();
        for (n, scope) in &self.names {
            if n.matches(name) && !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
        scopes
    }
}

/// Whether `ip` is in `net`/`prefix` (of the same family).
fn in_range(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let bits = |a: IpAddr| match a {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let ((a, fa), (b, fb)) = (bits(ip), bits(net));
    if fa != fb {
        return false;
    }
    let prefix = u32::from(prefix).min(fa);
    prefix == 0 || (a ^ b) >> (128 - prefix) == 0
}

/// What the resolver allowed a pod at one kernel entry: for which names' answers (a few; the
/// latest last), and until when (CLOCK_MONOTONIC ns, as the kernel holds it).
#[derive(Clone, Debug)]
struct Resolved {
    names: Vec<String>,
    expires_ns: u64,
}

/// Names remembered per entry: past it the oldest is forgotten (the entry is then taken back
/// when none of the rest is allowed, at worst before its time).
const NAMES_PER_ENTRY: usize = 4;

#[derive(Debug, Default)]
struct GateState {
    /// cgroup → what it may call.
    allowances: HashMap<u64, Arc<Allowance>>,
    /// cgroup → the kernel entries the resolver made for it (to take back those of names a
    /// policy change no longer allows, and to bound them).
    resolved: HashMap<u64, HashMap<ResolvedKey, Resolved>>,
}

/// Most kernel entries from DNS answers per pod: past it the soonest to expire are taken back
/// (a pod that resolves without end evicts its own addresses, not other pods').
pub const MAX_RESOLVED_PER_POD: usize = 8192;

/// The pods in block mode, shared by the agent's loop (which keeps it) and the resolver
/// (which asks it): the kernel says which pod sent a query ([`Clients`]), this what it may
/// resolve.
#[derive(Clone)]
pub struct Enforced {
    state: Arc<RwLock<GateState>>,
    clients: Clients,
    allow: AllowList,
}

impl Gate for Enforced {
    fn decide(&self, client: SocketAddr, transport: Transport, name: &str) -> Option<(u64, Vec<Scope>)> {
        let proto = if transport == Transport::Tcp { Proto::Tcp } else { Proto::Udp };
        let pod = self.clients.pod_of(client, proto)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let scopes = state.allowances.get(&pod)?.scopes(name);
        (!scopes.is_empty()).then_some((pod, scopes))
    }

    fn resolved(&self, pod: u64, name: &str, allowed: &[(ResolvedKey, u64)]) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let entries = state.resolved.entry(pod).or_default();
        for (key, expires_ns) in allowed {
            let entry = entries.entry(*key).or_insert_with(|| Resolved { names: Vec::new(), expires_ns: 0 });
            entry.names.retain(|n| n != name);
            entry.names.push(name.to_string());
            if entry.names.len() > NAMES_PER_ENTRY {
                entry.names.remove(0);
            }
            entry.expires_ns = entry.expires_ns.max(*expires_ns);
        }
        if entries.len() > MAX_RESOLVED_PER_POD {
            // The soonest to expire, an eighth at once (so this runs once per 1,024 answers).
            let mut by_expiry: Vec<(u64, ResolvedKey)> = entries.iter().map(|(k, r)| (r.expires_ns, *k)).collect();
            by_expiry.sort_unstable_by_key(|(expires, _)| *expires);
            for (expires_ns, key) in by_expiry.into_iter().take(MAX_RESOLVED_PER_POD / 8) {
                entries.remove(&key);
                self.allow.take_back(pod, key, Some(expires_ns));
            }
        }
    }
}

/// Whether `scopes` let a pod make the call of the kernel entry `key`.
fn covers(scopes: &[Scope], key: &ResolvedKey) -> bool {
    scopes.iter().any(|s| {
        s.protocol.is_none_or(|p| p == key.protocol)
            && if s.ports.is_empty() { key.port == 0 } else { s.ports.contains(&key.port) }
    })
}

/// A pod block mode should cover: its cgroup and what it may call.
#[derive(Clone, Debug)]
pub struct Covered {
    /// The pod's cgroup id.
    pub cgroup: u64,
    /// What it may call.
    pub allowance: Arc<Allowance>,
}

/// Keeps the kernel and the gate in step with the pods block mode covers.
pub struct Enforcer {
    /// The gate the resolver asks.
    pub gate: Enforced,
    applied: HashMap<u64, Covered>,
    last_sweep: Instant,
}

/// How often expired entries from DNS answers are taken out of the kernel's table.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl Enforcer {
    /// An enforcer whose gate finds a query's pod in `clients`, and which knows what an agent
    /// before it let pods call in `allow` (the entries from DNS answers, and their names).
    pub fn new(clients: Clients, allow: AllowList) -> Self {
        let mut resolved: HashMap<u64, HashMap<ResolvedKey, Resolved>> = HashMap::new();
        for entry in allow.resolved() {
            let names = entry.name.into_iter().collect();
            resolved.entry(entry.pod).or_default().insert(entry.key, Resolved { names, expires_ns: entry.expires_ns });
        }
        let state = GateState { allowances: HashMap::new(), resolved };
        Self {
            gate: Enforced { state: Arc::new(RwLock::new(state)), clients, allow },
            applied: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Pods in block mode now.
    pub fn blocking(&self) -> usize {
        self.applied.len()
    }

    /// The policy holding the pod cgroup `cgroup`, `namespace/name`.
    pub fn policy_of(&self, cgroup: u64) -> Option<&str> {
        self.applied.get(&cgroup).map(|c| c.allowance.policy.as_str())
    }

    /// Puts `covered` in block mode with what each may call and takes every other pod out.
    /// A change of what a pod may call takes effect at once: ranges and resolved addresses it
    /// no longer may call are taken back (what it still may stays, no call is refused in
    /// between). A pod this agent has not applied before (an earlier agent may have) counts
    /// as changed: what it resolved then is judged by the policy now.
    pub fn apply(&mut self, probes: &mut Probes, covered: Vec<Covered>) -> Vec<(u64, LoadError)> {
        let mut errors = Vec::new();
        let wanted: HashMap<u64, Covered> = covered.into_iter().map(|c| (c.cgroup, c)).collect();
        // Those this agent put in block mode, and those an earlier agent left so.
        let mut gone: Vec<u64> = self.applied.keys().filter(|id| !wanted.contains_key(id)).copied().collect();
        for id in probes.blocking_pods() {
            if !wanted.contains_key(&id) && !gone.contains(&id) {
                gone.push(id);
            }
        }
        for id in gone {
            let _ = probes.set_blocking(id, false);
            let _ = probes.disallow_all(id);
            self.applied.remove(&id);
            let mut state = self.gate.state.write().unwrap_or_else(PoisonError::into_inner);
            state.allowances.remove(&id);
            state.resolved.remove(&id);
        }
        for (id, want) in wanted {
            let before = self.applied.get(&id);
            if before.is_some_and(|b| b.allowance == want.allowance) {
                continue;
            }
            let result = (|| -> Result<(), LoadError> {
                // New ranges first, then block mode: nothing allowed is refused in between.
                for r in &want.allowance.ranges {
                    if before.is_none_or(|b| !b.allowance.ranges.contains(r)) {
                        probes.allow(id, r)?;
                    }
                }
                match before {
                    Some(b) => {
                        for r in &b.allowance.ranges {
                            if !want.allowance.ranges.contains(r) {
                                probes.disallow(id, r)?;
                            }
                        }
                    }
                    // What an earlier agent allowed it, under the policy as it was then.
                    None => self.gate.allow.keep_only_ranges(id, &want.allowance.ranges),
                }
                {
                    let mut state = self.gate.state.write().unwrap_or_else(PoisonError::into_inner);
                    state.allowances.insert(id, want.allowance.clone());
                    // Addresses of names no longer allowed: taken back now, not at their TTL.
                    if let Some(entries) = state.resolved.get_mut(&id) {
                        entries.retain(|key, r| {
                            let still = r.names.iter().any(|name| covers(&want.allowance.scopes(name), key));
                            if !still {
                                self.gate.allow.take_back(id, *key, None);
                            }
                            still
                        });
                    }
                }
                probes.set_block_mode(id, Some(want.allowance.fail_open))
            })();
            match result {
                Ok(()) => {
                    self.applied.insert(id, want);
                }
                Err(e) => errors.push((id, e)),
            }
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.sweep();
        }
        errors
    }

    /// Takes expired entries from DNS answers out of the kernel's table (the kernel no longer
    /// lets them through, but they would fill it), and forgets names nothing refers to.
    /// [`Self::apply`] runs it every 30 seconds.
    pub fn sweep(&mut self) {
        let now = monotonic_ns();
        let mut state = self.gate.state.write().unwrap_or_else(PoisonError::into_inner);
        let mut live = HashSet::new();
        for (pod, entries) in &mut state.resolved {
            entries.retain(|key, r| {
                if r.expires_ns > now {
                    live.extend(r.names.iter().map(|n| name_key(n)));
                    return true;
                }
                // Unless an answer renewed it meanwhile.
                self.gate.allow.take_back(*pod, *key, Some(r.expires_ns));
                false
            });
        }
        state.resolved.retain(|_, entries| !entries.is_empty());
        self.gate.allow.keep_names(&live);
    }
}

/// Whether `policy` holds the pods it applies to in block mode.
pub fn blocks(policy: &EgressPolicy) -> bool {
    policy.spec.mode == PolicyMode::Block
}

/// Whether `policy` lists what its pods may call (allowed endpoints or presets): in `Audit`
/// mode (or `Block` where block mode is off) what it would refuse is reported.
pub fn lists_endpoints(policy: &EgressPolicy) -> bool {
    !policy.spec.allowed_endpoints.is_empty() || !policy.spec.presets.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowance() -> Allowance {
        let policy: EgressPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "p", "namespace": "n"},
            "spec": {"mode": "Audit", "includeBaseline": false, "allowedEndpoints": [
                {"host": "api.example.com", "ports": [443], "protocol": "TCP"},
                {"host": "*.cdn.example.net"},
                {"cidr": "10.1.0.0/16", "ports": [5432]}
            ]}
        }))
        .unwrap();
        Allowance::build(&policy, None)
    }

    #[test]
    fn a_call_is_judged_as_block_mode_would_judge_it() {
        let a = allowance();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let host = |h: &str| vec![h.to_string()];
        assert!(a.allows(&host("api.example.com"), ip, 443, Proto::Tcp));
        assert!(!a.allows(&host("api.example.com"), ip, 80, Proto::Tcp), "another port");
        assert!(!a.allows(&host("api.example.com"), ip, 443, Proto::Udp), "another protocol");
        assert!(a.allows(&host("x.cdn.example.net"), ip, 8443, Proto::Udp), "a wildcard, any port");
        assert!(!a.allows(&host("cdn.example.net"), ip, 443, Proto::Tcp), "the wildcard's parent is not below it");
        assert!(!a.allows(&[], ip, 443, Proto::Tcp), "an address without a name");
        assert!(a.allows(&[], "10.1.200.3".parse().unwrap(), 5432, Proto::Tcp));
        assert!(a.allows(&[], "::ffff:10.1.200.3".parse().unwrap(), 5432, Proto::Tcp), "v4-mapped");
        assert!(!a.allows(&[], "10.2.0.1".parse().unwrap(), 5432, Proto::Tcp));
        assert!(a.allows(&[], "127.0.0.1".parse().unwrap(), 9, Proto::Udp), "in the pod");
        assert!(a.allows(&[], "10.96.0.10".parse().unwrap(), 53, Proto::Udp), "DNS goes to the resolver");
    }
}
