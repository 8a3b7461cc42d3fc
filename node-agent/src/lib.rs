//! runwarden's node agent. This first part holds the pure pieces the pipeline is built from:
//!
//! - [`dns`]: parses the DNS answers a pod receives (A, AAAA, CNAME chains, compression,
//!   truncation) without ever panicking, and keeps a per-pod ip → names cache with TTLs.
//! - [`cgroups`]: maps a cgroup v2 path to the pod (UID) and container it belongs to, for
//!   kubelet's systemd and cgroupfs layouts, every QoS class, containerd and CRI-O, and
//!   cgroups nested below a container.

pub mod cgroups;
pub mod dns;
