//! The kernel-feature fallbacks, forced on whatever kernel runs the tests
//! (`xlb agent --force-fallback all`): XDP hands packets to TC through the per-CPU
//! slot instead of metadata, and TC programs are netlink cls_bpf filters instead of
//! tcx links (what Debian 12's 6.1 kernel needs). Real traffic through both; a
//! restart under traffic that loses nothing; `xlb cleanup` removing the filters.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use xlb_lab::lab::{CLIENT_ADDR, Lab, REPLY_TIMEOUT, SOON, UPLINK};
use xlb_lab::manifests::{web_tcp_vip, web_udp_vip, web_yaml, write_atomic};
use xlb_lab::{Ticker, poll};

/// xlb's netlink filters on the uplink in one direction: (handle, program id, name).
fn xlb_filters(lab: &Lab, direction: &str) -> Result<Vec<(String, u64, String)>> {
    let out = lab
        .node()
        .host
        .ns
        .run("tc", &["-j", "filter", "show", "dev", UPLINK, direction])?;
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .with_context(|| format!("tc -j filter show: {out}"))?;
    let mut found = vec![];
    for f in v.as_array().cloned().unwrap_or_default() {
        let Some(opts) = f.get("options") else {
            continue;
        };
        let name = opts["bpf_name"].as_str().unwrap_or_default().to_string();
        if !name.starts_with("xlb_") {
            continue;
        }
        let handle = opts["handle"].as_str().unwrap_or_default().to_string();
        let prog = opts["prog"]["id"].as_u64().unwrap_or(0);
        found.push((handle, prog, name));
    }
    Ok(found)
}

fn reason(lab: &mut Lab, reason: &str) -> Result<f64> {
    lab.agent()?
        .metric("xlb_datapath_packets_total", &[("reason", reason)])
}

#[test]
fn forced_fallbacks_deliver_survive_a_restart_and_clean_up() -> Result<()> {
    let mut lab = Lab::one_node(3)?;
    // Generic XDP: the hand-off slot is XDP's (the TC datapath needs no hand-off).
    lab.node_mut().agent_args = ["--xdp-mode", "generic", "--force-fallback", "all"]
        .map(String::from)
        .to_vec();
    let eps = lab.node().ready_endpoints();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;

    // Netlink filters, no tcx links.
    let ingress = xlb_filters(&lab, "ingress")?;
    let egress = xlb_filters(&lab, "egress")?;
    println!("tc filters: ingress {ingress:?}, egress {egress:?}");
    ensure!(
        ingress.len() == 1 && ingress[0].2 == "xlb_tc_ingress",
        "ingress filters {ingress:?}"
    );
    ensure!(
        egress.len() == 1 && egress[0].2 == "xlb_tc_egress",
        "egress filters {egress:?}"
    );
    for egress_dir in [false, true] {
        match lab.node().host.ns.tcx_programs(UPLINK, egress_dir) {
            Ok(tcx) => ensure!(tcx.is_empty(), "tcx programs on {UPLINK}: {tcx:?}"),
            // A kernel without tcx (before 6.6) does not know the attach type.
            Err(e) if format!("{e:#}").contains("Invalid argument") => {}
            Err(e) => return Err(e),
        }
    }
    let features = lab
        .agent()?
        .metric("xlb_kernel_feature", &[("feature", "tcx")])?;
    ensure!(
        features == 0.0,
        "xlb_kernel_feature{{feature=tcx}} = {features}"
    );

    // Traffic: every backend, the client's address kept, replies from the VIP, and
    // delivered into the pods with bpf_redirect_peer through the hand-off slot.
    let udp = lab.client.udp_flows(web_udp_vip(), 60, REPLY_TIMEOUT)?;
    let tcp = lab.client.tcp_flows(web_tcp_vip(), 30, REPLY_TIMEOUT)?;
    for (replies, vip) in [(&udp, web_udp_vip()), (&tcp, web_tcp_vip())] {
        for r in replies {
            ensure!(r.from == vip, "reply from {} not the VIP {vip}", r.from);
            ensure!(
                r.seen_peer.ip() == IpAddr::V4(CLIENT_ADDR),
                "pod saw {}",
                r.seen_peer
            );
        }
    }
    let servers: BTreeSet<_> = udp.iter().chain(&tcp).map(|r| r.server.clone()).collect();
    ensure!(servers.len() == 3, "answered by {servers:?}");
    let slot = reason(&mut lab, "handoff_slot")?;
    let peer = reason(&mut lab, "fwd_peer")?;
    let missed = reason(&mut lab, "handoff_missed")?;
    println!("handoff_slot {slot}, fwd_peer {peer}, handoff_missed {missed}");
    ensure!(slot >= 90.0, "only {slot} hand-offs through the slot");
    ensure!(
        peer >= slot / 2.0,
        "only {peer} of {slot} delivered with bpf_redirect_peer"
    );
    ensure!(missed == 0.0, "{missed} hand-offs missed under generic XDP");

    // A restart under traffic: the new agent replaces the filters' programs in place.
    let ticker = Ticker::start(&lab.client, web_udp_vip(), Duration::from_millis(1), 30_000)?;
    ticker.wait_received(300, Duration::from_secs(10))?;
    let agent = lab.agent()?;
    agent.stop()?;
    agent.start_again()?;
    agent.wait_healthy(SOON)?;
    let n = ticker.received();
    ticker.wait_received(n + 300, Duration::from_secs(10))?;
    let report = ticker.finish(Duration::from_secs(2))?;
    println!(
        "UDP ticker across the restart: sent {}, lost {}, largest gap {:.1} ms",
        report.sent,
        report.lost,
        report.max_gap.as_secs_f64() * 1000.0
    );
    let after = xlb_filters(&lab, "ingress")?;
    println!("ingress filters after the restart: {after:?}");
    ensure!(
        after.len() == 1 && after[0].0 == ingress[0].0 && after[0].1 != ingress[0].1,
        "expected the filter {ingress:?} kept with a new program, found {after:?}"
    );
    ensure!(
        report.lost == 0,
        "{} of {} ticks lost",
        report.lost,
        report.sent
    );

    // A filter deleted under the running agent is noticed (it has no pin: the agent
    // asks the kernel) and attached again.
    let reattach = |lab: &mut Lab| lab.agent()?.metric("xlb_datapath_reattach_total", &[]);
    ensure!(reattach(&mut lab)? == 0.0, "reattached without cause");
    lab.node().host.ns.run(
        "tc",
        &[
            "filter", "del", "dev", UPLINK, "ingress", "pref", "1", "handle", "0x786c", "bpf",
        ],
    )?;
    ensure!(
        xlb_filters(&lab, "ingress")?.is_empty(),
        "tc filter del left it"
    );
    poll(
        "the agent re-attaching its ingress filter",
        SOON,
        Duration::from_millis(100),
        || {
            Ok(
                (reattach(&mut lab)? >= 1.0 && xlb_filters(&lab, "ingress")?.len() == 1)
                    .then_some(()),
            )
        },
    )?;
    let r = lab
        .client
        .udp_request(web_udp_vip(), "", REPLY_TIMEOUT, 3)?;
    ensure!(
        r.from == web_udp_vip(),
        "after re-attaching: reply from {}",
        r.from
    );

    // xlb cleanup removes the filters (and everything else).
    lab.agent()?.stop()?;
    let out = lab.node_mut().cleanup()?;
    println!("xlb cleanup: {}", out.trim());
    for dir in ["ingress", "egress"] {
        let left = xlb_filters(&lab, dir)?;
        ensure!(
            left.is_empty(),
            "{dir} filters left after cleanup: {left:?}"
        );
    }
    Ok(())
}

