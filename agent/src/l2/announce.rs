//! Telling the LAN who has a VIP now: gratuitous ARP sent from the agent on the
//! announce interface, and that interface's link state.
//!
//! The announcement is an ARP request with sender and target both the VIP and an
//! empty target hardware address (RFC 5227 section 3, "ARP Announcement"): Linux
//! neighbours update an existing entry for the VIP from it (`arp_process`), so
//! clients move to the new owner without waiting for their entry to go stale.
use std::{
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;

/// The RFC 5227 ARP Announcement for `vip` from `mac`, broadcast (42 bytes; the NIC
/// pads it to the Ethernet minimum).
pub fn announcement(vip: Ipv4Addr, mac: [u8; 6]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6- and 4-byte addresses, request.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&vip.octets());
    // Target hardware address stays zero.
    f[38..42].copy_from_slice(&vip.octets());
    f
}

/// An AF_PACKET socket that sends whole frames out of one interface.
#[derive(Debug)]
pub struct Sender {
    fd: OwnedFd,
    ifindex: u32,
}

impl Sender {
    /// Opens the socket for `ifindex` (needs CAP_NET_RAW). It never receives: the
    /// protocol is 0, so the kernel delivers it nothing (packet(7)).
    pub fn open(ifindex: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Sender { fd, ifindex })
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = self.ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and sa outlive the call; the lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether `iface` is administratively up and running (`IFF_UP` and `IFF_RUNNING`:
/// the kernel clears the latter when the carrier goes, netdevice(7)), asked with
/// `SIOCGIFFLAGS` in this process's network namespace (sysfs would show the one it
/// was mounted in). A node whose announce link is down gives its VIPs up at once; a
/// device the kernel does not know counts as down, a question that failed (no file
/// descriptor left) is an error, which the caller must not take for "down".
pub fn link_up(iface: &str) -> io::Result<bool> {
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        return Ok(false);
    }
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // No such device: down. Anything else: the question failed.
        return match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => Ok(false),
            _ => Err(e),
        };
    }
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    Ok(unsafe { req.ifr_ifru.ifru_flags } & want == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_is_rfc5227() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = announcement(Ipv4Addr::new(10, 0, 100, 1), mac);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &f[38..42], "sender = target");
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
