//! The desired state for this node: for every frontend address:port/protocol (a
//! load-balancer VIP, an external IP, or one of this node's addresses with a node
//! port), the Service that owns it and the backends this node should forward to; plus
//! the health check node ports to answer and the VIPs this node must not attract.
//!
//! [`compute`] is a pure function of the snapshot, the node name and the state applied
//! last; the dataplane turns its result into map contents and writes only the difference.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use crate::model::{
    ConfigError, Endpoint, ErrorKind, Forwarding, Node, Protocol, ServiceRef, ServiceType,
    Snapshot, TrafficPolicy,
};

/// What a packet is matched on: destination address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    /// Frontend address: a VIP, an external IP or one of this node's addresses.
    pub addr: IpAddr,
    /// Service port, or node port for [`Frontend::NodePort`].
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// How a Service is reached at a [`VipKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// A load-balancer address (`status.loadBalancer.ingress[].ip`,
    /// `spec.loadBalancerIP` or MetalLB's annotation) at `spec.ports[].port`: the one
    /// frontend that `loadBalancerSourceRanges` filters and L2/BGP announce.
    LoadBalancer,
    /// A `spec.externalIPs[]` address at `spec.ports[].port`: routed here by someone
    /// else, served with the same traffic policy and affinity, never filtered.
    ExternalIp,
    /// One of this node's InternalIP addresses at `spec.ports[].nodePort`.
    NodePort,
}

impl Frontend {
    /// Human name for messages ("VIP", "external IP", "node port").
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::LoadBalancer => "VIP",
            Frontend::ExternalIp => "external IP",
            Frontend::NodePort => "node port",
        }
    }
}

/// A usable endpoint on another node (or with no `nodeName`), for Cluster policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteBackend {
    /// Pod address and target port.
    pub addr: SocketAddr,
    /// The endpoint's `nodeName`; `""` when the EndpointSlice does not say.
    pub node: String,
    /// First IPv4 InternalIP of that node's `v1 Node` object: where to tunnel to.
    /// `None` when the node is unknown, has no Node object or no IPv4 InternalIP.
    pub node_ip: Option<IpAddr>,
    /// A StaticService backend on a machine that is not an xlb node (or with SNAT
    /// forwarding): reached by source NAT through this node, not by the tunnel.
    pub snat: bool,
}

/// One frontend address:port/protocol as this node should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// The Service that owns the key.
    pub owner: ServiceRef,
    /// Name of the Service port (`""` if unnamed).
    pub port_name: String,
    /// How the Service is reached at this key.
    pub frontend: Frontend,
    /// `externalTrafficPolicy: Local` (for every frontend, as in kube-proxy): only
    /// local endpoints, and a node without one must not attract the traffic.
    pub local: bool,
    /// This node's usable endpoints, sorted and deduplicated.
    pub backends: Vec<SocketAddr>,
    /// A StaticService with a backend on this node (at one of its InternalIPs): the
    /// node attracts the VIP only while that backend is healthy (an API server VIP
    /// leaves a node whose own API server is down), whatever the other backends do.
    pub own_backend: bool,
    /// Usable endpoints on other nodes or with no `nodeName` (Cluster policy only;
    /// always empty for Local), sorted by address and deduplicated.
    pub remote_backends: Vec<RemoteBackend>,
    /// Client CIDRs allowed in (`spec.loadBalancerSourceRanges`); empty allows every
    /// client. Only [`Frontend::LoadBalancer`] keys carry them, like kube-proxy.
    pub source_ranges: Vec<IpNet>,
    /// `sessionAffinity: ClientIP`: how long (seconds) a client stays on its backend.
    pub affinity_timeout: Option<u32>,
}

/// A `spec.healthCheckNodePort` this node answers (kube-proxy's service health
/// server): HTTP 200 when `local_endpoints > 0`, else 503, so an external load
/// balancer sends a Local Service's traffic only to nodes that can serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// TCP port on this node's addresses.
    pub port: u16,
    /// The LoadBalancer Service with `externalTrafficPolicy: Local` it reports on.
    pub service: ServiceRef,
    /// Distinct endpoint addresses on this node with `ready` true, over all the
    /// Service's ports. Terminating endpoints do not count, so that load balancers
    /// drain a node whose pods are going away (KEP-1669).
    pub local_endpoints: usize,
}

/// The whole desired state, plus the errors found while computing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// Every address:port/protocol this node should serve.
    pub services: BTreeMap<VipKey, DesiredService>,
    /// Health check node ports to answer, by port.
    pub health_checks: Vec<HealthCheck>,
    /// VIPs and external IPs this node must not attract traffic for: every key served
    /// on the address is `externalTrafficPolicy: Local` with no usable endpoint on this
    /// node (this node drops such traffic anyway). A model fact for L2 (no ARP answer)
    /// and BGP (no route); this node's own addresses are never in it.
    pub unwilling: BTreeSet<IpAddr>,
    /// Errors found by [`compute`] (address and health check port conflicts); the
    /// source's errors are separate.
    pub errors: Vec<ConfigError>,
    /// Who claims what, so that [`update`] can recompute a few Services alone.
    pub claims: Claims,
}

/// Every Service's claims, winning or not: the keys each Service claims, the Services
/// claiming each key (in [`ServiceRef`] order), and the conflicts found per key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claims {
    by_service: BTreeMap<ServiceRef, Vec<VipKey>>,
    by_key: BTreeMap<VipKey, Vec<ServiceRef>>,
    conflicts: BTreeMap<VipKey, Vec<ConfigError>>,
    health_errors: Vec<ConfigError>,
    /// The Services with a health check node port.
    with_health_check: BTreeSet<ServiceRef>,
}

/// One Service's claim on a key, with the field to blame if it loses.
struct Claim {
    service: DesiredService,
    field: String,
}

/// Computes the desired state of `node_name` from `snapshot`.
///
/// Frontends per Service port: each VIP and each external IP at `port`, and each IPv4
/// InternalIP of this node's `v1 Node` at `nodePort` (LoadBalancer Services have node
/// ports too, as in Kubernetes). Without a Node object for `node_name` there are no
/// node-port keys (noted at debug level: not an error, the node may not be described).
///
/// `previous` is the last desired state that was applied. When two Services claim one
/// address:port/protocol, the winner is, in order: the one with the older
/// `metadata.creationTimestamp` (when both have one: every node sees the same), then
/// the incumbent (the owner in `previous`, else in `restored`, what the pinned maps
/// served before a restart), then the smallest [`ServiceRef`]. So a newly added
/// conflicting Service never takes traffic away from a working one, and a restart
/// never changes the owner. A contested health check node port goes to the incumbent
/// of `previous`, else the smallest ref. The loser gets a `vip_conflict` error and
/// that key is skipped for it.
pub fn compute(snapshot: &Snapshot, node_name: &str, previous: Option<&Desired>) -> Desired {
    compute_with(snapshot, node_name, previous, &BTreeMap::new())
}

