//! The lab topology: a client, node(s) and Calico-style pods, each in its own namespace, with
//! everything removed on drop (even when a test panics).
//!
//! Two shapes: [`Lab::one_node`] (client and `node-a` joined by one veth) and
//! [`Lab::multi_node`] (client and nodes on one L2 segment, a bridge in its own namespace,
//! each node with its own pod CIDR and routes to the others').

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::agent::{Agent, AgentConfig, run_cleanup, strip_ansi, tail, xlb_bin};
use crate::netns::Netns;
use crate::servers::{Servers, TCP_LINE_PORT, UDP_ECHO_PORT};
use crate::traffic::Host;

/// Every lab name starts with this, then `{pid}-{counter}`.
pub const NAME_PREFIX: &str = "xlb-";
/// The node's uplink interface name (towards the client / router).
pub const UPLINK: &str = "eth0";
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Where the agent serves /metrics and /healthz inside each node's namespace (each node has
/// its own loopback, so the port never collides between labs).
pub const METRICS_PORT: u16 = 9464;
/// The gateway address Calico-style pods route through (answered by proxy ARP on the node).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Where the lab puts pin directories (one per node, unique per lab).
pub const BPFFS: &str = "/sys/fs/bpf";
/// The VIP range the client routes via one node (see [`Lab::client_route_vips_via`]).
pub const VIP_RANGE: &str = "10.0.100.0/24";
/// The bridge in a multi-node lab's LAN namespace (`{lab id}-lan`).
pub const BRIDGE: &str = "br0";
/// Last octet of `node-a`'s address in a multi-node lab; node `i` (0-based) is
/// `10.0.0.{MULTI_NODE_FIRST_HOST + i}`. (The one-node lab's `node-a` is `10.0.0.2`.)
pub const MULTI_NODE_FIRST_HOST: u8 = 11;
/// Most nodes a multi-node lab builds (`node-a` .. `node-i`).
pub const MAX_NODES: usize = 9;
/// Per-request timeout for test traffic that is expected to be answered.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound for anything the agent should do "soon" (start, apply an edit or manifests).
pub const SOON: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Pods on the (single) node; pod `i` (1-based) is `10.0.1.{10+i}`.
    pub pods: usize,
}

/// One node of a [`Lab::multi_node`] lab.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    /// Pods behind the node; pod `i` (1-based) of node index `n` is `10.0.{n+1}.{10+i}`.
    pub pods: usize,
}

impl NodeSpec {
    /// A node with `pods` pods.
    pub fn with_pods(pods: usize) -> NodeSpec {
        NodeSpec { pods }
    }
}

/// Which `--manifests` directory the agents started by [`Lab::start_agents`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestsLayout {
    /// All agents read [`Lab::manifests_dir`] (like agents sharing one API server).
    Shared,
    /// Each agent reads its own [`Node::manifests_dir`].
    PerNode,
}

/// What the lab's links look like to xlb.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Links {
    /// What a user's lab has: veths and a plain bridge with default settings (TX
    /// checksum offload on, so receivers get CHECKSUM_PARTIAL packets; no XDP programs
    /// on bridge ports; nothing pre-resolved). Agents run with the default `--xdp-mode`.
    #[default]
    Ordinary,
    /// Emulates physical NICs with native XDP: every bridge port runs a pass-through XDP
    /// program (a veth delivers XDP_TX frames only to a peer that runs XDP, as a NIC
    /// always would), TX checksum offload is off everywhere (a NIC hands XDP complete
    /// checksums, never partial ones; and receivers then really verify what xlb
    /// rewrote), and agents run with `--xdp-mode native`.
    EmulatedNic,
}

/// How a new node's uplink is connected.
#[derive(Clone, Copy)]
enum Uplink {
    /// A veth straight to the client's `eth0` (one-node lab).
    Client,
    /// A veth to a port of the LAN bridge.
    Lan,
}

