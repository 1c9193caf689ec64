//! Per-packet program cost: xlb next to the floor (XDP_PASS) and a minimal reference load
//! balancer (`bench/reference`, the "limit" row), measured in one run with
//! `BPF_PROG_TEST_RUN`, interleaved, medians of several rounds, reported as cost over the
//! floor and as ratios.
//!
//! What each row costs: the kernel's own average per repetition (`repeat` = N on the
//! same buffer). Paths that rewrite the packet are measured with an identity DNAT
//! (the VIP's only backend is the VIP itself), so every repetition takes the same
//! path: the first run creates the conntrack entry, the rest are hits.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde_json::Value;
use xlb::{
    dataplane::testrun::{BASELINE_PROG, TestBed},
    desired::VipKey,
    model::Protocol,
};
use xlb_common::{SVC_F_LOCAL, names};
use xlb_lab::packets::{ACK, Ip4, tcp_seg};

use crate::Scale;

const CLIENT: [u8; 4] = [10, 0, 0, 2];
const VIP: [u8; 4] = [10, 0, 100, 1];
const OTHER: [u8; 4] = [10, 0, 100, 2];
const PORT: u16 = 80;
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

/// An ARP request (RFC 826) from the client for `target`, padded to 60 bytes: what
/// every host on the LAN sends and every node's XDP sees.
fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mac = [0x02, 0, 0, 0, 0, 0x02];
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&CLIENT);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// Measures every row, interleaved; returns the JSON part (with its Markdown table under
/// `"markdown"`).
pub fn run(reference: &Path, scale: Scale) -> Result<Value> {
    // 1,000,000 repetitions x 7 rounds; the quick run only checks the harness works.
    let (repeat, rounds) = if scale.quick {
        (100_000, 3)
    } else {
        (1_000_000, 7)
    };
    let mut bed = TestBed::load().context("loading xlb's programs (root needed)")?;
    let vip = VipKey {
        addr: IpAddr::V4(Ipv4Addr::from(VIP)),
        port: PORT,
        protocol: Protocol::Tcp,
    };
    let identity = [SocketAddr::from((VIP, PORT))];
    bed.program(1, &vip, &identity, SVC_F_LOCAL)?;
    let refr = Reference::load(reference)?;
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
            let r = bed.run(prog, pkt, repeat)?;
            ensure!(r.retval == XDP_PASS, "{prog}: verdict {}", r.retval);
            Ok(r.duration_ns)
        })
    };
    let ref_run = |prog: &'static str, pkt: &'static [u8]| -> Runner<'_> {
        let refr = &refr;
        Box::new(move || {
            let (v, ns) = refr.run(prog, pkt, repeat)?;
            ensure!(v == XDP_PASS, "{prog}: verdict {v}");
            Ok(ns)
        })
    };
    let hit: &'static [u8] = hit.leak();
    let miss: &'static [u8] = miss.leak();
    // The ARP reply itself rewrites the request, so repetitions on one buffer would
    // measure the reply's pass path; the row measures what every other ARP costs.
    let arp: &'static [u8] = arp_request(OTHER).leak();
    let row = |name, what| Row {
        name,
        what,
        samples: Vec::with_capacity(rounds),
    };
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
            row(
                "xlb_arp_miss",
                "xlb, ARP request for an address it does not own",
            ),
            xlb_run(names::XDP_PROG, arp),
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
    println!("prog: BPF_PROG_TEST_RUN, {repeat} repetitions x {rounds} rounds, interleaved");
    for _ in 0..rounds {
        for (r, run) in rows.iter_mut() {
            r.samples.push(run()?);
        }
    }
    let rows: Vec<Row> = rows.into_iter().map(|(r, _)| r).collect();
    Ok(summarise(&rows, repeat, rounds))
}

/// The JSON part and its Markdown table.
fn summarise(rows: &[Row], repeat: u32, rounds: usize) -> Value {
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
    println!("\n{md}");
    serde_json::json!({
        "method": format!("BPF_PROG_TEST_RUN repeat={repeat}, {rounds} interleaved rounds, medians; 70-byte TCP frame; identity DNAT so every repetition of the hit is a conntrack hit"),
        "floor_ns": floor,
        "rows": rows.iter().map(|r| serde_json::json!({
            "name": r.name, "what": r.what, "median_ns": r.median(),
            "over_floor_ns": over(r.name), "samples_ns": r.samples,
        })).collect::<Vec<_>>(),
        "median_ns": {
            "xlb_hit": med("xlb_hit"), "xlb_miss": med("xlb_miss"),
            "ref_hit": med("ref_hit"), "ref_miss": med("ref_miss"),
        },
        "ratios": {
            "vip_hit_xlb_over_limit": ratio("xlb_hit", "ref_hit"),
            "miss_xlb_over_limit": ratio("xlb_miss", "ref_miss"),
        },
        "markdown": md,
    })
}
