//! cgroup → pod: the kernel reports the cgroup v2 id of the caller (the inode number of its
//! cgroup directory); kubelet names pod cgroups after the pod's UID. [`parse`] reads a cgroup
//! path in every layout kubelet and the runtimes produce:
//!
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//!   (UID with `_` for `-`; Guaranteed pods sit directly under `kubepods.slice`);
//! - cgroupfs driver: `kubepods/burstable/pod<uid>/<id>`;
//! - containerd (`cri-containerd-`), CRI-O (`crio-`, and `crio-conmon-` for its monitor), Docker
//!   (`docker-`);
//! - anything nested below a container (Docker-in-Docker, systemd inside a container) belongs
//!   to that container's pod;
//! - the kubepods tree may sit below another prefix or carry one (kind's
//!   `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort-pod<uid>.slice`).
//!
//! [`CgroupIndex::scan`] walks a cgroup v2 mount and maps every pod and container directory's
//! id to its pod, so the pipeline resolves ids with one lookup; an id not found yet is resolved
//! after the next scan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Kubernetes QoS class of a pod, from its cgroup's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Requests equal limits: directly under `kubepods`.
    Guaranteed,
    /// Under `burstable`.
    Burstable,
    /// Under `besteffort`.
    BestEffort,
}

/// The container runtime that made a container cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope` (systemd) or a bare id (cgroupfs, any runtime).
    Containerd,
    /// `crio-<id>.scope`.
    CriO,
    /// `docker-<id>.scope`.
    Docker,
    /// A bare 64-hex id under the cgroupfs driver: the runtime cannot be told.
    Unknown,
}

/// What a cgroup path says about the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID, with dashes.
    pub pod_uid: String,
    /// The pod's QoS class.
    pub qos: Qos,
    /// The container's id, when the path goes below the pod level (conmon and pause-less
    /// runtime helpers have none).
    pub container_id: Option<String>,
    /// The runtime that made the container cgroup.
    pub runtime: Option<Runtime>,
    /// Whether the path goes further below the container (a nested cgroup).
    pub nested: bool,
    /// The path of the pod-level cgroup (the prefix of the input up to the pod directory).
    pub pod_path: String,
}

/// Reads the pod (and container) a cgroup path belongs to; `None` for cgroups outside pods.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (pod_at, pod_uid) = segments.iter().enumerate().find_map(|(i, s)| pod_uid(s).map(|uid| (i, uid)))?;
    // kubepods must be in the path: a directory named pod<uid> elsewhere is not a pod.
    if !segments[..=pod_at].iter().any(|s| s.contains("kubepods")) {
        return None;
    }
    let qos = match segments[pod_at] {
        s if s.contains("besteffort") => Qos::BestEffort,
        s if s.contains("burstable") => Qos::Burstable,
        _ if segments[..pod_at].iter().any(|s| s.contains("besteffort")) => Qos::BestEffort,
        _ if segments[..pod_at].iter().any(|s| s.contains("burstable")) => Qos::Burstable,
        _ => Qos::Guaranteed,
    };
    let (container_id, runtime) = match segments.get(pod_at + 1).map(|s| container(s)) {
        Some(Some((id, rt))) => (Some(id), Some(rt)),
        _ => (None, None),
    };
    let pod_path = format!("/{}", segments[..=pod_at].join("/"));
    Some(PodCgroup { pod_uid, qos, container_id, runtime, nested: segments.len() > pod_at + 2, pod_path })
}

/// The UID in `pod<uid>`, `kubepods-pod<uid>.slice`, `kubepods-<qos>-pod<uid>.slice` (or with a
/// prefix, as kind's `kubelet-kubepods-<qos>-pod<uid>.slice`).
fn pod_uid(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".slice").unwrap_or(segment);
    let at = s.rfind("pod")?;
    let prefix = &s[..at];
    if !(prefix.is_empty() || (prefix.contains("kubepods") && prefix.ends_with('-'))) {
        return None;
    }
    let uid = s[at + 3..].replace('_', "-");
    let groups: Vec<usize> = uid.split('-').map(str::len).collect();
    let hex = uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    (hex && groups == [8, 4, 4, 4, 12]).then(|| uid.to_ascii_lowercase())
}

