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
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, NodeSpec, POD_GATEWAY, SOON, UPLINK};
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
    let found = poll(
        "one owner of the VIP",
        SOON,
        Duration::from_millis(10),
        || {
            let o = owners(lab, skip)?;
            match &o[..] {
                [one] if Some(one.as_str()) != not => Ok(Some(one.clone())),
                _ => Err(anyhow::anyhow!("owners {o:?}")),
            }
        },
    );
    found.map_err(|e| {
        let logs: Vec<String> = lab
            .nodes
            .iter_mut()
            .map(|n| {
                let name = n.name.clone();
                let log = n.agent().map(|a| a.log()).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("L2") || l.contains("member"))
                    .collect();
                format!(
                    "{name}:\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect();
        e.context(logs.join("\n"))
    })
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

/// Writes `web.yaml` in `dir`: the Local UDP/TCP Service on [`VIP`] with `eps`.
fn write_web(dir: &std::path::Path, eps: &[EndpointSpec]) -> Result<()> {
    let web = multi_doc(&[
        service_yaml(
            WEB_NAMESPACE,
            WEB_SERVICE,
            &VIP.to_string(),
            &web_ports(),
            true,
        ),
        web_slice_yaml(eps),
    ]);
    write_atomic(&dir.join("web.yaml"), &web)
}

/// Three nodes with one pod each, every pod an endpoint of the Local UDP/TCP
/// Service on [`VIP`], one L2Announcement for everything; agents started.
fn l2_lab() -> Result<Lab> {
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
    write_web(&dir, &eps)?;
    write_atomic(&dir.join("l2.yaml"), L2_ALL)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    Ok(lab)
}

#[test]
fn l2_vip_is_answered_by_one_node_and_fails_over() -> Result<()> {
    let mut lab = l2_lab()?;
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

/// How an owner fails in [`failover_gap`].
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Its agent is SIGKILLed (the datapath stays, pinned).
    Sigkill,
    /// Its uplink is set down.
    LinkDown,
}

/// One failover: waits for a settled sole owner, starts the 10 ms UDP ticker, fails
/// the owner, waits until another node owns the VIP and 50 more tickets came back,
/// then repairs the failed node (agent restarted / link up) and waits for one sole
/// answerer again. Returns the ticker's largest gap and the time to the new owner.
fn failover_gap(lab: &mut Lab, how: Failure) -> Result<(Duration, Duration)> {
    let macs = macs(lab)?;
    let none = BTreeSet::new();
    let owner = wait_owner(lab, &none, None)?;
    wait_sole_answerer(lab, mac_named(&macs, &owner)?)?;
    let dst = SocketAddr::from((VIP, WEB_UDP_PORT));
    let ticker = Ticker::start(&lab.client, dst, TICK, MAX_TICKS)?;
    ticker.wait_received(20, SOON)?;
    let failed_at = Instant::now();
    match how {
        Failure::Sigkill => {
            lab.node_named_mut(&owner)?.agent()?.kill()?;
        }
        Failure::LinkDown => {
            let ns = &lab.node_named(&owner)?.host.ns;
            ns.ip(&["link", "set", UPLINK, "down"])?;
        }
    }
    let failed = BTreeSet::from([owner.clone()]);
    let next = wait_owner(lab, &failed, Some(&owner))?;
    let takeover = failed_at.elapsed();
    let n = ticker.received();
    ticker.wait_received(n + 50, SOON)?;
    let report = ticker.finish(Duration::from_millis(500))?;
    ensure!(
        report
            .by_server
            .keys()
            .any(|s| s.starts_with(&format!("{next}-"))),
        "traffic never reached {next}: {:?}",
        report.by_server
    );
    match how {
        Failure::Sigkill => {
            let agent = lab.node_named_mut(&owner)?.agent()?;
            agent.start_again()?;
            agent.wait_healthy(SOON)?;
        }
        Failure::LinkDown => {
            let ns = &lab.node_named(&owner)?.host.ns;
            ns.ip(&["link", "set", UPLINK, "up"])?;
            // Setting the link down took its routes with it; pods reach their gateway
            // through this one (see the lab's proxy-ARP note).
            ns.ip(&[
                "route",
                "replace",
                &format!("{POD_GATEWAY}/32"),
                "dev",
                UPLINK,
            ])?;
        }
    }
    // Settled again: every agent sees all three alive (the repaired node has
    // rejoined, and taken back what election gives it).
    poll(
        "membership settles",
        SOON,
        Duration::from_millis(20),
        || {
            for node in &mut lab.nodes {
                let alive = node
                    .agent()?
                    .metric("xlb_l2_members", &[("state", "alive")])?;
                if alive != 3.0 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    Ok((report.max_gap, takeover))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut v: Vec<f64> = v.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Issue 17 test 2: five failovers of each kind, every one recovering; the gaps the
/// client's 10 ms ticker saw are printed (not asserted: a shared CI machine is no
/// stopwatch; the bench reports them).
#[test]
fn l2_failover_gaps_over_runs() -> Result<()> {
    const RUNS: usize = 5;
    let mut lab = l2_lab()?;
    for how in [Failure::Sigkill, Failure::LinkDown] {
        let mut gaps = Vec::new();
        let mut takeovers = Vec::new();
        for run in 1..=RUNS {
            let (gap, takeover) =
                failover_gap(&mut lab, how).with_context(|| format!("{how:?} run {run}"))?;
            println!(
                "{how:?} run {run}: ticker max gap {:.0} ms, new owner after {:.0} ms",
                ms(gap),
                ms(takeover)
            );
            gaps.push(gap);
            takeovers.push(takeover);
        }
        println!(
            "{how:?}: median max gap {:.0} ms (worst {:.0} ms), median takeover {:.0} ms over {RUNS} runs",
            median_ms(&gaps),
            gaps.iter().map(|d| ms(*d)).fold(0.0, f64::max),
            median_ms(&takeovers)
        );
    }
    Ok(())
}

#[test]
fn a_local_vip_follows_the_only_node_with_a_ready_endpoint() -> Result<()> {
    // externalTrafficPolicy Local: only nodes with a usable local endpoint may own the
    // VIP. Leaving one node's endpoint ready moves the VIP there; moving it again moves
    // the VIP again, and ARP is answered by that node alone each time.
    let mut lab = l2_lab()?;
    let macs = macs(&lab)?;
    let none = BTreeSet::new();
    let first = wait_owner(&mut lab, &none, None)?;
    let dir = lab.manifests_dir();
    let mut previous = first;
    for round in 0..2 {
        // The next node after the current owner (in lab order) keeps the only ready
        // endpoint; the others' endpoints become not ready.
        let at = lab
            .nodes
            .iter()
            .position(|n| n.name == previous)
            .context("owner is a lab node")?;
        let target = lab.nodes[(at + 1) % lab.nodes.len()].name.clone();
        let eps: Vec<EndpointSpec> = lab
            .nodes
            .iter()
            .flat_map(|n| {
                n.pods
                    .iter()
                    .map(|p| EndpointSpec::new(p.ip, n.name == target, &n.name))
            })
            .collect();
        write_web(&dir, &eps)?;
        let owner = wait_owner(&mut lab, &none, Some(&previous))?;
        ensure!(
            owner == target,
            "round {round}: the VIP went to {owner}, but only {target} has a ready endpoint"
        );
        wait_sole_answerer(&lab, mac_named(&macs, &target)?)?;
        previous = owner;
    }
    Ok(())
}
