//! A real Kubernetes control plane for tests: `etcd` and `kube-apiserver`, built from the Go
//! module proxy at the versions pinned in `hack/build-control-plane.sh`, started on free loopback
//! ports with a fresh data directory.
//!
//! The apiserver generates its own self-signed serving certificate (in `--cert-dir`); clients
//! trust that certificate and authenticate with a static bearer token in group
//! `system:masters`. Authorization is RBAC, as on a real cluster, so tests that need less than
//! cluster-admin can impersonate a service account.
//!
//! One control plane serves every test of a test binary ([`ControlPlane::shared`]). Its
//! processes are children of a thread that lives as long as the binary and carry
//! `PR_SET_PDEATHSIG`, so they die with it however it ends; on a normal exit (which includes
//! failed tests) an `atexit` hook also removes the data directory. Directories left by a killed
//! binary are swept on the next start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The build script; the harness reads the pinned versions from it so they are written once.
const BUILD_SCRIPT: &str = include_str!("../../hack/build-control-plane.sh");

/// Prefix of the data directories under the system temp dir.
const DIR_PREFIX: &str = "runwarden-cp-";

/// How long the apiserver may take to report ready before the harness gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the control plane could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binaries are not in the cache: `make setup` was not run.
    #[error("{0} not found; run `make setup` (hack/build-control-plane.sh) to build it")]
    MissingBinary(PathBuf),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A process exited before the control plane was ready.
    #[error("{name} exited early ({status}); last lines of {log}:\n{tail}")]
    Exited {
        /// `etcd` or `kube-apiserver`.
        name: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log file.
        log: String,
        /// The end of that log.
        tail: String,
    },
    /// Setting up the node failed.
    #[error("{0}")]
    Setup(String),
    /// `/readyz` did not answer `ok` in time.
    #[error("kube-apiserver not ready after {0:?}; see {1}")]
    NotReady(Duration, String),
    /// The kubeconfig the harness wrote could not be loaded.
    #[error("loading kubeconfig: {0}")]
    Kubeconfig(String),
}

/// Result with the harness error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Where the pinned binaries live.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Directory holding `etcd`, `kube-apiserver` and `kubectl`.
    pub dir: PathBuf,
    /// Pinned Kubernetes version, e.g. `v1.36.3`.
    pub kubernetes: String,
    /// Pinned etcd version.
    pub etcd: String,
    /// The cache root (`$RUNWARDEN_CACHE`, default `~/.cache/runwarden`).
    pub cache: PathBuf,
    /// Pinned Actions Runner Controller module version (its CRDs).
    pub arc: String,
    /// Pinned prometheus-operator module version (its ServiceMonitor and PrometheusRule CRDs).
    pub prometheus_operator: String,
    /// The pinned helm binary.
    pub helm: PathBuf,
}

impl Binaries {
    /// The binaries `hack/build-control-plane.sh` builds, in its cache
    /// (`$RUNWARDEN_CACHE`, default `~/.cache/runwarden`).
    pub fn pinned() -> Self {
        let pin = |key: &str| {
            BUILD_SCRIPT
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("hack/build-control-plane.sh has no {key} line"))
        };
        let kubernetes = pin("K8S_VERSION=");
        let etcd = pin("ETCD_VERSION=");
        let arc = pin("ARC_VERSION=");
        let prometheus_operator = pin("PROMETHEUS_OPERATOR_VERSION=");
        let helm_version = pin("HELM_VERSION=");
        let cache = std::env::var_os("RUNWARDEN_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/runwarden"));
        let dir = cache.join(format!("k8s-{kubernetes}-etcd-{etcd}/bin"));
        let helm = cache.join(format!("tools/helm-{helm_version}/helm"));
        Self { dir, kubernetes, etcd, cache, arc, prometheus_operator, helm }
    }

    /// The path of binary `name`, or why it is missing.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if p.is_file() { Ok(p) } else { Err(Error::MissingBinary(p)) }
    }
}

