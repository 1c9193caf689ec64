//! One IPAM leader at a time, by a `coordination.k8s.io/v1` Lease (the way
//! client-go's leader election does it, in a few lines): every agent tries to take
//! or renew the Lease every [`LeaseConfig::renew`]; a write carries the
//! resourceVersion it read, so of two agents writing at once one gets `409 Conflict`
//! and is not the leader. A Lease held by another is taken over only once it has not
//! changed for [`LeaseConfig::duration`] as seen by this agent's own clock (no
//! comparison of clocks between nodes). The holder stops believing it leads when it
//! has not renewed within the duration either, so two leaders never overlap by more
//! than clock drift over one duration.
//!
//! The result is a `watch` of "this agent leads"; only the leader writes Service
//! status and Events (see [`crate::status`]).
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::{debug, info, warn};

/// Where the Lease is and how it is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (`--lease-namespace`).
    pub namespace: String,
    /// Its name ([`LEASE_NAME`]).
    pub name: String,
    /// Who this agent is (the node name).
    pub identity: String,
    /// How long a Lease nobody renews stays with its holder (`--lease-duration`).
    pub duration: Duration,
    /// How often the holder renews and the others look.
    pub renew: Duration,
}

/// The Lease's name.
pub const LEASE_NAME: &str = "xlb-ipam";

impl LeaseConfig {
    /// A config for `identity` in `namespace`, renewing about seven times per
    /// `duration` (2 s for the default 15 s).
    pub fn new(namespace: &str, identity: &str, duration: Duration) -> Self {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: LEASE_NAME.to_string(),
            identity: identity.to_string(),
            duration,
            renew: (duration / 7).clamp(Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

/// What this agent last saw of the Lease: its holder and version, and when (by
/// this agent's clock) it last changed.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    holder: Option<String>,
    version: Option<String>,
    since: Option<Instant>,
    /// When this agent last renewed successfully (while it leads).
    renewed: Option<Instant>,
}

/// What a look at the Lease decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Write the Lease with us as holder (take it, or renew it).
    Take,
    /// Someone else holds it and renews it.
    Wait,
}

/// Whether to take the Lease, given what it holds now (`holder`, `version`) and what
/// was observed before (updated here).
pub(crate) fn decide(
    obs: &mut Observed,
    me: &str,
    holder: Option<&str>,
    version: Option<&str>,
    duration: Duration,
    now: Instant,
) -> Decision {
    if obs.holder.as_deref() != holder || obs.version.as_deref() != version {
        obs.holder = holder.map(String::from);
        obs.version = version.map(String::from);
        obs.since = Some(now);
    }
    let expired = obs
        .since
        .is_none_or(|t| now.saturating_duration_since(t) >= duration);
    match holder {
        None | Some("") => Decision::Take,
        Some(h) if h == me => Decision::Take,
        Some(_) if expired => Decision::Take,
        Some(_) => Decision::Wait,
    }
}

/// The Lease as this agent would write it over `old` (`None`: a new one).
fn ours(cfg: &LeaseConfig, old: Option<Lease>) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut lease = old.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec = LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        renew_time: Some(now),
        ..spec
    };
    lease.spec = Some(spec);
    lease
}

