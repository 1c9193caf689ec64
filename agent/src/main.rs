//! `xlb`: the command line. `xlb agent` runs the load balancer on this node;
//! `xlb cleanup` removes the datapath it leaves attached.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// An eBPF/XDP load balancer for bare-metal Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "xlb", version, about)]
struct Cli {
    /// Log level or tracing filter (e.g. `info`, `xlb=debug`).
    #[arg(long, global = true, default_value = "info", env = "XLB_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the agent's many flags cost nothing worth boxing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the agent: attach XDP/TC to the interface and keep the BPF maps in step
    /// with the Services and EndpointSlices in --manifests. On SIGTERM/SIGINT it exits
    /// and leaves the datapath attached (traffic keeps flowing); the next agent takes
    /// it over without a gap.
    Agent {
        /// Uplink interface to attach to (where VIP traffic arrives).
        #[arg(long)]
        interface: String,
        /// This node's name, as in EndpointSlice `endpoints[].nodeName`.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Directory of Kubernetes manifests (Service, EndpointSlice, Node, xlb.dev
        /// objects; *.yaml, *.yml, *.json, multi-document), watched for changes.
        /// Without it the agent reads the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the Kubernetes API source; default: in-cluster service
        /// account, then $KUBECONFIG or ~/.kube/config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Address for /metrics and /healthz.
        #[arg(long, default_value = "0.0.0.0:9464")]
        metrics_addr: SocketAddr,
        /// bpffs directory where maps and links are pinned (bpffs is mounted on
        /// /sys/fs/bpf if missing).
        #[arg(long, default_value = "/sys/fs/bpf/xlb")]
        pin_path: PathBuf,
        /// XDP attach mode: `auto` (native on hardware NICs, generic on virtual devices
        /// such as veth; falls back to generic if native attach fails), `native`
        /// (driver), `generic` (skb), or `tc`: no XDP program, the whole ingress
        /// datapath at TC (cheaper than generic XDP, which copies every skb).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        xdp_mode: Mode,
        /// Connection-tracking capacity (flows). Applies when the maps are created; run
        /// `xlb cleanup` to change it on a node that already has a datapath.
        #[arg(long, default_value_t = xlb_common::limits::CONNTRACK_ENTRIES)]
        conntrack_size: u32,
        /// How XDP hands a DNATed packet on: `pass` to the kernel's routing (works with
        /// any CNI), or `redirect` after a FIB lookup (needs pod devices that accept
        /// XDP frames, e.g. veth with GRO or XDP on the pod side).
        #[arg(long, value_enum, default_value_t = Forward::Pass)]
        forward: Forward,
        /// This node's IPv4 address for IPIP between nodes (externalTrafficPolicy
        /// Cluster); default: the interface's first IPv4 address.
        #[arg(long)]
        node_ip: Option<std::net::Ipv4Addr>,
        /// The cluster's node port range (kube-apiserver's --service-node-port-range):
        /// nodePorts and healthCheckNodePorts outside it are refused.
        #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
        node_port_range: std::ops::RangeInclusive<u16>,
        /// How externalTrafficPolicy Cluster reaches pods on other nodes: `dsr` (IPIP
        /// to their node, which answers the client directly; pods see the client's
        /// address) or `snat` (source NAT to this node; pods see this node's address).
        #[arg(long, value_enum, default_value_t = Cluster::Dsr)]
        cluster_mode: Cluster,
        /// UDP port on which agents run their membership protocol (SWIM) for L2
        /// announcement failover; the same on every node.
        #[arg(long, default_value_t = 7946)]
        memberlist_port: u16,
        /// File of the shared keys that authenticate every membership datagram
        /// (HMAC-SHA256): one key of at least 16 bytes per line, at most 4; the first
        /// signs, all are accepted (rotation: add the new key second on every node,
        /// then first, then remove the old). Read again when it changes. Without it
        /// any host on the LAN can join the membership and move VIPs.
        #[arg(long, env = "XLB_MEMBERLIST_KEY_FILE")]
        memberlist_key_file: Option<PathBuf>,
        /// Moving a running cluster to a membership key without splitting it: agents
        /// with the key and `send-plain` talk to agents without one; then roll out
        /// `accept-plain`, then drop this flag. Each step is one rollout.
        #[arg(long, value_enum, env = "XLB_MEMBERLIST_KEY_TRANSITION")]
        memberlist_key_transition: Option<xlb::l2::seal::Transition>,
        /// On SIGTERM this node keeps answering ARP for its VIPs this long, and tells
        /// its peers to leave them with it, so that a restart (a DaemonSet rollout)
        /// moves nothing; with no new agent by then the peers take them over. `0s`
        /// hands them over at once. A SIGKILLed agent's VIPs move within half a second
        /// regardless.
        #[arg(long, default_value = "5s", value_parser = parse_grace)]
        restart_grace: std::time::Duration,
        /// Namespace of the `coordination.k8s.io` Lease `xlb-ipam` that elects the one
        /// agent writing Service status and Events (Kubernetes API source); deploy/
        /// sets it to the pod's own namespace.
        #[arg(long, env = "POD_NAMESPACE", default_value = "xlb-system")]
        lease_namespace: String,
        /// The agent's own namespace (Kubernetes API source): the one namespace whose
        /// Secrets it reads, for BGPPeer passwordSecret; deploy/ sets it to the pod's.
        #[arg(long, env = "POD_NAMESPACE", default_value = "xlb-system")]
        namespace: String,
        /// How long the IPAM Lease stays with an agent that stopped renewing it (it
        /// renews every duration/7, at most every 2 s); a stopping agent gives it up.
        #[arg(long, default_value = "15s", value_parser = parse_lease)]
        lease_duration: std::time::Duration,
        /// Datapath events logged by the kernel programs (target `xlb::datapath`):
        /// `off`, `error` (a failed tail call), `warn` (drops that signal
        /// misconfiguration: no backend, no route to another node, ...), `info` (also
        /// ICMP fragmentation-needed sent) or `debug`. At most 10 lines per reason per
        /// CPU per second. `xlb datapath-log` changes it while the agent runs.
        #[arg(long, env = "XLB_DATAPATH_LOG", default_value = "off", value_parser = xlb::dataplane::events::parse_level)]
        datapath_log: u64,
        /// TCP port on which the BGP speaker accepts its peers' connections (RFC 4271
        /// §8.2.1 passive open), on the node's address or a peer's `sourceAddress`;
        /// `0`: connect to peers only.
        #[arg(long, default_value_t = 179)]
        bgp_listen_port: u16,
        /// Take a kernel feature's fallback path even where the kernel offers the
        /// feature (for tests and for ruling a feature out): `xdp-meta`, `tcx`,
        /// `managed-neigh`, `map-batch` or `all`; repeatable. `xlb inspect features` lists the features and fallbacks.
        #[arg(long, value_enum, env = "XLB_FORCE_FALLBACK", value_delimiter = ',')]
        force_fallback: Vec<xlb::features::Fallback>,
    },
    /// Show or change which datapath events the kernel programs log (see `xlb agent
    /// --datapath-log`), on the pinned datapath: takes effect at once, no restart.
    DatapathLog {
        /// `off`, `error`, `warn`, `info` or `debug`; without it, print the level.
        #[arg(value_parser = xlb::dataplane::events::parse_level)]
        level: Option<u64>,
        /// bpffs directory the agent pinned to.
        #[arg(long, default_value = "/sys/fs/bpf/xlb")]
        pin_path: PathBuf,
    },
    /// Show what the datapath holds, read from the pinned maps: works while the agent
    /// is stopped or crash-looping.
    Inspect {
        /// bpffs directory the agent pinned to.
        #[arg(long, default_value = "/sys/fs/bpf/xlb", global = true)]
        pin_path: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
        output: Output,
        #[command(subcommand)]
        what: Inspect,
    },
    /// Detach xlb's programs from the interface and remove its pinned maps and links.
    /// Use it when uninstalling xlb from a node; a normal restart or upgrade must not
    /// run it (the datapath is meant to outlive the agent).
    Cleanup {
        /// Interface the programs are attached to.
        #[arg(long)]
        interface: String,
        /// bpffs directory the agent pinned to.
        #[arg(long, default_value = "/sys/fs/bpf/xlb")]
        pin_path: PathBuf,
        /// Remove the datapath even while an agent runs on this pin path (it will
        /// notice, report unhealthy and attach again).
        #[arg(long)]
        force: bool,
    },
    /// Turn MetalLB configuration (IPAddressPool, L2Advertisement, BGPPeer,
    /// BGPAdvertisement, Community, BFDProfile; files or `kubectl get -o yaml`
    /// output, `-` or nothing for stdin) into xlb.dev objects on stdout; every field
    /// that cannot be carried over is named on stderr.
    ConvertMetallb {
        /// Input files.
        files: Vec<PathBuf>,
    },
    /// Write the CustomResourceDefinitions of xlb's resources (generated from the
    /// types the agent parses) into a directory, one file per CRD.
    Crds {
        /// Output directory (`deploy/crds` in the repository).
        #[arg(long)]
        out: PathBuf,
    },
}