/// A running etcd + kube-apiserver.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// Data directory: etcd data, certificates, logs, kubeconfig.
    pub dir: PathBuf,
    /// A kubeconfig for cluster-admin, usable by `kubectl` and by [`ControlPlane::client`].
    pub kubeconfig: PathBuf,
    /// The binaries it runs.
    pub binaries: Binaries,
    /// How long the start took, from spawning etcd to `/readyz` answering `ok`.
    pub start_time: Duration,
    /// The apiserver's command line, to start it again after [`ControlPlane::stop_apiserver`].
    apiserver: Vec<std::ffi::OsString>,
}

/// Work for the control-plane thread: children it spawns die with that thread, which lives as
/// long as the process.
type Task = Box<dyn FnOnce() + Send>;
static TASKS: Mutex<Option<mpsc::Sender<Task>>> = Mutex::new(None);

/// Children to kill and the directory to remove at exit (when the harness chose it).
static CLEANUP: Mutex<Option<(Vec<Child>, PathBuf, bool)>> = Mutex::new(None);

impl ControlPlane {
    /// The control plane shared by every test of this binary, started on first use.
    ///
    /// Panics with the reason when it cannot start: a test cannot go on without it.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| match Self::start() {
            Ok(cp) => cp,
            Err(e) => panic!("starting the test control plane: {e}"),
        })
    }

    /// Starts a control plane that lives until this process exits.
    pub fn start() -> Result<ControlPlane> {
        Self::start_with(Options::default())
    }

    /// Starts a control plane with `options` (the real node's differs from the loopback one).
    pub fn start_with(options: Options) -> Result<ControlPlane> {
        let (tx, rx) = mpsc::channel();
        // The children's parent-death signal fires when the thread that spawned them ends, so
        // they are spawned by a thread that never ends before the process does.
        std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let (task_tx, task_rx) = mpsc::channel::<Task>();
                *TASKS.lock().unwrap() = Some(task_tx);
                let _ = tx.send(launch(options));
                for task in task_rx {
                    task();
                }
                loop {
                    std::thread::park();
                }
            })
            .map_err(io("spawning the control-plane thread"))?;
        rx.recv().expect("the control-plane thread reports once")
    }

    /// Stops the apiserver (SIGKILL), as an outage: clients get connection errors until
    /// [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&self) {
        let mut guard = CLEANUP.lock().unwrap();
        let (children, _, _) = guard.as_mut().expect("the control plane runs");
        let _ = children[1].kill();
        let _ = children[1].wait();
    }

    /// Starts the apiserver again with the same flags (and data in etcd) and waits until it is
    /// ready.
    pub fn start_apiserver(&self) -> Result<()> {
        let args = self.apiserver.clone();
        let dir = self.dir.clone();
        let (tx, rx) = mpsc::channel();
        let task: Task = Box::new(move || {
            let mut cmd = Command::new(&args[0]);
            cmd.args(&args[1..]);
            let result = spawn_child(&dir, "kube-apiserver", cmd, true).map(|child| {
                if let Some((children, _, _)) = CLEANUP.lock().unwrap().as_mut() {
                    children[1] = child;
                }
            });
            let _ = tx.send(result);
        });
        TASKS.lock().unwrap().as_ref().expect("the control-plane thread runs").send(task).expect("it takes tasks");
        rx.recv().expect("the control-plane thread answers")?;
        let started = Instant::now();
        let token = std::fs::read_to_string(self.dir.join("tokens.csv"))
            .map_err(io("reading tokens.csv"))?
            .split(',')
            .next()
            .unwrap_or_default()
            .to_string();
        wait_ready(self, &token, started).map(drop)
    }

    /// A client with cluster-admin rights. Make one per test: a client belongs to the tokio
    /// runtime it was created on.
    pub async fn client(&self) -> kube::Client {
        let config = self.config().await.expect("the harness's kubeconfig loads");
        kube::Client::try_from(config).expect("a client builds from the harness's kubeconfig")
    }

    /// The client configuration for cluster-admin.
    pub async fn config(&self) -> Result<kube::Config> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))
    }

    /// A `helm` command of the pinned version, pointed at this control plane.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.helm);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A `kubectl` command of the pinned version, pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.binaries.dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }
}

