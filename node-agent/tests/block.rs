//! Block mode in the kernel: the real programs refuse a block-mode pod's calls to destinations
//! it was not allowed, with real processes in a network namespace, and report them.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use common::{Agent, DnsServer, Layout, NetNs, Pod, Zone, dns_query, py_bytes, python};
use runwarden_agent::dns::RecordData;
use runwarden_agent::ebpf::{AllowList, Allowed, Clients, ResolvedKey, ResolverAddress, monotonic_ns};
use runwarden_agent::enforce::{Allowance, Covered, Enforcer, MAX_RESOLVED_PER_POD};
use runwarden_agent::events::{Proto, Verdict};
use runwarden_agent::resolver::{Gate, Resolver, Scope, Transport};
use runwarden_crds::EgressPolicy;
use runwarden_tests::node::{cgroup_programs as effective, runwarden_programs};

const WINDOW: Duration = Duration::from_secs(5);

/// Runs `calls` (the arguments of `attempt`, see [`common::STEPS_PRELUDE`]) in `pod`'s container
/// inside `ns`; the outcomes.
fn attempts(pod: &Pod, ns: &NetNs, calls: &[String]) -> Vec<String> {
    let steps: Vec<String> = calls.iter().map(|c| format!("attempt({c})")).collect();
    common::steps(&pod.container, ns, &steps)
}

fn range(addr: IpAddr, prefix: u8, protocol: Option<Proto>, ports: &[u16]) -> Allowed {
    Allowed { addr, prefix, protocol, ports: ports.to_vec(), ttl: None }
}

#[tokio::test]
async fn a_block_mode_pod_reaches_what_it_is_allowed_and_nothing_else() {
    let mut agent = Agent::start(WINDOW);
    let blocked = agent.pod(Layout::SystemdBurstable);
    let audited = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let (h4, h6) = (ns.host_v4, ns.host_v6);
    let listen = |ip: IpAddr| TcpListener::bind((ip, 0)).unwrap();
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let (a4, a6) = (listen(h4.into()), listen(h6.into()));
    // A port nobody listens on.
    let pb = port(&listen(h4.into()));
    let (pa, p6) = (port(&a4), port(&a6));
    agent.probes.set_blocking(blocked.cgroup_id, true).unwrap();
    // TCP to one port of the host's IPv4 address; UDP to one port of its /24; anything to the
    // host's IPv6 address.
    let net = IpAddr::from([h4.octets()[0], h4.octets()[1], h4.octets()[2], 0]);
    let rules = [
        range(h4.into(), 32, Some(Proto::Tcp), &[pa]),
        range(net, 24, Some(Proto::Udp), &[5353]),
        range(h6.into(), 128, None, &[]),
    ];
    for rule in &rules {
        agent.probes.allow(blocked.cgroup_id, rule).unwrap();
    }
    let calls = [
        format!("V4, T, ('{h4}', {pa})"),       // allowed
        format!("V4, T, ('{h4}', {pb})"),       // same address, another port
        format!("V4, U, ('{h4}', {pa})"),       // same port, UDP
        format!("V4, U, ('{h4}', 5353)"),       // UDP in the /24 (connect)
        format!("V4, U, ('{h4}', 5353), True"), // and sent unconnected
        format!("V4, U, ('{h4}', 5354), True"), // another UDP port, unconnected
        format!("V6, T, ('{h6}', {p6})"),       // IPv6, every port and protocol
        format!("V6, U, ('{h6}', 9), True"),
        format!("V6, T, ('::ffff:{h4}', {pa})"), // the allowed IPv4 on an IPv6 socket
        format!("V6, T, ('::ffff:{h4}', {pb})"),
        "V4, U, ('198.51.100.7', 443)".to_string(), // elsewhere
        "V6, U, ('2001:db8::7', 443), True".to_string(),
        "V4, U, ('127.0.0.1', 9)".to_string(), // inside the pod: always
        "V6, U, ('::1', 9)".to_string(),
    ];
    let got = attempts(&blocked, &ns, &calls);
    let expected =
        ["ok", "EPERM", "EPERM", "ok", "ok", "EPERM", "ok", "ok", "ok", "EPERM", "EPERM", "EPERM", "ok", "ok"];
    assert_eq!(got, expected, "calls: {calls:#?}");

    // The pod next to it is not in block mode: the same calls go ahead.
    let got = attempts(&audited, &ns, &calls[1..3]);
    assert_eq!(got, ["ECONNREFUSED", "ok"]);

    // Each refused call is reported, refused; the allowed ones, allowed.
    let obs = agent.drain().await;
    let of = |verdict: Verdict| -> Vec<(IpAddr, u16, Proto)> {
        let mut v: Vec<_> = obs
            .iter()
            .filter(|o| o.pod_cgroup_id == blocked.cgroup_id && o.verdict == verdict)
            .map(|o| (o.ip, o.port, o.proto))
            .collect();
        v.sort();
        v
    };
    // The IPv4 address on an IPv6 socket is reported as that IPv4 address (a second record:
    // the kernel counts each family apart).
    let mut refused = vec![
        (IpAddr::from(h4), pb, Proto::Tcp),
        (IpAddr::from(h4), pa, Proto::Udp),
        (IpAddr::from(h4), 5354, Proto::Udp),
        (IpAddr::from(h4), pb, Proto::Tcp),
        ("198.51.100.7".parse().unwrap(), 443, Proto::Udp),
        ("2001:db8::7".parse().unwrap(), 443, Proto::Udp),
    ];
    refused.sort();
    assert_eq!(of(Verdict::Denied), refused);
    let allowed = of(Verdict::Allowed);
    for call in [
        (IpAddr::from(h4), pa, Proto::Tcp),
        (IpAddr::from(h4), 5353, Proto::Udp),
        (IpAddr::from(h6), p6, Proto::Tcp),
        (IpAddr::from(h6), 9, Proto::Udp),
    ] {
        assert!(allowed.contains(&call), "{call:?} not reported allowed: {allowed:#?}");
    }
    assert!(obs.iter().filter(|o| o.pod_cgroup_id == audited.cgroup_id).all(|o| o.verdict == Verdict::Allowed));

    // Taken back: refused again on the next call.
    agent.probes.disallow(blocked.cgroup_id, &rules[0]).unwrap();
    assert_eq!(attempts(&blocked, &ns, &calls[..1]), ["EPERM"]);
    drop((a4, a6));
}

