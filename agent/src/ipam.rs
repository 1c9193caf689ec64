//! Address allocation (IPAM) for LoadBalancer Services that name no address, from
//! `AddressPool`s, with MetalLB's rules and names: a Service may name its pool
//! (`address-pool` annotation), pools are tried by `serviceAllocation.priority`
//! (lower first, unset last, then by name) among those whose `autoAssign`,
//! `namespaces` and `serviceSelectors` admit the Service, `avoidBuggyIPs` skips .0
//! and .255, and Services with the same `allow-shared-ip` key, the same traffic
//! policy and no common port/protocol share one address.
//!
//! Deterministic, so that every agent reading the same manifests computes the same
//! addresses without talking to the others: Services are served in order of
//! `metadata.creationTimestamp` (unset last), then namespace/name; each starts looking
//! at a place in the pool fixed by a hash of its namespace/name and takes the next
//! free address. An older Service therefore never loses its address to a newer one,
//! and removing a Service moves no other Service (unless that one had stepped past
//! the removed one's address, which takes a hash collision in the pool).
//!
//! Only IPv4 addresses are handed out for now (the datapath serves IPv4 VIPs); IPv6
//! ranges are accepted in pools and skipped.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use crate::model::{
    AddressPool, ConfigError, ErrorKind, Protocol, Service, ServiceRef, ServiceType, Snapshot,
    TrafficPolicy, any_selects,
};

/// The result: an address per Service that asked and got one, and why the others
/// did not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// The address each asking Service gets.
    pub addresses: BTreeMap<ServiceRef, IpAddr>,
    /// One error per Service left without (unknown pool, no pool admits it, pools
    /// exhausted).
    pub errors: Vec<ConfigError>,
}

/// Who holds an address: sharing key, traffic policy, ports.
struct Holder {
    key: Option<String>,
    policy: TrafficPolicy,
    ports: BTreeSet<(u16, Protocol)>,
}

fn ports(svc: &Service) -> BTreeSet<(u16, Protocol)> {
    svc.ports.iter().map(|p| (p.port, p.protocol)).collect()
}

/// Whether `svc` (with sharing key `key`) may join the `holders` of an address.
fn may_share(holders: &[Holder], key: Option<&str>, svc: &Service) -> bool {
    let mine = ports(svc);
    key.is_some()
        && holders.iter().all(|h| {
            h.key.as_deref() == key && h.policy == svc.traffic_policy && h.ports.is_disjoint(&mine)
        })
}

