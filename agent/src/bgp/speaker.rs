//! The speaker: one [`session`](super::session) per peer of the current
//! [`Plan`], started, re-routed and stopped as the plan changes. A change to one
//! peer's settings resets that session only; a change of routes is sent as UPDATEs
//! on the sessions it concerns, without resetting any.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::plan::{Plan, SessionConfig};
use super::session::{self, Stop};
use crate::introspect::{BfdView, BgpRoute, PeerView, Views};
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
/// BFD runs on `node_ip` (the receive socket's address; any when unknown).
pub fn start(
    mut plans: watch::Receiver<Arc<Plan>>,
    restarting: bool,
    node_ip: Option<std::net::Ipv4Addr>,
    metrics: Arc<BgpMetrics>,
    views: Arc<Views>,
) -> SpeakerHandle {
    let (stop, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut sessions: Sessions = BTreeMap::new();
        let mut bfd = Bfd {
            local: node_ip.map_or(
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                Into::into,
            ),
            speaker: None,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut first = true;
        loop {
            tokio::select! {
                how = &mut stop_rx => {
                    let how = how.unwrap_or(Stop::Restart);
                    // BFD first, AdminDown (RFC 5880 §6.8.16): routers do not count a
                    // planned stop as a failure, so graceful restart holds.
                    if let Some(b) = &bfd.speaker {
                        b.admin_down_all().await;
                    }
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
                    reconcile(&mut sessions, &mut bfd, &plan, restarting && first).await;
                    first = false;
                    report(&sessions, &bfd, &metrics);
                    publish(&sessions, &bfd, &plans.borrow(), &views);
                }
                _ = tick.tick() => {
                    report(&sessions, &bfd, &metrics);
                    publish(&sessions, &bfd, &plans.borrow(), &views);
                }
            }
        }
    });
    SpeakerHandle { stop, task }
}

type Sessions = BTreeMap<String, (SessionConfig, session::Handle)>;

/// The BFD speaker, bound when the first peer asks for BFD.
struct Bfd {
    local: std::net::IpAddr,
    speaker: Option<Arc<crate::bfd::Speaker>>,
}

impl Bfd {
    /// Starts (or retimes) BFD with the peer of `cfg`, if it asks for it.
    fn add(&mut self, cfg: &SessionConfig) -> Option<watch::Receiver<crate::bfd::PeerState>> {
        let timers = cfg.bfd?;
        if self.speaker.is_none() {
            match crate::bfd::Speaker::bind(self.local, crate::bfd::session::PORT) {
                Ok(s) => self.speaker = Some(Arc::new(s)),
                Err(e) => {
                    warn!(error = %e, "BFD: cannot listen; sessions run on BGP hold timers alone");
                    return None;
                }
            }
        }
        let speaker = self.speaker.as_ref()?;
        match speaker.add(cfg.peer_address, bfd_config(&timers)) {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(peer = %cfg.peer_address, error = %e, "BFD: session not started");
                None
            }
        }
    }

    fn remove(&self, cfg: &SessionConfig) {
        if let (Some(s), Some(_)) = (&self.speaker, cfg.bfd) {
            s.remove(cfg.peer_address);
        }
    }
}

fn bfd_config(t: &super::plan::BfdTimers) -> crate::bfd::BfdConfig {
    crate::bfd::BfdConfig {
        desired_min_tx: t.transmit_interval,
        required_min_rx: t.receive_interval,
        detect_multiplier: t.detect_multiplier,
        passive: t.passive,
    }
}

/// The settings whose change resets a session: all but the BFD timers (whether BFD
/// runs at all does reset it).
fn reset_key(cfg: &SessionConfig) -> SessionConfig {
    SessionConfig {
        bfd: cfg.bfd.map(|mut t| {
            t.transmit_interval = Duration::ZERO;
            t.receive_interval = Duration::ZERO;
            t.detect_multiplier = 0;
            t.passive = false;
            t
        }),
        ..cfg.clone()
    }
}

