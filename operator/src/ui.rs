//! Run insights: read-only web pages the operator serves (config `uiAddress`, Helm value
//! `operator.ui.enabled`), server-rendered HTML with no script and no external asset (it runs on
//! air-gapped clusters):
//!
//! - `/`: the recent runs across the cluster (each baseline's `recentRuns`), newest first.
//! - `/runs/NAMESPACE/NAME`: one run's `WorkflowRun` record: every destination, anomalies first
//!   with the detector's reasons and the commands that approve them, links to the GitHub run and
//!   to the job.
//! - `/jobs/NAMESPACE/BASELINE`: the job's baseline: learned, approved and anomalous endpoints
//!   with where they were first and last seen, rotating families, how many new endpoints each
//!   recent run brought (a small chart), and its recent runs.
//!
//! Who sees what ([`Access`]): by default the pages are served on a loopback address only,
//! reached with `kubectl port-forward` (which needs `pods/portforward` on the operator's pod):
//! whoever can do that sees every namespace's runs. With token authentication (for an Ingress)
//! every request carries `Authorization: Bearer` with a token the API server knows (checked
//! with a TokenReview), and shows only the namespaces where that user may `get
//! workflowbaselines` (a SubjectAccessReview); both answers are kept for a minute.
//! Every text in a page comes from runners (host names, process names, reasons quoting them) and
//! is escaped.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::PoisonError;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use runwarden_crds::baseline::EndpointState;
use runwarden_crds::run::record_name;
use runwarden_crds::{LearnedEndpoint, RunEndpoint, RunVerdict, WorkflowBaseline, WorkflowRun};
use tokio::net::TcpListener;
use tracing::warn;

use crate::cli::{age, destination};

/// Runs listed on `/` at most (the newest).
pub const MAX_LISTED_RUNS: usize = 1000;

/// What the pages read: the baselines (the operator's cache) and the API for run records.
#[derive(Clone)]
pub struct Ui {
    /// Every baseline the operator handles.
    pub baselines: Store<WorkflowBaseline>,
    /// Reads `WorkflowRun` records.
    pub client: Client,
    /// Who sees what.
    pub access: Access,
}

/// Who may see which runs. Requests from loopback (`kubectl port-forward`, which needs
/// `pods/portforward` on the operator's pods) see every namespace either way.
#[derive(Clone)]
pub enum Access {
    /// Served on loopback only.
    PortForward,
    /// Served on every address (for an Ingress): every request from elsewhere than loopback
    /// needs a bearer token, and sees the namespaces where its user may `get workflowbaselines`.
    Token(Arc<Reviews>),
}

/// Whether the pages may be served at `address`: without token authentication, on loopback
/// only (see the module).
pub fn check_address(address: &SocketAddr, token_auth: bool) -> Result<(), String> {
    if token_auth || address.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "uiAddress {address}: without uiTokenAuth the run pages are served on a loopback address only (reach them with kubectl port-forward)"
        ))
    }
}