/// The container id and runtime of a container-level segment.
fn container(segment: &str) -> Option<(String, Runtime)> {
    let (id, runtime) = if let Some(rest) = segment.strip_prefix("cri-containerd-") {
        (rest.strip_suffix(".scope")?, Runtime::Containerd)
    } else if segment.starts_with("crio-conmon-") {
        return None;
    } else if let Some(rest) = segment.strip_prefix("crio-") {
        (rest.strip_suffix(".scope")?, Runtime::CriO)
    } else if let Some(rest) = segment.strip_prefix("docker-") {
        (rest.strip_suffix(".scope")?, Runtime::Docker)
    } else {
        (segment, Runtime::Unknown)
    };
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| (id.to_string(), runtime))
}

/// cgroup id → pod, for every pod and container cgroup under a cgroup v2 mount.
#[derive(Debug, Default)]
pub struct CgroupIndex {
    by_id: HashMap<u64, Arc<PodCgroup>>,
}

impl CgroupIndex {
    /// Walks `root` (a cgroup v2 mount) and indexes every cgroup that belongs to a pod, down to
    /// nested cgroups. Directories that vanish during the walk (pods ending) are skipped.
    pub fn scan(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let mut by_id = HashMap::new();
        let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
        std::fs::metadata(root)?;
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_dir() {
                    continue;
                }
                let path = entry.path();
                let relative = path.strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(pod) = parse(&relative) {
                    by_id.insert(meta.ino(), Arc::new(pod));
                }
                stack.push(path);
            }
        }
        Ok(Self { by_id })
    }

    /// The pod of cgroup `id`, if it was there at the last scan.
    pub fn get(&self, id: u64) -> Option<&Arc<PodCgroup>> {
        self.by_id.get(&id)
    }

    /// cgroups indexed.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no pod cgroup was found.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Keeps a [`CgroupIndex`] current as pods come and go: a rescan every `every`, or sooner
/// (but not more often than every `min_gap`) when the pipeline holds calls whose cgroup the
/// index does not know yet (a pod that started since the last scan).
#[derive(Debug)]
pub struct Rescanner {
    root: PathBuf,
    every: std::time::Duration,
    min_gap: std::time::Duration,
    last: Option<std::time::Instant>,
}

impl Rescanner {
    /// Rescans `root` every `every`; urgent rescans at most every `min_gap`.
    pub fn new(root: &Path, every: std::time::Duration, min_gap: std::time::Duration) -> Self {
        Self { root: root.to_path_buf(), every, min_gap, last: None }
    }

    /// A fresh index when one is due at `now`: the first call, `every` after the last scan,
    /// or `min_gap` after it when `urgent`.
    pub fn poll(&mut self, now: std::time::Instant, urgent: bool) -> Option<std::io::Result<CgroupIndex>> {
        let due = match self.last {
            None => true,
            Some(last) => {
                let since = now.saturating_duration_since(last);
                since >= self.every || (urgent && since >= self.min_gap)
            }
        };
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(CgroupIndex::scan(&self.root))
    }
}

/// kubelet's cgroups whose children are pods, below a cgroup v2 mount: `kubepods` and its
/// `burstable` and `besteffort` children (cgroupfs driver), or `kubepods.slice` and its
/// `kubepods-burstable.slice` and `kubepods-besteffort.slice` (systemd driver), found within
/// three levels of `root` (kind nests them in `kubelet.slice/kubelet-kubepods.slice`). With
/// `kubepods` given (a path relative to `root`), only that tree. Empty when kubelet has made
/// none yet.
pub fn pod_parents(root: &Path, kubepods: Option<&Path>) -> Vec<PathBuf> {
    let top = match kubepods {
        Some(dir) => Some(root.join(dir)).filter(|d| d.is_dir()),
        None => find_kubepods(root, 3),
    };
    let Some(top) = top else { return Vec::new() };
    let mut parents = vec![top.clone()];
    if let Ok(entries) = std::fs::read_dir(&top) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let qos = name.strip_suffix(".slice").unwrap_or(&name);
            if (qos.ends_with("burstable") || qos.ends_with("besteffort")) && entry.path().is_dir() {
                parents.push(entry.path());
            }
        }
    }
    parents.sort();
    parents
}

