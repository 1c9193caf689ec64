//! BGP's passive open and connection collisions (RFC 4271 §6.8, §8.2.1) against BIRD 2,
//! and LOCAL_PREF on an iBGP session (§5.1.5), issue 19. The router is BIRD in the lab's
//! client namespace (10.0.0.1); what is asserted is what BIRD and its kernel table say,
//! and which TCP connections exist (`ss` in the namespaces).
//!
//! Needs root, bird2 (`cargo xtask setup`), nft and ss, and the built binary (`XLB_BIN`).
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, Node, NodeSpec, SOON, VIP_RANGE};
use xlb_lab::manifests::{EndpointSpec, WEB_VIP, multi_doc, web_yaml, write_atomic};
use xlb_lab::netns::Netns;
use xlb_lab::poll;
use xlb_lab::router::{Bird, NODE_ASN, ROUTER_ASN, bird_config, next_hops};

/// The peer's name in the agent's metrics.
const PEER: &str = "xlb-system/router";

/// `n` nodes with one pod each, `demo/web` (Local, `WEB_VIP`) served by all of them,
/// and no static VIP route on the router: it learns the VIP by BGP or not at all.
fn lab(n: usize) -> Result<Lab> {
    let lab = Lab::multi_node(&vec![NodeSpec::with_pods(1); n])?;
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    let endpoints: Vec<EndpointSpec> = lab.nodes.iter().flat_map(Node::ready_endpoints).collect();
    write_atomic(&dir.join("web.yaml"), &web_yaml(&endpoints))?;
    lab.client.ns.ip(&["route", "del", VIP_RANGE])?;
    Ok(lab)
}

/// BGPPeer `router` (the router at CLIENT_ADDR, `peer_asn`; hold time 9 s) with
/// `extra_peer` added to its spec, and a BGPAnnouncement with `extra_ad` as its spec.
fn bgp_yaml(peer_asn: u32, extra_peer: &str, extra_ad: &str) -> String {
    multi_doc(&[
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: router, namespace: xlb-system }}\n\
             spec:\n  myASN: {NODE_ASN}\n  peerASN: {peer_asn}\n  peerAddress: {CLIENT_ADDR}\n  holdTime: 9s\n{extra_peer}"
        ),
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPAnnouncement\nmetadata: {{ name: all, namespace: xlb-system }}\n\
             spec: {{ {extra_ad} }}\n"
        ),
    ])
}

fn bird_nodes(lab: &Lab) -> Vec<(String, Ipv4Addr)> {
    lab.nodes
        .iter()
        .map(|n| (n.name.clone(), n.host.addr))
        .collect()
}

fn node_addrs(lab: &Lab) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.host.addr).collect();
    v.sort();
    v
}

/// Waits until the router's kernel routes `WEB_VIP` via exactly `want`.
fn wait_vip_via(lab: &Lab, bird: &Bird, want: &[Ipv4Addr]) -> Result<()> {
    let prefix = format!("{WEB_VIP}/32");
    poll(
        &format!("router routes {WEB_VIP} via {want:?}"),
        SOON,
        Duration::from_millis(20),
        || Ok((next_hops(&lab.client.ns, &prefix)? == want).then_some(())),
    )
    .with_context(|| {
        format!(
            "router table: {}\nbird:\n{}\n{}",
            lab.client.ns.ip(&["route"]).unwrap_or_default(),
            bird.birdc(&["show", "protocols", "all"])
                .unwrap_or_default(),
            bird.log_tail(30)
        )
    })?;
    Ok(())
}

/// The established TCP connections in `ns` between local port `lport` (0: any) and
/// remote port `rport` (0: any), as (local, remote).
fn tcp_established(ns: &Netns, lport: u16, rport: u16) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    let out = ns.run("ss", &["-Htn", "state", "established"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer
            let local = socket_addr(f.get(2)?)?;
            let peer = socket_addr(f.get(3)?)?;
            ((lport == 0 || local.port() == lport) && (rport == 0 || peer.port() == rport))
                .then_some((local, peer))
        })
        .collect())
}

