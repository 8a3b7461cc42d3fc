//! A real single-node Kubernetes cluster on this machine: the harness's etcd and kube-apiserver
//! plus kube-controller-manager, kube-scheduler, containerd + runc, a kubelet and kube-proxy,
//! built or installed by `make setup`.
//!
//! What it sets up, and why (../shared/notes/real-node.md records what each setting fixed):
//! - A bridge of its own, `rwnode0` with [`NODE_IP`]/24: the node's address. The apiserver binds
//!   it (not the machine's interfaces), the kubelet serves on it, pods live in its subnet (CNI
//!   `bridge` + `host-local`, no masquerading) and tests put their listeners and DNS server on it
//!   or on extra addresses of it ([`Node::add_address`]). No traffic leaves the machine.
//! - kube-proxy (iptables mode) so that in-cluster clients reach `kubernetes.default`, as on a
//!   real node; the kubelet's `clusterDNS` is [`NODE_IP`]: a test's DNS server on port 53 there
//!   answers every pod (there is no cluster DNS add-on).
//! - The BPF filesystem at `/sys/fs/bpf` (mounted if the machine has none), where the agent
//!   pins block mode's state, as on real nodes.
//! - containerd with `restrict_oom_score_adj` and `netns_mounts_under_state_dir`, the sandbox
//!   image built locally (no registry); images are imported from OCI archives (`make images`)
//!   and pods use `imagePullPolicy: Never`; image GC never collects them.
//! - Static token authentication for the admin, the kubelet, kube-proxy, the controller-manager
//!   and the scheduler; authorization `Node,RBAC`; a client certificate for apiserver → kubelet
//!   (logs, exec), checked by the kubelet against the harness's CA.
//!
//! One node per machine (the kubelet's cgroups and ports are global): a lock file in `/run`
//! says who runs it. Teardown (at exit, and before a start, for a node whose process was killed)
//! stops the kubelet, kills every container through the `kubepods` cgroup, stops containerd and
//! its shims, unmounts what they mounted under the node's directory, removes the cgroups, the
//! bridge and kube-proxy's rules, and restores the sysctls the CNI plugin changed and the
//! neighbour-table limits it raised.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;

use crate::controlplane::{Binaries, ControlPlane, Error, Options, Result, die_with_parent, io, random_u64, tail};

/// The node's name.
pub const NODE_NAME: &str = "runwarden-node";
/// The node's address: on the harness's bridge, bound by the apiserver and the kubelet.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The pods' subnet (the bridge's).
pub const POD_CIDR: &str = "10.213.0.0/24";
/// Services' cluster IPs.
pub const SERVICE_CIDR: &str = "10.214.0.0/24";
/// The apiserver's port on [`NODE_IP`].
pub const API_PORT: u16 = 6443;
/// The bridge.
pub const BRIDGE: &str = "rwnode0";
/// The bridge's MAC address, fixed (locally administered).
const BRIDGE_MAC: &str = "02:72:77:00:00:01";
/// Addresses 10.213.0.200-250 are never given to pods: tests add them to the bridge for
/// listeners that must look like distinct hosts.
pub const TEST_ADDRESSES: std::ops::RangeInclusive<u8> = 200..=250;

const LOCK: &str = "/run/runwarden-node.lock";
/// The directory of the node last started on this machine, for teardown after a crash.
const LAST_DIR: &str = "/run/runwarden-node.dir";
const SYSCTLS: [&str; 5] = [
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/ipv4/neigh/default/gc_thresh1",
    "net/ipv4/neigh/default/gc_thresh2",
    "net/ipv4/neigh/default/gc_thresh3",
];

