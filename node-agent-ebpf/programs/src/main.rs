//! runwarden's kernel programs (on a node: attached to the cgroup of each pod that may hold a
//! runner, see the agent's `ebpf`; other pods run none of them):
//!
//! - `tcp_connect` (`sockops`): every TCP `connect()`, as its SYN is about to leave;
//! - `egress` (`cgroup_skb/egress`): every UDP datagram sent (connected or not: DNS, QUIC) is a
//!   call; and a bounded copy of each DNS query (UDP to port 53), so an answer is believed only
//!   when it matches a query the pod sent (id, question, server, port);
//! - `dns_ingress` (`cgroup_skb/ingress`): UDP answers from port 53, a bounded copy of the
//!   message, so the agent can name destinations from the answers each pod received;
//! - in block mode only, `connect4`/`connect6` and `sendmsg4`/`sendmsg6` (`cgroup/sock_addr`):
//!   each `connect()`, and each `sendto()` with an address on an unconnected UDP socket, is
//!   decided before it happens and reported with its verdict (the two above then leave the
//!   pod's calls to them); `recvmsg*`/`getpeername*` restore redirected DNS answers' source.
//!   These hooks are kept off pods that do not block because the kernel takes the socket's
//!   lock around them on every UDP `connect()`/`sendto()` of the node once one is attached
//!   anywhere;
//! - `sched_process_exec` (node-wide): the executable of each process of a reported pod.
//!
//! The programs find the pod (or, for `trace`, the monitored cgroup) a caller belongs to from its
//! ancestors at the levels `CONFIG` names: an index into the cgroup's ancestors, no walk, and no
//! map lookup for a pod (the program runs only where the agent attached it). Repeated calls
//! from one cgroup to one destination within the dedupe window are counted (in this CPU's
//! `RECENT` slot, then in `DEDUPE`, see [`record`]), not reported. Each pod has a record
//! budget (`BUDGETS`, a token bucket refilled at `CONFIG.budget_per_second`): past it the pod's
//! records are counted, not written, so one pod cannot fill the ring buffer all pods share (its
//! calls stay in `DEDUPE`, where the agent finds them). Records are submitted without waking
//! the reader (it polls) unless the ring buffer fills past a threshold; records that do not fit
//! are counted in `STATS`. Only the block-mode programs refuse anything.

#![no_std]
#![no_main]
// The BPF target has atomic add but no compare-and-swap, so core's atomic types offer no
// `fetch_add`; the intrinsic lowers to BPF's atomic add. (This crate is built with
// RUSTC_BOOTSTRAP=1 for -Z build-std anyway.)
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::bindings::{
    BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::generated::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
    bpf_ktime_get_coarse_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id, bpf_skb_load_bytes,
};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid};
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes};
use aya_ebpf::macros::{btf_tracepoint, cgroup_skb, cgroup_sock_addr, map, sock_ops};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{BtfTracePointContext, SkBuffContext, SockAddrContext, SockOpsContext};
use runwarden_ebpf_common::{
    AGENT_AWAY_NS, ALLOW_KEY_FIXED_BITS, ARMED, AllowKey, AllowValue, Budget, CallEvent, ClientKey, Config,
    DNS_CAPTURE, DedupeKey, DedupeValue, DnsEvent, ENFORCE_BLOCK, ENFORCE_FAIL_OPEN, ExecEvent, FAMILY_IPV4,
    FAMILY_IPV6, FLAG_FIRST, HOOK_CONNECT, HOOK_SENDMSG, KIND_CALL, KIND_DNS, KIND_DNS_QUERY, KIND_EXEC, MAX_LEVEL,
    MAX_POD_PARENTS, MONITOR, NAME_BYTES, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE, RECENT_SLOTS, RecentCall, Redirected,
    VERDICT_ALLOWED, VERDICT_DENIED, stats,
};

/// Ring buffer size. At 88 bytes a call event it holds ~47,000 calls; the agent drains it
/// every 10 ms.
const EVENTS_BYTES: u32 = 4 << 20;
/// Wake the reader early once this much is waiting.
const WAKE_AT_BYTES: u64 = 1 << 20;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
static MONITORED: HashMap<u64, u32> = HashMap::with_max_entries(16_384, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);
#[map]
static DEDUPE: LruHashMap<DedupeKey, DedupeValue> = LruHashMap::with_max_entries(65_536, 0);
#[map]
static RECENT: PerCpuArray<RecentCall> = PerCpuArray::with_max_entries(RECENT_SLOTS, 0);
#[map]
static POLICIES: HashMap<u64, u32> = HashMap::with_max_entries(16_384, 0);
#[map]
static ALLOW: LpmTrie<AllowKey, AllowValue> = LpmTrie::with_max_entries(262_144, 0);
/// Written and read by the agent only (see `names::NAMES`).
#[map]
static NAMES: HashMap<u64, [u8; NAME_BYTES]> = HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
#[map]
static CLIENTS: LruHashMap<ClientKey, u64> = LruHashMap::with_max_entries(65_536, 0);
#[map]
static REDIRECTED: LruHashMap<u64, Redirected> = LruHashMap::with_max_entries(65_536, 0);
#[map]
static BUDGETS: LruHashMap<u64, Budget> = LruHashMap::with_max_entries(16_384, 0);

