//! The agent under hostile conditions, with real processes and packets: scrapers
//! hammering `/metrics` over a full conntrack map while health checks must still
//! answer, expired flows that must not pile up, and a contested VIP whose owner must
//! survive a restart. Needs root and the built binary (`XLB_BIN`, else
//! `target/release/xlb`).
use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::Agent;
use xlb_lab::agent::AgentConfig;
use xlb_lab::lab::{CLIENT_ADDR, Lab, METRICS_PORT, REPLY_TIMEOUT as T, SOON, UPLINK, entry_names};
use xlb_lab::load::{fill_conntrack, health_lab, health_under_scrapes};
use xlb_lab::manifests::{
    EndpointSpec, WEB_NAMESPACE, WEB_SERVICE, WEB_UDP_PORT, WEB_VIP, endpointslice_yaml, multi_doc,
    service_yaml, web_ports, web_tcp_vip, web_udp_vip, write_atomic, write_web,
};
use xlb_lab::poll;
#[test]
fn health_answers_while_fifty_scrapers_read_a_full_conntrack_map() -> Result<()> {
    let mut lab = health_lab(2)?;
    // 200,000 live flows (of the default 262,144), as a UDP flood from many sources
    // leaves them.
    fill_conntrack(&mut lab, 200_000)?;
    let swept = lab.agent()?.metric("xlb_conntrack_sweep_seconds", &[])?;
    eprintln!("last sweep of the filled map: {:.1} ms", swept * 1e3);
    let r = health_under_scrapes(&lab, 50, Duration::from_secs(5));
    eprintln!(
        "health polls: {} answered, p50 {:?}, p99 {:?}, max {:?}; {} scrapes completed meanwhile",
        r.latencies.len(),
        r.percentile(0.5),
        r.percentile(0.99),
        r.latencies.last().copied().unwrap_or_default(),
        r.scrapes
    );
    // Every poll answered within its 1 s timeout.
    ensure!(
        r.failures.is_empty(),
        "health polls failed: {:?}",
        r.failures
    );
    ensure!(
        r.scrapes >= 50,
        "the scrapers barely ran ({} scrapes): no load was applied",
        r.scrapes
    );
    Ok(())
}

