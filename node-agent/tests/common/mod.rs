//! Test "pods" on the real kernel: cgroups under a test root laid out as kubelet lays them out,
//! real processes in them, network namespaces joined to the host by veth pairs, a DNS server on
//! the host side that answers what the test says, and the agent's programs attached to the test
//! root. Needs root (CI runs as root).

#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use runwarden_agent::cgroups::CgroupIndex;
use runwarden_agent::dns::RecordData;
use runwarden_agent::ebpf::{self, Options, PodBudget, Probes, Reader};
use runwarden_agent::pipeline::{Observation, Pipeline, PipelineConfig};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Fails the test with a clear message when not root: these tests load BPF programs.
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
    });
    assert_eq!(uid.as_deref(), Some("0"), "the kernel tests load BPF programs and make cgroups: run them as root");
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// Python defining what [`steps`] scripts call: `attempt(family, kind, addr, send=False)` (a
/// connect, and for UDP a datagram on the connected socket, or with `send` a datagram sent
/// unconnected, with a 2 s timeout: `ok` or the errno's name), `resolve(name, family)`
/// (its first address of `family`, IPv4 by default, through the libc resolver, or
/// `unresolved`), `ask(server, name, qtype=1, tcp=False)` (one query to `server` port 53:
/// `peer port rcode first-address`, `-` for none; or the errno's name, or `timeout`), and `T`,
/// `U`, `V4`, `V6`.
pub const STEPS_PRELUDE: &str = r#"
import errno, socket
def attempt(family, kind, addr, send=False):
    s = socket.socket(family, kind)
    s.settimeout(2)
    try:
        if send:
            s.sendto(b"x", addr)
        else:
            s.connect(addr)
            if kind == socket.SOCK_DGRAM:
                s.send(b"x")
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
def resolve(name, family=socket.AF_INET):
    try:
        return socket.getaddrinfo(name, 443, family, socket.SOCK_DGRAM)[0][4][0]
    except socket.gaierror:
        return "unresolved"
def ask(server, name, qtype=1, tcp=False):
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    query = bytes([0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]) + labels + bytes([0, 0, qtype, 0, 1])
    s = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        if tcp:
            s.connect((server, 53))
            s.sendall(len(query).to_bytes(2, "big") + query)
            n = int.from_bytes(s.recv(2), "big")
            reply = b""
            while len(reply) < n:
                reply += s.recv(n - len(reply))
            peer = s.getpeername()
        else:
            s.sendto(query, (server, 53))
            reply, peer = s.recvfrom(512)
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    rdata = (4, socket.AF_INET) if qtype == 1 else (16, socket.AF_INET6)
    answered = int.from_bytes(reply[6:8], "big") > 0
    address = socket.inet_ntop(rdata[1], reply[-rdata[0]:]) if answered else "-"
    return "%s %d %d %s" % (peer[0], peer[1], reply[3] & 15, address)
T, U, V4, V6 = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.AF_INET, socket.AF_INET6
"#;

/// Runs Python `steps` (expressions using [`STEPS_PRELUDE`]) in `cgroup` inside `ns`, printing
/// each; the printed lines.
pub fn steps(cgroup: &Path, ns: &NetNs, steps: &[String]) -> Vec<String> {
    let body: Vec<String> = steps.iter().map(|s| format!("print({s})")).collect();
    let out = python(cgroup, Some(ns), &format!("{STEPS_PRELUDE}\n{}", body.join("\n")));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Deletes `key` from this machine's BPF maps named `name` by map id (bpftool), as a privileged
/// process could; whether one held it.
pub fn delete_from_maps_named(name: &str, key: &[u8]) -> bool {
    let maps = Command::new("bpftool").args(["-j", "map", "show"]).output().unwrap();
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&maps.stdout).unwrap();
    let key: Vec<String> = key.iter().map(|b| format!("0x{b:02x}")).collect();
    maps.iter().filter(|m| m["name"] == name).any(|m| {
        let id = m["id"].as_u64().unwrap().to_string();
        let mut args = vec!["map", "delete", "id", id.as_str(), "key"];
        args.extend(key.iter().map(String::as_str));
        Command::new("bpftool").args(&args).output().unwrap().status.success()
    })
}

/// `bytes` as the list inside a Python `bytes([...])`.
pub fn py_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

/// A DNS query for `name` (type A) with transaction id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend(label.as_bytes());
    }
    m.extend([0, 0, 1, 0, 1]);
    m
}

