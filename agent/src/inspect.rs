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

/// Reads the maps pinned at `pin_path` and writes `what` to `out`: a table for
/// people, or JSON (an array of rows) with `json`.
pub fn run(
    pin_path: &Path,
    what: What,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
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
    }
    Ok(())
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
