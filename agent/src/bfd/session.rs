//! The tokio driver of BFD sessions over single-hop IP (RFC 5881).
//!
//! A [`Speaker`] owns one UDP socket on the local address and port 3784 that receives
//! for every session, demultiplexed by Your Discriminator or, while that is 0, by the
//! source address (RFC 5880 §6.3). Each session sends from a socket of its own bound to
//! a port in 49152–65535 that it keeps for life (RFC 5881 §4), with TTL (hop limit)
//! 255, and received packets whose TTL is not 255 are dropped (GTSM, RFC 5881 §5).
//! Each session is a task around a [`Session`] state machine.
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::fsm::{Action, BfdConfig, Event, Session};
use super::packet::{self, Diag, Packet, State};

/// The destination port of single-hop BFD Control packets (RFC 5881 §4).
pub const PORT: u16 = 3784;
/// The source ports a session may use (RFC 5881 §4).
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Single-hop packets are sent with, and must arrive with, TTL 255 (RFC 5881 §5).
const TTL: u8 = 255;
/// Packets queued for one session before further ones are dropped.
const QUEUE: usize = 64;
/// The longest [`Speaker::admin_down_all`] waits for its AdminDown packets to go out.
const ADMIN_DOWN_WAIT: Duration = Duration::from_secs(5);

/// Why a speaker or session could not be set up.
#[derive(Debug, Error)]
pub enum BfdError {
    /// Called outside a Tokio runtime.
    #[error("BFD needs a Tokio runtime to run its tasks on")]
    NoRuntime,
    /// A socket could not be bound or configured.
    #[error("BFD socket on {addr}: {source}")]
    Socket {
        /// The address bound (port 0 while a source port was being searched).
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
    },
    /// Every source port of 49152–65535 is taken on this address.
    #[error("no free BFD source port in 49152-65535 on {0}")]
    NoSourcePort(IpAddr),
}

/// What a session last reported, for the BGP session that depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// Local session state (RFC 5880 §6.2).
    pub state: State,
    /// Why it last changed (RFC 5880 §4.1).
    pub diag: Diag,
    /// The last change to Down came from the peer's AdminDown (RFC 5880 §6.8.16): a
    /// planned shutdown, which must not be treated as a path failure.
    pub peer_admin_down: bool,
    /// The negotiated transmit interval before jitter (RFC 5880 §6.8.7).
    pub tx_interval: Duration,
    /// The Detection Time (RFC 5880 §6.8.4), once the peer has been heard.
    pub detection_time: Option<Duration>,
}

impl PeerState {
    /// Whether the session is Up.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Down for a reason that is a failure of the path or the peer (not AdminDown on
    /// either side): what should take the BGP session down at once.
    pub fn failed(&self) -> bool {
        self.state == State::Down && !self.peer_admin_down && self.diag != Diag::None
    }
}

enum Command {
    Configure(BfdConfig),
    AdminDown(oneshot::Sender<()>),
    Remove,
}

struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<PeerState>,
    task: JoinHandle<()>,
}

/// Where received packets go: by our discriminator and by the peer's address.
#[derive(Default)]
struct Routes {
    by_peer: HashMap<IpAddr, (u32, mpsc::Sender<Packet>)>,
    by_discr: HashMap<u32, IpAddr>,
}

/// The BFD sessions of one local address (RFC 5881). Dropping it stops every task
/// at once, without AdminDown (as a crash would): call [`Speaker::admin_down_all`]
/// first for a planned shutdown.
pub struct Speaker {
    local: SocketAddr,
    peer_port: u16,
    runtime: Handle,
    routes: Arc<Mutex<Routes>>,
    sessions: Mutex<HashMap<IpAddr, SessionHandle>>,
    receiver: JoinHandle<()>,
}

