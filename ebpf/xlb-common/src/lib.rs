//! Map keys, values and constants shared by xlb's kernel programs and its agent.
//!
//! Every BPF map layout is defined here once, `#[repr(C)]`, with explicit padding so
//! that the kernel (bpfel) and the agent (x86_64/aarch64) agree byte for byte; the
//! `layout` tests pin sizes and offsets. Multi-byte fields that come from packets
//! (addresses, ports) are kept in network byte order, exactly as they sit in the
//! packet, so the fast path never swaps bytes; `bpftool map dump` therefore shows
//! them as the wire bytes (port 80 reads `00 50`).
#![no_std]

/// Pin names (also the BPF object names, which the kernel caps at 15 characters) of
/// every map, under `--pin-path`.
pub mod names {
    /// IPv4 VIP:port:proto ([`super::ServiceKey4`]) -> [`super::Service`].
    pub const SERVICES4: &str = "xlb_services4";
    /// IPv6 VIP:port:proto ([`super::ServiceKey6`]) -> [`super::Service`]. Programmed
    /// by the agent; read by the programs once they parse IPv6.
    pub const SERVICES6: &str = "xlb_services6";
    /// Maglev tables: table id -> inner array of backend-id pairs (map of maps).
    pub const MAGLEV: &str = "xlb_maglev";
    /// backend id -> [`super::Backend`].
    pub const BACKENDS: &str = "xlb_backends";
    /// IPv4 connection tracking: client flow ([`super::FlowKey4`]) -> [`super::CtEntry`].
    pub const CONNTRACK4: &str = "xlb_conntrack4";
    /// IPv4 reverse NAT: reply flow (backend -> client) -> [`super::RevNat`].
    pub const REVNAT4: &str = "xlb_revnat4";
    /// Per-CPU packet/byte counters per service, indexed by [`super::service_slot`].
    pub const SERVICE_STATS: &str = "xlb_svc_stats";
    /// Per-CPU packet/byte counters per backend, indexed by [`super::backend_slot`].
    pub const BACKEND_STATS: &str = "xlb_be_stats";
    /// Per-CPU counters per [`super::Reason`].
    pub const REASONS: &str = "xlb_reasons";
    /// Agent-written switches for the programs, see [`super::config`].
    pub const CONFIG: &str = "xlb_config";
    /// loadBalancerSourceRanges: LPM trie of (service id, client prefix).
    pub const SOURCE_RANGES: &str = "xlb_src_ranges";
    /// sessionAffinity ClientIP: (client address, service id) -> backend (LRU).
    pub const AFFINITY: &str = "xlb_affinity";
    /// `--cluster-mode snat`, IPv4: reply flow (pod -> this node:port) -> client and VIP.
    pub const SNAT4: &str = "xlb_snat4";
    /// Tail-call targets of `xlb_xdp` (the SNAT programs). Pinned because the kernel
    /// empties a program array once no file refers to it.
    pub const PROGS: &str = "xlb_progs";
    /// Per-CPU [`super::Handoff`] from `xlb_xdp` to a tail-called program; pinned so an
    /// old and a new program version share it during a takeover.
    pub const HANDOFF: &str = "xlb_handoff";
    /// service id -> [`super::Owner`]: which Service object owns the id's VIP:port.
    /// Never read by the programs; kept next to the pins so that a restarted agent
    /// keeps a contested VIP with the Service that had it, and tools can show names.
    pub const OWNERS: &str = "xlb_owners";
    /// ifindex -> 1 for the veth/netkit devices of this network namespace whose peer
    /// lives in another one (a pod): where `xlb_tc_ingress` may deliver with
    /// `bpf_redirect_peer`. Written by the agent from the kernel's link list.
    pub const PEER_DEVS: &str = "xlb_peer_devs";
    /// IPv4 reverse-NAT hints: local backend ([`super::BackendKey4`]) -> the one VIP:port
    /// ([`super::RevNat`]) whose flows to it need no `xlb_revnat4` entry of their own.
    /// Written by the programs (first VIP to reach a backend), never by the agent.
    pub const REVHINT4: &str = "xlb_revhint4";
    /// IPv4 VIPs this node owns in L2 mode (VIP, network order) -> [`super::L2Vip`]:
    /// `xlb_xdp` answers ARP requests for them (RFC 826). IPv6/NDP gets its own map.
    pub const L2_VIPS4: &str = "xlb_l2_vips4";
    /// Per-CPU ARP replies sent per owned IPv4 VIP (VIP -> u64); the agent creates
    /// an entry when it takes a VIP, the program only counts into existing ones.
    pub const L2_STATS4: &str = "xlb_l2_stats4";
    /// Datapath event level (one u64, a [`super::datapath_log`] level; 0 = off): which
    /// rare events the programs log through aya-log. Its own map rather than a
    /// `xlb_config` key: growing `xlb_config` would make an upgraded agent replace it
    /// (layout check) and lose the id counters and the L2 deadline it holds.
    pub const DATAPATH_LOG: &str = "xlb_dp_log";
    /// Per-CPU rate limiter of datapath events, one u64 per [`super::Reason`] (see
    /// [`super::datapath_log::window`]), and the event handed to `xlb_events`.
    pub const LOG_LIMIT: &str = "xlb_log_limit";
    /// Tail-call target of the programs that log an event: `xlb_events` at index 0.
    /// Its own program array, not a third `xlb_progs` slot: a pinned `xlb_progs` of
    /// the old size would have to be replaced, which empties it under the running
    /// programs during a takeover.
    pub const EVENT_PROGS: &str = "xlb_event_prog";
    /// The TC twins of [`PROGS`] and [`EVENT_PROGS`]' program, tail-called by
    /// [`TC_LB_PROG`] ([`TC_TAIL_PROGS`], in index order).
    pub const PROGS_TC: &str = "xlb_progs_tc";
    /// Per-CPU [`super::TcHandoff`]: how `xlb_xdp` hands a packet it passes to
    /// `xlb_tc_ingress` where XDP metadata is missing (a kernel that refuses
    /// `bpf_xdp_adjust_meta`, a driver without a metadata area). Pinned so an old and
    /// a new program version share it during a takeover.
    pub const TC_HANDOFF: &str = "xlb_tc_handoff";
    /// Every map, in the order `xlb cleanup` removes them.
    pub const ALL_MAPS: [&str; 25] = [
        SERVICES4,
        SERVICES6,
        MAGLEV,
        BACKENDS,
        CONNTRACK4,
        REVNAT4,
        SERVICE_STATS,
        BACKEND_STATS,
        REASONS,
        CONFIG,
        SOURCE_RANGES,
        AFFINITY,
        SNAT4,
        PROGS,
        HANDOFF,
        OWNERS,
        PEER_DEVS,
        REVHINT4,
        L2_VIPS4,
        L2_STATS4,
        DATAPATH_LOG,
        LOG_LIMIT,
        EVENT_PROGS,
        TC_HANDOFF,
        PROGS_TC,
    ];
    /// `xlb_progs` index of the SNAT forward program.
    pub const PROG_SNAT_FWD: u32 = 0;
    /// `xlb_progs` index of the SNAT reply program.
    pub const PROG_SNAT_REV: u32 = 1;
    /// Program names of those, in index order.
    pub const TAIL_PROGS: [&str; 2] = ["xlb_snat_fwd", "xlb_snat_rev"];
    /// The program that logs datapath events (`EVENT_PROGS[0]`).
    pub const EVENTS_PROG: &str = "xlb_events";
    /// Program names in the object file.
    pub const XDP_PROG: &str = "xlb_xdp";
    /// TC egress (reverse NAT) program name.
    pub const TC_EGRESS_PROG: &str = "xlb_tc_egress";
    /// The TC ingress program that sends encapsulated packets whose next hop is not
    /// resolved yet (see [`super::ResolveMeta`]).
    pub const TC_INGRESS_PROG: &str = "xlb_tc_ingress";
    /// `--xdp-mode tc`: the whole ingress datapath at TC, attached instead of
    /// [`XDP_PROG`] and [`TC_INGRESS_PROG`].
    pub const TC_LB_PROG: &str = "xlb_tc_lb";
    /// [`PROGS_TC`]'s programs in index order.
    pub const TC_TAIL_PROGS: [&str; 3] = ["xlb_tc_snat_fwd", "xlb_tc_snat_rev", "xlb_tc_events"];
}