#[tokio::test]
async fn mode_changes_and_expiry_take_effect_on_the_next_call() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::CgroupfsBestEffort);
    let ns = NetNs::new();
    let listener = TcpListener::bind((ns.host_v4, 0)).unwrap();
    let call = [format!("V4, T, ('{}', {})", ns.host_v4, listener.local_addr().unwrap().port())];

    assert_eq!(effective(&pod.container), runwarden_programs());
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();
    // Block mode's programs are attached to the pod, and to nothing else.
    let mut with_block = runwarden_programs();
    with_block.extend(block_programs());
    with_block.sort();
    assert_eq!(effective(&pod.container), with_block);
    assert_eq!(effective(&agent.root), []);
    assert_eq!(attempts(&pod, &ns, &call), ["EPERM"]);
    // An address from a DNS answer, allowed for its TTL.
    let answer = Allowed { ttl: Some(Duration::from_millis(1500)), ..range(ns.host_v4.into(), 32, None, &[]) };
    agent.probes.allow(pod.cgroup_id, &answer).unwrap();
    assert_eq!(attempts(&pod, &ns, &call), ["ok"]);
    std::thread::sleep(Duration::from_millis(1800));
    assert_eq!(attempts(&pod, &ns, &call), ["EPERM"], "expired");
    // Out of block mode: everything goes ahead; back in: refused again.
    agent.probes.set_blocking(pod.cgroup_id, false).unwrap();
    assert_eq!(effective(&pod.container), runwarden_programs(), "block mode's programs gone with it");
    assert_eq!(attempts(&pod, &ns, &call), ["ok"]);
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();
    assert_eq!(attempts(&pod, &ns, &call), ["EPERM"]);
    // Each call reported once whatever the mode (the observing programs leave a block-mode
    // pod's calls to the deciding ones): refused, allowed in audit, refused.
    agent.totals().await;
    let mut calls: HashMap<Verdict, u64> = HashMap::new();
    for c in agent.pipeline.calls() {
        if c.last.ip == IpAddr::from(ns.host_v4) {
            *calls.entry(c.last.verdict).or_default() += c.calls;
        }
    }
    assert_eq!(calls, HashMap::from([(Verdict::Denied, 3), (Verdict::Allowed, 2)]));
}

