//! Loads the kernel programs (built by `build.rs` from `node-agent-ebpf/programs`), attaches them
//! to the cgroups it is told to watch (each pod that may hold a runner, or the cgroup `trace`
//! follows; nothing else on the node runs them), and gives the agent their maps: which
//! cgroups are monitored, the settings, the counters, the dedupe table and the ring buffer of
//! records.

#![allow(
    unsafe_code,
    reason = "aya::Pod marks the shared #[repr(C)] types as plain bytes; epoll on the ring buffer; BPF_PROG_QUERY"
)]

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbAttachType;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSockAddr, SockOps};
use aya::{Btf, Ebpf, EbpfLoader};
use runwarden_ebpf_common::{
    ALLOW_KEY_FIXED_BITS, ARMED, AllowKey, AllowValue, Budget, ClientKey, Config, DedupeKey, DedupeValue,
    ENFORCE_BLOCK, ENFORCE_FAIL_OPEN, FAMILY_IPV4, FAMILY_IPV6, MAX_LEVEL, MAX_POD_PARENTS, MONITOR, NAME_BYTES,
    PROTO_TCP, PROTO_UDP, RECENT_SLOTS, RecentCall, names, stats,
};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::events::Proto;

/// The kernel object, built for this agent.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/runwarden.bpf.o"));

/// How often the reader drains the ring buffer when the kernel has not woken it (it wakes the
/// reader itself only once the buffer holds 1 MiB).
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

#[repr(transparent)]
#[derive(Clone, Copy)]
struct Key(DedupeKey);
// SAFETY: #[repr(C)], fixed-width fields, explicit padding: any bytes are a valid value.
unsafe impl aya::Pod for Key {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct Value(DedupeValue);
// SAFETY: as above.
unsafe impl aya::Pod for Value {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct Recent(RecentCall);
// SAFETY: as above.
unsafe impl aya::Pod for Recent {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct Client(ClientKey);
// SAFETY: as above.
unsafe impl aya::Pod for Client {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct AllowData(AllowKey);
// SAFETY: as above.
unsafe impl aya::Pod for AllowData {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct AllowEntry(AllowValue);
// SAFETY: as above.
unsafe impl aya::Pod for AllowEntry {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct BudgetValue(Budget);
// SAFETY: as above.
unsafe impl aya::Pod for BudgetValue {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct Settings(Config);
// SAFETY: as above.
unsafe impl aya::Pod for Settings {}

/// Why the programs could not be loaded or attached, worded for the person running the agent.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Loading BPF programs needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN).
    #[error(
        "loading BPF programs needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (in Kubernetes: the agent's securityContext.capabilities.add){}",
        if .0.is_empty() { String::new() } else { format!("; missing: {}", .0.join(", ")) }
    )]
    NotPermitted(Vec<&'static str>),
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo for a `cgroup2` mount; \
         /sys/fs/cgroup on most nodes, /sys/fs/cgroup/unified on hybrid hosts)"
    )]
    NoCgroup2,
    /// The kernel has no BPF, or refused the programs.
    #[error(
        "the kernel refused runwarden's BPF programs (it needs cgroup v2 BPF hooks and ring buffers, Linux 5.8 or newer): {0}"
    )]
    Unsupported(String),
    /// The cgroup to attach to or to monitor.
    #[error("{path}: {source}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

fn refused(e: impl std::error::Error) -> LoadError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    if text.contains("Operation not permitted") || text.contains("os error 1)") {
        return LoadError::NotPermitted(missing_capabilities());
    }
    // A verifier log is long: its last lines say what was refused.
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > 12 {
        text = format!("{}\n  ...\n{}", lines[0], lines[lines.len() - 10..].join("\n"));
    }
    LoadError::Unsupported(text)
}

/// The capabilities the programs need that this process's effective set lacks: CAP_BPF,
/// CAP_PERFMON (pointer arithmetic in the verifier) and CAP_NET_ADMIN (cgroup attach);
/// CAP_SYS_ADMIN stands in for the first two.
pub fn missing_capabilities() -> Vec<&'static str> {
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    let Some(effective) = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("CapEff:").and_then(|v| u64::from_str_radix(v.trim(), 16).ok()))
    }) else {
        return Vec::new();
    };
    let has = |bit: u32| effective & (1 << bit) != 0;
    let mut missing = Vec::new();
    if !has(BPF) && !has(SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(PERFMON) && !has(SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` when it is there (real nodes),
/// else the first `cgroup2` mount (`/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, LoadError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|_| LoadError::NoCgroup2)?;
    let mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(unescape))?
        })
        .collect();
    mounts
        .iter()
        .find(|m| m.as_path() == Path::new("/sys/fs/cgroup"))
        .or(mounts.first())
        .cloned()
        .ok_or(LoadError::NoCgroup2)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// What to load.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cgroup v2 mount (see [`cgroup2_mount`]).
    pub mount: PathBuf,
    /// Repeated calls from one cgroup to one destination within this window are counted, not
    /// reported; zero reports every call.
    pub dedupe_window: Duration,
    /// Each pod's record budget.
    pub pod_budget: PodBudget,
    /// A directory on the BPF filesystem where block mode's state is kept across restarts
    /// (`None`: nothing outlives the process). See [`Probes::load`].
    pub pin_dir: Option<PathBuf>,
}

/// How many records one pod may write into the ring buffer all pods share: a token bucket per
/// pod in the kernel. Past it the pod's records are counted (per pod, see
/// [`Probes::throttled`]), not written; its calls stay in the dedupe table, where the agent
/// finds them, so one pod's flood costs others nothing and itself only delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodBudget {
    /// Records per second, sustained.
    pub per_second: u32,
    /// Records in a burst.
    pub burst: u32,
}

impl PodBudget {
    /// No budget: every pod may write as much as the ring buffer takes.
    pub const OFF: PodBudget = PodBudget { per_second: 0, burst: 0 };
}

impl Default for PodBudget {
    /// 2,000 records a second, bursts of 4,096: far above a CI job's distinct destinations and
    /// DNS answers per second (the dedupe folds repeats), and a tenth of the ring buffer.
    fn default() -> Self {
        PodBudget { per_second: 2_000, burst: 4_096 }
    }
}

/// The kernel's table of what block-mode pods may call (`ALLOW`), and the names its entries
/// from DNS answers were for (`NAMES`), shared.
#[derive(Clone)]
pub struct AllowList(std::sync::Arc<std::sync::Mutex<AllowMaps>>);