/// Map capacities. The agent refuses a desired state larger than these.
pub mod limits {
    /// VIP:port:proto entries.
    pub const MAX_SERVICES: u32 = 65_536;
    /// Distinct backends (ip, port) across all services.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Maglev tables: two generations per service.
    pub const MAX_TABLES: u32 = 2 * MAX_SERVICES;
    /// Largest Maglev table (slots) of one service.
    pub const MAX_TABLE_SIZE: u32 = 131_071;
    /// Connection-tracking entries (LRU).
    pub const CONNTRACK_ENTRIES: u32 = 262_144;
    /// Source-range prefixes across all services.
    pub const MAX_SOURCE_RANGES: u32 = 65_536;
    /// Session-affinity entries (LRU).
    pub const AFFINITY_ENTRIES: u32 = 65_536;
    /// Pod-facing devices (`xlb_peer_devs`).
    pub const MAX_PEER_DEVS: u32 = 16_384;
    /// VIPs one node can own in L2 mode, per address family.
    pub const MAX_L2_VIPS: u32 = 16_384;
}

/// Value of `xlb_l2_vips4`: what an ARP reply for an owned VIP needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct L2Vip {
    /// The announce interface's MAC: the reply's sender hardware address.
    pub mac: [u8; 6],
    /// Zero.
    pub pad: [u8; 2],
}

/// Address family, as stored in keys (`AF_INET`/`AF_INET6` values are not used so
/// that the byte reads plainly in `bpftool` output).
pub const FAMILY_V4: u8 = 4;
/// IPv6; keys carry room for it from day one.
pub const FAMILY_V6: u8 = 6;

/// IANA protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP. `xlb_services4` holds one `(VIP, port 0, ICMP)` key per
/// VIP address (a [`Service`] with id 0 and no backends), so ICMP to a VIP is known
/// as such without a map of its own.
pub const PROTO_ICMP: u8 = 1;

/// An IPv4 or IPv6 address; IPv4 uses the first four bytes, the rest are zero.
pub type Addr = [u8; 16];

/// A VIP, port and protocol of either family: the agent's view of a service key,
/// stored as [`ServiceKey4`] in `xlb_services4` or [`ServiceKey6`] in
/// `xlb_services6` (see [`ServiceKey::v4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Destination address, network order.
    pub addr: Addr,
    /// Destination port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

