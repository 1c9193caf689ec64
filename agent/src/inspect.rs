//! `xlb inspect`: what the datapath holds, read from the pinned maps directly, so it
//! works while the agent is down or crash-looping (as `cilium bpf lb list` does).
//!
//! Service ids resolve to their Service port through `xlb_owners`, which the agent
//! writes before it serves a key; an id without an owner is shown as a raw id and
//! said to be raw. Counters are the datapath's per-CPU counters, summed.
use std::{collections::BTreeMap, io::Write, net::SocketAddr, path::Path};

use serde::Serialize;
use xlb_common::{
    BACKEND_F_REMOTE, BACKEND_F_SNAT, PROTO_ICMP, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES,
};

use crate::dataplane::{
    self, DataplaneError, Stats,
    state::{self, MapState},
};
use crate::introspect::{Owners, Peers};

/// What to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// Every programmed frontend with its Service, policy, backends and counters.
    Services,
    /// Every backend with its address, node and counters.
    Backends,
    /// The tracked IPv4 flows (client -> frontend -> backend), optionally only those
    /// to one frontend address.
    Conntrack(Option<std::net::IpAddr>),
    /// How each Maglev table of a Service (`namespace/name`, or one port of it as
    /// `namespace/name:port`) shares its slots among the backends.
    Maglev(String),
    /// The node settings the datapath runs with (`xlb_config`).
    Config,
}

/// One backend's share of a Maglev table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShareRow {
    /// The frontend whose table it is.
    pub frontend: String,
    /// The backend.
    pub backend: String,
    /// Its slots.
    pub slots: u32,
    /// Of how many.
    pub of: u32,
}

/// One `xlb_config` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigRow {
    /// What it is (`raw key N` for a key this build does not know).
    pub key: String,
    /// Its value, decoded where the meaning is known.
    pub value: String,
}

/// Why inspecting failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A pinned map is missing or unreadable (no datapath at this pin path?).
    #[error("{0} (is an xlb datapath pinned there? see --pin-path)")]
    Maps(#[from] DataplaneError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// JSON encoding failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The running agent did not answer (owners and peers come from it, not the pins).
    #[error(
        "asking the agent at {addr} for {path}: {error} (owners and peers come from a running agent; --agent is its --metrics-addr)"
    )]
    Agent {
        /// Where it was asked.
        addr: SocketAddr,
        /// What it was asked for.
        path: &'static str,
        /// What went wrong.
        error: String,
    },
    /// No programmed frontend belongs to the named Service.
    #[error(
        "no programmed frontend belongs to Service {0:?} (namespace/name or namespace/name:port)"
    )]
    NoService(String),
    /// Probing the kernel's features failed (not root).
    #[error("{0}")]
    Features(#[from] crate::features::FeatureError),
}

/// `xlb inspect features`: probes this kernel now, as a starting agent would (no
/// agent or pinned datapath needed), and prints every feature, whether the kernel
/// offers it, and the fallback taken without it (or forced with `force`, as
/// `--force-fallback` / `XLB_FORCE_FALLBACK` force an agent); for bug reports.
pub fn features(
    json: bool,
    force: &[crate::features::Fallback],
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    let f = crate::features::Features::probe(force)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &f)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "kernel {}", f.kernel)?;
    let rows: Vec<[String; 4]> = f
        .found
        .iter()
        .map(|p| {
            [
                p.name.to_string(),
                if p.available { "yes" } else { "NO" }.to_string(),
                match (p.available, p.fallback) {
                    (true, _) => p.used_for.to_string(),
                    (false, Some(fb)) => format!("fallback: {fb}"),
                    (false, None) => "REQUIRED: xlb cannot run".to_string(),
                },
                p.detail.clone(),
            ]
        })
        .collect();
    print_table(["FEATURE", "KERNEL", "USE", "DETAIL"], &rows, out)?;
    Ok(())
}

/// What a running agent is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentView {
    /// Who holds each VIP and why (L2), and what this node announces over BGP.
    Owners,
    /// BGP sessions and their BFD state.
    Peers,
}