struct AllowMaps {
    trie: LpmTrie<MapData, AllowData, AllowEntry>,
    names: BpfHashMap<MapData, u64, [u8; NAME_BYTES]>,
}

/// One kernel entry an address from a DNS answer put in `ALLOW`: a pod may call `ip` over
/// `protocol` on `port` (0: every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedKey {
    /// The answer's address.
    pub ip: IpAddr,
    /// The protocol it may be called over.
    pub protocol: Proto,
    /// The port, or 0: every port.
    pub port: u16,
}

impl ResolvedKey {
    fn trie_key(&self, pod: u64) -> aya::maps::lpm_trie::Key<AllowData> {
        let (family, addr) = crate::events::to_wire(self.ip);
        let protocol = if self.protocol == Proto::Tcp { PROTO_TCP } else { PROTO_UDP };
        let bits = if family == FAMILY_IPV4 { 32 } else { 128 };
        let data = AllowKey { pod: pod.to_ne_bytes(), family, protocol, port: self.port.to_be_bytes(), addr };
        aya::maps::lpm_trie::Key::new(ALLOW_KEY_FIXED_BITS + bits, AllowData(data))
    }
}

/// An entry from a DNS answer, as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEntry {
    /// The pod cgroup it allows.
    pub pod: u64,
    /// What it allows.
    pub key: ResolvedKey,
    /// When it stops allowing (CLOCK_MONOTONIC, ns).
    pub expires_ns: u64,
    /// The name whose answer it came from, if known.
    pub name: Option<String>,
}

/// The key of `name` in `NAMES` (never 0, which marks a policy's range).
pub fn name_key(name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    hash.max(1)
}

/// CLOCK_MONOTONIC now in nanoseconds, the clock `ALLOW` entries expire by.
pub fn monotonic_ns() -> u64 {
    u64::try_from(crate::pipeline::clock(libc::CLOCK_MONOTONIC).as_nanos()).unwrap_or(u64::MAX)
}

impl AllowList {
    fn maps(&self) -> std::sync::MutexGuard<'_, AllowMaps> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets the pod cgroup `pod` call `allowed`.
    pub fn allow(&self, pod: u64, allowed: &Allowed) -> Result<(), LoadError> {
        let expires_ns = match allowed.ttl {
            None => 0,
            // CLOCK_MONOTONIC (the programs read its coarse variant, at most a tick behind).
            Some(ttl) => monotonic_ns().saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)),
        };
        let mut maps = self.maps();
        for key in allowed.keys(pod) {
            maps.trie.insert(&key, AllowEntry(AllowValue { expires_ns, name: 0 }), 0).map_err(refused)?;
        }
        Ok(())
    }

    /// Lets the pod cgroup `pod` make the call `key` until `expires_ns` (CLOCK_MONOTONIC), for an
    /// answer about `name`.
    pub fn allow_resolved(&self, pod: u64, name: &str, key: ResolvedKey, expires_ns: u64) -> Result<(), LoadError> {
        let id = name_key(name);
        let mut maps = self.maps();
        let mut bytes = [0u8; NAME_BYTES];
        let len = name.len().min(NAME_BYTES - 1);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        // A name not kept is a name the next agent does not know: it then takes the address
        // back at the first change of the pod's policy, not later.
        let _ = maps.names.insert(id, bytes, 0);
        maps.trie.insert(&key.trie_key(pod), AllowEntry(AllowValue { expires_ns, name: id }), 0).map_err(refused)
    }

    /// Takes back what [`Self::allow`] allowed.
    pub fn disallow(&self, pod: u64, allowed: &Allowed) -> Result<(), LoadError> {
        let mut maps = self.maps();
        for key in allowed.keys(pod) {
            let _ = maps.trie.remove(&key);
        }
        Ok(())
    }

    /// Takes back what [`Self::allow_resolved`] allowed; with `if_expires_ns`, only if the entry
    /// is still that one (no later answer has renewed it).
    pub fn take_back(&self, pod: u64, key: ResolvedKey, if_expires_ns: Option<u64>) {
        let mut maps = self.maps();
        let trie_key = key.trie_key(pod);
        if let Some(expected) = if_expires_ns
            && maps.trie.get(&trie_key, 0).is_ok_and(|v| v.0.expires_ns != expected)
        {
            return;
        }
        let _ = maps.trie.remove(&trie_key);
    }

    /// Takes back the pod cgroup `pod`'s ranges (entries for good) that are not `ranges`: what
    /// an earlier agent allowed under a policy that has changed since.
    pub fn keep_only_ranges(&self, pod: u64, ranges: &[Allowed]) {
        let wanted: Vec<(u32, AllowKey)> =
            ranges.iter().flat_map(|r| r.keys(pod)).map(|k| (k.prefix_len(), k.data().0)).collect();
        let mut maps = self.maps();
        let pod = pod.to_ne_bytes();
        let stale: Vec<_> = maps
            .trie
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.data().0.pod == pod && v.0.expires_ns == 0)
            .map(|(k, _)| k)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data().0)))
            .collect();
        for key in stale {
            let _ = maps.trie.remove(&key);
        }
    }

    /// Takes back everything the pod cgroup `pod` was allowed.
    pub fn disallow_all(&self, pod: u64) -> Result<(), LoadError> {
        let mut maps = self.maps();
        let pod = pod.to_ne_bytes();
        let keys: Vec<_> = maps.trie.keys().filter_map(Result::ok).filter(|k| k.data().0.pod == pod).collect();
        for key in keys {
            let _ = maps.trie.remove(&key);
        }
        Ok(())
    }

    /// The entries from DNS answers (expired ones too, until taken out), with their names
    /// where `NAMES` has them: what a restarted agent learns of what the one before it resolved.
    pub fn resolved(&self) -> Vec<ResolvedEntry> {
        let maps = self.maps();
        let mut found = Vec::new();
        for (key, value) in maps.trie.iter().filter_map(Result::ok) {
            let (k, v) = (key.data().0, value.0);
            if v.expires_ns == 0 {
                continue;
            }
            let ip = if k.family == FAMILY_IPV4 {
                IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
            } else {
                IpAddr::from(k.addr)
            };
            let protocol = if k.protocol == PROTO_TCP { Proto::Tcp } else { Proto::Udp };
            let name = maps.names.get(&v.name, 0).ok().and_then(|bytes| {
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(NAME_BYTES);
                std::str::from_utf8(&bytes[..end]).ok().map(str::to_string)
            });
            found.push(ResolvedEntry {
                pod: u64::from_ne_bytes(k.pod),
                key: ResolvedKey { ip, protocol, port: u16::from_be_bytes(k.port) },
                expires_ns: v.expires_ns,
                name,
            });
        }
        found
    }

    /// Forgets the names (by [`name_key`]) not in `live`.
    pub fn keep_names(&self, live: &std::collections::HashSet<u64>) {
        let mut maps = self.maps();
        let stale: Vec<u64> = maps.names.keys().filter_map(Result::ok).filter(|k| !live.contains(k)).collect();
        for key in stale {
            let _ = maps.names.remove(&key);
        }
    }
}

