//! Real traffic from a lab host: UDP requests, TCP line connections, ping, and a UDP ticker.
//!
//! Every flow gets a fresh source port from the host's own counter (never reused within a
//! lab), so "a new flow" really is a 5-tuple the datapath has not seen before.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// First source port handed out by a host; ports count up from here and are never reused.
const FIRST_PORT: u16 = 20000;
/// Last source port a host hands out.
const LAST_PORT: u16 = 60999;

/// A machine in the lab: a namespace, its main IPv4 address, and a source-port allocator.
#[derive(Debug)]
pub struct Host {
    /// The host's network namespace.
    pub ns: Netns,
    /// The address traffic from this host is sent from.
    pub addr: Ipv4Addr,
    next_port: AtomicU16,
}

/// The kernel's UDP counters (`/proc/net/snmp`, `Udp:` line) in one namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// `InDatagrams`: delivered to a socket.
    pub in_datagrams: u64,
    /// `NoPorts`: no socket bound to the port.
    pub no_ports: u64,
    /// `InErrors`: dropped on receive (checksum, buffer, ...).
    pub in_errors: u64,
    /// `RcvbufErrors`: dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// `InCsumErrors`: dropped for a bad checksum.
    pub in_csum_errors: u64,
}

/// A parsed answer from a lab server (`"{server} {peer} [echo]"`).
#[derive(Clone, Debug)]
pub struct Reply {
    /// The answering server's label (pod name).
    pub server: String,
    /// The peer address the server saw for this flow.
    pub seen_peer: SocketAddr,
    /// Where the reply came from as the client saw it (UDP: the datagram's source; TCP: the
    /// connection's remote address).
    pub from: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
    /// Whatever the server echoed after the peer address (UDP payload), else empty.
    pub echoed: String,
}

impl Reply {
    fn parse(text: &str, from: SocketAddr, local: SocketAddr) -> Result<Reply> {
        let text = text.trim_end_matches('\n');
        let mut parts = text.splitn(3, ' ');
        let server = parts.next().unwrap_or_default().to_string();
        let seen_peer = parts
            .next()
            .ok_or_else(|| anyhow!("reply {text:?} from {from} has no peer address"))?
            .parse()
            .with_context(|| format!("reply {text:?} from {from}: bad peer address"))?;
        Ok(Reply {
            server,
            seen_peer,
            from,
            local,
            echoed: parts.next().unwrap_or_default().to_string(),
        })
    }
}

impl Host {
    /// Wraps a namespace whose traffic originates from `addr`.
    pub fn new(ns: Netns, addr: Ipv4Addr) -> Host {
        Host {
            ns,
            addr,
            next_port: AtomicU16::new(FIRST_PORT),
        }
    }

    /// A source port this host has never handed out before.
    pub fn fresh_port(&self) -> Result<u16> {
        let p = self.next_port.fetch_add(1, Ordering::SeqCst);
        if !(FIRST_PORT..=LAST_PORT).contains(&p) {
            bail!("host {} ran out of fresh source ports", self.ns.name());
        }
        Ok(p)
    }

    /// A UDP socket in this host's namespace bound to `addr:fresh_port` (a new flow).
    pub fn udp_socket(&self) -> Result<UdpSocket> {
        let local = SocketAddrV4::new(self.addr, self.fresh_port()?);
        self.ns
            .enter(|| UdpSocket::bind(local).with_context(|| format!("bind udp {local}")))
    }

    /// One UDP request/response on a new flow: sends `payload` to `dst` and waits up to
    /// `timeout` for a reply, resending on the same flow up to `attempts` times in all.
    /// The socket is unconnected, so a reply from a wrong source address is still received
    /// (and shows up in [`Reply::from`]) instead of being filtered by the kernel.
    pub fn udp_request(
        &self,
        dst: SocketAddr,
        payload: &str,
        timeout: Duration,
        attempts: u32,
    ) -> Result<Reply> {
        let sock = self.udp_socket()?;
        let local = sock.local_addr()?;
        for _ in 0..attempts.max(1) {
            sock.send_to(payload.as_bytes(), dst)
                .with_context(|| format!("udp send {local} -> {dst}"))?;
            if let Some(r) = recv_reply(&sock, timeout)? {
                return Ok(r);
            }
        }
        bail!("no UDP reply to {local} -> {dst} after {attempts} attempt(s) of {timeout:?}")
    }

    /// One UDP probe on a new flow: `Ok(None)` if nothing came back within `timeout`.
    pub fn udp_probe(&self, dst: SocketAddr, timeout: Duration) -> Result<Option<Reply>> {
        let sock = self.udp_socket()?;
        sock.send_to(b"probe", dst)
            .with_context(|| format!("udp send -> {dst}"))?;
        recv_reply(&sock, timeout)
    }