/// The neighbour table's limits while the node runs (`gc_thresh1..3`). The table is one for
/// every network namespace of the machine, and test pods reach the test's listeners on their
/// own subnet (an entry per pod and listener): with the defaults (128/512/1,024), some 90 pods
/// calling 10 listeners each overflowed it, and the next pods' lookups failed.
const NEIGHBOUR_LIMITS: [(&str, u32); 3] = [
    ("net/ipv4/neigh/default/gc_thresh1", 1024),
    ("net/ipv4/neigh/default/gc_thresh2", 8192),
    ("net/ipv4/neigh/default/gc_thresh3", 16384),
];
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running single-node cluster.
#[derive(Debug)]
pub struct Node {
    /// etcd + kube-apiserver at `https://10.213.0.1:6443`.
    pub control_plane: ControlPlane,
    /// Everything the node writes: containerd's root and state, the kubelet's root, logs.
    pub dir: PathBuf,
    /// containerd's socket.
    pub containerd: PathBuf,
    /// How long the start took (control plane to node Ready and services routed).
    pub start_time: Duration,
}

/// The node's processes, stopped in order at exit.
static NODE: Mutex<Option<NodeProcesses>> = Mutex::new(None);

struct NodeProcesses {
    dir: PathBuf,
    children: Vec<(&'static str, Child)>,
    remove_dir: bool,
    _lock: File,
}

impl Node {
    /// The node shared by every test of this binary, started on first use.
    pub fn shared() -> &'static Node {
        static SHARED: OnceLock<Node> = OnceLock::new();
        SHARED.get_or_init(|| match Self::start(None) {
            Ok(node) => node,
            Err(e) => panic!("starting the test node: {e}"),
        })
    }

    /// Starts the node; it lives until this process exits. `dir`: where its data goes (kept at
    /// exit); `None`: a directory under the system temp dir, removed at exit.
    pub fn start(dir: Option<PathBuf>) -> Result<Node> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("node".into())
            .spawn(move || {
                let _ = tx.send(launch(dir));
                loop {
                    std::thread::park();
                }
            })
            .map_err(io("spawning the node thread"))?;
        rx.recv().expect("the node thread reports once")
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> kube::Client {
        self.control_plane.client().await
    }

