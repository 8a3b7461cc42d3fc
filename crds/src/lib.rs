//! runwarden's API: the `WorkflowBaseline`, `EgressPolicy` and `WorkflowRun` custom resources (group
//! `runwarden.dev`, version `v1alpha1`), and the CRD YAML generated from these types.
//!
//! The types are the source of truth. `make generate` writes `crds/*.yaml` from them with
//! [`generate::render`]; a test fails when the committed files differ.

pub mod arc;
pub mod baseline;
pub mod endpoint;
pub mod generate;
pub mod identity;
pub mod policy;
pub mod rbac;
pub mod report;
pub mod run;
mod schema;
pub mod serve;

pub use baseline::{
    Anomaly, BaselineMode, BaselinePhase, EndpointState, LearnedEndpoint, LearningSpec, RunRecord, TriggerRuns,
    WorkflowBaseline, WorkflowBaselineSpec, WorkflowBaselineStatus,
};
pub use endpoint::{Condition, ConditionStatus, EndpointRule, Protocol, Severity};
pub use policy::{
    AnomalyDetection, EgressPolicy, EgressPolicySpec, EgressPolicyStatus, Notifier, PolicyMode, Preset, RunnerSelector,
};
pub use run::{RunEndpoint, RunVerdict, WorkflowRun, WorkflowRunSpec};

/// The API group of runwarden's resources.
pub const GROUP: &str = "runwarden.dev";
