//! Which workflow job a runner pod runs: read from ARC's `EphemeralRunner` status (or from a
//! user's annotations on non-ARC runner pods), normalised into the key a `WorkflowBaseline` is
//! stored under, and written back to the pods as annotations the node agent reads. The operator
//! writes these annotations and the node agent reads them: this module is their contract.
//!
//! Normalisation rules (documented for users in docs/architecture.md):
//! - `repository` is `jobRepositoryName` (`owner/name`), never ARC's scale-set label.
//! - `workflow` is the path of `jobWorkflowRef` without `@ref`. When the workflow file lives in
//!   the job's own repository the `owner/name/` prefix is dropped (`.github/workflows/ci.yml`);
//!   a reusable workflow from another repository keeps it (`acme/shared/.github/workflows/build.yml`)
//!   so two repositories' files of the same path do not share a baseline.
//! - `job` is `jobDisplayName` with matrix values removed: a trailing ` (…)` is dropped from the
//!   name and from each ` / `-separated part (jobs of reusable workflows are shown as
//!   `caller / callee`), so `test (ubuntu-latest, 18)` and `test (windows-latest, 20)` share the
//!   baseline `test`.

use std::collections::BTreeMap;

/// Annotation keys written on runner pods.
pub mod annotations {
    /// `owner/name` of the job's repository.
    pub const REPOSITORY: &str = "runwarden.dev/repository";
    /// Workflow file path, without `@ref`.
    pub const WORKFLOW: &str = "runwarden.dev/workflow";
    /// Normalised job name.
    pub const JOB: &str = "runwarden.dev/job";
    /// GitHub workflow run id.
    pub const RUN_ID: &str = "runwarden.dev/run-id";
    /// The `@ref` the workflow ran at.
    pub const REF: &str = "runwarden.dev/ref";
}

/// Label users put on runner pods that ARC does not manage, with the identity annotations.
pub const MONITOR_LABEL: &str = "runwarden.dev/monitor";
/// Label (value `"true"`) a cluster administrator puts on a namespace whose [`MONITOR_LABEL`]
/// pods may declare their own job in annotations. Namespaces are cluster-scoped: only those
/// allowed to patch namespaces (cluster administrators, as a rule) can set it.
pub const SELF_DECLARED_LABEL: &str = "runwarden.dev/self-declared-identities";
/// Label ARC puts on runner pods: the scale set's name.
pub const SCALE_SET_LABEL: &str = "actions.github.com/scale-set-name";
/// Label ARC's Kubernetes container hooks put on container-mode job pods: the runner pod's name.
pub const RUNNER_POD_LABEL: &str = "runner-pod";

/// The job a runner runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobIdentity {
    /// `owner/name`.
    pub repository: String,
    /// Workflow file path (see the module doc).
    pub workflow: String,
    /// Normalised job name.
    pub job: String,
    /// GitHub workflow run id, if known.
    pub run_id: Option<String>,
    /// Git ref the workflow ran at (`refs/heads/main`), if known.
    pub git_ref: Option<String>,
}

/// Why an identity could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A field is missing or empty.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// `jobWorkflowRef` is not `owner/name/path@ref`.
    #[error("jobWorkflowRef {0:?} is not owner/name/path@ref")]
    BadWorkflowRef(String),
}

impl JobIdentity {
    /// The identity from an `EphemeralRunner`'s job fields.
    pub fn from_runner(
        repository: Option<&str>,
        workflow_ref: Option<&str>,
        display_name: Option<&str>,
        run_id: Option<i64>,
    ) -> Result<Self, IdentityError> {
        let repository = non_empty(repository).ok_or(IdentityError::Missing("jobRepositoryName"))?;
        let workflow_ref = non_empty(workflow_ref).ok_or(IdentityError::Missing("jobWorkflowRef"))?;
        let display_name = non_empty(display_name).ok_or(IdentityError::Missing("jobDisplayName"))?;
        let (workflow, git_ref) = split_workflow_ref(repository, workflow_ref)?;
        Ok(Self {
            repository: repository.to_string(),
            workflow,
            job: normalise_job(display_name),
            run_id: run_id.filter(|&id| id > 0).map(|id| id.to_string()),
            git_ref,
        })
    }

    /// The identity a user annotated a non-ARC runner pod with.
    pub fn from_annotations(a: &BTreeMap<String, String>) -> Result<Self, IdentityError> {
        let get = |k: &'static str| non_empty(a.get(k).map(String::as_str)).ok_or(IdentityError::Missing(k));
        Ok(Self {
            repository: get(annotations::REPOSITORY)?.to_string(),
            workflow: get(annotations::WORKFLOW)?.to_string(),
            job: normalise_job(get(annotations::JOB)?),
            run_id: a.get(annotations::RUN_ID).cloned(),
            git_ref: a.get(annotations::REF).cloned(),
        })
    }

