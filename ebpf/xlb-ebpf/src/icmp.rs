//! ICMP for VIP flows. An ICMP error quotes the IP header and first 8 bytes of the
//! packet that caused it (RFC 792, RFC 1812 section 4.3.2.3): for a NATed flow the
//! quote must be translated like the flow itself, or the error never reaches the
//! socket it is for and path MTU discovery (RFC 1191) breaks for pods behind a VIP.
//!
//! - From the network (XDP): an error addressed to a VIP quoting `VIP:port ->
//!   client` (a backend's reply, after reverse NAT) goes to the backend: the outer
//!   destination and the quoted source become the backend's address and port.
//! - From a local pod (TC egress): an error quoting `client -> backend:port` (the
//!   DNATed request) goes to the client from the VIP: the outer source and the quoted
//!   destination become VIP:port.
//!
//! Checksums: the outer IP header's, the quoted IP header's, and the ICMP checksum
//! over the whole message (no pseudo-header, RFC 792) are updated incrementally. The
//! quoted L4 checksum is left alone: it covers bytes the quote does not hold, and
//! receivers do not check it (Linux matches the quote to a socket by addresses and
//! ports only).
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use network_types::ip::Ipv4Hdr;
use xlb_common::{
    BACKEND_F_REMOTE, FlowKey4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Reason, ServiceKey4,
};

use crate::{
    csum,
    hook::Hook,
    maps::{CONNTRACK4, SERVICES4, count},
    packet::{IP_OFF, L4_OFF, ptr_at},
};

const ECHO_REQUEST: u8 = 8;
const DEST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;

/// Offset of the quoted IP header (after the 8-byte ICMP header).
const Q_IP: usize = L4_OFF + 8;
/// Offset of the quoted L4 ports (the quoted header must have no options).
const Q_PORTS: usize = Q_IP + Ipv4Hdr::LEN;

/// The ICMP header and the quoted IPv4 header + ports, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Quote {
    icmp_type: u8,
    code: u8,
    check: [u8; 2],
    rest: [u8; 4],
    ip: Ipv4Hdr,
    sport: [u8; 2],
    dport: [u8; 2],
}

impl Quote {
    /// The quoted packet's flow in the other direction: the conntrack key of a quoted
    /// reply (VIP -> client), the reverse-NAT key of a quoted request (client ->
    /// backend).
    #[inline(always)]
    fn reversed(&self) -> FlowKey4 {
        FlowKey4 {
            src: self.ip.dst_addr,
            dst: self.ip.src_addr,
            sport: u16::from_ne_bytes(self.dport),
            dport: u16::from_ne_bytes(self.sport),
            proto: self.ip.proto,
            pad: [0; 3],
        }
    }
}

/// Whether `t` is an ICMP error type that quotes the offending packet.
#[inline(always)]
fn is_error(t: u8) -> bool {
    t == DEST_UNREACHABLE || t == TIME_EXCEEDED || t == PARAMETER_PROBLEM
}

/// The quote, when the message is an error quoting an IPv4 TCP/UDP header without
/// options.
#[inline(always)]
fn quote(start: usize, end: usize) -> Option<Quote> {
    let q: *const Quote = ptr_at(start, end, L4_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { *q };
    let proto = q.ip.proto;
    (is_error(q.icmp_type) && q.ip.vihl == 0x45 && (proto == PROTO_TCP || proto == PROTO_UDP))
        .then_some(q)
}

/// Which end of the quoted flow a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The quote is a reply from VIP:port: its source (and the error's destination)
    /// becomes the backend.
    ReplySource,
    /// The quote is a request to backend:port: its destination (and the error's
    /// source) becomes VIP:port.
    RequestDestination,
}

/// Rewrites the outer address and the quoted address and port on `side` to
/// `addr:port`, updating the outer IP, quoted IP and ICMP checksums incrementally.
#[inline(always)]
fn translate(ip: &mut Ipv4Hdr, qp: &mut Quote, side: Side, addr: [u8; 4], port: [u8; 2]) {
    let reply = side == Side::ReplySource;
    let outer = if reply { ip.dst_addr } else { ip.src_addr };
    ip.check = csum::replace4(u16::from_be_bytes(ip.check), outer, addr).to_be_bytes();
    if reply {
        ip.dst_addr = addr;
    } else {
        ip.src_addr = addr;
    }
    let (quoted, qport) = if reply {
        (qp.ip.src_addr, qp.sport)
    } else {
        (qp.ip.dst_addr, qp.dport)
    };
    let old_qcheck = qp.ip.check;
    let new_qcheck = csum::replace4(u16::from_be_bytes(old_qcheck), quoted, addr).to_be_bytes();
    let mut icmp = u16::from_be_bytes(qp.check);
    icmp = csum::replace4(icmp, quoted, addr);
    icmp = csum::replace2(icmp, old_qcheck, new_qcheck);
    icmp = csum::replace2(icmp, qport, port);
    if reply {
        qp.ip.src_addr = addr;
        qp.sport = port;
    } else {
        qp.ip.dst_addr = addr;
        qp.dport = port;
    }
    qp.ip.check = new_qcheck;
    qp.check = icmp.to_be_bytes();
}

