//! BGP-4 messages on the wire (RFC 4271 §4) and the NOTIFICATION each decoding error
//! asks for (RFC 4271 §6).
//!
//! [`encode`] writes one [`Message`]; [`decode`] reads one from the front of a buffer
//! and says how many bytes it used, or [`DecodeError::Incomplete`] when the buffer does
//! not hold a whole message yet. Decoding checks every length against the bytes it has
//! before using it, so a hostile peer can make it fail but neither panic nor allocate
//! more than the (at most [`MAX_MESSAGE_LEN`]-byte) message holds.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Largest BGP message, header included (RFC 4271 §4.1).
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Length of the message header: marker, length, type (RFC 4271 §4.1).
pub const HEADER_LEN: usize = 19;
/// The 2-octet AS number that stands in for a 4-octet one (RFC 6793 §9).
pub const AS_TRANS: u32 = 23456;
/// Address Family Identifier of IPv4 (RFC 4760 §3, IANA).
pub const AFI_IPV4: u16 = 1;
/// Address Family Identifier of IPv6 (RFC 4760 §3, IANA).
pub const AFI_IPV6: u16 = 2;
/// Subsequent Address Family Identifier of unicast forwarding (RFC 4760 §6).
pub const SAFI_UNICAST: u8 = 1;

const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

/// Attribute flag bits (RFC 4271 §4.3).
const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_PARTIAL: u8 = 0x20;
const FLAG_EXTENDED: u8 = 0x10;
const WELL_KNOWN: u8 = FLAG_TRANSITIVE;
const OPTIONAL_TRANSITIVE: u8 = FLAG_OPTIONAL | FLAG_TRANSITIVE;
const OPTIONAL_NON_TRANSITIVE: u8 = FLAG_OPTIONAL;

/// Path attribute type codes (RFC 4271 §5, RFC 1997, RFC 4760, RFC 6793, RFC 8092).
const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_ATOMIC_AGGREGATE: u8 = 6;
const ATTR_AGGREGATOR: u8 = 7;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const ATTR_AS4_PATH: u8 = 17;
const ATTR_LARGE_COMMUNITY: u8 = 32;

/// Capability codes (RFC 5492 §4, IANA).
const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_GRACEFUL_RESTART: u8 = 64;
const CAP_FOUR_OCTET_AS: u8 = 65;

/// Optional parameter type of capabilities (RFC 5492 §4).
const PARAM_CAPABILITIES: u8 = 2;

/// What decoding and encoding need to know about the session (RFC 6793 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// Both speakers advertised the 4-octet AS capability, so AS_PATH and AGGREGATOR
    /// carry 4-octet AS numbers (RFC 6793 §4.1); otherwise 2-octet ones (§4.2).
    pub four_octet: bool,
}

/// One BGP message (RFC 4271 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN, the first message of a session (RFC 4271 §4.2).
    Open(Open),
    /// UPDATE: withdrawn routes, path attributes and NLRI (RFC 4271 §4.3).
    Update(Update),
    /// NOTIFICATION: an error, after which the connection closes (RFC 4271 §4.5).
    Notification(Notification),
    /// KEEPALIVE: the header alone (RFC 4271 §4.4).
    Keepalive,
    /// ROUTE-REFRESH: asks the peer to resend one family's routes (RFC 2918 §3).
    RouteRefresh(RouteRefresh),
}

/// The OPEN message (RFC 4271 §4.2); the version is always 4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS, or [`AS_TRANS`] when it does not fit in 2 octets (RFC 6793 §4.2.2).
    pub my_as: u16,
    /// Proposed hold time in seconds: 0 or at least 3 (RFC 4271 §4.2).
    pub hold_time: u16,
    /// The sender's BGP identifier, non-zero (RFC 4271 §4.2, RFC 6286 §2.1).
    pub bgp_id: Ipv4Addr,
    /// The capabilities of every Capabilities optional parameter, in order (RFC 5492 §4).
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The sender's AS: the 4-octet AS capability's if present (RFC 6793 §3), else `my_as`.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(asn) => Some(*asn),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }
}

/// A capability advertised in OPEN (RFC 5492 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions for one AFI/SAFI (RFC 4760 §8).
    Multiprotocol {
        /// Address family (RFC 4760 §3).
        afi: u16,
        /// Subsequent address family (RFC 4760 §6).
        safi: u8,
    },
    /// Route refresh (RFC 2918 §2).
    RouteRefresh,
    /// 4-octet AS numbers, carrying the sender's AS (RFC 6793 §3).
    FourOctetAs(u32),
    /// Graceful restart (RFC 4724 §3).
    GracefulRestart(GracefulRestart),
    /// Any other capability, kept as it came (RFC 5492 §3).
    Unknown {
        /// Capability code.
        code: u8,
        /// Capability value.
        value: Vec<u8>,
    },
}

/// The graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The four Restart Flags bits (RFC 4724 §3; 0x8 is Restart State "R", 0x4 is
    /// the Notification "N" bit of RFC 8538 §2).
    pub flags: u8,
    /// Restart Time in seconds, 12 bits (RFC 4724 §3).
    pub restart_time: u16,
    /// The families whose routes are preserved (RFC 4724 §3).
    pub families: Vec<GracefulRestartFamily>,
}

/// One family of the graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulRestartFamily {
    /// Address family (RFC 4760 §3).
    pub afi: u16,
    /// Subsequent address family (RFC 4760 §6).
    pub safi: u8,
    /// The Forwarding State bit: forwarding was preserved across the restart (RFC 4724 §3).
    pub forwarding: bool,
}

/// The UPDATE message (RFC 4271 §4.3), IPv4 unicast in its own fields, other families
/// in MP_REACH_NLRI / MP_UNREACH_NLRI attributes (RFC 4760).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// Withdrawn Routes (RFC 4271 §4.3).
    pub withdrawn: Vec<Ipv4Net>,
    /// Path Attributes, in order (RFC 4271 §4.3, §5).
    pub attributes: Vec<PathAttribute>,
    /// Network Layer Reachability Information (RFC 4271 §4.3).
    pub nlri: Vec<Ipv4Net>,
}

/// A path attribute (RFC 4271 §4.3, §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAttribute {
    /// ORIGIN, well-known mandatory (RFC 4271 §5.1.1).
    Origin(Origin),
    /// AS_PATH, well-known mandatory; 2- or 4-octet ASNs per [`Context::four_octet`]
    /// (RFC 4271 §5.1.2, RFC 6793 §4).
    AsPath(Vec<AsPathSegment>),
    /// NEXT_HOP, well-known mandatory (RFC 4271 §5.1.3).
    NextHop(Ipv4Addr),
    /// MULTI_EXIT_DISC, optional non-transitive (RFC 4271 §5.1.4).
    MultiExitDisc(u32),
    /// LOCAL_PREF, well-known, iBGP only (RFC 4271 §5.1.5).
    LocalPref(u32),
    /// ATOMIC_AGGREGATE, well-known discretionary (RFC 4271 §5.1.6).
    AtomicAggregate,
    /// AGGREGATOR, optional transitive (RFC 4271 §5.1.7, RFC 6793 §4).
    Aggregator {
        /// The aggregating speaker's AS.
        asn: u32,
        /// The aggregating speaker's BGP identifier.
        address: Ipv4Addr,
    },
    /// COMMUNITIES, optional transitive (RFC 1997).
    Communities(Vec<u32>),
    /// MP_REACH_NLRI, optional non-transitive (RFC 4760 §3).
    MpReachNlri(MpReach),
    /// MP_UNREACH_NLRI, optional non-transitive (RFC 4760 §4).
    MpUnreachNlri(MpUnreach),
    /// AS4_PATH, optional transitive, always 4-octet ASNs (RFC 6793 §3).
    As4Path(Vec<AsPathSegment>),
    /// LARGE_COMMUNITY, optional transitive (RFC 8092 §3).
    LargeCommunities(Vec<LargeCommunity>),
    /// An optional attribute this codec does not know, kept as it came (RFC 4271 §5).
    Unknown {
        /// Attribute flags, less the Extended Length bit (chosen on encode).
        flags: u8,
        /// Attribute type code.
        type_code: u8,
        /// Attribute value.
        value: Vec<u8>,
    },
}

/// ORIGIN values (RFC 4271 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Interior to the originating AS.
    Igp = 0,
    /// Learned by EGP.
    Egp = 1,
    /// Learned some other way.
    Incomplete = 2,
}

/// One AS_PATH segment (RFC 4271 §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsPathSegment {
    /// AS_SET or AS_SEQUENCE.
    pub kind: SegmentKind,
    /// The segment's AS numbers (encode splits runs longer than 255).
    pub asns: Vec<u32>,
}

/// AS_PATH segment types (RFC 4271 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// AS_SET: unordered.
    Set = 1,
    /// AS_SEQUENCE: ordered.
    Sequence = 2,
}

/// One large community (RFC 8092 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LargeCommunity {
    /// Global Administrator: the AS that defines the meaning.
    pub global_admin: u32,
    /// Local Data Part 1.
    pub local1: u32,
    /// Local Data Part 2.
    pub local2: u32,
}

/// MP_REACH_NLRI for the families this codec speaks (RFC 4760 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpReach {
    /// IPv4 unicast.
    Ipv4 {
        /// Next hop.
        next_hop: Ipv4Addr,
        /// Reachable prefixes.
        nlri: Vec<Ipv4Net>,
    },
    /// IPv6 unicast (next hop: global, optionally followed by link-local, RFC 2545 §3).
    Ipv6 {
        /// Global next hop.
        next_hop: Ipv6Addr,
        /// Link-local next hop.
        link_local: Option<Ipv6Addr>,
        /// Reachable prefixes.
        nlri: Vec<Ipv6Net>,
    },
}

/// MP_UNREACH_NLRI for the families this codec speaks (RFC 4760 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpUnreach {
    /// IPv4 unicast withdrawn prefixes.
    Ipv4(Vec<Ipv4Net>),
    /// IPv6 unicast withdrawn prefixes.
    Ipv6(Vec<Ipv6Net>),
}

