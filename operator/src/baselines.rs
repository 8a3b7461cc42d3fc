//! Creating each job's `WorkflowBaseline` the first time the job is seen.

use kube::Api;
use kube::api::PostParams;
use kube::runtime::events::{EventType, Recorder};
use runwarden_crds::{BaselineMode, LearningSpec, WorkflowBaseline, WorkflowBaselineSpec};
use tracing::info;

use crate::identity::JobIdentity;
use crate::{Error, Result, record_event};

/// Label with the baseline's repository (`owner.name`: `/` is not allowed in label values).
pub const REPOSITORY_LABEL: &str = "runwarden.dev/repository";
/// Label marking objects runwarden manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Makes sure `identity` has its `WorkflowBaseline` in `api`'s namespace. The name is derived
/// from the identity, so runners of one job starting together race to create the same object
/// and exactly one wins; the others find it. Returns whether this call created it; the one that
/// did records a `BaselineCreated` Event on the new object.
pub async fn ensure(api: &Api<WorkflowBaseline>, identity: &JobIdentity, recorder: &Recorder) -> Result<bool> {
    let name = identity.baseline_name();
    let spec = WorkflowBaselineSpec {
        repository: identity.repository.clone(),
        workflow: identity.workflow.clone(),
        job: identity.job.clone(),
        mode: BaselineMode::Auto,
        learning: LearningSpec::default(),
        approved: Vec::new(),
    };
    let mut baseline = WorkflowBaseline::new(&name, spec);
    baseline.metadata.labels = Some(
        [
            (REPOSITORY_LABEL.to_string(), label_value(&identity.repository.replace('/', "."))),
            (MANAGED_BY_LABEL.to_string(), "runwarden-operator".to_string()),
        ]
        .into(),
    );
    match api.create(&PostParams::default(), &baseline).await {
        Ok(created) => {
            info!(baseline = %name, repository = %identity.repository, workflow = %identity.workflow, job = %identity.job, "created WorkflowBaseline");
            let note = format!(
                "first run of {} / {} / {}: learning its outbound calls",
                identity.repository, identity.workflow, identity.job
            );
            record_event(recorder, &created, EventType::Normal, "BaselineCreated", "Create", note).await;
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&name).await?;
            let same = existing.spec.repository == identity.repository
                && existing.spec.workflow == identity.workflow
                && existing.spec.job == identity.job;
            if same { Ok(false) } else { Err(Error::NameCollision { name, identity: Box::new(identity.clone()) }) }
        }
        Err(e) => Err(e.into()),
    }
}

/// A label value: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(63)
        .collect();
    cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}