    /// `kubectl` pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        self.control_plane.kubectl()
    }

    /// Imports an OCI image archive into the node's containerd.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        import_image(&self.containerd, archive)
    }

    /// Adds `10.213.0.<n>` (n in [`TEST_ADDRESSES`]) to the bridge, for a listener that must look
    /// like a host of its own to pods. Idempotent.
    pub fn add_address(&self, n: u8) -> Result<Ipv4Addr> {
        assert!(TEST_ADDRESSES.contains(&n), "test addresses are 10.213.0.{TEST_ADDRESSES:?}");
        let ip = Ipv4Addr::new(10, 213, 0, n);
        let out = Command::new("ip")
            .args(["addr", "replace", &format!("{ip}/32"), "dev", BRIDGE])
            .output()
            .map_err(io("running ip"))?;
        if !out.status.success() {
            return Err(Error::Setup(format!("ip addr replace {ip}: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(ip)
    }

    /// The end of a node component's log (`kubelet`, `containerd`, `kube-proxy`, ...).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        tail(&self.dir.join(format!("{name}.log")), lines)
    }
}

/// Runs a command, failing with its stderr.
fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(io(format!("running {what}")))?;
    if !out.status.success() {
        return Err(Error::Setup(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

fn import_image(socket: &Path, archive: &Path) -> Result<()> {
    if !archive.is_file() {
        return Err(Error::MissingBinary(archive.to_path_buf()));
    }
    run(
        &format!("ctr images import {}", archive.display()),
        Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive),
    )
    .map(drop)
}

/// The OCI archives `make images` writes.
pub fn image_dir() -> PathBuf {
    Binaries::pinned().cache.join("images")
}

/// ARC's CRDs (`actions.github.com`) as its pinned Go module carries them (`make setup`).
pub fn arc_crd_dir() -> PathBuf {
    let b = Binaries::pinned();
    b.cache.join(format!("arc-{}/crds", b.arc))
}

/// prometheus-operator's ServiceMonitor and PrometheusRule CRDs (`make setup`).
pub fn prometheus_operator_crd_dir() -> PathBuf {
    let b = Binaries::pinned();
    b.cache.join(format!("prometheus-operator-{}/crds", b.prometheus_operator))
}

fn take_lock() -> Result<File> {
    let file = File::options().create(true).truncate(false).read(true).write(true).open(LOCK).map_err(io(LOCK))?;
    #[allow(unsafe_code)] // flock on a file we own; no memory is shared.
    // SAFETY: flock takes a valid open descriptor and an operation flag.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(LOCK).unwrap_or_default();
        return Err(Error::Setup(format!(
            "a runwarden node already runs on this machine (process {}; `make demo-down` stops the demo's)",
            holder.trim()
        )));
    }
    let mut f = &file;
    let _ = file.set_len(0);
    let _ = writeln!(f, "{}", std::process::id());
    Ok(file)
}

fn launch(dir: Option<PathBuf>) -> Result<Node> {
    let started = Instant::now();
    let binaries = Binaries::pinned();
    for b in ["kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"] {
        binaries.path(b)?;
    }
    for tool in ["containerd", "runc", "ctr", "iptables"] {
        if !Path::new("/usr/bin").join(tool).exists() && !Path::new("/usr/sbin").join(tool).exists() {
            return Err(Error::Setup(format!("{tool} is not installed; run `make setup`")));
        }
    }
    let lock = take_lock()?;
    // A node whose process was killed left containers, mounts, cgroups and rules behind.
    if let Ok(last) = std::fs::read_to_string(LAST_DIR) {
        teardown(Path::new(last.trim()));
    }
    let (dir, remove_dir) = match dir {
        Some(d) => (d, false),
        None => (std::env::temp_dir().join(format!("runwarden-node-{}", std::process::id())), true),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let dir = dir.canonicalize().map_err(io("resolving the node directory"))?;
    write(Path::new(LAST_DIR), &dir.display().to_string())?;
    save_sysctls(&dir);
    mount_bpffs(&dir)?;
    for (key, value) in NEIGHBOUR_LIMITS {
        write(&Path::new("/proc/sys").join(key), &value.to_string())?;
    }
    *NODE.lock().unwrap() = Some(NodeProcesses { dir: dir.clone(), children: Vec::new(), remove_dir, _lock: lock });

    // The bridge first: the apiserver binds its address.
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).stderr(Stdio::null()).status();
    // With a MAC of its own: a bridge left to choose takes its lowest port's, so it changed
    // whenever a pod's veth went, and pods whose neighbour entry for the node's address still
    // held the old one lost their DNS queries until it expired (lookups failed at random).
    run("ip link add", Command::new("ip").args(["link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"]))?;
    run("ip addr add", Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE]))?;
    run("ip link set up", Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;

    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(io("creating pki"))?;
    make_kubelet_client_cert(&pki)?;
    let token = |user: &str| (format!("{user}-{:x}", random_u64()).replace(':', "-"), user.to_string());
    let node_token = token(&format!("system:node:{NODE_NAME}"));
    let proxy_token = token("system:kube-proxy");
    let kcm_token = token("system:kube-controller-manager");
    let scheduler_token = token("system:kube-scheduler");
    let cp_dir = dir.join("control-plane");
    let control_plane = ControlPlane::start_with(Options {
        address: NODE_IP,
        port: Some(API_PORT),
        service_cidr: SERVICE_CIDR.into(),
        tokens: vec![
            format!("{},{},uid-node,\"system:nodes\"", node_token.0, node_token.1),
            format!("{},{},uid-kube-proxy,", proxy_token.0, proxy_token.1),
            format!("{},{},uid-kcm,", kcm_token.0, kcm_token.1),
            format!("{},{},uid-scheduler,", scheduler_token.0, scheduler_token.1),
        ],
        flags: vec![
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--kubelet-client-certificate={}", pki.join("kubelet-client.crt").display()),
            format!("--kubelet-client-key={}", pki.join("kubelet-client.key").display()),
            "--kubelet-preferred-address-types=InternalIP".into(),
        ],
        dir: Some(cp_dir.clone()),
    })?;
    let server = control_plane.server.clone();
    let ca = cp_dir.join("certs/apiserver.crt");
    let kubeconfig = |name: &str, token: &(String, String)| -> Result<PathBuf> {
        let path = dir.join(format!("{name}.kubeconfig"));
        write(
            &path,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: node\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\n\
                 users:\n- name: {name}\n  user: {{token: \"{}\"}}\ncontexts:\n- name: node\n  context: {{cluster: node, user: {name}}}\n\
                 current-context: node\n",
                ca.display(),
                token.0
            ),
        )?;
        Ok(path)
    };

    let bin = |name: &str| binaries.dir.join(name);
    let mut kcm = Command::new(bin("kube-controller-manager"));
    kcm.arg(format!("--kubeconfig={}", kubeconfig("kube-controller-manager", &kcm_token)?.display()))
        .arg("--use-service-account-credentials=true")
        .arg(format!("--service-account-private-key-file={}", cp_dir.join("service-account.key").display()))
        .arg(format!("--root-ca-file={}", ca.display()))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .args(["--leader-elect=false", "--secure-port=0", "--v=1"]);
    spawn(&dir, "kube-controller-manager", kcm)?;
    let mut scheduler = Command::new(bin("kube-scheduler"));
    scheduler.arg(format!("--kubeconfig={}", kubeconfig("kube-scheduler", &scheduler_token)?.display())).args([
        "--leader-elect=false",
        "--secure-port=0",
        "--v=1",
    ]);
    spawn(&dir, "kube-scheduler", scheduler)?;

    // containerd, then the images every pod needs (the sandbox image first).
    let ctrd = dir.join("containerd");
    let socket = ctrd.join("containerd.sock");
    write(&ctrd.join("config.toml"), &containerd_config(&dir))?;
    write(&dir.join("cni/net.d/10-runwarden.conflist"), &cni_config(&dir))?;
    let mut containerd = Command::new("containerd");
    containerd.arg("--config").arg(ctrd.join("config.toml"));
    spawn(&dir, "containerd", containerd)?;
    wait_for("containerd's socket", Duration::from_secs(30), || {
        Ok(socket.exists()
            && Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success()))
    })?;
    for image in ["test-pause.tar", "test-busybox.tar"] {
        import_image(&socket, &image_dir().join(image))?;
    }

    let kubelet_config = dir.join("kubelet/config.yaml");
    write(&kubelet_config, &kubelet_config_yaml(&dir, &socket, &pki))?;
    let mut kubelet = Command::new(bin("kubelet"));
    kubelet
        .arg(format!("--config={}", kubelet_config.display()))
        .arg(format!("--kubeconfig={}", kubeconfig("kubelet", &node_token)?.display()))
        .arg(format!("--root-dir={}", dir.join("kubelet/root").display()))
        .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
        .arg(format!("--volume-plugin-dir={}", dir.join("kubelet/volume-plugins").display()))
        .arg(format!("--hostname-override={NODE_NAME}"))
        .arg(format!("--node-ip={NODE_IP}"))
        .arg("--v=1");
    spawn(&dir, "kubelet", kubelet)?;
    let mut proxy = Command::new(bin("kube-proxy"));
    proxy
        .arg(format!("--kubeconfig={}", kubeconfig("kube-proxy", &proxy_token)?.display()))
        .arg(format!("--hostname-override={NODE_NAME}"))
        .arg("--proxy-mode=iptables")
        .arg(format!("--cluster-cidr={POD_CIDR}"))
        .arg(format!("--nodeport-addresses={NODE_IP}/32"))
        .args([
            "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256",
            "--conntrack-max-per-core=0",
            "--v=1",
        ]);
    spawn(&dir, "kube-proxy", proxy)?;

    let node = Node { control_plane, dir: dir.clone(), containerd: socket, start_time: Duration::ZERO };
    wait_node_ready(&node)?;
    // kube-proxy routes the `kubernetes` Service to the apiserver.
    wait_for("kube-proxy's rule for the kubernetes Service", READY_TIMEOUT, || {
        let rules = Command::new("iptables").args(["-t", "nat", "-S", "KUBE-SERVICES"]).output();
        Ok(rules.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("default/kubernetes:https")))
    })?;
    let start_time = started.elapsed();
    eprintln!(
        "node: {NODE_NAME} Ready at {NODE_IP} (kubelet, containerd, kube-proxy, scheduler, controller-manager) in {:.1}s; data in {}",
        start_time.as_secs_f64(),
        dir.display()
    );
    Ok(Node { start_time, ..node })
}

fn wait_node_ready(node: &Node) -> Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("building a runtime"))?;
    runtime.block_on(async {
        let nodes: Api<NodeObject> = Api::all(node.client().await);
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            check_node_children()?;
            if let Ok(n) = nodes.get(NODE_NAME).await {
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::Setup(format!(
            "node {NODE_NAME} not Ready after {READY_TIMEOUT:?}; kubelet log:\n{}",
            node.log_tail("kubelet", 30)
        )))
    })
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        check_node_children()?;
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Setup(format!("{what}: not there after {timeout:?}")))
}

