//! `WorkflowBaseline` lifecycle: the node agents merge runs into each baseline's status; the
//! operator keeps the rest of the status true when no run comes: the phase after a spec change
//! (`Frozen`, `Monitoring`, ...), approvals applied to endpoints, endpoints expired by time,
//! `observedGeneration`, and the `Settled` and `Ready` conditions. It writes only when something
//! changed, with the `resourceVersion` it read, so a concurrent run merge is never overwritten:
//! on a conflict it reads again. It also keeps each baseline's newest `WorkflowRun` records
//! (the agents create one per merged run, owned by the baseline) and deletes the older ones.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use runwarden_crds::{Condition, ConditionStatus, WorkflowBaseline, WorkflowBaselineStatus, WorkflowRun};
use runwarden_detector::Severity;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::{Error, FIELD_MANAGER, Result, Scope, instrumented, record_event};

/// How often a baseline is looked at without any change, for expiry by time.
const REFRESH_EVERY: Duration = Duration::from_secs(3600);

/// `WorkflowRun` records kept per baseline by default (Helm value `operator.runHistory`).
pub const RUN_HISTORY: usize = 50;

struct Ctx {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    scope: Scope,
    run_history: usize,
}

/// Runs the `WorkflowBaseline` controller until `shutdown` completes.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    scope: Scope,
    run_history: usize,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<WorkflowBaseline> = Api::all(client.clone());
    let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
    // A new record (metadata only: records are large) wakes its baseline, whose oldest go.
    let controller = Controller::new(api, watcher::Config::default())
        .owns(Api::<WorkflowRun>::all(client.clone()), watcher::Config::default());
    metrics.count_baselines_from(controller.store());
    controller
        .with_config(crate::controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            |b, ctx| async move {
                if !ctx.scope.handles(b.namespace().as_deref()) {
                    return Ok(Action::await_change());
                }
                instrumented(&ctx.metrics.clone(), "baselines", reconcile(b, ctx)).await
            },
            error_policy,
            Arc::new(Ctx { client, recorder, metrics, scope, run_history }),
        )
        .for_each(|_| async {})
        .await;
}

/// Deletes the baseline `name`'s `WorkflowRun` records past the newest `keep` (by creation:
/// the agents create them as runs are merged).
async fn prune_runs(client: &Client, ns: &str, name: &str, keep: usize) -> Result<()> {
    let api: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let selector = format!("{}={name}", runwarden_crds::run::BASELINE_LABEL);
    let mut runs = api.list_metadata(&ListParams::default().labels(&selector)).await?.items;
    if runs.len() <= keep {
        return Ok(());
    }
    runs.sort_by(|a, b| {
        (a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.metadata.name.as_deref())
            .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.metadata.name.as_deref()))
    });
    let extra = runs.len() - keep;
    for run in runs.into_iter().take(extra) {
        let Some(run_name) = run.metadata.name else { continue };
        match api.delete(&run_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    info!(baseline = %name, namespace = %ns, deleted = extra, "older WorkflowRun records deleted");
    Ok(())
}

async fn reconcile(baseline: Arc<WorkflowBaseline>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = baseline.namespace().unwrap_or_default();
    let name = baseline.name_any();
    prune_runs(&ctx.client, &ns, &name, ctx.run_history).await?;
    let api: Api<WorkflowBaseline> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let mut current = (*baseline).clone();
    for _ in 0..8 {
        let before = current.status.clone().unwrap_or_default();
        let after = match refreshed(&current, &before, now) {
            Ok(after) => after,
            Err(e) => {
                warn!(baseline = %name, namespace = %ns, error = %e, "WorkflowBaseline cannot be read into the model");
                return Ok(Action::requeue(REFRESH_EVERY));
            }
        };
        if after == before {
            return Ok(Action::requeue(REFRESH_EVERY));
        }
        let mut updated = current.clone();
        updated.status = Some(after.clone());
        match api
            .replace_status(
                &name,
                &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                &updated,
            )
            .await
        {
            Ok(_) => {
                if !is_settled(&before) && is_settled(&after) {
                    settled_event(&ctx, &current, &after).await;
                }
                return Ok(Action::requeue(REFRESH_EVERY));
            }
            // A run was merged meanwhile: start from what is there now.
            Err(kube::Error::Api(s)) if s.code == 409 => current = api.get(&name).await?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The status `b` should have now.
fn refreshed(
    b: &WorkflowBaseline,
    status: &WorkflowBaselineStatus,
    now: Timestamp,
) -> Result<WorkflowBaselineStatus, runwarden_status::Error> {
    // The reporting threshold does not affect the phase, approvals or expiry.
    let config = runwarden_status::config(&b.spec, Severity::Medium)?;
    let mut model = runwarden_status::read(status)?;
    model.refresh(&config, now.as_second());
    let mut next = status.clone();
    runwarden_status::write(&model, &config, &mut next);
    let generation = b.metadata.generation;
    next.observed_generation = generation;

    let settled = model.is_settled(&config);
    let quiet = model.recent_new.iter().rev().take_while(|&&n| n == 0).count();
    let (reason, message) = if settled {
        ("Settled", format!("{} runs; the last {quiet} brought no new endpoint", model.runs))
    } else if model.runs < config.min_runs {
        ("TooFewRuns", format!("{} of {} runs needed", model.runs, config.min_runs))
    } else {
        (
            "StillChanging",
            format!("{quiet} of the last {} runs brought no new endpoint", config.settle_after_quiet_runs),
        )
    };
    let status = if settled { ConditionStatus::True } else { ConditionStatus::False };
    set_condition(&mut next.conditions, "Settled", status, reason, &message, generation, now);
    set_condition(&mut next.conditions, "Ready", ConditionStatus::True, "Reconciled", "", generation, now);
    Ok(next)
}

fn is_settled(s: &WorkflowBaselineStatus) -> bool {
    s.conditions.iter().any(|c| c.r#type == "Settled" && c.status == ConditionStatus::True)
}

/// Sets a condition, changing `lastTransitionTime` only when its status changes.
fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let wanted = |last_transition_time| Condition {
        r#type: kind.to_string(),
        status,
        observed_generation: generation,
        last_transition_time,
        reason: reason.to_string(),
        message: message.to_string(),
    };
    match conditions.iter_mut().find(|c| c.r#type == kind) {
        Some(c) if c.status == status => *c = wanted(c.last_transition_time.clone()),
        Some(c) => *c = wanted(Time(now)),
        None => conditions.push(wanted(Time(now))),
    }
}

async fn settled_event(ctx: &Ctx, b: &WorkflowBaseline, status: &WorkflowBaselineStatus) {
    let note = format!(
        "{} / {} / {}: baseline settled after {} runs with {} endpoints; new calls are now reported",
        b.spec.repository, b.spec.workflow, b.spec.job, status.observed_runs, status.endpoint_count
    );
    info!(baseline = %b.name_any(), runs = status.observed_runs, "baseline settled");
    record_event(&ctx.recorder, b, EventType::Normal, "BaselineSettled", "Monitor", note).await;
}

fn error_policy(_: Arc<WorkflowBaseline>, error: &Error, _: Arc<Ctx>) -> Action {
    warn!(error = %error, "WorkflowBaseline reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