#[test]
fn expired_conntrack_entries_are_removed() -> Result<()> {
    let mut lab = health_lab(1)?;
    let vip = SocketAddrV4::new(WEB_VIP, WEB_UDP_PORT);
    let backend = SocketAddrV4::new(lab.node().pods[0].ip, 5353);
    // Flows that died a second ago, as an idle node's old flows do.
    let expired = xlb_lab::bpf::monotonic_ns().saturating_sub(1_000_000_000);
    let n = xlb_lab::bpf::fill_conntrack(&lab.node().pin_dir, 5_000, vip, backend, expired)?;
    // A live flow stays.
    lab.client.udp_request(web_udp_vip(), "live", T, 3)?;
    let agent = lab.agent()?;
    poll("the sweeper to remove the expired flows", SOON, T, || {
        let removed = agent.metric("xlb_conntrack_expired_total", &[])?;
        let present = agent.metric("xlb_conntrack_entries", &[])?;
        Ok((removed >= f64::from(n) && (1.0..10.0).contains(&present)).then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_restart_never_hands_a_contested_vip_to_the_other_claimant() -> Result<()> {
    // rel/good owns the web VIP (pod1); aaa/dup claims the same VIP:ports (pod2) and
    // is refused. Its name sorts first, so a restart that decided by name alone would
    // hand it the VIP.
    let mut lab = Lab::one_node(2)?;
    let node = lab.node();
    let (pod1, pod2) = (&node.pods[0], &node.pods[1]);
    let good = multi_doc(&[
        service_yaml("rel", "good", &WEB_VIP.to_string(), &web_ports(), true),
        endpointslice_yaml(
            "rel",
            "good-1",
            "good",
            &web_ports(),
            &[EndpointSpec::new(pod1.ip, true, &node.name)],
        ),
    ]);
    let dup = multi_doc(&[
        service_yaml("aaa", "dup", &WEB_VIP.to_string(), &web_ports(), true),
        endpointslice_yaml(
            "aaa",
            "dup-1",
            "dup",
            &web_ports(),
            &[EndpointSpec::new(pod2.ip, true, &node.name)],
        ),
    ]);
    let (pod1_name, dir) = (pod1.name.clone(), node.manifests_dir.clone());
    write_atomic(&dir.join("good.yaml"), &good)?;
    lab.start_agent()?.wait_healthy(SOON)?;
    let (tcp, udp) = (web_tcp_vip(), web_udp_vip());
    let served_by_good = |lab: &Lab| -> Result<()> {
        for r in lab
            .client
            .udp_flows(udp, 10, T)?
            .into_iter()
            .chain(lab.client.tcp_flows(tcp, 5, T)?)
        {
            ensure!(
                r.server == pod1_name,
                "answered by {} not rel/good's pod",
                r.server
            );
            ensure!(
                r.seen_peer.ip() == CLIENT_ADDR,
                "{} saw {}",
                r.server,
                r.seen_peer
            );
        }
        Ok(())
    };
    served_by_good(&lab)?;

    let agent = lab.agent()?;
    let mark = agent.log_mark();
    write_atomic(&dir.join("dup.yaml"), &dup)?;
    agent.wait_for_log_line("aaa/dup refused", mark, SOON, |l| {
        l.contains("vip_conflict") || l.contains("already claimed by Service rel/good")
    })?;
    served_by_good(&lab)?;

    let agent = lab.agent()?;
    agent.stop().context("SIGTERM")?;
    let mark = agent.log_mark();
    agent.start_again()?;
    agent.wait_healthy(SOON)?;
    agent.wait_for_log_line("aaa/dup refused after the restart", mark, SOON, |l| {
        l.contains("already claimed by Service rel/good")
    })?;
    served_by_good(&lab)?;
    Ok(())
}

#[test]
fn a_file_rewritten_in_place_never_removes_its_services() -> Result<()> {
    // `(sleep 0.4; cat good.yaml) > m/web.yaml`, as shells and `kubectl get -o yaml > f`
    // write: the file is truncated, empty for a while, then written and closed.
    let mut lab = health_lab(2)?;
    let path = lab.node().manifests_dir.join("web.yaml");
    let content = std::fs::read(&path)?;
    let udp = web_udp_vip();
    let ticker = xlb_lab::Ticker::start(&lab.client, udp, Duration::from_millis(10), 300)?;
    ticker.wait_received(5, SOON)?;
    let mark = lab.agent()?.log_mark();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?; // O_TRUNC: empty from here
        // Long enough for a reload to see the empty file, had one been triggered.
        std::thread::sleep(Duration::from_millis(400));
        f.write_all(&content)?;
    }
    let report = ticker.finish(Duration::from_secs(1))?;
    ensure!(
        report.lost == 0,
        "{} of {} datagrams lost while the file was rewritten: {:?}",
        report.lost,
        report.sent,
        report.missing
    );
    let log = lab.agent()?.log();
    let removed: Vec<&str> = log
        .lines()
        .skip(mark)
        .filter(|l| l.contains("service removed"))
        .collect();
    ensure!(removed.is_empty(), "services were removed: {removed:?}");
    Ok(())
}

/// The first node's agent configuration, for starting a second process beside it.
fn second_agent(lab: &mut Lab, tweak: impl FnOnce(&mut AgentConfig)) -> Result<Agent> {
    let mut cfg = lab.agent()?.config().clone();
    cfg.log_dir = lab.scratch().join("second");
    std::fs::create_dir_all(&cfg.log_dir)?;
    tweak(&mut cfg);
    Agent::start(cfg)
}

#[test]
fn a_second_agent_on_the_same_pin_path_exits_naming_the_first() -> Result<()> {
    let mut lab = health_lab(1)?;
    let first = lab.agent()?.pid().context("first agent pid")?;
    let mut second = second_agent(&mut lab, |c| {
        c.metrics_addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT + 1));
    })?;
    let status = second.wait_exit(SOON)?;
    ensure!(!status.success(), "the second agent ran: {status}");
    let log = second.log();
    ensure!(
        log.contains(&format!("in use by another xlb agent (pid {first})")),
        "the error does not name the first agent (pid {first}): {log}"
    );
    // The first one never noticed.
    lab.client.udp_flows(web_udp_vip(), 5, T)?;
    ensure!(lab.agent()?.log().lines().all(|l| !l.contains(" ERROR ")));
    Ok(())
}

#[test]
fn a_start_that_fails_touches_no_datapath() -> Result<()> {
    let mut lab = health_lab(1)?;
    let pins_before = entry_names(&lab.node().pin_dir);
    for (what, port, iface) in [
        // The metrics port is the first agent's: taken.
        ("taken metrics port", METRICS_PORT, UPLINK),
        ("missing interface", METRICS_PORT + 1, "nope0"),
    ] {
        let pin_dir = PathBuf::from(format!("{}-second", lab.node().pin_dir.display()));
        let mut second = second_agent(&mut lab, |c| {
            c.metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
            c.pin_dir = pin_dir.clone();
            c.interface = iface.to_string();
        })?;
        let status = second.wait_exit(SOON)?;
        ensure!(!status.success(), "{what}: the agent ran");
        ensure!(
            !pin_dir.exists(),
            "{what}: the failed start made {} ({:?})",
            pin_dir.display(),
            entry_names(&pin_dir)
        );
    }
    ensure!(
        entry_names(&lab.node().pin_dir) == pins_before,
        "the running agent's pins changed"
    );
    lab.client.udp_flows(web_udp_vip(), 5, T)?;
    Ok(())
}

#[test]
fn a_datapath_removed_under_a_running_agent_is_attached_again() -> Result<()> {
    let mut lab = health_lab(2)?;
    lab.client.udp_flows(web_udp_vip(), 5, T)?;
    let bin = lab.agent()?.config().xlb_bin.clone();
    let mark = lab.agent()?.log_mark();
    let cleanup = |lab: &Lab, force: bool| {
        let node = lab.node();
        let mut cmd = node.host.ns.command(&bin);
        cmd.arg("cleanup").args(["--interface", UPLINK]);
        if force {
            cmd.arg("--force");
        }
        cmd.arg("--pin-path").arg(&node.pin_dir);
        xlb_lab::netns::output(&mut cmd)
    };
    // Without --force, cleanup refuses while the agent runs, naming it.
    let refused = cleanup(&lab, false)?;
    ensure!(!refused.status.success(), "cleanup ran beside a live agent");
    let forced = cleanup(&lab, true)?;
    ensure!(forced.status.success(), "cleanup --force: {forced:?}");
    let agent = lab.agent()?;
    agent.wait_for_log_line("the agent to notice", mark, SOON, |l| {
        l.contains("datapath missing")
    })?;
    agent.wait_for_log_line("the agent to re-attach", mark, SOON, |l| {
        l.contains("datapath re-attached")
    })?;
    poll("traffic through the VIP again", SOON, T, || {
        Ok(lab.client.udp_flows(web_udp_vip(), 5, T).ok())
    })?;
    let agent = lab.agent()?;
    ensure!(agent.metric("xlb_datapath_reattach_total", &[])? >= 1.0);
    ensure!(agent.http_get("/healthz")?.0 == 200);
    Ok(())
}

#[test]
fn the_pin_directory_is_private_and_one_owned_by_another_user_is_refused() -> Result<()> {
    let mut lab = health_lab(1)?;
    let meta = std::fs::metadata(&lab.node().pin_dir)?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o700,
        "pin directory mode {:o}",
        meta.permissions().mode() & 0o777
    );
    // `nobody` made the directory first.
    // (bpffs refuses dots in names.)
    let theirs = PathBuf::from(format!("{}-nobody", lab.node().pin_dir.display()));
    std::fs::create_dir(&theirs).context("mkdir")?;
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).context("chown")?;
    let dir = theirs.clone();
    let mut second = second_agent(&mut lab, |c| {
        c.metrics_addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT + 1));
        c.pin_dir = dir;
    })?;
    let status = second.wait_exit(SOON);
    let log = second.log();
    std::fs::remove_dir(&theirs).context("rmdir")?;
    ensure!(
        !status?.success(),
        "the agent pinned into nobody's directory"
    );
    ensure!(log.contains("owned by uid 65534"), "{log}");
    Ok(())
}