impl ServiceKey {
    /// The `xlb_services4` key, for an IPv4 key.
    pub fn v4(&self) -> Option<ServiceKey4> {
        (self.family == FAMILY_V4).then(|| ServiceKey4 {
            addr: [self.addr[0], self.addr[1], self.addr[2], self.addr[3]],
            port: self.port,
            proto: self.proto,
            pad: 0,
        })
    }

    /// The `xlb_services6` key, for an IPv6 key.
    pub fn v6(&self) -> Option<ServiceKey6> {
        (self.family == FAMILY_V6).then_some(ServiceKey6 {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
            pad: 0,
        })
    }
}

impl From<ServiceKey4> for ServiceKey {
    fn from(k: ServiceKey4) -> Self {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&k.addr);
        ServiceKey {
            addr,
            port: k.port,
            proto: k.proto,
            family: FAMILY_V4,
        }
    }
}

impl From<ServiceKey6> for ServiceKey {
    fn from(k: ServiceKey6) -> Self {
        ServiceKey {
            addr: k.addr,
            port: k.port,
            proto: k.proto,
            family: FAMILY_V6,
        }
    }
}

/// Key of `xlb_services4`: eight bytes, so the lookup every IPv4 packet pays hashes
/// and compares one word.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey4 {
    /// Destination address, network order.
    pub addr: [u8; 4],
    /// Destination port, network order.
    pub port: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ICMP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Key of `xlb_services6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey6 {
    /// Destination address, network order.
    pub addr: [u8; 16],
    /// Destination port, network order.
    pub port: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ICMP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Index of a service's counters in `xlb_svc_stats`. The agent never gives two live
/// services ids with the same slot (it skips such ids when allocating), so the
/// counters are a per-CPU array read at a fixed index, not a hash lookup.
#[inline(always)]
pub const fn service_slot(id: u32) -> u32 {
    id & (limits::MAX_SERVICES - 1)
}

/// Index of a backend's counters in `xlb_be_stats`, as [`service_slot`].
#[inline(always)]
pub const fn backend_slot(id: u32) -> u32 {
    id & (limits::MAX_BACKENDS - 1)
}

/// Service flag: externalTrafficPolicy Local (only this node's endpoints).
pub const SVC_F_LOCAL: u32 = 1 << 0;
/// Service flag: only clients in its `xlb_src_ranges` prefixes are admitted
/// (loadBalancerSourceRanges); others are dropped as [`Reason::DropSourceRange`].
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 1;
/// Service flag: sessionAffinity ClientIP, for [`Service::affinity_secs`].
pub const SVC_F_AFFINITY: u32 = 1 << 2;

/// Value of `xlb_services`.
///
/// The Maglev table is double-buffered: the agent builds a new inner map for the idle
/// generation (`id * 2 + 1 - gen`), inserts it into `xlb_maglev`, then replaces this
/// value (one atomic map update) to flip `table` and `count` together, so packets see
/// either the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Stable id; its counters are at [`service_slot`] in `xlb_svc_stats`.
    pub id: u32,
    /// Active table id: `id * 2 + generation`, the key of `xlb_maglev`.
    pub table: u32,
    /// Slots (M) in the active table, a prime; 0 means no usable backend (packets are
    /// dropped and counted as [`Reason::DropNoBackend`]).
    pub count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// sessionAffinityConfig.clientIP.timeoutSeconds when [`SVC_F_AFFINITY`] is set.
    pub affinity_secs: u32,
    /// Zero.
    pub pad: u32,
}

/// Data part of an `xlb_src_ranges` LPM key; the prefix length counts the 32 bits of
/// `service_id` plus the client prefix, so one trie serves every service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRange {
    /// Service id, big-endian so that prefix bits run in byte order.
    pub service_id: [u8; 4],
    /// Client address prefix, network order.
    pub addr: Addr,
}

/// Key of `xlb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Client address.
    pub client: Addr,
    /// Service id.
    pub service_id: u32,
}

/// Value of `xlb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Affinity {
    /// Backend the client is bound to.
    pub backend_id: u32,
    /// Zero.
    pub pad: u32,
    /// CLOCK_MONOTONIC time (`bpf_ktime_get_coarse_ns()`) after which the binding is void.
    pub expires: u64,
}

/// One element of a Maglev inner array: backend ids of slots `2i` and `2i + 1`. Array
/// map elements are rounded up to 8 bytes, so pairing halves the table's memory.
pub type SlotPair = [u32; 2];

/// Value of `xlb_backends`: where a backend lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    /// Pod address, network order.
    pub addr: Addr,
    /// Pod port, network order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// For a [`BACKEND_F_REMOTE`] backend, the address of the node it runs on (the
    /// IPIP tunnel's destination); zero otherwise.
    pub node: Addr,
}

/// Backend flag: the pod runs on another node; packets for it are encapsulated
/// (IPIP) to [`Backend::node`], whose XDP decapsulates and delivers them, and the pod
/// replies straight to the client (direct server return).
pub const BACKEND_F_REMOTE: u8 = 1 << 0;

/// Backend flag, always with [`BACKEND_F_REMOTE`]: a StaticService backend that does
/// not run xlb, reached by source NAT through the receiving node (`xlb_snat_fwd`)
/// whatever the cluster mode; [`Backend::node`] is zero.
pub const BACKEND_F_SNAT: u8 = 1 << 1;

