//! Connection tracking under pressure: with a deliberately small table the LRU evicts,
//! the metrics account for it, and every flow is still served (an evicted flow's next
//! packet takes the same Maglev slot again).
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use xlb_lab::lab::Lab;
use xlb_lab::manifests::{EndpointSpec, WEB_UDP_PORT, WEB_VIP, web_yaml, write_atomic};

const T: Duration = Duration::from_secs(1);
const SOON: Duration = Duration::from_secs(30);

#[test]
fn small_conntrack_evicts_and_counts_it() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    lab.node_mut().agent_args = vec!["--conntrack-size".into(), "64".into()];
    let eps: Vec<EndpointSpec> = lab
        .node()
        .pods
        .iter()
        .map(|p| EndpointSpec::new(p.ip, true, &lab.node().name))
        .collect();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;

    let vip = SocketAddr::from((WEB_VIP, WEB_UDP_PORT));
    let replies = lab.client.udp_flows(vip, 200, T)?;
    ensure!(
        replies.len() == 200,
        "{} of 200 flows answered",
        replies.len()
    );

    let agent = lab.agent()?;
    let entries = agent.metric("xlb_conntrack_entries", &[])?;
    let created = agent.metric("xlb_conntrack_created_total", &[])?;
    let evicted = agent.metric("xlb_conntrack_evictions_total", &[])?;
    ensure!(entries <= 64.0, "{entries} entries in a 64-entry table");
    ensure!(
        created >= 200.0,
        "only {created} entries created for 200 flows"
    );
    ensure!(
        evicted >= created - 64.0,
        "evictions {evicted} with {created} created and {entries} present"
    );
    Ok(())
}
