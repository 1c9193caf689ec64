//! The lab every BGP interop test uses, whichever router daemon it peers with (BIRD 2 in
//! `tests/tests/bgp.rs`, FRR in `bgp_frr.rs`, GoBGP in `bgp_gobgp.rs`): three nodes with
//! one pod each, a Local and a Cluster Service, the agents' `BGPPeer`/`BGPAnnouncement`
//! manifests, and waiting on the router's kernel table.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::lab::{CLIENT_ADDR, Lab, NodeSpec, VIP_RANGE};
use crate::manifests::{
    EndpointSpec, endpointslice_yaml, multi_doc, service_yaml, web_ports, web_tcp_vip, web_yaml,
    write_atomic,
};
use crate::poll;
use crate::router::{NODE_ASN, OUTSIDE_ADDR, OUTSIDE_NET, ROUTER_ASN, next_hops};
use crate::traffic::Host;

/// The Cluster-policy Service's VIP (the standard `demo/web` is Local, on 10.0.100.1).
pub const CLUSTER_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 100, 2);

/// The standard community every announcement carries (`bgp_yaml`).
pub const COMMUNITY: &str = "64512:100";
/// The large community every announcement carries (`bgp_yaml`), as `a:b:c`.
pub const LARGE_COMMUNITY: &str = "4200000001:1:2";

/// BGPPeer and BGPAnnouncement for the router at CLIENT_ADDR. Hold time 9 s: the
/// lab's sessions never idle long; `extra_peer` adds fields to the peer's spec.
pub fn bgp_yaml(extra_peer: &str) -> String {
    multi_doc(&[
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: router, namespace: xlb-system }}\n\
             spec:\n  myASN: {NODE_ASN}\n  peerASN: {ROUTER_ASN}\n  peerAddress: {CLIENT_ADDR}\n  holdTime: 9s\n{extra_peer}"
        ),
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPAnnouncement\nmetadata: {{ name: all, namespace: xlb-system }}\n\
             spec:\n  communities: [\"{COMMUNITY}\", \"large:{LARGE_COMMUNITY}\"]\n"
        ),
    ])
}

/// `BFDProfile` `fast`: MetalLB's default timers, spelled out.
pub fn bfd_profile_yaml() -> String {
    "apiVersion: xlb.dev/v1alpha1\nkind: BFDProfile\nmetadata: { name: fast, namespace: xlb-system }\n\
     spec: { receiveInterval: 300, transmitInterval: 300, detectMultiplier: 3 }\n"
        .to_string()
}

/// The lab: three nodes with one pod each; `demo/web` (Local) has endpoints on node-a
/// and node-b, `demo/web2` (Cluster) on all three. The client namespace (the router)
/// has no static VIP route: it learns them by BGP.
pub fn lab_with_services() -> Result<Lab> {
    let lab = Lab::multi_node(&[
        NodeSpec::with_pods(1),
        NodeSpec::with_pods(1),
        NodeSpec::with_pods(1),
    ])?;
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a", "node-b"])?),
    )?;
    let all = endpoints(&lab, &["node-a", "node-b", "node-c"])?;
    write_atomic(
        &dir.join("web2.yaml"),
        &multi_doc(&[
            service_yaml(
                "demo",
                "web2",
                &CLUSTER_VIP.to_string(),
                &web_ports(),
                false,
            ),
            endpointslice_yaml("demo", "web2-abc12", "web2", &web_ports(), &all),
        ]),
    )?;
    // The router learns the VIPs by BGP: no static route to one node.
    lab.client.ns.ip(&["route", "del", VIP_RANGE])?;
    // The nodes reach the outside network through the router, as a default route would.
    for node in &lab.nodes {
        node.host
            .ns
            .ip(&["route", "add", OUTSIDE_NET, "via", &CLIENT_ADDR.to_string()])?;
    }
    Ok(lab)
}

/// The ready endpoints of the pods on `nodes`.
pub fn endpoints(lab: &Lab, nodes: &[&str]) -> Result<Vec<EndpointSpec>> {
    let mut out = Vec::new();
    for name in nodes {
        out.extend(lab.node_named(name)?.ready_endpoints());
    }
    Ok(out)
}

/// The addresses of the nodes `names`, sorted (as [`next_hops`] returns them).
pub fn node_addrs(lab: &Lab, names: &[&str]) -> Result<Vec<Ipv4Addr>> {
    let mut v: Vec<Ipv4Addr> = names
        .iter()
        .map(|n| lab.node_named(n).map(|n| n.host.addr))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Every node as (name, address): the router's neighbours.
pub fn router_nodes(lab: &Lab) -> Vec<(String, Ipv4Addr)> {
    lab.nodes
        .iter()
        .map(|n| (n.name.clone(), n.host.addr))
        .collect()
}

/// Waits until the router's kernel route for `vip` has exactly `want` as next hops;
/// returns how long that took. `diag` says what the router daemon thinks, for the
/// error.
pub fn wait_next_hops(
    lab: &Lab,
    vip: Ipv4Addr,
    want: &[Ipv4Addr],
    timeout: Duration,
    diag: impl Fn() -> String,
) -> Result<Duration> {
    let start = Instant::now();
    let prefix = format!("{vip}/32");
    poll(
        &format!("router routes {vip} via {want:?}"),
        timeout,
        Duration::from_millis(10),
        || Ok((next_hops(&lab.client.ns, &prefix)? == want).then_some(())),
    )
    .with_context(|| {
        format!(
            "router table: {}\nrouter daemon:\n{}",
            lab.client.ns.ip(&["route"]).unwrap_or_default(),
            diag()
        )
    })?;
    Ok(start.elapsed())
}

/// A client behind the router (`outside`, from [`crate::router::outside_host`]) reaches
/// the Local VIP's pods through node-a and node-b (the router hashes flows over its next
/// hops: 40 TCP connections see both pods), and the Cluster VIP (20 connections), with
/// its own address kept every time.
pub fn outside_reaches_pods_via_ecmp(lab: &Lab, outside: &Host) -> Result<()> {
    let replies = outside.tcp_flows(web_tcp_vip(), 40, Duration::from_secs(1))?;
    let servers: BTreeSet<String> = replies.iter().map(|r| r.server.clone()).collect();
    let expected: BTreeSet<String> = ["node-a", "node-b"]
        .iter()
        .flat_map(|n| lab.node_named(n).map(|n| n.pods[0].name.clone()))
        .collect();
    ensure!(
        servers == expected,
        "40 connections answered by {servers:?}, expected {expected:?}"
    );
    for r in &replies {
        ensure!(r.seen_peer.ip() == IpAddr::V4(OUTSIDE_ADDR), "{r:?}");
    }
    let cluster = outside.tcp_flows(
        SocketAddr::from((CLUSTER_VIP, 80)),
        20,
        Duration::from_secs(1),
    )?;
    ensure!(
        cluster.len() == 20
            && cluster
                .iter()
                .all(|r| r.seen_peer.ip() == IpAddr::V4(OUTSIDE_ADDR)),
        "Cluster VIP from outside: {cluster:?}"
    );
    Ok(())
}