/// Takes one record from `pod`'s budget; false (and counted) when it is spent. CPUs race on the
/// bucket without locks: the budget is approximate, never unbounded.
#[inline(always)]
fn take_budget(cfg: &Config, pod: u64, now: u64) -> bool {
    if cfg.budget_burst == 0 {
        return true;
    }
    let burst = u64::from(cfg.budget_burst);
    let Some(budget) = BUDGETS.get_ptr_mut(pod) else {
        let fresh = Budget { tokens: burst - 1, refilled_ns: now, throttled: 0 };
        let _ = BUDGETS.insert(pod, fresh, 0);
        return true;
    };
    // SAFETY: `budget` points into the map's element, valid for this program run.
    unsafe {
        // At most 10 s of refill at once, so the product cannot overflow.
        let elapsed = now.wrapping_sub((*budget).refilled_ns).min(10_000_000_000);
        let refill = elapsed * u64::from(cfg.budget_per_second) / 1_000_000_000;
        if refill > 0 {
            (*budget).tokens = ((*budget).tokens + refill).min(burst);
            (*budget).refilled_ns = now;
        }
        if (*budget).tokens == 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*budget).throttled, 1);
            count(stats::THROTTLED);
            return false;
        }
        (*budget).tokens -= 1;
    }
    true
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; programs on one CPU do not run concurrently with each other
        // in these hooks (they are not preemptible within a program).
        unsafe { *slot += 1 };
    }
}

/// The settings, in place (a copy would cost every call a few dozen loads and stores).
#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Where a cgroup's calls are reported: a pod never needs its mark looked up by the programs the
/// agent attaches to it (they run only there), the node-wide exec program does.
#[derive(Clone, Copy, PartialEq)]
enum Pods {
    Attached,
    Marked,
}

/// The monitored ancestor of a cgroup, given a way to read its ancestor id at a level: a cgroup
/// marked [`MONITOR`] at one of `cfg.monitored_levels`, or else the pod (child of one of
/// `cfg.pod_parents`) it belongs to (with [`Pods::Marked`], only if marked [`ARMED`]). At
/// most three ancestor reads (an index into the cgroup's ancestors, no walk).
#[inline(always)]
fn monitored_ancestor(cfg: &Config, pods: Pods, ancestor: impl Fn(i32) -> u64) -> Option<u64> {
    if cfg.monitored_levels != 0
        && let Some(id) = marked_ancestor(cfg.monitored_levels, &ancestor)
    {
        return Some(id);
    }
    // Ancestors read so far: parents are deepest first and QoS parents share a level, so on a
    // node the pod level is read once, kubepods' level once.
    let (mut read_level, mut read_id) = (u32::MAX, 0);
    let (mut first_level, mut first_id) = (u32::MAX, 0);
    let mut i = 0;
    while i < MAX_POD_PARENTS {
        let parent = cfg.pod_parents[i];
        if parent == 0 {
            return None;
        }
        let level = cfg.pod_parent_levels[i];
        if level >= MAX_LEVEL {
            return None;
        }
        if level != read_level {
            read_level = level;
            read_id = ancestor(level as i32);
            if first_level == u32::MAX {
                (first_level, first_id) = (level, read_id);
            }
        }
        if read_id == parent {
            // Zero when the caller is the parent itself (no pod).
            let pod = if first_level == level + 1 { first_id } else { ancestor(level as i32 + 1) };
            if pod == 0 {
                return None;
            }
            // SAFETY: a pointer into the map's element, valid for this program run.
            if pods == Pods::Marked && MONITORED.get_ptr(pod).is_none_or(|mark| unsafe { *mark } != ARMED) {
                return None;
            }
            return Some(pod);
        }
        i += 1;
    }
    None
}

/// The ancestor marked [`MONITOR`] at one of `levels`.
#[inline(always)]
fn marked_ancestor(levels: u32, ancestor: &impl Fn(i32) -> u64) -> Option<u64> {
    let mut level = 0;
    // Stop past the deepest monitored level: pods sit at 2-4, so a few iterations.
    while level <= MAX_LEVEL && levels >> level != 0 {
        if levels & (1 << level) != 0 {
            let id = ancestor(level as i32);
            // SAFETY: a pointer into the map's element, valid for this program run.
            if id != 0 && MONITORED.get_ptr(id).is_some_and(|mark| unsafe { *mark } == MONITOR) {
                return Some(id);
            }
        }
        level += 1;
    }
    None
}

/// The monitored ancestor of the current task's cgroup (none when not monitored).
#[inline(always)]
fn current_pod(cfg: &Config, pods: Pods) -> Option<u64> {
    // SAFETY: a helper without pointer arguments.
    monitored_ancestor(cfg, pods, |l| unsafe { bpf_get_current_ancestor_cgroup_id(l) })
}

