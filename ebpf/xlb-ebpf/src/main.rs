//! xlb's kernel programs.
//!
//! - `xlb_xdp` (XDP, on the node's uplink): for a packet to a VIP:port, pick a backend
//!   (`lb`), DNAT destination address and port with incremental checksums, and pass
//!   it on marked for `xlb_tc_ingress` (below), or redirect it after a FIB lookup when
//!   configured (`fwd`). Everything else passes after one
//!   map lookup.
//!   ARP requests for the VIPs this node owns in L2 mode are answered here (`arp`).
//! - `xlb_tc_ingress` (TC ingress, same interface): delivers what XDP DNATed to a
//!   local pod straight into the pod's namespace (`bpf_redirect_peer`), sends
//!   encapsulated packets whose next hop is unresolved (`bpf_redirect_neigh`), and
//!   encapsulates aggregates XDP cannot (`tunnel::encap_aggregate`).
//! - `xlb_tc_egress` (TC egress, same interface): a reply from a backend gets its
//!   source rewritten back to VIP:port (`lb::reverse`), so the client only ever talks
//!   to the VIP while the pod sees the client's real address.
#![no_std]
#![no_main]

mod arp;
mod csum;
mod events;
mod fwd;
mod handoff;
mod hook;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod snat;
mod tunnel;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, xdp_action},
    helpers::bpf_redirect_neigh,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use xlb_common::{
    BACKEND_F_REMOTE, BACKEND_F_SNAT, PROTO_TCP, Reason, SNAT_PORT_MIN, ServiceKey4, backend_slot,
    service_slot,
};

use crate::{
    hook::Hook,
    maps::{BACKEND_STATS, SERVICE_STATS, SERVICES4, add, count},
    packet::{
        IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, NotFlow, TCP_CSUM_OFF, UDP_CSUM_OFF,
        parse4, ptr_at,
    },
};

/// XDP entry: service load balancing on the uplink.
#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    ingress(&ctx)
}

/// TC ingress entry for `--xdp-mode tc`: the same path as `xlb_xdp`, on the skb,
/// with no XDP program attached (see `hook`).
#[classifier]
pub fn xlb_tc_lb(ctx: TcContext) -> i32 {
    // The headers the path reads must be in the linear part (they nearly always are:
    // then this is two loads and a comparison).
    const HEADERS: u32 = 96;
    let want = if ctx.len() < HEADERS {
        ctx.len()
    } else {
        HEADERS
    };
    if ctx.data() + (want as usize) > ctx.data_end() && ctx.pull_data(want).is_err() {
        return TC_ACT_OK as i32;
    }
    ingress(&ctx) as i32
}

/// The ingress path at either hook: the verdict, drops counted and logged.
#[inline(always)]
fn ingress<C: Hook>(ctx: &C) -> u32 {
    match lb_ingress(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            events::xdp_drop(ctx, reason);
            C::DROP
        }
    }
}

