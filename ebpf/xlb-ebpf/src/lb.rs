//! Service lookup, backend selection and connection tracking: given a client flow to
//! a VIP, which backend serves it.
//!
//! Selection is Maglev (the agent builds the tables; the same 5-tuple maps to the same
//! backend on every node). Conntrack keeps a flow on its backend when the table
//! changes: an established TCP flow follows its entry even to a backend that has left
//! the service (draining, as with kube-proxy's conntrack), while a new flow (SYN, or
//! any UDP packet) only reuses an entry whose backend still exists.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use xlb_common::{
    Affinity, AffinityKey, BACKEND_F_REMOTE, Backend, BackendKey4, CT_F_CLOSING, CT_F_MIDSTREAM,
    FAMILY_V4,
    FlowKey4, PROTO_TCP, Reason, RevNat, SVC_F_AFFINITY, SVC_F_SOURCE_RANGES, Service, SourceRange,
    timeouts,
};

use crate::{
    maps::{
        AFFINITY, BACKENDS, CONNTRACK4, MAGLEV, REVHINT4, REVNAT4, RangeKey, SCRATCH,
        SOURCE_RANGES, count,
    },
    packet::{Flow4, addr16},
};

/// loadBalancerSourceRanges: whether the client may reach the service (always, when
/// the service lists no ranges).
#[inline(always)]
pub fn admitted(svc: &Service, key: &FlowKey4) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let k = RangeKey::new(
        32 + 128,
        SourceRange {
            service_id: svc.id.to_be_bytes(),
            addr: addr16(key.src),
        },
    );
    SOURCE_RANGES.get(&k).is_some()
}

/// TCP flags the conntrack cares about (RFC 9293 section 3.1).
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

/// The client-side conntrack key of an IPv4 flow.
#[inline(always)]
pub fn flow_key(f: &Flow4) -> FlowKey4 {
    FlowKey4 {
        src: f.src,
        dst: f.dst,
        sport: u16::from_ne_bytes(f.sport),
        dport: u16::from_ne_bytes(f.dport),
        proto: f.proto,
        pad: [0; 3],
    }
}

/// How long an entry lives after a packet with these TCP flags (0 for UDP).
#[inline(always)]
fn lifetime(proto: u8, tcp_flags: u8, flags: u32) -> u64 {
    if proto != PROTO_TCP {
        timeouts::UDP
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 || flags & CT_F_CLOSING != 0 {
        timeouts::TCP_CLOSING
    } else if flags & CT_F_MIDSTREAM != 0 || (tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0)
    {
        timeouts::TCP_SYN
    } else {
        timeouts::TCP_ESTABLISHED
    }
}

/// Picks the backend for `flow`: its connection-tracked one (see the module docs),
/// else the Maglev slot of the flow's hash (recorded in conntrack and reverse NAT).
/// `Err` carries the drop reason.
#[inline(always)]
pub fn select(
    svc: &Service,
    flow: &Flow4,
    key: &FlowKey4,
    tcp_flags: u8,
) -> Result<(u32, Backend, u16), Reason> {
    // CLOCK_MONOTONIC_COARSE: the same clock as CLOCK_MONOTONIC (the agent's sweeper
    // compares with it), read without touching the clocksource, at tick resolution
    // (1-10 ms): conntrack and affinity lifetimes are seconds. Reading the clocksource
    // cost 30-40 ns of a VIP hit in `cargo xtask bench` on these VMs.
    // SAFETY: bpf_ktime_get_coarse_ns (kernel 5.11+) has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let new_flow =
        flow.proto != PROTO_TCP || (tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0);
    if let Some(ct) = CONNTRACK4.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; a racing update of the same flow on another
        // CPU can at worst make us read a mix of two valid entries for this flow.
        let ct = unsafe { &mut *ct };
        // An established flow needs no backend lookup; a new one only takes an entry
        // whose backend still exists.
        // SAFETY: plain data lookup.
        let usable =
            now < ct.expires && (!new_flow || unsafe { BACKENDS.get(ct.backend_id) }.is_some());
        if usable {
            let closing = if flow.proto == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                CT_F_CLOSING
            } else {
                0
            };
            let expires = now + lifetime(flow.proto, tcp_flags, ct.flags | closing);
            // Refresh at most once a second: a per-packet store would bounce the
            // entry's cache line between CPUs.
            if closing & !ct.flags != 0
                || expires > ct.expires + timeouts::REFRESH
                || expires < ct.expires
            {
                ct.flags |= closing;
                ct.expires = expires;
            }
            count(Reason::FwdConntrack);
            return Ok((ct.backend_id, ct.backend, ct.snat_port));
        }
        count(Reason::CtStaleBackend);
    }
    if svc.count == 0 {
        return Err(Reason::DropNoBackend);
    }
    // sessionAffinity ClientIP: a client's new flows follow its live binding.
    let affinity = AffinityKey {
        client: addr16(key.src),
        service_id: svc.id,
    };
    let affinity_ttl = svc.affinity_secs as u64 * 1_000_000_000;
    if svc.flags & SVC_F_AFFINITY != 0 {
        if let Some(a) = AFFINITY.get_ptr_mut(&affinity) {
            // SAFETY: a valid map value pointer; see the conntrack note above.
            let a = unsafe { &mut *a };
            // SAFETY: plain data lookup.
            if let Some(b) = unsafe { BACKENDS.get(a.backend_id) }.copied() {
                if now < a.expires {
                    a.expires = now + affinity_ttl;
                    let id = a.backend_id;
                    record(svc, key, tcp_flags, now, id, b);
                    count(Reason::FwdAffinity);
                    return Ok((id, b, 0));
                }
            }
        }
    }
    let hash = flow.hash();
    let slot = hash % svc.count;
    // SAFETY: plain data lookup.
    let pair = unsafe { MAGLEV.get_value(&svc.table, &(slot / 2)) }.ok_or(Reason::DropTableMiss)?;
    let id = if slot & 1 == 0 { pair[0] } else { pair[1] };
    // SAFETY: plain data lookup.
    let backend = *unsafe { BACKENDS.get(id) }.ok_or(Reason::DropTableMiss)?;
    if svc.flags & SVC_F_AFFINITY != 0 {
        let a = Affinity {
            backend_id: id,
            pad: 0,
            expires: now + affinity_ttl,
        };
        // Best effort: without the binding the next flow falls back to Maglev.
        let _ = AFFINITY.insert(&affinity, &a, 0);
    }
    record(svc, key, tcp_flags, now, id, backend);
    count(Reason::FwdNewFlow);
    Ok((id, backend, 0))
}

