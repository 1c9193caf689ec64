//! Forwarding after DNAT. The default hands the packet to the kernel (XDP_PASS) marked
//! for `xlb_tc_ingress`, which delivers it into the pod's namespace when the FIB leads
//! to a pod's veth ([`deliver`]); the kernel routes everything else. `FORWARD_REDIRECT`
//! instead asks the kernel's FIB for the next
//! hop (`bpf_fib_lookup`) and redirects the frame straight out of the pod-facing
//! device, doing the forwarding work itself (MACs, TTL). That only works when the
//! target device accepts XDP frames (for a veth: an XDP program or GRO on its peer),
//! which xlb cannot know under an arbitrary CNI, so it is opt-in and anything the FIB
//! cannot resolve completely still goes the XDP_PASS way.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_peer},
    programs::{TcContext, XdpContext},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum,
    hook::Hook,
    maps::{CONFIG, PEER_DEVS, count},
    packet::{IP_OFF, ptr_at, tc_linear},
};

const AF_INET: u8 = 2;

/// The XDP action that forwards an already DNATed IPv4 packet. By default it goes
/// to the kernel marked for `xlb_tc_ingress`, which delivers it into the pod's
/// namespace when it can (see [`deliver`]) and lets the kernel route it otherwise.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    match CONFIG.get(xlb_common::config::FORWARD_MODE) {
        Some(m) if *m == xlb_common::config::FORWARD_REDIRECT => redirect(ctx).unwrap_or(xdp_action::XDP_PASS),
        _ => {
            // Without a hand-off the kernel routes it: slower, still right.
            let _ = crate::handoff::to_tc(ctx, xlb_common::DELIVER_MAGIC, 0, [0; 4]);
            xdp_action::XDP_PASS
        }
    }
}

/// TC ingress, for a packet `xlb_xdp` DNATed to a local backend: when the FIB
/// leads to a pod-facing veth/netkit (`xlb_peer_devs`) with a resolved neighbour, does
/// the router's work (TTL, MACs) and hands the packet to the device's peer in the
/// pod's namespace with `bpf_redirect_peer`, which re-enters the receive path there at
/// once (kernel `skb_do_redirect`, BPF_F_PEER: no backlog queue, no second softirq,
/// no forwarding path, no netfilter). Anything else goes on unchanged (`TC_ACT_OK`):
/// the kernel's routing still delivers it.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> i32 {
    try_deliver(ctx).unwrap_or(TC_ACT_OK as i32)
}

#[inline(always)]
fn try_deliver(ctx: &TcContext) -> Option<i32> {
    // Direct packet access: the helpers that load and store bytes cost more than the
    // rest of this function together.
    let (start, end) = tc_linear(ctx, IP_OFF + Ipv4Hdr::LEN)?;
    let eth: *mut EthHdr = ptr_at(start, end, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at; the skb's head is our own (see tc_linear).
    let ip = unsafe { &mut *ip };
    // Let the kernel answer with ICMP time exceeded (RFC 1812 section 5.3.1).
    if ip.ttl <= 1 {
        return None;
    }
    // SAFETY: reading a field of our own __sk_buff context.
    let mut p = fib_params(ip, unsafe { (*ctx.skb.skb).ingress_ifindex });
    // SAFETY: the helper reads and writes only `p`, sized by the third argument.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // NO_NEIGH included: the kernel's path resolves the pod's neighbour entry.
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    // SAFETY: plain data lookup.
    unsafe { PEER_DEVS.get(&p.ifindex) }?;
    // (bpf_fib_lookup does not change packet data: the pointers stay valid.)
    // TTL shares a 16-bit word with the protocol. The header's one's-complement sum is
    // unchanged (its checksum compensates), so a CHECKSUM_COMPLETE skb->csum stays
    // right; the MACs lie outside it.
    let old = [ip.ttl, ip.proto];
    ip.ttl -= 1;
    ip.check = csum::replace2(u16::from_be_bytes(ip.check), old, [ip.ttl, ip.proto]).to_be_bytes();
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = p.dmac;
        (*eth).src_addr = p.smac;
    }
    count(xlb_common::Reason::FwdPeer);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect_peer(p.ifindex, 0) } as i32)
}

/// FIB lookup parameters for forwarding the IPv4 packet with header `ip` that came
/// in on `ifindex` (route by source, destination, TOS; MTU checked against its length).
#[inline(always)]
fn fib_params(ip: &Ipv4Hdr, ifindex: u32) -> bpf_fib_lookup {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = ip.proto;
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    p.ifindex = ifindex;
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    p
}

/// Forwards the packet itself: FIB lookup, TTL, MACs, then a redirect.
/// `None` when the FIB cannot resolve the next hop completely.
#[inline(always)]
pub fn redirect<C: Hook>(ctx: &C) -> Option<u32> {
    redirect_inner(ctx, false)
}

/// [`redirect`] for a packet the kernel must not see as its own to forward (source
/// NAT: its source is this node's address or a VIP, which the kernel drops as a
/// martian): a next hop without a resolved neighbour entry is handed to
/// `xlb_tc_ingress` ([`xlb_common::RESOLVE_MAGIC`]), whose `bpf_redirect_neigh`
/// resolves it and queues the packet, instead of failing.
#[inline(always)]
pub fn redirect_resolving<C: Hook>(ctx: &C) -> Option<u32> {
    redirect_inner(ctx, true)
}

#[inline(always)]
fn redirect_inner<C: Hook>(ctx: &C, resolve: bool) -> Option<u32> {
    let (start, end) = (ctx.start(), ctx.end());
    let eth: *mut EthHdr = ptr_at(start, end, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    // Let the kernel answer with ICMP time exceeded (RFC 1812 section 5.3.1).
    if ip.ttl <= 1 {
        return None;
    }
    let mut p = fib_params(ip, ctx.ingress_ifindex());
    // SAFETY: the helper reads and writes only `p`, sized by the third argument.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if resolve && rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        let verdict = ctx.send_resolving(p.ifindex)?;
        count(xlb_common::Reason::FwdSnatResolve);
        return Some(verdict);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // No neighbour entry yet, not forwardable, ...: the kernel knows what to do.
        return None;
    }
    // Decrement TTL as a router would; TTL shares a 16-bit word with the protocol.
    let old = [ip.ttl, ip.proto];
    ip.ttl -= 1;
    ip.check = csum::replace2(u16::from_be_bytes(ip.check), old, [ip.ttl, ip.proto]).to_be_bytes();
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = p.dmac;
        (*eth).src_addr = p.smac;
    }
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(p.ifindex, 0) } as u32)
}