/// One packet's whole path: parse, VIP lookup, validate, select, DNAT, pass.
/// `Err(reason)` drops the packet and counts the reason.
#[inline(always)]
fn lb_ingress<C: Hook>(ctx: &C) -> Result<u32, Reason> {
    // Ordinary TCP/UDP is parsed once. Only what is not (IPIP among it) is checked for
    // a client packet another node's xlb tunnelled here (Cluster policy), then parsed
    // again without the outer header.
    let (flow, from_tunnel) = match parse4(ctx.start(), ctx.end()) {
        Ok(f) => (f, false),
        Err(NotFlow::Icmp) => return Ok(icmp::ingress(ctx)),
        Err(NotFlow::Other) if arp::is_arp(ctx) => return Ok(arp::answer(ctx)),
        Err(NotFlow::Other) if tunnel::decap(ctx).is_some() => {
            match parse4(ctx.start(), ctx.end()) {
                Ok(f) => (f, true),
                Err(e) => return Ok(not_balanced::<C>(e)),
            }
        }
        Err(e) => return Ok(not_balanced::<C>(e)),
    };
    let (start, end) = (ctx.start(), ctx.end());
    let vip = ServiceKey4 {
        addr: flow.dst,
        port: u16::from_ne_bytes(flow.dport),
        proto: flow.proto,
        pad: 0,
    };
    // SAFETY: plain data copied out at once.
    let Some(svc) = (unsafe { SERVICES4.get(&vip) }) else {
        // Not a VIP. A reply to a flow this node source-NATed comes to a port of the
        // SNAT range: only those pay for the (tail-called) lookup.
        if u16::from_be_bytes(flow.dport) >= SNAT_PORT_MIN {
            ctx.tail_call_prog(xlb_common::names::PROG_SNAT_REV);
        }
        return Ok(C::PASS);
    };
    let svc = *svc;
    if !for_this_host(start, end) {
        return Ok(C::PASS);
    }
    let len = ctx.len();
    let bytes = len as u64;
    add(&SERVICE_STATS, service_slot(svc.id), bytes);

    // Validate the lengths, the IP header checksum and the whole L4 header before
    // rewriting anything: what the kernel's ip_rcv/tcp_v4_rcv/udp_rcv would drop is
    // dropped here, counted, rather than DNATed and given conntrack state.
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF).ok_or(Reason::DropMalformedL4)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < Ipv4Hdr::LEN || IP_OFF + tot_len > len {
        return Err(Reason::DropMalformedL4);
    }
    if !csum::header_ok(ip) {
        return Err(Reason::DropMalformedIp);
    }
    let mut tcp_flags = 0u8;
    let l4_csum_off = if flow.proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(start, end, L4_OFF).ok_or(Reason::DropMalformedL4)?;
        // SAFETY: bounds checked by ptr_at.
        let doff = unsafe { (*tcp).doff() } as usize;
        if doff < 5 || Ipv4Hdr::LEN + doff * 4 > tot_len {
            return Err(Reason::DropMalformedL4);
        }
        let flags: *const u8 = ptr_at(start, end, L4_OFF + 13).ok_or(Reason::DropMalformedL4)?;
        // SAFETY: bounds checked by ptr_at.
        tcp_flags = unsafe { *flags };
        L4_OFF + TCP_CSUM_OFF
    } else {
        let udp: *const UdpHdr = ptr_at(start, end, L4_OFF).ok_or(Reason::DropMalformedL4)?;
        // SAFETY: bounds checked by ptr_at.
        let ulen = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
        if ulen < 8 || ulen + Ipv4Hdr::LEN > tot_len {
            return Err(Reason::DropMalformedL4);
        }
        L4_OFF + UDP_CSUM_OFF
    };

    let key = lb::flow_key(&flow);
    if !lb::admitted(&svc, &key) {
        return Err(Reason::DropSourceRange);
    }
    let (backend_id, backend, snat_port) = lb::select(&svc, &flow, &key, tcp_flags)?;
    add(&BACKEND_STATS, backend_slot(backend_id), bytes);
    if backend.flags & BACKEND_F_REMOTE != 0 {
        // A tunnelled packet is never sent on again: that could loop between nodes.
        if from_tunnel {
            return Err(Reason::DropDecapNotLocal);
        }
        if backend.flags & BACKEND_F_SNAT != 0
            || maps::CONFIG.get(xlb_common::config::CLUSTER_MODE).copied()
                == Some(xlb_common::config::CLUSTER_SNAT)
        {
            let h = maps::HANDOFF.get_ptr_mut(0).ok_or(Reason::DropSnat)?;
            // SAFETY: this CPU's handoff slot; read by the tail-called program only.
            unsafe {
                (*h).backend = backend;
                (*h).backend_id = backend_id;
                (*h).snat_port = snat_port;
                (*h).pad = [0; 6];
            }
            ctx.tail_call_prog(xlb_common::names::PROG_SNAT_FWD);
            // Only reached if the tail call failed (no program loaded).
            return Err(Reason::DropSnat);
        }
        return tunnel::encap(ctx, &backend);
    }

    let new_dst = [
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ];
    let new_port = u16::to_ne_bytes(backend.port);
    let delta = nat::rewrite4(
        start,
        end,
        l4_csum_off,
        flow.proto,
        IP_DST_OFF,
        2,
        &flow.dst,
        &new_dst,
        &flow.dport,
        &new_port,
    )
    .ok_or(Reason::DropMalformedL4)?;
    ctx.csum_changed(delta);
    Ok(ctx.forward_local())
}

/// Passes what the balancer does not handle, counting the kinds worth knowing about;
/// drops what the kernel would drop anyway.
#[inline(always)]
fn not_balanced<C: Hook>(why: NotFlow) -> u32 {
    match why {
        NotFlow::Other | NotFlow::Icmp => {}
        NotFlow::IpOptions => count(Reason::PassIpOptions),
        NotFlow::Fragment => count(Reason::PassFragment),
        NotFlow::Malformed => {
            count(Reason::DropMalformedIp);
            return C::DROP;
        }
    }
    C::PASS
}

