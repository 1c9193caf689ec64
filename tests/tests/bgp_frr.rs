//! BGP against FRR (issue 19): the interop tests of `bgp.rs` with Debian bookworm's FRR
//! 8.4 as the router instead of BIRD 2. zebra, bgpd and bfdd run in the lab's client
//! namespace (`xlb_lab::frr`), peer with the agent of every node (eBGP, 4-octet private
//! ASNs), and zebra installs the routes into that namespace's kernel table with ECMP. What
//! is asserted is what the router's kernel forwards (next hops per VIP, a client behind
//! the router reaching pods with its address kept) and what bgpd says it received
//! (communities, large communities, AS path), on real sessions with real packets.
//!
//! Needs root, frr (`cargo xtask setup`) and the built binary (`XLB_BIN`).
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xlb_lab::bgp_lab::{
    self, CLUSTER_VIP, COMMUNITY, LARGE_COMMUNITY, bfd_profile_yaml, bgp_yaml, endpoints,
    lab_with_services, node_addrs, outside_reaches_pods_via_ecmp, router_nodes,
};
use xlb_lab::frr::{Frr, frr_config};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, SOON};
use xlb_lab::manifests::{WEB_VIP, multi_doc, web_udp_vip, web_yaml, write_atomic};
use xlb_lab::router::{NODE_ASN, next_hops, outside_host};
use xlb_lab::{Ticker, poll};

/// Waits until the router's kernel route for `vip` has exactly `want` as next hops
/// (with FRR's view of its sessions for the error); returns how long that took.
fn wait_next_hops(
    lab: &Lab,
    frr: &Frr,
    vip: Ipv4Addr,
    want: &[Ipv4Addr],
    timeout: Duration,
) -> Result<Duration> {
    bgp_lab::wait_next_hops(lab, vip, want, timeout, || {
        format!(
            "{}\n{}\nbgpd log:\n{}",
            frr.vtysh(&["show bgp summary"]).unwrap_or_default(),
            frr.vtysh(&[&format!("show bgp ipv4 unicast {vip}/32")])
                .unwrap_or_default(),
            frr.log_tail("bgpd", 30)
        )
    })
}

fn lab_addr(lab: &Lab, node: &str) -> Result<Ipv4Addr> {
    Ok(lab.node_named(node)?.host.addr)
}

