//! Scoring a call against its job's baseline and the cluster.
//!
//! A call that is learned, approved or of a learned rotating family is normal (`None`); one that
//! is unconfirmed (new to every job of the cluster, not yet recurred in enough runs) is not. Any other
//! call gets points for and against suspicion, each with a reason a person can read; the sum
//! maps to a score in [0, 1] by a logistic curve, and the score to a severity. More suspicious
//! evidence never lowers the severity:
//!
//! | evidence | points |
//! | --- | --- |
//! | first call to a host by this job / a known host on a new port / a bare address | +2 / +1 / +3 |
//! | cloud metadata address | +6 |
//! | a label that looks like encoded data (DNS tunnelling) | +3 |
//! | a lookalike of a domain this job or many jobs use / its name under another suffix | +3 / +1 |
//! | a non-standard port | +1.5 |
//! | a registrable domain no job in the cluster has called | +1 |
//! | reported before and not approved | keeps its points: it is reported again |
//! | used by other jobs of the same repository / by 3+ jobs / by 1-2 jobs | -2.5 / -2.5 / -1.5 |
//! | a rotating family other jobs learned / a sibling of a host this job calls | -2 / -1 |
//! | a subdomain of a domain this job calls / of a domain other jobs call | -1 / -0.5 |
//! | the run's trigger is one this job has rarely run under (trusted runs only) | -1 |
//! | the baseline is young (fewer than `minRuns` runs) / churning (trusted runs only) | -2 / up to -1.5 |
//! | unconfirmed: called in earlier runs of this job, not yet in `confirmRuns` runs | -1 a run, up to -2 |
//! | no job of the cluster knows it (nor its domain or family) | at least `low`, whatever the discounts |
//! | an abused service (`detector/services/`: paste host, tunnel, mining pool, ...) | at least `high`, whatever the discounts |

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::host::{self, Resemblance};
use crate::model::{Baseline, Call, Config, Mode, Run, State};
use crate::services::Services;

/// How suspicious a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Recorded, not worth attention.
    Info,
    /// Unusual, most likely benign.
    Low,
    /// New and unexplained.
    Medium,
    /// New with signs of abuse.
    High,
    /// Strong signs of an attack.
    Critical,
}

impl Severity {
    /// The severity of a score in [0, 1].
    pub fn from_score(score: f64) -> Self {
        [Severity::Critical, Severity::High, Severity::Medium, Severity::Low]
            .into_iter()
            .find(|s| score >= s.lowest_score())
            .unwrap_or(Severity::Info)
    }

    /// The least score with this severity.
    pub fn lowest_score(self) -> f64 {
        match self {
            Severity::Critical => 0.9,
            Severity::High => 0.75,
            Severity::Medium => 0.5,
            Severity::Low => 0.3,
            Severity::Info => 0.0,
        }
    }

    /// Parses `info`, `low`, `medium`, `high` or `critical` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "info" => Severity::Info,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }
}

/// The judgement of one call that is not in the baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Severity, from the score.
    pub severity: Severity,
    /// Suspicion in [0, 1].
    pub score: f64,
    /// Why, one short sentence each, strongest first.
    pub reasons: Vec<String>,
    /// No job of the cluster knows the destination, its domain or its family: if it is not an
    /// anomaly, the baseline records it as unconfirmed instead of learning it.
    #[serde(default)]
    pub unfamiliar: bool,
}

/// Points at which the score is 0.5 (the boundary of `Medium`).
const MIDPOINT: f64 = 2.5;
/// Points of a first call to a new host.
const NEW_HOST: f64 = 2.0;

/// A job's baseline with what scoring needs around it.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    /// The job's repository (`owner/name`).
    pub repository: &'a str,
    /// Its baseline.
    pub baseline: &'a Baseline,
    /// Its configuration.
    pub config: &'a Config,
    /// The cluster's other baselines.
    pub cluster: &'a Cluster,
    /// Abused services: [`Services::builtin`], or as the job's policy extends it.
    pub services: &'a Services,
}

struct Evidence {
    points: f64,
    reasons: Vec<(f64, String)>,
    /// Whether the job or the cluster knows the host, its domain or its rotating family.
    familiar: bool,
}

impl Evidence {
    fn add(&mut self, points: f64, reason: String) {
        self.points += points;
        self.reasons.push((points, reason));
    }
}

