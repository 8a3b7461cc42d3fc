//! What the whole cluster's baselines know: which workflows learned a host, a registrable
//! domain or a rotating-host family. A host that other jobs (above all, other workflows of the
//! same repository) call routinely is much less suspicious than one no job has ever called.
//!
//! Only learned endpoints count: an anomaly reported in many jobs does not become normal.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::host::{self, Lookalikes};

/// Prevalence of hosts, domains and rotating shapes across the cluster's baselines.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Host (or address) → repository → number of that repository's workflow jobs that learned it.
    hosts: HashMap<String, HashMap<String, u32>>,
    /// Registrable domain → number of (job, host) pairs under it.
    domains: HashMap<String, u32>,
    /// Rotating shape → number of jobs with that pattern.
    shapes: HashMap<String, u32>,
    /// The popular domains prepared for lookalike checks, built on first use after a change.
    popular: OnceLock<Lookalikes>,
}

/// (Job, host) pairs under a registrable domain that make it worth imitating.
const POPULAR: u32 = 5;

/// How common a host is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prevalence {
    /// Jobs of the same repository that learned it.
    pub same_repository: u32,
    /// Jobs anywhere that learned it.
    pub cluster: u32,
}

impl Cluster {
    /// Records that a job of `repository` learned `host`.
    pub fn add_host(&mut self, repository: &str, host: &str) {
        self.popular = OnceLock::new();
        *self.hosts.entry(host.to_string()).or_default().entry(repository.to_string()).or_default() += 1;
        *self.domains.entry(host::registrable_domain(host).to_string()).or_default() += 1;
    }

    /// Records that a job of `repository` no longer has `host`.
    pub fn remove_host(&mut self, repository: &str, host: &str) {
        self.popular = OnceLock::new();
        if let Some(repos) = self.hosts.get_mut(host) {
            if let Some(n) = repos.get_mut(repository) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    repos.remove(repository);
                }
            }
            if repos.is_empty() {
                self.hosts.remove(host);
            }
        }
        let domain = host::registrable_domain(host);
        if let Some(n) = self.domains.get_mut(domain) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.domains.remove(domain);
            }
        }
    }

    /// Records that a job learned the rotating family `shape`.
    pub fn add_shape(&mut self, shape: &str) {
        *self.shapes.entry(shape.to_string()).or_default() += 1;
    }

    /// Applies what a job's run changed ([`crate::Learned`]).
    pub fn apply(&mut self, repository: &str, learned: &crate::Learned) {
        for h in &learned.new_hosts {
            self.add_host(repository, h);
        }
        for h in &learned.removed_hosts {
            self.remove_host(repository, h);
        }
        for s in &learned.new_patterns {
            self.add_shape(s);
        }
    }

    /// How many jobs learned `host`, in `repository` and in all.
    pub fn prevalence(&self, repository: &str, host: &str) -> Prevalence {
        match self.hosts.get(host) {
            Some(repos) => Prevalence {
                same_repository: repos.get(repository).copied().unwrap_or(0),
                cluster: repos.values().sum(),
            },
            None => Prevalence::default(),
        }
    }

    /// How many (job, host) pairs fall under registrable domain `domain`.
    pub fn domain_uses(&self, domain: &str) -> u32 {
        self.domains.get(domain).copied().unwrap_or(0)
    }

    /// How many jobs learned the rotating family `shape`.
    pub fn shape_uses(&self, shape: &str) -> u32 {
        self.shapes.get(shape).copied().unwrap_or(0)
    }

    /// Registrable domains used by at least five (job, host) pairs, the names worth imitating,
    /// prepared for lookalike checks.
    pub fn popular(&self) -> &Lookalikes {
        self.popular.get_or_init(|| {
            let mut popular: Vec<&str> =
                self.domains.iter().filter(|(_, n)| **n >= POPULAR).map(|(d, _)| d.as_str()).collect();
            // In a stable order, so that which of two lookalike originals is named does not vary.
            popular.sort_unstable();
            Lookalikes::new(popular)
        })
    }
}
