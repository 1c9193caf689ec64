//! Privileged tests of the multi-node lab: client and three nodes on one bridge, pods behind
//! each node. First the lab's own routing (no agent), then `externalTrafficPolicy: Local` with
//! an agent on every node and the client's VIP route moved from node to node. Needs root and,
//! for the agent test, the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::lab::{
    BRIDGE, CLIENT_ADDR, Lab, ManifestsLayout, Node, NodeSpec, REPLY_TIMEOUT, SOON,
};
use xlb_lab::manifests::{EndpointSpec, web_tcp_vip, web_udp_vip, web_yaml, write_atomic};
use xlb_lab::netns::run;
use xlb_lab::servers::{TCP_LINE_PORT, UDP_ECHO_PORT};
use xlb_lab::{Reply, poll};

/// How long an unanswered VIP probe waits.
const PROBE: Duration = Duration::from_millis(300);

fn three_nodes(pods: [usize; 3]) -> Result<Lab> {
    Lab::multi_node(&pods.map(NodeSpec::with_pods))
}

/// The reply came from `from` and the server saw the sending socket's exact address.
fn check_reply(r: &Reply, from: SocketAddr) -> Result<()> {
    ensure!(
        r.from == from,
        "reply from {} (server {}), expected {from}",
        r.from,
        r.server
    );
    ensure!(
        r.seen_peer == r.local,
        "{} saw peer {} but the sender is {}",
        r.server,
        r.seen_peer,
        r.local
    );
    Ok(())
}

fn count_by_server(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.server.clone()).or_default() += 1;
    }
    m
}

#[test]
fn multinode_lab_routes_between_nodes() -> Result<()> {
    let lab = three_nodes([2, 2, 2])?;
    let lan = lab.lan.as_ref().context("multi-node lab without a LAN")?;
    let ports = lan.ip(&["-br", "link", "show", "master", BRIDGE])?;
    ensure!(ports.lines().count() == 4, "bridge ports:\n{ports}");

    for node in &lab.nodes {
        lab.client
            .ping(node.host.addr, 1)
            .with_context(|| format!("client -> {}", node.name))?;
        for pod in &node.pods {
            let udp_dst = SocketAddr::from((pod.ip, UDP_ECHO_PORT));
            let r = lab.client.udp_request(udp_dst, "hello", REPLY_TIMEOUT, 2)?;
            check_reply(&r, udp_dst)?;
            ensure!(r.server == pod.name && r.echoed == "hello", "{r:?}");
            let tcp_dst = SocketAddr::from((pod.ip, TCP_LINE_PORT));
            let r = lab.client.tcp_connect(tcp_dst, REPLY_TIMEOUT)?.ping()?;
            check_reply(&r, tcp_dst)?;
            ensure!(r.server == pod.name, "{r:?}");
            let s = pod.servers.stats();
            ensure!(
                (s.udp_datagrams, s.tcp_connections) == (1, 1)
                    && s.peer_ips() == BTreeSet::from([IpAddr::V4(CLIENT_ADDR)]),
                "{}: {s:?}",
                pod.name
            );
        }
    }

    // Pod to pod across nodes: node-b's pod to node-c's, over the node routes.
    let from = &lab.node_named("node-b")?.pods[0];
    let to = &lab.node_named("node-c")?.pods[0];
    to.servers.reset_stats();
    let udp_dst = SocketAddr::from((to.ip, UDP_ECHO_PORT));
    check_reply(
        &from.host.udp_request(udp_dst, "", REPLY_TIMEOUT, 2)?,
        udp_dst,
    )?;
    let tcp_dst = SocketAddr::from((to.ip, TCP_LINE_PORT));
    check_reply(
        &from.host.tcp_connect(tcp_dst, REPLY_TIMEOUT)?.ping()?,
        tcp_dst,
    )?;
    ensure!(to.servers.stats().peer_ips() == BTreeSet::from([IpAddr::V4(from.ip)]));
    from.host
        .ping(to.ip, 1)
        .context("pod on node-b -> pod on node-c")?;

    // Without agents nobody serves the VIP, whichever node the client routes it to.
    for node in &lab.nodes {
        lab.client_route_vips_via(&node.name)?;
        ensure!(lab.client.udp_probe(web_udp_vip(), PROBE)?.is_none());
    }

    // Dropping the lab removes every namespace it made, the LAN's included.
    let id = lab.id().to_string();
    drop(lab);
    let all = run(Command::new("ip").args(["netns", "list"]))?;
    let left: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with(&format!("{id}-")))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

/// Every pod name in the lab → its node's name.
fn pods_by_node(lab: &Lab) -> BTreeMap<String, String> {
    lab.nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(|p| (p.name.clone(), n.name.clone())))
        .collect()
}

fn reset_all_stats(lab: &Lab) {
    for pod in lab.nodes.iter().flat_map(|n| &n.pods) {
        pod.servers.reset_stats();
    }
}

