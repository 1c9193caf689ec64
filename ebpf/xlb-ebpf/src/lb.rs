//! Service lookup, backend selection and connection tracking: given a client flow to
//! a VIP, which backend serves it.
use xlb_common::{
    Backend, CtEntry, FAMILY_V4, FlowKey, Reason, RevNat, Service, SlotKey, flow_hash_v4,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, REVNAT, SLOTS, count},
    packet::{Flow4, addr16},
};

/// The client-side conntrack key of an IPv4 flow.
#[inline(always)]
pub fn flow_key(f: &Flow4) -> FlowKey {
    FlowKey {
        src: addr16(f.src),
        dst: addr16(f.dst),
        sport: u16::from_ne_bytes(f.sport),
        dport: u16::from_ne_bytes(f.dport),
        proto: f.proto,
        family: FAMILY_V4,
        pad: [0; 2],
    }
}

/// Picks the backend for `flow`: its connection-tracked one while that backend still
/// exists, else a slot of the service's active table by flow hash (recorded in
/// conntrack and reverse NAT). `Err` carries the drop reason.
#[inline(always)]
pub fn select(svc: &Service, flow: &Flow4, key: &FlowKey) -> Result<(u32, Backend), Reason> {
    // SAFETY (all `get`s below): values are plain data copied out immediately; a
    // concurrent agent update can at worst make us read the old or new value.
    if let Some(ct) = unsafe { CONNTRACK.get(key) } {
        if let Some(b) = unsafe { BACKENDS.get(ct.backend_id) } {
            count(Reason::FwdConntrack);
            return Ok((ct.backend_id, *b));
        }
        count(Reason::CtStaleBackend);
    }
    if svc.count == 0 {
        return Err(Reason::DropNoBackend);
    }
    let hash = flow_hash_v4(
        u32::from_be_bytes(flow.src),
        u32::from_be_bytes(flow.dst),
        u16::from_be_bytes(flow.sport),
        u16::from_be_bytes(flow.dport),
        flow.proto,
    );
    let slot = SlotKey {
        table: svc.table,
        slot: hash % svc.count,
    };
    let id = unsafe { SLOTS.get(slot) }.ok_or(Reason::DropTableMiss)?;
    let id = *id;
    let backend = *unsafe { BACKENDS.get(id) }.ok_or(Reason::DropTableMiss)?;

    let ct = CtEntry {
        backend_id: id,
        service_id: svc.id,
    };
    let reply = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        pad: [0; 2],
    };
    let rev = RevNat {
        addr: key.dst,
        port: key.dport,
        family: key.family,
        pad: 0,
    };
    // Reverse NAT first: once conntrack names the backend, replies must already map
    // back to the VIP.
    if REVNAT.insert(&reply, &rev, 0).is_err() || CONNTRACK.insert(key, &ct, 0).is_err() {
        count(Reason::CtInsertFailed);
    }
    count(Reason::FwdNewFlow);
    Ok((id, backend))
}
