//! `--cluster-mode snat`, the fallback where direct server return is not possible
//! (e.g. the network drops packets sourced from a VIP): the entry node rewrites both
//! ends, client -> VIP:port becomes node:snat_port -> pod:port, forwards it itself, and
//! turns the pod's reply (pod -> node:snat_port) back into VIP:port -> client. The pod
//! sees the entry node's address, not the client's (as with kube-proxy's Cluster).
//!
//! Both directions run as their own programs, tail-called from `xlb_xdp` (the BPF
//! stack cannot hold them next to the main path), and forward the packet themselves
//! (FIB lookup + redirect): the kernel would drop the forward packet as a martian (its
//! source is the node's own address, net.ipv4.conf.*.accept_local=0).
use aya_ebpf::bindings::BPF_NOEXIST;
use xlb_common::{FlowKey4, PROTO_TCP, Reason, SNAT_PORT_MIN, SNAT_PORTS, SnatRev};

use crate::{
    fwd,
    hook::Hook,
    lb,
    maps::{CONNTRACK4, HANDOFF, SNAT4, count},
    nat::rewrite4,
    packet::{IP_DST_OFF, IP_SRC_OFF, L4_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF, addr16, parse4},
    tunnel::node_ip,
};

/// Attempts at finding a free port before giving up on a new flow.
const PORT_TRIES: u32 = 8;

/// Where the L4 checksum sits for `proto`.
#[inline(always)]
fn csum_off(proto: u8) -> usize {
    L4_OFF
        + if proto == PROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        }
}

/// `xlb_snat_fwd`: source-NATs the client packet to the backend in the handoff and
/// forwards it. Drops are counted here.
#[inline(always)]
pub fn forward<C: Hook>(ctx: &C) -> u32 {
    match try_forward(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            crate::events::snat_drop(ctx, reason);
            C::DROP
        }
    }
}

#[inline(always)]
fn try_forward<C: Hook>(ctx: &C) -> Result<u32, Reason> {
    // SAFETY: this CPU's handoff, written by xlb_xdp for this very packet.
    let h = unsafe { &*HANDOFF.get_ptr(0).ok_or(Reason::DropSnat)? };
    let backend = h.backend;
    let flow = parse4(ctx.start(), ctx.end()).map_err(|_| Reason::DropMalformedL4)?;
    let key = lb::flow_key(&flow);
    let me = node_ip();
    if me == [0; 4] {
        return Err(Reason::DropSnat);
    }
    let mut port = h.snat_port;
    if port == 0 {
        let rev = SnatRev {
            client: addr16(key.src),
            vip: addr16(key.dst),
            client_port: key.sport,
            vip_port: key.dport,
            pad: 0,
        };
        let hash = flow.hash();
        for i in 0..PORT_TRIES {
            let cand = (SNAT_PORT_MIN + (hash.wrapping_add(i) % SNAT_PORTS as u32) as u16).to_be();
            let reply = FlowKey4 {
                src: [
                    backend.addr[0],
                    backend.addr[1],
                    backend.addr[2],
                    backend.addr[3],
                ],
                dst: me,
                sport: backend.port,
                dport: cand,
                proto: key.proto,
                pad: [0; 3],
            };
            if SNAT4.insert(&reply, &rev, BPF_NOEXIST as u64).is_ok() {
                port = cand;
                break;
            }
        }
        if port == 0 {
            return Err(Reason::DropSnat);
        }
        if let Some(ct) = CONNTRACK4.get_ptr_mut(&key) {
            // SAFETY: a valid map value pointer.
            unsafe { (*ct).snat_port = port };
        }
    }
    let (start, end) = (ctx.start(), ctx.end());
    let pod = [
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ];
    let off = csum_off(flow.proto);
    let d1 = rewrite4(
        start,
        end,
        off,
        flow.proto,
        IP_DST_OFF,
        2,
        &flow.dst,
        &pod,
        &flow.dport,
        &backend.port.to_ne_bytes(),
    )
    .ok_or(Reason::DropMalformedL4)?;
    let d2 = rewrite4(
        start,
        end,
        off,
        flow.proto,
        IP_SRC_OFF,
        0,
        &flow.src,
        &me,
        &flow.sport,
        &port.to_ne_bytes(),
    )
    .ok_or(Reason::DropMalformedL4)?;
    ctx.csum_changed(d1);
    ctx.csum_changed(d2);
    let action = fwd::redirect_resolving(ctx).ok_or(Reason::DropSnat)?;
    count(Reason::FwdSnat);
    Ok(action)
}

/// `xlb_snat_rev`: if the packet is a backend's reply to a flow this node source-NATed,
/// turns it back into one from VIP:port to the client and forwards it; anything else
/// passes untouched.
#[inline(always)]
pub fn reply<C: Hook>(ctx: &C) -> u32 {
    try_reply(ctx).unwrap_or(C::PASS)
}

#[inline(always)]
fn try_reply<C: Hook>(ctx: &C) -> Option<u32> {
    let flow = parse4(ctx.start(), ctx.end()).ok()?;
    let key = lb::flow_key(&flow);
    // SAFETY: plain data copied out at once.
    let rev = *unsafe { SNAT4.get(&key) }?;
    let (start, end) = (ctx.start(), ctx.end());
    let vip = [rev.vip[0], rev.vip[1], rev.vip[2], rev.vip[3]];
    let client = [rev.client[0], rev.client[1], rev.client[2], rev.client[3]];
    let off = csum_off(flow.proto);
    let d1 = rewrite4(
        start,
        end,
        off,
        flow.proto,
        IP_SRC_OFF,
        0,
        &flow.src,
        &vip,
        &flow.sport,
        &rev.vip_port.to_ne_bytes(),
    )?;
    let d2 = rewrite4(
        start,
        end,
        off,
        flow.proto,
        IP_DST_OFF,
        2,
        &flow.dst,
        &client,
        &flow.dport,
        &rev.client_port.to_ne_bytes(),
    )?;
    ctx.csum_changed(d1);
    ctx.csum_changed(d2);
    count(Reason::RevSnat);
    Some(fwd::redirect_resolving(ctx).unwrap_or(C::PASS))
}