    /// `n` UDP request/responses, each on its own new flow (distinct source port); fails on
    /// the first flow that gets no answer (each flow may retry, see [`Host::udp_request`]).
    pub fn udp_flows(&self, dst: SocketAddr, n: usize, timeout: Duration) -> Result<Vec<Reply>> {
        (0..n)
            .map(|i| {
                self.udp_request(dst, "", timeout, 3)
                    .with_context(|| format!("UDP flow {}/{n} to {dst}", i + 1))
            })
            .collect()
    }

    /// A TCP connection from `addr:fresh_port` to `dst` (connect bounded by `timeout`).
    pub fn tcp_connect(&self, dst: SocketAddr, timeout: Duration) -> Result<LineConn> {
        let local = SocketAddrV4::new(self.addr, self.fresh_port()?);
        let stream = self
            .ns
            .enter(|| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.bind(&SocketAddr::from(local).into())?;
                s.connect_timeout(&dst.into(), timeout)?;
                Ok(TcpStream::from(s))
            })
            .with_context(|| format!("tcp connect {local} -> {dst}"))?;
        LineConn::new(stream, timeout)
    }

    /// `n` TCP connections to `dst`, each pinged once and closed.
    pub fn tcp_flows(&self, dst: SocketAddr, n: usize, timeout: Duration) -> Result<Vec<Reply>> {
        (0..n)
            .map(|i| {
                self.tcp_connect(dst, timeout)
                    .and_then(|mut c| c.ping())
                    .with_context(|| format!("TCP connection {}/{n} to {dst}", i + 1))
            })
            .collect()
    }

    /// This namespace's UDP counters (read through `/proc/thread-self/net/snmp` from a thread
    /// inside it).
    pub fn udp_counters(&self) -> Result<UdpCounters> {
        let map = self.snmp("Udp")?;
        let get = |k: &str| map.get(k).copied().unwrap_or(0);
        Ok(UdpCounters {
            in_datagrams: get("InDatagrams"),
            no_ports: get("NoPorts"),
            in_errors: get("InErrors"),
            rcvbuf_errors: get("RcvbufErrors"),
            in_csum_errors: get("InCsumErrors"),
        })
    }

    /// One group of this namespace's `/proc/net/snmp` counters (`Udp`, `Icmp`, ...),
    /// by name.
    pub fn snmp(&self, group: &str) -> Result<BTreeMap<String, u64>> {
        let text = self.ns.enter(|| {
            std::fs::read_to_string("/proc/thread-self/net/snmp").context("reading snmp")
        })?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no {group}: lines in /proc/net/snmp");
        };
        Ok(names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
            .collect())
    }

    /// `ping -c COUNT -W 1 DST` from this host; fails if any echo is lost.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<()> {
        self.ns
            .run(
                "ping",
                &[
                    "-n",
                    "-q",
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    &dst.to_string(),
                ],
            )
            .map(|_| ())
    }
}

fn recv_reply(sock: &UdpSocket, timeout: Duration) -> Result<Option<Reply>> {
    let local = sock.local_addr()?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Reply::parse(&String::from_utf8_lossy(&buf[..n]), from, local).map(Some);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None);
            }
            // An ICMP error reported on the socket (e.g. ECONNREFUSED): no answer.
            Err(e) if e.raw_os_error().is_some() && e.kind() != ErrorKind::Interrupted => {
                return Ok(None);
            }
            Err(_) => continue,
        }
    }
}

/// A TCP connection to a line server: each [`LineConn::ping`] sends a line and reads the
/// answer.
pub struct LineConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    peer: SocketAddr,
}

