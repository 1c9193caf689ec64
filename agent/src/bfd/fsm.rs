//! One BFD session in Asynchronous mode (RFC 5880 §6) as pure data: [`Session::step`]
//! takes the time and one [`Event`] and returns the [`Action`]s a driver performs. No
//! I/O, no clock and no randomness of its own (the jitter comes from a seed), so tests
//! drive it with a simulated clock.
//!
//! Not implemented: Demand mode of our own (we never set D, but honour a peer's, §6.6),
//! the Echo function (we advertise Required Min Echo RX 0, §6.8.9) and authentication.
use std::time::{Duration, Instant};

use super::packet::{Diag, Packet, State};

/// Session parameters (RFC 5880 §6.8.1), as MetalLB's BFDProfile names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdConfig {
    /// bfd.DesiredMinTxInterval while Up (`transmitInterval`); at least 1 µs, as 0 is
    /// reserved (§4.1).
    pub desired_min_tx: Duration,
    /// bfd.RequiredMinRxInterval (`receiveInterval`); 0 asks the peer to send nothing.
    pub required_min_rx: Duration,
    /// bfd.DetectMult (`detectMultiplier`); at least 1.
    pub detect_multiplier: u8,
    /// Take the Passive role (§6.1, `passiveMode`): send nothing until the peer has.
    pub passive: bool,
}

impl Default for BfdConfig {
    /// 300 ms × 3, active: MetalLB's and kube-vip's defaults.
    fn default() -> Self {
        Self {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_multiplier: 3,
            passive: false,
        }
    }
}

/// Inputs of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A packet for this session that passed [`super::packet::decode`] (§6.8.6).
    Received(Packet),
    /// A deadline of [`Session::next_deadline`] passed; the machine works out which.
    Tick,
    /// Take the session administratively down (§6.8.16).
    AdminDown,
    /// Enable it again (§6.8.16).
    AdminUp,
    /// New timers or role, applied without resetting the session (Poll, §6.8.3).
    Configure(BfdConfig),
}

/// Outputs for the driver to perform, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Transmit this packet to the peer.
    Send(Packet),
    /// The local state changed.
    StateChanged {
        /// Previous state.
        from: State,
        /// New state.
        to: State,
        /// bfd.LocalDiag after the change.
        diag: Diag,
        /// The peer signalled AdminDown (§6.8.16): a planned shutdown, not a failure,
        /// so routes under graceful restart must be kept.
        peer_admin_down: bool,
    },
}

/// The two timers a Poll Sequence changes (§6.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timers {
    desired_min_tx: Duration,
    required_min_rx: Duration,
}

/// While not Up, bfd.DesiredMinTxInterval is at least one second (§6.8.3).
const IDLE_MIN_TX: Duration = Duration::from_secs(1);
/// bfd.RemoteMinRxInterval before the first packet (§6.8.1: 1 µs).
const INITIAL_REMOTE_MIN_RX: Duration = Duration::from_micros(1);

/// One session's state variables (RFC 5880 §6.8.1) and timers.
#[derive(Debug, Clone)]
pub struct Session {
    config: BfdConfig,
    state: State,
    remote_state: State,
    local_discr: u32,
    remote_discr: u32,
    local_diag: Diag,
    /// What our packets advertise.
    advertised: Timers,
    /// What timing uses: lags `advertised` while a Poll Sequence confirms an increase
    /// of the TX interval or a decrease of the RX interval (§6.8.3).
    in_use: Timers,
    /// The values the current Poll Sequence asks the peer to acknowledge (§6.5).
    polling: Option<Timers>,
    remote_min_rx: Duration,
    remote_desired_min_tx: Duration,
    remote_detect_mult: u8,
    remote_demand: bool,
    last_rx: Option<Instant>,
    next_tx: Option<Instant>,
    /// AdminDown packets still to send at the pace the peer's Detection Time was
    /// computed from (§6.8.16), and that pace.
    admin_burst: u8,
    burst_interval: Duration,
    rng: u64,
}

