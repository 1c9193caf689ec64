//! Bounds-checked header access and the IPv4 + TCP/UDP parse both programs share.
//! Every read goes through [`ptr_at`], the one place the verifier's packet bounds
//! check is made.
use core::mem;

use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use xlb_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// Offset of the IPv4 header (untagged Ethernet).
pub const IP_OFF: usize = EthHdr::LEN;
/// Offset of the L4 header when the IPv4 header has no options.
pub const L4_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
/// Offset of the TCP checksum within the TCP header.
pub const TCP_CSUM_OFF: usize = 16;
/// Offset of the UDP checksum within the UDP header.
pub const UDP_CSUM_OFF: usize = 6;
/// Offset of the IPv4 header checksum within the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
/// Offset of the IPv4 source address within the IPv4 header.
pub const IP_SRC_OFF: usize = 12;
/// Offset of the IPv4 destination address within the IPv4 header.
pub const IP_DST_OFF: usize = 16;

/// Returns a pointer to a `T` at `offset` in the packet `[start, end)`, or `None` if
/// it would run past the end.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// At TC: the packet's linear part `[start, end)` once it holds at least `len` bytes,
/// pulling them in (`bpf_skb_pull_data`) only when an skb keeps them in page fragments
/// (AF_PACKET, some drivers). What XDP passed on is linear already, so the usual cost
/// is two context loads. Direct writes into it are safe: the verifier gives a program
/// that writes packet data a prologue that un-clones the skb's head first
/// (`tc_cls_act_prologue`).
#[inline(always)]
pub fn tc_linear(ctx: &aya_ebpf::programs::TcContext, len: usize) -> Option<(usize, usize)> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + len <= end {
        return Some((start, end));
    }
    ctx.pull_data(len as u32).ok()?;
    Some((ctx.data(), ctx.data_end()))
}

/// What the programs need from an IPv4 TCP/UDP packet without options.
pub struct Flow4 {
    /// Source address as on the wire.
    pub src: [u8; 4],
    /// Destination address as on the wire.
    pub dst: [u8; 4],
    /// Source port as on the wire.
    pub sport: [u8; 2],
    /// Destination port as on the wire.
    pub dport: [u8; 2],
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
}

impl Flow4 {
    /// The flow hash Maglev and SNAT port allocation use (`xlb_common::flow_hash_v4`,
    /// the same function the agent's tests predict choices with).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        xlb_common::flow_hash_v4(
            u32::from_be_bytes(self.src),
            u32::from_be_bytes(self.dst),
            u16::from_be_bytes(self.sport),
            u16::from_be_bytes(self.dport),
            self.proto,
        )
    }
}

/// Why [`parse4`] did not return a flow.
pub enum NotFlow {
    /// Not IPv4 TCP/UDP, or too short to tell: not ours.
    Other,
    /// IPv4 with options: passed untouched (counted).
    IpOptions,
    /// An IPv4 fragment: only the first carries ports, so none is balanced (counted).
    Fragment,
    /// An IPv4 header the kernel would drop: truncated, version not 4, IHL < 5.
    Malformed,
    /// ICMP (IPv4 without options, not a fragment): checked for VIP flows by `icmp`.
    Icmp,
}

/// Parses Ethernet + IPv4 + the two port fields of TCP/UDP. The rest of the L4 header
/// is validated only for VIP traffic (see `lb`), keeping the miss path short.
#[inline(always)]
pub fn parse4(start: usize, end: usize) -> Result<Flow4, NotFlow> {
    let eth: *const EthHdr = ptr_at(start, end, 0).ok_or(NotFlow::Other)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != (network_types::eth::EtherType::Ipv4 as u16) {
        return Err(NotFlow::Other);
    }
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(NotFlow::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl != 0x45 {
        // Version 4 with IHL > 5 carries options (passed, for TCP/UDP counted);
        // anything else is what ip_rcv drops (RFC 791 section 3.1, RFC 1122 3.2.1.1).
        return Err(if ip.vihl >> 4 != 4 || ip.vihl & 0xf < 5 {
            NotFlow::Malformed
        } else if ip.proto == PROTO_TCP || ip.proto == PROTO_UDP {
            NotFlow::IpOptions
        } else {
            NotFlow::Other
        });
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        if ip.proto == PROTO_ICMP && u16::from_be_bytes(ip.frags) & 0x3fff == 0 {
            return Err(NotFlow::Icmp);
        }
        return Err(NotFlow::Other);
    }
    // MF flag or a non-zero offset (RFC 791 section 3.1).
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(NotFlow::Fragment);
    }
    let ports: *const [u8; 4] = ptr_at(start, end, L4_OFF).ok_or(NotFlow::Other)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    Ok(Flow4 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip.proto,
    })
}

/// Widens an IPv4 address into the family-agnostic key form.
#[inline(always)]
pub fn addr16(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = a[0];
    out[1] = a[1];
    out[2] = a[2];
    out[3] = a[3];
    out
}
