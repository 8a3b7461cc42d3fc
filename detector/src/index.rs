//! What scoring derives from a baseline, built once per baseline version: the job's hosts by
//! registrable domain and by rotating shape, and its domains prepared for lookalike checks.
//! Without it, scoring a call the job never made walked every endpoint of the baseline several
//! times (public-suffix lookups, shapes, lookalike strings): tens of microseconds per call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use crate::host::{self, Lookalikes};
use crate::model::Baseline;

/// Indexes of one baseline's normal (learned or approved) named hosts.
#[derive(Debug, Default)]
pub struct BaselineIndex {
    /// Registrable domain → how many of the job's normal hosts are under it.
    domains: HashMap<String, u32>,
    /// Rotating shape → up to two normal hosts of that shape.
    shapes: HashMap<String, Vec<String>>,
    /// The registrable domains of the job's normal hosts, for lookalike checks.
    pub lookalikes: Lookalikes,
}

impl BaselineIndex {
    /// Builds the index of `b`.
    pub fn build(b: &Baseline) -> Self {
        let mut index = BaselineIndex::default();
        let mut domains = Vec::new();
        for (h, list) in &b.hosts {
            if h.parse::<IpAddr>().is_ok() || !list.iter().any(|e| e.state.is_normal()) {
                continue;
            }
            let domain = host::registrable_domain(h);
            *index.domains.entry(domain.to_string()).or_default() += 1;
            domains.push(domain);
            if let Some(shape) = host::rotating_shape(h) {
                let hosts = index.shapes.entry(shape).or_default();
                if hosts.len() < 2 {
                    hosts.push(h.clone());
                }
            }
        }
        index.lookalikes = Lookalikes::new(domains);
        index
    }

    /// How many of the job's normal hosts are under registrable domain `domain`.
    pub fn hosts_under(&self, domain: &str) -> u32 {
        self.domains.get(domain).copied().unwrap_or(0)
    }

    /// A normal host of the job with rotating shape `shape`, other than `not`.
    pub fn sibling(&self, shape: &str, not: &str) -> Option<&str> {
        self.shapes.get(shape)?.iter().map(String::as_str).find(|h| *h != not)
    }
}

/// A baseline's [`BaselineIndex`], built on first use. Not part of the baseline's value: a
/// clone starts empty, and every baseline compares equal here. [`Baseline::learn`] and
/// [`Baseline::refresh`] clear it; code that edits a baseline's fields by hand after scoring
/// with it calls [`IndexCell::clear`].
#[derive(Default)]
pub struct IndexCell(OnceLock<BaselineIndex>);

impl IndexCell {
    /// The index of `b`, built now if it is not yet.
    pub fn get(&self, b: &Baseline) -> &BaselineIndex {
        self.0.get_or_init(|| BaselineIndex::build(b))
    }

    /// Forgets the index (the baseline changed).
    pub fn clear(&mut self) {
        self.0 = OnceLock::new();
    }
}

impl Clone for IndexCell {
    fn clone(&self) -> Self {
        IndexCell::default()
    }
}

impl PartialEq for IndexCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for IndexCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "IndexCell(built)" } else { "IndexCell(empty)" })
    }
}
