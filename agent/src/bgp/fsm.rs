//! The BGP session state machine of RFC 4271 §8 as pure data: [`Session::step`] takes
//! the time and one [`Event`] and returns the [`Action`]s a driver performs. No I/O,
//! no clock of its own, so tests drive it with a simulated clock.
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

/// Inputs of the machine (RFC 4271 §8.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Event 1.
    ManualStart,
    /// Event 2: the operator (or the agent shutting down) stops the session.
    ManualStop,
    /// Events 16/17: the TCP connection is up.
    TcpConnectionConfirmed,
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
        }
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
        [self.connect_retry_at, self.hold_at, self.keepalive_at]
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
                self.connect_retry_at = None;
                self.hold_at = Some(now + OPEN_HOLD);
                vec![Action::SendOpen(self.config.open.clone())]
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
                Ok(()) => {
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
            },
            (State::OpenConfirm, Event::KeepAliveMsg) => {
                self.state = State::Established;
                self.failures = 0;
                self.arm_hold(now);
                vec![Action::Established]
            }
            (State::Established, Event::KeepAliveMsg | Event::UpdateMsg) => {
                self.arm_hold(now);
                vec![]
            }
            (State::OpenSent | State::OpenConfirm | State::Established, Event::Tick) => {
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
}
