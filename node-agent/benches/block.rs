//! What block mode costs a pod: the latency its DNS queries gain through the agent's resolver
//! (p50/p99, against the same queries straight to the server), and a UDP `connect()` to an
//! allowed address in block mode against the same pod in audit mode. The real programs and the
//! real resolver; a test pod (a cgroup and a network namespace) whose client is this bench run
//! again inside it; rounds interleave the two modes. Run as root:
//! `cargo bench -p runwarden-agent --bench block` (`RUNWARDEN_BENCH_ROUNDS`, default 10).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Agent, DnsServer, Layout, NetNs, Zone};
use runwarden_agent::dns::RecordData;
use runwarden_agent::ebpf::{Allowed, Clients, ResolverAddress};
use runwarden_agent::events::Proto;
use runwarden_agent::resolver::{Gate, Resolver, Scope, Transport};

/// Set in the client run inside the pod: the server's address.
const CLIENT: &str = "RUNWARDEN_BENCH_BLOCK_CLIENT";
const NAMES: u32 = 500;
const CONNECTS: usize = 200_000;

/// Every name below `bench.test`, anything there, for the bench's pod.
struct AllowAll(Clients);

impl Gate for AllowAll {
    fn decide(&self, client: SocketAddr, _: Transport, name: &str) -> Option<(u64, Vec<Scope>)> {
        let pod = self.0.pod_of(client, Proto::Udp)?;
        name.ends_with(".bench.test").then(|| (pod, vec![Scope { protocol: None, ports: vec![] }]))
    }
}

/// In the pod: `NAMES` queries to the server on port 53 (each its own socket, as libc does),
/// then `CONNECTS` UDP connects to its port 443. Prints the queries' round trips (ns) and the
/// connects' ns per call.
fn client(server: Ipv4Addr) {
    let mut rtts = Vec::with_capacity(NAMES as usize);
    let mut buf = [0u8; 512];
    for i in 0..NAMES {
        let query = common::dns_query(i as u16, &format!("n{i}.bench.test"));
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect((server, 53)).unwrap();
        let start = Instant::now();
        s.send(&query).unwrap();
        let n = s.recv(&mut buf).expect("an answer");
        rtts.push(start.elapsed().as_nanos());
        assert!(n > 12 && buf[3] & 0x0f == 0, "an answer, not a refusal");
    }
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    let start = Instant::now();
    for _ in 0..CONNECTS {
        s.connect((server, 443)).unwrap();
    }
    let per_call = start.elapsed().as_nanos() as f64 / CONNECTS as f64;
    println!("{}", rtts.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "));
    println!("{per_call}");
}

fn percentile(sorted: &[u128], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(server) = std::env::var(CLIENT) {
        return client(server.parse().unwrap());
    }
    let rounds: usize = std::env::var("RUNWARDEN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let mut agent = Agent::start(Duration::from_secs(1));
    let pod = agent.pod(Layout::SystemdBurstable);
    let ns = NetNs::new();
    let h4 = ns.host_v4;
    let upstream = DnsServer::start(h4.into());
    for i in 0..NAMES {
        let name = format!("n{i}.bench.test");
        upstream
            .set(&name, Zone::Records(vec![(name.clone(), RecordData::A([10, 203, (i >> 8) as u8, i as u8].into()))]));
    }
    let socket = runtime.block_on(tokio::net::UdpSocket::bind((h4, 0))).unwrap();
    let std::net::SocketAddr::V4(listening) = socket.local_addr().unwrap() else { unreachable!() };
    let resolver = Arc::new(Resolver {
        gate: Arc::new(AllowAll(agent.probes.clients())),
        upstream: (h4, 53).into(),
        allow: agent.probes.allow_list(),
        ttl_floor: Duration::from_secs(30),
        refuse_rcode: 5,
        timeout: Duration::from_secs(2),
        answers: None,
    });
    runtime.spawn(resolver.serve_udp(socket));
    agent
        .probes
        .set_resolver(Some(&ResolverAddress { ipv4: Some(*listening.ip()), ipv6: None, port: listening.port() }))
        .unwrap();
    let allowed = Allowed { addr: h4.into(), prefix: 32, protocol: Some(Proto::Udp), ports: vec![443], ttl: None };
    agent.probes.allow(pod.cgroup_id, &allowed).unwrap();

    let exe = std::env::current_exe().unwrap();
    let run_client = || {
        let out = std::process::Command::new("sh")
            .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&pod.container)
            .args(["ip", "netns", "exec", &ns.name])
            .arg(&exe)
            .env(CLIENT, h4.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let rtts: Vec<u128> = lines.next().unwrap().split(' ').map(|v| v.parse().unwrap()).collect();
        let per_call: f64 = lines.next().unwrap().parse().unwrap();
        (rtts, per_call)
    };
    // [audit, block]: every round's query round trips, and connect ns per call per round.
    let mut rtts: [Vec<u128>; 2] = Default::default();
    let mut connects: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        for k in 0..2 {
            let block = (round + k) % 2 == 1;
            agent.probes.set_blocking(pod.cgroup_id, block).unwrap();
            let (r, c) = run_client();
            rtts[usize::from(block)].extend(r);
            connects[usize::from(block)].push(c);
            runtime.block_on(agent.drain());
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    for r in &mut rtts {
        r.sort_unstable();
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = connects[1].iter().zip(&connects[0]).map(|(b, a)| b - a).collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!("Block mode's cost to a pod ({rounds} interleaved rounds, {NAMES} queries each):");
    println!(
        "DNS query, UDP: straight to the server p50 {:.0} µs p99 {:.0} µs; through the agent's resolver p50 {:.0} µs p99 {:.0} µs",
        percentile(&rtts[0], 0.5),
        percentile(&rtts[0], 0.99),
        percentile(&rtts[1], 0.5),
        percentile(&rtts[1], 0.99),
    );
    println!(
        "UDP connect to an allowed address: audit {:.0} ns, block {:.0} ns: {:+.0} ns [{:+.0}, {:+.0}] per call",
        median(&connects[0]),
        median(&connects[1]),
        median(&ratios),
        sorted[0],
        sorted[sorted.len() - 1]
    );
}
