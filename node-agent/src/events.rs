//! Decodes the kernel's ring-buffer records ([`runwarden_ebpf_common`]) into Rust values. Reads
//! field by field at the `#[repr(C)]` offsets, so a short, long or garbage record is an error,
//! never a panic or an out-of-bounds read.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use runwarden_ebpf_common::{
    CallEvent, DNS_CAPTURE, DedupeKey, DedupeValue, DnsEvent, EXEC_PATH, ExecEvent, FAMILY_IPV4, FAMILY_IPV6,
    FLAG_FIRST, HOOK_CONNECT, HOOK_SENDMSG, KIND_CALL, KIND_DNS, KIND_DNS_QUERY, KIND_EXEC, PROTO_TCP, PROTO_UDP,
    VERDICT_ALLOWED, VERDICT_DENIED,
};

/// Transport protocol of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Which hook saw a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `connect()`.
    Connect,
    /// `sendto()`/`sendmsg()` with an address (unconnected UDP).
    Sendmsg,
    /// Not known: the call was found in the kernel's dedupe table after its record was lost.
    Unknown,
}

impl Hook {
    /// `connect`, `sendmsg` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendmsg",
            Hook::Unknown => "unknown",
        }
    }
}

/// What the kernel did with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// It went ahead.
    Allowed,
    /// It was refused with EPERM.
    Denied,
}

/// An outbound call, decoded from a [`CallEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Nanoseconds since boot.
    pub timestamp_ns: u64,
    /// The caller's cgroup id.
    pub cgroup_id: u64,
    /// The monitored (pod-level) ancestor.
    pub pod_cgroup_id: u64,
    /// Calls from `cgroup_id` to this destination counted by the kernel so far.
    pub total: u64,
    /// The first call to this destination in the kernel's dedupe table (a new count).
    pub first: bool,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The calling thread's name.
    pub comm: String,
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Transport.
    pub proto: Proto,
    /// Which hook.
    pub hook: Hook,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// The kernel's dedupe-table key for this call (cgroup and destination as the kernel saw
    /// them), to match its counts.
    pub key: DedupeKey,
}

/// A DNS answer a monitored cgroup received, or a query it sent, decoded from a [`DnsEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsMessage {
    /// Whether it is a query the pod sent (else an answer it received).
    pub query: bool,
    /// Nanoseconds since boot.
    pub timestamp_ns: u64,
    /// The receiving (sending) socket's cgroup id.
    pub cgroup_id: u64,
    /// The monitored (pod-level) ancestor.
    pub pod_cgroup_id: u64,
    /// The server that answered (was asked).
    pub server: IpAddr,
    /// The pod's UDP port: the answer's destination, the query's source.
    pub client_port: u16,
    /// The interface it arrived (left) on, in the pod's network namespace.
    pub ifindex: u32,
    /// The message's length as received (the capture may be shorter).
    pub length: u32,
    /// The captured message.
    pub message: Vec<u8>,
}

impl DnsMessage {
    /// Whether it arrived (left) on the loopback device (ifindex 1 in every network
    /// namespace): from (to) inside the pod, whatever its source address.
    pub fn loopback(&self) -> bool {
        self.ifindex == 1
    }
}

/// A program a monitored process executed, decoded from an [`ExecEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    /// Nanoseconds since boot.
    pub timestamp_ns: u64,
    /// Process id.
    pub pid: u32,
    /// The process's cgroup id.
    pub cgroup_id: u64,
    /// The monitored (pod-level) ancestor.
    pub pod_cgroup_id: u64,
    /// The path it was executed by (as given to `execve`, so possibly relative).
    pub path: String,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An outbound call.
    Call(Call),
    /// A DNS answer or query.
    Dns(DnsMessage),
    /// A program executed.
    Exec(Exec),
}