/// What `bpftool cgroup show` lists for block mode's programs.
fn block_programs() -> Vec<(String, String)> {
    [
        ("cgroup_inet4_connect", "connect4"),
        ("cgroup_inet4_getpeername", "getpeername4"),
        ("cgroup_inet6_connect", "connect6"),
        ("cgroup_inet6_getpeername", "getpeername6"),
        ("cgroup_udp4_recvmsg", "recvmsg4"),
        ("cgroup_udp4_sendmsg", "sendmsg4"),
        ("cgroup_udp6_recvmsg", "recvmsg6"),
        ("cgroup_udp6_sendmsg", "sendmsg6"),
    ]
    .into_iter()
    .map(|(a, n)| (a.to_string(), n.to_string()))
    .collect()
}

/// Refused calls are deduplicated like allowed ones (a retry loop does not flood the ring
/// buffer) and counted apart from them: every call in the pipeline's totals, by verdict.
#[tokio::test]
async fn refused_calls_are_folded_and_counted_apart_from_allowed_ones() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdGuaranteed);
    let ns = NetNs::new();
    let h4 = ns.host_v4;
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();
    let script = format!(
        "{}\nfrom collections import Counter\nprint(dict(Counter(attempt(V4, U, ('{h4}', 7000)) for _ in range(300))))",
        common::STEPS_PRELUDE
    );
    let out = python(&pod.container, Some(&ns), &script);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{'EPERM': 300}");
    agent.probes.allow(pod.cgroup_id, &range(h4.into(), 32, Some(Proto::Udp), &[7000])).unwrap();
    let out = python(&pod.container, Some(&ns), &script);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{'ok': 300}");

    let records = agent.drain().await.len();
    assert!(records <= 4, "{records} records for 600 calls to one destination");
    agent.totals().await;
    let mut calls: HashMap<Verdict, u64> = HashMap::new();
    for c in agent.pipeline.calls() {
        if c.last.ip == IpAddr::from(h4) && c.last.port == 7000 {
            *calls.entry(c.last.verdict).or_default() += c.calls;
        }
    }
    assert_eq!(calls, HashMap::from([(Verdict::Denied, 300), (Verdict::Allowed, 300)]));
}

/// A privileged process can delete a pod's block mode from the kernel's map by id: the agent's
/// periodic check notices and puts it back.
#[tokio::test]
async fn block_mode_deleted_from_outside_is_noticed_and_put_back() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let call = [format!("V4, U, ('{}', 7001)", ns.host_v4)];
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();
    assert_eq!(agent.probes.check_pods().unwrap(), []);

    assert!(common::delete_from_maps_named("POLICIES", &pod.cgroup_id.to_ne_bytes()));
    assert_eq!(attempts(&pod, &ns, &call), ["ok"], "unblocked from outside");
    let found = agent.probes.check_pods().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].unmarked && found[0].detached.is_empty(), "{found:?}");
    assert_eq!(attempts(&pod, &ns, &call), ["EPERM"], "blocked again");
    assert_eq!(agent.probes.check_pods().unwrap(), []);

    // Or detach its connect4 link by id: noticed, attached again, refusing again.
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(&pod.dir).unwrap().ino();
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output().unwrap();
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let link = links
        .iter()
        .find(|l| l["cgroup_id"].as_u64() == Some(id) && l["attach_type"] == "cgroup_inet4_connect")
        .and_then(|l| l["id"].as_u64())
        .expect("the pod's connect4 link");
    let out = std::process::Command::new("bpftool").args(["link", "detach", "id", &link.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(attempts(&pod, &ns, &call), ["ok"], "let through while detached");
    let found = agent.probes.check_pods().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].detached, ["connect4"], "{found:?}");
    assert_eq!(attempts(&pod, &ns, &call), ["EPERM"], "refused again");
}

