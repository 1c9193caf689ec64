//! The BGP session state machine of RFC 4271 §8 as pure data: [`Session::step`] takes
//! the time and one [`Event`] and returns the [`Action`]s a driver performs. No I/O,
//! no clock of its own, so tests drive it with a simulated clock.
//!
//! Both opens of §8.2.1 are modelled: the speaker connects (active) and accepts the
//! peer's connection (passive). While the session's connection waits for OPENs, a
//! second one may arrive; the machine then keeps both until the peer's first OPEN
//! names its BGP Identifier and resolves the collision (§6.8) with Cease / Connection
//! Collision Resolution (RFC 4486 §3, subcode 7) on the loser.
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::codec::{
    AFI_IPV4, AFI_IPV6, Capability, DecodeError, GracefulRestart, GracefulRestartFamily,
    Notification, Open, SAFI_UNICAST,
};

/// Session states (RFC 4271 §8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Refuses connections.
    Idle,
    /// Waiting for the TCP connection.
    Connect,
    /// Waiting to retry the connection.
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for KEEPALIVE.
    OpenConfirm,
    /// Routes flow.
    Established,
}

/// Which side opened a TCP connection (§6.8 keeps the one opened by the speaker with
/// the higher BGP Identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We connected to the peer.
    Outgoing,
    /// The peer connected to us.
    Incoming,
}

/// Inputs of the machine (RFC 4271 §8.1). Without a [`Direction`] in its name, an
/// event concerns the session's connection; the `Other*` events concern the second
/// connection of a collision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Event 1.
    ManualStart,
    /// Event 2: the operator (or the agent shutting down) stops the session.
    ManualStop,
    /// Event 16 (Tcp_CR_Acked): our connection to the peer is up.
    TcpConnectionConfirmed,
    /// Event 17 (RFC 4271 calls it TcpConnectionConfirmed): the peer connected to us,
    /// from its configured address (event 14, TcpConnection_Valid, is the driver's
    /// check).
    TcpConnectionAccepted,
    /// The peer's OPEN on the second connection of a collision, already decoded.
    OtherOpen(Open),
    /// The second connection closed or failed (sent anything but an OPEN first).
    OtherFails,
    /// Event 18.
    TcpConnectionFails,
    /// Event 19: the peer's OPEN, already decoded.
    BgpOpen(Open),
    /// Events 21/22/25/28: a message failed to decode.
    MessageError(DecodeError),
    /// Event 24/25: NOTIFICATION received.
    NotifMsg(Notification),
    /// Event 26.
    KeepAliveMsg,
    /// Event 27.
    UpdateMsg,
    /// A timer deadline passed; the machine works out which one (events 9, 10, 11).
    Tick,
    /// The peer's BFD session went Down (RFC 5882 §4.3: the client protocol is taken
    /// down at once, not after the hold time).
    BfdDown,
}

/// Outputs for the driver to perform, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the TCP connection to the peer.
    Connect,
    /// Close the TCP connection.
    Disconnect,
    /// Send our OPEN.
    SendOpen(Open),
    /// Send a KEEPALIVE.
    SendKeepalive,
    /// Send this NOTIFICATION (then [`Action::Disconnect`] follows).
    SendNotification(Notification),
    /// The session is up: advertise the RIB.
    Established,
    /// The session went down: withdraw what was learned (nothing, for this speaker) and
    /// stop sending.
    Down,
    /// The accepted connection becomes the session's connection; a connection
    /// attempt in progress is abandoned.
    Adopt,
    /// Keep the accepted connection as the second one of a collision (§6.8) and send
    /// it this OPEN.
    HoldOther(Open),
    /// Send this NOTIFICATION on the accepted connection and close it.
    Reject(Notification),
    /// Send this NOTIFICATION on the second connection and close it.
    CloseOther(Notification),
    /// The second connection replaces the session's connection (closed just before).
    Promote,
}

/// Static session configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The OPEN we send (our AS, proposed hold time, identifier, capabilities).
    pub open: Open,
    /// The AS the peer must have (§6.2 Bad Peer AS otherwise).
    pub peer_asn: u32,
    /// ConnectRetry time (§10: 120 s suggested); doubles per failure up to 8×.
    pub connect_retry: Duration,
    /// KeepaliveTime, if not a third of the negotiated hold time (§10 suggests a
    /// third); never more than the hold time.
    pub keepalive: Option<Duration>,
}

