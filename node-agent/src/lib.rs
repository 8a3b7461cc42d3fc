//! runwarden's node agent:
//!
//! - [`btf`]: reads a struct member's offset from the kernel's BTF (for the exec program).
//! - [`ebpf`]: loads the kernel programs, attaches them to a cgroup tree, marks cgroups as
//!   monitored, reads the ring buffer and the kernel's counters.
//! - [`events`]: decodes the kernel's records (safe on truncated or garbage bytes).
//! - [`dns`]: parses the DNS answers a pod receives (A, AAAA, CNAME chains, compression,
//!   truncation) without ever panicking, and keeps a per-pod ip → names cache with TTLs.
//! - [`cgroups`]: maps a cgroup v2 path to the pod (UID) and container it belongs to, for
//!   kubelet's systemd and cgroupfs layouts, every QoS class, containerd and CRI-O, and
//!   cgroups nested below a container.
//! - [`pipeline`]: records → named, attributed observations with exact call counts.
//! - [`enforce`]: block mode on the node: which pods a `Block` policy covers, what each may
//!   call, kept in step with the kernel and the resolver.
//! - [`resolver`]: the DNS resolver of block-mode pods (refuses names they may not resolve,
//!   allows the addresses of those they may before the answer reaches them).
//! - [`trace`]: `runwarden-agent trace`, every outbound call of one command, no Kubernetes.
//! - [`agent`]: the cluster mode the DaemonSet runs: [`node`] (pods, cgroups, runs: what each
//!   call means), [`report`] (Events), [`metrics`] (Prometheus and health), [`rbac`].

pub mod agent;
pub mod btf;
pub mod cgroups;
pub mod dns;
pub mod ebpf;
pub mod enforce;
pub mod events;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod rbac;
pub mod record;
pub mod report;
pub mod resolver;
pub mod trace;
