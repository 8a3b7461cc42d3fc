//! The records runwarden's kernel programs write into their ring buffer and the maps they share
//! with the agent: one `#[repr(C)]` definition for both sides. Every field has a fixed width,
//! padding is explicit, and each size is asserted at compile time in both builds (the kernel
//! object and the agent), so a change on one side cannot go unnoticed on the other.
//!
//! Byte order: integers are native (the kernel and the agent run on the same machine); ports
//! are converted to host order in the kernel; addresses are kept as the network-order bytes.

#![no_std]

/// The first four bytes of every ring-buffer record: which record follows.
pub type Kind = u32;
/// A [`CallEvent`].
pub const KIND_CALL: Kind = 1;
/// A [`DnsEvent`].
pub const KIND_DNS: Kind = 2;
/// An [`ExecEvent`].
pub const KIND_EXEC: Kind = 3;
/// A [`DnsEvent`] holding a query a monitored cgroup sent (UDP to port 53): answers are
/// believed only when they match one.
pub const KIND_DNS_QUERY: Kind = 4;

/// `family`: IPv4 (`AF_INET`).
pub const FAMILY_IPV4: u8 = 2;
/// `family`: IPv6 (`AF_INET6`).
pub const FAMILY_IPV6: u8 = 10;

/// `protocol`: TCP.
pub const PROTO_TCP: u8 = 6;
/// `protocol`: UDP.
pub const PROTO_UDP: u8 = 17;
/// UDP-Lite (a datagram socket's other protocol): reported as [`PROTO_UDP`].
pub const PROTO_UDPLITE: u8 = 136;

/// `hook`: a TCP `connect()` (in block mode also a UDP socket's `connect()`).
pub const HOOK_CONNECT: u8 = 1;
/// `hook`: a UDP datagram sent, connected or not (in block mode: `sendto()`/`sendmsg()` with an
/// address on an unconnected UDP socket).
pub const HOOK_SENDMSG: u8 = 2;

/// `verdict`: the call went ahead.
pub const VERDICT_ALLOWED: u8 = 1;
/// `verdict`: the call was refused (`EPERM`).
pub const VERDICT_DENIED: u8 = 2;

/// `flags`: the first call of this cgroup to this destination the kernel's dedupe table has
/// seen (a new table entry); `total` starts again from 1.
pub const FLAG_FIRST: u8 = 1;
/// One outbound call, or, with the kernel's dedupe on, the first of a burst of calls from one
/// cgroup to one destination: `total` says how many calls this cgroup has made to it so far.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallEvent {
    /// [`KIND_CALL`].
    pub kind: Kind,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `bpf_ktime_get_boot_ns()`: nanoseconds since boot, suspend included.
    pub timestamp_ns: u64,
    /// The caller's cgroup v2 id (its container's, or one nested below it).
    pub cgroup_id: u64,
    /// The monitored ancestor the call was matched by (the pod-level cgroup).
    pub pod_cgroup_id: u64,
    /// Calls from `cgroup_id` to this destination counted by the kernel, this one included,
    /// since `FLAG_FIRST`.
    pub total: u64,
    /// Process id (thread group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Destination address: 4 bytes for IPv4 (rest zero), 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    /// `FAMILY_*`.
    pub family: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 5],
    /// The calling thread's `comm`, NUL-padded.
    pub comm: [u8; 16],
}

/// Bytes of DNS message copied per answer. Longer answers are cut here (`truncated` is set);
/// the parser reads what fits.
pub const DNS_CAPTURE: usize = 1024;

/// A DNS answer (UDP from port 53) received by a socket in a monitored cgroup ([`KIND_DNS`]),
/// or a query (UDP to port 53) one sent ([`KIND_DNS_QUERY`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// [`KIND_DNS`].
    pub kind: Kind,
    /// Bytes of `payload` that hold the message.
    pub captured: u32,
    /// `bpf_ktime_get_boot_ns()`.
    pub timestamp_ns: u64,
    /// The receiving socket's cgroup v2 id.
    pub cgroup_id: u64,
    /// The monitored ancestor (the pod-level cgroup).
    pub pod_cgroup_id: u64,
    /// Length of the whole DNS message (UDP payload) as received (sent).
    pub length: u32,
    /// The interface (in the pod's network namespace) the answer arrived on, the query left
    /// on: 1, the loopback device, means from (to) inside the pod whatever source address the
    /// packet claims; another interface than the pod's uplink (a bridge a nested container
    /// sits behind) means the same.
    pub ifindex: u32,
    /// The pod's own UDP port, host order: an answer's destination port, a query's source.
    pub client_port: u16,
    /// `FAMILY_*` of the server's address.
    pub family: u8,
    /// Explicit padding (zero).
    pub _pad: u8,
    /// The server's address, as in [`CallEvent::addr`] (an answer's source, a query's
    /// destination).
    pub server: [u8; 16],
    /// The DNS message, `captured` bytes of it.
    pub payload: [u8; DNS_CAPTURE],
}

