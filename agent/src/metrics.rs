//! `/metrics` (Prometheus text format) and `/healthz`, served from one HTTP server.
//!
//! Agent-side metrics are ordinary prometheus-client metrics; datapath counters are
//! read from the per-CPU BPF maps at scrape time by [`BpfCollector`], labelled with
//! what the reconciler last programmed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use xlb_common::Reason;

use crate::dataplane::{
    Stats,
    conntrack::CtCounts,
    state::{ServiceLabels, Target},
};
use crate::introspect::Views;

/// Labels as prometheus-client takes them.
type Labels = Vec<(&'static str, String)>;

/// Metrics of L2 announcement (`crate::l2`).
#[derive(Debug, Default)]
pub struct L2Metrics {
    /// VIPs this node answers ARP for (`xlb_l2_owned_vips`).
    pub owned: Gauge,
    /// ARP replies the datapath sent, per owned VIP (`xlb_l2_arp_replies_total{vip}`).
    pub arp_replies: Family<Labels, Counter>,
    /// Gratuitous ARPs sent on takeover (`xlb_l2_garps_sent_total`).
    pub garps: Counter,
    /// Membership as this node sees it, by state: alive (this node included),
    /// suspect, down (`xlb_l2_members{state}`).
    pub members: Family<Labels, Gauge>,
    /// VIPs acquired and released (`xlb_l2_ownership_changes_total{change}`).
    pub changes: Family<Labels, Counter>,
    /// Keys that authenticate membership datagrams, 0 while membership is not
    /// authenticated (`xlb_l2_membership_keys`).
    pub keys: Gauge,
    /// Membership datagrams refused, by reason (`xlb_l2_membership_refused_total{reason}`:
    /// unauthenticated, sealed_without_key, unknown_key, bad_tag, stale, replayed).
    pub refused: Family<Labels, Counter>,
}

impl L2Metrics {
    fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "xlb_l2_owned_vips",
            "VIPs this node answers ARP for",
            self.owned.clone(),
        );
        registry.register(
            "xlb_l2_arp_replies",
            "ARP replies sent by the datapath, per owned VIP",
            self.arp_replies.clone(),
        );
        registry.register(
            "xlb_l2_garps_sent",
            "Gratuitous ARPs sent on taking VIPs over",
            self.garps.clone(),
        );
        registry.register(
            "xlb_l2_members",
            "Members of the L2 membership by state, as this node sees them",
            self.members.clone(),
        );
        registry.register(
            "xlb_l2_ownership_changes",
            "VIPs this node acquired or released",
            self.changes.clone(),
        );
        registry.register(
            "xlb_l2_membership_keys",
            "Keys that authenticate membership datagrams; 0: membership is not authenticated",
            self.keys.clone(),
        );
        registry.register(
            "xlb_l2_membership_refused",
            "Membership datagrams refused, by reason",
            self.refused.clone(),
        );
    }
}

/// Metrics of the BGP speaker (`crate::bgp`).
#[derive(Debug, Default)]
pub struct BgpMetrics {
    /// 1 while the session to a peer is Established (`xlb_bgp_session_up{peer}`).
    pub up: Family<Labels, Gauge>,
    /// Prefixes the peer has been sent and not withdrawn
    /// (`xlb_bgp_advertised_prefixes{peer}`).
    pub advertised: Family<Labels, Gauge>,
    /// 1 while the BFD session with a peer is Up, 0 otherwise; only peers with a BFD
    /// profile (`xlb_bfd_session_up{peer}`).
    pub bfd_up: Family<Labels, Gauge>,
    /// Connections this session closed with Cease / Connection Collision Resolution
    /// (RFC 4486 §3), since it started (`xlb_bgp_collisions{peer}`).
    pub collisions: Family<Labels, Gauge>,
    /// Connections accepted on the BGP port from addresses that are no peer's, closed
    /// at once (`xlb_bgp_refused_connections_total`).
    pub refused: Counter,
}

