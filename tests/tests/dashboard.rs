//! The Grafana dashboard (`deploy/grafana/xlb.json`) cannot rot: every metric it queries
//! must be in a real scrape of a lab agent that has served traffic. Needs root and the
//! built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use xlb_lab::lab::{CLIENT_ADDR, Lab, REPLY_TIMEOUT, SOON, UPLINK};
use xlb_lab::manifests::{web_udp_vip, web_yaml, write_atomic};

/// Every `expr` of every panel target and templating query, recursively.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `xlb_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("xlb_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/xlb.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    ensure!(
        ids.len() == panels.len(),
        "panel ids must be unique and present"
    );
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let wanted: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    ensure!(wanted.len() >= 10, "the dashboard queries only {wanted:?}");

    let mut lab = Lab::one_node(2)?;
    let eps = lab.node().ready_endpoints();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;
    let replies = lab.client.udp_flows(web_udp_vip(), 10, REPLY_TIMEOUT)?;
    ensure!(
        replies.len() == 10,
        "{} of 10 UDP flows answered",
        replies.len()
    );
    // A broken manifest, so that the config-error series exists (it has no series
    // until an error of some kind has been counted).
    write_atomic(
        &lab.node().manifests_dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map\n",
    )?;
    xlb_lab::poll(
        "the broken manifest to be counted",
        SOON,
        std::time::Duration::from_millis(50),
        || {
            Ok(lab
                .agent()?
                .metric("xlb_config_errors_total", &[])
                .ok()
                .filter(|n| *n >= 1.0))
        },
    )?;
    // L2 announcement of the VIP (the node described, so it is a candidate), and one
    // ARP request for it, so that its series exist too (ownership, replies per VIP).
    lab.write_nodes_yaml(&lab.node().manifests_dir)?;
    write_atomic(
        &lab.node().manifests_dir.join("l2.yaml"),
        "apiVersion: xlb.dev/v1alpha1\nkind: L2Announcement\nmetadata: { name: lan, namespace: xlb-system }\n",
    )?;
    xlb_lab::poll(
        "the VIP to be owned",
        SOON,
        std::time::Duration::from_millis(50),
        || {
            Ok(lab
                .agent()?
                .metric("xlb_l2_owned_vips", &[])
                .ok()
                .filter(|n| *n >= 1.0))
        },
    )?;
    let vip = match web_udp_vip().ip() {
        std::net::IpAddr::V4(v) => v,
        other => anyhow::bail!("the lab VIP {other} is not IPv4"),
    };
    xlb_lab::poll(
        "an ARP reply for the VIP",
        SOON,
        std::time::Duration::from_millis(50),
        || {
            let got = xlb_lab::arp::who_has(
                &lab.client.ns,
                UPLINK,
                CLIENT_ADDR,
                vip,
                std::time::Duration::from_millis(200),
            )?;
            Ok((!got.is_empty()).then_some(()))
        },
    )?;
    // A BGP peer with BFD (no router answers: the session and BFD stay down, which
    // is a value their series carry).
    write_atomic(
        &lab.node().manifests_dir.join("bgp.yaml"),
        &format!(
            "apiVersion: xlb.dev/v1alpha1\nkind: BFDProfile\nmetadata: {{ name: fast, namespace: xlb-system }}\nspec: {{}}\n---\n\
             apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: router, namespace: xlb-system }}\n\
             spec: {{ myASN: 4200000001, peerASN: 4200000100, peerAddress: {CLIENT_ADDR}, bfdProfile: fast }}\n"
        ),
    )?;
    xlb_lab::poll(
        "the BGP and BFD session series",
        SOON,
        std::time::Duration::from_millis(50),
        || {
            let s = lab.agent()?.metrics()?;
            Ok(["xlb_bgp_session_up", "xlb_bfd_session_up"]
                .iter()
                .all(|m| s.iter().any(|x| x.name == *m))
                .then_some(()))
        },
    )?;
    let samples = lab.agent()?.metrics()?;
    let exported: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries metrics no agent exports: {missing:?} (exported: {exported:?})"
    );
    Ok(())
}
