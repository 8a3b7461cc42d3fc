//! Notifiers: each anomaly the node agents report goes to the webhook, Slack and email notifiers
//! of the `EgressPolicy` that applies to the job, for teams without Alertmanager.
//!
//! - **Source.** The agent's `AnomalousEgress` Event about a job's `WorkflowBaseline` (one per
//!   run and destination) carries the report as JSON ([`runwarden_crds::report`]). The operator
//!   watches those Events only (field selector), takes the policy from the report's job with
//!   the agent's own rule ([`runwarden_crds::policy::applicable_to_job`]), and reads the
//!   notifier's Secret when it sends. Secrets stay with the operator: the agents, which run next
//!   to the runners, never read them.
//! - **Once.** A handled Event gets the annotation [`NOTIFIED_ANNOTATION`]; Events without it are
//!   handled after a restart or a leader change, so a report is not lost (it may be sent twice if
//!   the operator stops between sending and annotating). Reports of one (job, destination) are
//!   sent once per [`REPEAT_AFTER`] (later runs that call it again are counted `duplicate`).
//! - **Bounded.** Each notifier sends at most [`PER_MINUTE`] reports a minute (bursts of
//!   [`BURST`]); past it reports are counted `rate_limited`, not queued. At most
//!   [`IN_FLIGHT`] reports are sent at once; the agents' pipelines never wait for any of it.
//! - **Retries.** Connection errors, timeouts ([`TIMEOUT`]), 429 and 5xx answers are retried
//!   [`ATTEMPTS`] times with a doubling backoff from one second; other answers fail at once.
//!   Outcomes are counted (`runwarden_operator_notifications_total{type,result}`) and shown per
//!   notifier in the policy's `status.notifiers` (counts, last delivery, last error).
//! - **Format.** Webhook: JSON `{"version": 1, "kind": "AnomalousEgress", "time", "report",
//!   "approve", "objects", "links"}` (`links`: the run's and the job's pages, when the operator's
//!   `uiUrl` is set; Slack and email link to the run's page then too), signed when
//!   `signingSecretRef` is set (header `X-Runwarden-Signature-256: sha256=<hex HMAC-SHA256 of
//!   the body>`). Slack: Block Kit, every
//!   name from the pod shown as code so that it is neither markup nor a link. Email: plain text
//!   through the SMTP relay of the notifier's Secret ([`Relay`]), STARTTLS required by default.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use runwarden_crds::policy::{NotifierStatus, applicable_to_job};
use runwarden_crds::report::{ANNOTATION, AnomalyReport, NOTIFIED_ANNOTATION};
use runwarden_crds::{EgressPolicy, Notifier};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::Scope;
use crate::metrics::Metrics;

/// Field manager of `status.notifiers` (the policy controller owns the rest of the status).
pub const FIELD_MANAGER: &str = "runwarden-operator-notifiers";
/// Reason of the Events whose reports are sent.
pub const REASON: &str = "AnomalousEgress";
/// `reportingController` of the agent's Events.
pub const AGENT: &str = "runwarden.dev/agent";
/// One report per (job, destination) in this time.
pub const REPEAT_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Reports a notifier sends per minute, sustained.
pub const PER_MINUTE: f64 = 30.0;
/// Reports a notifier sends in a burst.
pub const BURST: f64 = 30.0;
/// Deliveries tried per report and notifier.
pub const ATTEMPTS: u32 = 5;
/// Longest wait for a receiver's answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Reports being sent at once.
pub const IN_FLIGHT: usize = 4;
/// (job, destination) pairs remembered for [`REPEAT_AFTER`] (the oldest go first).
const REMEMBERED: usize = 10_000;
/// How often changed notifier statuses are written.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Every `type` label of the notification counter.
pub const TYPES: [&str; 3] = ["webhook", "slack", "email"];
/// Every `result` label of the notification counter.
pub const RESULTS: [&str; 5] = ["sent", "failed", "retried", "rate_limited", "duplicate"];

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Sends reports; shared by the tasks that handle Events.
struct Notifying {
    client: Client,
    plain: HttpClient<HttpConnector, Full<Bytes>>,
    /// `Err`: no CA certificates were found, with what to do about it.
    tls: Result<HttpClient<Https, Full<Bytes>>, String>,
    policies: Store<EgressPolicy>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Where users reach the run pages (`uiUrl`), to link to them.
    pages: Option<String>,
}