/// Key of the IPv4 connection-tracking, reverse-NAT and SNAT maps: one direction of
/// a flow in 16 bytes (IPv6 flows get their own maps and key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero; part of the hashed key, so it must always be written as zero.
    pub pad: [u8; 3],
}

/// Value of `xlb_conntrack4`, keyed by the client's flow (client -> VIP:port).
///
/// It carries the backend's address itself, so an established TCP flow keeps going
/// to its backend even after the backend left the service (as kube-proxy's conntrack
/// does); new flows (SYN, UDP) only reuse it while the backend id still exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// The backend's address and port.
    pub backend: Backend,
    /// Backend id (key of `xlb_backends`; counters at [`backend_slot`] in `xlb_be_stats`).
    pub backend_id: u32,
    /// CLOCK_MONOTONIC time (`bpf_ktime_get_coarse_ns()`) after which the entry is dead.
    pub expires: u64,
    /// Service the flow belongs to.
    pub service_id: u32,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// `--cluster-mode snat`: the source port this node uses towards the backend
    /// (network order); 0 when the flow is not source-NATed.
    pub snat_port: u16,
    /// Zero.
    pub pad: [u8; 6],
}

/// Value of `xlb_snat4`, keyed by the reply flow (backend -> this node:snat port): how
/// to turn the backend's reply back into one from the VIP to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatRev {
    /// The client's address.
    pub client: Addr,
    /// The VIP.
    pub vip: Addr,
    /// The client's port, network order.
    pub client_port: u16,
    /// The service port, network order.
    pub vip_port: u16,
    /// Zero.
    pub pad: u32,
}

/// What `xlb_xdp` hands a tail-called program (same CPU, same packet: XDP does not
/// nest).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Handoff {
    /// The backend chosen.
    pub backend: Backend,
    /// Its id.
    pub backend_id: u32,
    /// The flow's SNAT port from conntrack (network order), 0 for a new flow.
    pub snat_port: u16,
    /// Zero.
    pub pad: [u8; 6],
}

/// Source ports `--cluster-mode snat` allocates, above Linux's default ephemeral
/// range (net.ipv4.ip_local_port_range 32768-60999) so the node's own sockets do not
/// collide with them.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of SNAT ports (61000..=65535).
pub const SNAT_PORTS: u16 = 4_536;

/// Conntrack flag: a FIN or RST was seen; the entry lives [`timeouts::TCP_CLOSING`].
pub const CT_F_CLOSING: u32 = 1 << 0;
/// Conntrack flag: the TCP flow was first seen without a SYN (picked up mid-stream,
/// after a failover or a lost table, or forged): it lives [`timeouts::TCP_SYN`]
/// without traffic, never the established lifetime, so spoofed ACKs cannot fill the
/// table with entries that outlive the flood by hours (issue 31, finding 5). With
/// DSR the replies never pass this node, so traffic, not an answer, keeps it.
pub const CT_F_MIDSTREAM: u32 = 1 << 1;

/// Conntrack lifetimes in nanoseconds (refreshed by traffic at most once a second).
pub mod timeouts {
    const S: u64 = 1_000_000_000;
    /// After a SYN, until the flow is established; and a flow first seen without a
    /// SYN ([`super::CT_F_MIDSTREAM`]), for as long as it lives.
    pub const TCP_SYN: u64 = 60 * S;
    /// An established TCP flow without traffic (Cilium's default lifetime).
    pub const TCP_ESTABLISHED: u64 = 6 * 3600 * S;
    /// After FIN or RST.
    pub const TCP_CLOSING: u64 = 10 * S;
    /// A UDP flow without traffic.
    pub const UDP: u64 = 60 * S;
    /// Refresh granularity: `expires` is rewritten at most this often per flow.
    pub const REFRESH: u64 = S;
}

/// Value of `xlb_revnat4`, keyed by the reply flow (backend -> client): what the reply's
/// source must be rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    /// VIP, network order.
    pub addr: Addr,
    /// Service port, network order.
    pub port: u16,
    /// Address family.
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

/// Key of `xlb_revhint4`: a local backend's IPv4 address, port and protocol, the
/// source of its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey4 {
    /// Backend address, network order.
    pub addr: [u8; 4],
    /// Backend port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Bytes of [`Owner::text`].
pub const OWNER_TEXT_LEN: usize = 252;

/// Value of `xlb_owners`: `namespace/name:portName` of the Service port that owns a
/// service id (UTF-8, `len` bytes used; Kubernetes names fit with room to spare).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Bytes of `text` in use.
    pub len: u32,
    /// `namespace/name:portName` (the port name may be empty).
    pub text: [u8; OWNER_TEXT_LEN],
}

impl Default for Owner {
    fn default() -> Self {
        Owner {
            len: 0,
            text: [0; OWNER_TEXT_LEN],
        }
    }
}

/// Per-CPU packet and byte counter (value of the stats maps); the agent sums CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes of the whole frame as received.
    pub bytes: u64,
}

