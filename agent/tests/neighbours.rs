//! Keeping other nodes resolved for XDP's FIB lookup (issue 29): as managed neighbour
//! entries where the kernel has them (the probe says so), and otherwise by marking the
//! entry used, which must resolve it with no traffic at all. Two namespaces made for
//! the test, joined by a veth on which nothing else is sent. Needs root.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xlb::features::{Features, MANAGED_NEIGH};
use xlb_lab::netns::Netns;

const A_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 61, 0, 1);
const B_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 61, 0, 2);

/// Namespaces `a` and `b` with `eth0` each, a veth pair between them, 10.61.0.1 and
/// .2; `a` has no neighbour entry for `b`. Returns them and `b`'s MAC.
fn pair(tag: &str) -> Result<(Netns, Netns, String)> {
    let id = format!("xnb{}{tag}", std::process::id());
    let a = Netns::create(&format!("{id}a"))?;
    let b = Netns::create(&format!("{id}b"))?;
    a.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        b.name(),
    ])?;
    for (ns, addr) in [(&a, A_ADDR), (&b, B_ADDR)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
    }
    // "eth0@if2  UP  02:..:..  <BROADCAST,...>"
    let brief = b.ip(&["-br", "link", "show", "eth0"])?;
    let mac = brief
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC in {brief:?}"))?
        .to_string();
    let entry = a.ip(&["neigh", "show", &B_ADDR.to_string(), "dev", "eth0"])?;
    ensure!(entry.trim().is_empty(), "a already has an entry: {entry}");
    Ok((a, b, mac))
}

/// Polls `a`'s entry for `b` until it is REACHABLE with `mac`; returns the line.
fn wait_reachable(a: &Netns, mac: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let line = a.ip(&["-d", "neigh", "show", &B_ADDR.to_string(), "dev", "eth0"])?;
        if line.contains(&format!("lladdr {mac}")) && line.contains("REACHABLE") {
            return Ok(line);
        }
        if Instant::now() > deadline {
            bail!("{B_ADDR} not resolved within 5 s: {line:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn marking_an_entry_used_resolves_it_without_any_traffic() -> Result<()> {
    let (a, _b, mac) = pair("u")?;
    a.enter(|| Ok(xlb::netdev::use_neighbour("eth0", B_ADDR)?))?;
    let line = wait_reachable(&a, &mac)?;
    ensure!(
        !line.contains("managed"),
        "a plain entry is managed: {line}"
    );
    let managed = a.enter(|| Ok(xlb::netdev::neighbour_is_managed("eth0", B_ADDR)?))?;
    ensure!(managed == Some(false), "read back as {managed:?}");
    Ok(())
}

#[test]
fn a_managed_entry_is_what_the_probe_says() -> Result<()> {
    let features = Features::probe(&[]).context("probing")?;
    let probed = features
        .found
        .iter()
        .find(|f| f.name == MANAGED_NEIGH)
        .context("no managed_neigh probe")?
        .available;
    let (a, _b, mac) = pair("m")?;
    a.enter(|| Ok(xlb::netdev::add_managed_neighbour("eth0", B_ADDR)?))?;
    let managed = a.enter(|| Ok(xlb::netdev::neighbour_is_managed("eth0", B_ADDR)?))?;
    ensure!(
        managed == Some(probed),
        "the probe says managed entries are {}available, the kernel kept {managed:?}",
        if probed { "" } else { "not " }
    );
    if probed {
        // The kernel resolves a managed entry by itself, with nothing sent to it.
        let line = wait_reachable(&a, &mac)?;
        ensure!(line.contains("managed"), "not shown managed: {line}");
    }
    Ok(())
}
