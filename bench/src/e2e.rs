//! End to end in the netns lab: packets/s delivered to a pod through a node, for every
//! system on the same topology, and TCP connections/s with request latency.
//!
//! Every system gets its own one-node lab (client → node → pod over default veths: no
//! pass-through XDP, offloads as created, nothing pre-resolved), all built up front so
//! rounds can interleave them (A B C … A B C …). The generator is `trafgen` (AF_PACKET
//! TX ring through the qdisc path, one process) sending 60-byte frames (18-byte UDP
//! payload) from a template the bench writes; the pod drops them in nft prerouting at
//! priority -300, and packets are counted at the pod's `eth0` (`ip -s -j link`) over a
//! window while the generator runs. "Direct" sends from the node's side of the pod veth
//! straight to the pod: the sender+receiver cost that no node can remove. Reported per
//! system: node-added ns/packet = 1e9/pps − 1e9/pps_direct (lab-measurement.md).
//!
//! Shapes: 256 established flows (source ports 39936..40191), and a new flow every
//! packet (random source address in 10.77.0.0/16, routed back to the client, and random
//! source port), which is where iptables' rule count costs.
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use xlb_lab::Lab;
use xlb_lab::lab::{CLIENT_ADDR, UPLINK};
use xlb_lab::manifests::{
    EndpointSpec, WEB_TCP_PORT, WEB_UDP_PORT, WEB_VIP, endpointslice_yaml, service_yaml,
    write_atomic,
};
use xlb_lab::servers::UDP_ECHO_PORT;

use crate::Scale;
use crate::server::{POOL_PORT, PoolServer};
use crate::stats::{median, num, percentile, round, spread};
use crate::sys::Proc;

/// Random client sources of the new-flow shape; each node routes it back to the client.
const NEW_FLOW_NET: &str = "10.77.0.0/16";
/// The e2e Services' ports: (protocol, VIP port, pod port), as in `web_ports()`.
const E2E_PORTS: [(&str, u16, u16); 2] = [
    ("udp", WEB_UDP_PORT, UDP_ECHO_PORT),
    ("tcp", WEB_TCP_PORT, POOL_PORT),
];
/// Upper bound on packets one trafgen run may send (it is stopped after the window).
const TRAFGEN_MAX_PACKETS: u64 = 50_000_000;

/// Traffic shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// 256 flows, conntrack hits after the first packets.
    Established,
    /// A new 5-tuple every packet.
    NewFlows,
}

impl Shape {
    const ALL: [Shape; 2] = [Shape::Established, Shape::NewFlows];

    fn key(self) -> &'static str {
        match self {
            Shape::Established => "established",
            Shape::NewFlows => "new_flows",
        }
    }
}

/// What a lab's node runs.
#[derive(Clone, Debug)]
enum Kind {
    Direct,
    Route,
    Iptables,
    Nftables,
    /// xlb with these extra agent flags; `gro`: GRO on the pod's veth (what `--forward
    /// redirect` needs from a veth pod).
    /// `bin`: another `xlb` binary than the one under test (`XLBB_XLB_BEFORE`).
    Xlb {
        args: Vec<&'static str>,
        gro: bool,
        bin: Option<PathBuf>,
    },
    Haproxy,
}

/// One system under test: its lab and how to send to it.
struct System {
    key: String,
    label: String,
    services: usize,
    kind: Kind,
    lab: Lab,
    /// Namespace and device trafgen sends from.
    sender_ns: String,
    sender_dev: String,
    confs: Vec<(Shape, PathBuf)>,
    _haproxy: Option<Proc>,
    pool: PoolServer,
    /// Why the system never delivered, if it did not.
    broken: Option<String>,
}

/// Sizes of this run.
struct Plan {
    rounds: usize,
    warmup: Duration,
    window: Duration,
    tcp_rounds: usize,
    tcp_window: Duration,
    tcp_threads: usize,
    many: usize,
}

