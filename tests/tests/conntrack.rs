//! Connection tracking under pressure: with a deliberately small table the LRU evicts,
//! the metrics account for it, and every flow is still served (an evicted flow's next
//! packet takes the same Maglev slot again).
use anyhow::{Result, ensure};
use xlb_lab::lab::{Lab, REPLY_TIMEOUT, SOON};
use xlb_lab::manifests::{web_udp_vip, web_yaml, write_atomic};

#[test]
fn small_conntrack_evicts_and_counts_it() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    lab.node_mut().agent_args = vec!["--conntrack-size".into(), "64".into()];
    let eps = lab.node().ready_endpoints();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;

    let vip = web_udp_vip();
    let replies = lab.client.udp_flows(vip, 200, REPLY_TIMEOUT)?;
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