impl Session {
    /// A session in Down (§6.8.1) with a non-zero, system-unique `local_discr`; `seed`
    /// drives the transmit jitter (§6.8.7). Unless passive, the first packet is due at
    /// `now`.
    pub fn new(now: Instant, config: BfdConfig, local_discr: u32, seed: u64) -> Self {
        let config = sanitize(config);
        let timers = Timers {
            desired_min_tx: config.desired_min_tx.max(IDLE_MIN_TX),
            required_min_rx: config.required_min_rx,
        };
        Self {
            config,
            state: State::Down,
            remote_state: State::Down,
            local_discr,
            remote_discr: 0,
            local_diag: Diag::None,
            advertised: timers,
            in_use: timers,
            polling: None,
            remote_min_rx: INITIAL_REMOTE_MIN_RX,
            remote_desired_min_tx: Duration::ZERO,
            remote_detect_mult: 0,
            remote_demand: false,
            last_rx: None,
            next_tx: (!config.passive).then_some(now),
            admin_burst: 0,
            burst_interval: Duration::ZERO,
            rng: seed,
        }
    }

    /// bfd.SessionState.
    pub fn state(&self) -> State {
        self.state
    }

    /// bfd.RemoteSessionState.
    pub fn remote_state(&self) -> State {
        self.remote_state
    }

    /// bfd.LocalDiag.
    pub fn diag(&self) -> Diag {
        self.local_diag
    }