#[test]
fn frr_routes_vips_over_ecmp_and_follows_local_endpoints() -> Result<()> {
    let mut lab = lab_with_services()?;
    let frr = Frr::start(
        &lab.client.ns,
        &lab.scratch().join("frr"),
        &frr_config(CLIENT_ADDR, &router_nodes(&lab), false, |_| Vec::new()),
    )?;
    let outside = outside_host(&lab.client.ns, &format!("{}-out", lab.id()))?;
    write_atomic(&lab.manifests_dir().join("bgp.yaml"), &bgp_yaml(""))?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;

    // ECMP: the Cluster VIP via every node, the Local one via the nodes with endpoints.
    let all = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_next_hops(&lab, &frr, CLUSTER_VIP, &all, SOON)?;
    wait_next_hops(&lab, &frr, WEB_VIP, &ab, SOON)?;
    for addr in &all {
        let state = frr.bgp_state(*addr)?;
        ensure!(state == "Established", "{addr}: {state}");
    }
    eprintln!(
        "FRR: {CLUSTER_VIP} via {} next hops, {WEB_VIP} via {} (kernel table)",
        all.len(),
        ab.len()
    );

    // bgpd's view: one path per announcing node, each with the announcement's
    // communities (standard and large) and the nodes' AS as the whole AS path.
    let route = frr.vtysh_json(&format!("show bgp ipv4 unicast {WEB_VIP}/32 json"))?;
    let paths = route["paths"]
        .as_array()
        .with_context(|| format!("no paths in {route}"))?;
    let mut from: Vec<Ipv4Addr> = Vec::new();
    for p in paths {
        ensure!(
            p["community"]["string"]
                .as_str()
                .is_some_and(|c| c.split(' ').any(|c| c == COMMUNITY)),
            "no community {COMMUNITY} in {p}"
        );
        ensure!(
            p["largeCommunity"]["string"]
                .as_str()
                .is_some_and(|c| c.split(' ').any(|c| c == LARGE_COMMUNITY)),
            "no large community {LARGE_COMMUNITY} in {p}"
        );
        ensure!(
            p["aspath"]["string"].as_str() == Some(&NODE_ASN.to_string()),
            "AS path is not {NODE_ASN}: {p}"
        );
        ensure!(
            p["multipath"] == true || p["bestpath"]["overall"] == true,
            "path not used for ECMP: {p}"
        );
        from.push(
            p["peer"]["peerId"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no peerId in {p}"))?,
        );
    }
    from.sort();
    ensure!(from == ab, "paths from {from:?}, expected {ab:?}");

    // A client behind the router reaches the Local VIP's pods through both nodes (the
    // router hashes flows over its next hops), with its own address kept.
    outside_reaches_pods_via_ecmp(&lab, &outside)?;

    // Local policy: node-b loses its endpoint; FRR drops that next hop.
    let dir = lab.manifests_dir();
    let written = Instant::now();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    wait_next_hops(&lab, &frr, WEB_VIP, &node_addrs(&lab, &["node-a"])?, SOON)?;
    let withdraw = written.elapsed();
    let written = Instant::now();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a", "node-b"])?),
    )?;
    wait_next_hops(&lab, &frr, WEB_VIP, &ab, SOON)?;
    let announce = written.elapsed();
    // The other VIP's routes never moved: no session was reset by the edits.
    ensure!(next_hops(&lab.client.ns, &format!("{CLUSTER_VIP}/32"))? == all);
    eprintln!(
        "FRR: Local policy, manifest edit -> router kernel table: withdraw {} ms, re-announce {} ms",
        withdraw.as_millis(),
        announce.as_millis()
    );

    // Dropping the peer closes the sessions with a Cease: FRR withdraws at once.
    std::fs::remove_file(dir.join("bgp.yaml"))?;
    wait_next_hops(&lab, &frr, CLUSTER_VIP, &[], SOON)?;
    let log = frr.log_tail("bgpd", 200).to_lowercase();
    ensure!(
        log.contains("administrative shutdown"),
        "no Cease/Administrative Shutdown in bgpd's log:\n{}",
        frr.log_tail("bgpd", 30)
    );
    Ok(())
}

