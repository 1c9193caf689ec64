//! The XDP program on hand-built packets, through `BPF_PROG_TEST_RUN` (needs root).
//!
//! Every packet is built byte by byte (`xlb_lab::packets`), checksums computed from scratch; every
//! verdict is checked against what `ebpf/xlb-ebpf` documents, together with the
//! `xlb_reasons` counter it must (or must not) bump. A passed packet is either
//! byte-for-byte the input or a DNAT of it: only destination address, destination
//! port and the two checksums differ, and both checksums verify from scratch.
//!
//! `xdp_fast_path_cost` (ignored) prints ns/packet for the paths that matter:
//! `cargo test --release -p xlb --test xdp_packets -- --ignored --nocapture xdp_fast_path_cost`;
//! `tunnel_path_cost` (ignored) does the same for the Cluster tunnel's two ends.
// Test helpers outside `#[test]` functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use xlb::{
    dataplane::{
        DataplaneError,
        state::{backend_value, service_key},
        testrun::{BASELINE_PROG, RunResult, TestBed},
    },
    desired::VipKey,
    model::Protocol,
};
use xlb_common::{
    Counter, FlowKey4, PROTO_TCP, PROTO_UDP, Reason, SVC_F_LOCAL, Service, ServiceKey4,
    flow_hash_v4, names,
};
use xlb_lab::{Netns, packets::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT: [u8; 4] = [10, 0, 0, 2];
const VIP: [u8; 4] = [10, 0, 100, 1];
const OTHER: [u8; 4] = [10, 0, 100, 2];
const BE1: [u8; 4] = [10, 0, 1, 11];
const BE2: [u8; 4] = [10, 0, 1, 12];
const TCP_BACKENDS: [([u8; 4], u16); 2] = [(BE1, 8080), (BE2, 8080)];
const UDP_BACKENDS: [([u8; 4], u16); 2] = [(BE1, 5353), (BE2, 5353)];

/// Asserts `out` is `input` DNATed to one of `backends` (only dst, dport and the two
/// checksums changed, both checksums valid) and returns the backend chosen.
fn assert_dnat(input: &[u8], out: &RunResult, backends: &[([u8; 4], u16)]) -> ([u8; 4], u16) {
    assert_eq!(out.retval, XDP_PASS, "verdict for {}", hex(input));
    assert!(
        ip_csum_ok(input) && l4_csum_ok(input),
        "test input has a bad checksum"
    );
    let o = &out.data;
    assert_eq!(o.len(), input.len(), "length changed");
    // Marked for xlb_tc_ingress, which delivers it into the pod's namespace: in XDP
    // metadata, or in the hand-off slot where the kernel refuses metadata.
    let deliver = xlb_common::ResolveMeta {
        magic: xlb_common::DELIVER_MAGIC,
        ..Default::default()
    };
    assert_eq!(out.handoff, Some(deliver), "hand-off to TC");
    let dst: [u8; 4] = o[IP_DST..IP_DST + 4].try_into().unwrap();
    let dport = u16::from_be_bytes([o[DPORT], o[DPORT + 1]]);
    assert!(
        backends.contains(&(dst, dport)),
        "rewritten to {dst:?}:{dport}, not a backend\n in:  {}\n out: {}",
        hex(input),
        hex(o)
    );
    let l4_csum = if input[ETH_LEN + 9] == PROTO_TCP {
        TCP_CSUM
    } else {
        UDP_CSUM
    };
    let changed = [
        IP_CSUM..IP_CSUM + 2,
        IP_DST..IP_DST + 4,
        DPORT..DPORT + 2,
        l4_csum..l4_csum + 2,
    ];
    for (i, (a, b)) in input.iter().zip(o).enumerate() {
        if !changed.iter().any(|r| r.contains(&i)) {
            assert_eq!(
                a,
                b,
                "byte {i} changed\n in:  {}\n out: {}",
                hex(input),
                hex(o)
            );
        }
    }
    assert!(ip_csum_ok(o), "IP checksum invalid after DNAT: {}", hex(o));
    assert!(l4_csum_ok(o), "L4 checksum invalid after DNAT: {}", hex(o));
    (dst, dport)
}

fn assert_untouched(name: &str, input: &[u8], out: &RunResult) {
    assert_eq!(out.retval, XDP_PASS, "{name}: verdict for {}", hex(input));
    assert_eq!(out.data, input, "{name}: passed modified");
}

// ---------------------------------------------------------------------------------
// Programming services the way the agent encodes them (dataplane::state).

fn sa(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)
}

/// Programs service `id` for VIP:port/proto with `backends` (see [`TestBed::program`]).
fn program(
    bed: &mut TestBed,
    id: u32,
    (vip, port, protocol): ([u8; 4], u16, Protocol),
    backends: &[([u8; 4], u16)],
) -> Vec<u32> {
    let key = VipKey {
        addr: IpAddr::V4(Ipv4Addr::from(vip)),
        port,
        protocol,
    };
    let addrs: Vec<SocketAddr> = backends.iter().map(|(a, p)| sa(*a, *p)).collect();
    bed.program(id, &key, &addrs, SVC_F_LOCAL).unwrap()
}

/// A test bed with TCP VIP:80 and UDP VIP:53, two backends each.
fn bed_with_services() -> TestBed {
    let mut bed = TestBed::load().expect("load the embedded object (needs root)");
    program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &TCP_BACKENDS);
    program(&mut bed, 2, (VIP, 53, Protocol::Udp), &UDP_BACKENDS);
    bed
}

/// The backend slot the flow hash picks (what `lb::select` does for a new flow).
fn hashed<T: Copy>(sport: u16, dport: u16, proto: u8, backends: &[T]) -> T {
    let h = flow_hash_v4(
        u32::from_be_bytes(CLIENT),
        u32::from_be_bytes(VIP),
        sport,
        dport,
        proto,
    );
    backends[(h % backends.len() as u32) as usize]
}

fn flow_key(sport: u16, dport: u16, proto: u8) -> FlowKey4 {
    FlowKey4 {
        src: CLIENT,
        dst: VIP,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        pad: [0; 3],
    }
}

/// Runs `xlb_xdp` and returns the result and how each reason counter moved.
/// Runs the XDP program once; returns the result and the reason counters it moved.
/// `ct_created` is not a verdict and is left out (conntrack_keeps_a_flow_on_its_backend
/// checks it).
fn run(bed: &TestBed, pkt: &[u8]) -> (RunResult, Vec<(Reason, u64)>) {
    let before = bed.reason_counts().unwrap();
    let out = bed.run(names::XDP_PROG, pkt, 1).unwrap();
    let after = bed.reason_counts().unwrap();
    let moved = Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        // How the packet was handed to TC (metadata or the slot, per kernel) is
        // asserted by `assert_dnat` and `hand_off_without_metadata_uses_the_slot`.
        .filter(|(r, (b, a))| a != b && **r != Reason::CtCreated && **r != Reason::HandoffSlot)
        .map(|(r, (b, a))| (*r, a - b))
        .collect();
    (out, moved)
}