impl BgpMetrics {
    fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "xlb_bgp_session_up",
            "1 while the BGP session to the peer is Established",
            self.up.clone(),
        );
        registry.register(
            "xlb_bgp_advertised_prefixes",
            "Prefixes advertised to the BGP peer and not withdrawn",
            self.advertised.clone(),
        );
        registry.register(
            "xlb_bfd_session_up",
            "1 while the BFD session with the BGP peer is Up (peers with a BFD profile)",
            self.bfd_up.clone(),
        );
        registry.register(
            "xlb_bgp_collisions",
            "Connections the session to the peer closed with Cease/7 (connection collision resolution), since it started",
            self.collisions.clone(),
        );
        registry.register(
            "xlb_bgp_refused_connections",
            "Connections accepted on the BGP port from addresses that are no peer's, closed at once",
            self.refused.clone(),
        );
    }
}

/// Metrics the agent updates as it works.
#[derive(Debug)]
pub struct Metrics {
    /// Config errors by kind (`xlb_config_errors_total`), counted once per distinct error.
    pub config_errors: Family<Labels, Counter>,
    /// BPF map writes made by the reconciler (`xlb_map_updates_total`).
    pub map_updates: Counter,
    /// Reconciliations by result (`xlb_syncs_total{result}`).
    pub syncs: Family<Labels, Counter>,
    /// Time from a source change to the maps being updated (`xlb_sync_duration_seconds`).
    pub sync_duration: Histogram,
    /// Services currently programmed (`xlb_services`).
    pub services: Gauge,
    /// VIPs this node must not attract traffic for (Local, no local endpoint):
    /// `xlb_unwilling_vips`, the fact L2/BGP announcement will act on.
    pub unwilling: Gauge,
    /// The XDP attach mode chosen for the uplink (`xlb_xdp_mode{interface,mode,driver}` = 1).
    pub xdp_mode: Family<Labels, Gauge>,
    /// Each probed kernel feature: `xlb_kernel_feature{feature,available,fallback}`,
    /// 1 while the datapath uses the feature, 0 while it takes the fallback.
    pub kernel_features: Family<Labels, Gauge>,
    /// Other nodes' tunnel addresses kept as managed neighbour entries on the uplink
    /// (`xlb_managed_neighbours`).
    pub neighbours: Gauge,
    /// Manifest files parsed (`xlb_manifest_files_parsed_total`): unchanged files are
    /// not parsed again.
    pub files_parsed: Counter,
    /// 1 while the programs are attached and the pins in place, 0 while the agent is
    /// re-attaching a datapath that disappeared (`xlb_datapath_attached`).
    pub datapath: Gauge,
    /// Times the datapath had to be rebuilt (`xlb_datapath_reattach_total`).
    pub reattached: Counter,
    /// Kernel memory of each map, and of the inner Maglev tables as
    /// `map="xlb_maglev_tables"` (`xlb_map_memory_bytes`).
    pub map_memory: Family<Labels, Gauge>,
    /// L2 announcement (`xlb_l2_*`).
    pub l2: Arc<L2Metrics>,
    /// The BGP speaker (`xlb_bgp_*`).
    pub bgp: Arc<BgpMetrics>,
    /// StaticService health checks (`xlb_health_check_*`).
    pub checks: Arc<crate::checks::CheckMetrics>,
    /// Set once the first sync has been applied; `/healthz` answers 200 from then on.
    pub ready: AtomicBool,
    /// 1 while the source is complete and current, 0 while the API server is not
    /// listed yet or unreachable (`xlb_source_up{source}`).
    pub source_up: Family<Labels, Gauge>,
    /// A line for `/healthz` about the source (e.g. why the API server is
    /// unreachable); empty when all is well.
    pub source_detail: Mutex<String>,
    /// One scrape renders at a time (see `render`).
    scrape: tokio::sync::Semaphore,
    registry: Mutex<Registry>,
}

