//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles. A replica becomes leader when the Lease is free or its holder stopped
//! renewing it for `LEASE_DURATION`; the leader renews it every `RENEW_EVERY`; a leader that
//! cannot renew in time stops (and its Pod is restarted), and a leader that shuts down
//! gracefully releases the Lease so another replica takes over at once.
//!
//! Writes go through `resourceVersion` preconditions: two replicas can never both believe they
//! acquired the same term. Expiry is judged on this replica's own monotonic clock, never by
//! comparing its wall clock with the holder's `renewTime` (clocks of two nodes differ): a Lease
//! is expired when this replica has seen no change to it for `LEASE_DURATION`, as client-go's
//! leader election does. Every request has a deadline, so a hung request cannot keep a leader
//! that can no longer renew acting as one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::Result;

/// A leader that has not renewed for this long is replaced.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How often the leader renews, and how often others try to take over.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

/// Longest wait for one request to the API server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One replica's view of the Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The Lease's `resourceVersion` as last seen, and when (this replica's monotonic clock).
    observed: Arc<Mutex<Option<(String, tokio::time::Instant)>>>,
}

impl Elector {
    /// An elector for Lease `name` in `namespace`, as replica `identity` (its Pod name).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            observed: Arc::default(),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<()> {
        let mut waiting_logged = false;
        loop {
            if self.try_acquire_or_renew().await? {
                info!(lease = %self.name, identity = %self.identity, "became leader");
                return Ok(());
            }
            if !waiting_logged {
                info!(lease = %self.name, identity = %self.identity, "another replica leads; standing by");
                waiting_logged = true;
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews the Lease until a renewal fails for longer than the lease lasts (another replica
    /// took over, or the API server is unreachable or hangs): then returns, and this replica
    /// must stop. It returns before the Lease could have expired for the others, however long
    /// a request takes.
    pub async fn keep(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            // Stop before the lease could have expired, so two leaders never overlap.
            let deadline = last_renewed + (LEASE_DURATION - RENEW_EVERY);
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, identity = %self.identity, "lost the Lease to another replica");
                    return;
                }
                Ok(Err(e)) => warn!(lease = %self.name, error = %e, "renewing the Lease failed"),
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(lease = %self.name, "could not renew the Lease in time; stepping down");
                return;
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown), so another replica need not wait for it to
    /// expire.
    pub async fn release(&self) {
        if let Ok(Ok(Some(mut lease))) = tokio::time::timeout(REQUEST_TIMEOUT, self.api.get_opt(&self.name)).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let params = PostParams::default();
                match tokio::time::timeout(REQUEST_TIMEOUT, self.api.replace(&self.name, &params, &lease)).await {
                    Ok(Ok(_)) => info!(lease = %self.name, "released the Lease"),
                    Ok(Err(e)) => warn!(lease = %self.name, error = %e, "could not release the Lease"),
                    Err(_) => warn!(lease = %self.name, "could not release the Lease: no answer in time"),
                }
            }
        }
    }

    /// One attempt: true when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let seconds = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = deadline(self.api.get_opt(&self.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match deadline(self.api.create(&PostParams::default(), &lease)).await {
                Ok(_) => Ok(true),
                Err(crate::Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        // When did this replica last see the Lease change? A holder that renews changes it.
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_since = {
            let mut observed = self.observed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match observed.as_ref() {
                Some((v, at)) if *v == version => *at,
                _ => {
                    let at = tokio::time::Instant::now();
                    *observed = Some((version, at));
                    at
                }
            }
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(seconds)).unwrap_or(0));
        let expired = seen_since.elapsed() > duration;
        if held && !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        match deadline(self.api.replace(&self.name, &PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            // Another replica wrote first: it leads this term.
            Err(crate::Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `request` with [`REQUEST_TIMEOUT`]; a request that takes longer is an error like an
/// unreachable API server.
async fn deadline<T>(request: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(crate::Error::Kube(kube::Error::Service(
            format!("no answer from the API server within {} s", REQUEST_TIMEOUT.as_secs()).into(),
        ))),
    }
}
