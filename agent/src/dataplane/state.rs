//! The BPF state as data: what the maps hold ([`MapState`]), what they should hold
//! for a [`Desired`] state ([`target`]), and the ordered writes between the two
//! ([`diff`]). Pure: no syscalls here, so the whole reconciliation is unit tested.
//!
//! Ordering makes every service change atomic for packets: backends and the new
//! Maglev table (under the idle one of the service's two generation ids) are written
//! first, then one service-value update flips to them, and only then is anything old
//! deleted.
//!
//! The table flipped away from stays as the service's spare: the dataplane waits one
//! RCU grace period after every flip (so no packet still reads it), and the next
//! change of the same size rewrites it in place ([`Write::FillTable`]) instead of
//! inserting a new inner map, which costs a grace period of its own inside the
//! kernel before the flip (`maybe_wait_bpf_programs`). A service costs two tables
//! from its first change on.
//!
//! [`target`] computes every service; [`plan`] computes the same writes for a few
//! changed keys from an [`Index`] over what the maps hold, so that one EndpointSlice
//! among 10,000 Services costs what one Service costs.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    ops::Deref,
    sync::Arc,
};

use xlb_common::{
    BACKEND_F_REMOTE, BACKEND_F_SNAT, Backend, FAMILY_V4, FAMILY_V6, OWNER_TEXT_LEN, Owner,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES, Service,
    ServiceKey, SourceRange, backend_slot, limits, service_slot,
};

use super::maglev::{self, MaglevBackend};
use crate::{
    desired::{Desired, VipKey},
    model::{Protocol, ServiceRef},
};

/// Bounds of the Maglev table size (slots per service), both primes from
/// [`maglev::PRIMES`]; the size in between follows the backend count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBounds {
    /// Smallest table.
    pub min: u32,
    /// Largest table.
    pub max: u32,
}

impl Default for TableBounds {
    fn default() -> Self {
        TableBounds {
            min: 251,
            max: 65_521,
        }
    }
}

/// A Maglev table: backend id per slot. Shared, not copied, between the applied
/// state, a target, its writes and the [`TableCache`] (10,000 tables of 1,021 slots
/// are 40 MiB each time); equal tables that share their storage compare in O(1).
#[derive(Clone, Default)]
pub struct Slots(Arc<[u32]>);

impl Deref for Slots {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl PartialEq for Slots {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0[..] == other.0[..]
    }
}

impl Eq for Slots {}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Vec<u32>> for Slots {
    fn from(v: Vec<u32>) -> Self {
        Slots(v.into())
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = &'a u32;
    type IntoIter = std::slice::Iter<'a, u32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Maglev tables by what they are built from: the table size and the members'
/// (address, backend id) in address order. A table is a pure function of these, so a
/// sync reuses the table of every service whose backends did not change instead of
/// building it again (a change to one EndpointSlice builds one table, not 10,000).
pub type TableCache = HashMap<(u32, Vec<(SocketAddr, u32)>), Slots>;

/// Exactly what the configuration maps hold, plus which stats entries exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// `xlb_services4` and `xlb_services6`.
    pub services: BTreeMap<ServiceKey, Service>,
    /// `xlb_maglev`: table id -> backend id per slot.
    pub tables: BTreeMap<u32, Slots>,
    /// `xlb_backends`.
    pub backends: BTreeMap<u32, Backend>,
    /// Keys of `xlb_svc_stats`.
    pub service_stats: BTreeSet<u32>,
    /// Keys of `xlb_be_stats`.
    pub backend_stats: BTreeSet<u32>,
    /// `xlb_src_ranges`: (LPM prefix length, data).
    pub ranges: BTreeSet<(u32, SourceRange)>,
    /// `xlb_owners`: service id -> owning Service port.
    pub owners: BTreeMap<u32, Owner>,
}

impl MapState {
    /// Records `writes` as applied: afterwards `self` is what the maps hold.
    pub fn apply(&mut self, writes: &[Write]) {
        for w in writes {
            match w {
                Write::PutBackend(id, b) => {
                    self.backends.insert(*id, *b);
                }
                Write::PutBackendStats(id) => {
                    self.backend_stats.insert(*id);
                }
                Write::PutTable(id, slots) | Write::FillTable(id, slots) => {
                    self.tables.insert(*id, slots.clone());
                }
                Write::PutServiceStats(id) => {
                    self.service_stats.insert(*id);
                }
                Write::PutOwner(id, o) => {
                    self.owners.insert(*id, **o);
                }
                Write::PutRange(len, r) => {
                    self.ranges.insert((*len, *r));
                }
                Write::DelRange(len, r) => {
                    self.ranges.remove(&(*len, *r));
                }
                Write::PutService(k, v) => {
                    self.services.insert(*k, *v);
                }
                Write::DelService(k) => {
                    self.services.remove(k);
                }
                Write::DelServiceStats(id) => {
                    self.service_stats.remove(id);
                }
                Write::DelOwner(id) => {
                    self.owners.remove(id);
                }
                Write::DelTable(id) => {
                    self.tables.remove(id);
                }
                Write::DelBackend(id) => {
                    self.backends.remove(id);
                }
                Write::DelBackendStats(id) => {
                    self.backend_stats.remove(id);
                }
            }
        }
    }
}

/// The `xlb_owners` value for a Service port.
pub fn owner_value(owner: &ServiceRef, port_name: &str) -> Owner {
    let text = format!("{}/{}:{}", owner.namespace, owner.name, port_name);
    let mut v = Owner::default();
    let n = text.len().min(OWNER_TEXT_LEN);
    v.text[..n].copy_from_slice(&text.as_bytes()[..n]);
    v.len = n as u32;
    v
}

/// Reads an `xlb_owners` value back as (Service, port name); `None` if malformed.
pub fn owner_of(v: &Owner) -> Option<(ServiceRef, String)> {
    let text = std::str::from_utf8(v.text.get(..v.len as usize)?).ok()?;
    let (svc, port) = text.rsplit_once(':')?;
    let (namespace, name) = svc.split_once('/')?;
    Some((
        ServiceRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        port.to_string(),
    ))
}

/// Which Service port owns each programmed key according to the maps: what a
/// restarted agent found serving, the incumbent in address conflicts.
pub fn incumbents(state: &MapState) -> BTreeMap<VipKey, (ServiceRef, String)> {
    state
        .services
        .iter()
        .filter_map(|(k, v)| {
            let owner = owner_of(state.owners.get(&v.id)?)?;
            Some((vip_key(k)?, owner))
        })
        .collect()
}

/// The [`VipKey`] a map key stands for (`None` for an unknown protocol or family).
pub fn vip_key(k: &ServiceKey) -> Option<VipKey> {
    let addr = match k.family {
        FAMILY_V4 => IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]]),
        FAMILY_V6 => IpAddr::from(k.addr),
        _ => return None,
    };
    let protocol = match k.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(VipKey {
        addr,
        port: u16::from_be(k.port),
        protocol,
    })
}