/// The kernel's record of which pod sent each query to the agent's resolver (`CLIENTS`),
/// shared with the resolver.
#[derive(Clone)]
pub struct Clients(std::sync::Arc<std::sync::Mutex<BpfHashMap<MapData, Client, u64>>>);

impl Clients {
    /// The pod cgroup that sent a query from `from` over `protocol`, if a block-mode pod did.
    pub fn pod_of(&self, from: std::net::SocketAddr, protocol: Proto) -> Option<u64> {
        let mut addr = [0; 16];
        let family = match from.ip().to_canonical() {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                FAMILY_IPV4
            }
            IpAddr::V6(v6) => {
                addr = v6.octets();
                FAMILY_IPV6
            }
        };
        let protocol = if protocol == Proto::Tcp { PROTO_TCP } else { PROTO_UDP };
        let key = Client(ClientKey { addr, port: from.port(), protocol, family });
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key, 0).ok()
    }
}

/// Where block-mode pods reach the agent's resolver: one port, on an IPv4 address, an IPv6
/// address or both (queries to IPv6 servers go to `::ffff:` the IPv4 address when there is no
/// IPv6 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolverAddress {
    /// Where queries to IPv4 servers go.
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// Where queries to IPv6 servers go.
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// UDP and TCP.
    pub port: u16,
}

/// Destinations a pod in block mode may call: an address range, over one protocol or both, on
/// some ports or every port, for a while or for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The range's first address.
    pub addr: IpAddr,
    /// Its prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
    /// `None`: TCP and UDP.
    pub protocol: Option<Proto>,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// For how long from now: an address from a DNS answer, for its TTL; `None`: until taken
    /// back.
    pub ttl: Option<Duration>,
}

impl Allowed {
    /// The trie's keys for this entry: one per protocol and port.
    fn keys(&self, pod: u64) -> Vec<aya::maps::lpm_trie::Key<AllowData>> {
        let (family, addr) = crate::events::to_wire(self.addr);
        let prefix = u32::from(self.prefix).min(if family == FAMILY_IPV4 { 32 } else { 128 });
        let protocols: &[u8] = match self.protocol {
            Some(Proto::Tcp) => &[PROTO_TCP],
            Some(Proto::Udp) => &[PROTO_UDP],
            None => &[PROTO_TCP, PROTO_UDP],
        };
        let ports: &[u16] = if self.ports.is_empty() { &[0] } else { &self.ports };
        let mut keys = Vec::with_capacity(protocols.len() * ports.len());
        for &protocol in protocols {
            for &port in ports {
                let data = AllowKey { pod: pod.to_ne_bytes(), family, protocol, port: port.to_be_bytes(), addr };
                keys.push(aya::maps::lpm_trie::Key::new(ALLOW_KEY_FIXED_BITS + prefix, AllowData(data)));
            }
        }
        keys
    }
}

/// The kernel's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Call records lost because the ring buffer was full.
    pub lost_calls: u64,
    /// DNS answers lost because the ring buffer was full.
    pub lost_dns: u64,
    /// Call records written.
    pub call_events: u64,
    /// Calls counted in the dedupe table without a record.
    pub calls_folded: u64,
    /// DNS answers written.
    pub dns_events: u64,
    /// DNS answers longer than the capture, written cut.
    pub dns_cut: u64,
    /// Exec records lost because the ring buffer was full.
    pub lost_exec: u64,
    /// Records not written because their pod's budget was spent.
    pub throttled: u64,
}

/// A link of a program to a cgroup: held by this process (detached when dropped), or pinned on
/// the BPF filesystem (attached until unpinned, whatever happens to the process).
enum Held {
    Attached(FdLink),
    Pinned(PinnedLink),
}

/// The programs attached to one cgroup; dropping it detaches those not pinned.
struct CgroupLinks {
    dir: PathBuf,
    /// Program name and link: [`names::PROGRAMS`], then [`names::BLOCK_PROGRAMS`] while the
    /// pod is in block mode.
    links: Vec<(&'static str, Held)>,
}

/// The links of a block-mode pod pinned by an agent before this one, by cgroup id.
type Inherited = HashMap<u64, Vec<(PathBuf, PinnedLink)>>;

/// The layout of the kernel's maps (a hash the build script takes of the types and map
/// definitions the programs and the agent share): block mode's pinned maps are shared with
/// agents of builds with the same layout only, so an upgrade that changes none of them hands
/// over every pod's allowed addresses as a restart does.
fn maps_layout() -> &'static str {
    env!("RUNWARDEN_MAPS_LAYOUT")
}

/// Block mode's maps, kept on the BPF filesystem so that a restarted agent's programs and the
/// programs its predecessor pinned share them.
const PINNED_MAPS: [&str; 5] = [names::CONFIG, names::POLICIES, names::ALLOW, names::NAMES, names::REDIRECTED];

/// The kernel's attach types of [`names::PROGRAMS`], then of [`names::BLOCK_PROGRAMS`], in
/// that order (`enum bpf_attach_type`: `BPF_CGROUP_INET_INGRESS`, `..._INET_EGRESS`,
/// `BPF_CGROUP_SOCK_OPS`; `BPF_CGROUP_INET4_CONNECT`, `..._INET6_CONNECT`,
/// `BPF_CGROUP_UDP4_SENDMSG`, `..._UDP6_SENDMSG`, `BPF_CGROUP_UDP4_RECVMSG`, `..._UDP6_RECVMSG`,
/// `BPF_CGROUP_INET4_GETPEERNAME`, `..._INET6_GETPEERNAME`).
const ATTACH_TYPES: [u32; 3] = [0, 1, 3];
const BLOCK_ATTACH_TYPES: [u32; 8] = [10, 11, 14, 15, 19, 20, 29, 30];

