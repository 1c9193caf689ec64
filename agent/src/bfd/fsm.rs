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
            if let Some(p) = self.polling.take() {
                self.in_use = p;
            }
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
