//! externalTrafficPolicy Cluster across nodes, with real packets in the multi-node lab:
//! the entry node tunnels (IPIP) to the backend's node, which delivers to the pod and
//! answers the client directly from the VIP (DSR); every node picks the same backend
//! for the same flow (Maglev); oversized packets get ICMP fragmentation-needed instead
//! of vanishing. Needs root and the built binary (`XLB_BIN`, else target/release/xlb).
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::lab::{CLIENT_ADDR, Lab, Links, ManifestsLayout, NodeSpec, REPLY_TIMEOUT, SOON};
use xlb_lab::manifests::{
    PortSpec, WEB_NAMESPACE, WEB_SERVICE, WEB_VIP, multi_doc, service_yaml, web_ports,
    web_slice_yaml, web_tcp_vip, web_udp_vip, write_atomic,
};
use xlb_lab::poll;

/// A lab of three nodes with `pods` each on an ordinary bridge (default offloads, no
/// XDP on bridge ports, nodes that never exchanged a packet), the web Service with
/// Cluster policy and the pods of `endpoint_nodes` as endpoints, Node objects, and an
/// agent on every node in the default `--xdp-mode`.
fn cluster_lab(pods: [usize; 3], endpoint_nodes: &[&str]) -> Result<Lab> {
    cluster_lab_with(pods, endpoint_nodes, &[], Links::Ordinary)
}

/// [`cluster_lab`] with extra `xlb agent` flags on every node and the given links.
fn cluster_lab_with(
    pods: [usize; 3],
    endpoint_nodes: &[&str],
    args: &[&str],
    links: Links,
) -> Result<Lab> {
    let mut lab = Lab::multi_node_with(&pods.map(NodeSpec::with_pods), links)?;
    for n in &mut lab.nodes {
        n.agent_args.extend(args.iter().map(|a| a.to_string()));
    }
    let mut eps = Vec::new();
    for n in &lab.nodes {
        if endpoint_nodes.contains(&n.name.as_str()) {
            eps.extend(n.ready_endpoints());
        }
    }
    let ports: Vec<PortSpec> = web_ports();
    let service = service_yaml(
        WEB_NAMESPACE,
        WEB_SERVICE,
        &WEB_VIP.to_string(),
        &ports,
        false,
    );
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    write_atomic(
        &dir.join("web.yaml"),
        &multi_doc(&[service, web_slice_yaml(&eps)]),
    )?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    Ok(lab)
}

fn reason(lab: &mut Lab, node: &str, reason: &str) -> Result<f64> {
    lab.node_named_mut(node)?
        .agent()?
        .metric("xlb_datapath_packets_total", &[("reason", reason)])
}

#[test]
fn cluster_traffic_is_tunnelled_and_answered_directly_from_the_vip() -> Result<()> {
    let mut lab = tunnelled_and_answered_directly(Links::Ordinary)?;
    // Default offloads: the client's TCP sends TSO bursts, which TC (and generic XDP)
    // sees whole; they are encapsulated by TC and cut into segments that fit.
    ensure!(
        reason(&mut lab, "node-a", "fwd_encap_aggregate")? >= 1.0,
        "the upload's TSO bursts did not go through TC's encapsulation"
    );
    // Default --xdp-mode (auto) on a veth: no XDP program, the datapath at TC (native
    // XDP on a veth drops XDP_TX frames unless its peer runs XDP, and generic XDP
    // copies every skb).
    let want = xlb_lab::lab::expected_veth_mode();
    let mode = lab
        .node_named_mut("node-a")?
        .agent()?
        .metric("xlb_xdp_mode", &[("mode", &want), ("driver", "veth")])?;
    ensure!(mode == 1.0, "the mode on a veth is not {want}: {mode}");
    Ok(())
}

#[test]
fn cluster_traffic_is_tunnelled_on_emulated_nics_in_native_mode() -> Result<()> {
    let mut lab = tunnelled_and_answered_directly(Links::EmulatedNic)?;
    let mode = lab
        .node_named_mut("node-a")?
        .agent()?
        .metric("xlb_xdp_mode", &[("mode", "native")])?;
    ensure!(
        mode == 1.0,
        "--xdp-mode native did not attach natively: {mode}"
    );
    Ok(())
}

