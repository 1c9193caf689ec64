//! Facts about, and small changes to, the node's network devices that the datapath
//! depends on: addresses and MAC of the uplink, which XDP attach mode suits its
//! driver, neighbour entries for the other nodes' tunnel addresses, and which
//! devices lead into pods.
//!
//! Everything here works in the agent's network namespace through sockets (ioctl,
//! netlink, getifaddrs), never through /sys/class/net: under `nsenter --net` the
//! process sees the host's /sys, not its own namespace's devices.
use std::{io, net::Ipv4Addr};

/// Network device failures; each names the device and operation.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// An ioctl on the device failed.
    #[error("{iface}: {op}: {source}")]
    Ioctl {
        /// Device name.
        iface: String,
        /// The operation.
        op: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} {addr} on {iface}: {source}")]
    Netlink {
        /// Device name.
        iface: String,
        /// The operation.
        op: &'static str,
        /// The neighbour's address.
        addr: Ipv4Addr,
        /// Cause.
        source: io::Error,
    },
    /// Listing the namespace's links failed.
    #[error("netlink link dump: {0}")]
    LinkDump(String),
}

/// What `ETHTOOL_GDRVINFO` says about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// Driver name (`veth`, `bridge`, `mlx5_core`, `virtio_net`, ...).
    pub driver: String,
    /// Bus address of the hardware (`0000:3b:00.0`); empty for virtual devices.
    pub bus_info: String,
}

/// `SIOCETHTOOL`, linux/sockios.h.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GDRVINFO`, linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with its union used as `ifr_data`.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The driver of `iface`, by the `ETHTOOL_GDRVINFO` ioctl.
pub fn driver_info(iface: &str) -> Result<DriverInfo, NetdevError> {
    let err = |op, source| NetdevError::Ioctl {
        iface: iface.to_string(),
        op,
        source,
    };
    if iface.len() >= libc::IFNAMSIZ {
        return Err(err(
            "ETHTOOL_GDRVINFO",
            io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"),
        ));
    }
    // SAFETY: all-zero is a valid ethtool_drvinfo (integers and byte arrays).
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut ifr = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut info as *mut EthtoolDrvinfo).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in ifr.name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket", io::Error::last_os_error()));
    }
    // SAFETY: ifr and info outlive the call; the kernel writes at most the drvinfo.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr as *mut IfreqData) };
    let os = io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err("ETHTOOL_GDRVINFO", os));
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok(DriverInfo {
        driver: text(&info.driver),
        bus_info: text(&info.bus_info),
    })
}

/// The XDP attach mode asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpChoice {
    /// Native XDP where the driver suits it, else no XDP program: the datapath at TC
    /// ingress (see [`auto_mode`]).
    Auto,
    /// As [`Self::Auto`], but generic XDP instead of TC (for `--forward redirect`,
    /// which only XDP does).
    AutoXdp,
    /// Native (driver) mode, whatever the device.
    Native,
    /// Generic (skb) mode, whatever the device.
    Generic,
    /// No XDP program: the whole ingress datapath at TC (`xlb_tc_lb`), which saves
    /// what generic XDP costs on a device without native XDP (an skb copy and a
    /// hand-off to TC per packet).
    Tc,
}

/// An attach mode and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpDecision {
    /// Native (driver) mode if true, else generic (skb) or none ([`Self::tc`]).
    pub native: bool,
    /// No XDP program: the datapath runs at TC ingress.
    pub tc: bool,
    /// Why, for the log and the metric.
    pub reason: String,
    /// The device's driver, when known.
    pub driver: String,
}

impl XdpDecision {
    /// The mode's name: `native`, `generic` or `tc` (no XDP program).
    pub fn mode(&self) -> &'static str {
        if self.tc {
            "tc"
        } else if self.native {
            "native"
        } else {
            "generic"
        }
    }
}

/// Virtual devices whose native XDP does not behave like a NIC's for xlb's needs.
/// A veth drops frames sent with XDP_TX unless its peer runs XDP too, and hands XDP
/// packets with a partial (CHECKSUM_PARTIAL, not yet computed) L4 checksum that
/// XDP_TX then sends on half-done; the others either lack native XDP or stack on
/// devices that do their own. Generic XDP runs on the skb, so the kernel transmits
/// XDP_TX frames and keeps the checksum state.
const VIRTUAL_DRIVERS: &[&str] = &[
    "veth",
    "bridge",
    "macvlan",
    "macvtap",
    "ipvlan",
    "vxlan",
    "geneve",
    "tun",
    "bonding",
    "team",
    "vrf",
    "openvswitch",
    "dummy",
    "802.1Q VLAN Support",
    "wireguard",
    "nlmon",
];