/// Id counters. Ids are never reused within an agent's life (and the next ids are
/// persisted in `xlb_config` across restarts), so a conntrack entry that still names
/// a removed backend can never reach a different one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    /// Next service id.
    pub next_service: u32,
    /// Next backend id.
    pub next_backend: u32,
}

impl Ids {
    /// Counters that continue after everything `state` holds and after `persisted`.
    pub fn after(state: &MapState, persisted: Ids) -> Ids {
        let svc = state.services.values().map(|s| s.id).max().unwrap_or(0);
        let be = state.backends.keys().copied().max().unwrap_or(0);
        Ids {
            next_service: persisted.next_service.max(svc + 1).max(1),
            next_backend: persisted.next_backend.max(be + 1).max(1),
        }
    }
}

/// Metric labels of one programmed service (VIP:port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    /// The Service object.
    pub owner: ServiceRef,
    /// The VIP.
    pub vip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// A desired state turned into map contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// What the maps must hold.
    pub state: MapState,
    /// Counters after the allocations this target made.
    pub ids: Ids,
    /// Labels per service id, for metrics and logs.
    pub services: BTreeMap<u32, ServiceLabels>,
    /// Address per backend id, for metrics.
    pub backends: BTreeMap<u32, SocketAddr>,
    /// The tables of this target by their inputs, for the next [`target_cached`].
    pub tables_built: TableCache,
    /// What [`plan`] needs to change a few services of this target alone.
    pub index: Index,
}

/// Bookkeeping over a [`MapState`] that lets [`plan`] change a few services without
/// looking at the others: which backends each service uses, how many services use
/// each backend, backend ids by value, and the counter slots live ids hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// Backend ids of each service id's members, in address order.
    members: BTreeMap<u32, Vec<u32>>,
    /// How many services (keys) have each backend id among their members.
    users: HashMap<u32, u32>,
    /// Backend id by value.
    by_value: HashMap<Backend, u32>,
    /// Counter slots of live service ids (and slot 0, kept for the ICMP keys).
    service_slots: BTreeSet<u32>,
    /// Counter slots of live backend ids.
    backend_slots: BTreeSet<u32>,
}

/// What a Maglev table is built from (see [`TableCache`]).
type TableInputs = (u32, Vec<(SocketAddr, u32)>);

/// The writes [`plan`] found for a few services, and what to record once they are
/// applied ([`Patch::commit`]).
#[derive(Debug)]
pub struct Patch {
    /// The writes, ordered as [`diff`] orders them.
    pub writes: Vec<Write>,
    /// Counters after the allocations this patch made.
    pub ids: Ids,
    /// Labels of service ids that appeared (`Some`) or went away (`None`).
    pub services: BTreeMap<u32, Option<ServiceLabels>>,
    /// Addresses of backend ids that appeared (`Some`) or went away (`None`).
    pub backends: BTreeMap<u32, Option<SocketAddr>>,
    members: BTreeMap<u32, Option<Vec<u32>>>,
    tables_built: Vec<(TableInputs, Slots)>,
    tables_dropped: Vec<TableInputs>,
}

/// Why a desired state cannot be programmed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// More of something than the maps can hold.
    #[error("desired state needs {needed} {what}, the maps hold {max}")]
    TooLarge {
        /// What overflowed.
        what: &'static str,
        /// How many were needed.
        needed: usize,
        /// Capacity.
        max: u32,
    },
}

/// The map key of a VIP:port:proto.
pub fn service_key(vip: &VipKey) -> ServiceKey {
    let (addr, family) = addr_bytes(vip.addr);
    ServiceKey {
        addr,
        port: vip.port.to_be(),
        proto: proto_number(vip.protocol),
        family,
    }
}

/// The map value of a backend address.
pub fn backend_value(sa: &SocketAddr) -> Backend {
    let (addr, family) = addr_bytes(sa.ip());
    Backend {
        addr,
        port: sa.port().to_be(),
        family,
        flags: 0,
        node: [0; 16],
    }
}

/// The map value of a backend on another node, reached through an IPIP tunnel to
/// `node`.
pub fn remote_backend_value(sa: &SocketAddr, node: IpAddr) -> Backend {
    Backend {
        flags: BACKEND_F_REMOTE,
        node: addr_bytes(node).0,
        ..backend_value(sa)
    }
}

/// The map value of a StaticService backend that is not an xlb node, reached by
/// source NAT through this node (remote, so that no reverse NAT is recorded for it:
/// its replies come back to this node's SNAT port).
pub fn snat_backend_value(sa: &SocketAddr) -> Backend {
    Backend {
        flags: BACKEND_F_REMOTE | BACKEND_F_SNAT,
        ..backend_value(sa)
    }
}

/// Reads a backend value back into an address.
pub fn backend_addr(b: &Backend) -> SocketAddr {
    let ip = if b.family == FAMILY_V6 {
        IpAddr::from(b.addr)
    } else {
        IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
    };
    SocketAddr::new(ip, u16::from_be(b.port))
}

fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// Computes the map contents for `desired`, keeping every id, table and generation
/// of `current` that still fits, so an unchanged desired state yields `current`.
pub fn target(
    desired: &Desired,
    current: &MapState,
    ids: Ids,
    bounds: TableBounds,
) -> Result<Target, StateError> {
    target_cached(desired, current, ids, bounds, &TableCache::new())
}