/// Encodes a DNS response: the question (`qtype`), then `answers` (owner, ttl, data). With
/// `compress`, owners equal to the question are written as a pointer to it.
pub fn dns_response(
    id: u16,
    question: &str,
    qtype: u16,
    answers: &[(&str, u32, RecordData)],
    compress: bool,
    tc: bool,
) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend([0x81 | if tc { 0x02 } else { 0 }, 0x80, 0, 1]);
    m.extend((answers.len() as u16).to_be_bytes());
    m.extend([0, 0, 0, 0]);
    let name = |m: &mut Vec<u8>, n: &str| {
        if compress && n == question {
            m.extend([0xc0, 12]);
            return;
        }
        for label in n.split('.') {
            m.push(label.len() as u8);
            m.extend(label.as_bytes());
        }
        m.push(0);
    };
    for label in question.split('.') {
        m.push(label.len() as u8);
        m.extend(label.as_bytes());
    }
    m.push(0);
    m.extend(qtype.to_be_bytes());
    m.extend([0, 1]);
    for (owner, ttl, data) in answers {
        name(&mut m, owner);
        let (rtype, rdata) = match data {
            RecordData::A(v4) => (1u16, v4.octets().to_vec()),
            RecordData::Aaaa(v6) => (28, v6.octets().to_vec()),
            RecordData::Cname(target) => {
                let mut r = Vec::new();
                name(&mut r, target);
                (5, r)
            }
            RecordData::Other(t) => (*t, vec![1, 2, 3]),
        };
        m.extend(rtype.to_be_bytes());
        m.extend([0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend((rdata.len() as u16).to_be_bytes());
        m.extend(rdata);
    }
    m
}

/// What the test DNS server answers for a name.
#[derive(Clone, Debug)]
pub enum Zone {
    /// Records (owner, data), TTL 300; the server sends those matching the query type plus
    /// every CNAME.
    Records(Vec<(String, RecordData)>),
    /// These bytes, whatever was asked (a malformed answer).
    Garbage(Vec<u8>),
}

/// A DNS server on port 53 (UDP and TCP) of a host-side address, answering from a table the
/// test fills.
pub struct DnsServer {
    pub zones: Arc<Mutex<HashMap<String, Zone>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The test server's reply to `query`, from `zones`.
fn zone_reply(zones: &Mutex<HashMap<String, Zone>>, query: &[u8]) -> Option<Vec<u8>> {
    let (id, name, qtype) = question(query)?;
    let zone = zones.lock().unwrap().get(&name).cloned();
    Some(match zone {
        Some(Zone::Garbage(bytes)) => bytes,
        Some(Zone::Records(records)) => {
            let answers: Vec<(&str, u32, RecordData)> = records
                .iter()
                .filter(|(_, d)| match d {
                    RecordData::A(_) => qtype == 1,
                    RecordData::Aaaa(_) => qtype == 28,
                    _ => true,
                })
                .map(|(o, d)| (o.as_str(), 300, d.clone()))
                .collect();
            dns_response(id, &name, qtype, &answers, true, false)
        }
        None => dns_response(id, &name, qtype, &[], false, false),
    })
}

impl DnsServer {
    pub fn start(addr: IpAddr) -> Self {
        let socket = UdpSocket::bind((addr, 53)).unwrap_or_else(|e| panic!("binding {addr}:53: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let tcp = std::net::TcpListener::bind((addr, 53)).unwrap_or_else(|e| panic!("binding {addr}:53/tcp: {e}"));
        tcp.set_nonblocking(true).unwrap();
        let zones: Arc<Mutex<HashMap<String, Zone>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (z, s) = (zones.clone(), stop.clone());
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                if let Some(reply) = zone_reply(&z, &buf[..n]) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        let (z, s) = (zones.clone(), stop.clone());
        let tcp = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                // One message each way, length-prefixed.
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if conn.read_exact(&mut query).is_err() {
                    continue;
                }
                if let Some(reply) = zone_reply(&z, &query) {
                    let _ = conn.write_all(&(reply.len() as u16).to_be_bytes());
                    let _ = conn.write_all(&reply);
                }
            }
        });
        Self { zones, stop, threads: vec![udp, tcp] }
    }

    pub fn set(&self, name: &str, zone: Zone) {
        self.zones.lock().unwrap().insert(name.to_string(), zone);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// (id, question name, qtype) of a query.
fn question(q: &[u8]) -> Option<(u16, String, u16)> {
    let id = u16::from_be_bytes([*q.first()?, *q.get(1)?]);
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((id, labels.join("."), qtype))
}

/// A network namespace joined to the host by a veth pair, with IPv4 and IPv6 addresses on
/// both ends, a default route to the host and a resolv.conf naming the host end.
pub struct NetNs {
    pub name: String,
    pub host_v4: Ipv4Addr,
    pub pod_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub pod_v6: Ipv6Addr,
    pod_if: String,
}

fn sweep_stale_namespaces() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(pid) = name.strip_prefix("rwt").and_then(|r| r.split('-').next()) else { continue };
            if !Path::new("/proc").join(pid).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
                let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
            }
        }
    });
}

