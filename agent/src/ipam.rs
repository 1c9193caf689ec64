//! Address allocation (IPAM) for LoadBalancer Services, from `AddressPool`s, with
//! MetalLB's rules and names: a Service may name its addresses (`loadBalancerIPs`
//! annotations, `spec.loadBalancerIP`) or its pool (`address-pool`); otherwise pools
//! are tried by `serviceAllocation.priority` (lower first, unset last, then by name)
//! among those whose `autoAssign`, `namespaces`, `namespaceSelectors` and
//! `serviceSelectors` admit it. `avoidBuggyIPs` skips IPv4 .0 and .255. One address
//! per family in `spec.ipFamilies` (both for dual-stack), from one pool.
//!
//! Sharing (MetalLB, "IP Address Sharing"): Services hold one address together only
//! with the same `allow-shared-ip` key, no common port/protocol, the same traffic
//! policy and, with Local policy, the same selector. This holds for named addresses
//! too: a Service naming an address another holds, against these rules, is refused
//! it (an `AddressConflict`), even on other ports. Without any pool, IPAM is off and
//! named addresses are served as named (each VIP:port then conflicts on its own).
//!
//! Deterministic, so that every agent reading the same manifests computes the same
//! addresses without talking to the others: Services are served in order of
//! `metadata.creationTimestamp` (unset last), then namespace/name, those with named
//! or recovered (status) addresses first; each asking Service starts looking at a
//! place in the pool fixed by a hash of its namespace/name and takes the next free
//! address. An older Service therefore never loses its address to a newer one, and
//! removing a Service moves no other Service (unless that one had stepped past the
//! removed one's address, which takes a hash collision in the pool).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::model::{
    AddressPool, AddressRequest, ConfigError, ErrorKind, IpFamily, Protocol, Service, ServiceRef,
    ServiceType, Snapshot, TrafficPolicy, any_selects,
};

/// The result: the addresses each Service with a request holds, and why the others
/// hold fewer than they asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// The addresses each LoadBalancer Service with a request holds: the named
    /// ones the sharing rules let it hold, or those allocated (one per family).
    pub addresses: BTreeMap<ServiceRef, Vec<IpAddr>>,
    /// One error per refused named address, and per asking Service left without
    /// (unknown pool, no pool admits it, pools exhausted).
    pub errors: Vec<ConfigError>,
}

/// Who holds an address.
struct Holder<'a> {
    service: &'a ServiceRef,
    svc: &'a Service,
    ports: BTreeSet<(u16, Protocol)>,
}

fn ports(svc: &Service) -> BTreeSet<(u16, Protocol)> {
    svc.ports.iter().map(|p| (p.port, p.protocol)).collect()
}