impl Speaker {
    /// Binds the receive socket on `local`:`port` ([`PORT`] in production, 0 for any)
    /// and starts receiving. Must be called within a Tokio runtime.
    pub fn bind(local: IpAddr, port: u16) -> Result<Speaker, BfdError> {
        let runtime = Handle::try_current().map_err(|_| BfdError::NoRuntime)?;
        let addr = SocketAddr::new(local, port);
        let err = |source| BfdError::Socket { addr, source };
        let std = StdUdpSocket::bind(addr).map_err(err)?;
        match local {
            IpAddr::V4(_) => set_int_opt(&std, libc::IPPROTO_IP, libc::IP_RECVTTL, 1),
            IpAddr::V6(_) => set_int_opt(&std, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1),
        }
        .map_err(err)?;
        std.set_nonblocking(true).map_err(err)?;
        let bound = std.local_addr().map_err(err)?;
        let socket = {
            let _enter = runtime.enter();
            UdpSocket::from_std(std).map_err(err)?
        };
        let routes = Arc::new(Mutex::new(Routes::default()));
        let receiver = runtime.spawn(receive(socket, routes.clone()));
        Ok(Speaker {
            local: bound,
            peer_port: PORT,
            runtime,
            routes,
            sessions: Mutex::new(HashMap::new()),
            receiver,
        })
    }

    /// Sends to this port on peers instead of [`PORT`] (two speakers on one host).
    pub fn with_peer_port(mut self, port: u16) -> Self {
        self.peer_port = port;
        self
    }

    /// The address the receive socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts a session with `peer` (or reconfigures the existing one) and returns a
    /// view of its state.
    pub fn add(
        &self,
        peer: IpAddr,
        config: BfdConfig,
    ) -> Result<watch::Receiver<PeerState>, BfdError> {
        let mut sessions = lock(&self.sessions);
        if let Some(h) = sessions.get(&peer) {
            let _ = h.commands.send(Command::Configure(config));
            return Ok(h.state.clone());
        }
        let socket = bind_source(self.local.ip())?;
        let socket = {
            let _enter = self.runtime.enter();
            let addr = self.local;
            UdpSocket::from_std(socket).map_err(|source| BfdError::Socket { addr, source })?
        };
        let (packets_tx, packets) = mpsc::channel(QUEUE);
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(PeerState {
            state: State::Down,
            diag: Diag::None,
            peer_admin_down: false,
            tx_interval: Duration::ZERO,
            detection_time: None,
        });
        let discr = {
            let mut routes = lock(&self.routes);
            // Non-zero, unique here, and random (RFC 5880 §6.8.1).
            let mut discr = 0;
            for salt in 0u64.. {
                discr = random(salt) as u32;
                if discr != 0 && !routes.by_discr.contains_key(&discr) {
                    break;
                }
            }
            routes.by_discr.insert(discr, peer);
            routes.by_peer.insert(peer, (discr, packets_tx));
            discr
        };
        let fsm = Session::new(Instant::now(), config, discr, random(u64::from(discr)));
        debug!(%peer, discr, "BFD session added");
        let driver = Driver {
            fsm,
            socket,
            peer: SocketAddr::new(peer, self.peer_port),
            state: state_tx,
        };
        let task = self.runtime.spawn(driver.run(packets, commands));
        sessions.insert(
            peer,
            SessionHandle {
                commands: commands_tx,
                state: state.clone(),
                task,
            },
        );
        Ok(state)
    }

    /// The last state of the session with `peer`, if there is one.
    pub fn state(&self, peer: IpAddr) -> Option<PeerState> {
        let sessions = self.sessions.lock().ok()?;
        sessions.get(&peer).map(|s| *s.state.borrow())
    }

    /// Ends the session with `peer`, telling it with one AdminDown packet so that it
    /// does not count as a failure (RFC 5880 §6.8.16).
    pub fn remove(&self, peer: IpAddr) {
        let Some(handle) = lock(&self.sessions).remove(&peer) else {
            return;
        };
        let mut routes = lock(&self.routes);
        if let Some((discr, _)) = routes.by_peer.remove(&peer) {
            routes.by_discr.remove(&discr);
        }
        let _ = handle.commands.send(Command::Remove);
    }

    /// Changes a session's timers or role without resetting it (a Poll Sequence, RFC
    /// 5880 §6.8.3); `false` when there is no session with `peer`.
    pub fn update(&self, peer: IpAddr, config: BfdConfig) -> bool {
        lock(&self.sessions)
            .get(&peer)
            .is_some_and(|h| h.commands.send(Command::Configure(config)).is_ok())
    }