/// A running lab: client ↔ node(s) and pods behind each node. Dropping it stops the agents,
/// runs `xlb cleanup`, removes pin directories, stops servers and deletes namespaces. The
/// scratch directory (manifests, agent logs) is kept, and its path printed, if the thread is
/// panicking.
pub struct Lab {
    id: String,
    links: Links,
    scratch: PathBuf,
    /// The nodes, `node-a` first.
    pub nodes: Vec<Node>,
    /// The client (`10.0.0.1`, default route via the first node).
    pub client: Host,
    /// The LAN namespace holding the bridge (multi-node labs only).
    pub lan: Option<Netns>,
}

/// A lab node: its namespace, its pods, and (once started) its agent.
pub struct Node {
    agent: Option<Agent>,
    /// Pods behind this node (dropped before the node's namespace).
    pub pods: Vec<Pod>,
    /// The node's Kubernetes name (`node-a`, `node-b`, ...), used as `--node-name`.
    pub name: String,
    /// 0-based node index (node-a = 0); pod subnet is `10.0.{index+1}.0/24`.
    pub index: u8,
    /// The node's namespace and uplink address (`10.0.0.2` in the one-node lab, else
    /// `10.0.0.{11+index}`).
    pub host: Host,
    /// `--pin-path` for this node's agent: `/sys/fs/bpf/{lab id}-{node}`.
    pub pin_dir: PathBuf,
    /// The manifests directory tests write to (the default `--manifests`).
    pub manifests_dir: PathBuf,
    log_dir: PathBuf,
    ns_prefix: String,
    pod_prefix: String,
    used_bin: Option<PathBuf>,
    /// Extra `xlb agent` flags for this node (set before starting the agent; an
    /// [`Links::EmulatedNic`] lab starts with `--xdp-mode native`).
    pub agent_args: Vec<String>,
    links: Links,
}

/// A Calico-style pod: a namespace with `eth0` `/32`, default route via 169.254.1.1, and the
/// lab's UDP echo (5353) and TCP line (8080) servers.
pub struct Pod {
    /// The pod's servers (stopped before the namespace is deleted).
    pub servers: Servers,
    /// Pod name (`pod1`, ...; `node-b-pod1`, ... in a multi-node lab), also the label in
    /// every server reply.
    pub name: String,
    /// The pod's IP.
    pub ip: Ipv4Addr,
    /// The node-side veth name (`vp{i}`).
    pub node_veth: String,
    /// The pod's namespace and address.
    pub host: Host,
}

