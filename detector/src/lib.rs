//! The model of a workflow job's outbound calls: learns from finished runs, scores each call of
//! a running job as it happens, and says why.
//!
//! Sans-IO: no clock, no files, no network. Callers pass the time with each run and the
//! cluster's other baselines as a [`Cluster`] index; the node agent does so in real time, the
//! `runwarden-replay` binary from a recorded history, the tests from whatever they construct.
//!
//! ```
//! use runwarden_detector::{Baseline, Call, Cluster, Config, Job, Proto, Run, Services, Severity};
//!
//! let config = Config { min_runs: 1, ..Config::default() };
//! let mut baseline = Baseline::default();
//! let cluster = Cluster::default();
//! let run = Run { id: "1", time: 0, trigger: "push", git_ref: None };
//! let github = Call { host: Some("github.com"), ip: None, port: 443, proto: Proto::Tcp, process: Some("git") };
//! baseline.learn(&config, &run, &[(github, None)]);
//!
//! let services = Services::builtin();
//! let job = Job { repository: "acme/web", baseline: &baseline, config: &config, cluster: &cluster, services };
//! let run = Run { id: "2", time: 60, trigger: "push", git_ref: None };
//! assert!(job.score(&run, &github).is_none());
//! let odd = Call { host: None, ip: Some("203.0.113.7".parse().unwrap()), port: 4444, proto: Proto::Tcp, process: Some("sh") };
//! assert!(job.score(&run, &odd).unwrap().severity >= Severity::High);
//! ```

pub mod cluster;
pub mod host;
pub mod index;
pub mod model;
pub mod score;
pub mod services;

pub use cluster::{Cluster, Prevalence};
pub use model::{
    Approved, ApprovedRule, Baseline, Call, Config, Endpoint, Learned, Mode, Pattern, Phase, Proto, Run, State,
};
pub use score::{Job, Severity, Verdict};
pub use services::{Category, Services};