#[derive(Default)]
struct State {
    /// Events being handled (by uid).
    in_flight: HashSet<String>,
    /// (namespace, baseline, destination) → when it was last sent.
    sent: HashMap<(String, String, String), Instant>,
    /// (namespace, policy, notifier) → tokens and when they were counted.
    buckets: HashMap<(String, String, String), (f64, Instant)>,
    /// (namespace, policy) → notifier → its status, and whether it changed since written.
    status: HashMap<(String, String), (BTreeMap<String, NotifierStatus>, bool)>,
}

/// Runs the notifiers until `shutdown` resolves, for Events in the namespaces of `scope`;
/// messages link to the run pages under `pages` (the checked `uiUrl`) when it is given.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    scope: Scope,
    pages: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (policies, writer) = reflector::store();
    let policy_watch = watcher(Api::<EgressPolicy>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| async {});
    let notifying = Arc::new(Notifying {
        plain: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        tls: https_client(),
        client: client.clone(),
        policies,
        metrics,
        state: Mutex::default(),
        pages,
    });
    if let Err(e) = &notifying.tls {
        warn!("{e}");
    }
    let events = watcher(
        Api::<Event>::all(client),
        watcher::Config::default().fields(&format!("reason={REASON},regarding.kind=WorkflowBaseline")),
    )
    .default_backoff()
    .applied_objects();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let handle = {
        let notifying = notifying.clone();
        async move {
            notifying.policies.wait_until_ready().await.ok();
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(e) if scope.handles(e.namespace().as_deref()) => e,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(error = %e, "watching AnomalousEgress Events failed; retrying");
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let notifying = notifying.clone();
                tokio::spawn(async move {
                    notifying.handle(event).await;
                    drop(permit);
                });
            }
        }
    };
    let statuses = {
        let notifying = notifying.clone();
        async move {
            loop {
                tokio::time::sleep(STATUS_EVERY).await;
                notifying.write_statuses().await;
            }
        }
    };
    tokio::select! {
        _ = policy_watch => {}
        _ = handle => {}
        _ = statuses => {}
        _ = shutdown => {}
    }
    notifying.write_statuses().await;
}

/// An HTTPS client trusting the system's CA certificates (`SSL_CERT_FILE`, `SSL_CERT_DIR`, or
/// the usual bundle paths).
fn https_client() -> Result<HttpClient<Https, Full<Bytes>>, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| {
            format!(
                "no CA certificates found ({e}): https notifiers will fail; mount a CA bundle and set SSL_CERT_FILE"
            )
        })?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(HttpClient::builder(TokioExecutor::new()).build(connector))
}

/// What became of one report for one notifier.
enum Outcome {
    Sent,
    Failed(String),
    RateLimited,
}