/// What [`Probes::check_pods`] found wrong with an armed pod's kernel state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tampered {
    /// The pod's cgroup id.
    pub id: u64,
    /// Its cgroup.
    pub dir: PathBuf,
    /// The programs no longer attached to it, by name.
    pub detached: Vec<&'static str>,
    /// Whether its mark was gone from the monitored set, or its block mode from the
    /// enforced set.
    pub unmarked: bool,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Probes {
    bpf: Ebpf,
    mount: PathBuf,
    /// Monitored cgroup id → its level in the tree.
    monitored: HashMap<u64, u32>,
    /// cgroup id → the programs attached to it.
    links: HashMap<u64, CgroupLinks>,
    /// The kernel's ids of [`names::PROGRAMS`], then of [`names::BLOCK_PROGRAMS`], in that
    /// order.
    program_ids: Vec<u32>,
    /// Pods in block mode, with their `POLICIES` value (`ENFORCE_*`).
    blocking: HashMap<u64, u32>,
    allow_list: AllowList,
    clients: Clients,
    /// Where block mode's state is pinned: `<pin dir>/<object version>`.
    pins: Option<PathBuf>,
    /// Links pinned by earlier agents, let go once this agent's own are attached.
    inherited: Inherited,
    /// Names this process's pins apart from earlier agents' (its start, in ns since the epoch).
    instance: u128,
    config: Config,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").field("mount", &self.mount).field("monitored", &self.monitored).finish()
    }
}

