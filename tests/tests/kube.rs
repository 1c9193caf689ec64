//! An agent on the Kubernetes API source (issue 18), against the fake API server
//! (`xlb_lab::apiserver`) running in the client's namespace, reached over the lab's
//! network as a real node reaches its API server. Real packets through the VIP:
//!
//! - a Service and its EndpointSlice created through the API are served;
//! - an EndpointSlice change through the API reaches the dataplane;
//! - the API server gone for 30 s changes nothing in the dataplane (every flow in
//!   that time is served), and the agent says so (`xlb_source_up`, `/healthz`);
//! - back, a change made meanwhile arrives.
//!
//! Needs root and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use xlb_lab::apiserver::FakeApiServer;
use xlb_lab::lab::{CLIENT_ADDR, Lab, SOON};
use xlb_lab::manifests::{EndpointSpec, web_tcp_vip, web_yaml};
use xlb_lab::poll;

const FLOWS: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the API server stays away.
const OUTAGE: Duration = Duration::from_secs(30);

/// The pods (by name) that `FLOWS` new connections to the VIP reached.
fn reached(lab: &Lab) -> Result<BTreeSet<String>> {
    let replies = lab.client.tcp_flows(web_tcp_vip(), FLOWS, TIMEOUT)?;
    for r in &replies {
        ensure!(r.from == web_tcp_vip(), "reply from {}", r.from);
        ensure!(r.seen_peer.ip() == CLIENT_ADDR, "pod saw {}", r.seen_peer);
    }
    Ok(replies.into_iter().map(|r| r.server).collect())
}

/// Polls until the agent's `xlb_source_up{source="kubernetes"}` is `value`.
fn wait_source_up(lab: &mut Lab, value: f64) -> Result<()> {
    poll(
        &format!("xlb_source_up {value}"),
        SOON,
        Duration::from_millis(100),
        || {
            let up = lab
                .agent()?
                .metric("xlb_source_up", &[("source", "kubernetes")])?;
            Ok((up == value).then_some(()))
        },
    )
}

#[test]
fn an_agent_on_the_api_source_serves_and_outlives_an_api_outage() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    let node = lab.node().name.clone();
    let pods: Vec<(String, String)> = lab
        .node()
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.to_string()))
        .collect();
    let eps = |which: &[usize]| -> Vec<EndpointSpec> {
        which
            .iter()
            .map(|&i| EndpointSpec::new(&pods[i].1, true, &node))
            .collect()
    };
    api.put_yaml(&web_yaml(&eps(&[0, 1])))?;
    let kubeconfig = lab.scratch().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    lab.node_mut()
        .agent_args
        .extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    lab.start_agent()?.wait_healthy(SOON)?;
    let all: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();
    poll(
        "both pods served from the API",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == all).then_some(())),
    )?;

    // A change through the API reaches the dataplane.
    api.put_yaml(&web_yaml(&eps(&[0])))?;
    let first = BTreeSet::from([pods[0].0.clone()]);
    poll(
        "only the first pod",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == first).then_some(())),
    )?;

    // The API server goes away for OUTAGE: every flow keeps being served as before.
    api.set_down(true);
    wait_source_up(&mut lab, 0.0)?;
    let (code, body) = lab.agent()?.http_get("/healthz")?;
    ensure!(
        code == 200,
        "healthz {code} while only the API server is gone: {body}"
    );
    ensure!(
        body.contains("API server unreachable"),
        "healthz says: {body}"
    );
    let until = Instant::now() + OUTAGE;
    let mut rounds = 0;
    while Instant::now() < until {
        let r = reached(&lab)?;
        ensure!(r == first, "during the outage flows reached {r:?}");
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("{rounds} rounds of {FLOWS} flows served during the {OUTAGE:?} outage");

    // Meanwhile the second pod came back; the API server returns and so does it.
    api.put_yaml(&web_yaml(&eps(&[0, 1])))?;
    api.set_down(false);
    let back = Instant::now();
    poll(
        "both pods again after the outage",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == all).then_some(())),
    )?;
    println!(
        "the change made during the outage served {:?} after the API server returned",
        back.elapsed()
    );
    wait_source_up(&mut lab, 1.0)?;
    Ok(())
}
