//! What the kernel programs cost a pod's network calls, set up as the agent does on a node: pod
//! cgroups below a `kubepods` cgroup of the bench's own, this process in one of them. The same
//! loops run with no programs, with this pod monitored (dedupe on, and every call a record),
//! and with the programs loaded for another pod while this one was armed as it appeared and
//! disarmed once known not to be a runner (every pod on a node that is not a runner),
//! interleaved round by round. Prints
//! ns/op (MiB/s for the bulk receive) and the per-round ratio to no programs as
//! median [min, max]. Run as root: `cargo bench -p runwarden-agent --bench connect`
//! (`RUNWARDEN_BENCH_ROUNDS` sets the rounds, 40 by default).

#![allow(unsafe_code, reason = "SO_LINGER and the listen backlog through libc: std has no setters")]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
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

/// Where each loop connects: the listener, a port nothing listens on, the bulk-receive sink.
#[derive(Clone, Copy)]
struct Ports {
    listener: u16,
    closed: u16,
    sink: u16,
}

fn tcp_loop(ports: Ports, n: usize) -> Duration {
    let port = ports.listener;
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

/// `n` MiB sent over one TCP connection into the sink (a thread of this pod that reads until
/// the end): a bulk receive, every packet through the pod's ingress hook. Timed until the sink
/// has read the last byte.
fn bulk_receive_loop(ports: Ports, n: usize) -> Duration {
    let chunk = vec![7u8; BULK_CHUNK];
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", ports.sink)).unwrap();
    for _ in 0..n {
        s.write_all(&chunk).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // The sink closes once it has read everything.
    let mut end = [0u8; 1];
    assert_eq!(s.read(&mut end).unwrap(), 0);
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
    let rounds: usize = std::env::var("RUNWARDEN_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(40);
    let cgroups = BenchCgroups::new("connect");
    let kubepods = cgroups.child("kubepods");
    let pod = cgroups.child("kubepods/pod0c0ffee0-1111-4222-8333-000000000001");
    let other = cgroups.child("kubepods/pod0c0ffee0-1111-4222-8333-000000000002");
    BenchCgroups::enter(&pod);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen() again on a listening socket only raises its backlog (std uses 128; a
    // full accept queue drops SYNs and stalls a connect for a second).
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = Ports {
        listener: listener.local_addr().unwrap().port(),
        closed: closed.local_addr().unwrap().port(),
        sink: sink.local_addr().unwrap().port(),
    };
    drop(closed);
    pin(0);
    std::thread::spawn(move || {
        pin(1);
        for s in listener.incoming() {
            drop(s);
        }
    });
    std::thread::spawn(move || {
        pin(1);
        let mut buf = vec![0u8; BULK_CHUNK];
        for s in sink.incoming() {
            let mut s = s.unwrap();
            while s.read(&mut buf).unwrap() > 0 {}
        }
    });
    let loops: [Loop; 5] = [
        // About 0.1 s each, so one slow moment of the machine does not decide a round.
        ("TCP socket+connect+close", tcp_loop, 6_000, false),
        ("TCP connect refused", tcp_refused_loop, 20_000, false),
        ("UDP connect, one socket", udp_connect_loop, 250_000, false),
        ("UDP socket+connect+close", udp_socket_loop, 30_000, false),
        ("TCP bulk receive (MiB/s)", bulk_receive_loop, 2_048, true),
    ];
    // Warm up caches and the listener.
    tcp_loop(ports, 2_000);
    bulk_receive_loop(ports, 256);
    // ns/op (or s/MiB) of every round, per setup and loop.
    let mut per_round: [[Vec<f64>; 5]; 4] = Default::default();
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
}