impl Probes {
    /// Loads the programs (and the node-wide exec tracepoint). Nothing runs them until a cgroup
    /// is [monitored](Self::monitor) or a pod [armed](Self::arm_pod).
    pub fn load(options: &Options) -> Result<Self, LoadError> {
        // Without them the kernel answers with EPERM, or with a verifier message about
        // pointer arithmetic: say what is missing instead.
        let lacking = missing_capabilities();
        if !lacking.is_empty() {
            return Err(LoadError::NotPermitted(lacking));
        }
        let pins = match &options.pin_dir {
            Some(dir) => {
                let pins = dir.join(maps_layout());
                std::fs::create_dir_all(pins.join("links")).map_err(|e| {
                    LoadError::Unsupported(format!(
                        "block mode keeps its state in {}: {e} (it must be on the BPF filesystem: the node's /sys/fs/bpf, \
                         mounted into the agent's container)",
                        pins.display()
                    ))
                })?;
                Some(pins)
            }
            None => None,
        };
        let mut loader = EbpfLoader::new();
        if let Some(pins) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, pins.join(name));
            }
        }
        let mut bpf = loader.load(OBJECT).map_err(|e| match &pins {
            Some(p) => LoadError::Unsupported(format!(
                "loading the programs with block mode's state in {}: {e} (it must be on the BPF filesystem)",
                p.display()
            )),
            None => refused(e),
        })?;
        for name in &names::PROGRAMS[..2] {
            program::<CgroupSkb>(&mut bpf, name)?.load().map_err(refused)?;
        }
        program::<SockOps>(&mut bpf, names::PROGRAMS[2])?.load().map_err(refused)?;
        for name in names::BLOCK_PROGRAMS {
            program::<CgroupSockAddr>(&mut bpf, name)?.load().map_err(refused)?;
        }
        let mut program_ids = Vec::with_capacity(names::PROGRAMS.len() + names::BLOCK_PROGRAMS.len());
        for name in names::PROGRAMS.into_iter().chain(names::BLOCK_PROGRAMS) {
            program_ids.push(bpf.program(name).ok_or_else(|| missing(name))?.info().map_err(refused)?.id());
        }
        let exec_filename_offset = attach_exec(&mut bpf).unwrap_or(0);
        // Pods an earlier agent put in block mode stay so until this one decides otherwise.
        let blocking: HashMap<u64, u32> = match &pins {
            Some(_) => {
                let policies: BpfHashMap<_, u64, u32> =
                    BpfHashMap::try_from(bpf.map(names::POLICIES).ok_or_else(|| missing(names::POLICIES))?)
                        .map_err(refused)?;
                policies.iter().filter_map(Result::ok).collect()
            }
            None => HashMap::new(),
        };
        let inherited = match &options.pin_dir {
            Some(dir) => inherited_links(dir),
            None => Inherited::new(),
        };
        let taken = bpf.take_map(names::CLIENTS).ok_or_else(|| missing(names::CLIENTS))?;
        let clients =
            Clients(std::sync::Arc::new(std::sync::Mutex::new(BpfHashMap::try_from(taken).map_err(refused)?)));
        let allow = bpf.take_map(names::ALLOW).ok_or_else(|| missing(names::ALLOW))?;
        let resolved_names = bpf.take_map(names::NAMES).ok_or_else(|| missing(names::NAMES))?;
        let allow_list = AllowList(std::sync::Arc::new(std::sync::Mutex::new(AllowMaps {
            trie: LpmTrie::try_from(allow).map_err(refused)?,
            names: BpfHashMap::try_from(resolved_names).map_err(refused)?,
        })));
        let config = Config {
            dedupe_window_ns: u64::try_from(options.dedupe_window.as_nanos()).unwrap_or(u64::MAX),
            exec_filename_offset,
            budget_per_second: options.pod_budget.per_second,
            budget_burst: options.pod_budget.burst,
            ..Config::default()
        };
        let mut probes = Self {
            bpf,
            mount: options.mount.clone(),
            monitored: HashMap::new(),
            links: HashMap::new(),
            program_ids,
            blocking,
            allow_list,
            clients,
            pins,
            inherited,
            instance: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
            config,
        };
        probes.heartbeat()?;
        Ok(probes)
    }

    /// Whether executable paths are reported (the kernel has BTF and took the exec program).
    pub fn exec_paths(&self) -> bool {
        self.config.exec_filename_offset != 0
    }

    /// Reports calls and DNS answers of every process in the cgroup `dir` and below it: the
    /// programs are attached to it. Returns the cgroup's id.
    pub fn monitor(&mut self, dir: &Path) -> Result<u64, LoadError> {
        let id = cgroup_id(dir)?;
        let level = self.level_of(dir)?;
        self.attach(id, dir)?;
        let mut map: BpfHashMap<_, u64, u32> = map(&mut self.bpf, names::MONITORED)?;
        map.insert(id, MONITOR, 0).map_err(refused)?;
        self.monitored.insert(id, level);
        self.write_config()?;
        Ok(id)
    }

    /// Tells the programs where pods are: the children of `parents` (kubelet's `kubepods` and
    /// QoS cgroups, see [`crate::cgroups::pod_parents`]). A pod is reported once
    /// [armed](Self::arm_pod).
    pub fn watch_pods(&mut self, parents: &[PathBuf]) -> Result<(), LoadError> {
        if parents.len() > MAX_POD_PARENTS {
            return Err(LoadError::Unsupported(format!("more than {MAX_POD_PARENTS} pod parent cgroups")));
        }
        let mut ids = [0; MAX_POD_PARENTS];
        let mut levels = [0; MAX_POD_PARENTS];
        // Deepest first: a QoS cgroup is itself a child of kubepods.
        let mut sorted: Vec<(u32, &PathBuf)> = Vec::new();
        for dir in parents {
            sorted.push((self.level_of(dir)?, dir));
        }
        sorted.sort_by_key(|(level, _)| std::cmp::Reverse(*level));
        for (i, (level, dir)) in sorted.into_iter().enumerate() {
            ids[i] = std::fs::metadata(dir).map_err(|source| LoadError::Cgroup { path: dir.clone(), source })?.ino();
            levels[i] = level;
        }
        self.config.pod_parents = ids;
        self.config.pod_parent_levels = levels;
        self.write_config()
    }

    /// Attaches the programs to the pod cgroup `dir` (below the [watched](Self::watch_pods)
    /// parents): its calls, DNS answers and executables are reported from now on, in every
    /// cgroup below it, those made later included. The agent arms every pod when its cgroup
    /// appears, before its first container starts, and keeps it armed while it may be a
    /// runner. Returns the cgroup's id.
    pub fn arm_pod(&mut self, dir: &Path) -> Result<u64, LoadError> {
        let id = cgroup_id(dir)?;
        self.attach(id, dir)?;
        let mut map: BpfHashMap<_, u64, u32> = map(&mut self.bpf, names::MONITORED)?;
        map.insert(id, ARMED, 0).map_err(refused)?;
        Ok(id)
    }

    /// Whether the pod cgroup `id` has the programs attached.
    pub fn armed(&self, id: u64) -> bool {
        self.links.contains_key(&id)
    }

    /// Attaches the programs every armed pod has to `dir` (and those of block mode, for a pod
    /// in it): the DNS answer and query filters first, so no answer to a query the TCP program
    /// sees can pass unread.
    fn attach(&mut self, id: u64, dir: &Path) -> Result<(), LoadError> {
        if self.links.contains_key(&id) {
            return Ok(());
        }
        let cgroup =
            std::fs::File::open(dir).map_err(|source| LoadError::Cgroup { path: dir.to_path_buf(), source })?;
        // An error drops what is attached so far: all or nothing.
        let mut links = Vec::with_capacity(names::PROGRAMS.len() + names::BLOCK_PROGRAMS.len());
        for (name, attach_type) in
            [(names::PROGRAMS[0], CgroupSkbAttachType::Ingress), (names::PROGRAMS[1], CgroupSkbAttachType::Egress)]
        {
            let dns: &mut CgroupSkb = program(&mut self.bpf, name)?;
            // Links always stack on a cgroup; "Single" is how aya asks for a plain link.
            let link = dns.attach(cgroup.as_fd(), attach_type, CgroupAttachMode::Single).map_err(refused)?;
            let link = FdLink::try_from(dns.take_link(link).map_err(refused)?).map_err(refused)?;
            links.push((name, Held::Attached(link)));
        }
        let tcp: &mut SockOps = program(&mut self.bpf, names::PROGRAMS[2])?;
        let link = tcp.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(refused)?;
        let link = FdLink::try_from(tcp.take_link(link).map_err(refused)?).map_err(refused)?;
        links.push((names::PROGRAMS[2], Held::Attached(link)));
        self.links.insert(id, CgroupLinks { dir: dir.to_path_buf(), links });
        if self.blocking.contains_key(&id) {
            // In block mode before this agent started: its block-mode programs too, pinned,
            // and then the earlier agent's links can go (one or the other holds it all along).
            self.attach_block(id)?;
            self.pin(id)?;
            self.let_go_inherited(id);
        }
        Ok(())
    }

    /// Pins the pod's links: they stay attached if this process ends.
    fn pin(&mut self, id: u64) -> Result<(), LoadError> {
        let Some(pins) = self.pins.clone() else { return Ok(()) };
        let Some(links) = self.links.get_mut(&id) else { return Ok(()) };
        let dir = pins.join("links").join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| LoadError::Unsupported(format!("{}: {e}", dir.display())))?;
        let mut result = Ok(());
        for (name, held) in std::mem::take(&mut links.links) {
            let held = match held {
                Held::Attached(link) if result.is_ok() => {
                    // Named for this process: an earlier agent's pin of the same program stays
                    // until this one is in place.
                    let path = dir.join(format!("{name}-{}", self.instance));
                    let _ = std::fs::remove_file(&path);
                    match link.pin(&path) {
                        Ok(pinned) => Held::Pinned(pinned),
                        // The link went with the error: the periodic check attaches it again.
                        Err(e) => {
                            result = Err(refused(e));
                            continue;
                        }
                    }
                }
                other => other,
            };
            links.links.push((name, held));
        }
        result
    }

    /// Unpins the pod's links (they stay attached while this process holds them).
    fn unpin(&mut self, id: u64) {
        let Some(links) = self.links.get_mut(&id) else { return };
        for (name, held) in std::mem::take(&mut links.links) {
            let held = match held {
                Held::Pinned(pinned) => match pinned.unpin() {
                    Ok(link) => Held::Attached(link),
                    Err(e) => {
                        warn!(program = name, error = %e, "could not unpin a link");
                        continue;
                    }
                },
                other => other,
            };
            links.links.push((name, held));
        }
        if let Some(pins) = &self.pins {
            let _ = std::fs::remove_dir(pins.join("links").join(id.to_string()));
        }
    }

    /// Lets go of the links earlier agents pinned for the pod cgroup `id`.
    fn let_go_inherited(&mut self, id: u64) {
        for (path, link) in self.inherited.remove(&id).unwrap_or_default() {
            if let Err(e) = link.unpin() {
                warn!(path = %path.display(), error = %e, "could not unpin an earlier agent's link");
            }
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }

    /// Lets go of every link earlier agents pinned that this one has not taken over (pods
    /// gone, or no longer in block mode), and of their state: once this agent has read every
    /// pod and policy.
    pub fn let_go_of_the_past(&mut self) {
        let ids: Vec<u64> = self.inherited.keys().copied().collect();
        for id in ids {
            self.let_go_inherited(id);
        }
        // Another build's maps: nothing of it is attached any more.
        if let Some(ours) = &self.pins
            && let Some(parent) = ours.parent()
        {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                if entry.path() != *ours {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// Checks that every armed pod still has each program attached to its cgroup and its mark
    /// in the monitored set (a privileged process in the pod can detach a link or delete a map
    /// entry by id), and puts back what is missing. Returns the pods that had lost something;
    /// pods whose cgroup is gone are skipped (the next scan forgets them).
    pub fn check_pods(&mut self) -> Result<Vec<Tampered>, LoadError> {
        let marks: BpfHashMap<_, u64, u32> =
            BpfHashMap::try_from(self.bpf.map(names::MONITORED).ok_or_else(|| missing(names::MONITORED))?)
                .map_err(refused)?;
        let policies: BpfHashMap<_, u64, u32> =
            BpfHashMap::try_from(self.bpf.map(names::POLICIES).ok_or_else(|| missing(names::POLICIES))?)
                .map_err(refused)?;
        let mut found = Vec::new();
        for (&id, links) in &self.links {
            let Ok(cgroup) = std::fs::File::open(&links.dir) else { continue };
            let mut detached = Vec::new();
            let blocking = self.blocking.contains_key(&id);
            let expected = names::PROGRAMS
                .into_iter()
                .zip(ATTACH_TYPES)
                .chain(names::BLOCK_PROGRAMS.into_iter().zip(BLOCK_ATTACH_TYPES).filter(|_| blocking));
            for ((name, attach_type), prog) in expected.zip(&self.program_ids) {
                match attached_programs(&cgroup, attach_type) {
                    Ok(ids) if !ids.contains(prog) => detached.push(name),
                    Ok(_) => {}
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(LoadError::Unsupported(format!("querying a cgroup's programs: {e}"))),
                }
            }
            let unmarked = marks.get(&id, 0).ok() != Some(self.mark_of(id))
                || self.blocking.get(&id).is_some_and(|mode| policies.get(&id, 0).ok() != Some(*mode));
            // A cgroup being removed loses its programs with it: not tampering.
            if (!detached.is_empty() || unmarked) && links.dir.exists() {
                found.push(Tampered { id, dir: links.dir.clone(), detached, unmarked });
            }
        }
        for t in &found {
            // Attach afresh (what is left of the old links goes), and mark again.
            self.links.remove(&t.id);
            if let Err(e) = self.attach(t.id, &t.dir) {
                if t.dir.exists() {
                    return Err(e);
                }
                continue;
            }
            let mark = self.mark_of(t.id);
            let mut map: BpfHashMap<_, u64, u32> = map(&mut self.bpf, names::MONITORED)?;
            map.insert(t.id, mark, 0).map_err(refused)?;
            if let Some(&mode) = self.blocking.get(&t.id) {
                self.set_block_mode(t.id, Some(mode & ENFORCE_FAIL_OPEN != 0))?;
            }
        }
        Ok(found)
    }

    /// Stops reporting the pod cgroup `id` (gone, or not a runner): drops its mark, detaches its
    /// programs (the kernel has already when the cgroup is gone) and forgets what the kernel
    /// counted for it. A pod that stays then runs none of the programs: its calls and packets
    /// cost nothing.
    pub fn forget_pod(&mut self, id: u64) -> Result<(), LoadError> {
        let mut monitored: BpfHashMap<_, u64, u32> = map(&mut self.bpf, names::MONITORED)?;
        let _ = monitored.remove(&id);
        // Out of block mode first: its links are unpinned, and go with the rest.
        self.set_blocking(id, false)?;
        self.links.remove(&id);
        self.disallow_all(id)?;
        let mut budgets: BpfHashMap<_, u64, BudgetValue> = map(&mut self.bpf, names::BUDGETS)?;
        let _ = budgets.remove(&id);
        self.forget_dedupe(id)
    }

    fn forget_dedupe(&mut self, id: u64) -> Result<(), LoadError> {
        let mut table: BpfHashMap<_, Key, Value> = map(&mut self.bpf, names::DEDUPE)?;
        let keys: Vec<Key> = table.keys().filter_map(Result::ok).filter(|k| k.0.pod_cgroup_id == id).collect();
        for k in keys {
            let _ = table.remove(&k);
        }
        Ok(())
    }

    fn level_of(&self, dir: &Path) -> Result<u32, LoadError> {
        let cgroup_error = |source| LoadError::Cgroup { path: dir.to_path_buf(), source };
        let relative = dir.strip_prefix(&self.mount).map_err(|_| {
            cgroup_error(io::Error::other(format!("not below the cgroup v2 mount {}", self.mount.display())))
        })?;
        let level = relative.components().count() as u32;
        if level >= MAX_LEVEL {
            return Err(cgroup_error(io::Error::other(format!("deeper than level {MAX_LEVEL}"))));
        }
        Ok(level)
    }

    /// Stops reporting the cgroup `id` (a pod that ended).
    pub fn unmonitor(&mut self, id: u64) -> Result<(), LoadError> {
        // Its dedupe entries go too: the pipeline forgets the pod, and must not find them later.
        self.forget_pod(id)?;
        self.monitored.remove(&id);
        self.write_config()
    }

    /// The mark an attached cgroup has: [`MONITOR`] (`trace`) or [`ARMED`] (a pod).
    fn mark_of(&self, id: u64) -> u32 {
        if self.monitored.contains_key(&id) { MONITOR } else { ARMED }
    }

    /// Checks that the programs' settings are the agent's (a privileged process can rewrite the
    /// map by id, e.g. so that no caller is found to be in a pod), and writes them again when
    /// they are not. True when they had been changed.
    pub fn check_config(&mut self) -> Result<bool, LoadError> {
        let array: Array<_, Settings> =
            Array::try_from(self.bpf.map(names::CONFIG).ok_or_else(|| missing(names::CONFIG))?).map_err(refused)?;
        if array.get(&0, 0).map_err(refused)?.0 == self.config {
            return Ok(false);
        }
        self.write_config()?;
        Ok(true)
    }

    /// Puts the pod cgroup `id` in block mode (its calls to destinations it is not
    /// [allowed](Self::allow) fail with `EPERM` and are reported refused) or takes it out
    /// (every call goes ahead). Takes effect on the pod's next call.
    ///
    /// In block mode the programs that decide each call ([`names::BLOCK_PROGRAMS`]) are
    /// attached to the pod (before the mode is set, so no call goes undecided, and detached
    /// after it is taken out, so none goes unreported); its DNS queries go to the agent's
    /// [resolver](Self::set_resolver), and its answers get the address the pod asked.
    pub fn set_blocking(&mut self, id: u64, block: bool) -> Result<(), LoadError> {
        self.set_block_mode(id, block.then_some(false))
    }

    /// As [`Self::set_blocking`]: `Some(fail_open)` puts the pod in block mode, where with
    /// `fail_open` its calls go ahead while the agent is away (no [heartbeat](Self::heartbeat)
    /// for [`runwarden_ebpf_common::AGENT_AWAY_NS`]); `None` takes it out.
    pub fn set_block_mode(&mut self, id: u64, fail_open: Option<bool>) -> Result<(), LoadError> {
        if fail_open.is_some() {
            self.attach_block(id)?;
            // Pinned first: from the moment the pod is in block mode, it stays held if this
            // process ends.
            self.pin(id)?;
        }
        let mut policies: BpfHashMap<_, u64, u32> = map(&mut self.bpf, names::POLICIES)?;
        if let Some(fail_open) = fail_open {
            let mode = ENFORCE_BLOCK | if fail_open { ENFORCE_FAIL_OPEN } else { 0 };
            policies.insert(id, mode, 0).map_err(refused)?;
            if self.blocking.insert(id, mode).is_none() {
                self.write_config()?;
            }
        } else {
            let _ = policies.remove(&id);
            if self.blocking.remove(&id).is_some() {
                self.write_config()?;
            }
            self.unpin(id);
            if let Some(links) = self.links.get_mut(&id) {
                links.links.retain(|(name, _)| !names::BLOCK_PROGRAMS.contains(name));
            }
            self.let_go_inherited(id);
        }
        Ok(())
    }

    /// Says the agent is there (the programs hold fail-open pods only while it is): once a
    /// second.
    pub fn heartbeat(&mut self) -> Result<(), LoadError> {
        self.config.heartbeat_ns = crate::pipeline::clock(libc::CLOCK_MONOTONIC).as_nanos() as u64;
        self.write_config()
    }

    fn attach_block(&mut self, id: u64) -> Result<(), LoadError> {
        let Some(links) = self.links.get(&id) else {
            return Err(LoadError::Unsupported(format!("cgroup {id} is not armed: block mode needs its programs")));
        };
        if links.links.iter().any(|(name, _)| names::BLOCK_PROGRAMS.contains(name)) {
            return Ok(());
        }
        let dir = links.dir.clone();
        let cgroup =
            std::fs::File::open(&dir).map_err(|source| LoadError::Cgroup { path: dir.to_path_buf(), source })?;
        let mut block = Vec::with_capacity(names::BLOCK_PROGRAMS.len());
        for name in names::BLOCK_PROGRAMS {
            block.push((name, Held::Attached(sock_addr_link(&mut self.bpf, name, &cgroup)?)));
        }
        if let Some(links) = self.links.get_mut(&id) {
            links.links.extend(block);
        }
        Ok(())
    }

    /// Where block-mode pods' DNS queries go: the agent's resolver (addresses the pods can
    /// reach, and its port), or nowhere (`None`: DNS is then refused to them unless allowed
    /// like any destination).
    pub fn set_resolver(&mut self, resolver: Option<&ResolverAddress>) -> Result<(), LoadError> {
        let (ip4, ip6, port) = match resolver {
            // As `user_ip4` and `user_ip6` hold them: the octets in memory order.
            Some(r) => (
                r.ipv4.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
                r.ipv6.map_or([0; 4], |ip| {
                    let o = ip.octets();
                    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
                }),
                r.port,
            ),
            None => (0, [0; 4], 0),
        };
        (self.config.resolver_ip4, self.config.resolver_ip6, self.config.resolver_port) = (ip4, ip6, port);
        self.write_config()
    }

    /// The pods in block mode (those an earlier agent left so included).
    pub fn blocking_pods(&self) -> Vec<u64> {
        self.blocking.keys().copied().collect()
    }

    /// Lets the pod cgroup `pod` call `allowed` while in block mode.
    pub fn allow(&mut self, pod: u64, allowed: &Allowed) -> Result<(), LoadError> {
        self.allow_list.allow(pod, allowed)
    }

    /// Takes back what [`Self::allow`] allowed.
    pub fn disallow(&mut self, pod: u64, allowed: &Allowed) -> Result<(), LoadError> {
        self.allow_list.disallow(pod, allowed)
    }

    /// Takes back everything the pod cgroup `pod` was allowed.
    pub fn disallow_all(&mut self, pod: u64) -> Result<(), LoadError> {
        self.allow_list.disallow_all(pod)
    }

    /// The pods' allowed destinations, for a task of its own (the resolver adds the addresses
    /// of the names it resolves).
    pub fn allow_list(&self) -> AllowList {
        self.allow_list.clone()
    }

    /// Which pod sent each query to the resolver, for a task of its own (the resolver).
    pub fn clients(&self) -> Clients {
        self.clients.clone()
    }

    fn write_config(&mut self) -> Result<(), LoadError> {
        self.config.enforcing = u32::from(!self.blocking.is_empty());
        self.config.monitored_levels = self.monitored.values().fold(0, |bits, level| bits | 1 << level);
        let mut array: Array<_, Settings> = map(&mut self.bpf, names::CONFIG)?;
        array.set(0, Settings(self.config), 0).map_err(refused)
    }

    /// The kernel's counters, summed over CPUs.
    pub fn stats(&self) -> Result<KernelStats, LoadError> {
        let array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map(names::STATS).ok_or_else(|| missing(names::STATS))?).map_err(refused)?;
        let sum = |i: u32| array.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        Ok(KernelStats {
            lost_calls: sum(stats::LOST_CALLS),
            lost_dns: sum(stats::LOST_DNS),
            call_events: sum(stats::CALL_EVENTS),
            calls_folded: sum(stats::CALLS_FOLDED),
            dns_events: sum(stats::DNS_EVENTS),
            dns_cut: sum(stats::DNS_CUT),
            lost_exec: sum(stats::LOST_EXEC),
            throttled: sum(stats::THROTTLED),
        })
    }

    /// Each program's runs and time in them, as the kernel counts them while its BPF run-time
    /// statistics are on (`kernel.bpf_stats_enabled`, or an `aya::sys::enable_stats` fd).
    pub fn program_stats(&self) -> Vec<(String, u64, Duration)> {
        self.bpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_string(), info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// Pods (cgroup id) whose budget was spent, with how many of their records were not written.
    pub fn throttled(&self) -> Result<Vec<(u64, u64)>, LoadError> {
        let budgets: BpfHashMap<_, u64, BudgetValue> =
            BpfHashMap::try_from(self.bpf.map(names::BUDGETS).ok_or_else(|| missing(names::BUDGETS))?)
                .map_err(refused)?;
        Ok(budgets
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, b)| b.0.throttled > 0)
            .map(|(id, b)| (id, b.0.throttled))
            .collect())
    }

    /// Every (cgroup, destination) in the kernel's dedupe table with its call count and the time
    /// of its last record, for [`crate::pipeline::Pipeline::totals`]: calls folded after the last
    /// record are counted, and destinations whose record was lost are found.
    pub fn dedupe_table(&self) -> Result<Vec<(DedupeKey, DedupeValue)>, LoadError> {
        let table: BpfHashMap<_, Key, Value> =
            BpfHashMap::try_from(self.bpf.map(names::DEDUPE).ok_or_else(|| missing(names::DEDUPE))?)
                .map_err(refused)?;
        // The kernel keeps CLOCK_MONOTONIC_COARSE; the records, CLOCK_BOOTTIME (which also
        // counts time suspended).
        use crate::pipeline::clock;
        let boot_minus_monotonic =
            clock(libc::CLOCK_BOOTTIME).saturating_sub(clock(libc::CLOCK_MONOTONIC)).as_nanos() as u64;
        // Entries evicted or rewritten during the walk are skipped; the next walk sees them.
        let mut entries: Vec<(DedupeKey, DedupeValue)> = table
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.0, DedupeValue { last_event_ns: v.0.last_event_ns + boot_minus_monotonic, ..v.0 }))
            .collect();
        // Then the calls each CPU folded and has not added to the table yet (read after the
        // table: a slot is emptied before its calls are added there, so none counts twice).
        let recent: PerCpuArray<_, Recent> =
            PerCpuArray::try_from(self.bpf.map(names::RECENT).ok_or_else(|| missing(names::RECENT))?)
                .map_err(refused)?;
        let mut pending: HashMap<DedupeKey, u64> = HashMap::new();
        for slot in 0..RECENT_SLOTS {
            for cpu in recent.get(&slot, 0).map_err(refused)?.iter() {
                if cpu.0.pending > 0 {
                    *pending.entry(cpu.0.key).or_default() += cpu.0.pending;
                }
            }
        }
        for (key, value) in &mut entries {
            value.total += pending.get(key).copied().unwrap_or(0);
        }
        Ok(entries)
    }

    /// Takes the ring buffer out for a [`Reader`] (once; within a tokio runtime).
    pub fn reader(&mut self) -> Result<Reader, LoadError> {
        let events = self.bpf.take_map(names::EVENTS).ok_or_else(|| missing(names::EVENTS))?;
        let ring = RingBuf::try_from(events).map_err(refused)?;
        // SAFETY: the ring buffer owns its map's fd, which stays open and the same for as long
        // as the ring buffer lives, and the AsyncFd owns the ring buffer.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| LoadError::Unsupported(format!("polling the ring buffer: {}", std::io::Error::from(e))))?;
        Ok(Reader { fd })
    }
}