impl Notifying {
    async fn handle(&self, event: Event) {
        let annotations = event.annotations();
        if annotations.contains_key(NOTIFIED_ANNOTATION) || event.reporting_controller.as_deref() != Some(AGENT) {
            return;
        }
        let Some(json) = annotations.get(ANNOTATION) else { return };
        let ns = event.namespace().unwrap_or_default();
        let uid = event.uid().unwrap_or_default();
        let report: AnomalyReport = match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => {
                warn!(event = %event.name_any(), namespace = %ns, error = %e, "an AnomalousEgress Event's report does not parse; not sent");
                self.mark(&ns, &event.name_any(), "invalid").await;
                return;
            }
        };
        // The report must be about the object the Event is about.
        let about = event.regarding.as_ref().and_then(|r| r.name.clone()).unwrap_or_default();
        if report.namespace != ns || report.baseline != about {
            warn!(event = %event.name_any(), namespace = %ns, "an AnomalousEgress Event's report names another job; not sent");
            self.mark(&ns, &event.name_any(), "invalid").await;
            return;
        }
        let Some(policy) = self.policy(&report) else { return };
        let notifiers = &policy.spec.anomaly_detection.notifiers;
        if notifiers.is_empty() || !self.state().in_flight.insert(uid.clone()) {
            return;
        }
        let policy_name = policy.name_any();
        let key = (ns.clone(), report.baseline.clone(), report.destination());
        let duplicate = {
            let mut state = self.state();
            let now = Instant::now();
            let fresh = state.sent.get(&key).is_some_and(|t| now.duration_since(*t) < REPEAT_AFTER);
            if !fresh {
                if state.sent.len() >= REMEMBERED {
                    state.sent.retain(|_, t| now.duration_since(*t) < REPEAT_AFTER);
                    if let Some(oldest) = state.sent.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                        state.sent.remove(&oldest);
                    }
                }
                state.sent.insert(key, now);
            }
            fresh
        };
        for n in notifiers {
            let kind = kind(n);
            if duplicate {
                self.count(kind, "duplicate");
                continue;
            }
            let outcome = self.deliver(&ns, &policy_name, n, &report, &event).await;
            self.record(&ns, &policy, n, outcome);
        }
        self.mark(&ns, &event.name_any(), &Timestamp::now().to_string()).await;
        self.state().in_flight.remove(&uid);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count(&self, kind: &'static str, result: &'static str) {
        self.metrics.notifications.get_or_create(&crate::metrics::NotificationLabels { r#type: kind, result }).inc();
    }

    /// The policy that applies to the report's job.
    fn policy(&self, report: &AnomalyReport) -> Option<Arc<EgressPolicy>> {
        let policies = self.policies.state();
        let found = applicable_to_job(
            policies.iter().map(|p| p.as_ref()),
            &report.namespace,
            report.scale_set.as_deref(),
            &report.repository,
            &report.workflow,
        )?;
        policies.iter().find(|p| p.uid() == found.uid()).cloned()
    }

    /// Marks an Event handled; an Event that expired meanwhile needs nothing more.
    async fn mark(&self, ns: &str, name: &str, value: &str) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let patch = json!({"metadata": {"annotations": {NOTIFIED_ANNOTATION: value}}});
        if let Err(e) = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404)
        {
            warn!(event = %name, namespace = %ns, error = %e, "could not mark an Event as notified");
        }
    }

    async fn deliver(&self, ns: &str, policy: &str, n: &Notifier, report: &AnomalyReport, event: &Event) -> Outcome {
        let kind = kind(n);
        if !self.take_token(ns, policy, &n.name) {
            self.count(kind, "rate_limited");
            warn!(notifier = %n.name, policy, namespace = ns, "notifier over its rate; report not sent");
            return Outcome::RateLimited;
        }
        let result = self.send(ns, policy, n, report, event).await;
        match result {
            Ok(()) => {
                self.count(kind, "sent");
                info!(notifier = %n.name, policy, namespace = ns, destination = %report.destination(), "report sent");
                Outcome::Sent
            }
            Err(e) => {
                self.count(kind, "failed");
                warn!(notifier = %n.name, policy, namespace = ns, error = %e, "report not sent");
                Outcome::Failed(e)
            }
        }
    }

    async fn send(
        &self,
        ns: &str,
        policy: &str,
        n: &Notifier,
        report: &AnomalyReport,
        event: &Event,
    ) -> Result<(), String> {
        let kind = kind(n);
        if let Some(e) = &n.email {
            let relay = Relay::from_secret(&self.secret_data(ns, &e.smtp_secret_ref.name).await?)?;
            let message = email(report, &e.from, &e.to, self.pages.as_deref())?;
            return self.retried(kind, || relay.send(message.clone())).await;
        }
        let (url, body, key) = if let Some(w) = &n.webhook {
            let url = self.secret(ns, &w.url_secret_ref.name, &w.url_secret_ref.key).await?;
            let key = match &w.signing_secret_ref {
                Some(s) => Some(self.secret(ns, &s.name, &s.key).await?),
                None => None,
            };
            (url, webhook_body(report, event, policy, self.pages.as_deref()), key)
        } else if let Some(s) = &n.slack {
            let url = self.secret(ns, &s.webhook_url_secret_ref.name, &s.webhook_url_secret_ref.key).await?;
            (url, slack_body(report, self.pages.as_deref()), None)
        } else {
            return Err("no notifier type set".into());
        };
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let uri: http::Uri = url.trim().parse().map_err(|_| "the URL in the Secret is not a URL".to_string())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the URL in the Secret must start with https:// or http://".into()),
        };
        if https && let Err(e) = &self.tls {
            return Err(e.clone());
        }
        let delivery = event.uid().unwrap_or_default();
        self.retried(kind, || async {
            let mut request = http::Request::post(uri.clone())
                .header("content-type", "application/json")
                .header("user-agent", concat!("runwarden-operator/", env!("CARGO_PKG_VERSION")))
                .header("x-runwarden-event", "anomalous-egress")
                .header("x-runwarden-delivery", delivery.as_str());
            if let Some(key) = &key {
                request = request.header("x-runwarden-signature-256", signature(key.as_bytes(), &body));
            }
            let request =
                request.body(Full::new(Bytes::from(body.clone()))).map_err(|e| Failure::permanent(e.to_string()))?;
            let sent = match &self.tls {
                Ok(c) if https => tokio::time::timeout(TIMEOUT, c.request(request)).await,
                _ => tokio::time::timeout(TIMEOUT, self.plain.request(request)).await,
            };
            match sent {
                Ok(Ok(answer)) if answer.status().is_success() => Ok(()),
                Ok(Ok(answer)) => {
                    let status = answer.status();
                    let text = answer.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let text: String = String::from_utf8_lossy(&text).chars().take(200).collect();
                    let message = format!("the receiver answered {status}: {}", text.trim());
                    let transient = status.as_u16() == 429 || status.is_server_error();
                    Err(Failure { message, transient })
                }
                Ok(Err(e)) => Err(Failure::transient(format!("could not reach the receiver: {}", chain(&e)))),
                Err(_) => {
                    Err(Failure::transient(format!("the receiver did not answer within {} s", TIMEOUT.as_secs())))
                }
            }
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or [`ATTEMPTS`] were made, waiting 1, 2,
    /// 4... seconds between them.
    async fn retried<F, Fut>(&self, kind: &'static str, mut attempt: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Failure>>,
    {
        let mut wait = Duration::from_secs(1);
        for n in 1..=ATTEMPTS {
            match attempt().await {
                Ok(()) => return Ok(()),
                Err(f) if !f.transient => return Err(f.message),
                Err(f) if n == ATTEMPTS => return Err(format!("{} (tried {ATTEMPTS} times)", f.message)),
                Err(_) => {
                    self.count(kind, "retried");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Every key of Secret `name`, as text.
    async fn secret_data(&self, ns: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| match crate::rbac::forbidden(&e) {
                true => crate::rbac::secret_not_readable(ns, name),
                false => format!("reading Secret {ns}/{name}: {e}"),
            })?
            .ok_or_else(|| format!("Secret {ns}/{name} does not exist"))?;
        let mut out = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            let text = String::from_utf8(v.0).map_err(|_| format!("key {k:?} of Secret {ns}/{name} is not text"))?;
            out.insert(k, text);
        }
        Ok(out)
    }

    /// The value of `key` in Secret `name` (read when sending, so a rotated Secret applies at once).
    async fn secret(&self, ns: &str, name: &str, key: &str) -> Result<String, String> {
        self.secret_data(ns, name).await?.remove(key).ok_or_else(|| format!("Secret {ns}/{name} has no key {key:?}"))
    }

    fn take_token(&self, ns: &str, policy: &str, notifier: &str) -> bool {
        let mut state = self.state();
        let now = Instant::now();
        let bucket =
            state.buckets.entry((ns.to_string(), policy.to_string(), notifier.to_string())).or_insert((BURST, now));
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * PER_MINUTE / 60.0).min(BURST);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Counts an outcome in the policy's notifier status (written by [`Self::write_statuses`]).
    fn record(&self, ns: &str, policy: &EgressPolicy, n: &Notifier, outcome: Outcome) {
        let mut state = self.state();
        let (statuses, dirty) = state.status.entry((ns.to_string(), policy.name_any())).or_insert_with(|| {
            // Counts go on from what the policy shows (another replica, or before a restart).
            let shown = policy.status.as_ref().map(|s| s.notifiers.clone()).unwrap_or_default();
            (shown.into_iter().map(|s| (s.name.clone(), s)).collect(), false)
        });
        // Notifiers removed from the spec leave the status.
        let current = &policy.spec.anomaly_detection.notifiers;
        statuses.retain(|name, _| current.iter().any(|c| &c.name == name));
        let status = statuses
            .entry(n.name.clone())
            .or_insert_with(|| NotifierStatus { name: n.name.clone(), ..Default::default() });
        let now = Some(Time(Timestamp::now()));
        match outcome {
            Outcome::Sent => {
                status.sent += 1;
                status.last_sent_time = now;
            }
            Outcome::Failed(e) => {
                status.failed += 1;
                status.last_failure_time = now;
                status.last_error = Some(e.chars().take(1000).collect());
            }
            Outcome::RateLimited => status.rate_limited += 1,
        }
        *dirty = true;
    }

    /// Writes the notifier statuses that changed (server-side apply of `status.notifiers` only).
    async fn write_statuses(&self) {
        let changed: Vec<((String, String), Vec<NotifierStatus>)> = {
            let mut state = self.state();
            state
                .status
                .iter_mut()
                .filter(|(_, (_, dirty))| *dirty)
                .map(|(k, (s, dirty))| {
                    *dirty = false;
                    (k.clone(), s.values().cloned().collect())
                })
                .collect()
        };
        for ((ns, name), notifiers) in changed {
            let api: Api<EgressPolicy> = Api::namespaced(self.client.clone(), &ns);
            let patch = json!({
                "apiVersion": "runwarden.dev/v1alpha1",
                "kind": "EgressPolicy",
                "status": {"notifiers": notifiers},
            });
            if let Err(e) =
                api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await
            {
                warn!(policy = %name, namespace = %ns, error = %e, "could not write the notifiers' status");
                if let Some((_, dirty)) = self.state().status.get_mut(&(ns, name)) {
                    *dirty = true;
                }
            }
        }
    }
}

fn kind(n: &Notifier) -> &'static str {
    match (&n.webhook, &n.slack) {
        (Some(_), _) => "webhook",
        (_, Some(_)) => "slack",
        _ => "email",
    }
}

/// An error with its causes, for a person.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether an error comes from data the TLS stack rejected (a certificate it does not trust, a
/// name that does not match): an `io::Error` of kind `InvalidData` among its causes.
fn rejected_by_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// `sha256=<hex HMAC-SHA256 of body with key>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The run's page under `pages`.
fn run_page(report: &AnomalyReport, pages: &str) -> String {
    runwarden_crds::run::run_page_url(pages, &report.namespace, &report.run_id, &report.pod)
}

/// The generic webhook's JSON (with `links` to the run's and the job's pages under `pages`).
pub fn webhook_body(report: &AnomalyReport, event: &Event, policy: &str, pages: Option<&str>) -> Value {
    let object = |api_version: &str, kind: &str, name: &str| json!({"apiVersion": api_version, "kind": kind, "namespace": report.namespace, "name": name});
    let mut objects = vec![
        object("v1", "Pod", &report.pod),
        object("runwarden.dev/v1alpha1", "WorkflowBaseline", &report.baseline),
        object("runwarden.dev/v1alpha1", "EgressPolicy", policy),
        object("events.k8s.io/v1", "Event", &event.name_any()),
    ];
    if let Some(r) = &report.runner {
        objects.push(object("actions.github.com/v1alpha1", "EphemeralRunner", r));
    }
    let mut body = json!({
        "version": 1,
        "kind": "AnomalousEgress",
        "time": Timestamp::now().to_string(),
        "summary": summary(report),
        "report": report,
        "approve": {"command": report.approve_command(), "manifest": report.approve_manifest()},
        "objects": objects,
    });
    if let Some(pages) = pages {
        body["links"] = json!({
            "run": run_page(report, pages),
            "job": runwarden_crds::run::job_page_url(pages, &report.namespace, &report.baseline),
        });
    }
    body
}

/// One line: what called where in which job.
fn summary(report: &AnomalyReport) -> String {
    format!(
        "{}: {} called {} in run {} of {} {} job {}",
        report.severity,
        report.processes.first().map_or("a process", String::as_str),
        report.destination(),
        report.run_id,
        report.repository,
        report.workflow,
        report.job
    )
}

/// Text from a pod inside a Slack code span: no backticks to end it, no `<`/`&` for Slack to read.
fn code(text: &str) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    format!("`{}`", clean.replace('`', "'").replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;"))
}

/// Text for Slack's mrkdwn: `&`, `<` and `>` escaped, so nothing becomes a link or a mention.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The Slack incoming-webhook message (Block Kit), with a plain `text` for notifications and a
/// link to the run's page under `pages`.
pub fn slack_body(report: &AnomalyReport, pages: Option<&str>) -> Value {
    let process = match (report.processes.first(), report.executables.first()) {
        (Some(p), Some(e)) => format!("{} ({})", code(p), code(e)),
        (Some(p), None) => code(p),
        (None, Some(e)) => code(e),
        (None, None) => "unknown".into(),
    };
    let reasons: Vec<String> = report.reasons.iter().map(|r| format!("• {}", escaped(r))).collect();
    let severity = report.severity.to_uppercase();
    let text = format!(
        "runwarden: {severity} anomalous egress in {} ({}): {}",
        escaped(&report.repository),
        escaped(&report.job),
        escaped(&report.destination())
    );
    let mut message = json!({
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": format!("{severity}: unusual outbound call in {}", report.repository).chars().take(150).collect::<String>()}},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("{process} called {} for the first time in this job.", code(&report.destination()))},
             "fields": [
                {"type": "mrkdwn", "text": format!("*Repository*\n{}", escaped(&report.repository))},
                {"type": "mrkdwn", "text": format!("*Workflow*\n{}", escaped(&report.workflow))},
                {"type": "mrkdwn", "text": format!("*Job*\n{}", escaped(&report.job))},
                {"type": "mrkdwn", "text": format!("*Run*\n{}", escaped(&report.run_id))},
                {"type": "mrkdwn", "text": format!("*Address*\n{}", code(&report.address))},
                {"type": "mrkdwn", "text": format!("*Severity*\n{severity} (score {:.2})", report.score)},
             ]},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*Why it is unusual*\n{}", if reasons.is_empty() { "not in the job's baseline".to_string() } else { reasons.join("\n") })}},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                "*If it is expected, approve it* (or add it under `spec.approved` of the baseline in Git):\n```{}```",
                escaped(&report.approve_command()).replace("```", "'''"))}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                "pod {} · runner {} · baseline {} · namespace {}",
                escaped(&report.pod), escaped(report.runner.as_deref().unwrap_or("-")), escaped(&report.baseline), escaped(&report.namespace))}]},
        ],
    });
    if let (Some(pages), Some(blocks)) = (pages, message["blocks"].as_array_mut()) {
        // The URL is the operator's setting and names only name characters: no `|` or `>` in it.
        let link = format!("<{}|Every call of run {} and why>", run_page(report, pages), escaped(&report.run_id));
        blocks.insert(blocks.len() - 1, json!({"type": "section", "text": {"type": "mrkdwn", "text": link}}));
    }
    message
}