/// The NOTIFICATION message (RFC 4271 §4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code (RFC 4271 §4.5).
    pub code: u8,
    /// Error subcode (RFC 4271 §4.5).
    pub subcode: u8,
    /// Data, meaning per code/subcode (RFC 4271 §6).
    pub data: Vec<u8>,
}

/// The ROUTE-REFRESH message (RFC 2918 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// Address family (RFC 4760 §3).
    pub afi: u16,
    /// The Reserved octet of RFC 2918 §3 (the message subtype of RFC 7313 §3.2).
    pub subtype: u8,
    /// Subsequent address family (RFC 4760 §6).
    pub safi: u8,
}

/// Why a buffer did not decode, and the NOTIFICATION that says so to the peer
/// ([`DecodeError::notification`], RFC 4271 §6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not an error yet: the buffer holds fewer than `needed` bytes of this message;
    /// read more and call again (a stream ending here was cut mid-message).
    #[error("incomplete message: {needed} bytes needed")]
    Incomplete {
        /// Bytes the buffer must hold (the header, or the whole message).
        needed: usize,
    },
    /// The marker is not all ones: 1/1 (RFC 4271 §6.1).
    #[error("connection not synchronized: the marker is not all ones")]
    BadMarker,
    /// Length outside 19..=4096 or wrong for the type: 1/2 (RFC 4271 §6.1).
    #[error("bad message length {0}")]
    BadLength(u16),
    /// Unknown message type: 1/3 (RFC 4271 §6.1).
    #[error("bad message type {0}")]
    BadType(u8),
    /// OPEN version other than 4: 2/1 (RFC 4271 §6.2).
    #[error("unsupported BGP version {0}")]
    UnsupportedVersion(u8),
    /// Unacceptable AS (zero, or not the configured one): 2/2 (RFC 4271 §6.2).
    #[error("bad peer AS {0}")]
    BadPeerAs(u32),
    /// Unacceptable BGP identifier (zero): 2/3 (RFC 4271 §6.2, RFC 6286 §2.2).
    #[error("bad BGP identifier {0}")]
    BadBgpIdentifier(Ipv4Addr),
    /// An optional parameter other than Capabilities: 2/4 (RFC 4271 §6.2).
    #[error("unsupported optional parameter {0}")]
    UnsupportedOptionalParameter(u8),
    /// Hold time 1 or 2 seconds: 2/6 (RFC 4271 §6.2).
    #[error("unacceptable hold time {0}")]
    UnacceptableHoldTime(u16),
    /// A capability malformed for its code (the capability's bytes): 2/7 (RFC 5492 §5).
    #[error("unsupported capability {0:02x?}")]
    UnsupportedCapability(Vec<u8>),
    /// OPEN whose optional parameters do not fill the message exactly: 2/0 (RFC 4271 §6.2).
    #[error("malformed OPEN: {0}")]
    MalformedOpen(&'static str),
    /// Lengths of the UPDATE's parts inconsistent, or an attribute twice: 3/1 (RFC 4271 §6.3).
    #[error("malformed attribute list: {0}")]
    MalformedAttributeList(&'static str),
    /// A well-known attribute this codec does not know (the attribute): 3/2 (RFC 4271 §6.3).
    #[error("unrecognized well-known attribute {0:02x?}")]
    UnrecognizedWellKnownAttribute(Vec<u8>),
    /// A mandatory well-known attribute is absent (its type code): 3/3 (RFC 4271 §6.3).
    #[error("missing well-known attribute {0}")]
    MissingWellKnownAttribute(u8),
    /// Flags conflicting with the type code (the attribute): 3/4 (RFC 4271 §6.3).
    #[error("attribute flags error {0:02x?}")]
    AttributeFlags(Vec<u8>),
    /// Length conflicting with the type code (the attribute): 3/5 (RFC 4271 §6.3).
    #[error("attribute length error {0:02x?}")]
    AttributeLength(Vec<u8>),
    /// ORIGIN other than 0, 1, 2 (the attribute): 3/6 (RFC 4271 §6.3).
    #[error("invalid ORIGIN {0:02x?}")]
    InvalidOrigin(Vec<u8>),
    /// NEXT_HOP syntactically wrong (the attribute): 3/8 (RFC 4271 §6.3).
    #[error("invalid NEXT_HOP {0:02x?}")]
    InvalidNextHop(Vec<u8>),
    /// A recognized optional attribute with a bad value (the attribute): 3/9 (RFC 4271 §6.3).
    #[error("optional attribute error {0:02x?}")]
    OptionalAttribute(Vec<u8>),
    /// Withdrawn routes or NLRI syntactically wrong: 3/10 (RFC 4271 §6.3).
    #[error("invalid network field")]
    InvalidNetworkField,
    /// AS_PATH segments malformed: 3/11 (RFC 4271 §6.3).
    #[error("malformed AS_PATH")]
    MalformedAsPath,
}

impl DecodeError {
    /// Whether this is [`DecodeError::Incomplete`]: wait for more bytes.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }

    /// The NOTIFICATION (code, subcode, data) to send the peer (RFC 4271 §6). For
    /// [`DecodeError::Incomplete`], only meaningful if the stream ended: 1/2.
    pub fn notification(&self) -> (u8, u8, Vec<u8>) {
        use DecodeError as E;
        match self {
            E::Incomplete { .. } => (1, 2, Vec::new()),
            E::BadMarker => (1, 1, Vec::new()),
            E::BadLength(len) => (1, 2, len.to_be_bytes().to_vec()),
            E::BadType(ty) => (1, 3, vec![*ty]),
            // The largest version supported (RFC 4271 §6.2).
            E::UnsupportedVersion(_) => (2, 1, 4u16.to_be_bytes().to_vec()),
            E::BadPeerAs(_) => (2, 2, Vec::new()),
            E::BadBgpIdentifier(_) => (2, 3, Vec::new()),
            E::UnsupportedOptionalParameter(_) => (2, 4, Vec::new()),
            E::UnacceptableHoldTime(_) => (2, 6, Vec::new()),
            E::UnsupportedCapability(cap) => (2, 7, cap.clone()),
            E::MalformedOpen(_) => (2, 0, Vec::new()),
            E::MalformedAttributeList(_) => (3, 1, Vec::new()),
            E::UnrecognizedWellKnownAttribute(a) => (3, 2, a.clone()),
            E::MissingWellKnownAttribute(ty) => (3, 3, vec![*ty]),
            E::AttributeFlags(a) => (3, 4, a.clone()),
            E::AttributeLength(a) => (3, 5, a.clone()),
            E::InvalidOrigin(a) => (3, 6, a.clone()),
            E::InvalidNextHop(a) => (3, 8, a.clone()),
            E::OptionalAttribute(a) => (3, 9, a.clone()),
            E::InvalidNetworkField => (3, 10, Vec::new()),
            E::MalformedAsPath => (3, 11, Vec::new()),
        }
    }
}

// ---------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------

/// Encodes one message, header included (RFC 4271 §4). The caller keeps it within
/// [`MAX_MESSAGE_LEN`] and the OPEN's capabilities within 255 octets (RFC 4271 §4.2);
/// longer ones are written but a peer rejects them.
pub fn encode(msg: &Message, ctx: &Context) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0]);
    match msg {
        Message::Open(open) => {
            out.push(TYPE_OPEN);
            encode_open(open, &mut out);
        }
        Message::Update(update) => {
            out.push(TYPE_UPDATE);
            encode_update(update, ctx, &mut out);
        }
        Message::Notification(n) => {
            out.push(TYPE_NOTIFICATION);
            out.push(n.code);
            out.push(n.subcode);
            out.extend_from_slice(&n.data);
        }
        Message::Keepalive => out.push(TYPE_KEEPALIVE),
        Message::RouteRefresh(rr) => {
            out.push(TYPE_ROUTE_REFRESH);
            out.extend_from_slice(&rr.afi.to_be_bytes());
            out.push(rr.subtype);
            out.push(rr.safi);
        }
    }
    let len = u16::try_from(out.len()).unwrap_or(u16::MAX);
    if let Some(field) = out.get_mut(16..18) {
        field.copy_from_slice(&len.to_be_bytes());
    }
    out
}

fn encode_open(open: &Open, out: &mut Vec<u8>) {
    out.push(4);
    out.extend_from_slice(&open.my_as.to_be_bytes());
    out.extend_from_slice(&open.hold_time.to_be_bytes());
    out.extend_from_slice(&open.bgp_id.octets());
    // Capabilities packed into as few Capabilities parameters as fit (RFC 5492 §4).
    let mut params = Vec::new();
    let mut param = Vec::new();
    for cap in &open.capabilities {
        let tlv = encode_capability(cap);
        if !param.is_empty() && param.len() + tlv.len() > 255 {
            push_param(&mut params, &param);
            param.clear();
        }
        param.extend_from_slice(&tlv);
    }
    if !param.is_empty() {
        push_param(&mut params, &param);
    }
    out.push(len_u8(params.len()));
    out.extend_from_slice(&params);
}

fn push_param(params: &mut Vec<u8>, value: &[u8]) {
    params.push(PARAM_CAPABILITIES);
    params.push(len_u8(value.len()));
    params.extend_from_slice(value);
}

fn len_u8(len: usize) -> u8 {
    u8::try_from(len).unwrap_or(u8::MAX)
}

fn len_u16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

fn encode_capability(cap: &Capability) -> Vec<u8> {
    let (code, value) = match cap {
        Capability::Multiprotocol { afi, safi } => {
            let [a, b] = afi.to_be_bytes();
            (CAP_MULTIPROTOCOL, vec![a, b, 0, *safi])
        }
        Capability::RouteRefresh => (CAP_ROUTE_REFRESH, Vec::new()),
        Capability::FourOctetAs(asn) => (CAP_FOUR_OCTET_AS, asn.to_be_bytes().to_vec()),
        Capability::GracefulRestart(gr) => {
            let head = (u16::from(gr.flags & 0x0f) << 12) | (gr.restart_time & 0x0fff);
            let mut v = head.to_be_bytes().to_vec();
            for f in &gr.families {
                v.extend_from_slice(&f.afi.to_be_bytes());
                v.push(f.safi);
                v.push(if f.forwarding { 0x80 } else { 0 });
            }
            (CAP_GRACEFUL_RESTART, v)
        }
        Capability::Unknown { code, value } => (*code, value.clone()),
    };
    let mut tlv = vec![code, len_u8(value.len())];
    tlv.extend_from_slice(&value);
    tlv
}