/// How long a TokenReview's or a SubjectAccessReview's answer is kept.
const REVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Answers kept at most (past it they are all forgotten: a flood of tokens costs reviews, not
/// memory).
const MAX_REVIEWS: usize = 4096;

/// Answers by key, each with when it was given.
type Answers<K, V> = std::sync::Mutex<std::collections::HashMap<K, (std::time::Instant, V)>>;

/// The API server's answers about tokens and users, kept for [`REVIEW_TTL`].
pub struct Reviews {
    client: Client,
    /// sha256 of a token → its user (`None`: not authenticated).
    users: Answers<Vec<u8>, Option<UserInfo>>,
    /// (username, namespace) → whether it may get the namespace's baselines.
    namespaces: Answers<(String, String), bool>,
}

impl Reviews {
    /// Reviews asked of the API server through `client` (the operator may create TokenReviews
    /// and SubjectAccessReviews).
    pub fn new(client: Client) -> Self {
        Self { client, users: Default::default(), namespaces: Default::default() }
    }

    /// The user `token` belongs to, if the API server knows it.
    async fn user(&self, token: &str) -> Result<Option<UserInfo>, kube::Error> {
        let key = ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec();
        if let Some((at, user)) = self.users.lock().unwrap_or_else(PoisonError::into_inner).get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return Ok(user.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), ..Default::default() },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let status = answer.status.unwrap_or_default();
        let user = if status.authenticated == Some(true) { status.user } else { None };
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if users.len() >= MAX_REVIEWS {
            users.clear();
        }
        users.insert(key, (std::time::Instant::now(), user.clone()));
        Ok(user)
    }

    /// Whether `user` may get the baselines of namespace `ns`.
    async fn may_see(&self, user: &UserInfo, ns: &str) -> Result<bool, kube::Error> {
        let key = (user.username.clone().unwrap_or_default(), ns.to_string());
        if let Some((at, allowed)) = self.namespaces.lock().unwrap_or_else(PoisonError::into_inner).get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return Ok(*allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.to_string()),
                    verb: Some("get".into()),
                    group: Some("runwarden.dev".into()),
                    resource: Some("workflowbaselines".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer =
            Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let mut namespaces = self.namespaces.lock().unwrap_or_else(PoisonError::into_inner);
        if namespaces.len() >= MAX_REVIEWS {
            namespaces.clear();
        }
        namespaces.insert(key, (std::time::Instant::now(), allowed));
        Ok(allowed)
    }
}

/// Who is asking, as far as the pages care.
enum Viewer {
    /// Sees every namespace.
    Anyone,
    /// Sees the namespaces the API server lets this user get baselines in.
    User(UserInfo),
}

/// Watches the baselines (a cache of its own: every replica serves, leader or not) and serves
/// the pages on `listener` until the task is dropped.
pub async fn run(client: Client, listener: TcpListener, access: Access) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (baselines, writer) = reflector::store();
    let watch = reflector(writer, watcher(Api::<WorkflowBaseline>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .for_each(|_| std::future::ready(()));
    tokio::spawn(watch);
    serve(listener, Ui { baselines, client, access }).await;
}

/// Serves the pages on `listener` until the task is dropped (at most 64 connections at once).
pub async fn serve(listener: TcpListener, ui: Ui) {
    let slots = Arc::new(tokio::sync::Semaphore::new(runwarden_crds::serve::MAX_CONNECTIONS));
    let ui = Arc::new(ui);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let ui = ui.clone();
        // From loopback: `kubectl port-forward` (or the operator's own pod), never an Ingress.
        let local = peer.ip().to_canonical().is_loopback();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, ui.clone(), local));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(runwarden_crds::serve::HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await;
            drop(permit);
        });
    }
}