/// Records a new flow's choice in conntrack and reverse NAT.
#[inline(always)]
fn record(svc: &Service, key: &FlowKey4, tcp_flags: u8, now: u64, id: u32, backend: Backend) {
    // Built in per-CPU scratch memory rather than on the stack: the BPF stack (512
    // bytes for the whole program) cannot hold these next to the rest of the path.
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        count(Reason::CtInsertFailed);
        return;
    };
    // SAFETY: this CPU's scratch value; XDP does not nest on a CPU.
    let s = unsafe { &mut *s };
    s.ct.backend = backend;
    s.ct.backend_id = id;
    let syn = tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0;
    let flags = if key.proto == PROTO_TCP && !syn {
        CT_F_MIDSTREAM
    } else {
        0
    };
    s.ct.expires = now + lifetime(key.proto, tcp_flags, flags);
    s.ct.service_id = svc.id;
    s.ct.flags = flags;
    s.ct.snat_port = 0;
    s.ct.pad = [0; 6];
    s.reply.src = [
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ];
    s.reply.dst = key.src;
    s.reply.sport = backend.port;
    s.reply.dport = key.sport;
    s.reply.proto = key.proto;
    s.reply.pad = [0; 3];
    s.rev.addr = addr16(key.dst);
    s.rev.port = key.dport;
    s.rev.family = FAMILY_V4;
    s.rev.pad = 0;
    // Reverse NAT first: once conntrack names the backend, replies must already map
    // back to the VIP. A remote backend's replies leave from its own node, which
    // records its own reverse NAT; a backend hinted to this VIP:port needs none.
    let rev_ok = backend.flags & BACKEND_F_REMOTE != 0
        || hinted(&s.reply, &s.rev)
        || REVNAT4.insert(&s.reply, &s.rev, 0).is_ok();
    if !rev_ok {
        count(Reason::CtInsertFailed);
    }
    // A new key is counted, so that evictions (the LRU's only way out: the agent never
    // deletes entries) are created - present; a stale entry is replaced in place.
    if CONNTRACK4.insert(key, &s.ct, BPF_NOEXIST as u64).is_ok() {
        count(Reason::CtCreated);
    } else if CONNTRACK4.insert(key, &s.ct, 0).is_err() {
        count(Reason::CtInsertFailed);
    }
}

/// The `xlb_revhint4` key of a reply flow's source (the backend).
#[inline(always)]
fn hint_key(reply: &FlowKey4) -> BackendKey4 {
    BackendKey4 {
        addr: reply.src,
        port: reply.sport,
        proto: reply.proto,
        pad: 0,
    }
}

/// Whether replies of a new flow whose reply is `reply` will find `rev` through the
/// backend's hint ([`crate::maps::REVHINT4`]), making the hint when the backend has
/// none. A hint is only ever inserted (`BPF_NOEXIST`), never replaced: flows that
/// rely on it keep working whatever other VIPs later reach the same backend.
#[inline(always)]
fn hinted(reply: &FlowKey4, rev: &RevNat) -> bool {
    let k = hint_key(reply);
    // SAFETY: plain data compared at once.
    match unsafe { REVHINT4.get(&k) } {
        Some(h) => h.addr == rev.addr && h.port == rev.port,
        // Loses to another CPU's hint for the same backend: that one may name
        // another VIP, so this flow records its own reverse NAT.
        None => REVHINT4.insert(&k, rev, BPF_NOEXIST as u64).is_ok(),
    }
}

/// The VIP:port a reply flow (backend -> client) of a DNATed flow must come from:
/// its `xlb_revnat4` entry, else its backend's hint when the client's flow to that
/// VIP:port is tracked to exactly this backend (so nothing a pod sends outside a
/// DNATed flow is ever rewritten).
#[inline(always)]
pub fn reverse(reply: &FlowKey4) -> Option<RevNat> {
    // SAFETY: plain data copied out at once.
    if let Some(rn) = unsafe { REVNAT4.get(reply) } {
        return Some(*rn);
    }
    // SAFETY: plain data copied out at once.
    let h = *unsafe { REVHINT4.get(&hint_key(reply)) }?;
    let fwd = FlowKey4 {
        src: reply.dst,
        dst: [h.addr[0], h.addr[1], h.addr[2], h.addr[3]],
        sport: reply.dport,
        dport: h.port,
        proto: reply.proto,
        pad: [0; 3],
    };
    // SAFETY: plain data compared at once.
    let ct = unsafe { CONNTRACK4.get(&fwd) }?;
    let b = &ct.backend;
    (b.flags & BACKEND_F_REMOTE == 0 && b.addr[..4] == reply.src && b.port == reply.sport)
        .then_some(h)
}
