//! Control-plane measurement (issue 16): programs `SERVICES` LoadBalancer Services x 10
//! endpoints from scratch with the real `xlb` binary on a veth in a throwaway
//! network namespace, then times EndpointSlice changes until they reach the maps.
//!
//! `cargo build --release -p xlb --example cp_bench` and, as root:
//! `target/release/examples/cp_bench target/release/xlb [SERVICES] [ROUNDS]`.
//!
//! Reported: agent start to the last sync's id write (`xlb_config[NEXT_SERVICE_ID]`,
//! written after every map write of a sync), agent RSS (now and peak), map memory
//! (bytes_memlock of the pinned maps and every inner Maglev table), and the latency from
//! an atomic rename of a manifest file (one endpoint address changed) until the maps
//! serve it: for a small file holding
//! one Service and its slice, and for one of the 1,000-Service files. The latency
//! ends at the flip: the changed Service's `xlb_services4` value pointing to its new
//! table, the moment packets see the change.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData};
use xlb::{dataplane::state::service_key, desired::VipKey, model::Protocol};
use xlb_common::{config, names};
use xlb_lab::{
    manifests::{EndpointSpec, PortSpec, endpointslice_yaml, service_yaml, write_atomic},
    netns::Netns,
};

const PER_FILE: usize = 1_000;
const ENDPOINTS: usize = 10;
const NODE: &str = "node-a";

fn vip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn endpoints(i: usize, salt: usize) -> Vec<EndpointSpec> {
    (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e;
            let ip = if e == 0 && salt > 0 {
                Ipv4Addr::new(10, 250, (salt >> 8) as u8, salt as u8)
            } else {
                Ipv4Addr::new(10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
            };
            EndpointSpec::new(ip, true, NODE)
        })
        .collect()
}

fn pair(i: usize, name: &str, salt: usize) -> String {
    let ports = [PortSpec::new("dns", "UDP", 53, 5353)];
    format!(
        "{}---\n{}---\n",
        service_yaml("bench", name, &vip_of(i).to_string(), &ports, true),
        endpointslice_yaml(
            "bench",
            &format!("{name}-1"),
            name,
            &ports,
            &endpoints(i, salt)
        )
    )
}

fn big_file(f: usize, salt: usize) -> String {
    let mut text = String::new();
    for i in f * PER_FILE..(f + 1) * PER_FILE {
        let salt = if i == f * PER_FILE { salt } else { 0 };
        text.push_str(&pair(i, &format!("svc-{i}"), salt));
    }
    text
}

struct Agent {
    child: Child,
    pin: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(rd) = std::fs::read_dir(&self.pin) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin);
    }
}

fn config_map(pin: &Path) -> Result<Array<MapData, u64>> {
    let data = MapData::from_pin(pin.join(names::CONFIG))?;
    Ok(Array::try_from(Map::Array(data))?)
}