/// [`target`], taking Maglev tables from `cache` (the previous target's
/// [`Target::tables_built`]) where their inputs are unchanged.
pub fn target_cached(
    desired: &Desired,
    current: &MapState,
    ids: Ids,
    bounds: TableBounds,
    cache: &TableCache,
) -> Result<Target, StateError> {
    let mut ids = ids;
    let mut built = TableCache::with_capacity(cache.len());
    let mut state = MapState::default();
    let mut labels = BTreeMap::new();
    let mut backend_addrs = BTreeMap::new();
    let mut index = Index::default();
    let existing_backends: HashMap<Backend, u32> =
        current.backends.iter().map(|(id, b)| (*b, *id)).collect();
    // Counter slots of live ids (slot 0 stays with the id-0 ICMP keys).
    let mut service_slots: BTreeSet<u32> = current
        .services
        .values()
        .map(|s| service_slot(s.id))
        .chain([0])
        .collect();
    let mut backend_slots: BTreeSet<u32> = current
        .backends
        .keys()
        .map(|id| backend_slot(*id))
        .collect();

    // First every service's ids and table inputs (in order: ids are allocated here),
    // then the tables not built before, in parallel, then the services.
    let mut pending = Vec::with_capacity(desired.services.len());
    for (vip, ds) in &desired.services {
        let key = service_key(vip);
        let old = current.services.get(&key);
        let id = match old {
            Some(s) => s.id,
            None => new_id(
                &mut ids.next_service,
                &mut service_slots,
                None,
                service_slot,
                limits::MAX_SERVICES,
            ),
        };
        let members = members_of(ds);
        let mut backend_ids = Vec::with_capacity(members.len());
        for (sa, b) in &members {
            let bid = match index.by_value.get(b).or_else(|| existing_backends.get(b)) {
                Some(bid) => *bid,
                None => new_id(
                    &mut ids.next_backend,
                    &mut backend_slots,
                    None,
                    backend_slot,
                    limits::MAX_BACKENDS,
                ),
            };
            index.by_value.insert(*b, bid);
            *index.users.entry(bid).or_default() += 1;
            state.backends.insert(bid, *b);
            backend_addrs.insert(bid, *sa);
            backend_ids.push(bid);
        }
        let inputs = table_inputs(&members, &backend_ids, bounds);
        index.members.insert(id, backend_ids);
        pending.push((vip, ds, key, old, id, inputs));
    }
    build_tables(
        pending
            .iter()
            .map(|p| &p.5)
            .filter(|i| !i.1.is_empty() && !cache.contains_key(*i)),
        &mut built,
    );
    for (vip, ds, key, old, id, inputs) in pending {
        let slots = match cache.get(&inputs).or_else(|| built.get(&inputs)) {
            Some(s) => s.clone(),
            None => Slots::default(),
        };
        if !slots.is_empty() {
            built.insert(inputs, slots.clone());
        }
        let table = table_id(old, current, &slots, id);
        let (value, ranges) = service_entry(ds, id, table, slots.len() as u32);
        if let Some((spare, t)) = spare(current, id, table) {
            state.tables.insert(spare, t.clone());
        }
        if !slots.is_empty() {
            state.tables.insert(table, slots);
        }
        state.ranges.extend(ranges);
        state.services.insert(key, value);
        state
            .owners
            .insert(id, owner_value(&ds.owner, &ds.port_name));
        labels.insert(id, service_labels(vip, ds));
    }
    // One (address, 0, ICMP) key per VIP and external IP, so XDP knows ICMP to a VIP
    // as such (see xlb_common::PROTO_ICMP). Node addresses are not VIPs.
    for (vip, ds) in &desired.services {
        if ds.frontend == crate::desired::Frontend::NodePort {
            continue;
        }
        state
            .services
            .insert(icmp_key(vip.addr), Service::default());
    }
    state.service_stats = state
        .services
        .values()
        .map(|s| s.id)
        .filter(|id| *id != 0)
        .collect();
    state.backend_stats = state.backends.keys().copied().collect();
    index.service_slots = state
        .service_stats
        .iter()
        .map(|id| service_slot(*id))
        .chain([0])
        .collect();
    index.backend_slots = state.backends.keys().map(|id| backend_slot(*id)).collect();
    check_capacity("services", state.services.len(), limits::MAX_SERVICES)?;
    check_capacity("backends", state.backends.len(), limits::MAX_BACKENDS)?;
    check_capacity(
        "source ranges",
        state.ranges.len(),
        limits::MAX_SOURCE_RANGES,
    )?;
    Ok(Target {
        state,
        ids,
        services: labels,
        backends: backend_addrs,
        tables_built: built,
        index,
    })
}

/// The writes that take the maps from `current` (recorded in `index`) to what
/// `desired` asks for, when only the entries of `keys` differ from what `current`
/// was computed from: the same writes [`diff`] would find between `current` and a
/// whole [`target_cached`], at the cost of those keys alone.
pub fn plan(
    desired: &Desired,
    keys: &BTreeSet<VipKey>,
    current: &MapState,
    index: &Index,
    ids: Ids,
    bounds: TableBounds,
    cache: &TableCache,
) -> Result<Patch, StateError> {
    let mut ids = ids;
    // What the maps hold and should hold, restricted to the keys, their ids, tables
    // and backends; `diff` of the two is the patch.
    let (mut cur, mut tgt) = (MapState::default(), MapState::default());
    let mut patch = Patch {
        writes: Vec::new(),
        ids,
        services: BTreeMap::new(),
        backends: BTreeMap::new(),
        members: BTreeMap::new(),
        tables_built: Vec::new(),
        tables_dropped: Vec::new(),
    };
    let (mut new_service_slots, mut new_backend_slots) = (BTreeSet::new(), BTreeSet::new());
    let mut chosen: HashMap<Backend, u32> = HashMap::new();
    // Change in the number of users per touched backend id.
    let mut users: BTreeMap<u32, i64> = BTreeMap::new();
    let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
    for vip in keys {
        addrs.insert(vip.addr);
        let key = service_key(vip);
        let old = current.services.get(&key);
        let old_members = old.and_then(|o| index.members.get(&o.id));
        if let Some(o) = old {
            cur.services.insert(key, *o);
            for table in [o.id * 2, o.id * 2 + 1] {
                if let Some(t) = current.tables.get(&table) {
                    cur.tables.insert(table, t.clone());
                }
            }
            if let Some(owner) = current.owners.get(&o.id) {
                cur.owners.insert(o.id, *owner);
            }
            let id = o.id.to_be_bytes();
            cur.ranges
                .extend(current.ranges.iter().filter(|(_, r)| r.service_id == id));
            if current.service_stats.contains(&o.id) {
                cur.service_stats.insert(o.id);
            }
            for b in old_members.into_iter().flatten() {
                *users.entry(*b).or_default() -= 1;
            }
        }
        let Some(ds) = desired.services.get(vip) else {
            if let Some(o) = old {
                patch.services.insert(o.id, None);
                patch.members.insert(o.id, None);
            }
            continue;
        };
        let id = match old {
            Some(s) => s.id,
            None => new_id(
                &mut ids.next_service,
                &mut new_service_slots,
                Some(&index.service_slots),
                service_slot,
                limits::MAX_SERVICES,
            ),
        };
        let members = members_of(ds);
        let mut backend_ids = Vec::with_capacity(members.len());
        for (sa, b) in &members {
            let bid = match chosen.get(b).or_else(|| index.by_value.get(b)) {
                Some(bid) => *bid,
                None => {
                    let bid = new_id(
                        &mut ids.next_backend,
                        &mut new_backend_slots,
                        Some(&index.backend_slots),
                        backend_slot,
                        limits::MAX_BACKENDS,
                    );
                    patch.backends.insert(bid, Some(*sa));
                    bid
                }
            };
            chosen.insert(*b, bid);
            *users.entry(bid).or_default() += 1;
            tgt.backends.insert(bid, *b);
            backend_ids.push(bid);
        }
        let inputs = table_inputs(&members, &backend_ids, bounds);
        let slots = match cache.get(&inputs) {
            Some(s) => s.clone(),
            None if inputs.1.is_empty() => Slots::default(),
            None => {
                let (a, i): (Vec<SocketAddr>, Vec<u32>) = inputs.1.iter().copied().unzip();
                let slots = Slots::from(maglev_slots(&a, &i, inputs.0));
                patch.tables_built.push((inputs.clone(), slots.clone()));
                slots
            }
        };
        if let (Some(o), Some(was)) = (old, old_members)
            && *was != backend_ids
        {
            let was_inputs: Vec<(SocketAddr, u32)> = was
                .iter()
                .filter_map(|b| Some((backend_addr(current.backends.get(b)?), *b)))
                .collect();
            let size = current.tables.get(&o.table).map_or(0, |t| t.len() as u32);
            patch.tables_dropped.push((size, was_inputs));
        }
        let table = table_id(old, current, &slots, id);
        let (value, ranges) = service_entry(ds, id, table, slots.len() as u32);
        if let Some((spare, t)) = spare(current, id, table) {
            tgt.tables.insert(spare, t.clone());
        }
        if !slots.is_empty() {
            tgt.tables.insert(table, slots);
        }
        tgt.ranges.extend(ranges);
        tgt.services.insert(key, value);
        tgt.owners.insert(id, owner_value(&ds.owner, &ds.port_name));
        tgt.service_stats.insert(id);
        if old.is_none() {
            patch.services.insert(id, Some(service_labels(vip, ds)));
        }
        patch.members.insert(id, Some(backend_ids));
    }
    // The ICMP key of each address involved: there while any key on it is a VIP or
    // external IP.
    for addr in addrs {
        let key = icmp_key(addr);
        if let Some(v) = current.services.get(&key) {
            cur.services.insert(key, *v);
        }
        let lo = VipKey {
            addr,
            port: 0,
            protocol: Protocol::Tcp,
        };
        let hi = VipKey {
            addr,
            port: u16::MAX,
            protocol: Protocol::Udp,
        };
        if desired
            .services
            .range(lo..=hi)
            .any(|(_, ds)| ds.frontend != crate::desired::Frontend::NodePort)
        {
            tgt.services.insert(key, Service::default());
        }
    }
    // A touched backend stays while any service still uses it.
    for (bid, delta) in users {
        if let Some(b) = current.backends.get(&bid) {
            cur.backends.insert(bid, *b);
        }
        if current.backend_stats.contains(&bid) {
            cur.backend_stats.insert(bid);
        }
        let after = i64::from(index.users.get(&bid).copied().unwrap_or(0)) + delta;
        if after > 0 {
            if let (None, Some(b)) = (tgt.backends.get(&bid), current.backends.get(&bid)) {
                tgt.backends.insert(bid, *b);
            }
            tgt.backend_stats.insert(bid);
        } else {
            tgt.backends.remove(&bid);
            patch.backends.insert(bid, None);
        }
    }
    let grown = |what: &'static str, now: usize, cur: usize, tgt: usize, max: u32| {
        check_capacity(what, (now + tgt).saturating_sub(cur), max)
    };
    grown(
        "services",
        current.services.len(),
        cur.services.len(),
        tgt.services.len(),
        limits::MAX_SERVICES,
    )?;
    grown(
        "backends",
        current.backends.len(),
        cur.backends.len(),
        tgt.backends.len(),
        limits::MAX_BACKENDS,
    )?;
    grown(
        "source ranges",
        current.ranges.len(),
        cur.ranges.len(),
        tgt.ranges.len(),
        limits::MAX_SOURCE_RANGES,
    )?;
    patch.writes = diff(&cur, &tgt);
    patch.ids = ids;
    Ok(patch)
}

