//! Tests of the lab itself (no agent): topology, servers, checksum verification, cleanup.

// A deliberate panic path needs plain expects inside the unwinding closure.
#![allow(clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use xlb_lab::lab::{CLIENT_ADDR, Lab};
use xlb_lab::netns::run;
use xlb_lab::servers::{TCP_LINE_PORT, UDP_ECHO_PORT};

const T: Duration = Duration::from_secs(2);

fn netns_names() -> Result<Vec<String>> {
    Ok(run(Command::new("ip").args(["netns", "list"]))?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

#[test]
fn client_reaches_pods_directly_without_agent() -> Result<()> {
    let lab = Lab::one_node(3)?;
    lab.client.ping(lab.node().host.addr, 2)?;
    for pod in &lab.node().pods {
        let udp =
            lab.client
                .udp_request(SocketAddr::from((pod.ip, UDP_ECHO_PORT)), "hello", T, 1)?;
        assert_eq!(udp.server, pod.name);
        assert_eq!(udp.from, SocketAddr::from((pod.ip, UDP_ECHO_PORT)));
        assert_eq!(
            udp.seen_peer, udp.local,
            "pod saw a rewritten client address"
        );
        assert_eq!(udp.echoed, "hello");
        let mut conn = lab
            .client
            .tcp_connect(SocketAddr::from((pod.ip, TCP_LINE_PORT)), T)?;
        for _ in 0..3 {
            let r = conn.ping()?;
            assert_eq!(r.server, pod.name);
            assert_eq!(r.seen_peer, conn.local());
        }
        let s = pod.servers.stats();
        assert_eq!(
            (s.udp_datagrams, s.tcp_connections, s.tcp_lines),
            (1, 1, 3),
            "{}: {s:?}",
            pod.name
        );
        assert_eq!(
            s.peer_ips().into_iter().collect::<Vec<_>>(),
            vec![IpAddr::V4(CLIENT_ADDR)]
        );
        // The node itself reaches the pod too (source: its uplink address).
        let r = lab
            .node()
            .host
            .udp_request(SocketAddr::from((pod.ip, UDP_ECHO_PORT)), "", T, 1)?;
        assert_eq!(r.seen_peer.ip(), IpAddr::V4(lab.node().host.addr));
    }
    // Without an agent nobody serves the VIP: the node has no route for it.
    let vip = SocketAddr::from((Ipv4Addr::new(10, 0, 100, 1), 53));
    assert!(
        lab.client
            .udp_probe(vip, Duration::from_millis(300))?
            .is_none()
    );
    assert!(
        lab.client
            .tcp_connect(SocketAddr::from((vip.ip(), 80)), T)
            .is_err()
    );
    Ok(())
}

/// The lab turns TX checksum offload off so that receivers verify L4 checksums; prove a
/// datagram with a wrong UDP checksum is dropped by the pod's stack while the same datagram
/// with the right checksum is delivered.
#[test]
fn receivers_verify_udp_checksums() -> Result<()> {
    let lab = Lab::one_node(1)?;
    let pod = &lab.node().pods[0];
    let src_port = lab.client.fresh_port()?;
    let raw = lab.client.ns.enter(|| {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            )
        };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })?;
    let send = |payload: &[u8], corrupt: bool| -> Result<()> {
        let len = u16::try_from(8 + payload.len())?;
        let mut seg = Vec::new();
        seg.extend_from_slice(&src_port.to_be_bytes());
        seg.extend_from_slice(&UDP_ECHO_PORT.to_be_bytes());
        seg.extend_from_slice(&len.to_be_bytes());
        seg.extend_from_slice(&[0, 0]);
        seg.extend_from_slice(payload);
        let mut sum = udp_checksum(CLIENT_ADDR, pod.ip, &seg);
        if corrupt {
            sum ^= 0x0101;
        }
        seg[6..8].copy_from_slice(&sum.to_be_bytes());
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(pod.ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: seg and dst are valid for the call.
        let n = unsafe {
            libc::sendto(
                raw,
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    send(b"bad", true)?;
    send(b"good", false)?;
    let stats = xlb_lab::poll(
        "pod receives the good datagram",
        T,
        Duration::from_millis(10),
        || {
            let s = pod.servers.stats();
            Ok((s.udp_datagrams > 0).then_some(s))
        },
    );
    // SAFETY: closing our own fd once.
    unsafe { libc::close(raw) };
    let stats = stats?;
    assert_eq!(
        stats.udp_datagrams, 1,
        "the corrupted datagram must have been dropped"
    );
    Ok(())
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 17]);
    add(&u16::try_from(seg.len()).unwrap_or(0).to_be_bytes());
    add(seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        s => s,
    }
}

#[test]
fn namespaces_are_removed_even_on_panic() -> Result<()> {
    let mut id = String::new();
    let mut scratch = std::path::PathBuf::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::one_node(2).expect("lab");
        id = lab.id().to_string();
        scratch = lab.scratch().to_path_buf();
        assert!(
            netns_names()
                .expect("ip netns list")
                .iter()
                .any(|n| n.starts_with(&id))
        );
        panic!("deliberate panic inside a lab");
    }));
    assert!(result.is_err());
    assert!(!id.is_empty());
    let left: Vec<String> = netns_names()?
        .into_iter()
        .filter(|n| n.starts_with(&id))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    // On panic the scratch dir (logs) is kept for inspection; remove it here.
    assert!(scratch.exists());
    std::fs::remove_dir_all(&scratch).context("removing scratch")?;
    Ok(())
}