/// Chooses the mode for `--xdp-mode auto` from the driver: native for hardware NICs,
/// which deliver XDP_TX frames and give XDP complete checksums (virtio_net included:
/// it turns guest checksum offload off while XDP is attached); for the virtual devices
/// above and any device without a bus address (no hardware behind it), no XDP program
/// but the datapath at TC ingress (generic XDP there would copy every skb and still
/// need TC), or generic XDP when `xdp_only`. If native attach then fails, the caller
/// falls back to generic.
pub fn auto_mode(info: &DriverInfo, xdp_only: bool) -> XdpDecision {
    let virtual_reason = if VIRTUAL_DRIVERS.contains(&info.driver.as_str()) {
        Some(format!("virtual device ({})", info.driver))
    } else if info.bus_info.is_empty() {
        Some(format!(
            "no hardware behind the device (driver {:?}, no bus address)",
            info.driver
        ))
    } else {
        None
    };
    if let Some(why) = virtual_reason {
        let (tc, how) = if xdp_only {
            (false, "generic XDP (--forward redirect needs XDP)")
        } else {
            (true, "the datapath at TC ingress, no XDP program")
        };
        return XdpDecision {
            native: false,
            tc,
            reason: format!("{why}: {how}"),
            driver: info.driver.clone(),
        };
    }
    let (native, reason) = {
        (
            true,
            format!(
                "hardware NIC (driver {}, bus {})",
                info.driver, info.bus_info
            ),
        )
    };
    XdpDecision {
        native,
        tc: false,
        reason,
        driver: info.driver.clone(),
    }
}

/// The first IPv4 address of `iface` (getifaddrs(3)), if any.
pub fn interface_ipv4(iface: &str) -> Option<Ipv4Addr> {
    interface_addr(iface, libc::AF_INET, |sa| {
        // SAFETY: an AF_INET entry's address is a sockaddr_in.
        let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
        Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
    })
}

/// The MAC address of `iface` (its AF_PACKET getifaddrs entry), if it has one.
pub fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    interface_addr(iface, libc::AF_PACKET, |sa| {
        // SAFETY: an AF_PACKET entry's address is a sockaddr_ll.
        let ll = unsafe { &*(sa as *const libc::sockaddr_ll) };
        (ll.sll_halen == 6).then(|| {
            let a = ll.sll_addr;
            [a[0], a[1], a[2], a[3], a[4], a[5]]
        })
    })
}

