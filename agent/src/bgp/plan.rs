//! What this node announces over BGP, and to whom: a pure function of the model and
//! this node's desired state (the routing policy of the speaker; its "Adj-RIB-Out").
//!
//! [`Plan::from_model`] takes every `BGPPeer` that selects this node and, for each,
//! the VIPs some `BGPAnnouncement` sends it. A VIP is announced only where the
//! datapath serves it and is willing to (`Desired::unwilling`, the set behind
//! `xlb_unwilling_vips`): always with Cluster policy, with Local policy only while
//! this node has a usable endpoint. So a router never sends a node traffic it would
//! drop.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use ipnet::Ipv4Net;

use crate::attract;
use crate::desired::{Desired, Frontend};
use crate::model::{BgpAnnouncement, ServiceType, Snapshot, any_selects};

/// Every session this node keeps, by `BGPPeer` `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The peers that select this node, with what each is sent.
    pub peers: BTreeMap<String, PeerPlan>,
}

/// One session: how to reach the peer and what to advertise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    /// Session settings; a change resets the session.
    pub session: SessionConfig,
    /// The routes to advertise; a change is sent as UPDATEs on the open session.
    pub routes: BTreeMap<Ipv4Net, RouteAttrs>,
}

/// Session settings from a `BGPPeer` (and its `BFDProfile`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// This node's AS.
    pub my_asn: u32,
    /// The peer's AS.
    pub peer_asn: u32,
    /// The peer's address.
    pub peer_address: IpAddr,
    /// The peer's port.
    pub peer_port: u16,
    /// The local address to bind, if set.
    pub source_address: Option<IpAddr>,
    /// Proposed hold time (RFC 4271 §4.2).
    pub hold_time: Duration,
    /// Keepalive interval, if not a third of the negotiated hold time.
    pub keepalive_time: Option<Duration>,
    /// TCP MD5 key (RFC 2385).
    pub password: Option<String>,
    /// IP TTL of the session's packets: 1 for directly connected eBGP (RFC 4271
    /// leaves it to the implementation; 1 is what routers expect without multihop),
    /// 255 for multihop eBGP, for iBGP and with GTSM.
    pub ttl: u8,
    /// The lowest TTL accepted from the peer (`IP_MINTTL`): 255 with GTSM (RFC 5082
    /// §3: a directly connected peer's packets arrive with 255), else none.
    pub min_ttl: Option<u8>,
    /// Advertise graceful restart (RFC 4724).
    pub graceful_restart: bool,
    /// The BGP identifier.
    pub router_id: Ipv4Addr,
    /// BFD timers, when the peer names a profile that exists.
    pub bfd: Option<BfdTimers>,
}

impl SessionConfig {
    /// Same AS on both ends (RFC 4271 §1.1, "internal peer").
    pub fn is_ibgp(&self) -> bool {
        self.my_asn == self.peer_asn
    }
}

/// BFD timers from a `BFDProfile` (RFC 5880 §6.8.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdTimers {
    /// Desired Min TX Interval.
    pub transmit_interval: Duration,
    /// Required Min RX Interval.
    pub receive_interval: Duration,
    /// Detect Mult.
    pub detect_multiplier: u8,
    /// Wait for the peer's packets first.
    pub passive: bool,
}

/// Path attributes of one advertised prefix beyond ORIGIN, AS_PATH and NEXT_HOP.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteAttrs {
    /// COMMUNITIES (RFC 1997), the union of every announcement's.
    pub communities: BTreeSet<u32>,
    /// LARGE_COMMUNITY (RFC 8092), the union of every announcement's.
    pub large_communities: BTreeSet<[u32; 3]>,
    /// LOCAL_PREF for iBGP (RFC 4271 §5.1.5), the highest any announcement asks.
    pub local_pref: Option<u32>,
}