/// Keys of `xlb_config` (an array of u64).
pub mod config {
    /// How XDP forwards a packet after DNAT: [`FORWARD_PASS`] or [`FORWARD_REDIRECT`]
    /// (`--forward`).
    pub const FORWARD_MODE: u32 = 0;
    /// [`FORWARD_MODE`]: XDP_PASS into the kernel's routing (the default).
    pub const FORWARD_PASS: u64 = 0;
    /// [`FORWARD_MODE`]: `bpf_fib_lookup` + `bpf_redirect` to the pod's device.
    pub const FORWARD_REDIRECT: u64 = 1;
    /// The agent's next service id, persisted so ids are not reused across restarts.
    pub const NEXT_SERVICE_ID: u32 = 1;
    /// The agent's next backend id, likewise.
    pub const NEXT_BACKEND_ID: u32 = 2;
    /// This node's IPv4 address on the uplink (the 4 address bytes as a native u32 in
    /// the low half): source of the IPIP packets it sends, and the destination it
    /// decapsulates. 0 disables both.
    pub const NODE_IP: u32 = 3;
    /// The uplink's MAC address (6 bytes, native order in the low bytes of the u64).
    /// VIP packets in frames addressed to another unicast MAC (a flooding switch) are
    /// left alone: they are another node's to serve. 0 disables the check.
    pub const IFACE_MAC: u32 = 4;
    /// How remote backends of Cluster services are reached: [`CLUSTER_DSR`] or
    /// [`CLUSTER_SNAT`] (`--cluster-mode`).
    pub const CLUSTER_MODE: u32 = 5;
    /// [`CLUSTER_MODE`]: IPIP to the backend's node, which answers the client directly.
    pub const CLUSTER_DSR: u64 = 0;
    /// [`CLUSTER_MODE`]: source NAT to this node's address (replies come back through
    /// it).
    pub const CLUSTER_SNAT: u64 = 1;
    /// How the datapath is attached to the uplink, as the agent attached it
    /// (`XDP_MODE_*`). Read back on takeover so that a changed `--xdp-mode`
    /// re-attaches instead of silently keeping the old mode.
    pub const XDP_MODE: u32 = 6;
    /// [`XDP_MODE`]: not recorded (a datapath from before the mode was kept).
    pub const XDP_MODE_UNKNOWN: u64 = 0;
    /// [`XDP_MODE`]: native (driver) XDP.
    pub const XDP_MODE_NATIVE: u64 = 1;
    /// [`XDP_MODE`]: generic (skb) XDP.
    pub const XDP_MODE_GENERIC: u64 = 2;
    /// [`XDP_MODE`]: no XDP program; the datapath runs at TC ingress (`--xdp-mode tc`).
    pub const XDP_MODE_TC: u64 = 3;
    /// L2 dead-man switch: `xlb_xdp` answers ARP for owned VIPs only while
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) is below this deadline, which a live
    /// agent keeps pushing forward. An agent that dies (SIGKILL) leaves its pinned
    /// program attached; past the deadline it stops answering, so peers that took
    /// the VIP over are the only answerers. 0 = never answer.
    pub const L2_DEADLINE: u32 = 7;
    /// Number of entries.
    pub const LEN: u32 = 8;
}

/// Datapath events: packets rare enough and telling enough to deserve a log line of
/// their own (a drop that signals misconfiguration, an ICMP fragmentation-needed sent,
/// a failed tail call). The programs send them through aya-log, target
/// [`datapath_log::TARGET`], when `xlb_dp_log` holds a level at least as verbose as
/// the event's, at most [`datapath_log::LINES_PER_WINDOW`] lines per reason per CPU
/// per window (about a second), so that a flood of such packets cannot flood the log.
pub mod datapath_log {
    /// Logging off (the default): the programs read the level only on the rare paths
    /// themselves, and log nothing.
    pub const OFF: u64 = 0;
    /// The datapath cannot do what it was configured to (a failed tail call).
    pub const ERROR: u64 = 1;
    /// Drops that signal misconfiguration (no backend, no route to another node, ...).
    pub const WARN: u64 = 2;
    /// Also ICMP fragmentation-needed answers.
    pub const INFO: u64 = 3;
    /// Everything the programs log.
    pub const DEBUG: u64 = 4;
    /// Levels by name, as `--datapath-log` and `xlb datapath-log` take them.
    pub const LEVELS: [(&str, u64); 5] = [
        ("off", OFF),
        ("error", ERROR),
        ("warn", WARN),
        ("info", INFO),
        ("debug", DEBUG),
    ];
    /// The `log`/`tracing` target of every datapath event.
    pub const TARGET: &str = "xlb::datapath";
    /// Lines per reason per CPU per window.
    pub const LINES_PER_WINDOW: u64 = 10;
    /// Entries of `xlb_log_limit`: one per reason, with room for reasons to come (a
    /// pinned map keeps its size across upgrades), and [`HANDOFF_SLOT`] last.
    pub const LIMIT_SLOTS: u32 = 64;
    /// The `xlb_log_limit` slot through which a program hands the event it logs to
    /// `xlb_events` (per CPU; XDP does not nest).
    pub const HANDOFF_SLOT: u32 = LIMIT_SLOTS - 1;
    const _: () = assert!(super::Reason::COUNT < HANDOFF_SLOT);
    /// The window of `now_ns` (CLOCK_MONOTONIC): 2^30 ns, about 1.07 s. A limiter
    /// slot holds `window << 8 | lines logged in it`.
    #[inline(always)]
    pub const fn window(now_ns: u64) -> u64 {
        now_ns >> 30
    }
    /// The level called `name`, if any.
    pub fn parse(name: &str) -> Option<u64> {
        LEVELS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, l)| *l)
    }
    /// The name of `level` (levels above `debug` read as `debug`).
    pub fn name(level: u64) -> &'static str {
        LEVELS[(level as usize).min(LEVELS.len() - 1)].0
    }
}

