//! One BGP session as a tokio task: the [`fsm`](super::fsm) decides, this module does
//! the I/O (TCP with TTL and MD5 set before connecting, message framing with the
//! [`codec`](super::codec)) and sends the routes of its [`PeerPlan`] as UPDATEs,
//! only the difference when the plan changes (RFC 4271 §9.2: the Adj-RIB-Out).
//!
//! Active and passive open (§8.2.1): the session connects to its peer, and takes the
//! connections the [`speaker`](super::speaker)'s listener accepted from the peer's
//! address ([`Handle::accept`]). When both exist at once, the FSM resolves the
//! collision (§6.8); this driver keeps the second connection beside the first until
//! it does.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::codec::{
    self, AFI_IPV4, AS_TRANS, AsPathSegment, Capability, Context, MAX_MESSAGE_LEN, Message,
    Notification, Open, Origin, PathAttribute, SAFI_UNICAST, SegmentKind, Update,
};
use super::fsm::{self, Action, Event, State};
use super::plan::{RouteAttrs, SessionConfig};

/// The routes a session advertises (its share of the plan).
pub type Routes = BTreeMap<Ipv4Net, RouteAttrs>;

/// How a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Keep running.
    No,
    /// Cease / Administrative Shutdown (RFC 4486 §4): the peer withdraws our routes
    /// at once (the peer was removed, or the agent stops without graceful restart).
    Cease,
    /// Close the connection without a NOTIFICATION, so a peer that negotiated graceful
    /// restart keeps our routes as stale while the agent restarts (RFC 4724 §4.2);
    /// without the capability this is a Cease as well.
    Restart,
}

/// What the rest of the agent sees of a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// RFC 4271 state name (`Idle` .. `Established`).
    pub state: &'static str,
    /// Prefixes the peer has been sent and not withdrawn.
    pub advertised: usize,
    /// The last NOTIFICATION sent or received, as `code/subcode`, and which way.
    pub last_error: Option<String>,
    /// Connections closed with Cease / Connection Collision Resolution (RFC 4486 §3).
    pub collisions: u64,
}

/// ConnectRetry base (RFC 4271 §10 suggests 120 s; a node whose router restarts should
/// come back sooner). The FSM doubles it per failure, up to 8×.
const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Restart Time advertised with graceful restart (RFC 4724 §3): how long the router
/// keeps our routes while no session is up. An agent restart takes seconds.
const RESTART_TIME: u16 = 120;
/// Longest a write may block before the session is given up (a peer that stopped
/// reading is dead to us, whatever its hold time).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// NLRI per UPDATE: 4096 bytes less header and attributes leave room for this many /32s.
const NLRI_PER_UPDATE: usize = 600;

/// A running session; dropping it aborts the task (no NOTIFICATION).
pub struct Handle {
    stop: watch::Sender<Stop>,
    routes: watch::Sender<Arc<Routes>>,
    incoming: mpsc::Sender<TcpStream>,
    /// The session's state, for metrics and inspection.
    pub status: watch::Receiver<Status>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Hands the session a new set of routes (sent as the difference, at once if
    /// Established).
    pub fn set_routes(&self, routes: Arc<Routes>) {
        self.routes.send_if_modified(|r| {
            let changed = **r != *routes;
            if changed {
                *r = routes;
            }
            changed
        });
    }

    /// Hands the session a connection accepted from the peer's address (passive open,
    /// RFC 4271 §8.2.1); dropped (closed) if the session has several waiting already.
    pub fn accept(&self, stream: TcpStream) {
        if self.incoming.try_send(stream).is_err() {
            debug!("BGP: session busy or gone; accepted connection closed");
        }
    }

    /// Ends the session as `how` says and waits (at most a second) for it.
    pub async fn stop(self, how: Stop) {
        let _ = self.stop.send(how);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Starts the session. `restarting`: the agent restarted with the datapath still
/// forwarding, so graceful restart's Restart State and Forwarding State bits are set
/// (RFC 4724 §4.1).
/// `bfd`: the state of the peer's BFD session, when it runs one; a failure takes
/// the BGP session down at once (RFC 5882 §4.3).
pub fn spawn(
    name: String,
    cfg: SessionConfig,
    routes: Arc<Routes>,
    restarting: bool,
    bfd: Option<watch::Receiver<crate::bfd::PeerState>>,
) -> Handle {
    let (stop, stop_rx) = watch::channel(Stop::No);
    let (routes_tx, routes_rx) = watch::channel(routes);
    let (incoming, incoming_rx) = mpsc::channel(2);
    let (status_tx, status) = watch::channel(Status {
        state: "Idle",
        ..Default::default()
    });
    let task = tokio::spawn(async move {
        let mut driver = Driver::new(name, cfg, restarting, status_tx);
        driver.run(stop_rx, routes_rx, incoming_rx, bfd).await;
    });
    Handle {
        stop,
        routes: routes_tx,
        incoming,
        status,
        task,
    }
}

/// One open connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    local: IpAddr,
}

impl Conn {
    fn new(stream: TcpStream) -> std::io::Result<Conn> {
        let local = stream.local_addr()?.ip();
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(MAX_MESSAGE_LEN),
            local,
        })
    }
}

