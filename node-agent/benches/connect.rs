//! What the kernel programs cost a pod's network calls, set up as the agent does on a node: pod
//! cgroups below a `kubepods` cgroup of the bench's own, this process in one of them, and a
//! peer process outside any pod (a server the pod calls, as on another machine). The same
//! loops run with no programs, with this pod monitored (dedupe on, and every call a record),
//! and with the programs loaded for another pod while this one was armed as it appeared and
//! disarmed once known not to be a runner (every pod on a node that is not a runner),
//! interleaved round by round. Prints ns/op (MiB/s for the bulk receive) and the per-round
//! ratio to no programs as median [min, max]. Run as root:
//! `cargo bench -p runwarden-agent --bench connect` (`RUNWARDEN_BENCH_ROUNDS` sets the rounds,
//! 40 by default).

#![allow(unsafe_code, reason = "SO_LINGER and the listen backlog through libc: std has no setters")]

mod support;

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{AgentThread, BenchCgroups, pin};

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Off,
    Monitored,
    EveryCall,
    Unmonitored,
}

const SETUPS: [(Setup, &str); 4] = [
    (Setup::Off, "no programs"),
    (Setup::Monitored, "monitored, dedupe 1 s"),
    (Setup::EveryCall, "monitored, every call a record"),
    (Setup::Unmonitored, "attached, pod not monitored"),
];

/// Where each loop connects: the peer's listener and bulk source (outside the pod), a listener
/// in the pod, a port nothing listens on.
#[derive(Clone, Copy)]
struct Ports {
    peer: u16,
    source: u16,
    datagrams: u16,
    listener: u16,
    closed: u16,
}

/// Set in the peer process (the bench itself, started again outside the pod).
const PEER: &str = "RUNWARDEN_BENCH_PEER";

/// The peer: accepts and drops connections on one port; on the other sends the MiB a client
/// asks for (a 4-byte count) and closes; reads and drops datagrams on a UDP port. Prints the
/// three ports, then serves until killed.
fn peer() {
    pin(1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen() again on a listening socket only raises its backlog (std uses 128; a
    // full accept queue drops SYNs and stalls a connect for a second).
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let datagrams = UdpSocket::bind("127.0.0.1:0").unwrap();
    println!(
        "{} {} {}",
        listener.local_addr().unwrap().port(),
        source.local_addr().unwrap().port(),
        datagrams.local_addr().unwrap().port()
    );
    std::thread::spawn(move || {
        pin(1);
        let mut buf = [0u8; 64];
        while datagrams.recv(&mut buf).is_ok() {}
    });
    std::io::stdout().flush().unwrap();
    std::thread::spawn(move || {
        pin(1);
        let chunk = vec![7u8; BULK_CHUNK];
        for s in source.incoming() {
            let mut s = s.unwrap();
            let mut count = [0u8; 4];
            s.read_exact(&mut count).unwrap();
            for _ in 0..u32::from_le_bytes(count) {
                s.write_all(&chunk).unwrap();
            }
        }
    });
    for s in listener.incoming() {
        drop(s);
    }
}

/// The peer process, killed when dropped (before its cgroup is removed).
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to `port` and closes with RST, `n` times: so 100,000s of connections leave no
/// TIME_WAIT behind.
fn connect_close(port: u16, n: usize) -> Duration {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let start = Instant::now();
    for _ in 0..n {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // SAFETY: a valid socket and a valid option of the right size. Close with RST, so
        // 100,000s of connections leave no TIME_WAIT behind.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as u32,
            );
        }
    }
    start.elapsed()
}

fn tcp_loop(ports: Ports, n: usize) -> Duration {
    connect_close(ports.peer, n)
}

fn tcp_in_pod_loop(ports: Ports, n: usize) -> Duration {
    connect_close(ports.listener, n)
}

