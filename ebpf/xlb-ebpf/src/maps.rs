//! Every map the programs use. BTF-defined, so `bpftool map dump` prints keys and
//! values field by field; the agent pins each by name under `--pin-path` so the
//! datapath (and its connection tracking) outlives the agent. Layouts: `xlb_common`.
use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{
        Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray,
    },
    macros::btf_map,
    maps::lpm_trie::Key,
};
use xlb_common::{
    Affinity, AffinityKey, Backend, BackendKey4, Counter, CtEntry, FlowKey4, Handoff, L2Vip, Owner,
    Reason, RevNat, Service, ServiceKey4, ServiceKey6, SlotPair, SnatRev, SourceRange, TcHandoff,
    config, datapath_log, limits,
};

/// IPv4 VIP:port:proto -> service. The only lookup non-VIP IPv4 traffic pays, with
/// an 8-byte key.
#[btf_map(name = "xlb_services4")]
pub static SERVICES4: HashMap<ServiceKey4, Service, { limits::MAX_SERVICES as usize }> =
    HashMap::new();

/// IPv6 VIP:port:proto -> service. The agent programs it; the programs read it once
/// they parse IPv6. Defined here so it is pinned and BTF-described like the others.
#[btf_map(name = "xlb_services6")]
pub static SERVICES6: HashMap<ServiceKey6, Service, { limits::MAX_SERVICES as usize }> =
    HashMap::new();