/// Names the test's pod may resolve: `allowed.test` (UDP port 443 there) and every name below
/// `wild.test` (anything there). The query's pod is what the kernel noted for its source; a
/// query from anything but the test's pod is refused.
struct TestGate {
    clients: Clients,
    pod: u64,
}

impl Gate for TestGate {
    fn decide(&self, client: SocketAddr, transport: Transport, name: &str) -> Option<(u64, Vec<Scope>)> {
        let proto = if transport == Transport::Tcp { Proto::Tcp } else { Proto::Udp };
        let pod = self.clients.pod_of(client, proto)?;
        assert_eq!(pod, self.pod, "the kernel names the query's pod");
        if name == "allowed.test" {
            return Some((pod, vec![Scope { protocol: Some(Proto::Udp), ports: vec![443] }]));
        }
        name.ends_with(".wild.test").then(|| (pod, vec![Scope { protocol: None, ports: vec![] }]))
    }
}

/// Serves a resolver for the tests (`gate` decides, `host`:53 answers) on UDP and TCP of one
/// free port of `host`, as the agent serves its own; the port.
async fn serve_resolver(agent: &Agent, host: IpAddr, gate: Arc<dyn Gate>) -> u16 {
    let (socket, tcp) = loop {
        let socket = tokio::net::UdpSocket::bind((host, 0)).await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(socket.local_addr().unwrap()).await {
            break (socket, tcp);
        }
    };
    let port = socket.local_addr().unwrap().port();
    let resolver = Arc::new(Resolver {
        gate,
        upstream: (host, 53).into(),
        allow: agent.probes.allow_list(),
        ttl_floor: Duration::from_secs(30),
        refuse_rcode: 5,
        timeout: Duration::from_secs(2),
        answers: None,
    });
    tokio::spawn(resolver.clone().serve_udp(socket));
    tokio::spawn(resolver.serve_tcp(tcp));
    port
}