/// Why a record could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the record's kind needs.
    #[error("record of {got} bytes, {need} needed")]
    Short {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An unknown kind.
    #[error("unknown record kind {0}")]
    Kind(u32),
    /// A field out of range (family, protocol, hook, verdict, capture length).
    #[error("bad {0}")]
    Field(&'static str),
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn array<const N: usize>(&self, at: usize) -> [u8; N] {
        // Callers check the record's length against its size first.
        self.0[at..at + N].try_into().unwrap()
    }
    fn u8(&self, at: usize) -> u8 {
        self.0[at]
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_ne_bytes(self.array(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.array(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.array(at))
    }
}

fn address(family: u8, bytes: [u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        FAMILY_IPV4 => Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        FAMILY_IPV6 => {
            let v6 = Ipv6Addr::from(bytes);
            // Dual-stack sockets reach IPv4 destinations as ::ffff:a.b.c.d.
            Ok(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => Err(DecodeError::Field("family")),
    }
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Result<Record, DecodeError> {
    if record.len() < 4 {
        return Err(DecodeError::Short { got: record.len(), need: 4 });
    }
    let b = Bytes(record);
    let need =
        |n: usize| if record.len() < n { Err(DecodeError::Short { got: record.len(), need: n }) } else { Ok(()) };
    match b.u32(0) {
        KIND_CALL => {
            need(size_of::<CallEvent>())?;
            let comm = b.array::<16>(offset_of!(CallEvent, comm));
            let comm_len = comm.iter().position(|&c| c == 0).unwrap_or(16);
            let family = b.u8(offset_of!(CallEvent, family));
            let addr = b.array(offset_of!(CallEvent, addr));
            let port = b.u16(offset_of!(CallEvent, port));
            let protocol = b.u8(offset_of!(CallEvent, protocol));
            let cgroup_id = b.u64(offset_of!(CallEvent, cgroup_id));
            let pod_cgroup_id = b.u64(offset_of!(CallEvent, pod_cgroup_id));
            let verdict_byte = b.u8(offset_of!(CallEvent, verdict));
            Ok(Record::Call(Call {
                timestamp_ns: b.u64(offset_of!(CallEvent, timestamp_ns)),
                cgroup_id,
                pod_cgroup_id,
                total: b.u64(offset_of!(CallEvent, total)),
                first: b.u8(offset_of!(CallEvent, flags)) & FLAG_FIRST != 0,
                pid: b.u32(offset_of!(CallEvent, pid)),
                tid: b.u32(offset_of!(CallEvent, tid)),
                comm: String::from_utf8_lossy(&comm[..comm_len]).into_owned(),
                ip: address(family, addr)?,
                port,
                proto: match protocol {
                    PROTO_TCP => Proto::Tcp,
                    PROTO_UDP => Proto::Udp,
                    _ => return Err(DecodeError::Field("protocol")),
                },
                hook: match b.u8(offset_of!(CallEvent, hook)) {
                    HOOK_CONNECT => Hook::Connect,
                    HOOK_SENDMSG => Hook::Sendmsg,
                    _ => return Err(DecodeError::Field("hook")),
                },
                verdict: verdict(verdict_byte).ok_or(DecodeError::Field("verdict"))?,
                key: DedupeKey {
                    cgroup_id,
                    pod_cgroup_id,
                    addr,
                    port,
                    family,
                    protocol,
                    verdict: verdict_byte,
                    _pad: 0,
                    _pad2: 0,
                },
            }))
        }
        KIND_DNS | KIND_DNS_QUERY => {
            need(offset_of!(DnsEvent, payload))?;
            let captured = b.u32(offset_of!(DnsEvent, captured)) as usize;
            if captured > DNS_CAPTURE {
                return Err(DecodeError::Field("captured"));
            }
            let start = offset_of!(DnsEvent, payload);
            need(start + captured)?;
            Ok(Record::Dns(DnsMessage {
                query: b.u32(0) == KIND_DNS_QUERY,
                timestamp_ns: b.u64(offset_of!(DnsEvent, timestamp_ns)),
                cgroup_id: b.u64(offset_of!(DnsEvent, cgroup_id)),
                pod_cgroup_id: b.u64(offset_of!(DnsEvent, pod_cgroup_id)),
                server: address(b.u8(offset_of!(DnsEvent, family)), b.array(offset_of!(DnsEvent, server)))?,
                client_port: b.u16(offset_of!(DnsEvent, client_port)),
                ifindex: b.u32(offset_of!(DnsEvent, ifindex)),
                length: b.u32(offset_of!(DnsEvent, length)),
                message: record[start..start + captured].to_vec(),
            }))
        }
        KIND_EXEC => {
            need(size_of::<ExecEvent>())?;
            let path = b.array::<EXEC_PATH>(offset_of!(ExecEvent, path));
            let len = path.iter().position(|&c| c == 0).unwrap_or(EXEC_PATH);
            Ok(Record::Exec(Exec {
                timestamp_ns: b.u64(offset_of!(ExecEvent, timestamp_ns)),
                pid: b.u32(offset_of!(ExecEvent, pid)),
                cgroup_id: b.u64(offset_of!(ExecEvent, cgroup_id)),
                pod_cgroup_id: b.u64(offset_of!(ExecEvent, pod_cgroup_id)),
                path: String::from_utf8_lossy(&path[..len]).into_owned(),
            }))
        }
        other => Err(DecodeError::Kind(other)),
    }
}

/// Encodes an exec record as the kernel would: for tests and benchmarks of the pipeline.
pub fn encode_exec(exec: &Exec) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<ExecEvent>()];
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &KIND_EXEC.to_ne_bytes());
    put(offset_of!(ExecEvent, pid), &exec.pid.to_ne_bytes());
    put(offset_of!(ExecEvent, timestamp_ns), &exec.timestamp_ns.to_ne_bytes());
    put(offset_of!(ExecEvent, cgroup_id), &exec.cgroup_id.to_ne_bytes());
    put(offset_of!(ExecEvent, pod_cgroup_id), &exec.pod_cgroup_id.to_ne_bytes());
    let path = exec.path.as_bytes();
    put(offset_of!(ExecEvent, path), &path[..path.len().min(EXEC_PATH - 1)]);
    out
}

/// An address as the kernel writes it: family and 16 bytes, IPv4 in the first 4.
pub(crate) fn to_wire(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, a)
        }
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

/// Encodes a call as the kernel would: for tests and benchmarks of the pipeline.
pub fn encode_call(call: &Call) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<CallEvent>()];
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    let (family, addr) = to_wire(call.ip);
    put(0, &KIND_CALL.to_ne_bytes());
    put(offset_of!(CallEvent, flags), &[if call.first { FLAG_FIRST } else { 0 }]);
    put(offset_of!(CallEvent, hook), &[if call.hook == Hook::Sendmsg { HOOK_SENDMSG } else { HOOK_CONNECT }]);
    put(
        offset_of!(CallEvent, verdict),
        &[if call.verdict == Verdict::Allowed { VERDICT_ALLOWED } else { VERDICT_DENIED }],
    );
    put(offset_of!(CallEvent, protocol), &[if call.proto == Proto::Tcp { PROTO_TCP } else { PROTO_UDP }]);
    put(offset_of!(CallEvent, timestamp_ns), &call.timestamp_ns.to_ne_bytes());
    put(offset_of!(CallEvent, cgroup_id), &call.cgroup_id.to_ne_bytes());
    put(offset_of!(CallEvent, pod_cgroup_id), &call.pod_cgroup_id.to_ne_bytes());
    put(offset_of!(CallEvent, total), &call.total.to_ne_bytes());
    put(offset_of!(CallEvent, pid), &call.pid.to_ne_bytes());
    put(offset_of!(CallEvent, tid), &call.tid.to_ne_bytes());
    put(offset_of!(CallEvent, addr), &addr);
    put(offset_of!(CallEvent, port), &call.port.to_ne_bytes());
    put(offset_of!(CallEvent, family), &[family]);
    let comm = call.comm.as_bytes();
    put(offset_of!(CallEvent, comm), &comm[..comm.len().min(15)]);
    out
}