/// node-a (where the client's VIP route points) has no endpoint: everything it gets
/// must be tunnelled to node-b or node-c, whose pods answer the client directly.
fn tunnelled_and_answered_directly(links: Links) -> Result<Lab> {
    let mut lab = cluster_lab_with([1, 2, 1], &["node-b", "node-c"], &[], links)?;
    let replies = poll("the VIP to answer via node-a", SOON, REPLY_TIMEOUT, || {
        let r = lab.client.udp_flows(web_udp_vip(), 40, REPLY_TIMEOUT);
        Ok(r.ok().filter(|r| r.len() == 40))
    })?;
    let mut servers = BTreeSet::new();
    for r in &replies {
        ensure!(r.from == web_udp_vip(), "reply from {} not the VIP", r.from);
        ensure!(
            r.seen_peer == r.local,
            "{} saw {} not the client {}",
            r.server,
            r.seen_peer,
            r.local
        );
        servers.insert(r.server.clone());
    }
    ensure!(
        servers.iter().all(|s| !s.starts_with("node-a")),
        "node-a's pod is not an endpoint: {servers:?}"
    );
    ensure!(
        servers.len() == 3,
        "40 flows should reach all 3 endpoints: {servers:?}"
    );
    let tcp = lab.client.tcp_flows(web_tcp_vip(), 10, REPLY_TIMEOUT)?;
    ensure!(tcp.len() == 10, "TCP via the tunnel: {} of 10", tcp.len());
    for r in &tcp {
        ensure!(
            r.seen_peer.ip() == CLIENT_ADDR,
            "{} saw {}",
            r.server,
            r.seen_peer
        );
    }
    ensure!(
        reason(&mut lab, "node-a", "fwd_encap")? >= 50.0,
        "node-a did not encapsulate"
    );
    let decap = reason(&mut lab, "node-b", "decap")? + reason(&mut lab, "node-c", "decap")?;
    ensure!(decap >= 50.0, "nodes b and c decapsulated {decap} packets");
    // Replies went straight to the client: node-a never reverse-NATs anything.
    ensure!(
        reason(&mut lab, "node-a", "rev_nat")? == 0.0,
        "a reply went back through node-a"
    );

    // A full-size upload: 1500-byte segments no longer fit once the tunnel adds 20
    // bytes. Single frames (no TSO) get ICMP fragmentation-needed and the client's
    // path MTU drops; bursts (TSO, seen whole by generic XDP) are cut into smaller
    // segments by TC. Either way the transfer completes.
    let line = "x".repeat(200_000);
    let mut s = lab.client.ns.enter(|| {
        TcpStream::connect_timeout(&web_tcp_vip(), REPLY_TIMEOUT).context("connect for upload")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    ensure!(
        answer
            .split(' ')
            .nth(1)
            .is_some_and(|p| p.starts_with("10.0.0.1:")),
        "upload answered {answer:?}"
    );
    drop(s);

    // One full-size datagram with DF: a single frame that no longer fits once
    // encapsulated. node-a answers ICMP fragmentation-needed (RFC 1191) and the
    // client's kernel records the path MTU to the VIP. (Without TSO the upload's
    // frames already taught it: the kernel then refuses the datagram itself.)
    let vip = web_udp_vip().ip().to_string();
    let learnt = || -> Result<bool> {
        Ok(lab
            .client
            .ns
            .ip(&["route", "get", &vip])?
            .contains("mtu 1480"))
    };
    if !learnt()? {
        send_df_datagram(&lab)?;
    }
    poll(
        "the client to learn the path MTU to the VIP",
        SOON,
        Duration::from_millis(20),
        || Ok(learnt()?.then_some(())),
    )?;
    ensure!(
        reason(&mut lab, "node-a", "icmp_frag_needed")? >= 1.0,
        "node-a sent no ICMP fragmentation-needed"
    );
    Ok(lab)
}

/// Sends one 1500-byte UDP datagram with DF set from the client to the web VIP.
fn send_df_datagram(lab: &Lab) -> Result<()> {
    let udp = lab.client.udp_socket()?;
    let pmtu_do: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt on our own socket with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&udp),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&pmtu_do as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
    udp.send_to(&[b'x'; 1472], web_udp_vip())?;
    Ok(())
}

#[test]
fn first_packet_to_a_node_without_a_neighbour_entry_is_not_lost() -> Result<()> {
    // The issue a user meets after a reboot or an ARP timeout: node-a has no neighbour
    // entry for the backends' nodes. XDP cannot resolve one; it hands the encapsulated
    // packet to TC, which sends it with bpf_redirect_neigh. Every flow gets exactly one
    // datagram, no retry: each must be answered.
    let mut lab = cluster_lab([1, 2, 1], &["node-b", "node-c"])?;
    poll(
        "node-a to keep node-b and node-c resolved",
        SOON,
        REPLY_TIMEOUT,
        || {
            let n = lab
                .node_named_mut("node-a")?
                .agent()?
                .metric("xlb_managed_neighbours", &[])?;
            Ok((n == 2.0).then_some(()))
        },
    )?;
    // Kept as managed entries where the agent uses them, else as plain ones it marks
    // used (the forced-fallback run of the core tests takes that path).
    let managed = lab
        .node_named_mut("node-a")?
        .agent()?
        .metric("xlb_kernel_feature", &[("feature", "managed_neigh")])?
        == 1.0;
    for peer in ["node-b", "node-c"] {
        let ip = lab.node_named(peer)?.host.addr.to_string();
        let line = lab.node_named("node-a")?.host.ns.ip(&[
            "-d",
            "neigh",
            "show",
            &ip,
            "dev",
            xlb_lab::lab::UPLINK,
        ])?;
        ensure!(
            line.contains("managed") == managed,
            "node-a's entry for {peer} with managed neighbours {}: {line:?}",
            if managed { "used" } else { "not used" }
        );
    }
    // The entries are deleted again before every flow: node-a's own traffic to its
    // peers (the membership protocol probes and gossips every 50-100 ms) resolves them
    // again, and on a loaded machine that can come before the client's first datagram.
    let peers = ["node-b", "node-c"]
        .iter()
        .map(|p| Ok(lab.node_named(p)?.host.addr.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let mut servers = BTreeSet::new();
    for i in 0..20 {
        let a = lab.node_named("node-a")?;
        for ip in &peers {
            // A probe may have left no entry to delete, or may be resolving one now.
            let _ = a
                .host
                .ns
                .ip(&["neigh", "del", ip, "dev", xlb_lab::lab::UPLINK]);
        }
        let r = lab
            .client
            .udp_request(web_udp_vip(), "once", REPLY_TIMEOUT, 1)
            .with_context(|| format!("flow {i}: its only datagram was lost"))?;
        ensure!(r.from == web_udp_vip(), "reply from {}", r.from);
        servers.insert(r.server);
    }
    ensure!(servers.len() == 3, "20 flows reached {servers:?}");
    ensure!(
        reason(&mut lab, "node-a", "fwd_encap_resolve")? >= 1.0,
        "no packet went through neighbour resolution"
    );
    ensure!(
        reason(&mut lab, "node-a", "drop_encap_no_route")? == 0.0,
        "a packet was dropped for want of a neighbour"
    );
    Ok(())
}

#[test]
fn cluster_snat_mode_answers_through_the_entry_node() -> Result<()> {
    // As above, but where DSR is not possible: node-a source-NATs to its own address,
    // so the pods see node-a (10.0.0.11), and the replies come back through it.
    let mut lab = cluster_lab_with(
        [1, 2, 1],
        &["node-b", "node-c"],
        &["--cluster-mode", "snat"],
        Links::Ordinary,
    )?;
    let node_a = lab.node_named("node-a")?.host.addr;
    let replies = poll("the VIP to answer via node-a", SOON, REPLY_TIMEOUT, || {
        let r = lab.client.udp_flows(web_udp_vip(), 40, REPLY_TIMEOUT);
        Ok(r.ok().filter(|r| r.len() == 40))
    })?;
    let mut servers = BTreeSet::new();
    for r in &replies {
        ensure!(r.from == web_udp_vip(), "reply from {} not the VIP", r.from);
        ensure!(
            r.seen_peer.ip() == node_a,
            "{} saw {} not node-a",
            r.server,
            r.seen_peer
        );
        servers.insert(r.server.clone());
    }
    ensure!(
        servers.len() == 3,
        "40 flows should reach all 3 endpoints: {servers:?}"
    );
    let tcp = lab.client.tcp_flows(web_tcp_vip(), 10, REPLY_TIMEOUT)?;
    ensure!(tcp.len() == 10, "TCP through SNAT: {} of 10", tcp.len());
    for r in &tcp {
        ensure!(r.from == web_tcp_vip(), "TCP reply from {}", r.from);
        ensure!(
            r.seen_peer.ip() == node_a,
            "{} saw {}",
            r.server,
            r.seen_peer
        );
    }
    ensure!(
        reason(&mut lab, "node-a", "fwd_snat")? >= 50.0,
        "node-a did not SNAT"
    );
    ensure!(
        reason(&mut lab, "node-a", "rev_snat")? >= 50.0,
        "replies did not come back via node-a"
    );
    ensure!(
        reason(&mut lab, "node-a", "fwd_encap")? == 0.0,
        "SNAT mode must not tunnel"
    );
    Ok(())
}

/// Sends one datagram from `CLIENT_ADDR:sport` to the VIP and returns the answering pod.
fn server_for(lab: &Lab, sport: u16) -> Result<String> {
    let sock = lab.client.ns.enter(|| {
        UdpSocket::bind(SocketAddrV4::new(CLIENT_ADDR, sport)).context("bind fixed port")
    })?;
    sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        sock.send_to(b"x", web_udp_vip())?;
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            ensure!(from == web_udp_vip(), "reply from {from}");
            let text = String::from_utf8_lossy(&buf[..n]);
            return Ok(text.split(' ').next().unwrap_or_default().to_string());
        }
    }
    anyhow::bail!("no reply for source port {sport}")
}

#[test]
fn every_node_picks_the_same_backend_for_a_flow() -> Result<()> {
    let lab = cluster_lab([2, 2, 2], &["node-a", "node-b", "node-c"])?;
    poll("the VIP to answer via node-a", SOON, REPLY_TIMEOUT, || {
        lab.client.udp_probe(web_udp_vip(), REPLY_TIMEOUT)
    })?;
    let ports: Vec<u16> = (40_000..40_200).collect();
    let via_a: BTreeMap<u16, String> = ports
        .iter()
        .map(|p| Ok((*p, server_for(&lab, *p)?)))
        .collect::<Result<_>>()?;
    let spread: BTreeSet<&String> = via_a.values().collect();
    ensure!(
        spread.len() == 6,
        "200 flows reached {} of 6 pods",
        spread.len()
    );

    lab.client_route_vips_via("node-b")?;
    let mut differ = Vec::new();
    for p in &ports {
        let s = server_for(&lab, *p)?;
        if s != via_a[p] {
            differ.push((*p, via_a[p].clone(), s));
        }
    }
    ensure!(
        differ.is_empty(),
        "{} of 200 flows landed elsewhere via node-b: {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    Ok(())
}

#[test]
fn local_health_check_node_port_says_which_nodes_serve() -> Result<()> {
    // Local policy with endpoints on node-a only: node-a's healthCheckNodePort answers
    // 200 with its endpoint count, the others 503, so an external load balancer (or
    // L2/BGP later) sends traffic only where it can be served.
    let mut lab = Lab::multi_node(&[2, 1, 1].map(NodeSpec::with_pods))?;
    let a = lab.node_named("node-a")?;
    let doc = xlb_lab::load::web_health_yaml(&a.name, &a.pods, 32100);
    let dir = lab.manifests_dir();
    lab.write_nodes_yaml(&dir)?;
    write_atomic(&dir.join("web.yaml"), &doc)?;
    lab.start_agents(ManifestsLayout::Shared, SOON)?;
    let client = lab.client.ns.name().to_string();
    for n in &lab.nodes {
        let hc = SocketAddr::from((n.host.addr, 32100));
        let (code, body) = poll(
            &format!("{} health check", n.name),
            SOON,
            REPLY_TIMEOUT,
            || Ok(xlb_lab::agent::http_get(&client, hc, "/healthz").ok()),
        )?;
        if n.name == "node-a" {
            ensure!(code == 200, "node-a: {code} {body}");
            ensure!(body.contains("\"localEndpoints\":2"), "node-a: {body}");
        } else {
            ensure!(code == 503, "{}: {code} {body}", n.name);
            ensure!(body.contains("\"localEndpoints\":0"), "{}: {body}", n.name);
        }
    }
    Ok(())
}