    /// bfd.LocalDiscr.
    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }

    /// bfd.RemoteDiscr (0 until the peer is heard, and again after a Detection Time).
    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }

    /// Whether a Poll Sequence is in progress (§6.5).
    pub fn polling(&self) -> bool {
        self.polling.is_some()
    }

    /// The negotiated transmit interval before jitter (§6.8.2, §6.8.7): the larger of
    /// our Desired Min TX and the peer's Required Min RX.
    pub fn tx_interval(&self) -> Duration {
        if self.admin_burst > 0 {
            return self.burst_interval;
        }
        self.in_use.desired_min_tx.max(self.remote_min_rx)
    }

    /// The Detection Time in Asynchronous mode (§6.8.4): the peer's Detect Mult times
    /// the larger of our Required Min RX and the peer's Desired Min TX; `None` before
    /// the first packet.
    pub fn detection_time(&self) -> Option<Duration> {
        (self.remote_detect_mult > 0).then(|| {
            self.in_use.required_min_rx.max(self.remote_desired_min_tx)
                * u32::from(self.remote_detect_mult)
        })
    }

    /// Whether AdminDown packets are still being repeated (§6.8.16): the driver of a
    /// shutdown waits for this to turn false.
    pub fn admin_down_pending(&self) -> bool {
        self.state == State::AdminDown && self.admin_burst > 0 && self.periodic_allowed()
    }

    /// When the driver must next deliver [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let detect = self.last_rx.zip(self.detection_time()).map(|(t, d)| t + d);
        [self.next_tx, detect].into_iter().flatten().min()
    }

    /// Feeds one event at `now`; returns the actions to perform.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut actions = vec![];
        match event {
            Event::Received(p) => self.receive(now, &p, &mut actions),
            Event::Tick => self.tick(now, &mut actions),
            Event::AdminDown => {
                if self.state != State::AdminDown {
                    // Repeat the news for one of the peer's Detection Times, at the
                    // pace that Detection Time assumes.
                    self.burst_interval = self.tx_interval();
                    self.admin_burst = self.config.detect_multiplier;
                    self.change(
                        now,
                        State::AdminDown,
                        Diag::AdministrativelyDown,
                        false,
                        &mut actions,
                    );
                }
            }
            Event::AdminUp => {
                if self.state == State::AdminDown {
                    self.admin_burst = 0;
                    self.change(now, State::Down, Diag::None, false, &mut actions);
                }
            }
            Event::Configure(config) => {
                self.config = sanitize(config);
                if self.next_tx.is_none() {
                    self.next_tx = Some(now);
                }
                self.update_timers(now);
                self.reschedule_if_late(now);
            }
        }
        actions
    }

    /// Reception of a Control packet, in the order of RFC 5880 §6.8.6 (the checks on
    /// the packet alone were done by `decode`, session selection by the driver).
    fn receive(&mut self, now: Instant, p: &Packet, actions: &mut Vec<Action>) {
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_demand = p.demand;
        self.remote_min_rx = micros(p.required_min_rx_us);
        self.remote_desired_min_tx = micros(p.desired_min_tx_us);
        self.remote_detect_mult = p.detect_mult;
        if p.fin
            && let Some(confirmed) = self.polling.take()
        {
            self.in_use = confirmed;
            // Values changed during the sequence need a sequence of their own.
            self.update_timers(now);
        }
        if self.state == State::AdminDown {
            self.reschedule_if_late(now);
            return;
        }
        self.last_rx = Some(now);
        match (self.state, p.state) {
            (State::Down, State::AdminDown) => {}
            (_, State::AdminDown) => self.change(
                now,
                State::Down,
                Diag::NeighborSignaledSessionDown,
                true,
                actions,
            ),
            (State::Down, State::Down) => self.change(now, State::Init, Diag::None, false, actions),
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                self.change(now, State::Up, Diag::None, false, actions)
            }
            (State::Up, State::Down) => self.change(
                now,
                State::Down,
                Diag::NeighborSignaledSessionDown,
                false,
                actions,
            ),
            _ => {}
        }
        if p.poll {
            // §6.8.7: answer at once, whatever the timers; never P and F together.
            actions.push(Action::Send(Packet {
                poll: false,
                fin: true,
                ..self.packet()
            }));
        }
        self.reschedule_if_late(now);
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let detect_at = self.last_rx.zip(self.detection_time()).map(|(t, d)| t + d);
        if detect_at.is_some_and(|t| now >= t) {
            // §6.8.4; §6.8.1: bfd.RemoteDiscr is zeroed when the Detection Time passes.
            self.last_rx = None;
            self.remote_discr = 0;
            self.remote_state = State::Down;
            self.remote_demand = false;
            // Nobody is left to answer a Poll: what we advertise applies now.
            self.polling = None;
            self.in_use = self.advertised;
            if matches!(self.state, State::Init | State::Up) {
                self.change(
                    now,
                    State::Down,
                    Diag::ControlDetectionTimeExpired,
                    false,
                    actions,
                );
            }
        }
        if self.next_tx.is_some_and(|t| now >= t) {
            if self.periodic_allowed() {
                actions.push(Action::Send(self.packet()));
                self.sent();
            }
            self.schedule_tx(now);
        }
    }

    /// A state change: record it, bring the timers in line with the new state, and tell
    /// the peer without waiting for the periodic timer.
    fn change(
        &mut self,
        now: Instant,
        to: State,
        diag: Diag,
        peer_admin_down: bool,
        actions: &mut Vec<Action>,
    ) {
        let from = self.state;
        self.state = to;
        self.local_diag = diag;
        actions.push(Action::StateChanged {
            from,
            to,
            diag,
            peer_admin_down,
        });
        self.update_timers(now);
        self.send_now(now, actions);
    }

    /// §6.8.3: the advertised timers follow the configuration (with the 1 s floor while
    /// not Up); any change starts a Poll Sequence when there is a peer to answer it,
    /// and an increase of TX or a decrease of RX takes effect only once it is answered.
    fn update_timers(&mut self, now: Instant) {
        let wanted = Timers {
            desired_min_tx: if self.state == State::Up {
                self.config.desired_min_tx
            } else {
                self.config.desired_min_tx.max(IDLE_MIN_TX)
            },
            required_min_rx: self.config.required_min_rx,
        };
        // Settled: nothing changed, or a Poll is under way (a change made during it
        // gets a Poll of its own once this one is answered).
        let settled = self.polling.is_some() || self.in_use == wanted;
        if wanted == self.advertised && settled {
            return;
        }
        self.advertised = wanted;
        let up = self.state == State::Up;
        if !(up && wanted.desired_min_tx > self.in_use.desired_min_tx) {
            self.in_use.desired_min_tx = wanted.desired_min_tx;
        }
        if !(up && wanted.required_min_rx < self.in_use.required_min_rx) {
            self.in_use.required_min_rx = wanted.required_min_rx;
        }
        if self.remote_discr == 0 {
            // Nobody to answer a Poll: the values simply apply.
            self.in_use = wanted;
        } else if self.polling.is_none() {
            self.polling = Some(wanted);
            // The first packet of the sequence goes out at once.
            if self.may_send() {
                self.next_tx = Some(now);
            }
        }
    }

    /// §6.8.7: a passive session sends nothing until it knows the peer.
    fn may_send(&self) -> bool {
        !(self.config.passive && self.remote_discr == 0)
    }

    /// §6.8.7: no periodic packets when the peer asks for none (Required Min RX 0) or
    /// runs in Demand mode, unless a Poll Sequence is under way.
    fn periodic_allowed(&self) -> bool {
        let remote_demand =
            self.remote_demand && self.state == State::Up && self.remote_state == State::Up;
        self.may_send()
            && (self.polling.is_some() || (!self.remote_min_rx.is_zero() && !remote_demand))
    }

    fn send_now(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.periodic_allowed() {
            actions.push(Action::Send(self.packet()));
            self.sent();
        }
        self.schedule_tx(now);
    }

    fn sent(&mut self) {
        if self.state == State::AdminDown {
            self.admin_burst = self.admin_burst.saturating_sub(1);
        }
    }

    fn schedule_tx(&mut self, now: Instant) {
        self.next_tx = self
            .periodic_allowed()
            .then(|| now + self.jittered(self.tx_interval()));
    }

    /// After the interval shrank (or sending became allowed), do not wait out a timer
    /// armed for the old one.
    fn reschedule_if_late(&mut self, now: Instant) {
        let interval = self.tx_interval();
        if !self.periodic_allowed() {
            self.next_tx = None;
        } else if self.next_tx.is_none_or(|t| t > now + interval) {
            self.schedule_tx(now);
        }
    }

    /// §6.8.7: each interval is reduced by a random 0–25 %, or 10–25 % when Detect Mult
    /// is 1 so that the peer's Detection Time cannot pass between two packets.
    fn jittered(&mut self, interval: Duration) -> Duration {
        let min_cut = if self.config.detect_multiplier == 1 {
            100
        } else {
            0
        };
        let cut = min_cut + (self.next_random() % (251 - min_cut));
        interval * (1000 - cut as u32) / 1000
    }

    /// SplitMix64.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Our Control packet as §6.8.7 fills it.
    fn packet(&self) -> Packet {
        Packet {
            diag: self.local_diag,
            state: self.state,
            poll: self.polling.is_some(),
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: self.config.detect_multiplier,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx_us: micros_u32(self.advertised.desired_min_tx),
            required_min_rx_us: micros_u32(self.advertised.required_min_rx),
            required_min_echo_rx_us: 0,
        }
    }
}

