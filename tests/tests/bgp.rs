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
    web_udp_vip, web_yaml, write_atomic,
};
use xlb_lab::router::{
    Bird, NODE_ASN, OUTSIDE_ADDR, OUTSIDE_NET, ROUTER_ASN, bird_config, next_hops, outside_host,
};
use xlb_lab::{Ticker, poll};

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
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), false, |_| {
            "  hold time 9;".into()
        }),
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

/// `BFDProfile` `fast`: MetalLB's default timers, spelled out.
fn bfd_profile_yaml() -> String {
    "apiVersion: xlb.dev/v1alpha1\nkind: BFDProfile\nmetadata: { name: fast, namespace: xlb-system }\n\
     spec: { receiveInterval: 300, transmitInterval: 300, detectMultiplier: 3 }\n"
        .to_string()
}

fn bird_bfd_up(bird: &Bird) -> Result<usize> {
    let out = bird.birdc(&["show", "bfd", "sessions"])?;
    Ok(out
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("Up"))
        .count())
}

#[test]
fn graceful_restart_keeps_the_route_across_an_agent_restart() -> Result<()> {
    let mut lab = lab_with_services()?;
    // demo/web only on node-a: every packet to it crosses node-a, and the router has no
    // other way there (no default route) once the route is gone.
    write_atomic(
        &lab.manifests_dir().join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    lab.client.ns.ip(&["route", "del", "default"])?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), false, |_| {
            "  hold time 9;\n  graceful restart on;".into()
        }),
    )?;
    let outside = outside_host(&lab.client.ns, &format!("{}-out", lab.id()))?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  enableGracefulRestart: true\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let a = node_addrs(&lab, &["node-a"])?;
    wait_next_hops(&lab, &bird, WEB_VIP, &a, SOON)?;

    // node-a's agent restarts (SIGTERM: the TCP connection closed without a
    // NOTIFICATION); the router keeps the route as stale (RFC 4724 §4.2), the datapath
    // keeps forwarding, and the new session (Restart State bit set) refreshes it.
    let ticker = Ticker::start(&outside, web_udp_vip(), Duration::from_millis(10), 3000)?;
    ticker.wait_received(20, SOON)?;
    lab.node_named_mut("node-a")?.agent()?.stop()?;
    poll(
        "BIRD sees node-a's session close",
        SOON,
        Duration::from_millis(20),
        || Ok((bird.bgp_state("node_a")? != "Established").then_some(())),
    )?;
    if next_hops(&lab.client.ns, &format!("{WEB_VIP}/32"))? != a {
        let log = lab.node_named_mut("node-a")?.agent()?.log();
        anyhow::bail!(
            "the router dropped node-a's route while its agent restarted:\n{}\nagent:\n{}",
            bird.log_tail(30),
            xlb_lab::agent::tail(&log, 30)
        );
    }
    let down_for = Instant::now();
    let node_a = lab.node_named_mut("node-a")?;
    node_a.agent()?.start_again()?;
    node_a.agent()?.wait_healthy(SOON)?;
    poll(
        "node-a's session is back",
        SOON,
        Duration::from_millis(20),
        || Ok((bird.bgp_state("node_a")? == "Established").then_some(())),
    )?;
    let restart = down_for.elapsed();
    wait_next_hops(&lab, &bird, WEB_VIP, &a, SOON)?;
    let route = bird.birdc(&["show", "route", &format!("{WEB_VIP}/32"), "all"])?;
    ensure!(
        !route.contains("stale"),
        "the route is still stale after End-of-RIB:\n{route}"
    );
    let sent = ticker.sent();
    ticker.wait_received(sent + 20, SOON)?;
    let report = ticker.finish(Duration::from_secs(1))?;
    println!(
        "graceful restart of node-a's agent (session down {restart:?}): {} tickets, {} lost, largest gap {:?}",
        report.sent, report.lost, report.max_gap
    );
    ensure!(
        report.lost == 0,
        "traffic lost across the restart: {report:?}"
    );
    Ok(())
}

