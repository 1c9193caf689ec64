//! The one model every source produces and everything after the sources consumes.
//!
//! A [`Snapshot`] is the whole input at one instant: the LoadBalancer and NodePort
//! Services with their frontends, ports and endpoints, already joined and validated,
//! and the Nodes with their addresses. It knows nothing about where it came from
//! (manifest files today, the Kubernetes API later) beyond an `origin` string for
//! error messages.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;

/// Every Service and Node the source knows about.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Services by reference; iteration order is the [`ServiceRef`] order.
    pub services: BTreeMap<ServiceRef, Service>,
    /// `v1 Node` objects by `metadata.name`.
    pub nodes: BTreeMap<String, Node>,
    /// `xlb.dev/v1alpha1 L2Announcement` objects by `namespace/name`: which VIPs are
    /// announced on the LAN by ARP, from which nodes. None: no VIP is (routes to the
    /// VIPs are the network's business, as before L2 mode existed).
    pub l2_announcements: BTreeMap<String, L2Announcement>,
    /// `xlb.dev/v1alpha1 AddressPool` objects by `metadata.name` (pools are named
    /// alone, as MetalLB's annotations name them): where LoadBalancer Services that
    /// ask for no address get one (see [`crate::ipam`]).
    pub address_pools: BTreeMap<String, AddressPool>,
    /// `v1 Namespace` labels by name, for AddressPool `namespaceSelectors` (only
    /// read while some pool has them; a namespace not here has no labels).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// BGP announcement: peers, what is announced to them, BFD profiles.
    pub bgp: BgpConfig,
}

impl Snapshot {
    /// Every Node's own addresses (InternalIP and ExternalIP), with the Node's name: a
    /// Service never gets one as its VIP or external IP, or a tenant could take over
    /// a node's own listeners (the CVE-2020-8554 pattern) and, announced, the node's
    /// address on the LAN.
    pub fn node_addresses(&self) -> BTreeMap<IpAddr, &str> {
        self.nodes
            .values()
            .flat_map(|n| {
                n.internal_ips
                    .iter()
                    .chain(&n.external_ips)
                    .map(|ip| (*ip, n.name.as_str()))
            })
            .collect()
    }
}

/// The `xlb.dev/v1alpha1` BGP resources (MetalLB's BGPPeer, BGPAdvertisement and
/// BFDProfile field names), each by `namespace/name`. No peer: no BGP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpConfig {
    /// `BGPPeer` objects: the routers each selected node opens a session to.
    pub peers: BTreeMap<String, BgpPeer>,
    /// `BGPAnnouncement` objects: which VIPs go to which peers, with what attributes.
    pub announcements: BTreeMap<String, BgpAnnouncement>,
    /// `BFDProfile` objects by `metadata.name` (peers name them alone, as in MetalLB).
    pub bfd_profiles: BTreeMap<String, BfdProfile>,
}

