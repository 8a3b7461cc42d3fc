//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles. A replica becomes leader when the Lease is free or its holder stopped
//! renewing it for `LEASE_DURATION`; the leader renews it every `RENEW_EVERY`; a leader that
//! cannot renew in time stops (and its Pod is restarted), and a leader that shuts down
//! gracefully releases the Lease so another replica takes over at once.
//!
//! Writes go through `resourceVersion` preconditions: two replicas can never both believe they
//! acquired the same term.

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

/// One replica's view of the Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    /// An elector for Lease `name` in `namespace`, as replica `identity` (its Pod name).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into() }
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
    /// took over, or the API server is unreachable): then returns, and this replica must stop.
    pub async fn keep(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, identity = %self.identity, "lost the Lease to another replica");
                    return;
                }
                Err(e) => warn!(lease = %self.name, error = %e, "renewing the Lease failed"),
            }
            // Stop before the lease could have expired, so two leaders never overlap.
            if last_renewed.elapsed() >= LEASE_DURATION - RENEW_EVERY {
                warn!(lease = %self.name, "could not renew the Lease in time; stepping down");
                return;
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown), so another replica need not wait for it to
    /// expire.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => info!(lease = %self.name, "released the Lease"),
                    Err(e) => warn!(lease = %self.name, error = %e, "could not release the Lease"),
                }
            }
        }
    }

    /// One attempt: true when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let seconds = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
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
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(seconds));
        let expired = spec.renew_time.as_ref().is_none_or(|t| now.as_second() - t.0.as_second() > duration);
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
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica wrote first: it leads this term.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
