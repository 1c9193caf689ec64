//! The pods' servers: a UDP echo and a line-oriented TCP server that both answer with who they
//! are and which peer address they saw, and record what they received.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Port of the pods' UDP echo server (the example Service's `dns` targetPort).
pub const UDP_ECHO_PORT: u16 = 5353;
/// Port of the pods' TCP line server (the example Service's `http` targetPort).
pub const TCP_LINE_PORT: u16 = 8080;

/// How often server threads wake up to look at their stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What a server pair has received so far.
#[derive(Clone, Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// TCP lines answered (over all connections).
    pub tcp_lines: u64,
    /// UDP datagrams received (and echoed).
    pub udp_datagrams: u64,
    /// Peer address of every accepted TCP connection, in order.
    pub tcp_peers: Vec<SocketAddr>,
    /// Distinct UDP peer addresses (one per flow).
    pub udp_peers: BTreeSet<SocketAddr>,
}

impl ServerStats {
    /// Every peer IP seen over TCP and UDP.
    pub fn peer_ips(&self) -> BTreeSet<IpAddr> {
        self.tcp_peers
            .iter()
            .chain(self.udp_peers.iter())
            .map(|a| a.ip())
            .collect()
    }
}

/// A UDP echo and a TCP line server bound in one namespace, each on its own thread, stopped
/// (and joined) on drop.
///
/// - UDP: every datagram is answered with `"{label} {peer_ip}:{peer_port}"`, followed by
///   `" {payload}"` when the datagram was not empty (so tickers can carry sequence numbers).
/// - TCP: per connection, every received line is answered with
///   `"{label} {peer_ip}:{peer_port}\n"`, so one connection can be pinged repeatedly.
pub struct Servers {
    label: String,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ServerStats>>,
    threads: Vec<JoinHandle<()>>,
    conn_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Servers {
    /// Binds `ip:udp_port` (UDP) and `ip:tcp_port` (TCP) inside `ns` and starts serving.
    pub fn start(
        ns: &Netns,
        label: &str,
        ip: Ipv4Addr,
        udp_port: u16,
        tcp_port: u16,
    ) -> Result<Servers> {
        let (udp, tcp) = ns
            .enter(|| {
                let udp = UdpSocket::bind((ip, udp_port))?;
                let tcp = TcpListener::bind((ip, tcp_port))?;
                Ok((udp, tcp))
            })
            .with_context(|| format!("binding servers for {label} in {}", ns.name()))?;
        udp.set_read_timeout(Some(POLL))?;
        // Bursts (tickers, batches) must not be dropped by a momentarily starved server thread.
        force_rcvbuf(&udp, 8 << 20)?;
        tcp.set_nonblocking(true)?;
        let mut servers = Servers {
            label: label.to_string(),
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(Mutex::new(ServerStats::default())),
            threads: Vec::new(),
            conn_threads: Arc::new(Mutex::new(Vec::new())),
        };
        let (label_u, stop_u, stats_u) = (
            servers.label.clone(),
            servers.stop.clone(),
            servers.stats.clone(),
        );
        servers.threads.push(std::thread::spawn(move || {
            udp_echo(udp, &label_u, &stop_u, &stats_u)
        }));
        let (label_t, stop_t, stats_t, conns) = (
            servers.label.clone(),
            servers.stop.clone(),
            servers.stats.clone(),
            servers.conn_threads.clone(),
        );
        servers.threads.push(std::thread::spawn(move || {
            tcp_accept(tcp, label_t, stop_t, stats_t, conns)
        }));
        Ok(servers)
    }

    /// The label servers put first in every reply (the pod's name).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A snapshot of what has been received so far.
    pub fn stats(&self) -> ServerStats {
        lock(&self.stats).clone()
    }

    /// Forgets everything received so far.
    pub fn reset_stats(&self) {
        *lock(&self.stats) = ServerStats::default();
    }

    /// Stops all server threads (including per-connection ones) and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = lock(&self.conn_threads).drain(..).collect();
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets a socket's receive buffer with SO_RCVBUFFORCE (root; not capped by rmem_max).
pub fn force_rcvbuf(sock: &impl AsRawFd, bytes: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        anyhow::bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn udp_echo(sock: UdpSocket, label: &str, stop: &AtomicBool, stats: &Mutex<ServerStats>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => {
                eprintln!("xlb-lab: {label} udp recv: {e}");
                continue;
            }
        };
        {
            let mut s = lock(stats);
            s.udp_datagrams += 1;
            s.udp_peers.insert(peer);
        }
        let payload = String::from_utf8_lossy(&buf[..n]);
        let reply = if payload.is_empty() {
            format!("{label} {peer}")
        } else {
            format!("{label} {peer} {payload}")
        };
        if let Err(e) = sock.send_to(reply.as_bytes(), peer) {
            eprintln!("xlb-lab: {label} udp reply to {peer}: {e}");
        }
    }
}

fn tcp_accept(
    listener: TcpListener,
    label: String,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ServerStats>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                eprintln!("xlb-lab: {label} tcp accept: {e}");
                continue;
            }
        };
        {
            let mut s = lock(&stats);
            s.tcp_connections += 1;
            s.tcp_peers.push(peer);
        }
        let (label, stop, stats) = (label.clone(), stop.clone(), stats.clone());
        let t = std::thread::spawn(move || tcp_conn(stream, peer, &label, &stop, &stats));
        lock(&conns).push(t);
    }
}

fn tcp_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    label: &str,
    stop: &AtomicBool,
    stats: &Mutex<ServerStats>,
) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let reply = format!("{label} {peer}\n");
    let mut pending = 0usize;
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending += buf[..n].iter().filter(|&&b| b == b'\n').count();
                while pending > 0 {
                    pending -= 1;
                    lock(stats).tcp_lines += 1;
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A backend's HTTP health endpoint (as an API server's `/readyz`): `GET` on any path
/// answers `200 ok` while healthy and `503 down` otherwise; switched by the test.
pub struct HealthEndpoint {
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthEndpoint {
    /// Serves on `ip:port` inside `ns`, healthy.
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<HealthEndpoint> {
        let listener = ns
            .enter(|| Ok(TcpListener::bind((ip, port))?))
            .with_context(|| format!("binding the health endpoint {ip}:{port} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (healthy.clone(), stop.clone());
        let thread = std::thread::spawn(move || health_serve(listener, &h, &s));
        Ok(HealthEndpoint {
            healthy,
            stop,
            thread: Some(thread),
        })
    }

    /// Makes the endpoint answer 200 (`true`) or 503 (`false`).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers each connection's request on this thread (checks are small and rare).
fn health_serve(listener: TcpListener, healthy: &AtomicBool, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        if stream.set_nonblocking(false).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .is_err()
        {
            continue;
        }
        // Read the request head (bounded), then answer and close.
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let (status, body) = if healthy.load(Ordering::SeqCst) {
            ("200 OK", "ok")
        } else {
            ("503 Service Unavailable", "down")
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes());
    }
}