/// What `xlb inspect` shows.
#[derive(Subcommand, Debug, Clone)]
enum Inspect {
    /// Every programmed frontend (VIP, external IP, node port): its Service, policy,
    /// backends and packet count.
    Services,
    /// Every backend: address, node (for a backend on another node) and packet count.
    Backends,
    /// The tracked IPv4 flows: client, frontend, backend, Service, time left.
    Conntrack {
        /// Only flows to this frontend address.
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
    },
    /// How a Service's Maglev tables share their slots among its backends.
    Maglev {
        /// `namespace/name`, or `namespace/name:port` for one port.
        service: String,
    },
    /// The node settings the datapath runs with.
    Config,
    /// The kernel features the datapath uses, probed now on this kernel (no agent
    /// needed), and the fallback taken for each one missing or forced.
    Features {
        /// The fallbacks an agent would be forced to take (`xlb agent
        /// --force-fallback`), shown as it would choose.
        #[arg(long, value_enum, env = "XLB_FORCE_FALLBACK", value_delimiter = ',')]
        force_fallback: Vec<xlb::features::Fallback>,
    },
    /// Who holds each VIP and why (L2 election), and what this node announces over
    /// BGP: asked of the running agent.
    Owners {
        /// The agent's `--metrics-addr`.
        #[arg(long, default_value = "127.0.0.1:9464")]
        agent: SocketAddr,
    },
    /// BGP sessions (state, prefixes sent, last error) and their BFD state: asked of
    /// the running agent.
    Peers {
        /// The agent's `--metrics-addr`.
        #[arg(long, default_value = "127.0.0.1:9464")]
        agent: SocketAddr,
    },
}