impl Patch {
    /// Records the patch as applied: `state` becomes what the maps hold, and `index`
    /// and `cache` follow it.
    pub fn commit(self, state: &mut MapState, index: &mut Index, cache: &mut TableCache) {
        for (id, members) in self.members {
            let old = match members {
                Some(m) => {
                    for b in &m {
                        *index.users.entry(*b).or_default() += 1;
                    }
                    index.members.insert(id, m)
                }
                None => index.members.remove(&id),
            };
            for b in old.into_iter().flatten() {
                if let Some(n) = index.users.get_mut(&b) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        index.users.remove(&b);
                    }
                }
            }
        }
        for w in &self.writes {
            match w {
                Write::PutBackend(id, b) => {
                    if let Some(was) = state.backends.get(id) {
                        index.by_value.remove(was);
                    }
                    index.by_value.insert(*b, *id);
                }
                Write::DelBackend(id) => {
                    if let Some(was) = state.backends.get(id) {
                        index.by_value.remove(was);
                    }
                }
                Write::PutServiceStats(id) => {
                    index.service_slots.insert(service_slot(*id));
                }
                Write::DelServiceStats(id) => {
                    index.service_slots.remove(&service_slot(*id));
                }
                Write::PutBackendStats(id) => {
                    index.backend_slots.insert(backend_slot(*id));
                }
                Write::DelBackendStats(id) => {
                    index.backend_slots.remove(&backend_slot(*id));
                }
                _ => {}
            }
        }
        state.apply(&self.writes);
        for inputs in self.tables_dropped {
            cache.remove(&inputs);
        }
        cache.extend(self.tables_built);
    }
}

/// A service's members: this node's backends and, with Cluster policy, every other
/// node's, the remote ones through a tunnel to their node (skipped while that node's
/// address is unknown). Sorted by address, so the table is the same on every node.
fn members_of(ds: &crate::desired::DesiredService) -> Vec<(SocketAddr, Backend)> {
    let mut members: Vec<(SocketAddr, Backend)> = ds
        .backends
        .iter()
        .map(|sa| (*sa, backend_value(sa)))
        .collect();
    if !ds.local {
        members.extend(ds.remote_backends.iter().filter_map(|r| {
            if r.snat {
                return Some((r.addr, snat_backend_value(&r.addr)));
            }
            r.node_ip
                .map(|ip| (r.addr, remote_backend_value(&r.addr, ip)))
        }));
    }
    members.sort_by_key(|(sa, _)| *sa);
    members.dedup_by_key(|(sa, _)| *sa);
    members
}

/// The inputs of a service's Maglev table: its size (from the member count) and the
/// members' addresses with their ids.
fn table_inputs(
    members: &[(SocketAddr, Backend)],
    ids: &[u32],
    bounds: TableBounds,
) -> TableInputs {
    let size = maglev::table_size(members.len(), bounds.min, bounds.max);
    (
        size,
        members
            .iter()
            .map(|(sa, _)| *sa)
            .zip(ids.iter().copied())
            .collect(),
    )
}

/// The table id a service's `slots` go under: the one in use if it holds them
/// already, else the idle one of the service's two generations.
fn table_id(old: Option<&Service>, current: &MapState, slots: &Slots, id: u32) -> u32 {
    match old {
        Some(o) if current.tables.get(&o.table) == Some(slots) => o.table,
        // Empty then and now: no table either way (flipping would rewrite the
        // service on every sync).
        Some(o) if slots.is_empty() && o.count == 0 => o.table,
        Some(o) => id * 2 + (1 - o.table % 2),
        None => id * 2,
    }
}

/// The table a service keeps under its other generation, if it has one: the spare
/// that its next change fills in place ([`Write::FillTable`]), so that the change
/// does not wait for the kernel's RCU grace period that inserting a new inner map
/// costs (`maybe_wait_bpf_programs` on every map-in-map update).
fn spare(current: &MapState, id: u32, live: u32) -> Option<(u32, &Slots)> {
    let other = id * 2 + (1 - live % 2);
    current.tables.get(&other).map(|t| (other, t))
}