/// `ss`'s `ADDR[%IFACE]:PORT` (BIRD binds its sockets to the interface).
fn socket_addr(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.split('%').next()?;
    format!("{host}:{port}").parse().ok()
}

/// Node `name`'s agent metric `name{peer}`.
fn peer_metric(lab: &mut Lab, node: &str, metric: &str) -> Result<f64> {
    lab.node_named_mut(node)?
        .agent()?
        .metric(metric, &[("peer", PEER)])
}

/// Waits until node `node`'s agent reports its session to the router up (the agent
/// samples session states every second).
fn wait_session_up(lab: &mut Lab, node: &str) -> Result<()> {
    poll(
        &format!("{node}: xlb_bgp_session_up 1"),
        SOON,
        Duration::from_millis(100),
        || Ok((peer_metric(lab, node, "xlb_bgp_session_up")? == 1.0).then_some(())),
    )
}

/// What both ends of the router's BGP connections see, for error messages.
fn connections(lab: &mut Lab) -> String {
    let mut out = format!(
        "router: {}",
        lab.client.ns.run("ss", &["-tn"]).unwrap_or_default()
    );
    for node in &mut lab.nodes {
        out.push_str(&format!(
            "\n{}: {}",
            node.name,
            node.host.ns.run("ss", &["-tn"]).unwrap_or_default()
        ));
        if let Ok(agent) = node.agent() {
            out.push_str(&xlb_lab::agent::tail(&agent.log(), 40));
        }
    }
    out
}

/// Passive open: the agents' BGPPeer names a port where the router does not listen
/// (1179), so their own connections are refused; BIRD connects to them (port 179,
/// with a TCP MD5 key, which the agents' listening socket must hold) and the
/// session comes up on BIRD's connection. A connection from an address that is no
/// peer's (another node) is closed and counted.
#[test]
fn bird_connects_to_agents_that_cannot_connect_out() -> Result<()> {
    let mut lab = lab(2)?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), false, |_| {
            "  hold time 9;\n  connect delay time 1;\n  connect retry time 1;\n  password \"s3cret\";"
                .into()
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml(ROUTER_ASN, "  peerPort: 1179\n  password: s3cret\n", ""),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let all = node_addrs(&lab);
    wait_vip_via(&lab, &bird, &all)?;
    for node in ["node_a", "node_b"] {
        ensure!(bird.bgp_state(node)? == "Established", "{node}");
    }
    for i in 0..lab.nodes.len() {
        let node = &mut lab.nodes[i];
        let name = node.name.clone();
        // The one BGP connection is the router's: it ends at the node's port 179.
        let conns = tcp_established(&node.host.ns, 179, 0)?;
        ensure!(
            conns.len() == 1 && conns[0].1.ip() == std::net::IpAddr::V4(CLIENT_ADDR),
            "{name}: BGP connections accepted on port 179: {conns:?}"
        );
        let agent = node.agent()?;
        ensure!(
            agent.log().contains("BGP: the peer connected to us"),
            "{name}: no passive open in the log:\n{}",
            xlb_lab::agent::tail(&agent.log(), 30)
        );
    }
    wait_session_up(&mut lab, "node-a")?;
    wait_session_up(&mut lab, "node-b")?;

    // node-b is no peer of node-a's: its connection to node-a's port 179 is accepted
    // by the kernel (node-a holds no MD5 key for it) and closed by the agent at once.
    let node_a = SocketAddr::from((lab.node_named("node-a")?.host.addr, 179));
    let t0 = Instant::now();
    let closed = lab.node_named("node-b")?.host.ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&node_a, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 64];
        Ok(matches!(s.read(&mut buf), Ok(0) | Err(_)))
    })?;
    ensure!(
        closed,
        "node-a sent something on a connection from a non-peer"
    );
    println!("connection from a non-peer closed after {:?}", t0.elapsed());
    poll(
        "node-a counts the refused connection",
        SOON,
        Duration::from_millis(50),
        || {
            let agent = lab.nodes[0].agent()?;
            let samples = agent.metrics()?;
            Ok(
                (xlb_lab::agent::metric_sum(&samples, "xlb_bgp_refused_connections_total", &[])
                    == Some(1.0))
                .then_some(()),
            )
        },
    )?;
    // The session with the router was not disturbed.
    ensure!(bird.bgp_state("node_a")? == "Established");
    Ok(())
}