/// XDP: ICMP arriving on the uplink (the packet is IPv4 ICMP without options).
#[inline(always)]
pub fn ingress<C: Hook>(ctx: &C) -> u32 {
    let (start, end) = (ctx.start(), ctx.end());
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, IP_OFF) else {
        return C::PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let dst = unsafe { (*ip).dst_addr };
    let Some(t) = ptr_at::<u8>(start, end, L4_OFF) else {
        return C::PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { *t };
    if t == ECHO_REQUEST {
        if is_vip(dst) {
            count(Reason::PassIcmpVip);
        }
        return C::PASS;
    }
    let Some(q) = quote(start, end) else {
        return C::PASS;
    };
    // The quoted packet went from the VIP (its source) to the client.
    let svc = ServiceKey4 {
        addr: q.ip.src_addr,
        port: u16::from_ne_bytes(q.sport),
        proto: q.ip.proto,
        pad: 0,
    };
    // The cheap test first: an error about a VIP flow is addressed to the VIP.
    // SAFETY: plain data lookup.
    if q.ip.src_addr != dst || unsafe { SERVICES4.get(&svc) }.is_none() {
        return C::PASS;
    }
    let flow = q.reversed();
    // SAFETY: plain data copied out at once.
    let Some(ct) = (unsafe { CONNTRACK4.get(&flow) }).copied() else {
        count(Reason::PassIcmpVip);
        return C::PASS;
    };
    // A remote backend's replies left from its own node; its errors are not ours.
    if ct.backend.flags & BACKEND_F_REMOTE != 0 {
        count(Reason::PassIcmpVip);
        return C::PASS;
    }
    let b = &ct.backend.addr;
    let backend = [b[0], b[1], b[2], b[3]];
    let bport = u16::to_ne_bytes(ct.backend.port);
    let (Some(ip), Some(qp)) = (
        ptr_at::<Ipv4Hdr>(start, end, IP_OFF),
        ptr_at::<Quote>(start, end, L4_OFF),
    ) else {
        return C::PASS;
    };
    // SAFETY: bounds checked by ptr_at; nothing else aliases the packet here.
    let (ip, qp) = unsafe { (&mut *ip, &mut *qp) };
    translate(ip, qp, Side::ReplySource, backend, bport);
    count(Reason::IcmpErrorNat);
    ctx.forward_local()
}

/// Whether `addr` is a VIP (its `(addr, 0, ICMP)` key exists).
#[inline(always)]
fn is_vip(addr: [u8; 4]) -> bool {
    let key = ServiceKey4 {
        addr,
        port: 0,
        proto: PROTO_ICMP,
        pad: 0,
    };
    // SAFETY: plain data lookup.
    unsafe { SERVICES4.get(&key) }.is_some()
}

/// TC egress: an ICMP error from a local pod about a DNATed request goes back to
/// the client as if from the VIP. Returns the TC action (always lets it go on).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    // Headers may sit in page fragments: make the quote directly accessible first.
    if ctx.pull_data((Q_PORTS + 4) as u32).is_ok() {
        let _ = egress_nat(ctx);
    }
    TC_ACT_OK as i32
}

#[inline(always)]
fn egress_nat(ctx: &TcContext) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip: *const Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let src = unsafe { (*ip).src_addr };
    let q = quote(start, end)?;
    // The quoted request went from the client to the backend, which is the sender.
    if q.ip.dst_addr != src {
        return None;
    }
    let reply = q.reversed();
    let rn = crate::lb::reverse(&reply)?;
    let vip = [rn.addr[0], rn.addr[1], rn.addr[2], rn.addr[3]];
    let vport = u16::to_ne_bytes(rn.port);
    let ip: *mut Ipv4Hdr = ptr_at(start, end, IP_OFF)?;
    let qp: *mut Quote = ptr_at(start, end, L4_OFF)?;
    // SAFETY: bounds checked by ptr_at; direct packet access is writable at TC.
    let (ip, qp) = unsafe { (&mut *ip, &mut *qp) };
    translate(ip, qp, Side::RequestDestination, vip, vport);
    count(Reason::IcmpErrorNat);
    Some(())
}