/// Builds every system, runs the interleaved UDP and TCP rounds, returns the JSON part.
pub fn run(scale: Scale) -> Result<Value> {
    let plan = if scale.quick {
        Plan {
            rounds: 2,
            warmup: Duration::from_millis(30),
            window: Duration::from_millis(150),
            tcp_rounds: 1,
            tcp_window: Duration::from_millis(300),
            tcp_threads: 2,
            many: scale.e2e_many(),
        }
    } else {
        Plan {
            rounds: 5,
            warmup: Duration::from_millis(200),
            window: Duration::from_millis(1000),
            tcp_rounds: 3,
            tcp_window: Duration::from_secs(2),
            tcp_threads: 2,
            many: scale.e2e_many(),
        }
    };
    let many = plan.many;
    let specs: Vec<(String, String, usize, Kind)> = {
        let mut v = vec![
            ("direct".into(), "direct client→pod".into(), 0, Kind::Direct),
            ("route".into(), "plain routing".into(), 0, Kind::Route),
        ];
        for n in [1, many] {
            v.push((
                format!("iptables_{n}"),
                format!("iptables DNAT, {n} svc"),
                n,
                Kind::Iptables,
            ));
            v.push((
                format!("nftables_{n}"),
                format!("nftables numgen, {n} svc"),
                n,
                Kind::Nftables,
            ));
            for (mode, args, gro) in [
                ("generic", vec!["--xdp-mode", "generic"], false),
                // No XDP program: the whole datapath at TC ingress.
                ("tc", vec!["--xdp-mode", "tc"], false),
                ("native", vec!["--xdp-mode", "native"], false),
                // (`--xdp-mode native --forward redirect` is refused on a veth uplink:
                // native XDP there sees partial checksums it cannot complete.)
                ("redirect_generic", vec!["--forward", "redirect"], true),
                // Every kernel-feature fallback: hand-off slot, netlink TC filters.
                (
                    "fallback",
                    vec!["--xdp-mode", "generic", "--force-fallback", "all"],
                    false,
                ),
                // XDP hands local deliveries to TC in the per-CPU slot, not metadata.
                (
                    "fallback_meta",
                    vec!["--xdp-mode", "generic", "--force-fallback", "xdp-meta"],
                    false,
                ),
                // The TC datapath's fallbacks, each alone and all together: netlink TC
                // filters; neighbours kept resolved without managed entries.
                (
                    "tc_fallback_tcx",
                    vec!["--xdp-mode", "tc", "--force-fallback", "tcx"],
                    false,
                ),
                (
                    "tc_fallback_neigh",
                    vec!["--xdp-mode", "tc", "--force-fallback", "managed-neigh"],
                    false,
                ),
                (
                    "tc_fallback",
                    vec!["--xdp-mode", "tc", "--force-fallback", "all"],
                    false,
                ),
            ] {
                v.push((
                    format!("xlb_{mode}_{n}"),
                    format!("xlb {}, {n} svc", args.join(" ")),
                    n,
                    Kind::Xlb {
                        args,
                        gro,
                        bin: None,
                    },
                ));
            }
            // XLBB_XLB_BEFORE=/path/to/older/xlb: the default mode again with that
            // binary, interleaved with the rest, for a before/after in one run.
            if let Some(bin) = std::env::var_os("XLBB_XLB_BEFORE") {
                v.push((
                    format!("xlb_before_generic_{n}"),
                    format!("xlb (before) --xdp-mode generic, {n} svc"),
                    n,
                    Kind::Xlb {
                        args: vec!["--xdp-mode", "generic"],
                        gro: false,
                        bin: Some(PathBuf::from(bin)),
                    },
                ));
            }
        }
        v.push((
            "haproxy".into(),
            "HAProxy (TCP mode)".into(),
            1,
            Kind::Haproxy,
        ));
        v
    };
    // XLBB_E2E_ONLY=key,...: only these systems (and the direct baseline) are built and
    // run; XLBB_E2E_SHAPES=established|new_flows: only that shape is sent (the other's
    // cells stay empty). For profiling one system by hand.
    let mut specs = specs;
    if let Ok(only) = std::env::var("XLBB_E2E_ONLY") {
        let only: Vec<&str> = only.split(',').collect();
        specs.retain(|(key, ..)| only.contains(&key.as_str()) || key == "direct");
    }
    let shapes_only = std::env::var("XLBB_E2E_SHAPES").ok();
    println!("e2e: building {} labs", specs.len());
    let mut systems = Vec::new();
    for (key, label, services, kind) in specs {
        let sys = build(&key, &label, services, kind)
            .with_context(|| format!("e2e: setting up {key}"))?;
        systems.push(sys);
    }
    for s in systems.iter_mut() {
        // A system that does not deliver valid packets (the pod answers nothing) is a
        // finding: recorded with what it did to the packets, printed, and left out of the
        // rounds; the rest of the run goes on.
        if let Err(e) = wait_ready(s) {
            let why = format!("{e:#}; {}", diagnose(s));
            eprintln!("e2e: {} FAILED to deliver: {why}", s.key);
            s.broken = Some(why);
        }
        drop_udp_at_pod(&s.lab)?;
        if matches!(s.kind, Kind::Xlb { .. })
            && let Some(pid) = s.lab.agent()?.pid()
        {
            keep_off_sender_cpu(pid)?;
        }
    }

    // UDP: interleaved rounds over every system and shape.
    let udp_systems: Vec<&System> = systems
        .iter()
        .filter(|s| !matches!(s.kind, Kind::Haproxy))
        .collect();
    let mut pps: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 2]; udp_systems.len()];
    let mut errors: Vec<Vec<Vec<String>>> = vec![vec![Vec::new(); 2]; udp_systems.len()];
    println!(
        "e2e: UDP, {} rounds x {} systems x 2 shapes, {:?} windows",
        plan.rounds,
        udp_systems.len(),
        plan.window
    );
    for round in 0..plan.rounds {
        for (i, s) in udp_systems.iter().enumerate() {
            for (j, shape) in Shape::ALL.iter().enumerate() {
                // A system that stops delivering is a finding, not a reason to lose the
                // rest of the run: recorded (and printed) next to its samples.
                let skipped = shapes_only.as_deref().is_some_and(|o| o != shape.key());
                if s.broken.is_some() || skipped {
                    pps[i][j].push(f64::NAN);
                    continue;
                }
                match measure_pps(s, *shape, &plan) {
                    Ok(p) => pps[i][j].push(p),
                    Err(e) => {
                        let e = format!("round {}: {e:#}", round + 1);
                        eprintln!("e2e: {} {}: FAILED: {e}", s.key, shape.key());
                        pps[i][j].push(f64::NAN);
                        errors[i][j].push(e);
                    }
                }
            }
        }
        println!("e2e: UDP round {} of {} done", round + 1, plan.rounds);
    }

    // TCP: connections/s and request latency, xlb (default attach mode), iptables, HAProxy.
    let tcp_keys: Vec<&str> = ["xlb_tc_1", "iptables_1", "haproxy"]
        .into_iter()
        .filter(|k| systems.iter().any(|s| s.key == *k))
        .collect();
    let mut tcp: Vec<(String, Vec<TcpRun>)> =
        tcp_keys.iter().map(|k| (k.to_string(), vec![])).collect();
    println!(
        "e2e: TCP, {} rounds x {} systems, {:?} each",
        plan.tcp_rounds,
        tcp_keys.len(),
        plan.tcp_window
    );
    for _ in 0..plan.tcp_rounds {
        for (key, runs) in tcp.iter_mut() {
            let s = systems
                .iter()
                .find(|s| &s.key == key)
                .context("tcp system")?;
            let target = SocketAddr::from((WEB_VIP, WEB_TCP_PORT));
            let result = match &s.broken {
                Some(_) => Err(anyhow::anyhow!("never delivered (see its UDP row)")),
                None => tcp_run(&s.lab, target, plan.tcp_threads, plan.tcp_window),
            };
            match result {
                Ok(r) => runs.push(r),
                Err(e) => {
                    eprintln!("e2e: TCP through {key}: FAILED: {e:#}");
                    runs.push(TcpRun {
                        ok: 0,
                        failed: 0,
                        secs: f64::NAN,
                        latencies_us: Vec::new(),
                    });
                }
            }
        }
    }
    Ok(summarise(
        &systems,
        &udp_systems,
        &pps,
        &errors,
        &tcp,
        &plan,
    ))
}

