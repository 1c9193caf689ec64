//! The headline numbers (defined in bench/README.md), `<date>.json` and `latest.md`.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::stats::{num, round};

/// Every headline key, in order (bench/README.md defines each).
pub const HEADLINE_KEYS: [&str; 19] = [
    "fast_path_ns",
    "floor_ns",
    "reference_ns",
    "miss_ns",
    "node_added_ns",
    "iptables_node_added_ns",
    "route_node_added_ns",
    "udp_pps_vs_iptables",
    "udp_pps_vs_iptables_1k",
    "udp_pps_vs_nftables",
    "udp_pps_vs_ceiling",
    "tcp_cps_vs_iptables",
    "tcp_cps_vs_haproxy",
    "sync_10k_services_s",
    "endpoint_update_p99_ms",
    "agent_rss_10k_mib",
    "l2_failover_median_ms",
    "keepalived_failover_median_ms",
    "churn_broken_connections",
];

/// xlb's attach/forward modes measured end to end.
const XLB_MODES: [&str; 4] = ["generic", "tc", "native", "redirect_generic"];

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A UDP row's field for one shape.
fn udp<'a>(parts: &'a Map<String, Value>, key: &str, shape: &str, field: &str) -> &'a Value {
    parts
        .get("e2e")
        .and_then(|e| e["udp"].as_array())
        .and_then(|rows| rows.iter().find(|r| r["key"] == key))
        .map(|r| &r["shapes"][shape][field])
        .unwrap_or(&Value::Null)
}

fn tcp_cps(parts: &Map<String, Value>, key: &str) -> f64 {
    parts
        .get("e2e")
        .and_then(|e| e["tcp"].as_array())
        .and_then(|rows| rows.iter().find(|r| r["key"] == key))
        .map(|r| f(&r["cps_median"]))
        .unwrap_or(f64::NAN)
}