/// `--xdp-mode native --forward redirect` never delivered on a veth uplink (native XDP
/// there gets partial checksums it cannot complete): the agent refuses it, saying
/// why and what to use, before it touches the datapath.
#[test]
fn native_redirect_on_a_veth_uplink_is_refused_with_the_reason() -> Result<()> {
    let mut lab = Lab::one_node(1)?;
    lab.node_mut().agent_args = ["--xdp-mode", "native", "--forward", "redirect"]
        .map(String::from)
        .to_vec();
    let agent = lab.start_agent()?;
    let status = agent.wait_exit(SOON)?;
    let log = agent.log();
    ensure!(!status.success(), "the agent ran: {status}");
    ensure!(
        log.contains("cannot deliver on eth0") && log.contains("--xdp-mode generic"),
        "the refusal does not say why:\n{log}"
    );
    let pins = std::fs::read_dir(&lab.node().pin_dir)
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(pins == 0, "{pins} pins left by a refused start");
    Ok(())
}

/// `xlb inspect features -o json` with `XLB_FORCE_FALLBACK` set to `value`.
fn features_with_env(value: &str) -> Result<Value> {
    let out = std::process::Command::new(xlb_lab::xlb_bin()?)
        .args(["inspect", "features", "-o", "json"])
        .env("XLB_FORCE_FALLBACK", value)
        .output()
        .context("running xlb inspect features")?;
    ensure!(
        out.status.success(),
        "XLB_FORCE_FALLBACK={value:?}: xlb inspect features exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The row of feature `name` in `xlb inspect features -o json`.
fn feature<'a>(f: &'a Value, name: &str) -> Result<&'a Value> {
    f["found"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .with_context(|| format!("no feature {name} in {f}"))
}

/// `XLB_FORCE_FALLBACK` set but empty (a blank value in a unit file or a Pod) forces
/// nothing, where clap refused it before; and `xlb inspect features` shows what the
/// variable forces, as an agent started with it would choose (it ignored it before).
#[test]
fn the_force_fallback_variable_empty_or_set_is_read_by_inspect_too() -> Result<()> {
    let plain = features_with_env("")?;
    let tcx = feature(&plain, "tcx")?;
    ensure!(
        tcx["used"] == tcx["available"],
        "empty forces nothing: {tcx}"
    );
    let forced = features_with_env("tcx")?;
    let tcx = feature(&forced, "tcx")?;
    ensure!(
        tcx["used"] == false && tcx["detail"].as_str().is_some_and(|d| d.contains("forced")),
        "XLB_FORCE_FALLBACK=tcx: {tcx}"
    );
    Ok(())
}