/// One round: read the Lease, take or renew it if it is ours to take. `Ok(true)`:
/// this agent holds it now.
async fn round(api: &Api<Lease>, cfg: &LeaseConfig, obs: &mut Observed) -> kube::Result<bool> {
    let now = Instant::now();
    let current = api.get_opt(&cfg.name).await?;
    let Some(current) = current else {
        return match api.create(&PostParams::default(), &ours(cfg, None)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let holder = current
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    let version = current.metadata.resource_version.as_deref();
    if decide(obs, &cfg.identity, holder, version, cfg.duration, now) == Decision::Wait {
        return Ok(false);
    }
    // The resourceVersion read goes with the write: a 409 means another agent wrote
    // first, and it wins.
    match api
        .replace(&cfg.name, &PostParams::default(), &ours(cfg, Some(current)))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs the election forever; `leads` says whether this agent holds the Lease.
pub fn start(client: Client, cfg: LeaseConfig) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let mut obs = Observed::default();
        let mut tick = tokio::time::interval(cfg.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Option<String> = None;
        loop {
            tick.tick().await;
            // A round that hangs (an unreachable API server) counts as failed in time
            // for the leader to stop leading before another may take over.
            let result = tokio::time::timeout(cfg.duration / 4, round(&api, &cfg, &mut obs))
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("Lease round timed out".into())));
            let leads = match result {
                Ok(true) => {
                    obs.renewed = Some(Instant::now());
                    reported = None;
                    true
                }
                Ok(false) => {
                    reported = None;
                    false
                }
                Err(e) => {
                    let text = e.to_string();
                    if reported.as_deref() != Some(text.as_str()) {
                        warn!(error = %text, lease = %cfg.name, "the IPAM Lease could not be read or renewed");
                        reported = Some(text);
                    }
                    // A leader that cannot renew stops leading before another may
                    // take over (the others wait a whole duration).
                    *tx.borrow() && obs.renewed.is_some_and(|t| t.elapsed() < cfg.duration / 2)
                }
            };
            if *tx.borrow() != leads {
                if leads {
                    info!(lease = %cfg.name, identity = %cfg.identity, "IPAM leader: this agent writes Service status and Events");
                } else {
                    info!(lease = %cfg.name, "not the IPAM leader");
                }
                tx.send_replace(leads);
            } else {
                debug!(leads, "lease round");
            }
        }
    });
    (rx, task)
}

/// Gives the Lease up (on SIGTERM), so that another agent takes over at once instead
/// of after a whole duration: the holder is cleared if it is still us.
pub async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        warn!(error = %e, "releasing the IPAM Lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_or_own_lease_is_taken_and_a_renewed_one_is_not() {
        let t0 = Instant::now();
        let mut obs = Observed::default();
        assert_eq!(decide(&mut obs, "a", None, None, D, t0), Decision::Take);
        assert_eq!(
            decide(&mut obs, "a", Some("a"), Some("1"), D, t0),
            Decision::Take
        );
        let mut obs = Observed::default();
        assert_eq!(
            decide(&mut obs, "a", Some("b"), Some("1"), D, t0),
            Decision::Wait
        );
        // Renewed by b (new version) just before the duration runs out: still b's.
        let t1 = t0 + Duration::from_secs(14);
        assert_eq!(
            decide(&mut obs, "a", Some("b"), Some("2"), D, t1),
            Decision::Wait
        );
        let t2 = t1 + Duration::from_secs(14);
        assert_eq!(
            decide(&mut obs, "a", Some("b"), Some("2"), D, t2),
            Decision::Wait
        );
    }

    #[test]
    fn a_lease_unchanged_for_the_duration_is_taken_over() {
        let t0 = Instant::now();
        let mut obs = Observed::default();
        assert_eq!(
            decide(&mut obs, "a", Some("b"), Some("7"), D, t0),
            Decision::Wait
        );
        let t1 = t0 + D;
        assert_eq!(
            decide(&mut obs, "a", Some("b"), Some("7"), D, t1),
            Decision::Take
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let cfg = LeaseConfig::new("xlb-system", "node-a", D);
        assert_eq!(cfg.renew, Duration::from_secs(2));
        let first = ours(&cfg, None);
        let spec = first.spec.clone().unwrap_or_default();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        let renewed = ours(&cfg, Some(first));
        assert_eq!(renewed.spec.unwrap_or_default().lease_transitions, Some(1));
        let other = LeaseConfig::new("xlb-system", "node-b", D);
        let taken = ours(&other, Some(ours(&cfg, None)));
        assert_eq!(taken.spec.unwrap_or_default().lease_transitions, Some(2));
    }
}