/// The first address of `family` on `iface`, decoded by `decode`.
fn interface_addr<T>(
    iface: &str,
    family: i32,
    decode: impl Fn(*const libc::sockaddr) -> Option<T>,
) -> Option<T> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr, when set, points to a
        // sockaddr whose family says its real type.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if !ifa.ifa_addr.is_null()
            && name.to_bytes() == iface.as_bytes()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == family
        {
            found = decode(ifa.ifa_addr);
            if found.is_some() {
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// The interface index of `iface`, if it exists (any failure reads as "no").
pub fn ifindex(iface: &str) -> Option<u32> {
    lookup_ifindex(iface).ok().flatten()
}

/// The interface index of `iface`: `Ok(None)` only when the kernel says there is no
/// such device; a failed question (no file descriptor left for glibc's socket, no
/// memory) is an error, never "gone".
pub fn lookup_ifindex(iface: &str) -> io::Result<Option<u32>> {
    let Ok(name) = std::ffi::CString::new(iface) else {
        return Ok(None);
    };
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i != 0 {
        return Ok(Some(i));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

// rtnetlink constants (linux/rtnetlink.h, linux/neighbour.h, linux/netlink.h).
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NDA_DST: u16 = 1;
const NDA_FLAGS_EXT: u16 = 15;
/// The kernel keeps a managed entry resolved by itself (probing it as if in use), the
/// way Cilium keeps its XDP FIB-lookup neighbours (kernel 5.16+).
const NTF_EXT_MANAGED: u32 = 1;

/// Keeps managed neighbour entries on `iface` for `addr` (`ip neigh replace ADDR dev
/// IFACE managed`), so `bpf_fib_lookup` in XDP finds the other nodes resolved. One
/// rtnetlink request, written out here because it is one fixed message: NDA_FLAGS_EXT
/// is newer than what the Rust netlink crates model.
pub fn add_managed_neighbour(iface: &str, addr: Ipv4Addr) -> Result<(), NetdevError> {
    neighbour_request(
        iface,
        addr,
        RTM_NEWNEIGH,
        NLM_F_CREATE | NLM_F_REPLACE,
        Ndm::Managed,
        "add",
    )
}

/// The fallback for kernels without managed entries: creates the entry for `addr` on
/// `iface` if needed and marks it used (`ip neigh replace ADDR dev IFACE use`,
/// NTF_USE: the kernel's `neigh_event_send`), which starts its resolution, or its
/// re-validation when stale, as a packet sent to it would. Called again every few
/// seconds, it keeps the entry resolved the way a managed one is.
pub fn use_neighbour(iface: &str, addr: Ipv4Addr) -> Result<(), NetdevError> {
    neighbour_request(
        iface,
        addr,
        RTM_NEWNEIGH,
        NLM_F_CREATE | NLM_F_REPLACE,
        Ndm::Use,
        "use",
    )
}

/// Whether the entry for `addr` on `iface` is a managed one (`None`: no entry). The
/// kernel reports NDA_FLAGS_EXT only when it knows the flag.
pub fn neighbour_is_managed(iface: &str, addr: Ipv4Addr) -> Result<Option<bool>, NetdevError> {
    use netlink_packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    };
    use netlink_packet_utils::nla::Nla;
    let index = ifindex(iface)
        .ok_or_else(|| NetdevError::LinkDump(format!("{iface}: no such interface")))?;
    let mut req = NeighbourMessage::default();
    req.header.family = AddressFamily::Inet;
    for m in dump(RouteNetlinkMessage::GetNeighbour(req))? {
        let RouteNetlinkMessage::NewNeighbour(n) = m else {
            continue;
        };
        if n.header.ifindex != index
            || !n.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == addr)
            })
        {
            continue;
        }
        let managed = n.attributes.iter().any(|a| match a {
            NeighbourAttribute::Other(nla) if nla.kind() == NDA_FLAGS_EXT => {
                let mut v = [0u8; 4];
                if nla.value_len() == 4 {
                    nla.emit_value(&mut v);
                }
                u32::from_ne_bytes(v) & NTF_EXT_MANAGED != 0
            }
            _ => false,
        });
        return Ok(Some(managed));
    }
    Ok(None)
}

/// Removes the neighbour entry for `addr` on `iface` (a node that left).
pub fn remove_neighbour(iface: &str, addr: Ipv4Addr) -> Result<(), NetdevError> {
    match neighbour_request(iface, addr, RTM_DELNEIGH, 0, Ndm::Plain, "delete") {
        Err(NetdevError::Netlink { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// What a neighbour request asks beyond its message type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ndm {
    /// Nothing more (a delete).
    Plain,
    /// NDA_FLAGS_EXT = NTF_EXT_MANAGED.
    Managed,
    /// ndm_flags = NTF_USE.
    Use,
}

/// ndm_flags: "use" the entry (`neigh_event_send`) instead of updating it.
const NTF_USE: u8 = 0x01;

fn neighbour_request(
    iface: &str,
    addr: Ipv4Addr,
    kind: u16,
    extra_flags: u16,
    ndm: Ndm,
    op: &'static str,
) -> Result<(), NetdevError> {
    let err = |source| NetdevError::Netlink {
        iface: iface.to_string(),
        op,
        addr,
        source,
    };
    let index = ifindex(iface)
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no such interface")))?;
    // nlmsghdr (16) + ndmsg (12) + NDA_DST (8) + NDA_FLAGS_EXT (8).
    let mut msg = Vec::with_capacity(44);
    let len: u32 = if ndm == Ndm::Managed { 44 } else { 36 };
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | extra_flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    // ndmsg: family, pad, pad, ifindex, state (NUD_NONE: let the kernel resolve), flags, type.
    msg.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    msg.extend_from_slice(&(index as i32).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&[if ndm == Ndm::Use { NTF_USE } else { 0 }, 0]);
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&NDA_DST.to_ne_bytes());
    msg.extend_from_slice(&addr.octets());
    if ndm == Ndm::Managed {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&NDA_FLAGS_EXT.to_ne_bytes());
        msg.extend_from_slice(&NTF_EXT_MANAGED.to_ne_bytes());
    }
    debug_assert_eq!(msg.len(), len as usize);
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let result = (|| {
        // SAFETY: msg is valid for its length; the kernel address is the default sockaddr_nl.
        let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 512];
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // The ACK is an NLMSG_ERROR whose error code is 0 on success (netlink(7)).
        if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected netlink answer",
            ));
        }
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
        Ok(())
    })();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    result.map_err(err)
}