/// With XDP metadata off (as on a kernel that refuses `bpf_xdp_adjust_meta`, or a
/// driver without a metadata area), a DNATed packet is handed to TC through the
/// per-CPU slot: no metadata, the slot holds the hand-off and the packet's first
/// bytes, and the fallback is counted.
#[test]
fn hand_off_without_metadata_uses_the_slot() {
    let mut bed = TestBed::load_with(xlb::dataplane::object(), false).expect("load (needs root)");
    program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &TCP_BACKENDS);
    let pkt = tcp_syn(CLIENT, VIP, 40_000, 80);
    let before = bed.reason_counts().unwrap();
    let out = bed.run(names::XDP_PROG, &pkt, 1).unwrap();
    let after = bed.reason_counts().unwrap();
    assert!(out.meta.is_empty(), "metadata written: {:?}", out.meta);
    assert_dnat(&pkt, &out, &TCP_BACKENDS);
    let slot = Reason::HandoffSlot as usize;
    assert_eq!(after[slot] - before[slot], 1, "handoff_slot counted once");
}

// ---------------------------------------------------------------------------------
// VIP traffic.

#[test]
fn tcp_syn_to_vip_is_dnated_to_the_hashed_backend() {
    let bed = bed_with_services();
    let mut seen = [Counter::default(); 2];
    for sport in 40_000..40_064 {
        let pkt = tcp_syn(CLIENT, VIP, sport, 80);
        let (out, moved) = run(&bed, &pkt);
        let be = assert_dnat(&pkt, &out, &TCP_BACKENDS);
        assert_eq!(be, hashed(sport, 80, PROTO_TCP, &TCP_BACKENDS));
        assert_eq!(moved, vec![(Reason::FwdNewFlow, 1)]);
        let c = &mut seen[usize::from(be.0 == BE2)];
        c.packets += 1;
        c.bytes += pkt.len() as u64;
    }
    assert!(
        seen.iter().all(|c| c.packets > 0),
        "64 flows all on one backend: {seen:?}"
    );
    // Per-service and per-backend traffic counters (what /metrics exports).
    let total = Counter {
        packets: 64,
        bytes: seen[0].bytes + seen[1].bytes,
    };
    assert_eq!(bed.service_counter(1).unwrap(), Some(total));
    assert_eq!(bed.backend_counter(101).unwrap(), Some(seen[0]));
    assert_eq!(bed.backend_counter(102).unwrap(), Some(seen[1]));
    assert_eq!(bed.service_counter(2).unwrap(), Some(Counter::default()));

    // A bare ACK (54 bytes) Ethernet-padded to 60: the padding must stay untouched
    // and outside the checksum.
    let src = CLIENT;
    let seg = tcp_seg(src, VIP, (40_100, 80), ACK, 5, &[], &[]);
    let mut pkt = Ip4::new(src, VIP, PROTO_TCP).frame(&seg);
    pkt.extend_from_slice(&[0xaa; 6]);
    assert_eq!(pkt.len(), 60);
    let (out, _) = run(&bed, &pkt);
    assert_dnat(&pkt, &out, &TCP_BACKENDS);
    assert_eq!(out.data[54..], [0xaa; 6]);
}

#[test]
fn udp_to_vip_is_dnated_and_checksums_stay_valid() {
    let bed = bed_with_services();
    // Ordinary datagrams, odd and even payload lengths.
    for (sport, payload) in [(50_000u16, &b"query"[..]), (50_001, b"four"), (50_002, b"")] {
        let pkt = udp(CLIENT, VIP, sport, 53, payload);
        let (out, moved) = run(&bed, &pkt);
        let be = assert_dnat(&pkt, &out, &UDP_BACKENDS);
        assert_eq!(be, hashed(sport, 53, PROTO_UDP, &UDP_BACKENDS));
        assert_eq!(moved, vec![(Reason::FwdNewFlow, 1)]);
    }

    // Checksum 0 (none, RFC 768) stays 0.
    let mut ip = Ip4::new(CLIENT, VIP, PROTO_UDP);
    ip.frags = 0;
    let pkt = ip.frame(&udp_dgram(
        CLIENT,
        VIP,
        (50_010, 53),
        b"nocsum",
        None,
        false,
    ));
    let (out, _) = run(&bed, &pkt);
    assert_dnat(&pkt, &out, &UDP_BACKENDS);
    assert_eq!(
        out.data[UDP_CSUM..UDP_CSUM + 2],
        [0, 0],
        "checksum 0 must stay 0"
    );

    // A datagram whose checksum after DNAT computes to 0 must carry 0xffff (RFC 768):
    // pick the payload word that makes it so.
    let sport = 50_020;
    let (be, bport) = hashed(sport, 53, PROTO_UDP, &UDP_BACKENDS);
    let w = (0..=u16::MAX)
        .find(|w| {
            let d = udp_dgram(CLIENT, be, (sport, bport), &w.to_be_bytes(), None, false);
            let mut all = pseudo(CLIENT, be, PROTO_UDP, d.len());
            all.extend_from_slice(&d);
            checksum(&all) == 0
        })
        .unwrap();
    let pkt = udp(CLIENT, VIP, sport, 53, &w.to_be_bytes());
    let (out, _) = run(&bed, &pkt);
    assert_dnat(&pkt, &out, &UDP_BACKENDS);
    assert_eq!(out.data[UDP_CSUM..UDP_CSUM + 2], [0xff, 0xff]);

    // Trailing bytes after the UDP length (inside the IP payload) are not the
    // datagram's: allowed, rewritten, left alone.
    let mut ip = Ip4::new(CLIENT, VIP, PROTO_UDP);
    ip.frags = 0;
    let pkt = ip.frame(&udp_dgram(
        CLIENT,
        VIP,
        (50_030, 53),
        b"abcdef",
        Some(10),
        true,
    ));
    let (out, _) = run(&bed, &pkt);
    assert_dnat(&pkt, &out, &UDP_BACKENDS);
}