/// Why `svc` may not join the `holders` of an address (MetalLB's sharing rules),
/// or `None` if it may.
fn conflict(holders: &[Holder<'_>], svc: &Service) -> Option<String> {
    let mine = ports(svc);
    holders.iter().find_map(|h| {
        let why = if svc.sharing_key.is_none() || h.svc.sharing_key != svc.sharing_key {
            let key = |k: &Option<String>| k.as_deref().map_or("none".into(), |k| format!("{k:?}"));
            format!(
                "sharing key {} is not its {}",
                key(&svc.sharing_key),
                key(&h.svc.sharing_key)
            )
        } else if let Some((port, proto)) = h.ports.intersection(&mine).next() {
            format!("both use port {port}/{proto}")
        } else if h.svc.traffic_policy != svc.traffic_policy {
            "their externalTrafficPolicy differs".to_string()
        } else if svc.traffic_policy == TrafficPolicy::Local && h.svc.selector != svc.selector {
            "with externalTrafficPolicy Local they must select the same pods".to_string()
        } else {
            return None;
        };
        Some(format!("Service {} holds it and {why}", h.service))
    })
}

/// Allocates addresses for every Service of `snapshot` with an address request.
pub fn allocate(snapshot: &Snapshot) -> Allocation {
    let mut out = Allocation::default();
    let mut requests: Vec<(&ServiceRef, &Service, &AddressRequest)> = snapshot
        .services
        .iter()
        .filter(|(_, s)| s.service_type == ServiceType::LoadBalancer)
        .filter_map(|(r, s)| Some((r, s, s.address_request.as_ref()?)))
        .collect();
    // A Node's own address is never a Service's (neither named nor allocated).
    let nodes = snapshot.node_addresses();
    let error =
        |sref: &ServiceRef, svc: &Service, message: String, field: &str, kind| ConfigError {
            origin: svc.origin.clone(),
            object: format!("Service {sref}"),
            field: field.to_string(),
            message,
            kind,
        };
    // Named addresses a Service may not have: a Node's, and, where pools exist, one
    // outside every pool unless status already shows it (a Service that had it
    // before pools were added keeps it, with a warning from `status`). MetalLB and
    // Cilium LB-IPAM refuse addresses outside their pools too.
    let refused = |sref: &ServiceRef, svc: &Service, req: &AddressRequest, ip: IpAddr| {
        let why = if let Some(node) = nodes.get(&ip) {
            format!(
                "address {ip} is Node {node}'s own address; not served (it would take the node's own listeners)"
            )
        } else if !in_some_pool(snapshot, ip) && !req.status.contains(&ip) {
            format!("address {ip} is outside every AddressPool; not served")
        } else {
            return None;
        };
        Some(error(
            sref,
            svc,
            why,
            &req.named_field,
            ErrorKind::AddressRefused,
        ))
    };
    // External IPs on a Node's address: reported here, left out of the desired state
    // by `desired` (the rule is `Snapshot::node_addresses` for both).
    for (sref, svc) in &snapshot.services {
        for ip in &svc.external_ips {
            if let Some(node) = nodes.get(ip) {
                let m = format!(
                    "address {ip} is Node {node}'s own address; not served (it would take the node's own listeners)"
                );
                out.errors.push(error(
                    sref,
                    svc,
                    m,
                    "spec.externalIPs",
                    ErrorKind::AddressRefused,
                ));
            }
        }
    }
    if snapshot.address_pools.is_empty() {
        // No pools, no IPAM: named addresses as named, the others stay pending.
        for (sref, svc, req) in requests {
            let mut kept = Vec::new();
            for ip in &req.named {
                match refused(sref, svc, req, *ip) {
                    Some(e) => out.errors.push(e),
                    None => kept.push(*ip),
                }
            }
            out.addresses.insert(sref.clone(), kept);
        }
        return out;
    }
    requests.sort_by_key(|(r, s, req)| (req.named.is_empty(), s.created.unwrap_or(i64::MAX), *r));
    // External IPs are the network's, never allocated, and outside the sharing rules;
    // node addresses are never allocated either.
    let external: BTreeSet<IpAddr> = snapshot
        .services
        .values()
        .flat_map(|s| s.external_ips.iter().copied())
        .chain(nodes.keys().copied())
        .collect();
    let mut held: BTreeMap<IpAddr, Vec<Holder<'_>>> = BTreeMap::new();
    let mut pools: Vec<(&String, &AddressPool)> = snapshot.address_pools.iter().collect();
    pools.sort_by_key(|(name, p)| (p.priority.unwrap_or(i32::MAX), *name));
    for (sref, svc, req) in requests {
        let error =
            |message: String, field: &str, kind: ErrorKind| error(sref, svc, message, field, kind);
        let holder = || Holder {
            service: sref,
            svc,
            ports: ports(svc),
        };
        if !req.named.is_empty() {
            let mut kept = Vec::new();
            for ip in &req.named {
                if let Some(e) = refused(sref, svc, req, *ip) {
                    out.errors.push(e);
                    continue;
                }
                let holders = held.entry(*ip).or_default();
                match conflict(holders, svc) {
                    Some(why) => {
                        let m = format!("address {ip} is taken: {why}; not served on it");
                        let field = "metadata.annotations[allow-shared-ip]";
                        out.errors.push(error(m, field, ErrorKind::VipConflict));
                    }
                    None => {
                        holders.push(holder());
                        kept.push(*ip);
                    }
                }
            }
            out.addresses.insert(sref.clone(), kept);
            continue;
        }
        let unavailable = ErrorKind::AddressUnavailable;
        let candidates: Vec<(&String, &AddressPool)> = match &req.pool {
            Some(name) => match snapshot.address_pools.get_key_value(name) {
                Some(p) => vec![p],
                None => {
                    let m = format!("no AddressPool named {name:?}; no address assigned");
                    let field = "metadata.annotations[address-pool]";
                    out.errors.push(error(m, field, unavailable));
                    continue;
                }
            },
            None => pools
                .iter()
                .copied()
                .filter(|(_, p)| p.auto_assign && admits(snapshot, p, sref, svc))
                .collect(),
        };
        if candidates.is_empty() {
            let m = "no AddressPool with autoAssign admits it (namespaces, namespaceSelectors, serviceSelectors); no address assigned".to_string();
            out.errors.push(error(m, "", unavailable));
            continue;
        }
        let families = if req.families.is_empty() {
            &[IpFamily::V4][..]
        } else {
            &req.families[..]
        };
        // An address it may share, in a pool it may use, of family `f`.
        let shareable = |p: &AddressPool, f: IpFamily| {
            held.iter()
                .find(|(ip, h)| {
                    IpFamily::of(**ip) == f
                        && contains(p, **ip)
                        && !buggy(p, **ip)
                        && conflict(h, svc).is_none()
                })
                .map(|(ip, _)| *ip)
        };
        let name = sref.to_string();
        let free = |p: &AddressPool, f: IpFamily| free_in(p, f, &name, &held, &external);
        // Shared addresses first, so that Services with one key stay together; one
        // pool for all families, as MetalLB's dual-stack pools.
        let all = |pick: &dyn Fn(&AddressPool, IpFamily) -> Option<IpAddr>| {
            candidates.iter().find_map(|(_, p)| {
                families
                    .iter()
                    .map(|f| pick(p, *f))
                    .collect::<Option<Vec<_>>>()
            })
        };
        let found = all(&shareable).or_else(|| all(&|p, f| shareable(p, f).or_else(|| free(p, f))));
        match found {
            Some(ips) => {
                for ip in &ips {
                    held.entry(*ip).or_default().push(holder());
                }
                out.addresses.insert(sref.clone(), ips);
            }
            None => {
                let names: Vec<&str> = candidates.iter().map(|(n, _)| n.as_str()).collect();
                let fams: Vec<&str> = families
                    .iter()
                    .map(|f| match f {
                        IpFamily::V4 => "IPv4",
                        IpFamily::V6 => "IPv6",
                    })
                    .collect();
                let m = format!(
                    "no free address in {} ({}); no address assigned",
                    names.join(", "),
                    fams.join(" and ")
                );
                out.errors.push(error(m, "", unavailable));
            }
        }
    }
    out
}

/// Whether `pool`'s `serviceAllocation` admits the Service (no constraints: all).
/// `namespaceSelectors` match the labels of the Service's Namespace (none known:
/// no labels).
fn admits(snapshot: &Snapshot, pool: &AddressPool, sref: &ServiceRef, svc: &Service) -> bool {
    let empty = BTreeMap::new();
    let ns_labels = snapshot.namespaces.get(&sref.namespace).unwrap_or(&empty);
    let by_namespace = (pool.namespaces.is_empty() && pool.namespace_selectors.is_empty())
        || pool.namespaces.contains(&sref.namespace)
        || (!pool.namespace_selectors.is_empty()
            && any_selects(&pool.namespace_selectors, ns_labels));
    by_namespace && any_selects(&pool.service_selectors, &svc.labels)
}

/// Whether some pool of `snapshot` holds `ip` (no pools: `true`, nothing to be
/// outside of).
pub fn in_some_pool(snapshot: &Snapshot, ip: IpAddr) -> bool {
    snapshot.address_pools.is_empty() || snapshot.address_pools.values().any(|p| contains(p, ip))
}

fn contains(pool: &AddressPool, ip: IpAddr) -> bool {
    pool.ranges
        .iter()
        .any(|(a, b)| *a <= ip && ip <= *b && a.is_ipv4() == ip.is_ipv4())
}

/// The ranges of `pool` in `family` as (first, count), addresses as integers.
fn ranges(pool: &AddressPool, family: IpFamily) -> Vec<(u128, u128)> {
    pool.ranges
        .iter()
        .filter_map(|r| match (r, family) {
            ((IpAddr::V4(a), IpAddr::V4(b)), IpFamily::V4) => {
                let (a, b) = (u128::from(u32::from(*a)), u128::from(u32::from(*b)));
                Some((a, b - a + 1))
            }
            // `b - a + 1` overflows only for ::/0, which is no pool: saturate.
            ((IpAddr::V6(a), IpAddr::V6(b)), IpFamily::V6) => {
                let (a, b) = (u128::from(*a), u128::from(*b));
                Some((a, (b - a).saturating_add(1)))
            }
            _ => None,
        })
        .collect()
}

/// The first free address of `family` in `pool` at or after the place `name`
/// hashes to, going round once. `avoidBuggyIPs` is IPv4's (.0 and .255).
fn free_in(
    pool: &AddressPool,
    family: IpFamily,
    name: &str,
    held: &BTreeMap<IpAddr, Vec<Holder<'_>>>,
    external: &BTreeSet<IpAddr>,
) -> Option<IpAddr> {
    let ranges = ranges(pool, family);
    let size = ranges.iter().fold(0u128, |n, (_, c)| n.saturating_add(*c));
    if size == 0 {
        return None;
    }
    let start = u128::from(fnv1a(name)) % size;
    let nth = |mut i: u128| -> IpAddr {
        for (first, n) in &ranges {
            if i < *n {
                // first + i is inside the range, so inside the family's space.
                let a = first + i;
                return match family {
                    IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(a as u32)),
                    IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(a)),
                };
            }
            i -= n;
        }
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    // IPv6 skips nothing but taken addresses, so one more try than there are
    // taken ones finds a free one if any (a /64 is not walked).
    let tries = match family {
        IpFamily::V4 => size,
        IpFamily::V6 => size.min(held.len() as u128 + external.len() as u128 + 1),
    };
    (0..tries)
        .map(|k| nth((start + k) % size))
        .find(|a| !buggy(pool, *a) && !held.contains_key(a) && !external.contains(a))
}