/// An `xlb.dev/v1alpha1 BGPPeer`: one router the selected nodes peer with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeer {
    /// `metadata.name`, which `BGPAnnouncement.spec.peers` refers to.
    pub name: String,
    /// `spec.myASN`: this node's AS (4-octet, RFC 6793).
    pub my_asn: u32,
    /// `spec.peerASN`: the router's AS; equal to `my_asn` makes it iBGP.
    pub peer_asn: u32,
    /// `spec.peerAddress`.
    pub peer_address: IpAddr,
    /// `spec.peerPort` (default 179).
    pub peer_port: u16,
    /// `spec.sourceAddress`: the local address of the session (default: the kernel's
    /// choice for the route to the peer).
    pub source_address: Option<IpAddr>,
    /// `spec.holdTime` (default 90 s; 0 or at least 3 s, RFC 4271 §4.2).
    pub hold_time: std::time::Duration,
    /// `spec.keepaliveTime` (default a third of the hold time, RFC 4271 §10).
    pub keepalive_time: Option<std::time::Duration>,
    /// `spec.password`: TCP MD5 signature key (RFC 2385), at most 80 bytes; for a
    /// peer with `password_secret`, the key read from that Secret (`None` while it
    /// cannot be read: the peer then has no session).
    pub password: Option<String>,
    /// `spec.passwordSecret`: the Secret whose `password` key is the MD5 key.
    pub password_secret: Option<SecretRef>,
    /// `spec.ebgpMultiHop`: the router is not on a directly connected network (TTL
    /// 255 instead of 1 for eBGP).
    pub ebgp_multihop: bool,
    /// `spec.ttlSecurity`: GTSM (RFC 5082), TTL 255 sent and required.
    pub ttl_security: bool,
    /// `spec.enableGracefulRestart`: advertise the graceful restart capability
    /// (RFC 4724), so the router keeps this node's routes while its agent restarts.
    pub graceful_restart: bool,
    /// `spec.bfdProfile`: run BFD with this profile's timers (RFC 5880/5881).
    pub bfd_profile: Option<String>,
    /// `spec.nodeSelectors`: the nodes that peer (none: every node).
    pub node_selectors: Vec<LabelSelector>,
    /// `spec.routerID`: the BGP identifier (default: the node's IPv4 address).
    pub router_id: Option<std::net::Ipv4Addr>,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// A Secret named by an object (BGPPeer `passwordSecret`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRef {
    /// The Secret's namespace (default: the referring object's).
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An `xlb.dev/v1alpha1 BGPAnnouncement`: MetalLB's BGPAdvertisement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpAnnouncement {
    /// `spec.ipAddressPools`: only VIPs inside these pools (none: every VIP).
    pub ip_address_pools: Vec<String>,
    /// `spec.serviceSelectors`: only Services these select (none: every Service).
    pub service_selectors: Vec<LabelSelector>,
    /// `spec.nodeSelectors`: only from the nodes these select (none: every node).
    pub node_selectors: Vec<LabelSelector>,
    /// `spec.peers`: only to the BGPPeers of these names (none: every peer).
    pub peers: Vec<String>,
    /// `spec.communities` of the `aa:nn` form (RFC 1997), as 32-bit values.
    pub communities: Vec<u32>,
    /// `spec.communities` of the `large:a:b:c` form (RFC 8092).
    pub large_communities: Vec<[u32; 3]>,
    /// `spec.localPref`: LOCAL_PREF sent to iBGP peers (RFC 4271 §5.1.5).
    pub local_pref: Option<u32>,
    /// `spec.aggregationLength` (default 32): announce the VIP's covering prefix of
    /// this length rather than the /32.
    pub aggregation_length: u8,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// An `xlb.dev/v1alpha1 BFDProfile` (RFC 5880 timers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BfdProfile {
    /// `spec.receiveInterval`: Required Min RX Interval (default 300 ms).
    pub receive_interval: std::time::Duration,
    /// `spec.transmitInterval`: Desired Min TX Interval (default 300 ms).
    pub transmit_interval: std::time::Duration,
    /// `spec.detectMultiplier` (default 3).
    pub detect_multiplier: u8,
    /// `spec.passiveMode`: wait for the router's packets before sending (RFC 5880 §6.1).
    pub passive_mode: bool,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// An `xlb.dev/v1alpha1 AddressPool`: MetalLB's IPAddressPool, same field names and
/// meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPool {
    /// `spec.addresses`: inclusive ranges, from CIDRs (`10.0.0.0/24`) or
    /// `first-last` ranges; one family per range.
    pub ranges: Vec<(IpAddr, IpAddr)>,
    /// `spec.autoAssign` (default true): whether Services that name no pool may get
    /// an address from it.
    pub auto_assign: bool,
    /// `spec.avoidBuggyIPs`: never hand out IPv4 addresses ending in .0 or .255.
    pub avoid_buggy_ips: bool,
    /// `spec.serviceAllocation.priority`: pools with a lower value are tried first;
    /// pools without one come last.
    pub priority: Option<i32>,
    /// `spec.serviceAllocation.namespaces`: only Services in these namespaces (empty:
    /// any).
    pub namespaces: Vec<String>,
    /// `spec.serviceAllocation.namespaceSelectors`: only Services in namespaces whose
    /// labels these select. With `namespaces`, a Service is admitted by either.
    pub namespace_selectors: Vec<LabelSelector>,
    /// `spec.serviceAllocation.serviceSelectors`: only Services these select (empty:
    /// any).
    pub service_selectors: Vec<LabelSelector>,
    /// Where it came from, for error messages.
    pub origin: String,
}

