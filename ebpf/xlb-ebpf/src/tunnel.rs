//! IPIP between nodes for externalTrafficPolicy Cluster with the client's address
//! preserved (RFC 2003 encapsulation, built by the program: this kernel has no ipip
//! driver, and none is needed). The entry node encapsulates the client's packet
//! unchanged towards the backend's node; that node's XDP decapsulates it, balances it
//! like any VIP packet (only to its own pods) and its TC egress turns the pod's reply
//! back into VIP:port, sent straight to the client (direct server return).
//!
//! MTU: encapsulation adds 20 bytes. A DF packet that no longer fits the path to the
//! other node is answered with ICMP fragmentation-needed carrying MTU - 20 (RFC 1191),
//! so the client's path MTU discovery shrinks its packets; never a silent drop. A
//! packet longer than the path's MTU cannot have come as one frame: it is an
//! aggregate (generic XDP sees GRO and GSO skbs whole), which TC encapsulates so that
//! the kernel cuts it into segments that fit ([`encap_aggregate`]).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use xlb_common::{Backend, Reason, config};

use crate::{
    hook::Hook,
    maps::{CONFIG, count},
    packet::{IP_OFF, ptr_at},
};

/// IP protocol number of IPv4-in-IPv4.
pub const PROTO_IPIP: u8 = 4;
/// Bytes the outer header adds.
const OUTER: usize = Ipv4Hdr::LEN;
const AF_INET: u8 = 2;
const PROTO_ICMP: u8 = 1;

/// This node's tunnel address (0 when the agent has not set one).
#[inline(always)]
pub fn node_ip() -> [u8; 4] {
    let v = CONFIG.get(config::NODE_IP).copied().unwrap_or(0);
    (v as u32).to_ne_bytes()
}

/// Strips the outer header of an IPIP packet addressed to this node, leaving the
/// client's packet behind the original Ethernet header. `None`: not ours.
#[inline(always)]
pub fn decap<C: Hook>(ctx: &C) -> Option<()> {
    let (start, end) = (ctx.start(), ctx.end());
    let eth: *const EthHdr = ptr_at(start, end, 0)?;
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let (eth, ip) = unsafe { (*eth, &*ip) };
    if ip.proto != PROTO_IPIP
        || eth.ether_type != network_types::eth::EtherType::Ipv4 as u16
        || ip.vihl != 0x45
        || u16::from_be_bytes(ip.frags) & 0x3fff != 0
    {
        return None;
    }
    // Only now (IPIP is rare) pay for the config lookup.
    let me = node_ip();
    if me == [0; 4] || ip.dst_addr != me {
        return None;
    }
    // The inner header must be there before we commit to stripping.
    let _: *const Ipv4Hdr = ptr_at(start, end, IP_OFF + OUTER)?;
    if !ctx.pop_behind_eth(OUTER as u32) {
        return None;
    }
    count(Reason::Decap);
    Some(())
}

