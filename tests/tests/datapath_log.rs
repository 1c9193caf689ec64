//! Privileged integration test of datapath events (aya-log): real packets to a VIP
//! without backends, logged by the kernel programs only once `xlb datapath-log` asks
//! for them, rate-limited per reason per CPU, and silent again once switched off.
//! Needs root and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::agent::xlb_bin;
use xlb_lab::lab::{Lab, SOON, poll};
use xlb_lab::manifests::{web_udp_vip, web_yaml, write_atomic};

/// Packets per burst; far more than the limiter lets through in one window.
const BURST: u64 = 200;
/// `xlb_common::datapath_log::LINES_PER_WINDOW`.
const LINES_PER_WINDOW: usize = 10;

/// `xlb datapath-log [LEVEL] --pin-path PIN`; returns stdout.
fn datapath_log(lab: &Lab, level: Option<&str>) -> Result<String> {
    let out = Command::new(xlb_bin()?)
        .arg("datapath-log")
        .args(level)
        .arg("--pin-path")
        .arg(&lab.node().pin_dir)
        .output()
        .context("running xlb datapath-log")?;
    ensure!(
        out.status.success(),
        "xlb datapath-log {level:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn dropped(lab: &mut Lab) -> Result<f64> {
    lab.agent()?.metric(
        "xlb_datapath_packets_total",
        &[("reason", "drop_no_backend")],
    )
}

/// Sends `n` datagrams to `vip` from one new flow, as fast as the socket takes them;
/// returns the flow's source port.
fn burst(lab: &Lab, vip: SocketAddr, n: u64) -> Result<u16> {
    let sock = lab.client.udp_socket()?;
    for _ in 0..n {
        sock.send_to(b"nobody serves this", vip)?;
    }
    Ok(sock.local_addr()?.port())
}

/// The datapath event lines about the client flow from `sport` in the agent log
/// after the first `since` lines.
fn lines_from(lab: &mut Lab, since: usize, sport: u16) -> Result<Vec<String>> {
    let needle = format!("drop_no_backend udp 10.0.0.1:{sport} -> {}", web_udp_vip());
    Ok(lab
        .agent()?
        .log()
        .lines()
        .skip(since)
        .filter(|l| l.contains("xlb::datapath") && l.contains(&needle))
        .map(str::to_string)
        .collect())
}

/// Waits until every drop counted so far (`before` + `n`) went through the datapath.
fn wait_counted(lab: &mut Lab, before: f64, n: u64) -> Result<()> {
    poll(
        "the burst is counted as drop_no_backend",
        SOON,
        Duration::from_millis(50),
        || Ok((dropped(lab)? >= before + n as f64).then_some(())),
    )
}

/// Sends one packet at a time on a new flow until its event line appears (a window
/// later at most, when the burst used this one up). The ring buffer is read in order,
/// so once it is there every line logged before it is in the agent log too.
fn sentinel(lab: &mut Lab, since: usize) -> Result<()> {
    let sock = lab.client.udp_socket()?;
    let sport = sock.local_addr()?.port();
    poll(
        "the sentinel packet's event line",
        SOON,
        Duration::from_millis(100),
        || {
            sock.send_to(b"sentinel", web_udp_vip())?;
            Ok((!lines_from(lab, since, sport)?.is_empty()).then_some(()))
        },
    )
}

#[test]
fn datapath_events_follow_the_runtime_level_and_the_rate_limit() -> Result<()> {
    let mut lab = Lab::one_node(1)?;
    // A Local service without endpoints: programmed, every packet dropped.
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&[]))?;
    lab.node_mut().agent_args = vec!["--datapath-log".into(), "error".into()];
    lab.start_agent()?.wait_healthy(SOON)?;
    let vip = web_udp_vip();
    let level = datapath_log(&lab, None)?;
    ensure!(
        level.contains("level: error"),
        "--datapath-log error: {level}"
    );
    // Until the service is programmed, packets to the VIP are not dropped as ours.
    poll(
        "the VIP without backends drops",
        SOON,
        Duration::from_millis(100),
        || {
            burst(&lab, vip, 1)?;
            Ok((dropped(&mut lab)? > 0.0).then_some(()))
        },
    )?;

    // Off: dropped and counted, never logged.
    let set = datapath_log(&lab, Some("off"))?;
    ensure!(set.contains("level: off (was error)"), "{set}");
    let since = lab.agent()?.log_mark();
    let before = dropped(&mut lab)?;
    let quiet = burst(&lab, vip, BURST)?;
    wait_counted(&mut lab, before, BURST)?;

    // Warn, on the running agent: logged with reason and addresses, rate-limited.
    datapath_log(&lab, Some("warn"))?;
    let config = Command::new(xlb_bin()?)
        .args(["inspect", "config", "--pin-path"])
        .arg(&lab.node().pin_dir)
        .output()?;
    let config = String::from_utf8_lossy(&config.stdout);
    ensure!(
        config
            .lines()
            .any(|l| l.contains("datapath log") && l.contains("warn")),
        "xlb inspect config: {config}"
    );
    let before = dropped(&mut lab)?;
    let loud = burst(&lab, vip, BURST)?;
    wait_counted(&mut lab, before, BURST)?;
    sentinel(&mut lab, since)?;
    let silent = lines_from(&mut lab, since, quiet)?;
    ensure!(silent.is_empty(), "logged while off: {silent:?}");
    let logged = lines_from(&mut lab, since, loud)?;
    // The burst takes milliseconds: one window, or two at a boundary, on each CPU.
    let cpus = std::thread::available_parallelism()?.get();
    ensure!(
        !logged.is_empty() && logged.len() <= 2 * LINES_PER_WINDOW * cpus,
        "{} lines for {BURST} drops on {cpus} CPUs: {logged:#?}",
        logged.len()
    );
    ensure!(
        logged[0].contains(" WARN ") && logged[0].contains("the service has no backend"),
        "{}",
        logged[0]
    );
    println!(
        "{} of {BURST} drops logged, e.g.\n{}",
        logged.len(),
        logged[0]
    );

    // Off again: silent.
    datapath_log(&lab, Some("off"))?;
    let since = lab.agent()?.log_mark();
    let before = dropped(&mut lab)?;
    let quiet = burst(&lab, vip, BURST)?;
    wait_counted(&mut lab, before, BURST)?;
    datapath_log(&lab, Some("warn"))?;
    sentinel(&mut lab, since)?;
    let silent = lines_from(&mut lab, since, quiet)?;
    ensure!(silent.is_empty(), "logged after switching off: {silent:?}");
    Ok(())
}