#[inline(always)]
fn wake_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AT_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Whether a slot of `RECENT` holds this caller's call to this destination (its pod follows
/// from the cgroup, so it is not compared).
#[inline(always)]
fn same_call(
    key: &DedupeKey,
    cgroup_id: u64,
    addr: &[u8; 16],
    port: u16,
    family: u8,
    protocol: u8,
    verdict: u8,
) -> bool {
    // SAFETY: same size, any bytes are valid words; two compares instead of sixteen.
    let (a, b) = unsafe {
        (core::mem::transmute::<[u8; 16], [u64; 2]>(key.addr), core::mem::transmute::<[u8; 16], [u64; 2]>(*addr))
    };
    key.cgroup_id == cgroup_id
        && a == b
        && key.port == port
        && key.family == family
        && key.protocol == protocol
        && key.verdict == verdict
}

/// A destination as the checks see it: an IPv4 address on an IPv6 socket (`::ffff:a.b.c.d`)
/// as that IPv4 address.
#[inline(always)]
fn normalized(family: u8, addr: &[u8; 16]) -> (u8, [u32; 4]) {
    // SAFETY: same size, any bytes are valid words.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    if family == FAMILY_IPV6 && words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0xffff) {
        return (FAMILY_IPV4, [words[3], 0, 0, 0]);
    }
    (family, words)
}

/// Whether a (normalized) address is in the caller's own pod: loopback, or the unspecified
/// address, which connects to the local host.
#[inline(always)]
fn local(family: u8, words: &[u32; 4]) -> bool {
    if family == FAMILY_IPV4 {
        // 127.0.0.0/8 (network order: the first byte is the low byte of the word) or 0.0.0.0.
        words[0] & 0xff == 127 || words[0] == 0
    } else {
        // ::1 or ::.
        words[0] == 0 && words[1] == 0 && words[2] == 0 && (words[3] == 0 || words[3] == u32::from_be(1))
    }
}

/// Whether a block-mode pod may call this (normalized, not local) destination: an unexpired
/// `ALLOW` entry for its protocol and this port or every port.
#[inline(always)]
fn allowed(pod: u64, family: u8, protocol: u8, words: [u32; 4], port: u16, now: u64) -> bool {
    let bits = if family == FAMILY_IPV4 { 32 } else { 128 };
    let mut key = Key::new(
        ALLOW_KEY_FIXED_BITS + bits,
        AllowKey { pod: pod.to_ne_bytes(), family, protocol, port: port.to_be_bytes(), addr: address(words) },
    );
    let live = |value: &AllowValue| value.expires_ns == 0 || now < value.expires_ns;
    if ALLOW.get(&key).is_some_and(live) {
        return true;
    }
    key.data.port = [0; 2];
    ALLOW.get(&key).is_some_and(live)
}

/// Sends a block-mode pod's DNS query to the agent's resolver instead of where it was going
/// (the destination rewritten; the original kept by socket cookie for [`restore`]): a query to
/// an IPv4 server (or `::ffff:` one) to the resolver's IPv4 address, one to an IPv6 server to
/// its IPv6 address, or to `::ffff:` its IPv4 address when it has none. False when the agent
/// runs no resolver of that family.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, cfg: &Config, family: u8, addr: &[u8; 16], port: u16) -> bool {
    if cfg.resolver_port == 0 {
        return false;
    }
    // SAFETY: same size, any bytes are valid words.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    let has_ip6 = cfg.resolver_ip6 != [0; 4];
    let to_ip6 = family == FAMILY_IPV6 && normalized(family, addr).0 == FAMILY_IPV6 && has_ip6;
    if !to_ip6 && cfg.resolver_ip4 == 0 {
        return false;
    }
    // SAFETY: the context's socket, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let original = Redirected { addr: words, port, family, _pad: [0; 5] };
    if REDIRECTED.insert(cookie, original, 0).is_err() {
        return false;
    }
    // SAFETY: the context the kernel passed in; these hooks may write the destination.
    unsafe {
        let sa = ctx.sock_addr;
        if family == FAMILY_IPV4 {
            (*sa).user_ip4 = cfg.resolver_ip4;
        } else if to_ip6 {
            (*sa).user_ip6[0] = cfg.resolver_ip6[0];
            (*sa).user_ip6[1] = cfg.resolver_ip6[1];
            (*sa).user_ip6[2] = cfg.resolver_ip6[2];
            (*sa).user_ip6[3] = cfg.resolver_ip6[3];
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = u32::from_be(0xffff);
            (*sa).user_ip6[3] = cfg.resolver_ip4;
        }
        (*sa).user_port = u32::from(cfg.resolver_port.to_be());
    }
    true
}