/// Why a packet left the programs the way it did. Every drop has one, counted per CPU
/// in `xlb_reasons` (indexed by the discriminant) and exported as
/// `xlb_packets_total{reason}`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A VIP packet DNATed to a newly chosen backend.
    FwdNewFlow = 0,
    /// A VIP packet DNATed to its connection-tracked backend.
    FwdConntrack = 1,
    /// A reply whose source was rewritten back to VIP:port.
    RevNat = 2,
    /// Passed untouched: IPv4 with options (IHL > 5).
    PassIpOptions = 3,
    /// Passed untouched: an IPv4 fragment (only the first carries ports).
    PassFragment = 4,
    /// Dropped: VIP:port known but no usable backend.
    DropNoBackend = 5,
    /// Dropped: a VIP packet whose L4 header is malformed (TCP data offset < 5,
    /// UDP length < 8 or beyond the IP payload).
    DropMalformedL4 = 6,
    /// Dropped: the selection table or backend vanished between lookups (a race with
    /// the agent; retried by the sender).
    DropTableMiss = 7,
    /// A conntrack entry could not serve this packet (expired, or a new flow whose
    /// backend is gone): a backend was chosen afresh.
    CtStaleBackend = 8,
    /// A conntrack or reverse-NAT insert failed (map full beyond LRU eviction).
    CtInsertFailed = 9,
    /// Dropped: the client is outside the service's loadBalancerSourceRanges.
    DropSourceRange = 10,
    /// A new flow followed the client's session affinity.
    FwdAffinity = 11,
    /// Forwarded to a backend on another node, IPIP-encapsulated (Cluster policy).
    FwdEncap = 12,
    /// An IPIP packet from another node, decapsulated here.
    Decap = 13,
    /// Dropped: a decapsulated packet whose service would send it to yet another
    /// node (tables out of step between nodes); never re-encapsulated.
    DropDecapNotLocal = 14,
    /// Dropped: no route or neighbour towards the backend's node.
    DropEncapNoRoute = 15,
    /// Answered with ICMP fragmentation-needed (RFC 1191): DF packet too big for the
    /// tunnel's extra 20 bytes. Oversized non-DF packets are dropped under this reason,
    /// and so are packets over the route's MTU that are not aggregates (a jumbo frame
    /// arriving for a smaller path), which `xlb_tc_ingress` cannot answer.
    IcmpFragNeeded = 16,
    /// Forwarded to a remote backend with source NAT (`--cluster-mode snat`).
    FwdSnat = 17,
    /// A backend's reply to a source-NATed flow, turned back into one from the VIP.
    RevSnat = 18,
    /// Dropped: no free SNAT port for this backend, or no route to it.
    DropSnat = 19,
    /// Not a packet verdict: a conntrack entry was created for a new key (the first
    /// packet of a flow is also counted under its forwarding reason). Exported as
    /// `xlb_conntrack_created_total`; with the entries present it gives evictions.
    CtCreated = 20,
    /// Forwarded to a backend on another node, IPIP-encapsulated, but the next hop's
    /// neighbour entry was not resolved yet: handed (XDP_PASS with metadata) to
    /// `xlb_tc_ingress`, which sends it with `bpf_redirect_neigh`, so the kernel
    /// resolves the neighbour and the packet is not lost.
    FwdEncapResolve = 21,
    /// Dropped: an IPv4 header the kernel would drop too (shorter than 20 bytes,
    /// version not 4, IHL < 5, or, for a VIP packet, a bad header checksum).
    DropMalformedIp = 22,
    /// An ICMP error quoting a VIP flow, translated to the flow's backend (from the
    /// network: path MTU, port unreachable) or back to the VIP (from a local pod).
    IcmpErrorNat = 23,
    /// Passed: ICMP to a VIP that xlb does not translate (echo, or an error quoting a
    /// flow it does not track here).
    PassIcmpVip = 24,
    /// A DNATed packet for a local backend delivered by `xlb_tc_ingress` straight into
    /// the pod's network namespace (`bpf_redirect_peer`), without the kernel's
    /// forwarding path. Local backends the FIB does not lead to a pod's veth (or
    /// whose neighbour entry is not resolved yet) are routed by the kernel instead.
    FwdPeer = 25,
    /// Answered in XDP (XDP_TX): an ARP request (RFC 826) for a VIP this node owns.
    ArpReply = 26,
    /// Passed to the kernel unanswered: an ARP request for an owned VIP that came
    /// after the L2 dead-man deadline (`config::L2_DEADLINE`), i.e. while the agent
    /// is dead or stopped refreshing.
    PassArpDeadline = 27,
    /// A source-NATed packet (to a backend, or a reply back to the client) whose next
    /// hop had no resolved neighbour entry (XDP answered the client's ARP, so the
    /// kernel never learnt it): handed to `xlb_tc_ingress`, which sends it with
    /// `bpf_redirect_neigh`, as for [`Reason::FwdEncapResolve`].
    FwdSnatResolve = 28,
    /// An aggregate for a backend on another node (a GRO/GSO skb larger than the
    /// path's MTU, seen whole by generic XDP) encapsulated by `xlb_tc_ingress`, which
    /// lets the kernel cut it into segments that fit ([`ENCAP_MAGIC`]). Counted
    /// besides [`Reason::FwdEncap`], once per aggregate.
    FwdEncapAggregate = 29,
    /// Handed from `xlb_xdp` to `xlb_tc_ingress` through the per-CPU
    /// `xlb_tc_handoff` slot instead of XDP metadata (the kernel or the driver gives
    /// XDP none): costs a map write here and a compare in TC.
    HandoffSlot = 30,
    /// `xlb_tc_ingress` found the hand-off slot holding another packet's hand-off
    /// (native XDP batches packets before TC sees them): that packet took the
    /// kernel's own path (routing; for an unresolved next hop, a drop).
    HandoffMissed = 31,
}

