//! The part of Actions Runner Controller's API runwarden reads: `EphemeralRunner`
//! (`actions.github.com/v1alpha1`), whose status names the job a runner was given.
//!
//! Field names follow ARC's `ephemeralrunner_types.go`. Only what runwarden reads is typed; the
//! rest of ARC's spec is ignored when reading. [`EphemeralRunner::crd`] describes a minimal CRD
//! with these fields, which tests install in place of ARC's.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, JobIdentity};
pub use crate::identity::{RUNNER_POD_LABEL, SCALE_SET_LABEL};

/// One ephemeral runner (one runner pod) of an ARC scale set.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "actions.github.com",
    version = "v1alpha1",
    kind = "EphemeralRunner",
    namespaced,
    status = "EphemeralRunnerStatus"
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct EphemeralRunnerSpec {
    /// The GitHub organisation, enterprise or repository URL the runner registers with.
    #[serde(default, rename = "githubConfigUrl", skip_serializing_if = "Option::is_none")]
    pub github_config_url: Option<String>,
}

/// What ARC reports about the runner; the `job*` fields arrive when a job is assigned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EphemeralRunnerStatus {
    /// `Pending`, `Running` (a job is assigned), `Succeeded`, `Failed`, `Outdated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The runner's name at GitHub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_name: Option<String>,
    /// Id of the job request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_request_id: Option<i64>,
    /// Id of the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `owner/name` of the repository whose workflow runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_repository_name: Option<String>,
    /// `owner/name/.github/workflows/file.yml@ref` of the workflow the job belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_workflow_ref: Option<String>,
    /// Id of the workflow run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_run_id: Option<i64>,
    /// The job's display name (with matrix values, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_display_name: Option<String>,
}

impl EphemeralRunnerStatus {
    /// The job the runner was given, from the fields ARC's controller writes
    /// ([`IdentityError::Missing`] until a job is assigned). Written through the status
    /// subresource by ARC: code running in the job cannot change it, unlike the runner pod's
    /// labels and annotations.
    pub fn identity(&self) -> Result<JobIdentity, IdentityError> {
        JobIdentity::from_runner(
            self.job_repository_name.as_deref(),
            self.job_workflow_ref.as_deref(),
            self.job_display_name.as_deref(),
            self.workflow_run_id,
        )
    }
}