/// The viewer of a request, or the answer that refuses it.
async fn viewer(
    req: &Request<hyper::body::Incoming>,
    access: &Access,
    local: bool,
) -> Result<Viewer, (StatusCode, String)> {
    let Access::Token(reviews) = access else {
        return Ok(Viewer::Anyone);
    };
    if local {
        return Ok(Viewer::Anyone);
    }
    let refused =
        || (StatusCode::UNAUTHORIZED, page("Unauthorized", "<p>A bearer token the cluster knows is needed.</p>"));
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(refused)?;
    match reviews.user(token).await {
        Ok(Some(user)) => Ok(Viewer::User(user)),
        Ok(None) => Err(refused()),
        Err(e) => {
            warn!(error = %e, "a TokenReview failed");
            Err((StatusCode::BAD_GATEWAY, page("Unavailable", "<p>The API server did not answer; try again.</p>")))
        }
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    ui: Arc<Ui>,
    local: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.method() != hyper::Method::GET {
        (StatusCode::METHOD_NOT_ALLOWED, page("Not allowed", "<p>Only GET.</p>"))
    } else {
        match viewer(&req, &ui.access, local).await {
            Ok(viewer) => route(req.uri().path(), &ui, &viewer).await,
            Err(refusal) => refusal,
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(hyper::header::WWW_AUTHENTICATE, "Bearer".parse().expect("a header value"));
    }
    headers.insert(hyper::header::CONTENT_TYPE, "text/html; charset=utf-8".parse().expect("a header value"));
    // Nothing but the page itself: no script, no frame, no outside request.
    let policy = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";
    headers.insert("content-security-policy", policy.parse().expect("a header value"));
    headers.insert("x-content-type-options", "nosniff".parse().expect("a header value"));
    headers.insert("referrer-policy", "no-referrer".parse().expect("a header value"));
    Ok(response)
}

/// Whether `viewer` may see namespace `ns` (`Err`: the API server did not say).
async fn may_see(ui: &Ui, viewer: &Viewer, ns: &str) -> Result<bool, kube::Error> {
    match (viewer, &ui.access) {
        (Viewer::User(user), Access::Token(reviews)) => reviews.may_see(user, ns).await,
        _ => Ok(true),
    }
}

async fn route(path: &str, ui: &Ui, viewer: &Viewer) -> (StatusCode, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Namespaces and names only: nothing else reaches the API server's paths.
    if parts.iter().any(|p| segment(p) != *p) {
        return not_found("No such page.");
    }
    let unavailable =
        || (StatusCode::BAD_GATEWAY, page("Unavailable", "<p>The API server did not answer; try again.</p>"));
    if let [_, ns, _] = parts.as_slice() {
        match may_see(ui, viewer, ns).await {
            Ok(true) => {}
            Ok(false) => {
                let text = format!("<p>You may not get workflowbaselines in namespace {}.</p>", esc(ns));
                return (StatusCode::FORBIDDEN, page("Forbidden", &text));
            }
            Err(e) => {
                warn!(namespace = %ns, error = %e, "a SubjectAccessReview failed");
                return unavailable();
            }
        }
    }
    let now = Timestamp::now();
    match parts.as_slice() {
        [""] => {
            let mut visible = Vec::new();
            let mut decided: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
            for b in ui.baselines.state() {
                let ns = b.namespace().unwrap_or_default();
                let allowed = match decided.get(&ns) {
                    Some(a) => *a,
                    None => match may_see(ui, viewer, &ns).await {
                        Ok(a) => *decided.entry(ns).or_insert(a),
                        Err(e) => {
                            warn!(namespace = %ns, error = %e, "a SubjectAccessReview failed");
                            return unavailable();
                        }
                    },
                };
                if allowed {
                    visible.push(b);
                }
            }
            (StatusCode::OK, runs_page(&visible, now))
        }
        ["runs", ns, name] => {
            let api: Api<WorkflowRun> = Api::namespaced(ui.client.clone(), ns);
            match api.get_opt(name).await {
                Ok(Some(run)) => (StatusCode::OK, run_page(&run, now)),
                Ok(None) => not_found(&format!(
                    "No record of run {name} in namespace {ns} yet: a run's record is written when the run has \
                     ended and its node agent has merged it (within seconds), and the oldest are deleted past \
                     the records kept per job. Until then its Events (kubectl -n {ns} get events) say what is \
                     known so far."
                )),
                Err(e) => {
                    warn!(namespace = %ns, run = %name, error = %e, "the run page could not read its record");
                    (StatusCode::BAD_GATEWAY, page("Unavailable", "<p>The API server did not answer; try again.</p>"))
                }
            }
        }
        ["jobs", ns, name] => {
            let key = kube::runtime::reflector::ObjectRef::new(name).within(ns);
            match ui.baselines.get(&key) {
                Some(b) => (StatusCode::OK, job_page(&b, now)),
                None => not_found(&format!("No WorkflowBaseline {name} in namespace {ns}.")),
            }
        }
        _ => not_found("No such page."),
    }
}

fn not_found(what: &str) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, page("Not found", &format!("<p>{}</p><p><a href=\"/\">Recent runs</a></p>", esc(what))))
}