fn find_kubepods(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice") {
            return Some(entry.path());
        }
        subdirs.push(entry.path());
    }
    if depth <= 1 {
        return None;
    }
    subdirs.sort();
    subdirs.into_iter().find_map(|d| find_kubepods(&d, depth - 1))
}

/// A pod-level cgroup found below one of the [`pod_parents`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDir {
    /// The cgroup id (inode of the directory).
    pub id: u64,
    /// The pod's UID.
    pub pod_uid: String,
    /// The directory.
    pub path: PathBuf,
}

/// Every pod-level cgroup directly below `parents`.
pub fn pod_dirs(root: &Path, parents: &[PathBuf]) -> Vec<PodDir> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(parent) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            let relative = path.strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(pod) = parse(&relative).filter(|p| p.container_id.is_none() && !p.nested) {
                out.push(PodDir { id: meta.ino(), pod_uid: pod.pod_uid, path });
            }
        }
    }
    out
}

/// The cgroup v2 mount to use given the agent's `--cgroup-root`: the directory itself when it
/// is a cgroup v2 mount (pure cgroup v2 nodes), or its `unified` child (hybrid hosts, where
/// `/sys/fs/cgroup` is a tmpfs of v1 hierarchies and v2 sits at `/sys/fs/cgroup/unified`).
pub fn cgroup2_root(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("unified")].into_iter().find(|d| is_cgroup2(d))
}

fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    #[allow(unsafe_code, reason = "statfs writes the struct it is given")]
    // SAFETY: a NUL-terminated path and a zeroed statfs on our stack.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Whether a process runs in the cgroup `dir` or below it (`populated` in `cgroup.events`);
/// false when the cgroup is gone.
pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
}

/// New pod cgroups as kubelet makes them: inotify on the [`pod_parents`], so the agent attaches
/// a pod's programs within a millisecond of its cgroup's `mkdir`, long before kubelet has set up
/// the pod's network and started its first container.
pub struct PodCgroupWatch {
    stream: inotify::EventStream<Vec<u8>>,
    parents: Vec<(inotify::WatchDescriptor, PathBuf)>,
    root: PathBuf,
}

impl std::fmt::Debug for PodCgroupWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCgroupWatch").field("parents", &self.parents).finish_non_exhaustive()
    }
}

/// What a [`PodCgroupWatch`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodCgroupEvent {
    /// A pod cgroup was made.
    Created(PodDir),
    /// Events were dropped (the kernel's inotify queue overflowed): scan the parents.
    Overflow,
}

impl PodCgroupWatch {
    /// Watches `parents` (below the cgroup v2 mount `root`) for new children. Within a tokio
    /// runtime. Start it before scanning for the pods already there, so none falls in between.
    pub fn new(root: &Path, parents: &[PathBuf]) -> std::io::Result<Self> {
        use inotify::{Inotify, WatchMask};
        let inotify = Inotify::init()?;
        let mut watched = Vec::new();
        for dir in parents {
            watched.push((inotify.watches().add(dir, WatchMask::CREATE | WatchMask::ONLYDIR)?, dir.clone()));
        }
        let stream = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        Ok(Self { stream, parents: watched, root: root.to_path_buf() })
    }

    /// The next pod cgroup made (directories that are not pods, such as kubelet's QoS cgroups,
    /// are skipped). Pending forever when the stream fails.
    pub async fn next(&mut self) -> PodCgroupEvent {
        use futures::StreamExt;
        use std::os::unix::fs::MetadataExt;
        loop {
            let Some(Ok(event)) = self.stream.next().await else {
                return std::future::pending().await;
            };
            if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                return PodCgroupEvent::Overflow;
            }
            let (Some(name), Some((_, parent))) = (&event.name, self.parents.iter().find(|(wd, _)| *wd == event.wd))
            else {
                continue;
            };
            let path = parent.join(name);
            let relative = path.strip_prefix(&self.root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let Some(pod) = parse(&relative).filter(|p| p.container_id.is_none() && !p.nested) else { continue };
            // Gone already (a pod that failed at once): nothing to attach to.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            return PodCgroupEvent::Created(PodDir { id: meta.ino(), pod_uid: pod.pod_uid, path });
        }
    }
}