#[test]
fn a_replaced_manifests_directory_is_watched_again() -> Result<()> {
    let mut lab = health_lab(2)?;
    let dir = lab.node().manifests_dir.clone();
    let web = std::fs::read_to_string(dir.join("web.yaml"))?;
    let mark = lab.agent()?.log_mark();
    std::fs::remove_dir_all(&dir)?;
    std::fs::create_dir(&dir)?;
    lab.agent()?
        .wait_for_log_line("the new directory to be watched", mark, SOON, |l| {
            l.contains("manifests directory replaced")
        })?;
    // Edits in the new directory are seen: only pod1 stays an endpoint.
    let pod2 = lab.node().pods[1].ip.to_string();
    let only_pod1: String = web
        .lines()
        .scan(false, |skip, l| {
            // Drop pod2's endpoint entry (its `- addresses:` line and the lines under it).
            if l.contains(&pod2) {
                *skip = true;
                return Some(None);
            }
            if *skip && l.trim_start().starts_with("- ") {
                *skip = false;
            }
            Some((!*skip).then(|| format!("{l}\n")))
        })
        .flatten()
        .collect();
    ensure!(only_pod1 != web, "pod2 not found in web.yaml");
    write_atomic(&dir.join("web.yaml"), &only_pod1)?;
    let pod1 = lab.node().pods[0].name.clone();
    poll("only pod1 to answer", SOON, T, || {
        let r = lab.client.udp_flows(web_udp_vip(), 10, T)?;
        Ok(r.iter().all(|r| r.server == pod1).then_some(()))
    })?;
    Ok(())
}

