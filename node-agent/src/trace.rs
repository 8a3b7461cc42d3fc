//! `runwarden-agent trace`: every outbound call of one command (and its children), or of an
//! existing cgroup tree, named from the DNS answers it received. No Kubernetes needed.
//!
//! ```text
//! runwarden-agent trace [--json] [--dedupe-window SECONDS] -- COMMAND ARGS...
//! runwarden-agent trace [--json] [--dedupe-window SECONDS] --cgroup PATH
//! ```
//!
//! The command runs in a fresh cgroup below the cgroup v2 mount; the programs are attached to
//! that cgroup only. With `--cgroup`, tracing runs until interrupted. With `--json`, one object
//! per line on stdout; otherwise a table. A summary of calls per destination goes to stderr.

use std::ffi::CString;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ebpf::{self, LoadError, Options, PodBudget, Probes};
use crate::pipeline::{Observation, Pipeline, PipelineConfig};

/// What to trace and how to print it.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
#[command(
    about = "Print every outbound call (TCP and UDP, IPv4 and IPv6) of COMMAND and its children, or of the \
             processes in an existing cgroup v2 tree until interrupted, with the host name each address \
             was answered for. Needs root (or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN) and a cgroup v2 mount.",
    override_usage = "runwarden-agent trace [--json] [--dedupe-window SECONDS] -- COMMAND [ARGS...]\n       \
                      runwarden-agent trace [--json] [--dedupe-window SECONDS] --cgroup PATH"
)]
pub struct Args {
    /// One JSON object per call on stdout: time, pid, process, executable, ip, port, proto,
    /// host (null when no DNS answer named the address), hosts, hook.
    #[arg(long)]
    pub json: bool,
    /// Trace an existing cgroup (absolute, or relative to the cgroup v2 mount) until interrupted.
    #[arg(long, value_name = "PATH", conflicts_with = "command")]
    pub cgroup: Option<PathBuf>,
    /// Repeated calls to one destination within SECONDS are counted, not printed (0 prints
    /// every call); the summary on stderr has exact counts.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_window)]
    pub dedupe_window: Duration,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_window(v: &str) -> Result<Duration, String> {
    let secs: f64 = v.parse().map_err(|_| format!("`{v}` is not a number of seconds"))?;
    if !(0.0..=3600.0).contains(&secs) {
        return Err("between 0 and 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Why tracing failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Not root.
    #[error("trace needs root: it creates a cgroup and loads BPF programs (run it with sudo)")]
    NotRoot,
    /// Loading or attaching.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Creating the cgroup, starting the command, writing output.
    #[error("{0}")]
    Io(String),
}

/// Traces as `args` say, writing calls to `out`. Returns the command's exit code (0 with
/// `--cgroup`).
pub async fn run(args: &Args, out: &mut dyn Write) -> Result<i32, TraceError> {
    #[allow(unsafe_code, reason = "geteuid has no preconditions")]
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err(TraceError::NotRoot);
    }
    let mount = ebpf::cgroup2_mount()?;
    let (cgroup, created) = match &args.cgroup {
        Some(path) => {
            let path = if path.is_absolute() { path.clone() } else { mount.join(path) };
            if !path.join("cgroup.procs").exists() {
                return Err(TraceError::Io(format!(
                    "{} is not a cgroup v2 directory (the cgroup v2 mount is {})",
                    path.display(),
                    mount.display()
                )));
            }
            (path, false)
        }
        None => {
            let path = mount.join(format!("runwarden-trace-{}", std::process::id()));
            std::fs::create_dir(&path).map_err(|e| TraceError::Io(format!("creating {}: {e}", path.display())))?;
            (path, true)
        }
    };
    let result = trace(args, &mount, &cgroup, out).await;
    if created && std::fs::remove_dir(&cgroup).is_err() {
        eprintln!("runwarden-agent: {} still holds processes the command left running; not removed", cgroup.display());
    }
    result
}

async fn trace(args: &Args, mount: &Path, cgroup: &Path, out: &mut dyn Write) -> Result<i32, TraceError> {
    let options = Options {
        mount: mount.to_path_buf(),
        dedupe_window: args.dedupe_window,
        pod_budget: PodBudget::OFF,
        pin_dir: None,
    };
    let mut probes = Probes::load(&options)?;
    probes.monitor(cgroup)?;
    let mut reader = probes.reader()?;
    if args.cgroup.is_some() {
        eprintln!("runwarden-agent: tracing {} until interrupted", cgroup.display());
    }
    if !probes.exec_paths() {
        eprintln!("runwarden-agent: no executable paths (the kernel has no BTF, or refused the exec program)");
    }
    let mut pipeline = Pipeline::new(PipelineConfig::default());
    let io = |e: std::io::Error| TraceError::Io(format!("writing output: {e}"));
    if !args.json {
        writeln!(out, "{:<12} {:>7} {:<16} {:<5} {:<41} HOST", "TIME", "PID", "PROCESS", "PROTO", "DESTINATION")
            .map_err(io)?;
    }

    let mut child = match args.command.split_first() {
        Some((program, rest)) => Some(spawn_in(cgroup, program, rest)?),
        None => None,
    };
    let mut interrupt = Box::pin(interrupted());
    let code = loop {
        let mut lines = Vec::new();
        reader.drain(|bytes| lines.extend(pipeline.record(bytes))).await;
        for o in &lines {
            print(out, o, args.json).map_err(io)?;
        }
        out.flush().map_err(io)?;
        // Ctrl-C reaches the command too: wait for it to end rather than leave its cgroup.
        let interrupted = futures_poll(&mut interrupt);
        match child.as_mut() {
            Some(c) => {
                let status = c.try_wait().map_err(|e| TraceError::Io(format!("waiting for the command: {e}")))?;
                if let Some(status) = status {
                    use std::os::unix::process::ExitStatusExt;
                    break status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                }
            }
            None if interrupted => break 0,
            None => {}
        }
    };
    // Everything the command did is in the ring buffer by now: read the rest.
    let mut read_up_to = drain_all(&mut reader, &mut pipeline, out, args.json).await.map_err(io)?;
    // Destinations whose record did not fit in the ring buffer are still in the kernel's dedupe
    // table; their entries settle shortly after the last call.
    let kernel = probes.stats()?;
    if kernel.lost_calls > 0 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        read_up_to = drain_all(&mut reader, &mut pipeline, out, args.json).await.map_err(io)?;
    }
    for o in pipeline.totals(&probes.dedupe_table()?, read_up_to) {
        print(out, &o, args.json).map_err(io)?;
    }
    out.flush().map_err(io)?;
    summary(&pipeline, &probes.stats()?);
    Ok(code)
}

/// Reads and prints every record waiting; returns a time (CLOCK_BOOTTIME) before which every
/// record written has been read.
async fn drain_all(
    reader: &mut crate::ebpf::Reader,
    pipeline: &mut Pipeline,
    out: &mut dyn Write,
    json: bool,
) -> std::io::Result<u64> {
    let read_up_to = crate::pipeline::since_boot().as_nanos() as u64;
    let mut lines = Vec::new();
    while reader.drain(|bytes| lines.extend(pipeline.record(bytes))).await > 0 {}
    for o in &lines {
        print(out, o, json)?;
    }
    out.flush()?;
    Ok(read_up_to)
}

/// Polls a future once without blocking.
fn futures_poll(fut: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    fut.as_mut().poll(&mut cx).is_ready()
}

pub(crate) async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Starts `program` with its process already in `cgroup` (it moves itself there between fork
/// and exec, so not one call escapes).
fn spawn_in(cgroup: &Path, program: &str, args: &[String]) -> Result<std::process::Child, TraceError> {
    use std::os::unix::process::CommandExt;
    let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
        .map_err(|_| TraceError::Io("cgroup path holds a NUL byte".into()))?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    #[allow(unsafe_code, reason = "pre_exec runs between fork and exec; the hook only makes raw syscalls")]
    // SAFETY: the closure calls only async-signal-safe functions (open, write, close) on data
    // prepared before the fork, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            libc::close(fd);
            if written < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        });
    }
    command.spawn().map_err(|e| TraceError::Io(format!("starting {program}: {e}")))
}

