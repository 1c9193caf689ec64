//! BFD Control packets on the wire (RFC 5880 §4.1) and the reception checks of §6.8.6
//! that need nothing but the packet.
//!
//! [`encode`] writes the 24-byte mandatory section; [`decode`] reads one packet and
//! rejects what §6.8.6 says to discard. Authentication (§4.2–§4.4) is not supported,
//! so a packet with the A bit set is discarded and none is ever sent.

use thiserror::Error;

/// BFD protocol version (RFC 5880 §4.1).
pub const VERSION: u8 = 1;
/// Length of the mandatory section, the whole packet without authentication (§4.1).
pub const LEN: usize = 24;

const FLAG_POLL: u8 = 0x20;
const FLAG_FINAL: u8 = 0x10;
const FLAG_CPI: u8 = 0x08;
const FLAG_AUTH: u8 = 0x04;
const FLAG_DEMAND: u8 = 0x02;
const FLAG_MULTIPOINT: u8 = 0x01;

/// Session state as carried in the State field (RFC 5880 §4.1, §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Held down by an operator; not a failure (§6.8.16).
    AdminDown,
    /// Not established, or just gone down.
    Down,
    /// The remote side is talking, this side is coming up.
    Init,
    /// Both sides see each other.
    Up,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        }
    }
}

/// Diagnostic code: why the sender's session last changed state (RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Diag {
    /// 0.
    None,
    /// 1: no packet from the peer within the Detection Time.
    ControlDetectionTimeExpired,
    /// 2.
    EchoFunctionFailed,
    /// 3: the peer said it is Down or AdminDown.
    NeighborSignaledSessionDown,
    /// 4.
    ForwardingPlaneReset,
    /// 5.
    PathDown,
    /// 6.
    ConcatenatedPathDown,
    /// 7: taken down by an operator (or the agent shutting down).
    AdministrativelyDown,
    /// 8.
    ReverseConcatenatedPathDown,
    /// 9–31, reserved; kept so that what decodes re-encodes the same.
    Reserved(u8),
}

impl Diag {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledSessionDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            n => Diag::Reserved(n),
        }
    }

    /// The 5-bit code (a [`Diag::Reserved`] value is masked to 5 bits).
    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionTimeExpired => 1,
            Diag::EchoFunctionFailed => 2,
            Diag::NeighborSignaledSessionDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Reserved(n) => n & 0x1f,
        }
    }
}

/// A BFD Control packet without authentication (RFC 5880 §4.1). The A and M bits are
/// not fields: [`decode`] discards packets with either set and [`encode`] clears both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Diagnostic of the sender's last state change.
    pub diag: Diag,
    /// The sender's session state.
    pub state: State,
    /// Poll (P): the sender asks for a packet with F set (§6.5).
    pub poll: bool,
    /// Final (F): the answer to a Poll (§6.5).
    pub fin: bool,
    /// Control Plane Independent (C, §4.1).
    pub cpi: bool,
    /// Demand (D): the sender wishes to run in Demand mode (§6.6).
    pub demand: bool,
    /// Detect Mult: the sender's detection time multiplier, non-zero.
    pub detect_mult: u8,
    /// My Discriminator: the sender's session, non-zero.
    pub my_discr: u32,
    /// Your Discriminator: the receiver's session as the sender knows it, or 0.
    pub your_discr: u32,
    /// Desired Min TX Interval, microseconds.
    pub desired_min_tx_us: u32,
    /// Required Min RX Interval, microseconds (0: send me no periodic packets).
    pub required_min_rx_us: u32,
    /// Required Min Echo RX Interval, microseconds (0: no Echo function).
    pub required_min_echo_rx_us: u32,
}

