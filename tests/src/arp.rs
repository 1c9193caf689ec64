//! ARP from a lab host, for L2 announcement tests: who answers a request for an
//! address (RFC 826), seen as raw frames so that every answerer is counted, not just
//! the one the kernel's neighbour table keeps.
use std::collections::BTreeSet;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

const ETH_P_ARP: u16 = 0x0806;

/// A MAC address.
pub type Mac = [u8; 6];

/// `ip -br link` MAC of `iface` in `ns`.
pub fn mac_of(ns: &Netns, iface: &str) -> Result<Mac> {
    let out = ns.ip(&["-br", "link", "show", iface])?;
    let text = out
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC in {out:?}"))?;
    parse_mac(text)
}

/// `aa:bb:cc:dd:ee:ff` -> bytes.
pub fn parse_mac(text: &str) -> Result<Mac> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {text:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text:?}"))
}

/// The MAC the kernel of `ns` has for `addr` on `iface` (`ip neigh`), if any entry
/// with a link-layer address exists.
pub fn neighbour(ns: &Netns, iface: &str, addr: Ipv4Addr) -> Result<Option<Mac>> {
    let out = ns.ip(&["neigh", "show", &addr.to_string(), "dev", iface])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().map(parse_mac).transpose();
        }
    }
    Ok(None)
}

/// Sends one ARP request for `target` from `iface` in `ns` (sender `from_ip` and the
/// interface's MAC) and returns the sender MACs of every reply about `target` that
/// arrives within `window`.
pub fn who_has(
    ns: &Netns,
    iface: &str,
    from_ip: Ipv4Addr,
    target: Ipv4Addr,
    window: Duration,
) -> Result<BTreeSet<Mac>> {
    let mac = mac_of(ns, iface)?;
    let iface = iface.to_string();
    ns.enter(move || {
        let name = std::ffi::CString::new(iface.clone())?;
        // SAFETY: plain libc calls on values owned here; results checked.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = ifindex as i32;
        let sa_len = mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: sa outlives the call.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                sa_len,
            )
        } < 0
        {
            bail!("bind: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: tv outlives the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut req = vec![0xff; 6];
        req.extend_from_slice(&mac);
        req.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        req.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        req.extend_from_slice(&mac);
        req.extend_from_slice(&from_ip.octets());
        req.extend_from_slice(&[0; 6]);
        req.extend_from_slice(&target.octets());
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: req and sa outlive the call.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                sa_len,
            )
        };
        if sent < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        let mut answerers = BTreeSet::new();
        let deadline = Instant::now() + window;
        let mut buf = [0u8; 1514];
        while Instant::now() < deadline {
            // SAFETY: buf outlives the call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 42 {
                continue;
            }
            let f = &buf[..n as usize];
            if f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == target.octets() {
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&f[22..28]);
                answerers.insert(sha);
            }
        }
        Ok(answerers)
    })
}