fn print(out: &mut dyn Write, o: &Observation, json: bool) -> std::io::Result<()> {
    if json {
        let line = serde_json::json!({
            "time": rfc3339(o.time),
            // A call recovered from the kernel's dedupe table has no process.
            "pid": (o.pid != 0).then_some(o.pid),
            "process": (!o.process.is_empty()).then_some(&o.process),
            "executable": o.executable,
            "ip": o.ip.to_string(),
            "port": o.port,
            "proto": o.proto.as_str(),
            "host": o.hosts.first(),
            "hosts": o.hosts,
            "hook": o.hook.as_str(),
            "cgroup_id": o.cgroup_id,
        });
        writeln!(out, "{line}")
    } else {
        let time = rfc3339(o.time);
        let clock = time.get(11..23).unwrap_or(&time);
        writeln!(
            out,
            "{:<12} {:>7} {:<16} {:<5} {:<41} {}",
            clock,
            o.pid,
            o.process,
            o.proto.as_str(),
            destination(o.ip, o.port),
            if o.hosts.is_empty() { "-".to_string() } else { o.hosts.join(",") }
        )
    }
}

fn destination(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn summary(pipeline: &Pipeline, kernel: &ebpf::KernelStats) {
    let calls = pipeline.calls();
    let total: u64 = calls.iter().map(|c| c.calls).sum();
    eprintln!("runwarden-agent: {total} calls to {} destinations", calls.len());
    for c in &calls {
        let host = c.last.hosts.first().map(String::as_str).unwrap_or("-");
        eprintln!("  {:>8}  {:<5} {:<41} {host}", c.calls, c.last.proto.as_str(), destination(c.last.ip, c.last.port));
    }
    let stats = pipeline.stats();
    if kernel.lost_calls + kernel.lost_dns > 0 {
        eprintln!(
            "runwarden-agent: the ring buffer overflowed: {} calls and {} DNS answers lost",
            kernel.lost_calls, kernel.lost_dns
        );
    }
    if stats.malformed_dns > 0 {
        eprintln!("runwarden-agent: {} DNS answers could not be parsed", stats.malformed_dns);
    }
}

/// `2026-11-28T11:34:52.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}