/// `text` safe inside HTML text and quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment (a Kubernetes name: no escaping needed beyond HTML, but runner-written text
/// never goes into a URL unchecked).
fn segment(text: &str) -> String {
    text.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).collect()
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
th{background:#f4f4f4}tr.anomalous td{background:#fff0f0}tr.blocked td{background:#f0f0ff}tr.new td{background:#fffbe6}\
code,pre{background:#f4f4f4;padding:.1em .3em}pre{padding:.5em;white-space:pre-wrap}\
.sev-High,.sev-Critical{color:#b00;font-weight:bold}.sev-Medium{color:#b60}.muted{color:#777}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · runwarden</title>\
         <style>{STYLE}</style></head><body><p class=\"muted\"><a href=\"/\">runwarden</a></p><h1>{}</h1>{body}</body></html>\n",
        esc(title),
        esc(title)
    )
}

fn when(t: &Time, now: Timestamp) -> String {
    format!("<span title=\"{}\">{} ago</span>", esc(&t.0.to_string()), esc(&age(t, now)))
}

/// `/`: every baseline's recent runs, newest first.
pub fn runs_page(baselines: &[Arc<WorkflowBaseline>], now: Timestamp) -> String {
    let mut runs: Vec<(&WorkflowBaseline, &runwarden_crds::RunRecord)> = baselines
        .iter()
        .flat_map(|b| b.status.iter().flat_map(|s| &s.recent_runs).map(move |r| (b.as_ref(), r)))
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.1.time.0));
    let total = runs.len();
    let mut body = String::new();
    if total > MAX_LISTED_RUNS {
        let _ = write!(body, "<p class=\"muted\">The newest {MAX_LISTED_RUNS} of {total} runs.</p>");
    }
    body.push_str(
        "<table><tr><th>Finished</th><th>Repository</th><th>Workflow</th><th>Job</th><th>Run</th><th>Ref</th><th>Runner</th>\
         <th>Calls</th><th>Endpoints</th><th title=\"new endpoints the baseline learned from the run\">Learned</th><th>Anomalies</th>\
         <th title=\"destinations block mode refused\">Blocked</th></tr>",
    );
    for (b, r) in runs.into_iter().take(MAX_LISTED_RUNS) {
        let ns = b.namespace().unwrap_or_default();
        let runner = r.runner.clone().unwrap_or_default();
        let class = match (r.anomaly_count, r.blocked) {
            (0, 0) => "",
            (0, _) => " class=\"blocked\"",
            _ => " class=\"anomalous\"",
        };
        let _ = write!(
            body,
            "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/jobs/{}/{}\">{}</a></td>\
             <td><a href=\"/runs/{}/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(&r.time, now),
            esc(&b.spec.repository),
            esc(&b.spec.workflow),
            segment(&ns),
            segment(&b.name_any()),
            esc(&b.spec.job),
            segment(&ns),
            segment(&record_name(&r.run_id, &runner)),
            esc(&r.run_id),
            esc(r.git_ref.as_deref().unwrap_or("")),
            esc(&runner),
            r.calls,
            r.endpoints,
            r.new_endpoints,
            r.anomaly_count,
            r.blocked,
        );
    }
    body.push_str("</table>");
    if total == 0 {
        body.push_str("<p>No run yet: runs show here once the node agents merge them.</p>");
    }
    page("Recent runs", &body)
}

/// Who called: the process names, then the executables (`wget (/bin/busybox)`).
fn caller(e: &RunEndpoint) -> String {
    match (e.processes.is_empty(), e.executables.is_empty()) {
        (true, true) => "an unknown process".into(),
        (false, true) => e.processes.join(", "),
        (true, false) => e.executables.join(", "),
        (false, false) => format!("{} ({})", e.processes.join(", "), e.executables.join(", ")),
    }
}

fn verdict_class(v: RunVerdict) -> &'static str {
    match v {
        RunVerdict::Anomalous => "anomalous",
        RunVerdict::Blocked => "blocked",
        RunVerdict::New => "new",
        RunVerdict::Known | RunVerdict::Unscored => "",
    }
}

/// The `spec.approved` entry that approves `e`, as `kubectl patch` takes it.
fn approve_patch(ns: &str, baseline: &str, e: &RunEndpoint) -> String {
    let rule = crate::cli::approval(&destination(e)).ok();
    let value = serde_json::to_string(&rule).unwrap_or_default();
    format!(
        "kubectl -n {ns} patch workflowbaseline {baseline} --type=json \\\n  -p '[{{\"op\":\"add\",\"path\":\"/spec/approved/-\",\"value\":{value}}}]'"
    )
}