/// What a LoadBalancer Service asks of address allocation ([`crate::ipam`]): the
/// addresses it named, or one per IP family from a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressRequest {
    /// The pool it names (`xlb.dev/address-pool`, or MetalLB's `address-pool`
    /// annotation in either spelling).
    pub pool: Option<String>,
    /// The addresses it named (`spec.loadBalancerIP`, a `loadBalancerIPs`
    /// annotation) or, with `from_status`, holds in status. Allocation keeps those
    /// the sharing rules let it hold; empty: allocate.
    pub named: Vec<IpAddr>,
    /// The families to allocate, in order: `spec.ipFamilies` (IPv4 when unset),
    /// both under `ipFamilyPolicy: PreferDualStack | RequireDualStack`.
    pub families: Vec<IpFamily>,
    /// The field `named` was read from (`spec.loadBalancerIP`, an annotation, or
    /// `status.loadBalancer.ingress`), for errors about a named address.
    pub named_field: String,
    /// `named` comes from `status.loadBalancer.ingress` (an earlier allocation,
    /// recovered: the address stays, never reshuffled) rather than from the spec.
    pub from_status: bool,
    /// The addresses `status.loadBalancer.ingress` shows now, so that the leader
    /// writes status only when what the Service holds differs.
    pub status: Vec<IpAddr>,
}

/// An IP address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

/// An `xlb.dev/v1alpha1 L2Announcement`: MetalLB's L2Advertisement with the same field
/// names. A VIP is announced when some announcement selects both it (pools and
/// service selectors) and the node (node selectors, interfaces); an empty spec
/// selects every VIP on every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2Announcement {
    /// `spec.ipAddressPools`: names of the AddressPools whose addresses this
    /// announces; empty means every pool. Pools arrive with AddressPool (issue 18);
    /// until then the manifest source rejects a non-empty list (unknown pool).
    pub ip_address_pools: Vec<String>,
    /// `spec.serviceSelectors`: a Service is selected if any selector matches its
    /// labels; empty selects every Service.
    pub service_selectors: Vec<LabelSelector>,
    /// `spec.nodeSelectors`: nodes that may announce, if any selector matches the
    /// node's labels; empty means every node.
    pub node_selectors: Vec<LabelSelector>,
    /// `spec.interfaces`: the interfaces to announce from; empty means any. xlb
    /// announces only from its uplink (`--interface`), so a non-empty list that does
    /// not name it leaves this node out.
    pub interfaces: Vec<String>,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// A Kubernetes label selector (`metav1.LabelSelector`): every `matchLabels` entry
/// and every expression must hold. An empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    /// `In`: the label is set to one of the values.
    In(String, Vec<String>),
    /// `NotIn`: the label is unset or set to none of the values.
    NotIn(String, Vec<String>),
    /// `Exists`.
    Exists(String),
    /// `DoesNotExist`.
    DoesNotExist(String),
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector (Kubernetes "Labels and Selectors").
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| match r {
                LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                LabelRequirement::Exists(k) => labels.contains_key(k),
                LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// Whether any of `selectors` matches `labels`; an empty list matches everything
/// (MetalLB's rule for `serviceSelectors` and `nodeSelectors`).
pub fn any_selects(selectors: &[LabelSelector], labels: &BTreeMap<String, String>) -> bool {
    selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))
}

/// A `v1 Node`: what xlb needs to know about a cluster node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `metadata.name`, what EndpointSlice `nodeName` and `--node-name` refer to.
    pub name: String,
    /// Every `status.addresses[]` entry of `type: InternalIP`, in manifest order,
    /// deduplicated; both families (a dual-stack node has one of each).
    pub internal_ips: Vec<IpAddr>,
    /// Every `status.addresses[]` entry of `type: ExternalIP` that is an address:
    /// never served for a Service either (see [`Snapshot::node_addresses`]).
    pub external_ips: Vec<IpAddr>,
    /// `metadata.labels`, for L2Announcement `nodeSelectors`.
    pub labels: BTreeMap<String, String>,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

impl Node {
    /// The first IPv4 InternalIP: the address other nodes reach this one at (IPIP
    /// tunnel endpoint, SNAT source). `None` for a node with no IPv4 InternalIP.
    pub fn ipv4(&self) -> Option<IpAddr> {
        self.internal_ips.iter().copied().find(IpAddr::is_ipv4)
    }
}