    /// Takes every session AdminDown (RFC 5880 §6.8.16) and returns once each has sent
    /// its AdminDown packets for one of the peer's Detection Times (at most 5 s): what
    /// the agent does on SIGTERM, so that routers keep graceful-restart routes instead
    /// of treating the shutdown as a failure.
    pub async fn admin_down_all(&self) {
        let acks: Vec<_> = lock(&self.sessions)
            .values()
            .filter_map(|h| {
                let (tx, rx) = oneshot::channel();
                h.commands.send(Command::AdminDown(tx)).ok().map(|()| rx)
            })
            .collect();
        let all = futures::future::join_all(acks);
        if tokio::time::timeout(ADMIN_DOWN_WAIT, all).await.is_err() {
            warn!("BFD AdminDown not sent on every session within {ADMIN_DOWN_WAIT:?}");
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.receiver.abort();
        let sessions = self
            .sessions
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for h in sessions.values() {
            h.task.abort();
        }
    }
}

/// One session's task: the state machine, its sending socket and its view.
struct Driver {
    fsm: Session,
    socket: UdpSocket,
    peer: SocketAddr,
    state: watch::Sender<PeerState>,
}

impl Driver {
    async fn run(
        mut self,
        mut packets: mpsc::Receiver<Packet>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut waiting: Vec<oneshot::Sender<()>> = vec![];
        loop {
            let deadline = self.fsm.next_deadline();
            let (event, last) = tokio::select! {
                Some(p) = packets.recv() => (Event::Received(p), false),
                c = commands.recv() => match c {
                    Some(Command::Configure(config)) => (Event::Configure(config), false),
                    Some(Command::AdminDown(ack)) => {
                        waiting.push(ack);
                        (Event::AdminDown, false)
                    }
                    Some(Command::Remove) => (Event::AdminDown, true),
                    None => return,
                },
                () = sleep_until(deadline) => (Event::Tick, false),
            };
            let actions = self.fsm.step(Instant::now(), event);
            self.perform(actions).await;
            if last {
                return;
            }
            if !self.fsm.admin_down_pending() {
                for ack in waiting.drain(..) {
                    let _ = ack.send(());
                }
            }
        }
    }