/// With the VIPs routed via `via`, new UDP and TCP flows to the VIP are answered from the VIP,
/// by every pod of `via` and by nothing else, and the pods see only the client.
fn served_only_by(lab: &Lab, via: &str) -> Result<()> {
    lab.client_route_vips_via(via)?;
    reset_all_stats(lab);
    let udp = lab.client.udp_flows(web_udp_vip(), 40, REPLY_TIMEOUT)?;
    udp.iter().try_for_each(|r| check_reply(r, web_udp_vip()))?;
    let tcp = lab.client.tcp_flows(web_tcp_vip(), 20, REPLY_TIMEOUT)?;
    tcp.iter().try_for_each(|r| check_reply(r, web_tcp_vip()))?;
    let (u, t) = (count_by_server(&udp), count_by_server(&tcp));
    println!("via {via}: UDP flows per pod {u:?}, TCP connections per pod {t:?}");
    let local: BTreeSet<String> = lab
        .node_named(via)?
        .pods
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let seen: BTreeSet<String> = u.keys().chain(t.keys()).cloned().collect();
    ensure!(
        seen == local,
        "via {via}: answered by {seen:?} ({:?}), expected exactly {local:?}",
        seen.iter()
            .map(|p| pods_by_node(lab).get(p).cloned())
            .collect::<Vec<_>>()
    );
    for node in &lab.nodes {
        for pod in &node.pods {
            let s = pod.servers.stats();
            if node.name == via {
                ensure!(
                    s.peer_ips() == BTreeSet::from([IpAddr::V4(CLIENT_ADDR)]),
                    "{} saw peers {:?}, expected only {CLIENT_ADDR}",
                    pod.name,
                    s.peer_ips()
                );
            } else {
                ensure!(
                    s.udp_datagrams == 0 && s.tcp_connections == 0,
                    "{} on {} got VIP traffic routed via {via}: {s:?}",
                    pod.name,
                    node.name
                );
            }
        }
    }
    Ok(())
}

fn drops_no_backend(lab: &mut Lab, node: &str) -> Result<f64> {
    lab.node_named_mut(node)?.agent()?.metric(
        "xlb_datapath_packets_total",
        &[("reason", "drop_no_backend")],
    )
}

#[test]
fn local_policy_on_each_node() -> Result<()> {
    // node-c has a pod, but not one of the Service's endpoints.
    let mut lab = three_nodes([2, 2, 1])?;
    let eps: Vec<EndpointSpec> = ["node-a", "node-b"]
        .into_iter()
        .map(|n| lab.node_named(n))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flat_map(Node::ready_endpoints)
        .collect();
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    write_atomic(&dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;

    // The agents apply the manifests asynchronously: wait until node-a serves the VIP.
    poll(
        "node-a serves the VIP",
        SOON,
        Duration::from_millis(100),
        || lab.client.udp_probe(web_udp_vip(), PROBE),
    )?;
    served_only_by(&lab, "node-a")?;
    poll(
        "node-b serves the VIP",
        SOON,
        Duration::from_millis(100),
        || {
            lab.client_route_vips_via("node-b")?;
            lab.client.udp_probe(web_udp_vip(), PROBE)
        },
    )?;
    served_only_by(&lab, "node-b")?;

    // node-c has no local endpoint: the VIP does not answer there, and node-c drops it.
    lab.client_route_vips_via("node-c")?;
    reset_all_stats(&lab);
    let before = drops_no_backend(&mut lab, "node-c")?;
    for _ in 0..10 {
        ensure!(
            lab.client.udp_probe(web_udp_vip(), PROBE)?.is_none(),
            "the VIP answered via node-c, which has no local endpoint"
        );
    }
    ensure!(
        lab.client
            .tcp_connect(web_tcp_vip(), REPLY_TIMEOUT)
            .is_err(),
        "a TCP connection to the VIP via node-c succeeded"
    );
    for pod in lab.nodes.iter().flat_map(|n| &n.pods) {
        let s = pod.servers.stats();
        ensure!(
            s.udp_datagrams == 0 && s.tcp_connections == 0,
            "{} got VIP traffic routed via node-c: {s:?}",
            pod.name
        );
    }
    let after = poll(
        "node-c counts drop_no_backend",
        SOON,
        Duration::from_millis(200),
        || {
            let v = drops_no_backend(&mut lab, "node-c")?;
            Ok((v > before).then_some(v))
        },
    )?;
    println!(
        "node-c: xlb_datapath_packets_total{{reason=\"drop_no_backend\"}} {before} -> {after}"
    );
    for node in ["node-a", "node-b"] {
        let v = drops_no_backend(&mut lab, node).unwrap_or(f64::NAN);
        println!("{node}: xlb_datapath_packets_total{{reason=\"drop_no_backend\"}} {v}");
    }

    // Back to node-a: still served there, only there.
    served_only_by(&lab, "node-a")?;
    for node in &mut lab.nodes {
        let name = node.name.clone();
        node.agent()?
            .check_running()
            .with_context(|| format!("agent on {name}"))?;
    }
    Ok(())
}
