//! The L2 driver: one tokio task that runs membership (foca over UDP), recomputes
//! ownership whenever membership, the plan or the link changes, programs the owned
//! VIPs into `xlb_l2_vips4`, sends gratuitous ARPs on takeover and keeps the
//! datapath's dead-man deadline fresh. On SIGTERM it hands over as
//! [`super::restart`] describes.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuHashMap, PerCpuValues};
use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::{SeedableRng, rngs::SmallRng};
use tokio::{
    net::UdpSocket,
    sync::{oneshot, watch},
    time::Instant,
};
use tracing::{debug, info, warn};
use xlb_common::{L2Vip, config, names};

use super::{
    announce::{self, Sender},
    election::{self, Plan},
    membership::{self, NodeId},
    restart::{Graces, Notice},
    seal::{KeyError, Keyring, Refused, Sealer, Transition, wall_ns},
};
use crate::{
    dataplane::conntrack::monotonic_ns,
    introspect::{L2Owner, L2View, Views},
    metrics::Metrics,
};

/// How often the dead-man deadline is pushed forward and the link looked at.
pub const REFRESH: Duration = Duration::from_millis(100);
/// How far ahead of now the deadline is set: a dead agent's datapath stops
/// answering ARP at most this long after the agent's last refresh.
pub const DEADMAN: Duration = Duration::from_millis(400);
/// When gratuitous ARPs go out after a takeover, from the takeover. Linux ignores an
/// ARP that would change a neighbour entry updated less than `locktime` ago (1 s by
/// default, `arp_process` in net/ipv4/arp.c), so one GARP at once can be ignored by a
/// client that just refreshed its entry: the first second is covered every 250 ms,
/// then one a second for two more.
pub const GARP_SCHEDULE_MS: [u64; 7] = [0, 250, 500, 750, 1000, 2000, 3000];
/// After start or after the link comes back, VIPs are claimed only once every peer
/// in the plan answered, or after this long: a node that has not heard its peers yet
/// would otherwise claim every VIP for a moment.
pub const JOIN_WAIT: Duration = Duration::from_secs(1);
/// Peers that are not members yet (new, down, or across a partition) are announced
/// to this often: after a partition heals, both sides hold the VIPs they took until
/// the first announcement gets through, so this bounds that window. One datagram per
/// missing peer; none while every peer is a member.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(100);
/// A stopping agent sends its restart notice this many times, this far apart (UDP
/// may lose one; peers take the last).
const NOTICE_COPIES: usize = 3;
const NOTICE_SPACING: Duration = Duration::from_millis(10);
/// How often the membership key file is read again (a rotated Kubernetes Secret
/// reaches the mounted file within the kubelet's sync period, about a minute).
const KEY_RELOAD: Duration = Duration::from_secs(2);
/// Refused membership datagrams are logged at most this often (each is counted).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the L2 task could not start.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    /// The membership socket could not be bound.
    #[error("binding the memberlist port {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A pinned map could not be opened.
    #[error("map {name}: {source}")]
    Map {
        /// Pin name.
        name: &'static str,
        /// Cause.
        source: MapError,
    },
    /// The gratuitous-ARP socket could not be opened.
    #[error("AF_PACKET socket on {iface}: {source}")]
    Packet {
        /// The interface.
        iface: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The interface has no MAC address or index.
    #[error("interface {0}: no such interface or no MAC address")]
    Interface(String),
    /// `--memberlist-key-file` names a file that cannot be used: the agent does not
    /// start with a membership weaker than the one asked for.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What the L2 task needs to start.
#[derive(Clone, Debug)]
pub struct L2Config {
    /// Announce interface (the uplink).
    pub interface: String,
    /// This node's name.
    pub node_name: String,
    /// This node's address on the LAN: where peers reach its membership socket.
    pub node_ip: IpAddr,
    /// UDP port of the membership protocol (`--memberlist-port`).
    pub port: u16,
    /// bpffs directory of the pinned maps.
    pub pin_path: std::path::PathBuf,
    /// How long a stopping agent's VIPs stay with its node (`--restart-grace`); also
    /// the most a peer's restart notice is believed.
    pub restart_grace: Duration,
    /// The shared keys that authenticate membership (`--memberlist-key-file`); `None`:
    /// unauthenticated, as before.
    pub key_file: Option<PathBuf>,
    /// How agents without the key are treated while a cluster moves to one.
    pub transition: Transition,
}

/// The running task: stop it with [`L2Handle::stop`] (SIGTERM), or drop it (the task
/// then ends when the plan's sender is dropped, as after SIGKILL: no notice).
pub struct L2Handle {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl L2Handle {
    /// Keeps this node's VIPs answered for the restart grace, tells the peers, and
    /// waits (at most a second) for the task to end.
    pub async fn stop(self) {
        if self.stop.send(()).is_err() {
            return;
        }
        if tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .is_err()
        {
            warn!("L2: the membership task did not stop within a second");
        }
    }
}

/// The pinned maps this task writes.
struct Maps {
    /// Kernel id of the `xlb_l2_vips4` these handles refer to: a datapath rebuilt
    /// under the agent (`xlb cleanup --force`) pins new maps, which this detects.
    id: u32,
    vips: HashMap<MapData, u32, L2Vip>,
    stats: PerCpuHashMap<MapData, u32, u64>,
    config: Array<MapData, u64>,
}

impl Maps {
    fn open(pin_path: &Path) -> Result<Self, L2Error> {
        let open = |name: &'static str| {
            MapData::from_pin(pin_path.join(name)).map_err(|source| L2Error::Map { name, source })
        };
        let err = |name: &'static str| move |source| L2Error::Map { name, source };
        let id = MapInfo::from_pin(pin_path.join(names::L2_VIPS4))
            .map_err(err(names::L2_VIPS4))?
            .id();
        Ok(Maps {
            id,
            vips: HashMap::try_from(Map::HashMap(open(names::L2_VIPS4)?))
                .map_err(err(names::L2_VIPS4))?,
            stats: PerCpuHashMap::try_from(Map::PerCpuHashMap(open(names::L2_STATS4)?))
                .map_err(err(names::L2_STATS4))?,
            config: Array::try_from(Map::Array(open(names::CONFIG)?))
                .map_err(err(names::CONFIG))?,
        })
    }
}

type Swim = Foca<NodeId, PostcardCodec, SmallRng, NoCustomBroadcast>;

/// The task's state.
struct L2 {
    cfg: L2Config,
    me: NodeId,
    mac: [u8; 6],
    foca: Swim,
    rt: AccumulatingRuntime<NodeId>,
    socket: UdpSocket,
    garp: Sender,
    /// The interface index `garp` sends on.
    ifindex: u32,
    maps: Maps,
    /// When [`L2::follow_datapath`] looks next.
    next_follow: Instant,
    plan: Arc<Plan>,
    /// foca timers, by when they fire.
    timers: Vec<(Instant, Timer<NodeId>)>,
    /// VIPs programmed into `xlb_l2_vips4`.
    owned: BTreeSet<Ipv4Addr>,
    /// VIPs a previous agent left in `xlb_l2_vips4`: kept while joining, and
    /// announced again (GARP) if election gives them to this node, since another
    /// node may have taken them over meanwhile.
    inherited: BTreeSet<Ipv4Addr>,
    /// Pending gratuitous ARPs: VIP -> (takeover time, next index in
    /// [`GARP_SCHEDULE_MS`]).
    garps: BTreeMap<Ipv4Addr, (Instant, usize)>,
    /// Per-VIP ARP replies already exported.
    replies: BTreeMap<Ipv4Addr, u64>,
    link_up: bool,
    /// The last link-state question failed (logged once per such episode).
    link_unknown: bool,
    /// No VIP is claimed before this (see [`JOIN_WAIT`]).
    claim_after: Instant,
    /// Peers whose agent is stopping, in their restart grace.
    graces: Graces,
    /// A member came up since the last reconcile: announce the owned VIPs again.
    reannounce: bool,
    next_announce: Instant,
    metrics: Arc<Metrics>,
    /// Where `xlb inspect owners` reads who holds what.
    views: Arc<Views>,
    /// Seals and opens membership datagrams (a no-op without a key file).
    sealer: Sealer,
    /// The key file's text last loaded, and when it is read next.
    key_text: Option<String>,
    next_key_check: Instant,
    /// The last key-file error logged (each distinct one once).
    key_error: Option<String>,
    /// When a refused datagram may be logged again.
    next_refused_log: Instant,
    /// Members already logged as impostors (see [`membership::bound`]).
    impostors: BTreeSet<NodeId>,
}

/// Binds the membership socket and opens maps and sockets (so a bad port or a
/// missing capability fails the agent's start), then runs the task until it is
/// stopped or the plan's sender is dropped.
pub async fn start(
    cfg: L2Config,
    plan: watch::Receiver<Arc<Plan>>,
    metrics: Arc<Metrics>,
    views: Arc<Views>,
) -> Result<L2Handle, L2Error> {
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), cfg.port);
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|source| L2Error::Bind { addr: bind, source })?;
    let ifindex = crate::netdev::ifindex(&cfg.interface)
        .ok_or_else(|| L2Error::Interface(cfg.interface.clone()))?;
    let mac = crate::netdev::interface_mac(&cfg.interface)
        .ok_or_else(|| L2Error::Interface(cfg.interface.clone()))?;
    let garp = Sender::open(ifindex).map_err(|source| L2Error::Packet {
        iface: cfg.interface.clone(),
        source,
    })?;
    let maps = Maps::open(&cfg.pin_path)?;
    let (sealer, key_text) = match &cfg.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            let ring = Keyring::parse(&text, path)?;
            match cfg.transition {
                Transition::Enforce => {
                    info!(file = %path.display(), keys = ?ring.ids(), "membership: datagrams authenticated (HMAC-SHA256)")
                }
                t => warn!(
                    file = %path.display(), keys = ?ring.ids(), transition = ?t,
                    "membership: moving to authenticated datagrams; unauthenticated ones are still accepted"
                ),
            }
            metrics.l2.keys.set(ring.len() as i64);
            (
                Sealer::new(Some(ring)).with_transition(cfg.transition),
                Some(text),
            )
        }
        None => {
            warn!(
                "membership is not authenticated (no --memberlist-key-file): any host on the LAN can join it and move VIPs"
            );
            metrics.l2.keys.set(0);
            (Sealer::new(None), None)
        }
    };
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let me = NodeId {
        name: cfg.node_name.clone(),
        addr: SocketAddr::new(cfg.node_ip, cfg.port),
        generation,
    };
    let rng = SmallRng::seed_from_u64(generation ^ u64::from(std::process::id()));
    let cluster = plan.borrow().peers.len();
    let foca = Foca::new(me.clone(), membership::config(cluster), rng, PostcardCodec);
    // VIPs a previous agent left programmed are ours until election says otherwise.
    let owned: BTreeSet<Ipv4Addr> = maps
        .vips
        .keys()
        .filter_map(Result::ok)
        .map(|k| Ipv4Addr::from(k.to_ne_bytes()))
        .collect();
    let now = Instant::now();
    let mut l2 = L2 {
        me,
        mac,
        foca,
        rt: AccumulatingRuntime::new(),
        socket,
        garp,
        ifindex,
        maps,
        next_follow: now,
        plan: plan.borrow().clone(),
        timers: Vec::new(),
        inherited: owned.clone(),
        owned,
        garps: BTreeMap::new(),
        replies: BTreeMap::new(),
        link_up: announce::link_up(&cfg.interface).unwrap_or_else(|e| {
            warn!(iface = %cfg.interface, error = %e, "cannot read the announce link's state; taking it as down until it can");
            false
        }),
        link_unknown: false,
        claim_after: now + JOIN_WAIT,
        graces: Graces::default(),
        reannounce: false,
        next_announce: now,
        metrics,
        views,
        cfg,
        sealer,
        key_text,
        next_key_check: now + KEY_RELOAD,
        key_error: None,
        next_refused_log: now,
        impostors: BTreeSet::new(),
    };
    l2.refresh_deadline();
    info!(
        port = l2.cfg.port, node = %l2.me.name, addr = %l2.me.addr,
        "L2 announcement: membership listening"
    );
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move { l2.run(plan, stopped).await });
    Ok(L2Handle { stop, task })
}