impl Lab {
    /// Builds a lab with one node (`node-a`, `10.0.0.2`, joined to the client by one veth) and
    /// `spec.pods` pods.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        Lab::new_with(spec, Links::Ordinary)
    }

    /// [`Lab::new`] with the given kind of links.
    pub fn new_with(spec: LabSpec, links: Links) -> Result<Lab> {
        let mut lab = Lab::empty(links)?;
        lab.add_node(Ipv4Addr::new(10, 0, 0, 2), Uplink::Client)?;
        // The client stands in for the rack router: everything, VIPs included, goes to the node.
        let gw = lab.nodes[0].host.addr.to_string();
        lab.client.ns.ip(&["route", "add", "default", "via", &gw])?;
        for _ in 0..spec.pods {
            lab.nodes[0].add_pod()?;
        }
        Ok(lab)
    }

    /// Builds a lab with one node per spec (`node-a`, `node-b`, ...) on one L2 segment:
    ///
    /// ```text
    ///                 {id}-lan: br0 (STP off, forward delay 0)
    ///        ┌──────────────┬───────────┴──┬──────────────┐
    /// client 10.0.0.1   node-a 10.0.0.11   node-b 10.0.0.12   node-c 10.0.0.13 ...
    ///                   pods 10.0.1.11..   pods 10.0.2.11..   pods 10.0.3.11..
    /// ```
    ///
    /// Each node forwards, routes every other node's pod CIDR via that node's address (as a
    /// CNI with host routes would) and sends no ICMP redirects. The client's default route
    /// goes via `node-a`, and the VIP range [`VIP_RANGE`] via one node at a time (`node-a`
    /// to begin with; see [`Lab::client_route_vips_via`]), standing in for a router.
    pub fn multi_node(nodes: &[NodeSpec]) -> Result<Lab> {
        Lab::multi_node_with(nodes, Links::Ordinary)
    }

    /// [`Lab::multi_node`] with the given kind of links.
    pub fn multi_node_with(nodes: &[NodeSpec], links: Links) -> Result<Lab> {
        if nodes.is_empty() || nodes.len() > MAX_NODES {
            bail!(
                "a multi-node lab has 1..={MAX_NODES} nodes, not {}",
                nodes.len()
            );
        }
        let mut lab = Lab::empty(links)?;
        let lan = Netns::create(&format!("{}-lan", lab.id))?;
        lan.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        lan.ip(&["link", "set", BRIDGE, "up"])?;
        lab.lan = Some(lan);
        lab.attach_to_lan(&lab.client.ns, "client")?;
        lab.configure_client_uplink()?;
        for (i, spec) in nodes.iter().enumerate() {
            let addr = Ipv4Addr::new(10, 0, 0, MULTI_NODE_FIRST_HOST + u8::try_from(i)?);
            lab.add_node(addr, Uplink::Lan)?;
            for _ in 0..spec.pods {
                lab.nodes[i].add_pod()?;
            }
        }
        for node in &lab.nodes {
            for peer in lab.nodes.iter().filter(|p| p.index != node.index) {
                node.host.ns.ip(&[
                    "route",
                    "add",
                    &peer.pod_cidr(),
                    "via",
                    &peer.host.addr.to_string(),
                    "dev",
                    UPLINK,
                ])?;
            }
        }
        let gw = lab.nodes[0].host.addr.to_string();
        lab.client.ns.ip(&["route", "add", "default", "via", &gw])?;
        lab.client_route_vips_via(&lab.nodes[0].name)?;
        Ok(lab)
    }

    /// The client namespace, the scratch directory and a fresh id; no nodes yet.
    fn empty(links: Links) -> Result<Lab> {
        preflight()?;
        SWEEP.call_once(sweep_stale);
        let id = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let client = Host::new(Netns::create(&format!("{id}-client"))?, CLIENT_ADDR);
        let scratch = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(scratch.join("manifests"))
            .with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Lab {
            id,
            links,
            scratch,
            nodes: Vec::new(),
            client,
            lan: None,
        })
    }

    /// Creates `eth0` in `ns` with its peer `port` placed straight into the LAN namespace,
    /// enslaved to the bridge (neither end ever exists in the host namespace).
    fn attach_to_lan(&self, ns: &Netns, port: &str) -> Result<()> {
        let lan = self.lan.as_ref().context("not a multi-node lab")?;
        ns.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            lan.name(),
        ])?;
        lan.ip(&["link", "set", port, "master", BRIDGE])?;
        lan.ip(&["link", "set", port, "up"])?;
        if self.links == Links::Ordinary {
            return Ok(());
        }
        lan.disable_tx_checksum(port)?;
        // A veth delivers frames its peer sends with XDP_TX/redirect (xlb's tunnel to
        // another node) only when it runs an XDP program itself; a physical switch
        // port has no such condition. Give each bridge port a pass-through one.
        let obj = pass_object()?;
        lan.ip(&[
            "link",
            "set",
            "dev",
            port,
            "xdpdrv",
            "obj",
            &obj.to_string_lossy(),
            "sec",
            "xdp",
        ])?;
        Ok(())
    }

    /// Address and link up on the client's `eth0` (and checksum offload off when
    /// emulating NICs).
    fn configure_client_uplink(&self) -> Result<()> {
        let c = &self.client.ns;
        c.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        c.ip(&["link", "set", "eth0", "up"])?;
        self.offloads(c, "eth0")
    }

    /// Leaves `ifname`'s offloads at their defaults, or turns TX checksum offload off
    /// when emulating NICs (see [`Links::EmulatedNic`]).
    fn offloads(&self, ns: &Netns, ifname: &str) -> Result<()> {
        match self.links {
            Links::Ordinary => Ok(()),
            Links::EmulatedNic => ns.disable_tx_checksum(ifname),
        }
    }

    /// The kind of links this lab was built with.
    pub fn links(&self) -> Links {
        self.links
    }

    /// Points the client's route for [`VIP_RANGE`] at node `name` (`ip route replace`), as a
    /// router choosing one next hop would.
    pub fn client_route_vips_via(&self, name: &str) -> Result<()> {
        let node = self.node_named(name)?;
        self.client.ns.ip(&[
            "route",
            "replace",
            VIP_RANGE,
            "via",
            &node.host.addr.to_string(),
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// The node named `name` (`node-a`, ...).
    pub fn node_named(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in lab {}", self.id))
    }

    /// The node named `name`, mutably.
    pub fn node_named_mut(&mut self, name: &str) -> Result<&mut Node> {
        let id = &self.id;
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in lab {id}"))
    }

    /// The manifests directory shared by all nodes (used with [`ManifestsLayout::Shared`]).
    pub fn manifests_dir(&self) -> PathBuf {
        self.scratch.join("manifests")
    }

    /// A standard `v1 Node` object (name, InternalIP) for every lab node, as one
    /// multi-document YAML file.
    pub fn nodes_yaml(&self) -> String {
        crate::manifests::multi_doc(
            &self
                .nodes
                .iter()
                .map(|n| crate::manifests::node_yaml(&n.name, &n.host.addr.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    /// Writes [`Lab::nodes_yaml`] to `{dir}/nodes.yaml` (atomically).
    pub fn write_nodes_yaml(&self, dir: &Path) -> Result<()> {
        crate::manifests::write_atomic(&dir.join("nodes.yaml"), &self.nodes_yaml())
    }

    /// Starts an agent (binary from [`xlb_bin`]) on every node with the given manifests
    /// layout, then waits until each answers `/healthz` (bounded by `timeout`).
    pub fn start_agents(&mut self, layout: ManifestsLayout, timeout: Duration) -> Result<()> {
        let bin = xlb_bin()?;
        let shared = self.manifests_dir();
        for node in &mut self.nodes {
            let dir = match layout {
                ManifestsLayout::Shared => shared.clone(),
                ManifestsLayout::PerNode => node.manifests_dir.clone(),
            };
            node.start_agent(&bin, &dir)?;
        }
        for node in &mut self.nodes {
            let name = node.name.clone();
            node.agent()?
                .wait_healthy(timeout)
                .with_context(|| format!("agent on {name}"))?;
        }
        Ok(())
    }

    /// Shorthand for `Lab::new(LabSpec { pods })`.
    pub fn one_node(pods: usize) -> Result<Lab> {
        Lab::new(LabSpec { pods })
    }

    /// This lab's unique id (`xlb-{pid}-{n}`), the prefix of all its names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The scratch directory (manifests, logs).
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The first node.
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }

    /// The first node, mutably.
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.nodes[0]
    }

    fn add_node(&mut self, addr: Ipv4Addr, uplink: Uplink) -> Result<()> {
        let index = u8::try_from(self.nodes.len())?;
        let name = format!("node-{}", (b'a' + index) as char);
        let ns = Netns::create(&format!("{}-{name}", self.id))?;
        match uplink {
            Uplink::Client => self.link_to_client(&ns)?,
            Uplink::Lan => self.attach_to_lan(&ns, &name)?,
        }
        self.address_node_uplink(&ns, addr)?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        if matches!(uplink, Uplink::Lan) {
            // Traffic the client sends via node-a to another node's pods leaves node-a on the
            // interface it came in on; no redirect, so that path stays what the lab set up.
            ns.sysctl("net/ipv4/conf/all/send_redirects", "0")?;
            ns.sysctl(&format!("net/ipv4/conf/{UPLINK}/send_redirects"), "0")?;
        }
        let node_dir = self.scratch.join(&name);
        let manifests_dir = node_dir.join("manifests");
        let log_dir = node_dir.join("logs");
        std::fs::create_dir_all(&manifests_dir)?;
        std::fs::create_dir_all(&log_dir)?;
        self.nodes.push(Node {
            agent: None,
            pods: Vec::new(),
            pin_dir: Path::new(BPFFS).join(format!("{}-{name}", self.id)),
            ns_prefix: format!("{}-{name}", self.id),
            // Pod names (server labels) are unique lab-wide, so replies tell nodes apart.
            pod_prefix: match uplink {
                Uplink::Client => String::new(),
                Uplink::Lan => format!("{name}-"),
            },
            name,
            index,
            host: Host::new(ns, addr),
            manifests_dir,
            log_dir,
            used_bin: None,
            agent_args: match self.links {
                // XLB_LAB_XDP_MODE runs a whole test on another attach mode (CI runs
                // the core set with `tc`).
                Links::Ordinary => match xdp_mode_override() {
                    Some(m) => vec!["--xdp-mode".into(), m],
                    None => Vec::new(),
                },
                Links::EmulatedNic => vec!["--xdp-mode".into(), "native".into()],
            },
            links: self.links,
        });
        Ok(())
    }

    /// One-node lab only: deletes the node's uplink (and with it the client's end) and
    /// creates it again, addressed and routed as before, as an operator recreating an
    /// interface would. The new device has a new ifindex.
    pub fn recreate_uplink(&mut self) -> Result<()> {
        if self.lan.is_some() || self.nodes.len() != 1 {
            bail!("recreate_uplink is for the one-node lab");
        }
        let node = &self.nodes[0].host;
        node.ns.ip(&["link", "del", UPLINK])?;
        self.link_to_client(&node.ns)?;
        let gw = node.addr.to_string();
        self.client
            .ns
            .ip(&["route", "add", "default", "via", &gw])?;
        self.address_node_uplink(&node.ns, node.addr)
    }

    /// Creates the node's `eth0` from inside its namespace with the peer placed straight
    /// into the client's (neither end ever exists in the host namespace), and configures
    /// the client's end.
    fn link_to_client(&self, ns: &Netns) -> Result<()> {
        ns.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.client.ns.name(),
        ])?;
        self.configure_client_uplink()
    }

    /// Address, link up, offloads and the pod gateway route on a node's `eth0`.
    fn address_node_uplink(&self, ns: &Netns, addr: Ipv4Addr) -> Result<()> {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", UPLINK])?;
        ns.ip(&["link", "set", UPLINK, "up"])?;
        self.offloads(ns, UPLINK)?;
        // Proxy ARP only answers for addresses the node routes out of another interface. A
        // real node has a default route via its uplink; this one has no default route (so
        // unknown destinations, e.g. a VIP nobody serves, fail fast instead of looping back to
        // the client), so it gets just this /32.
        ns.ip(&["route", "add", &format!("{POD_GATEWAY}/32"), "dev", UPLINK])?;
        Ok(())
    }

    /// Starts the first node's agent (binary from [`xlb_bin`]) on its own manifests dir.
    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        let bin = xlb_bin()?;
        let node = self.node_mut();
        let dir = node.manifests_dir.clone();
        node.start_agent(&bin, &dir)
    }

    /// The first node's agent.
    pub fn agent(&mut self) -> Result<&mut Agent> {
        self.node_mut().agent()
    }
}

impl Node {
    /// Every pod of this node as a ready endpoint on it (the usual EndpointSlice).
    pub fn ready_endpoints(&self) -> Vec<crate::manifests::EndpointSpec> {
        self.pods
            .iter()
            .map(|p| crate::manifests::EndpointSpec::new(p.ip, true, &self.name))
            .collect()
    }

    /// This node's pod CIDR, `10.0.{index+1}.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.0.{}.0/24", self.index + 1)
    }

    /// Adds pod `pod{n}` (`node-x-pod{n}` in a multi-node lab), `10.0.{index+1}.{10+n}`, with
    /// its servers running.
    pub fn add_pod(&mut self) -> Result<&Pod> {
        let n = self.pods.len() + 1;
        let name = format!("{}pod{n}", self.pod_prefix);
        let ip = Ipv4Addr::new(10, 0, self.index + 1, u8::try_from(10 + n)?);
        let veth = format!("vp{n}");
        let ns = Netns::create(&format!("{}-pod{n}", self.ns_prefix))?;
        let node = &self.host.ns;
        node.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.sysctl(&format!("net/ipv4/conf/{veth}/proxy_arp"), "1")?;
        // As Calico sets on its cali* devices: answer the pod's ARP for the gateway
        // at once. The kernel's default delays proxy ARP by up to 80 jiffies (320 ms
        // at HZ=250, Debian's), and a pod's first replies queued behind that overflow
        // the neighbour queue (unres_qlen_bytes) and are lost.
        node.sysctl(&format!("net/ipv4/neigh/{veth}/proxy_delay"), "0")?;
        node.ip(&["link", "set", &veth, "up"])?;
        node.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth])?;
        if self.links == Links::EmulatedNic {
            node.disable_tx_checksum(&veth)?;
        }
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
        ])?;
        if self.links == Links::EmulatedNic {
            ns.disable_tx_checksum("eth0")?;
        }
        let servers = Servers::start(
            &ns,
            &name,
            Ipv4Addr::UNSPECIFIED,
            UDP_ECHO_PORT,
            TCP_LINE_PORT,
        )?;
        self.pods.push(Pod {
            servers,
            name,
            ip,
            node_veth: veth,
            host: Host::new(ns, ip),
        });
        Ok(&self.pods[n - 1])
    }

    /// Starts `xlb agent` in this node's namespace with `--manifests manifests_dir`.
    pub fn start_agent(&mut self, xlb_bin: &Path, manifests_dir: &Path) -> Result<&mut Agent> {
        if self.agent.is_some() {
            bail!("agent on {} already started", self.name);
        }
        self.used_bin = Some(xlb_bin.to_path_buf());
        let agent = Agent::start(AgentConfig {
            xlb_bin: xlb_bin.to_path_buf(),
            netns: self.host.ns.name().to_string(),
            interface: UPLINK.to_string(),
            node_name: self.name.clone(),
            manifests_dir: manifests_dir.to_path_buf(),
            metrics_addr: (Ipv4Addr::LOCALHOST, METRICS_PORT).into(),
            pin_dir: self.pin_dir.clone(),
            log_dir: self.log_dir.clone(),
            log_level: "debug".to_string(),
            extra_args: self.agent_args.clone(),
        })?;
        Ok(self.agent.insert(agent))
    }

    /// This node's agent (started with [`Node::start_agent`]).
    pub fn agent(&mut self) -> Result<&mut Agent> {
        let name = &self.name;
        self.agent
            .as_mut()
            .with_context(|| format!("no agent started on {name}"))
    }

    /// Runs `xlb cleanup --interface eth0 --pin-path PIN_DIR` in this node's namespace. The
    /// agent must be stopped first.
    pub fn cleanup(&mut self) -> Result<String> {
        if let Some(a) = self.agent.as_mut()
            && a.check_running().is_ok()
        {
            bail!("stop the agent on {} before running cleanup", self.name);
        }
        let bin = match &self.used_bin {
            Some(b) => b.clone(),
            None => xlb_bin()?,
        };
        run_cleanup(&bin, &self.host.ns, UPLINK, &self.pin_dir)
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name} on {}", self.name))
    }

    /// `ip -d link show dev eth0` in the node namespace.
    pub fn uplink_details(&self) -> Result<String> {
        self.host.ns.ip(&["-d", "link", "show", "dev", UPLINK])
    }

    fn teardown(&mut self, panicking: bool) {
        if let Some(mut agent) = self.agent.take() {
            if panicking {
                for p in agent.log_paths() {
                    eprintln!("xlb-lab: agent log {} (tail):", p.display());
                    let log = strip_ansi(&std::fs::read_to_string(p).unwrap_or_default());
                    eprintln!("{}", tail(&log, 40));
                }
            }
            if agent.pid().is_some()
                && let Err(e) = agent.stop()
            {
                eprintln!("xlb-lab: stopping agent on {}: {e:#}", self.name);
            }
        }
        if self.pin_dir.exists() {
            if let Some(bin) = &self.used_bin
                && let Err(e) = run_cleanup(bin, &self.host.ns, UPLINK, &self.pin_dir)
            {
                eprintln!("xlb-lab: xlb cleanup on {}: {e:#}", self.name);
            }
            if self.pin_dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
            {
                eprintln!("xlb-lab: removing {}: {e}", self.pin_dir.display());
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for node in &mut self.nodes {
            node.teardown(panicking);
        }
        // Pods (servers, then namespaces) and nodes go before the client.
        self.nodes.clear();
        if panicking {
            eprintln!(
                "xlb-lab: lab {} failed; manifests and logs kept in {}",
                self.id,
                self.scratch.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.scratch) {
            eprintln!("xlb-lab: removing {}: {e}", self.scratch.display());
        }
    }
}

/// `XLB_LAB_XDP_MODE`: the `--xdp-mode` every agent of an ordinary lab runs with
/// instead of the default (CI runs the core tests again with `tc`).
pub fn xdp_mode_override() -> Option<String> {
    std::env::var("XLB_LAB_XDP_MODE")
        .ok()
        .filter(|m| !m.is_empty())
}

/// The `xlb_xdp_mode` label an ordinary lab's agents report on a veth uplink:
/// `tc` (auto mode on a veth), or the mode [`xdp_mode_override`] names.
pub fn expected_veth_mode() -> String {
    xdp_mode_override().unwrap_or_else(|| "tc".into())
}

/// Fails loudly unless the lab can run here: root, and ip/nsenter/ping/bpftool in PATH.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the xlb lab needs root (network namespaces, veths, BPF)");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = ["ip", "nsenter", "ping", "bpftool"]
        .into_iter()
        .filter(|tool| !std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the xlb lab needs {} in PATH (Debian: iproute2, util-linux, iputils-ping, bpftool); run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    if !Path::new("/run/netns").exists() {
        std::fs::create_dir_all("/run/netns")?;
    }
    Ok(())
}

/// The names of the entries of `dir` (none if it cannot be read).
pub fn entry_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes namespaces and pin directories left by lab processes that died without unwinding
/// (names `xlb-{pid}-...` whose pid no longer exists). Only lab-made names are touched.
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            return false;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    };
    let names = |dir: &str| entry_names(Path::new(dir));
    for name in names("/run/netns").into_iter().filter(|n| dead(n)) {
        eprintln!("xlb-lab: removing stale netns {name}");
        let _ = crate::netns::run(std::process::Command::new("ip").args(["netns", "del", &name]));
    }
    for name in names(BPFFS).into_iter().filter(|n| dead(n)) {
        let dir = Path::new(BPFFS).join(&name);
        eprintln!("xlb-lab: removing stale pin dir {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A two-instruction XDP program (`r0 = XDP_PASS; exit`) as an ELF object for
/// iproute2, assembled once per test process by LLVM's assembler (the llvm-22 that
/// `cargo xtask setup` installs for bpf-linker). xlb's own object cannot serve: the
/// aya-log ring buffer is a legacy `maps`-section map, which iproute2's libbpf (v1.0+)
/// refuses to open.
fn pass_object() -> Result<PathBuf> {
    static OBJ: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = OBJ.get() {
        return Ok(p.clone());
    }
    let dir = std::env::temp_dir().join(format!("{NAME_PREFIX}{}-xdp-pass", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("pass.s");
    let obj = dir.join("pass.o");
    std::fs::write(
        &src,
        "\t.section xdp,\"ax\",@progbits\n\t.globl xlb_lab_pass\n\t.type xlb_lab_pass,@function\n\
         xlb_lab_pass:\n\tr0 = 2\n\texit\n\t.size xlb_lab_pass, .-xlb_lab_pass\n\
         \t.section license,\"aw\",@progbits\n\t.asciz \"GPL\"\n",
    )?;
    crate::netns::run(
        std::process::Command::new("/usr/lib/llvm-22/bin/llvm-mc")
            .args(["-triple", "bpfel", "-filetype=obj"])
            .arg(&src)
            .arg("-o")
            .arg(&obj),
    )
    .context("assembling the lab's XDP pass program (llvm-22: run `cargo xtask setup`)")?;
    Ok(OBJ.get_or_init(|| obj).clone())
}

/// Polls `f` every `every` until it returns `Ok(Some(v))` or `timeout` passes; the error names
/// `what` and the last error `f` returned.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if std::time::Instant::now() > deadline {
            match last_err {
                Some(e) => bail!("{what}: not within {timeout:?} (last error: {e:#})"),
                None => bail!("{what}: not within {timeout:?}"),
            }
        }
        std::thread::sleep(every);
    }
}
