//! The speaker: one [`session`](super::session) per peer of the current
//! [`Plan`], started, re-routed and stopped as the plan changes. A change to one
//! peer's settings resets that session only; a change of routes is sent as UPDATEs
//! on the sessions it concerns, without resetting any.
//!
//! The passive side of RFC 4271 §8.2.1 is here too: a listener on the BGP port of
//! each local address the peers use (the node's, or a peer's `sourceAddress`), with
//! each peer's TCP MD5 key on it before any SYN arrives (RFC 2385 §3: the key applies
//! to the listening socket); an accepted connection goes to the session of the peer
//! at its remote address, and one from anywhere else is closed and counted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

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
/// BFD runs on `node_ip` (the receive socket's address; any when unknown), and so
/// does the BGP listener on `listen_port` (0: no passive open).
pub fn start(
    mut plans: watch::Receiver<Arc<Plan>>,
    restarting: bool,
    node_ip: Option<std::net::Ipv4Addr>,
    listen_port: u16,
    metrics: Arc<BgpMetrics>,
    views: Arc<Views>,
) -> SpeakerHandle {
    let (stop, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut sessions: Sessions = BTreeMap::new();
        let (accepted_tx, mut accepted) = mpsc::channel(16);
        let mut listeners = Listeners {
            port: listen_port,
            node_ip,
            by_addr: BTreeMap::new(),
            accepted: accepted_tx,
        };
        let mut bfd = Bfd {
            local: node_ip.map_or(
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                Into::into,
            ),
            speaker: None,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut first = true;
        let mut refusals = Refusals::default();
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
                    listeners.reconcile(&plan);
                    first = false;
                    report(&sessions, &bfd, &metrics);
                    publish(&sessions, &bfd, &plans.borrow(), &views);
                }
                _ = tick.tick() => {
                    report(&sessions, &bfd, &metrics);
                    publish(&sessions, &bfd, &plans.borrow(), &views);
                }
                Some((stream, remote, local)) = accepted.recv() => {
                    hand_over(&sessions, stream, remote, local, &metrics, &mut refusals);
                }
            }
        }
    });
    SpeakerHandle { stop, task }
}

type Sessions = BTreeMap<String, (SessionConfig, session::Handle)>;

/// A connection accepted on a listener: the stream, its remote and local addresses.
type Accepted = (TcpStream, SocketAddr, SocketAddr);

/// The listening sockets of the passive open (RFC 4271 §8.2.1), by local address.
struct Listeners {
    port: u16,
    node_ip: Option<Ipv4Addr>,
    by_addr: BTreeMap<IpAddr, Listener>,
    accepted: mpsc::Sender<Accepted>,
}

/// One listening socket and the MD5 keys set on it, by peer address.
struct Listener {
    socket: Arc<TcpListener>,
    keys: BTreeMap<IpAddr, String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Errors of the passive open's listening sockets.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("listening on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TCP MD5 key for {0}: {1}")]
    Md5(IpAddr, std::io::Error),
}

