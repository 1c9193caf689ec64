//! Datapath events through aya-log: a line for the rare packets an operator wants to
//! hear about (a drop that signals misconfiguration, an ICMP fragmentation-needed
//! sent, a failed tail call), naming the reason as the counters do and the packet's
//! addresses and ports.
//!
//! Off by default, switched at runtime through `xlb_dp_log`, and rate-limited per
//! reason per CPU (`xlb_log_limit`, `LINES_PER_WINDOW` lines a window of about a
//! second). The functions the other programs call run only on a path that already
//! drops or answers the packet, so the forwarding path never reads the level; with
//! logging off an event costs one array lookup.
//!
//! The line itself is written by its own program, `xlb_events`, tail-called with the
//! event in the per-CPU handoff slot: aya-log builds each record on the stack, and
//! `xlb_xdp` already uses 440 of the 512 bytes the BPF stack has (a BPF-to-BPF call
//! would add its frame to that); a tail call starts with a fresh stack, and the
//! verifier walks the logging code once, outside the forwarding program. Each reason
//! has its own call site with a literal message: an argument of variable length (a
//! `&str` picked at run time) would be copied by a loop the verifier walks byte by
//! byte, while literals are copied with constant sizes.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_log_ebpf::{error, info, warn};
use network_types::ip::Ipv4Hdr;
use xlb_common::{
    PROTO_TCP, Reason,
    datapath_log::{self, HANDOFF_SLOT, INFO, LINES_PER_WINDOW, TARGET, WARN},
};

use crate::{
    hook::Hook,
    maps::{DATAPATH_LOG, LOG_LIMIT},
    packet::{IP_OFF, parse4, ptr_at},
};

/// `xlb_xdp` drops the packet.
const KIND_XDP_DROP: u64 = 0;
/// `xlb_snat_fwd` drops the packet.
const KIND_SNAT_DROP: u64 = 1;
/// `xlb_xdp` turned the packet into an ICMP fragmentation-needed to its sender.
const KIND_FRAG_SENT: u64 = 2;

/// The verdicts an event's program may have chosen: drop the packet...
const VERDICT_DROP: u64 = 0;
/// ... or send it back out where it came in (XDP_TX, or its TC equivalent).
const VERDICT_TX: u64 = 1;

/// Whether an event of `level` for `reason` may be logged now: the configured level
/// is at least as verbose, and this CPU has logged fewer than `LINES_PER_WINDOW`
/// lines for `reason` in the current window (which this then counts).
#[inline(always)]
fn allowed(reason: Reason, level: u64) -> bool {
    if DATAPATH_LOG.get(0).copied().unwrap_or(datapath_log::OFF) < level {
        return false;
    }
    let Some(slot) = LOG_LIMIT.get_ptr_mut(reason as u32) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions; tick resolution is plenty
    // for a window of a second.
    let window = datapath_log::window(unsafe { bpf_ktime_get_coarse_ns() });
    // SAFETY: this CPU's slot; programs run with preemption disabled.
    let v = unsafe { *slot };
    let lines = if v >> 8 == window { v & 0xff } else { 0 };
    if lines >= LINES_PER_WINDOW {
        return false;
    }
    // SAFETY: as above.
    unsafe { *slot = (window << 8) | (lines + 1) };
    true
}

/// Tail-calls `xlb_events` (or its TC twin) to log the event, which then returns
/// `verdict` (`VERDICT_*`) for the packet. Returns only if the tail call failed (no
/// program loaded): the caller goes on as without logging.
#[inline(always)]
fn emit<C: Hook>(ctx: &C, kind: u64, reason: Reason, verdict: u64, arg: u16) {
    let Some(h) = LOG_LIMIT.get_ptr_mut(HANDOFF_SLOT) else {
        return;
    };
    // SAFETY: this CPU's handoff slot, read by the tail-called program only.
    unsafe {
        *h = reason as u64 | ((verdict & 0xff) << 8) | (kind << 16) | ((arg as u64) << 32);
    }
    ctx.tail_call_events();
}

/// `xlb_xdp` drops the packet for `reason`; the packet is still the client's (after
/// decapsulation, for one that came through a tunnel). Logs the reasons that signal
/// misconfiguration; may not return (then `xlb_events` drops the packet).
#[inline(always)]
pub fn xdp_drop<C: Hook>(ctx: &C, reason: Reason) {
    let level = match reason {
        // In xlb_xdp, DropSnat only follows a failed tail call into xlb_snat_fwd.
        Reason::DropSnat => datapath_log::ERROR,
        Reason::DropNoBackend
        | Reason::DropTableMiss
        | Reason::DropEncapNoRoute
        | Reason::DropDecapNotLocal => WARN,
        Reason::IcmpFragNeeded => INFO,
        _ => return,
    };
    if allowed(reason, level) {
        emit(ctx, KIND_XDP_DROP, reason, VERDICT_DROP, 0);
    }
}