fn spawn(dir: &Path, name: &'static str, mut cmd: Command) -> Result<()> {
    let log_path = dir.join(format!("{name}.log"));
    let log = File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let err = log.try_clone().map_err(io("duplicating a log handle"))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(io(format!("starting {name}")))?;
    if let Some(p) = NODE.lock().unwrap().as_mut() {
        p.children.push((name, child));
    }
    install_teardown();
    Ok(())
}

fn check_node_children() -> Result<()> {
    let mut guard = NODE.lock().unwrap();
    let Some(p) = guard.as_mut() else { return Ok(()) };
    for (name, child) in &mut p.children {
        if let Ok(Some(status)) = child.try_wait() {
            let log = p.dir.join(format!("{name}.log"));
            return Err(Error::Exited { name, status, log: log.display().to_string(), tail: tail(&log, 20) });
        }
    }
    Ok(())
}

fn install_teardown() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn at_exit() {
            let mut guard = NODE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut p) = guard.take() {
                // kubelet and kube-proxy first, so nothing restarts what is being removed.
                for wanted in ["kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"] {
                    for (name, child) in &mut p.children {
                        if *name == wanted {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                    }
                }
                teardown(&p.dir);
                for (_, mut child) in p.children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                if p.remove_dir {
                    let _ = std::fs::remove_dir_all(&p.dir);
                }
                let _ = std::fs::remove_file(LAST_DIR);
            }
        }
        #[allow(unsafe_code)] // registering a C exit hook; it only stops processes and removes host state.
        // SAFETY: at_exit is a plain extern "C" fn with no arguments, valid for the process lifetime.
        unsafe {
            libc::atexit(at_exit);
        }
    });
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` on pure v2 hosts, its `unified` child on hybrid ones.
pub fn cgroup2() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.controllers").exists() { unified.into() } else { "/sys/fs/cgroup".into() }
}

/// Removes what a node with data in `dir` left on the host. Safe to run twice.
pub fn teardown(dir: &Path) {
    // Stop a kubelet of this node that is still running (its process was not ours).
    let here = dir.display().to_string();
    kill_matching(|program, cmd| program == "kubelet" && cmd.contains(&here));
    // Every container and sandbox: one write kills the whole kubepods subtree.
    let kubepods = cgroup2().join("kubepods");
    let _ = std::fs::write(kubepods.join("cgroup.kill"), "1");
    let socket = dir.join("containerd/containerd.sock");
    // containerd, then its shims (they outlive it), matched by this node's socket path.
    kill_matching(|program, cmd| program == "containerd" && cmd.contains(&here));
    let socket = socket.display().to_string();
    kill_matching(|program, cmd| program.starts_with("containerd-shim") && cmd.contains(&socket));
    // Mounts under the node's directory (rootfs overlays, netns, volumes), deepest first.
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        let prefix = format!("{}/", dir.display());
        let mut points: Vec<&str> =
            info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            if let Ok(c) = std::ffi::CString::new(p) {
                #[allow(unsafe_code)] // umount2 on a path string we own.
                // SAFETY: a valid NUL-terminated path and a flag.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
    // Links runwarden pinned hold the pods' cgroups: gone first.
    unmount_bpffs(dir);
    // Cgroups in every hierarchy, once their processes are gone.
    let mut roots = vec![kubepods];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path().join("kubepods")));
    }
    for _ in 0..50 {
        roots.retain(|r| r.exists() && !remove_cgroup_tree(r));
        if roots.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // kube-proxy's rules, the bridge, the sysctls.
    let proxy = Binaries::pinned().dir.join("kube-proxy");
    let _ = Command::new(proxy).arg("--cleanup").stdout(Stdio::null()).stderr(Stdio::null()).status();
    remove_kube_chains();
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).stderr(Stdio::null()).status();
    restore_sysctls(dir);
}

/// Removes the chains the kubelet makes (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`) and any other
/// `KUBE-*` chain kube-proxy's cleanup left, with the rules that jump to them.
fn remove_kube_chains() {
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(out) = Command::new(tool).args(["-t", table, "-S"]).output() else { continue };
            let rules = String::from_utf8_lossy(&out.stdout).into_owned();
            for rule in rules.lines().filter(|r| r.starts_with("-A ") && r.contains(" -j KUBE-")) {
                let mut args = vec!["-t", table, "-D"];
                args.extend(rule[3..].split_whitespace().map(|w| w.trim_matches('"')));
                // Rules with quoted comments do not split cleanly: flushing the chain below covers them.
                let _ = Command::new(tool).args(&args).stderr(Stdio::null()).status();
            }
            let chains: Vec<&str> =
                rules.lines().filter_map(|r| r.strip_prefix("-N ")).filter(|c| c.starts_with("KUBE-")).collect();
            for chain in &chains {
                let _ = Command::new(tool).args(["-t", table, "-F", chain]).stderr(Stdio::null()).status();
            }
            for chain in &chains {
                let _ = Command::new(tool).args(["-t", table, "-X", chain]).stderr(Stdio::null()).status();
            }
        }
    }
}

