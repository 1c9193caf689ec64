//! Who announces which VIP: a pure function of the model and the live membership, so
//! every agent computes the same owner from the same inputs (no coordination, no API
//! server).
//!
//! [`Plan::from_model`] reduces a [`Snapshot`] to what election needs: for each VIP
//! some `L2Announcement` selects, the nodes allowed to announce it. [`owner`] picks
//! one of the live candidates by rendezvous (highest-random-weight) hashing of VIP
//! and node name: owners spread evenly over nodes, and a node's death moves only the
//! VIPs it owned.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::attract;
use crate::model::{ServiceType, Snapshot, TrafficPolicy, any_selects};

/// What election needs from the model: candidates per VIP, peers' addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Announced VIPs -> names of the nodes that may announce them (node selectors
    /// matched; for externalTrafficPolicy Local only nodes with a usable local
    /// endpoint).
    pub vips: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Node name -> the address its agent's membership port listens on (first IPv4
    /// InternalIP, else the first InternalIP).
    pub peers: BTreeMap<String, IpAddr>,
}

impl Plan {
    /// Reduces `snapshot` to the plan, as seen by a node whose announce interface is
    /// `interface` (an announcement listing interfaces applies only where the uplink
    /// is one of them: nodes are assumed to share their uplink's name).
    pub fn from_model(snapshot: &Snapshot, interface: &str) -> Self {
        let peers = snapshot
            .nodes
            .values()
            .filter_map(|n| {
                Some((
                    n.name.clone(),
                    n.ipv4().or(n.internal_ips.first().copied())?,
                ))
            })
            .collect();
        let mut vips: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        let ads: Vec<_> = snapshot
            .l2_announcements
            .values()
            .filter(|a| a.interfaces.is_empty() || a.interfaces.iter().any(|i| i == interface))
            .collect();
        if ads.is_empty() {
            return Plan { vips, peers };
        }
        for svc in snapshot.services.values() {
            if svc.service_type != ServiceType::LoadBalancer || svc.vips.is_empty() {
                continue;
            }
            let local = svc.traffic_policy == TrafficPolicy::Local;
            let with_endpoints = local.then(|| attract::local_endpoint_nodes(svc));
            for ad in &ads {
                if !any_selects(&ad.service_selectors, &svc.labels) {
                    continue;
                }
                let nodes = snapshot.nodes.values().filter(|n| {
                    any_selects(&ad.node_selectors, &n.labels)
                        && with_endpoints.as_ref().is_none_or(|w| w.contains(&n.name))
                        && (svc.static_service.is_none() || attract::own_backend_healthy(svc, n))
                });
                // ARP is IPv4's (IPv6 neighbours are NDP's, not answered yet).
                let served = svc.vips.iter().filter(|v| v.is_ipv4());
                for vip in served.filter(|v| attract::in_pools(snapshot, &ad.ip_address_pools, **v))
                {
                    vips.entry(*vip)
                        .or_default()
                        .extend(nodes.clone().map(|n| n.name.clone()));
                }
            }
            // A VIP selected by some announcement but with no eligible node stays in
            // the plan with no candidates: nobody answers for it.
            for vip in svc.vips.iter().filter(|v| v.is_ipv4()) {
                if ads.iter().any(|ad| {
                    any_selects(&ad.service_selectors, &svc.labels)
                        && attract::in_pools(snapshot, &ad.ip_address_pools, *vip)
                }) {
                    vips.entry(*vip).or_default();
                }
            }
        }
        Plan { vips, peers }
    }
}

/// The rendezvous weight of `node` for `vip`: FNV-1a over both, then a 64-bit
/// finaliser (splitmix64) to spread it. Fixed here rather than `std`'s hasher, whose
/// output may change between Rust releases: agents of two versions must agree
/// during a rollout.
pub fn weight(vip: IpAddr, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    match vip {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    eat(0);
    node.bytes().for_each(&mut eat);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `vip` among `candidates` that are `live`: the highest weight, ties
/// (practically impossible) to the smaller name. `None` when no candidate is live.
pub fn owner<'a>(
    vip: IpAddr,
    candidates: &'a BTreeSet<String>,
    live: &BTreeSet<String>,
) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|n| live.contains(*n))
        .max_by(|a, b| weight(vip, a).cmp(&weight(vip, b)).then(b.cmp(a)))
        .map(String::as_str)
}