/// A Service's identity: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Namespace (`default` when the manifest leaves it out, as `kubectl apply` does).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceRef {
    /// Builds a reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A `type: LoadBalancer` or `type: NodePort` Service with its endpoints joined in.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// `spec.type`.
    pub service_type: ServiceType,
    /// Load-balancer addresses (LoadBalancer only), as address allocation settled
    /// them from `address_request`: `spec.loadBalancerIP`, else the
    /// `loadBalancerIPs` annotations (xlb's, then MetalLB's two spellings), else
    /// every `status.loadBalancer.ingress[].ip`, else allocated ones; named ones
    /// only where the sharing rules let the Service hold them. Empty while pending, and
    /// always for NodePort Services. Both families; the datapath serves IPv4 only
    /// for now (IPv6 VIPs are reported, kept in status, and not programmed).
    pub vips: Vec<IpAddr>,
    /// `spec.externalIPs`: addresses the cluster does not allocate (the network
    /// routes them to the nodes), served like a VIP (same ports, traffic policy and
    /// affinity) but not filtered by source ranges. IPv4 only for now.
    pub external_ips: Vec<IpAddr>,
    /// `spec.externalTrafficPolicy`; applies to every frontend (VIP, external IP,
    /// node port), as in kube-proxy.
    pub traffic_policy: TrafficPolicy,
    /// `spec.loadBalancerSourceRanges` (or, when that is empty, the
    /// `service.beta.kubernetes.io/load-balancer-source-ranges` annotation), with
    /// host bits cleared: the client CIDRs allowed to reach the load-balancer
    /// addresses. Empty means everyone. Like kube-proxy, not applied to external IPs
    /// or node ports.
    pub source_ranges: Vec<IpNet>,
    /// `spec.sessionAffinity`: `None` for `None` (the default); for `ClientIP`, the
    /// seconds a client stays on its backend, `sessionAffinityConfig.clientIP
    /// .timeoutSeconds` ([`DEFAULT_AFFINITY_TIMEOUT`] if unset, valid
    /// 1..=[`MAX_AFFINITY_TIMEOUT`]).
    pub affinity_timeout: Option<u32>,
    /// `spec.healthCheckNodePort`: the node port on which every node answers how many
    /// local endpoints it has. Only set for LoadBalancer Services with
    /// `externalTrafficPolicy: Local`, the only ones Kubernetes allows it on.
    pub health_check_node_port: Option<u16>,
    /// `spec.ports` that xlb can serve (TCP and UDP), in manifest order.
    pub ports: Vec<ServicePort>,
    /// `metadata.creationTimestamp` in Unix seconds, when the object has one: the same
    /// on every node, so the oldest claimant of a contested address wins everywhere.
    pub created: Option<i64>,
    /// `metadata.labels`, for L2Announcement `serviceSelectors`.
    pub labels: BTreeMap<String, String>,
    /// The address-sharing key (`xlb.dev/allow-shared-ip`, or MetalLB's two
    /// spellings): LoadBalancer Services with the same key, no common port and
    /// (Local policy) the same `selector` may hold one address (MetalLB, "IP
    /// Address Sharing").
    pub sharing_key: Option<String>,
    /// `spec.selector`: two Local-policy Services share an address only if they
    /// select the same pods, since a node attracts the address for both.
    pub selector: BTreeMap<String, String>,
    /// Set for an `xlb.dev/v1alpha1 StaticService` (a VIP without Kubernetes, e.g. in
    /// front of the kube-apiservers): how its backends are reached and checked. Its
    /// endpoints are the listed backends, with `ready` the health check's verdict
    /// and no `node_name`.
    pub static_service: Option<Static>,
    /// Set for every LoadBalancer Service of the Kubernetes kind: what address
    /// allocation reads to fill `vips` (named addresses it may hold, or allocated
    /// ones).
    pub address_request: Option<AddressRequest>,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// What a StaticService adds to a Service: its backends are arbitrary machines that
/// need not run xlb (nor Kubernetes), so they are reached through the node that
/// receives the traffic, and their health is checked actively, as HAProxy does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Static {
    /// `spec.forwarding`.
    pub forwarding: Forwarding,
    /// `spec.healthCheck`; `None`: every backend is used.
    pub health_check: Option<HealthCheck>,
}

