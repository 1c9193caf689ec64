//! Privileged integration tests of the frontends and policies beyond a LoadBalancer VIP:
//! NodePort on the node's address, externalIPs, loadBalancerSourceRanges, ClientIP
//! session affinity and healthCheckNodePort, each observed with real packets.
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Result, ensure};
use xlb_lab::agent::http_get;
use xlb_lab::lab::{CLIENT_ADDR, Lab, REPLY_TIMEOUT, SOON};
use xlb_lab::manifests::{
    EndpointSpec, PortSpec, WEB_VIP, endpointslice_yaml, multi_doc, web_slice_yaml, write_atomic,
};
use xlb_lab::poll;
use xlb_lab::servers::TCP_LINE_PORT;

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 200, 1);

/// Extra `spec` lines for the web Service (indented two spaces).
fn web_service(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  \
         type: LoadBalancer\n  externalTrafficPolicy: Local\n  loadBalancerIP: \"{WEB_VIP}\"\n\
         {extra_spec}  ports:\n  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\n    nodePort: 30053\n  \
         - name: http\n    protocol: TCP\n    port: 80\n    targetPort: 8080\n    nodePort: 30080\n"
    )
}

fn node_object() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  \
         - type: InternalIP\n    address: {NODE_ADDR}\n"
    )
}

/// A lab with `pods` ready pods and the web Service with `extra_spec`, agent healthy.
fn lab_with(pods: usize, extra_spec: &str) -> Result<Lab> {
    let mut lab = Lab::one_node(pods)?;
    write(&lab, extra_spec, true)?;
    lab.start_agent()?.wait_healthy(SOON)?;
    Ok(lab)
}

fn write(lab: &Lab, extra_spec: &str, ready: bool) -> Result<()> {
    let eps: Vec<EndpointSpec> = lab
        .node()
        .pods
        .iter()
        .map(|p| EndpointSpec::new(p.ip, ready, &lab.node().name))
        .collect();
    let doc = multi_doc(&[node_object(), web_service(extra_spec), web_slice_yaml(&eps)]);
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &doc)
}