impl Listeners {
    /// The local address the peer's connections arrive at: its `sourceAddress`, else
    /// the node's address (any, when unknown, or for an IPv6 peer without one).
    fn local_for(&self, cfg: &SessionConfig) -> IpAddr {
        match (cfg.source_address, cfg.peer_address, self.node_ip) {
            (Some(a), _, _) => a,
            (None, IpAddr::V4(_), Some(ip)) => IpAddr::V4(ip),
            (None, IpAddr::V4(_), None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (None, IpAddr::V6(_), _) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// Listens where the plan's peers connect to, with their MD5 keys; stops
    /// listening where none does any more.
    fn reconcile(&mut self, plan: &Plan) {
        if self.port == 0 {
            return;
        }
        let mut want: BTreeMap<IpAddr, BTreeMap<IpAddr, String>> = BTreeMap::new();
        for peer in plan.peers.values() {
            let keys = want.entry(self.local_for(&peer.session)).or_default();
            if let Some(key) = &peer.session.password {
                keys.insert(peer.session.peer_address, key.clone());
            }
        }
        let gone: Vec<IpAddr> = self
            .by_addr
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            info!(%addr, port = self.port, "BGP: no peer connects here any more; not listening");
            self.by_addr.remove(&addr);
        }
        for (addr, keys) in want {
            if !self.by_addr.contains_key(&addr) {
                match self.listen(addr, &keys) {
                    Ok(l) => {
                        info!(%addr, port = self.port, "BGP: listening for peers' connections");
                        self.by_addr.insert(addr, l);
                    }
                    Err(e) => {
                        warn!(error = %e, "BGP: no passive open; sessions connect actively only")
                    }
                }
                continue;
            }
            let Some(l) = self.by_addr.get_mut(&addr) else {
                continue;
            };
            if let Err(e) = l.set_keys(&keys) {
                warn!(error = %e, "BGP: MD5 keys on the listener not updated");
            }
        }
    }

    fn listen(
        &self,
        addr: IpAddr,
        keys: &BTreeMap<IpAddr, String>,
    ) -> Result<Listener, ListenError> {
        let at = SocketAddr::new(addr, self.port);
        let bind = || -> std::io::Result<TcpSocket> {
            let socket = match addr {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => {
                    let s = TcpSocket::new_v6()?;
                    // Beside an IPv4 listener on the same port.
                    session::setsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1i32)?;
                    s
                }
            };
            // A restarted agent binds again while its old connections linger.
            socket.set_reuseaddr(true)?;
            socket.bind(at)?;
            Ok(socket)
        };
        let socket = bind().map_err(|e| ListenError::Bind(at, e))?;
        // The keys go on before listen(): no SYN is accepted without them.
        for (peer, key) in keys {
            session::set_md5(&socket, *peer, key.as_bytes())
                .map_err(|e| ListenError::Md5(*peer, e))?;
        }
        let socket = Arc::new(socket.listen(64).map_err(|e| ListenError::Bind(at, e))?);
        let task = tokio::spawn(accept_loop(socket.clone(), self.accepted.clone()));
        Ok(Listener {
            socket,
            keys: keys.clone(),
            task,
        })
    }
}

impl Listener {
    /// Adds, changes and removes MD5 keys on the listening socket.
    fn set_keys(&mut self, keys: &BTreeMap<IpAddr, String>) -> Result<(), ListenError> {
        let peers: BTreeSet<IpAddr> = self.keys.keys().chain(keys.keys()).copied().collect();
        for peer in peers {
            let (old, new) = (self.keys.get(&peer), keys.get(&peer));
            if old != new {
                let key = new.map_or(&[][..], |k| k.as_bytes());
                session::set_md5(&*self.socket, peer, key)
                    .map_err(|e| ListenError::Md5(peer, e))?;
                match new {
                    Some(k) => self.keys.insert(peer, k.clone()),
                    None => self.keys.remove(&peer),
                };
            }
        }
        Ok(())
    }
}

async fn accept_loop(socket: Arc<TcpListener>, out: mpsc::Sender<Accepted>) {
    loop {
        match socket.accept().await {
            Ok((stream, remote)) => {
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                if out.send((stream, remote, local)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                warn!(error = %e, "BGP: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Gives an accepted connection to the session of the peer at its remote address
/// (RFC 4271 §8.2.1, event 14 TcpConnection_Valid), with the session's TTL; one from
/// an address that is no peer's (event 15) is closed.
fn hand_over(
    sessions: &Sessions,
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    metrics: &BgpMetrics,
    refusals: &mut Refusals,
) {
    let from = remote.ip().to_canonical();
    let session = sessions.iter().find(|(_, (cfg, _))| {
        cfg.peer_address == from
            && cfg
                .source_address
                .is_none_or(|a| a == local.ip().to_canonical())
    });
    let Some((name, (cfg, handle))) = session else {
        metrics.refused.inc();
        refusals.note(remote, local, Instant::now());
        return;
    };
    if let Err(e) = session::set_ttl(&stream, from.is_ipv6(), cfg.ttl) {
        debug!(peer = %name, error = %e, "BGP: setting the accepted connection's TTL failed; closed");
        return;
    }
    // GTSM on an accepted connection: the listener serves every peer, so the minimum
    // applies from here on (the handshake itself passed the listener). A host further
    // away completes no more than that: its OPEN is dropped.
    if let Some(min) = cfg.min_ttl
        && let Err(e) = session::set_min_ttl(&stream, from.is_ipv6(), min)
    {
        debug!(peer = %name, error = %e, "BGP: setting the accepted connection's minimum TTL failed; closed");
        return;
    }
    handle.accept(stream);
}

/// Logs connections from addresses that are no peer's at most once per
/// [`Refusals::EVERY`], with how many were closed since: a host opening thousands
/// (2,829 in 5 s in a probe) must not write a log line each. Every one is counted
/// (`xlb_bgp_refused_connections_total`).
#[derive(Debug, Default)]
struct Refusals {
    last: Option<Instant>,
    since: u64,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    /// Notes one refused connection; logs it if the last line is `EVERY` old.
    fn note(&mut self, remote: SocketAddr, local: SocketAddr, now: Instant) -> bool {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return false;
        }
        let closed = std::mem::take(&mut self.since);
        warn!(%remote, %local, closed, "BGP: connection from an address that is no peer's; closed (further ones logged at most every 10 s, counted in xlb_bgp_refused_connections_total)");
        self.last = Some(now);
        true
    }
}

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
        metrics
            .collisions
            .get_or_create(&labels)
            .set(i64::try_from(status.collisions).unwrap_or(i64::MAX));
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A listener on loopback (an ephemeral port) takes MD5 keys before and after
    /// listen(), and a connection from an address that is no peer's is closed and
    /// counted.
    #[tokio::test]
    async fn listener_keys_and_a_connection_from_a_stranger() {
        let (tx, mut accepted) = mpsc::channel(4);
        let listeners = Listeners {
            port: 0,
            node_ip: None,
            by_addr: BTreeMap::new(),
            accepted: tx,
        };
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let router: IpAddr = "127.0.0.2".parse().unwrap();
        let mut l = listeners
            .listen(local, &BTreeMap::from([(router, "s3cret".to_string())]))
            .unwrap();
        // Changed, then removed (an empty key deletes it, RFC 2385 is per address).
        l.set_keys(&BTreeMap::from([(router, "other".to_string())]))
            .unwrap();
        l.set_keys(&BTreeMap::new()).unwrap();
        assert!(l.keys.is_empty());

        let at = l.socket.local_addr().unwrap();
        let mut client = TcpStream::connect(at).await.unwrap();
        let (stream, remote, local) = accepted.recv().await.unwrap();
        let metrics = BgpMetrics::default();
        hand_over(
            &Sessions::new(),
            stream,
            remote,
            local,
            &metrics,
            &mut Refusals::default(),
        );
        assert_eq!(metrics.refused.get(), 1);
        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }

    #[test]
    fn peers_connect_to_their_source_address_or_the_nodes() {
        let (tx, _rx) = mpsc::channel(1);
        let listeners = Listeners {
            port: 179,
            node_ip: Some(Ipv4Addr::new(10, 0, 0, 11)),
            by_addr: BTreeMap::new(),
            accepted: tx,
        };
        let mut cfg = SessionConfig {
            my_asn: 65001,
            peer_asn: 65000,
            peer_address: "10.0.0.1".parse().unwrap(),
            peer_port: 179,
            source_address: None,
            hold_time: Duration::from_secs(90),
            keepalive_time: None,
            password: None,
            ttl: 1,
            min_ttl: None,
            graceful_restart: false,
            router_id: Ipv4Addr::new(10, 0, 0, 11),
            bfd: None,
        };
        assert_eq!(
            listeners.local_for(&cfg),
            "10.0.0.11".parse::<IpAddr>().unwrap()
        );
        cfg.source_address = Some("10.0.5.11".parse().unwrap());
        assert_eq!(
            listeners.local_for(&cfg),
            "10.0.5.11".parse::<IpAddr>().unwrap()
        );
        cfg.source_address = None;
        cfg.peer_address = "fd00::1".parse().unwrap();
        assert_eq!(listeners.local_for(&cfg), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }

    /// Thousands of refused connections write one line per 10 s, each counted.
    #[test]
    fn refused_connections_are_logged_at_most_every_ten_seconds() {
        let mut r = Refusals::default();
        let (remote, local) = (
            "10.0.0.66:40000".parse().unwrap(),
            "10.0.0.2:179".parse().unwrap(),
        );
        let t0 = Instant::now();
        let logged = (0..2_829u64)
            .filter(|i| r.note(remote, local, t0 + Duration::from_millis(i * 5 / 3)))
            .count();
        // 2,829 in 4.7 s: one line.
        assert_eq!(logged, 1);
        assert_eq!(r.since, 2_828);
        assert!(r.note(remote, local, t0 + Duration::from_secs(10)));
        assert_eq!(r.since, 0);
    }
}
