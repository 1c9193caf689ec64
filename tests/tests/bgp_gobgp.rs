//! BGP against GoBGP (issue 19): the agents' sessions with Debian's GoBGP 3.10 as the
//! router. GoBGP runs without its `zebra` integration here, so it installs nothing into
//! the router namespace's kernel table: these tests assert GoBGP's RIB (`gobgp global
//! rib -j`) instead of next hops and client traffic (which `bgp.rs` and `bgp_frr.rs`
//! check against BIRD 2 and FRR): one path per announcing node with that node as next
//! hop, the communities, the Local-policy withdraw, TCP MD5, and graceful restart
//! (the path kept stale across an agent restart, refreshed by End-of-RIB). GoBGP has
//! no BFD.
//!
//! Needs root, gobgpd (`cargo xtask setup`) and the built binary (`XLB_BIN`).
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xlb_lab::bgp_lab::{
    CLUSTER_VIP, COMMUNITY, LARGE_COMMUNITY, bgp_yaml, endpoints, lab_with_services, node_addrs,
    router_nodes,
};
use xlb_lab::gobgp::{GoBgp, RibPath, gobgp_config};
use xlb_lab::lab::{CLIENT_ADDR, ManifestsLayout, SOON};
use xlb_lab::manifests::{WEB_VIP, web_yaml, write_atomic};
use xlb_lab::poll;
use xlb_lab::router::NODE_ASN;

/// Waits until GoBGP holds exactly one path for `vip` from each of `want` (the
/// neighbour and next hop being that node); returns those paths and how long it took.
fn wait_paths(
    gobgp: &GoBgp,
    vip: Ipv4Addr,
    want: &[Ipv4Addr],
    timeout: Duration,
) -> Result<(Vec<RibPath>, Duration)> {
    let start = Instant::now();
    let prefix = format!("{vip}/32");
    let paths = poll(
        &format!("GoBGP holds {vip} from {want:?}"),
        timeout,
        Duration::from_millis(10),
        || {
            let paths = gobgp.rib(&prefix)?;
            let from: Vec<Ipv4Addr> = paths.iter().map(|p| p.neighbor).collect();
            Ok((from == want && paths.iter().all(|p| p.next_hop == p.neighbor)).then_some(paths))
        },
    )
    .with_context(|| {
        format!(
            "rib: {:?}\n{}\n{}",
            gobgp.rib(&prefix).unwrap_or_default(),
            gobgp.gobgp(&["neighbor"]).unwrap_or_default(),
            gobgp.log_tail(20)
        )
    })?;
    Ok((paths, start.elapsed()))
}

#[test]
fn gobgp_holds_a_path_per_node_with_communities_and_follows_local_endpoints() -> Result<()> {
    let mut lab = lab_with_services()?;
    let gobgp = GoBgp::start(
        &lab.client.ns,
        &lab.scratch().join("gobgp"),
        &gobgp_config(CLIENT_ADDR, &router_nodes(&lab), |_| None),
    )?;
    write_atomic(&lab.manifests_dir().join("bgp.yaml"), &bgp_yaml(""))?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;

    let all = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_paths(&gobgp, CLUSTER_VIP, &all, SOON)?;
    let (paths, _) = wait_paths(&gobgp, WEB_VIP, &ab, SOON)?;
    for addr in &all {
        let state = gobgp.bgp_state(*addr)?;
        ensure!(state == "established", "{addr}: {state}");
    }
    for p in &paths {
        ensure!(p.as_path == [NODE_ASN], "AS path: {p:?}");
        ensure!(
            p.communities.iter().any(|c| c == COMMUNITY),
            "no community {COMMUNITY}: {p:?}"
        );
        ensure!(
            p.large_communities.iter().any(|c| c == LARGE_COMMUNITY),
            "no large community {LARGE_COMMUNITY}: {p:?}"
        );
    }

    // Local policy: node-b loses its endpoint; its path goes from GoBGP's RIB.
    let dir = lab.manifests_dir();
    let written = Instant::now();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    wait_paths(&gobgp, WEB_VIP, &node_addrs(&lab, &["node-a"])?, SOON)?;
    let withdraw = written.elapsed();
    write_atomic(
        &dir.join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a", "node-b"])?),
    )?;
    wait_paths(&gobgp, WEB_VIP, &ab, SOON)?;
    let cluster: Vec<Ipv4Addr> = gobgp
        .rib(&format!("{CLUSTER_VIP}/32"))?
        .iter()
        .map(|p| p.neighbor)
        .collect();
    ensure!(cluster == all, "the Cluster VIP's paths moved: {cluster:?}");
    eprintln!(
        "GoBGP: Local policy, manifest edit -> path gone from GoBGP's RIB: {} ms",
        withdraw.as_millis()
    );

    // Dropping the peer closes the sessions: GoBGP drops every path.
    std::fs::remove_file(dir.join("bgp.yaml"))?;
    wait_paths(&gobgp, CLUSTER_VIP, &[], SOON)?;
    Ok(())
}