#[test]
fn nodeport_and_external_ip_reach_backends() -> Result<()> {
    let lab = lab_with(2, &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n"))?;
    for dst in [
        SocketAddr::from((NODE_ADDR, 30053)),
        SocketAddr::from((EXTERNAL_IP, 53)),
        SocketAddr::from((WEB_VIP, 53)),
    ] {
        let replies = poll(
            &format!("UDP answers from {dst}"),
            SOON,
            REPLY_TIMEOUT,
            || {
                let r = lab.client.udp_flows(dst, 10, REPLY_TIMEOUT)?;
                Ok((r.len() == 10).then_some(r))
            },
        )?;
        for r in &replies {
            ensure!(r.from == dst, "reply to {dst} came from {}", r.from);
            ensure!(r.seen_peer.ip() == CLIENT_ADDR, "pod saw {}", r.seen_peer);
        }
    }
    let tcp = lab
        .client
        .tcp_flows(SocketAddr::from((NODE_ADDR, 30080)), 5, REPLY_TIMEOUT)?;
    ensure!(tcp.len() == 5, "TCP NodePort answered {} of 5", tcp.len());
    for r in &tcp {
        ensure!(r.seen_peer.ip() == CLIENT_ADDR, "pod saw {}", r.seen_peer);
    }
    // The node's own address still answers what is not a NodePort.
    lab.client.ping(NODE_ADDR, 1)?;
    Ok(())
}

#[test]
fn source_ranges_admit_only_listed_clients() -> Result<()> {
    let mut lab = lab_with(2, "  loadBalancerSourceRanges: [\"10.0.0.0/30\"]\n")?;
    let vip = SocketAddr::from((WEB_VIP, 53));
    let ok = lab.client.udp_flows(vip, 5, REPLY_TIMEOUT)?;
    ensure!(ok.len() == 5, "client in range: {} of 5 answered", ok.len());

    write(
        &lab,
        "  loadBalancerSourceRanges: [\"10.9.0.0/16\"]\n",
        true,
    )?;
    poll(
        "the VIP to refuse a client outside the ranges",
        SOON,
        REPLY_TIMEOUT,
        || {
            Ok(lab
                .client
                .udp_probe(vip, REPLY_TIMEOUT)?
                .is_none()
                .then_some(()))
        },
    )?;
    for i in 0..5 {
        let r = lab.client.udp_probe(vip, Duration::from_millis(300))?;
        ensure!(r.is_none(), "flow {i} answered outside the ranges: {r:?}");
    }
    let dropped = lab.agent()?.metric(
        "xlb_datapath_packets_total",
        &[("reason", "drop_source_range")],
    )?;
    ensure!(dropped >= 5.0, "drop_source_range = {dropped}");
    Ok(())
}

#[test]
fn client_ip_affinity_pins_new_flows() -> Result<()> {
    let lab = lab_with(3, "")?;
    let vip = SocketAddr::from((WEB_VIP, 53));
    let servers = |n| -> Result<BTreeSet<String>> {
        Ok(lab
            .client
            .udp_flows(vip, n, REPLY_TIMEOUT)?
            .into_iter()
            .map(|r| r.server)
            .collect())
    };
    // Control: without affinity 40 flows spread over the pods.
    ensure!(
        servers(40)?.len() > 1,
        "flows did not spread without affinity"
    );

    write(
        &lab,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n",
        true,
    )?;
    // Once applied, every new flow from this client goes to one pod.
    poll(
        "affinity to pin 20 new flows to one pod",
        SOON,
        REPLY_TIMEOUT,
        || Ok((servers(20)?.len() == 1).then_some(())),
    )?;
    let pinned = servers(40)?;
    ensure!(pinned.len() == 1, "affinity broke: {pinned:?}");
    Ok(())
}

#[test]
fn health_check_node_port_reports_local_endpoints() -> Result<()> {
    let lab = lab_with(2, "  healthCheckNodePort: 32000\n")?;
    let hc = SocketAddr::from((NODE_ADDR, 32000));
    let client = lab.client.ns.name().to_string();
    let (code, body) = poll(
        "the health check port to answer",
        SOON,
        REPLY_TIMEOUT,
        || Ok(http_get(&client, hc, "/healthz").ok()),
    )?;
    ensure!(code == 200, "with local endpoints: {code} {body}");
    ensure!(body.contains("\"localEndpoints\":2"), "body {body}");

    write(&lab, "  healthCheckNodePort: 32000\n", false)?;
    let (code, body) = poll(
        "the health check to report no endpoints",
        SOON,
        REPLY_TIMEOUT,
        || {
            let (c, b) = http_get(&client, hc, "/healthz")?;
            Ok((c == 503).then_some((c, b)))
        },
    )?;
    ensure!(body.contains("\"localEndpoints\":0"), "{code} body {body}");
    Ok(())
}

/// kube-proxy binds every `healthCheckNodePort` itself. With a process already on the
/// port, the agent leaves it there (says so once, never takes turns with it) and
/// serves everything else: the VIP, and a second Service's free port.
#[test]
fn a_health_check_port_held_by_another_process_is_left_to_it() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    // "kube-proxy": a listener on the node's health check port before the agent starts.
    let held = lab
        .node()
        .host
        .ns
        .enter(|| Ok(TcpListener::bind((Ipv4Addr::UNSPECIFIED, 32000))?))?;
    write(&lab, "  healthCheckNodePort: 32000\n", true)?;
    lab.start_agent()?.wait_healthy(SOON)?;
    let udp = SocketAddr::from((WEB_VIP, 53));
    poll("the VIP served", SOON, REPLY_TIMEOUT, || {
        Ok((lab.client.udp_flows(udp, 5, REPLY_TIMEOUT)?.len() == 5).then_some(()))
    })?;
    // More syncs (endpoints flip) must not make the agent try the port again.
    let syncs = |lab: &mut Lab| lab.agent()?.metric("xlb_syncs_total", &[("result", "ok")]);
    for ready in [false, true, false, true] {
        let before = syncs(&mut lab)?;
        write(&lab, "  healthCheckNodePort: 32000\n", ready)?;
        poll("the sync", SOON, REPLY_TIMEOUT, || {
            Ok((syncs(&mut lab)? > before).then_some(()))
        })?;
    }
    let log = lab.agent()?.log();
    let said = log
        .lines()
        .filter(|l| l.contains("already served by another process") && l.contains("32000"))
        .count();
    ensure!(said == 1, "said {said} times:\n{log}");
    ensure!(
        !log.contains("health check server started"),
        "the agent served the held port:\n{log}"
    );
    // The other process still has it: a client's connection lands there.
    // (The handshake completes into its backlog; nobody answers the request.)
    held.set_nonblocking(true)?;
    let client = lab.client.ns.name().to_string();
    let hc = SocketAddr::from((NODE_ADDR, 32000));
    let short = Duration::from_millis(300);
    let _ = xlb_lab::agent::http_get_within(&client, hc, "/healthz", short, short);
    let peer = poll(
        "the holder to get the connection",
        SOON,
        Duration::from_millis(20),
        || match held.accept() {
            Ok((_, peer)) => Ok(Some(peer)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        },
    )?;
    ensure!(peer.ip() == CLIENT_ADDR, "connection from {peer}");
    Ok(())
}

/// A tenant's Service asking for the node's own address (as `loadBalancerIP` or in
/// `externalIPs`, the CVE-2020-8554 pattern) never gets it: connections to the node's
/// own listener on that port still reach the node, the agent reports the refused
/// field, and the same Service's other address is served.
#[test]
fn a_service_never_takes_the_nodes_own_address() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut lab = lab_with(2, "")?;
    // The node's own service (an sshd, say) on 2222 and 2223.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for port in [2222, 2223] {
        let listener = lab
            .node()
            .host
            .ns
            .enter(|| Ok(TcpListener::bind((NODE_ADDR, port))?))?;
        listener.set_nonblocking(true)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut line = String::new();
                        let mut r = BufReader::new(&s);
                        if r.read_line(&mut line).is_ok() {
                            let _ = (&s).write_all(format!("node-own {peer}\n").as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    let eps = lab.node().ready_endpoints();
    let thief = |name: &str, vip: Ipv4Addr, port: u16, external: Option<Ipv4Addr>| {
        let ext = external.map_or(String::new(), |e| format!("  externalIPs: [\"{e}\"]\n"));
        let svc = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  \
             type: LoadBalancer\n  loadBalancerIP: \"{vip}\"\n{ext}  ports:\n  - name: http\n    \
             protocol: TCP\n    port: {port}\n    targetPort: {TCP_LINE_PORT}\n"
        );
        let ports = [PortSpec::new("http", "TCP", port, TCP_LINE_PORT)];
        let slice = endpointslice_yaml("demo", &format!("{name}-1"), name, &ports, &eps);
        multi_doc(&[svc, slice])
    };
    let other_vip = Ipv4Addr::new(10, 0, 100, 9);
    write_atomic(
        &lab.node().manifests_dir.join("thieves.yaml"),
        &multi_doc(&[
            thief("as-vip", NODE_ADDR, 2222, None),
            thief("as-external", other_vip, 2223, Some(NODE_ADDR)),
        ]),
    )?;
    // The file is applied once the second Service's own VIP answers from a pod.
    let served = poll(
        "the second Service's own VIP to answer",
        SOON,
        REPLY_TIMEOUT,
        || {
            Ok(lab
                .client
                .tcp_connect(SocketAddr::from((other_vip, 2223)), REPLY_TIMEOUT)
                .and_then(|mut c| c.ping())
                .ok())
        },
    )?;
    ensure!(
        served.server.starts_with("pod"),
        "{other_vip}:2223 answered by {}",
        served.server
    );
    for port in [2222, 2223] {
        for _ in 0..5 {
            let r = lab
                .client
                .tcp_connect(SocketAddr::from((NODE_ADDR, port)), REPLY_TIMEOUT)?
                .ping()?;
            ensure!(
                r.server == "node-own",
                "{NODE_ADDR}:{port} reached {} instead of the node's own listener",
                r.server
            );
        }
    }
    let refused = lab
        .agent()?
        .metric("xlb_config_errors_total", &[("kind", "address_refused")])?;
    ensure!(refused >= 2.0, "address_refused errors: {refused}");
    let log = lab.agent()?.log();
    for (service, field) in [
        ("demo/as-vip", "spec.loadBalancerIP"),
        ("demo/as-external", "spec.externalIPs"),
    ] {
        ensure!(
            log.lines().any(|l| l.contains(service)
                && l.contains(field)
                && l.contains("Node node-a's own address")),
            "no error naming {service} {field} in the log"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
