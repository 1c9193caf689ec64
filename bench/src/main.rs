//! `cargo xtask bench`: xlb's per-packet program cost next to the floor (XDP_PASS) and
//! a minimal reference load balancer (`bench/reference`, the "limit" row), measured
//! in one run with `BPF_PROG_TEST_RUN`, interleaved, medians of several rounds, and
//! reported as cost over the floor and as ratios. Results go to `bench/results/`
//! (JSON and a Markdown table) and to stdout.
//!
//! What each row costs: the kernel's own average per repetition (`repeat` = N on the
//! same buffer). Paths that rewrite the packet are measured with an identity DNAT
//! (the VIP's only backend is the VIP itself), so every repetition takes the same
//! path: the first run creates the conntrack entry, the rest are hits.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use xlb::{
    dataplane::testrun::{BASELINE_PROG, TestBed},
    desired::VipKey,
    model::Protocol,
};
use xlb_common::{SVC_F_LOCAL, names};
use xlb_lab::packets::{ACK, Ip4, tcp_seg};

const CLIENT: [u8; 4] = [10, 0, 0, 2];
const VIP: [u8; 4] = [10, 0, 100, 1];
const OTHER: [u8; 4] = [10, 0, 100, 2];
const PORT: u16 = 80;
/// Measurement rounds; each runs every row once, in turn.
const ROUNDS: usize = 7;
/// Repetitions per `BPF_PROG_TEST_RUN` call.
const REPEAT: u32 = 1_000_000;
const XDP_PASS: u32 = 2;

/// A 70-byte TCP segment (16 bytes of payload) from the client to `dst`:80.
fn segment(dst: [u8; 4]) -> Vec<u8> {
    Ip4::new(CLIENT, dst, 6).frame(&tcp_seg(
        CLIENT,
        dst,
        (40_000, PORT),
        ACK,
        5,
        &[],
        b"0123456789abcdef",
    ))
}

/// One measured row.
struct Row {
    name: &'static str,
    what: &'static str,
    samples: Vec<u64>,
}

impl Row {
    fn median(&self) -> u64 {
        let mut v = self.samples.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }
}

/// The reference program's object, loaded with its maps set for an identity DNAT.
struct Reference {
    ebpf: Ebpf,
}

impl Reference {
    fn load(path: &Path) -> Result<Reference> {
        let mut ebpf = Ebpf::load_file(path)
            .with_context(|| format!("loading the reference object {}", path.display()))?;
        for name in ["ref_lb", "ref_pass"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let mut vips: HashMap<_, [u8; 8], [u8; 8]> =
            HashMap::try_from(ebpf.map_mut("ref_vips").context("no map ref_vips")?)?;
        let port = PORT.to_be_bytes();
        let key = [VIP[0], VIP[1], VIP[2], VIP[3], port[0], port[1], 6, 0];
        let target = [VIP[0], VIP[1], VIP[2], VIP[3], port[0], port[1], 0, 0];
        vips.insert(key, target, 0)?;
        Ok(Reference { ebpf })
    }

    fn run(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<(u32, u64)> {
        let p: &Xdp = self
            .ebpf
            .program(prog)
            .with_context(|| format!("no program {prog}"))?
            .try_into()?;
        let mut out = vec![0u8; 4096];
        let r = p.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok((r.return_value, r.duration.as_nanos() as u64))
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut reference, mut out_dir) = (None, PathBuf::from("bench/results"));
    let mut prog_only = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--prog-only" => prog_only = true,
            "--reference" => reference = args.next().map(PathBuf::from),
            "--out" => out_dir = args.next().map(PathBuf::from).context("--out DIR")?,
            other => {
                bail!("unknown argument {other:?} (--reference OBJ [--out DIR] [--prog-only])")
            }
        }
    }
    let reference = reference.context("--reference OBJ (cargo xtask bench builds it)")?;

    let mut bed = TestBed::load().context("loading xlb's programs (root needed)")?;
    let vip = VipKey {
        addr: IpAddr::V4(Ipv4Addr::from(VIP)),
        port: PORT,
        protocol: Protocol::Tcp,
    };
    let identity = [SocketAddr::from((VIP, PORT))];
    bed.program(1, &vip, &identity, SVC_F_LOCAL)?;
    let refr = Reference::load(&reference)?;
    let (hit, miss) = (segment(VIP), segment(OTHER));

    // Warm up: create both conntrack entries and check every path is what it claims.
    let first = bed.run(names::XDP_PROG, &hit, 1)?;
    ensure!(
        first.retval == XDP_PASS && first.data == hit,
        "xlb: the identity DNAT changed the packet"
    );
    ensure!(
        refr.run("ref_lb", &hit, 1)?.0 == XDP_PASS,
        "reference: verdict"
    );