/// Encapsulates the (unmodified) client packet towards `backend.node` and sends it
/// out: XDP_TX when the node is reached through the interface it came in on, else a
/// redirect. When the next hop has no resolved neighbour entry (a node never talked
/// to, after a reboot or an ARP timeout), XDP cannot resolve it: the encapsulated
/// packet goes to the kernel (XDP_PASS) handed to TC (see `handoff`), and `xlb_tc_ingress`
/// sends it with `bpf_redirect_neigh`, which resolves the neighbour and queues the
/// packet meanwhile. `Err` carries the drop reason.
#[inline(always)]
pub fn encap<C: Hook>(ctx: &C, backend: &Backend) -> Result<u32, Reason> {
    let (start, end) = (ctx.start(), ctx.end());
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(Reason::DropMalformedL4)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { *ip };
    let inner_len = u16::from_be_bytes(inner.tot_len);
    let me = node_ip();
    let dst = [
        backend.node[0],
        backend.node[1],
        backend.node[2],
        backend.node[3],
    ];
    if me == [0; 4] {
        return Err(Reason::DropEncapNoRoute);
    }

    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = PROTO_IPIP;
    // Asks the kernel to check the encapsulated size against the route's MTU.
    p.__bindgen_anon_1.tot_len = inner_len.saturating_add(OUTER as u16);
    p.ifindex = ctx.ingress_ifindex();
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(me);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the helper reads and writes only `p`, sized by the third argument.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the union member the kernel wrote for FRAG_NEEDED.
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        if inner_len > mtu {
            // No single frame of this path is that long: an aggregate (generic XDP
            // sees GRO/GSO skbs whole) whose segments may well fit once each is
            // encapsulated. TC can do that right (see ENCAP_MAGIC); an ICMP here
            // would be wrong, and the client would ignore it and stall.
            return ctx.encap_aggregate(p.ifindex, dst);
        }
        if u16::from_be_bytes(inner.frags) & 0x4000 == 0 {
            // Fragmenting in XDP is not possible; the sender did not forbid it, so
            // it will not do PMTU discovery either. Counted, as RFC 1191 hosts set DF.
            return Err(Reason::IcmpFragNeeded);
        }
        let mtu = mtu.saturating_sub(OUTER as u16);
        let verdict = frag_needed(ctx, me, mtu)?;
        crate::events::frag_needed_sent(ctx, mtu);
        return Ok(verdict);
    }
    let resolve = rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && !resolve {
        return Err(Reason::DropEncapNoRoute);
    }
    let (start, end) = (ctx.start(), ctx.end());
    let in_eth: *const EthHdr = ptr_at(start, end, 0).ok_or(Reason::DropMalformedL4)?;
    // SAFETY: bounds checked by ptr_at.
    let in_eth = unsafe { *in_eth };

    if !ctx.push_behind_eth(OUTER as u32, true) {
        return Err(Reason::DropEncapNoRoute);
    }
    let (start, end) = (ctx.start(), ctx.end());
    let eth: *mut EthHdr = ptr_at(start, end, 0).ok_or(Reason::DropEncapNoRoute)?;
    let outer: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(Reason::DropEncapNoRoute)?;
    let mut hdr = Ipv4Hdr {
        vihl: 0x45,
        tos: inner.tos,
        tot_len: (inner_len + OUTER as u16).to_be_bytes(),
        id: [0; 2],
        // Copy DF (RFC 2003 section 3.1).
        frags: (u16::from_be_bytes(inner.frags) & 0x4000).to_be_bytes(),
        ttl: 64,
        proto: PROTO_IPIP,
        check: [0; 2],
        src_addr: me,
        dst_addr: dst,
    };
    hdr.check = crate::csum::ipv4_header(&hdr).to_be_bytes();
    if resolve {
        // Keep the frame's own Ethernet addresses (to this host): the kernel then
        // takes the frame as it did before the program ran.
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            (*eth).dst_addr = in_eth.dst_addr;
            (*eth).src_addr = in_eth.src_addr;
            (*eth).ether_type = network_types::eth::EtherType::Ipv4 as u16;
            *outer = hdr;
        }
        let verdict = ctx
            .send_resolving(p.ifindex)
            .ok_or(Reason::DropEncapNoRoute)?;
        count(Reason::FwdEncapResolve);
        return Ok(verdict);
    }
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = p.dmac;
        (*eth).src_addr = p.smac;
        (*eth).ether_type = network_types::eth::EtherType::Ipv4 as u16;
        *outer = hdr;
    }
    count(Reason::FwdEncap);
    if p.ifindex == ctx.ingress_ifindex() {
        Ok(ctx.tx())
    } else {
        // SAFETY: plain helper call.
        Ok(unsafe { bpf_redirect(p.ifindex, 0) } as u32)
    }
}

/// TC ingress for an aggregate `xlb_xdp` handed over with [`ENCAP_MAGIC`]: prepends
/// the outer header with `bpf_skb_adjust_room(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)`, which
/// marks the skb IPIP-GSO and lowers its segment size by those 20 bytes (kernel
/// `bpf_skb_net_grow`), so each segment the kernel cuts fits the path; then sends it
/// to `node` with `bpf_redirect_neigh` (MACs and the neighbour from the kernel).
#[inline(always)]
pub fn encap_aggregate(ctx: &TcContext, ifindex: u32, node: [u8; 4]) -> i32 {
    match try_encap_aggregate(ctx, ifindex, node) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
pub fn try_encap_aggregate(ctx: &TcContext, ifindex: u32, node: [u8; 4]) -> Result<i32, Reason> {
    // SAFETY: reading a field of our own __sk_buff context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        // One real frame over the route's MTU (a jumbo ingress, a smaller path):
        // nothing to cut it into; TC cannot answer with ICMP.
        return Err(Reason::IcmpFragNeeded);
    }
    let me = node_ip();
    if me == [0; 4] {
        return Err(Reason::DropEncapNoRoute);
    }
    let inner: Ipv4Hdr = ctx.load(IP_OFF).map_err(|_| Reason::DropMalformedL4)?;
    let total = ctx.len() as usize - EthHdr::LEN + OUTER;
    let Ok(tot_len) = u16::try_from(total) else {
        return Err(Reason::IcmpFragNeeded);
    };
    ctx.adjust_room(
        OUTER as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4),
    )
    .map_err(|_| Reason::DropEncapNoRoute)?;
    let mut hdr = Ipv4Hdr {
        vihl: 0x45,
        tos: inner.tos,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        // Copy DF (RFC 2003 section 3.1).
        frags: (u16::from_be_bytes(inner.frags) & 0x4000).to_be_bytes(),
        ttl: 64,
        proto: PROTO_IPIP,
        check: [0; 2],
        src_addr: me,
        dst_addr: node,
    };
    hdr.check = crate::csum::ipv4_header(&hdr).to_be_bytes();
    ctx.store(IP_OFF, &hdr, 0)
        .map_err(|_| Reason::DropEncapNoRoute)?;
    count(Reason::FwdEncap);
    count(Reason::FwdEncapAggregate);
    // No next-hop parameters: the kernel routes by the outer header just written.
    // SAFETY: plain helper call; a null params pointer with length 0 is allowed.
    Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// Turns the packet into an ICMP destination-unreachable / fragmentation-needed