/// One session's state and timers (RFC 4271 §8.2.2, §10).
#[derive(Debug)]
pub struct Session {
    config: Config,
    state: State,
    failures: u32,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    hold: Duration,
    keepalive: Duration,
    peer: Option<Open>,
    /// Who opened the session's connection, once there is one.
    direction: Option<Direction>,
    /// The hold deadline of the second connection of a collision (always one the
    /// peer opened: we dial only from Connect/Active), while it waits for its OPEN.
    other: Option<Instant>,
}

/// The large hold time used while waiting for the peer's OPEN (§8.2.2: 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);

impl Session {
    /// A session in Idle.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            state: State::Idle,
            failures: 0,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            hold: Duration::ZERO,
            keepalive: Duration::ZERO,
            peer: None,
            direction: None,
            other: None,
        }
    }

    /// Who opened the session's connection.
    pub fn direction(&self) -> Option<Direction> {
        self.direction
    }

    /// A second connection is waiting for the collision to be resolved.
    pub fn has_other(&self) -> bool {
        self.other.is_some()
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The negotiated hold time (§4.2: the smaller of both; zero disables).
    pub fn hold_time(&self) -> Duration {
        self.hold
    }

    /// The peer's OPEN once received.
    pub fn peer(&self) -> Option<&Open> {
        self.peer.as_ref()
    }

    /// When the driver must next deliver [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.connect_retry_at,
            self.hold_at,
            self.keepalive_at,
            self.other,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn retry_delay(&self) -> Duration {
        // Back-off: ConnectRetry × 2^failures, capped at 8× (RFC 4271 §8.1.1 leaves
        // DampPeerOscillations to the implementation).
        self.config.connect_retry * (1u32 << self.failures.min(3))
    }

    fn drop_session(&mut self, now: Instant, mut actions: Vec<Action>) -> Vec<Action> {
        let was_established = self.state == State::Established;
        actions.push(Action::Disconnect);
        if was_established {
            actions.push(Action::Down);
        }
        if let Some(hold_at) = self.other.take() {
            // The peer's own connection is still waiting for its OPEN: it carries on
            // as the session's (§6.8 has nothing left to resolve).
            actions.push(Action::Promote);
            self.promote(hold_at);
            return actions;
        }
        self.direction = None;
        self.failures = self.failures.saturating_add(1);
        self.hold_at = None;
        self.keepalive_at = None;
        self.peer = None;
        // Automatic restart after the back-off, unlike a manual stop (§8.1.1
        // AllowAutomaticStart).
        self.state = State::Active;
        self.connect_retry_at = Some(now + self.retry_delay());
        actions
    }

    /// The second connection (waiting for its OPEN, deadline `hold_at`) is now the
    /// session's, in OpenSent.
    fn promote(&mut self, hold_at: Instant) {
        self.state = State::OpenSent;
        self.direction = Some(Direction::Incoming);
        self.connect_retry_at = None;
        self.hold_at = Some(hold_at);
        self.keepalive_at = None;
        self.peer = None;
    }

    /// Keeps the session's connection rather than the second one (§6.8) for a peer
    /// whose identifier is `remote_id`; equal identifiers (allowed between ASes, RFC
    /// 6286 §2.3) leave it to the higher AS.
    fn keeps_session_connection(&self, remote_id: Ipv4Addr) -> bool {
        let local_id = self.config.open.bgp_id;
        let ours_dominant = if local_id == remote_id {
            self.config.open.asn() > self.config.peer_asn
        } else {
            keep_local_connection(local_id, remote_id)
        };
        ours_dominant == (self.direction == Some(Direction::Outgoing))
    }

    /// A valid OPEN on the session's connection in OpenSent: negotiate the timers
    /// (§4.2) and move to OpenConfirm.
    fn accept_open(&mut self, now: Instant, open: Open) -> Vec<Action> {
        let ours = self.config.open.hold_time;
        let hold = ours.min(open.hold_time);
        self.hold = Duration::from_secs(hold.into());
        self.keepalive = self
            .config
            .keepalive
            .filter(|k| !k.is_zero())
            .map_or(self.hold / 3, |k| k.min(self.hold));
        self.peer = Some(open);
        self.state = State::OpenConfirm;
        self.arm(now);
        vec![Action::SendKeepalive]
    }

    fn notify_and_drop(&mut self, now: Instant, n: Notification) -> Vec<Action> {
        self.drop_session(now, vec![Action::SendNotification(n)])
    }

    /// Feeds one event at `now`; returns the actions to perform (RFC 4271 §8.2.2).
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match (self.state, event) {
            (State::Idle, Event::ManualStart) => {
                self.state = State::Connect;
                self.connect_retry_at = Some(now + self.retry_delay());
                vec![Action::Connect]
            }
            (_, Event::ManualStart) => vec![],
            (State::Idle, _) => vec![],
            (state, Event::ManualStop) => {
                // RFC 4486 §4: Cease / Administrative Shutdown.
                let mut actions = vec![];
                if self.other.is_some() {
                    actions.push(Action::CloseOther(cease_shutdown()));
                }
                if matches!(
                    state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    actions.push(Action::SendNotification(cease_shutdown()));
                }
                actions.push(Action::Disconnect);
                if state == State::Established {
                    actions.push(Action::Down);
                }
                *self = Self::new(self.config.clone());
                actions
            }
            (State::Connect | State::Active, Event::TcpConnectionConfirmed) => {
                self.state = State::OpenSent;
                self.direction = Some(Direction::Outgoing);
                self.connect_retry_at = None;
                self.hold_at = Some(now + OPEN_HOLD);
                vec![Action::SendOpen(self.config.open.clone())]
            }
            (State::Connect | State::Active, Event::TcpConnectionAccepted) => {
                // Passive open (§8.2.2, Connect and Active states, event 17); the
                // attempt of our own in progress, if any, is given up.
                self.state = State::OpenSent;
                self.direction = Some(Direction::Incoming);
                self.connect_retry_at = None;
                self.hold_at = Some(now + OPEN_HOLD);
                vec![Action::Adopt, Action::SendOpen(self.config.open.clone())]
            }
            (State::OpenSent | State::OpenConfirm, Event::TcpConnectionAccepted)
                if self.other.is_none() && self.direction == Some(Direction::Outgoing) =>
            {
                // Two connections to one peer (§6.8): both run until the peer's
                // first OPEN tells its BGP Identifier.
                self.other = Some(now + OPEN_HOLD);
                vec![Action::HoldOther(self.config.open.clone())]
            }
            (_, Event::TcpConnectionAccepted) => {
                // Established (§6.8: the existing session wins), or a second
                // connection already waiting, or the peer's own connection already in
                // use: Cease / Connection Collision Resolution (RFC 4486 §3).
                vec![Action::Reject(cease_collision())]
            }
            (State::OpenSent | State::OpenConfirm, Event::OtherOpen(open))
                if self.other.is_some() =>
            {
                if let Err(e) = self.check_open(&open) {
                    self.other = None;
                    return vec![Action::CloseOther(notification(&e))];
                }
                if self.keeps_session_connection(open.bgp_id) {
                    self.other = None;
                    return vec![Action::CloseOther(cease_collision())];
                }
                // The peer's connection wins: it replaces ours, with its OPEN in hand.
                let hold_at = self.other.take().unwrap_or(now + OPEN_HOLD);
                let mut actions = vec![
                    Action::SendNotification(cease_collision()),
                    Action::Disconnect,
                    Action::Promote,
                ];
                self.promote(hold_at);
                actions.extend(self.accept_open(now, open));
                actions
            }
            (_, Event::OtherOpen(_) | Event::OtherFails) => {
                // The second connection is gone (or, resolved already, never
                // mattered): nothing left of it here.
                self.other = None;
                vec![]
            }
            (State::Connect | State::Active, Event::TcpConnectionFails) => {
                self.failures = self.failures.saturating_add(1);
                self.state = State::Active;
                self.connect_retry_at = Some(now + self.retry_delay());
                vec![]
            }
            (State::Connect | State::Active, Event::Tick) => {
                if self.connect_retry_at.is_some_and(|t| now >= t) {
                    self.state = State::Connect;
                    self.connect_retry_at = Some(now + self.retry_delay());
                    vec![Action::Connect]
                } else {
                    vec![]
                }
            }
            (State::OpenSent, Event::BgpOpen(open)) => match self.check_open(&open) {
                Err(e) => self.notify_and_drop(now, notification(&e)),
                Ok(()) => match self.other {
                    None => self.accept_open(now, open),
                    Some(_) if self.keeps_session_connection(open.bgp_id) => {
                        // §6.8, resolved on the first OPEN: its identifier is the
                        // peer's for both connections.
                        self.other = None;
                        let mut actions = vec![Action::CloseOther(cease_collision())];
                        actions.extend(self.accept_open(now, open));
                        actions
                    }
                    Some(hold_at) => {
                        // The peer's connection wins; it has yet to send its OPEN.
                        self.other = None;
                        self.promote(hold_at);
                        vec![
                            Action::SendNotification(cease_collision()),
                            Action::Disconnect,
                            Action::Promote,
                        ]
                    }
                },
            },
            (State::OpenConfirm, Event::KeepAliveMsg) => {
                self.state = State::Established;
                self.failures = 0;
                self.arm_hold(now);
                let mut actions = vec![];
                if self.other.take().is_some() {
                    // §6.8: a collision with an Established session closes the new
                    // connection.
                    actions.push(Action::CloseOther(cease_collision()));
                }
                actions.push(Action::Established);
                actions
            }
            (State::Established, Event::KeepAliveMsg | Event::UpdateMsg) => {
                self.arm_hold(now);
                vec![]
            }
            (State::OpenSent | State::OpenConfirm | State::Established, Event::Tick) => {
                if self.other.is_some_and(|t| now >= t) {
                    // The second connection's OPEN never came (§8.2.2 OpenSent: Hold
                    // Timer Expired).
                    self.other = None;
                    return vec![Action::CloseOther(Notification {
                        code: 4,
                        subcode: 0,
                        data: vec![],
                    })];
                }
                if self.hold_at.is_some_and(|t| now >= t) {
                    // §6.5: Hold Timer Expired.
                    return self.notify_and_drop(
                        now,
                        Notification {
                            code: 4,
                            subcode: 0,
                            data: vec![],
                        },
                    );
                }
                if self.keepalive_at.is_some_and(|t| now >= t) {
                    self.keepalive_at = Some(now + self.keepalive);
                    return vec![Action::SendKeepalive];
                }
                vec![]
            }
            (State::OpenSent | State::OpenConfirm | State::Established, Event::BfdDown) => {
                // Cease / BFD Down (RFC 9384 §3); the connection is likely dead anyway.
                self.notify_and_drop(
                    now,
                    Notification {
                        code: 6,
                        subcode: 10,
                        data: vec![],
                    },
                )
            }
            (_, Event::BfdDown) => vec![],
            (_, Event::MessageError(e)) => self.notify_and_drop(now, notification(&e)),
            (_, Event::NotifMsg(_)) | (_, Event::TcpConnectionFails) => {
                self.drop_session(now, vec![])
            }
            // Anything else out of order is an FSM error (§6.6: code 5, subcode by state,
            // RFC 6608).
            (state, _) => {
                let subcode = match state {
                    State::OpenSent => 1,
                    State::OpenConfirm => 2,
                    State::Established => 3,
                    _ => 0,
                };
                self.notify_and_drop(
                    now,
                    Notification {
                        code: 5,
                        subcode,
                        data: vec![],
                    },
                )
            }
        }
    }

    fn arm(&mut self, now: Instant) {
        self.arm_hold(now);
        self.keepalive_at = (!self.hold.is_zero()).then(|| now + self.keepalive);
    }

    fn arm_hold(&mut self, now: Instant) {
        // §4.2: a hold time of zero means neither hold nor keepalive timers run.
        self.hold_at = (!self.hold.is_zero()).then(|| now + self.hold);
        if self.hold.is_zero() {
            self.keepalive_at = None;
        }
    }

    fn check_open(&self, open: &Open) -> Result<(), DecodeError> {
        if open.asn() != self.config.peer_asn {
            return Err(DecodeError::BadPeerAs(open.asn()));
        }
        if open.bgp_id == self.config.open.bgp_id && open.asn() == self.config.open.asn() {
            return Err(DecodeError::BadBgpIdentifier(open.bgp_id));
        }
        Ok(())
    }
}