/// What `xlb_xdp` leaves in the per-CPU `xlb_tc_handoff` slot for `xlb_tc_ingress`
/// when it cannot use XDP metadata. Generic XDP and TC ingress run back to back on
/// one CPU for one skb (`__netif_receive_skb_core`: `do_xdp_generic`, then
/// `sch_handle_ingress`), so the slot is exact there; `ident` makes sure TC applies
/// it only to the very packet XDP left it for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcHandoff {
    /// What to do, as the metadata would say; `magic` 0 = empty.
    pub meta: ResolveMeta,
    /// The packet's first [`HANDOFF_IDENT_LEN`] bytes from its (outer) IPv4 header
    /// on: version to destination address (checksum included) and 4 bytes after.
    pub ident: [u8; HANDOFF_IDENT_LEN],
}

/// Bytes of a packet, from its IPv4 header on, that identify it to
/// `xlb_tc_ingress` ([`TcHandoff::ident`]).
pub const HANDOFF_IDENT_LEN: usize = 24;

/// Names of the read-only globals (`.rodata`) the agent sets when it loads the
/// programs, from what it probed: the verifier prunes the branches they switch off,
/// so a helper the kernel refuses is never seen by it.
pub mod globals {
    /// `u8`, 1 when XDP programs may call `bpf_xdp_adjust_meta` (else the hand-off
    /// to TC goes through `xlb_tc_handoff`).
    pub const XDP_META: &str = "XLB_XDP_META";
}

/// XDP metadata (`bpf_xdp_adjust_meta`) by which `xlb_xdp` hands a packet it passes
/// to `xlb_tc_ingress`: an encapsulated packet whose next hop is not resolved yet
/// ([`RESOLVE_MAGIC`]), a DNATed one for a local backend ([`DELIVER_MAGIC`]), or an
/// aggregate for TC to encapsulate ([`ENCAP_MAGIC`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveMeta {
    /// What to do: [`RESOLVE_MAGIC`], [`DELIVER_MAGIC`] or [`ENCAP_MAGIC`]; only XDP
    /// can write metadata, checked all the same.
    pub magic: u32,
    /// For [`RESOLVE_MAGIC`] and [`ENCAP_MAGIC`], the egress interface the FIB
    /// lookup chose; else 0.
    pub ifindex: u32,
    /// For [`ENCAP_MAGIC`], the IPv4 address of the backend's node; else zero.
    pub node: [u8; 4],
}

/// [`ResolveMeta::magic`]: send with `bpf_redirect_neigh` to `ifindex`.
pub const RESOLVE_MAGIC: u32 = 0x786c_6231;

/// [`ResolveMeta::magic`]: a DNATed packet for a local backend; see
/// [`Reason::FwdPeer`].
pub const DELIVER_MAGIC: u32 = 0x786c_6232;

/// [`ResolveMeta::magic`]: a packet for a backend on `node` that is larger than the
/// route's MTU, which a frame on the wire cannot be: an aggregate (GRO or a local
/// sender's GSO, which generic XDP sees whole). XDP cannot tell its segment size;
/// `xlb_tc_ingress` encapsulates it with `bpf_skb_adjust_room`, which marks it
/// IPIP-GSO and shrinks its segments by the outer header, so every segment fits.
pub const ENCAP_MAGIC: u32 = 0x786c_6233;

impl Reason {
    /// Number of reasons (length of `xlb_reasons`).
    pub const COUNT: u32 = 32;
    /// Every reason, indexed by discriminant.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::FwdNewFlow,
        Reason::FwdConntrack,
        Reason::RevNat,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::DropNoBackend,
        Reason::DropMalformedL4,
        Reason::DropTableMiss,
        Reason::CtStaleBackend,
        Reason::CtInsertFailed,
        Reason::DropSourceRange,
        Reason::FwdAffinity,
        Reason::FwdEncap,
        Reason::Decap,
        Reason::DropDecapNotLocal,
        Reason::DropEncapNoRoute,
        Reason::IcmpFragNeeded,
        Reason::FwdSnat,
        Reason::RevSnat,
        Reason::DropSnat,
        Reason::CtCreated,
        Reason::FwdEncapResolve,
        Reason::DropMalformedIp,
        Reason::IcmpErrorNat,
        Reason::PassIcmpVip,
        Reason::FwdPeer,
        Reason::ArpReply,
        Reason::PassArpDeadline,
        Reason::FwdSnatResolve,
        Reason::FwdEncapAggregate,
        Reason::HandoffSlot,
        Reason::HandoffMissed,
    ];

    /// The label value exported in metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::FwdNewFlow => "fwd_new_flow",
            Reason::FwdConntrack => "fwd_conntrack",
            Reason::RevNat => "rev_nat",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropMalformedL4 => "drop_malformed_l4",
            Reason::DropTableMiss => "drop_table_miss",
            Reason::CtStaleBackend => "ct_stale_backend",
            Reason::CtInsertFailed => "ct_insert_failed",
            Reason::DropSourceRange => "drop_source_range",
            Reason::FwdAffinity => "fwd_affinity",
            Reason::FwdEncap => "fwd_encap",
            Reason::Decap => "decap",
            Reason::DropDecapNotLocal => "drop_decap_not_local",
            Reason::DropEncapNoRoute => "drop_encap_no_route",
            Reason::IcmpFragNeeded => "icmp_frag_needed",
            Reason::FwdSnat => "fwd_snat",
            Reason::RevSnat => "rev_snat",
            Reason::DropSnat => "drop_snat",
            Reason::CtCreated => "ct_created",
            Reason::FwdEncapResolve => "fwd_encap_resolve",
            Reason::DropMalformedIp => "drop_malformed_ip",
            Reason::IcmpErrorNat => "icmp_error_nat",
            Reason::PassIcmpVip => "pass_icmp_vip",
            Reason::FwdPeer => "fwd_peer",
            Reason::ArpReply => "arp_reply",
            Reason::PassArpDeadline => "pass_arp_deadline",
            Reason::FwdSnatResolve => "fwd_snat_resolve",
            Reason::FwdEncapAggregate => "fwd_encap_aggregate",
            Reason::HandoffSlot => "handoff_slot",
            Reason::HandoffMissed => "handoff_missed",
        }
    }
}