/// Brings the sessions in line with `plan`.
async fn reconcile(sessions: &mut Sessions, bfd: &mut Bfd, plan: &Plan, restarting: bool) {
    let stale: Vec<String> = sessions
        .iter()
        .filter(|(name, (cfg, _))| {
            plan.peers
                .get(*name)
                .is_none_or(|p| reset_key(&p.session) != reset_key(cfg))
        })
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some((cfg, s)) = sessions.remove(&name) {
            info!(peer = %name, "BGP: peer removed or changed; closing its session");
            s.stop(Stop::Cease).await;
            bfd.remove(&cfg);
        }
    }
    for (name, peer) in &plan.peers {
        let routes = Arc::new(peer.routes.clone());
        match sessions.get_mut(name) {
            Some((cfg, s)) => {
                s.set_routes(routes);
                if cfg.bfd != peer.session.bfd
                    && let (Some(b), Some(t)) = (&bfd.speaker, &peer.session.bfd)
                {
                    info!(peer = %name, "BFD: new timers (poll sequence, no reset)");
                    b.update(peer.session.peer_address, bfd_config(t));
                }
                *cfg = peer.session.clone();
            }
            None => {
                info!(peer = %name, address = %peer.session.peer_address, "BGP: starting session");
                let state = bfd.add(&peer.session);
                let handle = session::spawn(
                    name.clone(),
                    peer.session.clone(),
                    routes,
                    restarting,
                    state,
                );
                sessions.insert(name.clone(), (peer.session.clone(), handle));
            }
        }
    }
}

/// `xlb_bgp_session_up{peer}`, `xlb_bgp_advertised_prefixes{peer}` and
/// `xlb_bfd_session_up{peer}`.
fn report(sessions: &Sessions, bfd: &Bfd, metrics: &BgpMetrics) {
    metrics.up.clear();
    metrics.advertised.clear();
    metrics.bfd_up.clear();
    for (name, (cfg, s)) in sessions {
        if cfg.bfd.is_some() {
            let up = bfd
                .speaker
                .as_ref()
                .and_then(|b| b.state(cfg.peer_address))
                .is_some_and(|st| st.is_up());
            metrics
                .bfd_up
                .get_or_create(&vec![("peer", name.clone())])
                .set(i64::from(up));
        }
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

/// What `xlb inspect owners` and `xlb inspect peers` show of the speaker: the
/// prefixes of the plan with the peers each goes to, and every session's state.
fn publish(sessions: &Sessions, bfd: &Bfd, plan: &Plan, views: &Views) {
    let mut routes: BTreeMap<String, BgpRoute> = BTreeMap::new();
    for (peer, p) in &plan.peers {
        for (prefix, attrs) in &p.routes {
            let r = routes
                .entry(prefix.to_string())
                .or_insert_with(|| BgpRoute {
                    prefix: prefix.to_string(),
                    peers: Vec::new(),
                    communities: attrs
                        .communities
                        .iter()
                        .map(|c| format!("{}:{}", c >> 16, c & 0xffff))
                        .chain(
                            attrs
                                .large_communities
                                .iter()
                                .map(|[a, b, c]| format!("large:{a}:{b}:{c}")),
                        )
                        .collect(),
                });
            r.peers.push(peer.clone());
        }
    }
    let peers = sessions
        .iter()
        .map(|(name, (cfg, s))| {
            let status = s.status.borrow();
            let bfd = cfg
                .bfd
                .and_then(|_| bfd.speaker.as_ref()?.state(cfg.peer_address));
            PeerView {
                name: name.clone(),
                address: std::net::SocketAddr::new(cfg.peer_address, cfg.peer_port).to_string(),
                local_asn: cfg.my_asn,
                peer_asn: cfg.peer_asn,
                state: status.state.to_string(),
                advertised: status.advertised,
                last_error: status.last_error.clone(),
                bfd: bfd.map(|b| BfdView {
                    state: format!("{:?}", b.state),
                    diag: format!("{:?}", b.diag),
                    detection_ms: b
                        .detection_time
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                }),
            }
        })
        .collect();
    views.set_bgp(routes.into_values().collect(), peers);
}