impl L2 {
    async fn run(
        &mut self,
        mut plan: watch::Receiver<Arc<Plan>>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let mut buf = vec![0u8; 2048];
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.iter().map(|(at, _)| *at).min();
            let grace_end = self.graces.next_end(Instant::now());
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                r = &mut stopped => {
                    if r.is_ok() {
                        self.stop_with_grace().await;
                    }
                    return;
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.receive(&buf[..n], from),
                    Err(e) => debug!(error = %e, "membership: receive"),
                },
                _ = tokio::time::sleep_until(next_timer.unwrap_or(far)), if next_timer.is_some() => {
                    self.fire_timers();
                }
                // A peer's restart grace ends: recompute ownership (below) now.
                _ = tokio::time::sleep_until(grace_end.unwrap_or(far)), if grace_end.is_some() => {}
                changed = plan.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.plan = plan.borrow_and_update().clone();
                    self.next_announce = Instant::now();
                    // How many times an update is gossiped grows with the cluster
                    // (foca's LAN formula); the probe timing stays as it is.
                    let config = membership::config(self.plan.peers.len());
                    if let Err(e) = self.foca.set_config(config) {
                        warn!(error = %e, "membership: resizing the configuration");
                    }
                }
                _ = tick.tick() => {
                    self.refresh_deadline();
                    // A failed question keeps the last answer: giving the VIPs up
                    // because a socket could not be made would be an outage.
                    let up = match announce::link_up(&self.cfg.interface) {
                        Ok(up) => {
                            self.link_unknown = false;
                            up
                        }
                        Err(e) => {
                            if !std::mem::replace(&mut self.link_unknown, true) {
                                warn!(iface = %self.cfg.interface, error = %e, "cannot read the announce link's state; keeping the last one");
                            }
                            self.link_up
                        }
                    };
                    if up != self.link_up {
                        info!(iface = %self.cfg.interface, up, "announce interface link changed");
                        self.link_up = up;
                        if up {
                            self.claim_after = Instant::now() + JOIN_WAIT;
                            self.next_announce = Instant::now();
                        }
                    }
                    if Instant::now() >= self.next_follow {
                        self.follow_datapath();
                    }
                    self.send_garps();
                    self.count_replies();
                    if Instant::now() >= self.next_key_check {
                        self.reload_keys();
                    }
                }
            }
            if Instant::now() >= self.next_announce {
                self.announce_missing();
            }
            self.flush();
            self.reconcile();
        }
    }

    /// A datagram on the membership socket: a restart notice, or foca's; sealed
    /// when membership is authenticated.
    fn receive(&mut self, data: &[u8], from: SocketAddr) {
        let opened = match self.sealer.open(data, wall_ns()) {
            Ok(o) => o,
            Err(why) => return self.refused(why, from),
        };
        // The sealed sender where there is one (authenticated), else the source.
        let sender = opened.sender.map_or(from.ip(), |s| s.ip());
        match Notice::decode(opened.payload) {
            None => {
                if let Err(e) = self.foca.handle_data(opened.payload, &mut self.rt) {
                    debug!(error = %e, "membership: bad datagram");
                }
            }
            Some(Err(e)) => debug!(error = %e, %from, "membership: bad restart notice"),
            Some(Ok(notice)) => {
                // Only from the node it names, at the address the model gives it.
                let known = self.plan.peers.get(&notice.name) == Some(&sender);
                if !known || notice.name == self.me.name {
                    debug!(node = %notice.name, %from, "membership: restart notice from an unexpected address");
                    return;
                }
                if !self.graces.is_recorded(&notice) {
                    info!(
                        node = %notice.name, grace_ms = notice.grace_ms,
                        "peer stopping: keeping its VIPs with it for its restart grace"
                    );
                }
                self.graces
                    .record(&notice, Instant::now(), self.cfg.restart_grace);
            }
        }
    }

    /// Counts a refused datagram, and logs it at most every [`REFUSED_LOG_EVERY`].
    fn refused(&mut self, why: Refused, from: SocketAddr) {
        self.metrics
            .l2
            .refused
            .get_or_create(&vec![("reason", why.reason().into())])
            .inc();
        let now = Instant::now();
        if now >= self.next_refused_log {
            self.next_refused_log = now + REFUSED_LOG_EVERY;
            warn!(%from, reason = why.reason(), "membership: datagram refused (more are counted in xlb_l2_membership_refused_total, logged at most every 10 s)");
        }
    }

    /// Reads the key file again; a changed, usable file replaces the keys. A file
    /// that cannot be used keeps the last good keys (logged once per error).
    fn reload_keys(&mut self) {
        self.next_key_check = Instant::now() + KEY_RELOAD;
        let Some(path) = self.cfg.key_file.clone() else {
            return;
        };
        let result = std::fs::read_to_string(&path)
            .map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|text| {
                if self.key_text.as_deref() == Some(text.as_str()) {
                    return Ok(None);
                }
                Keyring::parse(&text, &path).map(|ring| Some((ring, text)))
            });
        match result {
            Ok(None) => self.key_error = None,
            Ok(Some((ring, text))) => {
                info!(file = %path.display(), keys = ?ring.ids(), "membership: key file changed; using its keys");
                self.metrics.l2.keys.set(ring.len() as i64);
                self.sealer.set_keyring(ring);
                self.key_text = Some(text);
                self.key_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.key_error.as_deref() != Some(msg.as_str()) {
                    warn!(error = %msg, "membership: keeping the last good keys");
                    self.key_error = Some(msg);
                }
            }
        }
    }

    /// SIGTERM: the datapath keeps answering ARP for this node's VIPs until the
    /// restart grace ends (the dead-man deadline is set to then), and the peers are
    /// told so; a new agent within the grace refreshes the deadline and keeps them.
    async fn stop_with_grace(&mut self) {
        let grace = self.cfg.restart_grace;
        let deadline = monotonic_ns() + grace.as_nanos() as u64;
        if let Err(e) = self.maps.config.set(config::L2_DEADLINE, deadline, 0) {
            warn!(error = %e, "setting the L2 deadline to the end of the restart grace");
        }
        let notice = Notice {
            name: self.me.name.clone(),
            generation: self.foca.identity().generation,
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        }
        .encode();
        let me = self.me.addr;
        let mut to: BTreeSet<SocketAddr> = self
            .plan
            .peers
            .iter()
            .filter(|(name, _)| **name != self.me.name)
            .map(|(_, ip)| SocketAddr::new(*ip, self.cfg.port))
            .collect();
        to.extend(self.foca.iter_members().map(|m| m.id().addr));
        for copy in 0..NOTICE_COPIES {
            if copy > 0 {
                tokio::time::sleep(NOTICE_SPACING).await;
            }
            // Each copy is sealed afresh: a receiver refuses a repeated timestamp.
            let sealed = self.sealer.seal(&notice, me, wall_ns());
            for addr in &to {
                if let Err(e) = self.socket.send_to(&sealed, addr).await {
                    debug!(error = %e, %addr, "membership: sending the restart notice");
                }
            }
        }
        info!(
            vips = self.owned.len(),
            peers = to.len(),
            grace_ms = grace.as_millis() as u64,
            "L2: stopping; this node keeps its VIPs for the restart grace"
        );
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(at, _)| *at <= now);
        self.timers = later;
        for (_, t) in due {
            if let Err(e) = self.foca.handle_timer(t, &mut self.rt) {
                debug!(error = %e, "membership timer");
            }
        }
    }

    /// Announces this node to plan peers that are not members (new, or declared
    /// down and maybe back).
    fn announce_missing(&mut self) {
        self.next_announce = Instant::now() + ANNOUNCE_EVERY;
        let members: BTreeSet<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr).collect();
        let peers: Vec<_> = self
            .plan
            .peers
            .iter()
            .filter(|(name, _)| **name != self.me.name)
            .map(|(name, ip)| (name.clone(), SocketAddr::new(*ip, self.cfg.port)))
            .filter(|(_, addr)| !members.contains(addr))
            .collect();
        for (name, addr) in peers {
            let to = NodeId {
                name,
                addr,
                generation: 0,
            };
            if let Err(e) = self.foca.announce(to, &mut self.rt) {
                debug!(error = %e, "membership: announce");
            }
        }
    }

    /// Sends what foca produced, schedules its timers, logs membership changes.
    fn flush(&mut self) {
        while let Some((to, data)) = self.rt.to_send() {
            let data = self.sealer.seal(&data, self.me.addr, wall_ns());
            if let Err(e) = self.socket.try_send_to(&data, to.addr) {
                debug!(error = %e, to = %to.addr, "membership: send");
            }
        }
        let now = Instant::now();
        while let Some((after, t)) = self.rt.to_schedule() {
            self.timers.push((now + after, t));
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    info!(node = %id.name, addr = %id.addr, "member up");
                    self.reannounce = true;
                }
                OwnedNotification::MemberDown(id) => {
                    info!(node = %id.name, addr = %id.addr, "member down")
                }
                OwnedNotification::Rename(a, b) => debug!(from = ?a, to = ?b, "member renamed"),
                OwnedNotification::Defunct => {
                    warn!("membership: this node was declared down; rejoining")
                }
                _ => {}
            }
        }
        let mut alive = 0;
        let mut suspect = 0;
        let mut down = 0;
        for m in self.foca.iter_membership_state() {
            match m.state() {
                foca::State::Alive => alive += 1,
                foca::State::Suspect => suspect += 1,
                foca::State::Down => down += 1,
            }
        }
        let l2 = &self.metrics.l2;
        // This node counts as alive.
        l2.members
            .get_or_create(&vec![("state", "alive".into())])
            .set(alive + 1);
        l2.members
            .get_or_create(&vec![("state", "suspect".into())])
            .set(suspect);
        l2.members
            .get_or_create(&vec![("state", "down".into())])
            .set(down);
        l2.members
            .get_or_create(&vec![("state", "restarting".into())])
            .set(self.graces.in_grace(now) as i64);
    }

    /// Recomputes the owned VIPs and programs the difference.
    fn reconcile(&mut self) {
        let now = Instant::now();
        let (members, impostors) =
            membership::bound(self.foca.iter_members().map(|m| m.id()), &self.plan.peers);
        for m in impostors {
            if self.impostors.insert(m.clone()) {
                warn!(node = %m.name, addr = %m.addr, "membership: a member under a node's name at another address; not counted live");
            }
        }
        let mut live: BTreeSet<String> = members.iter().map(|(n, _)| n.clone()).collect();
        self.graces.apply(&members, &mut live, now);
        live.insert(self.me.name.clone());
        // No peers known yet (no plan before the first sync) counts as not joined.
        let peers_in =
            !self.plan.peers.is_empty() && self.plan.peers.keys().all(|p| live.contains(p));
        let joining = self.link_up && now < self.claim_after && !peers_in;
        let want: BTreeSet<Ipv4Addr> = if !self.link_up || joining {
            // Link down: give everything up at once. Still joining: claim nothing
            // new, keep what is held (a restarted agent keeps serving).
            if self.link_up {
                self.owned.clone()
            } else {
                BTreeSet::new()
            }
        } else {
            election::owned(&self.plan, &self.me.name, &live)
                .into_iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(a) => Some(a),
                    // NDP for IPv6 VIPs comes with the IPv6 datapath.
                    IpAddr::V6(_) => None,
                })
                .collect()
        };
        let l2 = self.metrics.l2.clone();
        // A member that comes up may have held some of this node's VIPs while the two
        // could not see each other (a partition that healed): clients that followed
        // it learn the owner again from a fresh round of gratuitous ARPs.
        if !joining && std::mem::take(&mut self.reannounce) {
            for vip in want.intersection(&self.owned) {
                self.garps.entry(*vip).or_insert((now, 0));
            }
        }
        if !joining {
            for vip in std::mem::take(&mut self.inherited) {
                if want.contains(&vip) && self.owned.contains(&vip) {
                    self.garps.insert(vip, (now, 0));
                    info!(%vip, "L2: kept VIP a previous agent held; announcing it");
                }
            }
        }
        l2.owned.set(self.owned.len() as i64);
        if want == self.owned {
            self.send_garps();
            self.publish(&live, joining);
            return;
        }
        for vip in self.owned.difference(&want).copied().collect::<Vec<_>>() {
            let key = u32::from_ne_bytes(vip.octets());
            if let Err(e) = self.maps.vips.remove(&key) {
                warn!(%vip, error = %e, "removing an owned VIP from xlb_l2_vips4");
                continue;
            }
            let _ = self.maps.stats.remove(&key);
            self.replies.remove(&vip);
            self.garps.remove(&vip);
            self.owned.remove(&vip);
            l2.changes
                .get_or_create(&vec![("change", "released".into())])
                .inc();
            info!(%vip, "L2: released VIP");
        }
        for vip in want.difference(&self.owned).copied().collect::<Vec<_>>() {
            let key = u32::from_ne_bytes(vip.octets());
            let ncpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
            if let Ok(zero) = PerCpuValues::try_from(vec![0u64; ncpus]) {
                let _ = self.maps.stats.insert(key, zero, 0);
            }
            let value = L2Vip {
                mac: self.mac,
                pad: [0; 2],
            };
            if let Err(e) = self.maps.vips.insert(key, value, 0) {
                warn!(%vip, error = %e, "adding an owned VIP to xlb_l2_vips4");
                continue;
            }
            self.owned.insert(vip);
            self.garps.insert(vip, (now, 0));
            l2.changes
                .get_or_create(&vec![("change", "acquired".into())])
                .inc();
            info!(%vip, "L2: took VIP over");
        }
        l2.owned.set(self.owned.len() as i64);
        self.send_garps();
        self.publish(&live, joining);
    }

    /// Publishes who holds each VIP, and why, for `xlb inspect owners`.
    fn publish(&self, live: &BTreeSet<String>, joining: bool) {
        let vips = self
            .plan
            .vips
            .iter()
            .map(|(vip, candidates)| {
                let owner = election::owner(*vip, candidates, live).map(str::to_string);
                let held_here = match vip {
                    IpAddr::V4(a) => self.owned.contains(a),
                    IpAddr::V6(_) => false,
                };
                let dead: Vec<&str> = candidates
                    .iter()
                    .filter(|c| !live.contains(*c))
                    .map(String::as_str)
                    .collect();
                let why = if !self.link_up {
                    format!("uplink {} is down: this node holds nothing", self.cfg.interface)
                } else if joining {
                    "this node is joining the membership: it keeps what it held and claims nothing new".to_string()
                } else if vip.is_ipv6() {
                    "IPv6: neighbour discovery comes with the IPv6 datapath".to_string()
                } else if candidates.is_empty() {
                    "no node may announce it (node selectors, or Local policy without a ready endpoint)".to_string()
                } else if owner.is_none() {
                    format!("none of its candidates is live (not live: {})", dead.join(", "))
                } else if dead.is_empty() {
                    "highest rendezvous weight among its live candidates".to_string()
                } else {
                    format!(
                        "highest rendezvous weight among its live candidates (not live: {})",
                        dead.join(", ")
                    )
                };
                L2Owner {
                    vip: *vip,
                    owner,
                    held_here,
                    candidates: candidates.iter().cloned().collect(),
                    why,
                }
            })
            .collect();
        self.views.set_l2(L2View {
            interface: self.cfg.interface.clone(),
            link_up: self.link_up,
            joining,
            live: live.iter().cloned().collect(),
            vips,
        });
    }

    /// Sends the gratuitous ARPs that are due.
    fn send_garps(&mut self) {
        let now = Instant::now();
        for (vip, (since, next)) in self.garps.iter_mut() {
            let due = GARP_SCHEDULE_MS
                .get(*next)
                .is_some_and(|ms| *since + Duration::from_millis(*ms) <= now);
            if !due {
                continue;
            }
            match self.garp.send(&announce::announcement(*vip, self.mac)) {
                Ok(()) => {
                    self.metrics.l2.garps.inc();
                }
                Err(e) => warn!(%vip, error = %e, "sending a gratuitous ARP"),
            }
            *next += 1;
        }
        self.garps
            .retain(|_, (_, next)| *next < GARP_SCHEDULE_MS.len());
    }

    /// Follows an interface recreated under the same name (new index, maybe a new
    /// MAC) and maps pinned afresh by a rebuilt datapath: reopens them and programs
    /// every owned VIP again (with gratuitous ARPs, the MAC may have changed).
    fn follow_datapath(&mut self) {
        self.next_follow = Instant::now() + Duration::from_secs(1);
        let mut again = false;
        let iface = &self.cfg.interface;
        if let Some(i) = crate::netdev::ifindex(iface).filter(|i| *i != self.ifindex) {
            match (Sender::open(i), crate::netdev::interface_mac(iface)) {
                (Ok(sender), Some(mac)) => {
                    info!(%iface, ifindex = i, "announce interface recreated; following it");
                    (self.garp, self.ifindex, self.mac) = (sender, i, mac);
                    again = true;
                }
                (Err(e), _) => warn!(%iface, error = %e, "reopening the GARP socket"),
                (_, None) => warn!(%iface, "recreated interface has no MAC yet"),
            }
        }
        let pinned = MapInfo::from_pin(self.cfg.pin_path.join(names::L2_VIPS4)).map(|m| m.id());
        if pinned.is_ok_and(|id| id != self.maps.id) {
            match Maps::open(&self.cfg.pin_path) {
                Ok(maps) => {
                    info!("datapath maps pinned afresh; programming owned VIPs again");
                    self.maps = maps;
                    again = true;
                }
                Err(e) => warn!(error = %e, "reopening the L2 maps"),
            }
        }
        if again {
            self.refresh_deadline();
            self.owned.clear();
            self.replies.clear();
        }
    }

    /// Pushes the datapath's dead-man deadline forward.
    fn refresh_deadline(&mut self) {
        let deadline = monotonic_ns() + DEADMAN.as_nanos() as u64;
        if let Err(e) = self.maps.config.set(config::L2_DEADLINE, deadline, 0) {
            warn!(error = %e, "refreshing the L2 dead-man deadline");
        }
    }

    /// Adds new ARP replies per owned VIP to `xlb_l2_arp_replies_total{vip}`.
    fn count_replies(&mut self) {
        for vip in &self.owned {
            let key = u32::from_ne_bytes(vip.octets());
            let Ok(v) = self.maps.stats.get(&key, 0) else {
                continue;
            };
            let total: u64 = v.iter().sum();
            let seen = self.replies.entry(*vip).or_default();
            if total > *seen {
                self.metrics
                    .l2
                    .arp_replies
                    .get_or_create(&vec![("vip", vip.to_string())])
                    .inc_by(total - *seen);
                *seen = total;
            }
        }
    }
}
