//! BGP against a real router (issue 19): BIRD 2 in the lab's client namespace peers with
//! the xlb agent of every node (eBGP, 4-octet private ASNs), installs what they announce
//! into its kernel table with ECMP, and forwards a client behind it (`-out` namespace)
//! to the VIPs. What the router's kernel does is what is asserted: next hops per VIP,
//! traffic reaching pods through each node with the client's address kept.
//!
//! Needs root, bird2 (`cargo xtask setup`) and the built binary (`XLB_BIN`).
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use xlb_lab::bgp_lab::{
    self, CLUSTER_VIP, bfd_profile_yaml, bgp_yaml, endpoints, lab_with_services, node_addrs,
    outside_reaches_pods_via_ecmp, router_nodes,
};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, SOON};
use xlb_lab::manifests::{WEB_VIP, multi_doc, web_udp_vip, web_yaml, write_atomic};
use xlb_lab::router::{Bird, NODE_ASN, bird_config, next_hops, outside_host};
use xlb_lab::{Ticker, poll};

/// Waits until the router's kernel route for `vip` has exactly `want` as next hops
/// (with BIRD's view of its sessions for the error); returns how long that took.
fn wait_next_hops(
    lab: &Lab,
    bird: &Bird,
    vip: Ipv4Addr,
    want: &[Ipv4Addr],
    timeout: Duration,
) -> Result<Duration> {
    bgp_lab::wait_next_hops(lab, vip, want, timeout, || {
        format!(
            "{}\n{}",
            bird.birdc(&["show", "protocols", "all"])
                .unwrap_or_default(),
            bird.log_tail(20)
        )
    })
}

#[test]
fn bird_routes_vips_over_ecmp_and_follows_local_endpoints() -> Result<()> {
    let mut lab = lab_with_services()?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), false, |_| {
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
    outside_reaches_pods_via_ecmp(&lab, &outside)?;
    // The agent publishes session state on its own schedule: poll, with a deadline.
    for node in &mut lab.nodes {
        let name = node.name.clone();
        poll(
            &format!("{name}: xlb_bgp_session_up 1"),
            SOON,
            Duration::from_millis(100),
            || {
                let up = node
                    .agent()?
                    .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
                Ok((up == 1.0).then_some(()))
            },
        )?;
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
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), false, |_| {
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
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), true, |_| {
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
    // `xlb inspect peers` and `owners` on node-a: the session Established with its two
    // prefixes (Local demo/web has an endpoint there, Cluster demo/web2), BFD Up.
    let agent = lab.node_named_mut("node-a")?.agent()?;
    poll(
        "node-a's peers view",
        SOON,
        Duration::from_millis(50),
        || {
            let v = agent.inspect_view("peers")?;
            let p = &v["peers"][0];
            ensure!(
                p["state"] == "Established" && p["advertised"] == 2 && p["bfd"]["state"] == "Up",
                "not yet: {v}"
            );
            Ok(Some(()))
        },
    )?;
    let owners = agent.inspect_view("owners")?;
    let prefixes: BTreeSet<String> = owners["bgp"]
        .as_array()
        .context("owners.bgp")?
        .iter()
        .filter_map(|r| r["prefix"].as_str().map(str::to_string))
        .collect();
    ensure!(
        prefixes == BTreeSet::from([format!("{WEB_VIP}/32"), format!("{CLUSTER_VIP}/32")]),
        "node-a announces {prefixes:?}: {owners}"
    );
    println!(
        "$ xlb inspect peers\n{}$ xlb inspect owners\n{}",
        agent.inspect_text("peers", "table")?,
        agent.inspect_text("owners", "table")?
    );

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
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), false, |node| {
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

/// `TcpExtTCPMinTTLDrop` of the namespace: TCP segments its kernel dropped for
/// arriving below a socket's `IP_MINTTL` (/proc/net/netstat is per namespace).
fn min_ttl_drops(ns: &xlb_lab::netns::Netns) -> Result<u64> {
    let text = ns.run("cat", &["/proc/net/netstat"])?;
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (
        tcp_ext.next().context("no TcpExt header")?,
        tcp_ext.next().context("no TcpExt values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "TCPMinTTLDrop")
        .context("no TCPMinTTLDrop in TcpExt")?;
    let value = values.split_whitespace().nth(at).context("short TcpExt")?;
    Ok(value.parse()?)
}

/// Issue 31, finding 7: GTSM (RFC 5082) with `ttlSecurity: true` on the BGPPeer. The
/// router (BIRD) enables `ttl security` towards node-a and node-b: their sessions come
/// up and carry the routes. Towards node-c it sends TTL 1, as direct eBGP does
/// without GTSM (as anything from further away arrives below 255): node-c's kernel
/// drops those segments (`TcpExtTCPMinTTLDrop` counts them) and that session never
/// comes up. On the landed code no session came up: xlb sent TTL 1, which BIRD's GTSM
/// drops.
#[test]
fn ttl_security_accepts_only_a_router_one_hop_away() -> Result<()> {
    let mut lab = lab_with_services()?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), false, |node| {
            if node == "node-c" {
                String::new()
            } else {
                "  ttl security on;".to_string()
            }
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  ttlSecurity: true\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_next_hops(&lab, &bird, CLUSTER_VIP, &ab, SOON)?;
    let c = &lab.node_named("node-c")?.host.ns;
    poll(
        "node-c's kernel to drop the router's TTL-1 segments",
        SOON,
        Duration::from_millis(100),
        || Ok((min_ttl_drops(c)? > 0).then_some(())),
    )?;
    let drops = min_ttl_drops(c)?;
    ensure!(
        bird.bgp_state("node_c")? != "Established",
        "node-c's session came up without GTSM on the router"
    );
    let up = lab
        .node_named_mut("node-c")?
        .agent()?
        .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
    ensure!(up == 0.0, "node-c: xlb_bgp_session_up {up}");
    println!("GTSM: node-a and node-b up; node-c dropped {drops} segments below TTL 255");
    Ok(())
}