/// Sends one rtnetlink dump request and returns every message of the answer.
fn dump(
    payload: netlink_packet_route::RouteNetlinkMessage,
) -> Result<Vec<netlink_packet_route::RouteNetlinkMessage>, NetdevError> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let err = |what: &str, e: &dyn std::fmt::Display| NetdevError::LinkDump(format!("{what}: {e}"));
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| err("socket", &e))?;
    socket.bind_auto().map_err(|e| err("bind", &e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| err("connect", &e))?;
    let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(payload));
    req.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.header.length as usize];
    req.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|e| err("send", &e))?;

    let mut found = Vec::new();
    loop {
        let (bytes, _) = socket.recv_from_full().map_err(|e| err("recv", &e))?;
        if bytes.is_empty() {
            return Err(err("recv", &"connection closed mid-dump"));
        }
        let mut off = 0;
        while off < bytes.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[off..])
                .map_err(|e| err("parse", &e))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => return Err(err("kernel", &format!("{e:?}"))),
                NetlinkPayload::InnerMessage(m) => found.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            // Messages are NLMSG_ALIGN()ed (4 bytes) within a datagram (netlink(7)).
            off += (len + 3) & !3;
        }
    }
}

/// The interface indexes of this network namespace's veth and netkit devices whose
/// peer lives in another namespace (IFLA_LINK_NETNSID present): the pod-facing ends
/// a CNI makes, into which `xlb_tc_ingress` may deliver with `bpf_redirect_peer`
/// (the kernel drops a peer redirect to any other kind of device).
pub fn peer_devices() -> Result<std::collections::BTreeSet<u32>, NetdevError> {
    use netlink_packet_route::{
        RouteNetlinkMessage,
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    };
    let mut found = std::collections::BTreeSet::new();
    for m in dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(link) = m else {
            continue;
        };
        let mut kind_ok = false;
        let mut other_ns = false;
        for a in &link.attributes {
            match a {
                LinkAttribute::LinkInfo(infos) => {
                    kind_ok = infos.iter().any(|i| {
                        matches!(i, LinkInfo::Kind(InfoKind::Veth))
                            || matches!(i, LinkInfo::Kind(InfoKind::Other(k)) if k == "netkit")
                    });
                }
                LinkAttribute::LinkNetNsId(_) => other_ns = true,
                _ => {}
            }
        }
        if kind_ok && other_ns {
            found.insert(link.header.index);
        }
    }
    Ok(found)
}

/// Whether `iface` has a `bpf` filter with `priority` and `handle` at its clsact
/// ingress (or egress) hook: how the agent checks the netlink TC filters it attached
/// on a kernel without tcx (they have no pin).
pub fn has_tc_filter(
    iface: &str,
    ingress: bool,
    priority: u16,
    handle: u32,
) -> Result<bool, NetdevError> {
    use netlink_packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcHandle, TcMessage},
    };
    let index =
        ifindex(iface).ok_or_else(|| NetdevError::LinkDump(format!("no interface {iface}")))?;
    let mut req = TcMessage::default();
    req.header.index = index as i32;
    // TC_H_CLSACT major, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS (linux/pkt_sched.h).
    req.header.parent = TcHandle {
        major: 0xffff,
        minor: if ingress { 0xfff2 } else { 0xfff3 },
    };
    Ok(dump(RouteNetlinkMessage::GetTrafficFilter(req))?
        .into_iter()
        .any(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => {
                let h = u32::from(f.header.handle.major) << 16 | u32::from(f.header.handle.minor);
                h == handle
                    && (f.header.info >> 16) as u16 == priority
                    && f.attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
            }
            _ => false,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(driver: &str, bus: &str) -> DriverInfo {
        DriverInfo {
            driver: driver.into(),
            bus_info: bus.into(),
        }
    }

    #[test]
    fn auto_mode_is_tc_or_generic_on_virtual_devices_and_native_on_nics() {
        for xdp_only in [false, true] {
            let veth = auto_mode(&info("veth", ""), xdp_only);
            assert!(!veth.native && veth.tc != xdp_only, "{veth:?}");
            let bridge = auto_mode(&info("bridge", "N/A"), xdp_only);
            assert!(!bridge.native && bridge.tc != xdp_only, "{bridge:?}");
            let unknown = auto_mode(&info("something_new", ""), xdp_only);
            assert!(!unknown.native && unknown.tc != xdp_only, "{unknown:?}");
            let mlx = auto_mode(&info("mlx5_core", "0000:3b:00.0"), xdp_only);
            assert!(mlx.native && !mlx.tc);
            assert!(auto_mode(&info("virtio_net", "0000:00:03.0"), xdp_only).native);
        }
    }
}