/// Creates the lab for one system and configures its node.
fn build(key: &str, label: &str, services: usize, kind: Kind) -> Result<System> {
    let mut lab = Lab::one_node(1)?;
    let node_ns = lab.node().host.ns.name().to_string();
    let client_ns = lab.client.ns.name().to_string();
    let pod = lab.node().pods[0].ip;
    let vp = lab.node().pods[0].node_veth.clone();
    // The new-flow shape's random sources are routed back to the client, as a real
    // network would; strict reverse-path filtering would otherwise have a say.
    lab.node().host.ns.ip(&[
        "route",
        "add",
        NEW_FLOW_NET,
        "via",
        &CLIENT_ADDR.to_string(),
        "dev",
        UPLINK,
    ])?;
    let mut haproxy = None;
    let pool = PoolServer::start(&lab.node().pods[0].host.ns)?;
    let scratch = lab.scratch().to_path_buf();
    match &kind {
        Kind::Direct | Kind::Route => {}
        Kind::Iptables => {
            let file = scratch.join("iptables.rules");
            std::fs::write(
                &file,
                iptables_rules(&e2e_services(services, pod), &E2E_PORTS),
            )?;
            let mut cmd = lab.node().host.ns.command("iptables-restore");
            crate::sys::run_timed(&mut cmd, Duration::from_secs(120), Some(&file))?;
            udp_timeout(&lab)?;
        }
        Kind::Nftables => {
            let file = scratch.join("nftables.nft");
            std::fs::write(&file, nft_rules(&e2e_services(services, pod)))?;
            lab.node()
                .host
                .ns
                .run("nft", &["-f", &file.to_string_lossy()])?;
            udp_timeout(&lab)?;
        }
        Kind::Xlb { args, gro, bin } => {
            let node_name = lab.node().name.clone();
            let dir = lab.node().manifests_dir.clone();
            if services > 1 {
                write_atomic(
                    &dir.join("others.yaml"),
                    &dummy_services(services - 1, &node_name),
                )?;
            }
            write_atomic(&dir.join("web.yaml"), &web_yaml_pool(pod, &node_name))?;
            if *gro {
                set_gro(&lab.node().pods[0].host.ns, "eth0")?;
            }
            lab.node_mut().agent_args = args.iter().map(|a| a.to_string()).collect();
            match bin {
                Some(bin) => {
                    lab.node_mut().start_agent(bin, &dir)?;
                }
                None => {
                    lab.start_agent()?;
                }
            }
        }
        Kind::Haproxy => {
            let ns = &lab.node().host.ns;
            ns.ip(&["addr", "add", &format!("{WEB_VIP}/32"), "dev", "lo"])?;
            let cfg = scratch.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 4000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
                     frontend vip\n  bind {WEB_VIP}:{WEB_TCP_PORT}\n  default_backend pods\n\
                     backend pods\n  balance roundrobin\n  server pod1 {pod}:{POOL_PORT}\n"
                ),
            )?;
            let log = std::fs::File::create(scratch.join("haproxy.log"))?;
            let mut cmd = ns.command("haproxy");
            cmd.arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            haproxy = Some(Proc::spawn(&mut cmd, "haproxy")?);
        }
    }
    let (sender_ns, sender_dev, src_mac, dst_mac, dst, dport) = match kind {
        Kind::Direct => (
            node_ns.clone(),
            vp.clone(),
            mac(&node_ns, &vp)?,
            mac(lab.node().pods[0].host.ns.name(), "eth0")?,
            pod,
            UDP_ECHO_PORT,
        ),
        Kind::Route => (
            client_ns.clone(),
            "eth0".to_string(),
            mac(&client_ns, "eth0")?,
            mac(&node_ns, UPLINK)?,
            pod,
            UDP_ECHO_PORT,
        ),
        _ => (
            client_ns.clone(),
            "eth0".to_string(),
            mac(&client_ns, "eth0")?,
            mac(&node_ns, UPLINK)?,
            WEB_VIP,
            WEB_UDP_PORT,
        ),
    };
    let mut confs = Vec::new();
    for shape in Shape::ALL {
        let path = scratch.join(format!("trafgen-{}.cfg", shape.key()));
        std::fs::write(&path, trafgen_conf(src_mac, dst_mac, dst, dport, shape))?;
        confs.push((shape, path));
    }
    Ok(System {
        key: key.to_string(),
        label: label.to_string(),
        services,
        kind,
        lab,
        sender_ns,
        sender_dev,
        confs,
        _haproxy: haproxy,
        pool,
        broken: None,
    })
}