#[test]
fn bfd_withdraws_a_dead_node_within_a_second() -> Result<()> {
    let mut lab = lab_with_services()?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), true, |_| {
            "  hold time 9;\n  bfd on;".into()
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &multi_doc(&[bgp_yaml("  bfdProfile: fast\n"), bfd_profile_yaml()]),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let all = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &all, SOON)?;
    poll(
        "BIRD's three BFD sessions Up",
        SOON,
        Duration::from_millis(50),
        || Ok((bird_bfd_up(&bird)? == 3).then_some(())),
    )
    .with_context(|| bird.birdc(&["show", "bfd", "sessions"]).unwrap_or_default())?;

    // node-c's link goes down (a dead node): the router's BFD session times out and
    // BIRD withdraws the next hop, long before the 9 s hold time.
    let t0 = Instant::now();
    lab.node_named("node-c")?
        .host
        .ns
        .ip(&["link", "set", "eth0", "down"])?;
    wait_next_hops(
        &lab,
        &bird,
        CLUSTER_VIP,
        &node_addrs(&lab, &["node-a", "node-b"])?,
        SOON,
    )?;
    let link_down = t0.elapsed();
    ensure!(
        bird.log_tail(200).contains("node_c: BFD session down"),
        "BIRD did not take node-c down by BFD:\n{}",
        bird.log_tail(30)
    );

    // SIGKILL: the agent dies without a word (the kernel closes its connection).
    let t0 = Instant::now();
    lab.node_named_mut("node-b")?.agent()?.kill()?;
    wait_next_hops(
        &lab,
        &bird,
        CLUSTER_VIP,
        &node_addrs(&lab, &["node-a"])?,
        SOON,
    )?;
    let killed = t0.elapsed();

    // SIGTERM: BFD AdminDown (RFC 5880 §6.8.16) first. BIRD 2.0.12 takes a peer's
    // AdminDown for a failure (RFC 5882 §3.2 says it should not), so the route goes at
    // once: a planned withdraw.
    let t0 = Instant::now();
    lab.node_named_mut("node-a")?.agent()?.stop()?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &[], SOON)?;
    let stopped = t0.elapsed();
    println!(
        "with BFD (300 ms x 3): next hop withdrawn after link down {link_down:?}, SIGKILL {killed:?}, SIGTERM {stopped:?}"
    );
    Ok(())
}

#[test]
fn md5_passwords_and_the_hold_timer_without_bfd() -> Result<()> {
    let mut lab = lab_with_services()?;
    // The router knows node-a's and node-b's key; it expects another one from node-c.
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), false, |node| {
            let key = if node == "node-c" { "other" } else { "s3cret" };
            format!("  hold time 9;\n  password \"{key}\";")
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  password: s3cret\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &ab, SOON)?;
    // node-c's segments fail the router's MD5 check: its session stays down for as
    // long as the others have been up, and its agent reports it down.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        ensure!(
            bird.bgp_state("node_c")? != "Established",
            "node-c came up with the wrong key"
        );
        ensure!(next_hops(&lab.client.ns, &format!("{CLUSTER_VIP}/32"))? == ab);
        std::thread::sleep(Duration::from_millis(100));
    }
    let up = lab
        .node_named_mut("node-c")?
        .agent()?
        .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
    ensure!(up == 0.0, "node-c: xlb_bgp_session_up {up}");

    // Without BFD a dead node is noticed only when the hold timer (9 s) expires.
    let a = node_addrs(&lab, &["node-a"])?;
    let t0 = Instant::now();
    lab.node_named("node-b")?
        .host
        .ns
        .ip(&["link", "set", "eth0", "down"])?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &a, SOON)?;
    println!(
        "without BFD (hold time 9 s): next hop withdrawn after link down {:?}",
        t0.elapsed()
    );
    Ok(())
}