/// Gives an answer from the agent's resolver (or a redirected socket's peer) the address the
/// pod's query was sent to, so its DNS client takes it as the answer of the server it asked.
#[inline(always)]
fn restore(ctx: &SockAddrContext, family: u8) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.resolver_port == 0 {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed in: the peer's address, readable and writable here.
    unsafe {
        if u16::from_be((*sa).user_port as u16) != cfg.resolver_port {
            return;
        }
        let from_resolver = if family == FAMILY_IPV4 {
            cfg.resolver_ip4 != 0 && (*sa).user_ip4 == cfg.resolver_ip4
        } else {
            let peer = [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]];
            (cfg.resolver_ip4 != 0 && peer == [0, 0, u32::from_be(0xffff), cfg.resolver_ip4])
                || (cfg.resolver_ip6 != [0; 4] && peer == cfg.resolver_ip6)
        };
        if !from_resolver {
            return;
        }
        let cookie = bpf_get_socket_cookie(sa.cast());
        let Some(original) = REDIRECTED.get(cookie) else {
            return;
        };
        if original.family != family {
            return;
        }
        if family == FAMILY_IPV4 {
            (*sa).user_ip4 = original.addr[0];
        } else {
            (*sa).user_ip6[0] = original.addr[0];
            (*sa).user_ip6[1] = original.addr[1];
            (*sa).user_ip6[2] = original.addr[2];
            (*sa).user_ip6[3] = original.addr[3];
        }
        (*sa).user_port = u32::from(original.port.to_be());
    }
}

/// The `RECENT` slot of a call: a multiplicative hash of the caller's cgroup and destination.
#[inline(always)]
fn recent_slot(cgroup_id: u64, addr: &[u8; 16], port: u16) -> u32 {
    // SAFETY: same size, any bytes are valid words.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(*addr) };
    let mixed = cgroup_id ^ words[0] ^ words[1].rotate_left(29) ^ (u64::from(port) << 48);
    (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - RECENT_SLOTS.trailing_zeros())) as u32
}

/// Adds `calls` to `key`'s total in the dedupe table (gone when the LRU evicted it: then they
/// are not counted).
#[inline(always)]
fn add_total(key: &DedupeKey, calls: u64) {
    if let Some(value) = DEDUPE.get_ptr_mut(key) {
        // SAFETY: a pointer into the map's element, valid for this program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).total, calls) };
    }
}

/// One call as the programs see it, for [`record`].
#[derive(Clone, Copy)]
struct Call {
    hook: u8,
    /// The cgroup the call is counted for (the caller's, or the sending socket's).
    cgroup_id: u64,
    /// Its pod, when already looked up (0 until then).
    pod: u64,
    family: u8,
    protocol: u8,
    addr: [u8; 16],
    port: u16,
    verdict: u8,
    /// `bpf_ktime_get_coarse_ns()` when the dedupe window or block mode needs it, else 0.
    coarse: u64,
}

/// The coarse clock (the last tick's time, no clock read), which is plenty for a window of
/// seconds and for the expiry of addresses from DNS answers; 0 when nothing needs it.
#[inline(always)]
fn coarse_now(cfg: &Config) -> u64 {
    // SAFETY: a helper without pointer arguments.
    if cfg.dedupe_window_ns != 0 || cfg.enforcing != 0 { unsafe { bpf_ktime_get_coarse_ns() } } else { 0 }
}

/// Whether the pod `pod` is in block mode: its calls are decided, and reported, by the
/// `sock_addr` programs attached to it, not by the observing ones.
#[inline(always)]
fn blocking(cfg: &Config, pod: u64) -> bool {
    cfg.enforcing != 0 && POLICIES.get_ptr(pod).is_some()
}

/// Reports a block-mode pod's call (after the dedupe); whether it may go ahead: refused when
/// the pod is in block mode (`POLICIES`) and the destination is not in its `ALLOW` entries.
#[inline(always)]
fn on_call(ctx: &SockAddrContext, hook: u8, family: u8, protocol: u8, addr: [u8; 16], port: u16) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    // SAFETY: a helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let coarse = coarse_now(cfg);
    // The verdict comes first: a call is refused whatever the dedupe says. Only on a node with
    // pods in block mode is the caller's pod looked up before the dedupe.
    // 0 until looked up (a plain integer: an `Option` here leaves LLVM free to move an
    // undefined payload around, which the verifier refuses).
    let mut pod = 0;
    let mut verdict = VERDICT_ALLOWED;
    if cfg.enforcing != 0 {
        let Some(id) = current_pod(cfg, Pods::Attached) else {
            return true;
        };
        pod = id;
        // SAFETY: a pointer into the map's element, valid for this program run.
        let mode = POLICIES.get_ptr(id).map_or(0, |mode| unsafe { *mode });
        // A fail-open pod goes unheld while the agent is away (no heartbeat for a while).
        let away = mode & ENFORCE_FAIL_OPEN != 0 && coarse.wrapping_sub(cfg.heartbeat_ns) > AGENT_AWAY_NS;
        if mode & ENFORCE_BLOCK != 0 && !away {
            let (checked_family, words) = normalized(family, &addr);
            let ok = local(checked_family, &words)
                || (port == 53 && redirect_dns(ctx, cfg, family, &addr, port))
                || allowed(id, checked_family, protocol, words, port, coarse);
            if !ok {
                verdict = VERDICT_DENIED;
            }
        }
    }
    let call = Call { hook, cgroup_id, pod, family, protocol, addr, port, verdict, coarse };
    record(cfg, call, || current_pod(cfg, Pods::Attached));
    verdict == VERDICT_ALLOWED
}