/// Waits (bounded) until the system delivers: the agent is healthy and UDP through the
/// VIP (or to the pod) is answered by the pod, and TCP where the system serves it.
fn wait_ready(s: &mut System) -> Result<()> {
    let every = Duration::from_millis(100);
    if matches!(s.kind, Kind::Xlb { .. }) {
        // Programming many Services takes a while; a packet problem should not.
        let want = 2.0 * s.services as f64;
        let agent = s.lab.agent()?;
        agent.wait_healthy(Duration::from_secs(60))?;
        xlb_lab::poll(
            "the agent to program every Service",
            Duration::from_secs(600),
            every,
            || Ok((agent.metric("xlb_services", &[])? >= want).then_some(())),
        )?;
    }
    let soon = Duration::from_secs(10);
    let s = &*s;
    let pod = s.lab.node().pods[0].ip;
    let udp_target = match s.kind {
        Kind::Direct | Kind::Route => Some(SocketAddr::from((pod, UDP_ECHO_PORT))),
        Kind::Haproxy => None,
        _ => Some(SocketAddr::from((WEB_VIP, WEB_UDP_PORT))),
    };
    if let Some(t) = udp_target {
        let from = match s.kind {
            Kind::Direct => &s.lab.node().host,
            _ => &s.lab.client,
        };
        xlb_lab::poll(&format!("{t} to answer"), soon, every, || {
            from.udp_probe(t, Duration::from_millis(200))
        })?;
    }
    if matches!(
        s.kind,
        Kind::Haproxy | Kind::Iptables | Kind::Nftables | Kind::Xlb { .. }
    ) {
        let t = SocketAddr::from((WEB_VIP, WEB_TCP_PORT));
        xlb_lab::poll(&format!("TCP {t} to answer"), soon, every, || {
            Ok(s.lab.client.ns.enter(|| request(t)).ok())
        })?;
    }
    Ok(())
}