/// Writes one message, giving up after [`WRITE_TIMEOUT`].
async fn write_msg(c: &mut Conn, msg: &Message, ctx: &Context) -> std::io::Result<()> {
    let bytes = codec::encode(msg, ctx);
    match tokio::time::timeout(WRITE_TIMEOUT, c.stream.write_all(&bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

struct Driver {
    name: String,
    cfg: SessionConfig,
    fsm: fsm::Session,
    status: watch::Sender<Status>,
    /// The session's connection.
    conn: Option<Conn>,
    /// The second connection of a collision (RFC 4271 §6.8), until it is resolved.
    other: Option<Conn>,
    /// A connection just accepted, until the FSM says what becomes of it.
    incoming: Option<Conn>,
    /// The session's connection changed with bytes already read: decode them.
    rescan: bool,
    /// What the peer has been sent (and not withdrawn).
    sent: Routes,
    /// Codec context of the current session (4-octet AS negotiated).
    ctx: Context,
    /// Both sides advertised graceful restart on the current session.
    graceful: bool,
}

impl Driver {
    fn new(
        name: String,
        cfg: SessionConfig,
        restarting: bool,
        status: watch::Sender<Status>,
    ) -> Driver {
        let fsm = fsm::Session::new(fsm::Config {
            open: our_open(&cfg, restarting),
            peer_asn: cfg.peer_asn,
            connect_retry: CONNECT_RETRY,
            keepalive: cfg.keepalive_time,
        });
        Driver {
            name,
            cfg,
            fsm,
            status,
            conn: None,
            other: None,
            incoming: None,
            rescan: false,
            sent: Routes::new(),
            ctx: Context::default(),
            graceful: false,
        }
    }

    async fn run(
        &mut self,
        mut stop: watch::Receiver<Stop>,
        mut routes: watch::Receiver<Arc<Routes>>,
        mut incoming: mpsc::Receiver<TcpStream>,
        mut bfd: Option<watch::Receiver<crate::bfd::PeerState>>,
    ) {
        let mut connecting: Option<
            std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>,
        > = None;
        let mut pending = self.fsm.step(std::time::Instant::now(), Event::ManualStart);
        loop {
            // Perform what the FSM asked for; I/O failures come back as events.
            while !pending.is_empty() || std::mem::take(&mut self.rescan) {
                if pending.is_empty() {
                    pending = self.receive(std::time::Instant::now()).await;
                    continue;
                }
                let actions = std::mem::take(&mut pending);
                for action in actions {
                    if let Some(event) = self.perform(action, &mut connecting, &routes).await {
                        let now = std::time::Instant::now();
                        pending.extend(self.fsm.step(now, event));
                    }
                }
            }
            if let Some(mut c) = self.incoming.take() {
                let _ = c.stream.shutdown().await;
            }
            self.publish_state();
            let deadline = self.fsm.next_deadline().map(Instant::from_std);
            let established = self.fsm.state() == State::Established;
            tokio::select! {
                r = stop.changed() => {
                    let how = if r.is_err() { Stop::Cease } else { *stop.borrow() };
                    if how == Stop::No {
                        continue;
                    }
                    self.finish(how).await;
                    return;
                }
                result = async {
                    match connecting.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if connecting.is_some() => {
                    connecting = None;
                    let now = std::time::Instant::now();
                    match result {
                        Ok(stream) => match self.open_conn(stream) {
                            Ok(()) => pending = self.fsm.step(now, Event::TcpConnectionConfirmed),
                            Err(e) => {
                                debug!(peer = %self.name, error = %e, "BGP: connection unusable");
                                pending = self.fsm.step(now, Event::TcpConnectionFails);
                            }
                        },
                        Err(e) => {
                            debug!(peer = %self.name, error = %e, "BGP: connect failed");
                            pending = self.fsm.step(now, Event::TcpConnectionFails);
                        }
                    }
                }
                Some(stream) = incoming.recv() => {
                    let now = std::time::Instant::now();
                    match Conn::new(stream) {
                        Ok(c) => {
                            info!(peer = %self.name, state = state_name(self.fsm.state()), "BGP: the peer connected to us");
                            self.incoming = Some(c);
                            pending = self.fsm.step(now, Event::TcpConnectionAccepted);
                        }
                        Err(e) => debug!(peer = %self.name, error = %e, "BGP: accepted connection unusable"),
                    }
                }
                read = async {
                    match self.other.as_mut() {
                        Some(c) => c.stream.read_buf(&mut c.buf).await,
                        None => std::future::pending().await,
                    }
                }, if self.other.is_some() => {
                    let now = std::time::Instant::now();
                    match read {
                        Ok(0) | Err(_) => {
                            debug!(peer = %self.name, "BGP: the second connection closed");
                            self.other = None;
                            pending = self.fsm.step(now, Event::OtherFails);
                        }
                        Ok(_) => pending = self.receive_other(now),
                    }
                }
                read = async {
                    match self.conn.as_mut() {
                        Some(c) => c.stream.read_buf(&mut c.buf).await,
                        None => std::future::pending().await,
                    }
                }, if self.conn.is_some() => {
                    let now = std::time::Instant::now();
                    match read {
                        Ok(0) | Err(_) => {
                            info!(peer = %self.name, "BGP: the peer closed the connection");
                            self.conn = None;
                            pending = self.fsm.step(now, Event::TcpConnectionFails);
                        }
                        Ok(_) => pending = self.receive(now).await,
                    }
                }
                r = async {
                    match bfd.as_mut() {
                        Some(b) => b.changed().await,
                        None => std::future::pending().await,
                    }
                }, if bfd.is_some() => {
                    let failed = match (&r, bfd.as_mut()) {
                        (Ok(()), Some(b)) => b.borrow_and_update().failed(),
                        _ => {
                            // The BFD speaker is gone: run on the hold timer alone.
                            bfd = None;
                            false
                        }
                    };
                    if failed {
                        warn!(peer = %self.name, "BGP: BFD session down; taking the BGP session down");
                        pending = self.fsm.step(std::time::Instant::now(), Event::BfdDown);
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    pending = self.fsm.step(std::time::Instant::now(), Event::Tick);
                }
                r = routes.changed(), if established => {
                    if r.is_ok() {
                        let want = routes.borrow_and_update().clone();
                        if let Err(e) = self.advertise(&want, false).await {
                            warn!(peer = %self.name, error = %e, "BGP: sending UPDATE failed");
                            self.conn = None;
                            pending = self.fsm.step(std::time::Instant::now(), Event::TcpConnectionFails);
                        }
                    }
                }
            }
        }
    }

    /// Does one FSM action; returns the event its failure causes, if any.
    async fn perform(
        &mut self,
        action: Action,
        connecting: &mut Option<
            std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>,
        >,
        routes: &watch::Receiver<Arc<Routes>>,
    ) -> Option<Event> {
        match action {
            Action::Adopt => {
                *connecting = None;
                self.conn = self.incoming.take();
                self.ctx = Context::default();
                None
            }
            Action::HoldOther(open) => {
                info!(peer = %self.name, "BGP: two connections to the peer; keeping both until its OPEN (RFC 4271 §6.8)");
                let mut c = self.incoming.take()?;
                match write_msg(&mut c, &Message::Open(open), &Context::default()).await {
                    Ok(()) => {
                        self.other = Some(c);
                        None
                    }
                    Err(_) => Some(Event::OtherFails),
                }
            }
            Action::Reject(n) => {
                let mut c = self.incoming.take()?;
                self.note_notification(&n, "sent on the peer's new connection");
                let _ = write_msg(&mut c, &Message::Notification(n), &Context::default()).await;
                let _ = c.stream.shutdown().await;
                None
            }
            Action::CloseOther(n) => {
                let mut c = self.other.take()?;
                self.note_notification(&n, "sent on the peer's connection");
                let _ = write_msg(&mut c, &Message::Notification(n), &Context::default()).await;
                let _ = c.stream.shutdown().await;
                None
            }
            Action::Promote => {
                info!(peer = %self.name, "BGP: continuing on the connection the peer opened");
                self.conn = self.other.take();
                self.ctx = Context::default();
                self.rescan = true;
                None
            }
            Action::Connect => {
                self.conn = None;
                *connecting = Some(Box::pin(connect(self.cfg.clone())));
                None
            }
            Action::Disconnect => {
                *connecting = None;
                if let Some(mut c) = self.conn.take() {
                    let _ = c.stream.shutdown().await;
                }
                None
            }
            Action::SendOpen(open) => self
                .send(&Message::Open(open))
                .await
                .err()
                .map(|_| Event::TcpConnectionFails),
            Action::SendKeepalive => self
                .send(&Message::Keepalive)
                .await
                .err()
                .map(|_| Event::TcpConnectionFails),
            Action::SendNotification(n) => {
                self.note_notification(&n, "sent");
                // The connection closes next either way.
                let _ = self.send(&Message::Notification(n)).await;
                None
            }
            Action::Established => {
                let peer = self.fsm.peer().cloned();
                let caps = peer
                    .as_ref()
                    .map(|p| p.capabilities.as_slice())
                    .unwrap_or_default();
                self.ctx = Context {
                    four_octet: caps.iter().any(|c| matches!(c, Capability::FourOctetAs(_))),
                };
                self.graceful = self.cfg.graceful_restart
                    && caps
                        .iter()
                        .any(|c| matches!(c, Capability::GracefulRestart(_)));
                info!(
                    peer = %self.name,
                    address = %self.cfg.peer_address,
                    asn = self.cfg.peer_asn,
                    hold = ?self.fsm.hold_time(),
                    graceful_restart = self.graceful,
                    "BGP: session established"
                );
                self.sent.clear();
                let want = routes.borrow().clone();
                match self.advertise(&want, true).await {
                    Ok(()) => None,
                    Err(_) => Some(Event::TcpConnectionFails),
                }
            }
            Action::Down => {
                info!(peer = %self.name, "BGP: session down");
                self.sent.clear();
                None
            }
        }
    }

    /// Decodes every whole message in the buffer into FSM events.
    async fn receive(&mut self, now: std::time::Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let Some(c) = self.conn.as_mut() else {
                return actions;
            };
            let decoded = codec::decode(&c.buf, &self.ctx);
            let event = match decoded {
                Err(e) if e.is_incomplete() => return actions,
                Err(e) => {
                    warn!(peer = %self.name, error = ?e, "BGP: malformed message");
                    c.buf.clear();
                    Event::MessageError(e)
                }
                Ok((msg, used)) => {
                    c.buf.drain(..used);
                    match msg {
                        Message::Open(o) => Event::BgpOpen(o),
                        Message::Keepalive => Event::KeepAliveMsg,
                        // This speaker learns no routes: an UPDATE only proves the
                        // peer alive (its attributes were checked by decoding).
                        Message::Update(_) => Event::UpdateMsg,
                        Message::Notification(n) => {
                            warn!(peer = %self.name, code = n.code, subcode = n.subcode, "BGP: NOTIFICATION received");
                            self.note_error(&n, "received");
                            Event::NotifMsg(n)
                        }
                        Message::RouteRefresh(rr) => {
                            // RFC 2918 §4: send the family's Adj-RIB-Out again.
                            if rr.afi == AFI_IPV4 && self.fsm.state() == State::Established {
                                let all = std::mem::take(&mut self.sent);
                                if self.advertise(&all, false).await.is_err() {
                                    Event::TcpConnectionFails
                                } else {
                                    continue;
                                }
                            } else {
                                continue;
                            }
                        }
                    }
                }
            };
            let failed = matches!(event, Event::MessageError(_) | Event::NotifMsg(_));
            actions.extend(self.fsm.step(now, event));
            // Bytes after a message that closed or replaced the connection are not
            // the session's any more.
            let replaced = actions
                .iter()
                .any(|a| matches!(a, Action::Disconnect | Action::Promote));
            if failed || replaced || self.conn.is_none() {
                return actions;
            }
        }
    }

    /// Sends what `want` adds, changes and removes against what was sent; with
    /// `end_of_rib`, then the IPv4 End-of-RIB marker (RFC 4724 §2: an empty UPDATE).
    async fn advertise(&mut self, want: &Routes, end_of_rib: bool) -> std::io::Result<()> {
        let withdrawn: Vec<Ipv4Net> = self
            .sent
            .keys()
            .filter(|n| !want.contains_key(n))
            .copied()
            .collect();
        for chunk in withdrawn.chunks(NLRI_PER_UPDATE) {
            self.send(&Message::Update(Update {
                withdrawn: chunk.to_vec(),
                ..Default::default()
            }))
            .await?;
        }
        // Group new or changed prefixes by attributes: one UPDATE per group and chunk.
        let mut groups: BTreeMap<&RouteAttrs, Vec<Ipv4Net>> = BTreeMap::new();
        for (net, attrs) in want {
            if self.sent.get(net) != Some(attrs) {
                groups.entry(attrs).or_default().push(*net);
            }
        }
        let next_hop = match self.conn.as_ref().map(|c| c.local) {
            Some(IpAddr::V4(a)) => a,
            // An IPv6 session would carry IPv4 NLRI with an IPv6 next hop (RFC 8950),
            // not done: nothing to send on it.
            _ => return Ok(()),
        };
        for (attrs, nets) in groups {
            let attributes = self.attributes(attrs, next_hop);
            for chunk in nets.chunks(NLRI_PER_UPDATE) {
                self.send(&Message::Update(Update {
                    withdrawn: vec![],
                    attributes: attributes.clone(),
                    nlri: chunk.to_vec(),
                }))
                .await?;
            }
        }
        if end_of_rib {
            self.send(&Message::Update(Update::default())).await?;
        }
        self.sent = want.clone();
        debug!(peer = %self.name, prefixes = self.sent.len(), "BGP: routes sent");
        self.publish_state();
        Ok(())
    }

    /// ORIGIN, AS_PATH (with AS4_PATH for a 2-octet peer, RFC 6793 §4.2.2), NEXT_HOP,
    /// LOCAL_PREF (iBGP only, RFC 4271 §5.1.5), communities.
    fn attributes(&self, attrs: &RouteAttrs, next_hop: Ipv4Addr) -> Vec<PathAttribute> {
        let mut out = vec![PathAttribute::Origin(Origin::Igp)];
        if self.cfg.is_ibgp() {
            out.push(PathAttribute::AsPath(vec![]));
        } else {
            let seq = |asn| {
                vec![AsPathSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn],
                }]
            };
            if self.ctx.four_octet || self.cfg.my_asn <= u32::from(u16::MAX) {
                out.push(PathAttribute::AsPath(seq(self.cfg.my_asn)));
            } else {
                out.push(PathAttribute::AsPath(seq(AS_TRANS)));
                out.push(PathAttribute::As4Path(seq(self.cfg.my_asn)));
            }
        }
        out.push(PathAttribute::NextHop(next_hop));
        if self.cfg.is_ibgp() {
            out.push(PathAttribute::LocalPref(attrs.local_pref.unwrap_or(100)));
        }
        if !attrs.communities.is_empty() {
            out.push(PathAttribute::Communities(
                attrs.communities.iter().copied().collect(),
            ));
        }
        if !attrs.large_communities.is_empty() {
            out.push(PathAttribute::LargeCommunities(
                attrs
                    .large_communities
                    .iter()
                    .map(|[g, a, b]| codec::LargeCommunity {
                        global_admin: *g,
                        local1: *a,
                        local2: *b,
                    })
                    .collect(),
            ));
        }
        out
    }

    async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        let Some(c) = self.conn.as_mut() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        write_msg(c, msg, &self.ctx).await
    }

    fn open_conn(&mut self, stream: TcpStream) -> std::io::Result<()> {
        self.ctx = Context::default();
        self.conn = Some(Conn::new(stream)?);
        Ok(())
    }

    /// Decodes the first message on the second connection: the peer's OPEN, which
    /// lets the FSM resolve the collision; anything else ends that connection.
    fn receive_other(&mut self, now: std::time::Instant) -> Vec<Action> {
        let Some(c) = self.other.as_mut() else {
            return vec![];
        };
        let event = match codec::decode(&c.buf, &Context::default()) {
            Err(e) if e.is_incomplete() => return vec![],
            Ok((Message::Open(o), used)) => {
                c.buf.drain(..used);
                Event::OtherOpen(o)
            }
            other => {
                if let Ok((Message::Notification(n), _)) = &other {
                    self.note_error(n, "received on the peer's connection");
                }
                debug!(peer = %self.name, message = ?other.map(|(m, _)| m), "BGP: the second connection did not start with an OPEN; closed");
                self.other = None;
                Event::OtherFails
            }
        };
        self.fsm.step(now, event)
    }

    async fn finish(&mut self, how: Stop) {
        if how == Stop::Restart && self.graceful {
            info!(peer = %self.name, "BGP: closing for a restart; the peer keeps the routes (graceful restart)");
            for mut c in [self.conn.take(), self.other.take()].into_iter().flatten() {
                let _ = c.stream.shutdown().await;
            }
            return;
        }
        let actions = self.fsm.step(std::time::Instant::now(), Event::ManualStop);
        let mut none = None;
        let (_, routes) = watch::channel(Arc::new(Routes::new()));
        for a in actions {
            let _ = self.perform(a, &mut none, &routes).await;
        }
        self.publish_state();
    }

    /// Logs a NOTIFICATION we send and records it in the status.
    fn note_notification(&self, n: &Notification, way: &str) {
        if (n.code, n.subcode) == (6, 7) {
            info!(
                peer = %self.name,
                kept = ?self.fsm.direction(),
                "BGP: connection collision resolved (RFC 4271 §6.8): Cease/7 {way}"
            );
            self.status.send_modify(|s| s.collisions += 1);
        } else {
            warn!(peer = %self.name, code = n.code, subcode = n.subcode, "BGP: NOTIFICATION {way}");
        }
        self.note_error(n, way);
    }

    fn note_error(&self, n: &Notification, way: &str) {
        let text = format!("{}/{} {way}", n.code, n.subcode);
        self.status.send_modify(|s| s.last_error = Some(text));
    }

    fn publish_state(&self) {
        let state = state_name(self.fsm.state());
        let advertised = self.sent.len();
        self.status.send_if_modified(|s| {
            let changed = s.state != state || s.advertised != advertised;
            s.state = state;
            s.advertised = advertised;
            changed
        });
    }
}

/// RFC 4271 §8.2.2 state names.
fn state_name(s: State) -> &'static str {
    match s {
        State::Idle => "Idle",
        State::Connect => "Connect",
        State::Active => "Active",
        State::OpenSent => "OpenSent",
        State::OpenConfirm => "OpenConfirm",
        State::Established => "Established",
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Our OPEN (RFC 4271 §4.2): 2-octet AS or AS_TRANS (RFC 6793 §4.2.1), capabilities
/// for IPv4 unicast (RFC 4760), route refresh (RFC 2918), the 4-octet AS (RFC 6793)
/// and, when enabled, graceful restart (RFC 4724).
fn our_open(cfg: &SessionConfig, restarting: bool) -> Open {
    let mut capabilities = vec![
        Capability::Multiprotocol {
            afi: AFI_IPV4,
            safi: SAFI_UNICAST,
        },
        Capability::RouteRefresh,
        Capability::FourOctetAs(cfg.my_asn),
    ];
    if cfg.graceful_restart {
        capabilities.push(fsm::graceful_restart_capability(restarting, RESTART_TIME));
    }
    Open {
        my_as: u16::try_from(cfg.my_asn).unwrap_or(AS_TRANS as u16),
        // Validated by the source: 0 or 3..=65535 whole seconds.
        hold_time: u16::try_from(cfg.hold_time.as_secs()).unwrap_or(u16::MAX),
        bgp_id: cfg.router_id,
        capabilities,
    }
}

/// Opens the TCP connection with TTL, source address and MD5 key set before the SYN.
async fn connect(cfg: SessionConfig) -> std::io::Result<TcpStream> {
    let peer = SocketAddr::new(cfg.peer_address, cfg.peer_port);
    let socket = match peer {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    set_ttl(&socket, peer.is_ipv6(), cfg.ttl)?;
    if let Some(min) = cfg.min_ttl {
        set_min_ttl(&socket, peer.is_ipv6(), min)?;
    }
    if let Some(key) = &cfg.password {
        set_md5(&socket, peer.ip(), key.as_bytes())?;
    }
    if let Some(src) = cfg.source_address {
        socket.bind(SocketAddr::new(src, 0))?;
    }
    // A SYN lost to a dead router is retried by the FSM's ConnectRetry timer.
    match tokio::time::timeout(CONNECT_RETRY, socket.connect(peer)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

pub(super) fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: i32,
    name: i32,
    value: &T,
) -> std::io::Result<()> {
    let len = u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX);
    // SAFETY: `value` points to a live `T` of `len` bytes for the call.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// IP_TTL / IPV6_UNICAST_HOPS: 1 for direct eBGP, 255 otherwise.
pub(super) fn set_ttl(socket: &impl AsRawFd, v6: bool, ttl: u8) -> std::io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
    } else {
        (libc::IPPROTO_IP, libc::IP_TTL)
    };
    setsockopt(socket, level, name, &libc::c_int::from(ttl))
}

/// IP_MINTTL / IPV6_MINHOPCOUNT: the kernel drops the connection's segments that
/// arrive with a lower TTL (GTSM, RFC 5082; counted in `TcpExtTCPMinTTLDrop`).
pub(super) fn set_min_ttl(socket: &impl AsRawFd, v6: bool, min: u8) -> std::io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT)
    } else {
        (libc::IPPROTO_IP, libc::IP_MINTTL)
    };
    setsockopt(socket, level, name, &libc::c_int::from(min))
}

/// `struct tcp_md5sig` of include/uapi/linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// TCP MD5 signatures for the connection to `peer` (RFC 2385, Linux TCP_MD5SIG); on
/// a listening socket, for the connections it accepts from `peer`. An empty key
/// removes the peer's.
pub(super) fn set_md5(socket: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut sig = TcpMd5Sig {
        addr: unsafe { std::mem::zeroed() },
        flags: 0,
        prefixlen: 0,
        keylen: 0,
        ifindex: 0,
        key: [0; 80],
    };
    if key.len() > sig.key.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    sig.key[..key.len()].copy_from_slice(key);
    sig.keylen = key.len() as u16;
    match peer {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is aligned for it.
            unsafe { std::ptr::write((&mut sig.addr as *mut libc::sockaddr_storage).cast(), sin) };
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut sig.addr as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    setsockopt(socket, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}