/// The flow hash that picks a slot: the same 5-tuple gives the same value on every
/// node and in userspace (used by tests to predict choices). A murmur3-style mix of
/// the key's 32-bit words; not cryptographic, only well-spread.
#[inline(always)]
pub fn flow_hash_v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    h = mix(h, src);
    h = mix(h, dst);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    fmix(h)
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and byte arrays,
    // and have explicit padding fields, so every bit pattern is valid and no byte is
    // uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceKey4 {}
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::BackendKey4 {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::SourceRange {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::SnatRev {}
    unsafe impl aya::Pod for super::Handoff {}
    unsafe impl aya::Pod for super::TcHandoff {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::L2Vip {}
}

#[cfg(test)]
mod layout {
    //! The kernel reads these structs at fixed offsets; a change here must be a
    //! deliberate map-format change (pinned maps from an older agent are reused).
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn service_key_layout() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, proto), 18);
        assert_eq!(offset_of!(ServiceKey, family), 19);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(size_of::<Service>(), 24);
        assert_eq!(offset_of!(Service, affinity_secs), 16);
        assert_eq!(offset_of!(Service, table), 4);
        assert_eq!(offset_of!(Service, count), 8);
        assert_eq!(offset_of!(Service, flags), 12);
    }

    #[test]
    fn slot_and_backend_layout() {
        assert_eq!(size_of::<SlotPair>(), 8);
        assert_eq!(size_of::<Backend>(), 36);
        assert_eq!(offset_of!(Backend, port), 16);
        assert_eq!(offset_of!(Backend, node), 20);
        assert_eq!(offset_of!(Backend, family), 18);
    }

    #[test]
    fn flow_key_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey4>(), 16);
        assert_eq!(offset_of!(FlowKey4, dst), 4);
        assert_eq!(offset_of!(FlowKey4, sport), 8);
        assert_eq!(offset_of!(FlowKey4, dport), 10);
        assert_eq!(offset_of!(FlowKey4, proto), 12);
        assert_eq!(offset_of!(FlowKey4, pad), 13);
        assert_eq!(align_of::<FlowKey4>(), 2);
    }

    #[test]
    fn narrow_service_keys() {
        assert_eq!(size_of::<ServiceKey4>(), 8);
        assert_eq!(offset_of!(ServiceKey4, port), 4);
        assert_eq!(size_of::<ServiceKey6>(), 20);
        let k = ServiceKey {
            addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        assert_eq!(k.v6(), None);
        assert_eq!(ServiceKey::from(k.v4().unwrap()), k);
    }

    #[test]
    fn ct_revnat_counter_layout() {
        assert_eq!(size_of::<CtEntry>(), 64);
        assert_eq!(offset_of!(CtEntry, snat_port), 56);
        assert_eq!(size_of::<SnatRev>(), 40);
        assert_eq!(offset_of!(SnatRev, client_port), 32);
        assert_eq!(offset_of!(CtEntry, backend_id), 36);
        assert_eq!(offset_of!(CtEntry, expires), 40);
        assert_eq!(offset_of!(CtEntry, service_id), 48);
        assert_eq!(offset_of!(CtEntry, flags), 52);
        assert_eq!(size_of::<RevNat>(), 20);
        assert_eq!(size_of::<BackendKey4>(), 8);
        assert_eq!(offset_of!(RevNat, port), 16);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(offset_of!(Counter, bytes), 8);
    }

    #[test]
    fn policy_map_layouts() {
        assert_eq!(size_of::<SourceRange>(), 20);
        assert_eq!(offset_of!(SourceRange, addr), 4);
        assert_eq!(size_of::<AffinityKey>(), 20);
        assert_eq!(size_of::<Affinity>(), 16);
        assert_eq!(offset_of!(Affinity, expires), 8);
    }

    #[test]
    fn l2_vip_layout() {
        assert_eq!(size_of::<L2Vip>(), 8);
    }

    #[test]
    fn reasons_are_indexed_by_discriminant() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.label());
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow_hash_v4(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash_v4(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 4, 17));
        assert_eq!(base, flow_hash_v4(1, 2, 3, 4, 6));
    }
}
