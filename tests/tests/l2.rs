//! L2 announcement in the multi-node lab (issue 17): the client reaches a VIP on its
//! own subnet by ARP alone (no route, no static neighbour for it), exactly one node
//! answers, and the VIP moves when the owner's agent is SIGKILLed or the owner's
//! link goes down. Failover is measured (printed), never asserted against a clock.
//! Needs root and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use xlb_lab::arp::{Mac, mac_of, neighbour, who_has};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, NodeSpec, SOON, UPLINK};
use xlb_lab::manifests::{
    EndpointSpec, WEB_NAMESPACE, WEB_SERVICE, WEB_UDP_PORT, multi_doc, service_yaml, web_ports,
    web_slice_yaml, write_atomic,
};
use xlb_lab::poll;
use xlb_lab::traffic::Ticker;

/// A VIP on the LAN's own /24, so the client ARPs for it.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);
/// How long ARP replies are collected after a request.
const ARP_WINDOW: Duration = Duration::from_millis(200);
/// Ticker pace and bound (10 ms, at most 60 s).
const TICK: Duration = Duration::from_millis(10);
const MAX_TICKS: u64 = 6_000;

const L2_ALL: &str = "apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: lan, namespace: xlb-system }
";

/// Node name -> its uplink MAC.
fn macs(lab: &Lab) -> Result<Vec<(String, Mac)>> {
    lab.nodes
        .iter()
        .map(|n| Ok((n.name.clone(), mac_of(&n.host.ns, UPLINK)?)))
        .collect()
}

/// The nodes whose agent reports owning a VIP (agents that are not running are
/// skipped).
fn owners(lab: &mut Lab, skip: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for node in &mut lab.nodes {
        if skip.contains(&node.name) {
            continue;
        }
        if node.agent()?.metric("xlb_l2_owned_vips", &[])? > 0.0 {
            out.push(node.name.clone());
        }
    }
    Ok(out)
}

/// Polls until exactly one node (outside `skip`) owns the VIP other than `not`, and
/// returns it.
fn wait_owner(lab: &mut Lab, skip: &BTreeSet<String>, not: Option<&str>) -> Result<String> {
    poll(
        "one owner of the VIP",
        SOON,
        Duration::from_millis(10),
        || {
            let o = owners(lab, skip)?;
            Ok(match &o[..] {
                [one] if Some(one.as_str()) != not => Some(one.clone()),
                _ => None,
            })
        },
    )
}

/// Polls until ARP for the VIP is answered by `mac` alone.
fn wait_sole_answerer(lab: &Lab, mac: Mac) -> Result<()> {
    poll(
        "only the owner answers ARP",
        SOON,
        Duration::from_millis(50),
        || {
            let got = who_has(&lab.client.ns, UPLINK, CLIENT_ADDR, VIP, ARP_WINDOW)?;
            Ok((got == BTreeSet::from([mac])).then_some(()))
        },
    )
}

fn mac_named(macs: &[(String, Mac)], name: &str) -> Result<Mac> {
    macs.iter()
        .find(|(n, _)| n == name)
        .map(|(_, m)| *m)
        .with_context(|| format!("no node {name}"))
}