/// How to start the control plane; the default serves loopback tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address the apiserver binds and advertises (the `kubernetes` Service's endpoint).
    pub address: std::net::Ipv4Addr,
    /// Its port; `None` picks a free one.
    pub port: Option<u16>,
    /// `--service-cluster-ip-range`.
    pub service_cidr: String,
    /// More lines for the static token file (`token,user,uid,"group1,group2"`).
    pub tokens: Vec<String>,
    /// More apiserver flags.
    pub flags: Vec<String>,
    /// The data directory; `None`: `<tmp>/runwarden-cp-<pid>`, removed at exit.
    pub dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            address: std::net::Ipv4Addr::LOCALHOST,
            port: None,
            service_cidr: "10.96.0.0/16".into(),
            tokens: Vec::new(),
            flags: Vec::new(),
            dir: None,
        }
    }
}

/// Starts etcd and kube-apiserver and waits for `/readyz`. Runs on the control-plane thread.
fn launch(options: Options) -> Result<ControlPlane> {
    let binaries = Binaries::pinned();
    let etcd = binaries.path("etcd")?;
    let apiserver = binaries.path("kube-apiserver")?;
    sweep_stale_dirs();

    let (dir, remove_at_exit) = match &options.dir {
        Some(dir) => (dir.clone(), false),
        None => (std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id())), true),
    };
    let _ = std::fs::remove_dir_all(dir.join("etcd"));
    let _ = std::fs::remove_dir_all(dir.join("certs"));
    std::fs::create_dir_all(dir.join("certs")).map_err(io(format!("creating {}", dir.display())))?;
    install_cleanup(dir.clone(), remove_at_exit);

    let token = format!("runwarden-test-{:x}", random_u64());
    let mut tokens = format!("{token},runwarden-test-admin,uid-admin,\"system:masters\"\n");
    for line in &options.tokens {
        tokens.push_str(line);
        tokens.push('\n');
    }
    std::fs::write(dir.join("tokens.csv"), tokens).map_err(io("writing tokens.csv"))?;
    let sa_key = dir.join("service-account.key");
    let status = Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"])
        .arg(&sa_key)
        .status()
        .map_err(io("running openssl (install it with `make setup`)"))?;
    if !status.success() {
        return Err(Error::Io { what: "openssl ecparam".into(), source: std::io::Error::other(status.to_string()) });
    }

    let [etcd_port, peer_port, free_api_port] = free_ports();
    let api_port = options.port.unwrap_or(free_api_port);
    let address = options.address;
    let started = Instant::now();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd_cmd = Command::new(etcd);
    etcd_cmd
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={etcd_url}"))
        .arg(format!("--advertise-client-urls={etcd_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"))
        // Test data is thrown away: durability only costs time.
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    spawn(&dir, "etcd", etcd_cmd)?;

    let server = format!("https://{address}:{api_port}");
    let mut api_cmd = Command::new(apiserver);
    api_cmd
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--bind-address={address}"))
        .arg(format!("--advertise-address={address}"))
        .arg(format!("--secure-port={api_port}"))
        .arg(format!("--cert-dir={}", dir.join("certs").display()))
        .arg(format!("--token-auth-file={}", dir.join("tokens.csv").display()))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", sa_key.display()))
        .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
        .arg(format!("--service-cluster-ip-range={}", options.service_cidr))
        .arg("--profiling=false")
        .arg("--v=1")
        .args(&options.flags);
    if !options.flags.iter().any(|f| f.starts_with("--authorization-mode=")) {
        api_cmd.arg("--authorization-mode=RBAC");
    }
    let apiserver =
        std::iter::once(api_cmd.get_program().to_owned()).chain(api_cmd.get_args().map(|a| a.to_owned())).collect();
    spawn(&dir, "kube-apiserver", api_cmd)?;

    let kubeconfig = dir.join("kubeconfig");
    let cp = ControlPlane { server, dir, kubeconfig, binaries, start_time: Duration::ZERO, apiserver };
    let start_time = wait_ready(&cp, &token, started)?;
    eprintln!(
        "control plane: kube-apiserver {} ready at {} in {:.1}s (data in {})",
        cp.binaries.kubernetes,
        cp.server,
        start_time.as_secs_f64(),
        cp.dir.display()
    );
    Ok(ControlPlane { start_time, ..cp })
}