/// Allocates addresses for every Service of `snapshot` with an address request.
pub fn allocate(snapshot: &Snapshot) -> Allocation {
    let mut out = Allocation::default();
    if snapshot.address_pools.is_empty() {
        // No pools: Services without an address stay pending (as before IPAM).
        return out;
    }
    // Addresses Services named themselves, and those recovered from status (held
    // with their sharing key, so that later Services with the key may join them).
    let mut held: BTreeMap<IpAddr, Vec<Holder>> = BTreeMap::new();
    for svc in snapshot.services.values() {
        let key = match &svc.address_request {
            Some(req) if req.from_status => req.sharing_key.clone(),
            Some(_) => continue,
            None => None,
        };
        for ip in svc.vips.iter().chain(&svc.external_ips) {
            held.entry(*ip).or_default().push(Holder {
                key: key.clone(),
                policy: svc.traffic_policy,
                ports: ports(svc),
            });
        }
    }
    let mut asking: Vec<(&ServiceRef, &Service)> = snapshot
        .services
        .iter()
        .filter(|(_, s)| {
            s.service_type == ServiceType::LoadBalancer
                && s.address_request.as_ref().is_some_and(|r| !r.from_status)
        })
        .collect();
    asking.sort_by_key(|(r, s)| (s.created.unwrap_or(i64::MAX), *r));
    let mut pools: Vec<(&String, &AddressPool)> = snapshot.address_pools.iter().collect();
    pools.sort_by_key(|(name, p)| (p.priority.unwrap_or(i32::MAX), *name));
    for (sref, svc) in asking {
        let Some(req) = &svc.address_request else {
            continue;
        };
        let error = |message: String, field: &str| ConfigError {
            origin: svc.origin.clone(),
            object: format!("Service {sref}"),
            field: field.to_string(),
            message,
            kind: ErrorKind::AddressUnavailable,
        };
        let candidates: Vec<(&String, &AddressPool)> = match &req.pool {
            Some(name) => match snapshot.address_pools.get_key_value(name) {
                Some(p) => vec![p],
                None => {
                    let m = format!("no AddressPool named {name:?}; no address assigned");
                    out.errors
                        .push(error(m, "metadata.annotations[address-pool]"));
                    continue;
                }
            },
            None => pools
                .iter()
                .copied()
                .filter(|(_, p)| p.auto_assign && admits(p, sref, svc))
                .collect(),
        };
        if candidates.is_empty() {
            let m = "no AddressPool with autoAssign admits it (namespaces, serviceSelectors); no address assigned".to_string();
            out.errors.push(error(m, ""));
            continue;
        }
        let key = req.sharing_key.as_deref();
        // A shared address first, so that Services with one key stay together.
        let shared = held
            .iter()
            .filter(|(ip, h)| {
                may_share(h, key, svc) && candidates.iter().any(|(_, p)| contains(p, **ip))
            })
            .map(|(ip, _)| *ip)
            .next();
        let found = shared.or_else(|| {
            candidates
                .iter()
                .find_map(|(_, p)| free_in(p, &sref.to_string(), &held))
        });
        match found {
            Some(ip) => {
                held.entry(ip).or_default().push(Holder {
                    key: req.sharing_key.clone(),
                    policy: svc.traffic_policy,
                    ports: ports(svc),
                });
                out.addresses.insert(sref.clone(), ip);
            }
            None => {
                let names: Vec<&str> = candidates.iter().map(|(n, _)| n.as_str()).collect();
                let m = format!(
                    "no free address in {}; no address assigned",
                    names.join(", ")
                );
                out.errors.push(error(m, ""));
            }
        }
    }
    out
}

/// Whether `pool`'s `serviceAllocation` admits the Service (no constraints: all).
fn admits(pool: &AddressPool, sref: &ServiceRef, svc: &Service) -> bool {
    (pool.namespaces.is_empty() || pool.namespaces.contains(&sref.namespace))
        && any_selects(&pool.service_selectors, &svc.labels)
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

/// The IPv4 ranges of `pool` as (first, count).
fn v4_ranges(pool: &AddressPool) -> Vec<(u32, u64)> {
    pool.ranges
        .iter()
        .filter_map(|r| match r {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                Some((u32::from(*a), u64::from(u32::from(*b) - u32::from(*a)) + 1))
            }
            _ => None,
        })
        .collect()
}