/// Why one delivery attempt failed, and whether another may succeed.
struct Failure {
    message: String,
    transient: bool,
}

impl Failure {
    fn transient(message: String) -> Self {
        Self { message, transient: true }
    }

    fn permanent(message: String) -> Self {
        Self { message, transient: false }
    }
}

/// How to reach an SMTP relay, from the keys of an email notifier's Secret: `host`, `port`
/// (default 587), `username` and `password` (both or neither), `tls` (`starttls`, the default:
/// the relay must offer STARTTLS, nothing is sent in clear; `tls`: TLS from the first byte,
/// usually port 465; `none`: no encryption, for a relay on the same trusted network), and
/// `ca.crt` (PEM: CA certificates to trust instead of the system's, for a relay with a private
/// CA).
pub struct Relay {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
}

impl Relay {
    /// The relay the Secret's keys describe, or what is wrong with them.
    pub fn from_secret(keys: &BTreeMap<String, String>) -> Result<Relay, String> {
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
        let host = keys.get("host").map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
        let host = host.ok_or("the SMTP Secret has no key \"host\"")?;
        let port = match keys.get("port") {
            Some(p) => p.trim().parse::<u16>().map_err(|_| format!("the SMTP Secret's port {p:?} is not a port"))?,
            None => 587,
        };
        let parameters = || -> Result<TlsParameters, String> {
            let mut builder = TlsParameters::builder(host.clone());
            if let Some(pem) = keys.get("ca.crt") {
                let ca = Certificate::from_pem(pem.as_bytes())
                    .map_err(|e| format!("the SMTP Secret's ca.crt is not PEM certificates: {e}"))?;
                builder = builder.certificate_store(CertificateStore::None).add_root_certificate(ca);
            }
            builder.build_rustls().map_err(|e| format!("TLS settings for {host}: {e}"))
        };
        let tls = match keys.get("tls").map(|t| t.trim()).unwrap_or("starttls") {
            "starttls" => Tls::Required(parameters()?),
            "tls" => Tls::Wrapper(parameters()?),
            "none" => Tls::None,
            other => return Err(format!("the SMTP Secret's tls {other:?} is not starttls, tls or none")),
        };
        let mut builder = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host.as_str())
            .port(port)
            .tls(tls)
            .timeout(Some(TIMEOUT));
        match (keys.get("username"), keys.get("password")) {
            (Some(u), Some(p)) => builder = builder.credentials(Credentials::new(u.trim().into(), p.trim().into())),
            (None, None) => {}
            _ => {
                return Err(
                    "the SMTP Secret has a username without a password, or a password without a username".into()
                );
            }
        }
        Ok(Relay { transport: builder.build() })
    }

    async fn send(&self, message: lettre::Message) -> Result<(), Failure> {
        use lettre::AsyncTransport;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = format!("the SMTP relay: {}", chain(&e));
                // A refused certificate (the TLS stack's InvalidData) does not fix itself within
                // seconds; nor does a 5xx answer.
                if e.is_permanent() || e.is_tls() || rejected_by_tls(&e) {
                    Err(Failure::permanent(message))
                } else {
                    Err(Failure::transient(message))
                }
            }
        }
    }
}