/// (type 3 code 4, RFC 792 and RFC 1191 section 4) to its sender, quoting its IP
/// header and first 8 payload bytes, and sends it back out (XDP_TX).
#[inline(always)]
fn frag_needed<C: Hook>(ctx: &C, me: [u8; 4], mtu: u16) -> Result<u32, Reason> {
    const QUOTE: usize = Ipv4Hdr::LEN + 8;
    const ICMP: usize = 8;
    const GROW: usize = Ipv4Hdr::LEN + ICMP;
    let (start, end) = (ctx.start(), ctx.end());
    let eth: *const EthHdr = ptr_at(start, end, 0).ok_or(Reason::IcmpFragNeeded)?;
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(Reason::IcmpFragNeeded)?;
    // The quoted bytes must exist.
    let _: *const [u8; QUOTE] = ptr_at(start, end, IP_OFF).ok_or(Reason::IcmpFragNeeded)?;
    // SAFETY: bounds checked by ptr_at.
    let (eth, client) = unsafe { (*eth, (*ip).src_addr) };

    // Make room for the new IP + ICMP headers behind the Ethernet header: the original
    // IP header then sits exactly where the ICMP quote belongs. Then cut everything
    // after the quote.
    if !ctx.push_behind_eth(GROW as u32, false)
        || !ctx.truncate((EthHdr::LEN + GROW + QUOTE) as u32)
    {
        return Err(Reason::IcmpFragNeeded);
    }
    let (start, end) = (ctx.start(), ctx.end());
    let out_eth: *mut EthHdr = ptr_at(start, end, 0).ok_or(Reason::IcmpFragNeeded)?;
    let out_ip: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(Reason::IcmpFragNeeded)?;
    let icmp: *mut [u8; ICMP + QUOTE] =
        ptr_at(start, end, IP_OFF + Ipv4Hdr::LEN).ok_or(Reason::IcmpFragNeeded)?;
    let mut hdr = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: ((Ipv4Hdr::LEN + ICMP + QUOTE) as u16).to_be_bytes(),
        id: [0; 2],
        frags: [0; 2],
        ttl: 64,
        proto: PROTO_ICMP,
        check: [0; 2],
        src_addr: me,
        dst_addr: client,
    };
    hdr.check = crate::csum::ipv4_header(&hdr).to_be_bytes();
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*out_eth).dst_addr = eth.src_addr;
        (*out_eth).src_addr = eth.dst_addr;
        (*out_eth).ether_type = network_types::eth::EtherType::Ipv4 as u16;
        *out_ip = hdr;
        let m = &mut *icmp;
        m[0] = 3; // destination unreachable
        m[1] = 4; // fragmentation needed and DF set
        m[2] = 0;
        m[3] = 0;
        m[4] = 0;
        m[5] = 0;
        let mtu = mtu.to_be_bytes();
        m[6] = mtu[0];
        m[7] = mtu[1];
        let mut s: u32 = 0;
        let mut i = 0;
        while i < ICMP + QUOTE {
            s += u16::from_be_bytes([m[i], m[i + 1]]) as u32;
            i += 2;
        }
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        let c = (!(s as u16)).to_be_bytes();
        m[2] = c[0];
        m[3] = c[1];
    }
    count(Reason::IcmpFragNeeded);
    Ok(ctx.tx())
}