/// How a StaticService reaches a backend that is not on the receiving node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forwarding {
    /// Source NAT through the receiving node (HAProxy in TCP mode does the same): the
    /// backend sees the node's address and replies through it. Works for any backend.
    #[default]
    Snat,
    /// Direct server return through the IPIP tunnel, keeping the client's address,
    /// for backends that are xlb nodes (an address that is some Node's InternalIP);
    /// the others are still reached by source NAT.
    Dsr,
}

/// An active health check of every backend of a StaticService (HAProxy's `check`
/// with `inter`, `timeout check`, `rise` and `fall`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthCheck {
    /// What is tried.
    pub kind: CheckKind,
    /// Port to check on each backend's address; `None`: the backend's own port.
    pub port: Option<u16>,
    /// Time between the starts of two checks of one backend.
    pub interval: std::time::Duration,
    /// How long one check may take.
    pub timeout: std::time::Duration,
    /// Consecutive passes that bring a failed backend back.
    pub rise: u32,
    /// Consecutive failures that take a backend out.
    pub fall: u32,
}

/// One kind of check.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` over HTTP/1.1 answers 2xx or 3xx.
    Http {
        /// Request path, e.g. `/healthz`.
        path: String,
    },
    /// The same over TLS. The certificate is not verified: the check asks whether the
    /// server is up, not who it is (HAProxy's `check-ssl verify none`).
    Https {
        /// Request path, e.g. `/readyz`.
        path: String,
    },
}

impl HealthCheck {
    /// The probe that checks the backend at `backend`.
    pub fn probe(&self, backend: std::net::SocketAddr) -> Probe {
        Probe {
            target: std::net::SocketAddr::new(backend.ip(), self.port.unwrap_or(backend.port())),
            check: self.clone(),
        }
    }
}

/// One health check of one address: what the checker runs, and what its verdicts
/// are keyed by (two StaticServices checking one backend alike share the probe).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    /// Address and port checked.
    pub target: std::net::SocketAddr,
    /// How.
    pub check: HealthCheck,
}

/// `spec.type`, for the types xlb serves (ClusterIP and ExternalName Services are
/// in-cluster business and not part of the model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceType {
    /// Load-balancer addresses plus node ports.
    #[default]
    LoadBalancer,
    /// Node ports only (plus external IPs, which any type may carry).
    NodePort,
}

/// Default of `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest `sessionAffinityConfig.clientIP.timeoutSeconds` Kubernetes accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// `spec.externalTrafficPolicy`: which endpoints traffic arriving at a node may reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the Kubernetes default).
    #[default]
    Cluster,
    /// Only endpoints on the receiving node; the client address is preserved and a
    /// node without one must not attract the traffic.
    Local,
}

/// One `spec.ports[]` entry with the endpoints that serve it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// Position in the manifest's `spec.ports`, for error messages.
    pub index: usize,
    /// Port name; `""` for the single unnamed port Kubernetes allows.
    pub name: String,
    /// The port clients connect to on the VIP and external IPs.
    pub port: u16,
    /// `nodePort`: the port this Service port is also served on at every node's
    /// addresses. Set (allocated) for NodePort Services and for LoadBalancer
    /// Services unless `allocateLoadBalancerNodePorts: false`; a manifest without an
    /// API server carries it only if written in.
    pub node_port: Option<u16>,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Endpoints from every EndpointSlice of the Service whose port matches this one by
    /// name and protocol, in slice order; not yet filtered by readiness.
    pub endpoints: Vec<Endpoint>,
}

/// A transport protocol xlb balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling: `"TCP"` or `"UDP"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One address of an EndpointSlice endpoint, at the slice port matching a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address.
    pub addr: IpAddr,
    /// Target port, from the EndpointSlice's port (not from the Service's `targetPort`).
    pub port: u16,
    /// `conditions.ready` (nil means true, per the EndpointSlice API).
    pub ready: bool,
    /// `conditions.serving` (nil means the same as `ready`).
    pub serving: bool,
    /// `conditions.terminating` (nil means false).
    pub terminating: bool,
    /// `nodeName`: the node hosting the endpoint, if the slice says.
    pub node_name: Option<String>,
}

