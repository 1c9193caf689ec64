//! The control-plane VIP without Kubernetes (issue 17, test 6): a StaticService in
//! front of three API-server-like backends, one on each node's own address, each with
//! an HTTP health endpoint, announced on the LAN by ARP. From the owner, its own
//! backend is reached by DNAT and the other two by source NAT (they see the owner's
//! address; no route or neighbour entry was prepared for either direction).
//!
//! - a backend whose health endpoint fails gets no new connections; an established
//!   connection to another backend is untouched; restored, it gets them again;
//! - the owner whose own backend fails gives the VIP up, and the VIP keeps working
//!   through the next owner.
//!
//! Needs root and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::lab::{CLIENT_ADDR, Lab, ManifestsLayout, NodeSpec, SOON};
use xlb_lab::manifests::write_atomic;
use xlb_lab::poll;
use xlb_lab::servers::{HealthEndpoint, Servers};

/// A VIP on the LAN's own /24: the client finds it by ARP.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 210);
/// The "API server" port on the VIP and on every backend.
const API_PORT: u16 = 6443;
/// The backends' health endpoint port.
const HEALTH_PORT: u16 = 8081;
/// Unused UDP port the line servers also bind.
const UDP_PORT: u16 = 6444;
/// New connections per round: with three backends, the chance that a backend in
/// service gets none of them is 3 × (2/3)^40, about 3e-7.
const FLOWS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(2);

fn static_service_yaml(backends: &[Ipv4Addr]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{b}:{API_PORT}\""))
        .collect();
    format!(
        "apiVersion: xlb.dev/v1alpha1
kind: StaticService
metadata: {{ name: kube-apiserver, namespace: kube-system }}
spec:
  addresses: [{VIP}]
  ports:
  - name: https
    port: {API_PORT}
    backends: [{}]
  healthCheck:
    type: HTTP
    path: /readyz
    port: {HEALTH_PORT}
    interval: 100ms
    timeout: 100ms
    rise: 2
    fall: 2
---
apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: {{ name: lan, namespace: xlb-system }}
",
        list.join(", ")
    )
}

/// The node (by name) whose agent owns the VIP, once exactly one does and it is not
/// `not`.
fn wait_owner(lab: &mut Lab, not: Option<&str>) -> Result<String> {
    poll(
        "one owner of the VIP",
        SOON,
        Duration::from_millis(20),
        || {
            let mut owners = Vec::new();
            for n in &mut lab.nodes {
                if n.agent()?.metric("xlb_l2_owned_vips", &[])? > 0.0 {
                    owners.push(n.name.clone());
                }
            }
            Ok(match &owners[..] {
                [one] if Some(one.as_str()) != not => Some(one.clone()),
                _ => None,
            })
        },
    )
}

/// `FLOWS` new connections from the client: how many each backend (by label) took,
/// and the peer address each backend saw.
fn spread(lab: &Lab) -> Result<BTreeMap<String, (usize, BTreeSet<Ipv4Addr>)>> {
    let vip = SocketAddr::from((VIP, API_PORT));
    let mut out: BTreeMap<String, (usize, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
    for r in lab.client.tcp_flows(vip, FLOWS, TIMEOUT)? {
        ensure!(r.from == vip, "reply from {} instead of the VIP", r.from);
        let std::net::IpAddr::V4(peer) = r.seen_peer.ip() else {
            anyhow::bail!("IPv6 peer {}", r.seen_peer);
        };
        let e = out.entry(r.server).or_default();
        e.0 += 1;
        e.1.insert(peer);
    }
    Ok(out)
}

/// Three nodes, each with an "API server" and its health endpoint on the node's
/// address, and the StaticService over them with `forwarding`; agents started.
fn static_lab(forwarding: &str) -> Result<(Lab, Backends)> {
    let mut lab = Lab::multi_node(&[0, 0, 0].map(NodeSpec::with_pods))?;
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    let addrs: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.host.addr).collect();
    let mut backends = BTreeMap::new();
    for n in &lab.nodes {
        let servers = Servers::start(&n.host.ns, &n.name, n.host.addr, UDP_PORT, API_PORT)?;
        let health = HealthEndpoint::start(&n.host.ns, n.host.addr, HEALTH_PORT)?;
        backends.insert(n.name.clone(), (servers, health, n.host.addr));
    }
    let yaml = static_service_yaml(&addrs).replace(
        "  healthCheck:",
        &format!("  forwarding: {forwarding}\n  healthCheck:"),
    );
    write_atomic(&dir.join("apiserver.yaml"), &yaml)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    Ok((lab, backends))
}