#[test]
fn l2_vip_is_answered_by_one_node_and_fails_over() -> Result<()> {
    let mut lab = Lab::multi_node(&[1, 1, 1].map(NodeSpec::with_pods))?;
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    let eps: Vec<EndpointSpec> = lab
        .nodes
        .iter()
        .flat_map(|n| {
            n.pods
                .iter()
                .map(|p| EndpointSpec::new(p.ip, true, &n.name))
        })
        .collect();
    let web = multi_doc(&[
        service_yaml(
            WEB_NAMESPACE,
            WEB_SERVICE,
            &VIP.to_string(),
            &web_ports(),
            true,
        ),
        web_slice_yaml(&eps),
    ]);
    write_atomic(&dir.join("web.yaml"), &web)?;
    write_atomic(&dir.join("l2.yaml"), L2_ALL)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let macs = macs(&lab)?;
    let dst = SocketAddr::from((VIP, WEB_UDP_PORT));

    // 1. One owner; only it answers ARP; the client learns its MAC by ARP and is served.
    let none = BTreeSet::new();
    let first = wait_owner(&mut lab, &none, None)?;
    let first_mac = mac_named(&macs, &first)?;
    wait_sole_answerer(&lab, first_mac)?;
    let route = lab.client.ns.ip(&["route", "get", &VIP.to_string()])?;
    ensure!(
        !route.contains(" via "),
        "the VIP is routed, not on-link: {route}"
    );
    let reply = poll("the VIP answers", SOON, Duration::from_millis(50), || {
        lab.client.udp_probe(dst, Duration::from_millis(300))
    })?;
    ensure!(
        reply.server.starts_with(&format!("{first}-")),
        "served by {} but {first} owns the VIP",
        reply.server
    );
    ensure!(
        neighbour(&lab.client.ns, UPLINK, VIP)? == Some(first_mac),
        "client's neighbour entry for {VIP} does not point at {first}"
    );
    println!("owner {first}: sole ARP answerer, client's neighbour entry points at it");

    // 2. SIGKILL the owner's agent: another node takes over and the client follows;
    //    the dead agent's pinned program stops answering after its deadline.
    let ticker = Ticker::start(&lab.client, dst, TICK, MAX_TICKS)?;
    ticker.wait_received(20, SOON)?;
    let killed_at = Instant::now();
    lab.node_named_mut(&first)?.agent()?.kill()?;
    let dead = BTreeSet::from([first.clone()]);
    let second = wait_owner(&mut lab, &dead, Some(&first))?;
    let takeover = killed_at.elapsed();
    let second_mac = mac_named(&macs, &second)?;
    poll(
        "the client's entry moves",
        SOON,
        Duration::from_millis(10),
        || Ok((neighbour(&lab.client.ns, UPLINK, VIP)? == Some(second_mac)).then_some(())),
    )?;
    let moved = killed_at.elapsed();
    let n = ticker.received();
    ticker.wait_received(n + 50, SOON)?;
    let report = ticker.finish(Duration::from_millis(500))?;
    wait_sole_answerer(&lab, second_mac)?;
    println!(
        "SIGKILL {first}: {second} owned the VIP after {:.0} ms, client's entry moved after {:.0} ms; ticker max gap {:.0} ms, lost {} of {}, served by {:?}",
        takeover.as_secs_f64() * 1e3,
        moved.as_secs_f64() * 1e3,
        report.max_gap.as_secs_f64() * 1e3,
        report.lost,
        report.sent,
        report.by_server
    );
    ensure!(
        report
            .by_server
            .keys()
            .any(|s| s.starts_with(&format!("{second}-"))),
        "traffic never reached {second}: {:?}",
        report.by_server
    );

    // 3. The new owner's link goes down: it gives the VIP up, the third node takes
    //    over and traffic resumes.
    let ticker = Ticker::start(&lab.client, dst, TICK, MAX_TICKS)?;
    ticker.wait_received(20, SOON)?;
    let down_at = Instant::now();
    lab.node_named(&second)?
        .host
        .ns
        .ip(&["link", "set", UPLINK, "down"])?;
    let mut skip = dead.clone();
    skip.insert(second.clone());
    let third = wait_owner(&mut lab, &skip, Some(&second))?;
    let takeover = down_at.elapsed();
    poll(
        "the link-down node gives the VIP up",
        SOON,
        Duration::from_millis(10),
        || {
            let owned = lab
                .node_named_mut(&second)?
                .agent()?
                .metric("xlb_l2_owned_vips", &[])?;
            Ok((owned == 0.0).then_some(()))
        },
    )?;
    let n = ticker.received();
    ticker.wait_received(n + 50, SOON)?;
    let report = ticker.finish(Duration::from_millis(500))?;
    println!(
        "link down on {second}: {third} owned the VIP after {:.0} ms; ticker max gap {:.0} ms, lost {} of {}, served by {:?}",
        takeover.as_secs_f64() * 1e3,
        report.max_gap.as_secs_f64() * 1e3,
        report.lost,
        report.sent,
        report.by_server
    );
    ensure!(
        report
            .by_server
            .keys()
            .any(|s| s.starts_with(&format!("{third}-"))),
        "traffic never reached {third}: {:?}",
        report.by_server
    );
    wait_sole_answerer(&lab, mac_named(&macs, &third)?)?;
    Ok(())
}