/// Owners of keys as the pinned maps record them (see [`compute`]).
pub type Restored = BTreeMap<VipKey, (ServiceRef, String)>;

/// [`compute`] with the owners a previous agent left in the maps.
pub fn compute_with(
    snapshot: &Snapshot,
    node_name: &str,
    previous: Option<&Desired>,
    restored: &Restored,
) -> Desired {
    let node_ips = node_ips(snapshot, node_name);
    let reserved = snapshot.node_addresses();
    let has_node_ports = snapshot
        .services
        .values()
        .any(|s| s.ports.iter().any(|p| p.node_port.is_some()));
    if node_ips.is_empty() && has_node_ports {
        tracing::debug!(
            node = node_name,
            "no v1 Node object with an IPv4 InternalIP for this node: node ports not served"
        );
    }

    // Claims per key, in ServiceRef order (the snapshot's order).
    let mut out = Desired::default();
    let mut claims: BTreeMap<VipKey, Vec<Claim>> = BTreeMap::new();
    for (sref, svc) in &snapshot.services {
        let mine = service_claims(sref, svc, node_name, &node_ips, &reserved, snapshot);
        let mut keys: Vec<VipKey> = mine.iter().map(|(k, _)| *k).collect();
        keys.dedup();
        for (key, claim) in mine {
            let list = claims.entry(key).or_default();
            list.push(claim);
        }
        out.claims.by_service.insert(sref.clone(), keys);
        if svc.health_check_node_port.is_some() {
            out.claims.with_health_check.insert(sref.clone());
        }
    }
    for (key, claimants) in claims {
        let mut refs: Vec<ServiceRef> = claimants.iter().map(|c| c.service.owner.clone()).collect();
        refs.dedup();
        out.claims.by_key.insert(key, refs);
        let incumbent: Option<(&ServiceRef, &str)> = match previous {
            Some(p) => p
                .services
                .get(&key)
                .map(|d| (&d.owner, d.port_name.as_str())),
            None => restored.get(&key).map(|(o, p)| (o, p.as_str())),
        };
        let (winner, errors) = resolve(snapshot, key, claimants, incumbent);
        if !errors.is_empty() {
            out.claims.conflicts.insert(key, errors);
        }
        out.services.insert(key, winner);
    }
    let previous_checks = previous.map_or(&[][..], |p| p.health_checks.as_slice());
    finish(
        &mut out,
        snapshot,
        node_name,
        &node_ips,
        previous_checks,
        None,
    );
    out
}

/// Brings `desired`, computed from an earlier snapshot, up to date with `snapshot`, in
/// which only the `changed` Services differ (no Node changed): recomputes the claims
/// of those Services and who wins each key they claimed or claim now, and returns the
/// keys whose entry changed. The result equals [`compute`] of `snapshot` with
/// `desired` as the previous state.
pub fn update(
    desired: &mut Desired,
    snapshot: &Snapshot,
    node_name: &str,
    changed: &BTreeSet<ServiceRef>,
) -> BTreeSet<VipKey> {
    let node_ips = node_ips(snapshot, node_name);
    let reserved = snapshot.node_addresses();
    let claims = &mut desired.claims;
    let mut affected: BTreeSet<VipKey> = BTreeSet::new();
    let mut fresh: BTreeMap<&ServiceRef, Vec<(VipKey, Claim)>> = BTreeMap::new();
    for sref in changed {
        for key in claims.by_service.remove(sref).unwrap_or_default() {
            if let Some(refs) = claims.by_key.get_mut(&key) {
                refs.retain(|r| r != sref);
                if refs.is_empty() {
                    claims.by_key.remove(&key);
                }
            }
            affected.insert(key);
        }
        claims.with_health_check.remove(sref);
        let Some(svc) = snapshot.services.get(sref) else {
            continue;
        };
        if svc.health_check_node_port.is_some() {
            claims.with_health_check.insert(sref.clone());
        }
        let mine = service_claims(sref, svc, node_name, &node_ips, &reserved, snapshot);
        let mut keys: Vec<VipKey> = mine.iter().map(|(k, _)| *k).collect();
        keys.dedup();
        for key in &keys {
            let refs = claims.by_key.entry(*key).or_default();
            if let Err(at) = refs.binary_search(sref) {
                refs.insert(at, sref.clone());
            }
            affected.insert(*key);
        }
        claims.by_service.insert(sref.clone(), keys);
        fresh.insert(sref, mine);
    }
    let mut changed_keys = BTreeSet::new();
    for key in affected {
        let refs = claims.by_key.get(&key).cloned().unwrap_or_default();
        let mut claimants = Vec::new();
        for r in &refs {
            match fresh.get_mut(r) {
                Some(mine) => {
                    claimants.extend(mine.iter_mut().filter(|(k, _)| *k == key).map(|(_, c)| {
                        Claim {
                            service: c.service.clone(),
                            field: std::mem::take(&mut c.field),
                        }
                    }))
                }
                None => {
                    if let Some(svc) = snapshot.services.get(r) {
                        claimants.extend(
                            service_claims(r, svc, node_name, &node_ips, &reserved, snapshot)
                                .into_iter()
                                .filter(|(k, _)| *k == key)
                                .map(|(_, c)| c),
                        );
                    }
                }
            }
        }
        if claimants.is_empty() {
            claims.conflicts.remove(&key);
            if desired.services.remove(&key).is_some() {
                changed_keys.insert(key);
            }
            continue;
        }
        let incumbent = desired
            .services
            .get(&key)
            .map(|d| (&d.owner, d.port_name.as_str()));
        let (winner, errors) = resolve(snapshot, key, claimants, incumbent);
        if errors.is_empty() {
            claims.conflicts.remove(&key);
        } else {
            claims.conflicts.insert(key, errors);
        }
        if desired.services.get(&key) != Some(&winner) {
            desired.services.insert(key, winner);
            changed_keys.insert(key);
        }
    }
    let previous_checks = desired.health_checks.clone();
    let addrs: BTreeSet<IpAddr> = changed_keys.iter().map(|k| k.addr).collect();
    finish(
        desired,
        snapshot,
        node_name,
        &node_ips,
        &previous_checks,
        Some(&addrs),
    );
    changed_keys
}

/// This node's IPv4 InternalIPs, where its node ports are served.
fn node_ips(snapshot: &Snapshot, node_name: &str) -> Vec<IpAddr> {
    snapshot
        .nodes
        .get(node_name)
        .map(|n| {
            n.internal_ips
                .iter()
                .copied()
                .filter(IpAddr::is_ipv4)
                .collect()
        })
        .unwrap_or_default()
}