/// Bytes of executable path kept (NUL-terminated, cut beyond).
pub const EXEC_PATH: usize = 256;

/// A process in a monitored cgroup executed a program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    /// [`KIND_EXEC`].
    pub kind: Kind,
    /// Process id (thread group id) after the exec.
    pub pid: u32,
    /// `bpf_ktime_get_boot_ns()`.
    pub timestamp_ns: u64,
    /// The process's cgroup id.
    pub cgroup_id: u64,
    /// The monitored ancestor.
    pub pod_cgroup_id: u64,
    /// The path the program was executed by (`linux_binprm.filename`), NUL-terminated.
    pub path: [u8; EXEC_PATH],
}

/// Key of the kernel's dedupe table: one cgroup, one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupeKey {
    /// The caller's cgroup v2 id.
    pub cgroup_id: u64,
    /// Its monitored ancestor (so a destination whose record was lost can still be told to
    /// its pod from the table).
    pub pod_cgroup_id: u64,
    /// As in [`CallEvent::addr`].
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// `FAMILY_*`.
    pub family: u8,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `VERDICT_*`: a destination's refused calls are counted apart from its allowed ones.
    pub verdict: u8,
    /// Explicit padding (zero: keys are compared as bytes; scalars, so the programs zero them
    /// with two stores, not a byte-wise `memset`).
    pub _pad: u8,
    /// As `_pad`.
    pub _pad2: u16,
}

/// Value of the dedupe table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeValue {
    /// When the last event for this key was written: `bpf_ktime_get_coarse_ns`
    /// (CLOCK_MONOTONIC_COARSE) in the kernel's map; the agent's
    /// `Probes::dedupe_table` hands it out as CLOCK_BOOTTIME, like the records' timestamps.
    pub last_event_ns: u64,
    /// Calls counted, as in [`CallEvent::total`].
    pub total: u64,
}

/// One slot of the per-CPU `RECENT` table: the destination a CPU last reported or folded a call
/// to, with the calls folded on that CPU since (not yet added to the [`DedupeKey`]'s
/// [`DedupeValue::total`]). A repeated call that finds itself here within the dedupe window
/// costs one array index and a compare instead of a hash-table lookup and an atomic add.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecentCall {
    /// The destination (its `pod_cgroup_id` too: the slot's calls are added to this key).
    pub key: DedupeKey,
    /// The key's `last_event_ns` when this CPU last looked at its dedupe entry.
    pub last_event_ns: u64,
    /// Calls folded here and not yet in the dedupe table's total.
    pub pending: u64,
}

/// Slots per CPU in `RECENT` (a power of two: the slot is a hash's top bits).
pub const RECENT_SLOTS: u32 = 256;

/// Settings the agent writes into the one-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bit `n` set: some monitored cgroup sits at level `n` of the cgroup tree (the root is
    /// level 0), so the programs look up the caller's ancestor at that level.
    pub monitored_levels: u32,
    /// Byte offset of `filename` in this kernel's `struct linux_binprm` (from its BTF); 0 turns
    /// the executable paths off.
    pub exec_filename_offset: u32,
    /// Repeated calls from one cgroup to one destination within this window after an event
    /// are counted, not reported. 0 turns the dedupe off: every call is an event.
    pub dedupe_window_ns: u64,
    /// cgroups whose children are pods (kubelet's `kubepods` and QoS cgroups), deepest first;
    /// 0 ends the list. The call and DNS programs run only where the agent attached them (each
    /// pod cgroup that may hold a runner), so a caller below a child of one of them is
    /// reported under that child; the exec program runs node-wide and reports only children
    /// marked [`ARMED`].
    pub pod_parents: [u64; MAX_POD_PARENTS],
    /// The level of each of `pod_parents`.
    pub pod_parent_levels: [u32; MAX_POD_PARENTS],
    /// Records each pod may write per second, sustained (its budget refills at this rate); 0
    /// with `budget_burst` 0 turns the budgets off.
    pub budget_per_second: u32,
    /// Records a pod may write in a burst. Past its budget a pod's records are not written and
    /// are counted in its [`Budget`]: one pod cannot fill the ring buffer the others share.
    pub budget_burst: u32,
    /// Non-zero while some pod on the node has a `POLICIES` entry: only then do the call
    /// programs look up the caller's pod's enforcement before the dedupe (other nodes pay
    /// nothing for block mode).
    pub enforcing: u32,
    /// The agent's DNS resolver, where a block-mode pod's DNS queries (UDP and TCP to port 53,
    /// anywhere but loopback) are sent instead: its IPv4 address as `user_ip4` holds it
    /// (network order; 0: none), and its port, host order (also that of `resolver_ip6`). Port
    /// 0: no resolver, so DNS is a destination like any other (refused unless allowed).
    pub resolver_ip4: u32,
    /// See `resolver_ip4`.
    pub resolver_port: u16,
    /// Explicit padding.
    pub _pad: [u8; 6],
    /// When the agent last said it is there (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE):
    /// past [`AGENT_AWAY_NS`] without it, pods in block mode with [`ENFORCE_FAIL_OPEN`] are let
    /// through (their DNS to the server they asked) until it is back.
    pub heartbeat_ns: u64,
    /// The resolver's IPv6 address as `user_ip6` holds it (all zero: none), where queries to
    /// IPv6 servers go; without it they go to `::ffff:` `resolver_ip4`, which only dual-stack
    /// pods reach.
    pub resolver_ip6: [u32; 4],
}