/// Whether the frame is addressed to this interface (or broadcast/multicast): a switch
/// that floods unknown unicast delivers other nodes' VIP traffic here too, which this
/// node must neither count nor track nor forward.
#[inline(always)]
fn for_this_host(start: usize, end: usize) -> bool {
    let Some(eth) = ptr_at::<network_types::eth::EthHdr>(start, end, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let dst = unsafe { (*eth).dst_addr };
    let mine = maps::CONFIG
        .get(xlb_common::config::IFACE_MAC)
        .copied()
        .unwrap_or(0)
        .to_ne_bytes();
    dst[0] & 1 != 0
        || mine == [0; 8]
        || dst == [mine[0], mine[1], mine[2], mine[3], mine[4], mine[5]]
}

/// Tail-called by `xlb_xdp` for `--cluster-mode snat` flows (see `snat`).
#[xdp]
pub fn xlb_snat_fwd(ctx: XdpContext) -> u32 {
    snat::forward(&ctx)
}

/// Tail-called by `xlb_xdp` and `xlb_snat_fwd` to log a datapath event (see
/// `events`); returns the verdict the caller chose.
#[xdp]
pub fn xlb_events(ctx: XdpContext) -> u32 {
    events::log(&ctx)
}

/// Tail-called by `xlb_xdp` for packets to a port of the SNAT range (see `snat`).
#[xdp]
pub fn xlb_snat_rev(ctx: XdpContext) -> u32 {
    snat::reply(&ctx)
}

/// `xlb_snat_fwd` for `xlb_tc_lb`.
#[classifier]
pub fn xlb_tc_snat_fwd(ctx: TcContext) -> i32 {
    snat::forward(&ctx) as i32
}

/// `xlb_snat_rev` for `xlb_tc_lb`.
#[classifier]
pub fn xlb_tc_snat_rev(ctx: TcContext) -> i32 {
    snat::reply(&ctx) as i32
}

/// `xlb_events` for `xlb_tc_lb` and its tail-called programs.
#[classifier]
pub fn xlb_tc_events(ctx: TcContext) -> i32 {
    events::log(&ctx) as i32
}

/// TC ingress entry, for what `xlb_xdp` handed over (`handoff`): a packet DNATed to a
/// local backend is delivered into the pod's namespace (`fwd::deliver`); one
/// encapsulated for another node but not addressable yet (no neighbour entry for the
/// next hop) is sent with `bpf_redirect_neigh`, which resolves the neighbour
/// (queueing the packet meanwhile). Everything else goes on after a metadata
/// comparison and, without metadata, one per-CPU slot lookup: only XDP writes them.
#[classifier]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    let Some(m) = handoff::take(&ctx) else {
        return TC_ACT_OK as i32;
    };
    if m.magic == xlb_common::DELIVER_MAGIC {
        return fwd::deliver(&ctx);
    }
    if m.magic == xlb_common::ENCAP_MAGIC {
        return tunnel::encap_aggregate(&ctx, m.ifindex, m.node);
    }
    if m.magic != xlb_common::RESOLVE_MAGIC {
        return TC_ACT_OK as i32;
    }
    // No next-hop parameters: the kernel looks the route up from the outer header.
    // SAFETY: plain helper call; a null params pointer with length 0 is allowed.
    unsafe { bpf_redirect_neigh(m.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// TC egress entry: reverse NAT of replies from backends, and of ICMP errors local
/// pods send about DNATed requests.
#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    // Anything we cannot parse or rewrite goes on unchanged.
    match parse4(ctx.data(), ctx.data_end()) {
        Ok(flow) => {
            let _ = rev_nat(&ctx, &flow);
        }
        Err(NotFlow::Icmp) => return icmp::egress(&ctx),
        Err(_) => {}
    }
    TC_ACT_OK as i32
}

/// Rewrites a reply's source to the VIP:port its flow was DNATed from. Uses the skb
/// checksum helpers, which also handle CHECKSUM_PARTIAL skbs from local pods.
#[inline(always)]
fn rev_nat(ctx: &TcContext, flow: &packet::Flow4) -> Option<()> {
    let rn = lb::reverse(&lb::flow_key(flow))?;
    let new_src = [rn.addr[0], rn.addr[1], rn.addr[2], rn.addr[3]];
    let new_port = u16::to_ne_bytes(rn.port);
    let (csum_off, mangled) = if flow.proto == PROTO_TCP {
        (L4_OFF + TCP_CSUM_OFF, 0)
    } else {
        (L4_OFF + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let old_src = u32::from_ne_bytes(flow.src) as u64;
    let new_src_v = u32::from_ne_bytes(new_src) as u64;
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled;
    ctx.l4_csum_replace(csum_off, old_src, new_src_v, flags | 4)
        .ok()?;
    ctx.l4_csum_replace(
        csum_off,
        u16::from_ne_bytes(flow.sport) as u64,
        u16::from_ne_bytes(new_port) as u64,
        mangled | 2,
    )
    .ok()?;
    ctx.l3_csum_replace(IP_OFF + IP_CSUM_OFF, old_src, new_src_v, 4)
        .ok()?;
    ctx.store(IP_OFF + IP_SRC_OFF, &new_src, 0).ok()?;
    ctx.store(L4_OFF, &new_port, 0).ok()?;
    count(Reason::RevNat);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible license: needed for helpers such as bpf_fib_lookup.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Baseline for BPF_PROG_TEST_RUN cost comparisons; never attached.
#[xdp]
pub fn xlb_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