#[test]
fn gobgp_md5_right_key_establishes_wrong_key_does_not() -> Result<()> {
    let mut lab = lab_with_services()?;
    let gobgp = GoBgp::start(
        &lab.client.ns,
        &lab.scratch().join("gobgp"),
        &gobgp_config(CLIENT_ADDR, &router_nodes(&lab), |node| {
            Some(if node == "node-c" { "other" } else { "s3cret" }.to_string())
        }),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  password: s3cret\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let ab = node_addrs(&lab, &["node-a", "node-b"])?;
    wait_paths(&gobgp, CLUSTER_VIP, &ab, SOON)?;
    let c = lab.node_named("node-c")?.host.addr;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let state = gobgp.bgp_state(c)?;
        ensure!(state != "established", "node-c came up with the wrong key");
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
fn gobgp_graceful_restart_keeps_the_path_across_an_agent_restart() -> Result<()> {
    let mut lab = lab_with_services()?;
    write_atomic(
        &lab.manifests_dir().join("web.yaml"),
        &web_yaml(&endpoints(&lab, &["node-a"])?),
    )?;
    let gobgp = GoBgp::start(
        &lab.client.ns,
        &lab.scratch().join("gobgp"),
        &gobgp_config(CLIENT_ADDR, &router_nodes(&lab), |_| None),
    )?;
    write_atomic(
        &lab.manifests_dir().join("bgp.yaml"),
        &bgp_yaml("  enableGracefulRestart: true\n"),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let a = node_addrs(&lab, &["node-a"])?;
    wait_paths(&gobgp, WEB_VIP, &a, SOON)?;

    // SIGTERM: the agent closes the connection without a NOTIFICATION; GoBGP keeps
    // node-a's path, marked stale, until the restarted agent's End-of-RIB. (GoBGP closes
    // connections that arrive during its 5 s idle hold after the peer went down, so the
    // restarted agent gets in on its next connect attempt.)
    lab.node_named_mut("node-a")?.agent()?.stop()?;
    poll(
        "GoBGP sees node-a's session close",
        SOON,
        Duration::from_millis(20),
        || Ok((gobgp.bgp_state(a[0])? != "established").then_some(())),
    )?;
    let prefix = format!("{WEB_VIP}/32");
    let kept = gobgp.rib(&prefix)?;
    if kept.len() != 1 || !kept[0].stale {
        bail!(
            "GoBGP did not keep node-a's path as stale: {kept:?}\n{}",
            gobgp.log_tail(30)
        );
    }
    let down_for = Instant::now();
    let node_a = lab.node_named_mut("node-a")?;
    node_a.agent()?.start_again()?;
    node_a.agent()?.wait_healthy(SOON)?;
    poll(
        "node-a's path refreshed (not stale)",
        SOON,
        Duration::from_millis(20),
        || {
            let paths = gobgp.rib(&prefix)?;
            Ok((paths.len() == 1 && !paths[0].stale && paths[0].neighbor == a[0]).then_some(()))
        },
    )
    .with_context(|| gobgp.log_tail(30))?;
    eprintln!(
        "GoBGP: graceful restart of node-a's agent: path kept stale, refreshed {} ms after the restart began",
        down_for.elapsed().as_millis()
    );
    Ok(())
}