#[test]
fn conntrack_keeps_a_flow_on_its_backend() {
    let mut bed = bed_with_services();
    let sport = 41_000;
    let pkt = tcp_syn(CLIENT, VIP, sport, 80);
    let created = |bed: &TestBed| bed.reason_count(Reason::CtCreated).unwrap();
    let c0 = created(&bed);
    let (first, _) = run(&bed, &pkt);
    assert_eq!(created(&bed), c0 + 1, "a new flow creates one entry");
    let be = assert_dnat(&pkt, &first, &TCP_BACKENDS);
    let slot = TCP_BACKENDS.iter().position(|b| *b == be).unwrap();
    let ct = bed
        .conntrack
        .get(&flow_key(sport, 80, PROTO_TCP), 0)
        .unwrap();
    assert_eq!((ct.backend_id, ct.service_id), (101 + slot as u32, 1));
    assert_eq!(ct.backend, backend_value(&sa(be.0, be.1)));

    // Point every slot at the other backend: the tracked flow must not move.
    let other = 101 + (1 - slot as u32);
    bed.set_table(2, &[other, other]).unwrap();
    for _ in 0..3 {
        let (again, moved) = run(&bed, &pkt);
        assert_eq!(
            again,
            RunResult {
                duration_ns: again.duration_ns,
                ..first.clone()
            }
        );
        assert_eq!(moved, vec![(Reason::FwdConntrack, 1)]);
    }
    assert_eq!(created(&bed), c0 + 1, "conntrack hits create nothing");
    // ... while a new flow follows the table.
    let fresh = tcp_syn(CLIENT, VIP, sport + 1, 80);
    let (out, _) = run(&bed, &fresh);
    assert_eq!(
        assert_dnat(&fresh, &out, &TCP_BACKENDS),
        TCP_BACKENDS[1 - slot]
    );

    // The tracked backend is removed: the flow is re-balanced (counted), never
    // sent to a stale address.
    bed.backends.remove(&(101 + slot as u32)).unwrap();
    let (out, moved) = run(&bed, &pkt);
    assert_eq!(
        assert_dnat(&pkt, &out, &TCP_BACKENDS),
        TCP_BACKENDS[1 - slot]
    );
    assert_eq!(
        moved,
        vec![(Reason::FwdNewFlow, 1), (Reason::CtStaleBackend, 1)]
    );
    // Two new flows so far (the fresh one and the first); the stale entry was replaced.
    assert_eq!(created(&bed), c0 + 2, "a replaced entry is not a new one");
}

#[test]
fn service_without_backends_drops() {
    let mut bed = TestBed::load().unwrap();
    program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &[]);
    let pkt = tcp_syn(CLIENT, VIP, 42_000, 80);
    let (out, moved) = run(&bed, &pkt);
    assert_eq!(out.retval, XDP_DROP);
    assert_eq!(moved, vec![(Reason::DropNoBackend, 1)]);

    // A table whose slots are missing (the agent mid-update, in theory): dropped
    // and counted, not passed to the VIP.
    program(&mut bed, 3, (VIP, 443, Protocol::Tcp), &TCP_BACKENDS);
    bed.maglev.remove(&6).unwrap();
    let pkt = tcp_syn(CLIENT, VIP, 42_001, 443);
    let (out, moved) = run(&bed, &pkt);
    assert_eq!(out.retval, XDP_DROP);
    assert_eq!(moved, vec![(Reason::DropTableMiss, 1)]);
}

#[test]
fn datapath_events_are_off_by_default_then_logged_rate_limited_and_off_again() {
    use xlb_common::datapath_log::{ERROR, LINES_PER_WINDOW, OFF, WARN};
    let mut bed = TestBed::load().unwrap();
    program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &[]);
    let pkt = tcp_syn(CLIENT, VIP, 42_000, 80);
    let (out, moved) = run(&bed, &pkt);
    assert_eq!(out.retval, XDP_DROP);
    assert_eq!(moved, vec![(Reason::DropNoBackend, 1)]);
    assert_eq!(bed.events(), Vec::<String>::new(), "off by default");

    // A misconfiguration drop is a warning: not logged at `error`.
    bed.set_datapath_log(ERROR).unwrap();
    assert_eq!(bed.run(names::XDP_PROG, &pkt, 20).unwrap().retval, XDP_DROP);
    assert_eq!(
        bed.events(),
        Vec::<String>::new(),
        "drop_no_backend at error"
    );

    // At `warn`: logged with reason and addresses, and the per-CPU limit holds
    // (200 runs on one CPU take microseconds: one window, or two at a boundary).
    bed.set_datapath_log(WARN).unwrap();
    let before = bed.reason_count(Reason::DropNoBackend).unwrap();
    let out = bed.run(names::XDP_PROG, &pkt, 200).unwrap();
    assert_eq!(
        out.retval, XDP_DROP,
        "xlb_events returns the caller's verdict"
    );
    assert_eq!(
        bed.reason_count(Reason::DropNoBackend).unwrap() - before,
        200,
        "every drop is counted, logged or not"
    );
    let events = bed.events();
    assert!(
        !events.is_empty() && events.len() as u64 <= 2 * LINES_PER_WINDOW,
        "{} lines: {events:?}",
        events.len()
    );
    assert_eq!(
        events[0],
        "WARN xlb::datapath: drop_no_backend tcp 10.0.0.2:42000 -> 10.0.100.1:80: the service has no backend"
    );

    bed.set_datapath_log(OFF).unwrap();
    assert_eq!(bed.run(names::XDP_PROG, &pkt, 50).unwrap().retval, XDP_DROP);
    assert_eq!(bed.events(), Vec::<String>::new(), "off again");
}

// ---------------------------------------------------------------------------------
// Everything else passes untouched.

#[test]
fn non_vip_traffic_passes_untouched() {
    let bed = bed_with_services();
    let arp = {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 0x02];
        a.extend_from_slice(&CLIENT);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&VIP);
        eth(0x0806, &a)
    };
    let ipv6 = {
        let mut h = vec![0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64];
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN]);
        h.extend_from_slice(&[0xfa, 0xf0, 0x12, 0x34, 0, 0]);
        eth(0x86dd, &h)
    };
    let vlan = {
        let inner = tcp_syn(CLIENT, VIP, 43_000, 80);
        let mut f = inner[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        f.extend_from_slice(&inner[12..]);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("TCP to another address", tcp_syn(CLIENT, OTHER, 43_001, 80)),
        (
            "TCP to the VIP, another port",
            tcp_syn(CLIENT, VIP, 43_002, 81),
        ),
        (
            "TCP to the UDP service's port",
            tcp_syn(CLIENT, VIP, 43_003, 53),
        ),
        (
            "UDP to the TCP service's port",
            udp(CLIENT, VIP, 43_004, 80, b"x"),
        ),
        (
            "UDP to another address",
            udp(CLIENT, OTHER, 43_005, 53, b"x"),
        ),
        ("reply from a backend", tcp_syn(BE1, CLIENT, 8080, 43_006)),
        ("ICMP to the VIP", {
            let icmp = [8, 0, 0xf7, 0xfe, 0, 1, 0, 0];
            Ip4::new(CLIENT, VIP, 1).frame(&icmp)
        }),
        ("ARP request for the VIP", arp),
        ("IPv6 TCP", ipv6),
        ("802.1Q-tagged TCP to the VIP (not parsed)", vlan),
    ];
    for (name, pkt) in cases {
        let (out, moved) = run(&bed, &pkt);
        assert_untouched(name, &pkt, &out);
        assert_eq!(moved, vec![], "{name}: counted");
    }
}