/// What a system that never delivered did with the packets: the agent's datapath
/// reasons (non-zero), the pod interface's counters, and the agent log's tail.
fn diagnose(s: &mut System) -> String {
    let pod_ns = s.lab.node().pods[0].host.ns.name().to_string();
    let pod =
        xlb_lab::netns::run(Command::new("ip").args(["-n", &pod_ns, "-s", "link", "show", "eth0"]))
            .unwrap_or_default();
    let udp = s.lab.node().pods[0].host.udp_counters();
    let pod = format!("{pod}\npod UDP counters: {udp:?}");
    let Ok(agent) = s.lab.agent() else {
        return format!("pod eth0:\n{pod}");
    };
    let reasons: Vec<String> = agent
        .metrics()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.name == "xlb_datapath_packets_total" && m.value > 0.0)
        .map(|m| format!("{:?}={}", m.labels, m.value))
        .collect();
    let log = xlb_lab::agent::tail(&xlb_lab::agent::strip_ansi(&agent.log()), 15);
    format!("datapath reasons: {reasons:?}\npod eth0:\n{pod}\nagent log tail:\n{log}")
}

/// The pod drops the bench's UDP before its stack does anything else with it, so the
/// receiver's socket layer is not what is measured.
fn drop_udp_at_pod(lab: &Lab) -> Result<()> {
    lab.node().pods[0].host.ns.run(
        "nft",
        &[&format!(
            "add table ip xlbbench; add chain ip xlbbench pre {{ type filter hook prerouting priority -300; }}; \
             add rule ip xlbbench pre udp dport {UDP_ECHO_PORT} counter drop"
        )],
    )?;
    Ok(())
}

/// Unreplied UDP conntrack entries of the new-flow shape live 30 s by default; with
/// hundreds of thousands per window the table (nf_conntrack_max) would fill up across
/// rounds and measure early-drop instead. Shortened in this node's namespace only.
fn udp_timeout(lab: &Lab) -> Result<()> {
    lab.node()
        .host
        .ns
        .sysctl("net/netfilter/nf_conntrack_udp_timeout", "2")
}

/// `ip -j link show` → the device's MAC.
fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = xlb_lab::netns::run(Command::new("ip").args(["-n", ns, "-j", "link", "show", dev]))?;
    let v: Value = serde_json::from_str(&out)?;
    let text = v[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC for {dev} in {ns}"))?;
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// Packets received by `eth0` in `ns` (`ip -s -j link`).
fn rx_packets(ns: &str) -> Result<u64> {
    let out = xlb_lab::netns::run(
        Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "eth0"]),
    )?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packets for eth0 in {ns}"))
}

/// A trafgen packet template: Ethernet, IPv4 (checksum recomputed per packet), UDP
/// (checksum recomputed) with an 18-byte payload; 60 bytes on the wire.
fn trafgen_conf(src: [u8; 6], dst: [u8; 6], ip: Ipv4Addr, dport: u16, shape: Shape) -> String {
    let hex = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let d = ip.octets();
    let (saddr, sport) = match shape {
        Shape::Established => (
            "10, 0, 0, 1".to_string(),
            "0x9c, dinc(0, 255, 1)".to_string(),
        ),
        Shape::NewFlows => (
            "10, 77, drnd(), drnd()".to_string(),
            "drnd(), drnd()".to_string(),
        ),
    };
    format!(
        "/* written by xlb-bench ({}) */\n{{\n  {}, {}, 0x08, 0x00,\n  \
         0x45, 0x00, c16(46), c16(0), 0x40, 0x00, 64, 17, csumip(14, 33),\n  \
         {saddr}, {}, {}, {}, {},\n  {sport}, c16({dport}), c16(26), csumudp(14, 34),\n  \
         fill(0x78, 18)\n}}\n",
        shape.key(),
        hex(dst),
        hex(src),
        d[0],
        d[1],
        d[2],
        d[3]
    )
}

/// The CPU trafgen is pinned to: the last one this process may use.
fn sender_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Moves every thread of process `pid` (an idle agent of a system not being measured)
/// off [`sender_cpu`]: an agent's periodic work (a conntrack sweep reads a full map
/// in ~0.1 s) landing on the sender's CPU otherwise takes 10–20 % off the window of
/// whichever system is measured then. With one CPU there is nowhere to move it.
fn keep_off_sender_cpu(pid: u32) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return Ok(());
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in (0..cpus).filter(|&c| c != sender_cpu()) {
        // SAFETY: cpu < cpus <= CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // SAFETY: set is a valid cpu_set_t of the size passed.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("moving agent thread {tid} off CPU {}: {e}", sender_cpu());
        }
    }
    Ok(())
}