/// The `xlb_services4` value of a service and its `xlb_src_ranges` entries.
fn service_entry(
    ds: &crate::desired::DesiredService,
    id: u32,
    table: u32,
    count: u32,
) -> (Service, Vec<(u32, SourceRange)>) {
    let mut flags = if ds.local { SVC_F_LOCAL } else { 0 };
    let mut ranges = Vec::new();
    if !ds.source_ranges.is_empty() {
        flags |= SVC_F_SOURCE_RANGES;
        for net in &ds.source_ranges {
            // A client of the other family never matches, as in Kubernetes.
            let (addr, _) = addr_bytes(net.network());
            ranges.push((
                32 + u32::from(net.prefix_len()),
                SourceRange {
                    service_id: id.to_be_bytes(),
                    addr,
                },
            ));
        }
    }
    if ds.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    let value = Service {
        id,
        table,
        count,
        flags,
        affinity_secs: ds.affinity_timeout.unwrap_or(0),
        pad: 0,
    };
    (value, ranges)
}

fn service_labels(vip: &VipKey, ds: &crate::desired::DesiredService) -> ServiceLabels {
    ServiceLabels {
        owner: ds.owner.clone(),
        vip: vip.addr,
        port: vip.port,
        protocol: vip.protocol,
    }
}

/// The (address, 0, ICMP) key of a VIP.
fn icmp_key(addr: IpAddr) -> ServiceKey {
    let (addr, family) = addr_bytes(addr);
    ServiceKey {
        addr,
        port: 0,
        proto: PROTO_ICMP,
        family,
    }
}

/// The next id (ids only grow, see [`Ids`]) whose counter slot no live id holds
/// (neither in `used` nor in `base`), so the datapath's per-CPU counter arrays are
/// indexed by id without collisions. Skips at most `slots` candidates; past that
/// every slot is taken and the capacity check refuses the state anyway.
fn new_id(
    next: &mut u32,
    used: &mut BTreeSet<u32>,
    base: Option<&BTreeSet<u32>>,
    slot: fn(u32) -> u32,
    slots: u32,
) -> u32 {
    let taken =
        |used: &BTreeSet<u32>, s: u32| used.contains(&s) || base.is_some_and(|b| b.contains(&s));
    let mut id = *next;
    for _ in 0..slots {
        if !taken(used, slot(id)) {
            break;
        }
        id = id.wrapping_add(1).max(1);
    }
    used.insert(slot(id));
    *next = id.wrapping_add(1).max(1);
    id
}

fn check_capacity(what: &'static str, needed: usize, max: u32) -> Result<(), StateError> {
    if needed > max as usize {
        return Err(StateError::TooLarge { what, needed, max });
    }
    Ok(())
}

/// Builds the table of each of `inputs` (deduplicated) into `built`, on up to one
/// thread per CPU when there are many (a cold start builds 10,000).
fn build_tables<'a>(
    inputs: impl Iterator<Item = &'a (u32, Vec<(SocketAddr, u32)>)>,
    built: &mut TableCache,
) {
    let mut todo: Vec<&(u32, Vec<(SocketAddr, u32)>)> = inputs.collect();
    todo.sort_unstable();
    todo.dedup();
    let build = |i: &(u32, Vec<(SocketAddr, u32)>)| {
        let (addrs, ids): (Vec<SocketAddr>, Vec<u32>) = i.1.iter().copied().unzip();
        Slots::from(maglev_slots(&addrs, &ids, i.0))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    if threads <= 1 || todo.len() < 256 {
        for i in todo {
            let slots = build(i);
            built.insert(i.clone(), slots);
        }
        return;
    }
    let per = todo.len().div_ceil(threads);
    let results: Vec<Vec<Slots>> = std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(|i| build(i)).collect::<Vec<_>>()))
            .collect();
        // A worker that panicked leaves its tables unbuilt; they are built below.
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (part, slots) in todo.chunks(per).zip(results) {
        let mut slots = slots.into_iter();
        for i in part {
            let s = slots.next().unwrap_or_else(|| build(i));
            built.insert((*i).clone(), s);
        }
    }
}

/// The Maglev table of a service: backend id per slot, sized from the backend count.
/// Built from the backends' addresses (the same on every node), not from node-local
/// ids, so every node computes the same table.
fn maglev_slots(addrs: &[SocketAddr], ids: &[u32], size: u32) -> Vec<u32> {
    if addrs.is_empty() {
        return Vec::new();
    }
    let keys: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let backends: Vec<MaglevBackend<'_>> = keys
        .iter()
        .map(|k| MaglevBackend {
            key: k.as_bytes(),
            weight: 1,
        })
        .collect();
    maglev::build(&backends, size)
        .into_iter()
        .map(|i| ids[i as usize])
        .collect()
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace a backend.
    PutBackend(u32, Backend),
    /// Create a zeroed backend counter.
    PutBackendStats(u32),
    /// Insert a Maglev table as a new inner map (replacing one of another size).
    PutTable(u32, Slots),
    /// Rewrite an existing table of the same size in place: only ever a service's
    /// idle generation, which no packet has been able to reach since the grace
    /// period that followed its last flip (see the module docs).
    FillTable(u32, Slots),
    /// Create a zeroed service counter.
    PutServiceStats(u32),
    /// Record which Service port owns a service id (boxed: 256 bytes).
    PutOwner(u32, Box<Owner>),
    /// Admit a client prefix for a service.
    PutRange(u32, SourceRange),
    /// Remove a client prefix.
    DelRange(u32, SourceRange),
    /// Insert or replace a service: the flip that makes a change visible.
    PutService(ServiceKey, Service),
    /// Delete a service.
    DelService(ServiceKey),
    /// Delete a service counter.
    DelServiceStats(u32),
    /// Forget a service id's owner.
    DelOwner(u32),
    /// Delete a Maglev table.
    DelTable(u32),
    /// Delete a backend.
    DelBackend(u32),
    /// Delete a backend counter.
    DelBackendStats(u32),
}

impl Write {
    /// The kind of write, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Write::PutBackend(..) => "put_backend",
            Write::PutBackendStats(_) => "put_backend_stats",
            Write::PutTable(..) => "put_table",
            Write::FillTable(..) => "fill_table",
            Write::PutServiceStats(_) => "put_service_stats",
            Write::PutOwner(..) => "put_owner",
            Write::PutRange(..) => "put_range",
            Write::PutService(..) => "put_service",
            Write::DelService(_) => "del_service",
            Write::DelServiceStats(_) => "del_service_stats",
            Write::DelOwner(_) => "del_owner",
            Write::DelRange(..) => "del_range",
            Write::DelTable(_) => "del_table",
            Write::DelBackend(_) => "del_backend",
            Write::DelBackendStats(_) => "del_backend_stats",
        }
    }
}

