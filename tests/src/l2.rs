//! xlb's L2 announcement lab (issue 17), shared by the L2 lab tests and the bench's
//! failover part: three nodes with one pod each on one bridge, a Local UDP/TCP Service on
//! [`VIP`] announced by one `L2Announcement` for everything, and one failover of the
//! VIP's owner measured with the client's 10 ms UDP ticker ([`failover_gap`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::arp::{Mac, mac_of, who_has};
use crate::lab::{
    CLIENT_ADDR, Lab, ManifestsLayout, Node, NodeSpec, POD_GATEWAY, SOON, UPLINK, poll,
};
use crate::manifests::{
    EndpointSpec, WEB_NAMESPACE, WEB_SERVICE, WEB_UDP_PORT, multi_doc, service_yaml, web_ports,
    web_slice_yaml, write_atomic,
};
use crate::traffic::Ticker;

/// A VIP on the LAN's own /24, so the client ARPs for it.
pub const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 200);
/// How long ARP replies are collected after a request.
pub const ARP_WINDOW: Duration = Duration::from_millis(200);
/// Ticker pace (10 ms).
pub const TICK: Duration = Duration::from_millis(10);
/// Ticker bound (at most 60 s at [`TICK`]).
pub const MAX_TICKS: u64 = 6_000;

/// One `L2Announcement` with an empty spec: every VIP on every node.
pub const L2_ALL: &str = "apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: lan, namespace: xlb-system }
";

/// Node name -> its uplink MAC.
pub fn macs(lab: &Lab) -> Result<Vec<(String, Mac)>> {
    lab.nodes
        .iter()
        .map(|n| Ok((n.name.clone(), mac_of(&n.host.ns, UPLINK)?)))
        .collect()
}

/// The nodes whose agent reports owning a VIP (agents that are not running are
/// skipped).
pub fn owners(lab: &mut Lab, skip: &BTreeSet<String>) -> Result<Vec<String>> {
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
pub fn wait_owner(lab: &mut Lab, skip: &BTreeSet<String>, not: Option<&str>) -> Result<String> {
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
    found.map_err(|e| e.context(l2_logs(lab)))
}

/// The last L2 and membership lines of every agent's log, for failure messages.
pub fn l2_logs(lab: &mut Lab) -> String {
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
    logs.join("\n")
}

/// Polls until ARP for the VIP is answered by `mac` alone.
pub fn wait_sole_answerer(lab: &Lab, mac: Mac) -> Result<()> {
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

/// The MAC of node `name` in `macs`.
pub fn mac_named(macs: &[(String, Mac)], name: &str) -> Result<Mac> {
    macs.iter()
        .find(|(n, _)| n == name)
        .map(|(_, m)| *m)
        .with_context(|| format!("no node {name}"))
}

/// Writes `web.yaml` in `dir`: the Local UDP/TCP Service on [`VIP`] with `eps`.
pub fn write_web(dir: &std::path::Path, eps: &[EndpointSpec]) -> Result<()> {
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

/// Node `node`'s membership key file (`--memberlist-key-file`), in the lab's scratch
/// directory: one file per node, so a test can rotate keys node by node.
pub fn key_file(lab: &Lab, node: &str) -> std::path::PathBuf {
    lab.scratch().join(format!("{node}.memberlist-keys"))
}

/// A membership key unique to this lab run (`n` tells keys of one run apart).
pub fn lab_key(lab: &Lab, n: u32) -> String {
    format!("xlb-lab-{}-key-{n}", lab.id())
}

/// Three nodes with one pod each, every pod an endpoint of the Local UDP/TCP
/// Service on [`VIP`], one L2Announcement for everything; agents started, their
/// membership authenticated with one shared key ([`lab_key`] 1), as deploy/ does.
pub fn l2_lab() -> Result<Lab> {
    l2_lab_with(&[], &[])
}

/// [`l2_lab`] with the nodes named in `keyless` started without a membership key (as
/// agents of a release before keys), and `keyed_args` added to the others' flags.
pub fn l2_lab_with(keyless: &[&str], keyed_args: &[&str]) -> Result<Lab> {
    let mut lab = Lab::multi_node(&[1, 1, 1].map(NodeSpec::with_pods))?;
    let key = lab_key(&lab, 1);
    let files: Vec<_> = lab.nodes.iter().map(|n| key_file(&lab, &n.name)).collect();
    for (node, file) in lab.nodes.iter_mut().zip(files) {
        if keyless.contains(&node.name.as_str()) {
            continue;
        }
        write_atomic(&file, &format!("{key}\n"))?;
        node.agent_args.push("--memberlist-key-file".into());
        node.agent_args.push(file.display().to_string());
        node.agent_args
            .extend(keyed_args.iter().map(|a| a.to_string()));
    }
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    let eps: Vec<EndpointSpec> = lab.nodes.iter().flat_map(Node::ready_endpoints).collect();
    write_web(&dir, &eps)?;
    write_atomic(&dir.join("l2.yaml"), L2_ALL)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    Ok(lab)
}

/// How an owner fails in [`failover_gap`].
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// Its agent is SIGKILLed (the datapath stays, pinned).
    Sigkill,
    /// Its uplink is set down.
    LinkDown,
}

/// One failover: waits for a settled sole owner, starts the 10 ms UDP ticker, fails
/// the owner, waits until another node owns the VIP and 50 more tickets came back,
/// then repairs the failed node (agent restarted / link up) and waits for one sole
/// answerer again. Returns the ticker's largest gap and the time to the new owner.
pub fn failover_gap(lab: &mut Lab, how: Failure) -> Result<(Duration, Duration)> {
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
    wait_all_alive(lab)?;
    Ok((report.max_gap, takeover))
}

/// Polls until every node's agent counts all three nodes alive.
pub fn wait_all_alive(lab: &mut Lab) -> Result<()> {
    poll(
        "every node to count three members alive",
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
    )
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median (the upper one of an even count) in milliseconds; 0 for none.
pub fn median_ms(v: &[Duration]) -> f64 {
    let mut v: Vec<f64> = v.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