fn sanitize(mut c: BfdConfig) -> BfdConfig {
    c.desired_min_tx = c.desired_min_tx.max(Duration::from_micros(1));
    c.detect_multiplier = c.detect_multiplier.max(1);
    c
}

fn micros(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

fn micros_u32(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const LOCAL: u32 = 0x1111;
    const PEER: u32 = 0x2222;
    const MS: Duration = Duration::from_millis(1);

    fn from_peer(state: State, your_discr: u32) -> Packet {
        Packet {
            diag: Diag::None,
            state,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: PEER,
            your_discr,
            desired_min_tx_us: 300_000,
            required_min_rx_us: 300_000,
            required_min_echo_rx_us: 0,
        }
    }

    fn sent(actions: &[Action]) -> Vec<Packet> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(p) => Some(*p),
                Action::StateChanged { .. } => None,
            })
            .collect()
    }

    fn changes(actions: &[Action]) -> Vec<(State, State, Diag, bool)> {
        actions
            .iter()
            .filter_map(|a| match *a {
                Action::StateChanged {
                    from,
                    to,
                    diag,
                    peer_admin_down,
                } => Some((from, to, diag, peer_admin_down)),
                Action::Send(_) => None,
            })
            .collect()
    }

    /// A session brought Up by hand-made peer packets, the peer's Poll for its 300 ms
    /// interval answered, and ours (for the same) acknowledged; returns the time of the
    /// peer's last packet.
    fn up(config: BfdConfig) -> (Session, Instant) {
        let t = Instant::now();
        let mut s = Session::new(t, config, LOCAL, 7);
        let first = sent(&s.step(t, Event::Tick));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].state, State::Down);
        assert_eq!(first[0].your_discr, 0);
        let a = s.step(t, Event::Received(from_peer(State::Down, 0)));
        assert_eq!(
            changes(&a),
            vec![(State::Down, State::Init, Diag::None, false)]
        );
        assert_eq!(sent(&a)[0].your_discr, PEER);
        let a = s.step(t, Event::Received(from_peer(State::Up, LOCAL)));
        assert_eq!(
            changes(&a),
            vec![(State::Init, State::Up, Diag::None, false)]
        );
        // Up lifts the 1 s floor: a Poll Sequence announces the faster rate.
        let p = sent(&a)[0];
        assert!(p.poll && !p.fin);
        assert_eq!(p.desired_min_tx_us, 300_000);
        let fin = Packet {
            fin: true,
            ..from_peer(State::Up, LOCAL)
        };
        assert!(sent(&s.step(t, Event::Received(fin))).is_empty());
        assert!(!s.polling());
        (s, t)
    }

    /// Two sessions wired back to back with no delay, on a simulated clock.
    struct Pair {
        a: Session,
        b: Session,
        log: Vec<(bool, Instant, Action)>,
    }

    impl Pair {
        fn new(t: Instant, a: BfdConfig, b: BfdConfig) -> Self {
            Self {
                a: Session::new(t, a, LOCAL, 1),
                b: Session::new(t, b, PEER, 2),
                log: vec![],
            }
        }

        fn deliver(&mut self, now: Instant, from_a: bool, actions: Vec<Action>) {
            let mut queue: VecDeque<_> = actions.into_iter().map(|a| (from_a, a)).collect();
            while let Some((from_a, action)) = queue.pop_front() {
                if let Action::Send(p) = action {
                    assert!(!(p.poll && p.fin), "P and F together: {p:?}");
                    let to = if from_a { &mut self.b } else { &mut self.a };
                    let out = to.step(now, Event::Received(p));
                    queue.extend(out.into_iter().map(|a| (!from_a, a)));
                }
                self.log.push((from_a, now, action));
            }
        }

        fn run_until(&mut self, until: Instant) {
            for _ in 0..100_000 {
                let Some(now) = [self.a.next_deadline(), self.b.next_deadline()]
                    .into_iter()
                    .flatten()
                    .min()
                    .filter(|&t| t <= until)
                else {
                    return;
                };
                let out = self.a.step(now, Event::Tick);
                self.deliver(now, true, out);
                let out = self.b.step(now, Event::Tick);
                self.deliver(now, false, out);
            }
            panic!("deadlines do not advance");
        }
    }

    #[test]
    fn three_way_handshake_brings_both_up_at_the_configured_rate() {
        let t = Instant::now();
        let mut pair = Pair::new(t, BfdConfig::default(), BfdConfig::default());
        pair.run_until(t + 3 * IDLE_MIN_TX);
        for s in [&pair.a, &pair.b] {
            assert_eq!(s.state(), State::Up);
            assert!(!s.polling());
            assert_eq!(s.tx_interval(), 300 * MS);
            assert_eq!(s.detection_time(), Some(900 * MS));
        }
        assert_eq!(pair.a.remote_discr(), PEER);
        assert_eq!(pair.b.remote_discr(), LOCAL);
        // Both come up at once: packets go out on state changes, not a second later.
        let up_at: Vec<_> = pair
            .log
            .iter()
            .filter(|(_, _, a)| matches!(a, Action::StateChanged { to: State::Up, .. }))
            .map(|(_, at, _)| *at)
            .collect();
        assert_eq!(up_at, vec![t, t]);
        // Up, packets arrive every 225–300 ms.
        let from_a: Vec<_> = pair
            .log
            .iter()
            .filter(|(from_a, at, a)| *from_a && *at > t && matches!(a, Action::Send(_)))
            .map(|(_, at, _)| *at)
            .collect();
        assert!(from_a.len() >= 9, "{}", from_a.len());
        for w in from_a.windows(2) {
            let gap = w[1] - w[0];
            assert!((225 * MS..=300 * MS).contains(&gap), "{gap:?}");
        }
    }

    #[test]
    fn silence_for_detect_mult_intervals_is_control_detection_time_expired() {
        let (mut s, t) = up(BfdConfig::default());
        assert_eq!(s.detection_time(), Some(900 * MS));
        let last = t + 200 * MS;
        s.step(last, Event::Received(from_peer(State::Up, LOCAL)));
        let mut now = last;
        while let Some(d) = s.next_deadline().filter(|&d| d < last + 900 * MS) {
            now = d;
            assert!(changes(&s.step(now, Event::Tick)).is_empty());
        }
        assert!(now < last + 900 * MS);
        assert_eq!(s.state(), State::Up);
        assert_eq!(s.next_deadline(), Some(last + 900 * MS));
        let a = s.step(last + 900 * MS, Event::Tick);
        assert_eq!(
            changes(&a),
            vec![(
                State::Up,
                State::Down,
                Diag::ControlDetectionTimeExpired,
                false
            )]
        );
        assert_eq!(s.remote_discr(), 0);
        // Down again: back to the 1 s idle rate, telling the peer (if it hears) why.
        let p = sent(&a)[0];
        assert_eq!(
            (p.state, p.diag, p.your_discr),
            (State::Down, Diag::ControlDetectionTimeExpired, 0)
        );
        assert_eq!(p.desired_min_tx_us, 1_000_000);
        assert!(!p.poll);
        assert_eq!(s.tx_interval(), IDLE_MIN_TX);
    }

    #[test]
    fn peer_admin_down_is_down_with_diag_3_and_not_a_failure() {
        let (mut s, t) = up(BfdConfig::default());
        let admin = Packet {
            diag: Diag::AdministrativelyDown,
            ..from_peer(State::AdminDown, LOCAL)
        };
        let a = s.step(t + 100 * MS, Event::Received(admin));
        assert_eq!(
            changes(&a),
            vec![(
                State::Up,
                State::Down,
                Diag::NeighborSignaledSessionDown,
                true
            )]
        );
        assert_eq!(s.diag(), Diag::NeighborSignaledSessionDown);
        assert_eq!(s.remote_state(), State::AdminDown);
        // More AdminDown packets change nothing; the peer's restart brings it back.
        assert!(changes(&s.step(t + 200 * MS, Event::Received(admin))).is_empty());
        let back = Packet {
            my_discr: PEER + 1,
            ..from_peer(State::Down, 0)
        };
        let a = s.step(t + 300 * MS, Event::Received(back));
        assert_eq!(
            changes(&a),
            vec![(State::Down, State::Init, Diag::None, false)]
        );
        assert_eq!(s.remote_discr(), PEER + 1);
    }

    #[test]
    fn peer_down_while_up_is_a_failure_with_diag_3() {
        let (mut s, t) = up(BfdConfig::default());
        let a = s.step(t, Event::Received(from_peer(State::Down, LOCAL)));
        assert_eq!(
            changes(&a),
            vec![(
                State::Up,
                State::Down,
                Diag::NeighborSignaledSessionDown,
                false
            )]
        );
    }

    #[test]
    fn slower_peer_sets_the_tx_interval_and_detection_time() {
        let (mut s, t) = up(BfdConfig::default());
        let slow = Packet {
            detect_mult: 5,
            desired_min_tx_us: 1_000_000,
            required_min_rx_us: 500_000,
            ..from_peer(State::Up, LOCAL)
        };
        s.step(t, Event::Received(slow));
        // TX: max(our 300 ms, its 500 ms); detection: its 5 × max(our 300 ms, its 1 s).
        assert_eq!(s.tx_interval(), 500 * MS);
        assert_eq!(s.detection_time(), Some(5 * IDLE_MIN_TX));
        // The periodic timer armed for 300 ms is not shortened, a longer one would be.
        let next = s.next_deadline().unwrap();
        assert!(next <= t + 300 * MS, "{:?}", next - t);
        let a = s.step(next, Event::Tick);
        assert_eq!(sent(&a).len(), 1);
        let gap = s.next_deadline().unwrap() - next;
        assert!((375 * MS..=500 * MS).contains(&gap), "{gap:?}");
    }

    #[test]
    fn faster_local_config_while_down_still_sends_once_a_second() {
        let t = Instant::now();
        let mut s = Session::new(t, BfdConfig::default(), LOCAL, 3);
        let p = sent(&s.step(t, Event::Tick))[0];
        assert_eq!(p.desired_min_tx_us, 1_000_000);
        assert_eq!(p.required_min_rx_us, 300_000);
        assert_eq!(p.detect_mult, 3);
        assert_eq!(s.tx_interval(), IDLE_MIN_TX);
        assert_eq!(s.detection_time(), None);
    }

    #[test]
    fn jitter_cuts_zero_to_25_percent_or_10_to_25_with_detect_mult_1() {
        for (mult, range) in [(3, 750..=1000), (1, 750..=900)] {
            let config = BfdConfig {
                detect_multiplier: mult,
                ..BfdConfig::default()
            };
            let t = Instant::now();
            let mut s = Session::new(t, config, LOCAL, 11);
            let (mut lo, mut hi) = (u128::MAX, 0);
            for _ in 0..2000 {
                let ms = s.jittered(IDLE_MIN_TX).as_millis();
                assert!(range.contains(&ms), "{mult}: {ms}");
                lo = lo.min(ms);
                hi = hi.max(ms);
            }
            // The whole range is used.
            assert!(
                lo <= range.start() + 5 && hi >= range.end() - 5,
                "{lo}..{hi}"
            );
        }
    }

    #[test]
    fn slower_tx_waits_for_the_final_of_its_poll() {
        let (mut s, t) = up(BfdConfig::default());
        let slower = BfdConfig {
            desired_min_tx: 2 * IDLE_MIN_TX,
            ..BfdConfig::default()
        };
        let a = s.step(t, Event::Configure(slower));
        assert!(a.is_empty());
        assert!(s.polling());
        // The Poll goes out at once, announcing 2 s, while we keep sending every 300 ms.
        assert_eq!(s.next_deadline(), Some(t));
        let p = sent(&s.step(t, Event::Tick))[0];
        assert!(p.poll);
        assert_eq!(p.desired_min_tx_us, 2_000_000);
        assert_eq!(s.tx_interval(), 300 * MS);
        let next = s.next_deadline().unwrap();
        assert!(sent(&s.step(next, Event::Tick))[0].poll);
        assert_eq!(s.state(), State::Up);
        // The peer's Final ends the sequence and the new rate applies.
        let fin = Packet {
            fin: true,
            ..from_peer(State::Up, LOCAL)
        };
        s.step(next, Event::Received(fin));
        assert!(!s.polling());
        assert_eq!(s.tx_interval(), 2 * IDLE_MIN_TX);
        let next = s.next_deadline().unwrap();
        assert!(!sent(&s.step(next, Event::Tick))[0].poll);
    }

    #[test]
    fn lower_rx_keeps_the_old_detection_time_until_the_final() {
        let config = BfdConfig {
            required_min_rx: 600 * MS,
            ..BfdConfig::default()
        };
        let (mut s, t) = up(config);
        assert_eq!(s.detection_time(), Some(1800 * MS));
        s.step(t, Event::Configure(BfdConfig::default()));
        let p = sent(&s.step(t, Event::Tick))[0];
        assert!(p.poll);
        assert_eq!(p.required_min_rx_us, 300_000);
        assert_eq!(s.detection_time(), Some(1800 * MS));
        let fin = Packet {
            fin: true,
            ..from_peer(State::Up, LOCAL)
        };
        s.step(t + 10 * MS, Event::Received(fin));
        assert_eq!(s.detection_time(), Some(900 * MS));
    }

    #[test]
    fn change_during_a_poll_gets_a_poll_of_its_own() {
        let (mut s, t) = up(BfdConfig::default());
        let at = |ms| BfdConfig {
            desired_min_tx: ms * MS,
            ..BfdConfig::default()
        };
        s.step(t, Event::Configure(at(500)));
        s.step(t, Event::Tick);
        s.step(t, Event::Configure(at(700)));
        let fin = Packet {
            fin: true,
            ..from_peer(State::Up, LOCAL)
        };
        s.step(t, Event::Received(fin));
        // The Final confirmed 500 ms; 700 ms needs another sequence.
        assert_eq!(s.tx_interval(), 500 * MS);
        assert!(s.polling());
        s.step(t, Event::Received(fin));
        assert!(!s.polling());
        assert_eq!(s.tx_interval(), 700 * MS);
    }

    #[test]
    fn peer_poll_is_answered_at_once_with_final_and_its_new_rate_used() {
        let (mut s, t) = up(BfdConfig::default());
        let poll = Packet {
            poll: true,
            desired_min_tx_us: 1_000_000,
            required_min_rx_us: 1_000_000,
            ..from_peer(State::Up, LOCAL)
        };
        let a = s.step(t + MS, Event::Received(poll));
        let p = sent(&a);
        assert_eq!(p.len(), 1);
        assert!(p[0].fin && !p[0].poll);
        assert_eq!(s.tx_interval(), IDLE_MIN_TX);
        assert_eq!(s.detection_time(), Some(3 * IDLE_MIN_TX));
    }

    #[test]
    fn passive_session_is_silent_until_the_peer_speaks() {
        let config = BfdConfig {
            passive: true,
            ..BfdConfig::default()
        };
        let t = Instant::now();
        let mut s = Session::new(t, config, LOCAL, 5);
        assert_eq!(s.next_deadline(), None);
        assert!(s.step(t + IDLE_MIN_TX, Event::Tick).is_empty());
        let a = s.step(t + IDLE_MIN_TX, Event::Received(from_peer(State::Down, 0)));
        assert_eq!(
            changes(&a),
            vec![(State::Down, State::Init, Diag::None, false)]
        );
        assert_eq!(sent(&a)[0].state, State::Init);
        // The peer goes away: after the Detection Time, silent again.
        // Its Detection Time: its 3 × max(our 300 ms, its 300 ms).
        let expiry = t + IDLE_MIN_TX + 900 * MS;
        let mut now = t;
        while let Some(d) = s.next_deadline() {
            now = d;
            s.step(now, Event::Tick);
        }
        assert_eq!(now, expiry);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.remote_discr(), 0);
    }

    #[test]
    fn passive_pair_with_one_active_side_comes_up() {
        let t = Instant::now();
        let passive = BfdConfig {
            passive: true,
            ..BfdConfig::default()
        };
        let mut pair = Pair::new(t, BfdConfig::default(), passive);
        pair.run_until(t + 3 * IDLE_MIN_TX);
        assert_eq!((pair.a.state(), pair.b.state()), (State::Up, State::Up));
        // Two passive sides never speak.
        let mut pair = Pair::new(t, passive, passive);
        pair.run_until(t + 3 * IDLE_MIN_TX);
        assert!(pair.log.is_empty());
    }

    #[test]
    fn admin_down_sends_diag_7_for_a_detection_time_and_ignores_the_peer() {
        let (mut s, t) = up(BfdConfig::default());
        let a = s.step(t, Event::AdminDown);
        assert_eq!(
            changes(&a),
            vec![(
                State::Up,
                State::AdminDown,
                Diag::AdministrativelyDown,
                false
            )]
        );
        let mut packets = sent(&a);
        let mut now = t;
        while s.admin_down_pending() {
            now = s.next_deadline().unwrap();
            packets.extend(sent(&s.step(now, Event::Tick)));
        }
        // Three packets (Detect Mult) at the Up pace, then on at the idle pace.
        assert_eq!(packets.len(), 3);
        assert!(now - t <= 600 * MS, "{:?}", now - t);
        assert!(
            packets
                .iter()
                .all(|p| p.state == State::AdminDown && p.diag == Diag::AdministrativelyDown)
        );
        assert_eq!(s.tx_interval(), IDLE_MIN_TX);
        // AdminDown discards what the peer sends, and no detection runs.
        let a = s.step(now, Event::Received(from_peer(State::Down, LOCAL)));
        assert!(a.is_empty());
        assert_eq!(s.state(), State::AdminDown);
        let a = s.step(now, Event::AdminUp);
        assert_eq!(
            changes(&a),
            vec![(State::AdminDown, State::Down, Diag::None, false)]
        );
    }

    #[test]
    fn admin_down_pair_is_planned_on_the_other_side() {
        let t = Instant::now();
        let mut pair = Pair::new(t, BfdConfig::default(), BfdConfig::default());
        pair.run_until(t + IDLE_MIN_TX);
        let a = pair.a.step(t + IDLE_MIN_TX, Event::AdminDown);
        pair.log.clear();
        pair.deliver(t + IDLE_MIN_TX, true, a);
        pair.run_until(t + 10 * IDLE_MIN_TX);
        assert_eq!(pair.b.state(), State::Down);
        let b_changes: Vec<_> = pair
            .log
            .iter()
            .filter(|(from_a, _, _)| !from_a)
            .filter_map(|(_, _, a)| match a {
                Action::StateChanged { .. } => Some(a.clone()),
                Action::Send(_) => None,
            })
            .collect();
        assert_eq!(
            b_changes,
            vec![Action::StateChanged {
                from: State::Up,
                to: State::Down,
                diag: Diag::NeighborSignaledSessionDown,
                peer_admin_down: true
            }]
        );
    }

    #[test]
    fn peer_demand_mode_stops_periodic_packets_but_not_polls() {
        let (mut s, t) = up(BfdConfig::default());
        let demand = Packet {
            demand: true,
            ..from_peer(State::Up, LOCAL)
        };
        s.step(t, Event::Received(demand));
        assert!(s.next_deadline().is_some_and(|d| d == t + 900 * MS));
        assert!(sent(&s.step(t + 300 * MS, Event::Tick)).is_empty());
        s.step(
            t + 400 * MS,
            Event::Configure(BfdConfig {
                required_min_rx: 200 * MS,
                ..BfdConfig::default()
            }),
        );
        assert!(sent(&s.step(t + 400 * MS, Event::Tick))[0].poll);
    }
}