impl NetNs {
    pub fn new() -> Self {
        sweep_stale_namespaces();
        let pid = std::process::id();
        let n = next() % 250;
        // The third octet is the namespace's; the second keeps runs of different processes apart.
        let net = 100 + (pid % 100) as u8;
        let name = format!("rwt{pid}-{n}");
        let (host_if, pod_if) = (format!("rwh{}x{n}", pid % 100_000), format!("rwp{}x{n}", pid % 100_000));
        let (host_v4, pod_v4) = (Ipv4Addr::new(10, net, n as u8, 1), Ipv4Addr::new(10, net, n as u8, 2));
        let host_v6: Ipv6Addr = format!("fd00:{net}:{n}::1").parse().unwrap();
        let pod_v6: Ipv6Addr = format!("fd00:{net}:{n}::2").parse().unwrap();
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &pod_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_v4}/24"), "dev", &host_if]);
        ip(&["addr", "add", &format!("{host_v6}/64"), "dev", &host_if, "nodad"]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", name.as_str()];
            all.extend(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{pod_v4}/24"), "dev", &pod_if]);
        inside(&["addr", "add", &format!("{pod_v6}/64"), "dev", &pod_if, "nodad"]);
        inside(&["link", "set", &pod_if, "up"]);
        inside(&["route", "add", "default", "via", &host_v4.to_string()]);
        inside(&["-6", "route", "add", "default", "via", &host_v6.to_string()]);
        let etc = Path::new("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {host_v4}\noptions timeout:1 attempts:2\n"))
            .unwrap();
        // An empty hosts file: names come from DNS only.
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        Self { name, host_v4, pod_v4, host_v6, pod_v6, pod_if }
    }

    /// Takes the pod end's IPv4 address away and names the host end's IPv6 address in its
    /// resolv.conf: a pod of an IPv6-only cluster.
    pub fn ipv6_only(&self) {
        ip(&["-n", &self.name, "addr", "del", &format!("{}/24", self.pod_v4), "dev", &self.pod_if]);
        let resolv_conf = format!("nameserver {}\noptions timeout:1 attempts:2\n", self.host_v6);
        std::fs::write(Path::new("/etc/netns").join(&self.name).join("resolv.conf"), resolv_conf).unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Runs `python3 -c script` with its process in `cgroup` (moved there before exec), inside
/// `netns` when given (entered after the move: `ip netns exec` hides the host's /sys).
pub fn python(cgroup: &Path, netns: Option<&NetNs>, script: &str) -> Output {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""]).arg(cgroup);
    if let Some(ns) = netns {
        cmd.args(["ip", "netns", "exec", &ns.name]);
    }
    cmd.args(["python3", "-c", script]);
    sh(&mut cmd)
}

/// A kubelet-style pod cgroup with one container cgroup.
pub struct Pod {
    pub uid: String,
    pub dir: PathBuf,
    pub container_id: String,
    pub container: PathBuf,
    pub cgroup_id: u64,
}

/// cgroup layouts kubelet makes.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// systemd driver, burstable: kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
    SystemdBurstable,
    /// systemd driver, guaranteed: kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope
    SystemdGuaranteed,
    /// cgroupfs driver, besteffort: kubepods/besteffort/pod<uid>/<id>
    CgroupfsBestEffort,
}

/// The agent's programs attached to a fresh test root cgroup, with a pipeline that attributes
/// calls to pods.
pub struct Agent {
    pub probes: Probes,
    reader: Reader,
    pub pipeline: Pipeline,
    pub mount: PathBuf,
    pub root: PathBuf,
}

impl Agent {
    pub fn start(dedupe_window: Duration) -> Self {
        Self::start_with(dedupe_window, PodBudget::OFF)
    }

    /// With each pod's kernel record budget (the agent's default is on; tests of the ring buffer
    /// itself turn it off).
    pub fn start_with(dedupe_window: Duration, pod_budget: PodBudget) -> Self {
        require_root();
        let mount = ebpf::cgroup2_mount().expect("a cgroup v2 mount");
        sweep_stale_cgroups(&mount);
        let root = mount.join(format!("runwarden-test-{}-{}", std::process::id(), next()));
        std::fs::create_dir(&root).unwrap();
        let options = Options { mount: mount.clone(), dedupe_window, pod_budget, pin_dir: None };
        let mut probes = Probes::load(&options).unwrap_or_else(|e| {
            remove_tree(&root);
            panic!("loading the programs: {e}")
        });
        let reader = probes.reader().unwrap();
        let pipeline = Pipeline::new(PipelineConfig { attribute_pods: true, ..PipelineConfig::default() });
        Self { probes, reader, pipeline, mount, root }
    }