/// Asks the agent serving `addr` (its `--metrics-addr`) for `view` and writes it to
/// `out`: tables for people, or the agent's JSON as it came with `json`.
pub fn run_agent(
    addr: SocketAddr,
    view: AgentView,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    let path = match view {
        AgentView::Owners => "/debug/owners",
        AgentView::Peers => "/debug/peers",
    };
    let agent_err = |error: String| InspectError::Agent { addr, path, error };
    let body = fetch(addr, path).map_err(agent_err)?;
    match view {
        AgentView::Owners => {
            let owners: Owners =
                serde_json::from_str(&body).map_err(|e| agent_err(e.to_string()))?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &owners)?;
                writeln!(out)?;
            } else {
                print_owners(&owners, out)?;
            }
        }
        AgentView::Peers => {
            let peers: Peers = serde_json::from_str(&body).map_err(|e| agent_err(e.to_string()))?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &peers)?;
                writeln!(out)?;
            } else {
                print_peers(&peers, out)?;
            }
        }
    }
    Ok(())
}

/// `GET path` from the agent at `addr`: the body of a 200 answer, within 3 s.
fn fetch(addr: SocketAddr, path: &'static str) -> Result<String, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let get = async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "xlb-inspect")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(3), get).await })
        .map_err(|_| "no answer within 3 s".to_string())?
}