impl LineConn {
    fn new(stream: TcpStream, timeout: Duration) -> Result<LineConn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(LineConn {
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// The client side's address.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The address this connection was made to (e.g. VIP:80).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends one line and waits (bounded by the connect timeout) for the server's answer.
    pub fn ping(&mut self) -> Result<Reply> {
        self.stream
            .write_all(b"ping\n")
            .with_context(|| format!("tcp write {} -> {}", self.local, self.peer))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("tcp read {} <- {}", self.local, self.peer))?;
        if n == 0 || !line.ends_with('\n') {
            bail!(
                "connection {} -> {} closed before answering",
                self.local,
                self.peer
            );
        }
        Reply::parse(&line, self.peer, self.local)
    }
}

/// Result of a [`Ticker`] run.
#[derive(Clone, Debug)]
pub struct TickerReport {
    /// Tickets sent.
    pub sent: u64,
    /// Distinct tickets answered.
    pub received: u64,
    /// `sent - received` after draining.
    pub lost: u64,
    /// Largest interval between two consecutive answers while the ticker ran.
    pub max_gap: Duration,
    /// Unanswered tickets as inclusive sequence ranges (at most the first 20 ranges).
    pub missing: Vec<(u64, u64)>,
    /// Answers per server label.
    pub by_server: BTreeMap<String, u64>,
    /// Distinct source addresses the answers came from.
    pub reply_sources: BTreeSet<SocketAddr>,
    /// Distinct peer addresses the servers saw.
    pub seen_peers: BTreeSet<SocketAddr>,
}

#[derive(Default)]
struct TickerState {
    arrivals: Vec<(u64, Instant)>,
    by_server: BTreeMap<String, u64>,
    reply_sources: BTreeSet<SocketAddr>,
    seen_peers: BTreeSet<SocketAddr>,
}

/// A UDP ticker on one flow: sends a sequence number every `interval` (at most `max_count`
/// tickets) to an echo server and records each answer's arrival time.
pub struct Ticker {
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    state: Arc<Mutex<TickerState>>,
    sender: Option<JoinHandle<Result<()>>>,
    receiver: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts ticking from `host` to `dst`.
    pub fn start(
        host: &Host,
        dst: SocketAddr,
        interval: Duration,
        max_count: u64,
    ) -> Result<Ticker> {
        let tx = host.udp_socket()?;
        // A starved receiver thread must not turn into "lost" tickets: 8 MiB of buffer.
        crate::servers::force_rcvbuf(&tx, 8 << 20)?;
        let rx = tx.try_clone()?;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(TickerState::default()));
        let (stop_s, sent_s) = (stop_send.clone(), sent.clone());
        let sender = std::thread::spawn(move || -> Result<()> {
            let start = Instant::now();
            for seq in 0..max_count {
                if stop_s.load(Ordering::SeqCst) {
                    break;
                }
                // Pacing only (not synchronisation): wait for this ticket's slot.
                let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                tx.send_to(format!("t{seq}").as_bytes(), dst)
                    .with_context(|| format!("ticker send {seq}"))?;
                sent_s.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
        let (stop_r, received_r, state_r) = (stop_recv.clone(), received.clone(), state.clone());
        let local = rx.local_addr()?;
        let receiver = std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut buf = [0u8; 2048];
            // Keeps receiving after the sender stops, until `finish` has drained.
            while !stop_r.load(Ordering::SeqCst) {
                let Ok((n, from)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                let now = Instant::now();
                let Ok(reply) = Reply::parse(&String::from_utf8_lossy(&buf[..n]), from, local)
                else {
                    continue;
                };
                let Some(seq) = reply
                    .echoed
                    .strip_prefix('t')
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                let mut st = state_r.lock().unwrap_or_else(|e| e.into_inner());
                st.reply_sources.insert(from);
                st.seen_peers.insert(reply.seen_peer);
                *st.by_server.entry(reply.server).or_default() += 1;
                if seen.insert(seq) {
                    st.arrivals.push((seq, now));
                    received_r.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Ok(Ticker {
            stop_send,
            stop_recv,
            sent,
            received,
            state,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Tickets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Distinct tickets answered so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Waits (bounded by `timeout`) until at least `n` tickets have been answered.
    pub fn wait_received(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.received() < n {
            if Instant::now() > deadline {
                bail!(
                    "ticker: only {} of {n} tickets answered within {timeout:?} ({} sent)",
                    self.received(),
                    self.sent()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops sending, waits up to `drain` for outstanding answers, and reports.
    pub fn finish(mut self, drain: Duration) -> Result<TickerReport> {
        self.stop_send.store(true, Ordering::SeqCst);
        let send_result = self.sender.take().map(|h| h.join());
        let deadline = Instant::now() + drain;
        while self.received() < self.sent() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_recv.store(true, Ordering::SeqCst);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
        match send_result {
            Some(Ok(r)) => r?,
            Some(Err(_)) => bail!("ticker sender panicked"),
            None => {}
        }
        Ok(self.report())
    }

    fn report(&self) -> TickerReport {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut times: Vec<Instant> = st.arrivals.iter().map(|&(_, t)| t).collect();
        times.sort();
        let max_gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let sent = self.sent();
        let received = self.received();
        let got: BTreeSet<u64> = st.arrivals.iter().map(|&(seq, _)| seq).collect();
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for seq in (0..sent).filter(|s| !got.contains(s)) {
            let full = missing.len() >= 20;
            match missing.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ if full => break,
                _ => missing.push((seq, seq)),
            }
        }
        TickerReport {
            sent,
            received,
            lost: sent.saturating_sub(received),
            max_gap,
            missing,
            by_server: st.by_server.clone(),
            reply_sources: st.reply_sources.clone(),
            seen_peers: st.seen_peers.clone(),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop_send.store(true, Ordering::SeqCst);
        self.stop_recv.store(true, Ordering::SeqCst);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}