/// Reports one call, after the dedupe; `find_pod` looks up its pod when `call.pod` is 0 (not
/// needed for a call the dedupe folds).
///
/// The dedupe has two levels: this CPU's `RECENT` slot for the call (a repeat within the window
/// is counted there: an array index, a compare, an add) and the `DEDUPE` table shared by all
/// CPUs, which decides when a record is written and holds the totals. A slot's calls move to
/// the table when the slot is taken over or looked at after the window; the slot is emptied
/// before the table is added to, so a reader that takes the table and then the slots (the
/// agent's `dedupe_table`) may count a call late but never twice.
#[inline(always)]
fn record(cfg: &Config, call: Call, find_pod: impl Fn() -> Option<u64>) {
    let Call { hook, cgroup_id, mut pod, family, protocol, addr, port, verdict, coarse } = call;
    let window = cfg.dedupe_window_ns;
    let recent = if window != 0 { RECENT.get_ptr_mut(recent_slot(cgroup_id, &addr, port)) } else { None };
    // Calls folded on this CPU for this very key, to add to its total below.
    let mut carried = 0;
    if let Some(slot) = recent {
        // SAFETY: this CPU's slot, valid for this program run; programs on one CPU do not run
        // concurrently in these hooks.
        unsafe {
            if same_call(&(*slot).key, cgroup_id, &addr, port, family, protocol, verdict) {
                if coarse.wrapping_sub((*slot).last_event_ns) < window {
                    (*slot).pending += 1;
                    count(stats::CALLS_FOLDED);
                    return;
                }
                carried = (*slot).pending;
                (*slot).pending = 0;
            } else if (*slot).pending != 0 {
                let calls = (*slot).pending;
                (*slot).pending = 0;
                add_total(&(*slot).key, calls);
            }
        }
    }
    if pod == 0 {
        let Some(id) = find_pod() else {
            return;
        };
        pod = id;
    }
    let mut flags = FLAG_FIRST;
    let key = DedupeKey { cgroup_id, pod_cgroup_id: pod, addr, port, family, protocol, verdict, _pad: 0, _pad2: 0 };
    let mut total = 1 + carried;
    if window != 0 {
        let mut entry = DEDUPE.get_ptr_mut(key);
        if entry.is_none() {
            let fresh = DedupeValue { last_event_ns: coarse, total };
            if DEDUPE.insert(key, fresh, BPF_NOEXIST as u64).is_err() {
                // Another CPU inserted it first: count on its entry.
                entry = DEDUPE.get_ptr_mut(key);
            }
        }
        let mut last_event_ns = coarse;
        let mut folded = false;
        if let Some(value) = entry {
            // SAFETY: `value` points into the map's element, valid for this program run; the
            // counter is updated atomically, the timestamp is advisory.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).total, total);
                total = (*value).total;
                if coarse.wrapping_sub((*value).last_event_ns) < window {
                    last_event_ns = (*value).last_event_ns;
                    folded = true;
                } else {
                    (*value).last_event_ns = coarse;
                }
            }
            flags &= !FLAG_FIRST;
        }
        if let Some(slot) = recent {
            // SAFETY: as above.
            unsafe {
                (*slot).key = key;
                (*slot).last_event_ns = last_event_ns;
            }
        }
        if folded {
            count(stats::CALLS_FOLDED);
            return;
        }
    }
    // SAFETY: a helper without pointer arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if !take_budget(cfg, pod, now) {
        return;
    }
    let Some(mut slot) = EVENTS.reserve::<CallEvent>(0) else {
        count(stats::LOST_CALLS);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    slot.write(CallEvent {
        kind: KIND_CALL,
        flags,
        hook,
        verdict,
        protocol,
        timestamp_ns: now,
        cgroup_id,
        pod_cgroup_id: pod,
        total,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        addr,
        port,
        family,
        _pad: [0; 5],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    slot.submit(wake_flags());
    count(stats::CALL_EVENTS);
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the context pointer the kernel passed in.
    match unsafe { (*ctx.sock_addr).protocol } {
        6 => PROTO_TCP,
        _ => PROTO_UDP,
    }
}

#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as above; the port is in network order in the low 16 bits.
    u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16)
}