/// Output format of `xlb inspect`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    /// Columns for people.
    Table,
    /// A JSON array of rows, for scripts.
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Cluster {
    Dsr,
    Snat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Forward {
    Pass,
    Redirect,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
    /// No XDP program: the whole ingress datapath at TC.
    Tc,
}

/// `--restart-grace`: `0s` to `5m`, written as `500ms`, `5s`, `1m`.
fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    match xlb::duration::parse(s.trim()) {
        Some(d) if d <= std::time::Duration::from_secs(300) => Ok(d),
        Some(_) => Err(format!("{s:?} is longer than 5m")),
        None => Err(format!("{s:?} is not a duration (e.g. 0s, 500ms, 5s)")),
    }
}

fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    match xlb::duration::parse(s.trim()) {
        Some(d)
            if (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(300))
                .contains(&d) =>
        {
            Ok(d)
        }
        Some(_) => Err(format!("{s:?} is not between 1s and 5m")),
        None => Err(format!("{s:?} is not a duration (e.g. 15s)")),
    }
}

/// `LOW-HIGH`, e.g. `30000-32767`.
fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not LOW-HIGH"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?} is not a range of ports (1 <= LOW <= HIGH)"));
    }
    Ok(lo..=hi)
}

fn main() -> anyhow::Result<()> {
    // `XLB_FORCE_FALLBACK=` (set, empty: a unit file's or a Pod's blank value) means no
    // forced fallback; clap would refuse the empty value as an unknown fallback.
    if std::env::var_os("XLB_FORCE_FALLBACK").is_some_and(|v| v.is_empty()) {
        // SAFETY: the first statement of main, before any thread exists.
        unsafe { std::env::remove_var("XLB_FORCE_FALLBACK") };
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // netlink-packet-route warns on every link dump that a newer kernel's
            // IFLA_INET6_CONF is longer than it knows (harmless; the pod-device
            // refresh dumps links every second): quiet unless asked for by name.
            EnvFilter::try_new({
                let mut f = cli.log_level.clone();
                if !f.contains("netlink_packet_route") {
                    f.push_str(",netlink_packet_route=error");
                }
                // Datapath events are filtered in the kernel (--datapath-log): what
                // reaches the agent is shown unless the filter names the target.
                if !f.contains(xlb_common::datapath_log::TARGET) {
                    f.push_str(",xlb::datapath=trace");
                }
                f
            })
            .with_context(|| format!("invalid --log-level {:?}", cli.log_level))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Agent {
            interface,
            node_name,
            manifests,
            kubeconfig,
            metrics_addr,
            pin_path,
            xdp_mode,
            conntrack_size,
            forward,
            node_ip,
            cluster_mode,
            node_port_range,
            memberlist_port,
            memberlist_key_file,
            memberlist_key_transition,
            restart_grace,
            lease_namespace,
            namespace,
            lease_duration,
            datapath_log,
            bgp_listen_port,
            force_fallback,
        } => {
            raise_open_files_limit();
            let features = xlb::features::Features::probe(&force_fallback)?;
            features.check_required()?;
            let cfg = xlb::agent::Config {
                interface,
                node_name,
                source: match manifests {
                    Some(dir) => xlb::agent::SourceConfig::Manifests(dir),
                    None => xlb::agent::SourceConfig::Kubernetes {
                        kubeconfig,
                        lease_namespace,
                        namespace,
                        lease_duration,
                    },
                },
                metrics_addr,
                pin_path,
                xdp_mode: match xdp_mode {
                    Mode::Auto => xlb::netdev::XdpChoice::Auto,
                    Mode::Native => xlb::netdev::XdpChoice::Native,
                    Mode::Generic => xlb::netdev::XdpChoice::Generic,
                    Mode::Tc => xlb::netdev::XdpChoice::Tc,
                },
                conntrack_size,
                forward: match forward {
                    Forward::Pass => xlb::dataplane::ForwardMode::Pass,
                    Forward::Redirect => xlb::dataplane::ForwardMode::Redirect,
                },
                node_ip,
                node_ports: node_port_range,
                memberlist_port,
                memberlist_key_file,
                memberlist_key_transition: memberlist_key_transition.unwrap_or_default(),
                restart_grace,
                bgp_listen_port,
                cluster: match cluster_mode {
                    Cluster::Dsr => xlb::dataplane::ClusterMode::Dsr,
                    Cluster::Snat => xlb::dataplane::ClusterMode::Snat,
                },
                datapath_log,
                features,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(xlb::agent::run(cfg)).context("xlb agent")?;
        }
        Command::Inspect {
            pin_path,
            output,
            what,
        } => {
            let json = matches!(output, Output::Json);
            let ask = |agent, view| {
                xlb::inspect::run_agent(agent, view, json, &mut std::io::stdout().lock())
                    .context("xlb inspect")
            };
            let what = match what {
                Inspect::Owners { agent } => return ask(agent, xlb::inspect::AgentView::Owners),
                Inspect::Peers { agent } => return ask(agent, xlb::inspect::AgentView::Peers),
                Inspect::Features { force_fallback } => {
                    return xlb::inspect::features(
                        json,
                        &force_fallback,
                        &mut std::io::stdout().lock(),
                    )
                    .context("xlb inspect features");
                }
                Inspect::Services => xlb::inspect::What::Services,
                Inspect::Backends => xlb::inspect::What::Backends,
                Inspect::Conntrack { vip } => xlb::inspect::What::Conntrack(vip),
                Inspect::Maglev { service } => xlb::inspect::What::Maglev(service),
                Inspect::Config => xlb::inspect::What::Config,
            };
            xlb::inspect::run(&pin_path, what, json, &mut std::io::stdout().lock())
                .with_context(|| format!("xlb inspect {}", pin_path.display()))?;
        }
        Command::DatapathLog { level, pin_path } => {
            use xlb::dataplane::events;
            let name = xlb_common::datapath_log::name;
            let ctx = || format!("xlb datapath-log {}", pin_path.display());
            match level {
                Some(l) => {
                    let was = events::set_level(&pin_path, l).with_context(ctx)?;
                    println!("datapath log level: {} (was {})", name(l), name(was));
                }
                None => {
                    let l = events::level(&pin_path).with_context(ctx)?;
                    println!("datapath log level: {}", name(l));
                }
            }
        }
        Command::Crds { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (file, text) in xlb::crd::all_yaml()? {
                let path = out.join(file);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
        Command::ConvertMetallb { files } => {
            use serde::Deserialize;
            use xlb::source::manifests::{MAX_FILE_BYTES, check_yaml_depth};
            // The agent's own caps on one input: its size, and how deep it nests.
            let read = |name: &str, r: &mut dyn std::io::Read| -> anyhow::Result<String> {
                let mut t = String::new();
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(r, MAX_FILE_BYTES + 1),
                    &mut t,
                )
                .with_context(|| format!("reading {name}"))?;
                anyhow::ensure!(
                    t.len() as u64 <= MAX_FILE_BYTES,
                    "{name}: larger than {MAX_FILE_BYTES} bytes, the agent's limit for one file"
                );
                check_yaml_depth(&t).map_err(|e| anyhow::anyhow!("{name}: invalid YAML: {e}"))?;
                Ok(t)
            };
            let mut texts = Vec::new();
            if files.is_empty() || files.iter().any(|f| f.as_os_str() == "-") {
                texts.push(("stdin".to_string(), read("stdin", &mut std::io::stdin())?));
            }
            for f in files.iter().filter(|f| f.as_os_str() != "-") {
                let name = f.display().to_string();
                let mut file = std::fs::File::open(f).with_context(|| format!("reading {name}"))?;
                texts.push((name.clone(), read(&name, &mut file)?));
            }
            let mut docs = Vec::new();
            for (name, text) in &texts {
                for d in serde_yaml_ng::Deserializer::from_str(text) {
                    docs.push(
                        serde_json::Value::deserialize(d)
                            .with_context(|| format!("{name}: invalid YAML"))?,
                    );
                }
            }
            let out = xlb::metallb::convert(docs);
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            for o in &out.objects {
                print!("---\n{}", serde_yaml_ng::to_string(o)?);
            }
        }
        Command::Cleanup {
            interface,
            pin_path,
            force,
        } => {
            // Held until the end, so no agent starts on the pin path meanwhile.
            let _lock = match xlb::dataplane::pin::lock(&pin_path) {
                Ok(l) => Some(l),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && force => {
                    eprintln!(
                        "xlb cleanup: {}: {e}; going on (--force)",
                        pin_path.display()
                    );
                    None
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{} (stop the agent first, or pass --force)",
                            pin_path.display()
                        )
                    });
                }
            };
            let removed = xlb::dataplane::cleanup(&interface, &pin_path)
                .with_context(|| format!("cleaning up {}", pin_path.display()))?;
            for p in &removed {
                println!("removed {}", p.display());
            }
            println!(
                "xlb datapath removed from {interface} ({} pins)",
                removed.len()
            );
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit
/// is 1,024): every connection, map and program takes a descriptor, and running out
/// must not be what bounds the agent (the listener bounds itself).
fn raise_open_files_limit() {
    // SAFETY: all-zero is a valid rlimit; getrlimit/setrlimit read and write only it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: see above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::debug!(
            from = before,
            to = lim.rlim_cur,
            "raised the open files limit"
        );
    }
}