/// The email: a subject that says what and where, a plain-text body that says why and how to
/// approve, and the run's page under `pages`. Names from the pod go in the body as they are
/// (plain text) and lose any line break.
pub fn email(
    report: &AnomalyReport,
    from: &str,
    to: &[String],
    pages: Option<&str>,
) -> Result<lettre::Message, String> {
    let one_line = |s: &str| s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>();
    let mut builder = lettre::Message::builder()
        .from(from.parse().map_err(|e| format!("from {from:?}: {e}"))?)
        .subject(one_line(&format!(
            "[runwarden] {}: {} job {} called {}",
            report.severity.to_uppercase(),
            report.repository,
            report.job,
            report.destination()
        )));
    for address in to {
        builder = builder.to(address.parse().map_err(|e| format!("to {address:?}: {e}"))?);
    }
    let process = report.processes.first().map_or("an unknown process".to_string(), |p| one_line(p));
    let executable = report.executables.first().map(|e| format!(" ({})", one_line(e))).unwrap_or_default();
    let reasons: Vec<String> = report.reasons.iter().map(|r| format!("  - {}", one_line(r))).collect();
    let page = pages.map(|p| format!("Every call of the run and why: {}\n\n", run_page(report, p))).unwrap_or_default();
    let body = format!(
        "{process}{executable} in run {} of {} ({}, job {}) called {} ({}) for the first time in this job.\n\n{page}\
         Severity: {} (score {:.2})\n\nWhy it is unusual:\n{}\n\n\
         If it is expected, approve it:\n\n  {}\n\nor add it under spec.approved of WorkflowBaseline {} in Git:\n\n{}\n\n\
         Pod {}, EphemeralRunner {}, namespace {}; first call {}.\n",
        one_line(&report.run_id),
        one_line(&report.repository),
        one_line(&report.workflow),
        one_line(&report.job),
        one_line(&report.destination()),
        one_line(&report.address),
        report.severity,
        report.score,
        if reasons.is_empty() { "  - not in the job's baseline".to_string() } else { reasons.join("\n") },
        report.approve_command(),
        report.baseline,
        report.approve_manifest().lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"),
        report.pod,
        report.runner.as_deref().unwrap_or("-"),
        report.namespace,
        report.first_seen,
    );
    builder.body(body).map_err(|e| format!("building the email: {e}"))
}