/// A block-mode pod's DNS goes to the agent's resolver whatever server it asks; what it may
/// resolve connects, what it may not is refused at DNS and at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_allowed_through_the_agents_resolver_and_nothing_else_resolves() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    // The pod's resolv.conf names the host end, where the real server listens.
    let upstream = DnsServer::start(ns.host_v4.into());
    upstream.set("allowed.test", Zone::Records(vec![("allowed.test".into(), RecordData::A([192, 0, 2, 10].into()))]));
    upstream.set("tcp.wild.test", Zone::Records(vec![("tcp.wild.test".into(), RecordData::A([10, 202, 0, 1].into()))]));
    upstream.set("denied.test", Zone::Records(vec![("denied.test".into(), RecordData::A([192, 0, 2, 66].into()))]));
    const LOOKUPS: u32 = 10_000;
    for i in 0..LOOKUPS {
        let name = format!("n{i}.wild.test");
        let ip = [10, 201, (i >> 8) as u8, i as u8];
        upstream.set(&name, Zone::Records(vec![(name.clone(), RecordData::A(ip.into()))]));
    }
    // UDP and TCP on one port, as the kernel sends both there.
    let gate = Arc::new(TestGate { clients: agent.probes.clients(), pod: pod.cgroup_id });
    let port = serve_resolver(&agent, ns.host_v4.into(), gate).await;
    agent.probes.set_resolver(Some(&ResolverAddress { ipv4: Some(ns.host_v4), ipv6: None, port })).unwrap();
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();

    let script = format!(
        r#"{prelude}
import time
ip = resolve("allowed.test")
print(ip)
print(attempt(V4, U, (ip, 443)))
print(attempt(V4, U, (ip, 444)))
print(attempt(V4, T, (ip, 443)))
print(resolve("denied.test"))
print(attempt(V4, U, ("192.0.2.66", 443)))
# What a DNS client sees of where answers come from: the server it asked.
s = socket.socket(V4, U)
s.settimeout(2)
s.sendto(bytes([{query}]), ("{h4}", 53))
print(s.recvfrom(512)[1])
c = socket.socket(V4, U)
c.connect(("{h4}", 53))
print(c.getpeername())
# DNS over TCP: the same server, the same gate.
def over_tcp(query):
    t = socket.create_connection(("{h4}", 53), timeout=2)
    peer = t.getpeername()
    t.sendall(len(query).to_bytes(2, "big") + query)
    n = int.from_bytes(t.recv(2), "big")
    reply = b""
    while len(reply) < n:
        reply += t.recv(n - len(reply))
    return peer, reply[3] & 15, reply[-4:]
peer, rcode, last = over_tcp(bytes([{tcp_query}]))
print(peer, rcode, ".".join(str(b) for b in last))
print(attempt(V4, U, (".".join(str(b) for b in last), 443)))
print(over_tcp(bytes([{tcp_denied}]))[1])
refused, start = 0, time.time()
for i in range({LOOKUPS}):
    ip = resolve("n%d.wild.test" % i)
    if attempt(V4, U, (ip, 443)) != "ok":
        refused += 1
print(refused)
print(int((time.time() - start) * 1e6 / {LOOKUPS}))
"#,
        prelude = common::STEPS_PRELUDE,
        query = py_bytes(&dns_query(7, "allowed.test")),
        tcp_query = py_bytes(&dns_query(8, "tcp.wild.test")),
        tcp_denied = py_bytes(&dns_query(9, "denied.test")),
        h4 = ns.host_v4,
    );
    // The resolver answers on another worker meanwhile.
    let out = tokio::task::block_in_place(|| python(&pod.container, Some(&ns), &script));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines[..12],
        [
            "192.0.2.10".to_string(),
            "ok".into(),
            "EPERM".into(),
            "EPERM".into(),
            "unresolved".into(),
            "EPERM".into(),
            format!("('{}', 53)", ns.host_v4),
            format!("('{}', 53)", ns.host_v4),
            format!("('{}', 53) 0 10.202.0.1", ns.host_v4),
            "ok".into(),
            "5".into(),
            "0".into(),
        ],
        "allowed name and its scope; the other name unresolved and refused; no spurious refusal in {LOOKUPS} \
         lookups each followed at once by a call: {lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lookup and call through the resolver: {} µs each", lines[12]);
}

/// A pod of an IPv6-only cluster asks an IPv6 server: its DNS goes to the resolver's IPv6
/// address (there is no IPv4 way out of the pod), over UDP and TCP, and is judged like any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_only_pods_dns_goes_to_the_resolvers_ipv6_address() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    ns.ipv6_only();
    let upstream = DnsServer::start(ns.host_v6.into());
    let records =
        [("allowed.test", "2001:db8::10"), ("denied.test", "2001:db8::66"), ("tcp.wild.test", "2001:db8::1:1")];
    for (name, ip) in records {
        upstream.set(name, Zone::Records(vec![(name.into(), RecordData::Aaaa(ip.parse().unwrap()))]));
    }
    let gate = Arc::new(TestGate { clients: agent.probes.clients(), pod: pod.cgroup_id });
    let port = serve_resolver(&agent, ns.host_v6.into(), gate).await;
    agent.probes.set_blocking(pod.cgroup_id, true).unwrap();
    let h6 = ns.host_v6;
    let steps = [
        "resolve('allowed.test', V6)".to_string(),
        "attempt(V6, U, ('2001:db8::10', 443))".into(),
        "attempt(V6, U, ('2001:db8::10', 444))".into(),
        "resolve('denied.test', V6)".into(),
        "attempt(V6, U, ('2001:db8::66', 443))".into(),
        format!("ask('{h6}', 'allowed.test', 28)"),
        format!("ask('{h6}', 'tcp.wild.test', 28, tcp=True)"),
        "attempt(V6, U, ('2001:db8::1:1', 8443))".into(),
        format!("ask('{h6}', 'denied.test', 28, tcp=True)"),
    ];
    // With only an IPv4 address the resolver is out of the pod's reach: nothing resolves.
    let only_ipv4 = ResolverAddress { ipv4: Some(ns.host_v4), ipv6: None, port };
    agent.probes.set_resolver(Some(&only_ipv4)).unwrap();
    let out = tokio::task::block_in_place(|| common::steps(&pod.container, &ns, &steps[..1]));
    assert_eq!(out, ["unresolved"]);

    agent.probes.set_resolver(Some(&ResolverAddress { ipv6: Some(h6), ..only_ipv4 })).unwrap();
    let out = tokio::task::block_in_place(|| common::steps(&pod.container, &ns, &steps));
    assert_eq!(
        out,
        [
            "2001:db8::10".to_string(),
            "ok".into(),
            "EPERM".into(),
            "unresolved".into(),
            "EPERM".into(),
            // Answers come from the server the pod asked, by UDP and by TCP.
            format!("{h6} 53 0 2001:db8::10"),
            format!("{h6} 53 0 2001:db8::1:1"),
            "ok".into(),
            format!("{h6} 53 5 -"),
        ],
        "{steps:#?}"
    );
}