fn encode_update(update: &Update, ctx: &Context, out: &mut Vec<u8>) {
    let mut withdrawn = Vec::new();
    for p in &update.withdrawn {
        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), &mut withdrawn);
    }
    out.extend_from_slice(&len_u16(withdrawn.len()).to_be_bytes());
    out.extend_from_slice(&withdrawn);
    let mut attrs = Vec::new();
    for a in &update.attributes {
        encode_attribute(a, ctx, &mut attrs);
    }
    out.extend_from_slice(&len_u16(attrs.len()).to_be_bytes());
    out.extend_from_slice(&attrs);
    for p in &update.nlri {
        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), out);
    }
}

/// A prefix as length and the octets that hold it (RFC 4271 §4.3, RFC 4760 §5).
fn encode_prefix(octets: &[u8], len: u8, out: &mut Vec<u8>) {
    out.push(len);
    let n = usize::from(len).div_ceil(8);
    out.extend_from_slice(octets.get(..n).unwrap_or(octets));
}

fn encode_as_path(segments: &[AsPathSegment], four_octet: bool, out: &mut Vec<u8>) {
    for seg in segments {
        for chunk in seg.asns.chunks(255) {
            out.push(seg.kind as u8);
            out.push(len_u8(chunk.len()));
            for asn in chunk {
                encode_asn(*asn, four_octet, out);
            }
        }
    }
}

/// A 4-octet AS, or a 2-octet one with [`AS_TRANS`] for those that do not fit (RFC 6793 §4.2.2).
fn encode_asn(asn: u32, four_octet: bool, out: &mut Vec<u8>) {
    if four_octet {
        out.extend_from_slice(&asn.to_be_bytes());
    } else {
        let short = u16::try_from(asn).unwrap_or(AS_TRANS as u16);
        out.extend_from_slice(&short.to_be_bytes());
    }
}

fn encode_attribute(attr: &PathAttribute, ctx: &Context, out: &mut Vec<u8>) {
    let mut v = Vec::new();
    let (flags, type_code) = match attr {
        PathAttribute::Origin(o) => {
            v.push(*o as u8);
            (WELL_KNOWN, ATTR_ORIGIN)
        }
        PathAttribute::AsPath(segs) => {
            encode_as_path(segs, ctx.four_octet, &mut v);
            (WELL_KNOWN, ATTR_AS_PATH)
        }
        PathAttribute::NextHop(nh) => {
            v.extend_from_slice(&nh.octets());
            (WELL_KNOWN, ATTR_NEXT_HOP)
        }
        PathAttribute::MultiExitDisc(med) => {
            v.extend_from_slice(&med.to_be_bytes());
            (OPTIONAL_NON_TRANSITIVE, ATTR_MED)
        }
        PathAttribute::LocalPref(lp) => {
            v.extend_from_slice(&lp.to_be_bytes());
            (WELL_KNOWN, ATTR_LOCAL_PREF)
        }
        PathAttribute::AtomicAggregate => (WELL_KNOWN, ATTR_ATOMIC_AGGREGATE),
        PathAttribute::Aggregator { asn, address } => {
            encode_asn(*asn, ctx.four_octet, &mut v);
            v.extend_from_slice(&address.octets());
            (OPTIONAL_TRANSITIVE, ATTR_AGGREGATOR)
        }
        PathAttribute::Communities(cs) => {
            for c in cs {
                v.extend_from_slice(&c.to_be_bytes());
            }
            (OPTIONAL_TRANSITIVE, ATTR_COMMUNITIES)
        }
        PathAttribute::MpReachNlri(reach) => {
            match reach {
                MpReach::Ipv4 { next_hop, nlri } => {
                    v.extend_from_slice(&AFI_IPV4.to_be_bytes());
                    v.push(SAFI_UNICAST);
                    v.push(4);
                    v.extend_from_slice(&next_hop.octets());
                    v.push(0);
                    for p in nlri {
                        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), &mut v);
                    }
                }
                MpReach::Ipv6 {
                    next_hop,
                    link_local,
                    nlri,
                } => {
                    v.extend_from_slice(&AFI_IPV6.to_be_bytes());
                    v.push(SAFI_UNICAST);
                    v.push(if link_local.is_some() { 32 } else { 16 });
                    v.extend_from_slice(&next_hop.octets());
                    if let Some(ll) = link_local {
                        v.extend_from_slice(&ll.octets());
                    }
                    v.push(0);
                    for p in nlri {
                        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), &mut v);
                    }
                }
            }
            (OPTIONAL_NON_TRANSITIVE, ATTR_MP_REACH)
        }
        PathAttribute::MpUnreachNlri(unreach) => {
            match unreach {
                MpUnreach::Ipv4(prefixes) => {
                    v.extend_from_slice(&AFI_IPV4.to_be_bytes());
                    v.push(SAFI_UNICAST);
                    for p in prefixes {
                        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), &mut v);
                    }
                }
                MpUnreach::Ipv6(prefixes) => {
                    v.extend_from_slice(&AFI_IPV6.to_be_bytes());
                    v.push(SAFI_UNICAST);
                    for p in prefixes {
                        encode_prefix(&p.trunc().addr().octets(), p.prefix_len(), &mut v);
                    }
                }
            }
            (OPTIONAL_NON_TRANSITIVE, ATTR_MP_UNREACH)
        }
        PathAttribute::As4Path(segs) => {
            encode_as_path(segs, true, &mut v);
            (OPTIONAL_TRANSITIVE, ATTR_AS4_PATH)
        }
        PathAttribute::LargeCommunities(cs) => {
            for c in cs {
                v.extend_from_slice(&c.global_admin.to_be_bytes());
                v.extend_from_slice(&c.local1.to_be_bytes());
                v.extend_from_slice(&c.local2.to_be_bytes());
            }
            (OPTIONAL_TRANSITIVE, ATTR_LARGE_COMMUNITY)
        }
        PathAttribute::Unknown {
            flags,
            type_code,
            value,
        } => {
            v.extend_from_slice(value);
            (*flags & !FLAG_EXTENDED, *type_code)
        }
    };
    // Extended Length when the value does not fit one octet (RFC 4271 §4.3).
    if v.len() > 255 {
        out.push(flags | FLAG_EXTENDED);
        out.push(type_code);
        out.extend_from_slice(&len_u16(v.len()).to_be_bytes());
    } else {
        out.push(flags);
        out.push(type_code);
        out.push(len_u8(v.len()));
    }
    out.extend_from_slice(&v);
}

// ---------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------

/// A cursor over a slice whose reads fail (`None`) instead of running past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.buf.split_at_checked(n)?;
        self.buf = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
}

/// Decodes the message at the front of `buf` (RFC 4271 §4), returning it and the bytes
/// it took; [`DecodeError::Incomplete`] if `buf` does not hold all of it yet.
pub fn decode(buf: &[u8], ctx: &Context) -> Result<(Message, usize), DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(DecodeError::Incomplete { needed: HEADER_LEN });
    };
    let mut r = Reader::new(header);
    let marker = r
        .take(16)
        .ok_or(DecodeError::Incomplete { needed: HEADER_LEN })?;
    if marker.iter().any(|&b| b != 0xff) {
        return Err(DecodeError::BadMarker);
    }
    let len = r
        .u16()
        .ok_or(DecodeError::Incomplete { needed: HEADER_LEN })?;
    let ty = r
        .u8()
        .ok_or(DecodeError::Incomplete { needed: HEADER_LEN })?;
    let total = usize::from(len);
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&total) {
        return Err(DecodeError::BadLength(len));
    }
    // Smallest (and for KEEPALIVE and ROUTE-REFRESH only) length per type (RFC 4271 §4, §6.1).
    let length_ok = match ty {
        TYPE_OPEN => total >= 29,
        TYPE_UPDATE => total >= 23,
        TYPE_NOTIFICATION => total >= 21,
        TYPE_KEEPALIVE => total == 19,
        TYPE_ROUTE_REFRESH => total == 23,
        _ => return Err(DecodeError::BadType(ty)),
    };
    if !length_ok {
        return Err(DecodeError::BadLength(len));
    }
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Err(DecodeError::Incomplete { needed: total });
    };
    let msg = match ty {
        TYPE_OPEN => Message::Open(decode_open(body)?),
        TYPE_UPDATE => Message::Update(decode_update(body, ctx)?),
        TYPE_NOTIFICATION => {
            let mut r = Reader::new(body);
            let code = r.u8().ok_or(DecodeError::BadLength(len))?;
            let subcode = r.u8().ok_or(DecodeError::BadLength(len))?;
            Message::Notification(Notification {
                code,
                subcode,
                data: r.buf.to_vec(),
            })
        }
        TYPE_KEEPALIVE => Message::Keepalive,
        _ => {
            let mut r = Reader::new(body);
            let afi = r.u16().ok_or(DecodeError::BadLength(len))?;
            let subtype = r.u8().ok_or(DecodeError::BadLength(len))?;
            let safi = r.u8().ok_or(DecodeError::BadLength(len))?;
            Message::RouteRefresh(RouteRefresh { afi, subtype, safi })
        }
    };
    Ok((msg, total))
}