/// xlb's best mode (highest median pps) for `services` and `shape`: (key, pps).
fn best_xlb(parts: &Map<String, Value>, services: &str, shape: &str) -> (String, f64) {
    XLB_MODES
        .iter()
        .map(|m| {
            let k = format!("xlb_{m}_{services}");
            let p = f(udp(parts, &k, shape, "pps_median"));
            (k, p)
        })
        .filter(|(_, p)| p.is_finite())
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

/// The headline object: exactly [`HEADLINE_KEYS`], null where a part did not run or has
/// not landed.
pub fn headline(parts: &Map<String, Value>) -> Value {
    let prog = parts.get("prog").cloned().unwrap_or(Value::Null);
    let control = parts.get("control").cloned().unwrap_or(Value::Null);
    let many = parts
        .get("e2e")
        .and_then(|e| e["many_services"].as_u64())
        .unwrap_or(1000)
        .to_string();
    let (best1, pps1) = best_xlb(parts, "1", "established");
    let (_, pps_many_new) = best_xlb(parts, &many, "new_flows");
    let pps = |k: &str, shape: &str| f(udp(parts, k, shape, "pps_median"));
    let ratio = |a: f64, b: f64| num(round(a / b, 3));
    let prog_ns = |k: &str| num(f(&prog["median_ns"][k]));
    let p = &control["programming"];
    // Link down is the failure both systems can only notice from silence (after a
    // SIGKILL of keepalived its node keeps the VIP and goes on answering: no gap).
    let link_down_gap = |system: &str| {
        parts
            .get("failover")
            .map(|f| f[system]["link_down"]["median_max_gap_ms"].clone())
            .unwrap_or(Value::Null)
    };
    let v = json!({
        "fast_path_ns": prog_ns("xlb_hit"),
        "floor_ns": num(f(&prog["floor_ns"])),
        "reference_ns": prog_ns("ref_hit"),
        "miss_ns": prog_ns("xlb_miss"),
        "node_added_ns": num(f(udp(parts, &best1, "established", "node_added_ns"))),
        "iptables_node_added_ns": num(f(udp(parts, "iptables_1", "established", "node_added_ns"))),
        "route_node_added_ns": num(f(udp(parts, "route", "established", "node_added_ns"))),
        "udp_pps_vs_iptables": ratio(pps1, pps("iptables_1", "established")),
        "udp_pps_vs_iptables_1k": ratio(pps_many_new, pps(&format!("iptables_{many}"), "new_flows")),
        "udp_pps_vs_nftables": ratio(pps1, pps("nftables_1", "established")),
        "udp_pps_vs_ceiling": ratio(pps1, pps("direct", "established")),
        "tcp_cps_vs_iptables": ratio(tcp_cps(parts, "xlb_tc_1"), tcp_cps(parts, "iptables_1")),
        "tcp_cps_vs_haproxy": ratio(tcp_cps(parts, "xlb_tc_1"), tcp_cps(parts, "haproxy")),
        "sync_10k_services_s": num(f(&p["last_vip_answered_s"])),
        "endpoint_update_p99_ms": num(f(&p["endpoint_update"]["p99_ms"])),
        "agent_rss_10k_mib": num(round(f(&p["agent_rss_kib"]) / 1024.0, 1)),
        "l2_failover_median_ms": link_down_gap("l2"),
        "keepalived_failover_median_ms": link_down_gap("keepalived"),
        "churn_broken_connections": parts.get("churn").map(|c| c["broken"].clone()).unwrap_or(Value::Null),
    });
    debug_assert!(HEADLINE_KEYS.iter().all(|k| v.get(k).is_some()));
    v
}

/// Writes `<date>.json` and `latest.md` under `out`.
pub fn write(out: &Path, doc: &Value) -> Result<()> {
    let date = doc["date"].as_str().context("date")?;
    let json_path = out.join(format!("{date}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let h = &doc["headline"];
    let show = |k: &str, unit: &str| match h[k].as_f64() {
        Some(x) if x.abs() >= 100.0 || x.fract() == 0.0 => format!("{x:.0}{unit}"),
        Some(x) => format!("{x:.2}{unit}"),
        None => "not measured yet".to_string(),
    };
    let mut md = format!(
        "# xlb bench, {date} ({} run)\n\n{} ({} cores), kernel {}, load average {} before and {} \
         after (a shared machine: compare rows of one run, not runs). Written by `cargo xtask bench` \
         in {} s; every raw number is in [`{date}.json`]({date}.json), definitions in \
         [../README.md](../README.md).\n\n",
        doc["mode"].as_str().unwrap_or("?"),
        doc["machine"]["cpu_model"]
            .as_str()
            .unwrap_or("unknown CPU"),
        doc["machine"]["cores"],
        doc["kernel"].as_str().unwrap_or("?"),
        doc["loadavg_before"],
        doc["loadavg_after"],
        doc["took_s"],
    );
    md.push_str("| headline | value |\n| --- | ---: |\n");
    let rows: [(&str, &str, &str); 19] = [
        (
            "xlb VIP conntrack hit, ns/packet (BPF_PROG_TEST_RUN)",
            "fast_path_ns",
            " ns",
        ),
        ("XDP_PASS floor", "floor_ns", " ns"),
        ("minimal reference LB, same hit", "reference_ns", " ns"),
        ("xlb non-VIP miss", "miss_ns", " ns"),
        (
            "node-added ns/packet, xlb (best mode, 256 flows, 1 svc)",
            "node_added_ns",
            " ns",
        ),
        (
            "node-added ns/packet, iptables DNAT",
            "iptables_node_added_ns",
            " ns",
        ),
        (
            "node-added ns/packet, plain routing",
            "route_node_added_ns",
            " ns",
        ),
        (
            "UDP pps, xlb / iptables (256 flows, 1 svc)",
            "udp_pps_vs_iptables",
            "x",
        ),
        (
            "UDP pps, xlb / iptables (new flows, many svcs)",
            "udp_pps_vs_iptables_1k",
            "x",
        ),
        (
            "UDP pps, xlb / nftables (256 flows, 1 svc)",
            "udp_pps_vs_nftables",
            "x",
        ),
        (
            "UDP pps, xlb / direct to pod (ceiling)",
            "udp_pps_vs_ceiling",
            "x",
        ),
        ("TCP conn/s, xlb / iptables", "tcp_cps_vs_iptables", "x"),
        ("TCP conn/s, xlb / HAProxy", "tcp_cps_vs_haproxy", "x"),
        (
            "programming all Services from scratch",
            "sync_10k_services_s",
            " s",
        ),
        (
            "EndpointSlice change → maps, p99",
            "endpoint_update_p99_ms",
            " ms",
        ),
        ("agent RSS with all Services", "agent_rss_10k_mib", " MiB"),
        (
            "L2 failover (link down), median gap",
            "l2_failover_median_ms",
            " ms",
        ),
        (
            "Keepalived failover (link down), median gap",
            "keepalived_failover_median_ms",
            " ms",
        ),
        (
            "connections broken by backend churn",
            "churn_broken_connections",
            "",
        ),
    ];
    for (what, k, unit) in rows {
        let _ = writeln!(md, "| {what} (`{k}`) | {} |", show(k, unit));
    }
    let parts = &doc["parts"];
    let section = |md: &mut String, title: &str, v: &Value| {
        if let Some(t) = v["markdown"].as_str() {
            let _ = write!(md, "\n## {title}\n\n{}", t);
            if let Some(m) = v["method"].as_str() {
                let _ = write!(md, "\n_{m}_\n");
            }
        }
    };
    section(
        &mut md,
        "End to end (veth lab, node-added ns/packet)",
        &parts["e2e"],
    );
    if parts["e2e"].is_object() {
        md.push_str("\n![node-added cost](node_added.png)\n");
    }
    section(&mut md, "Per-packet program cost", &parts["prog"]);
    section(&mut md, "Control plane", &parts["control"]);
    if parts["control"].is_object() {
        md.push_str("\n![EndpointSlice change to map latency](endpoint_update.png)\n");
    }
    if let Some(c) = parts["churn"].as_object() {
        let _ = write!(
            md,
            "\n## Backend churn\n\n{} of {} long-lived TCP connections broke over {} endpoint changes (goal: 0).\n",
            c["broken"], c["connections"], c["changes"]
        );
    }
    if let Some(fo) = parts["failover"].as_object() {
        md.push_str(
            "\n## Failover (the client's 10 ms UDP ticker, largest gap per run)\n\n\
             | system | failure | largest gap per run, ms | median gap | median takeover |\n\
             | --- | --- | --- | --- | --- |\n",
        );
        for (system, label) in [("l2", "xlb L2"), ("keepalived", "Keepalived VRRP")] {
            for (kind, runs) in fo[system].as_object().into_iter().flatten() {
                let gaps: Vec<String> = runs["max_gap_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| format!("{:.0}", f(g)))
                    .collect();
                let cell = |k: &str| match runs[k].as_f64() {
                    Some(x) => format!("{x:.0} ms"),
                    None => format!("failed: {}", runs["error"].as_str().unwrap_or("no runs")),
                };
                let _ = writeln!(
                    md,
                    "| {label} | {kind} | {} | {} | {} |",
                    gaps.join(", "),
                    cell("median_max_gap_ms"),
                    cell("median_takeover_ms")
                );
            }
        }
    }
    std::fs::write(out.join("latest.md"), &md)?;
    println!(
        "written: {} and {}/latest.md",
        json_path.display(),
        out.display()
    );
    Ok(())
}

/// Checks a bench output directory: the dated JSON parses, every [`HEADLINE_KEYS`]
/// entry (and nothing else) is in its headline as a finite number or null, and
/// latest.md and the plots exist and are not empty. Never looks at speed.
pub fn check(out: &Path) -> Result<()> {
    let json = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_stem().is_some_and(|s| s.len() == 10)
        })
        .with_context(|| format!("no <date>.json in {}", out.display()))?;
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)
        .with_context(|| format!("{} does not parse", json.display()))?;
    let headline = doc["headline"].as_object().context("no headline object")?;
    for k in HEADLINE_KEYS {
        match headline.get(k) {
            None => bail!("headline key {k} missing"),
            Some(Value::Null) => {}
            Some(v) if v.as_f64().is_some_and(f64::is_finite) => {}
            Some(v) => bail!("headline {k} is {v}, not a finite number or null"),
        }
    }
    if headline.len() != HEADLINE_KEYS.len() {
        bail!(
            "headline has {} keys, not {}",
            headline.len(),
            HEADLINE_KEYS.len()
        );
    }
    for f in ["latest.md", "node_added.png", "endpoint_update.png"] {
        let p = out.join(f);
        let len = std::fs::metadata(&p)
            .with_context(|| format!("{} missing", p.display()))?
            .len();
        if len == 0 {
            bail!("{} is empty", p.display());
        }
    }
    Ok(())
}