    type Runner<'a> = Box<dyn Fn() -> Result<u64> + 'a>;
    let xlb_run = |prog: &'static str, pkt: &'static [u8]| -> Runner<'_> {
        let bed = &bed;
        Box::new(move || {
            let r = bed.run(prog, pkt, REPEAT)?;
            ensure!(r.retval == XDP_PASS, "{prog}: verdict {}", r.retval);
            Ok(r.duration_ns)
        })
    };
    let ref_run = |prog: &'static str, pkt: &'static [u8]| -> Runner<'_> {
        let refr = &refr;
        Box::new(move || {
            let (v, ns) = refr.run(prog, pkt, REPEAT)?;
            ensure!(v == XDP_PASS, "{prog}: verdict {v}");
            Ok(ns)
        })
    };
    let hit: &'static [u8] = hit.leak();
    let miss: &'static [u8] = miss.leak();
    let mut rows: Vec<(Row, Runner<'_>)> = vec![
        (
            row("floor", "XDP_PASS (xlb's object)"),
            xlb_run(BASELINE_PROG, miss),
        ),
        (
            row("floor_ref", "XDP_PASS (reference object)"),
            ref_run("ref_pass", miss),
        ),
        (
            row("xlb_miss", "xlb, non-VIP packet"),
            xlb_run(names::XDP_PROG, miss),
        ),
        (
            row("ref_miss", "limit, non-VIP packet"),
            ref_run("ref_lb", miss),
        ),
        (
            row("xlb_hit", "xlb, VIP conntrack hit"),
            xlb_run(names::XDP_PROG, hit),
        ),
        (
            row("ref_hit", "limit, VIP conntrack hit"),
            ref_run("ref_lb", hit),
        ),
    ];
    for _ in 0..ROUNDS {
        for (r, run) in rows.iter_mut() {
            r.samples.push(run()?);
        }
    }
    let rows: Vec<Row> = rows.into_iter().map(|(r, _)| r).collect();
    report(&rows, &out_dir)?;
    if prog_only {
        return Ok(());
    }
    health_under_load(&out_dir)?;
    programming(&out_dir)
}