/// How long without a heartbeat the agent counts as away (it writes one a second).
pub const AGENT_AWAY_NS: u64 = 3_000_000_000;

/// Key of `CLIENTS`: where a query to the agent's resolver comes from, as the resolver sees it
/// (the source address and port of the packet, and its protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Source address, as the packet holds it (network order): an IPv4 address in the first
    /// four bytes, the rest zero.
    pub addr: [u8; 16],
    /// Source port, host order.
    pub port: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `FAMILY_*`.
    pub family: u8,
}

/// What a redirected DNS socket first asked for (`REDIRECTED`, by socket cookie), so the
/// answers it receives, and its peer's name, can say they came from there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirected {
    /// The address, as `user_ip4` (first word) or `user_ip6` hold it.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// `FAMILY_*` of the address asked for.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 5],
}

/// `POLICIES` value: the pod's calls to destinations not in `ALLOW` are refused (`EPERM`).
pub const ENFORCE_BLOCK: u32 = 1;
/// `POLICIES` flag, with [`ENFORCE_BLOCK`]: while the agent is away (see
/// [`Config::heartbeat_ns`]) the pod's calls go ahead (the policy's `failOpen`).
pub const ENFORCE_FAIL_OPEN: u32 = 2;

/// Key data of the `ALLOW` table (an LPM trie; its key is a prefix length and this): a pod, a
/// protocol, a port, an address range. The trie matches these bytes from the first bit on, so
/// everything but the address is matched whole and the address by prefix: the prefix length
/// is [`ALLOW_KEY_FIXED_BITS`] plus the range's. Port 0 stands for every port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// The pod's cgroup id, native order.
    pub pod: [u8; 8],
    /// `FAMILY_*`.
    pub family: u8,
    /// `PROTO_*`.
    pub protocol: u8,
    /// Network order; 0: every port.
    pub port: [u8; 2],
    /// As in [`CallEvent::addr`].
    pub addr: [u8; 16],
}

/// Bits of an [`AllowKey`] before its address.
pub const ALLOW_KEY_FIXED_BITS: u32 = 8 * 12;

/// Value of the `ALLOW` table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowValue {
    /// When the entry stops allowing (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE); 0:
    /// never (a range of the policy, not an address from a DNS answer).
    pub expires_ns: u64,
    /// The name whose DNS answer allowed it, as a key of `NAMES` (0: a range of the policy), so
    /// that an agent that did not resolve it knows what it was for.
    pub name: u64,
}

/// Longest name `NAMES` holds (a DNS name has at most 253 characters).
pub const NAME_BYTES: usize = 256;

/// A pod's record budget (value of `BUDGETS`, key: the pod's cgroup id): a token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Records it may still write.
    pub tokens: u64,
    /// When `tokens` was last refilled (`bpf_ktime_get_boot_ns`).
    pub refilled_ns: u64,
    /// Records not written because the budget was spent.
    pub throttled: u64,
}

/// Most cgroups whose children are pods (`kubepods`, its `burstable` and `besteffort`).
pub const MAX_POD_PARENTS: usize = 4;

/// Deepest cgroup level the programs look at (the root is 0; kubelet's pod cgroups sit at 2-4).
pub const MAX_LEVEL: u32 = 31;

/// Value in the `MONITORED` map (key: a cgroup v2 id): report calls of this cgroup's tree.
pub const MONITOR: u32 = 1;
/// Value in the `MONITORED` map: a pod (child of one of [`Config::pod_parents`]) with the
/// programs attached to its cgroup: its calls, DNS answers and executables are reported. Pods
/// not marked (not runners) run none of the programs but the node-wide exec tracepoint, which
/// drops them after one map lookup.
pub const ARMED: u32 = 2;