/// The writes that turn `current` into `target`, in an order where packets only ever
/// see a complete old or a complete new service (see the module docs).
pub fn diff(current: &MapState, target: &MapState) -> Vec<Write> {
    let (put_backends, del_backends) = changes(&current.backends, &target.backends);
    let (put_tables, del_tables) = changes(&current.tables, &target.tables);
    let (put_owners, del_owners) = changes(&current.owners, &target.owners);
    let (put_services, del_services) = changes(&current.services, &target.services);
    let mut w = Vec::new();
    w.extend(
        put_backends
            .into_iter()
            .map(|(id, b)| Write::PutBackend(*id, *b)),
    );
    for id in target.backend_stats.difference(&current.backend_stats) {
        w.push(Write::PutBackendStats(*id));
    }
    w.extend(
        put_tables
            .into_iter()
            .map(|(k, v)| match current.tables.get(k) {
                Some(was) if was.len() == v.len() => Write::FillTable(*k, v.clone()),
                _ => Write::PutTable(*k, v.clone()),
            }),
    );
    for id in target.service_stats.difference(&current.service_stats) {
        w.push(Write::PutServiceStats(*id));
    }
    // The owner is recorded before the key is served, so a crash in between never
    // leaves a served key whose owner a restarted agent cannot tell.
    w.extend(
        put_owners
            .into_iter()
            .map(|(id, o)| Write::PutOwner(*id, Box::new(*o))),
    );
    // New ranges before the flag that enforces them; old ones after the flip, so a
    // change never admits nobody and never admits everybody.
    for (len, r) in target.ranges.difference(&current.ranges) {
        w.push(Write::PutRange(*len, *r));
    }
    w.extend(
        put_services
            .into_iter()
            .map(|(k, v)| Write::PutService(*k, *v)),
    );
    w.extend(del_services.into_iter().map(|k| Write::DelService(*k)));
    for id in current.service_stats.difference(&target.service_stats) {
        w.push(Write::DelServiceStats(*id));
    }
    w.extend(del_owners.into_iter().map(|id| Write::DelOwner(*id)));
    for (len, r) in current.ranges.difference(&target.ranges) {
        w.push(Write::DelRange(*len, *r));
    }
    w.extend(del_tables.into_iter().map(|k| Write::DelTable(*k)));
    w.extend(del_backends.into_iter().map(|id| Write::DelBackend(*id)));
    for id in current.backend_stats.difference(&target.backend_stats) {
        w.push(Write::DelBackendStats(*id));
    }
    w
}

