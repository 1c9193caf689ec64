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
    /// The row whose median is this row's floor ("floor": the lower of the two
    /// XDP_PASS rows).
    floor: &'static str,
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
        for name in ["ref_lb", "ref_pass", "ref_tx"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("verifying {name}"))?;
        }
        let mut refr = Reference { ebpf };
        refr.add_vip(VIP, PORT, 6, VIP, PORT)?;
        Ok(refr)
    }

    /// Sends `vip`:`port`/`proto` to `to`:`to_port`.
    fn add_vip(
        &mut self,
        vip: [u8; 4],
        port: u16,
        proto: u8,
        to: [u8; 4],
        to_port: u16,
    ) -> Result<()> {
        let mut vips: HashMap<_, [u8; 8], [u8; 8]> =
            HashMap::try_from(self.ebpf.map_mut("ref_vips").context("no map ref_vips")?)?;
        let (p, tp) = (port.to_be_bytes(), to_port.to_be_bytes());
        let key = [vip[0], vip[1], vip[2], vip[3], p[0], p[1], proto, 0];
        let target = [to[0], to[1], to[2], to[3], tp[0], tp[1], 0, 0];
        vips.insert(key, target, 0)?;
        Ok(())
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
        let want = if prog == "ref_tx" { XDP_TX } else { XDP_PASS };
        Box::new(move || {
            let (v, ns) = refr.run(prog, pkt, repeat)?;
            ensure!(v == want, "{prog}: verdict {v}");
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
        floor: "floor",
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
            row("floor_tx", "MAC swap + XDP_TX (reference object)"),
            ref_run("ref_tx", miss),
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
    // XLBB_PROG_ONCE_ONLY: skip these rows (to profile the once-per-packet paths).
    let rounds_run = if std::env::var_os("XLBB_PROG_ONCE_ONLY").is_some() {
        0
    } else {
        rounds
    };
    for _ in 0..rounds_run {
        for (r, run) in rows.iter_mut() {
            r.samples.push(run()?);
        }
    }
    let mut rows: Vec<Row> = rows.into_iter().map(|(r, _)| r).collect();
    rows.extend(once_rows(reference, scale)?);
    Ok(summarise(&rows, repeat, rounds))
}

/// The backend of the new-flow rows' UDP VIP.
const NEW_FLOW_BACKEND: [u8; 4] = [10, 0, 1, 5];
/// This node's and the other node's tunnel addresses in the Cluster rows.
const NODE: [u8; 4] = [10, 0, 0, 11];
const OTHER_NODE: [u8; 4] = [10, 0, 0, 12];
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// The `i`-th distinct client flow to the UDP VIP: source address 10.77+a.b.c and
/// source port 1024 + d for `i` = a.b.c.d, so no two share a conntrack key.
fn new_flow_packet(i: u32) -> Vec<u8> {
    let [a, b, c, d] = i.to_be_bytes();
    xlb_lab::packets::udp(
        [10, 77 + a, b, c],
        VIP,
        1024 + u16::from(d),
        PORT,
        &[0x78; 18],
    )
}

/// The paths a repeated buffer cannot measure, one run per packet (`repeat` = 1):
/// - a VIP new flow (Maglev pick, conntrack and reverse-NAT inserts), xlb's and the
///   reference's (its one LRU insert): a repeated packet would be a conntrack hit
///   from its second run on, so every sample is a distinct flow;
/// - Cluster encap (conntrack hit to a remote backend, FIB lookup, IPIP header built,
///   XDP_REDIRECT) and decap (outer header stripped, then a local DNAT): each run
///   grows or shrinks the buffer it would rerun on.
///
/// Each sample runs the same packet through the XDP_PASS program right after, the
/// same way: that row's median is these rows' floor (it includes the kernel's per-call
/// timer overhead, about 100 ns here, which a repeat=N average spreads thin). The new
/// flow is measured while the LRU maps fill, then again once they are full, where
/// every insert first evicts (the kernel's LRU shrink in `bpf_lru_pop_free`).
///
/// Runs in a namespace of its own (deleted on drop): the encap's `bpf_fib_lookup`
/// needs a route and a neighbour for the other node, and BPF_PROG_TEST_RUN looks them
/// up in the calling thread's namespace; none of the machine's own.
fn once_rows(reference: &Path, scale: Scale) -> Result<Vec<Row>> {
    let ns = xlb_lab::netns::Netns::create(&format!("xlb-{}-prog", std::process::id()))?;
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"])?;
    ns.ip(&["addr", "add", "10.0.0.11/24", "dev", "va"])?;
    ns.ip(&["link", "set", "va", "up"])?;
    ns.ip(&["link", "set", "vb", "up"])?;
    // bpf_fib_lookup answers FWD_DISABLED unless the ingress device forwards (as a
    // Kubernetes node's does).
    ns.sysctl("net/ipv4/ip_forward", "1")?;
    ns.ip(&[
        "neigh",
        "add",
        "10.0.0.12",
        "lladdr",
        "02:00:00:00:00:12",
        "dev",
        "va",
        "nud",
        "permanent",
    ])?;
    let reference = reference.to_path_buf();
    ns.enter(move || once_rows_here(&reference, scale))
}

/// [`once_rows`], inside its namespace.
fn once_rows_here(reference: &Path, scale: Scale) -> Result<Vec<Row>> {
    let samples = if scale.quick { 2_000 } else { 20_000 };
    let mut bed = TestBed::load().context("loading xlb's programs (root needed)")?;
    bed.config.set(
        xlb_common::config::NODE_IP,
        u64::from(u32::from_ne_bytes(NODE)),
        0,
    )?;
    let key = |port, protocol| VipKey {
        addr: IpAddr::V4(Ipv4Addr::from(VIP)),
        port,
        protocol,
    };
    // VIP:80/TCP: one backend on the other node (encap). VIP:81/TCP: a local backend
    // (what arrives decapsulated). VIP:80/UDP: a local backend (new flows).
    bed.program(1, &key(PORT, Protocol::Tcp), &[], 0)?;
    let remote = xlb::dataplane::state::remote_backend_value(
        &SocketAddr::from(([10, 0, 2, 7], 8080)),
        IpAddr::V4(Ipv4Addr::from(OTHER_NODE)),
    );
    bed.backends.insert(101, remote, 0)?;
    bed.set_table(2, &[101])?;
    let svc = xlb_common::Service {
        id: 1,
        table: 2,
        count: 1,
        flags: 0,
        affinity_secs: 0,
        pad: 0,
    };
    let svc_key = xlb_common::ServiceKey4 {
        addr: VIP,
        port: PORT.to_be(),
        proto: 6,
        pad: 0,
    };
    bed.services.insert(svc_key, svc, 0)?;
    bed.create_counters(1, &[101])?;
    bed.program(
        2,
        &key(81, Protocol::Tcp),
        &[SocketAddr::from(([10, 0, 1, 6], 8080))],
        0,
    )?;
    bed.program(
        3,
        &key(PORT, Protocol::Udp),
        &[SocketAddr::from((NEW_FLOW_BACKEND, 8080))],
        0,
    )?;
    let mut refr = Reference::load(reference)?;
    refr.add_vip(VIP, PORT, 17, NEW_FLOW_BACKEND, 8080)?;

    let to_encap = segment(VIP);
    let mut inner = segment(VIP);
    // The same client segment to VIP:81 (port and checksum rewritten by the builder).
    inner.clone_from(&Ip4::new(CLIENT, VIP, 6).frame(&tcp_seg(
        CLIENT,
        VIP,
        (40_000, 81),
        ACK,
        5,
        &[],
        b"0123456789abcdef",
    )));
    // As another node's xlb sends it: an outer IPv4 header, protocol 4.
    let to_decap = Ip4::new(OTHER_NODE, NODE, 4).frame(&inner[xlb_lab::packets::ETH_LEN..]);
    let e = bed.run(names::XDP_PROG, &to_encap, 1)?;
    ensure!(
        e.retval == XDP_REDIRECT && e.data.len() == to_encap.len() + 20,
        "encap: verdict {} and {} bytes",
        e.retval,
        e.data.len()
    );
    let d = bed.run(names::XDP_PROG, &to_decap, 1)?;
    ensure!(
        d.retval == XDP_PASS && d.data.len() == inner.len(),
        "decap: verdict {} and {} bytes",
        d.retval,
        d.data.len()
    );

    let row = |name, what, floor| Row {
        name,
        what,
        floor,
        samples: Vec::with_capacity(samples),
    };
    let mut next = 0u32;
    let mut fill = [
        row("floor_once", "XDP_PASS, run once per packet", "floor_once"),
        row(
            "xlb_new",
            "xlb, VIP new flow (LRU maps filling)",
            "floor_once",
        ),
        row(
            "ref_new",
            "limit, VIP new flow (LRU map filling)",
            "floor_once",
        ),
        row(
            "xlb_encap",
            "xlb, Cluster encap (CT hit, FIB, IPIP, redirect)",
            "floor_once",
        ),
        row(
            "xlb_decap",
            "xlb, Cluster decap (+ CT hit, DNAT)",
            "floor_once",
        ),
    ];
    let created = bed.reason_count(xlb_common::Reason::CtCreated)?;
    for _ in 0..samples {
        let pkt = new_flow_packet(next);
        next += 1;
        fill[0]
            .samples
            .push(bed.run(BASELINE_PROG, &pkt, 1)?.duration_ns);
        let r = bed.run(names::XDP_PROG, &pkt, 1)?;
        ensure!(r.retval == XDP_PASS, "new flow: verdict {}", r.retval);
        fill[1].samples.push(r.duration_ns);
        fill[2].samples.push(refr.run("ref_lb", &pkt, 1)?.1);
        fill[3]
            .samples
            .push(bed.run(names::XDP_PROG, &to_encap, 1)?.duration_ns);
        fill[4]
            .samples
            .push(bed.run(names::XDP_PROG, &to_decap, 1)?.duration_ns);
    }
    ensure!(
        bed.reason_count(xlb_common::Reason::CtCreated)? - created == samples as u64,
        "new flow: not every measured packet created a conntrack entry"
    );
    // Fill both LRU maps to capacity, unmeasured.
    while next < xlb_common::limits::CONNTRACK_ENTRIES + samples as u32 {
        let pkt = new_flow_packet(next);
        next += 1;
        bed.run(names::XDP_PROG, &pkt, 1)?;
        refr.run("ref_lb", &pkt, 1)?;
    }
    let mut full = [
        row(
            "floor_once_full",
            "XDP_PASS, run once per packet (again)",
            "floor_once_full",
        ),
        row(
            "xlb_new_full",
            "xlb, VIP new flow (LRU maps full: each insert evicts)",
            "floor_once_full",
        ),
        row(
            "ref_new_full",
            "limit, VIP new flow (LRU map full: each insert evicts)",
            "floor_once_full",
        ),
    ];
    for _ in 0..samples {
        let pkt = new_flow_packet(next);
        next += 1;
        full[0]
            .samples
            .push(bed.run(BASELINE_PROG, &pkt, 1)?.duration_ns);
        full[1]
            .samples
            .push(bed.run(names::XDP_PROG, &pkt, 1)?.duration_ns);
        full[2].samples.push(refr.run("ref_lb", &pkt, 1)?.1);
    }
    Ok(fill.into_iter().chain(full).collect())
}

/// The JSON part and its Markdown table.
fn summarise(rows: &[Row], repeat: u32, rounds: usize) -> Value {
    let med = |n: &str| {
        rows.iter()
            .find(|r| r.name == n)
            .map(Row::median)
            .unwrap_or(0)
    };
    let floor_of = |n: &str| match rows.iter().find(|r| r.name == n).map(|r| r.floor) {
        Some("floor") | None => med("floor").min(med("floor_ref")),
        Some(f) => med(f),
    };
    let floor = floor_of("floor");
    let over = |n: &str| med(n).saturating_sub(floor_of(n));
    let ratio = |a: &str, b: &str| over(a) as f64 / over(b).max(1) as f64;
    let mut md = String::from(
        "| path | ns/packet (median) | over its XDP_PASS floor |\n| --- | ---: | ---: |\n",
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
        "\nxlb / limit, cost over the floor: VIP hit {:.2}x (goal <= 1.5x), non-VIP miss {:.2}x (goal <= 1.2x), VIP new flow {:.2}x (LRU filling) and {:.2}x (LRU full).\n",
        ratio("xlb_hit", "ref_hit"),
        ratio("xlb_miss", "ref_miss"),
        ratio("xlb_new", "ref_new"),
        ratio("xlb_new_full", "ref_new_full"),
    ));
    println!("\n{md}");
    serde_json::json!({
        "method": format!("BPF_PROG_TEST_RUN repeat={repeat}, {rounds} interleaved rounds, medians; 70-byte TCP frame; identity DNAT so every repetition of the hit is a conntrack hit. Rows whose floor is floor_once*: repeat=1, one distinct packet per sample (new flows: a new UDP source address and port each), the XDP_PASS program run on the same packet right after as their floor, medians"),
        "floor_ns": floor,
        "rows": rows.iter().map(|r| serde_json::json!({
            "name": r.name, "what": r.what, "median_ns": r.median(), "floor": r.floor,
            "over_floor_ns": over(r.name), "samples_ns": if r.samples.len() > 100 {
                Value::Null
            } else {
                serde_json::json!(r.samples)
            },
            "samples": r.samples.len(), "spread_ns": spread(&r.samples),
        })).collect::<Vec<_>>(),
        "median_ns": {
            "xlb_hit": med("xlb_hit"), "xlb_miss": med("xlb_miss"),
            "ref_hit": med("ref_hit"), "ref_miss": med("ref_miss"),
            "floor_tx": med("floor_tx"),
            "xlb_new": med("xlb_new"), "ref_new": med("ref_new"),
            "xlb_new_full": med("xlb_new_full"), "ref_new_full": med("ref_new_full"),
            "xlb_encap": med("xlb_encap"), "xlb_decap": med("xlb_decap"),
            "floor_once": med("floor_once"), "floor_once_full": med("floor_once_full"),
        },
        "ratios": {
            "vip_hit_xlb_over_limit": ratio("xlb_hit", "ref_hit"),
            "miss_xlb_over_limit": ratio("xlb_miss", "ref_miss"),
            "new_flow_xlb_over_limit": ratio("xlb_new", "ref_new"),
            "new_flow_full_xlb_over_limit": ratio("xlb_new_full", "ref_new_full"),
        },
        "markdown": md,
    })
}

/// Interquartile range of many samples, (p25, p75) in ns; the min and max of a few.
fn spread(samples: &[u64]) -> [u64; 2] {
    let mut v = samples.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => [0, 0],
        n if n > 100 => [v[n / 4], v[n * 3 / 4]],
        n => [v[0], v[n - 1]],
    }
}
