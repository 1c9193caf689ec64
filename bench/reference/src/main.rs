//! The "limit" row of `cargo xtask bench`: the least an XDP load balancer must do for
//! a packet, written plainly so that xlb's cost can be judged against it.
//!
//! - miss: parse Ethernet + IPv4 (no options) + the two ports, one hash lookup with an
//!   8-byte key (VIP address, port, protocol), XDP_PASS;
//! - hit: the same lookup, then one LRU lookup with a 16-byte flow key (insert on a
//!   miss), one per-CPU counter, DNAT of address and port with RFC 1624 checksum
//!   updates, XDP_PASS.
//!
//! - new flow: the hit path whose LRU lookup misses, so it inserts (the one insert a
//!   minimal balancer pays per new flow);
//! - `ref_tx`: MAC swap + XDP_TX, the floor of paths that send the frame back out.
//!
//! No conntrack lifetimes, no Maglev, no affinity, no source ranges, no per-service
//! or per-backend statistics, no IPv6-wide keys: those are what xlb adds on top.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};

/// VIP key: address, port (network order), protocol, zero.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VipKey {
    addr: u32,
    port: u16,
    proto: u8,
    pad: u8,
}

/// Where a VIP (or a tracked flow) goes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Target {
    addr: u32,
    port: u16,
    pad: u16,
}

/// A flow: addresses, ports (network order), protocol, zeros.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    pad: [u8; 3],
}

#[map(name = "ref_vips")]
static VIPS: HashMap<VipKey, Target> = HashMap::with_max_entries(65_536, 0);

#[map(name = "ref_ct")]
static CT: LruHashMap<FlowKey, Target> = LruHashMap::with_max_entries(262_144, 0);

#[map(name = "ref_count")]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH: usize = 14;
const L4: usize = ETH + 20;

#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    (start + off + core::mem::size_of::<T>() <= end).then_some((start + off) as *mut T)
}

/// One's-complement update of a checksum for a 32-bit word (RFC 1624 eqn. 3).
#[inline(always)]
fn csum32(check: u16, old: u32, new: u32) -> u16 {
    let mut s = (!check) as u32;
    s += (!(old >> 16) & 0xffff) + (!old & 0xffff);
    s += (new >> 16) + (new & 0xffff);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The same for a 16-bit word.
#[inline(always)]
fn csum16(check: u16, old: u16, new: u16) -> u16 {
    let mut s = (!check) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[xdp]
pub fn ref_lb(ctx: XdpContext) -> u32 {
    try_lb(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Option<u32> {
    let ethertype: *const [u8; 2] = at(ctx, 12)?;
    // SAFETY: bounds checked by `at`.
    if unsafe { *ethertype } != [0x08, 0x00] {
        return None;
    }
    let ip: *mut [u8; 20] = at(ctx, ETH)?;
    // SAFETY: bounds checked by `at`.
    let iph = unsafe { &mut *ip };
    let proto = iph[9];
    if iph[0] != 0x45 || (proto != 6 && proto != 17) {
        return None;
    }
    let ports: *mut [u16; 2] = at(ctx, L4)?;
    // SAFETY: bounds checked by `at`.
    let p = unsafe { &mut *ports };
    let src = u32::from_ne_bytes([iph[12], iph[13], iph[14], iph[15]]);
    let dst = u32::from_ne_bytes([iph[16], iph[17], iph[18], iph[19]]);
    let vip = VipKey {
        addr: dst,
        port: p[1],
        proto,
        pad: 0,
    };
    // SAFETY: plain data copied out at once.
    let svc = *unsafe { VIPS.get(&vip) }?;
    let flow = FlowKey {
        src,
        dst,
        sport: p[0],
        dport: p[1],
        proto,
        pad: [0; 3],
    };
    // SAFETY: plain data copied out at once.
    let to = match unsafe { CT.get(&flow) } {
        Some(t) => *t,
        None => {
            let _ = CT.insert(&flow, &svc, 0);
            svc
        }
    };
    if let Some(c) = COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
    let l4_csum_off = if proto == 6 { L4 + 16 } else { L4 + 6 };
    let l4c: *mut [u8; 2] = at(ctx, l4_csum_off)?;
    // SAFETY: bounds checked by `at`; the header pointers above stay valid (no
    // adjust_head/tail in between).
    let l4c = unsafe { &mut *l4c };
    let old_ipc = u16::from_be_bytes([iph[10], iph[11]]);
    let (old_dst, new_dst) = (u32::from_be(dst), u32::from_be(to.addr));
    let ipc = csum32(old_ipc, old_dst, new_dst);
    iph[10..12].copy_from_slice(&ipc.to_be_bytes());
    iph[16..20].copy_from_slice(&to.addr.to_ne_bytes());
    let old_l4 = u16::from_be_bytes(*l4c);
    // UDP checksum 0 means "none" (RFC 768): leave it.
    if proto == 6 || old_l4 != 0 {
        let mut c = csum32(old_l4, old_dst, new_dst);
        c = csum16(c, u16::from_be(p[1]), u16::from_be(to.port));
        *l4c = c.to_be_bytes();
    }
    p[1] = to.port;
    Some(xdp_action::XDP_PASS)
}

/// The floor of a program that sends the frame back out (the `XDP_TX` every encap or
/// hairpin path ends in): swap the Ethernet addresses, nothing else.
#[xdp]
pub fn ref_tx(ctx: XdpContext) -> u32 {
    let Some(macs) = at::<[[u8; 6]; 2]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by `at`.
    unsafe {
        let [dst, src] = *macs;
        *macs = [src, dst];
    }
    xdp_action::XDP_TX
}

/// The floor under every XDP program: nothing but a verdict.
#[xdp]
pub fn ref_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