/// The owners view: L2 (who answers ARP for each VIP, and why), then BGP.
fn print_owners(o: &Owners, out: &mut dyn Write) -> std::io::Result<()> {
    match &o.l2 {
        None => writeln!(
            out,
            "node {}: L2 announcement is off (no node address)",
            o.node
        )?,
        Some(l2) => {
            writeln!(
                out,
                "node {}: L2 on {} (link {}{}), live members: {}",
                o.node,
                l2.interface,
                if l2.link_up { "up" } else { "down" },
                if l2.joining { ", joining" } else { "" },
                l2.live.join(", ")
            )?;
            let rows: Vec<[String; 5]> = l2
                .vips
                .iter()
                .map(|v| {
                    [
                        v.vip.to_string(),
                        v.owner.clone().unwrap_or_else(|| "-".into()),
                        if v.held_here { "yes" } else { "no" }.into(),
                        v.candidates.join(","),
                        v.why.clone(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                writeln!(out, "no VIP is selected by an L2Announcement")?;
            } else {
                print_table(["VIP", "OWNER", "HERE", "CANDIDATES", "WHY"], &rows, out)?;
            }
        }
    }
    if o.bgp.is_empty() {
        writeln!(out, "BGP: this node announces nothing")?;
    } else {
        writeln!(out, "BGP: this node announces")?;
        let rows: Vec<[String; 3]> = o
            .bgp
            .iter()
            .map(|r| [r.prefix.clone(), r.peers.join(","), r.communities.join(" ")])
            .collect();
        print_table(["PREFIX", "PEERS", "COMMUNITIES"], &rows, out)?;
    }
    Ok(())
}

/// The peers view: one row per BGP session, with its BFD state.
fn print_peers(p: &Peers, out: &mut dyn Write) -> std::io::Result<()> {
    if p.peers.is_empty() {
        return writeln!(
            out,
            "node {}: no BGP peer is configured for this node",
            p.node
        );
    }
    let rows: Vec<[String; 7]> = p
        .peers
        .iter()
        .map(|s| {
            let bfd = match &s.bfd {
                None => "-".to_string(),
                Some(b) => match b.detection_ms {
                    Some(ms) => format!("{} ({}, detect {ms} ms)", b.state, b.diag),
                    None => format!("{} ({})", b.state, b.diag),
                },
            };
            [
                s.name.clone(),
                s.address.clone(),
                format!("{}/{}", s.local_asn, s.peer_asn),
                s.state.clone(),
                s.advertised.to_string(),
                bfd,
                s.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        [
            "PEER",
            "ADDRESS",
            "AS LOCAL/PEER",
            "STATE",
            "PREFIXES",
            "BFD",
            "LAST ERROR",
        ],
        &rows,
        out,
    )
}

/// Whether `row` is a frontend of `service` (`namespace/name` or `namespace/name:port`).
fn matches_service(row: &ServiceRow, service: &str) -> bool {
    let Some(name) = &row.service else {
        return false;
    };
    match service.split_once(':') {
        Some((svc, port)) => svc == name && row.port_name.as_deref() == Some(port),
        None => service == name,
    }
}

/// The slot share of each backend in the active table of each of `service`'s frontends.
fn maglev_shares(state: &MapState, rows: &[ServiceRow], service: &str) -> Vec<ShareRow> {
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| matches_service(r, service)) {
        let Some(svc) = state.services.values().find(|s| s.id == row.id) else {
            continue;
        };
        let Some(table) = state.tables.get(&svc.table) else {
            continue;
        };
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for id in table.iter() {
            *counts.entry(*id).or_default() += 1;
        }
        for (id, n) in counts {
            let backend = state.backends.get(&id).map_or_else(
                || format!("id {id} (raw)"),
                |b| state::backend_addr(b).to_string(),
            );
            out.push(ShareRow {
                frontend: row.frontend.clone(),
                backend,
                slots: n,
                of: table.len() as u32,
            });
        }
    }
    out
}

/// `xlb_config`, decoded.
fn config_rows(pin_path: &Path) -> Result<Vec<ConfigRow>, InspectError> {
    use aya::maps::{Array, Map, MapData};
    use xlb_common::{config, names};
    let map: Array<MapData, u64> = Array::try_from(Map::Array(
        MapData::from_pin(pin_path.join(names::CONFIG))
            .map_err(dataplane::map_err(names::CONFIG))?,
    ))
    .map_err(dataplane::map_err(names::CONFIG))?;
    let mut rows = Vec::new();
    for key in 0..map.len() {
        let v = map
            .get(&key, 0)
            .map_err(dataplane::map_err(names::CONFIG))?;
        let (name, value) = match key {
            config::FORWARD_MODE => (
                "forward",
                match v {
                    config::FORWARD_PASS => "pass".into(),
                    config::FORWARD_REDIRECT => "redirect".into(),
                    v => format!("unknown ({v})"),
                },
            ),
            config::NEXT_SERVICE_ID => ("next service id", v.to_string()),
            config::NEXT_BACKEND_ID => ("next backend id", v.to_string()),
            config::NODE_IP => (
                "node ip",
                if v == 0 {
                    "unset (no IPIP, no SNAT)".into()
                } else {
                    std::net::Ipv4Addr::from((v as u32).to_ne_bytes()).to_string()
                },
            ),
            config::IFACE_MAC => (
                "uplink mac",
                if v == 0 {
                    "unset (no check)".into()
                } else {
                    let b = v.to_ne_bytes();
                    format!(
                        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        b[0], b[1], b[2], b[3], b[4], b[5]
                    )
                },
            ),
            config::CLUSTER_MODE => (
                "cluster mode",
                match v {
                    config::CLUSTER_DSR => "dsr".into(),
                    config::CLUSTER_SNAT => "snat".into(),
                    v => format!("unknown ({v})"),
                },
            ),
            config::XDP_MODE => (
                "xdp mode",
                match v {
                    config::XDP_MODE_NATIVE => "native".into(),
                    config::XDP_MODE_GENERIC => "generic".into(),
                    config::XDP_MODE_TC => "tc (no XDP program)".into(),
                    _ => "unknown".into(),
                },
            ),
            config::L2_DEADLINE => (
                "l2 dead-man deadline",
                match v {
                    0 => "unset (ARP not answered)".into(),
                    d => {
                        let left = (i128::from(d)
                            - i128::from(dataplane::conntrack::monotonic_ns()))
                            as f64
                            / 1e9;
                        if left > 0.0 {
                            format!("in {left:.3} s (ARP answered)")
                        } else {
                            format!(
                                "passed {:.3} s ago (ARP not answered: no live agent)",
                                -left
                            )
                        }
                    }
                },
            ),
            _ => ("", v.to_string()),
        };
        if name.is_empty() && v == 0 {
            continue;
        }
        rows.push(ConfigRow {
            key: if name.is_empty() {
                format!("raw key {key}")
            } else {
                name.to_string()
            },
            value,
        });
    }
    // Its own map (see `names::DATAPATH_LOG`); a datapath older than it has none.
    if let Ok(level) = dataplane::events::level(pin_path) {
        rows.push(ConfigRow {
            key: "datapath log".into(),
            value: xlb_common::datapath_log::name(level).into(),
        });
    }
    Ok(rows)
}

/// One programmed frontend (`xlb_services4` key other than the per-VIP ICMP keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// `namespace/name`, or `None` when `xlb_owners` has no entry for the id.
    pub service: Option<String>,
    /// The Service port's name (`""` if unnamed; `None` with `service`).
    pub port_name: Option<String>,
    /// The service id (what the counters and conntrack entries refer to).
    pub id: u32,
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    /// `Local` or `Cluster` (`externalTrafficPolicy`).
    pub policy: &'static str,
    /// `sessionAffinity: ClientIP` timeout in seconds, if set.
    pub affinity_secs: Option<u32>,
    /// Whether `loadBalancerSourceRanges` filter the clients.
    pub source_ranges: bool,
    /// The backends of the active Maglev table, by id.
    pub backends: Vec<BackendRow>,
    /// Maglev table slots (0: no usable backend, packets are dropped).
    pub slots: u32,
    /// Packets the datapath matched to this frontend.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// One backend (`xlb_backends`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    /// Backend id.
    pub id: u32,
    /// Pod address and port.
    pub addr: String,
    /// For a backend on another node: that node's address (the tunnel endpoint);
    /// `"snat"` for a StaticService backend reached by source NAT.
    pub remote_node: Option<String>,
    /// Packets sent to it.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// One tracked flow (`xlb_conntrack4`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    /// The client's address and port.
    pub client: String,
    /// The frontend it reached, `address:port/PROTOCOL`.
    pub frontend: String,
    /// The backend the flow is pinned to.
    pub backend: String,
    /// The backend's id.
    pub backend_id: u32,
    /// The Service (`namespace/name:port`), if the owner is recorded.
    pub service: Option<String>,
    /// Seconds until the entry expires without traffic (negative: expired, not yet
    /// swept).
    pub expires_in_s: i64,
    /// A FIN or RST was seen.
    pub closing: bool,
    /// A TCP flow first seen without a SYN: it keeps the SYN lifetime (60 s).
    pub midstream: bool,
}

/// Reads the maps pinned at `pin_path` and writes `what` to `out`: a table for
/// people, or JSON (an array of rows) with `json`.
pub fn run(
    pin_path: &Path,
    what: What,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    if let What::Conntrack(vip) = what {
        let rows = flow_rows(pin_path, vip)?;
        if json {
            serde_json::to_writer_pretty(&mut *out, &rows)?;
            writeln!(out)?;
        } else {
            print_flows(&rows, out)?;
        }
        return Ok(());
    }
    if let What::Config = what {
        let rows = config_rows(pin_path)?;
        if json {
            serde_json::to_writer_pretty(&mut *out, &rows)?;
            writeln!(out)?;
        } else {
            let table: Vec<[String; 2]> = rows
                .iter()
                .map(|r| [r.key.clone(), r.value.clone()])
                .collect();
            print_table(["KEY", "VALUE"], &table, out)?;
        }
        return Ok(());
    }
    let state = dataplane::read_pinned_state(pin_path)?;
    let stats = Stats::open(pin_path)?.read(
        state.services.values().map(|s| s.id).filter(|id| *id != 0),
        state.backends.keys().copied(),
    )?;
    let backends = backend_rows(&state, &stats);
    match what {
        What::Services => {
            let rows = service_rows(&state, &stats, &backends);
            if json {
                serde_json::to_writer_pretty(&mut *out, &rows)?;
                writeln!(out)?;
            } else {
                print_services(&rows, out)?;
            }
        }
        What::Backends => {
            let rows: Vec<&BackendRow> = backends.values().collect();
            if json {
                serde_json::to_writer_pretty(&mut *out, &rows)?;
                writeln!(out)?;
            } else {
                print_backends(&rows, out)?;
            }
        }
        What::Maglev(service) => {
            let rows = service_rows(&state, &stats, &backends);
            let shares = maglev_shares(&state, &rows, &service);
            if shares.is_empty() && !rows.iter().any(|r| matches_service(r, &service)) {
                return Err(InspectError::NoService(service));
            }
            if json {
                serde_json::to_writer_pretty(&mut *out, &shares)?;
                writeln!(out)?;
            } else {
                let table: Vec<[String; 3]> = shares
                    .iter()
                    .map(|r| {
                        [
                            r.frontend.clone(),
                            r.backend.clone(),
                            format!(
                                "{} of {} ({:.1}%)",
                                r.slots,
                                r.of,
                                100.0 * f64::from(r.slots) / f64::from(r.of.max(1))
                            ),
                        ]
                    })
                    .collect();
                print_table(["FRONTEND", "BACKEND", "SLOTS"], &table, out)?;
            }
        }
        What::Conntrack(_) | What::Config => {}
    }
    Ok(())
}

/// The flows of `xlb_conntrack4`, to `vip` only if given, sorted by frontend then client.
fn flow_rows(pin_path: &Path, vip: Option<std::net::IpAddr>) -> Result<Vec<FlowRow>, InspectError> {
    use aya::maps::{HashMap, Map, MapData};
    use xlb_common::{CT_F_CLOSING, CT_F_MIDSTREAM, CtEntry, FlowKey4, names};
    let open = |name: &'static str| {
        MapData::from_pin(pin_path.join(name)).map_err(dataplane::map_err(name))
    };
    let ct: HashMap<MapData, FlowKey4, CtEntry> =
        HashMap::try_from(Map::LruHashMap(open(names::CONNTRACK4)?))
            .map_err(dataplane::map_err(names::CONNTRACK4))?;
    let owners: HashMap<MapData, u32, xlb_common::Owner> =
        HashMap::try_from(Map::HashMap(open(names::OWNERS)?))
            .map_err(dataplane::map_err(names::OWNERS))?;
    let now = dataplane::conntrack::monotonic_ns();
    let mut rows = Vec::new();
    for kv in ct.iter() {
        let Ok((k, v)) = kv else {
            // An entry evicted while the LRU map is walked: skipped.
            continue;
        };
        let dst = std::net::Ipv4Addr::from(k.dst);
        if vip.is_some_and(|a| a != std::net::IpAddr::V4(dst)) {
            continue;
        }
        let proto = match k.proto {
            xlb_common::PROTO_TCP => "TCP",
            xlb_common::PROTO_UDP => "UDP",
            _ => "other",
        };
        let service = owners
            .get(&v.service_id, 0)
            .ok()
            .and_then(|o| state::owner_of(&o))
            .map(|(s, p)| {
                if p.is_empty() {
                    s.to_string()
                } else {
                    format!("{s}:{p}")
                }
            });
        let left = (i128::from(v.expires) - i128::from(now)).div_euclid(1_000_000_000);
        rows.push(FlowRow {
            client: format!(
                "{}:{}",
                std::net::Ipv4Addr::from(k.src),
                u16::from_be(k.sport)
            ),
            frontend: format!("{dst}:{}/{proto}", u16::from_be(k.dport)),
            backend: state::backend_addr(&v.backend).to_string(),
            backend_id: v.backend_id,
            service,
            expires_in_s: i64::try_from(left).unwrap_or(i64::MAX),
            closing: v.flags & CT_F_CLOSING != 0,
            midstream: v.flags & CT_F_MIDSTREAM != 0,
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(rows)
}

fn print_flows(rows: &[FlowRow], out: &mut dyn Write) -> std::io::Result<()> {
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|f| {
            [
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                f.service
                    .clone()
                    .unwrap_or_else(|| "(no owner recorded)".into()),
                format!(
                    "{}s{}{}",
                    f.expires_in_s,
                    if f.closing { ", closing" } else { "" },
                    if f.midstream { ", mid-stream" } else { "" }
                ),
            ]
        })
        .collect();
    print_table(
        ["CLIENT", "FRONTEND", "BACKEND", "SERVICE", "EXPIRES IN"],
        &table,
        out,
    )
}

fn backend_rows(state: &MapState, stats: &dataplane::StatsSnapshot) -> BTreeMap<u32, BackendRow> {
    state
        .backends
        .iter()
        .map(|(id, b)| {
            let counter = stats.backends.get(id).copied().unwrap_or_default();
            let remote_node = if b.flags & BACKEND_F_SNAT != 0 {
                Some("snat".to_string())
            } else {
                (b.flags & BACKEND_F_REMOTE != 0).then(|| {
                    let node = xlb_common::Backend {
                        addr: b.node,
                        family: b.family,
                        ..Default::default()
                    };
                    state::backend_addr(&node).ip().to_string()
                })
            };
            let row = BackendRow {
                id: *id,
                addr: state::backend_addr(b).to_string(),
                remote_node,
                packets: counter.packets,
                bytes: counter.bytes,
            };
            (*id, row)
        })
        .collect()
}

/// The rows of every non-ICMP key, in key (address, port, protocol) order.
pub fn service_rows(
    state: &MapState,
    stats: &dataplane::StatsSnapshot,
    backends: &BTreeMap<u32, BackendRow>,
) -> Vec<ServiceRow> {
    let mut rows = Vec::new();
    for (key, svc) in &state.services {
        if key.proto == PROTO_ICMP {
            continue;
        }
        let Some(vip) = state::vip_key(key) else {
            continue;
        };
        let owner = state.owners.get(&svc.id).and_then(state::owner_of);
        let mut ids: Vec<u32> = state
            .tables
            .get(&svc.table)
            .map(|t| t.to_vec())
            .unwrap_or_default();
        if svc.count == 0 {
            ids.clear();
        }
        ids.sort_unstable();
        ids.dedup();
        let counter = stats.services.get(&svc.id).copied().unwrap_or_default();
        rows.push(ServiceRow {
            service: owner.as_ref().map(|(s, _)| s.to_string()),
            port_name: owner.map(|(_, p)| p),
            id: svc.id,
            frontend: format!(
                "{}/{}",
                SocketAddr::new(vip.addr, vip.port),
                vip.protocol.as_str()
            ),
            policy: if svc.flags & SVC_F_LOCAL != 0 {
                "Local"
            } else {
                "Cluster"
            },
            affinity_secs: (svc.flags & SVC_F_AFFINITY != 0).then_some(svc.affinity_secs),
            source_ranges: svc.flags & SVC_F_SOURCE_RANGES != 0,
            backends: ids
                .iter()
                .filter_map(|id| backends.get(id).cloned())
                .collect(),
            slots: svc.count,
            packets: counter.packets,
            bytes: counter.bytes,
        });
    }
    rows
}

fn print_services(rows: &[ServiceRow], out: &mut dyn Write) -> std::io::Result<()> {
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let service = match (&r.service, &r.port_name) {
                (Some(s), Some(p)) if !p.is_empty() => format!("{s}:{p}"),
                (Some(s), _) => s.clone(),
                _ => format!("id {} (raw: no owner recorded)", r.id),
            };
            let mut policy = r.policy.to_string();
            if let Some(t) = r.affinity_secs {
                policy.push_str(&format!(", affinity {t}s"));
            }
            if r.source_ranges {
                policy.push_str(", source ranges");
            }
            let backends = if r.backends.is_empty() {
                "none (dropped)".to_string()
            } else {
                r.backends
                    .iter()
                    .map(|b| match &b.remote_node {
                        Some(n) if n == "snat" => format!("{} (snat)", b.addr),
                        Some(n) => format!("{} via {n}", b.addr),
                        None => b.addr.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            [
                service,
                r.frontend.clone(),
                policy,
                backends,
                r.packets.to_string(),
            ]
        })
        .collect();
    print_table(
        ["SERVICE", "FRONTEND", "POLICY", "BACKENDS", "PACKETS"],
        &table,
        out,
    )
}

fn print_backends(rows: &[&BackendRow], out: &mut dyn Write) -> std::io::Result<()> {
    let table: Vec<[String; 4]> = rows
        .iter()
        .map(|b| {
            [
                b.id.to_string(),
                b.addr.clone(),
                b.remote_node.clone().unwrap_or_else(|| "local".into()),
                b.packets.to_string(),
            ]
        })
        .collect();
    print_table(["ID", "ADDRESS", "NODE", "PACKETS"], &table, out)
}

/// Left-aligned columns two spaces apart, headers first.
fn print_table<const N: usize>(
    headers: [&str; N],
    rows: &[[String; N]],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>, out: &mut dyn Write| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(headers.to_vec(), out)?;
    for row in rows {
        line(row.iter().map(String::as_str).collect(), out)?;
    }
    Ok(())
}
