//! Health checks under scrape load, shared by the hardening test (which asserts that
//! every poll answers) and `cargo xtask bench` (which reports the latencies).
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::agent::http_get_within;
use crate::lab::{Lab, METRICS_PORT, REPLY_TIMEOUT, SOON};
use crate::manifests::{
    EndpointSpec, WEB_NAMESPACE, WEB_SERVICE, WEB_UDP_PORT, WEB_VIP, multi_doc, service_yaml,
    web_ports, web_slice_yaml, with_health_check_node_port, write_atomic,
};

/// The health check node port of the web Service in [`health_lab`].
pub const HC_PORT: u16 = 32100;

/// A one-node lab serving the web Service (Local policy, `healthCheckNodePort`
/// [`HC_PORT`]) from every pod, with a healthy agent.
pub fn health_lab(pods: usize) -> Result<Lab> {
    let mut lab = Lab::one_node(pods)?;
    let node = lab.node();
    let doc = web_health_yaml(&node.name, &node.pods, HC_PORT);
    write_atomic(&node.manifests_dir.join("web.yaml"), &doc)?;
    lab.start_agent()?.wait_healthy(SOON)?;
    Ok(lab)
}

/// Service `demo/web` (Local policy, `healthCheckNodePort` `hc_port`) and its
/// EndpointSlice with every one of `pods`, all ready on node `node`.
pub fn web_health_yaml(node: &str, pods: &[crate::lab::Pod], hc_port: u16) -> String {
    let eps: Vec<EndpointSpec> = pods
        .iter()
        .map(|p| EndpointSpec::new(p.ip, true, node))
        .collect();
    let service = with_health_check_node_port(
        &service_yaml(
            WEB_NAMESPACE,
            WEB_SERVICE,
            &WEB_VIP.to_string(),
            &web_ports(),
            true,
        ),
        hc_port,
    );
    multi_doc(&[service, web_slice_yaml(&eps)])
}

/// Fills the first node's conntrack map with `flows` live UDP flows to the web VIP
/// and waits until the agent's sweeper has counted them.
pub fn fill_conntrack(lab: &mut Lab, flows: u32) -> Result<()> {
    let vip = SocketAddrV4::new(WEB_VIP, WEB_UDP_PORT);
    let backend = SocketAddrV4::new(lab.node().pods[0].ip, 5353);
    let in_an_hour = crate::bpf::monotonic_ns() + 3_600_000_000_000;
    let n = crate::bpf::fill_conntrack(&lab.node().pin_dir, flows, vip, backend, in_an_hour)?;
    let agent = lab.agent()?;
    crate::poll(
        "the sweeper to count the filled map",
        SOON,
        REPLY_TIMEOUT,
        || {
            let v = agent.metric("xlb_conntrack_entries", &[])?;
            Ok((v >= f64::from(n)).then_some(v))
        },
    )?;
    Ok(())
}

/// What [`health_under_scrapes`] saw.
#[derive(Clone, Debug)]
pub struct HealthReport {
    /// Latency of every health poll that answered 200, sorted.
    pub latencies: Vec<Duration>,
    /// Polls that failed or did not answer 200 within 1 s, described.
    pub failures: Vec<String>,
    /// Scrapes of `/metrics` completed meanwhile.
    pub scrapes: u64,
}

impl HealthReport {
    /// The `p` quantile (0..=1) of the answered polls' latencies.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `scrapers` threads scraping the first node's `/metrics` in a loop while
/// polling `/healthz` (from the node) and the web Service's healthCheckNodePort (from
/// the client, as a load balancer in front of the node would) every 50 ms for
/// `duration`, each poll with a 1 s timeout. Every loop is bounded in time.
pub fn health_under_scrapes(lab: &Lab, scrapers: usize, duration: Duration) -> HealthReport {
    let node_ns = lab.node().host.ns.name().to_string();
    let client_ns = lab.client.ns.name().to_string();
    let metrics = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let hc = SocketAddr::from((lab.node().host.addr, HC_PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            let (stop, scrapes, ns) = (stop.clone(), scrapes.clone(), node_ns.clone());
            let end = Instant::now() + duration + Duration::from_secs(15);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let long = Duration::from_secs(10);
                    if let Ok((200, _)) = http_get_within(&ns, metrics, "/metrics", long, long) {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        for (ns, addr, path) in [
            (node_ns.as_str(), metrics, "/healthz"),
            (client_ns.as_str(), hc, "/"),
        ] {
            let started = Instant::now();
            match http_get_within(ns, addr, path, REPLY_TIMEOUT, REPLY_TIMEOUT) {
                Ok((200, _)) => latencies.push(started.elapsed()),
                Ok((code, body)) => failures.push(format!("{addr}{path}: HTTP {code} {body}")),
                Err(e) => failures.push(format!("{addr}{path}: {e}")),
            }
        }
        // The poll interval of a load balancer's health check, not a synchronisation.
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    latencies.sort();
    HealthReport {
        latencies,
        failures,
        scrapes: scrapes.load(Ordering::Relaxed),
    }
}
