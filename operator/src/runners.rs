//! Each job gets its `WorkflowBaseline`: when an `EphemeralRunner`'s status gets its job, and
//! for runner pods without ARC (labelled `runwarden.dev/monitor: "true"` with identity
//! annotations set by their owner) in namespaces labelled
//! `runwarden.dev/self-declared-identities=true`.
//!
//! The operator writes nothing on pods: the node agent reads a runner's job from its
//! `EphemeralRunner` itself (which job code cannot write), so the operator needs no right to
//! patch pods.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use runwarden_crds::WorkflowBaseline;
use tracing::{debug, warn};

use crate::arc::EphemeralRunner;
use crate::identity::{IdentityError, JobIdentity, MONITOR_LABEL, SELF_DECLARED_LABEL};
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
    let controller = Controller::new(runners, watcher::Config::default());
    metrics.count_watched("EphemeralRunner", controller.store());
    controller
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
    let Some(status) = &runner.status else { return Ok(Action::await_change()) };
    let identity = match status.identity() {
        Ok(identity) => identity,
        // No job yet: the status changes when one is assigned.
        Err(IdentityError::Missing(_)) => return Ok(Action::await_change()),
        Err(e) => {
            warn!(namespace = %ns, runner = %runner.name_any(), error = %e, "EphemeralRunner has a job this operator cannot read");
            return Ok(Action::await_change());
        }
    };
    let baselines: Api<WorkflowBaseline> = Api::namespaced(ctx.client.clone(), &ns);
    baselines::ensure(&baselines, &identity, &ctx.recorder).await?;
    Ok(Action::await_change())
}

async fn reconcile_monitored_pod(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = pod.namespace().unwrap_or_default();
    // A pod's own word on its job counts only where an administrator allowed it (the agent
    // judges such pods elsewhere as unidentified): no baseline for it anywhere else.
    let namespace = Api::<Namespace>::all(ctx.client.clone()).get_metadata(&ns).await?;
    if namespace.labels().get(SELF_DECLARED_LABEL).map(String::as_str) != Some("true") {
        debug!(namespace = %ns, pod = %pod.name_any(), "a {MONITOR_LABEL}=true pod outside a namespace labelled {SELF_DECLARED_LABEL}=true: no baseline");
        return Ok(Action::await_change());
    }
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

fn error_policy<K>(_: Arc<K>, error: &Error, _: Arc<Ctx>) -> Action {
    warn!(error = %error, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