/// An address as the records keep it, from its four network-order words. Built from words, not
/// by copying into a zeroed byte array: LLVM lowers zeroing an unaligned byte array to a
/// byte-at-a-time `memset` subprogram, which every call paid twice.
#[inline(always)]
fn address(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, and any bytes are a valid [u8; 16]; the words' bytes stay in memory
    // order, as a byte copy would put them.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

#[inline(always)]
fn ipv4(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: as above; a connect4/sendmsg4 program may read user_ip4 only.
    address([unsafe { (*ctx.sock_addr).user_ip4 }, 0, 0, 0])
}

#[inline(always)]
fn ipv6(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: as above; user_ip6 is read a 32-bit word at a time, as the verifier requires.
    address(unsafe {
        [
            (*ctx.sock_addr).user_ip6[0],
            (*ctx.sock_addr).user_ip6[1],
            (*ctx.sock_addr).user_ip6[2],
            (*ctx.sock_addr).user_ip6[3],
        ]
    })
}

/// The verdict, masked: newer LLVM may spill it so the verifier cannot see it is 0 or 1.
#[inline(always)]
fn verdict(allow: bool) -> i32 {
    core::hint::black_box(i32::from(allow)) & 1
}

#[inline(always)]
fn allow() -> i32 {
    verdict(true)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    verdict(on_call(&ctx, HOOK_CONNECT, FAMILY_IPV4, protocol(&ctx), ipv4(&ctx), port(&ctx)))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    verdict(on_call(&ctx, HOOK_CONNECT, FAMILY_IPV6, protocol(&ctx), ipv6(&ctx), port(&ctx)))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(on_call(&ctx, HOOK_SENDMSG, FAMILY_IPV4, PROTO_UDP, ipv4(&ctx), port(&ctx)))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(on_call(&ctx, HOOK_SENDMSG, FAMILY_IPV6, PROTO_UDP, ipv6(&ctx), port(&ctx)))
}

/// Every TCP `connect()` of an armed pod, as its SYN is about to be sent (`sockops`: no lock,
/// and nothing for the other callbacks of a connection). A connect in repair mode sends no SYN
/// but passes here all the same; one whose route lookup failed sent nothing and does not.
#[sock_ops]
pub fn tcp_connect(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_tcp_connect(&ctx);
    }
    1
}

#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext) -> Option<()> {
    let cfg = config()?;
    let ops = ctx.ops;
    // Each field read on its own, at a constant offset, before any branch: the verifier takes
    // no context access through a pointer LLVM picked between two fields.
    // SAFETY: the context the kernel passed in; 32-bit reads of its fields (volatile, so LLVM
    // keeps them as they are written).
    let (family, ip4, ip6, remote_port) = unsafe {
        use core::ptr::read_volatile as read;
        (
            read(&raw const (*ops).family),
            read(&raw const (*ops).remote_ip4),
            [
                read(&raw const (*ops).remote_ip6[0]),
                read(&raw const (*ops).remote_ip6[1]),
                read(&raw const (*ops).remote_ip6[2]),
                read(&raw const (*ops).remote_ip6[3]),
            ],
            read(&raw const (*ops).remote_port),
        )
    };
    let (family, addr) = match family {
        2 => (FAMILY_IPV4, address([ip4, 0, 0, 0])),
        10 => (FAMILY_IPV6, address(ip6)),
        _ => return None,
    };
    // The port in network order in the upper half of the word.
    let port = u32::from_be(remote_port) as u16;
    // In the caller's `connect()`: the current task is the caller.
    // SAFETY: a helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let coarse = coarse_now(cfg);
    let mut pod = 0;
    if cfg.enforcing != 0 {
        pod = current_pod(cfg, Pods::Attached)?;
        if blocking(cfg, pod) {
            return None;
        }
    }
    let call = Call {
        hook: HOOK_CONNECT,
        cgroup_id,
        pod,
        family,
        protocol: PROTO_TCP,
        addr,
        port,
        verdict: VERDICT_ALLOWED,
        coarse,
    };
    record(cfg, call, || current_pod(cfg, Pods::Attached));
    Some(())
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_IPV4);
    allow()
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_IPV6);
    allow()
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_IPV4);
    allow()
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_IPV6);
    allow()
}

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    on_packet(&ctx, Direction::Answer);
    allow()
}

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    on_packet(&ctx, Direction::Query);
    allow()
}

/// Which way a packet program looks.
#[derive(Clone, Copy, PartialEq)]
enum Direction {
    /// Received: DNS answers, from port 53.
    Answer,
    /// Sent: UDP datagrams, and DNS queries, to port 53.
    Query,
}

/// Reads `N` bytes at `offset` of the packet's linear data, if they are there. Direct packet
/// access: no helper call, so the TCP packets of every monitored socket cost a few loads.
#[inline(always)]
fn peek<const N: usize>(data: usize, end: usize, offset: usize) -> Option<[u8; N]> {
    if data + offset + N > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above, as the verifier requires.
    Some(unsafe { core::ptr::read_unaligned((data + offset) as *const [u8; N]) })
}

/// Reads `N` bytes at `offset` of the packet, wherever they are (a helper call: for what
/// [`peek`] cannot reach).
#[inline(always)]
fn load<const N: usize>(skb: *mut __sk_buff, offset: u32) -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    // SAFETY: the skb pointer the kernel passed in, and a stack buffer of N bytes.
    let ret = unsafe { bpf_skb_load_bytes(skb as *const _, offset, bytes.as_mut_ptr().cast(), N as u32) };
    if ret != 0 { None } else { Some(bytes) }
}

/// UDP and UDP-Lite: the protocols whose datagrams are reported (both are `SOCK_DGRAM`).
#[inline(always)]
fn datagram(protocol: u8) -> bool {
    protocol == PROTO_UDP || protocol == PROTO_UDPLITE
}

