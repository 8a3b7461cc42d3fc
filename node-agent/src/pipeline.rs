//! Records → observations: decodes each ring-buffer record, keeps each pod's DNS answers, names
//! every call from the answers its own pod received, attributes it to a pod through the cgroup
//! index, and keeps exact call counts per destination although the kernel reports only the first
//! call of a burst (it counts the rest in its dedupe table, read with [`Pipeline::totals`]).
//!
//! Answers name addresses only when they come from a server the same pod sent a query to
//! (its call to port 53 is always reported before the answer arrives): a process in the pod
//! cannot name its own destinations by sending itself answers from port 53, not without a
//! query to a server of its own, which is itself a call that is reported.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runwarden_ebpf_common::{DedupeKey, DedupeValue};

use crate::cgroups::{CgroupIndex, PodCgroup};
use crate::dns::{self, DnsCache, TtlBounds};
use crate::events::{self, Call, DnsMessage, Hook, Proto, Record, Verdict};

/// One outbound call (or the first of a burst), named and attributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// When it happened.
    pub time: SystemTime,
    /// Process id.
    pub pid: u32,
    /// Process (thread) name (`comm`: the process can set it).
    pub process: String,
    /// The program the process executed (its path as given to `execve`), when the exec was
    /// seen: processes started before monitoring began have none.
    pub executable: Option<String>,
    /// The caller's cgroup id.
    pub cgroup_id: u64,
    /// The monitored (pod-level) cgroup id.
    pub pod_cgroup_id: u64,
    /// The pod, when the pipeline attributes to pods and the cgroup is a pod's.
    pub pod: Option<Arc<PodCgroup>>,
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Transport.
    pub proto: Proto,
    /// Which hook saw it.
    pub hook: Hook,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// The names this pod's DNS answers gave `ip` (all of them, question names first; empty
    /// when none is known).
    pub hosts: Vec<String>,
    /// How many of `hosts`, from the first, are names a question asked for (the others are
    /// CNAME aliases). More than one: the address was answered for several names, and which
    /// one the pod connected for is ambiguous.
    pub questions: usize,
}

/// The names of an address and how many of them are question names (see [`Observation`]).
type Names = (Vec<String>, usize);

impl Observation {
    /// Becomes `newer` (same cgroup and destination), allocating only for what changed.
    fn update_from(&mut self, newer: &Observation) {
        self.time = newer.time;
        self.pid = newer.pid;
        self.hook = newer.hook;
        self.verdict = newer.verdict;
        if self.process != newer.process {
            self.process.clone_from(&newer.process);
        }
        if self.executable != newer.executable {
            self.executable.clone_from(&newer.executable);
        }
        if self.hosts != newer.hosts {
            self.hosts.clone_from(&newer.hosts);
        }
        self.questions = newer.questions;
        if self.pod != newer.pod {
            self.pod.clone_from(&newer.pod);
        }
    }
}

/// Calls counted for one cgroup and destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCount {
    /// The last observation of this destination (process, names, pod).
    pub last: Observation,
    /// Calls counted, those the kernel folded into its dedupe table included.
    pub calls: u64,
}

/// Processes whose executable is remembered.
const MAX_EXECUTABLES: usize = 65_536;

/// How far behind the newest record read an entry of the kernel's dedupe table must be before
/// its missing record counts as lost (records from different CPUs may be a little out of order).
const SETTLE_NS: u64 = 100_000_000;

/// Counters of the pipeline itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Records that could not be decoded.
    pub undecodable: u64,
    /// Call records.
    pub calls: u64,
    /// DNS answers read.
    pub dns_answers: u64,
    /// DNS answers that did not parse (counted, dropped).
    pub malformed_dns: u64,
    /// DNS answers that match no query the pod sent (transaction id, question, server and
    /// port, within [`QUERY_WAIT`]): counted, not used to name anything (a process could
    /// otherwise name its own destinations by sending itself answers).
    pub unsolicited_dns: u64,
    /// DNS queries the pod sent (what answers must match).
    pub dns_queries: u64,
    /// DNS answers from a resolver that is not trusted (inside the pod, or arrived over its
    /// loopback) that named an address no trusted answer did: not used to name anything.
    pub uncorroborated_dns: u64,
    /// Of those, answers that contradict what a trusted resolver answered the pod for the same
    /// name (reported as suspicious).
    pub contradicting_dns: u64,
    /// Destinations whose record was lost, recovered from the kernel's dedupe table.
    pub recovered: u64,
    /// Calls waiting for their cgroup to appear in the index.
    pub pending: u64,
    /// Calls dropped because too many were waiting.
    pub pending_dropped: u64,
}

/// Settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// TTL floor and cap of names.
    pub ttl: TtlBounds,
    /// Addresses kept per pod.
    pub max_addresses: usize,
    /// Wall-clock time at boot: kernel timestamps are nanoseconds since boot.
    pub boot_time: SystemTime,
    /// Attribute calls to pods through a cgroup index (the node agent); `false` in trace mode.
    pub attribute_pods: bool,
    /// Calls kept while their cgroup is not yet in the index.
    pub max_pending: usize,
    /// The resolvers whose answers name destinations (`None`: any the pod queried, as in trace
    /// mode). Answers from others, or arriving over the pod's loopback or another interface
    /// than its uplink whatever their source, name nothing unless a trusted answer agrees.
    pub trusted_resolvers: Option<Vec<IpAddr>>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            ttl: TtlBounds::default(),
            max_addresses: 4096,
            boot_time: boot_time(),
            attribute_pods: false,
            max_pending: 100_000,
            trusted_resolvers: None,
        }
    }
}

/// Wall-clock time of boot, from CLOCK_BOOTTIME (the clock of `bpf_ktime_get_boot_ns`).
pub fn boot_time() -> SystemTime {
    let since_boot = since_boot();
    SystemTime::now().checked_sub(since_boot).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// CLOCK_BOOTTIME now.
pub fn since_boot() -> Duration {
    clock(libc::CLOCK_BOOTTIME)
}

/// A clock's time (zero if the clock cannot be read).
pub(crate) fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    #[allow(unsafe_code, reason = "clock_gettime writes the timespec it is given")]
    // SAFETY: a valid pointer to a timespec on our stack.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Debug)]
struct Count {
    /// The kernel's total last seen for the key.
    kernel_total: u64,
    calls: u64,
    last: Observation,
}

/// An answer from an untrusted resolver that contradicts a trusted one: what forging looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuspiciousDns {
    /// The pod cgroup that received it.
    pub pod_cgroup_id: u64,
    /// The server it claims to come from.
    pub server: IpAddr,
    /// Whether it arrived over the pod's loopback.
    pub loopback: bool,
    /// Whether it arrived on another interface than the one the pod's first trusted answer
    /// came in on (its uplink): a bridge inside the pod, such as Docker's.
    pub other_interface: bool,
    /// The name.
    pub name: String,
    /// What the untrusted answer said.
    pub claimed: Vec<IpAddr>,
    /// What trusted resolvers answered the pod.
    pub trusted: Vec<IpAddr>,
}

/// Suspicious answers kept until the agent takes them.
const MAX_SUSPICIOUS: usize = 256;
/// How long a query waits for its answer (resolvers retry well within it).
pub const QUERY_WAIT: Duration = Duration::from_secs(30);
/// Unanswered queries kept per pod; past it the oldest is forgotten (its answer, if it comes,
/// names nothing), so a pod's flood of queries costs only its own names.
pub const MAX_QUERIES_PER_POD: usize = 256;

/// Uplinks restored after a restart, at most (pods that ended while the agent was away are
/// among them until forgotten).
pub const MAX_UPLINKS: usize = 4096;

/// A query a pod sent, waiting for its answer.
#[derive(Debug)]
struct Pending {
    at_ns: u64,
    server: IpAddr,
    client_port: u16,
    query: dns::Query,
}