// ---------------------------------------------------------------------------------
// Malformed corpus (issue 11, item 7).

#[derive(Debug)]
enum Expect {
    /// XDP_PASS, bytes unchanged, these reasons counted (none or one).
    Untouched(Option<Reason>),
    /// XDP_DROP, counted.
    Drop(Reason),
    /// XDP_PASS as a valid DNAT (see `assert_dnat`); counted as a new flow.
    Dnat,
}

#[test]
fn malformed_corpus() {
    use Expect::*;
    use Reason::*;
    let bed = bed_with_services();
    let syn = |sport| tcp_syn(CLIENT, VIP, sport, 80);
    let dgram = |sport| udp(CLIENT, VIP, sport, 53, b"hello");
    let cut = |mut p: Vec<u8>, n: usize| {
        p.truncate(n);
        p
    };
    let tcp_with = |sport: u16, ip: Ip4, doff: u8, opts: &[u8]| {
        ip.frame(&tcp_seg(CLIENT, VIP, (sport, 80), SYN, doff, opts, &[]))
    };
    let ip_t = || Ip4::new(CLIENT, VIP, PROTO_TCP);
    let ip_u = || {
        let mut i = Ip4::new(CLIENT, VIP, PROTO_UDP);
        i.frags = 0;
        i
    };
    let udp_with = |sport: u16, ip: Ip4, payload: &[u8], len: Option<u16>| {
        ip.frame(&udp_dgram(CLIENT, VIP, (sport, 53), payload, len, true))
    };

    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        // Truncated headers.
        // What ip_rcv would drop is dropped, counted.
        (
            "Ethernet header only",
            eth(0x0800, &[]),
            Drop(DropMalformedIp),
        ),
        (
            "IPv4 header cut at 19 bytes",
            cut(syn(44_000), 33),
            Drop(DropMalformedIp),
        ),
        (
            "IPv4 header only, TCP to the VIP",
            cut(syn(44_001), 34),
            Untouched(None),
        ),
        (
            "TCP cut inside the ports (3 bytes)",
            cut(syn(44_002), 37),
            Untouched(None),
        ),
        (
            "TCP cut after the ports (4 bytes)",
            cut(syn(44_003), 38),
            Drop(DropMalformedL4),
        ),
        (
            "TCP cut at 19 bytes",
            cut(syn(44_004), 53),
            Drop(DropMalformedL4),
        ),
        (
            "UDP cut inside the ports (3 bytes)",
            cut(dgram(44_005), 37),
            Untouched(None),
        ),
        (
            "UDP cut at 7 bytes",
            cut(dgram(44_006), 41),
            Drop(DropMalformedL4),
        ),
        // Header lengths.
        (
            "IHL 4",
            {
                let mut i = ip_t();
                i.vihl = 0x44;
                tcp_with(44_010, i, 5, &[])
            },
            Drop(DropMalformedIp),
        ),
        (
            "IHL 0",
            {
                let mut i = ip_t();
                i.vihl = 0x40;
                tcp_with(44_011, i, 5, &[])
            },
            Drop(DropMalformedIp),
        ),
        (
            "IP version 6 in an IPv4 frame",
            {
                let mut i = ip_t();
                i.vihl = 0x65;
                tcp_with(44_012, i, 5, &[])
            },
            Drop(DropMalformedIp),
        ),
        (
            "IHL 6 (router alert option) to the VIP",
            {
                let mut i = ip_t();
                i.vihl = 0x46;
                i.options = vec![0x94, 0x04, 0, 0];
                tcp_with(44_013, i, 5, &[])
            },
            Untouched(Some(PassIpOptions)),
        ),
        (
            "IHL 15 (NOP options) to the VIP, UDP",
            {
                let mut i = ip_u();
                i.vihl = 0x4f;
                i.options = vec![1; 40];
                udp_with(44_014, i, b"x", None)
            },
            Untouched(Some(PassIpOptions)),
        ),
        (
            "bad IPv4 header checksum to the VIP",
            {
                let mut p = syn(44_015);
                p[IP_CSUM] ^= 0x5a;
                p
            },
            Drop(DropMalformedIp),
        ),
        // Fragments.
        (
            "first fragment (MF) to the VIP",
            {
                let mut i = ip_u();
                i.frags = 0x2000;
                udp_with(44_020, i, &[7; 64], Some(1400))
            },
            Untouched(Some(PassFragment)),
        ),
        (
            "non-first fragment to the VIP",
            {
                // Payload bytes that read like ports 44021 -> 53, as a later fragment's
                // data may by chance.
                let mut i = ip_u();
                i.frags = 185;
                udp_with(44_021, i, &[7; 64], None)
            },
            Untouched(Some(PassFragment)),
        ),
        (
            "last fragment (offset, no MF), TCP",
            {
                let mut i = ip_t();
                i.frags = 0x4000 | 0x0010;
                tcp_with(44_022, i, 5, &[])
            },
            Untouched(Some(PassFragment)),
        ),
        // UDP length.
        (
            "UDP length 0",
            udp_with(44_030, ip_u(), b"hello", Some(0)),
            Drop(DropMalformedL4),
        ),
        (
            "UDP length 7",
            udp_with(44_031, ip_u(), b"hello", Some(7)),
            Drop(DropMalformedL4),
        ),
        (
            "UDP length beyond the IP payload",
            udp_with(44_032, ip_u(), b"hello", Some(14)),
            Drop(DropMalformedL4),
        ),
        (
            "UDP length 8, empty",
            udp_with(44_033, ip_u(), b"", None),
            Dnat,
        ),
        // TCP data offset.
        (
            "TCP data offset 4",
            tcp_with(44_040, ip_t(), 4, &[]),
            Drop(DropMalformedL4),
        ),
        (
            "TCP data offset 0",
            tcp_with(44_041, ip_t(), 0, &[]),
            Drop(DropMalformedL4),
        ),
        // A data offset past the segment: the kernel's TCP input would discard it
        // (`!pskb_may_pull(skb, th->doff * 4)`), so the program drops it first.
        (
            "TCP data offset 15, 20-byte header",
            tcp_with(44_042, ip_t(), 15, &[]),
            Drop(DropMalformedL4),
        ),
        // IPv4 total length.
        (
            "UDP, tot_len 10 (< IHL)",
            {
                let mut i = ip_u();
                i.tot_len = Some(10);
                udp_with(44_050, i, b"hello", None)
            },
            Drop(DropMalformedL4),
        ),
        (
            "UDP, tot_len shorter than the UDP length",
            {
                let mut i = ip_u();
                i.tot_len = Some(30);
                udp_with(44_051, i, b"hello", None)
            },
            Drop(DropMalformedL4),
        ),
        // tot_len is checked against the frame, as ip_rcv does.
        (
            "TCP, tot_len beyond the frame",
            {
                let mut i = ip_t();
                i.tot_len = Some(1500);
                tcp_with(44_052, i, 5, &[])
            },
            Drop(DropMalformedL4),
        ),
        (
            "TCP, tot_len 10 (< IHL)",
            {
                let mut i = ip_t();
                i.tot_len = Some(10);
                tcp_with(44_053, i, 5, &[])
            },
            Drop(DropMalformedL4),
        ),
        (
            "UDP, tot_len and UDP length beyond the frame",
            {
                let mut i = ip_u();
                i.tot_len = Some(1000);
                udp_with(44_054, i, b"hello", Some(980))
            },
            Drop(DropMalformedL4),
        ),
    ];

    for (name, pkt, expect) in cases {
        let (out, moved) = run(&bed, &pkt);
        match expect {
            Untouched(reason) => {
                assert_untouched(name, &pkt, &out);
                let want: Vec<_> = reason.into_iter().map(|r| (r, 1)).collect();
                assert_eq!(moved, want, "{name}: reasons");
            }
            Drop(reason) => {
                assert_eq!(out.retval, XDP_DROP, "{name}: verdict");
                assert_eq!(moved, vec![(reason, 1)], "{name}: reasons");
            }
            Dnat => {
                assert_dnat(&pkt, &out, &[TCP_BACKENDS, UDP_BACKENDS].concat());
                assert_eq!(moved, vec![(FwdNewFlow, 1)], "{name}: reasons");
            }
        }
    }

    // Shorter than an Ethernet header: the kernel refuses to run the program at all.
    let runt = vec![0u8; 13];
    match bed.run(names::XDP_PROG, &runt, 1) {
        Err(DataplaneError::Program { .. }) => {}
        other => panic!("13-byte frame: expected EINVAL from the kernel, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Cost.

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// ns/packet of the fast paths next to an XDP_PASS program, via BPF_PROG_TEST_RUN.
///
/// - repeat=N (N chosen for ~1 s per run, median of 5 interleaved runs): the kernel
///   runs the program N times on the same buffer and reports the average. A DNATed
///   packet would stop being VIP traffic after the first run, so the CT-hit case uses
///   a service whose backend is VIP:port itself: the rewrite is done in full but is
///   the identity, and every run after the first is a conntrack hit.
/// - repeat=1 (median of 2,000 runs): includes the kernel's timer overhead; the only
///   way to measure a new flow, each run with a fresh source port.
#[test]
#[ignore = "measurement; prints a table, asserts nothing about time"]
fn xdp_fast_path_cost() {
    let mut bed = TestBed::load().unwrap();
    program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &[(VIP, 80)]);
    let small_tcp = |dst, sport| {
        let ip = Ip4::new(CLIENT, dst, PROTO_TCP);
        ip.frame(&tcp_seg(
            CLIENT,
            dst,
            (sport, 80),
            ACK,
            5,
            &[],
            b"0123456789abcdef",
        ))
    };
    let hit = small_tcp(VIP, 1000);
    let miss = small_tcp(OTHER, 1000);

    let cases: [(&str, &'static str, &[u8]); 3] = [
        ("XDP_PASS baseline", BASELINE_PROG, &miss),
        ("non-VIP miss", names::XDP_PROG, &miss),
        ("VIP, conntrack hit", names::XDP_PROG, &hit),
    ];
    // Create the CT entry, check the identity rewrite, calibrate repeat.
    let out = bed.run(names::XDP_PROG, &hit, 1).unwrap();
    assert_eq!((out.retval, &out.data[..]), (XDP_PASS, &hit[..]));
    let repeats: Vec<u32> = cases
        .iter()
        .map(|&(_, prog, pkt)| {
            let ns = bed.run(prog, pkt, 100_000).unwrap().duration_ns.max(1);
            (1_000_000_000 / ns).clamp(100_000, 50_000_000) as u32
        })
        .collect();
    let mut steady = vec![vec![]; cases.len()];
    for _ in 0..5 {
        for (i, &(_, prog, pkt)) in cases.iter().enumerate() {
            let r = bed.run(prog, pkt, repeats[i]).unwrap();
            assert_eq!(r.retval, XDP_PASS);
            steady[i].push(r.duration_ns);
        }
    }
    let ct_before = bed.reason_count(Reason::FwdConntrack).unwrap();

    // repeat=1, interleaved; the new-flow case uses a fresh source port each time.
    const SINGLE: u16 = 2_000;
    let mut single = vec![vec![]; cases.len() + 1];
    for k in 0..SINGLE {
        for (i, &(_, prog, pkt)) in cases.iter().enumerate() {
            single[i].push(bed.run(prog, pkt, 1).unwrap().duration_ns);
        }
        let fresh = small_tcp(VIP, 10_000 + k);
        let r = bed.run(names::XDP_PROG, &fresh, 1).unwrap();
        assert_eq!(r.data, fresh);
        single[cases.len()].push(r.duration_ns);
    }
    let new_flows = bed.reason_count(Reason::FwdNewFlow).unwrap();
    let ct_hits = bed.reason_count(Reason::FwdConntrack).unwrap() - ct_before;
    assert_eq!(
        new_flows,
        1 + u64::from(SINGLE),
        "every fresh port was a new flow"
    );
    assert_eq!(
        ct_hits,
        u64::from(SINGLE),
        "every repeat=1 VIP run was a CT hit"
    );

    let base_n = median(steady[0].clone());
    let base_1 = median(single[0].clone());
    println!();
    println!("BPF_PROG_TEST_RUN, {}-byte TCP frame", hit.len());
    let head = [
        "path",
        "repeat=N",
        "ns/pkt",
        "+baseline",
        "repeat=1",
        "+baseline",
    ];
    println!(
        "{:<22} {:>12} {:>8} {:>10} {:>10} {:>10}",
        head[0], head[1], head[2], head[3], head[4], head[5]
    );
    for (i, (name, ..)) in cases.iter().enumerate() {
        let n = median(steady[i].clone());
        let one = median(single[i].clone());
        println!(
            "{:<22} {:>12} {:>8} {:>10} {:>10} {:>10}",
            name,
            repeats[i],
            n,
            n as i64 - base_n as i64,
            one,
            one as i64 - base_1 as i64
        );
    }
    let nf = median(single[cases.len()].clone());
    let (name, dash) = ("VIP, new flow", "-");
    println!(
        "{name:<22} {dash:>12} {dash:>8} {dash:>10} {:>10} {:>10}",
        nf,
        nf as i64 - base_1 as i64
    );
    println!("(medians: 5 runs at repeat=N, {SINGLE} runs at repeat=1, interleaved)");
}

/// ns/packet of both ends of the Cluster tunnel (repeat=1 medians next to the
/// XDP_PASS baseline measured the same way: with repeat > 1 the kernel would rerun the
/// program on the already rewritten buffer).
#[test]
#[ignore = "measurement; prints a table, asserts nothing about time"]
fn tunnel_path_cost() {
    // The encapsulating node's FIB lookup needs a route and a neighbour for the other
    // node, and they must not be the machine's own: a namespace of its own, deleted on
    // drop (named `xlb-{pid}-...` so the lab's stale sweep recognizes it).
    let ns = Netns::create(&format!("xlb-{}-cost", std::process::id())).unwrap();
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"])
        .unwrap();
    ns.ip(&["addr", "add", "10.0.0.11/24", "dev", "va"])
        .unwrap();
    ns.ip(&["link", "set", "va", "up"]).unwrap();
    ns.ip(&["link", "set", "vb", "up"]).unwrap();
    // bpf_fib_lookup answers FWD_DISABLED unless the ingress device forwards (as every
    // Kubernetes node's does).
    ns.sysctl("net/ipv4/ip_forward", "1").unwrap();
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
    ])
    .unwrap();
    // BPF_PROG_TEST_RUN looks routes up in the calling thread's namespace.
    ns.enter(|| {
        let mut bed = TestBed::load().unwrap();
        let node_ip = u64::from(u32::from_ne_bytes([10, 0, 0, 11]));
        bed.config
            .set(xlb_common::config::NODE_IP, node_ip, 0)
            .unwrap();
        // VIP:80 has one backend on the other node (10.0.0.12): encapsulated.
        let remote = xlb::dataplane::state::remote_backend_value(
            &sa(BE1, 8080),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12)),
        );
        bed.backends.insert(101, remote, 0).unwrap();
        bed.set_table(2, &[101]).unwrap();
        let key = service_key(&VipKey {
            addr: IpAddr::V4(Ipv4Addr::from(VIP)),
            port: 80,
            protocol: Protocol::Tcp,
        })
        .v4()
        .unwrap();
        let svc = Service {
            id: 1,
            table: 2,
            count: 1,
            flags: 0,
            affinity_secs: 0,
            pad: 0,
        };
        bed.services.insert(key, svc, 0).unwrap();
        bed.create_counters(1, &[101]).unwrap();
        // VIP:81 has a local backend: what arrives decapsulated is DNATed to it.
        program(&mut bed, 2, (VIP, 81, Protocol::Tcp), &[(BE2, 8080)]);

        let tcp = |dport| {
            Ip4::new(CLIENT, VIP, PROTO_TCP).frame(&tcp_seg(
                CLIENT,
                VIP,
                (1000, dport),
                ACK,
                5,
                &[],
                b"0123456789abcdef",
            ))
        };
        let to_encap = tcp(80);
        let inner = tcp(81);
        // The same client packet as another node's xlb sends it: outer IPv4, proto 4.
        let outer = Ip4::new([10, 0, 0, 12], [10, 0, 0, 11], 4).frame(&inner[ETH_LEN..]);
        let first = bed.run(names::XDP_PROG, &to_encap, 1).unwrap();
        assert_eq!(
            first.retval,
            4,
            "XDP_REDIRECT towards the other node; reasons: {:?}",
            Reason::ALL
                .iter()
                .map(|r| (r.label(), bed.reason_count(*r).unwrap()))
                .filter(|(_, n)| *n > 0)
                .collect::<Vec<_>>()
        );
        assert_eq!(first.data.len(), to_encap.len() + 20, "outer header added");
        let d = bed.run(names::XDP_PROG, &outer, 1).unwrap();
        assert_eq!(d.retval, XDP_PASS, "decapsulated and DNATed");
        assert_eq!(d.data.len(), inner.len(), "outer header removed");

        let cases: [(&str, &'static str, &[u8]); 3] = [
            ("XDP_PASS baseline", BASELINE_PROG, &to_encap),
            ("encap (CT hit, FIB, IPIP)", names::XDP_PROG, &to_encap),
            ("decap (+ CT hit, DNAT)", names::XDP_PROG, &outer),
        ];
        let mut runs = vec![vec![]; cases.len()];
        for _ in 0..2_000 {
            for (i, &(_, prog, pkt)) in cases.iter().enumerate() {
                runs[i].push(bed.run(prog, pkt, 1).unwrap().duration_ns);
            }
        }
        let base = median(runs[0].clone());
        println!();
        println!("BPF_PROG_TEST_RUN repeat=1, medians of 2000 interleaved runs");
        for (i, (name, _, pkt)) in cases.iter().enumerate() {
            let m = median(runs[i].clone());
            println!(
                "{name:28} {:>4} B  {m:>6} ns  {:>+6} ns over baseline",
                pkt.len(),
                m as i64 - base as i64
            );
        }
        Ok(())
    })
    .unwrap();
}

