//! Which nodes may attract a VIP's traffic: the rule L2 (ARP) and BGP announcement
//! share, and the one `desired` applies to a node's own unwilling set
//! (`xlb_unwilling_vips`), so a node never attracts what its datapath would drop.
use std::{collections::BTreeSet, net::IpAddr};

use crate::model::{Node, Service, Snapshot};

/// Nodes hosting an endpoint the datapath would use for `svc` there: ready and
/// serving, or, as a node's fallback when it has no such endpoint, serving and
/// terminating (`desired`'s rule, decided per node for Local policy). So a node is
/// eligible exactly when it is not unwilling (`xlb_unwilling_vips`).
pub fn local_endpoint_nodes(svc: &Service) -> BTreeSet<String> {
    svc.ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter(|e| e.serving && (e.ready || e.terminating))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// Whether an announcement's `ipAddressPools` (none: every VIP) include `vip`. A
/// named pool that does not exist includes nothing, as in MetalLB.
pub fn in_pools(snapshot: &Snapshot, pools: &[String], vip: IpAddr) -> bool {
    pools.is_empty()
        || pools.iter().any(|name| {
            snapshot.address_pools.get(name).is_some_and(|p| {
                p.ranges
                    .iter()
                    .any(|(a, b)| *a <= vip && vip <= *b && a.is_ipv4() == vip.is_ipv4())
            })
        })
}

/// For a StaticService: whether `node` may attract its VIPs, i.e. on some port it
/// has no backend of its own (at one of its IPv4 InternalIPs) or a healthy one. An
/// API server VIP thus leaves a node whose own API server fails its check, whatever
/// the others do (`desired`'s rule for this node's unwilling set).
pub fn own_backend_healthy(svc: &Service, node: &Node) -> bool {
    let ips: Vec<IpAddr> = node
        .internal_ips
        .iter()
        .copied()
        .filter(IpAddr::is_ipv4)
        .collect();
    svc.ports.is_empty()
        || svc.ports.iter().any(|p| {
            let mut own = p
                .endpoints
                .iter()
                .filter(|e| ips.contains(&e.addr))
                .peekable();
            own.peek().is_none() || own.any(|e| e.ready && e.serving)
        })
}