impl Plan {
    /// The plan of node `node_name` (BGP identifier defaulting to `node_ip`) for
    /// `snapshot`, announcing only what `desired` (this node's desired state) serves
    /// and is willing to attract. IPv4 VIPs only while the datapath serves IPv4 only;
    /// IPv6 NLRI is the codec's already (RFC 4760).
    pub fn from_model(
        snapshot: &Snapshot,
        node_name: &str,
        node_ip: Option<Ipv4Addr>,
        desired: &Desired,
    ) -> Plan {
        let labels = snapshot
            .nodes
            .get(node_name)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        let served: BTreeSet<IpAddr> = desired
            .services
            .iter()
            .filter(|(_, ds)| ds.frontend == Frontend::LoadBalancer)
            .map(|(k, _)| k.addr)
            .filter(|a| !desired.unwilling.contains(a))
            .collect();
        let announcements: Vec<&BgpAnnouncement> = snapshot
            .bgp
            .announcements
            .values()
            .filter(|a| any_selects(&a.node_selectors, &labels))
            .collect();
        let mut peers = BTreeMap::new();
        for (key, peer) in &snapshot.bgp.peers {
            if !any_selects(&peer.node_selectors, &labels) {
                continue;
            }
            if peer.password_secret.is_some() && peer.password.is_none() {
                // Its Secret is not readable (reported by the source): a session
                // without the key would only be refused by the router.
                continue;
            }
            let Some(router_id) = peer.router_id.or(node_ip) else {
                // No identifier (RFC 4271 §4.2 needs a non-zero one): no session.
                continue;
            };
            let bfd = peer
                .bfd_profile
                .as_ref()
                .and_then(|name| snapshot.bgp.bfd_profiles.get(name))
                .map(|p| BfdTimers {
                    transmit_interval: p.transmit_interval,
                    receive_interval: p.receive_interval,
                    detect_multiplier: p.detect_multiplier,
                    passive: p.passive_mode,
                });
            let session = SessionConfig {
                my_asn: peer.my_asn,
                peer_asn: peer.peer_asn,
                peer_address: peer.peer_address,
                peer_port: peer.peer_port,
                source_address: peer.source_address,
                hold_time: peer.hold_time,
                keepalive_time: peer.keepalive_time,
                password: peer.password.clone(),
                ttl: if peer.my_asn != peer.peer_asn && !peer.ebgp_multihop && !peer.ttl_security {
                    1
                } else {
                    255
                },
                min_ttl: peer.ttl_security.then_some(255),
                graceful_restart: peer.graceful_restart,
                router_id,
                bfd,
            };
            let mut routes: BTreeMap<Ipv4Net, RouteAttrs> = BTreeMap::new();
            for ad in announcements
                .iter()
                .filter(|a| a.peers.is_empty() || a.peers.contains(&peer.name))
            {
                for svc in snapshot.services.values() {
                    if svc.service_type != ServiceType::LoadBalancer
                        || !any_selects(&ad.service_selectors, &svc.labels)
                    {
                        continue;
                    }
                    for vip in &svc.vips {
                        let IpAddr::V4(v4) = vip else { continue };
                        if !served.contains(vip)
                            || !attract::in_pools(snapshot, &ad.ip_address_pools, *vip)
                        {
                            continue;
                        }
                        // A valid length (0..=32, checked by the source): trunc is
                        // the covering prefix.
                        let Ok(net) = Ipv4Net::new(*v4, ad.aggregation_length) else {
                            continue;
                        };
                        let attrs = routes.entry(net.trunc()).or_default();
                        attrs.communities.extend(&ad.communities);
                        attrs.large_communities.extend(&ad.large_communities);
                        if session.is_ibgp() {
                            attrs.local_pref = attrs.local_pref.max(ad.local_pref);
                        }
                    }
                }
            }
            peers.insert(key.clone(), PeerPlan { session, routes });
        }
        Plan { peers }
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{BgpPeer, LabelSelector};

    fn peer(name: &str) -> BgpPeer {
        BgpPeer {
            name: name.into(),
            my_asn: 4_200_000_002,
            peer_asn: 4_200_000_001,
            peer_address: "10.0.0.1".parse().unwrap(),
            peer_port: 179,
            source_address: None,
            hold_time: Duration::from_secs(90),
            keepalive_time: None,
            password: None,
            password_secret: None,
            ebgp_multihop: false,
            ttl_security: false,
            graceful_restart: false,
            bfd_profile: None,
            node_selectors: vec![],
            router_id: None,
            origin: "test".into(),
        }
    }

    /// The three-node fixture: `shop/web` (Cluster, 10.0.100.1) has endpoints on
    /// every node; `shop/api` (Local, 10.0.100.2) on node-a (ready) and node-b
    /// (serving while terminating, its fallback), none on node-c.
    fn lab() -> Snapshot {
        let mut snap = crate::desired::tests::lab();
        snap.bgp.peers.insert("x/r1".into(), peer("r1"));
        snap.bgp.announcements.insert(
            "x/all".into(),
            BgpAnnouncement {
                aggregation_length: 32,
                ..Default::default()
            },
        );
        snap
    }

    fn plan_of(snap: &Snapshot, node: &str) -> Plan {
        let desired = crate::desired::compute(snap, node, None);
        Plan::from_model(snap, node, Some("10.0.0.11".parse().unwrap()), &desired)
    }

    fn routes(snap: &Snapshot, node: &str) -> BTreeSet<Ipv4Net> {
        plan_of(snap, node)
            .peers
            .get("x/r1")
            .map(|p| p.routes.keys().copied().collect())
            .unwrap_or_default()
    }

    fn nets(list: &[&str]) -> BTreeSet<Ipv4Net> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn cluster_vips_go_from_every_node_local_ones_only_with_an_endpoint() {
        let mut snap = lab();
        let both = nets(&["10.0.100.1/32", "10.0.100.2/32"]);
        assert_eq!(routes(&snap, "node-a"), both);
        assert_eq!(routes(&snap, "node-b"), both);
        assert_eq!(routes(&snap, "node-c"), nets(&["10.0.100.1/32"]));
        // The same verdict as the datapath's: node-c is unwilling for the Local VIP.
        let c = crate::desired::compute(&snap, "node-c", None);
        assert!(
            c.unwilling
                .contains(&"10.0.100.2".parse::<IpAddr>().unwrap())
        );
        // node-a loses its last usable endpoint of shop/api: the route goes.
        let api = crate::model::ServiceRef::new("shop", "api");
        for port in &mut snap.services.get_mut(&api).unwrap().ports {
            port.endpoints
                .retain(|e| e.node_name.as_deref() != Some("node-a"));
        }
        assert_eq!(routes(&snap, "node-a"), nets(&["10.0.100.1/32"]));
        assert_eq!(routes(&snap, "node-b"), both);
    }

    #[test]
    fn a_peer_waiting_for_its_secret_has_no_session_and_gets_its_key() {
        let mut snap = lab();
        let r1 = snap.bgp.peers.get_mut("x/r1").unwrap();
        r1.password_secret = Some(crate::model::SecretRef {
            namespace: "x".into(),
            name: "k".into(),
        });
        assert!(plan_of(&snap, "node-a").peers.is_empty());
        snap.bgp.peers.get_mut("x/r1").unwrap().password = Some("s3cret".into());
        let plan = plan_of(&snap, "node-a");
        assert_eq!(
            plan.peers["x/r1"].session.password.as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn selectors_peers_communities_and_aggregation() {
        let mut snap = lab();
        let vip4: Ipv4Net = "10.0.100.1/32".parse().unwrap();
        // An announcement for another peer adds nothing to r1.
        snap.bgp.announcements.insert(
            "x/other".into(),
            BgpAnnouncement {
                peers: vec!["r2".into()],
                communities: vec![1],
                aggregation_length: 24,
                ..Default::default()
            },
        );
        snap.bgp.announcements.insert(
            "x/tagged".into(),
            BgpAnnouncement {
                communities: vec![64512 << 16 | 100],
                large_communities: vec![[4_200_000_001, 1, 2]],
                local_pref: Some(200),
                aggregation_length: 32,
                ..Default::default()
            },
        );
        let plan = plan_of(&snap, "node-a");
        let r1 = &plan.peers["x/r1"];
        assert_eq!(r1.session.ttl, 1);
        assert_eq!(r1.session.min_ttl, None);
        assert_eq!(
            r1.session.router_id,
            "10.0.0.11".parse::<Ipv4Addr>().unwrap()
        );
        let attrs = &r1.routes[&vip4];
        assert_eq!(attrs.communities, BTreeSet::from([64512 << 16 | 100]));
        assert_eq!(
            attrs.large_communities,
            BTreeSet::from([[4_200_000_001, 1, 2]])
        );
        // LOCAL_PREF is for iBGP only.
        assert_eq!(attrs.local_pref, None);
        assert!(r1.routes.keys().all(|n| n.prefix_len() == 32));

        // iBGP: local preference, TTL 255; a /24 aggregate for r2.
        snap.bgp.peers.get_mut("x/r1").unwrap().peer_asn = 4_200_000_002;
        let mut r2 = peer("r2");
        r2.node_selectors = vec![LabelSelector {
            match_labels: BTreeMap::from([("bgp".into(), "yes".into())]),
            ..Default::default()
        }];
        snap.bgp.peers.insert("x/r2".into(), r2);
        let plan = plan_of(&snap, "node-a");
        assert_eq!(plan.peers["x/r1"].session.ttl, 255);
        assert_eq!(plan.peers["x/r1"].routes[&vip4].local_pref, Some(200));
        // r2 selects nodes labelled bgp=yes: node-a is not.
        assert!(!plan.peers.contains_key("x/r2"));
        snap.nodes
            .get_mut("node-a")
            .unwrap()
            .labels
            .insert("bgp".into(), "yes".into());
        let plan = plan_of(&snap, "node-a");
        let r2 = &plan.peers["x/r2"];
        let agg = Ipv4Net::new(vip4.addr(), 24).unwrap().trunc();
        assert!(r2.routes.contains_key(&agg), "{:?}", r2.routes);
        // Only the announcement that aggregates tags the aggregate.
        assert_eq!(r2.routes[&agg].communities, BTreeSet::from([1]));
    }

    #[test]
    fn no_announcement_or_no_router_id_announces_nothing() {
        let mut snap = lab();
        snap.bgp.announcements.clear();
        let plan = plan_of(&snap, "node-a");
        assert!(plan.peers["x/r1"].routes.is_empty());
        let desired = crate::desired::compute(&snap, "node-a", None);
        let plan = Plan::from_model(&snap, "node-a", None, &desired);
        assert!(plan.peers.is_empty());
    }
}
