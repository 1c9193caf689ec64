//! What a DaemonSet update does to traffic (issue 30, part 4): every node's agent in
//! turn gets SIGTERM, stays away for a rollout's pause, and a new agent takes over the
//! pinned datapath, the L2 VIP within the restart grace and the BGP session with
//! graceful restart (RFC 4724). Meanwhile a client on the LAN sends through an L2 VIP
//! and a host behind the router through a BGP VIP (both a 10 ms UDP ticker and held
//! TCP connections). Nothing may be lost: no datagram, no connection.
//!
//! Needs root, bird2 (`cargo xtask setup`) and the built binary (`XLB_BIN`).
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use xlb_lab::bgp_lab::{CLUSTER_VIP, endpoints, lab_with_services, node_addrs, router_nodes};
use xlb_lab::l2::{VIP as L2_VIP, owners, wait_owner};
use xlb_lab::lab::{CLIENT_ADDR, ManifestsLayout, REPLY_TIMEOUT, SOON};
use xlb_lab::manifests::{
    WEB_TCP_PORT, WEB_UDP_PORT, endpointslice_yaml, multi_doc, service_yaml, web_ports,
    write_atomic,
};
use xlb_lab::router::{Bird, NODE_ASN, ROUTER_ASN, bird_config, next_hops, outside_host};
use xlb_lab::traffic::LineConn;
use xlb_lab::{Ticker, poll};

/// How long a node has no agent during the rollout (the old pod gone, the new one not
/// started yet): within the default `--restart-grace` of 5 s.
const ROLLOUT_PAUSE: Duration = Duration::from_secs(2);
/// Ticker pace and bound (at most 120 s).
const TICK: Duration = Duration::from_millis(10);
const MAX_TICKS: u64 = 12_000;
/// Held TCP connections per VIP.
const CONNS: usize = 4;

/// The L2 Service (labelled `announce: l2`, Cluster policy, every pod), the BGP
/// session with graceful restart, a BGPAnnouncement for every other VIP and an
/// L2Announcement for the labelled one only: the router must not learn the LAN VIP
/// by BGP, or the client would not ARP for it.
fn announcements(all: &[xlb_lab::manifests::EndpointSpec]) -> String {
    let lan = service_yaml("demo", "lan", &L2_VIP.to_string(), &web_ports(), false).replace(
        "  namespace: demo\n",
        "  namespace: demo\n  labels: { announce: l2 }\n",
    );
    multi_doc(&[
        lan,
        endpointslice_yaml("demo", "lan-abc12", "lan", &web_ports(), all),
        format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: router, namespace: xlb-system }}\n\
             spec:\n  myASN: {NODE_ASN}\n  peerASN: {ROUTER_ASN}\n  peerAddress: {CLIENT_ADDR}\n  holdTime: 9s\n  enableGracefulRestart: true\n"
        ),
        "apiVersion: xlb.dev/v1alpha1\nkind: BGPAnnouncement\nmetadata: { name: routed, namespace: xlb-system }\n\
         spec:\n  serviceSelectors:\n  - matchExpressions: [{ key: announce, operator: DoesNotExist }]\n"
            .to_string(),
        "apiVersion: xlb.dev/v1alpha1\nkind: L2Announcement\nmetadata: { name: lan, namespace: xlb-system }\n\
         spec:\n  serviceSelectors:\n  - matchLabels: { announce: l2 }\n"
            .to_string(),
    ])
}

/// Pings every held connection once; names the first that fails.
fn ping_all(conns: &mut [LineConn], when: &str) -> Result<()> {
    for c in conns {
        let (local, peer) = (c.local(), c.peer());
        c.ping()
            .with_context(|| format!("{when}: connection {local} -> {peer} broke"))?;
    }
    Ok(())
}