/// One window of delivered packets/s for `s` with `shape`.
fn measure_pps(s: &System, shape: Shape, plan: &Plan) -> Result<f64> {
    let conf = &s
        .confs
        .iter()
        .find(|(sh, _)| *sh == shape)
        .context("no trafgen conf")?
        .1;
    let pod_ns = s.lab.node().pods[0].host.ns.name();
    let log = std::fs::File::create(s.lab.scratch().join("trafgen.log"))?;
    let before = rx_packets(pod_ns)?;
    // `ip netns exec` (not nsenter): trafgen looks its device up in /sys, which must be
    // the namespace's own.
    // Pinned to one CPU: the whole veth path runs in the sender's context, and a
    // sender the scheduler moves between CPUs spread one system's windows by ±20 %
    // here (±5 % pinned).
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &sender_cpu().to_string()])
        .args(["ip", "netns", "exec", &s.sender_ns])
        .args(["trafgen", "--dev", &s.sender_dev, "--conf"])
        .arg(conf)
        .args([
            "--qdisc-path",
            "--cpus",
            "1",
            "--no-sock-mem",
            "--notouch-irq",
        ])
        .args(["--no-cpu-stats", "--num", &TRAFGEN_MAX_PACKETS.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut tg = Proc::spawn(&mut cmd, "trafgen")?;
    xlb_lab::poll(
        "trafgen's packets to reach the pod",
        Duration::from_secs(5),
        Duration::from_millis(2),
        || {
            tg.check_running()?;
            // Beyond the odd ARP request the interface also counts.
            Ok((rx_packets(pod_ns)? > before + 100).then_some(()))
        },
    )?;
    std::thread::sleep(plan.warmup);
    let (c1, t1) = (rx_packets(pod_ns)?, Instant::now());
    std::thread::sleep(plan.window);
    let (c2, t2) = (rx_packets(pod_ns)?, Instant::now());
    tg.check_running()
        .context("trafgen stopped inside the measuring window")?;
    tg.stop(Duration::from_secs(2));
    ensure!(c2 > c1, "no packet reached the pod during the window");
    Ok((c2 - c1) as f64 / (t2 - t1).as_secs_f64())
}

/// One TCP measurement.
struct TcpRun {
    ok: u64,
    failed: u64,
    secs: f64,
    latencies_us: Vec<f64>,
}

/// `threads` clients in the client namespace, each looping connect → one line → answer →
/// close to `target` for `window` (and at most 200,000 connections in all).
fn tcp_run(lab: &Lab, target: SocketAddr, threads: usize, window: Duration) -> Result<TcpRun> {
    const MAX_CONNS: u64 = 200_000;
    let path = lab.client.ns.path();
    lab.client.ns.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
    let start = Instant::now();
    let deadline = start + window;
    let results: Vec<Result<(u64, u64, Vec<f64>)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let path = path.clone();
                sc.spawn(move || {
                    xlb_lab::netns::in_netns(&path, || {
                        let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                        while Instant::now() < deadline && ok + failed < MAX_CONNS / threads as u64
                        {
                            let t0 = Instant::now();
                            match request(target) {
                                Ok(()) => {
                                    ok += 1;
                                    lat.push(t0.elapsed().as_secs_f64() * 1e6);
                                }
                                Err(_) => failed += 1,
                            }
                        }
                        Ok((ok, failed, lat))
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut run = TcpRun {
        ok: 0,
        failed: 0,
        secs,
        latencies_us: Vec::new(),
    };
    for r in results {
        let (ok, failed, lat) = r?;
        run.ok += ok;
        run.failed += failed;
        run.latencies_us.extend(lat);
    }
    ensure!(run.ok > 0, "no TCP request to {target} succeeded");
    Ok(run)
}

/// connect, write one line, read the answer line, close.
fn request(target: SocketAddr) -> Result<()> {
    let t = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&target, t)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(t))?;
    s.write_all(b"bench\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if !line.ends_with('\n') {
        bail!("short answer");
    }
    Ok(())
}

/// (VIP, endpoints) of the e2e Services: `n − 1` others first, the target (the lab's pod
/// behind `WEB_VIP`) last.
fn e2e_services(n: usize, pod: Ipv4Addr) -> Vec<(Ipv4Addr, Vec<Ipv4Addr>)> {
    let mut v: Vec<_> = (0..n.saturating_sub(1))
        .map(|i| (other_vip(i), vec![other_endpoint(i)]))
        .collect();
    v.push((WEB_VIP, vec![pod]));
    v
}

fn other_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn other_endpoint(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8)
}

/// The target Service `demo/web` (UDP 53 → the lab's echo 5353, TCP 80 → the pool
/// server) and its one-endpoint slice.
fn web_yaml_pool(pod: Ipv4Addr, node: &str) -> String {
    let ports = e2e_ports();
    xlb_lab::manifests::multi_doc(&[
        service_yaml("demo", "web", &WEB_VIP.to_string(), &ports, true),
        endpointslice_yaml(
            "demo",
            "web-abc12",
            "web",
            &ports,
            &[EndpointSpec::new(pod, true, node)],
        ),
    ])
}

fn e2e_ports() -> Vec<xlb_lab::manifests::PortSpec> {
    vec![
        xlb_lab::manifests::PortSpec::new("http", "TCP", WEB_TCP_PORT, POOL_PORT),
        xlb_lab::manifests::PortSpec::new("dns", "UDP", WEB_UDP_PORT, UDP_ECHO_PORT),
    ]
}

/// `n` other Services (one endpoint each, not reachable) in one manifests file.
fn dummy_services(n: usize, node: &str) -> String {
    let ports = e2e_ports();
    let mut text = String::new();
    for i in 0..n {
        let name = format!("other-{i}");
        let _ = write!(
            text,
            "{}---\n{}---\n",
            service_yaml("bench", &name, &other_vip(i).to_string(), &ports, true),
            endpointslice_yaml(
                "bench",
                &format!("{name}-1"),
                &name,
                &ports,
                &[EndpointSpec::new(other_endpoint(i), true, node)]
            )
        );
    }
    text
}

/// kube-proxy's iptables mode for `services` (UDP 53 → 5353 and TCP 80 → 8080 each):
/// KUBE-SERVICES matches VIP:port in order, KUBE-SVC picks an endpoint with
/// `statistic --mode random`, KUBE-SEP DNATs.
pub fn iptables_rules(
    services: &[(Ipv4Addr, Vec<Ipv4Addr>)],
    ports: &[(&str, u16, u16)],
) -> String {
    let mut chains = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A PREROUTING -j KUBE-SERVICES\n");
    for (i, (vip, eps)) in services.iter().enumerate() {
        for &(proto, port, target) in ports {
            let svc = format!("KUBE-SVC-{i}-{proto}");
            let _ = writeln!(chains, ":{svc} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport {port} -j {svc}"
            );
            for (e, ep) in eps.iter().enumerate() {
                let sep = format!("KUBE-SEP-{i}-{proto}-{e}");
                let _ = writeln!(chains, ":{sep} - [0:0]");
                let left = eps.len() - e;
                if left > 1 {
                    let _ = writeln!(
                        rules,
                        "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}",
                        1.0 / left as f64
                    );
                } else {
                    let _ = writeln!(rules, "-A {svc} -j {sep}");
                }
                let _ = writeln!(
                    rules,
                    "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ep}:{target}"
                );
            }
        }
    }
    chains + &rules + "COMMIT\n"
}

/// kube-proxy's nftables mode for `services`: one verdict map from VIP . proto . port to
/// the service chain, which picks an endpoint chain with `numgen random mod N`.
fn nft_rules(services: &[(Ipv4Addr, Vec<Ipv4Addr>)]) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    for (i, (vip, eps)) in services.iter().enumerate() {
        for &(proto, port, target) in &E2E_PORTS {
            let svc = format!("service-{i}-{proto}");
            elements.push(format!("{vip} . {proto} . {port} : goto {svc}"));
            let picks: Vec<String> = (0..eps.len())
                .map(|e| format!("{e} : goto endpoint-{i}-{proto}-{e}"))
                .collect();
            let _ = writeln!(
                chains,
                "  chain {svc} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
                eps.len(),
                picks.join(", ")
            );
            for (e, ep) in eps.iter().enumerate() {
                let _ = writeln!(
                    chains,
                    "  chain endpoint-{i}-{proto}-{e} {{\n    meta l4proto {proto} dnat to {ep}:{target}\n  }}"
                );
            }
        }
    }
    format!(
        "table ip kube-proxy {{\n  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}\n\
         {chains}  chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n}}\n",
        elements.join(",\n      ")
    )
}

/// Turns GRO on for `ifname` in `ns` (legacy ETHTOOL_SGRO), what a veth needs to accept
/// frames redirected by XDP from another device.
fn set_gro(ns: &xlb_lab::Netns, ifname: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let name = ifname.to_string();
    ns.enter(move || {
        let mut value = Value {
            cmd: ETHTOOL_SGRO,
            data: 1,
        };
        let mut ifr = Ifreq {
            name: [0; libc::IFNAMSIZ],
            data: (&mut value as *mut Value).cast(),
            _pad: [0; 16],
        };
        for (d, s) in ifr
            .name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        // SAFETY: creating a socket has no memory-safety preconditions.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: ifr and value outlive the call; the kernel reads exactly these.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr as *mut Ifreq) };
        let err = std::io::Error::last_os_error();
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd) };
        ensure!(rc == 0, "ETHTOOL_SGRO on {name}: {err}");
        Ok(())
    })
}