/// Attaches the sock_addr program `name` to `cgroup`.
fn sock_addr_link(bpf: &mut Ebpf, name: &str, cgroup: &std::fs::File) -> Result<FdLink, LoadError> {
    let program: &mut CgroupSockAddr = program(bpf, name)?;
    let link = program.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(refused)?;
    FdLink::try_from(program.take_link(link).map_err(refused)?).map_err(refused)
}

/// The links earlier agents (of any build) pinned below `pin_dir`: `<version>/links/<cgroup
/// id>/<program>-<agent instance>` (the BPF filesystem takes no `.` in a name).
fn inherited_links(pin_dir: &Path) -> Inherited {
    let mut found = Inherited::new();
    let dirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d).map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default()
    };
    for version in dirs(pin_dir) {
        for pod in dirs(&version.join("links")) {
            let Some(id) = pod.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            for path in dirs(&pod) {
                match PinnedLink::from_pin(&path) {
                    Ok(link) => found.entry(id).or_default().push((path, link)),
                    Err(e) => warn!(path = %path.display(), error = %e, "not a pinned link; left alone"),
                }
            }
        }
    }
    found
}

/// Loads and attaches the `sched_process_exec` program; the offset of `linux_binprm.filename`
/// in this kernel, or `None` (no BTF, or the kernel refused it): calls are then reported
/// without executable paths.
fn attach_exec(bpf: &mut Ebpf) -> Option<u32> {
    let raw = std::fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let offset = crate::btf::member_offset(&raw, "linux_binprm", "filename").filter(|o| *o != 0)?;
    let btf = Btf::from_sys_fs().ok()?;
    let program: &mut BtfTracePoint = bpf.program_mut(names::EXEC)?.try_into().ok()?;
    program.load(names::EXEC, &btf).ok()?;
    program.attach().ok()?;
    Some(offset)
}

