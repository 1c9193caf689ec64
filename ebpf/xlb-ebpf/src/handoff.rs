//! How `xlb_xdp` tells `xlb_tc_ingress` what to do with a packet it passes to the
//! kernel (deliver it into a pod, send it once its next hop resolves, encapsulate an
//! aggregate): a [`ResolveMeta`] in the XDP metadata area in front of the frame
//! (`bpf_xdp_adjust_meta`), or, where the kernel refuses that helper or the driver
//! has no metadata area, the same [`ResolveMeta`] in this CPU's `xlb_tc_handoff`
//! slot together with the packet's first bytes ([`TcHandoff`]).
//!
//! The slot is exact under generic XDP, which runs right before TC ingress for the
//! same skb on the same CPU (`__netif_receive_skb_core`). Native XDP may run a whole
//! batch before TC sees the first of it: then TC finds another packet's bytes, counts
//! [`Reason::HandoffMissed`] and lets the packet take the kernel's own path.
use aya_ebpf::{
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};
use xlb_common::{HANDOFF_IDENT_LEN, Reason, ResolveMeta};

use crate::{
    maps::{TC_HANDOFF, count},
    packet::{IP_OFF, ptr_at, tc_linear},
};

/// 1 when the kernel lets XDP programs call `bpf_xdp_adjust_meta`; set by the agent
/// from its probe (`xlb_common::globals::XDP_META`). Read-only: with 0 the verifier
/// prunes the call, which a kernel without the helper would refuse to load.
#[unsafe(no_mangle)]
static XLB_XDP_META: u8 = 1;

#[inline(always)]
fn xdp_meta_allowed() -> bool {
    // SAFETY: reading a global; volatile so that the load stays in the program,
    // where the verifier sees the frozen value and prunes the dead branch.
    unsafe { core::ptr::read_volatile(&XLB_XDP_META) != 0 }
}

/// Hands the packet XDP is about to pass on to `xlb_tc_ingress` with `magic`
/// (`xlb_common::*_MAGIC`), the egress `ifindex` and the backend's `node` where the
/// magic needs them. `false`: no hand-off was possible (a packet shorter than
/// [`HANDOFF_IDENT_LEN`] bytes of IP).
#[inline(always)]
pub fn to_tc(ctx: &XdpContext, magic: u32, ifindex: u32, node: [u8; 4]) -> bool {
    let m = ResolveMeta {
        magic,
        ifindex,
        node,
    };
    if xdp_meta_allowed() && set_meta(ctx, m) {
        return true;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(ident) = ptr_at::<[u8; HANDOFF_IDENT_LEN]>(start, end, IP_OFF) else {
        return false;
    };
    let Some(slot) = TC_HANDOFF.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot (programs run with preemption disabled); `ident` was
    // bounds checked by ptr_at.
    unsafe {
        (*slot).ident = *ident;
        (*slot).meta = m;
    }
    count(Reason::HandoffSlot);
    true
}

/// Puts `m` in front of the frame; false when the driver has no room for metadata.
#[inline(always)]
fn set_meta(ctx: &XdpContext, m: ResolveMeta) -> bool {
    const LEN: i32 = core::mem::size_of::<ResolveMeta>() as i32;
    // SAFETY: grows the metadata area in front of the frame (<= 32 bytes, 4-aligned).
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -LEN) } != 0 {
        return false;
    }
    // SAFETY: reading our own context's fields.
    let (meta, data) = unsafe { ((*ctx.ctx).data_meta as usize, (*ctx.ctx).data as usize) };
    if meta + LEN as usize > data {
        return false;
    }
    // SAFETY: the metadata area [meta, data) was bounds checked just above.
    unsafe { *(meta as *mut ResolveMeta) = m };
    true
}

// `take` compares the identity as three 64-bit words.
const _: () = assert!(HANDOFF_IDENT_LEN == 24);

/// In `xlb_tc_ingress`: what `xlb_xdp` handed over for this packet, if anything. The
/// slot is emptied whenever it is looked at, so it can never apply to a later packet.
#[inline(always)]
pub fn take(ctx: &TcContext) -> Option<ResolveMeta> {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of our own __sk_buff context.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + core::mem::size_of::<ResolveMeta>() <= data {
        // SAFETY: [meta, data) holds a ResolveMeta, bounds checked just above.
        return Some(unsafe { *(meta as *const ResolveMeta) });
    }
    let slot = TC_HANDOFF.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, see `to_tc`.
    let want = unsafe { *slot };
    if want.meta.magic == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*slot).meta.magic = 0 };
    let ident = tc_linear(ctx, IP_OFF + HANDOFF_IDENT_LEN)
        .and_then(|(start, end)| ptr_at::<[u64; HANDOFF_IDENT_LEN / 8]>(start, end, IP_OFF));
    let Some(ident) = ident else {
        count(Reason::HandoffMissed);
        return None;
    };
    // SAFETY: bounds checked by ptr_at; the slot's bytes are plain data.
    let (got, want_ident) = unsafe {
        (
            core::ptr::read_unaligned(ident),
            core::ptr::read_unaligned(want.ident.as_ptr() as *const [u64; HANDOFF_IDENT_LEN / 8]),
        )
    };
    if (got[0] ^ want_ident[0]) | (got[1] ^ want_ident[1]) | (got[2] ^ want_ident[2]) != 0 {
        count(Reason::HandoffMissed);
        return None;
    }
    Some(want.meta)
}
