//! `xlb inspect`: what the datapath holds, read from the pinned maps directly, so it
//! works while the agent is down or crash-looping (as `cilium bpf lb list` does).
//!
//! Service ids resolve to their Service port through `xlb_owners`, which the agent
//! writes before it serves a key; an id without an owner is shown as a raw id and
//! said to be raw. Counters are the datapath's per-CPU counters, summed.
use std::{collections::BTreeMap, io::Write, net::SocketAddr, path::Path};

use serde::Serialize;
use xlb_common::{BACKEND_F_REMOTE, PROTO_ICMP, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES};

use crate::dataplane::{
    self, DataplaneError, Stats,
    state::{self, MapState},
};

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// Every programmed frontend with its Service, policy, backends and counters.
    Services,
    /// Every backend with its address, node and counters.
    Backends,
    /// The tracked IPv4 flows (client -> frontend -> backend), optionally only those
    /// to one frontend address.
    Conntrack(Option<std::net::IpAddr>),
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
}

/// One programmed frontend (`xlb_services` key other than the per-VIP ICMP keys).
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
    /// For a backend on another node: that node's address (the tunnel endpoint).
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
        What::Conntrack(_) => {}
    }
    Ok(())
}

/// The flows of `xlb_conntrack4`, to `vip` only if given, sorted by frontend then client.
fn flow_rows(pin_path: &Path, vip: Option<std::net::IpAddr>) -> Result<Vec<FlowRow>, InspectError> {
    use aya::maps::{HashMap, Map, MapData};
    use xlb_common::{CT_F_CLOSING, CtEntry, FlowKey4, names};
    let open = |name: &'static str| {
        MapData::from_pin(pin_path.join(name)).map_err(dataplane::map_err(name))
    };
    let ct: HashMap<MapData, FlowKey4, CtEntry> =
        HashMap::try_from(Map::LruHashMap(open(names::CONNTRACK4)?))
            .map_err(dataplane::map_err(names::CONNTRACK4))?;
    let owners: HashMap<MapData, u32, xlb_common::Owner> =
        HashMap::try_from(Map::HashMap(open(names::OWNERS)?))
            .map_err(dataplane::map_err(names::OWNERS))?;
    let now = monotonic_ns();
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
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(rows)
}

/// CLOCK_MONOTONIC in ns, the clock of the datapath's `bpf_ktime_get_coarse_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
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
                    "{}s{}",
                    f.expires_in_s,
                    if f.closing { ", closing" } else { "" }
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
            let remote_node = (b.flags & BACKEND_F_REMOTE != 0).then(|| {
                let node = xlb_common::Backend {
                    addr: b.node,
                    family: b.family,
                    ..Default::default()
                };
                state::backend_addr(&node).ip().to_string()
            });
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