/// An agent taking over the datapath an older agent (one without datapath events)
/// left pinned creates the event maps and logs: the binary `XLB_UPGRADE_FROM` names
/// (e.g. a build from before datapath events) runs first. Not in `cargo xtask test`,
/// which has only this build: run it with
/// `XLB_UPGRADE_FROM=old/xlb cargo test --release --test datapath_log -- --ignored`.
#[test]
#[ignore = "needs XLB_UPGRADE_FROM, an older xlb binary"]
fn events_work_after_taking_over_an_older_datapath() -> Result<()> {
    let old = std::env::var_os("XLB_UPGRADE_FROM")
        .context("XLB_UPGRADE_FROM must name an older xlb binary")?;
    let mut lab = Lab::one_node(1)?;
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&[]))?;
    let dir = lab.node().manifests_dir.clone();
    lab.node_mut()
        .start_agent(std::path::Path::new(&old), &dir)?
        .wait_healthy(SOON)?;
    let vip = web_udp_vip();
    poll(
        "the older agent's VIP without backends drops",
        SOON,
        Duration::from_millis(100),
        || {
            burst(&lab, vip, 1)?;
            Ok((dropped(&mut lab)? > 0.0).then_some(()))
        },
    )?;
    lab.agent()?.stop()?;

    let mut cfg = lab.agent()?.config().clone();
    cfg.xlb_bin = xlb_bin()?;
    cfg.log_dir = lab.scratch().join("upgraded");
    std::fs::create_dir_all(&cfg.log_dir)?;
    let mut new = xlb_lab::agent::Agent::start(cfg)?;
    new.wait_healthy(SOON)?;
    datapath_log(&lab, Some("warn"))?;
    let sock = lab.client.udp_socket()?;
    let sport = sock.local_addr()?.port();
    let needle = format!("drop_no_backend udp 10.0.0.1:{sport} -> {vip}");
    poll(
        "an event line from the upgraded agent",
        SOON,
        Duration::from_millis(100),
        || {
            sock.send_to(b"after the upgrade", vip)?;
            Ok(new
                .log()
                .lines()
                .any(|l| l.contains("xlb::datapath") && l.contains(&needle))
                .then_some(()))
        },
    )?;
    new.stop()?;
    Ok(())
}