/// Every key one Service claims, in port then frontend order, with its claim.
fn service_claims(
    sref: &ServiceRef,
    svc: &crate::model::Service,
    node_name: &str,
    node_ips: &[IpAddr],
    node_addresses: &BTreeMap<IpAddr, &str>,
    snapshot: &Snapshot,
) -> Vec<(VipKey, Claim)> {
    let mut out: Vec<(VipKey, Claim)> = Vec::new();
    let local = svc.traffic_policy == TrafficPolicy::Local;
    for port in &svc.ports {
        let ((backends, remote_backends), own_backend) = match &svc.static_service {
            Some(s) => (
                split_static(&port.endpoints, s.forwarding, node_ips, &snapshot.nodes),
                port.endpoints.iter().any(|e| node_ips.contains(&e.addr)),
            ),
            None => (
                split(&port.endpoints, node_name, local, &snapshot.nodes),
                false,
            ),
        };
        let mut frontends: Vec<(IpAddr, u16, Frontend, String)> = Vec::new();
        let port_field = format!("spec.ports[{}].port", port.index);
        // The datapath is IPv4-only for now: IPv6 addresses stay in the model (held,
        // in status, reported by the source) and are not programmed.
        for &addr in svc.vips.iter().filter(|a| a.is_ipv4()) {
            frontends.push((addr, port.port, Frontend::LoadBalancer, port_field.clone()));
        }
        // An external IP that is a Node's own address is never served (reported by
        // `ipam::allocate`, which refuses such VIPs the same way).
        for &addr in svc
            .external_ips
            .iter()
            .filter(|a| a.is_ipv4() && !node_addresses.contains_key(*a))
        {
            let field = "spec.externalIPs".to_string();
            frontends.push((addr, port.port, Frontend::ExternalIp, field));
        }
        if let Some(node_port) = port.node_port {
            let field = format!("spec.ports[{}].nodePort", port.index);
            for &addr in node_ips {
                frontends.push((addr, node_port, Frontend::NodePort, field.clone()));
            }
        }
        for (addr, number, frontend, field) in frontends {
            let key = VipKey {
                addr,
                port: number,
                protocol: port.protocol,
            };
            // The same port reached twice (a VIP also listed in externalIPs): the
            // first frontend, the load balancer with its source ranges, keeps it.
            if out
                .iter()
                .any(|(k, c)| *k == key && c.service.port_name == port.name)
            {
                continue;
            }
            let source_ranges = if frontend == Frontend::LoadBalancer {
                svc.source_ranges.clone()
            } else {
                Vec::new()
            };
            out.push((
                key,
                Claim {
                    service: DesiredService {
                        owner: sref.clone(),
                        port_name: port.name.clone(),
                        frontend,
                        local,
                        backends: backends.clone(),
                        own_backend,
                        remote_backends: remote_backends.clone(),
                        source_ranges,
                        affinity_timeout: svc.affinity_timeout,
                    },
                    field,
                },
            ));
        }
    }
    // Grouped by key (stable: a key's claims stay in port order).
    out.sort_by_key(|(k, _)| *k);
    out
}

/// Picks the winner among a key's claimants (in [`ServiceRef`] order; see [`compute`]
/// for the rule) and reports the others.
fn resolve(
    snapshot: &Snapshot,
    key: VipKey,
    mut claimants: Vec<Claim>,
    incumbent: Option<(&ServiceRef, &str)>,
) -> (DesiredService, Vec<ConfigError>) {
    let rank = |i: usize, c: &Claim| {
        let created = snapshot
            .services
            .get(&c.service.owner)
            .and_then(|s| s.created)
            .unwrap_or(i64::MAX);
        let is_incumbent = incumbent == Some((&c.service.owner, c.service.port_name.as_str()));
        // Claims are in ServiceRef order, so the index breaks the last tie by name.
        (created, !is_incumbent, i)
    };
    let best = claimants
        .iter()
        .enumerate()
        .min_by_key(|(i, c)| rank(*i, c))
        .map_or(0, |(i, _)| i);
    let winner = claimants.remove(best).service;
    let mut errors = Vec::new();
    for loser in claimants {
        let loser_svc = &loser.service;
        errors.push(ConfigError {
            origin: origin(snapshot, &loser_svc.owner),
            object: format!("Service {}", loser_svc.owner),
            field: loser.field,
            message: format!(
                "{} {}:{}/{} (port {:?}) is already claimed by Service {} (port {:?}); skipped",
                loser_svc.frontend.as_str(),
                fmt_ip(key.addr),
                key.port,
                key.protocol,
                loser_svc.port_name,
                winner.owner,
                winner.port_name,
            ),
            kind: ErrorKind::VipConflict,
        });
    }
    (winner, errors)
}

/// What follows from the keys: health checks, the error list, unwilling addresses
/// (all of them, or only those of `addrs` when only keys on those changed).
fn finish(
    out: &mut Desired,
    snapshot: &Snapshot,
    node_name: &str,
    node_ips: &[IpAddr],
    previous_checks: &[HealthCheck],
    addrs: Option<&BTreeSet<IpAddr>>,
) {
    let mut health_errors = Vec::new();
    out.health_checks = health_checks(
        snapshot,
        &out.claims.with_health_check,
        node_name,
        previous_checks,
        &mut health_errors,
    );
    out.claims.health_errors = health_errors;
    out.errors = out
        .claims
        .conflicts
        .values()
        .flatten()
        .chain(&out.claims.health_errors)
        .cloned()
        .collect();

    if let Some(addrs) = addrs {
        for addr in addrs {
            let (lo, hi) = (
                VipKey {
                    addr: *addr,
                    port: 0,
                    protocol: Protocol::Tcp,
                },
                VipKey {
                    addr: *addr,
                    port: u16::MAX,
                    protocol: Protocol::Udp,
                },
            );
            let mut willing = None;
            for (_, ds) in out.services.range(lo..=hi) {
                if ds.frontend == Frontend::NodePort || node_ips.contains(addr) {
                    continue;
                }
                *willing.get_or_insert(false) |= willing_for(ds);
            }
            if willing == Some(false) {
                out.unwilling.insert(*addr);
            } else {
                out.unwilling.remove(addr);
            }
        }
        return;
    }
    // An address is willing as soon as one key on it can be served here.
    let mut willing: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for (key, ds) in &out.services {
        if ds.frontend == Frontend::NodePort || node_ips.contains(&key.addr) {
            continue;
        }
        *willing.entry(key.addr).or_default() |= willing_for(ds);
    }
    out.unwilling = willing
        .into_iter()
        .filter(|(_, w)| !w)
        .map(|(addr, _)| addr)
        .collect();
}