/// What differs between two maps, in key order: entries of `target` that `current`
/// lacks or holds otherwise, and keys of `current` that `target` lacks. One merge
/// walk over both (they iterate sorted), not a lookup per key.
#[allow(clippy::type_complexity)]
fn changes<'a, K: Ord, V: PartialEq>(
    current: &'a BTreeMap<K, V>,
    target: &'a BTreeMap<K, V>,
) -> (Vec<(&'a K, &'a V)>, Vec<&'a K>) {
    use std::cmp::Ordering;
    let (mut puts, mut dels) = (Vec::new(), Vec::new());
    let mut cur = current.iter().peekable();
    let mut tgt = target.iter().peekable();
    loop {
        match (cur.peek(), tgt.peek()) {
            (None, None) => break,
            (Some((ck, _)), None) => {
                dels.push(*ck);
                cur.next();
            }
            (None, Some(&(tk, tv))) => {
                puts.push((tk, tv));
                tgt.next();
            }
            (Some(&(ck, cv)), Some(&(tk, tv))) => match ck.cmp(tk) {
                Ordering::Less => {
                    dels.push(ck);
                    cur.next();
                }
                Ordering::Greater => {
                    puts.push((tk, tv));
                    tgt.next();
                }
                Ordering::Equal => {
                    if cv != tv {
                        puts.push((tk, tv));
                    }
                    cur.next();
                    tgt.next();
                }
            },
        }
    }
    (puts, dels)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::desired::{DesiredService, Frontend};

    fn vip(port: u16) -> VipKey {
        VipKey {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 100, 1)),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn desired(entries: &[(u16, &[&str])]) -> Desired {
        let mut d = Desired::default();
        for (port, backends) in entries {
            d.services.insert(
                vip(*port),
                DesiredService {
                    owner: ServiceRef {
                        namespace: "demo".into(),
                        name: "web".into(),
                    },
                    port_name: String::new(),
                    frontend: Frontend::LoadBalancer,
                    local: true,
                    backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
                    own_backend: false,
                    remote_backends: vec![],
                    source_ranges: vec![],
                    affinity_timeout: None,
                },
            );
        }
        d
    }

    #[test]
    fn owners_are_recorded_and_read_back_as_incumbents() {
        let d = desired(&[(80, &["10.0.1.11:8080"])]);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        let writes = diff(&MapState::default(), &t.state);
        let put_owner = writes
            .iter()
            .position(|w| matches!(w, Write::PutOwner(..)))
            .unwrap();
        let put_service = writes
            .iter()
            .position(|w| matches!(w, Write::PutService(..)))
            .unwrap();
        assert!(
            put_owner < put_service,
            "owner recorded before the key is served"
        );
        let inc = incumbents(&apply(&MapState::default(), &writes));
        assert_eq!(
            inc.get(&vip(80)),
            Some(&(ServiceRef::new("demo", "web"), String::new()))
        );
        let o = owner_value(&ServiceRef::new("ns", "a"), "dns-tcp");
        assert_eq!(
            owner_of(&o),
            Some((ServiceRef::new("ns", "a"), "dns-tcp".to_string()))
        );
        // Removing the service forgets its owner.
        let gone = diff(&t.state, &MapState::default());
        assert!(gone.iter().any(|w| matches!(w, Write::DelOwner(_))));
    }

    const START: Ids = Ids {
        next_service: 1,
        next_backend: 1,
    };

    fn apply(state: &MapState, writes: &[Write]) -> MapState {
        let mut s = state.clone();
        s.apply(writes);
        s
    }

    #[test]
    fn a_patch_for_a_few_keys_equals_the_whole_diff() {
        // Random desired states over a few VIPs and ports, with backends shared
        // between services, local and remote ones, source ranges and affinity; a few
        // keys change each round. Planning only those keys must give the writes of
        // the whole diff, and committing them the state and index of the whole target.
        let mut seed: u64 = 0x1234_5678_9abc_def1;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let bounds = TableBounds { min: 7, max: 13 };
        let random_entry = |next: &mut dyn FnMut(u64) -> u64, port: u16| {
            let local = next(2) == 0;
            DesiredService {
                owner: ServiceRef::new("demo", format!("web{port}")),
                port_name: String::new(),
                frontend: if next(4) == 0 {
                    Frontend::NodePort
                } else {
                    Frontend::LoadBalancer
                },
                local,
                own_backend: false,
                backends: (0..next(4))
                    .map(|_| format!("10.0.1.{}:8080", next(6)).parse().unwrap())
                    .collect::<BTreeSet<SocketAddr>>()
                    .into_iter()
                    .collect(),
                remote_backends: (0..next(3))
                    .map(|_| {
                        let snat = next(4) == 0;
                        crate::desired::RemoteBackend {
                            addr: format!("10.0.2.{}:8080", next(4)).parse().unwrap(),
                            node: "node-b".into(),
                            node_ip: (!snat && next(3) != 0).then(|| "10.9.0.2".parse().unwrap()),
                            snat,
                        }
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .fold(
                        Vec::new(),
                        |mut v: Vec<crate::desired::RemoteBackend>, r| {
                            if !v.iter().any(|x| x.addr == r.addr) {
                                v.push(r);
                            }
                            v
                        },
                    ),
                source_ranges: (0..next(2))
                    .map(|_| format!("192.168.{}.0/24", next(2)).parse().unwrap())
                    .collect(),
                affinity_timeout: (next(3) == 0).then_some(60),
            }
        };
        let mut desired = Desired::default();
        let mut t = target(&desired, &MapState::default(), START, bounds).unwrap();
        let (mut flips, mut removals) = (0, 0);
        for round in 0..300 {
            let mut keys = BTreeSet::new();
            for _ in 0..next(3) + 1 {
                let key = VipKey {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 100, 1 + next(3) as u8)),
                    port: 80 + next(3) as u16,
                    protocol: Protocol::Tcp,
                };
                if next(4) == 0 {
                    desired.services.remove(&key);
                } else {
                    desired
                        .services
                        .insert(key, random_entry(&mut next, key.port));
                }
                keys.insert(key);
            }
            let whole = target_cached(&desired, &t.state, t.ids, bounds, &t.tables_built).unwrap();
            let want = diff(&t.state, &whole.state);
            let patch = plan(
                &desired,
                &keys,
                &t.state,
                &t.index,
                t.ids,
                bounds,
                &t.tables_built,
            )
            .unwrap();
            assert_eq!(patch.writes, want, "round {round}");
            assert_eq!(patch.ids, whole.ids, "round {round}");
            flips += want
                .iter()
                .filter(|w| matches!(w, Write::PutTable(..)))
                .count();
            removals += want
                .iter()
                .filter(|w| matches!(w, Write::DelBackend(..)))
                .count();
            let (mut state, mut index, mut cache) =
                (t.state.clone(), t.index.clone(), t.tables_built.clone());
            patch.commit(&mut state, &mut index, &mut cache);
            assert_eq!(state, whole.state, "round {round}");
            assert_eq!(index, whole.index, "round {round}");
            t = Target {
                state,
                index,
                tables_built: cache,
                ..whole
            };
        }
        assert!(flips > 100 && removals > 50, "{flips} {removals}");
    }

    /// Every prefix of the write sequence leaves each service pointing at a complete
    /// table of existing backends: what a packet racing the agent would see.
    fn assert_every_prefix_consistent(state: &MapState, writes: &[Write]) {
        for n in 0..=writes.len() {
            let s = apply(state, &writes[..n]);
            for (k, svc) in &s.services {
                if svc.count == 0 {
                    continue;
                }
                let table = s.tables.get(&svc.table);
                assert!(table.is_some(), "after {n} writes {k:?} has no table");
                let table = table.unwrap();
                assert_eq!(table.len(), svc.count as usize, "after {n} writes");
                for id in table {
                    assert!(
                        s.backends.contains_key(id),
                        "after {n} writes table {} names a missing backend",
                        svc.table
                    );
                }
            }
        }
    }

    #[test]
    fn unchanged_desired_state_writes_nothing() {
        let d = desired(&[(80, &["10.0.1.11:8080", "10.0.1.12:8080"])]);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        let again = target(
            &d,
            &t.state,
            Ids::after(&t.state, t.ids),
            TableBounds::default(),
        )
        .unwrap();
        assert_eq!(again.state, t.state);
        assert!(diff(&t.state, &again.state).is_empty());
    }

    #[test]
    fn backend_change_writes_idle_generation_then_flips() {
        let d1 = desired(&[(80, &["10.0.1.11:8080", "10.0.1.12:8080"])]);
        let t1 = target(&d1, &MapState::default(), START, TableBounds::default()).unwrap();
        let d2 = desired(&[(80, &["10.0.1.11:8080", "10.0.1.13:8080"])]);
        let t2 = target(&d2, &t1.state, t1.ids, TableBounds::default()).unwrap();
        let old = t1.state.services.values().find(|s| s.id != 0).unwrap();
        let new = t2.state.services.values().find(|s| s.id != 0).unwrap();
        assert_eq!(old.id, new.id);
        assert_ne!(
            old.table, new.table,
            "a changed table goes to the other generation"
        );
        let writes = diff(&t1.state, &t2.state);
        let flip = writes
            .iter()
            .position(|w| matches!(w, Write::PutService(..)))
            .unwrap();
        assert!(writes[..flip].iter().all(|w| matches!(
            w,
            Write::PutTable(..)
                | Write::FillTable(..)
                | Write::PutBackend(..)
                | Write::PutBackendStats(..)
        )));
        assert!(writes[flip + 1..].iter().all(|w| matches!(
            w,
            Write::DelTable(..) | Write::DelBackend(..) | Write::DelBackendStats(..)
        )));
        assert_every_prefix_consistent(&t1.state, &writes);
        assert_eq!(apply(&t1.state, &writes), t2.state);
        // The table flipped away from stays as the spare, and the next change of the
        // same size fills it in place: no new inner map, nothing deleted but the
        // backend that left.
        assert!(!writes.iter().any(|w| matches!(w, Write::DelTable(..))));
        assert_eq!(t2.state.tables.len(), 2);
        let d3 = desired(&[(80, &["10.0.1.11:8080", "10.0.1.14:8080"])]);
        let t3 = target(&d3, &t2.state, t2.ids, TableBounds::default()).unwrap();
        let writes = diff(&t2.state, &t3.state);
        let fills: Vec<u32> = writes
            .iter()
            .filter_map(|w| match w {
                Write::FillTable(id, _) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(fills, vec![old.table]);
        assert!(
            !writes
                .iter()
                .any(|w| matches!(w, Write::PutTable(..) | Write::DelTable(..)))
        );
        assert_every_prefix_consistent(&t2.state, &writes);
        // Removing the service removes both generations.
        let t4 = target(
            &Desired::default(),
            &t3.state,
            t3.ids,
            TableBounds::default(),
        )
        .unwrap();
        let dels = diff(&t3.state, &t4.state)
            .iter()
            .filter(|w| matches!(w, Write::DelTable(..)))
            .count();
        assert_eq!(dels, 2);
    }

    #[test]
    fn removed_backend_id_is_never_reused() {
        let d1 = desired(&[(80, &["10.0.1.11:8080", "10.0.1.12:8080"])]);
        let t1 = target(&d1, &MapState::default(), START, TableBounds::default()).unwrap();
        let d2 = desired(&[(80, &["10.0.1.11:8080"])]);
        let t2 = target(&d2, &t1.state, t1.ids, TableBounds::default()).unwrap();
        let d3 = desired(&[(80, &["10.0.1.11:8080", "10.0.1.14:8080"])]);
        let t3 = target(&d3, &t2.state, t2.ids, TableBounds::default()).unwrap();
        let old_ids: BTreeSet<u32> = t1.state.backends.keys().copied().collect();
        let new_id = t3
            .state
            .backends
            .iter()
            .find(|(_, b)| backend_addr(b).to_string() == "10.0.1.14:8080")
            .map(|(id, _)| *id)
            .unwrap();
        assert!(!old_ids.contains(&new_id));
    }

    #[test]
    fn removing_a_service_deletes_it_before_its_table() {
        let d1 = desired(&[(80, &["10.0.1.11:8080"]), (81, &["10.0.1.12:8080"])]);
        let t1 = target(&d1, &MapState::default(), START, TableBounds::default()).unwrap();
        let d2 = desired(&[(81, &["10.0.1.12:8080"])]);
        let t2 = target(&d2, &t1.state, t1.ids, TableBounds::default()).unwrap();
        let writes = diff(&t1.state, &t2.state);
        assert_every_prefix_consistent(&t1.state, &writes);
        assert_eq!(apply(&t1.state, &writes), t2.state);
        // The service left, and the VIP's ICMP key (id 0) stays for the other port.
        assert_eq!(t2.state.services.values().filter(|s| s.id != 0).count(), 1);
        assert_eq!(t2.state.services.len(), 2);
        assert_eq!(t2.state.backends.len(), 1);
    }

    #[test]
    fn each_vip_address_gets_one_icmp_key_and_node_ports_none() {
        let mut d = desired(&[(80, &["10.0.1.11:8080"]), (81, &["10.0.1.12:8080"])]);
        let mut np = d.services[&vip(80)].clone();
        np.frontend = Frontend::NodePort;
        let node_key = VipKey {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        d.services.insert(node_key, np);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        let icmp: Vec<&ServiceKey> = t
            .state
            .services
            .keys()
            .filter(|k| k.proto == PROTO_ICMP)
            .collect();
        assert_eq!(icmp.len(), 1, "{icmp:?}");
        assert_eq!(&icmp[0].addr[..4], &[10, 0, 100, 1]);
        assert_eq!(icmp[0].port, 0);
        assert!(
            !t.state.service_stats.contains(&0),
            "no counters for ICMP keys"
        );
    }

    #[test]
    fn service_without_backends_has_count_zero() {
        let d = desired(&[(80, &[])]);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        assert_eq!(
            t.state.services.values().find(|s| s.id != 0).unwrap().count,
            0
        );
        assert!(t.state.tables.is_empty());
    }

    #[test]
    fn maglev_table_is_sized_from_backends_and_node_independent() {
        let d = desired(&[(80, &["10.0.1.11:8080", "10.0.1.12:8080", "10.0.1.13:8080"])]);
        let a = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        // Another node allocated different ids (it saw other backends first).
        let other = Ids {
            next_service: 7,
            next_backend: 40,
        };
        let b = target(&d, &MapState::default(), other, TableBounds::default()).unwrap();
        let ta = a.state.tables.values().next().unwrap();
        let tb = b.state.tables.values().next().unwrap();
        assert_eq!(ta.len(), 509, "smallest listed prime >= 100 x 3 backends");
        let addr = |t: &Target, id: &u32| t.backends[id];
        let sa: Vec<SocketAddr> = ta.iter().map(|id| addr(&a, id)).collect();
        let sb: Vec<SocketAddr> = tb.iter().map(|id| addr(&b, id)).collect();
        assert_eq!(sa, sb, "same backends, same table on every node");
    }

    #[test]
    fn source_ranges_and_affinity_are_programmed() {
        let mut d = desired(&[(80, &["10.0.1.11:8080"])]);
        let ds = d.services.values_mut().next().unwrap();
        ds.source_ranges = vec![
            "10.0.0.0/24".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap(),
        ];
        ds.affinity_timeout = Some(600);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        let svc = t.state.services.values().find(|s| s.id != 0).unwrap();
        assert_ne!(svc.flags & SVC_F_SOURCE_RANGES, 0);
        assert_ne!(svc.flags & SVC_F_AFFINITY, 0);
        assert_eq!(svc.affinity_secs, 600);
        let mut lens: Vec<u32> = t.state.ranges.iter().map(|(l, _)| *l).collect();
        lens.sort();
        assert_eq!(lens, vec![32 + 16, 32 + 24]);
        let r = t.state.ranges.iter().find(|(l, _)| *l == 56).unwrap().1;
        assert_eq!(r.service_id, svc.id.to_be_bytes());
        assert_eq!(&r.addr[..4], &[10, 0, 0, 0]);

        // Narrowing the ranges adds before the flip and removes after it.
        let mut d2 = d.clone();
        d2.services.values_mut().next().unwrap().source_ranges =
            vec!["10.0.0.0/25".parse().unwrap()];
        let t2 = target(&d2, &t.state, t.ids, TableBounds::default()).unwrap();
        let writes = diff(&t.state, &t2.state);
        let put = writes
            .iter()
            .position(|w| matches!(w, Write::PutRange(..)))
            .unwrap();
        let del = writes
            .iter()
            .position(|w| matches!(w, Write::DelRange(..)))
            .unwrap();
        assert!(put < del);
        assert_eq!(apply(&t.state, &writes), t2.state);
    }

    #[test]
    fn new_ids_never_share_a_counter_slot_with_live_ids() {
        // Live ids 1 and 1 + 16 (slot 1 of 16) and 5: the next ids skip slots 1 and 5.
        let slot = |id: u32| id & 15;
        let mut used: BTreeSet<u32> = [1, 17, 5].iter().map(|id| slot(*id)).collect();
        let mut next = 32;
        let got: Vec<u32> = (0..4)
            .map(|_| new_id(&mut next, &mut used, None, slot, 16))
            .collect();
        assert_eq!(
            got,
            [32, 34, 35, 36],
            "32 is slot 0, 33 slot 1 (taken), 37 slot 5"
        );
        assert_eq!(next, 37);
        // With every slot taken the allocation still ends (the capacity check refuses).
        let mut full: BTreeSet<u32> = (0..16).collect();
        let mut next = 100;
        assert_eq!(new_id(&mut next, &mut full, None, slot, 16), 116);
    }

    #[test]
    fn shared_backend_gets_one_id() {
        let d = desired(&[(80, &["10.0.1.11:8080"]), (81, &["10.0.1.11:8080"])]);
        let t = target(&d, &MapState::default(), START, TableBounds::default()).unwrap();
        assert_eq!(t.state.backends.len(), 1);
    }

    #[test]
    fn keys_are_in_network_order() {
        let k = service_key(&vip(80));
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(&k.addr[..4], &[10, 0, 100, 1]);
        assert_eq!(k.family, FAMILY_V4);
        let b = backend_value(&"10.0.1.11:8080".parse().unwrap());
        assert_eq!(b.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(backend_addr(&b).to_string(), "10.0.1.11:8080");
    }
}
