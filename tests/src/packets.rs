//! Ethernet/IPv4/TCP/UDP frames built byte by byte, with checksums computed from scratch,
//! and from-scratch checks of the checksums in a frame: for tests that feed hand-made
//! packets to the XDP program (`BPF_PROG_TEST_RUN`) and verify what comes back.

/// IP protocol number of TCP.
const PROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
/// IP protocol number of UDP.
const PROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

/// Length of the Ethernet header that starts every frame built here.
pub const ETH_LEN: usize = 14;
/// Offset of the IPv4 header checksum in a frame.
pub const IP_CSUM: usize = ETH_LEN + 10;
/// Offset of the IPv4 destination address in a frame.
pub const IP_DST: usize = ETH_LEN + 16;
/// Offset of the L4 header in a frame whose IPv4 header has no options.
pub const L4: usize = ETH_LEN + 20;
/// Offset of the TCP/UDP destination port (IPv4 header without options).
pub const DPORT: usize = L4 + 2;
/// Offset of the TCP checksum (IPv4 header without options).
pub const TCP_CSUM: usize = L4 + 16;
/// Offset of the UDP checksum (IPv4 header without options).
pub const UDP_CSUM: usize = L4 + 6;

/// The TCP SYN flag.
pub const SYN: u8 = 0x02;
/// The TCP ACK flag.
pub const ACK: u8 = 0x10;

// ---------------------------------------------------------------------------------
// Packet building, from scratch.

/// One's-complement sum of 16-bit big-endian words (an odd last byte is padded).
pub fn ones_sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Folds a one's-complement sum's carries back into 16 bits.
pub fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data))
}

/// The IPv4 pseudo-header that TCP and UDP checksums cover, for an L4 length of `len`.
pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// An Ethernet frame (fixed locally administered MACs) carrying `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header, with knobs for the malformed corpus.
#[derive(Clone)]
pub struct Ip4 {
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// The version/IHL byte (`0x45` by default); not adjusted to `options`.
    pub vihl: u8,
    /// Flags and fragment offset (DF by default).
    pub frags: u16,
    /// Total length to write instead of the real one.
    pub tot_len: Option<u16>,
    /// Option bytes appended after the 20-byte header.
    pub options: Vec<u8>,
}

impl Ip4 {
    /// A plain 20-byte header with DF set.
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Ip4 {
            src,
            dst,
            proto,
            vihl: 0x45,
            frags: 0x4000, // DF, as Linux sends TCP
            tot_len: None,
            options: vec![],
        }
    }

    /// Ethernet + this header (checksum computed) + `l4`.
    pub fn frame(&self, l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let tot = self.tot_len.unwrap_or((hlen + l4.len()) as u16);
        let mut h = vec![self.vihl, 0];
        h.extend_from_slice(&tot.to_be_bytes());
        h.extend_from_slice(&[0x1c, 0x46]);
        h.extend_from_slice(&self.frags.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(l4);
        eth(0x0800, &h)
    }
}

/// A TCP segment with a correct checksum; `doff` is the raw data-offset nibble.
pub fn tcp_seg(
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    flags: u8,
    doff: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&ports.0.to_be_bytes());
    s.extend_from_slice(&ports.1.to_be_bytes());
    s.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    s.extend_from_slice(&(if flags & ACK != 0 { 0x5566_7788u32 } else { 0 }).to_be_bytes());
    s.extend_from_slice(&[doff << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    s.extend_from_slice(options);
    s.extend_from_slice(payload);
    let mut all = pseudo(src, dst, PROTO_TCP, s.len());
    all.extend_from_slice(&s);
    let c = checksum(&all);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram; `len` overrides the length field; the checksum (0 when
/// `with_csum` is false) covers min(len field, bytes present).
pub fn udp_dgram(
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
    len: Option<u16>,
    with_csum: bool,
) -> Vec<u8> {
    let len = len.unwrap_or((8 + payload.len()) as u16);
    let mut s = Vec::new();
    s.extend_from_slice(&ports.0.to_be_bytes());
    s.extend_from_slice(&ports.1.to_be_bytes());
    s.extend_from_slice(&len.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if with_csum {
        let cover = (len as usize).min(s.len());
        let mut all = pseudo(src, dst, PROTO_UDP, cover);
        all.extend_from_slice(&s[..cover]);
        let c = match checksum(&all) {
            0 => 0xffff,
            c => c,
        };
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    s
}

/// A TCP SYN frame with the usual options (MSS, SACK-permitted, timestamps, wscale).
pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let opts = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    Ip4::new(src, dst, PROTO_TCP).frame(&tcp_seg(src, dst, (sport, dport), SYN, 10, &opts, &[]))
}

/// An unfragmented UDP frame (no DF) with a correct checksum.
pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ip4::new(src, dst, PROTO_UDP);
    ip.frags = 0;
    ip.frame(&udp_dgram(src, dst, (sport, dport), payload, None, true))
}

// ---------------------------------------------------------------------------------
// Checking, from scratch.

/// The IPv4 header checksum of frame `f` verifies.
pub fn ip_csum_ok(f: &[u8]) -> bool {
    let hlen = usize::from(f[ETH_LEN] & 0xf) * 4;
    fold(ones_sum(&f[ETH_LEN..ETH_LEN + hlen])) == 0xffff
}

/// The L4 checksum verifies over the bytes the receiver would cover: the IP payload
/// (trimmed to `tot_len`, i.e. without Ethernet padding), and for UDP the datagram
/// length. UDP checksum 0 means none and passes.
pub fn l4_csum_ok(f: &[u8]) -> bool {
    let hlen = usize::from(f[ETH_LEN] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]));
    let l4 = ETH_LEN + hlen;
    let proto = f[ETH_LEN + 9];
    // A tot_len below the header length says nothing: use what the frame holds.
    let mut cover = if tot >= hlen {
        (f.len() - l4).min(tot - hlen)
    } else {
        f.len() - l4
    };
    if proto == PROTO_UDP {
        if f[l4 + 6..l4 + 8] == [0, 0] {
            return true;
        }
        cover = cover.min(usize::from(u16::from_be_bytes([f[l4 + 4], f[l4 + 5]])));
    }
    let addr = |at: usize| [f[at], f[at + 1], f[at + 2], f[at + 3]];
    let mut all = pseudo(addr(ETH_LEN + 12), addr(ETH_LEN + 16), proto, cover);
    all.extend_from_slice(&f[l4..l4 + cover]);
    fold(ones_sum(&all)) == 0xffff
}

/// `b` as lowercase hex, for assertion messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