#[test]
fn a_rolling_update_of_every_node_loses_no_packet_and_no_connection() -> Result<()> {
    let mut lab = lab_with_services()?;
    let all = endpoints(&lab, &["node-a", "node-b", "node-c"])?;
    write_atomic(
        &lab.manifests_dir().join("announce.yaml"),
        &announcements(&all),
    )?;
    let bird = Bird::start(
        &lab.client.ns,
        &lab.scratch().join("bird"),
        &bird_config(CLIENT_ADDR, &router_nodes(&lab), false, |_| {
            "  hold time 9;\n  graceful restart on;".into()
        }),
    )?;
    let outside = outside_host(&lab.client.ns, &format!("{}-out", lab.id()))?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let every = node_addrs(&lab, &["node-a", "node-b", "node-c"])?;
    let routed = format!("{CLUSTER_VIP}/32");
    poll(
        "the router to route the Cluster VIP via every node",
        SOON,
        Duration::from_millis(20),
        || Ok((next_hops(&lab.client.ns, &routed)? == every).then_some(())),
    )?;
    ensure!(
        next_hops(&lab.client.ns, &format!("{L2_VIP}/32"))?.is_empty(),
        "the router learnt the L2 VIP by BGP"
    );
    let none = BTreeSet::new();
    let l2_owner = wait_owner(&mut lab, &none, None)?;

    let l2_udp = SocketAddr::from((L2_VIP, WEB_UDP_PORT));
    let bgp_udp = SocketAddr::from((CLUSTER_VIP, WEB_UDP_PORT));
    let lan_ticker = Ticker::start(&lab.client, l2_udp, TICK, MAX_TICKS)?;
    let routed_ticker = Ticker::start(&outside, bgp_udp, TICK, MAX_TICKS)?;
    lan_ticker.wait_received(20, SOON)?;
    routed_ticker.wait_received(20, SOON)?;
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(
            lab.client
                .tcp_connect(SocketAddr::from((L2_VIP, WEB_TCP_PORT)), REPLY_TIMEOUT)?,
        );
        conns.push(
            outside.tcp_connect(SocketAddr::from((CLUSTER_VIP, WEB_TCP_PORT)), REPLY_TIMEOUT)?,
        );
    }
    ping_all(&mut conns, "before the rollout")?;

    let started = Instant::now();
    let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    for name in &names {
        let proto = name.replace('-', "_");
        let status = lab.node_named_mut(name)?.agent()?.stop()?;
        ensure!(
            status.success(),
            "{name}'s agent exited {status} on SIGTERM"
        );
        // The rollout's pause: the old pod is gone, the new one not started yet.
        std::thread::sleep(ROLLOUT_PAUSE);
        ensure!(
            next_hops(&lab.client.ns, &routed)? == every,
            "the router dropped {name}'s route while its agent was away:\n{}",
            bird.log_tail(30)
        );
        let agent = lab.node_named_mut(name)?.agent()?;
        agent.start_again()?;
        agent.wait_healthy(SOON)?;
        poll(
            &format!("{name}'s BGP session to be back"),
            SOON,
            Duration::from_millis(20),
            || Ok((bird.bgp_state(&proto)? == "Established").then_some(())),
        )?;
        ping_all(&mut conns, &format!("after {name}'s restart"))?;
    }
    let rollout = started.elapsed();
    poll(
        "the router to route the Cluster VIP via every node again",
        SOON,
        Duration::from_millis(20),
        || Ok((next_hops(&lab.client.ns, &routed)? == every).then_some(())),
    )?;
    let route = bird.birdc(&["show", "route", &routed, "all"])?;
    ensure!(
        !route.contains("stale"),
        "the route is still stale after the rollout:\n{route}"
    );
    ensure!(
        owners(&mut lab, &none)? == [l2_owner.clone()],
        "the L2 VIP moved off {l2_owner} during the rollout"
    );
    for t in [&lan_ticker, &routed_ticker] {
        let sent = t.sent();
        t.wait_received(sent + 20, SOON)?;
    }
    ping_all(&mut conns, "after the rollout")?;
    let lan = lan_ticker.finish(Duration::from_millis(500))?;
    let bgp = routed_ticker.finish(Duration::from_millis(500))?;
    println!(
        "rollout of 3 nodes in {rollout:?} ({ROLLOUT_PAUSE:?} without an agent each): \
         L2 VIP {} of {} lost, largest gap {:?}; BGP VIP {} of {} lost, largest gap {:?}; \
         {} TCP connections kept",
        lan.lost,
        lan.sent,
        lan.max_gap,
        bgp.lost,
        bgp.sent,
        bgp.max_gap,
        conns.len()
    );
    ensure!(lan.lost == 0, "the L2 VIP lost datagrams: {lan:?}");
    ensure!(bgp.lost == 0, "the BGP VIP lost datagrams: {bgp:?}");
    Ok(())
}