#[test]
fn frr_bfd_withdraws_a_killed_and_an_unplugged_node_before_the_hold_time() -> Result<()> {
    let mut lab = lab_with_services()?;
    let frr = Frr::start(
        &lab.client.ns,
        &lab.scratch().join("frr"),
        &frr_config(CLIENT_ADDR, &router_nodes(&lab), true, |_| Vec::new()),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &multi_doc(&[bgp_yaml("  bfdProfile: fast\n"), bfd_profile_yaml()]),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let all = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    wait_next_hops(&lab, &frr, CLUSTER_VIP, &all, SOON)?;
    poll(
        "FRR's three BFD sessions Up",
        SOON,
        Duration::from_millis(20),
        || Ok((frr.bfd_up()? == all).then_some(())),
    )
    .with_context(|| {
        format!(
            "{}\nbfdd log:\n{}",
            frr.vtysh(&["show bfd peers"]).unwrap_or_default(),
            frr.log_tail("bfdd", 30)
        )
    })?;

    // node-c's link goes down (a dead node, no FIN, no NOTIFICATION): only BFD can tell
    // the router before the 9 s hold time expires.
    let t0 = Instant::now();
    lab.node_named("node-c")?
        .host
        .ns
        .ip(&["link", "set", "eth0", "down"])?;
    wait_next_hops(
        &lab,
        &frr,
        CLUSTER_VIP,
        &node_addrs(&lab, &["node-a", "node-b"])?,
        SOON,
    )?;
    let link_down = t0.elapsed();
    let c = lab_addr(&lab, "node-c")?;
    ensure!(
        !frr.bfd_up()?.contains(&c),
        "node-c's BFD session still Up after its route went"
    );

    // SIGKILL of node-b's agent: no BFD AdminDown, no NOTIFICATION; the kernel closes
    // the connection and the BFD packets stop.
    let t0 = Instant::now();
    lab.node_named_mut("node-b")?.agent()?.kill()?;
    wait_next_hops(
        &lab,
        &frr,
        CLUSTER_VIP,
        &node_addrs(&lab, &["node-a"])?,
        SOON,
    )?;
    let killed = t0.elapsed();
    eprintln!(
        "FRR with BFD (300 ms x 3): next hop gone from the kernel table after link down {} ms, SIGKILL {} ms",
        link_down.as_millis(),
        killed.as_millis()
    );
    // BFD did it, not the 9 s hold timer. The goal is within 1 s, which FRR's
    // detection time (3 x 300 ms) leaves ~100 ms of: measured (printed above), not
    // asserted, so that tests running side by side on two cores do not make it flaky.
    ensure!(
        link_down < Duration::from_secs(3) && killed < Duration::from_secs(3),
        "withdraw took link down {link_down:?}, SIGKILL {killed:?}: the hold timer, not BFD"
    );
    Ok(())
}

#[test]
fn frr_md5_right_key_establishes_wrong_key_does_not() -> Result<()> {
    let mut lab = lab_with_services()?;
    // FRR knows node-a's and node-b's key; it expects another one from node-c.
    let frr = Frr::start(
        &lab.client.ns,
        &lab.scratch().join("frr"),
        &frr_config(CLIENT_ADDR, &router_nodes(&lab), false, |node| {
            let key = if node == "node-c" { "other" } else { "s3cret" };
            vec![format!("password {key}")]
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  password: s3cret\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_next_hops(&lab, &frr, CLUSTER_VIP, &ab, SOON)?;
    for addr in &ab {
        let state = frr.bgp_state(*addr)?;
        ensure!(state == "Established", "{addr}: {state}");
    }
    // node-c's segments fail FRR's MD5 check (the kernel drops them): its session stays
    // down while the others are up, and its agent reports it down. Its agent retries
    // every few seconds; 3 s of observation covers attempts.
    let c = lab_addr(&lab, "node-c")?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let state = frr.bgp_state(c)?;
        ensure!(state != "Established", "node-c came up with the wrong key");
        ensure!(next_hops(&lab.client.ns, &format!("{CLUSTER_VIP}/32"))? == ab);
        std::thread::sleep(Duration::from_millis(100));
    }
    let up = lab
        .node_named_mut("node-c")?
        .agent()?
        .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
    ensure!(up == 0.0, "node-c: xlb_bgp_session_up {up}");
    Ok(())
}

#[test]
fn frr_graceful_restart_keeps_the_route_across_an_agent_restart() -> Result<()> {
    graceful_restart(false)
}

/// Graceful restart with BFD on the session too. On SIGTERM the agent sends BFD
/// AdminDown, which RFC 5882 §3.2 says is no failure; FRR 8.4's bgpd takes it for one
/// (Cease/BFD Down, routes withdrawn at once) unless the neighbour has `bfd
/// check-control-plane-failure`: then, the agent's BFD having the C bit clear (it shares
/// fate with its BGP speaker, RFC 5882 §4.3), bgpd ignores BFD down on a session with
/// graceful restart, and the restart is hitless. The price (measured while writing this
/// test): a dead node's route then goes only when the hold time (9 s) expires.
#[test]
fn frr_graceful_restart_with_bfd_keeps_the_route_across_an_agent_restart() -> Result<()> {
    graceful_restart(true)
}

/// node-a's agent restarts while a client behind the router sends to a VIP only node-a
/// serves; with `bfd`, a BFD session runs beside the BGP one and FRR checks the C bit.
fn graceful_restart(bfd: bool) -> Result<()> {
    let mut lab = lab_with_services()?;
    // demo/web only on node-a: every packet to it crosses node-a, and the router has no
    // other way there (no default route) once the route is gone.
    write_atomic(
        &lab.manifests_dir().join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    lab.client.ns.ip(&["route", "del", "default"])?;
    let frr = Frr::start(
        &lab.client.ns,
        &lab.scratch().join("frr"),
        &frr_config(CLIENT_ADDR, &router_nodes(&lab), bfd, |_| {
            if bfd {
                vec!["bfd check-control-plane-failure".to_string()]
            } else {
                Vec::new()
            }
        }),
    )?;
    let outside = outside_host(&lab.client.ns, &format!("{}-out", lab.id()))?;
    let peer = if bfd {
        multi_doc(&[
            bgp_yaml("  enableGracefulRestart: true\n  bfdProfile: fast\n"),
            bfd_profile_yaml(),
        ])
    } else {
        bgp_yaml("  enableGracefulRestart: true\n")
    };
    write_atomic(&lab.manifests_dir().join("bgp.yaml"), &peer)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let a = node_addrs(&lab, &["node-a"])?;
    let a_addr = a[0];
    wait_next_hops(&lab, &frr, WEB_VIP, &a, SOON)?;
    if bfd {
        poll(
            "node-a's BFD session Up",
            SOON,
            Duration::from_millis(20),
            || Ok(frr.bfd_up()?.contains(&a_addr).then_some(())),
        )?;
    }
    let nbr = frr.vtysh_json(&format!("show bgp neighbors {a_addr} json"))?;
    let gr = nbr[a_addr.to_string()]["gracefulRestartInfo"].clone();
    ensure!(
        gr["remoteGrMode"] == "Restart",
        "FRR did not see node-a's graceful restart capability: {gr}"
    );

    // node-a's agent restarts (SIGTERM: the connection closed without a NOTIFICATION);
    // FRR keeps the route as stale (RFC 4724 §4.2), the datapath keeps forwarding, and
    // the new session (Restart State bit set) refreshes it.
    let ticker = Ticker::start(&outside, web_udp_vip(), Duration::from_millis(10), 3000)?;
    ticker.wait_received(20, SOON)?;
    lab.node_named_mut("node-a")?.agent()?.stop()?;
    poll(
        "FRR sees node-a's session close",
        SOON,
        Duration::from_millis(20),
        || Ok((frr.bgp_state(a_addr)? != "Established").then_some(())),
    )?;
    if next_hops(&lab.client.ns, &format!("{WEB_VIP}/32"))? != a {
        let log = lab.node_named_mut("node-a")?.agent()?.log();
        bail!(
            "FRR dropped node-a's route while its agent restarted:\n{}\nagent:\n{}",
            frr.log_tail("bgpd", 30),
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
        || Ok((frr.bgp_state(a_addr)? == "Established").then_some(())),
    )?;
    let restart = down_for.elapsed();
    wait_next_hops(&lab, &frr, WEB_VIP, &a, SOON)?;
    // End-of-RIB from the restarted agent clears the stale mark.
    poll(
        "node-a's route is no longer stale",
        SOON,
        Duration::from_millis(50),
        || {
            let route = frr.vtysh_json(&format!("show bgp ipv4 unicast {WEB_VIP}/32 json"))?;
            let stale = route["paths"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["stale"] == true));
            Ok((!stale).then_some(()))
        },
    )
    .with_context(|| frr.log_tail("bgpd", 30))?;
    let sent = ticker.sent();
    ticker.wait_received(sent + 20, SOON)?;
    let report = ticker.finish(Duration::from_secs(1))?;
    eprintln!(
        "FRR: graceful restart of node-a's agent{} (session down {} ms): {} tickets, {} lost, largest gap {:?}",
        if bfd { " with BFD" } else { "" },
        restart.as_millis(),
        report.sent,
        report.lost,
        report.max_gap
    );
    ensure!(
        report.lost == 0,
        "traffic lost across the restart: {report:?}"
    );
    Ok(())
}
