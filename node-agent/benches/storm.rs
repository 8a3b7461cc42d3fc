//! A call storm: two test pods send 25,000 UDP datagrams a second each (50,000/s in all) for
//! 10 s, to 1,000 destinations each, while the agent (programs on the two pods, reader and
//! pipeline on a thread of this process) keeps up. Run with the kernel dedupe on and off; prints
//! records lost, calls counted against calls made, the agent thread's CPU and this process's
//! RSS. Run as root: `cargo bench -p runwarden-agent --bench storm`.

mod support;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{AgentThread, BenchCgroups, rss_kib};

const GENERATOR: &str = "RUNWARDEN_STORM_GENERATOR";
const RATE_PER_POD: u64 = 25_000;
const SECONDS: u64 = 10;
const DESTINATIONS: u16 = 1_000;

/// In a generator process: `rate` UDP datagrams a second for `secs`, paced per millisecond.
fn generate(rate: u64, secs: u64, destinations: u16) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let per_ms = rate / 1000;
    let mut made: u64 = 0;
    for ms in 0..secs * 1000 {
        for _ in 0..per_ms {
            let port = 20_000 + (made % u64::from(destinations)) as u16;
            socket.send_to(&[0], ("127.0.0.1", port)).unwrap();
            made += 1;
        }
        let next = start + Duration::from_millis(ms + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    println!("{made} {:.3}", start.elapsed().as_secs_f64());
}

fn storm(cgroups: &BenchCgroups, window: Duration) {
    let pods = [
        cgroups.child(&format!("pod-a-{}", window.as_millis())),
        cgroups.child(&format!("pod-b-{}", window.as_millis())),
    ];
    let agent = AgentThread::start(&pods, window);
    let (rss_before, _) = rss_kib(std::process::id());
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let children: Vec<_> = pods
        .iter()
        .map(|pod| {
            Command::new("sh")
                .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                .arg(pod)
                .arg(&exe)
                .env(GENERATOR, format!("{RATE_PER_POD}:{SECONDS}:{DESTINATIONS}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut made = 0u64;
    let mut seconds = 0f64;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut f = text.split_whitespace();
        made += f.next().unwrap().parse::<u64>().unwrap();
        seconds = seconds.max(f.next().unwrap().parse().unwrap());
    }
    let wall = started.elapsed();
    let (rss, peak) = rss_kib(std::process::id());
    let report = agent.stop();
    println!(
        "dedupe {:>5}: {made} calls in {seconds:.1} s ({:.0}/s); records {} ; calls counted {} ; lost {} ; \
         agent thread CPU {:.2} s = {:.1}% of one core ; RSS {} MiB (before {} MiB, peak {} MiB)",
        if window.is_zero() { "off".to_string() } else { format!("{} s", window.as_secs()) },
        made as f64 / seconds,
        report.records,
        report.calls,
        report.kernel.lost_calls + report.kernel.lost_dns,
        report.cpu.as_secs_f64(),
        100.0 * report.cpu.as_secs_f64() / wall.as_secs_f64(),
        rss / 1024,
        rss_before / 1024,
        peak / 1024,
    );
}

fn main() {
    if let Ok(spec) = std::env::var(GENERATOR) {
        let f: Vec<u64> = spec.split(':').map(|x| x.parse().unwrap()).collect();
        generate(f[0], f[1], f[2] as u16);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cgroups = BenchCgroups::new("storm");
    println!(
        "call storm: 2 pods x {RATE_PER_POD} UDP datagrams/s for {SECONDS} s, {DESTINATIONS} destinations each, \
         programs at {}",
        cgroups.mount.display()
    );
    storm(&cgroups, Duration::from_secs(1));
    storm(&cgroups, Duration::ZERO);
}
