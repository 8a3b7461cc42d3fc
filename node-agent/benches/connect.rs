//! connect() overhead of the kernel programs, attached at the cgroup v2 root as on a node.
//! The same loops run with no programs, with the programs and this process monitored (dedupe
//! on, and every call a record), and with the programs but this process not monitored (every
//! workload on a node that is not a runner), interleaved round by round. Prints ns/op and the
//! ratio to no programs. Run as root: `cargo bench -p runwarden-agent --bench connect`.

#![allow(unsafe_code, reason = "SO_LINGER and the listen backlog through libc: std has no setters")]

mod support;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use support::{AgentThread, BenchCgroups, pin};

const ROUNDS: usize = 40;

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
    (Setup::Unmonitored, "not monitored"),
];

fn tcp_loop(port: u16, n: usize) -> Duration {
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

/// A port nothing listens on (bound once, then closed).
static CLOSED: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn tcp_refused_loop(_: u16, n: usize) -> Duration {
    // SYN, RST, all within connect(): no other thread involved.
    let port = CLOSED.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
    start.elapsed()
}

fn udp_connect_loop(port: u16, n: usize) -> Duration {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    for _ in 0..n {
        s.connect(("127.0.0.1", port)).unwrap();
    }
    start.elapsed()
}

fn udp_socket_loop(port: u16, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(("127.0.0.1", port)).unwrap();
    }
    start.elapsed()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Loop = (&'static str, fn(u16, usize) -> Duration, usize);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cgroups = BenchCgroups::new("connect");
    let (pod, other) = (cgroups.child("pod"), cgroups.child("other"));
    BenchCgroups::enter(&pod);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // SAFETY: listen() again on a listening socket only raises its backlog (std uses 128; a
    // full accept queue drops SYNs and stalls a connect for a second).
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    CLOSED.store(closed.local_addr().unwrap().port(), std::sync::atomic::Ordering::Relaxed);
    drop(closed);
    pin(0);
    std::thread::spawn(move || {
        pin(1);
        for s in listener.incoming() {
            drop(s);
        }
    });
    let loops: [Loop; 4] = [
        ("TCP socket+connect+close", tcp_loop, 2_000),
        ("TCP connect refused", tcp_refused_loop, 4_000),
        ("UDP connect, one socket", udp_connect_loop, 20_000),
        ("UDP socket+connect+close", udp_socket_loop, 6_000),
    ];
    // Warm up caches and the listener.
    tcp_loop(port, 2_000);
    // ns/op of every round, per setup and loop: the median resists rounds the machine was busy.
    let mut per_round: [[Vec<f64>; 4]; 4] = Default::default();
    let mut lost = 0;
    for round in 0..ROUNDS {
        // Each round starts with another setup, so none always runs right after another.
        for k in 0..SETUPS.len() {
            let i = (round + k) % SETUPS.len();
            let setup = &SETUPS[i].0;
            let agent = match setup {
                Setup::Off => AgentThread::idle(),
                Setup::Monitored => {
                    AgentThread::start(&cgroups.mount, std::slice::from_ref(&pod), Duration::from_secs(1))
                }
                Setup::EveryCall => AgentThread::start(&cgroups.mount, std::slice::from_ref(&pod), Duration::ZERO),
                Setup::Unmonitored => {
                    AgentThread::start(&cgroups.mount, std::slice::from_ref(&other), Duration::from_secs(1))
                }
            };
            for (j, (_, f, n)) in loops.iter().enumerate() {
                let ns = f(port, *n).as_nanos() as f64 / *n as f64;
                per_round[i][j].push(ns);
            }
            lost += agent.stop().kernel.lost_calls;
        }
        eprintln!("round {}/{ROUNDS} done", round + 1);
    }
    println!(
        "connect() overhead, programs attached at {}: median ns/op of {ROUNDS} interleaved rounds \
         (median of per-round ratios to no programs)",
        cgroups.mount.display()
    );
    println!("{:<28} {:>12} {:>22} {:>30} {:>22}", "loop (ns/op)", SETUPS[0].1, SETUPS[1].1, SETUPS[2].1, SETUPS[3].1);
    for (j, (name, _, _)) in loops.iter().enumerate() {
        let ns = |i: usize| median(&per_round[i][j]);
        // The ratio is the median of each round's ratio to that round's run without programs:
        // rounds are adjacent in time, so the machine's slow drift cancels out.
        let ratio = |i: usize| {
            let r: Vec<f64> = per_round[i][j].iter().zip(&per_round[0][j]).map(|(a, b)| a / b).collect();
            median(&r)
        };
        let cell = |i: usize| format!("{:.0} ({:+.1}%)", ns(i), (ratio(i) - 1.0) * 100.0);
        println!("{:<28} {:>12.0} {:>22} {:>30} {:>22}", name, ns(0), cell(1), cell(2), cell(3));
    }
    println!("records lost (ring buffer full): {lost}");
}