/// Programming 10,000 LoadBalancer Services x 10 endpoints from scratch: the time from
/// starting the agent until the last Service's VIP answers, and the agent's memory.
fn programming(out_dir: &Path) -> Result<()> {
    use std::fmt::Write as _;
    use std::time::{Duration, Instant};
    use xlb_lab::manifests::{EndpointSpec, PortSpec, endpointslice_yaml, service_yaml};
    const SERVICES: usize = 10_000;
    const PER_FILE: usize = 1_000;
    const ENDPOINTS: usize = 10;
    println!("programming {SERVICES} Services x {ENDPOINTS} endpoints from scratch");
    let mut lab = xlb_lab::Lab::one_node(1)?;
    let node = lab.node();
    let pod = node.pods[0].ip;
    let ports = [PortSpec::new("dns", "UDP", 53, 5353)];
    let vip_of = |i: usize| Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8);
    for f in 0..SERVICES / PER_FILE {
        let mut text = String::new();
        for i in f * PER_FILE..(f + 1) * PER_FILE {
            let name = format!("svc-{i}");
            // The last Service's only endpoint is the lab's pod, so its VIP can answer.
            let eps: Vec<EndpointSpec> = if i == SERVICES - 1 {
                vec![EndpointSpec::new(pod, true, &node.name)]
            } else {
                (0..ENDPOINTS)
                    .map(|e| {
                        let n = i * ENDPOINTS + e;
                        let ip = Ipv4Addr::new(10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
                        EndpointSpec::new(ip, true, &node.name)
                    })
                    .collect()
            };
            let _ = write!(
                text,
                "{}---\n{}---\n",
                service_yaml("bench", &name, &vip_of(i).to_string(), &ports, true),
                endpointslice_yaml("bench", &format!("{name}-1"), &name, &ports, &eps)
            );
        }
        xlb_lab::manifests::write_atomic(
            &node.manifests_dir.join(format!("services-{f:02}.yaml")),
            &text,
        )?;
    }
    let last = SocketAddr::from((vip_of(SERVICES - 1), 53));
    let started = Instant::now();
    lab.start_agent()?;
    let answered = xlb_lab::poll(
        "the last VIP to answer",
        Duration::from_secs(600),
        Duration::from_millis(200),
        || {
            Ok(lab
                .client
                .udp_probe(last, Duration::from_millis(200))?
                .map(|_| started.elapsed()))
        },
    )?;
    let pid = lab.agent()?.pid().context("agent pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let services = lab.agent()?.metric("xlb_services", &[])?;
    let md = format!(
        "| Services x endpoints | last VIP answered after | VIP:port entries | agent RSS |\n\
         | ---: | ---: | ---: | ---: |\n\
         | {SERVICES} x {ENDPOINTS} | {:.1} s | {services} | {} MiB |\n",
        answered.as_secs_f64(),
        rss_kib / 1024
    );
    println!("\n{md}");
    let json = serde_json::json!({
        "services": SERVICES, "endpoints_per_service": ENDPOINTS,
        "last_vip_answered_s": answered.as_secs_f64(), "programmed_keys": services,
        "agent_rss_kib": rss_kib,
    });
    std::fs::write(out_dir.join("programming.md"), md)?;
    std::fs::write(
        out_dir.join("programming.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("written: {}/programming.{{json,md}}", out_dir.display());
    Ok(())
}

/// Scrapers hammering `/metrics` over a full conntrack map must not slow the health
/// answers a load balancer in front of the node relies on (goal: p99 under 50 ms).
fn health_under_load(out_dir: &Path) -> Result<()> {
    const FLOWS: u32 = 200_000;
    const SCRAPERS: usize = 50;
    const SECS: u64 = 10;
    println!("health under scrape load: {SCRAPERS} scrapers, {FLOWS} conntrack entries, {SECS} s");
    let mut lab = xlb_lab::load::health_lab(2)?;
    xlb_lab::load::fill_conntrack(&mut lab, FLOWS)?;
    let r =
        xlb_lab::load::health_under_scrapes(&lab, SCRAPERS, std::time::Duration::from_secs(SECS));
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99) = (ms(r.percentile(0.5)), ms(r.percentile(0.99)));
    let max = ms(r.latencies.last().copied().unwrap_or_default());
    let md = format!(
        "| health polls answered | failed | p50 ms | p99 ms | max ms | scrapes meanwhile |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {} | {} | {p50:.2} | {p99:.2} | {max:.2} | {} |\n\n\
         /healthz and the healthCheckNodePort, polled every 50 ms with a 1 s timeout while {SCRAPERS} \
         scrapers read /metrics over {FLOWS} conntrack entries (goal: p99 under 50 ms).\n",
        r.latencies.len(),
        r.failures.len(),
        r.scrapes
    );
    println!("\n{md}");
    let json = serde_json::json!({
        "scrapers": SCRAPERS, "conntrack_entries": FLOWS, "seconds": SECS,
        "answered": r.latencies.len(), "failed": r.failures.len(), "scrapes": r.scrapes,
        "p50_ms": p50, "p99_ms": p99, "max_ms": max,
    });
    std::fs::write(out_dir.join("health_under_scrape.md"), md)?;
    std::fs::write(
        out_dir.join("health_under_scrape.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!(
        "written: {}/health_under_scrape.{{json,md}}",
        out_dir.display()
    );
    Ok(())
}

fn row(name: &'static str, what: &'static str) -> Row {
    Row {
        name,
        what,
        samples: Vec::with_capacity(ROUNDS),
    }
}

/// Prints the table and writes `prog_cost.json` and `prog_cost.md` under `out_dir`.
fn report(rows: &[Row], out_dir: &Path) -> Result<()> {
    let med = |n: &str| {
        rows.iter()
            .find(|r| r.name == n)
            .map(Row::median)
            .unwrap_or(0)
    };
    let floor = med("floor").min(med("floor_ref"));
    let over = |n: &str| med(n).saturating_sub(floor);
    let ratio = |a: &str, b: &str| over(a) as f64 / over(b).max(1) as f64;
    let mut md = String::from(
        "| path | ns/packet (median) | over the XDP_PASS floor |\n| --- | ---: | ---: |\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            r.what,
            r.median(),
            over(r.name)
        ));
    }
    md.push_str(&format!(
        "\nxlb / limit, cost over the floor: VIP hit {:.2}x (goal <= 1.5x), non-VIP miss {:.2}x (goal <= 1.2x).\n",
        ratio("xlb_hit", "ref_hit"),
        ratio("xlb_miss", "ref_miss")
    ));
    println!("BPF_PROG_TEST_RUN, {REPEAT} repetitions x {ROUNDS} rounds, interleaved\n\n{md}");
    let json = serde_json::json!({
        "method": format!("BPF_PROG_TEST_RUN repeat={REPEAT}, {ROUNDS} interleaved rounds, medians; 70-byte TCP frame"),
        "floor_ns": floor,
        "rows": rows.iter().map(|r| serde_json::json!({
            "name": r.name, "what": r.what, "median_ns": r.median(),
            "over_floor_ns": over(r.name), "samples_ns": r.samples,
        })).collect::<Vec<_>>(),
        "ratios": {
            "vip_hit_xlb_over_limit": ratio("xlb_hit", "ref_hit"),
            "miss_xlb_over_limit": ratio("xlb_miss", "ref_miss"),
        },
    });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("prog_cost.md"), md)?;
    std::fs::write(
        out_dir.join("prog_cost.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("written: {}/prog_cost.{{json,md}}", out_dir.display());
    Ok(())
}