fn decode_open(body: &[u8]) -> Result<Open, DecodeError> {
    const SHORT: DecodeError = DecodeError::MalformedOpen("shorter than its fixed fields");
    let mut r = Reader::new(body);
    let version = r.u8().ok_or(SHORT)?;
    if version != 4 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let my_as = r.u16().ok_or(SHORT)?;
    let hold_time = r.u16().ok_or(SHORT)?;
    let bgp_id = Ipv4Addr::from(r.array::<4>().ok_or(SHORT)?);
    let opt_len = r.u8().ok_or(SHORT)?;
    if my_as == 0 {
        return Err(DecodeError::BadPeerAs(0));
    }
    if hold_time == 1 || hold_time == 2 {
        return Err(DecodeError::UnacceptableHoldTime(hold_time));
    }
    if bgp_id.is_unspecified() {
        return Err(DecodeError::BadBgpIdentifier(bgp_id));
    }
    let params = r
        .take(usize::from(opt_len))
        .ok_or(DecodeError::MalformedOpen(
            "optional parameters run past the message",
        ))?;
    if !r.is_empty() {
        return Err(DecodeError::MalformedOpen(
            "bytes after the optional parameters",
        ));
    }
    let mut capabilities = Vec::new();
    let mut p = Reader::new(params);
    while !p.is_empty() {
        const BAD_PARAM: DecodeError =
            DecodeError::MalformedOpen("an optional parameter runs past the others");
        let ty = p.u8().ok_or(BAD_PARAM)?;
        let len = p.u8().ok_or(BAD_PARAM)?;
        let value = p.take(usize::from(len)).ok_or(BAD_PARAM)?;
        if ty != PARAM_CAPABILITIES {
            return Err(DecodeError::UnsupportedOptionalParameter(ty));
        }
        let mut c = Reader::new(value);
        while !c.is_empty() {
            const BAD_CAP: DecodeError =
                DecodeError::MalformedOpen("a capability runs past its parameter");
            let start = c.buf;
            let code = c.u8().ok_or(BAD_CAP)?;
            let len = c.u8().ok_or(BAD_CAP)?;
            let value = c.take(usize::from(len)).ok_or(BAD_CAP)?;
            let tlv = start.get(..usize::from(len) + 2).unwrap_or(start);
            let cap = decode_capability(code, value, tlv)?;
            if cap == Capability::FourOctetAs(0) {
                return Err(DecodeError::BadPeerAs(0));
            }
            capabilities.push(cap);
        }
    }
    Ok(Open {
        my_as,
        hold_time,
        bgp_id,
        capabilities,
    })
}

fn decode_capability(code: u8, value: &[u8], tlv: &[u8]) -> Result<Capability, DecodeError> {
    let bad = || DecodeError::UnsupportedCapability(tlv.to_vec());
    let mut r = Reader::new(value);
    let cap = match code {
        CAP_MULTIPROTOCOL => {
            let afi = r.u16().ok_or_else(bad)?;
            let _reserved = r.u8().ok_or_else(bad)?;
            let safi = r.u8().ok_or_else(bad)?;
            Capability::Multiprotocol { afi, safi }
        }
        CAP_ROUTE_REFRESH => Capability::RouteRefresh,
        CAP_FOUR_OCTET_AS => Capability::FourOctetAs(r.u32().ok_or_else(bad)?),
        CAP_GRACEFUL_RESTART => {
            let head = r.u16().ok_or_else(bad)?;
            let mut families = Vec::new();
            while !r.is_empty() {
                let afi = r.u16().ok_or_else(bad)?;
                let safi = r.u8().ok_or_else(bad)?;
                let flags = r.u8().ok_or_else(bad)?;
                families.push(GracefulRestartFamily {
                    afi,
                    safi,
                    forwarding: flags & 0x80 != 0,
                });
            }
            Capability::GracefulRestart(GracefulRestart {
                flags: (head >> 12) as u8,
                restart_time: head & 0x0fff,
                families,
            })
        }
        _ => {
            return Ok(Capability::Unknown {
                code,
                value: value.to_vec(),
            });
        }
    };
    if r.is_empty() { Ok(cap) } else { Err(bad()) }
}

fn decode_update(body: &[u8], ctx: &Context) -> Result<Update, DecodeError> {
    let mut r = Reader::new(body);
    let withdrawn_len = r.u16().ok_or(DecodeError::MalformedAttributeList(
        "no Withdrawn Routes Length",
    ))?;
    let withdrawn =
        r.take(usize::from(withdrawn_len))
            .ok_or(DecodeError::MalformedAttributeList(
                "withdrawn routes run past the message",
            ))?;
    let attrs_len = r.u16().ok_or(DecodeError::MalformedAttributeList(
        "no Total Path Attribute Length",
    ))?;
    let attrs = r
        .take(usize::from(attrs_len))
        .ok_or(DecodeError::MalformedAttributeList(
            "path attributes run past the message",
        ))?;
    let withdrawn = decode_v4_prefixes(withdrawn).ok_or(DecodeError::InvalidNetworkField)?;
    let attributes = decode_attributes(attrs, ctx)?;
    let nlri = decode_v4_prefixes(r.buf).ok_or(DecodeError::InvalidNetworkField)?;

    // Mandatory well-known attributes (RFC 4271 §5, §6.3; RFC 4760 §3 for MP_REACH_NLRI).
    let has = |ty: u8| {
        attributes.iter().any(|a| {
            matches!(
                (ty, a),
                (ATTR_ORIGIN, PathAttribute::Origin(_))
                    | (ATTR_AS_PATH, PathAttribute::AsPath(_))
                    | (ATTR_NEXT_HOP, PathAttribute::NextHop(_))
                    | (ATTR_MP_REACH, PathAttribute::MpReachNlri(_))
            )
        })
    };
    if !nlri.is_empty() || has(ATTR_MP_REACH) {
        for ty in [ATTR_ORIGIN, ATTR_AS_PATH] {
            if !has(ty) {
                return Err(DecodeError::MissingWellKnownAttribute(ty));
            }
        }
    }
    if !nlri.is_empty() && !has(ATTR_NEXT_HOP) {
        return Err(DecodeError::MissingWellKnownAttribute(ATTR_NEXT_HOP));
    }
    Ok(Update {
        withdrawn,
        attributes,
        nlri,
    })
}

/// Length-prefixed prefixes of an `N`-octet family (RFC 4271 §4.3, RFC 4760 §5);
/// `None` if one is too long for the family or runs past the field.
fn decode_prefixes<const N: usize>(buf: &[u8]) -> Option<Vec<([u8; N], u8)>> {
    let mut r = Reader::new(buf);
    let mut out = Vec::new();
    while !r.is_empty() {
        let len = r.u8()?;
        if usize::from(len) > N * 8 {
            return None;
        }
        let bytes = r.take(usize::from(len).div_ceil(8))?;
        let mut addr = [0u8; N];
        addr.get_mut(..bytes.len())?.copy_from_slice(bytes);
        out.push((addr, len));
    }
    Some(out)
}

fn decode_v4_prefixes(buf: &[u8]) -> Option<Vec<Ipv4Net>> {
    decode_prefixes::<4>(buf)?
        .into_iter()
        .map(|(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).ok().map(|n| n.trunc()))
        .collect()
}

fn decode_v6_prefixes(buf: &[u8]) -> Option<Vec<Ipv6Net>> {
    decode_prefixes::<16>(buf)?
        .into_iter()
        .map(|(a, len)| Ipv6Net::new(Ipv6Addr::from(a), len).ok().map(|n| n.trunc()))
        .collect()
}

/// The category bits (optional, transitive) a known attribute must carry (RFC 4271 §5).
fn expected_flags(type_code: u8) -> Option<u8> {
    match type_code {
        ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF | ATTR_ATOMIC_AGGREGATE => {
            Some(WELL_KNOWN)
        }
        ATTR_MED | ATTR_MP_REACH | ATTR_MP_UNREACH => Some(OPTIONAL_NON_TRANSITIVE),
        ATTR_AGGREGATOR | ATTR_COMMUNITIES | ATTR_AS4_PATH | ATTR_LARGE_COMMUNITY => {
            Some(OPTIONAL_TRANSITIVE)
        }
        _ => None,
    }
}

fn decode_attributes(buf: &[u8], ctx: &Context) -> Result<Vec<PathAttribute>, DecodeError> {
    const OVERRUN: DecodeError =
        DecodeError::MalformedAttributeList("an attribute runs past the path attributes");
    let mut seen = [false; 256];
    let mut out = Vec::new();
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let start = r.buf;
        let flags = r.u8().ok_or(OVERRUN)?;
        let type_code = r.u8().ok_or(OVERRUN)?;
        let len = if flags & FLAG_EXTENDED != 0 {
            usize::from(r.u16().ok_or(OVERRUN)?)
        } else {
            usize::from(r.u8().ok_or(OVERRUN)?)
        };
        let value = r.take(len).ok_or(OVERRUN)?;
        let raw = start.get(..start.len() - r.buf.len()).unwrap_or(start);
        // An attribute twice (RFC 4271 §6.3).
        if let Some(s) = seen.get_mut(usize::from(type_code)) {
            if *s {
                return Err(DecodeError::MalformedAttributeList(
                    "an attribute appears twice",
                ));
            }
            *s = true;
        }
        out.push(decode_attribute(flags, type_code, value, raw, ctx)?);
    }
    Ok(out)
}