/// An agent's block mode for `pod`: a policy allowing `hosts` and `cidrs` (UDP port 443).
fn covering(pod: u64, hosts: &[&str], cidrs: &[&str]) -> Covered {
    let endpoints: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| serde_json::json!({"host": h, "ports": [443], "protocol": "UDP"}))
        .chain(cidrs.iter().map(|c| serde_json::json!({"cidr": c, "ports": [443], "protocol": "UDP"})))
        .collect();
    let policy: EgressPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "runwarden.dev/v1alpha1", "kind": "EgressPolicy", "metadata": {"name": "p", "namespace": "n"},
        "spec": {"mode": "Block", "includeBaseline": false, "allowedEndpoints": endpoints}
    }))
    .unwrap();
    Covered { cgroup: pod, allowance: Arc::new(Allowance::build(&policy, None)) }
}

/// What the resolver allows a pod is bounded (a pod that resolves without end evicts its own
/// oldest addresses), taken out of the kernel once expired, and known, names and all, to the
/// next agent: it keeps what the policy still allows and takes back what a change made while
/// it was away does not (names and ranges alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_addresses_are_bounded_swept_and_known_to_the_next_agent() {
    let mut agent = Agent::start(WINDOW);
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let upstream = DnsServer::start(ns.host_v4.into());
    let lookups = MAX_RESOLVED_PER_POD + 1000;
    for i in 0..lookups {
        let name = format!("n{i}.wild.test");
        let ip = [10, 210, (i >> 8) as u8, i as u8];
        upstream.set(&name, Zone::Records(vec![(name.clone(), RecordData::A(ip.into()))]));
    }
    for (name, ip) in [("keep.test", [192, 0, 2, 20]), ("drop.test", [192, 0, 2, 21])] {
        upstream.set(name, Zone::Records(vec![(name.into(), RecordData::A(ip.into()))]));
    }
    let mut enforcer = Enforcer::new(agent.probes.clients(), agent.probes.allow_list());
    let errors = enforcer.apply(
        &mut agent.probes,
        vec![covering(pod.cgroup_id, &["*.wild.test", "keep.test", "drop.test"], &["192.0.2.40/32"])],
    );
    assert!(errors.is_empty(), "{errors:?}");
    let port = serve_resolver(&agent, ns.host_v4.into(), Arc::new(enforcer.gate.clone())).await;
    agent.probes.set_resolver(Some(&ResolverAddress { ipv4: Some(ns.host_v4), ipv6: None, port })).unwrap();

    let script = format!(
        r#"{prelude}
refused = 0
for i in range({lookups}):
    if attempt(V4, U, (resolve("n%d.wild.test" % i), 443)) != "ok":
        refused += 1
print(refused)
print(attempt(V4, U, (resolve("keep.test"), 443)))
print(attempt(V4, U, (resolve("drop.test"), 443)))
print(attempt(V4, U, ("192.0.2.40", 443)))
"#,
        prelude = common::STEPS_PRELUDE,
    );
    let out = tokio::task::block_in_place(|| python(&pod.container, Some(&ns), &script));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines, ["0", "ok", "ok", "ok"], "{}", String::from_utf8_lossy(&out.stderr));
    let held = agent.probes.allow_list().resolved().into_iter().filter(|e| e.pod == pod.cgroup_id).count();
    assert!(
        (MAX_RESOLVED_PER_POD * 7 / 8..=MAX_RESOLVED_PER_POD).contains(&held),
        "{held} entries from {} answers",
        lookups + 2
    );
    let first = attempts(&pod, &ns, &["V4, U, ('10.210.0.0', 443)".into()]);
    assert_eq!(first, ["EPERM"], "the oldest answers were evicted");

    // An entry past its time is taken out of the kernel's table.
    let short = ResolvedKey { ip: [192, 0, 2, 30].into(), protocol: Proto::Udp, port: 443 };
    let expires = monotonic_ns() + 50_000_000;
    agent.probes.allow_list().allow_resolved(pod.cgroup_id, "short.test", short, expires).unwrap();
    enforcer.gate.resolved(pod.cgroup_id, "short.test", &[(short, expires)]);
    let in_table = |allow: &AllowList| allow.resolved().iter().any(|e| e.key == short);
    assert!(in_table(&agent.probes.allow_list()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    enforcer.sweep();
    assert!(!in_table(&agent.probes.allow_list()), "swept");

    // The next agent, while the policy changed: drop.test and the range are no longer allowed.
    let mut next = Enforcer::new(agent.probes.clients(), agent.probes.allow_list());
    let known = agent.probes.allow_list().resolved();
    assert!(known.iter().any(|e| e.name.as_deref() == Some("keep.test")), "the names are kept with the entries");
    let errors =
        next.apply(&mut agent.probes, vec![covering(pod.cgroup_id, &["*.wild.test", "keep.test"], &["192.0.2.41/32"])]);
    assert!(errors.is_empty(), "{errors:?}");
    let calls = [
        "V4, U, ('192.0.2.20', 443)",
        "V4, U, ('192.0.2.21', 443)",
        "V4, U, ('192.0.2.40', 443)",
        "V4, U, ('192.0.2.41', 443)",
    ]
    .map(String::from);
    assert_eq!(attempts(&pod, &ns, &calls), ["ok", "EPERM", "EPERM", "ok"]);
}

/// A policy's `failOpen`: while the agent is away (no heartbeat for a few seconds) its pods'
/// calls go ahead, and they are held again when it is back; without it they stay held.
#[tokio::test]
async fn fail_open_pods_go_unheld_while_the_agent_is_away_and_the_others_stay_held() {
    let mut agent = Agent::start(WINDOW);
    let open = agent.pod(Layout::SystemdBurstable);
    let closed = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let call = [format!("V4, U, ('{}', 7002)", ns.host_v4)];
    agent.probes.set_block_mode(open.cgroup_id, Some(true)).unwrap();
    agent.probes.set_block_mode(closed.cgroup_id, Some(false)).unwrap();
    assert_eq!(
        (attempts(&open, &ns, &call), attempts(&closed, &ns, &call)),
        (vec!["EPERM".to_string()], vec!["EPERM".to_string()])
    );
    // The agent is away: no heartbeat for longer than the kernel waits.
    std::thread::sleep(Duration::from_nanos(runwarden_ebpf_common::AGENT_AWAY_NS) + Duration::from_millis(500));
    assert_eq!(attempts(&open, &ns, &call), ["ok"], "fail open");
    assert_eq!(attempts(&closed, &ns, &call), ["EPERM"], "fail closed");
    // Back.
    agent.probes.heartbeat().unwrap();
    assert_eq!(attempts(&open, &ns, &call), ["EPERM"]);
}