/// Removes a cgroup directory tree depth-first; true when it is gone.
fn remove_cgroup_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Kills every process whose program name (argv[0]'s file name) and whole command line match.
fn kill_matching(matches: impl Fn(&str, &str) -> bool) {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or("").rsplit('/').next().unwrap_or("").to_string();
        if matches(&program, &cmdline)
            && let Ok(pid) = name.parse::<i32>()
        {
            #[allow(unsafe_code)] // kill(2) on a pid read from /proc.
            // SAFETY: kill takes a pid and a signal number.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The node's BPF filesystem at `/sys/fs/bpf`, as systemd mounts it on real nodes (the agent
/// keeps block mode's state there): mounted if the machine has none, and unmounted at teardown.
fn mount_bpffs(dir: &Path) -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(BPFFS) && l.contains(" - bpf "));
    if !mounted {
        run("mounting the BPF filesystem", Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        write(&dir.join("bpffs.mounted"), "")?;
    }
    Ok(())
}

/// Removes what runwarden's agents pinned, and the BPF filesystem if the node mounted it.
fn unmount_bpffs(dir: &Path) {
    let _ = std::fs::remove_dir_all(Path::new(BPFFS).join("runwarden"));
    if dir.join("bpffs.mounted").exists() {
        let _ = Command::new("umount").arg(BPFFS).status();
    }
}

/// Where the node's BPF filesystem is.
const BPFFS: &str = "/sys/fs/bpf";

fn save_sysctls(dir: &Path) {
    let saved: Vec<String> = SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok().map(|v| format!("{k}={}", v.trim()))
        })
        .collect();
    let _ = std::fs::write(dir.join("sysctl.orig"), saved.join("\n"));
}