fn decode_attribute(
    flags: u8,
    type_code: u8,
    value: &[u8],
    raw: &[u8],
    ctx: &Context,
) -> Result<PathAttribute, DecodeError> {
    if let Some(expected) = expected_flags(type_code) {
        let category = flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE);
        // Partial only on optional transitive attributes (RFC 4271 §4.3).
        let partial_ok = expected == OPTIONAL_TRANSITIVE || flags & FLAG_PARTIAL == 0;
        if category != expected || !partial_ok {
            return Err(DecodeError::AttributeFlags(raw.to_vec()));
        }
    }
    let length = || DecodeError::AttributeLength(raw.to_vec());
    let optional = || DecodeError::OptionalAttribute(raw.to_vec());
    let fixed = |n: usize| {
        if value.len() == n {
            Ok(Reader::new(value))
        } else {
            Err(length())
        }
    };
    let attr = match type_code {
        ATTR_ORIGIN => match fixed(1)?.u8() {
            Some(0) => PathAttribute::Origin(Origin::Igp),
            Some(1) => PathAttribute::Origin(Origin::Egp),
            Some(2) => PathAttribute::Origin(Origin::Incomplete),
            _ => return Err(DecodeError::InvalidOrigin(raw.to_vec())),
        },
        ATTR_AS_PATH => PathAttribute::AsPath(
            decode_as_path(value, ctx.four_octet).ok_or(DecodeError::MalformedAsPath)?,
        ),
        ATTR_NEXT_HOP => {
            let nh = Ipv4Addr::from(fixed(4)?.array::<4>().ok_or_else(length)?);
            if !valid_next_hop(nh) {
                return Err(DecodeError::InvalidNextHop(raw.to_vec()));
            }
            PathAttribute::NextHop(nh)
        }
        ATTR_MED => PathAttribute::MultiExitDisc(fixed(4)?.u32().ok_or_else(length)?),
        ATTR_LOCAL_PREF => PathAttribute::LocalPref(fixed(4)?.u32().ok_or_else(length)?),
        ATTR_ATOMIC_AGGREGATE => {
            fixed(0)?;
            PathAttribute::AtomicAggregate
        }
        ATTR_AGGREGATOR => {
            let mut r = fixed(if ctx.four_octet { 8 } else { 6 })?;
            let asn = if ctx.four_octet {
                r.u32()
            } else {
                r.u16().map(u32::from)
            }
            .ok_or_else(length)?;
            let address = Ipv4Addr::from(r.array::<4>().ok_or_else(length)?);
            PathAttribute::Aggregator { asn, address }
        }
        ATTR_COMMUNITIES => {
            if !value.len().is_multiple_of(4) {
                return Err(length());
            }
            let mut r = Reader::new(value);
            let mut cs = Vec::new();
            while let Some(c) = r.u32() {
                cs.push(c);
            }
            PathAttribute::Communities(cs)
        }
        ATTR_LARGE_COMMUNITY => {
            if !value.len().is_multiple_of(12) {
                return Err(length());
            }
            let mut r = Reader::new(value);
            let mut cs = Vec::new();
            while let (Some(global_admin), Some(local1), Some(local2)) = (r.u32(), r.u32(), r.u32())
            {
                cs.push(LargeCommunity {
                    global_admin,
                    local1,
                    local2,
                });
            }
            PathAttribute::LargeCommunities(cs)
        }
        ATTR_MP_REACH => PathAttribute::MpReachNlri(decode_mp_reach(value).ok_or_else(optional)?),
        ATTR_MP_UNREACH => {
            PathAttribute::MpUnreachNlri(decode_mp_unreach(value).ok_or_else(optional)?)
        }
        ATTR_AS4_PATH => PathAttribute::As4Path(decode_as_path(value, true).ok_or_else(optional)?),
        _ if flags & FLAG_OPTIONAL == 0 => {
            return Err(DecodeError::UnrecognizedWellKnownAttribute(raw.to_vec()));
        }
        _ => PathAttribute::Unknown {
            flags: flags & !FLAG_EXTENDED,
            type_code,
            value: value.to_vec(),
        },
    };
    Ok(attr)
}

/// A NEXT_HOP that can be a unicast host: not 0.0.0.0, broadcast or multicast
/// (RFC 4271 §6.3 "syntactically incorrect").
fn valid_next_hop(nh: Ipv4Addr) -> bool {
    !(nh.is_unspecified() || nh.is_broadcast() || nh.is_multicast())
}

/// AS_PATH segments (RFC 4271 §4.3) with 2- or 4-octet ASNs (RFC 6793 §4); `None` if a
/// segment has an unknown type, no ASNs, or runs past the attribute.
fn decode_as_path(buf: &[u8], four_octet: bool) -> Option<Vec<AsPathSegment>> {
    let mut r = Reader::new(buf);
    let mut segments = Vec::new();
    while !r.is_empty() {
        let kind = match r.u8()? {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            _ => return None,
        };
        let count = usize::from(r.u8()?);
        if count == 0 {
            return None;
        }
        let width = if four_octet { 4 } else { 2 };
        let mut s = Reader::new(r.take(count * width)?);
        let mut asns = Vec::with_capacity(count);
        for _ in 0..count {
            asns.push(if four_octet {
                s.u32()?
            } else {
                u32::from(s.u16()?)
            });
        }
        segments.push(AsPathSegment { kind, asns });
    }
    Some(segments)
}

fn decode_mp_reach(buf: &[u8]) -> Option<MpReach> {
    let mut r = Reader::new(buf);
    let afi = r.u16()?;
    let safi = r.u8()?;
    let nh_len = r.u8()?;
    let mut nh = Reader::new(r.take(usize::from(nh_len))?);
    let _reserved = r.u8()?;
    match (afi, safi, nh_len) {
        (AFI_IPV4, SAFI_UNICAST, 4) => {
            let next_hop = Ipv4Addr::from(nh.array::<4>()?);
            if !valid_next_hop(next_hop) {
                return None;
            }
            Some(MpReach::Ipv4 {
                next_hop,
                nlri: decode_v4_prefixes(r.buf)?,
            })
        }
        (AFI_IPV6, SAFI_UNICAST, 16 | 32) => {
            let next_hop = Ipv6Addr::from(nh.array::<16>()?);
            let link_local = nh.array::<16>().map(Ipv6Addr::from);
            Some(MpReach::Ipv6 {
                next_hop,
                link_local,
                nlri: decode_v6_prefixes(r.buf)?,
            })
        }
        _ => None,
    }
}