/// Encodes a DNS answer or query as the kernel would: for tests and benchmarks of the pipeline.
pub fn encode_dns(answer: &DnsMessage) -> Vec<u8> {
    let captured = answer.message.len().min(DNS_CAPTURE);
    let mut out = vec![0u8; size_of::<DnsEvent>()];
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    let (family, server) = to_wire(answer.server);
    put(0, &(if answer.query { KIND_DNS_QUERY } else { KIND_DNS }).to_ne_bytes());
    put(offset_of!(DnsEvent, captured), &(captured as u32).to_ne_bytes());
    put(offset_of!(DnsEvent, timestamp_ns), &answer.timestamp_ns.to_ne_bytes());
    put(offset_of!(DnsEvent, cgroup_id), &answer.cgroup_id.to_ne_bytes());
    put(offset_of!(DnsEvent, pod_cgroup_id), &answer.pod_cgroup_id.to_ne_bytes());
    put(offset_of!(DnsEvent, length), &answer.length.to_ne_bytes());
    put(offset_of!(DnsEvent, family), &[family]);
    put(offset_of!(DnsEvent, ifindex), &answer.ifindex.to_ne_bytes());
    put(offset_of!(DnsEvent, client_port), &answer.client_port.to_ne_bytes());
    put(offset_of!(DnsEvent, server), &server);
    put(offset_of!(DnsEvent, payload), &answer.message[..captured]);
    out
}

/// The kernel's dedupe key for an allowed call from `cgroup_id` (below `pod_cgroup_id`) to
/// `ip:port` over `proto` (IPv4 as an IPv4 socket reports it).
pub fn dedupe_key(cgroup_id: u64, pod_cgroup_id: u64, ip: IpAddr, port: u16, proto: Proto) -> DedupeKey {
    let (family, addr) = to_wire(ip);
    let protocol = if proto == Proto::Tcp { PROTO_TCP } else { PROTO_UDP };
    DedupeKey { cgroup_id, pod_cgroup_id, addr, port, family, protocol, verdict: VERDICT_ALLOWED, _pad: 0, _pad2: 0 }
}

fn verdict(byte: u8) -> Option<Verdict> {
    match byte {
        VERDICT_ALLOWED => Some(Verdict::Allowed),
        VERDICT_DENIED => Some(Verdict::Denied),
        _ => None,
    }
}

/// The call a dedupe-table entry stands for, when its record was lost: no process, no hook
/// (the table keeps neither), the time of the last record the kernel wrote (or tried to) for it.
pub fn call_from_table(key: &DedupeKey, value: &DedupeValue) -> Option<Call> {
    Some(Call {
        timestamp_ns: value.last_event_ns,
        cgroup_id: key.cgroup_id,
        pod_cgroup_id: key.pod_cgroup_id,
        total: value.total,
        first: true,
        pid: 0,
        tid: 0,
        comm: String::new(),
        ip: address(key.family, key.addr).ok()?,
        port: key.port,
        proto: match key.protocol {
            PROTO_TCP => Proto::Tcp,
            PROTO_UDP => Proto::Udp,
            _ => return None,
        },
        hook: Hook::Unknown,
        verdict: verdict(key.verdict)?,
        key: *key,
    })
}