/// Whether `pool` must not hand out `ip` (`avoidBuggyIPs`: IPv4 .0 and .255).
fn buggy(pool: &AddressPool, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => pool.avoid_buggy_ips && matches!(v.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// FNV-1a: a hash fixed here (not `std`'s, which may change between Rust releases),
/// since agents of two versions must allocate alike during a rollout.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{LabelSelector, ServicePort};

    fn pool(ranges: &[(&str, &str)]) -> AddressPool {
        AddressPool {
            ranges: ranges
                .iter()
                .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
                .collect(),
            auto_assign: true,
            ..AddressPool::default()
        }
    }

    fn svc(created: i64, ports: &[u16], pool: Option<&str>, key: Option<&str>) -> Service {
        Service {
            service_type: ServiceType::LoadBalancer,
            vips: vec![],
            external_ips: vec![],
            traffic_policy: TrafficPolicy::Cluster,
            source_ranges: vec![],
            affinity_timeout: None,
            health_check_node_port: None,
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, p)| ServicePort {
                    index: i,
                    name: format!("p{i}"),
                    port: *p,
                    node_port: None,
                    protocol: Protocol::Tcp,
                    endpoints: vec![],
                })
                .collect(),
            created: Some(created),
            labels: BTreeMap::new(),
            sharing_key: key.map(String::from),
            selector: BTreeMap::new(),
            static_service: None,
            address_request: Some(AddressRequest {
                pool: pool.map(String::from),
                families: vec![IpFamily::V4],
                ..AddressRequest::default()
            }),
            origin: "test.yaml".into(),
        }
    }

    /// `s` naming `ips` (from the spec, or recovered from status).
    fn named(mut s: Service, ips: &[&str], from_status: bool) -> Service {
        let req = s.address_request.as_mut().unwrap();
        req.named = ips.iter().map(|a| ip(a)).collect();
        req.from_status = from_status;
        if from_status {
            req.status = req.named.clone();
        }
        s
    }

    fn r(name: &str) -> ServiceRef {
        ServiceRef::new("default", name)
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    /// The one address `name` got.
    fn one(a: &Allocation, name: &str) -> IpAddr {
        match a.addresses.get(&r(name)).map(Vec::as_slice) {
            Some([ip]) => *ip,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn priorities_pools_named_and_exhaustion() {
        let mut snap = Snapshot::default();
        let mut low = pool(&[("10.1.0.0", "10.1.0.1")]);
        low.priority = Some(5);
        let mut high = pool(&[("10.2.0.7", "10.2.0.7")]);
        high.priority = Some(1);
        let mut manual = pool(&[("10.3.0.0", "10.3.0.255")]);
        manual.auto_assign = false;
        snap.address_pools.insert("low".into(), low);
        snap.address_pools.insert("high".into(), high);
        snap.address_pools.insert("manual".into(), manual);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            snap.services
                .insert(r(name), svc(i as i64, &[80], None, None));
        }
        snap.services
            .insert(r("m"), svc(9, &[80], Some("manual"), None));
        snap.services
            .insert(r("x"), svc(9, &[80], Some("nope"), None));
        let a = allocate(&snap);
        // The oldest gets the high-priority pool's only address, the next two the
        // low pool's two, the youngest nothing; only "m" gets the manual pool.
        assert_eq!(one(&a, "a"), ip("10.2.0.7"));
        let low_two: BTreeSet<IpAddr> = ["b", "c"].iter().map(|s| one(&a, s)).collect();
        assert_eq!(low_two, BTreeSet::from([ip("10.1.0.0"), ip("10.1.0.1")]));
        assert!(!a.addresses.contains_key(&r("d")));
        assert!(one(&a, "m").to_string().starts_with("10.3.0."));
        let errors: Vec<(&str, &str)> = a
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].0 == "Service default/d"
                && errors[0].1.contains("no free address in high, low (IPv4)")
        );
        assert!(
            errors[1].0 == "Service default/x"
                && errors[1].1.contains("no AddressPool named \"nope\"")
        );
        assert!(
            a.errors
                .iter()
                .all(|e| e.kind == ErrorKind::AddressUnavailable)
        );
    }

    #[test]
    fn an_address_recovered_from_status_stays_and_is_shared_by_its_key() {
        let mut snap = Snapshot::default();
        snap.address_pools
            .insert("p".into(), pool(&[("10.0.0.1", "10.0.0.3")]));
        // Outside the pool today (moved from MetalLB, say): kept, never reshuffled.
        let old = svc(0, &[80], None, Some("k"));
        snap.services
            .insert(r("old"), named(old.clone(), &["10.9.9.9"], true));
        snap.services
            .insert(r("inpool"), named(old, &["10.0.0.2"], true));
        snap.services
            .insert(r("joins"), svc(1, &[443], None, Some("k")));
        snap.services.insert(r("new"), svc(2, &[80], None, None));
        let a = allocate(&snap);
        // Recovered ones keep theirs; a Service with their key joins one (in a pool
        // it may use); a new one takes neither address.
        assert_eq!(one(&a, "old"), ip("10.9.9.9"));
        assert_eq!(one(&a, "inpool"), ip("10.0.0.2"));
        assert_eq!(one(&a, "joins"), ip("10.0.0.2"));
        assert_ne!(one(&a, "new"), ip("10.0.0.2"));
        assert!(a.errors.is_empty(), "{:?}", a.errors);
    }

    #[test]
    fn buggy_addresses_namespaces_selectors_and_sharing() {
        let mut snap = Snapshot::default();
        let mut p = pool(&[("10.0.0.255", "10.0.1.0")]);
        p.avoid_buggy_ips = true;
        snap.address_pools.insert("p".into(), p);
        snap.services.insert(r("buggy"), svc(1, &[80], None, None));
        assert!(
            allocate(&snap).addresses.is_empty(),
            "only .255 and .0 in the pool"
        );

        // By namespace name, or by the Namespace's labels.
        let mut snap = Snapshot::default();
        let mut shop_only = pool(&[("10.0.5.1", "10.0.5.9")]);
        shop_only.namespaces = vec!["shop".into()];
        shop_only.namespace_selectors = vec![LabelSelector {
            match_labels: BTreeMap::from([("tier".into(), "public".into())]),
            ..LabelSelector::default()
        }];
        snap.address_pools.insert("shop".into(), shop_only);
        snap.namespaces.insert(
            "blog".into(),
            BTreeMap::from([("tier".into(), "public".into())]),
        );
        snap.namespaces.insert(
            "default".into(),
            BTreeMap::from([("tier".into(), "internal".into())]),
        );
        snap.services.insert(r("web"), svc(1, &[80], None, None));
        for ns in ["shop", "blog"] {
            snap.services
                .insert(ServiceRef::new(ns, "web"), svc(1, &[80], None, None));
        }
        let a = allocate(&snap);
        assert_eq!(
            a.addresses.keys().collect::<Vec<_>>(),
            [
                &ServiceRef::new("blog", "web"),
                &ServiceRef::new("shop", "web")
            ]
        );
        assert_eq!(a.errors.len(), 1);
        assert_eq!(a.errors[0].object, "Service default/web");

        // Same key and disjoint ports share; a common port, another key or no key
        // do not.
        let mut snap = Snapshot::default();
        snap.address_pools
            .insert("p".into(), pool(&[("10.0.9.0", "10.0.9.255")]));
        snap.services
            .insert(r("dns-tcp"), svc(1, &[53], None, Some("dns")));
        snap.services
            .insert(r("dns-udp"), svc(2, &[5353], None, Some("dns")));
        snap.services
            .insert(r("dns-clash"), svc(3, &[53], None, Some("dns")));
        snap.services
            .insert(r("other-key"), svc(4, &[54], None, Some("other")));
        snap.services.insert(r("no-key"), svc(5, &[55], None, None));
        let a = allocate(&snap);
        assert_eq!(one(&a, "dns-tcp"), one(&a, "dns-udp"));
        for other in ["dns-clash", "other-key", "no-key"] {
            assert_ne!(one(&a, other), one(&a, "dns-tcp"), "{other}");
        }
        let distinct: BTreeSet<IpAddr> = a.addresses.values().flatten().copied().collect();
        assert_eq!(distinct.len(), 4);
    }

    /// Named addresses follow the sharing rules too: the oldest holder keeps the
    /// address; a younger one is refused it unless it may share (same key, no common
    /// port, same policy, and with Local the same selector).
    #[test]
    fn named_addresses_are_shared_only_by_the_rules() {
        let mut snap = Snapshot::default();
        snap.address_pools
            .insert("p".into(), pool(&[("10.0.9.0", "10.0.9.255")]));
        let vip = "10.0.9.9";
        let local = |mut s: Service, app: &str| {
            s.traffic_policy = TrafficPolicy::Local;
            s.selector = BTreeMap::from([("app".into(), app.into())]);
            s
        };
        let cases = [
            (
                "a-first",
                local(svc(1, &[80], None, Some("k")), "web"),
                true,
            ),
            (
                "b-same",
                local(svc(2, &[443], None, Some("k")), "web"),
                true,
            ),
            (
                "c-port",
                local(svc(3, &[80], None, Some("k")), "web"),
                false,
            ),
            ("d-key", local(svc(4, &[81], None, Some("x")), "web"), false),
            ("e-nokey", local(svc(5, &[82], None, None), "web"), false),
            (
                "f-selector",
                local(svc(6, &[83], None, Some("k")), "db"),
                false,
            ),
            ("g-policy", svc(7, &[84], None, Some("k")), false),
        ];
        for (name, s, _) in &cases {
            snap.services
                .insert(r(name), named(s.clone(), &[vip], false));
        }
        let a = allocate(&snap);
        for (name, _, shares) in &cases {
            let got = a.addresses[&r(name)].clone();
            assert_eq!(got.contains(&ip(vip)), *shares, "{name}: {got:?}");
            let refused = a
                .errors
                .iter()
                .any(|e| e.object == format!("Service default/{name}"));
            assert_eq!(refused, !shares, "{name}: {:?}", a.errors);
        }
        assert!(a.errors.iter().all(|e| e.kind == ErrorKind::VipConflict
            && e.message.contains("Service default/a-first holds it")));
        // An asking Service is not given the named address either.
        snap.services.insert(r("h-asks"), svc(8, &[80], None, None));
        assert_ne!(one(&allocate(&snap), "h-asks"), ip(vip));
    }

    #[test]
    fn ipv6_and_dual_stack_come_from_one_pool() {
        let mut snap = Snapshot::default();
        let mut v4only = pool(&[("10.0.0.1", "10.0.0.9")]);
        v4only.priority = Some(0);
        snap.address_pools.insert("v4".into(), v4only);
        snap.address_pools.insert(
            "dual".into(),
            pool(&[("10.0.1.1", "10.0.1.9"), ("fd00::10", "fd00::1f")]),
        );
        let mut six = svc(1, &[80], None, None);
        six.address_request.as_mut().unwrap().families = vec![IpFamily::V6];
        let mut both = svc(2, &[80], None, None);
        both.address_request.as_mut().unwrap().families = vec![IpFamily::V6, IpFamily::V4];
        snap.services.insert(r("six"), six);
        snap.services.insert(r("both"), both);
        snap.services.insert(r("four"), svc(3, &[80], None, None));
        let a = allocate(&snap);
        let in_dual = |ip: &IpAddr| contains(&snap.address_pools["dual"], *ip);
        assert!(one(&a, "six").is_ipv6() && in_dual(&one(&a, "six")));
        let both = &a.addresses[&r("both")];
        assert!(
            both.len() == 2 && both[0].is_ipv6() && both[1].is_ipv4(),
            "{both:?}"
        );
        assert!(both.iter().all(in_dual), "one pool for both families");
        assert!(contains(&snap.address_pools["v4"], one(&a, "four")));
        // A v6 /64 with its first addresses taken is not walked.
        let mut snap = Snapshot::default();
        snap.address_pools.insert(
            "big".into(),
            pool(&[("fd00::", "fd00::ffff:ffff:ffff:ffff")]),
        );
        for i in 0..50 {
            let mut s = svc(i, &[80], None, None);
            s.address_request.as_mut().unwrap().families = vec![IpFamily::V6];
            snap.services.insert(r(&format!("s{i}")), s);
        }
        let a = allocate(&snap);
        let distinct: BTreeSet<IpAddr> = a.addresses.values().flatten().copied().collect();
        assert_eq!(distinct.len(), 50);
    }

    /// Random pools and Services: no address twice (unless shared by the rules),
    /// every address inside an admitting pool, the same result every time, and a
    /// newer Service never moves an older one.
    #[test]
    fn random_allocations_are_unique_deterministic_and_stable() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut snap = Snapshot::default();
            for p in 0..next(3) + 1 {
                let base = 10 * p as u8;
                let mut pl = pool(&[(
                    &format!("10.{base}.0.250"),
                    &format!("10.{base}.1.{}", next(8)),
                )]);
                pl.avoid_buggy_ips = next(2) == 0;
                pl.priority = (next(2) == 0).then(|| next(3) as i32);
                snap.address_pools.insert(format!("p{p}"), pl);
            }
            let n = next(20) + 1;
            for i in 0..n {
                let key = (next(3) == 0).then(|| format!("k{}", next(2)));
                let mut s = svc(i as i64, &[next(4) as u16 + 80], None, key.as_deref());
                // Some name an address, maybe one another holds.
                if next(4) == 0 {
                    s = named(s, &[&format!("10.0.1.{}", next(4))], next(2) == 0);
                }
                snap.services.insert(r(&format!("s{i}")), s);
            }
            let a = allocate(&snap);
            assert_eq!(a, allocate(&snap));
            let mut by_ip: BTreeMap<IpAddr, Vec<&ServiceRef>> = BTreeMap::new();
            for (s, ips) in &a.addresses {
                let req = snap.services[s].address_request.as_ref().unwrap();
                for ip in ips {
                    by_ip.entry(*ip).or_default().push(s);
                    if !req.named.is_empty() {
                        assert!(req.named.contains(ip));
                        continue;
                    }
                    let last = match ip {
                        IpAddr::V4(v) => v.octets()[3],
                        IpAddr::V6(_) => panic!("IPv6 handed out"),
                    };
                    let pool_of = snap
                        .address_pools
                        .values()
                        .find(|p| contains(p, *ip))
                        .unwrap();
                    assert!(!(pool_of.avoid_buggy_ips && (last == 0 || last == 255)));
                }
            }
            for (ip, holders) in &by_ip {
                if holders.len() > 1 {
                    let keys: BTreeSet<_> = holders
                        .iter()
                        .map(|s| snap.services[*s].sharing_key.clone())
                        .collect();
                    assert!(
                        keys.len() == 1 && !keys.contains(&None),
                        "{ip} shared by {holders:?}"
                    );
                    let mut ports = BTreeSet::new();
                    for s in holders {
                        for p in &snap.services[*s].ports {
                            assert!(ports.insert(p.port), "{ip}: port {} twice", p.port);
                        }
                    }
                }
            }
            // A newer Service arrives: every older one keeps its addresses.
            snap.services
                .insert(r("zz-new"), svc(1_000, &[80], None, None));
            let b = allocate(&snap);
            for (s, ips) in &a.addresses {
                assert_eq!(b.addresses.get(s), Some(ips), "{s} moved");
            }
        }
    }

    fn with_node(snap: &mut Snapshot, internal: &str, external: &str) {
        snap.nodes.insert(
            "node-a".into(),
            crate::model::Node {
                name: "node-a".into(),
                internal_ips: vec![ip(internal)],
                external_ips: vec![ip(external)],
                labels: BTreeMap::new(),
                origin: "nodes.yaml".into(),
            },
        );
    }

    fn refused(a: &Allocation) -> Vec<(String, String)> {
        a.errors
            .iter()
            .filter(|e| e.kind == ErrorKind::AddressRefused)
            .map(|e| (e.object.clone(), e.field.clone()))
            .collect()
    }

    /// A Node's InternalIP or ExternalIP is never a Service's: named (with or without
    /// pools) it is refused naming the field, and allocation steps over it.
    #[test]
    fn node_addresses_are_never_a_services() {
        let mut snap = Snapshot::default();
        with_node(&mut snap, "10.0.0.2", "10.0.0.5");
        let mut asks = svc(0, &[22], None, None);
        asks.address_request.as_mut().unwrap().named_field = "spec.loadBalancerIP".into();
        snap.services.insert(
            r("thief"),
            named(asks.clone(), &["10.0.0.2", "10.0.0.9"], false),
        );
        let mut outside = svc(0, &[23], None, None);
        outside.external_ips = vec![ip("10.0.0.5")];
        snap.services.insert(r("external"), outside);
        // No pools: the node's address refused, the other named one kept.
        let a = allocate(&snap);
        assert_eq!(a.addresses[&r("thief")], vec![ip("10.0.0.9")]);
        assert_eq!(
            refused(&a),
            [
                ("Service default/external".into(), "spec.externalIPs".into()),
                ("Service default/thief".into(), "spec.loadBalancerIP".into()),
            ]
        );
        // With a pool around the node's addresses: named, refused again; allocated,
        // never one of the node's (six addresses, two of them the node's).
        snap.address_pools
            .insert("p".into(), pool(&[("10.0.0.1", "10.0.0.6")]));
        snap.services
            .insert(r("thief"), named(asks, &["10.0.0.2"], false));
        for i in 0..5 {
            snap.services
                .insert(r(&format!("s{i}")), svc(i + 1, &[80], None, None));
        }
        let a = allocate(&snap);
        assert!(a.addresses[&r("thief")].is_empty());
        // "external" asks for an address too.
        let got: BTreeSet<IpAddr> = (0..5)
            .map(|i| format!("s{i}"))
            .chain(["external".to_string()])
            .filter_map(|name| a.addresses.get(&r(&name)))
            .flatten()
            .copied()
            .collect();
        let free: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.6"]
            .iter()
            .map(|a| ip(a))
            .collect();
        assert_eq!(got, free, "four free addresses for six Services");
        assert_eq!(refused(&a).len(), 2, "{:?}", a.errors);
    }

    /// Where pools exist, a named address outside all of them is refused, unless the
    /// Service's status already shows it (a Service from before the pools).
    #[test]
    fn a_named_address_outside_every_pool_is_refused_unless_in_status() {
        let mut snap = Snapshot::default();
        snap.address_pools
            .insert("p".into(), pool(&[("10.0.0.1", "10.0.0.3")]));
        snap.services.insert(
            r("new"),
            named(svc(0, &[80], None, None), &["192.0.2.7"], false),
        );
        let mut kept = named(svc(1, &[80], None, None), &["192.0.2.8"], false);
        kept.address_request.as_mut().unwrap().status = vec![ip("192.0.2.8")];
        snap.services.insert(r("old"), kept);
        let a = allocate(&snap);
        assert!(a.addresses[&r("new")].is_empty());
        assert_eq!(a.addresses[&r("old")], vec![ip("192.0.2.8")]);
        assert_eq!(refused(&a), [("Service default/new".into(), String::new())]);
    }
}
