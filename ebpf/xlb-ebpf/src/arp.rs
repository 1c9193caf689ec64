//! ARP for the VIPs this node owns in L2 mode (RFC 826, Ethernet + IPv4 only).
//!
//! A request whose target is in `xlb_l2_vips4` is turned into its reply in place and
//! sent back out of the interface it came in on (XDP_TX), so the VIP's MAC is this
//! node's while it owns the VIP, and the kernel (which has no address for the VIP)
//! never sees the request. Everything else ARP goes to the kernel untouched: requests
//! for other addresses, replies, announcements (sender = target, RFC 5227 section 3:
//! another node announcing, never to be answered), and any request once the agent's
//! dead-man deadline (`xlb_common::config::L2_DEADLINE`) has passed.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use network_types::eth::EthHdr;
use xlb_common::{Reason, config};

use crate::{
    hook::Hook,
    maps::{CONFIG, L2_STATS4, L2_VIPS4, count},
    packet::ptr_at,
};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;

/// An Ethernet/IPv4 ARP packet (RFC 826), fields as on the wire.
#[repr(C)]
struct Arp4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// Whether the frame is ARP (one comparison, for the miss path of `xlb_xdp`).
#[inline(always)]
pub fn is_arp<C: Hook>(ctx: &C) -> bool {
    match ptr_at::<EthHdr>(ctx.start(), ctx.end(), 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => (unsafe { (*eth).ether_type }) == ETH_P_ARP.to_be(),
        None => false,
    }
}

/// Answers an ARP request for an owned VIP (back out where it came in) or passes the
/// frame.
#[inline(always)]
pub fn answer<C: Hook>(ctx: &C) -> u32 {
    let (start, end) = (ctx.start(), ctx.end());
    let (Some(eth), Some(arp)) = (
        ptr_at::<EthHdr>(start, end, 0),
        ptr_at::<Arp4>(start, end, EthHdr::LEN),
    ) else {
        return C::PASS;
    };
    // SAFETY: bounds checked by ptr_at; both are byte arrays (alignment 1).
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    // Ethernet (1), IPv4 (0x0800), 6- and 4-byte addresses, a request (1).
    if arp.htype != [0, 1]
        || arp.ptype != [8, 0]
        || arp.hlen != 6
        || arp.plen != 4
        || arp.oper != [0, 1]
        || arp.spa == arp.tpa
    {
        return C::PASS;
    }
    let vip = u32::from_ne_bytes(arp.tpa);
    // SAFETY: plain data copied out at once.
    let Some(owned) = (unsafe { L2_VIPS4.get(&vip) }).copied() else {
        return C::PASS;
    };
    let deadline = CONFIG.get(config::L2_DEADLINE).copied().unwrap_or(0);
    // SAFETY: bpf_ktime_get_ns has no preconditions; CLOCK_MONOTONIC, the clock the
    // agent computes the deadline on.
    if unsafe { bpf_ktime_get_ns() } >= deadline {
        count(Reason::PassArpDeadline);
        return C::PASS;
    }
    // The reply (RFC 826 "Packet Reception"): swap sender and target, put our
    // hardware address as the sender's, opcode 2; to the requester's MAC.
    arp.oper = [0, 2];
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = owned.mac;
    arp.spa = vip.to_ne_bytes();
    eth.dst_addr = arp.tha;
    eth.src_addr = owned.mac;
    if let Some(c) = L2_STATS4.get_ptr_mut(&vip) {
        // SAFETY: this CPU's value of a per-CPU map.
        unsafe { *c += 1 };
    }
    count(Reason::ArpReply);
    ctx.tx()
}
