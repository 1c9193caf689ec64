//! Connections broken during backend churn: long-lived TCP connections through xlb's VIP
//! while the Service's endpoints are replaced again and again (added, removed, marked
//! terminating). Every connection is pinged after each change; one that fails or is
//! answered by another pod counts as broken (should be 0). Reported, never asserted.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use serde_json::{Value, json};
use xlb_common::{PROTO_TCP, Service, ServiceKey4, names};
use xlb_lab::Lab;
use xlb_lab::manifests::{WEB_TCP_PORT, WEB_VIP, WebEndpoint, write_web};
use xlb_lab::traffic::LineConn;

use crate::Scale;

/// The endpoint sets the Service cycles through: each differs from the one before.
const STEPS: [&[WebEndpoint]; 6] = [
    &[
        (1, true, true, false),
        (2, true, true, false),
        (3, true, true, false),
        (4, true, true, false),
    ],
    &[
        (1, true, true, false),
        (3, true, true, false),
        (4, true, true, false),
    ],
    &[
        (1, true, true, false),
        (3, false, true, true),
        (4, true, true, false),
    ],
    &[(2, true, true, false), (4, true, true, false)],
    &[(1, true, true, false), (2, true, true, false)],
    &[
        (1, true, true, false),
        (2, true, true, false),
        (3, true, true, false),
    ],
];

/// Runs the churn; returns the JSON part.
pub fn run(scale: Scale) -> Result<Value> {
    let (connections, changes) = if scale.quick { (20, 4) } else { (100, 30) };
    println!("churn: {connections} TCP connections through xlb, {changes} endpoint changes");
    let t = Duration::from_secs(2);
    let mut lab = Lab::one_node(4)?;
    write_web(&lab, STEPS[STEPS.len() - 1])?;
    lab.start_agent()?.wait_healthy(Duration::from_secs(30))?;
    let vip = SocketAddr::from((WEB_VIP, WEB_TCP_PORT));
    xlb_lab::poll(
        "the VIP to answer TCP",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            Ok(lab
                .client
                .tcp_connect(vip, t)
                .and_then(|mut c| c.ping())
                .ok())
        },
    )?;
    let mut conns: Vec<(LineConn, String)> = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut c = lab.client.tcp_connect(vip, t)?;
        let pod = c.ping()?.server;
        conns.push((c, pod));
    }
    let key = ServiceKey4 {
        addr: WEB_VIP.octets(),
        port: WEB_TCP_PORT.to_be(),
        proto: PROTO_TCP,
        pad: 0,
    };
    let svc_map: HashMap<MapData, ServiceKey4, Service> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(lab.node().pin_dir.join(names::SERVICES4))
            .context("opening xlb_services4")?,
    ))?;
    let (mut broken, mut moved) = (0usize, 0usize);
    let mut alive = conns;
    let started = Instant::now();
    for c in 0..changes {
        let before = svc_map
            .get(&key, 0)
            .context("the web Service is not programmed")?;
        write_web(&lab, STEPS[c % STEPS.len()])?;
        xlb_lab::poll(
            "the endpoint change to reach xlb_services",
            Duration::from_secs(30),
            Duration::from_millis(1),
            || Ok((svc_map.get(&key, 0)? != before).then_some(())),
        )?;
        let mut next = Vec::with_capacity(alive.len());
        for (mut conn, pod) in alive {
            match conn.ping() {
                Ok(r) if r.server == pod => next.push((conn, pod)),
                Ok(_) => moved += 1,
                Err(_) => broken += 1,
            }
        }
        alive = next;
    }
    println!(
        "churn: {} of {connections} connections broke ({broken} failed, {moved} answered by another pod) over {changes} changes",
        broken + moved
    );
    Ok(json!({
        "connections": connections, "changes": changes,
        "broken": broken + moved, "failed": broken, "moved_to_another_pod": moved,
        "seconds": crate::stats::round(started.elapsed().as_secs_f64(), 2),
    }))
}