/// The transport protocol and its header's offset in an IPv6 packet whose fixed header names
/// `next` as the next header: past up to four extension headers (hop-by-hop, routing,
/// destination options, the first fragment's fragment header). None for a later fragment or a
/// chain longer than that.
#[inline(always)]
fn ipv6_transport(skb: *mut __sk_buff, mut next: u8) -> Option<(u8, u32)> {
    let mut offset = 40u32;
    let mut i = 0;
    while i < 5 {
        match next {
            0 | 43 | 60 => {
                let h = load::<2>(skb, offset)?;
                next = h[0];
                offset += (u32::from(h[1]) + 1) * 8;
            }
            44 => {
                let h = load::<4>(skb, offset)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                offset += 8;
            }
            _ => return Some((next, offset)),
        }
        i += 1;
    }
    None
}

/// Reports a UDP datagram an armed pod sends (not one of a block-mode pod, whose `sendmsg` and
/// `connect` programs report and decide its calls). Every datagram passes here, in the sender's
/// `send()`, so the current task is the sender; a repeat within the dedupe window costs an
/// index into this CPU's slots and a compare (see [`record`]).
#[inline(always)]
fn on_datagram(skb: *mut __sk_buff, family: u8, addr: [u8; 16], port: u16) -> Option<()> {
    let cfg = config()?;
    // SAFETY: the skb pointer the kernel passed in.
    let find_pod = || monitored_ancestor(cfg, Pods::Attached, |l| unsafe { bpf_skb_ancestor_cgroup_id(skb, l) });
    let mut pod = 0;
    if cfg.enforcing != 0 {
        pod = find_pod()?;
        if blocking(cfg, pod) {
            return None;
        }
    }
    // The sending socket's cgroup (the one the program runs for).
    // SAFETY: as above.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    let call = Call {
        hook: HOOK_SENDMSG,
        cgroup_id,
        pod,
        family,
        protocol: PROTO_UDP,
        addr,
        port,
        verdict: VERDICT_ALLOWED,
        coarse: coarse_now(cfg),
    };
    record(cfg, call, find_pod);
    Some(())
}