/// Inner Maglev table: slot pairs. `BPF_F_INNER_MAP` lets the agent insert arrays of
/// any size (each sized for its service's backend count); this template's size is
/// irrelevant. `BPF_F_MMAPABLE` lets the agent fill a new table with one memory copy
/// instead of a write per slot pair; the kernel requires an inserted inner map's flags
/// to equal the template's (`bpf_map_meta_equal`), so both sides set it.
pub type MaglevTable = Array<SlotPair, 1, { (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize }>;

/// Table id (`Service::table`) -> Maglev table. Replacing an entry swaps a whole
/// table atomically.
#[btf_map(name = "xlb_maglev")]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { limits::MAX_TABLES as usize }> =
    HashOfMaps::new();

/// backend id -> backend address. Ids are never reused, so a conntrack entry that
/// names a removed backend misses here instead of reaching a stranger.
#[btf_map(name = "xlb_backends")]
pub static BACKENDS: HashMap<u32, Backend, { limits::MAX_BACKENDS as usize }> = HashMap::new();

/// Client flow -> chosen backend. LRU: the kernel evicts the least recently used
/// entry when full, so a burst of new flows cannot wedge the table.
#[btf_map(name = "xlb_conntrack4")]
pub static CONNTRACK4: LruHashMap<FlowKey4, CtEntry, { limits::CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();

/// Reply flow (backend -> client) -> VIP:port to restore as the reply's source, for
/// the flows [`REVHINT4`] does not cover.
#[btf_map(name = "xlb_revnat4")]
pub static REVNAT4: LruHashMap<FlowKey4, RevNat, { limits::CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();

/// Local backend -> the VIP:port of the first flow that reached it. A new flow through
/// that VIP:port records no [`REVNAT4`] entry (an LRU insert, with an eviction once the
/// map is full: about half of a new flow's cost): its replies find the VIP here and
/// are confirmed by the flow's conntrack entry (`lb::reverse`). A backend reached
/// through several VIPs keeps the first; flows through the others record their own
/// reverse NAT as before. Never evicted or rewritten, so a hint never changes under
/// a flow that relies on it; once full, new backends simply get no hint. Allocated on
/// insert (one entry per backend address, not per flow).
#[btf_map(name = "xlb_revhint4")]
pub static REVHINT4: HashMap<
    BackendKey4,
    RevNat,
    { limits::MAX_BACKENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per-CPU traffic per service, at `xlb_common::service_slot(id)`: an array, so the
/// lookup is a bounds check and an offset (the JIT inlines it), not a hash.
#[btf_map(name = "xlb_svc_stats")]
pub static SERVICE_STATS: PerCpuArray<Counter, { limits::MAX_SERVICES as usize }> =
    PerCpuArray::new();

/// Per-CPU traffic per backend, at `xlb_common::backend_slot(id)`.
#[btf_map(name = "xlb_be_stats")]
pub static BACKEND_STATS: PerCpuArray<Counter, { limits::MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Per-CPU packets per [`Reason`].
#[btf_map(name = "xlb_reasons")]
pub static REASONS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Agent-written switches, see `xlb_common::config`.
#[btf_map(name = "xlb_config")]
pub static CONFIG: Array<u64, { config::LEN as usize }> = Array::new();

/// (service id, client prefix) -> 1: loadBalancerSourceRanges of services that set
/// `SVC_F_SOURCE_RANGES`.
#[btf_map(name = "xlb_src_ranges")]
pub static SOURCE_RANGES: LpmTrie<
    SourceRange,
    u8,
    { limits::MAX_SOURCE_RANGES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// (client, service) -> backend, for sessionAffinity ClientIP.
#[btf_map(name = "xlb_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { limits::AFFINITY_ENTRIES as usize }> =
    LruHashMap::new();

/// `--cluster-mode snat`: reply flow (backend -> this node:port) -> client and VIP.
#[btf_map(name = "xlb_snat4")]
pub static SNAT4: LruHashMap<FlowKey4, SnatRev, { limits::CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();

/// Tail-call targets (`xlb_common::names::PROG_SNAT_*`).
#[btf_map(name = "xlb_progs")]
pub static PROGS: ProgramArray<2> = ProgramArray::new();

/// The TC twins of [`PROGS`] and of the events program, for `xlb_tc_lb` (a program
/// array holds programs of one type): `PROG_SNAT_FWD`, `PROG_SNAT_REV`, then
/// `hook::PROG_TC_EVENTS`.
#[btf_map(name = "xlb_progs_tc")]
pub static PROGS_TC: ProgramArray<3> = ProgramArray::new();

/// Per-CPU room for the entries a new flow creates (see `lb::record`).
#[repr(C)]
pub struct Scratch {
    /// The conntrack entry.
    pub ct: CtEntry,
    /// The reverse-NAT key.
    pub reply: FlowKey4,
    /// The reverse-NAT value.
    pub rev: RevNat,
}

/// One [`Scratch`] per CPU.
#[btf_map(name = "xlb_scratch")]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// One [`Handoff`] per CPU.
#[btf_map(name = "xlb_handoff")]
pub static HANDOFF: PerCpuArray<Handoff, 1> = PerCpuArray::new();

/// One [`TcHandoff`] per CPU: `xlb_xdp` -> `xlb_tc_ingress` without XDP metadata
/// (see `handoff`).
#[btf_map(name = "xlb_tc_handoff")]
pub static TC_HANDOFF: PerCpuArray<TcHandoff, 1> = PerCpuArray::new();

/// The LPM key type of [`SOURCE_RANGES`].
pub type RangeKey = Key<SourceRange>;

/// Counts one packet for `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, programs run with preemption disabled on this CPU.
        unsafe { *c += 1 };
    }
}

/// Adds one packet of `bytes` to a per-CPU counter array at `slot`.
#[inline(always)]
pub fn add<const N: usize>(map: &PerCpuArray<Counter, N>, slot: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, see `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// ifindex -> 1: pod-facing veth/netkit devices (see `xlb_common::names::PEER_DEVS`).
#[btf_map(name = "xlb_peer_devs")]
pub static PEER_DEVS: HashMap<u32, u32, { limits::MAX_PEER_DEVS as usize }> = HashMap::new();

/// service id -> the Service port that owns it. Written by the agent, never read here:
/// defined with the others so it is pinned, sized and BTF-described like them.
#[btf_map(name = "xlb_owners")]
pub static OWNERS: HashMap<
    u32,
    Owner,
    { limits::MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Owned IPv4 VIP (network order, as the 4 wire bytes in a u32) -> [`L2Vip`]: ARP
/// requests for these are answered here (see `arp`).
#[btf_map(name = "xlb_l2_vips4")]
pub static L2_VIPS4: HashMap<u32, L2Vip, { limits::MAX_L2_VIPS as usize }> = HashMap::new();

/// Owned IPv4 VIP -> ARP replies sent, per CPU. Entries are the agent's to create.
#[btf_map(name = "xlb_l2_stats4")]
pub static L2_STATS4: PerCpuHashMap<u32, u64, { limits::MAX_L2_VIPS as usize }> =
    PerCpuHashMap::new();

/// The datapath event level (`xlb_common::datapath_log`), written by the agent and by
/// `xlb datapath-log`; read only on the rare paths that may log (see `events`).
#[btf_map(name = "xlb_dp_log")]
pub static DATAPATH_LOG: Array<u64, 1> = Array::new();

/// Per-CPU event rate limiter, one slot per [`Reason`]: `window << 8 | lines`, see
/// `xlb_common::datapath_log::window`; and the event handed to `xlb_events`
/// (`datapath_log::HANDOFF_SLOT`, see `events`).
#[btf_map(name = "xlb_log_limit")]
pub static LOG_LIMIT: PerCpuArray<u64, { datapath_log::LIMIT_SLOTS as usize }> = PerCpuArray::new();

/// `xlb_events` at index 0 (`xlb_common::names::EVENT_PROGS`).
#[btf_map(name = "xlb_event_prog")]
pub static EVENT_PROGS: ProgramArray<1> = ProgramArray::new();
