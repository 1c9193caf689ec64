//! BGP against a real router (issue 19): BIRD 2 in the lab's client namespace peers with
//! the xlb agent of every node (eBGP, 4-octet private ASNs), installs what they announce
//! into its kernel table with ECMP, and forwards a client behind it (`-out` namespace)
//! to the VIPs. What the router's kernel does is what is asserted: next hops per VIP,
//! traffic reaching pods through each node with the client's address kept.
//!
//! Needs root, bird2 (`cargo xtask setup`) and the built binary (`XLB_BIN`).
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, NodeSpec, SOON, VIP_RANGE};
use xlb_lab::manifests::{
    EndpointSpec, WEB_VIP, endpointslice_yaml, multi_doc, service_yaml, web_ports, web_tcp_vip,
    web_yaml, write_atomic,
};
use xlb_lab::poll;
use xlb_lab::router::{
    Bird, NODE_ASN, OUTSIDE_ADDR, OUTSIDE_NET, ROUTER_ASN, bird_config, next_hops, outside_host,
};

/// The Cluster-policy Service's VIP (the standard `demo/web` is Local, on 10.0.100.1).
const CLUSTER_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 100, 2);

/// BGPPeer and BGPAnnouncement for the router at CLIENT_ADDR. Hold time 9 s: the
/// lab's sessions never idle long; `extra_peer` adds fields to the peer's spec.
fn bgp_yaml(extra_peer: &str) -> String {
    multi_doc(&[
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: router, namespace: xlb-system }}\n\
             spec:\n  myASN: {NODE_ASN}\n  peerASN: {ROUTER_ASN}\n  peerAddress: {CLIENT_ADDR}\n  holdTime: 9s\n{extra_peer}"
        ),
        "apiVersion: xlb.dev/v1alpha1\nkind: BGPAnnouncement\nmetadata: { name: all, namespace: xlb-system }\n\
         spec:\n  communities: [\"64512:100\", \"large:4200000001:1:2\"]\n"
            .to_string(),
    ])
}

/// The lab: three nodes with one pod each; `demo/web` (Local) has endpoints on node-a
/// and node-b, `demo/web2` (Cluster) on all three.
fn lab_with_services() -> Result<Lab> {
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

fn endpoints(lab: &Lab, nodes: &[&str]) -> Result<Vec<EndpointSpec>> {
    let mut out = Vec::new();
    for name in nodes {
        let n = lab.node_named(name)?;
        out.extend(
            n.pods
                .iter()
                .map(|p| EndpointSpec::new(p.ip, true, &n.name)),
        );
    }
    Ok(out)
}

fn node_addrs(lab: &Lab, names: &[&str]) -> Result<Vec<Ipv4Addr>> {
    let mut v: Vec<Ipv4Addr> = names
        .iter()
        .map(|n| lab.node_named(n).map(|n| n.host.addr))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

fn bird_nodes(lab: &Lab) -> Vec<(String, Ipv4Addr)> {
    lab.nodes
        .iter()
        .map(|n| (n.name.clone(), n.host.addr))
        .collect()
}

/// Waits until the router's kernel route for `vip` has exactly `want` as next hops;
/// returns how long that took.
fn wait_next_hops(
    lab: &Lab,
    bird: &Bird,
    vip: Ipv4Addr,
    want: &[Ipv4Addr],
    timeout: Duration,
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
            "router table: {}\nbird:\n{}\n{}",
            lab.client.ns.ip(&["route"]).unwrap_or_default(),
            bird.birdc(&["show", "protocols", "all"])
                .unwrap_or_default(),
            bird.log_tail(20)
        )
    })?;
    Ok(start.elapsed())
}

#[test]
fn bird_routes_vips_over_ecmp_and_follows_local_endpoints() -> Result<()> {
    let mut lab = lab_with_services()?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), "  hold time 9;"),
    )?;
    let outside = outside_host(&lab.client.ns, &format!("{}-out", lab.id()))?;
    write_atomic(&lab.manifests_dir().join("bgp.yaml"), &bgp_yaml(""))?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;

    // ECMP: the Cluster VIP via every node, the Local one via the nodes with endpoints.
    let all = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &all, SOON)?;
    wait_next_hops(&lab, &bird, WEB_VIP, &ab, SOON)?;
    for node in ["node_a", "node_b", "node_c"] {
        ensure!(
            bird.bgp_state(node)? == "Established",
            "{node}: {}",
            bird.bgp_state(node)?
        );
    }
    // The route carries the announcement's communities, standard and large.
    let route = bird.birdc(&["show", "route", &format!("{WEB_VIP}/32"), "all"])?;
    ensure!(
        route.contains("(64512,100)"),
        "no community 64512:100 in:\n{route}"
    );
    ensure!(
        route.contains("(4200000001, 1, 2)"),
        "no large community in:\n{route}"
    );
    ensure!(
        route.contains(&format!("{NODE_ASN}")),
        "AS path without {NODE_ASN}:\n{route}"
    );

    // A client behind the router reaches the Local VIP's pods through both nodes (the
    // router hashes flows over its next hops), with its own address kept.
    let tcp_dst = web_tcp_vip();
    let replies = outside.tcp_flows(tcp_dst, 40, Duration::from_secs(1))?;
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
        ensure!(
            r.seen_peer.ip() == std::net::IpAddr::V4(OUTSIDE_ADDR),
            "{r:?}"
        );
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
                .all(|r| r.seen_peer.ip() == std::net::IpAddr::V4(OUTSIDE_ADDR))
    );
    for node in &mut lab.nodes {
        let name = node.name.clone();
        let up = node
            .agent()?
            .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
        ensure!(up == 1.0, "{name}: xlb_bgp_session_up {up}");
    }

    // Local policy: node-b loses its endpoint; the router drops that next hop.
    let dir = lab.manifests_dir();
    let written = Instant::now();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    wait_next_hops(&lab, &bird, WEB_VIP, &node_addrs(&lab, &["node-a"])?, SOON)?;
    let withdraw = written.elapsed();
    // Restored: announced again.
    let written = Instant::now();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a", "node-b"])?),
    )?;
    wait_next_hops(&lab, &bird, WEB_VIP, &ab, SOON)?;
    let announce = written.elapsed();
    // The other VIP's routes never moved: no session was reset by the edits.
    ensure!(next_hops(&lab.client.ns, &format!("{CLUSTER_VIP}/32"))? == all);
    println!(
        "Local policy: manifest edit -> router kernel table: withdraw {withdraw:?}, re-announce {announce:?}"
    );

    // Dropping the peer closes the sessions with a Cease: the router withdraws at once.
    std::fs::remove_file(dir.join("bgp.yaml"))?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &[], SOON)?;
    let log = bird.log_tail(50);
    ensure!(
        log.contains("Administrative shutdown") || log.contains("administrative shutdown"),
        "no Cease in BIRD's log:\n{log}"
    );
    Ok(())
}