/// An `xlb agent` started under `ip netns exec`, killed by PID when dropped.
struct NetnsExecAgent(std::process::Child);

impl Drop for NetnsExecAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn under_ip_netns_exec_the_agent_warns_that_its_pins_will_vanish() -> Result<()> {
    let lab = Lab::one_node(1)?;
    let node = lab.node();
    let log_path = lab.scratch().join("netns-exec.log");
    let log = std::fs::File::create(&log_path)?;
    let pin_dir = format!("{}-netnsexec", node.pin_dir.display());
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", node.host.ns.name()])
        .arg(xlb_lab::xlb_bin()?)
        .args(["agent", "--interface", UPLINK, "--node-name", &node.name])
        .arg("--manifests")
        .arg(&node.manifests_dir)
        .args(["--metrics-addr", "127.0.0.1:9467", "--pin-path", &pin_dir])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let _agent = NetnsExecAgent(child);
    poll("the warning about a private bpffs", SOON, T, || {
        let text = std::fs::read_to_string(&log_path)?;
        Ok(text.contains("mounted a new bpffs").then_some(text))
    })?;
    // Its pins are not in the host's bpffs: nothing outlives this agent.
    ensure!(
        !Path::new(&pin_dir).exists(),
        "{pin_dir} is in the host's bpffs"
    );
    Ok(())
}

#[test]
fn metrics_are_served_in_the_format_asked_for_and_promtool_clean() -> Result<()> {
    let lab = health_lab(1)?;
    lab.client.udp_flows(web_udp_vip(), 3, T)?;
    let ns = lab.node().host.ns.name().to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let long = Duration::from_secs(5);
    let (code, head, body) = xlb_lab::agent::http_request(&ns, addr, "/metrics", "", T, long)?;
    ensure!(code == 200, "{code}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    ensure!(
        !body.contains("# EOF"),
        "OpenMetrics under a text/plain content type"
    );
    // promtool (Debian's prometheus package, installed by `cargo xtask setup`).
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (cargo xtask setup installs it)")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(body.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );

    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let (_, head, body) = xlb_lab::agent::http_request(&ns, addr, "/metrics", accept, T, long)?;
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    ensure!(
        body.trim_end().ends_with("# EOF"),
        "not OpenMetrics: {body}"
    );
    Ok(())
}