/// The pipeline's state.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    names: HashMap<u64, DnsCache>,
    /// Queries each pod sent that await their answer, oldest first: answers are taken only
    /// when they match one.
    queries: HashMap<u64, VecDeque<Pending>>,
    /// Each pod's uplink: the interface its first trusted answer arrived on (before any job
    /// code runs: the runner registers, and init containers resolve, first). Trusted answers
    /// arriving on another (a bridge a nested container sits behind) are not believed.
    uplinks: HashMap<u64, u32>,
    /// Whether `uplinks` changed since [`Pipeline::take_changed_uplinks`].
    uplinks_changed: bool,
    /// pid → the program it executed last.
    executables: HashMap<u32, String>,
    counts: HashMap<DedupeKey, Count>,
    index: CgroupIndex,
    pending: VecDeque<(Call, Names)>,
    /// Timestamp of the newest record read.
    newest_record_ns: u64,
    stats: PipelineStats,
    suspicious: Vec<SuspiciousDns>,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new(config: PipelineConfig) -> Self {
        Self {
            config,
            names: HashMap::new(),
            queries: HashMap::new(),
            uplinks: HashMap::new(),
            uplinks_changed: false,
            executables: HashMap::new(),
            counts: HashMap::new(),
            index: CgroupIndex::default(),
            pending: VecDeque::new(),
            newest_record_ns: 0,
            stats: PipelineStats::default(),
            suspicious: Vec::new(),
        }
    }

    /// Decodes and handles one ring-buffer record; an observation when it was a call that
    /// could be attributed now.
    pub fn record(&mut self, bytes: &[u8]) -> Option<Observation> {
        match events::decode(bytes) {
            Ok(record) => self.handle(record),
            Err(_) => {
                self.stats.undecodable += 1;
                None
            }
        }
    }

    /// Handles one decoded record.
    pub fn handle(&mut self, record: Record) -> Option<Observation> {
        let at = match &record {
            Record::Call(c) => c.timestamp_ns,
            Record::Dns(d) => d.timestamp_ns,
            Record::Exec(e) => e.timestamp_ns,
        };
        self.newest_record_ns = self.newest_record_ns.max(at);
        match record {
            Record::Dns(query) if query.query => {
                self.dns_query(&query);
                None
            }
            Record::Dns(answer) => {
                self.dns(&answer);
                None
            }
            Record::Exec(exec) => {
                if self.executables.len() >= MAX_EXECUTABLES && !self.executables.contains_key(&exec.pid) {
                    // Bounded: forget an arbitrary one (processes that ended leave theirs).
                    if let Some(pid) = self.executables.keys().next().copied() {
                        self.executables.remove(&pid);
                    }
                }
                self.executables.insert(exec.pid, exec.path);
                None
            }
            Record::Call(call) => {
                self.stats.calls += 1;
                let hosts = self.hosts(&call);
                let pod = if self.config.attribute_pods {
                    match self.index.get(call.cgroup_id) {
                        Some(pod) => Some(pod.clone()),
                        None => {
                            self.park(call, hosts);
                            return None;
                        }
                    }
                } else {
                    None
                };
                Some(self.observe(call, hosts, pod))
            }
        }
    }

    /// A query the pod sent: kept (bounded) until its answer comes or [`QUERY_WAIT`] passes.
    fn dns_query(&mut self, query: &DnsMessage) {
        let Ok(parsed) = dns::parse_query(&query.message) else { return };
        self.stats.dns_queries += 1;
        let pending = self.queries.entry(query.pod_cgroup_id).or_default();
        let wait = QUERY_WAIT.as_nanos() as u64;
        while pending.front().is_some_and(|p| p.at_ns + wait < query.timestamp_ns) {
            pending.pop_front();
        }
        if pending.len() >= MAX_QUERIES_PER_POD {
            pending.pop_front();
        }
        pending.push_back(Pending {
            at_ns: query.timestamp_ns,
            server: query.server,
            client_port: query.client_port,
            query: parsed,
        });
    }

    /// Whether `answer` matches a query its pod sent (same server, port, transaction id and
    /// question, within [`QUERY_WAIT`]); the query is answered then.
    fn answers_a_query(&mut self, answer: &DnsMessage, message: &dns::Message) -> bool {
        let Some(pending) = self.queries.get_mut(&answer.pod_cgroup_id) else { return false };
        let wait = QUERY_WAIT.as_nanos() as u64;
        let found = pending.iter().position(|p| {
            p.server == answer.server
                && p.client_port == answer.client_port
                && p.query.id == message.id
                && p.query.questions == message.questions
                && p.at_ns <= answer.timestamp_ns
                && answer.timestamp_ns <= p.at_ns + wait
        });
        found.and_then(|i| pending.remove(i)).is_some()
    }

    /// A DNS answer the agent's own resolver gave the block-mode pod `pod_cgroup_id`: it names
    /// the pod's calls like a trusted resolver's answer (the agent asked the upstream itself).
    pub fn resolver_answer(&mut self, pod_cgroup_id: u64, reply: &[u8]) {
        let Ok(message) = dns::parse(reply) else { return };
        self.stats.dns_answers += 1;
        let (ttl, max) = (self.config.ttl, self.config.max_addresses);
        let cache = self.names.entry(pod_cgroup_id).or_insert_with(|| DnsCache::new(ttl, max));
        cache.insert(&message, since_boot().as_secs());
    }

    fn dns(&mut self, answer: &DnsMessage) {
        self.stats.dns_answers += 1;
        let whole = answer.length as usize <= answer.message.len();
        let parsed = if whole { dns::parse(&answer.message) } else { dns::parse_prefix(&answer.message) };
        let message = match parsed {
            Ok(message) => message,
            Err(_) => {
                self.stats.malformed_dns += 1;
                return;
            }
        };
        if !self.answers_a_query(answer, &message) {
            self.stats.unsolicited_dns += 1;
            return;
        }
        let now = answer.timestamp_ns / 1_000_000_000;
        let mut other_interface = false;
        let trusted = match &self.config.trusted_resolvers {
            None => true,
            Some(list) if answer.loopback() || !list.contains(&answer.server) => false,
            Some(_) => {
                let uplink = *self.uplinks.entry(answer.pod_cgroup_id).or_insert_with(|| {
                    self.uplinks_changed = true;
                    answer.ifindex
                });
                other_interface = uplink != answer.ifindex;
                !other_interface
            }
        };
        let (ttl, max) = (self.config.ttl, self.config.max_addresses);
        let cache = self.names.entry(answer.pod_cgroup_id).or_insert_with(|| DnsCache::new(ttl, max));
        if trusted {
            cache.insert(&message, now);
            return;
        }
        // A resolver inside the pod (a process's own server, Docker's embedded resolver) names
        // nothing by itself: what it says counts only where a trusted answer already said it
        // (Docker's resolver forwards to the pod's, whose answer the pod received too).
        let mut claimed: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for res in dns::resolutions(&message) {
            if let Some(name) = res.names.first() {
                claimed.entry(name.clone()).or_default().push(res.ip);
            }
        }
        let mut contradicted = false;
        let mut uncorroborated = false;
        for (name, ips) in claimed {
            let known = cache.addresses(&name, now);
            if ips.iter().all(|ip| known.contains(ip)) {
                continue;
            }
            uncorroborated = true;
            if !known.is_empty() {
                contradicted = true;
                if self.suspicious.len() < MAX_SUSPICIOUS {
                    self.suspicious.push(SuspiciousDns {
                        pod_cgroup_id: answer.pod_cgroup_id,
                        server: answer.server,
                        loopback: answer.loopback(),
                        other_interface,
                        name,
                        claimed: ips,
                        trusted: known,
                    });
                }
            }
        }
        self.stats.uncorroborated_dns += u64::from(uncorroborated);
        self.stats.contradicting_dns += u64::from(contradicted);
    }

    /// Takes the suspicious answers seen since the last call.
    pub fn take_suspicious(&mut self) -> Vec<SuspiciousDns> {
        std::mem::take(&mut self.suspicious)
    }

    fn hosts(&self, call: &Call) -> Names {
        self.names
            .get(&call.pod_cgroup_id)
            .map(|cache| {
                let (names, questions) = cache.names(call.ip, call.timestamp_ns / 1_000_000_000);
                (names.into_iter().map(str::to_owned).collect(), questions)
            })
            .unwrap_or_default()
    }

    fn park(&mut self, call: Call, hosts: Names) {
        if self.pending.len() >= self.config.max_pending {
            self.pending.pop_front();
            self.stats.pending_dropped += 1;
        }
        self.pending.push_back((call, hosts));
        self.stats.pending = self.pending.len() as u64;
    }

    fn observe(&mut self, call: Call, (hosts, questions): Names, pod: Option<Arc<PodCgroup>>) -> Observation {
        let observation = Observation {
            time: self.config.boot_time + Duration::from_nanos(call.timestamp_ns),
            pid: call.pid,
            process: call.comm,
            executable: self.executables.get(&call.pid).cloned(),
            cgroup_id: call.cgroup_id,
            pod_cgroup_id: call.pod_cgroup_id,
            pod,
            ip: call.ip,
            port: call.port,
            proto: call.proto,
            hook: call.hook,
            verdict: call.verdict,
            hosts,
            questions,
        };
        match self.counts.get_mut(&call.key) {
            Some(count) => {
                if call.first {
                    // A new entry in the kernel's table (the old one was evicted, or dedupe is off).
                    count.calls += call.total;
                    count.kernel_total = call.total;
                } else {
                    count.calls += call.total.saturating_sub(count.kernel_total);
                    count.kernel_total = count.kernel_total.max(call.total);
                }
                count.last.update_from(&observation);
            }
            None => {
                let count = Count { kernel_total: call.total, calls: call.total, last: observation.clone() };
                self.counts.insert(call.key, count);
            }
        }
        observation
    }

    /// Takes the kernel's dedupe table ([`crate::ebpf::Probes::dedupe_table`]): calls folded
    /// since the last record of each destination are added to its count, and a destination
    /// whose record was lost (the ring buffer was full) is recovered from the table and
    /// returned as an observation (hook unknown, no process), so no destination goes unseen.
    ///
    /// `read_up_to_ns` (CLOCK_BOOTTIME, see [`since_boot`]): every record written before it has
    /// been read, e.g. the time taken before a drain of the ring buffer that ended empty.
    pub fn totals(&mut self, table: &[(DedupeKey, DedupeValue)], read_up_to_ns: u64) -> Vec<Observation> {
        let read_up_to = self.newest_record_ns.max(read_up_to_ns);
        let parked: HashSet<DedupeKey> = self.pending.iter().map(|(call, _)| call.key).collect();
        let mut recovered = Vec::new();
        for (key, value) in table {
            if let Some(count) = self.counts.get_mut(key) {
                if value.total > count.kernel_total {
                    count.calls += value.total - count.kernel_total;
                    count.kernel_total = value.total;
                }
                continue;
            }
            // Records are read in the order they were written: once everything written well
            // after this entry's last record has been read, that record is not coming (it was
            // lost, or is parked waiting for its cgroup). Until then it may be on its way.
            let settled = value.last_event_ns.saturating_add(SETTLE_NS) < read_up_to;
            if !settled || parked.contains(key) {
                continue;
            }
            if let Some(call) = events::call_from_table(key, value) {
                self.stats.recovered += 1;
                recovered.extend(self.handle(Record::Call(call)));
            }
        }
        recovered
    }

    /// Replaces the cgroup index after a scan, and attributes the calls that were waiting for
    /// their cgroup; calls whose cgroup is still unknown keep waiting.
    pub fn set_index(&mut self, index: CgroupIndex) -> Vec<Observation> {
        self.index = index;
        let waiting = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        for (call, hosts) in waiting {
            match self.index.get(call.cgroup_id).cloned() {
                Some(pod) => out.push(self.observe(call, hosts, Some(pod))),
                None => self.pending.push_back((call, hosts)),
            }
        }
        self.stats.pending = self.pending.len() as u64;
        out
    }

    /// Whether calls are waiting for their cgroup: time for a rescan
    /// ([`crate::cgroups::Rescanner::poll`] with `urgent`).
    pub fn wants_rescan(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Calls per cgroup and destination so far.
    pub fn calls(&self) -> Vec<CallCount> {
        let mut out: Vec<CallCount> =
            self.counts.values().map(|c| CallCount { last: c.last.clone(), calls: c.calls }).collect();
        out.sort_by_key(|c| (c.last.time, c.last.ip, c.last.port));
        out
    }

    /// Forgets a pod's names and counts (it ended).
    pub fn forget_pod(&mut self, pod_cgroup_id: u64) {
        self.names.remove(&pod_cgroup_id);
        self.queries.remove(&pod_cgroup_id);
        self.uplinks_changed |= self.uplinks.remove(&pod_cgroup_id).is_some();
        self.counts.retain(|_, c| c.last.pod_cgroup_id != pod_cgroup_id);
    }

    /// Each pod's uplink (pod cgroup id → interface index), when it changed since the last
    /// call: the agent keeps them in its state directory, so that after a restart a pod's
    /// uplink is not learned again from answers a job may arrange.
    pub fn take_changed_uplinks(&mut self) -> Option<HashMap<u64, u32>> {
        std::mem::take(&mut self.uplinks_changed).then(|| self.uplinks.clone())
    }

    /// Restores the uplinks kept before a restart (at most [`MAX_UPLINKS`]).
    pub fn restore_uplinks(&mut self, uplinks: HashMap<u64, u32>) {
        self.uplinks.extend(uplinks.into_iter().take(MAX_UPLINKS));
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> PipelineStats {
        self.stats
    }
}