/// Polls `/readyz` until it answers `ok`, and writes the kubeconfig once the serving
/// certificate exists.
fn wait_ready(cp: &ControlPlane, token: &str, started: Instant) -> Result<Duration> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("building a runtime"))?;
    let cert = cp.dir.join("certs/apiserver.crt");
    let log = cp.dir.join("kube-apiserver.log").display().to_string();
    runtime.block_on(async {
        let mut client = None;
        while started.elapsed() < READY_TIMEOUT {
            check_children()?;
            if client.is_none() && cert.is_file() {
                write_kubeconfig(&cp.kubeconfig, &cp.server, &cert, token)?;
                client = Some(cp.client().await);
            }
            if let Some(client) = &client {
                let req = http::Request::get("/readyz").body(Vec::new()).expect("a valid request");
                if matches!(client.request_text(req).await.as_deref(), Ok("ok")) {
                    return Ok(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady(READY_TIMEOUT, log))
    })
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: runwarden-test
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: runwarden-test-admin
  user:
    token: {token}
contexts:
- name: runwarden-test
  context:
    cluster: runwarden-test
    user: runwarden-test-admin
current-context: runwarden-test
",
        ca = ca.display()
    );
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// Spawns a child with its output in `<dir>/<name>.log`, killed when this process dies.
fn spawn(dir: &Path, name: &'static str, cmd: Command) -> Result<()> {
    let child = spawn_child(dir, name, cmd, false)?;
    if let Some((children, _, _)) = CLEANUP.lock().unwrap().as_mut() {
        children.push(child);
    }
    Ok(())
}

fn spawn_child(dir: &Path, name: &'static str, mut cmd: Command, append: bool) -> Result<Child> {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::options()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&log_path)
        .map_err(io(format!("creating {}", log_path.display())))?;
    let err = log.try_clone().map_err(io("duplicating a log handle"))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(io(format!("starting {name}")))
}

#[allow(unsafe_code)] // prctl in the forked child, before exec: the documented use of pre_exec.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last `lines` lines of a log file.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Reports a child that exited, with the end of its log.
fn check_children() -> Result<()> {
    let mut guard = CLEANUP.lock().unwrap();
    let Some((children, dir, _)) = guard.as_mut() else { return Ok(()) };
    for (child, name) in children.iter_mut().zip(["etcd", "kube-apiserver"]) {
        if let Ok(Some(status)) = child.try_wait() {
            let log = dir.join(format!("{name}.log"));
            return Err(Error::Exited { name, status, log: log.display().to_string(), tail: tail(&log, 20) });
        }
    }
    Ok(())
}

fn install_cleanup(dir: PathBuf, remove_dir: bool) {
    *CLEANUP.lock().unwrap() = Some((Vec::new(), dir, remove_dir));
    extern "C" fn at_exit() {
        // A poisoned lock still holds the children: clean up anyway.
        let mut guard = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((children, dir, remove_dir)) = guard.take() {
            for mut child in children.into_iter().rev() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if remove_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    #[allow(unsafe_code)] // registering a C exit hook; the hook only kills children and removes files.
    // SAFETY: at_exit is a plain extern "C" fn with no arguments, valid for the process lifetime.
    unsafe {
        libc::atexit(at_exit);
    }
}

/// Removes data directories of earlier test processes that no longer run.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let alive = Path::new("/proc").join(pid).exists();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Three distinct free loopback ports (bound and released; the kernel does not hand them out
/// again at once).
fn free_ports() -> [u16; 3] {
    let listeners: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port")).collect();
    let port = |i: usize| listeners[i].local_addr().expect("a bound socket has an address").port();
    [port(0), port(1), port(2)]
}

/// A random number from the standard library's randomly seeded hasher (no RNG crate needed).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}
