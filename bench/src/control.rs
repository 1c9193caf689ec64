//! The control plane: programming many Services from scratch (time until the last VIP
//! answers, agent RSS, map memory), EndpointSlice-change-to-map latency at that scale,
//! `iptables-restore` of the equivalent kube-proxy ruleset as the reference, and health
//! answers under scrape load.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use serde_json::{Value, json};
use xlb_common::{Backend, PROTO_UDP, Service, ServiceKey4, names};
use xlb_lab::manifests::{EndpointSpec, PortSpec, endpointslice_yaml, service_yaml, write_atomic};

use crate::Scale;
use crate::stats::{num, percentile, round};

const ENDPOINTS: usize = 10;
const PORT: u16 = 53;

fn vip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn endpoint_of(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// Runs every control-plane measurement; returns the JSON part.
pub fn run(scale: Scale) -> Result<Value> {
    let programming = programming(scale)?;
    let reference = iptables_restore(scale)?;
    let health = health_under_scrape(scale)?;
    let p = &programming;
    let md = format!(
        "| Services x endpoints | last VIP answered after | agent RSS | map memory | EndpointSlice change → maps p50 / p99 | iptables-restore of the same (kube-proxy) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {} x {ENDPOINTS} | {:.2} s | {:.0} MiB | {:.0} MiB | {:.2} / {:.2} ms | {} |\n\n{}",
        p["services"],
        p["last_vip_answered_s"].as_f64().unwrap_or(f64::NAN),
        p["agent_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        p["map_memory"]["total_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
        p["endpoint_update"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        p["endpoint_update"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        reference["seconds"]
            .as_f64()
            .map(|s| format!("{s:.2} s"))
            .unwrap_or_else(|| format!("n/a ({})", reference["error"])),
        health["markdown"].as_str().unwrap_or_default(),
    );
    println!("\n{md}");
    Ok(json!({
        "programming": programming,
        "iptables_restore": reference,
        "health_under_scrape": health,
        "markdown": md,
    }))
}

/// `services` Services x 10 endpoints in manifest files of 1,000; the time from starting the
/// agent until the last Service's VIP answers; then RSS, map memory and the update latency.
fn programming(scale: Scale) -> Result<Value> {
    let services = scale.control_services();
    let per_file = 1_000.min(services);
    let updates = if scale.quick { 10 } else { 50 };
    println!("control: programming {services} Services x {ENDPOINTS} endpoints from scratch");
    let mut lab = xlb_lab::Lab::one_node(1)?;
    let node = lab.node();
    let pod = node.pods[0].ip;
    let node_name = node.name.clone();
    let dir = node.manifests_dir.clone();
    let ports = [PortSpec::new("dns", "UDP", PORT, 5353)];
    let slice_of = |i: usize, eps: &[EndpointSpec]| {
        endpointslice_yaml(
            "bench",
            &format!("svc-{i}-1"),
            &format!("svc-{i}"),
            &ports,
            eps,
        )
    };
    let endpoints_of = |i: usize| -> Vec<EndpointSpec> {
        (0..ENDPOINTS)
            .map(|e| EndpointSpec::new(endpoint_of(i * ENDPOINTS + e), true, &node_name))
            .collect()
    };
    for f in 0..services.div_ceil(per_file) {
        let mut text = String::new();
        for i in f * per_file..((f + 1) * per_file).min(services) {
            let name = format!("svc-{i}");
            let _ = writeln!(
                text,
                "{}---",
                service_yaml("bench", &name, &vip_of(i).to_string(), &ports, true)
            );
            // svc-0's slice lives in its own file: the one the update measurement rewrites.
            if i == 0 {
                continue;
            }
            // The last Service's only endpoint is the lab's pod, so its VIP can answer.
            let eps = if i == services - 1 {
                vec![EndpointSpec::new(pod, true, &node_name)]
            } else {
                endpoints_of(i)
            };
            let _ = writeln!(text, "{}---", slice_of(i, &eps));
        }
        write_atomic(&dir.join(format!("services-{f:02}.yaml")), &text)?;
    }
    let slice0 = dir.join("svc-0-slice.yaml");
    write_atomic(&slice0, &slice_of(0, &endpoints_of(0)))?;
    let last = SocketAddr::from((vip_of(services - 1), PORT));
    let started = Instant::now();
    lab.start_agent()?;
    let answered = xlb_lab::poll(
        "the last VIP to answer",
        Duration::from_secs(900),
        Duration::from_millis(50),
        || {
            Ok(lab
                .client
                .udp_probe(last, Duration::from_millis(100))?
                .map(|_| started.elapsed()))
        },
    )?;
    let pid = lab.agent()?.pid().context("agent pid")?;
    let rss_kib = crate::sys::rss_kib(pid)?;
    let programmed = lab.agent()?.metric("xlb_services", &[])?;
    let pin_dir = lab.node().pin_dir.clone();
    let memory = map_memory(&pin_dir, pid)?;

    // EndpointSlice change → maps: rewrite svc-0's slice with one endpoint changed, and
    // time until its service entry flips to a new Maglev table (the agent builds the new
    // table and backends first, then swaps the service value in one update).
    let key = service_key(vip_of(0), PORT);
    let svc_map: HashMap<MapData, ServiceKey4, Service> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(pin_dir.join(names::SERVICES4)).context("opening xlb_services4")?,
    ))?;
    let mut latencies_ms = Vec::with_capacity(updates);
    let mut old_ip = endpoint_of(0);
    for u in 0..updates {
        let before = svc_map.get(&key, 0).context("svc-0 is not programmed")?;
        let mut eps = endpoints_of(0);
        let new_ip = Ipv4Addr::new(10, 250, (u / 250) as u8, (u % 250 + 1) as u8);
        eps[0] = EndpointSpec::new(new_ip, true, &node_name);
        let t0 = Instant::now();
        write_atomic(&slice0, &slice_of(0, &eps))?;
        let took = xlb_lab::poll(
            "the EndpointSlice change to reach xlb_services",
            Duration::from_secs(60),
            Duration::from_micros(200),
            || {
                let now = svc_map.get(&key, 0)?;
                Ok((now != before).then(|| t0.elapsed()))
            },
        )?;
        latencies_ms.push(took.as_secs_f64() * 1e3);
        // One change at a time: the next starts once this one's sync is over (its
        // last step deletes the endpoint that left, after a grace period), so each
        // sample is one change reaching an idle agent, not a queue behind the last.
        xlb_lab::poll(
            "the replaced endpoint's backend to be deleted",
            Duration::from_secs(60),
            Duration::from_millis(2),
            || Ok((!backend_present(&pin_dir, old_ip)?).then_some(())),
        )?;
        old_ip = new_ip;
        // Check once at each end that the flip carried the change (not timed).
        if u == 0 || u == updates - 1 {
            ensure!(
                backend_present(&pin_dir, new_ip)?,
                "xlb_services flipped but no backend {new_ip} in xlb_backends"
            );
        }
    }
    let (p50, p99) = (
        percentile(&latencies_ms, 0.5),
        percentile(&latencies_ms, 0.99),
    );
    println!(
        "control: {services} services programmed in {:.2} s, RSS {} MiB, maps {:.0} MiB, update p50 {p50:.2} ms p99 {p99:.2} ms",
        answered.as_secs_f64(),
        rss_kib / 1024,
        memory["total_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    Ok(json!({
        "services": services, "endpoints_per_service": ENDPOINTS,
        "last_vip_answered_s": round(answered.as_secs_f64(), 3),
        "programmed_keys": programmed,
        "agent_rss_kib": rss_kib,
        "map_memory": memory,
        "endpoint_update": {
            "method": "rewrite one EndpointSlice file (one endpoint changed, write + rename), poll xlb_services4 for the Service's entry to change (every 200 us); the next change only after the replaced endpoint's backend is deleted (the end of the sync)",
            "updates": updates,
            "samples_ms": latencies_ms.iter().map(|x| round(*x, 3)).collect::<Vec<_>>(),
            "p50_ms": num(round(p50, 3)), "p99_ms": num(round(p99, 3)),
        },
    }))
}

fn service_key(vip: Ipv4Addr, port: u16) -> ServiceKey4 {
    ServiceKey4 {
        addr: vip.octets(),
        port: port.to_be(),
        proto: PROTO_UDP,
        pad: 0,
    }
}

/// Whether some value of the pinned `xlb_backends` has address `ip`.
fn backend_present(pin_dir: &Path, ip: Ipv4Addr) -> Result<bool> {
    let map: HashMap<MapData, u32, Backend> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(pin_dir.join(names::BACKENDS)).context("opening xlb_backends")?,
    ))?;
    for kv in map.iter() {
        let (_, b) = kv?;
        if b.addr[..4] == ip.octets() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Kernel memory of the agent's maps: the `memlock` of every map the agent holds an fd to
/// (`/proc/PID/fdinfo`), every map pinned in its pin directory, and every inner Maglev
/// table referenced from `xlb_maglev`, each counted once (`bpftool -j map show`).
fn map_memory(pin_dir: &Path, pid: u32) -> Result<Value> {
    let mut ids = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(id) = text
                .lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                ids.insert(id);
            }
        }
    }
    let bpftool = |args: &[&str]| -> Result<Value> {
        let out = xlb_lab::netns::run(Command::new("bpftool").arg("-j").args(args))?;
        Ok(serde_json::from_str(&out)?)
    };
    for name in xlb_lab::lab::entry_names(pin_dir) {
        let p = pin_dir.join(&name);
        if let Ok(v) = bpftool(&["map", "show", "pinned", &p.to_string_lossy()])
            && let Some(id) = v["id"].as_u64()
        {
            ids.insert(id);
        }
    }
    let mut inner = BTreeSet::new();
    let maglev = pin_dir.join(names::MAGLEV);
    if let Value::Array(entries) = bpftool(&["map", "dump", "pinned", &maglev.to_string_lossy()])? {
        for e in entries {
            if let Some(id) = e["inner_map_id"].as_u64() {
                inner.insert(id);
            } else if let Some(bytes) = e["value"].as_array() {
                let b: Vec<u8> = bytes
                    .iter()
                    .filter_map(|x| x.as_str())
                    .filter_map(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    .collect();
                if b.len() >= 4 {
                    inner.insert(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                }
            }
        }
    }
    let all = bpftool(&["map", "show"])?;
    let (mut outer_bytes, mut inner_bytes, mut outer_n, mut inner_n) = (0u64, 0u64, 0, 0);
    for m in all.as_array().context("bpftool map show: not a list")? {
        let (Some(id), Some(bytes)) = (m["id"].as_u64(), m["bytes_memlock"].as_u64()) else {
            continue;
        };
        if inner.contains(&id) {
            inner_bytes += bytes;
            inner_n += 1;
        } else if ids.contains(&id) {
            outer_bytes += bytes;
            outer_n += 1;
        }
    }
    Ok(json!({
        "method": "sum of bpftool bytes_memlock: maps held by the agent or pinned, plus inner Maglev tables",
        "total_bytes": outer_bytes + inner_bytes,
        "maps_bytes": outer_bytes, "maps": outer_n,
        "inner_tables_bytes": inner_bytes, "inner_tables": inner_n,
    }))
}

/// `iptables-restore` of kube-proxy's iptables ruleset for the same Services (UDP, 10
/// endpoints each, `statistic --mode random`) into an empty namespace: the reference for
/// programming from scratch.
fn iptables_restore(scale: Scale) -> Result<Value> {
    let services = scale.control_services();
    let limit = Duration::from_secs(if scale.quick { 60 } else { 600 });
    let set: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = (0..services)
        .map(|i| {
            (
                vip_of(i),
                (0..ENDPOINTS)
                    .map(|e| endpoint_of(i * ENDPOINTS + e))
                    .collect(),
            )
        })
        .collect();
    let rules = crate::e2e::iptables_rules(&set, &[("udp", PORT, 5353)]);
    let rule_count = rules.lines().filter(|l| l.starts_with("-A")).count();
    let ns = xlb_lab::Netns::create(&format!("xlbb{}-ipt", std::process::id()))?;
    let file = std::env::temp_dir().join(format!("xlbb{}-iptables.rules", std::process::id()));
    std::fs::write(&file, &rules)?;
    println!("control: iptables-restore of {rule_count} rules ({services} Services x {ENDPOINTS})");
    let took = crate::sys::run_timed(&mut ns.command("iptables-restore"), limit, Some(&file));
    let _ = std::fs::remove_file(&file);
    drop(ns);
    let version = xlb_lab::netns::run(Command::new("iptables").arg("--version"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(match took {
        Ok(d) => json!({
            "services": services, "rules": rule_count, "iptables": version,
            "seconds": round(d.as_secs_f64(), 3),
        }),
        Err(e) => json!({
            "services": services, "rules": rule_count, "iptables": version,
            "seconds": null, "error": format!("{e:#}"),
        }),
    })
}

/// Scrapers hammering `/metrics` over a full conntrack map must not slow the health
/// answers a load balancer in front of the node relies on (goal: p99 under 50 ms).
fn health_under_scrape(scale: Scale) -> Result<Value> {
    let (flows, scrapers, secs) = if scale.quick {
        (20_000u32, 10usize, 2u64)
    } else {
        (200_000, 50, 10)
    };
    println!(
        "control: health under scrape load: {scrapers} scrapers, {flows} conntrack entries, {secs} s"
    );
    let mut lab = xlb_lab::load::health_lab(2)?;
    xlb_lab::load::fill_conntrack(&mut lab, flows)?;
    let r = xlb_lab::load::health_under_scrapes(&lab, scrapers, Duration::from_secs(secs));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99) = (ms(r.percentile(0.5)), ms(r.percentile(0.99)));
    let max = ms(r.latencies.last().copied().unwrap_or_default());
    let md = format!(
        "| health polls answered | failed | p50 ms | p99 ms | max ms | scrapes meanwhile |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {} | {} | {p50:.2} | {p99:.2} | {max:.2} | {} |\n\n\
         /healthz and the healthCheckNodePort, polled every 50 ms with a 1 s timeout while {scrapers} \
         scrapers read /metrics over {flows} conntrack entries (goal: p99 under 50 ms).\n",
        r.latencies.len(),
        r.failures.len(),
        r.scrapes
    );
    Ok(json!({
        "scrapers": scrapers, "conntrack_entries": flows, "seconds": secs,
        "answered": r.latencies.len(), "failed": r.failures.len(), "scrapes": r.scrapes,
        "p50_ms": num(p50), "p99_ms": num(p99), "max_ms": num(max),
        "markdown": md,
    }))
}
