//! Forwarding after DNAT. The default hands the packet to the kernel (XDP_PASS), which
//! routes it to the pod. `FORWARD_REDIRECT` instead asks the kernel's FIB for the next
//! hop (`bpf_fib_lookup`) and redirects the frame straight out of the pod-facing
//! device, doing the forwarding work itself (MACs, TTL). That only works when the
//! target device accepts XDP frames (for a veth: an XDP program or GRO on its peer),
//! which xlb cannot know under an arbitrary CNI, so it is opt-in and anything the FIB
//! cannot resolve completely still goes the XDP_PASS way.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{csum, maps::CONFIG, packet::{IP_OFF, ptr_at}};

/// `xlb_config[FORWARD_MODE]` value selecting FIB lookup + redirect.
pub const FORWARD_REDIRECT: u64 = 1;
const AF_INET: u8 = 2;

/// The XDP action that forwards an already DNATed IPv4 packet.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    match CONFIG.get(xlb_common::config::FORWARD_MODE) {
        Some(m) if *m == FORWARD_REDIRECT => redirect(ctx).unwrap_or(xdp_action::XDP_PASS),
        _ => xdp_action::XDP_PASS,
    }
}

/// Forwards the packet itself: FIB lookup, TTL, MACs, then a redirect (or XDP_TX).
/// `None` when the FIB cannot resolve the next hop completely.
#[inline(always)]
pub fn redirect(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = ptr_at(start, end, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    // Let the kernel answer with ICMP time exceeded (RFC 1812 section 5.3.1).
    if ip.ttl <= 1 {
        return None;
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = ip.proto;
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: the helper reads and writes only `p`, sized by the third argument.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
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
