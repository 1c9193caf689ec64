//! The two hooks the ingress path runs at, behind one trait, so the balancer is
//! written once:
//!
//! - XDP (`xlb_xdp`): the frame before the kernel builds an skb. Fast where the driver
//!   runs XDP natively; where it cannot, the kernel runs it "generic", on the skb,
//!   and pays for it (`do_xdp_generic` copies every skb with less than 256 bytes of
//!   headroom, which is nearly all of them, then runs TC ingress anyway).
//! - TC ingress (`xlb_tc_lb`, `--xdp-mode tc`): the skb, with no XDP program at all,
//!   as Cilium runs without native XDP. No copy, no hand-off: local delivery, tunnel
//!   resolution and aggregates are done in the same program.
//!
//! What differs is only how a packet is sent back out, how bytes are added or removed
//! in front of it, which tail-call array holds the helpers' programs, and what comes
//! after a DNAT to a local pod.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action,
    },
    helpers::{
        bpf_csum_update, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use network_types::eth::EthHdr;
use xlb_common::{ENCAP_MAGIC, RESOLVE_MAGIC, Reason};

use crate::{
    maps::{EVENT_PROGS, PROGS, PROGS_TC},
    packet::ptr_at,
};

/// `xlb_progs_tc` index of the events program (after the `PROG_SNAT_*` ones).
pub const PROG_TC_EVENTS: u32 = 2;

/// A hook the ingress path runs at. Verdicts are `u32`: XDP actions, or TC actions
/// (`TC_ACT_*`, converted to `i32` by the TC entry points).
pub trait Hook: EbpfContext {
    /// The verdict that lets the kernel have the packet.
    const PASS: u32;
    /// The verdict that drops it.
    const DROP: u32;
    /// Start of the packet's (linear) data.
    fn start(&self) -> usize;
    /// End of the packet's (linear) data.
    fn end(&self) -> usize;
    /// The whole packet's length: at TC an skb may hold more than its linear part
    /// (page fragments, a GSO aggregate).
    fn len(&self) -> usize;
    /// The interface the packet came in on.
    fn ingress_ifindex(&self) -> u32;
    /// Sends the (rewritten) frame back out of the interface it came in on.
    fn tx(&self) -> u32;
    /// Removes `n` bytes right behind the Ethernet header, which keeps its content.
    fn pop_behind_eth(&self, n: u32) -> bool;
    /// Makes room for `n` bytes behind the Ethernet header. The caller rewrites the
    /// whole Ethernet header and the new bytes. `encap`: they are an outer IPv4 header
    /// (TC marks the skb so that its segments are cut to fit, kernel
    /// `bpf_skb_net_grow`).
    fn push_behind_eth(&self, n: u32, encap: bool) -> bool;
    /// Cuts the packet to `len` bytes.
    fn truncate(&self, len: u32) -> bool;
    /// Tail-calls `xlb_progs[index]` (or its TC twin); returns only on failure.
    fn tail_call_prog(&self, index: u32);
    /// Tail-calls the events program; returns only on failure.
    fn tail_call_events(&self);
    /// After the packet was DNATed to a backend on this node: its way to the pod.
    fn forward_local(&self) -> u32;
    /// Sends the packet out of `ifindex` once the kernel has resolved its next hop
    /// (no neighbour entry yet). `None`: not possible.
    fn send_resolving(&self, ifindex: u32) -> Option<u32>;
    /// An aggregate too long for one frame of the tunnel's path: encapsulate it towards
    /// `node` so that the kernel cuts it into segments that fit, and send it out of
    /// `ifindex`.
    fn encap_aggregate(&self, ifindex: u32, node: [u8; 4]) -> Result<u32, Reason>;
    /// The packet's bytes after the Ethernet header now sum (one's complement) to
    /// `delta` more than before: keeps a receive checksum the NIC computed over them
    /// (CHECKSUM_COMPLETE) right. Nothing to do in XDP (no skb yet, or, generic, one
    /// the kernel checks again).
    fn csum_changed(&self, delta: u32);
}

impl Hook for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own xdp_md context.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn tx(&self) -> u32 {
        xdp_action::XDP_TX
    }

    #[inline(always)]
    fn pop_behind_eth(&self, n: u32) -> bool {
        let (start, end) = (self.data(), self.data_end());
        let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
            return false;
        };
        let Some(moved) = ptr_at::<EthHdr>(start, end, n as usize) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at; EthHdr is plain data.
        unsafe { *moved = *eth };
        // SAFETY: shrinking the head by bytes the frame holds.
        unsafe { bpf_xdp_adjust_head(self.ctx, n as i32) == 0 }
    }

    #[inline(always)]
    fn push_behind_eth(&self, n: u32, _encap: bool) -> bool {
        // SAFETY: growing the head into XDP headroom (at least 256 bytes).
        unsafe { bpf_xdp_adjust_head(self.ctx, -(n as i32)) == 0 }
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> bool {
        let now = (self.data_end() - self.data()) as i32;
        // SAFETY: shrinking the tail by bytes the frame holds (checked by the kernel).
        unsafe { bpf_xdp_adjust_tail(self.ctx, len as i32 - now) == 0 }
    }

    #[inline(always)]
    fn tail_call_prog(&self, index: u32) {
        // SAFETY: tail call into our own program; returns only on failure.
        unsafe { PROGS.tail_call(self, index) };
    }

    #[inline(always)]
    fn tail_call_events(&self) {
        // SAFETY: as above.
        unsafe { EVENT_PROGS.tail_call(self, 0) };
    }

    #[inline(always)]
    fn forward_local(&self) -> u32 {
        crate::fwd::forward(self)
    }

    #[inline(always)]
    fn send_resolving(&self, ifindex: u32) -> Option<u32> {
        // XDP cannot resolve a neighbour: TC does, with `bpf_redirect_neigh`.
        crate::handoff::to_tc(self, RESOLVE_MAGIC, ifindex, [0; 4]).then_some(Self::PASS)
    }

    #[inline(always)]
    fn encap_aggregate(&self, ifindex: u32, node: [u8; 4]) -> Result<u32, Reason> {
        // XDP cannot mark a frame for segmentation: TC encapsulates it.
        if !crate::handoff::to_tc(self, ENCAP_MAGIC, ifindex, node) {
            return Err(Reason::DropEncapNoRoute);
        }
        Ok(Self::PASS)
    }

    #[inline(always)]
    fn csum_changed(&self, _delta: u32) {}
}

