//! Cluster-level test support for runwarden.
//!
//! - [`controlplane`]: a real etcd + kube-apiserver on loopback, shared by the tests of a binary.
//! - [`cluster`]: what tests do on it: a namespace of their own, the CRDs installed from
//!   `crds/*.yaml` exactly as `kubectl apply -f crds/` would.
//! - [`docs`]: the part of `docs/operations.md` generated from the chart's alerts.
//!
//! Tests in `tests/tests/` need the binaries `make setup` builds; `make test` runs them.

pub mod cluster;
pub mod controlplane;
pub mod docs;
pub mod install;
pub mod node;
pub mod runner;
pub mod services;

pub use controlplane::ControlPlane;
pub use node::Node;
