//! Merging a finished run into its job's `WorkflowBaseline`, safely when several writers (node
//! agents on different nodes, the operator) update the same object: read, merge, write back
//! with the `resourceVersion` read; on a conflict, read again and merge again. A run already
//! merged (same run id and runner) is not merged twice, so a retried write after a lost
//! answer does not count a run twice.

use kube::Api;
use kube::api::PostParams;
use runwarden_crds::WorkflowBaseline;
use runwarden_crds::baseline::{Anomaly, MAX_ANOMALIES_PER_RUN, MAX_REASONS, MAX_RECENT_RUNS, RunRecord};
use runwarden_detector::{Call, Learned, Run, Severity, Verdict};

use crate::{Error, api_severity, config, read, stored_run_id, time, write};

/// Attempts before a merge gives up on conflicts (each is one read and one write).
pub const MAX_ATTEMPTS: usize = 32;

/// A runner's finished run of a job, as the node agent hands it over.
#[derive(Clone, Copy, Debug)]
pub struct FinishedRun<'a> {
    /// Run id, time and trigger.
    pub run: Run<'a>,
    /// The runner (pod) that ran it.
    pub runner: &'a str,
    /// Each distinct call with the verdict it got while the run was going.
    pub calls: &'a [(Call<'a>, Option<Verdict>)],
    /// Calls made in all, repeats included.
    pub total_calls: u32,
    /// When the run ended, Unix seconds (`run.time` is when it started).
    pub finished: i64,
    /// Destinations block mode refused the run: counted, never learned (they are not in
    /// `calls`).
    pub blocked: u32,
}

/// Why a merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The baseline's spec or status could not be read into the model.
    #[error(transparent)]
    Model(#[from] Error),
    /// Other writers kept winning.
    #[error("WorkflowBaseline {0}: still conflicting after {MAX_ATTEMPTS} attempts")]
    TooManyConflicts(String),
}

/// Merges `finished` into the `WorkflowBaseline` `name`, reporting at `min_severity`. Returns
/// what the run changed, or `None` when it had been merged before.
pub async fn merge_run(
    api: &Api<WorkflowBaseline>,
    name: &str,
    min_severity: Severity,
    finished: &FinishedRun<'_>,
) -> Result<Option<Learned>, MergeError> {
    for _ in 0..MAX_ATTEMPTS {
        let mut obj = api.get_status(name).await?;
        let mut status = obj.status.take().unwrap_or_default();
        // Compared as stored: `recentRuns` keeps bounded ids.
        let (run_id, runner) = (stored_run_id(finished.run.id), stored_runner(finished.runner));
        let already =
            status.recent_runs.iter().any(|r| r.run_id == run_id && r.runner.as_deref() == Some(runner.as_str()));
        if already {
            return Ok(None);
        }
        let config = config(&obj.spec, min_severity)?;
        let mut model = read(&status)?;
        let learned = model.learn(&config, &finished.run, finished.calls);
        write(&model, &config, &mut status);
        status.recent_runs.push(record(finished, &learned, min_severity));
        let excess = status.recent_runs.len().saturating_sub(MAX_RECENT_RUNS);
        status.recent_runs.drain(..excess);
        let finished_at = time(finished.finished);
        if status.last_run_time.as_ref().is_none_or(|t| t.0 < finished_at.0) {
            status.last_run_time = Some(finished_at);
        }
        obj.status = Some(status);
        match api.replace_status(name, &PostParams::default(), &obj).await {
            Ok(_) => return Ok(Some(learned)),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(MergeError::TooManyConflicts(name.to_string()))
}

/// The run's summary for `recentRuns`: counts and its most severe reported calls.
fn record(finished: &FinishedRun<'_>, learned: &Learned, min_severity: Severity) -> RunRecord {
    let mut reported: Vec<(&Call<'_>, &Verdict)> = finished
        .calls
        .iter()
        .filter_map(|(c, v)| v.as_ref().filter(|v| v.severity >= min_severity).map(|v| (c, v)))
        .collect();
    reported.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
    let anomaly_count = reported.len() as u32;
    let anomalies = reported
        .into_iter()
        .take(MAX_ANOMALIES_PER_RUN)
        .map(|(c, v)| Anomaly {
            endpoint: endpoint_text(c),
            process: c.process.map(|p| p.chars().take(64).collect()),
            severity: api_severity(v.severity),
            score: (v.score * 1000.0).round() / 1000.0,
            reasons: v.reasons.iter().take(MAX_REASONS).map(|r| r.chars().take(160).collect()).collect(),
        })
        .collect();
    RunRecord {
        run_id: stored_run_id(finished.run.id),
        runner: Some(stored_runner(finished.runner)),
        time: time(finished.finished),
        trigger: Some(finished.run.trigger.chars().take(32).collect()),
        git_ref: finished.run.git_ref.map(|r| r.chars().take(255).collect()),
        calls: finished.total_calls,
        endpoints: finished.calls.len() as u32,
        new_endpoints: learned.new_endpoints,
        anomaly_count,
        blocked: finished.blocked,
        anomalies,
    }
}

/// A runner name as `recentRuns` stores it (at most 63 characters).
fn stored_runner(runner: &str) -> String {
    runner.chars().take(63).collect()
}

fn endpoint_text(c: &Call<'_>) -> String {
    let proto = match c.proto {
        runwarden_detector::Proto::Tcp => "TCP",
        runwarden_detector::Proto::Udp => "UDP",
    };
    let target = c.target().map(|t| t.into_owned()).unwrap_or_default();
    let mut text = format!("{target}:{}/{proto}", c.port);
    text.truncate(300);
    text
}