#[test]
fn icmp_errors_about_vip_flows_are_translated_both_ways() -> Result<()> {
    // A Service port no pod listens on: the pod's kernel answers port unreachable.
    let mut lab = Lab::one_node(1)?;
    let node = lab.node();
    let mut ports = web_ports();
    ports.push(xlb_lab::manifests::PortSpec::new(
        "closed", "UDP", 9999, 9999,
    ));
    let eps = [EndpointSpec::new(node.pods[0].ip, true, &node.name)];
    let yaml = multi_doc(&[
        service_yaml(
            WEB_NAMESPACE,
            WEB_SERVICE,
            &WEB_VIP.to_string(),
            &ports,
            true,
        ),
        endpointslice_yaml(WEB_NAMESPACE, "web-1", WEB_SERVICE, &ports, &eps),
    ]);
    write_atomic(&node.manifests_dir.join("web.yaml"), &yaml)?;
    lab.start_agent()?.wait_healthy(SOON)?;
    lab.client.udp_flows(web_udp_vip(), 3, T)?;

    // Pod -> client: the error quotes client -> pod:9999; leaving the node it must
    // quote client -> VIP:9999 from the VIP, or the client's socket never hears of it.
    let closed = SocketAddr::from((WEB_VIP, 9999));
    let sock = lab.client.udp_socket()?;
    sock.connect(closed)?;
    sock.set_read_timeout(Some(T))?;
    let refused = poll("ECONNREFUSED from the VIP's closed port", SOON, T, || {
        sock.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        Ok(match sock.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        })
    });
    refused.context("the pod's port unreachable did not reach the client's socket")?;

    // Client -> pod: the client closes its port before the echo answers; its port
    // unreachable (to the VIP, quoting VIP:5353 -> client) must reach the pod.
    let pod = &lab.node().pods[0].host;
    let before = pod
        .snmp("Icmp")?
        .get("InDestUnreachs")
        .copied()
        .unwrap_or(0);
    poll(
        "the client's port unreachable to reach the pod",
        SOON,
        T,
        || {
            let s = lab.client.udp_socket()?;
            s.send_to(b"bye", web_udp_vip())?;
            drop(s);
            std::thread::sleep(Duration::from_millis(200));
            let now = pod
                .snmp("Icmp")?
                .get("InDestUnreachs")
                .copied()
                .unwrap_or(0);
            Ok((now > before).then_some(()))
        },
    )?;
    let nat = lab.agent()?.metric(
        "xlb_datapath_packets_total",
        &[("reason", "icmp_error_nat")],
    )?;
    ensure!(nat >= 2.0, "icmp_error_nat counted {nat}");
    Ok(())
}

#[test]
fn an_uplink_deleted_and_recreated_under_a_running_agent_gets_the_datapath_again() -> Result<()> {
    let mut lab = health_lab(2)?;
    lab.client.udp_flows(web_udp_vip(), 5, T)?;
    let mark = lab.agent()?.log_mark();
    lab.recreate_uplink()?;
    let agent = lab.agent()?;
    agent.wait_for_log_line("the agent to see the new interface", mark, SOON, |l| {
        l.contains("datapath missing") && l.contains("recreated")
    })?;
    agent.wait_for_log_line("the agent to re-attach", mark, SOON, |l| {
        l.contains("datapath re-attached")
    })?;
    poll(
        "traffic through the VIP on the new interface",
        SOON,
        T,
        || Ok(lab.client.udp_flows(web_udp_vip(), 5, T).ok()),
    )?;
    ensure!(lab.agent()?.http_get("/healthz")?.0 == 200);
    Ok(())
}