/// On the way in, copies a DNS answer (UDP from port 53) received by a monitored cgroup; on the
/// way out, reports each UDP datagram as a call and copies DNS queries (UDP to port 53), so
/// that an answer is believed only when it matches one. TCP packets cost a few loads.
#[inline(always)]
fn on_packet(ctx: &SkBuffContext, direction: Direction) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: the context the kernel passed in; the verifier turns these into packet pointers.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // The program runs with data at the IP header. (Any IP packet holds 20 bytes; a 1-byte
    // check would compile to a compare the verifier does not take as a bound.)
    let header = peek::<20>(data, end, 0)?;
    let first = header[0];
    if direction == Direction::Query {
        note_resolver_client(ctx, data, end, first);
    }
    // The peer: an answer's source, a query's (a datagram's) destination.
    let (family, protocol, udp, peer) = match first >> 4 {
        4 => {
            // The first fragment only carries the UDP header.
            if !datagram(header[9]) || u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
                return None;
            }
            let at = if direction == Direction::Answer { 12 } else { 16 };
            let mut peer = [0; 16];
            peer[..4].copy_from_slice(&header[at..at + 4]);
            (FAMILY_IPV4, header[9], u32::from(first & 0x0f) * 4, peer)
        }
        6 => {
            let header = peek::<40>(data, end, 0)?;
            let (protocol, udp) = if datagram(header[6]) { (header[6], 40) } else { ipv6_transport(skb, header[6])? };
            if !datagram(protocol) {
                return None;
            }
            let at = if direction == Direction::Answer { 8 } else { 24 };
            let mut peer = [0; 16];
            peer.copy_from_slice(&header[at..at + 16]);
            (FAMILY_IPV6, protocol, udp, peer)
        }
        _ => return None,
    };
    let ports = match peek::<4>(data, end, udp as usize) {
        Some(ports) => ports,
        None => load::<4>(skb, udp)?,
    };
    let (source, destination) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
    if direction == Direction::Query {
        on_datagram(skb, family, peer, destination);
    }
    let client_port = match direction {
        Direction::Answer if source == 53 && protocol == PROTO_UDP => destination,
        Direction::Query if destination == 53 && protocol == PROTO_UDP => source,
        _ => return None,
    };
    let server = peer;
    let udp = udp as usize;
    let cfg = config()?;
    // SAFETY: the skb pointer the kernel passed in.
    let pod = monitored_ancestor(cfg, Pods::Attached, |l| unsafe { bpf_skb_ancestor_cgroup_id(skb, l) })?;
    let offset = udp + 8;
    let length = (ctx.len() as usize).checked_sub(offset)?;
    if length == 0 {
        return None;
    }
    // A bound the verifier can see, 1..=DNS_CAPTURE, computed where LLVM cannot fold it away.
    let captured = core::hint::black_box(if length > DNS_CAPTURE { DNS_CAPTURE } else { length });
    let captured = ((captured - 1) & (DNS_CAPTURE - 1)) + 1;
    // SAFETY: a helper without pointer arguments.
    if !take_budget(cfg, pod, unsafe { bpf_ktime_get_boot_ns() }) {
        return None;
    }
    let Some(mut slot) = EVENTS.reserve::<DnsEvent>(0) else {
        count(stats::LOST_DNS);
        return None;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` is the reserved record, written field by field before submit; the copy
    // reads `captured` bytes (bounded above) of the packet into its payload.
    unsafe {
        (*event).kind = if direction == Direction::Answer { KIND_DNS } else { KIND_DNS_QUERY };
        (*event).captured = captured as u32;
        (*event).timestamp_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = bpf_skb_cgroup_id(skb);
        (*event).pod_cgroup_id = pod;
        (*event).length = length as u32;
        (*event).family = family;
        (*event).ifindex = (*skb).ifindex;
        (*event)._pad = 0;
        (*event).client_port = client_port;
        (*event).server = server;
        if bpf_skb_load_bytes(skb as *const _, offset as u32, (*event).payload.as_mut_ptr().cast(), captured as u32)
            != 0
        {
            slot.discard(0);
            return None;
        }
    }
    slot.submit(wake_flags());
    count(stats::DNS_EVENTS);
    if length > DNS_CAPTURE {
        count(stats::DNS_CUT);
    }
    Some(())
}

/// A block-mode pod's query to the agent's resolver (a packet, UDP or TCP, to its address and
/// port): which pod sent it, by source address and port, so the resolver knows whose query it
/// answers. Written before the packet leaves the pod, so before the resolver reads it.
#[inline(always)]
fn note_resolver_client(ctx: &SkBuffContext, data: usize, end: usize, first: u8) -> Option<()> {
    let cfg = config()?;
    if cfg.resolver_port == 0 {
        return None;
    }
    let (family, protocol, transport, source) = match first >> 4 {
        4 => {
            let header = peek::<20>(data, end, 0)?;
            if cfg.resolver_ip4 == 0
                || u32::from_ne_bytes([header[16], header[17], header[18], header[19]]) != cfg.resolver_ip4
            {
                return None;
            }
            let mut source = [0; 16];
            source[..4].copy_from_slice(&header[12..16]);
            (FAMILY_IPV4, header[9], usize::from(header[0] & 0x0f) * 4, source)
        }
        6 => {
            let header = peek::<40>(data, end, 0)?;
            let mut destination = [0u8; 16];
            destination.copy_from_slice(&header[24..40]);
            // SAFETY: same size, any bytes are valid words.
            if cfg.resolver_ip6 == [0; 4]
                || unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(destination) } != cfg.resolver_ip6
            {
                return None;
            }
            let mut source = [0; 16];
            source.copy_from_slice(&header[8..24]);
            // The transport header right after the fixed header: a query carries no extension
            // headers (one that does goes unnoted, and so unanswered).
            (FAMILY_IPV6, header[6], 40, source)
        }
        _ => return None,
    };
    if protocol != PROTO_UDP && protocol != PROTO_TCP {
        return None;
    }
    let ports = peek::<4>(data, end, transport)?;
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.resolver_port {
        return None;
    }
    let skb = ctx.skb.skb;
    // SAFETY: the skb pointer the kernel passed in.
    let pod = monitored_ancestor(cfg, Pods::Attached, |l| unsafe { bpf_skb_ancestor_cgroup_id(skb, l) })?;
    let key = ClientKey { addr: source, port: u16::from_be_bytes([ports[0], ports[1]]), protocol, family };
    let _ = CLIENTS.insert(key, pod, 0);
    Some(())
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: the
/// path a monitored process executed, so calls can name the program and not only its `comm`
/// (which any process can set).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    on_exec(&ctx);
    0
}

#[inline(always)]
fn on_exec(ctx: &BtfTracePointContext) -> Option<()> {
    let cfg = config()?;
    if (cfg.monitored_levels == 0 && cfg.pod_parents[0] == 0) || cfg.exec_filename_offset == 0 {
        return None;
    }
    let pod = current_pod(cfg, Pods::Marked)?;
    let bprm: *const u8 = ctx.arg(2);
    // SAFETY: a kernel pointer read through the helper, which checks it; the offset comes from
    // this kernel's BTF.
    let filename: *const u8 =
        unsafe { bpf_probe_read_kernel(bprm.add(cfg.exec_filename_offset as usize) as *const *const u8) }.ok()?;
    // SAFETY: a helper without pointer arguments.
    if !take_budget(cfg, pod, unsafe { bpf_ktime_get_boot_ns() }) {
        return None;
    }
    let Some(mut slot) = EVENTS.reserve::<ExecEvent>(0) else {
        count(stats::LOST_EXEC);
        return None;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: the reserved record, written field by field before submit.
    unsafe {
        (*event).kind = KIND_EXEC;
        (*event).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*event).timestamp_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = bpf_get_current_cgroup_id();
        (*event).pod_cgroup_id = pod;
        if bpf_probe_read_kernel_str_bytes(filename, &mut (*event).path).is_err() {
            (*event).path[0] = 0;
        }
    }
    slot.submit(wake_flags());
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