/// Medians, spreads, node-added costs and ratios, plus the Markdown table.
fn summarise(
    all: &[System],
    systems: &[&System],
    pps: &[Vec<Vec<f64>>],
    errors: &[Vec<Vec<String>>],
    tcp: &[(String, Vec<TcpRun>)],
    plan: &Plan,
) -> Value {
    let idx = |k: &str| systems.iter().position(|s| s.key == k);
    let med = |k: &str, j: usize| idx(k).map(|i| median(&pps[i][j])).unwrap_or(f64::NAN);
    let added = |k: &str, j: usize| 1e9 / med(k, j) - 1e9 / med("direct", j);
    let mut rows = Vec::new();
    let mut md = String::from(
        "| system | 256 flows: node-added ns/pkt | kpps | new flow per packet: node-added ns/pkt | kpps |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for (i, s) in systems.iter().enumerate() {
        let mut shapes = serde_json::Map::new();
        let mut cells = Vec::new();
        for (j, shape) in Shape::ALL.iter().enumerate() {
            let m = median(&pps[i][j]);
            let a = if s.key == "direct" {
                0.0
            } else {
                added(&s.key, j)
            };
            shapes.insert(
                shape.key().into(),
                json!({
                    "pps_median": num(round(m, 0)),
                    "pps_samples": pps[i][j].iter().map(|x| num(round(*x, 0))).collect::<Vec<_>>(),
                    "errors": errors[i][j],
                    "spread": num(round(spread(&pps[i][j]), 3)),
                    "node_added_ns": num(round(a, 1)),
                    "pps_vs_iptables": num(round(m / med(&format!("iptables_{}", s.services.max(1)), j), 3)),
                    "pps_vs_route": num(round(m / med("route", j), 3)),
                }),
            );
            cells.push(if s.key == "direct" {
                "(fixed cost)".to_string()
            } else if s.broken.is_some() {
                "never delivered".to_string()
            } else {
                format!("{a:.0}")
            });
            cells.push(if s.broken.is_some() {
                "-".to_string()
            } else {
                format!("{:.0}", m / 1e3)
            });
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            s.label, cells[0], cells[1], cells[2], cells[3]
        );
        rows.push(json!({
            "key": s.key, "label": s.label, "services": s.services, "shapes": Value::Object(shapes),
            "never_delivered": s.broken,
        }));
    }
    let mut tcp_rows = Vec::new();
    let _ = write!(
        md,
        "\n| TCP (connect, one line each way, close) | connections/s | p50 µs | p99 µs | failed |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for (key, runs) in tcp {
        let cps: Vec<f64> = runs.iter().map(|r| r.ok as f64 / r.secs).collect();
        let lat: Vec<f64> = runs.iter().flat_map(|r| r.latencies_us.clone()).collect();
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        let failed: u64 = runs.iter().map(|r| r.failed).sum();
        let label = all
            .iter()
            .find(|s| &s.key == key)
            .map(|s| s.label.clone())
            .unwrap_or_default();
        let served = all.iter().find(|s| &s.key == key).map(|s| s.pool.served());
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {p50:.0} | {p99:.0} | {failed} |",
            median(&cps)
        );
        tcp_rows.push(json!({
            "key": key, "cps_median": num(round(median(&cps), 0)),
            "cps_samples": cps.iter().map(|x| round(*x, 0)).collect::<Vec<_>>(),
            "spread": num(round(spread(&cps), 3)),
            "latency_p50_us": num(round(p50, 1)), "latency_p99_us": num(round(p99, 1)),
            "requests": runs.iter().map(|r| r.ok).sum::<u64>(), "failed": failed,
            "pod_served_connections": served,
        }));
    }
    println!("\n{md}");
    json!({
        "method": format!(
            "one-node veth lab per system, trafgen (AF_PACKET, --qdisc-path, 1 process) 60-byte frames, \
             counted at the pod's eth0 over {:?} windows after {:?} warm-up, pod drops in nft prerouting -300; \
             {} interleaved rounds; node-added = 1e9/pps - 1e9/pps_direct; TCP: {} client threads, {} rounds of {:?}",
            plan.window, plan.warmup, plan.rounds, plan.tcp_threads, plan.tcp_rounds, plan.tcp_window
        ),
        "many_services": plan.many,
        "udp": rows,
        "tcp": tcp_rows,
        "markdown": md,
    })
}