impl Metrics {
    /// Registers every metric, plus the BPF counter collector.
    pub fn new(bpf: Arc<BpfCollector>) -> Arc<Self> {
        let mut registry = Registry::default();
        let config_errors = Family::<Labels, Counter>::default();
        let map_updates = Counter::default();
        let syncs = Family::<Labels, Counter>::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let services = Gauge::default();
        let unwilling = Gauge::default();
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        registry.register("xlb_build_info", "Build of the running agent", build_info);
        registry.register(
            "xlb_config_errors",
            "Configuration errors found in sources, by kind (each distinct error once)",
            config_errors.clone(),
        );
        registry.register(
            "xlb_map_updates",
            "BPF map writes made by the reconciler since the agent started",
            map_updates.clone(),
        );
        registry.register("xlb_syncs", "Reconciliations by result", syncs.clone());
        registry.register(
            "xlb_sync_duration_seconds",
            "Time to compute and apply one reconciliation",
            sync_duration.clone(),
        );
        registry.register(
            "xlb_services",
            "VIP:port entries programmed",
            services.clone(),
        );
        registry.register(
            "xlb_unwilling_vips",
            "VIPs whose services are all Local without a local endpoint on this node",
            unwilling.clone(),
        );
        let source_up = Family::<Labels, Gauge>::default();
        registry.register(
            "xlb_source_up",
            "1 while the source (manifests or the Kubernetes API) is complete and current; 0 while the API server is unlisted or unreachable (the last good state is served)",
            source_up.clone(),
        );
        let xdp_mode = Family::<Labels, Gauge>::default();
        registry.register(
            "xlb_xdp_mode",
            "XDP attach mode of the uplink (native or generic) and its driver; always 1",
            xdp_mode.clone(),
        );
        let kernel_features = Family::<Labels, Gauge>::default();
        registry.register(
            "xlb_kernel_feature",
            "Kernel features the datapath probed at start: 1 when used, 0 when the fallback named in the label is taken (missing or forced off)",
            kernel_features.clone(),
        );
        let neighbours = Gauge::default();
        registry.register(
            "xlb_managed_neighbours",
            "Other nodes' tunnel addresses kept resolved as managed neighbour entries",
            neighbours.clone(),
        );
        let files_parsed = Counter::default();
        registry.register(
            "xlb_manifest_files_parsed",
            "Manifest files read and parsed (unchanged files are not parsed again)",
            files_parsed.clone(),
        );
        let datapath = Gauge::default();
        datapath.set(1);
        registry.register(
            "xlb_datapath_attached",
            "1 while xlb's programs are attached and pinned, 0 while re-attaching",
            datapath.clone(),
        );
        let reattached = Counter::default();
        registry.register(
            "xlb_datapath_reattach",
            "Times the agent found its datapath gone (detached, pins removed, interface recreated) and rebuilt it",
            reattached.clone(),
        );
        let map_memory = Family::<Labels, Gauge>::default();
        registry.register(
            "xlb_map_memory_bytes",
            "Kernel memory of each BPF map (memlock), and of the inner Maglev tables (map=xlb_maglev_tables), after the last sync",
            map_memory.clone(),
        );
        let l2 = Arc::new(L2Metrics::default());
        l2.register(&mut registry);
        let bgp = Arc::new(BgpMetrics::default());
        bgp.register(&mut registry);
        let checks = Arc::new(crate::checks::CheckMetrics::default());
        checks.register(&mut registry);
        registry.register_collector(Box::new(bpf));
        Arc::new(Metrics {
            config_errors,
            map_updates,
            syncs,
            sync_duration,
            services,
            unwilling,
            xdp_mode,
            kernel_features,
            neighbours,
            files_parsed,
            datapath,
            reattached,
            map_memory,
            l2,
            bgp,
            checks,
            ready: AtomicBool::new(false),
            source_up,
            source_detail: Mutex::new(String::new()),
            scrape: tokio::sync::Semaphore::new(1),
            registry: Mutex::new(registry),
        })
    }