fn tcp_refused_loop(ports: Ports, n: usize) -> Duration {
    // SYN, RST, all within connect(): no other thread involved.
    let port = ports.closed;
    let start = Instant::now();
    for _ in 0..n {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
    start.elapsed()
}

fn udp_connect_loop(ports: Ports, n: usize) -> Duration {
    let port = ports.listener;
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    for _ in 0..n {
        s.connect(("127.0.0.1", port)).unwrap();
    }
    start.elapsed()
}

fn udp_sendto_loop(ports: Ports, n: usize) -> Duration {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    for _ in 0..n {
        // A full receive buffer drops the datagram; the send still succeeds.
        s.send_to(&[1; 32], ("127.0.0.1", ports.datagrams)).unwrap();
    }
    start.elapsed()
}

fn udp_send_loop(ports: Ports, n: usize) -> Duration {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(("127.0.0.1", ports.datagrams)).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        s.send(&[1; 32]).unwrap();
    }
    start.elapsed()
}

fn udp_socket_loop(ports: Ports, n: usize) -> Duration {
    let port = ports.listener;
    let start = Instant::now();
    for _ in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(("127.0.0.1", port)).unwrap();
    }
    start.elapsed()
}

/// Bytes per bulk transfer, in `BULK_CHUNK` writes.
const BULK_CHUNK: usize = 1 << 20;

/// `n` MiB from the peer over one TCP connection, read until it closes: a bulk receive into
/// the pod, every packet through the pod's ingress hook.
fn bulk_receive_loop(ports: Ports, n: usize) -> Duration {
    let mut buf = vec![0u8; BULK_CHUNK];
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", ports.source)).unwrap();
    s.write_all(&(n as u32).to_le_bytes()).unwrap();
    let mut read = 0;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            k => read += k,
        }
    }
    assert_eq!(read, n * BULK_CHUNK);
    start.elapsed()
}

