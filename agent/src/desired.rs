//! The desired state for this node: for every VIP:port/protocol, the service that owns
//! it and the backends this node should forward to.
//!
//! [`compute`] is a pure function of the snapshot, the node name and the state applied
//! last; the dataplane turns its result into map contents and writes only the difference.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use crate::model::{
    ConfigError, Endpoint, ErrorKind, Protocol, ServiceRef, Snapshot, TrafficPolicy,
};

/// What a packet is matched on: destination VIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    /// Load-balancer address.
    pub addr: IpAddr,
    /// Service port.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// One VIP:port/protocol as this node should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// The Service that owns the key.
    pub owner: ServiceRef,
    /// Name of the Service port (`""` if unnamed).
    pub port_name: String,
    /// `externalTrafficPolicy: Local`: only local endpoints, and a node without one
    /// must not attract the traffic.
    pub local: bool,
    /// This node's usable endpoints, sorted and deduplicated.
    pub backends: Vec<SocketAddr>,
    /// Usable endpoints on other nodes or with no `nodeName` (Cluster policy only),
    /// sorted and deduplicated. Not programmed yet: the multi-node dataplane comes later.
    pub remote_backends: Vec<SocketAddr>,
}

/// The whole desired state, plus the errors found while computing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// Every VIP:port/protocol this node should serve.
    pub services: BTreeMap<VipKey, DesiredService>,
    /// Errors found by [`compute`] (VIP conflicts); the source's errors are separate.
    pub errors: Vec<ConfigError>,
}

/// Computes the desired state of `node_name` from `snapshot`.
///
/// `previous` is the last desired state that was applied: when two Services claim one
/// VIP:port/protocol, the one that owned it there keeps it, so a newly added conflicting
/// Service never takes traffic away from a working one; with no incumbent, the smallest
/// [`ServiceRef`] wins. The loser gets a `vip_conflict` error and that key is skipped
/// for it.
pub fn compute(snapshot: &Snapshot, node_name: &str, previous: Option<&Desired>) -> Desired {
    // Claims per key, in ServiceRef order (the snapshot's order).
    let mut claims: BTreeMap<VipKey, Vec<DesiredService>> = BTreeMap::new();
    for (sref, svc) in &snapshot.services {
        let local = svc.traffic_policy == TrafficPolicy::Local;
        for &addr in &svc.vips {
            for port in &svc.ports {
                let key = VipKey {
                    addr,
                    port: port.port,
                    protocol: port.protocol,
                };
                let (backends, remote_backends) = split(&port.endpoints, node_name, local);
                claims.entry(key).or_default().push(DesiredService {
                    owner: sref.clone(),
                    port_name: port.name.clone(),
                    local,
                    backends,
                    remote_backends,
                });
            }
        }
    }

    let mut out = Desired::default();
    for (key, mut claimants) in claims {
        let incumbent = previous
            .and_then(|p| p.services.get(&key))
            .and_then(|p| claimants.iter().position(|c| c.owner == p.owner));
        let winner = claimants.remove(incumbent.unwrap_or(0));
        for loser in claimants {
            let origin = snapshot
                .services
                .get(&loser.owner)
                .map(|s| s.origin.clone())
                .unwrap_or_default();
            out.errors.push(ConfigError {
                origin,
                object: format!("Service {}", loser.owner),
                field: "spec.ports".into(),
                message: format!(
                    "VIP {}:{}/{} (port {:?}) is already claimed by Service {}; skipped",
                    fmt_ip(key.addr),
                    key.port,
                    key.protocol,
                    loser.port_name,
                    winner.owner
                ),
                kind: ErrorKind::VipConflict,
            });
        }
        out.services.insert(key, winner);
    }
    out
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
/// endpoints alone, since only those can be used.
fn split(
    endpoints: &[Endpoint],
    node_name: &str,
    local: bool,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
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
    let (mut here, mut there): (Vec<SocketAddr>, Vec<SocketAddr>) = (Vec::new(), Vec::new());
    for e in usable {
        let sa = SocketAddr::new(e.addr, e.port);
        if is_local(e) { &mut here } else { &mut there }.push(sa);
    }
    for v in [&mut here, &mut there] {
        v.sort();
        v.dedup();
    }
    (here, there)
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
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
            vips: vec![vip.parse().unwrap()],
            traffic_policy: policy,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
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
        }
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
        assert_eq!(
            s.remote_backends,
            addrs(&["10.0.2.11:8080", "10.0.3.11:8080"])
        );
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
    fn conflict_on_one_port_leaves_the_other_ports_alone() {
        let a = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        let mut b = svc("10.0.100.1", TrafficPolicy::Local, vec![]);
        b.ports.push(ServicePort {
            name: "dns".into(),
            port: 53,
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
}