fn restore_sysctls(dir: &Path) {
    let Ok(saved) = std::fs::read_to_string(dir.join("sysctl.orig")) else { return };
    for line in saved.lines() {
        if let Some((k, v)) = line.split_once('=') {
            let _ = std::fs::write(Path::new("/proc/sys").join(k), v);
        }
    }
}

fn make_kubelet_client_cert(pki: &Path) -> Result<()> {
    let p = |f: &str| pki.join(f).display().to_string();
    run(
        "openssl req (CA)",
        Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=runwarden-node-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ]),
    )?;
    run(
        "openssl req (kubelet client)",
        Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=kube-apiserver-kubelet-client/O=system:masters",
            "-keyout",
            &p("kubelet-client.key"),
            "-out",
            &p("kubelet-client.csr"),
        ]),
    )?;
    run(
        "openssl x509 (kubelet client)",
        Command::new("openssl").args([
            "x509",
            "-req",
            "-days",
            "30",
            "-in",
            &p("kubelet-client.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("kubelet-client.crt"),
        ]),
    )
    .map(drop)
}

fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/runwarden/test-pause:1"
  # Machines without CAP_SYS_RESOURCE in the bounding set cannot set negative oom_score_adj.
  restrict_oom_score_adj = true
  # `ip netns add` elsewhere re-binds /run/netns over containerd's netns mounts.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"#
    )
}