/// Why a received packet is discarded (RFC 5880 §6.8.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the mandatory section.
    #[error("BFD packet of {0} bytes, shorter than the {LEN}-byte mandatory section")]
    Truncated(usize),
    /// Version is not 1.
    #[error("BFD version {0}, not 1")]
    Version(u8),
    /// Length below 24, or beyond the datagram.
    #[error("BFD length field {length} with {available} bytes received")]
    Length {
        /// The Length field.
        length: u8,
        /// Bytes in the datagram.
        available: usize,
    },
    /// Detect Mult is zero.
    #[error("BFD detect multiplier is zero")]
    ZeroDetectMult,
    /// The Multipoint bit is set.
    #[error("BFD multipoint bit set")]
    Multipoint,
    /// My Discriminator is zero.
    #[error("BFD my discriminator is zero")]
    ZeroMyDiscr,
    /// Your Discriminator is zero in a packet that is neither Down nor AdminDown.
    #[error("BFD your discriminator is zero in state {0:?}")]
    ZeroYourDiscr(State),
    /// The A bit is set: this implementation does no authentication.
    #[error("BFD authentication requested but not supported")]
    Authentication,
}

/// Reads one packet from a datagram's payload, applying the checks of RFC 5880 §6.8.6
/// in its order (bytes past the Length field are ignored).
pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
    let Some(head) = buf.get(..LEN) else {
        return Err(DecodeError::Truncated(buf.len()));
    };
    let word = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let version = head[0] >> 5;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let flags = head[1];
    let length = head[3];
    if usize::from(length) < LEN || usize::from(length) > buf.len() {
        return Err(DecodeError::Length {
            length,
            available: buf.len(),
        });
    }
    let detect_mult = head[2];
    if detect_mult == 0 {
        return Err(DecodeError::ZeroDetectMult);
    }
    if flags & FLAG_MULTIPOINT != 0 {
        return Err(DecodeError::Multipoint);
    }
    let my_discr = word(4);
    if my_discr == 0 {
        return Err(DecodeError::ZeroMyDiscr);
    }
    let state = State::from_bits(flags >> 6);
    let your_discr = word(8);
    if your_discr == 0 && !matches!(state, State::Down | State::AdminDown) {
        return Err(DecodeError::ZeroYourDiscr(state));
    }
    if flags & FLAG_AUTH != 0 {
        return Err(DecodeError::Authentication);
    }
    Ok(Packet {
        diag: Diag::from_bits(head[0]),
        state,
        poll: flags & FLAG_POLL != 0,
        fin: flags & FLAG_FINAL != 0,
        cpi: flags & FLAG_CPI != 0,
        demand: flags & FLAG_DEMAND != 0,
        detect_mult,
        my_discr,
        your_discr,
        desired_min_tx_us: word(12),
        required_min_rx_us: word(16),
        required_min_echo_rx_us: word(20),
    })
}