/// (min, median, max).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// A loop: its name, the function, calls (MiB for the bulk receive) per round, and whether it
/// is a throughput (MiB/s) rather than a latency (ns/op).
type Loop = (&'static str, fn(Ports, usize) -> Duration, usize, bool);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var_os(PEER).is_some() {
        return peer();
    }
    let rounds: usize = std::env::var("RUNWARDEN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(40);
    let cgroups = BenchCgroups::new("connect");
    let kubepods = cgroups.child("kubepods");
    let pod = cgroups.child("kubepods/pod0c0ffee0-1111-4222-8333-000000000001");
    let other = cgroups.child("kubepods/pod0c0ffee0-1111-4222-8333-000000000002");
    let outside = cgroups.child("server");
    let mut peer = Peer(
        Command::new("sh")
            .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&outside)
            .arg(std::env::current_exe().unwrap())
            .env(PEER, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(peer.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let peer_ports: Vec<u16> = line.split_whitespace().map(|p| p.parse().unwrap()).collect();
    BenchCgroups::enter(&pod);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: as in the peer.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = Ports {
        peer: peer_ports[0],
        source: peer_ports[1],
        datagrams: peer_ports[2],
        listener: listener.local_addr().unwrap().port(),
        closed: closed.local_addr().unwrap().port(),
    };
    drop(closed);
    pin(0);
    std::thread::spawn(move || {
        pin(1);
        for s in listener.incoming() {
            drop(s);
        }
    });
    let loops: [Loop; 8] = [
        // About 0.1 s each, so one slow moment of the machine does not decide a round.
        ("TCP socket+connect+close", tcp_loop, 6_000, false),
        ("  the same, server in the pod", tcp_in_pod_loop, 6_000, false),
        ("TCP connect refused", tcp_refused_loop, 20_000, false),
        ("UDP connect, one socket", udp_connect_loop, 250_000, false),
        ("UDP sendto, unconnected", udp_sendto_loop, 100_000, false),
        ("UDP send, connected", udp_send_loop, 100_000, false),
        ("UDP socket+connect+close", udp_socket_loop, 30_000, false),
        ("TCP bulk receive (MiB/s)", bulk_receive_loop, 2_048, true),
    ];
    // Warm up caches and the listener.
    tcp_loop(ports, 2_000);
    bulk_receive_loop(ports, 256);
    // ns/op (or s/MiB) of every round, per setup and loop.
    let mut per_round: [[Vec<f64>; 8]; 4] = Default::default();
    let mut lost = 0;
    for round in 0..rounds {
        // Each round starts with another setup, so none always runs right after another.
        for k in 0..SETUPS.len() {
            let i = (round + k) % SETUPS.len();
            let setup = &SETUPS[i].0;
            let (runner, others) = (std::slice::from_ref(&pod), std::slice::from_ref(&other));
            let agent = match setup {
                Setup::Off => AgentThread::idle(),
                Setup::Monitored => AgentThread::node(&kubepods, runner, others, Duration::from_secs(1)),
                Setup::EveryCall => AgentThread::node(&kubepods, runner, others, Duration::ZERO),
                Setup::Unmonitored => AgentThread::node(&kubepods, others, runner, Duration::from_secs(1)),
            };
            for (j, (_, f, n, _)) in loops.iter().enumerate() {
                let ns = f(ports, *n).as_nanos() as f64 / *n as f64;
                per_round[i][j].push(ns);
            }
            lost += agent.stop().kernel.lost_calls;
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!(
        "Kernel programs' cost to a pod, attached for the pods below {}: median of {rounds} interleaved \
         rounds, and the per-round ratio to no programs as median [min, max]",
        kubepods.display()
    );
    println!("{:<28} {:>12} {:>30} {:>30} {:>30}", "loop", SETUPS[0].1, SETUPS[1].1, SETUPS[2].1, SETUPS[3].1);
    for (j, (name, _, _, throughput)) in loops.iter().enumerate() {
        // A figure per op: ns, or MiB/s for a throughput (its cost is the drop in MiB/s).
        let figure = |ns: f64| if *throughput { 1e9 / ns } else { ns };
        let value = |i: usize| figure(spread(&per_round[i][j]).1);
        // The ratio of each round to that round's run without programs: rounds are adjacent in
        // time, so the machine's slow drift cancels out. For a throughput, the cost is the time.
        let cell = |i: usize| {
            let r: Vec<f64> = per_round[i][j].iter().zip(&per_round[0][j]).map(|(a, b)| a / b - 1.0).collect();
            let (lo, mid, hi) = spread(&r);
            format!("{:.0} {:+.1}% [{:+.1}, {:+.1}]", value(i), mid * 100.0, lo * 100.0, hi * 100.0)
        };
        println!("{:<28} {:>12.0} {:>30} {:>30} {:>30}", name, value(0), cell(1), cell(2), cell(3));
    }
    println!("(a cost is the change in time per op; for the bulk receive, in time per MiB)");
    println!("records lost (ring buffer full): {lost}");
    profile(&loops, ports, &kubepods, &pod, &other);
}

/// Where the monitored pod's time goes: each loop once more with the kernel's BPF run-time
/// statistics on, and each program's runs and mean run time per op (per MiB for the bulk
/// receive). The statistics cost two clock reads per run, so these runs are not in the table
/// above. What the kernel spends around a program (its dispatch) is not in them.
fn profile(loops: &[Loop], ports: Ports, kubepods: &Path, pod: &Path, other: &Path) {
    let Ok(_stats) = aya::sys::enable_stats(aya::sys::Stats::RunTime) else {
        println!("(no profile: the kernel would not turn its BPF statistics on)");
        return;
    };
    println!("Where the time goes, monitored (dedupe 1 s), from the kernel's BPF statistics:");
    println!("{:<32} {:<12} {:>9} {:>8} {:>8}", "loop", "program", "runs/op", "ns/run", "ns/op");
    for (name, f, n, _) in loops {
        let agent = AgentThread::node(kubepods, &[pod.to_path_buf()], &[other.to_path_buf()], Duration::from_secs(1));
        f(ports, *n);
        for (program, runs, time) in agent.stop().programs.into_iter().filter(|(_, runs, _)| *runs > 0) {
            let per_run = time.as_nanos() as f64 / runs as f64;
            let per_op = runs as f64 / *n as f64;
            println!("{name:<32} {program:<12} {per_op:>9.2} {per_run:>8.0} {:>8.0}", per_op * per_run);
        }
    }
}