/// `xlb_xdp` turned the packet into an ICMP fragmentation-needed carrying `mtu` and
/// is about to send it (XDP_TX); may not return (then `xlb_events` sends it).
#[inline(always)]
pub fn frag_needed_sent<C: Hook>(ctx: &C, mtu: u16) {
    if allowed(Reason::IcmpFragNeeded, INFO) {
        emit(ctx, KIND_FRAG_SENT, Reason::IcmpFragNeeded, VERDICT_TX, mtu);
    }
}

/// `xlb_snat_fwd` drops the packet for `reason` (the packet is still the client's).
#[inline(always)]
pub fn snat_drop<C: Hook>(ctx: &C, reason: Reason) {
    if reason == Reason::DropSnat && allowed(reason, WARN) {
        emit(ctx, KIND_SNAT_DROP, reason, VERDICT_DROP, 0);
    }
}

/// The client flow an event is about.
struct Addrs {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    proto: &'static str,
}

/// The client flow of the packet: the packet itself, or for an ICMP error xlb made of
/// it, the header and ports it quotes (RFC 792).
#[inline(always)]
fn addrs<C: Hook>(ctx: &C, kind: u64) -> Option<Addrs> {
    let (start, end) = (ctx.start(), ctx.end());
    let (src, dst, proto, ports) = if kind == KIND_FRAG_SENT {
        const QUOTE: usize = IP_OFF + Ipv4Hdr::LEN + 8;
        let ip: *const Ipv4Hdr = ptr_at(start, end, QUOTE)?;
        let ports: *const [u8; 4] = ptr_at(start, end, QUOTE + Ipv4Hdr::LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { ((*ip).src_addr, (*ip).dst_addr, (*ip).proto, *ports) }
    } else {
        let f = parse4(start, end).ok()?;
        let p = [f.sport[0], f.sport[1], f.dport[0], f.dport[1]];
        (f.src, f.dst, f.proto, p)
    };
    Some(Addrs {
        src,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dst,
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        // Both three bytes: the copy into the log record has a constant size.
        proto: if proto == PROTO_TCP { "tcp" } else { "udp" },
    })
}

/// `xlb_events`: logs the event in this CPU's handoff slot and returns the verdict its
/// program chose for the packet.
#[inline(always)]
pub fn log<C: Hook>(ctx: &C) -> u32 {
    let Some(h) = LOG_LIMIT.get(HANDOFF_SLOT).copied() else {
        return C::DROP;
    };
    let verdict = if (h >> 8) & 0xff == VERDICT_TX {
        ctx.tx()
    } else {
        C::DROP
    };
    let (reason, kind, arg) = ((h & 0xff) as u32, (h >> 16) & 0xff, (h >> 32) as u16);
    let Some(a) = addrs(ctx, kind) else {
        return verdict;
    };
    let (p, src, sport, dst, dport) = (a.proto, a.src, a.sport, a.dst, a.dport);
    if kind == KIND_FRAG_SENT {
        info!(
            ctx,
            target: TARGET,
            "icmp_frag_needed {} {:i}:{} -> {:i}:{}: too big for the tunnel, answered with mtu {}",
            p, src, sport, dst, dport, arg
        );
    } else if kind == KIND_SNAT_DROP {
        warn!(
            ctx,
            target: TARGET,
            "drop_snat {} {:i}:{} -> {:i}:{}: no node address, no free SNAT port or no route to the backend",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::DropSnat as u32 {
        error!(
            ctx,
            target: TARGET,
            "drop_snat {} {:i}:{} -> {:i}:{}: tail call into xlb_snat_fwd failed (program not loaded)",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::DropNoBackend as u32 {
        warn!(
            ctx,
            target: TARGET,
            "drop_no_backend {} {:i}:{} -> {:i}:{}: the service has no backend",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::DropTableMiss as u32 {
        warn!(
            ctx,
            target: TARGET,
            "drop_table_miss {} {:i}:{} -> {:i}:{}: the service's Maglev slot or backend is missing",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::DropEncapNoRoute as u32 {
        warn!(
            ctx,
            target: TARGET,
            "drop_encap_no_route {} {:i}:{} -> {:i}:{}: no route to the backend's node (or no node address)",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::DropDecapNotLocal as u32 {
        warn!(
            ctx,
            target: TARGET,
            "drop_decap_not_local {} {:i}:{} -> {:i}:{}: tunnelled here, but its backend is not on this node",
            p, src, sport, dst, dport
        );
    } else if reason == Reason::IcmpFragNeeded as u32 {
        info!(
            ctx,
            target: TARGET,
            "icmp_frag_needed {} {:i}:{} -> {:i}:{}: too big for the tunnel and DF clear: dropped",
            p, src, sport, dst, dport
        );
    }
    verdict
}