/// Writes the packet: version 1, Length 24, A and M clear (RFC 5880 §4.1).
pub fn encode(p: &Packet) -> [u8; LEN] {
    let mut flags = p.state.bits() << 6;
    for (set, bit) in [
        (p.poll, FLAG_POLL),
        (p.fin, FLAG_FINAL),
        (p.cpi, FLAG_CPI),
        (p.demand, FLAG_DEMAND),
    ] {
        if set {
            flags |= bit;
        }
    }
    let mut out = [0u8; LEN];
    out[0] = (VERSION << 5) | p.diag.code();
    out[1] = flags;
    out[2] = p.detect_mult;
    out[3] = LEN as u8;
    for (at, v) in [
        (4, p.my_discr),
        (8, p.your_discr),
        (12, p.desired_min_tx_us),
        (16, p.required_min_rx_us),
        (20, p.required_min_echo_rx_us),
    ] {
        out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn up() -> Packet {
        Packet {
            diag: Diag::None,
            state: State::Up,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 0x0102_0304,
            your_discr: 0x0a0b_0c0d,
            desired_min_tx_us: 300_000,
            required_min_rx_us: 300_000,
            required_min_echo_rx_us: 0,
        }
    }

    /// An Up packet as BIRD or FRR would send it (300 ms, ×3), byte by byte.
    const UP_BYTES: [u8; 24] = [
        0x20, 0xc0, 3, 24, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, 0x00, 0x04, 0x93, 0xe0, 0x00, 0x04,
        0x93, 0xe0, 0, 0, 0, 0,
    ];

    #[test]
    fn up_packet_encodes_to_known_bytes_and_back() {
        assert_eq!(encode(&up()), UP_BYTES);
        assert_eq!(decode(&UP_BYTES).unwrap(), up());
    }

    #[test]
    fn admin_down_with_poll_encodes_diag_state_and_bits() {
        let p = Packet {
            diag: Diag::AdministrativelyDown,
            state: State::AdminDown,
            poll: true,
            your_discr: 0,
            ..up()
        };
        let b = encode(&p);
        assert_eq!(b[0], 0x27);
        assert_eq!(b[1], 0x20);
        assert_eq!(decode(&b).unwrap(), p);
    }

    #[test]
    fn every_flag_and_field_round_trips() {
        for state in [State::AdminDown, State::Down, State::Init, State::Up] {
            for code in 0..32 {
                for bits in 0..16u8 {
                    let p = Packet {
                        diag: Diag::from_bits(code),
                        state,
                        poll: bits & 1 != 0,
                        fin: bits & 2 != 0,
                        cpi: bits & 4 != 0,
                        demand: bits & 8 != 0,
                        ..up()
                    };
                    assert_eq!(Diag::from_bits(code).code(), code);
                    assert_eq!(decode(&encode(&p)).unwrap(), p);
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_past_length_are_ignored() {
        let mut b = UP_BYTES.to_vec();
        b.extend_from_slice(&[0xff; 8]);
        assert_eq!(decode(&b).unwrap(), up());
    }

    #[test]
    fn section_6_8_6_discards() {
        let with = |at: usize, v: u8| {
            let mut b = UP_BYTES;
            b[at] = v;
            decode(&b)
        };
        assert_eq!(decode(&UP_BYTES[..23]), Err(DecodeError::Truncated(23)));
        assert_eq!(with(0, 0x40), Err(DecodeError::Version(2)));
        assert_eq!(with(0, 0x00), Err(DecodeError::Version(0)));
        assert!(matches!(
            with(3, 23),
            Err(DecodeError::Length { length: 23, .. })
        ));
        assert!(matches!(
            with(3, 25),
            Err(DecodeError::Length { length: 25, .. })
        ));
        assert_eq!(with(2, 0), Err(DecodeError::ZeroDetectMult));
        assert_eq!(with(1, 0xc1), Err(DecodeError::Multipoint));
        assert_eq!(with(1, 0xc4), Err(DecodeError::Authentication));
        let mut b = UP_BYTES;
        b[4..8].fill(0);
        assert_eq!(decode(&b), Err(DecodeError::ZeroMyDiscr));
    }

    #[test]
    fn zero_your_discriminator_only_in_down_and_admin_down() {
        let mut b = UP_BYTES;
        b[8..12].fill(0);
        for (bits, ok) in [(0x00, true), (0x40, true), (0x80, false), (0xc0, false)] {
            b[1] = bits;
            assert_eq!(decode(&b).is_ok(), ok, "{bits:#x}");
        }
        b[1] = 0x80;
        assert_eq!(decode(&b), Err(DecodeError::ZeroYourDiscr(State::Init)));
    }

    /// SplitMix64, so the test is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn random_and_mutated_buffers_never_panic() {
        let mut rng = Rng(0x5880);
        let mut oks = 0;
        for i in 0..50_000u32 {
            let mut buf = if i.is_multiple_of(2) {
                UP_BYTES.to_vec()
            } else {
                (0..rng.next() % 40).map(|_| rng.next() as u8).collect()
            };
            for _ in 0..rng.next() % 4 {
                let len = buf.len().max(1);
                if let Some(b) = buf.get_mut(rng.next() as usize % len) {
                    *b = rng.next() as u8;
                }
            }
            if rng.next().is_multiple_of(4) {
                buf.truncate(rng.next() as usize % 30);
            }
            if let Ok(p) = decode(&buf) {
                oks += 1;
                assert_eq!(decode(&encode(&p)).unwrap(), p);
            }
        }
        assert!(oks > 5_000, "{oks}");
    }
}
