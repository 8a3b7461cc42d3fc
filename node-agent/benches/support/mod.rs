//! What the kernel benchmarks share: an agent on a thread of its own (programs loaded at a
//! cgroup, a pipeline draining the ring buffer), and cgroups to run load in.

#![allow(dead_code, reason = "each bench uses part of it")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runwarden_agent::ebpf::{self, KernelStats, Options, PodBudget, Probes};
use runwarden_agent::pipeline::{Pipeline, PipelineConfig};

/// What the agent thread saw.
#[derive(Clone, Debug, Default)]
pub struct AgentReport {
    /// Records read from the ring buffer.
    pub records: u64,
    /// Calls counted by the pipeline (folded ones included).
    pub calls: u64,
    /// The kernel's counters.
    pub kernel: KernelStats,
    /// CPU time of the agent thread.
    pub cpu: Duration,
    /// Each program's runs and run time (while the kernel's BPF statistics are on).
    pub programs: Vec<(String, u64, Duration)>,
}

/// An agent thread: loads the programs at `attach`, monitors `monitored`, drains until stopped.
pub struct AgentThread {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<AgentReport>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl AgentThread {
    /// The cgroups `monitored` reported (as `trace` does).
    pub fn start(monitored: &[PathBuf], dedupe_window: Duration) -> Self {
        let monitored = monitored.to_vec();
        Self::start_with(dedupe_window, move |probes| {
            for dir in &monitored {
                probes.monitor(dir).unwrap();
            }
        })
    }

    /// As the agent on a node: pods below `kubepods`, the pod cgroups `runners` armed
    /// (reported), `others` armed as they appeared and then disarmed (not runners).
    pub fn node(kubepods: &Path, runners: &[PathBuf], others: &[PathBuf], dedupe_window: Duration) -> Self {
        let (kubepods, runners, others) = (kubepods.to_path_buf(), runners.to_vec(), others.to_vec());
        Self::start_with(dedupe_window, move |probes| {
            probes.watch_pods(std::slice::from_ref(&kubepods)).unwrap();
            for dir in &runners {
                probes.arm_pod(dir).unwrap();
            }
            for dir in &others {
                let id = probes.arm_pod(dir).unwrap();
                probes.forget_pod(id).unwrap();
            }
        })
    }

    fn start_with(dedupe_window: Duration, setup: impl FnOnce(&mut Probes) + Send + 'static) -> Self {
        let mount = ebpf::cgroup2_mount().expect("cgroup v2");
        let options = Options { mount, dedupe_window, pod_budget: PodBudget::OFF, pin_dir: None };
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(AgentReport::default()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, r) = (stop.clone(), report.clone());
        let handle = std::thread::spawn(move || {
            pin(1);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut probes = Probes::load(&options).expect("loading the programs (run as root)");
                setup(&mut probes);
                let mut reader = probes.reader().unwrap();
                let mut pipeline = Pipeline::new(PipelineConfig::default());
                let mut records = 0u64;
                ready_tx.send(()).unwrap();
                let mut last_totals = std::time::Instant::now();
                loop {
                    let stopping = s.load(Ordering::Relaxed);
                    let read_up_to = runwarden_agent::pipeline::since_boot().as_nanos() as u64;
                    let n = reader.drain(|bytes| {
                        std::hint::black_box(pipeline.record(bytes));
                    });
                    records += n.await as u64;
                    if last_totals.elapsed() > Duration::from_secs(1) || stopping {
                        pipeline.totals(&probes.dedupe_table().unwrap(), read_up_to);
                        last_totals = std::time::Instant::now();
                    }
                    if stopping {
                        break;
                    }
                }
                let calls = pipeline.calls().iter().map(|c| c.calls).sum();
                *r.lock().unwrap() = AgentReport {
                    records,
                    calls,
                    kernel: probes.stats().unwrap(),
                    cpu: thread_cpu(),
                    programs: probes.program_stats(),
                };
            });
        });
        ready_rx.recv().expect("agent thread started");
        Self { stop, report, handle: Some(handle) }
    }

    /// A thread that wakes as the agent's reader does (every 10 ms) with no programs loaded:
    /// the baseline, so a comparison measures the programs and not the reader's wake-ups.
    pub fn idle() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            pin(1);
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(ebpf::POLL_INTERVAL);
            }
        });
        Self { stop, report: Arc::default(), handle: Some(handle) }
    }

    /// Stops the agent (after draining what is left) and reports.
    pub fn stop(mut self) -> AgentReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.report.lock().unwrap().clone()
    }
}

/// Pins the calling thread to one CPU: the loops on CPU 0, the listener and the agent on CPU 1,
/// so the scheduler moving threads around does not drown a difference of a few percent.
#[allow(unsafe_code, reason = "sched_setaffinity through libc")]
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    ticks(&stat)
}

/// CPU time of a process, from /proc/<pid>/stat.
pub fn process_cpu(pid: u32) -> Duration {
    ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

fn ticks(stat: &str) -> Duration {
    // Fields after the command (which may hold spaces) start at `) `; utime and stime are the
    // 14th and 15th fields overall, at 11 and 12 after it. Clock ticks are 100 per second.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let t = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(t * 10)
}

/// A process's resident memory now and at peak, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A cgroup tree for a benchmark, removed on drop.
pub struct BenchCgroups {
    pub mount: PathBuf,
    pub root: PathBuf,
}

impl BenchCgroups {
    pub fn new(name: &str) -> Self {
        let mount = ebpf::cgroup2_mount().expect("cgroup v2");
        let root = mount.join(format!("runwarden-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        Self { mount, root }
    }

    pub fn child(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Moves this whole process into `dir`.
    pub fn enter(dir: &Path) {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        // Move ourselves back to the root first, then remove the tree deepest first.
        let _ = std::fs::write(self.mount.join("cgroup.procs"), std::process::id().to_string());
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.root);
    }
}
