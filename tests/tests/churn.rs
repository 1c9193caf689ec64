//! Backend churn under live connections: 100 long-lived TCP connections through the VIP
//! while backends are added, removed and marked terminating. None may break (established
//! flows stay on their backend, even one that left the service), and new connections
//! never go to a removed or terminating backend.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use xlb_lab::lab::Lab;
use xlb_lab::manifests::{WEB_TCP_PORT, WEB_VIP, write_web};
use xlb_lab::poll;
use xlb_lab::traffic::LineConn;

const T: Duration = Duration::from_secs(2);
const SOON: Duration = Duration::from_secs(30);
const CONNECTIONS: usize = 100;

/// Pings every connection once; all must answer, each from the pod it started on.
fn ping_all(conns: &mut [(LineConn, String)], step: &str) -> Result<()> {
    for (c, pod) in conns.iter_mut() {
        let r = c.ping();
        ensure!(r.is_ok(), "{step}: connection {} broke: {r:?}", c.local());
        let server = r?.server;
        ensure!(
            &server == pod,
            "{step}: connection {} moved from {pod} to {server}",
            c.local()
        );
    }
    Ok(())
}

/// Opens `n` new connections and returns the pods they landed on.
fn new_flows(lab: &Lab, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for r in lab
        .client
        .tcp_flows(SocketAddr::from((WEB_VIP, WEB_TCP_PORT)), n, T)?
    {
        *seen.entry(r.server).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Waits until `n` consecutive new connections avoid every pod in `avoid` and
/// include `require` (if any): proof the edit is applied, seen with packets.
fn wait_applied(lab: &Lab, avoid: &[&str], require: Option<&str>, what: &str) -> Result<()> {
    poll(what, SOON, Duration::from_millis(100), || {
        let seen = new_flows(lab, 30)?;
        let ok = avoid.iter().all(|a| !seen.contains_key(*a))
            && require.is_none_or(|r| seen.contains_key(r));
        Ok(ok.then_some(()))
    })
}

#[test]
fn churn_breaks_no_established_connection() -> Result<()> {
    let mut lab = Lab::one_node(4)?;
    write_web(
        &lab,
        &[
            (1, true, true, false),
            (2, true, true, false),
            (3, true, true, false),
        ],
    )?;
    lab.start_agent()?.wait_healthy(SOON)?;

    let vip = SocketAddr::from((WEB_VIP, WEB_TCP_PORT));
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut c = lab.client.tcp_connect(vip, T)?;
        let pod = c.ping()?.server;
        conns.push((c, pod));
    }
    let pods: BTreeSet<&str> = conns.iter().map(|(_, p)| p.as_str()).collect();
    ensure!(pods.len() == 3, "100 connections used pods {pods:?}");
    // The gauge is what the sweeper counted at its last pass (every 10 s).
    let agent = lab.agent()?;
    poll(
        &format!("xlb_conntrack_entries to count the {CONNECTIONS} open connections"),
        SOON,
        T,
        || Ok((agent.metric("xlb_conntrack_entries", &[])? >= CONNECTIONS as f64).then_some(())),
    )?;

    // Add pod4: it gets new flows, nobody moves.
    write_web(
        &lab,
        &[
            (1, true, true, false),
            (2, true, true, false),
            (3, true, true, false),
            (4, true, true, false),
        ],
    )?;
    wait_applied(&lab, &[], Some("pod4"), "pod4 to receive new connections")?;
    ping_all(&mut conns, "after adding pod4")?;

    // Remove pod2 from the slice: its established connections keep going to it, new
    // ones never reach it.
    write_web(
        &lab,
        &[
            (1, true, true, false),
            (3, true, true, false),
            (4, true, true, false),
        ],
    )?;
    wait_applied(
        &lab,
        &["pod2"],
        None,
        "new connections to avoid removed pod2",
    )?;
    ping_all(&mut conns, "after removing pod2")?;
    let seen = new_flows(&lab, 60)?;
    ensure!(
        !seen.contains_key("pod2"),
        "a new connection reached removed pod2: {seen:?}"
    );

    // Mark pod3 terminating (serving, not ready): existing connections stay, new ones
    // go to the ready pods only.
    write_web(
        &lab,
        &[
            (1, true, true, false),
            (3, false, true, true),
            (4, true, true, false),
        ],
    )?;
    wait_applied(
        &lab,
        &["pod2", "pod3"],
        None,
        "new connections to avoid terminating pod3",
    )?;
    ping_all(&mut conns, "after pod3 started terminating")?;
    let seen = new_flows(&lab, 60)?;
    ensure!(
        !seen.contains_key("pod2") && !seen.contains_key("pod3"),
        "new connections reached a removed or terminating pod: {seen:?}"
    );
    println!(
        "churn: {CONNECTIONS} connections survived add, remove and terminate; new flows {seen:?}"
    );
    Ok(())
}