/// Runs `f`; on failure prints each agent's last log lines and what its maps hold.
fn explained(lab: &mut Lab, f: impl FnOnce(&mut Lab) -> Result<()>) -> Result<()> {
    let r = f(lab);
    if r.is_err() {
        for n in &mut lab.nodes {
            let log = n.agent()?.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            println!(
                "--- {}:\n{}",
                n.name,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
            for what in ["services", "backends"] {
                let out = n
                    .host
                    .ns
                    .command(xlb_lab::agent::xlb_bin()?)
                    .args(["inspect", what, "--pin-path"])
                    .arg(&n.pin_dir)
                    .output()?;
                println!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
    r
}

#[test]
fn a_static_vip_follows_backend_health_and_leaves_a_node_whose_own_backend_fails() -> Result<()> {
    let (mut lab, backends) = static_lab("SNAT")?;
    explained(&mut lab, |lab| scenario(lab, backends))
}

#[test]
fn with_dsr_every_backend_that_is_a_node_sees_the_client() -> Result<()> {
    let (mut lab, _backends) = static_lab("DSR")?;
    explained(&mut lab, |lab| {
        let owner = wait_owner(lab, None)?;
        let s = all_three_serving(lab)?;
        println!("owner {owner}, spread: {s:?}");
        for (name, (_, peers)) in &s {
            ensure!(
                *peers == BTreeSet::from([CLIENT_ADDR]),
                "{name} saw {peers:?}: DSR keeps the client's address"
            );
        }
        Ok(())
    })
}

/// Polls until new connections reach all three backends; their spread.
fn all_three_serving(lab: &Lab) -> Result<BTreeMap<String, (usize, BTreeSet<Ipv4Addr>)>> {
    poll(
        "all three backends serving",
        SOON,
        Duration::from_millis(100),
        || {
            let s = spread(lab)?;
            Ok((s.len() == 3).then_some(s))
        },
    )
}

type Backends = BTreeMap<String, (Servers, HealthEndpoint, Ipv4Addr)>;

fn scenario(lab: &mut Lab, backends: Backends) -> Result<()> {
    let lab = &mut *lab;
    let owner = wait_owner(lab, None)?;
    let owner_addr = backends[&owner].2;
    println!("owner: {owner} ({owner_addr})");

    // Every backend serves; the owner's own sees the client, the others the owner.
    let first = all_three_serving(lab)?;
    println!("spread: {first:?}");
    for (name, (_, peers)) in &first {
        let want = if *name == owner {
            CLIENT_ADDR
        } else {
            owner_addr
        };
        ensure!(
            *peers == BTreeSet::from([want]),
            "{name} saw {peers:?}, expected {want} (DNAT for the owner's own backend, SNAT through the owner for the others)"
        );
    }

    // An established connection to one non-owner backend; the other one fails.
    let others: Vec<&String> = backends.keys().filter(|n| **n != owner).collect();
    let vip = SocketAddr::from((VIP, API_PORT));
    let mut kept = poll(
        "a connection to a non-owner backend",
        SOON,
        Duration::ZERO,
        || {
            let mut c = lab.client.tcp_connect(vip, TIMEOUT)?;
            Ok((c.ping()?.server == *others[0]).then_some(c))
        },
    )?;
    let failing = others[1].clone();
    backends[&failing].1.set_healthy(false);
    // The checks see it (fall 2 × 100 ms), then the maps drop it: wait for a round
    // without it, then check that the next round has none either.
    poll(
        "the failing backend out of service",
        SOON,
        Duration::from_millis(50),
        || {
            let s = spread(lab)?;
            Ok((!s.contains_key(&failing)).then_some(()))
        },
    )?;
    let during = spread(lab)?;
    println!("with {failing} failing: {during:?}");
    ensure!(
        !during.contains_key(&failing),
        "{failing} got new connections while failing its check: {during:?}"
    );
    ensure!(
        during.len() == 2,
        "the two healthy backends serve: {during:?}"
    );
    let r = kept
        .ping()
        .context("the established connection after the other backend failed")?;
    ensure!(
        r.server == *others[0],
        "established connection moved to {}",
        r.server
    );

    backends[&failing].1.set_healthy(true);
    let back = poll(
        "the restored backend in service again",
        SOON,
        Duration::from_millis(100),
        || {
            let s = spread(lab)?;
            Ok(s.contains_key(&failing).then_some(s))
        },
    )?;
    println!("restored: {back:?}");
    let r = kept
        .ping()
        .context("the established connection after the restore")?;
    ensure!(
        r.server == *others[0],
        "established connection moved to {}",
        r.server
    );

    // The owner's own "API server" fails: the VIP moves, and keeps working.
    backends[&owner].1.set_healthy(false);
    let next = wait_owner(lab, Some(&owner))?;
    println!("{owner}'s own backend failed: {next} owns the VIP");
    let after = poll(
        "the VIP served by the new owner",
        SOON,
        Duration::from_millis(100),
        || {
            let s = spread(lab)?;
            Ok((s.len() == 2 && !s.contains_key(&owner)).then_some(s))
        },
    )?;
    println!("after the move: {after:?}");
    let next_addr = backends[&next].2;
    for (name, (_, peers)) in &after {
        let want = if *name == next {
            CLIENT_ADDR
        } else {
            next_addr
        };
        ensure!(
            *peers == BTreeSet::from([want]),
            "{name} saw {peers:?}, expected {want}"
        );
    }
    Ok(())
}
