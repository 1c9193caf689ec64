//! `cargo xtask demo`: one node, three pods, the agent on the example manifests, real TCP and
//! UDP to the VIP, a table of what each backend saw, and a verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::agent::metric_sum;
use crate::lab::{CLIENT_ADDR, Lab};
use crate::manifests::{WEB_NAMESPACE, WEB_SERVICE, WEB_TCP_PORT, WEB_UDP_PORT, WEB_VIP};
use crate::traffic::Reply;

/// TCP connections the demo makes to VIP:80.
pub const TCP_CONNECTIONS: usize = 30;
/// UDP flows (distinct source ports) the demo sends to VIP:53.
pub const UDP_FLOWS: usize = 90;
/// Upper bound for the traffic phase, so the demo finishes in time even when nothing answers.
const TRAFFIC_BUDGET: Duration = Duration::from_secs(45);

#[derive(Default)]
struct ClientView {
    udp_replies: u64,
    udp_from_vip: u64,
    tcp_replies: u64,
    tcp_from_vip: u64,
    peer_mismatch: u64,
}

/// Brings the lab up (client, `node-a`, pods 10.0.1.11-13), runs `xlb_bin agent` with
/// `--manifests manifests_dir` (expected to define `demo/web` on 10.0.100.1, `http` TCP 80 and
/// `dns` UDP 53, as `deploy/examples/` does), sends the traffic, prints the table and a
/// one-line verdict, tears everything down, and returns whether the demo passed.
pub fn run(xlb_bin: &Path, manifests_dir: &Path) -> Result<bool> {
    let started = Instant::now();
    println!("xlb demo: building the lab (client 10.0.0.1, node-a 10.0.0.2, pods 10.0.1.11-13)");
    let mut lab = Lab::one_node(3)?;
    println!(
        "xlb demo: starting `xlb agent` on node-a with manifests from {}",
        manifests_dir.display()
    );
    let agent = lab.node_mut().start_agent(xlb_bin, manifests_dir)?;
    agent.wait_healthy(Duration::from_secs(30))?;
    println!(
        "xlb demo: agent healthy; sending {TCP_CONNECTIONS} TCP connections to {WEB_VIP}:{WEB_TCP_PORT} and {UDP_FLOWS} UDP flows to {WEB_VIP}:{WEB_UDP_PORT}"
    );

    let tcp_vip = SocketAddr::from((WEB_VIP, WEB_TCP_PORT));
    let udp_vip = SocketAddr::from((WEB_VIP, WEB_UDP_PORT));
    let deadline = Instant::now() + TRAFFIC_BUDGET;
    let mut views: BTreeMap<String, ClientView> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut out_of_time = false;
    let mut record = |r: &Reply, vip: SocketAddr, udp: bool| {
        let v = views.entry(r.server.clone()).or_default();
        let from_vip = u64::from(r.from == vip);
        if udp {
            v.udp_replies += 1;
            v.udp_from_vip += from_vip;
        } else {
            v.tcp_replies += 1;
            v.tcp_from_vip += from_vip;
        }
        v.peer_mismatch += u64::from(r.seen_peer != r.local);
    };
    let mut sent = (0usize, 0usize);
    for i in 0..TCP_CONNECTIONS.max(UDP_FLOWS) {
        if Instant::now() > deadline {
            out_of_time = true;
            break;
        }
        if i < TCP_CONNECTIONS {
            sent.0 += 1;
            match lab
                .client
                .tcp_connect(tcp_vip, Duration::from_secs(1))
                .and_then(|mut c| c.ping())
            {
                Ok(r) => record(&r, tcp_vip, false),
                Err(e) => failures.push(format!("TCP #{}: {e:#}", i + 1)),
            }
        }
        if i < UDP_FLOWS {
            sent.1 += 1;
            match lab
                .client
                .udp_request(udp_vip, "", Duration::from_millis(500), 2)
            {
                Ok(r) => record(&r, udp_vip, true),
                Err(e) => failures.push(format!("UDP #{}: {e:#}", i + 1)),
            }
        }
    }

    println!();
    println!(
        "{:<8} {:<11} {:>9} {:>9}  {:<20} {:<16}",
        "backend", "pod IP", "TCP conns", "UDP pkts", "client seen by pod", "replies from VIP"
    );
    let mut problems: Vec<String> = Vec::new();
    for pod in &lab.node().pods {
        let s = pod.servers.stats();
        let seen: BTreeSet<IpAddr> = s.peer_ips();
        let v = views.remove(&pod.name).unwrap_or_default();
        let replies = v.udp_replies + v.tcp_replies;
        let all_vip =
            replies > 0 && v.udp_from_vip == v.udp_replies && v.tcp_from_vip == v.tcp_replies;
        let seen_txt = if seen.is_empty() {
            "-".to_string()
        } else {
            seen.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{:<8} {:<11} {:>9} {:>9}  {:<20} {}",
            pod.name,
            pod.ip.to_string(),
            s.tcp_connections,
            s.udp_datagrams,
            seen_txt,
            if all_vip { "yes" } else { "no" }
        );
        if s.tcp_connections == 0 || s.udp_datagrams == 0 {
            problems.push(format!("{} did not get both TCP and UDP", pod.name));
        }
        if seen.iter().any(|ip| *ip != IpAddr::V4(CLIENT_ADDR)) {
            problems.push(format!("{} saw client addresses {seen_txt}", pod.name));
        }
        if !all_vip {
            problems.push(format!(
                "{}'s replies did not all come from the VIP",
                pod.name
            ));
        }
        if v.peer_mismatch > 0 {
            problems.push(format!(
                "{} saw {} flow(s) with a rewritten client port",
                pod.name, v.peer_mismatch
            ));
        }
    }
    for (server, _) in views {
        problems.push(format!("replies from unexpected server {server:?}"));
    }
    if let Ok(agent) = lab.agent()
        && let Ok(samples) = agent.metrics()
    {
        let ns = [("namespace", WEB_NAMESPACE), ("service", WEB_SERVICE)];
        if let Some(p) = metric_sum(&samples, "xlb_service_packets_total", &ns) {
            println!(
                "\nagent metrics: xlb_service_packets_total{{namespace=\"demo\",service=\"web\"}} = {p}"
            );
        }
    }
    if let Some(first) = failures.first() {
        problems.insert(
            0,
            format!(
                "{} of {} flows unanswered (first: {first})",
                failures.len(),
                sent.0 + sent.1
            ),
        );
    }
    if out_of_time {
        problems.insert(
            0,
            format!(
                "only {} of {} flows sent within {TRAFFIC_BUDGET:?}",
                sent.0 + sent.1,
                TCP_CONNECTIONS + UDP_FLOWS
            ),
        );
    }
    println!();
    let passed = problems.is_empty();
    if passed {
        println!(
            "PASS: {} TCP connections and {} UDP flows to {WEB_VIP} were answered by all {} backends, which saw the client's own address {CLIENT_ADDR}, and every reply came from the VIP ({:.1}s)",
            sent.0,
            sent.1,
            lab.node().pods.len(),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("FAIL: {}", problems.join("; "));
    }
    drop(lab);
    Ok(passed)
}