/// An ICMP message (type, code, 4 bytes of rest, body) with its checksum.
fn icmp_msg(t: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![t, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

#[test]
fn icmp_errors_about_a_vip_flow_reach_its_backend() {
    let bed = bed_with_services();
    let sport = 45_000;
    // A tracked flow client:45000 -> VIP:53 (UDP).
    let req = udp(CLIENT, VIP, sport, 53, b"q");
    let (out, _) = run(&bed, &req);
    let (be, bport) = assert_dnat(&req, &out, &UDP_BACKENDS);
    // The backend's reply left as VIP:53 -> client:45000 (reverse NAT); a router on
    // the way answers fragmentation-needed (RFC 1191), quoting that reply.
    let reply = udp(VIP, CLIENT, 53, sport, &[9; 64]);
    let quoted = &reply[ETH_LEN..ETH_LEN + 28];
    let router = [10, 0, 0, 254];
    let msg = icmp_msg(3, 4, [0, 0, 0x05, 0xc8], quoted);
    let err = Ip4::new(router, VIP, 1).frame(&msg);
    let (out, moved) = run(&bed, &err);
    assert_eq!(out.retval, XDP_PASS);
    assert_eq!(moved, vec![(Reason::IcmpErrorNat, 1)]);
    let f = &out.data;
    assert_eq!(&f[IP_DST..IP_DST + 4], &be, "delivered to the backend");
    assert!(ip_csum_ok(f), "outer IP checksum");
    let icmp = &f[L4..];
    assert_eq!(
        checksum(icmp),
        0,
        "ICMP checksum over the translated message"
    );
    let q = &icmp[8..];
    assert_eq!(&q[12..16], &be, "quoted source is the backend");
    assert_eq!(
        u16::from_be_bytes([q[20], q[21]]),
        bport,
        "quoted source port"
    );
    assert_eq!(&q[16..20], &CLIENT, "quoted destination unchanged");
    assert_eq!(checksum(&q[..20]), 0, "quoted IP header checksum");

    // An error quoting a flow nobody tracks is left alone, counted as ICMP to a VIP.
    let stranger = udp(VIP, CLIENT, 53, 45_999, b"?");
    let msg = icmp_msg(3, 3, [0; 4], &stranger[ETH_LEN..ETH_LEN + 28]);
    let err = Ip4::new(CLIENT, VIP, 1).frame(&msg);
    let (out, moved) = run(&bed, &err);
    assert_untouched("unknown flow", &err, &out);
    assert_eq!(moved, vec![(Reason::PassIcmpVip, 1)]);
}

#[test]
fn icmp_echo_to_a_vip_is_counted_and_passed() {
    let mut bed = bed_with_services();
    // The agent writes one (VIP, 0, ICMP) key per VIP address.
    let key = ServiceKey4 {
        addr: VIP,
        port: 0,
        proto: 1,
        pad: 0,
    };
    bed.services.insert(key, Service::default(), 0).unwrap();
    let echo = Ip4::new(CLIENT, VIP, 1).frame(&icmp_msg(8, 0, [0, 1, 0, 1], b"ping"));
    let (out, moved) = run(&bed, &echo);
    assert_untouched("echo to the VIP", &echo, &out);
    assert_eq!(moved, vec![(Reason::PassIcmpVip, 1)]);
    // Echo to another address costs nothing and counts nothing.
    let other = Ip4::new(CLIENT, OTHER, 1).frame(&icmp_msg(8, 0, [0, 1, 0, 1], b"ping"));
    let (out, moved) = run(&bed, &other);
    assert_untouched("echo elsewhere", &other, &out);
    assert!(moved.is_empty());
}

// ---------------------------------------------------------------------------------
// Replies (TC egress).

/// `xlb_tc_egress` on `reply`: the packet as it leaves.
fn egress(bed: &TestBed, reply: &[u8]) -> Vec<u8> {
    let out = bed.run(names::TC_EGRESS_PROG, reply, 1).unwrap();
    assert_eq!(out.retval, 0, "TC_ACT_OK");
    out.data
}

/// Source address and port of frame `f`.
fn source(f: &[u8]) -> ([u8; 4], u16) {
    let a = &f[ETH_LEN + 12..ETH_LEN + 16];
    (
        [a[0], a[1], a[2], a[3]],
        u16::from_be_bytes([f[L4], f[L4 + 1]]),
    )
}

#[test]
fn replies_come_from_the_vip_their_flow_was_sent_to() {
    let mut bed = TestBed::load().expect("load the embedded object (needs root)");
    // One backend behind two VIP:ports: the first to reach it becomes its reverse-NAT
    // hint, flows through the other record their own reverse NAT.
    program(&mut bed, 1, (VIP, 53, Protocol::Udp), &[(BE1, 5353)]);
    program(&mut bed, 2, (OTHER, 54, Protocol::Udp), &[(BE1, 5353)]);
    let send = |bed: &TestBed, dst: [u8; 4], sport: u16, dport: u16| {
        let req = udp(CLIENT, dst, sport, dport, b"q");
        let (out, _) = run(bed, &req);
        assert_eq!(out.retval, XDP_PASS);
        assert_eq!(assert_dnat(&req, &out, &[(BE1, 5353)]), (BE1, 5353));
    };
    send(&bed, VIP, 1000, 53);
    send(&bed, OTHER, 1001, 54);
    send(&bed, VIP, 1002, 53);
    for (cport, from) in [(1000, (VIP, 53)), (1001, (OTHER, 54)), (1002, (VIP, 53))] {
        let before = bed.reason_count(Reason::RevNat).unwrap();
        let out = egress(&bed, &udp(BE1, CLIENT, 5353, cport, b"a"));
        assert_eq!(source(&out), from, "reply to client port {cport}");
        assert!(
            ip_csum_ok(&out) && l4_csum_ok(&out),
            "checksums of {}",
            hex(&out)
        );
        assert_eq!(bed.reason_count(Reason::RevNat).unwrap(), before + 1);
    }
    // The backend talking to the client outside any DNATed flow: left alone.
    let stray = udp(BE1, CLIENT, 5353, 1003, b"a");
    assert_eq!(egress(&bed, &stray), stray);
    let stray = udp(BE1, CLIENT, 5354, 1000, b"a");
    assert_eq!(egress(&bed, &stray), stray);
}

// ARP for owned VIPs (L2 announcement).

const XDP_TX: u32 = 3;
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x02];
const NODE_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 0x01];