/// Whether this node can serve `ds` (one willing key makes its address willing):
/// always with Cluster policy, unless it needs a local backend (Local policy, or a
/// StaticService with a backend here) and has no usable one.
fn willing_for(ds: &DesiredService) -> bool {
    !(ds.local || ds.own_backend) || !ds.backends.is_empty()
}

/// The health check node ports of LoadBalancer Services with Local policy, by port;
/// a port claimed twice goes to the incumbent, else to the smallest [`ServiceRef`].
fn health_checks(
    snapshot: &Snapshot,
    with_health_check: &BTreeSet<ServiceRef>,
    node_name: &str,
    previous: &[HealthCheck],
    errors: &mut Vec<ConfigError>,
) -> Vec<HealthCheck> {
    let mut by_port: BTreeMap<u16, Vec<HealthCheck>> = BTreeMap::new();
    let services = with_health_check
        .iter()
        .filter_map(|r| Some((r, snapshot.services.get(r)?)));
    for (sref, svc) in services {
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        // The source only sets the port for these; re-checked so the rule lives here.
        if svc.service_type != ServiceType::LoadBalancer
            || svc.traffic_policy != TrafficPolicy::Local
        {
            continue;
        }
        let local: BTreeSet<IpAddr> = svc
            .ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter(|e| e.ready && e.node_name.as_deref() == Some(node_name))
            .map(|e| e.addr)
            .collect();
        by_port.entry(port).or_default().push(HealthCheck {
            port,
            service: sref.clone(),
            local_endpoints: local.len(),
        });
    }
    let mut out = Vec::new();
    for (port, mut claimants) in by_port {
        let incumbent = previous
            .iter()
            .find(|h| h.port == port)
            .and_then(|p| claimants.iter().position(|c| c.service == p.service));
        let winner = claimants.remove(incumbent.unwrap_or(0));
        for loser in claimants {
            errors.push(ConfigError {
                origin: origin(snapshot, &loser.service),
                object: format!("Service {}", loser.service),
                field: "spec.healthCheckNodePort".into(),
                message: format!(
                    "health check node port {port} is already used by Service {}; skipped",
                    winner.service
                ),
                kind: ErrorKind::VipConflict,
            });
        }
        out.push(winner);
    }
    out
}

fn origin(snapshot: &Snapshot, sref: &ServiceRef) -> String {
    snapshot
        .services
        .get(sref)
        .map(|s| s.origin.clone())
        .unwrap_or_default()
}