/// The ids of the programs attached directly to `cgroup` for `attach_type` (`BPF_PROG_QUERY`;
/// aya 0.14 offers it only for device programs).
fn attached_programs(cgroup: &std::fs::File, attach_type: u32) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // The `query` member of `union bpf_attr`, up to `prog_cnt` (the kernel zero-extends the rest).
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    let mut query = Query {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: a valid bpf_attr prefix of the size given; the kernel writes at most `prog_cnt`
    // ids into `ids`, which outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut query, std::mem::size_of::<Query>() as libc::c_uint)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ids[..(query.prog_cnt as usize).min(ids.len())].to_vec())
}

/// A cgroup's id: the inode number of its directory.
fn cgroup_id(dir: &Path) -> Result<u64, LoadError> {
    Ok(std::fs::metadata(dir).map_err(|source| LoadError::Cgroup { path: dir.to_path_buf(), source })?.ino())
}

fn missing(name: &str) -> LoadError {
    LoadError::Unsupported(format!("the kernel object has no `{name}` (agent and kernel programs out of step)"))
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name).ok_or_else(|| missing(name))?.try_into().map_err(refused)
}

fn map<'a, T>(bpf: &'a mut Ebpf, name: &str) -> Result<T, LoadError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(bpf.map_mut(name).ok_or_else(|| missing(name))?).map_err(refused)
}

/// Reads the ring buffer: waits until the kernel wakes it or [`POLL_INTERVAL`] passes, then
/// hands every waiting record to the caller.
pub struct Reader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// Waits for records (at most [`POLL_INTERVAL`]) and passes each to `each`, in order.
    /// Returns how many there were.
    pub async fn drain(&mut self, mut each: impl FnMut(&[u8])) -> usize {
        if let Ok(Ok(mut guard)) = tokio::time::timeout(POLL_INTERVAL, self.fd.readable_mut()).await {
            guard.clear_ready();
        }
        let ring = self.fd.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            each(&item);
            n += 1;
        }
        n
    }
}