/// Cease / Administrative Shutdown (RFC 4486 §4, subcode 2).
pub fn cease_shutdown() -> Notification {
    Notification {
        code: 6,
        subcode: 2,
        data: vec![],
    }
}

/// Cease / Connection Collision Resolution (RFC 4486 §3, subcode 7).
pub fn cease_collision() -> Notification {
    Notification {
        code: 6,
        subcode: 7,
        data: vec![],
    }
}

/// Which connection survives a collision (RFC 4271 §6.8): the one initiated by the
/// speaker with the higher BGP Identifier. `true` keeps the connection we opened.
pub fn keep_local_connection(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

/// The NOTIFICATION a decoding error asks for (RFC 4271 §6).
fn notification(e: &DecodeError) -> Notification {
    let (code, subcode, data) = e.notification();
    Notification {
        code,
        subcode,
        data,
    }
}

/// Restart State bit of the graceful-restart flags (RFC 4724 §3).
const GR_RESTART_STATE: u8 = 0x8;

/// The graceful-restart capability to advertise (RFC 4724 §3–§4.1): the R bit after a
/// restart, so the router keeps our routes as stale until the new session's End-of-RIB
/// or the restart time passes; forwarding state is preserved (the datapath outlives
/// the agent).
pub fn graceful_restart_capability(restarting: bool, restart_time: u16) -> Capability {
    let families = [AFI_IPV4, AFI_IPV6].map(|afi| GracefulRestartFamily {
        afi,
        safi: SAFI_UNICAST,
        forwarding: true,
    });
    Capability::GracefulRestart(GracefulRestart {
        flags: if restarting { GR_RESTART_STATE } else { 0 },
        restart_time: restart_time.min(0x0fff),
        families: families.to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn open(asn: u16, hold: u16, id: [u8; 4]) -> Open {
        Open {
            my_as: asn,
            hold_time: hold,
            bgp_id: Ipv4Addr::from(id),
            capabilities: vec![],
        }
    }

    fn session(hold: u16) -> Session {
        Session::new(Config {
            open: open(65001, hold, [10, 0, 0, 1]),
            peer_asn: 65000,
            connect_retry: Duration::from_secs(10),
            keepalive: None,
        })
    }

    fn established(hold_ours: u16, hold_peer: u16) -> (Session, Instant) {
        let t = Instant::now();
        let mut s = session(hold_ours);
        assert_eq!(s.step(t, Event::ManualStart), vec![Action::Connect]);
        assert!(matches!(
            s.step(t, Event::TcpConnectionConfirmed)[..],
            [Action::SendOpen(_)]
        ));
        assert_eq!(
            s.step(t, Event::BgpOpen(open(65000, hold_peer, [10, 0, 0, 254]))),
            vec![Action::SendKeepalive]
        );
        assert_eq!(s.step(t, Event::KeepAliveMsg), vec![Action::Established]);
        assert_eq!(s.state(), State::Established);
        (s, t)
    }

    #[test]
    fn hold_time_is_the_smaller_and_keepalive_a_third() {
        let (mut s, t) = established(90, 30);
        assert_eq!(s.hold_time(), Duration::from_secs(30));
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(10)));
        assert_eq!(
            s.step(t + Duration::from_secs(10), Event::Tick),
            vec![Action::SendKeepalive]
        );
    }

    #[test]
    fn hold_timer_expiry_sends_notification_4_0() {
        let (mut s, t) = established(90, 90);
        s.step(t + Duration::from_secs(60), Event::KeepAliveMsg);
        // Refreshed at 60 s: still up at 149 s, down at 150 s.
        let early = s.step(t + Duration::from_secs(149), Event::Tick);
        assert!(
            !early
                .iter()
                .any(|a| matches!(a, Action::SendNotification(_)))
        );
        assert_eq!(s.state(), State::Established);
        let a = s.step(t + Duration::from_secs(150), Event::Tick);
        assert_eq!(
            a[0],
            Action::SendNotification(Notification {
                code: 4,
                subcode: 0,
                data: vec![]
            })
        );
        assert!(a.contains(&Action::Down));
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn zero_hold_time_disables_hold_and_keepalive() {
        let (s, _) = established(0, 90);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn wrong_peer_as_is_open_error_2_2() {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        s.step(t, Event::TcpConnectionConfirmed);
        let a = s.step(t, Event::BgpOpen(open(65099, 90, [10, 0, 0, 2])));
        assert!(matches!(&a[0], Action::SendNotification(n) if (n.code, n.subcode) == (2, 2)));
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn decode_error_in_open_sent_sends_its_notification() {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        s.step(t, Event::TcpConnectionConfirmed);
        let a = s.step(t, Event::MessageError(DecodeError::UnacceptableHoldTime(1)));
        assert!(matches!(&a[0], Action::SendNotification(n) if (n.code, n.subcode) == (2, 6)));
    }

    #[test]
    fn manual_stop_sends_administrative_shutdown() {
        let (mut s, t) = established(90, 90);
        let a = s.step(t, Event::ManualStop);
        assert_eq!(
            a,
            vec![
                Action::SendNotification(cease_shutdown()),
                Action::Disconnect,
                Action::Down
            ]
        );
        assert_eq!(s.state(), State::Idle);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn connect_retry_backs_off_to_eight_times() {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        let mut now = t;
        let mut delays = vec![];
        for _ in 0..5 {
            s.step(now, Event::TcpConnectionFails);
            let d = s.next_deadline().unwrap();
            delays.push((d - now).as_secs());
            now = d;
            assert_eq!(s.step(now, Event::Tick), vec![Action::Connect]);
        }
        assert_eq!(delays, vec![20, 40, 80, 80, 80]);
    }

    #[test]
    fn update_in_open_confirm_is_fsm_error() {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        s.step(t, Event::TcpConnectionConfirmed);
        s.step(t, Event::BgpOpen(open(65000, 90, [10, 0, 0, 2])));
        let a = s.step(t, Event::UpdateMsg);
        assert!(matches!(&a[0], Action::SendNotification(n) if (n.code, n.subcode) == (5, 2)));
    }

    #[test]
    fn collision_keeps_connection_of_higher_identifier() {
        let lo = Ipv4Addr::new(10, 0, 0, 1);
        let hi = Ipv4Addr::new(10, 0, 0, 200);
        assert!(keep_local_connection(hi, lo));
        assert!(!keep_local_connection(lo, hi));
    }

    #[test]
    fn restarting_speaker_sets_r_bit_and_caps_time() {
        let Capability::GracefulRestart(gr) = graceful_restart_capability(true, 5000) else {
            panic!()
        };
        assert_eq!(gr.flags, GR_RESTART_STATE);
        assert_eq!(gr.restart_time, 0x0fff);
        assert!(gr.families.iter().all(|f| f.forwarding));
    }

    #[test]
    fn bfd_down_takes_an_established_session_down_with_cease_10() {
        let (mut s, t) = established(90, 90);
        let a = s.step(t + Duration::from_secs(1), Event::BfdDown);
        assert_eq!(
            a[0],
            Action::SendNotification(Notification {
                code: 6,
                subcode: 10,
                data: vec![]
            })
        );
        assert!(a.contains(&Action::Down));
        assert_eq!(s.state(), State::Active);
        // Not connected: nothing to take down.
        assert_eq!(s.step(t + Duration::from_secs(2), Event::BfdDown), vec![]);
    }

    /// Our identifier is 10.0.0.1 (`session`); a peer with a higher one wins
    /// collisions, a lower one loses them.
    const HIGH: [u8; 4] = [10, 0, 0, 254];
    const LOW: [u8; 4] = [10, 0, 0, 0];

    fn cease_7() -> Action {
        Action::SendNotification(cease_collision())
    }

    #[test]
    fn passive_open_from_active_adopts_the_peers_connection() {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        // Our connection attempt failed; the peer connects to us meanwhile.
        s.step(t, Event::TcpConnectionFails);
        assert_eq!(s.state(), State::Active);
        let a = s.step(t + Duration::from_secs(1), Event::TcpConnectionAccepted);
        assert!(
            matches!(a[..], [Action::Adopt, Action::SendOpen(_)]),
            "{a:?}"
        );
        assert_eq!(s.state(), State::OpenSent);
        assert_eq!(s.direction(), Some(Direction::Incoming));
        // The connect retry timer is stopped: only the open hold timer (240 s) runs.
        assert_eq!(
            s.next_deadline(),
            Some(t + Duration::from_secs(1) + OPEN_HOLD)
        );
        assert_eq!(
            s.step(t, Event::BgpOpen(open(65000, 90, HIGH))),
            vec![Action::SendKeepalive]
        );
        assert_eq!(s.step(t, Event::KeepAliveMsg), vec![Action::Established]);
    }

    #[test]
    fn passive_open_while_connecting_gives_up_our_attempt() {
        let t = Instant::now();
        let mut s = session(90);
        assert_eq!(s.step(t, Event::ManualStart), vec![Action::Connect]);
        assert_eq!(s.state(), State::Connect);
        let a = s.step(t, Event::TcpConnectionAccepted);
        assert_eq!(a[0], Action::Adopt);
        assert_eq!(s.state(), State::OpenSent);
        // No reconnect while the peer's connection is in use.
        let a = s.step(t + Duration::from_secs(30), Event::Tick);
        assert!(!a.contains(&Action::Connect), "{a:?}");
    }

    #[test]
    fn an_established_session_rejects_a_new_connection_with_cease_7() {
        let (mut s, t) = established(90, 90);
        assert_eq!(
            s.step(t, Event::TcpConnectionAccepted),
            vec![Action::Reject(cease_collision())]
        );
        assert_eq!(s.state(), State::Established);
        assert!(!s.has_other());
    }

    /// Our connection in OpenSent, the peer's accepted beside it.
    fn colliding() -> (Session, Instant) {
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        s.step(t, Event::TcpConnectionConfirmed);
        let a = s.step(t, Event::TcpConnectionAccepted);
        assert!(matches!(a[..], [Action::HoldOther(_)]), "{a:?}");
        assert!(s.has_other());
        (s, t)
    }

    #[test]
    fn collision_resolved_on_our_connections_open_keeps_it_for_a_lower_peer_id() {
        let (mut s, t) = colliding();
        let a = s.step(t, Event::BgpOpen(open(65000, 90, LOW)));
        assert_eq!(
            a,
            vec![Action::CloseOther(cease_collision()), Action::SendKeepalive]
        );
        assert_eq!(s.state(), State::OpenConfirm);
        assert_eq!(s.direction(), Some(Direction::Outgoing));
        assert!(!s.has_other());
    }

    #[test]
    fn collision_resolved_on_our_connections_open_yields_to_a_higher_peer_id() {
        let (mut s, t) = colliding();
        let a = s.step(t, Event::BgpOpen(open(65000, 90, HIGH)));
        assert_eq!(a, vec![cease_7(), Action::Disconnect, Action::Promote]);
        // The peer's connection carries on, still waiting for its OPEN.
        assert_eq!(s.state(), State::OpenSent);
        assert_eq!(s.direction(), Some(Direction::Incoming));
        assert_eq!(
            s.step(t, Event::BgpOpen(open(65000, 90, HIGH))),
            vec![Action::SendKeepalive]
        );
        assert_eq!(s.step(t, Event::KeepAliveMsg), vec![Action::Established]);
    }

    #[test]
    fn collision_resolved_on_the_peers_connections_open() {
        // A higher peer identifier: its connection replaces ours, OPEN in hand.
        let (mut s, t) = colliding();
        let a = s.step(t, Event::OtherOpen(open(65000, 30, HIGH)));
        assert_eq!(
            a,
            vec![
                cease_7(),
                Action::Disconnect,
                Action::Promote,
                Action::SendKeepalive
            ]
        );
        assert_eq!(s.state(), State::OpenConfirm);
        assert_eq!(s.direction(), Some(Direction::Incoming));
        assert_eq!(s.hold_time(), Duration::from_secs(30));
        assert_eq!(s.step(t, Event::KeepAliveMsg), vec![Action::Established]);

        // A lower one: ours stays, the peer's is closed.
        let (mut s, t) = colliding();
        assert_eq!(
            s.step(t, Event::OtherOpen(open(65000, 90, LOW))),
            vec![Action::CloseOther(cease_collision())]
        );
        assert_eq!(s.state(), State::OpenSent);
        assert_eq!(s.direction(), Some(Direction::Outgoing));
        // A bad OPEN on the second connection closes that one only.
        let (mut s, t) = colliding();
        let a = s.step(t, Event::OtherOpen(open(65099, 90, HIGH)));
        assert!(matches!(&a[..], [Action::CloseOther(n)] if (n.code, n.subcode) == (2, 2)));
        assert_eq!(s.state(), State::OpenSent);
    }

    #[test]
    fn collision_with_open_confirm_and_established() {
        // Our connection in OpenConfirm when the peer's arrives: the peer's OPEN
        // decides (RFC 4271 §6.8 examines OpenConfirm connections).
        let t = Instant::now();
        let mut s = session(90);
        s.step(t, Event::ManualStart);
        s.step(t, Event::TcpConnectionConfirmed);
        s.step(t, Event::BgpOpen(open(65000, 90, LOW)));
        assert!(matches!(
            s.step(t, Event::TcpConnectionAccepted)[..],
            [Action::HoldOther(_)]
        ));
        // A third connection is refused outright.
        assert_eq!(
            s.step(t, Event::TcpConnectionAccepted),
            vec![Action::Reject(cease_collision())]
        );
        // Our connection reaches Established first: the waiting one is closed.
        assert_eq!(
            s.step(t, Event::KeepAliveMsg),
            vec![Action::CloseOther(cease_collision()), Action::Established]
        );
        assert!(!s.has_other());
        assert_eq!(s.step(t, Event::OtherOpen(open(65000, 90, LOW))), vec![]);
    }

    #[test]
    fn losing_our_connection_promotes_the_peers() {
        // The peer resolved the collision first and closed our connection (Cease/7
        // received): its own connection carries on, without a reconnect or back-off.
        let (mut s, t) = colliding();
        let a = s.step(t, Event::NotifMsg(cease_collision()));
        assert_eq!(a, vec![Action::Disconnect, Action::Promote]);
        assert_eq!(s.state(), State::OpenSent);
        assert_eq!(s.direction(), Some(Direction::Incoming));
        assert_eq!(s.next_deadline(), Some(t + OPEN_HOLD));
        // The peer's connection closing while ours goes on changes nothing else.
        let (mut s, t) = colliding();
        assert_eq!(s.step(t, Event::OtherFails), vec![]);
        assert!(!s.has_other());
        assert_eq!(s.state(), State::OpenSent);
    }

    #[test]
    fn the_second_connections_open_hold_timer_expires_on_its_own() {
        // Neither connection's OPEN arrives: the second is closed at 240 s (4/0),
        // alone; ours (same deadline, checked on the next tick) follows.
        let (mut s, t) = colliding();
        let a = s.step(t + OPEN_HOLD, Event::Tick);
        assert_eq!(
            a,
            vec![Action::CloseOther(Notification {
                code: 4,
                subcode: 0,
                data: vec![]
            })]
        );
        assert!(!s.has_other());
        let a = s.step(t + OPEN_HOLD, Event::Tick);
        assert!(matches!(&a[0], Action::SendNotification(n) if n.code == 4));
        assert_eq!(s.state(), State::Active);
    }

    #[test]
    fn manual_stop_closes_both_connections() {
        let (mut s, t) = colliding();
        let a = s.step(t, Event::ManualStop);
        assert_eq!(
            a,
            vec![
                Action::CloseOther(cease_shutdown()),
                Action::SendNotification(cease_shutdown()),
                Action::Disconnect
            ]
        );
        assert_eq!(s.state(), State::Idle);
    }
}