    /// A cgroup below the test root, not monitored.
    pub fn cgroup(&self, relative: &str) -> PathBuf {
        let dir = self.root.join(relative);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Makes a pod's cgroups in `layout`, monitors the pod level, and rescans the index.
    pub fn pod(&mut self, layout: Layout) -> Pod {
        let mut pod = self.pod_cgroups(layout);
        pod.cgroup_id = self.probes.monitor(&pod.dir).unwrap();
        self.rescan();
        pod
    }

    /// As the agent does on a node: the programs know where kubelet's pod cgroups are (of
    /// `layout`, below the test root); no pod is armed yet.
    pub fn watch_pods(&mut self, layout: Layout) {
        let parents: &[&str] = match layout {
            Layout::SystemdBurstable | Layout::SystemdGuaranteed => {
                &["kubepods.slice", "kubepods.slice/kubepods-burstable.slice"]
            }
            Layout::CgroupfsBestEffort => &["kubepods", "kubepods/besteffort"],
        };
        let parents: Vec<PathBuf> = parents.iter().map(|p| self.cgroup(p)).collect();
        self.probes.watch_pods(&parents).unwrap();
    }

    /// Makes a pod's cgroups in `layout`, as kubelet and the runtime do; nothing else.
    pub fn pod_cgroups(&mut self, layout: Layout) -> Pod {
        let n = next();
        let uid = format!("{:08x}-1111-4222-8333-{:012x}", std::process::id(), n);
        let container_id = format!("{:064x}", (u128::from(std::process::id()) << 32) | u128::from(n));
        let u = uid.replace('-', "_");
        let (dir, container) = match layout {
            Layout::SystemdBurstable => {
                let dir = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
                (dir.clone(), format!("{dir}/cri-containerd-{container_id}.scope"))
            }
            Layout::SystemdGuaranteed => {
                let dir = format!("kubepods.slice/kubepods-pod{u}.slice");
                (dir.clone(), format!("{dir}/crio-{container_id}.scope"))
            }
            Layout::CgroupfsBestEffort => {
                let dir = format!("kubepods/besteffort/pod{uid}");
                (dir.clone(), format!("{dir}/{container_id}"))
            }
        };
        let (dir, container) = (self.cgroup(&dir), self.cgroup(&container));
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).unwrap());
        Pod { uid, dir, container_id, container, cgroup_id }
    }

    /// Scans the test root into the pipeline's index; returns calls that were waiting for it.
    pub fn rescan(&mut self) -> Vec<Observation> {
        self.pipeline.set_index(CgroupIndex::scan(&self.root).unwrap())
    }

    /// Everything the kernel wrote so far, through the pipeline.
    pub async fn drain(&mut self) -> Vec<Observation> {
        let mut out = Vec::new();
        let pipeline = &mut self.pipeline;
        // Twice empty in a row: the buffer is drained (records are written during the call).
        let mut empty = 0;
        while empty < 2 {
            let n = self.reader.drain(|bytes| out.extend(pipeline.record(bytes))).await;
            empty = if n == 0 { empty + 1 } else { 0 };
        }
        out
    }

    /// Adds the kernel's folded counts to the pipeline; returns the destinations recovered
    /// from the kernel's table because their record was lost.
    pub async fn totals(&mut self) -> Vec<Observation> {
        // Entries settle 100 ms after their last call; then read everything written so far.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let read_up_to = runwarden_agent::pipeline::since_boot().as_nanos() as u64;
        let mut out = self.drain().await;
        let table = self.probes.dedupe_table().unwrap();
        out.extend(self.pipeline.totals(&table, read_up_to));
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        remove_tree(&self.root);
    }
}

/// Removes test cgroup trees left by test processes that no longer run (a crash, a kill).
fn sweep_stale_cgroups(mount: &Path) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(mount) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("runwarden-test-").or_else(|| name.strip_prefix("runwarden-caps-"));
            let Some(pid) = rest.and_then(|r| r.split('-').next()) else { continue };
            if !Path::new("/proc").join(pid).exists() {
                remove_tree(&e.path());
            }
        }
    });
}

/// Removes a cgroup tree, deepest first (processes in it have ended by then).
pub fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