impl Hook for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own __sk_buff context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn tx(&self) -> u32 {
        // To the interface's egress: what XDP_TX is for a frame.
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(self.ingress_ifindex(), 0) as u32 }
    }

    #[inline(always)]
    fn pop_behind_eth(&self, n: u32) -> bool {
        // BPF_ADJ_ROOM_MAC: the bytes right behind the MAC header go; the skb's receive
        // checksum is corrected by the kernel (`bpf_skb_generic_pop`).
        self.adjust_room(-(n as i32), BPF_ADJ_ROOM_MAC, 0).is_ok()
    }

    #[inline(always)]
    fn push_behind_eth(&self, n: u32, encap: bool) -> bool {
        let flags = if encap {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        } else {
            0
        };
        self.adjust_room(n as i32, BPF_ADJ_ROOM_MAC, flags).is_ok()
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> bool {
        // SAFETY: plain helper call on our own skb.
        unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) == 0 }
    }

    #[inline(always)]
    fn tail_call_prog(&self, index: u32) {
        // SAFETY: tail call into our own program; returns only on failure.
        unsafe { PROGS_TC.tail_call(self, index) };
    }

    #[inline(always)]
    fn tail_call_events(&self) {
        // SAFETY: as above.
        unsafe { PROGS_TC.tail_call(self, PROG_TC_EVENTS) };
    }

    #[inline(always)]
    fn forward_local(&self) -> u32 {
        crate::fwd::deliver(self) as u32
    }

    #[inline(always)]
    fn send_resolving(&self, ifindex: u32) -> Option<u32> {
        // No next-hop parameters: the kernel looks the route up from the IP header.
        // SAFETY: plain helper call; a null params pointer with length 0 is allowed.
        Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as u32)
    }

    #[inline(always)]
    fn encap_aggregate(&self, ifindex: u32, node: [u8; 4]) -> Result<u32, Reason> {
        crate::tunnel::try_encap_aggregate(self, ifindex, node).map(|v| v as u32)
    }

    #[inline(always)]
    fn csum_changed(&self, delta: u32) {
        // A no-op unless the skb is CHECKSUM_COMPLETE.
        // SAFETY: plain helper call on our own skb.
        unsafe { bpf_csum_update(self.skb.skb, delta) };
    }
}