    /// The text exposition of everything.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().map_err(|_| std::fmt::Error)?;
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// What the BPF counters mean: labels per service and backend id, from the last
/// applied [`Target`].
#[derive(Debug, Default, Clone)]
pub struct CounterLabels {
    services: BTreeMap<u32, ServiceLabels>,
    backends: BTreeMap<u32, SocketAddr>,
}

/// Reads the datapath's per-CPU counters on each scrape; conntrack figures come from
/// the sweeper ([`CtCounts`]), never from walking the map on the scrape path.
pub struct BpfCollector {
    stats: Mutex<Stats>,
    labels: RwLock<CounterLabels>,
    conntrack: Arc<CtCounts>,
}

impl std::fmt::Debug for BpfCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BpfCollector")
    }
}

impl BpfCollector {
    /// A collector over opened stats maps and the sweeper's conntrack counts.
    pub fn new(stats: Stats, conntrack: Arc<CtCounts>) -> Arc<Self> {
        Arc::new(BpfCollector {
            stats: Mutex::new(stats),
            labels: RwLock::new(CounterLabels::default()),
            conntrack,
        })
    }

    /// Reads from the maps now pinned under `pin_path` (after the datapath was rebuilt).
    pub fn reopen(
        &self,
        pin_path: &std::path::Path,
    ) -> Result<(), crate::dataplane::DataplaneError> {
        let stats = Stats::open(pin_path)?;
        if let Ok(mut s) = self.stats.lock() {
            *s = stats;
        }
        Ok(())
    }

    /// Takes the labels of a newly applied target.
    pub fn set_target(&self, t: &Target) {
        if let Ok(mut l) = self.labels.write() {
            l.services = t.services.clone();
            l.backends = t.backends.clone();
        }
    }

    /// Takes the labels of ids a [`Patch`](crate::dataplane::state::Patch) added
    /// (`Some`) or removed (`None`).
    pub fn patch_labels(
        &self,
        services: &BTreeMap<u32, Option<ServiceLabels>>,
        backends: &BTreeMap<u32, Option<SocketAddr>>,
    ) {
        fn patch<V: Clone>(map: &mut BTreeMap<u32, V>, changes: &BTreeMap<u32, Option<V>>) {
            for (id, v) in changes {
                match v {
                    Some(v) => map.insert(*id, v.clone()),
                    None => map.remove(id),
                };
            }
        }
        if let Ok(mut l) = self.labels.write() {
            patch(&mut l.services, services);
            patch(&mut l.backends, backends);
        }
    }