/// Indexes of the per-CPU `STATS` array.
pub mod stats {
    /// Call events lost because the ring buffer was full.
    pub const LOST_CALLS: u32 = 0;
    /// DNS answers lost because the ring buffer was full.
    pub const LOST_DNS: u32 = 1;
    /// Call events written.
    pub const CALL_EVENTS: u32 = 2;
    /// Calls counted in the dedupe table without an event.
    pub const CALLS_FOLDED: u32 = 3;
    /// DNS answers written.
    pub const DNS_EVENTS: u32 = 4;
    /// DNS answers longer than the capture, written cut.
    pub const DNS_CUT: u32 = 5;
    /// Exec records lost because the ring buffer was full.
    pub const LOST_EXEC: u32 = 6;
    /// Records not written because their pod's budget was spent.
    pub const THROTTLED: u32 = 7;
    /// Number of entries.
    pub const COUNT: u32 = 8;
}

/// Names of the maps and programs in the kernel object.
pub mod names {
    /// Ring buffer of [`super::CallEvent`] and [`super::DnsEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// cgroup id → [`super::MONITOR`] or [`super::ARMED`].
    pub const MONITORED: &str = "MONITORED";
    /// One [`super::Config`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU counters, see [`super::stats`].
    pub const STATS: &str = "STATS";
    /// [`super::DedupeKey`] → [`super::DedupeValue`], LRU.
    pub const DEDUPE: &str = "DEDUPE";
    /// Per-CPU array of [`super::RecentCall`], [`super::RECENT_SLOTS`] slots.
    pub const RECENT: &str = "RECENT";
    /// Pod cgroup id → `ENFORCE_*` (pods whose calls are checked against `ALLOW`).
    pub const POLICIES: &str = "POLICIES";
    /// (prefix length, [`super::AllowKey`]) → [`super::AllowValue`], LPM trie.
    pub const ALLOW: &str = "ALLOW";
    /// Socket cookie → [`super::Redirected`], LRU.
    pub const REDIRECTED: &str = "REDIRECTED";
    /// A hash of a name (see [`super::AllowValue::name`]) → the name, NUL-padded to
    /// [`super::NAME_BYTES`]. Written and read by the agent only; kept with `ALLOW` so that a
    /// restarted agent knows the names its pods resolved.
    pub const NAMES: &str = "NAMES";
    /// [`super::ClientKey`] → the pod cgroup that sent a query to the agent's resolver, LRU.
    pub const CLIENTS: &str = "CLIENTS";
    /// Pod cgroup id → [`super::Budget`], LRU.
    pub const BUDGETS: &str = "BUDGETS";
    /// The programs attached to every armed pod: DNS answers in, UDP datagrams and DNS queries
    /// out (`cgroup_skb`), TCP connects (`sockops`). None of their hooks takes a lock, and a
    /// socket of a cgroup with none attached costs the kernel a pointer compare.
    pub const PROGRAMS: [&str; 3] = ["dns_ingress", "egress", "tcp_connect"];
    /// The programs attached only to block-mode pods: `connect4`/`6` and `sendmsg4`/`6` decide
    /// each call before it happens (and send DNS to the agent's resolver), `recvmsg4`/`6` and
    /// `getpeername4`/`6` give redirected answers and peers their original address. While
    /// one of these is attached anywhere, every UDP `connect()` (`sendto()`, `recvfrom()`) on
    /// the node takes its socket's lock around the cgroup's (mostly empty) program list: so
    /// they are attached where a pod blocks, and nowhere else.
    pub const BLOCK_PROGRAMS: [&str; 8] =
        ["connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "getpeername4", "getpeername6"];
    /// The `tp_btf/sched_process_exec` program (executable paths).
    pub const EXEC: &str = "sched_process_exec";
}

const _: () = assert!(core::mem::size_of::<CallEvent>() == 88);
const _: () = assert!(core::mem::size_of::<DnsEvent>() == 64 + DNS_CAPTURE);
const _: () = assert!(core::mem::size_of::<DedupeKey>() == 40);
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 32 + EXEC_PATH);
const _: () = assert!(core::mem::size_of::<DedupeValue>() == 16);
const _: () = assert!(core::mem::size_of::<RecentCall>() == 56);
const _: () = assert!(RECENT_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<Config>() == 64 + 12 * MAX_POD_PARENTS);
const _: () = assert!(core::mem::size_of::<Redirected>() == 24);
const _: () = assert!(core::mem::size_of::<ClientKey>() == 20);
const _: () = assert!(core::mem::size_of::<AllowKey>() == ALLOW_KEY_FIXED_BITS as usize / 8 + 16);
const _: () = assert!(core::mem::align_of::<AllowKey>() == 1);
const _: () = assert!(core::mem::size_of::<Budget>() == 24);
const _: () = assert!(DNS_CAPTURE.is_power_of_two());
