//! Rewriting one end (address + port) of an IPv4 TCP/UDP packet in XDP, with the IP
//! header checksum and the L4 checksum (which covers the pseudo-header: RFC 793
//! section 3.1, RFC 768) updated incrementally.
use crate::{
    csum,
    packet::{IP_CSUM_OFF, IP_OFF, L4_OFF, ptr_at},
};
use xlb_common::PROTO_TCP;

/// Replaces the address at `addr_off` (in the IP header) and the port at `port_off`
/// (0 source, 2 destination, in the L4 header). `None`: the packet is too short.
/// `Some(delta)`: how the sum over the bytes behind the Ethernet header changed (see
/// `hook::Hook::csum_changed`). The IP header's sum does not (its checksum makes up
/// for the address); with an L4 checksum, that checksum makes up for the port and
/// for the address in the pseudo-header, which lies outside the bytes: the sum loses
/// the address change. Without one (UDP checksum 0) it gains the port change.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn rewrite4(
    start: usize,
    end: usize,
    l4_csum_off: usize,
    proto: u8,
    addr_off: usize,
    port_off: usize,
    old_addr: &[u8; 4],
    new_addr: &[u8; 4],
    old_port: &[u8; 2],
    new_port: &[u8; 2],
) -> Option<u32> {
    let ip_csum: *mut [u8; 2] = ptr_at(start, end, IP_OFF + IP_CSUM_OFF)?;
    let addr: *mut [u8; 4] = ptr_at(start, end, IP_OFF + addr_off)?;
    let l4_csum: *mut [u8; 2] = ptr_at(start, end, l4_csum_off)?;
    let port: *mut [u8; 2] = ptr_at(start, end, L4_OFF + port_off)?;
    // SAFETY: all four pointers were bounds checked above.
    unsafe {
        let c = u16::from_be_bytes(*ip_csum);
        *ip_csum = csum::replace4(c, *old_addr, *new_addr).to_be_bytes();
        *addr = *new_addr;
        let c = u16::from_be_bytes(*l4_csum);
        // UDP checksum 0 means "none" over IPv4 (RFC 768): leave it so.
        let delta = if proto == PROTO_TCP || c != 0 {
            csum::delta_mem(new_addr, old_addr)
        } else {
            csum::delta_mem(old_port, new_port)
        };
        if proto == PROTO_TCP || c != 0 {
            let mut c = csum::replace4(c, *old_addr, *new_addr);
            c = csum::replace2(c, *old_port, *new_port);
            if proto != PROTO_TCP && c == 0 {
                c = 0xffff;
            }
            *l4_csum = c.to_be_bytes();
        }
        *port = *new_port;
        Some(delta)
    }
}