    /// The labels of a service id, if it is programmed.
    pub fn service_labels(&self, id: u32) -> Option<ServiceLabels> {
        self.labels.read().ok()?.services.get(&id).cloned()
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for BpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = self.labels.read().map(|l| l.clone()).unwrap_or_default();
        let read = self.stats.lock().map(|s| {
            s.read(
                labels.services.keys().copied(),
                labels.backends.keys().copied(),
            )
        });
        let snap = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading BPF counters");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let (mut sp, mut sb) = (Vec::new(), Vec::new());
        for (id, c) in &snap.services {
            let Some(l) = labels.services.get(id) else {
                continue;
            };
            let set: Labels = vec![
                ("namespace", l.owner.namespace.clone()),
                ("service", l.owner.name.clone()),
                ("vip", l.vip.to_string()),
                ("port", l.port.to_string()),
                ("protocol", l.protocol.as_str().to_string()),
            ];
            sp.push((set.clone(), c.packets));
            sb.push((set, c.bytes));
        }
        counter(
            &mut encoder,
            "xlb_service_packets",
            "Packets to a VIP:port seen by XDP",
            &sp,
        )?;
        counter(
            &mut encoder,
            "xlb_service_bytes",
            "Bytes to a VIP:port seen by XDP",
            &sb,
        )?;
        let (mut bp, mut bb) = (Vec::new(), Vec::new());
        for (id, c) in &snap.backends {
            let Some(addr) = labels.backends.get(id) else {
                continue;
            };
            let set: Labels = vec![("backend", addr.to_string())];
            bp.push((set.clone(), c.packets));
            bb.push((set, c.bytes));
        }
        counter(
            &mut encoder,
            "xlb_backend_packets",
            "Packets DNATed to a backend",
            &bp,
        )?;
        counter(
            &mut encoder,
            "xlb_backend_bytes",
            "Bytes DNATed to a backend",
            &bb,
        )?;
        let rows: Vec<(Labels, u64)> = Reason::ALL
            .iter()
            .filter(|r| **r != Reason::CtCreated)
            .map(|r| {
                let v = snap.reasons.get(*r as usize).copied().unwrap_or(0);
                (vec![("reason", r.label().to_string())], v)
            })
            .collect();
        counter(
            &mut encoder,
            "xlb_datapath_packets",
            "Packets the programs forwarded, passed or dropped, by reason",
            &rows,
        )?;
        let present = self.conntrack.present.load(Ordering::Relaxed);
        let expired = self.conntrack.expired.load(Ordering::Relaxed);
        let m = encoder.encode_descriptor(
            "xlb_conntrack_entries",
            "Flows in the connection-tracking map at the last sweep (LRU: the oldest are evicted when full)",
            None,
            MetricType::Gauge,
        )?;
        prometheus_client::metrics::gauge::ConstGauge::new(present as i64).encode(m)?;
        let m = encoder.encode_descriptor(
            "xlb_conntrack_sweep_seconds",
            "How long the last conntrack sweep (a read of the whole map) took",
            None,
            MetricType::Gauge,
        )?;
        let took = self.conntrack.last_sweep_ns.load(Ordering::Relaxed) as f64 / 1e9;
        prometheus_client::metrics::gauge::ConstGauge::new(took).encode(m)?;
        let created = snap
            .reasons
            .get(Reason::CtCreated as usize)
            .copied()
            .unwrap_or(0);
        counter(
            &mut encoder,
            "xlb_conntrack_created",
            "Connection-tracking entries created",
            &[(vec![], created)],
        )?;
        counter(
            &mut encoder,
            "xlb_conntrack_expired",
            "Expired connection-tracking entries removed by the agent's sweeper",
            &[(vec![], expired)],
        )?;
        // Entries leave the map by the sweep or by LRU eviction, so created - present
        // - expired is what the LRU evicted (as of the last sweep).
        counter(
            &mut encoder,
            "xlb_conntrack_evictions",
            "Connection-tracking entries evicted to make room (created minus present minus expired)",
            &[(
                vec![],
                created.saturating_sub(present).saturating_sub(expired),
            )],
        )
    }
}