/// An Ethernet/IPv4 ARP packet (RFC 826) from `sha`/`spa` about `tpa`, padded to
/// Ethernet's 60-byte minimum as a NIC would deliver it.
fn arp(
    oper: u16,
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut f = eth_dst.to_vec();
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&oper.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn who_has(vip: [u8; 4]) -> Vec<u8> {
    arp(1, [0xff; 6], CLIENT_MAC, CLIENT, [0; 6], vip)
}

/// A test bed owning `VIP` with a dead-man deadline `ahead_ns` from now (0: expired).
fn bed_owning_vip(ahead_ns: u64) -> TestBed {
    let mut bed = TestBed::load().expect("load the embedded object (needs root)");
    let key = u32::from_ne_bytes(VIP);
    let value = xlb_common::L2Vip {
        mac: NODE_MAC,
        pad: [0; 2],
    };
    bed.l2_vips.insert(key, value, 0).unwrap();
    let ncpus = aya::util::nr_cpus().unwrap();
    bed.l2_stats
        .insert(
            key,
            aya::maps::PerCpuValues::try_from(vec![0u64; ncpus]).unwrap(),
            0,
        )
        .unwrap();
    let deadline = if ahead_ns == 0 {
        1
    } else {
        xlb::dataplane::conntrack::monotonic_ns() + ahead_ns
    };
    bed.config
        .set(xlb_common::config::L2_DEADLINE, deadline, 0)
        .unwrap();
    bed
}

fn arp_replies(bed: &TestBed, vip: [u8; 4]) -> u64 {
    bed.l2_stats
        .get(&u32::from_ne_bytes(vip), 0)
        .map(|v| v.iter().sum())
        .unwrap_or(0)
}

#[test]
fn arp_request_for_an_owned_vip_is_answered_in_place() {
    let bed = bed_owning_vip(60_000_000_000);
    let req = who_has(VIP);
    let (out, moved) = run(&bed, &req);
    assert_eq!(out.retval, XDP_TX, "verdict for {}", hex(&req));
    // The reply RFC 826 prescribes, to the requester, padding kept.
    let want = arp(2, CLIENT_MAC, NODE_MAC, VIP, CLIENT_MAC, CLIENT);
    assert_eq!(
        out.data,
        want,
        "\n got:  {}\n want: {}",
        hex(&out.data),
        hex(&want)
    );
    assert_eq!(moved, vec![(Reason::ArpReply, 1)]);
    assert_eq!(arp_replies(&bed, VIP), 1);
    // An RFC 5227 probe (sender 0.0.0.0) is answered too: that is how a host
    // learns the address is taken.
    let probe = arp(1, [0xff; 6], CLIENT_MAC, [0; 4], [0; 6], VIP);
    let (out, _) = run(&bed, &probe);
    assert_eq!(out.retval, XDP_TX);
    assert_eq!(&out.data[28..32], &VIP, "sender protocol address");
    assert_eq!(arp_replies(&bed, VIP), 2);
}

#[test]
fn arp_not_for_an_owned_vip_goes_to_the_kernel_untouched() {
    let bed = bed_owning_vip(60_000_000_000);
    let cases = [
        ("request for another address", who_has(OTHER)),
        (
            "reply about the VIP",
            arp(2, NODE_MAC, CLIENT_MAC, CLIENT, NODE_MAC, VIP),
        ),
        (
            "another node's announcement of the VIP",
            arp(1, [0xff; 6], CLIENT_MAC, VIP, [0; 6], VIP),
        ),
        ("IPv4, not ARP", udp(CLIENT, OTHER, 1000, 53, b"x")),
    ];
    for (name, pkt) in cases {
        let (out, moved) = run(&bed, &pkt);
        assert_untouched(name, &pkt, &out);
        assert!(moved.is_empty(), "{name}: {moved:?}");
    }
    let mut bad_hlen = who_has(VIP);
    bad_hlen[18] = 8;
    let (out, _) = run(&bed, &bad_hlen);
    assert_untouched("hardware length 8", &bad_hlen, &out);
    assert_eq!(arp_replies(&bed, VIP), 0);
}

#[test]
fn arp_after_the_dead_man_deadline_goes_to_the_kernel() {
    let bed = bed_owning_vip(0);
    let req = who_has(VIP);
    let (out, moved) = run(&bed, &req);
    assert_untouched("request after the deadline", &req, &out);
    assert_eq!(moved, vec![(Reason::PassArpDeadline, 1)]);
    assert_eq!(arp_replies(&bed, VIP), 0);
    // Refreshing the deadline, as a live agent does, brings the answers back.
    let mut bed = bed;
    let later = xlb::dataplane::conntrack::monotonic_ns() + 60_000_000_000;
    bed.config
        .set(xlb_common::config::L2_DEADLINE, later, 0)
        .unwrap();
    let (out, _) = run(&bed, &req);
    assert_eq!(out.retval, XDP_TX);
}

/// ns/packet of the hit, miss and no-backend drop paths with datapath events off and
/// on (`warn`: past the first lines of a second the limiter refuses them), next to
/// another build of the programs when `XLB_COMPARE_OBJ` names its object (e.g. the
/// main branch's `target/ebpf/bpfel-unknown-none/release/xlb`). BPF_PROG_TEST_RUN
/// with repeat=N, rounds interleaved, medians.
#[test]
#[ignore = "measurement; prints a table, asserts nothing about time"]
fn datapath_event_cost() {
    use xlb_common::datapath_log::WARN;
    let small_tcp = |dst, dport| {
        Ip4::new(CLIENT, dst, PROTO_TCP).frame(&tcp_seg(
            CLIENT,
            dst,
            (1000, dport),
            ACK,
            5,
            &[],
            b"0123456789abcdef",
        ))
    };
    let setup = |mut bed: TestBed, level| {
        program(&mut bed, 1, (VIP, 80, Protocol::Tcp), &[(VIP, 80)]);
        program(&mut bed, 2, (VIP, 81, Protocol::Tcp), &[]);
        bed.set_datapath_log(level).unwrap();
        bed
    };
    let mut beds = vec![
        ("events off", setup(TestBed::load().unwrap(), 0)),
        ("events warn", setup(TestBed::load().unwrap(), WARN)),
    ];
    if let Some(path) = std::env::var_os("XLB_COMPARE_OBJ") {
        let obj = std::fs::read(&path).unwrap();
        beds.push((
            "compared object",
            setup(TestBed::load_object(&obj).unwrap(), 0),
        ));
    }
    let (hit, miss, drop) = (small_tcp(VIP, 80), small_tcp(OTHER, 80), small_tcp(VIP, 81));
    let cases: [(&str, &'static str, &[u8], u32); 4] = [
        ("XDP_PASS baseline", BASELINE_PROG, &miss, XDP_PASS),
        ("non-VIP miss", names::XDP_PROG, &miss, XDP_PASS),
        ("VIP, conntrack hit", names::XDP_PROG, &hit, XDP_PASS),
        ("VIP, no backend (drop)", names::XDP_PROG, &drop, XDP_DROP),
    ];
    for (_, bed) in &mut beds {
        let out = bed.run(names::XDP_PROG, &hit, 1).unwrap();
        assert_eq!((out.retval, &out.data[..]), (XDP_PASS, &hit[..]));
    }
    const REPEAT: u32 = 1_000_000;
    const ROUNDS: usize = 9;
    let mut samples = vec![vec![vec![]; cases.len()]; beds.len()];
    for _ in 0..ROUNDS {
        for (c, &(_, prog, pkt, verdict)) in cases.iter().enumerate() {
            for (b, (_, bed)) in beds.iter_mut().enumerate() {
                let r = bed.run(prog, pkt, REPEAT).unwrap();
                assert_eq!(r.retval, verdict);
                samples[b][c].push(r.duration_ns);
                bed.events();
            }
        }
    }
    println!();
    println!(
        "BPF_PROG_TEST_RUN, {}-byte TCP frame, repeat={REPEAT}, median of {ROUNDS} interleaved rounds, ns/packet",
        hit.len()
    );
    print!("{:<24}", "path");
    for (name, _) in &beds {
        print!(" {name:>16}");
    }
    println!();
    for (c, (name, ..)) in cases.iter().enumerate() {
        print!("{name:<24}");
        for bed in &samples {
            print!(" {:>16}", median(bed[c].clone()));
        }
        println!();
    }
}
