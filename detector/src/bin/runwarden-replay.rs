//! Replays a recorded history of runs through the detector, as the node agent would see them,
//! and writes one JSON line per reported call.
//!
//! `runwarden-replay [--input runs.jsonl] [--output alerts.jsonl] [--min-severity medium]`
//! (stdin and stdout when omitted).
//!
//! Input lines: `{workflow, repository, run, time, trigger, calls: [{host, ip, port, proto,
//! process}]}`, in time order. Each run is scored against what was learned from the runs
//! before it (every workflow's history, as in a cluster), then learned from.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::IpAddr;

use anyhow::{Context, bail};
use runwarden_detector::{Baseline, Call, Cluster, Config, Job, Proto, Run, Services, Severity};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct RunLine<'a> {
    #[serde(borrow)]
    workflow: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    repository: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    run: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    time: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    trigger: std::borrow::Cow<'a, str>,
    /// The git ref the workflow ran from, when the history has it.
    #[serde(borrow, default, rename = "ref")]
    git_ref: Option<std::borrow::Cow<'a, str>>,
    calls: Vec<CallLine<'a>>,
}

#[derive(Deserialize)]
struct CallLine<'a> {
    #[serde(borrow)]
    host: Option<std::borrow::Cow<'a, str>>,
    ip: Option<IpAddr>,
    port: u16,
    #[serde(borrow)]
    proto: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    process: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Serialize)]
struct Alert<'a> {
    workflow: &'a str,
    run: &'a str,
    host: Option<&'a str>,
    ip: Option<IpAddr>,
    port: u16,
    proto: Proto,
    process: Option<&'a str>,
    severity: Severity,
    score: f64,
    reasons: &'a [String],
}

/// Replays a recorded history of runs through the detector and writes one JSON line per call
/// reported at or above the minimum severity.
#[derive(clap::Parser, Debug)]
#[command(name = "runwarden-replay", version)]
struct Args {
    /// Runs, one JSON object per line, in time order (default: standard input).
    #[arg(long, short, value_name = "FILE")]
    input: Option<String>,
    /// Where the alerts go (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    output: Option<String>,
    /// Least severity written: info, low, medium, high or critical.
    #[arg(long, default_value = "medium", value_parser = severity)]
    min_severity: Severity,
    /// Print a completion script for SHELL and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
}

fn severity(text: &str) -> Result<Severity, String> {
    Severity::parse(text).ok_or_else(|| format!("{text:?}: use info, low, medium, high or critical"))
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if let Some(shell) = args.completions {
        let mut command = <Args as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "runwarden-replay", &mut std::io::stdout());
        return Ok(());
    }
    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(BufReader::new(std::fs::File::open(p).with_context(|| format!("opening {p}"))?)),
        None => Box::new(BufReader::new(std::io::stdin().lock())),
    };
    let output: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("creating {p}"))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(output);

    let config = Config { min_severity: args.min_severity, ..Config::default() };
    let mut baselines: HashMap<String, Baseline> = HashMap::new();
    let mut cluster = Cluster::default();
    let (mut runs, mut calls, mut alerts) = (0u64, 0u64, 0u64);

    for (n, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: RunLine = serde_json::from_str(&line).with_context(|| format!("line {}: not a run", n + 1))?;
        let time = parse_time(&r.time).with_context(|| format!("line {}: time {:?}", n + 1, r.time))?;
        let run = Run { id: &r.run, time, trigger: &r.trigger, git_ref: r.git_ref.as_deref() };
        let mut scored = Vec::with_capacity(r.calls.len());
        let baseline = baselines.entry(r.workflow.to_string()).or_default();
        {
            let job = Job {
                repository: &r.repository,
                baseline,
                config: &config,
                cluster: &cluster,
                services: Services::builtin(),
            };
            for c in &r.calls {
                let proto = match c.proto.as_ref() {
                    "tcp" | "TCP" => Proto::Tcp,
                    "udp" | "UDP" => Proto::Udp,
                    other => bail!("line {}: unknown proto {other:?}", n + 1),
                };
                let call =
                    Call { host: c.host.as_deref(), ip: c.ip, port: c.port, proto, process: c.process.as_deref() };
                let verdict = job.score(&run, &call);
                if let Some(v) = &verdict
                    && v.severity >= args.min_severity
                {
                    let alert = Alert {
                        workflow: &r.workflow,
                        run: &r.run,
                        host: call.host,
                        ip: call.ip,
                        port: call.port,
                        proto,
                        process: call.process,
                        severity: v.severity,
                        score: (v.score * 1000.0).round() / 1000.0,
                        reasons: &v.reasons,
                    };
                    serde_json::to_writer(&mut out, &alert)?;
                    out.write_all(b"\n")?;
                    alerts += 1;
                }
                scored.push((call, verdict));
            }
        }
        let learned = baseline.learn(&config, &run, &scored);
        cluster.apply(&r.repository, &learned);
        runs += 1;
        calls += r.calls.len() as u64;
    }
    out.flush()?;
    eprintln!("runwarden-replay: {runs} runs, {calls} calls, {alerts} alerts at {:?} or above", args.min_severity);
    Ok(())
}

/// Parses an RFC 3339 time (`2026-01-05T03:25:41Z`) into Unix seconds.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    let t: jiff::Timestamp =
        s.parse().with_context(|| "expected an RFC 3339 time like 2026-01-05T03:25:41Z".to_string())?;
    Ok(t.as_second())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_parse_to_unix_seconds() {
        assert_eq!(super::parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(super::parse_time("2026-01-05T03:25:41Z").unwrap(), 1_767_583_541);
        assert_eq!(super::parse_time("2026-01-05T04:25:41.250+01:00").unwrap(), 1_767_583_541);
        assert!(super::parse_time("yesterday").is_err());
    }

    #[test]
    fn non_ascii_times_are_an_error_not_a_panic() {
        for t in ["2026-01-05T03:25:4\u{e9}Z", "2026-01-05T03:2\u{e9}:41Z", "\u{e9}\u{e9}\u{e9}\u{e9}-01-05T03:25:41Z"]
        {
            assert!(super::parse_time(t).is_err(), "{t}");
        }
    }
}
