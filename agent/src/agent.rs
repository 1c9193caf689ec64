//! The running agent: one loop that, on every source change, loads the model,
//! computes the desired state, diffs it against what the maps hold and applies the
//! difference. Errors in the input are reported once each and skipped; a failed map
//! write is retried from a fresh read of the maps.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    checks::{self, Checker},
    dataplane::{
        ClusterMode, Dataplane, DataplaneError, ForwardMode, NodeConfig, Stats, conntrack, pin,
        state::{self, Ids, MapState, Write},
    },
    desired::{self, Desired},
    health::HealthServers,
    metrics::{self, BpfCollector, Metrics},
    model::ConfigError,
    source::{
        Source,
        kube::KubeSource,
        manifests::{self, ManifestSource},
    },
};

/// Everything `xlb agent` needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Uplink interface the programs attach to.
    pub interface: String,
    /// This node's name, matched against EndpointSlice `nodeName`.
    pub node_name: String,
    /// Where Services, EndpointSlices, Nodes and xlb's own objects come from.
    pub source: SourceConfig,
    /// `/metrics` and `/healthz` listen address.
    pub metrics_addr: SocketAddr,
    /// bpffs directory for maps and links.
    pub pin_path: PathBuf,
    /// XDP attach mode.
    pub xdp_mode: crate::netdev::XdpChoice,
    /// Capacity of the connection-tracking (and reverse-NAT) map.
    pub conntrack_size: u32,
    /// How XDP forwards DNATed packets.
    pub forward: ForwardMode,
    /// How remote backends of Cluster services are reached.
    pub cluster: ClusterMode,
    /// This node's address for IPIP between nodes; `None`: the interface's first IPv4.
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// The cluster's node port range.
    pub node_ports: std::ops::RangeInclusive<u16>,
    /// UDP port of the L2 membership protocol between agents (`--memberlist-port`).
    pub memberlist_port: u16,
    /// Keys that authenticate the membership (`--memberlist-key-file`).
    pub memberlist_key_file: Option<std::path::PathBuf>,
    /// `--memberlist-key-transition`: how agents without the key are treated.
    pub memberlist_key_transition: crate::l2::seal::Transition,
    /// How long a stopping agent's node keeps its L2 VIPs (`--restart-grace`).
    pub restart_grace: Duration,
    /// Datapath event level at start (`--datapath-log`, `xlb_common::datapath_log`).
    pub datapath_log: u64,
    /// TCP port the BGP speaker accepts its peers' connections on (`--bgp-listen-port`;
    /// 0: active open only).
    pub bgp_listen_port: u16,
    /// What this kernel offers the datapath, probed at start (`crate::features`).
    pub features: crate::features::Features,
}

/// Which source the agent reads.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A manifest directory, watched with inotify.
    Manifests(PathBuf),
    /// The Kubernetes API: this kubeconfig, or (`None`) the usual inference (in-cluster
    /// service account, then `$KUBECONFIG` / `~/.kube/config`).
    Kubernetes {
        /// `--kubeconfig`.
        kubeconfig: Option<PathBuf>,
        /// `--lease-namespace`: where the IPAM leader's Lease is.
        lease_namespace: String,
        /// `--namespace`: the agent's own namespace, where BGPPeer `passwordSecret`s
        /// are read (the only namespace whose Secrets it reads).
        namespace: String,
        /// `--lease-duration`.
        lease_duration: Duration,
    },
}

/// How often expired conntrack entries are removed and the rest counted. Short next
/// to the shortest lifetime (10 s after FIN/RST), so the map holds little dead state.
const CT_SWEEP_PERIOD: Duration = Duration::from_secs(10);

/// How long changes that arrive together are coalesced into one sync.
const SETTLE: Duration = Duration::from_millis(2);