/// What sort of mistake a [`ConfigError`] is; its label is used in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The directory or a file could not be read.
    Io,
    /// Syntax error, or the object does not deserialise into its Kubernetes type.
    Parse,
    /// A required field (apiVersion, kind, metadata.name, a label) is missing.
    MissingField,
    /// A field holds a value Kubernetes would reject.
    InvalidValue,
    /// An address that is not an IP address.
    InvalidIp,
    /// An IP family xlb does not handle yet (IPv6).
    UnsupportedIpFamily,
    /// A protocol other than TCP or UDP (SCTP).
    UnsupportedProtocol,
    /// An EndpointSlice `addressType` other than IPv4.
    UnsupportedAddressType,
    /// An EndpointSlice port whose name matches no port of its Service.
    UnknownPortName,
    /// The same kind/namespace/name defined twice.
    DuplicateObject,
    /// Two Services claim one address:port/protocol (VIP, external IP or node port),
    /// or one health check node port.
    VipConflict,
    /// A file over the size or document limit (see the manifest source).
    TooLarge,
    /// A LoadBalancer Service that asked for an address got none (unknown pool, no
    /// pool admits it, pools exhausted).
    AddressUnavailable,
    /// An address a Service may not have: a Node's own address, or, where
    /// AddressPools exist, one outside every pool that its status does not already
    /// show.
    AddressRefused,
    /// A BGPPeer's `passwordSecret` names a Secret that is not there (or not readable
    /// by the agent), or whose `password` key is missing or unusable.
    SecretUnavailable,
}

impl ErrorKind {
    /// Short snake_case label, e.g. for `xlb_config_errors_total{kind}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Parse => "parse",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::InvalidIp => "invalid_ip",
            ErrorKind::UnsupportedIpFamily => "unsupported_ip_family",
            ErrorKind::UnsupportedProtocol => "unsupported_protocol",
            ErrorKind::UnsupportedAddressType => "unsupported_address_type",
            ErrorKind::UnknownPortName => "unknown_port_name",
            ErrorKind::DuplicateObject => "duplicate_object",
            ErrorKind::VipConflict => "vip_conflict",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::AddressUnavailable => "address_unavailable",
            ErrorKind::AddressRefused => "address_refused",
            ErrorKind::SecretUnavailable => "secret_unavailable",
        }
    }
}

/// One bad object or field, reported once: file, object, field, message.
///
/// The offending part is skipped (or its last good version kept); everything else keeps
/// working. `object` and `field` are empty when the error concerns a whole file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub struct ConfigError {
    /// File (or other source) the object came from.
    pub origin: String,
    /// The object, e.g. `Service default/web`, or `document 2` when it has no name.
    pub object: String,
    /// Field path inside the object, e.g. `spec.ports[1].protocol`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Category, see [`ConfigError::kind`].
    pub kind: ErrorKind,
}

impl ConfigError {
    /// The metrics label of this error's category ("parse", "invalid_ip", ...).
    pub fn kind(&self) -> &'static str {
        self.kind.as_str()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        for part in [&self.object, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn config_error_names_file_object_and_field() {
        let e = ConfigError {
            origin: "/etc/xlb/web.yaml".into(),
            object: "Service default/web".into(),
            field: "spec.ports[1].protocol".into(),
            message: "SCTP is not supported".into(),
            kind: ErrorKind::UnsupportedProtocol,
        };
        assert_eq!(
            e.to_string(),
            "/etc/xlb/web.yaml: Service default/web: spec.ports[1].protocol: SCTP is not supported"
        );
        assert_eq!(e.kind(), "unsupported_protocol");
    }

    #[test]
    fn file_level_error_omits_empty_parts() {
        let e = ConfigError {
            origin: "bad.yaml".into(),
            object: String::new(),
            field: String::new(),
            message: "cannot read".into(),
            kind: ErrorKind::Io,
        };
        assert_eq!(e.to_string(), "bad.yaml: cannot read");
    }

    #[test]
    fn service_ref_displays_as_namespace_slash_name() {
        assert_eq!(ServiceRef::new("demo", "web").to_string(), "demo/web");
        assert_eq!(Protocol::Udp.as_str(), "UDP");
    }
}