/// Issue 31, finding 2: 1,100 connections that send a header line a second, from one
/// host on the LAN, to an agent whose open-files limit is systemd's default 1,024 (as
/// its hard limit too, so it cannot raise it). Before, the listener took every one
/// until descriptors ran out: `/healthz` failed, and the layout and link checks took
/// EMFILE for "older layout" and "link down". Now it bounds connections per address
/// and cuts off slow headers: every health poll from the node answers, the pinned
/// maps are the same maps, and the VIP keeps serving.
#[test]
fn a_thousand_slow_connections_neither_stop_health_nor_touch_the_datapath() -> Result<()> {
    use std::io::Write;
    let mut lab = health_lab(2)?;
    lab.client.udp_flows(web_udp_vip(), 10, T)?;
    let real = lab.agent()?.config().xlb_bin.clone();
    let wrapper = lab.scratch().join("xlb-1024-files");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec prlimit --nofile=1024:1024 -- {} \"$@\"\n",
            real.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let status = lab.agent()?.stop()?;
    ensure!(status.success(), "the first agent exited {status}");
    let port = METRICS_PORT + 2;
    let mut agent = second_agent(&mut lab, |c| {
        c.xlb_bin = wrapper.clone();
        c.metrics_addr = SocketAddr::from(([0, 0, 0, 0], port));
    })?;
    agent.wait_healthy(SOON)?;
    let conntrack = |lab: &Lab| -> Result<u64> {
        let path = lab.node().pin_dir.join(xlb_common::names::CONNTRACK4);
        let out = xlb_lab::netns::run(
            std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["id"].as_u64().context("conntrack map id")
    };
    let map_before = conntrack(&lab)?;

    let node = SocketAddr::from((lab.node().host.addr, port));
    let mut conns = lab.client.ns.enter(move || {
        let mut v = Vec::new();
        for _ in 0..1_100 {
            // Connections past the bound are accepted and closed at once; a refused
            // or reset one is as good as a held one for the attacker's purpose.
            if let Ok(mut s) = std::net::TcpStream::connect_timeout(&node, T) {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
                v.push(s);
            }
        }
        Ok(v)
    })?;
    ensure!(
        conns.len() >= 1_000,
        "only {} connections made",
        conns.len()
    );
    let mut failed = Vec::new();
    for i in 0..15 {
        // A header line a second on every connection still open.
        for s in &mut conns {
            let _ = s.write_all(b"X-Slow: 1\r\n");
        }
        match agent.http_get("/healthz") {
            Ok((200, _)) => {}
            Ok((code, _)) => failed.push(format!("poll {i}: status {code}")),
            Err(e) => failed.push(format!("poll {i}: {e:#}")),
        }
        std::thread::sleep(Duration::from_millis(1_000 / 3));
    }
    drop(conns);
    ensure!(
        failed.is_empty(),
        "/healthz failed {} of 15 polls: {failed:?}\n{}",
        failed.len(),
        xlb_lab::agent::tail(&agent.log(), 20)
    );
    ensure!(
        conntrack(&lab)? == map_before,
        "the pinned conntrack map was replaced"
    );
    let log = agent.log();
    ensure!(
        !log.contains("link changed") && !log.contains("datapath missing"),
        "the agent took the attack for a link or datapath change:\n{}",
        xlb_lab::agent::tail(&log, 20)
    );
    lab.client.udp_flows(web_udp_vip(), 10, T)?;
    Ok(())
}

/// A manifest nested 200,000 deep (`spec: [[[…]]]`, 400 KB) is refused at once,
/// naming its file, and a change written right after it (an endpoint removed) reaches
/// the datapath: before, parsing it took over a minute, and every other change waited.
#[test]
fn a_deeply_nested_manifest_does_not_hold_up_other_changes() -> Result<()> {
    let mut lab = health_lab(2)?;
    let n = 200_000;
    let deep = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: deep, namespace: demo}}\nspec: {}{}\n",
        "[".repeat(n),
        "]".repeat(n)
    );
    write_atomic(&lab.node().manifests_dir.join("deep.yaml"), &deep)?;
    // Only pod 1 left in the web Service.
    write_web(&lab, &[(1, true, true, false)])?;
    let pod1 = lab.node().pods[0].name.clone();
    poll(
        "the endpoint removal to reach the datapath",
        SOON,
        T,
        || {
            let servers: BTreeSet<String> = lab
                .client
                .udp_flows(web_udp_vip(), 20, T)?
                .into_iter()
                .map(|r| r.server)
                .collect();
            Ok((servers == BTreeSet::from([pod1.clone()])).then_some(()))
        },
    )?;
    let log = lab.agent()?.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("deep.yaml") && l.contains("nested deeper than 128")),
        "no error naming deep.yaml in the log"
    );
    Ok(())
}

/// The listener shows other hosts `/metrics` and `/healthz` only: `/debug/owners` and
/// `/debug/peers` (who holds each VIP and why, the BGP sessions) answer clients on the
/// node itself, even with `--metrics-addr 0.0.0.0:…` as the DaemonSet binds it.
#[test]
fn debug_views_answer_only_the_node_itself() -> Result<()> {
    let mut lab = health_lab(1)?;
    let mut cfg = lab.agent()?.config().clone();
    lab.agent()?.stop()?;
    cfg.metrics_addr = SocketAddr::from(([0, 0, 0, 0], METRICS_PORT));
    let mut agent = Agent::start(cfg)?;
    agent.wait_healthy(SOON)?;
    let node_ns = lab.node().host.ns.name().to_string();
    let client_ns = lab.client.ns.name().to_string();
    let on_node = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let from_lan = SocketAddr::from((lab.node().host.addr, METRICS_PORT));
    for view in ["/debug/owners", "/debug/peers"] {
        let (code, body) = xlb_lab::agent::http_get(&node_ns, on_node, view)?;
        ensure!(
            code == 200 && body.starts_with('{'),
            "{view} on the node: {code} {body}"
        );
        let (code, body) = xlb_lab::agent::http_get(&client_ns, from_lan, view)?;
        ensure!(code == 403, "{view} from the LAN: {code} {body}");
    }
    for path in ["/metrics", "/healthz"] {
        let (code, _) = xlb_lab::agent::http_get(&client_ns, from_lan, path)?;
        ensure!(code == 200, "{path} from the LAN: {code}");
    }
    Ok(())
}