/// Returns freed heap to the kernel (glibc keeps it otherwise): a sync that parsed
/// manifests or wrote many maps leaves tens of MiB of freed parse trees and
/// intermediate states behind, which would stay in the agent's RSS.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Loading, attaching or taking over the datapath failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The manifest directory cannot be watched.
    #[error("watching {dir}: {message}")]
    Watch {
        /// Directory.
        dir: PathBuf,
        /// Cause.
        message: String,
    },
    /// The metrics listener failed.
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        /// Listen address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The interface does not exist (checked before anything is attached).
    #[error("interface {0} does not exist")]
    Interface(String),
    /// `--xdp-mode native --forward redirect` on a veth uplink: native XDP on a veth
    /// sees packets of local senders with partial checksums (TX offload) and cannot
    /// complete them, so redirected packets reach pods with bad checksums.
    #[error(
        "--xdp-mode native with --forward redirect cannot deliver on {0} (a veth: its native XDP gets packets with partial checksums, which pods then drop); use --xdp-mode generic (or auto) with --forward redirect, or the default --forward pass"
    )]
    NativeRedirectOnVeth(String),
    /// The pin directory cannot be used, or another agent holds it.
    #[error("pin path {path}: {source}")]
    PinPath {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// No usable Kubernetes client configuration.
    #[error("Kubernetes client: {0}")]
    Kube(String),
    /// L2 announcement could not start (memberlist port taken, no CAP_NET_RAW, ...).
    #[error("L2 announcement: {0}")]
    L2(#[from] crate::l2::task::L2Error),
}

/// The reconciler's memory: what it last applied and the errors already reported.
struct Reconciler {
    dp: Dataplane,
    node_name: String,
    interface: String,
    /// Other nodes' tunnel addresses this agent keeps resolved.
    neighbours: BTreeSet<std::net::Ipv4Addr>,
    /// Kept as managed entries (the kernel re-resolves them); else marked used every
    /// [`crate::features::NEIGH_USE_PERIOD`], last at `neighbours_used`.
    managed_neigh: bool,
    neighbours_used: std::time::Instant,
    /// The source asked to be loaded again after this long (a file that emptied).
    recheck: Option<Duration>,
    applied: MapState,
    /// The maps hold what the last load asked for (the last sync succeeded and the
    /// datapath was not re-attached since).
    in_sync: bool,
    /// The first load, made while the programs were loading; used by the first sync.
    preloaded: Option<crate::source::Loaded>,
    /// Maglev tables by their inputs, from the last target (see [`state::TableCache`]).
    tables: state::TableCache,
    /// Bookkeeping over `applied` for changing a few services alone; `None` until a
    /// whole sync has succeeded (and after a failed one).
    index: Option<state::Index>,
    /// A sync parsed manifests without trimming the heap after (left to the
    /// once-a-second tick, off the path of the next change).
    heap_dirty: bool,
    ids: Ids,
    bounds: state::TableBounds,
    previous: Option<Desired>,
    reported: BTreeSet<String>,
    metrics: Arc<Metrics>,
    collector: Arc<BpfCollector>,
    /// What L2 announcement needs from each applied snapshot (see [`crate::l2`]).
    l2_plan: watch::Sender<Arc<crate::l2::Plan>>,
    /// What the BGP speaker announces, from each applied snapshot and desired state.
    bgp_plan: watch::Sender<Arc<crate::bgp::plan::Plan>>,
    /// This node's IPv4 address: the default BGP identifier.
    node_ip: Option<std::net::Ipv4Addr>,
    /// What the IPAM leader should write (Kubernetes API source only; see
    /// [`crate::status`]).
    status_plan: Option<watch::Sender<Arc<crate::status::Plan>>>,
    /// The health checks the model the maps were last brought to asks for. (Not the
    /// snapshot itself: holding it would make the source copy the whole model on its
    /// next change instead of updating it in place.)
    probes: BTreeSet<crate::model::Probe>,
}

impl Reconciler {
    /// Reports each distinct error once (log line + metric); errors that went away
    /// are forgotten so that they are reported again if they come back.
    fn report(&mut self, errors: &[ConfigError]) {
        let now: BTreeSet<String> = errors.iter().map(|e| e.to_string()).collect();
        for e in errors {
            let s = e.to_string();
            if !self.reported.contains(&s) {
                warn!(error = %s, "configuration error: skipped, last good state kept");
                self.metrics
                    .config_errors
                    .get_or_create(&vec![("kind", e.kind().to_string())])
                    .inc();
            }
        }
        self.reported = now;
    }

    /// Hands the IPAM leader what to write for this snapshot (when it differs).
    fn publish_status(&self, snapshot: &crate::model::Snapshot, errors: &[ConfigError]) {
        if let Some(tx) = &self.status_plan {
            let plan = crate::status::plan(snapshot, errors);
            tx.send_if_modified(|p| {
                let differs = **p != plan;
                if differs {
                    *p = Arc::new(plan);
                }
                differs
            });
        }
    }

    fn sync(&mut self, source: &mut Source) -> Result<(), DataplaneError> {
        let started = Instant::now();
        let loaded = match self.preloaded.take() {
            Some(l) => l,
            None if self.in_sync => match source.load_if_changed() {
                Some(l) => l,
                // Nothing new since the last sync that reached the maps (an event
                // for a file that is not a manifest, an unchanged file rewritten, a
                // periodic resync): the desired state is the same, nothing to do.
                None => return Ok(()),
            },
            None => match source.load() {
                Some(l) => l,
                // The API not listed yet: the maps keep what they hold.
                None => return Ok(()),
            },
        };
        let t_load = started.elapsed();
        self.metrics.files_parsed.inc_by(loaded.parsed as u64);
        self.recheck = loaded.recheck;
        if let (crate::source::Changed::Services(changed), true) =
            (&loaded.changed, self.in_sync && self.index.is_some())
        {
            return self.sync_services(&loaded, changed, started, t_load);
        }
        // Before the first apply, the maps' recorded owners stand in for `previous`.
        let restored = match self.previous {
            Some(_) => desired::Restored::new(),
            None => state::incumbents(&self.applied),
        };
        let desired = desired::compute_with(
            &loaded.snapshot,
            &self.node_name,
            self.previous.as_ref(),
            &restored,
        );
        let t_desired = started.elapsed();
        let mut errors = loaded.errors;
        errors.extend(desired.errors.iter().cloned());
        self.report(&errors);
        self.publish_status(&loaded.snapshot, &errors);
        for (vip, ds) in &desired.services {
            if !ds.remote_backends.is_empty() {
                tracing::debug!(
                    service = %ds.owner, %vip.addr, vip.port,
                    remote = ds.remote_backends.len(),
                    "remote endpoints of a Cluster service are not forwarded to yet"
                );
            }
        }

        let target = match state::target_cached(
            &desired,
            &self.applied,
            self.ids,
            self.bounds,
            &self.tables,
        ) {
            Ok(t) => t,
            Err(e) => {
                error!(error = %e, "desired state does not fit the maps; keeping the current one");
                self.count_sync("too_large");
                return Ok(());
            }
        };
        let t_target = started.elapsed();
        let writes = state::diff(&self.applied, &target.state);
        let t_diff = started.elapsed();
        self.in_sync = false;
        self.index = None;
        if let Err(e) = self.dp.apply(&writes) {
            // Start the next attempt from what the maps really hold.
            self.applied = self.dp.read_state()?;
            self.count_sync("error");
            return Err(e);
        }
        let t_apply = started.elapsed();
        let id_writes = self.dp.write_ids(self.ids, target.ids)?;
        self.metrics
            .map_updates
            .inc_by(writes.len() as u64 + id_writes);
        log_changes(&writes, |id| target.services.get(&id).cloned());
        self.collector.set_target(&target);
        // Not counting the per-VIP ICMP keys (id 0).
        self.metrics
            .services
            .set(target.state.services.values().filter(|s| s.id != 0).count() as i64);
        self.applied = target.state;
        self.tables = target.tables_built;
        self.index = Some(target.index);
        self.ids = target.ids;
        self.keep_neighbours(&desired);
        self.previous = Some(desired);
        self.publish(&loaded.snapshot);
        self.in_sync = true;
        self.count_sync("ok");
        if writes.len() > 1000 || loaded.parsed > 0 {
            trim_heap();
        }
        let took = started.elapsed();
        self.metrics.sync_duration.observe(took.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let level_info = !writes.is_empty() || loaded.parsed > 0;
        if level_info {
            info!(
                files_parsed = loaded.parsed,
                writes = writes.len(),
                load_ms = ms(t_load),
                desired_ms = ms(t_desired - t_load),
                target_ms = ms(t_target - t_desired),
                diff_ms = ms(t_diff - t_target),
                apply_ms = ms(t_apply - t_diff),
                total_ms = ms(took),
                "sync"
            );
        }
        self.metrics.ready.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Reconciler {
    /// The sync of a load that changed only some Services: their desired entries, the
    /// writes for the keys that changed, and nothing for the other Services (one
    /// EndpointSlice among 10,000 Services costs what one Service costs).
    fn sync_services(
        &mut self,
        loaded: &crate::source::Loaded,
        changed: &BTreeSet<crate::model::ServiceRef>,
        started: Instant,
        t_load: Duration,
    ) -> Result<(), DataplaneError> {
        let (Some(mut desired), Some(index)) = (self.previous.take(), self.index.take()) else {
            return Ok(());
        };
        let keys = desired::update(&mut desired, &loaded.snapshot, &self.node_name, changed);
        let t_desired = started.elapsed();
        let mut errors = loaded.errors.clone();
        errors.extend(desired.errors.iter().cloned());
        self.report(&errors);
        self.publish_status(&loaded.snapshot, &errors);
        let patch = match state::plan(
            &desired,
            &keys,
            &self.applied,
            &index,
            self.ids,
            self.bounds,
            &self.tables,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Not applied; without the index the next sync is a whole one.
                error!(error = %e, "desired state does not fit the maps; keeping the current one");
                self.count_sync("too_large");
                self.previous = Some(desired);
                return Ok(());
            }
        };
        let t_target = started.elapsed();
        self.in_sync = false;
        if let Err(e) = self.dp.apply(&patch.writes) {
            self.applied = self.dp.read_state()?;
            self.previous = Some(desired);
            self.count_sync("error");
            return Err(e);
        }
        let t_apply = started.elapsed();
        let id_writes = self.dp.write_ids(self.ids, patch.ids)?;
        self.metrics
            .map_updates
            .inc_by(patch.writes.len() as u64 + id_writes);
        self.collector
            .patch_labels(&patch.services, &patch.backends);
        log_changes(&patch.writes, |id| self.collector.service_labels(id));
        let added: i64 = patch
            .services
            .values()
            .map(|l| if l.is_some() { 1 } else { -1 })
            .sum();
        self.metrics
            .services
            .set(self.metrics.services.get() + added);
        self.ids = patch.ids;
        let writes = patch.writes.len();
        let mut index = index;
        patch.commit(&mut self.applied, &mut index, &mut self.tables);
        self.index = Some(index);
        self.heap_dirty |= loaded.parsed > 0;
        self.keep_neighbours(&desired);
        self.previous = Some(desired);
        self.publish(&loaded.snapshot);
        self.in_sync = true;
        self.count_sync("ok");
        let took = started.elapsed();
        self.metrics.sync_duration.observe(took.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if writes > 0 || loaded.parsed > 0 {
            info!(
                files_parsed = loaded.parsed,
                services = changed.len(),
                keys = keys.len(),
                writes,
                load_ms = ms(t_load),
                desired_ms = ms(t_desired - t_load),
                plan_ms = ms(t_target - t_desired),
                apply_ms = ms(t_apply - t_target),
                total_ms = ms(took),
                "sync (changed services only)"
            );
        }
        self.metrics.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Counts a sync by its result (`xlb_syncs_total{result}`).
    fn count_sync(&self, result: &str) {
        self.metrics
            .syncs
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// Keeps `snapshot` as the applied one and hands L2 announcement its plan, called
    /// once the services behind the VIPs are in the maps (so a VIP is never announced
    /// before it is served).
    fn publish(&mut self, snapshot: &crate::model::Snapshot) {
        self.probes = checks::probes(snapshot);
        let plan = crate::l2::Plan::from_model(snapshot, &self.interface);
        self.l2_plan.send_if_modified(|p| {
            let changed = **p != plan;
            if changed {
                *p = Arc::new(plan);
            }
            changed
        });
        if let Some(desired) = &self.previous {
            let plan = crate::bgp::plan::Plan::from_model(
                snapshot,
                &self.node_name,
                self.node_ip,
                desired,
            );
            self.bgp_plan.send_if_modified(|p| {
                let changed = **p != plan;
                if changed {
                    *p = Arc::new(plan);
                }
                changed
            });
        }
    }

    /// Publishes the maps' kernel memory (`xlb_map_memory_bytes`): a few fdinfo reads,
    /// and the inner tables' from what was applied.
    fn report_memory(&self, pin_path: &std::path::Path) {
        for (name, bytes) in crate::dataplane::layout::pinned_memory(pin_path) {
            self.metrics
                .map_memory
                .get_or_create(&vec![("map", name.to_string())])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let tables =
            crate::dataplane::layout::tables_memory(self.applied.tables.values().map(|t| t.len()));
        self.metrics
            .map_memory
            .get_or_create(&vec![("map", "xlb_maglev_tables".to_string())])
            .set(i64::try_from(tables).unwrap_or(i64::MAX));
    }

    /// Points `xlb_peer_devs` at the pod-facing devices that exist now, so that new
    /// pods get the direct delivery and a deleted device's index is never used.
    fn refresh_peer_devices(&mut self) {
        match crate::netdev::peer_devices() {
            Ok(devs) => match self.dp.set_peer_devices(&devs) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(devices = devs.len(), "pod-facing devices updated");
                    self.metrics.map_updates.inc_by(n);
                }
                Err(e) => warn!(error = %e, "updating the pod-facing devices"),
            },
            Err(e) => warn!(error = %e, "listing the pod-facing devices"),
        }
    }

    /// Rebuilds the datapath after it disappeared: loads and attaches the programs
    /// (recreating maps whose pins are gone), then continues from what the maps hold,
    /// so the next sync writes whatever is missing.
    fn reattach(&mut self, cfg: &Config) -> Result<(), DataplaneError> {
        let (mut dp, _) = Dataplane::open(
            &cfg.interface,
            &cfg.pin_path,
            cfg.xdp_mode,
            cfg.conntrack_size,
            &cfg.features,
        )?;
        dp.set_node(&node_config(cfg))?;
        self.in_sync = false;
        self.applied = dp.read_state()?;
        self.ids = Ids::after(&self.applied, dp.read_ids()?);
        self.dp = dp;
        self.collector.reopen(&cfg.pin_path)?;
        // Managed neighbour entries live on the interface, which may be new.
        self.neighbours.clear();
        Ok(())
    }

    /// Without managed entries: marks every kept entry used once per
    /// [`crate::features::NEIGH_USE_PERIOD`], so the kernel resolves it again (an
    /// entry XDP's FIB lookup reads is never "used" by the kernel's own path).
    fn use_neighbours(&mut self) {
        if self.managed_neigh || self.neighbours_used.elapsed() < crate::features::NEIGH_USE_PERIOD
        {
            return;
        }
        self.neighbours_used = std::time::Instant::now();
        for ip in &self.neighbours {
            if let Err(e) = crate::netdev::use_neighbour(&self.interface, *ip) {
                warn!(error = %e, "marking a node's neighbour entry used");
            }
        }
    }

    /// Keeps a neighbour entry (managed, or marked used: see [`Self::use_neighbours`]) for
    /// every other node that holds a backend of a
    /// Cluster service, so XDP's FIB lookup finds them resolved (what XDP cannot
    /// resolve it hands to `xlb_tc_ingress`; this keeps that the exception). Failures
    /// are logged and retried on the next sync; they cost latency, not packets.
    fn keep_neighbours(&mut self, desired: &Desired) {
        let want: BTreeSet<std::net::Ipv4Addr> = desired
            .services
            .values()
            .flat_map(|s| &s.remote_backends)
            .filter_map(|r| match r.node_ip {
                Some(std::net::IpAddr::V4(ip)) => Some(ip),
                _ => None,
            })
            .collect();
        for ip in &want {
            if self.neighbours.contains(ip) {
                continue;
            }
            let kept = if self.managed_neigh {
                crate::netdev::add_managed_neighbour(&self.interface, *ip)
            } else {
                crate::netdev::use_neighbour(&self.interface, *ip)
            };
            match kept {
                Ok(()) => {
                    info!(node_ip = %ip, iface = %self.interface, managed = self.managed_neigh, "keeping the node's neighbour entry resolved");
                    self.neighbours.insert(*ip);
                }
                Err(e) => warn!(error = %e, "managed neighbour entry"),
            }
        }
        let interface = &self.interface;
        self.neighbours.retain(|ip| {
            let keep = want.contains(ip);
            if !keep && let Err(e) = crate::netdev::remove_neighbour(interface, *ip) {
                warn!(error = %e, "removing a managed neighbour entry");
            }
            keep
        });
        self.metrics.neighbours.set(self.neighbours.len() as i64);
    }
}

/// One log line per changed service, none per packet or per unchanged sync.
fn log_changes(writes: &[Write], labels: impl Fn(u32) -> Option<state::ServiceLabels>) {
    if writes.is_empty() {
        return;
    }
    for w in writes {
        match w {
            Write::PutService(_, svc) if svc.id == 0 => {}
            Write::DelService(k) if k.proto == xlb_common::PROTO_ICMP => {}
            Write::PutService(k, svc) => {
                if let Some(l) = labels(svc.id) {
                    info!(
                        service = %l.owner, vip = %l.vip, port = l.port, protocol = l.protocol.as_str(),
                        backends = svc.count, local = svc.flags & xlb_common::SVC_F_LOCAL != 0,
                        "service programmed"
                    );
                } else {
                    info!(?k, backends = svc.count, "service programmed");
                }
            }
            Write::DelService(k) => {
                let vip = state::backend_addr(&xlb_common::Backend {
                    addr: k.addr,
                    port: k.port,
                    family: k.family,
                    ..Default::default()
                });
                info!(vip = %vip, proto = k.proto, "service removed");
            }
            _ => {}
        }
    }
    info!(writes = writes.len(), "maps updated");
}

/// (device, inode, birth time) of `dir`: changes when the directory is replaced. The
/// birth time (statx) tells a new directory that reuses the old one's inode number,
/// as ext4 and tmpfs do at once; without it, the inode alone is compared.
fn dir_identity(dir: &std::path::Path) -> Option<(u64, u64, Option<std::time::SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.created().ok()))
}

/// The node-level datapath settings from the command line and the interface.
/// Publishes the source's state: `xlb_source_up{source}` and the `/healthz` detail.
fn report_source(metrics: &Metrics, source: &Source) {
    let (name, up, detail) = match source.api_status() {
        None => ("manifests", true, String::new()),
        Some(s) => {
            let missing: Vec<&str> = crate::source::kube::KINDS
                .iter()
                .copied()
                .filter(|k| !s.synced.contains(k))
                .collect();
            let state = match (&s.unreachable, missing.is_empty()) {
                (Some(e), _) => (
                    "kubernetes",
                    false,
                    format!("API server unreachable ({e}); serving the last good state\n"),
                ),
                (None, false) => (
                    "kubernetes",
                    false,
                    format!("API server: not listed yet: {}\n", missing.join(", ")),
                ),
                (None, true) => ("kubernetes", true, String::new()),
            };
            let (name, up, mut detail) = state;
            if !s.refused.is_empty() {
                let refused: Vec<String> = s
                    .refused
                    .iter()
                    .map(|(k, why)| format!("{k} ({why})"))
                    .collect();
                detail.push_str(&format!(
                    "API server refuses, taken as empty: {}\n",
                    refused.join(", ")
                ));
            }
            (name, up, detail)
        }
    };
    metrics
        .source_up
        .get_or_create(&vec![("source", name.to_string())])
        .set(i64::from(up));
    if let Ok(mut d) = metrics.source_detail.lock() {
        *d = detail;
    }
}

/// A Kubernetes client from `kubeconfig`, or inferred (in-cluster service account,
/// then `$KUBECONFIG` / `~/.kube/config`).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, AgentError> {
    let err = |e: &dyn std::fmt::Display| AgentError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

fn node_config(cfg: &Config) -> NodeConfig {
    NodeConfig {
        forward: cfg.forward,
        cluster: cfg.cluster,
        ip: cfg
            .node_ip
            .or_else(|| crate::netdev::interface_ipv4(&cfg.interface)),
        mac: crate::netdev::interface_mac(&cfg.interface),
        datapath_log: cfg.datapath_log,
    }
}

/// Runs the agent until SIGTERM/SIGINT. The datapath is left attached and pinned on
/// exit so that traffic keeps flowing until the next agent takes over.
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    // Everything that can fail is checked before the datapath is touched, so a start
    // that fails leaves no links taken over and no maps pinned.
    if crate::netdev::ifindex(&cfg.interface).is_none() {
        return Err(AgentError::Interface(cfg.interface.clone()));
    }
    if cfg.forward == ForwardMode::Redirect
        && cfg.xdp_mode == crate::netdev::XdpChoice::Native
        && crate::netdev::driver_info(&cfg.interface).is_ok_and(|d| d.driver == "veth")
    {
        return Err(AgentError::NativeRedirectOnVeth(cfg.interface.clone()));
    }
    if let SourceConfig::Manifests(dir) = &cfg.source
        && !dir.is_dir()
    {
        return Err(AgentError::Watch {
            dir: dir.clone(),
            message: "not a directory".into(),
        });
    }
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: cfg.metrics_addr,
            source,
        })?;
    // Manifests: an inotify watch on the directory; the API: the watchers' events.
    let (changes_tx, mut changes) = mpsc::channel(1);
    let manifests_dir = match &cfg.source {
        SourceConfig::Manifests(dir) => Some(dir.clone()),
        SourceConfig::Kubernetes { .. } => None,
    };
    let mut _watcher = None;
    if let Some(dir) = &manifests_dir {
        let (w, c) = manifests::watch(dir).map_err(|e| AgentError::Watch {
            dir: dir.clone(),
            message: e.to_string(),
        })?;
        (_watcher, changes) = (Some(w), c);
    }
    let kube_client = match &cfg.source {
        SourceConfig::Manifests(_) => None,
        SourceConfig::Kubernetes { kubeconfig, .. } => {
            Some(kube_client(kubeconfig.as_deref()).await?)
        }
    };
    let mut watched = manifests_dir.as_deref().and_then(dir_identity);
    let pin_err = |source| AgentError::PinPath {
        path: cfg.pin_path.clone(),
        source,
    };
    pin::prepare(&cfg.pin_path).map_err(pin_err)?;
    // One agent per pin path: a second one would take the links over and the two
    // would fight over the maps.
    let _lock = pin::lock(&cfg.pin_path).map_err(pin_err)?;

    // The first load (parsing every manifest, the bulk of a cold start) runs while
    // the kernel verifies and attaches the programs; changes from now on are seen by
    // the watcher set up above, and trigger a load of their own.
    let node_ports = cfg.node_ports.clone();
    let first_dir = manifests_dir.clone();
    let first_load = std::thread::spawn(move || {
        let dir = first_dir?;
        let mut source = ManifestSource::new(dir).with_node_ports(node_ports);
        let loaded = source.load();
        Some((source, loaded))
    });
    // `--forward redirect` is XDP's: auto mode then keeps XDP on a virtual device.
    let xdp_mode = match cfg.xdp_mode {
        crate::netdev::XdpChoice::Auto if cfg.forward == ForwardMode::Redirect => {
            crate::netdev::XdpChoice::AutoXdp
        }
        m => m,
    };
    let (mut dp, xdp) = Dataplane::open(
        &cfg.interface,
        &cfg.pin_path,
        xdp_mode,
        cfg.conntrack_size,
        &cfg.features,
    )?;
    info!(
        iface = %cfg.interface,
        mode = xdp.mode(),
        driver = %xdp.driver,
        reason = %xdp.reason,
        "XDP attach mode"
    );
    let fallbacks = cfg.features.fallbacks();
    if fallbacks.is_empty() {
        info!(kernel = %cfg.features.kernel, "kernel features: every probed feature is there; no fallback");
    } else {
        warn!(kernel = %cfg.features.kernel, fallbacks = ?fallbacks, "kernel features: taking fallbacks (`xlb inspect features` lists every probe)");
    }
    let node = node_config(&cfg);
    let node_writes = dp.set_node(&node)?;
    match node.ip {
        Some(ip) => {
            info!(%ip, forward = ?node.forward, cluster = ?node.cluster, "node datapath settings")
        }
        None => warn!(
            iface = %cfg.interface,
            "no IPv4 address on the interface and no --node-ip: Cluster services reach other nodes' endpoints only once one is set"
        ),
    }
    let applied = dp.read_state()?;
    let ids = Ids::after(&applied, dp.read_ids()?);
    info!(
        services = applied.services.len(),
        backends = applied.backends.len(),
        "datapath ready; reconciling from the state the maps hold"
    );
    let ct_counts = Arc::new(conntrack::CtCounts::default());
    conntrack::spawn(
        cfg.pin_path.clone(),
        CT_SWEEP_PERIOD,
        ct_counts.clone(),
        cfg.features.map_batch(),
    );
    let collector = BpfCollector::new(Stats::open(&cfg.pin_path)?, ct_counts);
    let metrics = Metrics::new(collector.clone());
    metrics.map_updates.inc_by(node_writes);
    metrics
        .xdp_mode
        .get_or_create(&vec![
            ("interface", cfg.interface.clone()),
            ("mode", xdp.mode().to_string()),
            ("driver", xdp.driver.clone()),
        ])
        .set(1);
    for f in &cfg.features.found {
        metrics
            .kernel_features
            .get_or_create(&vec![
                ("feature", f.name.to_string()),
                ("available", f.available.to_string()),
                ("fallback", f.fallback.unwrap_or("").to_string()),
            ])
            .set(i64::from(f.used));
    }

    let listener_metrics = metrics.clone();
    let views = Arc::new(crate::introspect::Views::new(&cfg.node_name));
    let listener_views = views.clone();
    let (server_err_tx, mut server_err) = mpsc::channel(1);
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, listener_metrics, listener_views).await {
            let _ = server_err_tx.send(e).await;
        }
    });

    let (l2_plan, l2_rx) = watch::channel(Arc::new(crate::l2::Plan::default()));
    let l2_task = match node.ip {
        Some(ip) => {
            let l2_cfg = crate::l2::task::L2Config {
                interface: cfg.interface.clone(),
                node_name: cfg.node_name.clone(),
                node_ip: ip.into(),
                port: cfg.memberlist_port,
                pin_path: cfg.pin_path.clone(),
                restart_grace: cfg.restart_grace,
                key_file: cfg.memberlist_key_file.clone(),
                transition: cfg.memberlist_key_transition,
            };
            Some(crate::l2::task::start(l2_cfg, l2_rx, metrics.clone(), views.clone()).await?)
        }
        None => {
            warn!("no node address: L2 announcement (ARP for VIPs) is off");
            None
        }
    };

    // The datapath kept forwarding across a restart when the maps already held
    // services: routers that negotiated graceful restart are told so.
    let restarting = !applied.services.is_empty();
    let (bgp_plan, bgp_rx) = watch::channel(Arc::new(crate::bgp::plan::Plan::default()));
    let bgp = crate::bgp::speaker::start(
        bgp_rx,
        restarting,
        node.ip,
        cfg.bgp_listen_port,
        metrics.bgp.clone(),
        views.clone(),
    );

    let mut status_plan = None;
    let mut ipam_lease = None;
    let mut side_tasks = Vec::new();
    let (mut source, preloaded) = match (first_load.join(), kube_client) {
        (_, Some(client)) => {
            info!(
                "source: the Kubernetes API; serving what the maps hold until every kind is listed"
            );
            // The IPAM leader (one agent, by a Lease) writes status and Events from
            // the plans the reconciler publishes.
            if let SourceConfig::Kubernetes {
                lease_namespace,
                lease_duration,
                ..
            } = &cfg.source
            {
                let lease = crate::leader::LeaseConfig::new(
                    lease_namespace,
                    &cfg.node_name,
                    *lease_duration,
                );
                let (leads, election) = crate::leader::start(client.clone(), lease.clone());
                let (tx, plans) = watch::channel(Arc::new(crate::status::Plan::default()));
                let writer =
                    crate::status::start(client.clone(), cfg.node_name.clone(), leads, plans);
                side_tasks.extend([election, writer]);
                status_plan = Some(tx);
                ipam_lease = Some((client.clone(), lease));
            }
            let namespace = match &cfg.source {
                SourceConfig::Kubernetes { namespace, .. } => namespace.as_str(),
                SourceConfig::Manifests(_) => "xlb-system",
            };
            let k = KubeSource::start(client, cfg.node_ports.clone(), namespace, changes_tx);
            (Source::Kubernetes(k), None)
        }
        (Ok(Some((source, loaded))), None) => (Source::Manifests(source), Some(loaded)),
        // The loading thread panicked: load again here.
        (_, None) => {
            let dir = manifests_dir.clone().unwrap_or_default();
            let m = ManifestSource::new(dir).with_node_ports(cfg.node_ports.clone());
            (Source::Manifests(m), None)
        }
    };
    let mut rec = Reconciler {
        dp,
        node_name: cfg.node_name.clone(),
        interface: cfg.interface.clone(),
        neighbours: BTreeSet::new(),
        managed_neigh: cfg.features.managed_neigh(),
        neighbours_used: std::time::Instant::now(),
        recheck: None,
        applied,
        in_sync: false,
        preloaded,
        tables: state::TableCache::new(),
        index: None,
        heap_dirty: false,
        ids,
        bounds: state::TableBounds::default(),
        previous: None,
        reported: BTreeSet::new(),
        metrics,
        collector,
        l2_plan,
        bgp_plan,
        node_ip: node.ip,
        status_plan,
        probes: BTreeSet::new(),
    };
    let (mut checker, mut verdicts) = Checker::new(rec.metrics.checks.clone());

    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    // A failed apply is retried on this tick; so is anything a missed event hid.
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let mut retry_soon = false;
    let mut first = true;
    // Someone may run `xlb cleanup`, or delete and recreate the interface: looked
    // for every second (cheap: one ifindex lookup and a stat per pin).
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let mut health = HealthServers::default();
    loop {
        if first || retry_soon {
            first = false;
            rec.refresh_peer_devices();
            match rec.sync(&mut source) {
                Ok(()) => {
                    retry_soon = false;
                    if checker.run(&rec.probes) {
                        source.set_health(checker.verdicts().clone());
                        retry_soon = true;
                    }
                    rec.report_memory(&cfg.pin_path);
                    if let Some(d) = &rec.previous {
                        health.apply(&d.health_checks).await;
                        rec.metrics.unwilling.set(d.unwilling.len() as i64);
                    }
                }
                Err(e) => {
                    error!(error = %e, "applying to the maps failed; retrying");
                    retry_soon = true;
                }
            }
        }
        let backoff = tokio::time::sleep(Duration::from_secs(1));
        let recheck = rec.recheck.take();
        let recheck_sleep = tokio::time::sleep(recheck.unwrap_or(Duration::ZERO));
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: exiting, datapath stays attached"); break; }
            _ = int.recv() => { info!("SIGINT: exiting, datapath stays attached"); break; }
            Some(e) = server_err.recv() => {
                return Err(AgentError::Metrics { addr: cfg.metrics_addr, source: e });
            }
            Some(()) = changes.recv() => {
                // Coalesce what arrives together (several files written by one tool),
                // briefly: this wait is part of every change's latency. A file is read
                // when its writer closes it, and a truncated one is not believed at
                // once (the source's grace), so no longer wait is needed for those.
                let settle = tokio::time::sleep(SETTLE);
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        _ = &mut settle => break,
                        Some(()) = changes.recv() => {}
                    }
                }
                retry_soon = true;
            }
            Some(v) = verdicts.recv() => {
                if checker.record(v) {
                    source.set_health(checker.verdicts().clone());
                    retry_soon = true;
                }
            }
            _ = resync.tick() => { retry_soon = true; }
            _ = every_second.tick() => {
                rec.refresh_peer_devices();
                rec.use_neighbours();
                report_source(&rec.metrics, &source);
                if std::mem::take(&mut rec.heap_dirty) {
                    trim_heap();
                }
                // inotify watches an inode: a directory replaced under the same name
                // (`rm -rf m; mkdir m`) is followed here, not at the next resync.
                let now = manifests_dir.as_deref().and_then(dir_identity);
                if let Some(dir) = &manifests_dir && now != watched && now.is_some() {
                    match manifests::watch(dir) {
                        Ok((w, c)) => {
                            info!(dir = %dir.display(), "manifests directory replaced; watching the new one");
                            (_watcher, changes) = (Some(w), c);
                            watched = now;
                            retry_soon = true;
                        }
                        Err(e) => warn!(error = %e, "watching the replaced manifests directory"),
                    }
                }
                if let Err(why) = rec.dp.check(&cfg.interface, &cfg.pin_path) {
                    rec.metrics.datapath.set(0);
                    warn!(%why, "datapath missing: re-attaching");
                    match rec.reattach(&cfg) {
                        Ok(()) => {
                            info!("datapath re-attached; reprogramming the maps");
                            rec.metrics.reattached.inc();
                            rec.metrics.datapath.set(1);
                            retry_soon = true;
                        }
                        Err(e) => error!(error = %e, "re-attaching the datapath failed; trying again in a second"),
                    }
                }
            }
            _ = backoff, if retry_soon => {}
            _ = recheck_sleep, if recheck.is_some() => { retry_soon = true; }
        }
    }
    // Another agent becomes the IPAM leader at once rather than after a duration.
    for t in &side_tasks {
        t.abort();
    }
    if let Some((client, lease)) = ipam_lease {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            crate::leader::release(client, &lease),
        )
        .await;
    }
    // Routers that negotiated graceful restart keep this node's routes; others are
    // sent a Cease and withdraw them at once.
    bgp.stop(crate::bgp::session::Stop::Restart).await;
    // The node keeps its L2 VIPs for the restart grace, and the peers are told.
    if let Some(l2) = l2_task {
        l2.stop().await;
    }
    Ok(())
}