    async fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(p) => {
                    if let Err(e) = self.socket.send_to(&packet::encode(&p), self.peer).await {
                        debug!(peer = %self.peer.ip(), "BFD send failed: {e}");
                    }
                }
                Action::StateChanged {
                    from,
                    to,
                    diag,
                    peer_admin_down,
                } => {
                    info!(
                        peer = %self.peer.ip(),
                        ?from,
                        ?to,
                        ?diag,
                        peer_admin_down,
                        "BFD session state changed"
                    );
                    self.state.send_modify(|s| {
                        s.state = to;
                        s.diag = diag;
                        s.peer_admin_down = peer_admin_down;
                    });
                }
            }
        }
        let (tx_interval, detection_time) = (self.fsm.tx_interval(), self.fsm.detection_time());
        self.state.send_if_modified(|s| {
            let changed = (s.tx_interval, s.detection_time) != (tx_interval, detection_time);
            s.tx_interval = tx_interval;
            s.detection_time = detection_time;
            changed
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The receive loop shared by all sessions (RFC 5880 §6.3, RFC 5881 §5).
async fn receive(socket: UdpSocket, routes: Arc<Mutex<Routes>>) {
    let mut buf = [0u8; 256];
    let fd = socket.as_raw_fd();
    loop {
        let (len, from, ttl) = match socket
            .async_io(Interest::READABLE, || recv_with_ttl(fd, &mut buf))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!("BFD receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if ttl != Some(TTL) {
            debug!(%from, ?ttl, "BFD packet dropped: TTL is not 255 (GTSM)");
            continue;
        }
        let p = match packet::decode(buf.get(..len).unwrap_or_default()) {
            Ok(p) => p,
            Err(e) => {
                debug!(%from, "BFD packet discarded: {e}");
                continue;
            }
        };
        let queue = {
            let routes = lock(&routes);
            let peer = if p.your_discr != 0 {
                routes.by_discr.get(&p.your_discr).copied()
            } else {
                Some(from.ip())
            };
            // A session's packets come from its peer (single hop has no other path).
            peer.filter(|&peer| peer == from.ip())
                .and_then(|peer| routes.by_peer.get(&peer))
                .map(|(_, queue)| queue.clone())
        };
        match queue {
            Some(q) => {
                if q.try_send(p).is_err() {
                    debug!(%from, "BFD packet dropped: session queue full");
                }
            }
            None => debug!(%from, your_discr = p.your_discr, "BFD packet for no session"),
        }
    }
}

/// A sending socket on `local` with a source port of 49152–65535 (RFC 5881 §4) and TTL
/// or hop limit 255 (§5).
fn bind_source(local: IpAddr) -> Result<StdUdpSocket, BfdError> {
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    let first = random(0) as u32 % span;
    for i in 0..span {
        let port = *SOURCE_PORTS.start() + ((first + i) % span) as u16;
        let addr = SocketAddr::new(local, port);
        let err = |source| BfdError::Socket { addr, source };
        let socket = match StdUdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(err(e)),
        };
        match local {
            IpAddr::V4(_) => socket.set_ttl(u32::from(TTL)),
            IpAddr::V6(_) => set_int_opt(
                &socket,
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                libc::c_int::from(TTL),
            ),
        }
        .map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        return Ok(socket);
    }
    Err(BfdError::NoSourcePort(local))
}

fn set_int_opt(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is the length passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram, its source and the TTL or hop limit it arrived with (IP_RECVTTL /
/// IPV6_RECVHOPLIMIT control messages; `None` if the kernel gave none).
fn recv_with_ttl(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a few int-sized control messages, aligned as cmsghdr needs.
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points at a live local of the length given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: the kernel wrote msg_controllen bytes of control messages into `control`;
    // CMSG_FIRSTHDR/CMSG_NXTHDR never step outside them, and the data is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let ours = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_TTL)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_HOPLIMIT);
            if ours {
                let v: libc::c_int = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ttl = u8::try_from(v).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let from =
        socket_addr(&addr).ok_or_else(|| io::Error::other("BFD datagram from no address"))?;
    Ok((n as usize, from, ttl))
}

fn socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A random 64-bit value: SipHash with the process's random keys (std's `RandomState`),
/// enough for discriminators, source ports and jitter seeds.
fn random(salt: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one((salt, Instant::now()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    /// Generous: the defaults detect in 900 ms; this only catches a hang.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// Two speakers on one host, each sending to the other's port.
    fn pair() -> (Speaker, Speaker) {
        let a = Speaker::bind(A, 0).unwrap();
        let b = Speaker::bind(B, 0).unwrap();
        let (pa, pb) = (a.local_addr().port(), b.local_addr().port());
        (a.with_peer_port(pb), b.with_peer_port(pa))
    }

    async fn wait(
        rx: &mut watch::Receiver<PeerState>,
        f: impl FnMut(&PeerState) -> bool,
    ) -> PeerState {
        *tokio::time::timeout(PATIENCE, rx.wait_for(f))
            .await
            .expect("state reached in time")
            .expect("session alive")
    }

    async fn both_up() -> (
        Speaker,
        Speaker,
        watch::Receiver<PeerState>,
        watch::Receiver<PeerState>,
    ) {
        let (a, b) = pair();
        let mut at_a = a.add(B, BfdConfig::default()).unwrap();
        let mut at_b = b.add(A, BfdConfig::default()).unwrap();
        wait(&mut at_a, PeerState::is_up).await;
        wait(&mut at_b, PeerState::is_up).await;
        (a, b, at_a, at_b)
    }

    #[tokio::test]
    async fn two_speakers_come_up() {
        let (_a, _b, at_a, at_b) = both_up().await;
        for s in [*at_a.borrow(), *at_b.borrow()] {
            assert_eq!(
                (s.state, s.diag, s.peer_admin_down),
                (State::Up, Diag::None, false)
            );
        }
    }

    #[tokio::test]
    async fn dropped_speaker_is_a_detection_timeout_on_the_other_side() {
        let (a, _b, _at_a, mut at_b) = both_up().await;
        drop(a);
        let s = wait(&mut at_b, |s| s.state == State::Down).await;
        assert_eq!(s.diag, Diag::ControlDetectionTimeExpired);
        assert!(!s.peer_admin_down);
        assert!(s.failed());
    }

    #[tokio::test]
    async fn admin_down_all_is_a_planned_shutdown_on_the_other_side() {
        let (a, _b, at_a, mut at_b) = both_up().await;
        a.admin_down_all().await;
        assert_eq!(at_a.borrow().state, State::AdminDown);
        assert_eq!(at_a.borrow().diag, Diag::AdministrativelyDown);
        let s = wait(&mut at_b, |s| s.state == State::Down).await;
        assert_eq!(s.diag, Diag::NeighborSignaledSessionDown);
        assert!(s.peer_admin_down);
        assert!(!s.failed());
    }

    #[tokio::test]
    async fn removed_session_tells_the_peer_admin_down() {
        let (a, _b, _at_a, mut at_b) = both_up().await;
        a.remove(B);
        let s = wait(&mut at_b, |s| s.state == State::Down).await;
        assert!(s.peer_admin_down);
    }

    #[tokio::test]
    async fn update_renegotiates_timers_without_resetting() {
        let (a, _b, mut at_a, mut at_b) = both_up().await;
        wait(&mut at_b, |s| {
            s.detection_time == Some(Duration::from_millis(900))
        })
        .await;
        let slower = BfdConfig {
            desired_min_tx: Duration::from_millis(500),
            required_min_rx: Duration::from_millis(500),
            detect_multiplier: 4,
            passive: false,
        };
        assert!(a.update(B, slower));
        assert!(!a.update(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), slower));
        // B: sends at max(300, 500) ms and waits 4 × max(300, 500) ms; A: 500 ms and
        // 3 × 500 ms, once its Poll is answered.
        let s = wait(&mut at_b, |s| {
            s.detection_time == Some(Duration::from_secs(2))
                && s.tx_interval == Duration::from_millis(500)
        })
        .await;
        assert!(s.is_up());
        let s = wait(&mut at_a, |s| {
            s.detection_time == Some(Duration::from_millis(1500))
                && s.tx_interval == Duration::from_millis(500)
        })
        .await;
        assert!(s.is_up());
        assert_eq!(s.diag, Diag::None);
    }

    /// A test socket standing in for the peer, reading TTLs as the speaker does.
    async fn raw_peer() -> (UdpSocket, u16) {
        let std = StdUdpSocket::bind((A, 0)).unwrap();
        set_int_opt(&std, libc::IPPROTO_IP, libc::IP_RECVTTL, 1).unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        (UdpSocket::from_std(std).unwrap(), port)
    }

    async fn recv(socket: &UdpSocket) -> (Packet, SocketAddr, Option<u8>) {
        let mut buf = [0u8; 64];
        let fd = socket.as_raw_fd();
        let (n, from, ttl) = tokio::time::timeout(
            PATIENCE,
            socket.async_io(Interest::READABLE, || recv_with_ttl(fd, &mut buf)),
        )
        .await
        .unwrap()
        .unwrap();
        (packet::decode(&buf[..n]).unwrap(), from, ttl)
    }

    #[tokio::test]
    async fn sends_with_ttl_255_from_a_dynamic_port_and_drops_lower_ttls() {
        let (peer, port) = raw_peer().await;
        let b = Speaker::bind(B, 0).unwrap().with_peer_port(port);
        let mut at_b = b.add(A, BfdConfig::default()).unwrap();
        let (first, from, ttl) = recv(&peer).await;
        assert_eq!(ttl, Some(255));
        assert!(SOURCE_PORTS.contains(&from.port()), "{from}");
        assert_eq!(first.state, State::Down);
        let to_b = b.local_addr();
        let init = Packet {
            diag: Diag::None,
            state: State::Init,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 42,
            your_discr: first.my_discr,
            desired_min_tx_us: 1_000_000,
            required_min_rx_us: 300_000,
            required_min_echo_rx_us: 0,
        };
        // An Init with TTL 64 would take B straight Up; dropped, the Down after it
        // takes B to Init.
        peer.set_ttl(64).unwrap();
        peer.send_to(&packet::encode(&init), to_b).await.unwrap();
        peer.set_ttl(255).unwrap();
        let down = Packet {
            state: State::Down,
            your_discr: 0,
            ..init
        };
        peer.send_to(&packet::encode(&down), to_b).await.unwrap();
        let s = wait(&mut at_b, |s| {
            s.state != State::Down || s.diag != Diag::None
        })
        .await;
        assert_eq!(s.state, State::Init);
        // Every later packet keeps the same source port (RFC 5881 §4).
        for _ in 0..2 {
            let (_, again, ttl) = recv(&peer).await;
            assert_eq!((again, ttl), (from, Some(255)));
        }
    }

    #[test]
    fn bind_outside_a_runtime_is_an_error() {
        assert!(matches!(Speaker::bind(A, 0), Err(BfdError::NoRuntime)));
    }
}