fn cni_config(dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "runwarden-node",
  "plugins": [
    {{
      "type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_CIDR}", "rangeStart": "10.213.0.10", "rangeEnd": "10.213.0.199", "gateway": "{NODE_IP}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{}/cni/ipam"
      }}
    }},
    {{"type": "loopback"}}
  ]
}}
"#,
        dir.display()
    )
}

fn kubelet_config_yaml(dir: &Path, socket: &Path, pki: &Path) -> String {
    let d = dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
imageServiceEndpoint: unix://{socket}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
clusterDNS: ["{NODE_IP}"]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
# Images come from archives, not a registry: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}}
serializeImagePulls: false
podLogsDir: {d}/kubelet/pod-logs
"#,
        socket = socket.display(),
        ca = pki.join("ca.crt").display(),
    )
}

/// The programs in a cgroup's effective set (what its processes' sockets run), as (bpftool's
/// attach type, program name), e.g. `("cgroup_inet_ingress", "dns_ingress")` for what every
/// received packet runs, sorted; as `bpftool cgroup show DIR effective` lists them.
/// `make setup` installs bpftool.
pub fn cgroup_programs(dir: &Path) -> Vec<(String, String)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(dir)
        .arg("effective")
        .output()
        .expect("bpftool (make setup installs it)");
    assert!(out.status.success(), "bpftool cgroup show {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let field = |p: &serde_json::Value, f: &str| p[f].as_str().unwrap_or_default().to_string();
    let mut out: Vec<(String, String)> = programs.iter().map(|p| (field(p, "attach_type"), field(p, "name"))).collect();
    out.sort();
    out
}

/// What [`cgroup_programs`] lists for an armed pod's cgroup (not in block mode): no
/// `sock_addr` program, whose hooks would make every UDP `connect()` of the node take a lock.
pub fn runwarden_programs() -> Vec<(String, String)> {
    [("cgroup_inet_egress", "egress"), ("cgroup_inet_ingress", "dns_ingress"), ("cgroup_sock_ops", "tcp_connect")]
        .into_iter()
        .map(|(a, n)| (a.to_string(), n.to_string()))
        .collect()
}