/// Serves `/metrics` and `/healthz`, and the agent's own views for `xlb inspect`
/// (`/debug/owners`, `/debug/peers`), on `listener` (bound before the datapath is
/// touched, so a taken port fails the start cleanly) until it fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    views: Arc<Views>,
) -> std::io::Result<()> {
    let debug = Router::new()
        .route("/debug/owners", get(owners))
        .route("/debug/peers", get(peers))
        .with_state(views);
    // What the listener shows other hosts: the metrics (Prometheus scrapes them over
    // the network) and health, not the agent's views of its peers and elections.
    let public = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .with_state(metrics)
        .route("/debug/{*view}", get(debug_refused));
    // From the node itself (`xlb inspect owners|peers`, over loopback): everything.
    let local = public.clone().merge(debug);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, and /debug/{{owners,peers}} to loopback clients");
    }
    let bounds = Arc::new(Bounds::default());
    let mut accept_failed = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => {
                accept_failed = false;
                c
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the pending connection stays queued; try again
                // shortly rather than spin (or give up the listener).
                if !std::mem::replace(&mut accept_failed, true) {
                    tracing::warn!(error = %e, "accepting a /metrics connection failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = bounds.admit(peer.ip()) else {
            // Closed at once: a full table must not also fill the accept queue.
            drop(stream);
            continue;
        };
        let app = if peer.ip().is_loopback() {
            local.clone()
        } else {
            public.clone()
        };
        let service = hyper_util::service::TowerToHyperService::new(app);
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // However a client paces its bytes, the connection ends: a scraper opens
            // another one for its next scrape.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

/// Concurrent connections the listener serves; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 512;
/// Concurrent connections from one address (a scraper needs one or two, kubelet's
/// probes one; the lab's stress test runs 50 scrapers from one): one hostile host
/// cannot take the slots Prometheus and the kubelet need.
pub const MAX_CONNECTIONS_PER_ADDR: usize = 64;
/// Time a client has to send a request's headers, including the first request's
/// (hyper's `header_read_timeout`; a slow sender is cut off, RFC 9112 §9.8 leaves
/// that to the server).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, idle keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Who holds the listener's connection slots.
#[derive(Default)]
struct Bounds {
    by_addr: Mutex<BTreeMap<std::net::IpAddr, usize>>,
}

/// One admitted connection; its slot is given back when dropped.
struct Slot {
    bounds: Arc<Bounds>,
    addr: std::net::IpAddr,
}

impl Bounds {
    /// A slot for a connection from `addr`, unless that address or the listener is
    /// at its bound.
    fn admit(self: &Arc<Self>, addr: std::net::IpAddr) -> Option<Slot> {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = by_addr.values().sum();
        let mine = by_addr.entry(addr).or_insert(0);
        if total >= MAX_CONNECTIONS || *mine >= MAX_CONNECTIONS_PER_ADDR {
            if *mine == 0 {
                by_addr.remove(&addr);
            }
            return None;
        }
        *mine += 1;
        Some(Slot {
            bounds: self.clone(),
            addr,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_addr = self
            .bounds
            .by_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                by_addr.remove(&self.addr);
            }
        }
    }
}

/// `/debug/*` asked from another host: refused, naming who may read it.
async fn debug_refused() -> (axum::http::StatusCode, &'static str) {
    (
        axum::http::StatusCode::FORBIDDEN,
        "/debug/* answers clients on the node itself (loopback) only: run `xlb inspect owners|peers` there\n",
    )
}

/// `/debug/owners`: who holds each VIP, and why (`xlb inspect owners`).
async fn owners(State(v): State<Arc<Views>>) -> axum::Json<crate::introspect::Owners> {
    axum::Json(v.owners())
}

/// `/debug/peers`: BGP and BFD sessions (`xlb inspect peers`).
async fn peers(State(v): State<Arc<Views>>) -> axum::Json<crate::introspect::Peers> {
    axum::Json(v.peers())
}

/// Content type of the OpenMetrics exposition (what prometheus-client writes).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body in the format the scraper asked for: OpenMetrics when its `Accept` names
/// it (Prometheus does), else the classic text format (curl, promtool, older
/// scrapers), each under its own content type.
async fn render(
    State(m): State<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    // Reading the BPF counters is blocking syscalls, one per service and backend: it
    // runs on the blocking pool, one scrape at a time, so however many scrapers come
    // the runtime's workers stay free for /healthz and the health-check ports.
    let rendered = match m.scrape.acquire().await {
        Ok(_permit) => {
            let m = m.clone();
            tokio::task::spawn_blocking(move || m.render())
                .await
                .unwrap_or(Err(std::fmt::Error))
        }
        Err(_) => Err(std::fmt::Error),
    };
    match rendered {
        Ok(body) if openmetrics => (StatusCode::OK, [("content-type", OPENMETRICS)], body),
        Ok(body) => (
            StatusCode::OK,
            [("content-type", PROMETHEUS_TEXT)],
            to_prometheus_text(&body),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::from("encoding failed\n"),
        ),
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text 0.0.4: a counter family
/// `x` becomes `x_total` in its HELP and TYPE lines (its samples already carry the
/// suffix), `unknown` becomes `untyped`, and UNIT and EOF lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if tail == "unknown" { "untyped" } else { tail });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// 200 while the datapath serves what the source last said; an unreachable API
/// server is a detail, not a failure (the dataplane never depends on it), so a
/// DaemonSet's probes do not restart agents that serve fine.
async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let detail = m
        .source_detail
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    if m.datapath.get() == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "datapath missing (programs detached or pins removed); re-attaching\n".to_string(),
        )
    } else if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, format!("ok\n{detail}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not yet synced\n{detail}"),
        )
    }
}