impl Job<'_> {
    /// Scores `call` of `run`. `None`: the call is normal for this job (learned, approved, or of
    /// a learned rotating family). `Some`: a verdict at any severity; the caller reports it when
    /// it reaches the configured minimum.
    pub fn score(&self, run: &Run<'_>, call: &Call<'_>) -> Option<Verdict> {
        let target = call.target()?;
        let b = self.baseline;
        let trusted = run.is_trusted(self.config);
        let known_here = b.hosts.get(target.as_ref());
        let endpoint = known_here.and_then(|l| l.iter().find(|e| e.port == call.port && e.proto == call.proto));
        if let Some(e) = endpoint
            && e.is_normal_for(trusted)
        {
            return None;
        }
        if b.pattern(&target, call.port, call.proto).is_some() {
            return None;
        }
        if self.config.approved.iter().any(|r| r.matches(call)) {
            return None;
        }
        if self.config.mode == Mode::Learning {
            return Some(Verdict {
                severity: Severity::Info,
                score: 0.0,
                reasons: vec!["baseline is in Learning mode".into()],
                unfamiliar: false,
            });
        }

        let mut ev = Evidence { points: 0.0, reasons: Vec::new(), familiar: false };
        let host_known = known_here.is_some_and(|l| l.iter().any(|e| e.is_normal_for(trusted)));
        match (call.host, call.ip) {
            (_, Some(ip)) if host::is_metadata_address(ip) => {
                ev.add(6.0, format!("{ip} is a cloud metadata address (credential theft)"));
                ev.add(NEW_HOST, "called by address, with no DNS name".into());
            }
            (None, Some(ip)) => ev.add(3.0, format!("{ip} called by address, with no DNS answer")),
            (Some(h), _) if host_known => ev.add(1.0, format!("{h} is known to this job, port {} is not", call.port)),
            (Some(h), _) if endpoint.is_some() => ev.add(NEW_HOST, format!("{h} is not in this job's baseline")),
            (Some(h), _) => ev.add(NEW_HOST, format!("first call to {h} by this job")),
            (None, None) => return None,
        }
        match endpoint {
            // Recurrence is what confirms an endpoint: each earlier run that called it lowers
            // suspicion a little (the floor for what no job knows stays Low).
            Some(e) if e.state == State::Unconfirmed => ev.add(
                -f64::from(e.runs_seen.min(2)),
                format!(
                    "called in {} earlier run(s) of this job since run {}, not yet confirmed ({} runs needed)",
                    e.runs_seen, e.first_run, self.config.confirm_runs
                ),
            ),
            Some(e) if e.state == State::Untrusted && trusted => ev.add(
                0.0,
                format!(
                    "called before only by runs of untrusted refs (since run {}): new to this trusted run",
                    e.first_run
                ),
            ),
            Some(e) => ev.add(0.0, format!("reported first in run {} and not approved", e.first_run)),
            None => {}
        }
        if !host::is_standard_port(call.port) {
            ev.add(1.5, format!("non-standard port {}", call.port));
        }

        if let Some(h) = call.host {
            self.host_evidence(h, host_known, &mut ev);
        } else if let Some(ip) = call.ip {
            self.address_evidence(ip, &mut ev);
        }

        // A run of an untrusted ref (a pull request) gets no benefit of the doubt: a young
        // baseline, a rare trigger or churn excuse nothing it calls.
        if !trusted {
            let from = run.git_ref.unwrap_or(run.trigger);
            ev.add(0.0, format!("a run of an untrusted ref ({from}): no allowance for a young or changing baseline"));
        }
        if trusted && self.config.mode == Mode::Auto && b.runs < self.config.min_runs {
            ev.add(-2.0, format!("baseline still learning ({} of {} runs)", b.runs, self.config.min_runs));
        }
        // Context that excuses novelty in a grown baseline (a rare trigger, churn) only applies
        // to destinations the cluster knows something about: a host no job has ever called gets
        // no benefit of the doubt.
        if trusted && self.config.mode != Mode::Frozen && ev.familiar {
            let trigger_runs = b.triggers.get(run.trigger).copied().unwrap_or(0);
            if b.runs > 0 && trigger_runs < 2 {
                ev.add(-1.0, format!("one of this job's first {} runs: new endpoints are expected", run.trigger));
            }
            let churn = b.churn();
            if self.config.mode == Mode::Auto && b.runs >= self.config.min_runs && churn >= 0.2 {
                let why =
                    format!("baseline still changing ({:.0}% of recent runs brought something new)", churn * 100.0);
                ev.add(-1.5 * churn, why);
            }
        }

        let mut score = 1.0 / (1.0 + (-(ev.points - MIDPOINT)).exp());
        let mut severity = Severity::from_score(score);
        // Services attackers use because they look ordinary: what other jobs do, or what the
        // job's other hosts are, does not excuse a call the job never learned.
        if let Some((domain, category)) = call.host.and_then(|h| self.services.find(h)) {
            ev.reasons.push((f64::INFINITY, format!("{domain} is {}", category.describe())));
            if severity < Severity::High {
                ev.reasons.push((0.0, "an abused service this job has not learned: at least high".into()));
                severity = Severity::High;
                score = score.max(Severity::High.lowest_score());
            }
        }
        // Something no job of the cluster knows is never just information, however young the
        // baseline: it is recorded and shown (and not learned until it recurs).
        let unfamiliar = !ev.familiar;
        if unfamiliar && severity < Severity::Low {
            ev.reasons.push((0.0, "no job in this cluster knows it: at least low".into()));
            severity = Severity::Low;
            score = score.max(Severity::Low.lowest_score());
        }
        // A frozen baseline reports everything new.
        if self.config.mode == Mode::Frozen && severity < self.config.min_severity {
            ev.reasons.push((0.0, "the baseline is frozen: anything new is reported".into()));
            severity = self.config.min_severity;
            score = score.max(severity.lowest_score());
        }
        // An anomaly keeps being reported at least as severely as it first was, until approved
        // (what runs of untrusted refs were reported for, a trusted run judges afresh).
        if let Some(first) = endpoint.filter(|e| !(e.state == State::Untrusted && trusted)).and_then(|e| e.severity)
            && first > severity
        {
            severity = first;
            score = score.max(first.lowest_score());
        }
        // Strongest reasons first: what raised suspicion most, then what lowered it most.
        ev.reasons.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()));
        let reasons = ev.reasons.into_iter().map(|(_, r)| r).collect();
        Some(Verdict { severity, score, reasons, unfamiliar })
    }

    fn host_evidence(&self, h: &str, host_known: bool, ev: &mut Evidence) {
        let b = self.baseline;
        let cluster = self.cluster;
        if let Some(label) = host::tunnel_label(h) {
            ev.add(3.0, format!("label '{label}' looks like encoded data (DNS tunnelling)"));
        }

        let prevalence = cluster.prevalence(self.repository, h);
        let own = u32::from(host_known);
        let same_repo = prevalence.same_repository.saturating_sub(own);
        let elsewhere = prevalence.cluster.saturating_sub(own);
        ev.familiar |= host_known || prevalence.cluster > 0;
        if same_repo > 0 {
            ev.add(-2.5, format!("called by {same_repo} other job(s) of {}", self.repository));
        } else if elsewhere >= 3 {
            ev.add(-2.5, format!("called by {elsewhere} jobs in this cluster"));
        } else if elsewhere > 0 {
            ev.add(-1.5, format!("called by {elsewhere} other job(s) in this cluster"));
        }

        let index = b.index();
        if let Some(shape) = host::rotating_shape(h) {
            let jobs = cluster.shape_uses(&shape);
            if jobs > 0 {
                ev.familiar = true;
                ev.add(-2.0, format!("a rotating name {shape} that {jobs} job(s) call"));
            } else if let Some(sibling) = index.sibling(&shape, h) {
                ev.familiar = true;
                ev.add(-1.0, format!("a sibling of {sibling}, which this job calls"));
            }
        }

        let domain = host::registrable_domain(h);
        // Only what the job learned or a person approved vouches for a domain: an unconfirmed or
        // anomalous host must not make its own subdomains familiar.
        let h_normal = b.hosts.get(h).is_some_and(|l| l.iter().any(|e| e.state.is_normal()));
        let job_uses_domain = domain != h && index.hosts_under(domain) > u32::from(h_normal);
        if job_uses_domain {
            ev.familiar = true;
            ev.add(-1.0, format!("under {domain}, which this job already calls"));
        } else if cluster.domain_uses(domain) > 0 {
            ev.familiar = true;
            ev.add(-0.5, format!("under {domain}, which other jobs call"));
        } else {
            ev.add(1.0, format!("{domain}: no job in this cluster has called this domain"));
        }

        // A lookalike is a domain nobody here uses that resembles one people here use
        // (organisations own several spellings of their names: docker.com and docker.io).
        if !job_uses_domain && cluster.domain_uses(domain) == 0 {
            match self.imitated(domain) {
                Some((original, Resemblance::Imitation)) => ev.add(3.0, format!("{domain} looks like {original}")),
                Some((original, Resemblance::OtherSuffix)) => ev.add(
                    1.0,
                    format!("{domain} is the name of {original} under another suffix (owners often hold both; squatters too)"),
                ),
                None => {}
            }
        }
    }

    /// A domain this job, or many jobs, call that `domain` resembles, and how (an imitation
    /// before the same name under another suffix).
    fn imitated(&self, domain: &str) -> Option<(String, Resemblance)> {
        // Members of one rotating family (`sa3`, `sa17`) resemble each other by design.
        let family = host::rotating_shape(domain);
        let skip = |known: &str| family.is_some() && host::rotating_shape(known) == family;
        // What the job learned or a person approved (not what is itself unconfirmed or anomalous).
        let mine = self.baseline.index().lookalikes.find(domain, skip);
        let found = match mine {
            Some((_, Resemblance::Imitation)) => mine,
            _ => match self.cluster.popular().find(domain, skip) {
                Some(p) if mine.is_none_or(|(_, r)| p.1 > r) => Some(p),
                _ => mine,
            },
        };
        found.map(|(known, r)| (known.to_string(), r))
    }

    fn address_evidence(&self, ip: IpAddr, ev: &mut Evidence) {
        let text = ip.to_string();
        let p = self.cluster.prevalence(self.repository, &text);
        ev.familiar |= p.cluster > 0;
        if p.same_repository > 0 {
            ev.add(-2.5, format!("called by {} other job(s) of {}", p.same_repository, self.repository));
        } else if p.cluster >= 3 {
            ev.add(-2.5, format!("called by {} jobs in this cluster", p.cluster));
        }
    }
}