    /// The annotations to put on the runner's pods.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::from([
            (annotations::REPOSITORY.to_string(), self.repository.clone()),
            (annotations::WORKFLOW.to_string(), self.workflow.clone()),
            (annotations::JOB.to_string(), self.job.clone()),
        ]);
        if let Some(id) = &self.run_id {
            a.insert(annotations::RUN_ID.to_string(), id.clone());
        }
        if let Some(r) = &self.git_ref {
            a.insert(annotations::REF.to_string(), r.clone());
        }
        a
    }

    /// The name of this job's `WorkflowBaseline`: a readable slug of repository, workflow file
    /// and job, and a hash of the full identity, at most 63 characters.
    pub fn baseline_name(&self) -> String {
        let file = self.workflow.rsplit('/').next().unwrap_or(&self.workflow);
        let file = file.strip_suffix(".yml").or_else(|| file.strip_suffix(".yaml")).unwrap_or(file);
        let readable = format!("{}-{}-{}", self.repository, file, self.job);
        let mut slug = String::with_capacity(52);
        for c in readable.chars() {
            let c = c.to_ascii_lowercase();
            let c = if c.is_ascii_alphanumeric() { c } else { '-' };
            if c == '-' && (slug.is_empty() || slug.ends_with('-')) {
                continue;
            }
            slug.push(c);
            if slug.len() == 52 {
                break;
            }
        }
        let slug = slug.trim_end_matches('-');
        let key = format!("{}\n{}\n{}", self.repository, self.workflow, self.job);
        format!("{slug}-{:010x}", fnv1a(key.as_bytes()) & 0xff_ffff_ffff)
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// Splits `owner/name/path@ref` into the workflow path (see the module doc) and the ref.
fn split_workflow_ref(repository: &str, workflow_ref: &str) -> Result<(String, Option<String>), IdentityError> {
    let bad = || IdentityError::BadWorkflowRef(workflow_ref.to_string());
    let (full_path, git_ref) = match workflow_ref.split_once('@') {
        Some((p, r)) => (p, non_empty(Some(r)).map(str::to_string)),
        None => (workflow_ref, None),
    };
    let mut parts = full_path.splitn(3, '/');
    let (owner, name, path) =
        (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    if owner.is_empty() || name.is_empty() || path.is_empty() {
        return Err(bad());
    }
    let same_repo = format!("{owner}/{name}").eq_ignore_ascii_case(repository);
    let workflow = if same_repo { path.to_string() } else { full_path.to_string() };
    Ok((workflow, git_ref))
}

/// Removes matrix values from a job's display name (see the module doc).
pub fn normalise_job(display_name: &str) -> String {
    display_name.split(" / ").map(strip_matrix).collect::<Vec<_>>().join(" / ")
}

fn strip_matrix(part: &str) -> &str {
    let part = part.trim();
    if part.ends_with(')')
        && let Some(open) = part.rfind(" (")
        && open > 0
    {
        return part[..open].trim_end();
    }
    part
}

/// 64-bit FNV-1a: a stable, dependency-free hash for names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(repo: &str, workflow_ref: &str, name: &str) -> JobIdentity {
        JobIdentity::from_runner(Some(repo), Some(workflow_ref), Some(name), Some(42)).unwrap()
    }

    #[test]
    fn workflow_ref_of_the_same_repository_becomes_its_path() {
        let i = id("acme/web", "acme/web/.github/workflows/ci.yml@refs/heads/main", "build");
        assert_eq!(i.workflow, ".github/workflows/ci.yml");
        assert_eq!(i.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(i.run_id.as_deref(), Some("42"));
    }

    #[test]
    fn reusable_workflow_of_another_repository_keeps_its_owner() {
        let i = id("acme/web", "acme/shared/.github/workflows/build.yml@v1", "call / build");
        assert_eq!(i.workflow, "acme/shared/.github/workflows/build.yml");
    }

    #[test]
    fn matrix_values_are_removed_from_job_names() {
        assert_eq!(normalise_job("test (ubuntu-latest, 18)"), "test");
        assert_eq!(normalise_job("call-build (linux) / build (amd64, 1.22)"), "call-build / build");
        assert_eq!(normalise_job("lint"), "lint");
        assert_eq!(normalise_job("(weird)"), "(weird)");
    }

    #[test]
    fn matrix_combinations_share_one_baseline_name() {
        let a = id("acme/web", "acme/web/.github/workflows/ci.yml@refs/heads/main", "test (ubuntu-latest, 18)");
        let b = id("acme/web", "acme/web/.github/workflows/ci.yml@refs/pull/7/merge", "test (windows-latest, 20)");
        assert_eq!(a.baseline_name(), b.baseline_name());
        assert_ne!(a.baseline_name(), id("acme/web", "acme/web/.github/workflows/ci.yml", "lint").baseline_name());
    }

    #[test]
    fn baseline_names_are_readable_valid_and_bounded() {
        let i = id("Acme-Corp/Web.App", "Acme-Corp/Web.App/.github/workflows/release.yaml@v1", "Build & Push");
        let name = i.baseline_name();
        assert!(name.starts_with("acme-corp-web-app-release-build-push-"), "{name}");
        let long = id(&format!("o/{}", "r".repeat(100)), "x/y/.github/workflows/w.yml", &"j".repeat(200));
        for n in [name, long.baseline_name()] {
            assert!(n.len() <= 63, "{n}");
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{n}");
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
        }
    }

    #[test]
    fn a_runner_without_its_job_has_no_identity_yet() {
        let err = JobIdentity::from_runner(Some("acme/web"), None, Some("build"), None).unwrap_err();
        assert_eq!(err, IdentityError::Missing("jobWorkflowRef"));
        let err = JobIdentity::from_runner(Some("acme/web"), Some("nonsense"), Some("build"), None).unwrap_err();
        assert!(matches!(err, IdentityError::BadWorkflowRef(_)));
    }
}