/// The VIPs `me` owns under `plan` with `live` members.
pub fn owned(plan: &Plan, me: &str, live: &BTreeSet<String>) -> BTreeSet<IpAddr> {
    plan.vips
        .iter()
        .filter(|(vip, c)| owner(**vip, c, live) == Some(me))
        .map(|(vip, _)| *vip)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn vip(i: u32) -> IpAddr {
        IpAddr::V4((0x0a64_0000 + i).into())
    }

    #[test]
    fn owners_spread_and_a_death_moves_only_the_dead_nodes_vips() {
        let all = names(3);
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..999 {
            *count.entry(owner(vip(i), &all, &all).unwrap()).or_default() += 1;
        }
        assert_eq!(count.len(), 3);
        assert!(count.values().all(|c| (233..=433).contains(c)), "{count:?}");
        let mut live = all.clone();
        live.remove("node-1");
        for i in 0..999 {
            let before = owner(vip(i), &all, &all).unwrap();
            let after = owner(vip(i), &all, &live).unwrap();
            if before != "node-1" {
                assert_eq!(before, after, "a live node's VIP moved");
            }
        }
    }

    /// The three-node lab (node-a/b/c; `web` Local with endpoints on node-a and
    /// node-b, `admin` and `api` Cluster) with L2Announcements added.
    fn lab_with(ads: &[(&str, crate::model::L2Announcement)]) -> Snapshot {
        let mut snap = crate::desired::tests::lab();
        for (name, ad) in ads {
            snap.l2_announcements.insert(name.to_string(), ad.clone());
        }
        snap
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_static_vip_is_not_announced_by_a_node_whose_own_backend_fails() {
        for forwarding in [
            crate::model::Forwarding::Snat,
            crate::model::Forwarding::Dsr,
        ] {
            let mut snap = crate::desired::tests::static_lab(forwarding);
            snap.l2_announcements
                .insert("x/all".into(), crate::model::L2Announcement::default());
            let vip: IpAddr = "10.0.0.100".parse().unwrap();
            let plan = Plan::from_model(&snap, "eth0");
            // The same verdict as each node's own desired state.
            let willing: BTreeSet<String> = ["node-a", "node-b", "node-c"]
                .into_iter()
                .filter(|n| {
                    !crate::desired::compute(&snap, n, None)
                        .unwilling
                        .contains(&vip)
                })
                .map(String::from)
                .collect();
            assert_eq!(willing, set(&["node-b", "node-c"]));
            assert_eq!(plan.vips[&vip], willing);
        }
    }

    #[test]
    fn announcements_naming_pools_take_only_their_vips() {
        let only = |pools: &[&str]| crate::model::L2Announcement {
            ip_address_pools: pools.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        let mut snap = lab_with(&[("x/lab", only(&["lab"]))]);
        let all: BTreeSet<IpAddr> = snap
            .services
            .values()
            .flat_map(|s| s.vips.clone())
            .collect();
        // A pool that does not exist takes nothing (MetalLB's rule).
        assert!(Plan::from_model(&snap, "eth0").vips.is_empty());
        let first = *all.iter().next().unwrap();
        let pool = crate::model::AddressPool {
            ranges: vec![(first, first)],
            auto_assign: true,
            ..Default::default()
        };
        snap.address_pools.insert("lab".into(), pool);
        let plan = Plan::from_model(&snap, "eth0");
        assert_eq!(plan.vips.keys().copied().collect::<Vec<_>>(), [first]);
        assert!(all.len() > 1, "the lab has VIPs outside the pool");
    }

    #[test]
    fn plan_follows_announcements_selectors_and_local_endpoints() {
        use crate::model::{L2Announcement, LabelSelector, TrafficPolicy};
        // No announcement: nothing is announced.
        assert!(Plan::from_model(&lab_with(&[]), "eth0").vips.is_empty());
        let every = L2Announcement::default();
        let snap = lab_with(&[("x/all", every.clone())]);
        let plan = Plan::from_model(&snap, "eth0");
        assert_eq!(plan.peers.len(), 3);
        assert_eq!(plan.peers["node-c"], "10.0.0.13".parse::<IpAddr>().unwrap());
        // Eligible exactly where the desired state is not unwilling, computed by
        // `desired` for each node independently of the plan.
        for svc in snap.services.values() {
            for vip in &svc.vips {
                let want: BTreeSet<String> = if svc.traffic_policy == TrafficPolicy::Local {
                    ["node-a", "node-b", "node-c"]
                        .into_iter()
                        .filter(|n| {
                            !crate::desired::compute(&snap, n, None)
                                .unwilling
                                .contains(vip)
                        })
                        .map(String::from)
                        .collect()
                } else {
                    set(&["node-a", "node-b", "node-c"])
                };
                assert_eq!(plan.vips[vip], want, "{vip}");
            }
        }
        // node-b has only a draining (serving, terminating) endpoint: still eligible,
        // as it is not unwilling; node-c has none.
        let local: IpAddr = "10.0.100.2".parse().unwrap();
        assert_eq!(plan.vips[&local], set(&["node-a", "node-b"]));
        // Another interface: not this node's announcement.
        let other_if = L2Announcement {
            interfaces: vec!["eth1".into()],
            ..every.clone()
        };
        assert!(
            Plan::from_model(&lab_with(&[("x/if", other_if)]), "eth0")
                .vips
                .is_empty()
        );
        // Node selector: only node-b may announce.
        let only_b = L2Announcement {
            node_selectors: vec![LabelSelector {
                match_labels: BTreeMap::from([(
                    "kubernetes.io/hostname".to_string(),
                    "node-b".to_string(),
                )]),
                match_expressions: vec![],
            }],
            ..every.clone()
        };
        let plan = Plan::from_model(&lab_with(&[("x/b", only_b)]), "eth0");
        assert!(!plan.vips.is_empty());
        assert!(
            plan.vips
                .values()
                .all(|c| c.is_empty() || *c == set(&["node-b"]))
        );
        // Service selector matching nothing: nothing announced.
        let none = L2Announcement {
            service_selectors: vec![LabelSelector {
                match_labels: BTreeMap::from([("no".to_string(), "such".to_string())]),
                match_expressions: vec![],
            }],
            ..every
        };
        assert!(
            Plan::from_model(&lab_with(&[("x/none", none)]), "eth0")
                .vips
                .is_empty()
        );
    }

    #[test]
    fn no_live_candidate_no_owner() {
        let c = BTreeSet::from(["a".to_string()]);
        assert_eq!(owner(vip(1), &c, &BTreeSet::from(["b".to_string()])), None);
        assert_eq!(owner(vip(1), &BTreeSet::new(), &c), None);
    }
}