/// `[v6]` so that `addr:port` stays unambiguous.
fn fmt_ip(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// Splits a port's endpoints into (local, remote) usable backends, as kube-proxy does
/// (pkg/proxy/topology.go, `CategorizeEndpoints`): ready endpoints; if there are none,
/// serving and terminating ones (so connections drain during a rollout); never one
/// that is not serving. For Local policy the fallback is decided among this node's
/// endpoints alone, since only those can be used. Remote backends carry their node
/// and its address from `nodes`.
fn split(
    endpoints: &[Endpoint],
    node_name: &str,
    local: bool,
    nodes: &BTreeMap<String, Node>,
) -> (Vec<SocketAddr>, Vec<RemoteBackend>) {
    let is_local = |e: &Endpoint| e.node_name.as_deref() == Some(node_name);
    let candidates: Vec<&Endpoint> = endpoints.iter().filter(|e| !local || is_local(e)).collect();
    let ready: Vec<&Endpoint> = candidates
        .iter()
        .copied()
        .filter(|e| e.ready && e.serving)
        .collect();
    let usable = if ready.is_empty() {
        candidates
            .into_iter()
            .filter(|e| e.serving && e.terminating)
            .collect()
    } else {
        ready
    };
    let (mut here, mut there) = (Vec::new(), Vec::new());
    for e in usable {
        let addr = SocketAddr::new(e.addr, e.port);
        if is_local(e) {
            here.push(addr);
        } else {
            let node = e.node_name.clone().unwrap_or_default();
            let node_ip = nodes.get(&node).and_then(Node::ipv4);
            there.push(RemoteBackend {
                addr,
                node,
                node_ip,
                snat: false,
            });
        }
    }
    here.sort();
    here.dedup();
    there.sort();
    there.dedup_by(|a, b| a.addr == b.addr);
    (here, there)
}

/// [`split`] for a StaticService: its healthy backends (ready; there is no
/// terminating state to drain through) at this node's `node_ips` are local, those at
/// another node's InternalIP go through the tunnel with [`Forwarding::Dsr`], and the
/// rest are reached by source NAT.
fn split_static(
    endpoints: &[Endpoint],
    forwarding: Forwarding,
    node_ips: &[IpAddr],
    nodes: &BTreeMap<String, Node>,
) -> (Vec<SocketAddr>, Vec<RemoteBackend>) {
    let (mut here, mut there) = (Vec::new(), Vec::new());
    for e in endpoints.iter().filter(|e| e.ready && e.serving) {
        let addr = SocketAddr::new(e.addr, e.port);
        if node_ips.contains(&e.addr) {
            here.push(addr);
            continue;
        }
        let node = (forwarding == Forwarding::Dsr)
            .then(|| nodes.values().find(|n| n.internal_ips.contains(&e.addr)))
            .flatten();
        there.push(match node {
            Some(n) => RemoteBackend {
                addr,
                node: n.name.clone(),
                node_ip: n.ipv4(),
                snat: false,
            },
            None => RemoteBackend {
                addr,
                node: String::new(),
                node_ip: None,
                snat: true,
            },
        });
    }
    here.sort();
    here.dedup();
    there.sort();
    there.dedup_by(|a, b| a.addr == b.addr);
    (here, there)
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Service, ServicePort};

    fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port: 8080,
            ready,
            serving,
            terminating,
            node_name: (!node.is_empty()).then(|| node.to_string()),
        }
    }

    fn svc(vip: &str, policy: TrafficPolicy, endpoints: Vec<Endpoint>) -> Service {
        Service {
            service_type: ServiceType::LoadBalancer,
            vips: vec![vip.parse().unwrap()],
            external_ips: vec![],
            traffic_policy: policy,
            source_ranges: vec![],
            affinity_timeout: None,
            health_check_node_port: None,
            static_service: None,
            address_request: None,
            created: None,
            labels: BTreeMap::new(),
            sharing_key: None,
            selector: BTreeMap::new(),
            ports: vec![ServicePort {
                index: 0,
                name: "http".into(),
                port: 80,
                node_port: None,
                protocol: Protocol::Tcp,
                endpoints,
            }],
            origin: "test.yaml".into(),
        }
    }

    fn snapshot(services: Vec<(&str, Service)>) -> Snapshot {
        Snapshot {
            services: services
                .into_iter()
                .map(|(name, s)| (ServiceRef::new("default", name), s))
                .collect(),
            nodes: BTreeMap::new(),
            l2_announcements: BTreeMap::new(),
            address_pools: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            bgp: Default::default(),
        }
    }

    /// Nodes a, b, c at 10.0.0.11-13 and a StaticService on 10.0.0.100:6443 with a
    /// backend on node-a (failing its check), one on node-b and one on a machine
    /// outside the cluster.
    pub(crate) fn static_lab(forwarding: Forwarding) -> Snapshot {
        let mut snap = Snapshot::default();
        for (name, ip) in [
            ("node-a", "10.0.0.11"),
            ("node-b", "10.0.0.12"),
            ("node-c", "10.0.0.13"),
        ] {
            let node = Node {
                name: name.into(),
                internal_ips: vec![ip.parse().unwrap()],
                external_ips: vec![],
                labels: Default::default(),
                origin: String::new(),
            };
            snap.nodes.insert(name.into(), node);
        }
        let mut api = svc("10.0.0.100", TrafficPolicy::Cluster, vec![]);
        api.ports[0].port = 6443;
        api.ports[0].endpoints = [
            ("10.0.0.11", false),
            ("10.0.0.12", true),
            ("10.0.0.50", true),
        ]
        .into_iter()
        .map(|(addr, ready)| Endpoint {
            port: 6443,
            serving: ready,
            ..ep(addr, "", ready, ready, false)
        })
        .collect();
        api.static_service = Some(crate::model::Static {
            forwarding,
            health_check: None,
        });
        snap.services
            .insert(ServiceRef::new("kube-system", "apiserver"), api);
        snap
    }

    #[test]
    fn static_backends_are_local_tunnelled_or_source_natted_and_the_own_one_decides() {
        let at = |a: &str| -> SocketAddr { format!("{a}:6443").parse().unwrap() };
        let snat = |a: &str| RemoteBackend {
            addr: at(a),
            node: String::new(),
            node_ip: None,
            snat: true,
        };
        let vip: IpAddr = "10.0.0.100".parse().unwrap();
        let k = VipKey {
            addr: vip,
            port: 6443,
            protocol: Protocol::Tcp,
        };
        let snap = static_lab(Forwarding::Snat);
        let of = |node: &str| compute(&snap, node, None);
        // node-a: its own backend fails, so it serves through the others but does
        // not attract the VIP.
        let a = of("node-a");
        let s = &a.services[&k];
        assert!(s.own_backend && s.backends.is_empty() && !s.local);
        assert_eq!(s.remote_backends, [snat("10.0.0.12"), snat("10.0.0.50")]);
        assert!(a.unwilling.contains(&vip));
        // node-b: its own backend is local (plain DNAT), the outside one by SNAT.
        let b = of("node-b");
        assert_eq!(b.services[&k].backends, [at("10.0.0.12")]);
        assert_eq!(b.services[&k].remote_backends, [snat("10.0.0.50")]);
        assert!(!b.unwilling.contains(&vip));
        // node-c has no backend of its own: willing.
        let c = of("node-c");
        assert!(!c.services[&k].own_backend && !c.unwilling.contains(&vip));
        assert_eq!(
            c.services[&k].remote_backends,
            [snat("10.0.0.12"), snat("10.0.0.50")]
        );
        // DSR: node-b's backend through the tunnel; the outside machine still by SNAT.
        let dsr = static_lab(Forwarding::Dsr);
        let c = compute(&dsr, "node-c", None);
        let tunnel = RemoteBackend {
            addr: at("10.0.0.12"),
            node: "node-b".into(),
            node_ip: Some("10.0.0.12".parse().unwrap()),
            snat: false,
        };
        assert_eq!(c.services[&k].remote_backends, [tunnel, snat("10.0.0.50")]);
    }

    fn key(vip: &str) -> VipKey {
        VipKey {
            addr: vip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn addrs(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn local_policy_keeps_only_this_nodes_ready_endpoints() {
        let eps = vec![
            ep("10.0.1.12", "node-a", true, true, false),
            ep("10.0.1.11", "node-a", true, true, false),
            ep("10.0.1.13", "node-a", false, false, false),
            ep("10.0.2.11", "node-b", true, true, false),
        ];
        let snap = snapshot(vec![("web", svc("10.0.100.1", TrafficPolicy::Local, eps))]);
        let d = compute(&snap, "node-a", None);
        let s = &d.services[&key("10.0.100.1")];
        assert!(s.local);
        assert_eq!(s.port_name, "http");
        assert_eq!(s.backends, addrs(&["10.0.1.11:8080", "10.0.1.12:8080"]));
        assert!(s.remote_backends.is_empty());
        assert!(d.errors.is_empty());
    }

    #[test]
    fn cluster_policy_splits_local_and_remote_endpoints() {
        let eps = vec![
            ep("10.0.1.11", "node-a", true, true, false),
            ep("10.0.2.11", "node-b", true, true, false),
            ep("10.0.3.11", "", true, true, false),
            ep("10.0.2.12", "node-b", false, true, true),
        ];
        let snap = snapshot(vec![(
            "web",
            svc("10.0.100.1", TrafficPolicy::Cluster, eps),
        )]);
        let s = &compute(&snap, "node-a", None).services[&key("10.0.100.1")];
        assert!(!s.local);
        assert_eq!(s.backends, addrs(&["10.0.1.11:8080"]));
        let remote: Vec<_> = s.remote_backends.iter().map(|r| r.addr).collect();
        assert_eq!(remote, addrs(&["10.0.2.11:8080", "10.0.3.11:8080"]));
        assert_eq!(s.remote_backends[0].node, "node-b");
        assert_eq!(s.remote_backends[1].node, "", "no nodeName");
        assert!(s.remote_backends.iter().all(|r| r.node_ip.is_none()));
    }

    #[test]
    fn terminating_serving_endpoints_used_only_when_none_ready() {
        let eps = vec![
            ep("10.0.1.11", "node-a", false, true, true),
            ep("10.0.1.12", "node-a", false, false, true),
            ep("10.0.1.13", "node-a", false, false, false),
        ];
        let snap = snapshot(vec![(
            "web",
            svc("10.0.100.1", TrafficPolicy::Local, eps.clone()),
        )]);
        let s = &compute(&snap, "node-a", None).services[&key("10.0.100.1")];
        assert_eq!(s.backends, addrs(&["10.0.1.11:8080"]));

        let mut with_ready = eps;
        with_ready.push(ep("10.0.1.14", "node-a", true, true, false));
        let snap = snapshot(vec![(
            "web",
            svc("10.0.100.1", TrafficPolicy::Local, with_ready),
        )]);
        let s = &compute(&snap, "node-a", None).services[&key("10.0.100.1")];
        assert_eq!(s.backends, addrs(&["10.0.1.14:8080"]));
    }

    #[test]
    fn local_service_without_local_endpoints_is_kept_with_no_backends() {
        let eps = vec![ep("10.0.2.11", "node-b", true, true, false)];
        let snap = snapshot(vec![("web", svc("10.0.100.1", TrafficPolicy::Local, eps))]);
        let s = &compute(&snap, "node-a", None).services[&key("10.0.100.1")];
        assert!(s.backends.is_empty() && s.remote_backends.is_empty());
    }

    #[test]
    fn duplicate_endpoints_across_slices_are_merged() {
        let eps = vec![
            ep("10.0.1.11", "node-a", true, true, false),
            ep("10.0.1.11", "node-a", true, true, false),
        ];
        let snap = snapshot(vec![("web", svc("10.0.100.1", TrafficPolicy::Local, eps))]);
        let s = &compute(&snap, "node-a", None).services[&key("10.0.100.1")];
        assert_eq!(s.backends, addrs(&["10.0.1.11:8080"]));
    }

    #[test]
    fn vip_conflict_goes_to_smallest_ref_then_to_the_incumbent() {
        let a = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let b = svc("10.0.100.1", TrafficPolicy::Local, vec![]);

        // No incumbent: the smallest ServiceRef wins, the other one is reported.
        let snap = snapshot(vec![("beta", b.clone()), ("alpha", a.clone())]);
        let d = compute(&snap, "node-a", None);
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "alpha");
        assert_eq!(d.errors.len(), 1);
        let e = &d.errors[0];
        assert_eq!(e.kind(), "vip_conflict");
        assert_eq!(e.object, "Service default/beta");
        assert!(e.message.contains("10.0.100.1:80/TCP"), "{e}");
        assert!(e.message.contains("default/alpha"), "{e}");

        // beta served the VIP before alpha appeared: beta keeps it.
        let only_b = compute(&snapshot(vec![("beta", b.clone())]), "node-a", None);
        let d = compute(&snap, "node-a", Some(&only_b));
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "beta");
        assert_eq!(d.errors.len(), 1);
        assert_eq!(d.errors[0].object, "Service default/alpha");
        assert!(d.errors[0].message.contains("default/beta"));
    }

    #[test]
    fn a_restart_keeps_the_owner_the_maps_recorded() {
        // rel/good served the VIP; aaa/dup, smaller by name, claims it too. A restarted
        // agent has no `previous`, only what the pinned maps recorded.
        let good = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let dup = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let snap = snapshot(vec![("good", good), ("aaa-dup", dup)]);
        let restored = Restored::from([(
            key("10.0.100.1"),
            (ServiceRef::new("default", "good"), "http".to_string()),
        )]);
        let d = compute_with(&snap, "node-a", None, &restored);
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "good");
        assert_eq!(d.errors[0].object, "Service default/aaa-dup");
        // Without the record, the name decides (and would hand the VIP over).
        let d = compute(&snap, "node-a", None);
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "aaa-dup");
    }

    #[test]
    fn the_older_creation_timestamp_wins_over_incumbent_and_name() {
        let mut old = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        old.created = Some(1_700_000_000);
        let mut new = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        new.created = Some(1_700_000_100);
        let snap = snapshot(vec![("zz-old", old), ("aa-new", new.clone())]);
        // Even where the newer one is the recorded owner: every node sees the same
        // timestamps, not every node has the same record.
        let restored = Restored::from([(
            key("10.0.100.1"),
            (ServiceRef::new("default", "aa-new"), "http".to_string()),
        )]);
        let d = compute_with(&snap, "node-a", None, &restored);
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "zz-old");
        // A timestamp beats none.
        let mut untimed = new;
        untimed.created = None;
        let mut timed = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        timed.created = Some(1_800_000_000);
        let snap = snapshot(vec![("zz-timed", timed), ("aa-untimed", untimed)]);
        let d = compute(&snap, "node-a", None);
        assert_eq!(d.services[&key("10.0.100.1")].owner.name, "zz-timed");
    }

    #[test]
    fn conflict_on_one_port_leaves_the_other_ports_alone() {
        let a = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let mut b = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        b.ports.push(ServicePort {
            index: 1,
            name: "dns".into(),
            port: 53,
            node_port: None,
            protocol: Protocol::Udp,
            endpoints: vec![],
        });
        let d = compute(&snapshot(vec![("a", a), ("b", b)]), "node-a", None);
        assert_eq!(d.services.len(), 2);
        let dns = VipKey {
            addr: "10.0.100.1".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(d.services[&dns].owner.name, "b");
        assert_eq!(d.errors.len(), 1);
    }

    #[test]
    fn updating_a_few_services_equals_computing_everything_again() {
        // Random Services on three VIPs (so they conflict), with external IPs, node
        // ports, both policies, creation times and endpoints on two nodes; a few
        // change, appear or go each round. `update` must give what `compute` gives
        // with the state before as `previous`, and name exactly the keys that changed.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let random_service = |next: &mut dyn FnMut(u64) -> u64| {
            let policy = if next(2) == 0 {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            };
            let endpoints = (0..next(4))
                .map(|i| {
                    let node = ["node-a", "node-b", ""][next(3) as usize];
                    ep(
                        &format!("10.1.0.{}", i + next(3)),
                        node,
                        next(4) != 0,
                        true,
                        next(5) == 0,
                    )
                })
                .collect();
            let mut s = svc(&format!("10.0.0.{}", next(3) + 1), policy, endpoints);
            s.ports[0].port = [80, 443][next(2) as usize];
            if next(3) == 0 {
                s.external_ips = vec![format!("10.0.0.{}", next(3) + 1).parse().unwrap()];
            }
            if next(3) == 0 {
                s.ports[0].node_port = Some(30000 + next(2) as u16);
            }
            if policy == TrafficPolicy::Local && next(2) == 0 {
                s.health_check_node_port = Some(32000 + next(2) as u16);
            }
            s.created = (next(3) == 0).then(|| next(3) as i64);
            s
        };
        let mut snap = Snapshot::default();
        for name in ["node-a", "node-b"] {
            snap.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    internal_ips: vec![format!("10.9.0.{}", name.len()).parse().unwrap()],
                    external_ips: vec![],
                    labels: Default::default(),
                    origin: String::new(),
                },
            );
        }
        let mut desired = compute(&snap, "node-a", None);
        let (mut conflicts, mut unwilling) = (0, 0);
        for round in 0..400 {
            let before = desired.clone();
            let mut changed = BTreeSet::new();
            for _ in 0..next(3) + 1 {
                let sref = ServiceRef::new("default", format!("s{}", next(6)));
                if next(4) == 0 {
                    snap.services.remove(&sref);
                } else {
                    snap.services
                        .insert(sref.clone(), random_service(&mut next));
                }
                changed.insert(sref);
            }
            let keys = update(&mut desired, &snap, "node-a", &changed);
            let full = compute(&snap, "node-a", Some(&before));
            assert_eq!(desired, full, "round {round}");
            let differ: BTreeSet<VipKey> = before
                .services
                .keys()
                .chain(full.services.keys())
                .filter(|k| before.services.get(k) != full.services.get(k))
                .copied()
                .collect();
            assert_eq!(keys, differ, "round {round}");
            conflicts += usize::from(!full.errors.is_empty());
            unwilling += usize::from(!full.unwilling.is_empty());
        }
        // The rounds did exercise contested keys and unwilling VIPs.
        assert!(conflicts > 50 && unwilling > 50, "{conflicts} {unwilling}");
    }

    /// The three-node lab (node-a/b/c at 10.0.0.11/12/13) through the manifest source
    /// (also the L2 election's and the BGP plan's fixture).
    pub(crate) fn lab() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("source/testdata/three-nodes.yaml");
        std::fs::write(dir.path().join("lab.yaml"), text).unwrap();
        let loaded = crate::source::manifests::ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        (*loaded.snapshot).clone()
    }

    fn k(addr: &str, port: u16, protocol: Protocol) -> VipKey {
        VipKey {
            addr: addr.parse().unwrap(),
            port,
            protocol,
        }
    }

    fn rb(addr: &str, node: &str, node_ip: Option<&str>) -> RemoteBackend {
        RemoteBackend {
            addr: addr.parse().unwrap(),
            node: node.into(),
            node_ip: node_ip.map(|ip| ip.parse().unwrap()),
            snat: false,
        }
    }

    /// (key, owner name, frontend) of every entry.
    fn keys(d: &Desired) -> Vec<(String, &str, Frontend)> {
        d.services
            .iter()
            .map(|(k, s)| {
                let key = format!("{}:{}/{}", fmt_ip(k.addr), k.port, k.protocol);
                (key, s.owner.name.as_str(), s.frontend)
            })
            .collect()
    }

    #[test]
    fn three_node_lab_frontends_of_node_a() {
        use Frontend::*;
        let d = compute(&lab(), "node-a", None);
        assert_eq!(d.errors, vec![]);
        let got = keys(&d);
        let want = [
            ("10.0.0.11:30053/UDP", "web", NodePort),
            ("10.0.0.11:30080/TCP", "web", NodePort),
            ("10.0.0.11:30081/TCP", "api", NodePort),
            ("10.0.0.11:30443/TCP", "admin", NodePort),
            ("10.0.100.1:53/UDP", "web", LoadBalancer),
            ("10.0.100.1:80/TCP", "web", LoadBalancer),
            ("10.0.100.2:80/TCP", "api", LoadBalancer),
            ("198.51.100.7:53/UDP", "web", ExternalIp),
            ("198.51.100.7:80/TCP", "web", ExternalIp),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, n, f)| (k.to_string(), *n, *f))
            .collect();
        assert_eq!(got, want);

        // Cluster policy: the local endpoint here, the others with their node's address
        // (the not-ready one on node-b left out).
        let vip = &d.services[&k("10.0.100.1", 80, Protocol::Tcp)];
        assert!(!vip.local);
        assert_eq!(vip.port_name, "http");
        assert_eq!(vip.backends, addrs(&["10.1.1.5:8080"]));
        let remote = vec![
            rb("10.1.2.5:8080", "node-b", Some("10.0.0.12")),
            rb("10.1.3.5:8080", "node-c", Some("10.0.0.13")),
        ];
        assert_eq!(vip.remote_backends, remote);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            vip.source_ranges,
            vec![net("192.0.2.0/24"), net("203.0.113.9/32")]
        );
        assert_eq!(vip.affinity_timeout, Some(600));

        // External IPs and node ports: same backends and affinity, no source ranges.
        for key in [
            k("198.51.100.7", 80, Protocol::Tcp),
            k("10.0.0.11", 30080, Protocol::Tcp),
        ] {
            let s = &d.services[&key];
            assert_eq!(s.backends, vip.backends);
            assert_eq!(s.remote_backends, remote);
            assert_eq!(s.affinity_timeout, Some(600));
            assert!(s.source_ranges.is_empty(), "{key:?}");
        }
        let dns = &d.services[&k("10.0.0.11", 30053, Protocol::Udp)];
        assert_eq!(dns.port_name, "dns");
        assert_eq!(dns.backends, addrs(&["10.1.1.5:5353"]));

        // NodePort Service with its only endpoint on node-b.
        let admin = &d.services[&k("10.0.0.11", 30443, Protocol::Tcp)];
        assert!(admin.backends.is_empty());
        assert_eq!(
            admin.remote_backends,
            vec![rb("10.1.2.9:8443", "node-b", Some("10.0.0.12"))]
        );

        // Local policy: two ready local endpoints; the draining one is not used while
        // ready ones exist, and does not count for the health check.
        let api = &d.services[&k("10.0.100.2", 80, Protocol::Tcp)];
        assert!(api.local);
        assert_eq!(api.backends, addrs(&["10.1.1.7:8080", "10.1.1.8:8080"]));
        assert!(api.remote_backends.is_empty());
        assert_eq!(
            d.health_checks,
            vec![HealthCheck {
                port: 32000,
                service: ServiceRef::new("shop", "api"),
                local_endpoints: 2,
            }]
        );
        assert!(d.unwilling.is_empty());
    }

    #[test]
    fn three_node_lab_local_service_on_nodes_without_ready_endpoints() {
        let snap = lab();
        let api_vip = k("10.0.100.2", 80, Protocol::Tcp);

        // node-b has only a draining endpoint: it still serves it (kube-proxy's
        // fallback), so it stays willing, but its health check says 0 so that load
        // balancers drain it.
        let b = compute(&snap, "node-b", None);
        assert_eq!(b.services[&api_vip].backends, addrs(&["10.1.2.7:8080"]));
        assert_eq!(b.health_checks[0].local_endpoints, 0);
        assert!(b.unwilling.is_empty());
        assert!(
            b.services
                .contains_key(&k("10.0.0.12", 30081, Protocol::Tcp))
        );

        // node-c has none: the VIP stays programmed (to drop, counted) and the node is
        // unwilling to attract it; the Cluster VIP next to it is unaffected.
        let c = compute(&snap, "node-c", None);
        assert!(c.services[&api_vip].backends.is_empty());
        assert_eq!(c.health_checks[0].local_endpoints, 0);
        assert_eq!(c.unwilling, BTreeSet::from(["10.0.100.2".parse().unwrap()]));
        // Node ports on node-c's IPv4 InternalIP only.
        let np = c.services[&k("10.0.0.13", 30081, Protocol::Tcp)].clone();
        assert_eq!(np.frontend, Frontend::NodePort);
        assert!(np.backends.is_empty());
        assert!(c.services.keys().all(|k| !k.addr.is_ipv6()));
        let web = &c.services[&k("10.0.100.1", 80, Protocol::Tcp)];
        assert_eq!(web.backends, addrs(&["10.1.3.5:8080"]));
        let remote: Vec<_> = web
            .remote_backends
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(remote, ["node-a", "node-b"]);
    }

    #[test]
    fn node_without_a_node_object_gets_no_node_ports_and_no_error() {
        let mut snap = lab();
        snap.nodes.remove("node-b");
        let d = compute(&snap, "node-b", None);
        assert_eq!(d.errors, vec![]);
        assert!(
            d.services
                .values()
                .all(|s| s.frontend != Frontend::NodePort)
        );
        assert!(d.services.contains_key(&k("10.0.100.1", 80, Protocol::Tcp)));
        // The others' remote backends on node-b have no tunnel address any more.
        let a = compute(&snap, "node-a", None);
        let web = &a.services[&k("10.0.100.1", 80, Protocol::Tcp)];
        assert_eq!(web.remote_backends[0], rb("10.1.2.5:8080", "node-b", None));
    }

    #[test]
    fn unwilling_only_when_every_service_on_the_vip_is_local_without_endpoints() {
        // Two Services sharing a VIP on different ports (MetalLB allow-shared-ip).
        let local = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let mut cluster = svc("10.0.100.1", TrafficPolicy::Cluster, vec![]);
        cluster.ports[0].port = 443;
        let d = compute(
            &snapshot(vec![("a", local.clone()), ("b", cluster)]),
            "node-a",
            None,
        );
        assert!(d.unwilling.is_empty());

        let mut other = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        other.ports[0].port = 443;
        let d = compute(&snapshot(vec![("a", local), ("b", other)]), "node-a", None);
        assert_eq!(d.unwilling, BTreeSet::from(["10.0.100.1".parse().unwrap()]));
    }

    #[test]
    fn vip_also_listed_in_external_ips_is_one_load_balancer_key() {
        let mut s = svc("10.0.100.1", TrafficPolicy::Cluster, vec![]);
        s.external_ips = vec!["10.0.100.1".parse().unwrap()];
        s.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let d = compute(&snapshot(vec![("web", s)]), "node-a", None);
        assert_eq!(d.errors, vec![]);
        assert_eq!(d.services.len(), 1);
        let e = &d.services[&key("10.0.100.1")];
        assert_eq!(e.frontend, Frontend::LoadBalancer);
        assert_eq!(e.source_ranges.len(), 1, "the filtered frontend wins");
    }

    /// An external IP that is some Node's own address (here node-b's, as seen from
    /// node-a, and node-c's ExternalIP) is not a frontend; the Service's others are.
    #[test]
    fn an_external_ip_on_a_node_address_is_not_served() {
        let mut snap = lab();
        let sref = snap.services.keys().next().unwrap().clone();
        let svc = snap.services.get_mut(&sref).unwrap();
        svc.external_ips = ["10.0.0.12", "203.0.113.13", "198.51.100.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let d = compute(&snap, "node-a", None);
        let external: BTreeSet<IpAddr> = d
            .services
            .iter()
            .filter(|(_, s)| s.frontend == Frontend::ExternalIp && s.owner == sref)
            .map(|(k, _)| k.addr)
            .collect();
        assert_eq!(external, BTreeSet::from(["198.51.100.9".parse().unwrap()]));
    }

    #[test]
    fn node_port_and_external_ip_conflicts_name_their_fields() {
        let mut snap = lab();
        let web = ServiceRef::new("shop", "web");
        // A second Service reusing web's nodePort and web's external IP.
        let mut copy = snap.services[&web].clone();
        copy.vips.clear();
        copy.ports.truncate(1);
        copy.ports[0].index = 3;
        snap.services.insert(ServiceRef::new("shop", "copy"), copy);

        let d = compute(&snap, "node-a", None);
        let got: Vec<_> = d
            .errors
            .iter()
            .map(|e| (e.kind(), e.object.as_str(), e.field.as_str()))
            .collect();
        // "shop/copy" < "shop/web": with no incumbent, copy wins.
        assert_eq!(
            got,
            [
                ("vip_conflict", "Service shop/web", "spec.ports[0].nodePort"),
                ("vip_conflict", "Service shop/web", "spec.externalIPs"),
            ]
        );
        assert!(
            d.errors[0]
                .message
                .starts_with("node port 10.0.0.11:30080/TCP (port \"http\") is already claimed by Service shop/copy"),
            "{}",
            d.errors[0]
        );
        assert!(
            d.errors[1]
                .message
                .starts_with("external IP 198.51.100.7:80/TCP")
        );

        // web served them first: it keeps them, copy is reported.
        let mut before = snap.clone();
        before.services.remove(&ServiceRef::new("shop", "copy"));
        let prev = compute(&before, "node-a", None);
        let d = compute(&snap, "node-a", Some(&prev));
        assert_eq!(d.errors.len(), 2);
        assert!(d.errors.iter().all(|e| e.object == "Service shop/copy"));
        assert_eq!(d.errors[0].field, "spec.ports[3].nodePort");
        assert_eq!(d.services[&k("10.0.0.11", 30080, Protocol::Tcp)].owner, web);
    }

    #[test]
    fn health_check_port_conflict_keeps_the_incumbent() {
        let mut a = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        a.health_check_node_port = Some(32000);
        let mut b = svc("10.0.100.2", TrafficPolicy::Local, vec![]);
        b.health_check_node_port = Some(32000);
        let snap = snapshot(vec![("b", b.clone()), ("a", a)]);

        let d = compute(&snap, "node-a", None);
        assert_eq!(d.health_checks.len(), 1);
        assert_eq!(d.health_checks[0].service.name, "a");
        let [e] = &d.errors[..] else {
            panic!("{:?}", d.errors)
        };
        assert_eq!(
            (e.kind(), e.field.as_str()),
            ("vip_conflict", "spec.healthCheckNodePort")
        );
        assert_eq!(e.object, "Service default/b");

        let prev = compute(&snapshot(vec![("b", b)]), "node-a", None);
        let d = compute(&snap, "node-a", Some(&prev));
        assert_eq!(d.health_checks[0].service.name, "b");
        assert_eq!(d.errors[0].object, "Service default/a");
    }
}