fn services_map(
    pin: &Path,
) -> Result<HashMap<MapData, xlb_common::ServiceKey4, xlb_common::Service>> {
    let data = MapData::from_pin(pin.join(names::SERVICES4))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

fn key_of(i: usize) -> xlb_common::ServiceKey4 {
    service_key(&VipKey {
        addr: vip_of(i).into(),
        port: 53,
        protocol: Protocol::Udp,
    })
    .v4()
    .expect("an IPv4 VIP")
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Option<()>) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if f().is_some() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// bytes_memlock of the pinned maps and of every inner table `xlb_maglev` holds.
fn map_memory(pin: &Path) -> Result<(u64, u64)> {
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new("bpftool").arg("-j").args(args).output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let all = json(&["map", "show"])?;
    let mem_of = |id: u64| {
        all.as_array()
            .and_then(|a| a.iter().find(|m| m["id"].as_u64() == Some(id)))
            .and_then(|m| m["bytes_memlock"].as_u64())
            .unwrap_or(0)
    };
    let mut pinned = 0;
    for name in names::ALL_MAPS {
        let m = json(&[
            "map",
            "show",
            "pinned",
            &pin.join(name).display().to_string(),
        ])?;
        pinned += m["bytes_memlock"].as_u64().unwrap_or(0);
    }
    let dump = json(&[
        "map",
        "dump",
        "pinned",
        &pin.join(names::MAGLEV).display().to_string(),
    ])?;
    let mut inner = 0;
    for e in dump.as_array().into_iter().flatten() {
        // Values print as little-endian hex bytes: the inner map's id.
        let bytes: Vec<u8> = e["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect();
        if let Ok(b) = <[u8; 4]>::try_from(bytes.as_slice()) {
            inner += mem_of(u64::from(u32::from_le_bytes(b)));
        }
    }
    Ok((pinned, inner))
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let bin = PathBuf::from(
        args.next()
            .context("usage: cp_bench XLB_BIN [SERVICES] [ROUNDS]")?,
    );
    let services: usize = args.next().map_or(Ok(10_000), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(50), |s| s.parse())?;
    let pid = std::process::id();
    let ns = Netns::create(&format!("xlbc{pid}-cp"))?;
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ns.ip(&["link", "set", "d1", "up"])?;
    ns.ip(&["addr", "add", "10.0.0.2/24", "dev", "d0"])?;
    ns.ip(&["link", "set", "d0", "up"])?;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("m");
    std::fs::create_dir(&dir)?;
    let files = services.div_ceil(PER_FILE);
    for f in 0..files {
        write_atomic(&dir.join(format!("services-{f:02}.yaml")), &big_file(f, 0))?;
    }
    // One more Service in a small file of its own, for the small-file change.
    let small = services;
    write_atomic(&dir.join("zz-small.yaml"), &pair(small, "chg", 0))?;
    let bytes: u64 = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum();
    println!(
        "{services}+1 Services x {ENDPOINTS} endpoints, {files} big files, {bytes} bytes of YAML"
    );

    let pin = PathBuf::from(format!("/sys/fs/bpf/xlbc{pid}"));
    let log = std::fs::File::create(work.path().join("agent.log"))?;
    let started = Instant::now();
    let child = ns
        .command(&bin)
        .args([
            "agent",
            "--interface",
            "d0",
            "--node-name",
            NODE,
            "--xdp-mode",
            "generic",
        ])
        .arg("--manifests")
        .arg(&dir)
        .arg("--pin-path")
        .arg(&pin)
        .args(["--metrics-addr", "127.0.0.1:9464"])
        .args(
            std::env::var("CP_BENCH_LOG_LEVEL")
                .map(|l| vec!["--log-level".to_string(), l])
                .unwrap_or_default(),
        )
        .env("XLB_LOG", std::env::var("XLB_LOG").unwrap_or("info".into()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let agent_pid = child.id();
    let agent = Agent {
        child,
        pin: pin.clone(),
    };
    let mut cfg = None;
    let programmed = wait_for("the first sync", Duration::from_secs(900), || {
        if cfg.is_none() {
            cfg = config_map(&pin).ok();
        }
        let v = cfg.as_ref()?.get(&config::NEXT_SERVICE_ID, 0).ok()?;
        (v != 0).then_some(())
    })?;
    let cfg = cfg.context("config map")?;
    let programmed = programmed.max(started.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    let rss = status_kib(agent_pid, "VmRSS:");
    let hwm = status_kib(agent_pid, "VmHWM:");
    println!(
        "programmed after {:.2} s; agent RSS {} MiB (peak {} MiB; anon {} MiB, file {} MiB)",
        programmed.as_secs_f64(),
        rss / 1024,
        hwm / 1024,
        status_kib(agent_pid, "RssAnon:") / 1024,
        status_kib(agent_pid, "RssFile:") / 1024,
    );
    match map_memory(&pin) {
        Ok((p, i)) => println!(
            "map memory: pinned {:.1} MiB + inner Maglev tables {:.1} MiB",
            p as f64 / 1048576.0,
            i as f64 / 1048576.0
        ),
        Err(e) => println!("map memory: {e:#}"),
    }

    let services_m = services_map(&pin)?;
    let mut report = String::new();
    for (label, big) in [
        ("small file (1 Service)", false),
        ("1,000-Service file", true),
    ] {
        let mut lat = Vec::new();
        for r in 1..=rounds {
            let salt = r + if big { 1000 } else { 0 };
            let key = key_of(if big { 0 } else { small });
            let before = services_m.get(&key, 0)?.table;
            let ids_before = cfg.get(&config::NEXT_BACKEND_ID, 0)?;
            let (name, text) = if big {
                ("services-00.yaml", big_file(0, salt))
            } else {
                ("zz-small.yaml", pair(small, "chg", salt))
            };
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            let t = Instant::now();
            std::fs::rename(&tmp, dir.join(name))?;
            // The flip: the service now points to its other table generation.
            wait_for("the change", Duration::from_secs(60), || {
                (services_m.get(&key, 0).ok()?.table != before).then_some(())
            })?;
            let d = t.elapsed();
            // And the sync is over (ids are written last) before the next round.
            wait_for("the sync's end", Duration::from_secs(60), || {
                (cfg.get(&config::NEXT_BACKEND_ID, 0).ok()? != ids_before).then_some(())
            })?;
            lat.push(d);
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = writeln!(
            report,
            "EndpointSlice change, {label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({rounds} rounds)",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
    }
    print!("{report}");
    println!(
        "agent RSS after the changes {} MiB (peak {} MiB)",
        status_kib(agent_pid, "VmRSS:") / 1024,
        status_kib(agent_pid, "VmHWM:") / 1024
    );
    if std::env::var_os("CP_BENCH_KEEP_LOG").is_some() {
        let _ = std::fs::copy(work.path().join("agent.log"), "/tmp/cp_bench_agent.log");
    }
    drop(agent);
    drop(ns);
    Ok(())
}