/// `/runs/NAMESPACE/NAME`.
pub fn run_page(run: &WorkflowRun, now: Timestamp) -> String {
    let s = &run.spec;
    let ns = run.namespace().unwrap_or_default();
    let mut body = String::new();
    let github = format!("https://github.com/{}/actions/runs/{}", s.repository, s.run_id);
    let _ = write!(
        body,
        "<dl><dt>Repository</dt><dd>{}</dd><dt>Workflow</dt><dd>{}</dd><dt>Job</dt><dd><a href=\"/jobs/{}/{}\">{}</a> \
         (baseline {})</dd><dt>Run</dt><dd><a href=\"{}\" rel=\"noreferrer\">{}</a> on GitHub</dd>",
        esc(&s.repository),
        esc(&s.workflow),
        segment(&ns),
        segment(&s.baseline),
        esc(&s.job),
        esc(&s.baseline),
        esc(&github),
        esc(&s.run_id),
    );
    if let Some(r) = &s.git_ref {
        let _ = write!(body, "<dt>Ref</dt><dd><code>{}</code></dd>", esc(r));
    }
    let _ = match &s.policy {
        Some(p) => {
            write!(body, "<dt>Policy</dt><dd><code>kubectl -n {} get egresspolicy {}</code></dd>", esc(&ns), esc(p))
        }
        None => write!(body, "<dt>Policy</dt><dd>none applied (anomalies reported at Medium and above)</dd>"),
    };
    let _ = write!(
        body,
        "<dt>Runner</dt><dd><code>kubectl -n {ns} get pod {runner}</code>{er} on node {node}</dd>\
         <dt>Finished</dt><dd>{finished}</dd><dt>Calls</dt><dd>{calls} to {endpoints} endpoints: {new} new, {anomalies} anomalous{blocked}{dropped}</dd></dl>",
        ns = esc(&ns),
        runner = esc(&s.runner),
        er = s
            .ephemeral_runner
            .as_ref()
            .map(|e| format!(", <code>kubectl -n {} get ephemeralrunner {}</code>", esc(&ns), esc(e)))
            .unwrap_or_default(),
        node = esc(&s.node),
        finished = when(&s.finished, now),
        calls = s.calls,
        endpoints = s.endpoint_count,
        new = s.new_endpoint_count,
        anomalies = s.anomaly_count,
        blocked = if s.blocked_count > 0 {
            format!("; {} destinations refused in block mode", s.blocked_count)
        } else {
            String::new()
        },
        dropped =
            if s.dropped_endpoints > 0 { format!(" ({} not listed)", s.dropped_endpoints) } else { String::new() },
    );
    let anomalies: Vec<&RunEndpoint> = s.endpoints.iter().filter(|e| e.verdict == RunVerdict::Anomalous).collect();
    if !anomalies.is_empty() {
        body.push_str("<h2>Anomalies</h2>");
        for e in anomalies {
            let severity = e.severity.map(|v| format!("{v:?}")).unwrap_or_default();
            let _ = write!(
                body,
                "<h3 class=\"anomaly\"><span class=\"sev-{sev}\">{sev}</span> {dest}{score}</h3><p>Called by {who}.</p><ul>",
                sev = esc(&severity),
                dest = esc(&destination(e)),
                score = e.score.map(|s| format!(" <span class=\"muted\">score {s:.2}</span>")).unwrap_or_default(),
                who = esc(&caller(e)),
            );
            for reason in &e.reasons {
                let _ = write!(body, "<li>{}</li>", esc(reason));
            }
            let _ = write!(
                body,
                "</ul><p>If it is expected, approve it for this job (it stops alerting):</p><pre class=\"approve\">kubectl runwarden approve -n {} {} {}\n\n{}</pre>",
                esc(&ns),
                esc(&s.baseline),
                esc(&destination(e)),
                esc(&approve_patch(&ns, &s.baseline, e)),
            );
        }
    }
    let refused: Vec<&RunEndpoint> = s.endpoints.iter().filter(|e| e.verdict == RunVerdict::Blocked).collect();
    if !refused.is_empty() {
        body.push_str("<h2>Refused in block mode</h2><p>These calls did not happen, and the baseline does not learn them.</p><ul>");
        for e in refused {
            let _ = write!(
                body,
                "<li><b>{}</b> by {}, {} attempts: {}</li>",
                esc(&destination(e)),
                esc(&caller(e)),
                e.calls,
                esc(&e.reasons.join("; ")),
            );
        }
        body.push_str("</ul>");
    }
    body.push_str(
        "<h2>Destinations</h2><table><tr><th>Verdict</th><th>Severity</th><th>Destination</th><th>Address</th>\
         <th>Calls</th><th>Process</th><th>First</th><th>Last</th></tr>",
    );
    for e in &s.endpoints {
        let class = verdict_class(e.verdict);
        let _ = write!(
            body,
            "<tr class=\"{class}\"><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.verdict,
            esc(&e.severity.map(|v| format!("{v:?}")).unwrap_or_default()),
            esc(&destination(e)),
            esc(&e.address),
            e.calls,
            esc(&e.executables.iter().chain(&e.processes).cloned().collect::<Vec<_>>().join(", ")),
            when(&e.first_seen, now),
            when(&e.last_seen, now),
        );
    }
    body.push_str("</table>");
    page(&format!("Run {} of {} / {}", s.run_id, s.repository, s.job), &body)
}

fn endpoint_target(e: &LearnedEndpoint) -> String {
    let target = e
        .host
        .clone()
        .or_else(|| e.pattern.as_ref().map(|p| format!("{p} (rotating family, {} names)", e.members)))
        .or_else(|| e.cidr.clone())
        .unwrap_or_default();
    format!("{target}:{}/{}", e.port, crate::cli::protocol_name(e.protocol))
}

