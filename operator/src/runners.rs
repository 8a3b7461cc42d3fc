//! Runner pods' job identity: when an `EphemeralRunner`'s status gets its job, annotate its pod
//! and its container-mode job pods with the identity, and make sure the job has a
//! `WorkflowBaseline`. Runner pods without ARC (labelled `runwarden.dev/monitor: "true"` with
//! identity annotations set by their owner) get their baseline too.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use tracing::{debug, info, warn};

use crate::arc::{EphemeralRunner, RUNNER_POD_LABEL, SCALE_SET_LABEL};
use crate::identity::{IdentityError, JobIdentity, MONITOR_LABEL};
use crate::metrics::Metrics;
use crate::{Error, FIELD_MANAGER, Result, Scope, baselines, instrumented};

/// Shared by the reconcilers.
struct Ctx {
    client: Client,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    scope: Scope,
}

impl Ctx {
    fn new(client: Client, metrics: Arc<Metrics>, scope: Scope) -> Arc<Self> {
        let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
        Arc::new(Self { client, metrics, recorder, scope })
    }
}

/// Runs the `EphemeralRunner` controller until `shutdown` completes.
pub async fn run_ephemeral_runners(
    client: Client,
    metrics: Arc<Metrics>,
    scope: Scope,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let runners: Api<EphemeralRunner> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let controller = Controller::new(runners, watcher::Config::default());
    metrics.count_watched("EphemeralRunner", controller.store());
    controller
        // Runner pods are named after their EphemeralRunner.
        .watches(pods.clone(), watcher::Config::default().labels(SCALE_SET_LABEL), |pod| {
            Some(ObjectRef::new(&pod.name_any()).within(&pod.namespace()?))
        })
        // Container-mode job pods name their runner pod in a label.
        .watches(pods, watcher::Config::default().labels(RUNNER_POD_LABEL), |pod| {
            let runner = pod.labels().get(RUNNER_POD_LABEL)?.clone();
            Some(ObjectRef::new(&runner).within(&pod.namespace()?))
        })
        .with_config(crate::controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            |r, ctx| async move {
                if !ctx.scope.handles(r.namespace().as_deref()) {
                    return Ok(Action::await_change());
                }
                instrumented(&ctx.metrics.clone(), "runners", reconcile_runner(r, ctx)).await
            },
            error_policy,
            Ctx::new(client, metrics, scope),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "EphemeralRunner reconcile failed");
            }
        })
        .await;
}

/// Runs the controller of non-ARC runner pods (`runwarden.dev/monitor: "true"`).
pub async fn run_monitored_pods(
    client: Client,
    metrics: Arc<Metrics>,
    scope: Scope,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let pods: Api<Pod> = Api::all(client.clone());
    Controller::new(pods, watcher::Config::default().labels(&format!("{MONITOR_LABEL}=true")))
        .with_config(crate::controller_config())
        .graceful_shutdown_on(shutdown)
        .run(
            |p, ctx| async move {
                if !ctx.scope.handles(p.namespace().as_deref()) {
                    return Ok(Action::await_change());
                }
                instrumented(&ctx.metrics.clone(), "monitored_pods", reconcile_monitored_pod(p, ctx)).await
            },
            error_policy,
            Ctx::new(client, metrics, scope),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "monitored pod reconcile failed");
            }
        })
        .await;
}

async fn reconcile_runner(runner: Arc<EphemeralRunner>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = runner.namespace().unwrap_or_default();
    let name = runner.name_any();
    let Some(status) = &runner.status else { return Ok(Action::await_change()) };
    let identity = match JobIdentity::from_runner(
        status.job_repository_name.as_deref(),
        status.job_workflow_ref.as_deref(),
        status.job_display_name.as_deref(),
        status.workflow_run_id,
    ) {
        Ok(identity) => identity,
        // No job yet: the status changes when one is assigned.
        Err(IdentityError::Missing(_)) => return Ok(Action::await_change()),
        Err(e) => {
            warn!(namespace = %ns, runner = %name, error = %e, "EphemeralRunner has a job this operator cannot read");
            return Ok(Action::await_change());
        }
    };

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = runner.meta().uid.clone();
    if let Some(pod) = pods.get_opt(&name).await? {
        let owned = pod.owner_references().iter().any(|o| o.kind == "EphemeralRunner" && Some(&o.uid) == uid.as_ref());
        if owned || pod.owner_references().is_empty() {
            annotate(&pods, &pod, &identity).await?;
        }
    }
    let job_pods = pods.list(&ListParams::default().labels(&format!("{RUNNER_POD_LABEL}={name}"))).await?;
    for pod in &job_pods.items {
        annotate(&pods, pod, &identity).await?;
    }

    let baselines: Api<WorkflowBaseline> = Api::namespaced(ctx.client.clone(), &ns);
    baselines::ensure(&baselines, &identity, &ctx.recorder).await?;
    Ok(Action::await_change())
}

async fn reconcile_monitored_pod(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = pod.namespace().unwrap_or_default();
    match JobIdentity::from_annotations(pod.annotations()) {
        Ok(identity) => {
            let baselines: Api<WorkflowBaseline> = Api::namespaced(ctx.client.clone(), &ns);
            baselines::ensure(&baselines, &identity, &ctx.recorder).await?;
        }
        Err(e) => {
            warn!(namespace = %ns, pod = %pod.name_any(), error = %e, "pod labelled {MONITOR_LABEL}=true lacks its identity annotations");
        }
    }
    Ok(Action::await_change())
}

/// Writes the identity annotations on `pod` unless they are already there.
async fn annotate(pods: &Api<Pod>, pod: &Pod, identity: &JobIdentity) -> Result<()> {
    let wanted = identity.annotations();
    let current = pod.annotations();
    if wanted.iter().all(|(k, v)| current.get(k) == Some(v)) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": pod.name_any(), "annotations": wanted },
    });
    pods.patch(&pod.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    info!(pod = %pod.name_any(), repository = %identity.repository, workflow = %identity.workflow, job = %identity.job, "annotated runner pod");
    Ok(())
}

fn error_policy<K>(_: Arc<K>, error: &Error, _: Arc<Ctx>) -> Action {
    warn!(error = %error, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
