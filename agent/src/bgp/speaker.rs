//! The speaker: one [`session`](super::session) per peer of the current
//! [`Plan`], started, re-routed and stopped as the plan changes. A change to one
//! peer's settings resets that session only; a change of routes is sent as UPDATEs
//! on the sessions it concerns, without resetting any.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::plan::{Plan, SessionConfig};
use super::session::{self, Stop};
use crate::metrics::BgpMetrics;

/// The running speaker; [`SpeakerHandle::stop`] ends every session.
pub struct SpeakerHandle {
    stop: oneshot::Sender<Stop>,
    task: tokio::task::JoinHandle<()>,
}

impl SpeakerHandle {
    /// Ends every session as `how` says (SIGTERM: [`Stop::Restart`], so routers with
    /// graceful restart keep the routes) and waits at most two seconds.
    pub async fn stop(self, how: Stop) {
        if self.stop.send(how).is_err() {
            return;
        }
        if tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .is_err()
        {
            warn!("BGP: the speaker did not stop within two seconds");
        }
    }
}

/// Starts the speaker. It opens no session before the first plan arrives (published
/// once the maps serve the VIPs), so a restarting node never tells a router "this is
/// all" (End-of-RIB) before it knows what it serves. `restarting`: the datapath kept
/// forwarding across an agent restart (graceful restart's R and F bits).
pub fn start(
    mut plans: watch::Receiver<Arc<Plan>>,
    restarting: bool,
    metrics: Arc<BgpMetrics>,
) -> SpeakerHandle {
    let (stop, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut sessions: BTreeMap<String, (SessionConfig, session::Handle)> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut first = true;
        loop {
            tokio::select! {
                how = &mut stop_rx => {
                    let how = how.unwrap_or(Stop::Restart);
                    for (_, (_, s)) in std::mem::take(&mut sessions) {
                        s.stop(how).await;
                    }
                    return;
                }
                changed = plans.changed() => {
                    if changed.is_err() {
                        // The agent is gone without a word (as after SIGKILL): no
                        // NOTIFICATION, the routers time out or keep stale routes.
                        return;
                    }
                    let plan = plans.borrow_and_update().clone();
                    reconcile(&mut sessions, &plan, restarting && first).await;
                    first = false;
                    report(&sessions, &metrics);
                }
                _ = tick.tick() => report(&sessions, &metrics),
            }
        }
    });
    SpeakerHandle { stop, task }
}

/// Brings the sessions in line with `plan`.
async fn reconcile(
    sessions: &mut BTreeMap<String, (SessionConfig, session::Handle)>,
    plan: &Plan,
    restarting: bool,
) {
    let stale: Vec<String> = sessions
        .iter()
        .filter(|(name, (cfg, _))| plan.peers.get(*name).is_none_or(|p| p.session != *cfg))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some((_, s)) = sessions.remove(&name) {
            info!(peer = %name, "BGP: peer removed or changed; closing its session");
            s.stop(Stop::Cease).await;
        }
    }
    for (name, peer) in &plan.peers {
        let routes = Arc::new(peer.routes.clone());
        match sessions.get(name) {
            Some((_, s)) => s.set_routes(routes),
            None => {
                info!(peer = %name, address = %peer.session.peer_address, "BGP: starting session");
                let handle = session::spawn(name.clone(), peer.session.clone(), routes, restarting);
                sessions.insert(name.clone(), (peer.session.clone(), handle));
            }
        }
    }
}

/// `xlb_bgp_session_up{peer}` and `xlb_bgp_advertised_prefixes{peer}`.
fn report(sessions: &BTreeMap<String, (SessionConfig, session::Handle)>, metrics: &BgpMetrics) {
    metrics.up.clear();
    metrics.advertised.clear();
    for (name, (_, s)) in sessions {
        let status = s.status.borrow();
        let labels = vec![("peer", name.clone())];
        metrics
            .up
            .get_or_create(&labels)
            .set(i64::from(status.state == "Established"));
        metrics
            .advertised
            .get_or_create(&labels)
            .set(i64::try_from(status.advertised).unwrap_or(i64::MAX));
    }
}