/// How many new endpoints each recent run brought, as bars (an inline SVG).
fn churn_chart(new_per_run: &[u32]) -> String {
    if new_per_run.is_empty() {
        return String::new();
    }
    let top = new_per_run.iter().copied().max().unwrap_or(0).max(1);
    let mut svg = format!(
        "<svg class=\"churn\" width=\"{}\" height=\"60\" role=\"img\" aria-label=\"new endpoints per run\">",
        new_per_run.len() * 14
    );
    for (i, n) in new_per_run.iter().enumerate() {
        let h = 2 + 54 * n / top;
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"{h}\" fill=\"{}\"><title>{n} new</title></rect>",
            i * 14,
            58 - h,
            if *n == 0 { "#9c9" } else { "#e96" }
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `/jobs/NAMESPACE/BASELINE`.
pub fn job_page(b: &WorkflowBaseline, now: Timestamp) -> String {
    let ns = b.namespace().unwrap_or_default();
    let status = b.status.clone().unwrap_or_default();
    let mut body = String::new();
    let settled = status.conditions.iter().find(|c| c.r#type == "Settled");
    let _ = write!(
        body,
        "<dl><dt>Repository</dt><dd>{}</dd><dt>Workflow</dt><dd>{}</dd><dt>Baseline</dt><dd><code>kubectl -n {} get wfb {}</code></dd>\
         <dt>Mode</dt><dd>{:?}</dd><dt>Phase</dt><dd>{}</dd><dt>Runs</dt><dd>{}</dd><dt>Settled</dt><dd>{}</dd></dl>",
        esc(&b.spec.repository),
        esc(&b.spec.workflow),
        esc(&ns),
        esc(&b.name_any()),
        b.spec.mode,
        esc(&status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into())),
        status.observed_runs,
        esc(&settled.map(|c| format!("{:?}: {}", c.status, c.message)).unwrap_or_else(|| "-".into())),
    );
    if !status.recent_new_endpoints.is_empty() {
        let _ = write!(
            body,
            "<h2>New endpoints per run</h2><p class=\"muted\">Oldest to newest; a baseline settles when runs stop bringing new ones.</p>{}",
            churn_chart(&status.recent_new_endpoints)
        );
    }
    body.push_str(
        "<h2>Endpoints</h2><table><tr><th>State</th><th>Endpoint</th><th>Runs</th><th>First seen</th><th>Last seen</th><th>Processes</th></tr>",
    );
    let mut endpoints: Vec<&LearnedEndpoint> = status.endpoints.iter().collect();
    endpoints.sort_by_key(|e| (e.state != EndpointState::Anomalous, e.state != EndpointState::Approved));
    for e in endpoints {
        let class = if e.state == EndpointState::Anomalous { " class=\"anomalous\"" } else { "" };
        let seen = |run: &Option<String>, time: &Option<Time>| match (run, time) {
            (Some(r), Some(t)) => format!("run {} ({})", esc(r), when(t, now)),
            (Some(r), None) => format!("run {}", esc(r)),
            (None, Some(t)) => when(t, now),
            (None, None) => "-".into(),
        };
        let _ = write!(
            body,
            "<tr{class}><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.state,
            esc(&endpoint_target(e)),
            e.runs_seen,
            seen(&e.first_seen_run, &e.first_seen_time),
            seen(&e.last_seen_run, &e.last_seen_time),
            esc(&e.processes.join(", ")),
        );
    }
    body.push_str("</table><h2>Recent runs</h2><table><tr><th>Finished</th><th>Run</th><th>Calls</th><th>Learned</th><th>Anomalies</th><th>Blocked</th></tr>");
    let mut runs: Vec<_> = status.recent_runs.iter().collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.time.0));
    for r in runs {
        let runner = r.runner.clone().unwrap_or_default();
        let _ = write!(
            body,
            "<tr><td>{}</td><td><a href=\"/runs/{}/{}\">{}</a> {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(&r.time, now),
            segment(&ns),
            segment(&record_name(&r.run_id, &runner)),
            esc(&r.run_id),
            esc(&runner),
            r.calls,
            r.new_endpoints,
            r.anomaly_count,
            r.blocked,
        );
    }
    body.push_str("</table>");
    page(&format!("{} / {}", b.spec.repository, b.spec.job), &body)
}