fn decode_mp_unreach(buf: &[u8]) -> Option<MpUnreach> {
    let mut r = Reader::new(buf);
    let afi = r.u16()?;
    let safi = r.u8()?;
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Some(MpUnreach::Ipv4(decode_v4_prefixes(r.buf)?)),
        (AFI_IPV6, SAFI_UNICAST) => Some(MpUnreach::Ipv6(decode_v6_prefixes(r.buf)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Context = Context { four_octet: false };
    const FOUR: Context = Context { four_octet: true };

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn round_trip(msg: &Message, ctx: &Context) {
        let bytes = encode(msg, ctx);
        assert!(bytes.len() <= MAX_MESSAGE_LEN, "{msg:?} too long");
        let (back, used) = decode(&bytes, ctx).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
        assert_eq!(used, bytes.len());
        assert_eq!(&back, msg);
    }

    /// A header for `body` with type `ty`.
    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0xff; 16];
        out.extend_from_slice(&len_u16(HEADER_LEN + body.len()).to_be_bytes());
        out.push(ty);
        out.extend_from_slice(body);
        out
    }

    fn code(buf: &[u8], ctx: &Context) -> (u8, u8, Vec<u8>) {
        decode(buf, ctx).unwrap_err().notification()
    }

    fn full_open() -> Open {
        Open {
            my_as: AS_TRANS as u16,
            hold_time: 90,
            bgp_id: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::RouteRefresh,
                Capability::FourOctetAs(4_200_000_001),
                Capability::GracefulRestart(GracefulRestart {
                    flags: 0x8,
                    restart_time: 120,
                    families: vec![
                        GracefulRestartFamily {
                            afi: AFI_IPV4,
                            safi: SAFI_UNICAST,
                            forwarding: true,
                        },
                        GracefulRestartFamily {
                            afi: AFI_IPV6,
                            safi: SAFI_UNICAST,
                            forwarding: false,
                        },
                    ],
                }),
                Capability::Unknown {
                    code: 70,
                    value: vec![],
                },
                Capability::Unknown {
                    code: 73,
                    value: b"\x04node".to_vec(),
                },
            ],
        }
    }

    fn base_attrs() -> Vec<PathAttribute> {
        vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(vec![AsPathSegment {
                kind: SegmentKind::Sequence,
                asns: vec![65001],
            }]),
            PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for ctx in [TWO, FOUR] {
            round_trip(&Message::Keepalive, &ctx);
            round_trip(&Message::Open(full_open()), &ctx);
            round_trip(
                &Message::Open(Open {
                    my_as: 65001,
                    hold_time: 0,
                    bgp_id: Ipv4Addr::new(1, 2, 3, 4),
                    capabilities: vec![],
                }),
                &ctx,
            );
            round_trip(
                &Message::Notification(Notification {
                    code: 6,
                    subcode: 2,
                    data: b"shutting down".to_vec(),
                }),
                &ctx,
            );
            round_trip(
                &Message::RouteRefresh(RouteRefresh {
                    afi: AFI_IPV6,
                    subtype: 0,
                    safi: SAFI_UNICAST,
                }),
                &ctx,
            );
            round_trip(&Message::Update(Update::default()), &ctx);
            round_trip(
                &Message::Update(Update {
                    withdrawn: vec![v4("0.0.0.0/0"), v4("10.1.0.0/16"), v4("192.0.2.1/32")],
                    attributes: vec![],
                    nlri: vec![],
                }),
                &ctx,
            );
        }
    }

    #[test]
    fn every_attribute_round_trips() {
        let big = PathAttribute::Unknown {
            flags: OPTIONAL_TRANSITIVE | FLAG_PARTIAL,
            type_code: 99,
            value: vec![7; 300],
        };
        let attrs = vec![
            PathAttribute::Origin(Origin::Incomplete),
            PathAttribute::AsPath(vec![
                AsPathSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![65001, 65002],
                },
                AsPathSegment {
                    kind: SegmentKind::Set,
                    asns: vec![1, 2, 3],
                },
            ]),
            PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 1)),
            PathAttribute::MultiExitDisc(100),
            PathAttribute::LocalPref(200),
            PathAttribute::AtomicAggregate,
            PathAttribute::Aggregator {
                asn: 65010,
                address: Ipv4Addr::new(10, 9, 9, 9),
            },
            PathAttribute::Communities(vec![0xfde9_0001, 0xffff_ff01]),
            PathAttribute::MpReachNlri(MpReach::Ipv6 {
                next_hop: "2001:db8::1".parse().unwrap(),
                link_local: Some("fe80::1".parse().unwrap()),
                nlri: vec![v6("2001:db8:1::/48"), v6("::/0"), v6("2001:db8::5/128")],
            }),
            PathAttribute::MpUnreachNlri(MpUnreach::Ipv6(vec![v6("2001:db8:2::/64")])),
            PathAttribute::As4Path(vec![AsPathSegment {
                kind: SegmentKind::Sequence,
                asns: vec![4_200_000_001, 65001],
            }]),
            PathAttribute::LargeCommunities(vec![LargeCommunity {
                global_admin: 4_200_000_001,
                local1: 1,
                local2: 2,
            }]),
            big.clone(),
            PathAttribute::Unknown {
                flags: OPTIONAL_NON_TRANSITIVE,
                type_code: 200,
                value: vec![1, 2, 3],
            },
        ];
        for ctx in [TWO, FOUR] {
            let msg = Message::Update(Update {
                withdrawn: vec![v4("10.2.0.0/24")],
                attributes: attrs.clone(),
                nlri: vec![v4("192.0.2.0/24"), v4("198.51.100.7/32")],
            });
            round_trip(&msg, &ctx);
            // The 300-byte attribute went out with Extended Length.
            let bytes = encode(&msg, &ctx);
            assert!(bytes.windows(4).any(|w| w == [0xf0, 99, 0x01, 0x2c]));
        }
        // IPv4 in MP_REACH_NLRI, IPv6 without a link-local next hop, IPv4 MP_UNREACH,
        // 4-octet AGGREGATOR, and long communities (Extended Length on known attributes).
        let msg = Message::Update(Update {
            withdrawn: vec![],
            attributes: vec![
                PathAttribute::Origin(Origin::Egp),
                PathAttribute::AsPath(vec![]),
                PathAttribute::MpReachNlri(MpReach::Ipv4 {
                    next_hop: Ipv4Addr::new(10, 0, 0, 2),
                    nlri: vec![v4("203.0.113.0/25")],
                }),
                PathAttribute::MpUnreachNlri(MpUnreach::Ipv4(vec![v4("203.0.113.128/25")])),
                PathAttribute::Aggregator {
                    asn: 4_200_000_002,
                    address: Ipv4Addr::new(10, 9, 9, 9),
                },
                PathAttribute::Communities((0..100).collect()),
                PathAttribute::LargeCommunities(
                    (0..30)
                        .map(|i| LargeCommunity {
                            global_admin: i,
                            local1: i + 1,
                            local2: i + 2,
                        })
                        .collect(),
                ),
            ],
            nlri: vec![],
        });
        round_trip(&msg, &FOUR);
        let v6_only = Message::Update(Update {
            withdrawn: vec![],
            attributes: vec![
                PathAttribute::Origin(Origin::Igp),
                PathAttribute::AsPath(vec![]),
                PathAttribute::MpReachNlri(MpReach::Ipv6 {
                    next_hop: "2001:db8::1".parse().unwrap(),
                    link_local: None,
                    nlri: vec![v6("2001:db8:ff::/56")],
                }),
            ],
            nlri: vec![],
        });
        round_trip(&v6_only, &TWO);
    }

    #[test]
    fn two_octet_sessions_carry_as_trans() {
        let path = |asn| {
            PathAttribute::AsPath(vec![AsPathSegment {
                kind: SegmentKind::Sequence,
                asns: vec![asn, 65001],
            }])
        };
        let msg = |asn| {
            let mut attrs = base_attrs();
            attrs[1] = path(asn);
            Message::Update(Update {
                withdrawn: vec![],
                attributes: attrs,
                nlri: vec![v4("192.0.2.0/24")],
            })
        };
        let (back, _) = decode(&encode(&msg(4_200_000_001), &TWO), &TWO).unwrap();
        assert_eq!(back, msg(AS_TRANS));
        round_trip(&msg(4_200_000_001), &FOUR);
        // Long segments are split into runs of 255.
        let long = PathAttribute::AsPath(vec![AsPathSegment {
            kind: SegmentKind::Sequence,
            asns: (1..=300).collect(),
        }]);
        let mut attrs = base_attrs();
        attrs[1] = long;
        let bytes = encode(
            &Message::Update(Update {
                withdrawn: vec![],
                attributes: attrs,
                nlri: vec![],
            }),
            &FOUR,
        );
        let (Message::Update(u), _) = decode(&bytes, &FOUR).unwrap() else {
            panic!("not an UPDATE")
        };
        let PathAttribute::AsPath(segs) = &u.attributes[1] else {
            panic!("not AS_PATH")
        };
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].asns, (1..=255).collect::<Vec<_>>());
        assert_eq!(segs[1].asns, (256..=300).collect::<Vec<_>>());
        assert_eq!(full_open().asn(), 4_200_000_001);
    }

    #[test]
    fn keepalive_bytes() {
        let mut expected = vec![0xff; 16];
        expected.extend_from_slice(&[0, 19, 4]);
        assert_eq!(encode(&Message::Keepalive, &TWO), expected);
        assert_eq!(decode(&expected, &TWO).unwrap(), (Message::Keepalive, 19));
        // Two messages back to back: the first, then the rest.
        let mut two = expected.clone();
        two.extend_from_slice(&expected);
        assert_eq!(decode(&two, &TWO).unwrap().1, 19);
    }

    #[test]
    fn open_bytes_from_the_rfc_layout() {
        #[rustfmt::skip]
        let bytes = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, 0x2d, // length 45
            0x01, // OPEN
            0x04, // version
            0xfd, 0xe9, // my AS 65001
            0x00, 0x5a, // hold time 90
            10, 0, 0, 1, // BGP identifier
            16, // optional parameters length
            0x02, 14, // Capabilities parameter
            0x01, 0x04, 0x00, 0x01, 0x00, 0x01, // multiprotocol IPv4 unicast
            0x02, 0x00, // route refresh
            0x41, 0x04, 0x00, 0x00, 0xfd, 0xe9, // 4-octet AS 65001
        ];
        let open = Open {
            my_as: 65001,
            hold_time: 90,
            bgp_id: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::RouteRefresh,
                Capability::FourOctetAs(65001),
            ],
        };
        assert_eq!(
            decode(&bytes, &TWO).unwrap(),
            (Message::Open(open.clone()), 45)
        );
        assert_eq!(encode(&Message::Open(open), &TWO), bytes);
        // Capabilities split over several parameters (as some speakers send them) merge.
        #[rustfmt::skip]
        let split = frame(TYPE_OPEN, &[
            4, 0xfd, 0xe9, 0, 90, 10, 0, 0, 1, 18,
            2, 6, 1, 4, 0, 1, 0, 1,
            2, 2, 2, 0,
            2, 4, 0x40, 2, 0, 0,
        ]);
        let (Message::Open(o), _) = decode(&split, &TWO).unwrap() else {
            panic!("not an OPEN")
        };
        assert_eq!(o.capabilities.len(), 3);
        assert_eq!(
            o.capabilities[2],
            Capability::GracefulRestart(GracefulRestart {
                flags: 0,
                restart_time: 0,
                families: vec![],
            })
        );
    }

    #[test]
    fn update_and_notification_bytes() {
        #[rustfmt::skip]
        let bytes = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, 0x2d, 0x02, // length 45, UPDATE
            0x00, 0x00, // no withdrawn routes
            0x00, 0x12, // 18 bytes of attributes
            0x40, 0x01, 0x01, 0x00, // ORIGIN IGP
            0x40, 0x02, 0x04, 0x02, 0x01, 0xfd, 0xe9, // AS_PATH sequence [65001]
            0x40, 0x03, 0x04, 10, 0, 0, 1, // NEXT_HOP
            24, 192, 0, 2, // 192.0.2.0/24
        ];
        let update = Message::Update(Update {
            withdrawn: vec![],
            attributes: base_attrs(),
            nlri: vec![v4("192.0.2.0/24")],
        });
        assert_eq!(decode(&bytes, &TWO).unwrap(), (update.clone(), 45));
        assert_eq!(encode(&update, &TWO), bytes);
        let cease = frame(TYPE_NOTIFICATION, &[6, 2]);
        assert_eq!(cease.len(), 21);
        assert_eq!(
            encode(
                &Message::Notification(Notification {
                    code: 6,
                    subcode: 2,
                    data: vec![]
                }),
                &TWO
            ),
            cease
        );
        assert_eq!(
            encode(
                &Message::RouteRefresh(RouteRefresh {
                    afi: 1,
                    subtype: 0,
                    safi: 1
                }),
                &TWO
            ),
            frame(TYPE_ROUTE_REFRESH, &[0, 1, 0, 1])
        );
    }

    #[test]
    fn incomplete_buffers_wait() {
        let bytes = encode(&Message::Open(full_open()), &TWO);
        for n in 0..bytes.len() {
            let err = decode(&bytes[..n], &TWO).unwrap_err();
            assert!(err.is_incomplete(), "{n}: {err}");
            let needed = if n < HEADER_LEN {
                HEADER_LEN
            } else {
                bytes.len()
            };
            assert_eq!(err, DecodeError::Incomplete { needed });
        }
        // A bad header is reported before waiting for the body.
        let mut bad = bytes.clone();
        bad[16] = 0xff;
        assert_eq!(code(&bad[..HEADER_LEN], &TWO).1, 2);
    }

    #[test]
    fn header_errors() {
        let mut marker = encode(&Message::Keepalive, &TWO);
        marker[3] = 0;
        assert_eq!(code(&marker, &TWO), (1, 1, vec![]));
        let mut short = encode(&Message::Keepalive, &TWO);
        short[17] = 18;
        assert_eq!(code(&short, &TWO), (1, 2, vec![0, 18]));
        let mut long = vec![0xff; 16];
        long.extend_from_slice(&[0x10, 0x01, 2]);
        assert_eq!(code(&long, &TWO), (1, 2, vec![0x10, 0x01]));
        assert_eq!(
            code(&frame(TYPE_KEEPALIVE, &[0]), &TWO),
            (1, 2, vec![0, 20])
        );
        assert_eq!(code(&frame(TYPE_OPEN, &[4; 9]), &TWO), (1, 2, vec![0, 28]));
        assert_eq!(
            code(&frame(TYPE_UPDATE, &[0; 3]), &TWO),
            (1, 2, vec![0, 22])
        );
        assert_eq!(
            code(&frame(TYPE_NOTIFICATION, &[6]), &TWO),
            (1, 2, vec![0, 20])
        );
        assert_eq!(
            code(&frame(TYPE_ROUTE_REFRESH, &[0; 5]), &TWO),
            (1, 2, vec![0, 24])
        );
        assert_eq!(code(&frame(6, &[]), &TWO), (1, 3, vec![6]));
        assert_eq!(code(&frame(0, &[]), &TWO), (1, 3, vec![0]));
    }

    /// An OPEN body: version 4, `my_as`, `hold`, `id`, then `params`.
    fn open_body(version: u8, my_as: u16, hold: u16, id: [u8; 4], params: &[u8]) -> Vec<u8> {
        let mut b = vec![version];
        b.extend_from_slice(&my_as.to_be_bytes());
        b.extend_from_slice(&hold.to_be_bytes());
        b.extend_from_slice(&id);
        b.push(len_u8(params.len()));
        b.extend_from_slice(params);
        b
    }

    #[test]
    fn open_errors() {
        let id = [10, 0, 0, 1];
        let open = |body: Vec<u8>| code(&frame(TYPE_OPEN, &body), &TWO);
        assert_eq!(open(open_body(3, 65001, 90, id, &[])), (2, 1, vec![0, 4]));
        assert_eq!(open(open_body(4, 0, 90, id, &[])), (2, 2, vec![]));
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 6, 65, 4, 0, 0, 0, 0])),
            (2, 2, vec![])
        );
        assert_eq!(open(open_body(4, 65001, 90, [0; 4], &[])), (2, 3, vec![]));
        assert_eq!(open(open_body(4, 65001, 90, id, &[1, 0])), (2, 4, vec![]));
        assert_eq!(open(open_body(4, 65001, 1, id, &[])), (2, 6, vec![]));
        assert_eq!(open(open_body(4, 65001, 2, id, &[])), (2, 6, vec![]));
        assert!(decode(&frame(TYPE_OPEN, &open_body(4, 65001, 0, id, &[])), &TWO).is_ok());
        assert!(decode(&frame(TYPE_OPEN, &open_body(4, 65001, 3, id, &[])), &TWO).is_ok());
        // Known capabilities of the wrong length: 2/7 with the capability.
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 5, 65, 3, 0, 0, 1])),
            (2, 7, vec![65, 3, 0, 0, 1])
        );
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 3, 2, 1, 0])),
            (2, 7, vec![2, 1, 0])
        );
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 5, 64, 3, 0, 0, 0])),
            (2, 7, vec![64, 3, 0, 0, 0])
        );
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 5, 1, 3, 0, 1, 0])),
            (2, 7, vec![1, 3, 0, 1, 0])
        );
        // Lengths that do not add up.
        let mut body = open_body(4, 65001, 90, id, &[2, 2, 2, 0]);
        body[9] = 5;
        assert_eq!(open(body.clone()), (2, 0, vec![]));
        body[9] = 3;
        assert_eq!(open(body), (2, 0, vec![]));
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 3, 2, 0])),
            (2, 0, vec![])
        );
        assert_eq!(
            open(open_body(4, 65001, 90, id, &[2, 1, 2])),
            (2, 0, vec![])
        );
    }

    /// An UPDATE with `attrs` (raw) and one NLRI.
    fn update_with(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0];
        b.extend_from_slice(&len_u16(attrs.len()).to_be_bytes());
        b.extend_from_slice(attrs);
        b.extend_from_slice(nlri);
        frame(TYPE_UPDATE, &b)
    }

    const ORIGIN: [u8; 4] = [0x40, 1, 1, 0];
    const AS_PATH: [u8; 3] = [0x40, 2, 0];
    const NEXT_HOP: [u8; 7] = [0x40, 3, 4, 10, 0, 0, 1];
    const NLRI: [u8; 4] = [24, 192, 0, 2];

    fn with_base(extra: &[u8]) -> Vec<u8> {
        [&ORIGIN[..], &AS_PATH, &NEXT_HOP, extra].concat()
    }

    #[test]
    fn update_errors() {
        let up = |attrs: &[u8]| code(&update_with(attrs, &NLRI), &TWO);
        assert!(decode(&update_with(&with_base(&[]), &NLRI), &TWO).is_ok());
        // 3/1: lengths that run past the message, an attribute twice.
        assert_eq!(
            code(&frame(TYPE_UPDATE, &[0, 5, 0, 0]), &TWO),
            (3, 1, vec![])
        );
        assert_eq!(
            code(&frame(TYPE_UPDATE, &[0, 0, 0, 9, 0x40]), &TWO),
            (3, 1, vec![])
        );
        assert_eq!(up(&with_base(&[0x40, 1, 1, 0])), (3, 1, vec![]));
        assert_eq!(up(&with_base(&[0x80, 4, 4, 0])), (3, 1, vec![]));
        assert_eq!(up(&with_base(&[0x80])), (3, 1, vec![]));
        // 3/2: an unknown well-known attribute.
        assert_eq!(
            up(&with_base(&[0x40, 99, 1, 7])),
            (3, 2, vec![0x40, 99, 1, 7])
        );
        // 3/3: each mandatory one missing.
        assert_eq!(up(&[&AS_PATH[..], &NEXT_HOP].concat()), (3, 3, vec![1]));
        assert_eq!(up(&[&ORIGIN[..], &NEXT_HOP].concat()), (3, 3, vec![2]));
        assert_eq!(up(&[&ORIGIN[..], &AS_PATH].concat()), (3, 3, vec![3]));
        let mp = [0x80, 14, 9, 0, 1, 1, 4, 10, 0, 0, 1, 0];
        assert_eq!(
            code(&update_with(&[&ORIGIN[..], &mp].concat(), &[]), &TWO),
            (3, 3, vec![2])
        );
        assert!(
            decode(
                &update_with(&[&ORIGIN[..], &AS_PATH, &mp].concat(), &[]),
                &TWO
            )
            .is_ok()
        );
        // Withdrawals alone need no attributes.
        assert!(decode(&frame(TYPE_UPDATE, &[0, 4, 24, 10, 0, 0, 0, 0]), &TWO).is_ok());
        // 3/4: flags that do not match the type.
        assert_eq!(up(&[0xc0, 1, 1, 0]), (3, 4, vec![0xc0, 1, 1, 0]));
        assert_eq!(up(&[0x60, 1, 1, 0]), (3, 4, vec![0x60, 1, 1, 0]));
        assert_eq!(
            up(&with_base(&[0x40, 4, 4, 0, 0, 0, 0])),
            (3, 4, vec![0x40, 4, 4, 0, 0, 0, 0])
        );
        assert_eq!(up(&with_base(&[0x80, 8, 0])), (3, 4, vec![0x80, 8, 0]));
        assert_eq!(up(&with_base(&[0xa0, 14, 0])), (3, 4, vec![0xa0, 14, 0]));
        // Partial on an optional transitive one is fine.
        assert!(decode(&update_with(&with_base(&[0xe0, 8, 0]), &NLRI), &TWO).is_ok());
        // 3/5: lengths that do not match the type.
        assert_eq!(up(&[0x40, 1, 2, 0, 0]), (3, 5, vec![0x40, 1, 2, 0, 0]));
        assert_eq!(
            up(&[&ORIGIN[..], &AS_PATH, &[0x40, 3, 3, 10, 0, 0]].concat()),
            (3, 5, vec![0x40, 3, 3, 10, 0, 0])
        );
        assert_eq!(
            up(&with_base(&[0x80, 4, 3, 0, 0, 0])),
            (3, 5, vec![0x80, 4, 3, 0, 0, 0])
        );
        assert_eq!(up(&with_base(&[0x40, 5, 5, 0, 0, 0, 0, 0])).1, 5);
        assert_eq!(up(&with_base(&[0x40, 6, 1, 0])).1, 5);
        assert_eq!(up(&with_base(&[0xc0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0])).1, 5);
        assert_eq!(up(&with_base(&[0xc0, 8, 3, 0, 0, 0])).1, 5);
        assert_eq!(up(&with_base(&[0xc0, 32, 4, 0, 0, 0, 0])).1, 5);
        // 3/6: ORIGIN 3.
        assert_eq!(
            up(&[&[0x40, 1, 1, 3][..], &AS_PATH, &NEXT_HOP].concat()),
            (3, 6, vec![0x40, 1, 1, 3])
        );
        // 3/8: NEXT_HOP that is no unicast host.
        for nh in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 5]] {
            let attr = [&[0x40, 3, 4][..], &nh].concat();
            assert_eq!(up(&[&ORIGIN[..], &AS_PATH, &attr].concat()), (3, 8, attr));
        }
        // 3/9: MP_REACH_NLRI / MP_UNREACH_NLRI / AS4_PATH that do not parse.
        let bad_mp: [&[u8]; 6] = [
            &[0x80, 14, 9, 0, 1, 1, 16, 10, 0, 0, 1, 0],
            &[0x80, 14, 9, 0, 1, 2, 4, 10, 0, 0, 1, 0],
            &[0x80, 14, 10, 0, 1, 1, 4, 10, 0, 0, 1, 0, 33],
            &[0x80, 14, 9, 0, 1, 1, 4, 0, 0, 0, 0, 0],
            &[0x80, 15, 4, 0, 2, 1, 129],
            &[0xc0, 17, 2, 3, 1],
        ];
        for attr in bad_mp {
            assert_eq!(up(&with_base(attr)), (3, 9, attr.to_vec()));
        }
        // 3/10: prefixes too long or cut short.
        assert_eq!(
            code(&update_with(&with_base(&[]), &[33, 1, 2, 3, 4, 5]), &TWO),
            (3, 10, vec![])
        );
        assert_eq!(
            code(&update_with(&with_base(&[]), &[24, 1, 2]), &TWO),
            (3, 10, vec![])
        );
        assert_eq!(
            code(&frame(TYPE_UPDATE, &[0, 2, 16, 10, 0, 0]), &TWO),
            (3, 10, vec![])
        );
        // 3/11: AS_PATH segment type, empty segment, run past the attribute.
        for path in [&[3u8, 1, 0, 1][..], &[2, 0], &[2, 2, 0, 1], &[2]] {
            let attr = [&[0x40, 2, len_u8(path.len())][..], path].concat();
            assert_eq!(
                up(&[&ORIGIN[..], &attr, &NEXT_HOP].concat()),
                (3, 11, vec![])
            );
        }
        // A 2-byte segment decodes in 2-octet sessions and is cut short in 4-octet ones.
        let attrs = [&ORIGIN[..], &[0x40, 2, 4, 2, 1, 0xfd, 0xe9], &NEXT_HOP].concat();
        assert!(decode(&update_with(&attrs, &NLRI), &TWO).is_ok());
        assert_eq!(code(&update_with(&attrs, &NLRI), &FOUR), (3, 11, vec![]));
        // Extended Length on decode.
        let ext = [0xd0, 8, 0, 4, 0, 0, 0, 1];
        let (Message::Update(u), _) = decode(&update_with(&with_base(&ext), &NLRI), &TWO).unwrap()
        else {
            panic!("not an UPDATE")
        };
        assert_eq!(u.attributes[3], PathAttribute::Communities(vec![1]));
    }

    /// xorshift64* (no dependency): deterministic from the seed.
    struct Rng(u64);

    impl Rng {
        fn step(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.step() % n
        }
        fn u8(&mut self) -> u8 {
            self.step() as u8
        }
        fn u16(&mut self) -> u16 {
            self.step() as u16
        }
        fn u32(&mut self) -> u32 {
            self.step() as u32
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            (0..self.below(max + 1)).map(|_| self.u8()).collect()
        }
        fn host(&mut self) -> Ipv4Addr {
            Ipv4Addr::new(10, self.u8(), self.u8(), self.u8())
        }
        fn v4_prefixes(&mut self, max: u64) -> Vec<Ipv4Net> {
            (0..self.below(max + 1))
                .map(|_| {
                    let len = self.below(33) as u8;
                    Ipv4Net::new(Ipv4Addr::from(self.u32()), len)
                        .unwrap()
                        .trunc()
                })
                .collect()
        }
        fn v6_prefixes(&mut self, max: u64) -> Vec<Ipv6Net> {
            (0..self.below(max + 1))
                .map(|_| {
                    let len = self.below(129) as u8;
                    let addr =
                        Ipv6Addr::from((u128::from(self.step()) << 64) | u128::from(self.step()));
                    Ipv6Net::new(addr, len).unwrap().trunc()
                })
                .collect()
        }
        fn v6(&mut self) -> Ipv6Addr {
            Ipv6Addr::from((u128::from(self.step()) << 64) | u128::from(self.step()))
        }
        fn as_path(&mut self, four_octet: bool) -> Vec<AsPathSegment> {
            (0..self.below(4))
                .map(|_| AsPathSegment {
                    kind: if self.chance(3) {
                        SegmentKind::Set
                    } else {
                        SegmentKind::Sequence
                    },
                    asns: (0..1 + self.below(20))
                        .map(|_| {
                            if four_octet {
                                self.u32()
                            } else {
                                u32::from(self.u16())
                            }
                        })
                        .collect(),
                })
                .collect()
        }
    }

    fn random_capability(rng: &mut Rng) -> Capability {
        match rng.below(5) {
            0 => Capability::Multiprotocol {
                afi: rng.u16(),
                safi: rng.u8(),
            },
            1 => Capability::RouteRefresh,
            2 => Capability::FourOctetAs(rng.u32().max(1)),
            3 => Capability::GracefulRestart(GracefulRestart {
                flags: rng.u8() & 0x0f,
                restart_time: rng.u16() & 0x0fff,
                families: (0..rng.below(4))
                    .map(|_| GracefulRestartFamily {
                        afi: rng.u16(),
                        safi: rng.u8(),
                        forwarding: rng.chance(2),
                    })
                    .collect(),
            }),
            _ => Capability::Unknown {
                code: loop {
                    let c = rng.u8();
                    if ![
                        CAP_MULTIPROTOCOL,
                        CAP_ROUTE_REFRESH,
                        CAP_GRACEFUL_RESTART,
                        CAP_FOUR_OCTET_AS,
                    ]
                    .contains(&c)
                    {
                        break c;
                    }
                },
                value: rng.bytes(16),
            },
        }
    }

    fn random_attributes(rng: &mut Rng, ctx: &Context, with_nlri: bool) -> Vec<PathAttribute> {
        let mut attrs = Vec::new();
        let mp_reach = rng.chance(3);
        if with_nlri || mp_reach || rng.chance(2) {
            attrs.push(PathAttribute::Origin(match rng.below(3) {
                0 => Origin::Igp,
                1 => Origin::Egp,
                _ => Origin::Incomplete,
            }));
            attrs.push(PathAttribute::AsPath(rng.as_path(ctx.four_octet)));
        }
        if with_nlri || rng.chance(4) {
            attrs.push(PathAttribute::NextHop(rng.host()));
        }
        if mp_reach {
            attrs.push(PathAttribute::MpReachNlri(if rng.chance(2) {
                MpReach::Ipv4 {
                    next_hop: rng.host(),
                    nlri: rng.v4_prefixes(10),
                }
            } else {
                MpReach::Ipv6 {
                    next_hop: rng.v6(),
                    link_local: if rng.chance(2) { Some(rng.v6()) } else { None },
                    nlri: rng.v6_prefixes(20),
                }
            }));
        }
        if rng.chance(3) {
            attrs.push(PathAttribute::MpUnreachNlri(if rng.chance(2) {
                MpUnreach::Ipv4(rng.v4_prefixes(10))
            } else {
                MpUnreach::Ipv6(rng.v6_prefixes(20))
            }));
        }
        if rng.chance(2) {
            attrs.push(PathAttribute::MultiExitDisc(rng.u32()));
        }
        if rng.chance(2) {
            attrs.push(PathAttribute::LocalPref(rng.u32()));
        }
        if rng.chance(4) {
            attrs.push(PathAttribute::AtomicAggregate);
        }
        if rng.chance(4) {
            let asn = if ctx.four_octet {
                rng.u32()
            } else {
                u32::from(rng.u16())
            };
            attrs.push(PathAttribute::Aggregator {
                asn,
                address: rng.host(),
            });
        }
        if rng.chance(2) {
            attrs.push(PathAttribute::Communities(
                (0..rng.below(90)).map(|_| rng.u32()).collect(),
            ));
        }
        if rng.chance(3) {
            attrs.push(PathAttribute::As4Path(rng.as_path(true)));
        }
        if rng.chance(2) {
            attrs.push(PathAttribute::LargeCommunities(
                (0..rng.below(30))
                    .map(|_| LargeCommunity {
                        global_admin: rng.u32(),
                        local1: rng.u32(),
                        local2: rng.u32(),
                    })
                    .collect(),
            ));
        }
        let mut used: Vec<u8> = Vec::new();
        for _ in 0..rng.below(3) {
            let type_code = rng.u8();
            if expected_flags(type_code).is_some() || used.contains(&type_code) {
                continue;
            }
            used.push(type_code);
            let max = if rng.chance(4) { 400 } else { 20 };
            attrs.push(PathAttribute::Unknown {
                flags: FLAG_OPTIONAL | (rng.u8() & (FLAG_TRANSITIVE | FLAG_PARTIAL | 0x0f)),
                type_code,
                value: rng.bytes(max),
            });
        }
        // Any order.
        for i in (1..attrs.len()).rev() {
            attrs.swap(i, rng.below(i as u64 + 1) as usize);
        }
        attrs
    }

    fn random_message(rng: &mut Rng, ctx: &Context) -> Message {
        match rng.below(5) {
            0 => Message::Keepalive,
            1 => Message::Notification(Notification {
                code: rng.u8(),
                subcode: rng.u8(),
                data: rng.bytes(64),
            }),
            2 => Message::RouteRefresh(RouteRefresh {
                afi: rng.u16(),
                subtype: rng.u8(),
                safi: rng.u8(),
            }),
            3 => Message::Open(Open {
                my_as: rng.u16().max(1),
                hold_time: if rng.chance(4) { 0 } else { rng.u16().max(3) },
                bgp_id: Ipv4Addr::from(rng.u32().max(1)),
                capabilities: (0..rng.below(8)).map(|_| random_capability(rng)).collect(),
            }),
            _ => {
                let nlri = rng.v4_prefixes(10);
                Message::Update(Update {
                    withdrawn: rng.v4_prefixes(10),
                    attributes: random_attributes(rng, ctx, !nlri.is_empty()),
                    nlri,
                })
            }
        }
    }

    #[test]
    fn random_valid_messages_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut kinds = [0usize; 5];
        for i in 0..2000 {
            let ctx = if i % 2 == 0 { TWO } else { FOUR };
            let msg = random_message(&mut rng, &ctx);
            kinds[match msg {
                Message::Open(_) => 0,
                Message::Update(_) => 1,
                Message::Notification(_) => 2,
                Message::Keepalive => 3,
                Message::RouteRefresh(_) => 4,
            }] += 1;
            round_trip(&msg, &ctx);
        }
        assert!(kinds.iter().all(|&n| n > 300), "{kinds:?}");
    }

    #[test]
    fn random_and_mutated_buffers_never_panic() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut oks = 0;
        for i in 0..20_000 {
            let ctx = if i % 2 == 0 { TWO } else { FOUR };
            let mut buf = encode(&random_message(&mut rng, &ctx), &ctx);
            match rng.below(6) {
                // Flip a few bytes (the header sometimes spared so the body gets parsed).
                0..=2 => {
                    for _ in 0..1 + rng.below(4) {
                        let from = if rng.chance(2) { HEADER_LEN } else { 0 };
                        let at = from + rng.below((buf.len() - from).max(1) as u64) as usize;
                        if let Some(b) = buf.get_mut(at) {
                            *b = rng.u8();
                        }
                    }
                }
                // Cut short or extended with garbage, the length field following or not.
                3 => {
                    let n = rng.below(buf.len() as u64 + 40) as usize;
                    buf.resize(n, rng.u8());
                    if rng.chance(2) && buf.len() >= HEADER_LEN {
                        let len = len_u16(buf.len()).to_be_bytes();
                        buf[16..18].copy_from_slice(&len);
                    }
                }
                // Random bytes behind a plausible header.
                4 => {
                    let body = rng.bytes(200);
                    buf = frame(1 + rng.below(5) as u8, &body);
                }
                // Random bytes.
                _ => buf = rng.bytes(100),
            }
            match decode(&buf, &ctx) {
                Ok((msg, used)) => {
                    oks += 1;
                    assert!(used <= buf.len());
                    // Whatever decodes, re-encodes to the same message.
                    let again = encode(&msg, &ctx);
                    assert_eq!(decode(&again, &ctx).unwrap().0, msg);
                }
                Err(e) => {
                    let (code, _, data) = e.notification();
                    assert!((1..=3).contains(&code));
                    assert!(data.len() <= MAX_MESSAGE_LEN);
                }
            }
        }
        assert!(oks > 1000, "{oks}");
    }
}