/// The first free address of `pool` at or after the place `name` hashes to, going
/// round once.
fn free_in(pool: &AddressPool, name: &str, held: &BTreeMap<IpAddr, Vec<Holder>>) -> Option<IpAddr> {
    let ranges = v4_ranges(pool);
    let size: u64 = ranges.iter().map(|(_, n)| n).sum();
    if size == 0 {
        return None;
    }
    let start = fnv1a(name) % size;
    let nth = |mut i: u64| -> Ipv4Addr {
        for (first, n) in &ranges {
            if i < *n {
                // i < n <= 2^32 and first + i stays within the range: no overflow.
                return Ipv4Addr::from(first.wrapping_add(i as u32));
            }
            i -= n;
        }
        Ipv4Addr::UNSPECIFIED
    };
    (0..size)
        .map(|k| nth((start + k) % size))
        .find(|a| {
            let last = a.octets()[3];
            !(pool.avoid_buggy_ips && (last == 0 || last == 255))
                && !held.contains_key(&IpAddr::V4(*a))
        })
        .map(IpAddr::V4)
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
    use crate::model::{AddressRequest, ServicePort};

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
            static_service: None,
            address_request: Some(AddressRequest {
                pool: pool.map(String::from),
                sharing_key: key.map(String::from),
                from_status: false,
            }),
            origin: "test.yaml".into(),
        }
    }

    fn r(name: &str) -> ServiceRef {
        ServiceRef::new("default", name)
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
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
        assert_eq!(a.addresses[&r("a")], ip("10.2.0.7"));
        let low_two: BTreeSet<IpAddr> =
            [&r("b"), &r("c")].iter().map(|s| a.addresses[*s]).collect();
        assert_eq!(low_two, BTreeSet::from([ip("10.1.0.0"), ip("10.1.0.1")]));
        assert!(!a.addresses.contains_key(&r("d")));
        assert!(a.addresses[&r("m")].to_string().starts_with("10.3.0."));
        let errors: Vec<(&str, &str)> = a
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].0 == "Service default/d"
                && errors[0].1.contains("no free address in high, low")
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
        let mut old = svc(0, &[80], None, Some("k"));
        old.vips = vec![ip("10.9.9.9")];
        if let Some(req) = old.address_request.as_mut() {
            req.from_status = true;
        }
        snap.services.insert(r("old"), old.clone());
        old.vips = vec![ip("10.0.0.2")];
        snap.services.insert(r("inpool"), old);
        snap.services
            .insert(r("joins"), svc(1, &[443], None, Some("k")));
        snap.services.insert(r("new"), svc(2, &[80], None, None));
        let a = allocate(&snap);
        // Recovered ones are not allocated again; a Service with their key joins one
        // (in a pool it may use); a new one takes neither address.
        assert!(!a.addresses.contains_key(&r("old")));
        assert!(!a.addresses.contains_key(&r("inpool")));
        assert_eq!(a.addresses[&r("joins")], ip("10.0.0.2"));
        assert_ne!(a.addresses[&r("new")], ip("10.0.0.2"));
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

        let mut snap = Snapshot::default();
        let mut shop_only = pool(&[("10.0.5.1", "10.0.5.9")]);
        shop_only.namespaces = vec!["shop".into()];
        snap.address_pools.insert("shop".into(), shop_only);
        snap.services.insert(r("web"), svc(1, &[80], None, None));
        snap.services
            .insert(ServiceRef::new("shop", "web"), svc(1, &[80], None, None));
        let a = allocate(&snap);
        assert_eq!(
            a.addresses.keys().collect::<Vec<_>>(),
            [&ServiceRef::new("shop", "web")]
        );
        assert_eq!(a.errors.len(), 1);

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
        let at = |n: &str| a.addresses[&r(n)];
        assert_eq!(at("dns-tcp"), at("dns-udp"));
        for other in ["dns-clash", "other-key", "no-key"] {
            assert_ne!(at(other), at("dns-tcp"), "{other}");
        }
        let distinct: BTreeSet<IpAddr> = a.addresses.values().copied().collect();
        assert_eq!(distinct.len(), 4);
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
                let s = svc(i as i64, &[next(4) as u16 + 80], None, key.as_deref());
                snap.services.insert(r(&format!("s{i}")), s);
            }
            let a = allocate(&snap);
            assert_eq!(a, allocate(&snap));
            let mut by_ip: BTreeMap<IpAddr, Vec<&ServiceRef>> = BTreeMap::new();
            for (s, ip) in &a.addresses {
                by_ip.entry(*ip).or_default().push(s);
                assert!(snap.address_pools.values().any(|p| contains(p, *ip)));
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
            for (ip, holders) in &by_ip {
                if holders.len() > 1 {
                    let keys: BTreeSet<_> = holders
                        .iter()
                        .map(|s| {
                            snap.services[*s]
                                .address_request
                                .as_ref()
                                .unwrap()
                                .sharing_key
                                .clone()
                        })
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
            // A newer Service arrives: every older one keeps its address.
            snap.services
                .insert(r("zz-new"), svc(1_000, &[80], None, None));
            let b = allocate(&snap);
            for (s, ip) in &a.addresses {
                assert_eq!(b.addresses.get(s), Some(ip), "{s} moved");
            }
        }
    }
}