/// nft rules in the router's namespace that drop every BGP segment carrying data
/// (an IPv4 length above 64 bytes: more than a SYN or a bare ACK), both ways, so
/// TCP connections open but no OPEN gets through until [`release_bgp_data`].
fn hold_bgp_data(ns: &Netns) -> Result<()> {
    let rules = "table inet xlb_hold {\n\
        chain input { type filter hook input priority 0; tcp sport 179 ip length > 64 drop; tcp dport 179 ip length > 64 drop; }\n\
        chain output { type filter hook output priority 0; tcp sport 179 ip length > 64 drop; tcp dport 179 ip length > 64 drop; }\n\
        }\n";
    let path = std::env::temp_dir().join(format!("{}-hold.nft", ns.name()));
    std::fs::write(&path, rules)?;
    let r = ns.run("nft", &["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
        .context("nft (Debian package nftables) is required")
}

fn release_bgp_data(ns: &Netns) -> Result<()> {
    ns.run("nft", &["delete", "table", "inet", "xlb_hold"])
        .map(|_| ())
}

/// A collision for real: both sides connect while nft holds every OPEN back, so each
/// holds two TCP connections to the other when the OPENs flow at once. Both resolve it
/// the same way (RFC 4271 §6.8: the connection opened by the higher BGP Identifier
/// stays): exactly one connection and one Established session remain, and stay.
/// `router_id`: the agent's identifier (BIRD's is 10.0.0.1); `keeps_ours`: whether
/// the agent's own connection (to the router's port 179) is the survivor.
fn collision(router_id: Ipv4Addr, keeps_ours: bool) -> Result<()> {
    let mut lab = lab(1)?;
    hold_bgp_data(&lab.client.ns)?;
    // BIRD first, trying to connect every second, so that both sides dial.
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &bird_nodes(&lab), false, |_| {
            "  hold time 9;\n  connect delay time 1;\n  connect retry time 1;".into()
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml(ROUTER_ASN, &format!("  routerID: {router_id}\n"), ""),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    // Both connections open at the TCP level (the agent's to the router's 179, the
    // router's to the node's 179), and the agent keeps both.
    let both = poll(
        "two TCP connections between router and node, OPENs held back",
        SOON,
        Duration::from_millis(50),
        || {
            Ok((tcp_established(&lab.client.ns, 179, 0)?.len() == 1
                && tcp_established(&lab.client.ns, 0, 179)?.len() == 1)
                .then_some(()))
        },
    );
    if let Err(e) = both {
        bail!(
            "{e:#}\n{}\nbird:\n{}",
            connections(&mut lab),
            bird.log_tail(30)
        );
    }
    let agent = lab.nodes[0].agent()?;
    agent.wait_for_log_line("keeping both connections", 0, SOON, |l| {
        l.contains("two connections to the peer")
    })?;
    release_bgp_data(&lab.client.ns)?;

    wait_vip_via(&lab, &bird, &node_addrs(&lab))?;
    // One connection, the expected one, and it stays up for two keepalive periods
    // (3 s each with the 9 s hold time).
    let t0 = Instant::now();
    let mut checks = 0;
    while t0.elapsed() < Duration::from_secs(7) {
        let ours = tcp_established(&lab.client.ns, 179, 0)?;
        let theirs = tcp_established(&lab.client.ns, 0, 179)?;
        let (want_ours, want_theirs) = if keeps_ours { (1, 0) } else { (0, 1) };
        if (ours.len(), theirs.len()) != (want_ours, want_theirs) {
            // The loser's close may still be in flight right after the resolution.
            if t0.elapsed() > Duration::from_secs(2) {
                bail!(
                    "connections at the router: agent's {ours:?}, router's {theirs:?}; bird:\n{}",
                    bird.log_tail(30)
                );
            }
        } else {
            checks += 1;
        }
        ensure!(
            bird.bgp_state("node_a")? == "Established",
            "session not Established:\n{}",
            bird.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(checks > 0);
    wait_session_up(&mut lab, "node-a")?;
    let collisions = peer_metric(&mut lab, "node-a", "xlb_bgp_collisions")?;
    let log = lab.nodes[0].agent()?.log();
    let resolved: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection collision resolved"))
        .collect();
    ensure!(
        collisions >= 1.0 || log.contains("continuing on the connection the peer opened"),
        "the agent resolved no collision (xlb_bgp_collisions {collisions}):\n{}",
        xlb_lab::agent::tail(&log, 40)
    );
    let established = log.matches("BGP: session established").count();
    ensure!(
        established == 1,
        "{established} sessions established:\n{}",
        xlb_lab::agent::tail(&log, 40)
    );
    let bird_log = bird.log_tail(200);
    let bird_collision: Vec<&str> = bird_log
        .lines()
        .filter(|l| l.contains("ollision"))
        .collect();
    println!(
        "collision (agent id {router_id}): agent {resolved:?}, BIRD {bird_collision:?}, survivor: {}",
        if keeps_ours {
            "the agent's connection"
        } else {
            "the router's connection"
        }
    );
    Ok(())
}

#[test]
fn collision_keeps_the_agents_connection_when_its_identifier_is_higher() -> Result<()> {
    collision(Ipv4Addr::new(10, 0, 0, 11), true)
}

#[test]
fn collision_keeps_the_routers_connection_when_its_identifier_is_higher() -> Result<()> {
    collision(Ipv4Addr::new(1, 0, 0, 11), false)
}

/// iBGP (myASN == peerASN): the announcement's `localPref` reaches the router as
/// LOCAL_PREF (RFC 4271 §5.1.5). BIRD resolves an iBGP next hop recursively by
/// default; `gateway direct` takes the node's address as the next hop on the shared
/// LAN, as for eBGP.
#[test]
fn ibgp_carries_the_announcements_local_pref() -> Result<()> {
    let mut lab = lab(1)?;
    let node = &lab.nodes[0];
    let config = format!(
        "router id {CLIENT_ADDR};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n\
         protocol bgp node_a {{\n  local {CLIENT_ADDR} as {NODE_ASN};\n  neighbor {} as {NODE_ASN};\n  direct;\n  \
         ipv4 {{ import all; export none; gateway direct; }};\n  hold time 9;\n  debug {{ states, events }};\n}}\n",
        node.host.addr
    );
    let bird = Bird::start(&lab.client.ns, &lab.scratch().join("bird"), &config)?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml(NODE_ASN, "", "localPref: 150"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    wait_vip_via(&lab, &bird, &node_addrs(&lab))?;
    let route = bird.birdc(&["show", "route", &format!("{WEB_VIP}/32"), "all"])?;
    ensure!(
        route.contains("BGP.local_pref: 150"),
        "no LOCAL_PREF 150 in:\n{route}"
    );
    // iBGP: an empty AS_PATH (§5.1.2: the originating speaker's own AS is not added).
    ensure!(
        route.lines().any(|l| l.trim() == "BGP.as_path:"),
        "AS_PATH not empty:\n{route}"
    );
    wait_session_up(&mut lab, "node-a")?;
    Ok(())
}
