//! The kernel side as the agent sees it: loading the embedded programs, attaching them
//! to the uplink (or taking over the ones a previous agent left), reading back what the
//! maps hold, and applying ordered writes ([`state::diff`]).
//!
//! The datapath outlives the agent, like Cilium's and Katran's: maps and bpf_links are
//! pinned under `--pin-path`, nothing is detached on exit, and a starting agent reuses
//! the pinned maps (aya's `map_pin_path`) and swaps its programs into the pinned links
//! with `BPF_LINK_UPDATE`, which the kernel does atomically: every packet runs either
//! the old or the new program, never neither.
pub mod batch;
pub mod conntrack;
pub mod events;
pub mod layout;
pub mod maglev;
pub mod pin;
pub mod state;
pub mod testrun;

use std::{
    io,
    mem::size_of_val,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, HashOfMaps, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use tracing::{debug, info};
use xlb_common::config::{
    XDP_MODE_GENERIC as MODE_GENERIC, XDP_MODE_NATIVE as MODE_NATIVE, XDP_MODE_TC as MODE_TC,
};
use xlb_common::{
    Backend, Counter, Service, ServiceKey4, ServiceKey6, SlotPair, SourceRange, backend_slot,
    config, names, service_slot,
};

use self::state::{Ids, MapState, Write};
pub use crate::netdev::{XdpChoice, XdpDecision};

/// The eBPF object built by `agent/build.rs`, aligned for the ELF parser.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJ"));

/// The embedded eBPF object (empty when built with `XLB_SKIP_EBPF=1`).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Dataplane failures; each names the map, program or path involved.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Built with `XLB_SKIP_EBPF=1`.
    #[error(
        "this xlb binary was built without its eBPF programs (XLB_SKIP_EBPF=1); rebuild with `cargo xtask build`"
    )]
    NoObject,
    /// bpffs could not be mounted or the pin directory made.
    #[error("pin path {path}: {source}")]
    PinPath {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Loading the object or creating/reusing pinned maps failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load, attach or take over its link.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        source: ProgramError,
    },
    /// A pinned link could not be opened, pinned or removed.
    #[error("link {path}: {message}")]
    Link {
        /// Pin path of the link.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The object lacks a map or program the agent expects (a build mismatch).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// The number of possible CPUs (per-CPU values) could not be used.
    #[error("per-CPU values: {0}")]
    Cpus(io::Error),
    /// A map's fd could not be duplicated (fd limit).
    #[error("map {map}: duplicating its fd: {source}")]
    Dup {
        /// Map name.
        map: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// A batch of map writes failed part-way.
    #[error("map {map}: {source}")]
    Batch {
        /// Map name.
        map: &'static str,
        /// How far it got, and why it stopped.
        source: batch::BatchError,
    },
    /// A map read or write failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        source: MapError,
    },
}

/// Takes map `name` out of the loaded object as its typed handle.
pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// A second fd of map `name` of the loaded object, for the raw batch calls.
fn dup_map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, DataplaneError> {
    use aya::maps::Map;
    let data = match ebpf.map(name).ok_or(DataplaneError::Missing(name))? {
        Map::HashMap(d) | Map::PerCpuHashMap(d) | Map::PerCpuArray(d) | Map::HashOfMaps(d) => d,
        _ => return Err(DataplaneError::Missing(name)),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::Dup { map: name, source })
}

/// The maps [`Dataplane::apply`] writes in batches, by fd.
struct RawMaps {
    services4: OwnedFd,
    services6: OwnedFd,
    maglev: OwnedFd,
    backends: OwnedFd,
    service_stats: OwnedFd,
    backend_stats: OwnedFd,
    owners: OwnedFd,
}

impl RawMaps {
    fn dup(ebpf: &Ebpf) -> Result<Self, DataplaneError> {
        Ok(RawMaps {
            services4: dup_map_fd(ebpf, names::SERVICES4)?,
            services6: dup_map_fd(ebpf, names::SERVICES6)?,
            maglev: dup_map_fd(ebpf, names::MAGLEV)?,
            backends: dup_map_fd(ebpf, names::BACKENDS)?,
            service_stats: dup_map_fd(ebpf, names::SERVICE_STATS)?,
            backend_stats: dup_map_fd(ebpf, names::BACKEND_STATS)?,
            owners: dup_map_fd(ebpf, names::OWNERS)?,
        })
    }
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// How XDP hands a DNATed packet on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// XDP_PASS into the kernel's routing: works with any CNI (the default).
    Pass = config::FORWARD_PASS as isize,
    /// `bpf_fib_lookup` + `bpf_redirect` to the pod's device, XDP_PASS when the FIB
    /// cannot resolve the next hop. Needs devices that accept XDP frames (veth: XDP
    /// or GRO on the pod side); otherwise the kernel drops redirected frames.
    Redirect = config::FORWARD_REDIRECT as isize,
}

/// How remote backends of Cluster services are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    /// IPIP to the backend's node, which replies to the client directly (the
    /// default; the pod sees the client's address).
    Dsr = config::CLUSTER_DSR as isize,
    /// Source NAT to this node's address; replies come back through it (the pod sees
    /// this node's address). For networks that drop packets sourced from a VIP.
    Snat = config::CLUSTER_SNAT as isize,
}

/// Node-level facts the programs need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// XDP forwarding after DNAT.
    pub forward: ForwardMode,
    /// Cluster-policy mode.
    pub cluster: ClusterMode,
    /// This node's tunnel/SNAT address.
    pub ip: Option<std::net::Ipv4Addr>,
    /// The uplink's MAC.
    pub mac: Option<[u8; 6]>,
    /// Datapath event level (`xlb_common::datapath_log`; 0 = off).
    pub datapath_log: u64,
}

/// The attached, pinned datapath of one interface.
pub struct Dataplane {
    // Keeps the programs loaded while the agent runs; links are pinned, so dropping
    // this never detaches anything.
    _ebpf: Ebpf,
    services4: HashMap<MapData, ServiceKey4, Service>,
    services6: HashMap<MapData, ServiceKey6, Service>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, SlotPair>>,
    backends: HashMap<MapData, u32, Backend>,
    config: Array<MapData, u64>,
    ranges: LpmTrie<MapData, SourceRange, u8>,
    owners: HashMap<MapData, u32, xlb_common::Owner>,
    peer_devs: HashMap<MapData, u32, u32>,
    // Held so the program array's fd stays valid while programs referring to it load.
    _tail_progs: aya::maps::ProgramArray<MapData>,
    _tc_tail_progs: Option<aya::maps::ProgramArray<MapData>>,
    _event_progs: aya::maps::ProgramArray<MapData>,
    /// Drains the programs' event log while this datapath is the agent's.
    _events: Option<events::Reader>,
    datapath_log: Array<MapData, u64>,
    raw: RawMaps,
    /// Maglev tables are created mmapable (false once the pinned `xlb_maglev`
    /// turned out to predate that).
    mmap_tables: bool,
    /// Whether a grace period has passed, in this process, since anything could
    /// have flipped a service away from a table that a [`Write::FillTable`] rewrites
    /// (a previous agent may have died right after a flip).
    quiesced: bool,
    ncpus: usize,
    /// The interface index the programs were attached to.
    ifindex: u32,
    /// TC programs are tcx links (pinned); else netlink filters ([`TC_NL_PRIORITY`]).
    tcx: bool,
    /// `--xdp-mode tc`: no XDP program (and no XDP link pin to check).
    tc_only: bool,
}

/// Priority of xlb's netlink TC filters (kernels without tcx): first, as a tcx link
/// appended to an empty chain would be, and fixed, with [`TC_NL_HANDLE`], so that a
/// new agent replaces its predecessor's filter in place (cls_bpf swaps the program
/// atomically) and `xlb cleanup` finds it.
pub const TC_NL_PRIORITY: u16 = 1;
/// Handle of xlb's netlink TC filters ("xl").
pub const TC_NL_HANDLE: TcHandle = TcHandle::new(0, 0x786c);

/// Link pin names, one per interface so that one pin directory can serve several.
pub fn xdp_link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(format!("link_xdp_{iface}"))
}

/// See [`xdp_link_pin`].
pub fn tc_link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(format!("link_tc_egress_{iface}"))
}

/// See [`xdp_link_pin`].
pub fn tc_ingress_link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(format!("link_tc_ingress_{iface}"))
}

impl Dataplane {
    /// Loads the programs, reusing pinned maps, and attaches them to `iface`, taking
    /// over a previous agent's links if they are pinned.
    /// `conntrack_size` sizes `xlb_conntrack4` and `xlb_revnat4` when they are created; a
    /// pinned map keeps its size (`xlb cleanup` first to change it).
    /// `features` decides the paths the programs take (`crate::features`).
    pub fn open(
        iface: &str,
        pin_path: &Path,
        xdp_mode: XdpChoice,
        conntrack_size: u32,
        features: &crate::features::Features,
    ) -> Result<(Self, XdpDecision), DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        pin::prepare(pin_path).map_err(|source| DataplaneError::PinPath {
            path: pin_path.to_path_buf(),
            source,
        })?;
        let replaced =
            layout::unpin_incompatible(pin_path).map_err(|source| DataplaneError::PinPath {
                path: pin_path.to_path_buf(),
                source,
            })?;
        for name in replaced {
            tracing::warn!(
                map = name,
                "pinned map has an older layout: replaced (its contents are lost)"
            );
        }
        let mut loader = EbpfLoader::new();
        let map_pins: Vec<(&'static str, PathBuf)> = names::ALL_MAPS
            .iter()
            .map(|n| (*n, pin_path.join(n)))
            .collect();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        // Reply maps are as large as conntrack: every tracked flow may need one.
        for name in [names::CONNTRACK4, names::REVNAT4] {
            loader.map_max_entries(name, conntrack_size);
        }
        let xdp_meta = u8::from(features.xdp_meta());
        loader.override_global(xlb_common::globals::XDP_META, &xdp_meta, true);
        let mut ebpf = loader.load(OBJECT)?;

        // Tail-call targets first: a freshly attached (or swapped-in) xlb_xdp must find
        // them in place.
        let decision = decide_mode(iface, xdp_mode);
        let tc_only = decision.tc;
        let event_progs = events::load_program(&mut ebpf)?;
        let tail_progs = load_tail_programs(&mut ebpf)?;
        let tc_tail_progs = if tc_only {
            Some(load_tc_tail_programs(&mut ebpf)?)
        } else {
            None
        };
        let mut config: Array<MapData, u64> = take_map(&mut ebpf, names::CONFIG)?;
        let tcx = features.tcx();
        let ingress = if tc_only {
            names::TC_LB_PROG
        } else {
            names::TC_INGRESS_PROG
        };
        let had_tc = config.get(&config::XDP_MODE, 0).ok() == Some(MODE_TC);
        let attach_ingress =
            |ebpf: &mut Ebpf| attach_tc(ebpf, iface, pin_path, ingress, TcAttachType::Ingress, tcx);
        let decision = if tc_only {
            attach_ingress(&mut ebpf)?;
            detach_xdp(iface, pin_path, &mut config, decision)?
        } else if had_tc {
            // From the TC datapath to XDP, XDP goes first: until then `xlb_tc_lb`
            // balances, and it passes what XDP balanced (addressed to a pod by then).
            let d = attach_xdp(&mut ebpf, iface, pin_path, xdp_mode, decision, &mut config)?;
            attach_ingress(&mut ebpf)?;
            d
        } else {
            // TC ingress first: XDP may hand it packets as soon as it is attached.
            attach_ingress(&mut ebpf)?;
            attach_xdp(&mut ebpf, iface, pin_path, xdp_mode, decision, &mut config)?
        };
        let egress = names::TC_EGRESS_PROG;
        attach_tc(
            &mut ebpf,
            iface,
            pin_path,
            egress,
            TcAttachType::Egress,
            tcx,
        )?;
        // Only now is nothing attached still using an older agent's maps.
        match layout::unpin_retired(pin_path) {
            Ok(gone) if !gone.is_empty() => info!(maps = ?gone, "removed maps of an older layout"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove maps of an older layout"),
        }

        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        raise_nofile();
        let raw = RawMaps::dup(&ebpf)?;
        let services4 = take_map(&mut ebpf, names::SERVICES4)?;
        let services6 = take_map(&mut ebpf, names::SERVICES6)?;
        let maglev = take_map(&mut ebpf, names::MAGLEV)?;
        let backends = take_map(&mut ebpf, names::BACKENDS)?;
        let ranges = take_map(&mut ebpf, names::SOURCE_RANGES)?;
        let owners = take_map(&mut ebpf, names::OWNERS)?;
        let peer_devs = take_map(&mut ebpf, names::PEER_DEVS)?;
        let datapath_log = take_map(&mut ebpf, names::DATAPATH_LOG)?;
        let events = events::start_reader(&mut ebpf);
        let dp = Dataplane {
            _ebpf: ebpf,
            services4,
            services6,
            maglev,
            backends,
            config,
            ranges,
            owners,
            peer_devs,
            _tail_progs: tail_progs,
            _tc_tail_progs: tc_tail_progs,
            _event_progs: event_progs,
            _events: events,
            datapath_log,
            raw,
            mmap_tables: true,
            quiesced: false,
            ncpus,
            ifindex: crate::netdev::ifindex(iface).unwrap_or(0),
            tcx,
            tc_only,
        };
        Ok((dp, decision))
    }

    /// Whether the datapath is still in place: the interface is the one the programs
    /// were attached to (not deleted, not recreated under the same name) and every
    /// link and map pin exists. `Err` says what is missing.
    pub fn check(&self, iface: &str, pin_path: &Path) -> Result<(), String> {
        match crate::netdev::lookup_ifindex(iface) {
            // A failed question is not an answer (EMFILE, ENOMEM): the datapath is
            // left alone, and asked about again at the next check.
            Err(e) => {
                tracing::warn!(%iface, error = %e, "cannot look the interface up; checking the datapath later");
                return Ok(());
            }
            Ok(None) => return Err(format!("interface {iface} is gone")),
            Ok(Some(i)) if i != self.ifindex => {
                return Err(format!(
                    "interface {iface} was recreated (index {} -> {i})",
                    self.ifindex
                ));
            }
            Ok(Some(_)) => {}
        }
        let mut links = Vec::new();
        if !self.tc_only {
            links.push(xdp_link_pin(pin_path, iface));
        }
        if self.tcx {
            links.push(tc_link_pin(pin_path, iface));
            links.push(tc_ingress_link_pin(pin_path, iface));
        } else {
            // Netlink filters have no pin: ask the kernel. A failed question is not
            // an answer (the datapath is left alone).
            let handle = u32::from(TC_NL_HANDLE);
            for ingress in [true, false] {
                match crate::netdev::has_tc_filter(iface, ingress, TC_NL_PRIORITY, handle) {
                    Ok(true) | Err(_) => {}
                    Ok(false) => {
                        return Err(format!(
                            "xlb's TC {} filter on {iface} is gone",
                            if ingress { "ingress" } else { "egress" }
                        ));
                    }
                }
            }
        }
        let maps = names::ALL_MAPS.iter().map(|n| pin_path.join(n));
        for p in links.into_iter().chain(maps) {
            if !p.exists() {
                return Err(format!("{} is missing", p.display()));
            }
        }
        Ok(())
    }

    /// Reads back what the configuration maps hold now (after a restart: what the
    /// previous agent programmed).
    pub fn read_state(&self) -> Result<MapState, DataplaneError> {
        read_maps(ConfigMaps {
            services4: &self.services4,
            services6: &self.services6,
            maglev: &self.maglev,
            backends: &self.backends,
            ranges: &self.ranges,
            owners: &self.owners,
        })
    }

    /// The id counters persisted by a previous agent (zero on a fresh datapath).
    pub fn read_ids(&self) -> Result<Ids, DataplaneError> {
        let get = |i: u32| self.config.get(&i, 0).map_err(map_err(names::CONFIG));
        Ok(Ids {
            next_service: get(config::NEXT_SERVICE_ID)? as u32,
            next_backend: get(config::NEXT_BACKEND_ID)? as u32,
        })
    }

    /// Writes `xlb_config[key]` only when it differs; returns whether it wrote (so an
    /// unchanged restart writes nothing).
    pub fn set_config(&mut self, key: u32, value: u64) -> Result<bool, DataplaneError> {
        let now = self.config.get(&key, 0).map_err(map_err(names::CONFIG))?;
        if now == value {
            return Ok(false);
        }
        self.config
            .set(key, value, 0)
            .map_err(map_err(names::CONFIG))?;
        Ok(true)
    }

    /// Programs the node-level switches: forwarding and Cluster modes, this node's
    /// tunnel address, the uplink's MAC and the datapath event level. Returns the
    /// number of writes.
    pub fn set_node(&mut self, node: &NodeConfig) -> Result<u64, DataplaneError> {
        let ip = node
            .ip
            .map_or(0, |ip| u64::from(u32::from_ne_bytes(ip.octets())));
        let mac = node.mac.map_or(0, |m| {
            u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
        });
        let mut n = 0;
        for (key, value) in [
            (config::FORWARD_MODE, node.forward as u64),
            (config::CLUSTER_MODE, node.cluster as u64),
            (config::NODE_IP, ip),
            (config::IFACE_MAC, mac),
        ] {
            n += u64::from(self.set_config(key, value)?);
        }
        let level = self
            .datapath_log
            .get(&0, 0)
            .map_err(map_err(names::DATAPATH_LOG))?;
        if level != node.datapath_log {
            self.datapath_log
                .set(0, node.datapath_log, 0)
                .map_err(map_err(names::DATAPATH_LOG))?;
            n += 1;
        }
        Ok(n)
    }

    /// Persists the id counters (only when they changed; returns writes made).
    pub fn write_ids(&mut self, old: Ids, new: Ids) -> Result<u64, DataplaneError> {
        let mut n = 0;
        if old.next_service != new.next_service {
            self.config
                .set(config::NEXT_SERVICE_ID, u64::from(new.next_service), 0)
                .map_err(map_err(names::CONFIG))?;
            n += 1;
        }
        if old.next_backend != new.next_backend {
            self.config
                .set(config::NEXT_BACKEND_ID, u64::from(new.next_backend), 0)
                .map_err(map_err(names::CONFIG))?;
            n += 1;
        }
        Ok(n)
    }

    /// Applies writes in order; stops at the first failure (the caller re-reads the
    /// maps and retries, so a partial apply is never mistaken for the target).
    ///
    /// Consecutive writes of one kind go to the kernel as one batch ([`batch`]), which
    /// the kernel applies element by element in order: the order of the writes, and
    /// with it what packets can see between them, is the same as one call per write.
    pub fn apply(&mut self, writes: &[Write]) -> Result<(), DataplaneError> {
        let mut rest = writes;
        while let Some(first) = rest.first() {
            let kind = std::mem::discriminant(first);
            let n = rest
                .iter()
                .position(|w| std::mem::discriminant(w) != kind)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(n);
            let started = std::time::Instant::now();
            if matches!(first, Write::FillTable(..)) && !self.quiesced {
                self.quiesced = grace_period();
            }
            self.apply_run(run)?;
            // After a flip, one grace period before anything is deleted and before
            // the table flipped away from may be filled again: a packet that read the
            // service value before the flip may still be reading that table.
            if matches!(first, Write::PutService(..)) {
                self.quiesced = grace_period();
            }
            debug!(
                writes = run.len(),
                kind = first.kind(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "map writes"
            );
            rest = tail;
        }
        Ok(())
    }

    /// Applies `run`, writes of one kind, in as few calls as possible.
    fn apply_run(&mut self, run: &[Write]) -> Result<(), DataplaneError> {
        let Some(first) = run.first() else {
            return Ok(());
        };
        match first {
            Write::PutBackend(..) => {
                let (k, v): (Vec<u32>, Vec<Backend>) = run
                    .iter()
                    .filter_map(|w| match w {
                        Write::PutBackend(id, b) => Some((*id, *b)),
                        _ => None,
                    })
                    .unzip();
                batch::update(self.raw.backends.as_fd(), &k, &v).map_err(batch_err(names::BACKENDS))
            }
            Write::PutBackendStats(_) => {
                let k: Vec<u32> = ids_of(run).into_iter().map(backend_slot).collect();
                let zeros = vec![Counter::default(); k.len() * self.ncpus];
                batch::update(self.raw.backend_stats.as_fd(), &k, &zeros)
                    .map_err(batch_err(names::BACKEND_STATS))
            }
            Write::PutServiceStats(_) => {
                let k: Vec<u32> = ids_of(run).into_iter().map(service_slot).collect();
                let zeros = vec![Counter::default(); k.len() * self.ncpus];
                batch::update(self.raw.service_stats.as_fd(), &k, &zeros)
                    .map_err(batch_err(names::SERVICE_STATS))
            }
            Write::PutTable(..) => {
                let tables: Vec<(u32, &[u32])> = run
                    .iter()
                    .filter_map(|w| match w {
                        Write::PutTable(id, slots) => Some((*id, &slots[..])),
                        _ => None,
                    })
                    .collect();
                self.put_tables(&tables)
            }
            Write::FillTable(..) => {
                for w in run {
                    if let Write::FillTable(id, slots) = w {
                        self.fill_table(*id, slots)?;
                    }
                }
                Ok(())
            }
            Write::PutOwner(..) => {
                let (k, v): (Vec<u32>, Vec<xlb_common::Owner>) = run
                    .iter()
                    .filter_map(|w| match w {
                        Write::PutOwner(id, o) => Some((*id, **o)),
                        _ => None,
                    })
                    .unzip();
                batch::update(self.raw.owners.as_fd(), &k, &v).map_err(batch_err(names::OWNERS))
            }
            Write::PutService(..) => {
                let (mut k4, mut v4, mut k6, mut v6) = (vec![], vec![], vec![], vec![]);
                for w in run {
                    if let Write::PutService(k, v) = w {
                        if let Some(k) = k.v4() {
                            k4.push(k);
                            v4.push(*v);
                        } else if let Some(k) = k.v6() {
                            k6.push(k);
                            v6.push(*v);
                        }
                    }
                }
                batch::update(self.raw.services4.as_fd(), &k4, &v4)
                    .map_err(batch_err(names::SERVICES4))?;
                batch::update(self.raw.services6.as_fd(), &k6, &v6)
                    .map_err(batch_err(names::SERVICES6))
            }
            Write::DelService(_) => {
                let (mut k4, mut k6) = (vec![], vec![]);
                for w in run {
                    if let Write::DelService(k) = w {
                        if let Some(k) = k.v4() {
                            k4.push(k);
                        } else if let Some(k) = k.v6() {
                            k6.push(k);
                        }
                    }
                }
                batch::delete(self.raw.services4.as_fd(), &k4)
                    .map_err(batch_err(names::SERVICES4))?;
                batch::delete(self.raw.services6.as_fd(), &k6).map_err(batch_err(names::SERVICES6))
            }
            // Counter arrays cannot delete: a freed slot is zeroed when an id takes it
            // again (Put*Stats).
            Write::DelServiceStats(_) | Write::DelBackendStats(_) => Ok(()),
            Write::DelOwner(_) => batch::delete(self.raw.owners.as_fd(), &ids_of(run))
                .map_err(batch_err(names::OWNERS)),
            // One RCU grace period for the whole run (see `batch`).
            Write::DelTable(_) => batch::delete(self.raw.maglev.as_fd(), &ids_of(run))
                .map_err(batch_err(names::MAGLEV)),
            Write::DelBackend(_) => batch::delete(self.raw.backends.as_fd(), &ids_of(run))
                .map_err(batch_err(names::BACKENDS)),
            // Source ranges are few; the LPM trie is written one prefix at a time.
            Write::PutRange(..) | Write::DelRange(..) => {
                for w in run {
                    match *w {
                        Write::PutRange(len, r) => self
                            .ranges
                            .insert(&LpmKey::new(len, r), 1, 0)
                            .map_err(map_err(names::SOURCE_RANGES))?,
                        Write::DelRange(len, r) => {
                            ignore_missing(self.ranges.remove(&LpmKey::new(len, r)))
                                .map_err(map_err(names::SOURCE_RANGES))?
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }

    /// Rewrites table `id` in place (see [`Write::FillTable`]); without a grace
    /// period to rely on (membarrier refused), or if the table is not the size the
    /// state says, it is replaced by a new inner map instead.
    fn fill_table(&mut self, id: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        let pairs = slots.len().div_ceil(2);
        let inner = match self.maglev.get(&id, 0) {
            Ok(inner) if self.quiesced && inner.len() as usize == pairs => inner,
            _ => return self.put_tables(&[(id, slots)]),
        };
        let fd = IterableMap::map(&inner).fd().as_fd();
        // A table created before tables were mmapable is written with one batch.
        if fill_mapped(fd, slots).is_ok() {
            return Ok(());
        }
        let keys = pair_indices().get(..pairs).ok_or_else(|| {
            batch_err(names::MAGLEV)(batch::BatchError {
                done: 0,
                total: pairs,
                error: io::Error::from_raw_os_error(libc::E2BIG),
            })
        })?;
        let mut padded = slots.to_vec();
        padded.resize(pairs * 2, 0);
        batch::update(fd, keys, &padded).map_err(batch_err(names::MAGLEV))
    }

    /// Creates and fills a fresh inner map per table, then puts them into `xlb_maglev`
    /// a chunk at a time: one `BPF_MAP_UPDATE_BATCH` (one RCU grace period) per chunk,
    /// chunks sized so that the open inner-map fds stay well under `RLIMIT_NOFILE`.
    fn put_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), DataplaneError> {
        let chunk = table_chunk();
        let mut scratch = Vec::new();
        for part in tables.chunks(chunk) {
            let keys: Vec<u32> = part.iter().map(|(id, _)| *id).collect();
            let mut mmapable = self.mmap_tables;
            loop {
                let mut inner = Vec::with_capacity(part.len());
                for (_, slots) in part {
                    inner.push(
                        new_table_with(slots, mmapable, &mut scratch)
                            .map_err(batch_err(names::MAGLEV))?,
                    );
                }
                let fds: Vec<u32> = inner
                    .iter()
                    .map(|t| IterableMap::map(t).fd().as_fd().as_raw_fd() as u32)
                    .collect();
                match batch::update(self.raw.maglev.as_fd(), &keys, &fds) {
                    Ok(()) => break,
                    // A pinned xlb_maglev created by an agent whose template was not
                    // mmapable refuses mmapable tables (flags must match): fill them
                    // the old way from now on.
                    Err(e)
                        if mmapable
                            && e.done == 0
                            && e.error.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        tracing::warn!(
                            "xlb_maglev predates mmapable tables; filling tables with batch writes (xlb cleanup and a restart recreate it)"
                        );
                        mmapable = false;
                        self.mmap_tables = false;
                    }
                    Err(e) => return Err(batch_err(names::MAGLEV)(e)),
                }
            }
        }
        Ok(())
    }
}

impl Dataplane {
    /// Makes `xlb_peer_devs` hold exactly `devs` (pod-facing devices, see
    /// `netdev::peer_devices`); returns the writes made.
    pub fn set_peer_devices(
        &mut self,
        devs: &std::collections::BTreeSet<u32>,
    ) -> Result<u64, DataplaneError> {
        let now: std::collections::BTreeSet<u32> = self
            .peer_devs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::PEER_DEVS))?;
        let mut n = 0;
        for gone in now.difference(devs) {
            ignore_missing(self.peer_devs.remove(gone)).map_err(map_err(names::PEER_DEVS))?;
            n += 1;
        }
        for new in devs.difference(&now) {
            self.peer_devs
                .insert(new, 1, 0)
                .map_err(map_err(names::PEER_DEVS))?;
            n += 1;
        }
        Ok(n)
    }
}

/// The u32 ids of a run of id-keyed writes.
fn ids_of(run: &[Write]) -> Vec<u32> {
    run.iter()
        .filter_map(|w| match *w {
            Write::PutBackendStats(id)
            | Write::PutServiceStats(id)
            | Write::DelServiceStats(id)
            | Write::DelOwner(id)
            | Write::DelTable(id)
            | Write::DelBackend(id)
            | Write::DelBackendStats(id) => Some(id),
            _ => None,
        })
        .collect()
}

fn batch_err(map: &'static str) -> impl FnOnce(batch::BatchError) -> DataplaneError {
    move |source| DataplaneError::Batch { map, source }
}

/// Inner maps created before one batch into `xlb_maglev`: a quarter of the soft
/// `RLIMIT_NOFILE` (raised to the hard limit at start, see [`raise_nofile`]), at least
/// 64 and at most 8192.
fn table_chunk() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (soft / 4).clamp(64, 8192)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (best effort, as Go's runtime does
/// at start): programming many Maglev tables holds one fd per table until their batch
/// is in the kernel.
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The indices of the slot pairs of the largest table, the keys of every fill.
fn pair_indices() -> &'static [u32] {
    static KEYS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let largest = maglev::PRIMES.last().copied().unwrap_or(0);
        (0..largest.div_ceil(2)).collect()
    })
}

/// Waits for an RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which is
/// `synchronize_rcu()` in the kernel): afterwards no XDP or TC program run that began
/// before the call is still running. `false` if the kernel refuses (nohz_full CPUs),
/// and then tables are never filled in place.
fn grace_period() -> bool {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; an unsupported command returns an error.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "membarrier: tables will be replaced, not filled in place");
    }
    r == 0
}

/// The configuration maps [`read_maps`] reads.
struct ConfigMaps<'a> {
    services4: &'a HashMap<MapData, ServiceKey4, Service>,
    services6: &'a HashMap<MapData, ServiceKey6, Service>,
    maglev: &'a HashOfMaps<MapData, u32, Array<MapData, SlotPair>>,
    backends: &'a HashMap<MapData, u32, Backend>,
    ranges: &'a LpmTrie<MapData, SourceRange, u8>,
    owners: &'a HashMap<MapData, u32, xlb_common::Owner>,
}

/// What the configuration maps hold.
fn read_maps(m: ConfigMaps<'_>) -> Result<MapState, DataplaneError> {
    let mut s = MapState::default();
    for kv in m.services4.iter() {
        let (k, v) = kv.map_err(map_err(names::SERVICES4))?;
        s.services.insert(k.into(), v);
    }
    for kv in m.services6.iter() {
        let (k, v) = kv.map_err(map_err(names::SERVICES6))?;
        s.services.insert(k.into(), v);
    }
    for k in m.maglev.keys() {
        let k = k.map_err(map_err(names::MAGLEV))?;
        let inner = m.maglev.get(&k, 0).map_err(map_err(names::MAGLEV))?;
        let mut slots = Vec::with_capacity(inner.len() as usize * 2);
        for pair in inner.iter() {
            let pair = pair.map_err(map_err(names::MAGLEV))?;
            slots.extend_from_slice(&pair);
        }
        // Table sizes are odd primes: the last pair's second lane is padding.
        slots.pop();
        s.tables.insert(k, slots.into());
    }
    for kv in m.backends.iter() {
        let (k, v) = kv.map_err(map_err(names::BACKENDS))?;
        s.backends.insert(k, v);
    }
    // The counter arrays have every slot: those of the ids present are in use.
    s.service_stats = s
        .services
        .values()
        .map(|v| v.id)
        .filter(|id| *id != 0)
        .collect();
    s.backend_stats = s.backends.keys().copied().collect();
    for k in m.ranges.keys() {
        let k = k.map_err(map_err(names::SOURCE_RANGES))?;
        s.ranges.insert((k.prefix_len(), k.data()));
    }
    for kv in m.owners.iter() {
        let (k, v) = kv.map_err(map_err(names::OWNERS))?;
        s.owners.insert(k, v);
    }
    Ok(s)
}

/// What the configuration maps pinned under `pin_path` hold, without loading any
/// program: for `xlb inspect`, which must work while no agent runs.
pub fn read_pinned_state(pin_path: &Path) -> Result<MapState, DataplaneError> {
    let open = |name: &'static str| MapData::from_pin(pin_path.join(name)).map_err(map_err(name));
    let services4 = HashMap::try_from(aya::maps::Map::HashMap(open(names::SERVICES4)?))
        .map_err(map_err(names::SERVICES4))?;
    let services6 = HashMap::try_from(aya::maps::Map::HashMap(open(names::SERVICES6)?))
        .map_err(map_err(names::SERVICES6))?;
    let maglev = HashOfMaps::try_from(aya::maps::Map::HashOfMaps(open(names::MAGLEV)?))
        .map_err(map_err(names::MAGLEV))?;
    let backends = HashMap::try_from(aya::maps::Map::HashMap(open(names::BACKENDS)?))
        .map_err(map_err(names::BACKENDS))?;
    let ranges = LpmTrie::try_from(aya::maps::Map::LpmTrie(open(names::SOURCE_RANGES)?))
        .map_err(map_err(names::SOURCE_RANGES))?;
    let owners = HashMap::try_from(aya::maps::Map::HashMap(open(names::OWNERS)?))
        .map_err(map_err(names::OWNERS))?;
    read_maps(ConfigMaps {
        services4: &services4,
        services6: &services6,
        maglev: &maglev,
        backends: &backends,
        ranges: &ranges,
        owners: &owners,
    })
}

/// A new inner Maglev array holding `slots` in pairs, mmapable (see [`new_table_with`]).
pub(crate) fn new_table(slots: &[u32]) -> Result<Array<MapData, SlotPair>, DataplaneError> {
    new_table_with(slots, true, &mut Vec::new()).map_err(batch_err(names::MAGLEV))
}

/// A new inner Maglev array holding `slots` in pairs. `BPF_F_INNER_MAP` lets arrays of
/// any size stand in for the program's template (kernel `bpf_map_meta_equal`, which
/// also requires equal flags: the template in `xlb-ebpf` is `BPF_F_MMAPABLE` too).
///
/// `mmapable`: the array is created with `BPF_F_MMAPABLE` and filled through a shared
/// mapping of its data (kernel `array_map_mmap`; a new array is zeroed, so the padding
/// lane of the last pair stays 0), one copy instead of a kernel write per pair.
/// Otherwise it is filled with one `BPF_MAP_UPDATE_BATCH` (`scratch` holds the padded
/// copy). Either way the table is complete before anything can point to it.
fn new_table_with(
    slots: &[u32],
    mmapable: bool,
    scratch: &mut Vec<u32>,
) -> Result<Array<MapData, SlotPair>, batch::BatchError> {
    const BPF_F_INNER_MAP: u32 = 1 << 12;
    const BPF_F_MMAPABLE: u32 = 1 << 10;
    let pairs = slots.len().div_ceil(2);
    let failed = |error| batch::BatchError {
        done: 0,
        total: pairs,
        error,
    };
    let flags = BPF_F_INNER_MAP | if mmapable { BPF_F_MMAPABLE } else { 0 };
    let table = Array::<MapData, SlotPair>::create(pairs as u32, flags).map_err(|e| {
        failed(match e {
            MapError::CreateError { io_error, .. } => io_error,
            other => io::Error::other(other.to_string()),
        })
    })?;
    let fd = IterableMap::map(&table).fd().as_fd();
    if mmapable {
        fill_mapped(fd, slots).map_err(failed)?;
        return Ok(table);
    }
    let keys = pair_indices()
        .get(..pairs)
        .ok_or_else(|| failed(io::Error::from_raw_os_error(libc::E2BIG)))?;
    scratch.clear();
    scratch.extend_from_slice(slots);
    scratch.resize(pairs * 2, 0);
    batch::update(fd, keys, scratch)?;
    Ok(table)
}

/// Copies `slots` to the start of the mmapable array `fd` (8-byte elements, so the
/// slots lie back to back from offset 0).
fn fill_mapped(fd: BorrowedFd<'_>, slots: &[u32]) -> io::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let bytes = size_of_val(slots);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| *p > 0)
        .unwrap_or(4096);
    // The kernel maps whole pages of the array's data (its size rounded up).
    let len = bytes.div_ceil(page) * page;
    // SAFETY: a fresh shared mapping of the map's data, which the kernel allows up to
    // the data size rounded up to pages; nothing else refers to this memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p` is valid for `len >= bytes` bytes and does not overlap `slots`; it is
    // unmapped right after and never used again.
    unsafe {
        std::ptr::copy_nonoverlapping(slots.as_ptr(), p.cast::<u32>(), slots.len());
        libc::munmap(p, len);
    }
    Ok(())
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source }
}

fn link_err(path: &Path, message: impl ToString) -> DataplaneError {
    DataplaneError::Link {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Opens a pinned link, `None` if nothing is pinned there. A pin whose link has gone
/// defunct (its interface was deleted) is removed and reported as absent.
fn open_pinned_link(path: &Path) -> Result<Option<FdLink>, DataplaneError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(link_err(path, e)),
    }
}

/// Loads the programs `xlb_xdp` tail-calls and puts them in the (pinned) `xlb_progs`.
/// The returned handle must outlive loading `xlb_xdp`, which refers to the map by fd.
fn load_tail_programs(ebpf: &mut Ebpf) -> Result<aya::maps::ProgramArray<MapData>, DataplaneError> {
    let mut progs: aya::maps::ProgramArray<MapData> = take_map(ebpf, names::PROGS)?;
    for (i, name) in names::TAIL_PROGS.iter().enumerate() {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing("tail-called program"))?
            .try_into()
            .map_err(program_err("tail-called program"))?;
        prog.load().map_err(program_err("tail-called program"))?;
        let fd = prog.fd().map_err(program_err("tail-called program"))?;
        progs.set(i as u32, fd, 0).map_err(map_err(names::PROGS))?;
    }
    Ok(progs)
}

/// Loads the TC twins of the tail-called programs (`names::TC_TAIL_PROGS`) into the
/// (pinned) `xlb_progs_tc`, for `xlb_tc_lb`. The handle must outlive loading it.
fn load_tc_tail_programs(
    ebpf: &mut Ebpf,
) -> Result<aya::maps::ProgramArray<MapData>, DataplaneError> {
    let mut progs: aya::maps::ProgramArray<MapData> = take_map(ebpf, names::PROGS_TC)?;
    for (i, name) in names::TC_TAIL_PROGS.iter().enumerate() {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing("tail-called TC program"))?
            .try_into()
            .map_err(program_err(name))?;
        prog.load().map_err(program_err(name))?;
        let fd = prog.fd().map_err(program_err(name))?;
        progs
            .set(i as u32, fd, 0)
            .map_err(map_err(names::PROGS_TC))?;
    }
    Ok(progs)
}

/// `--xdp-mode tc`: `xlb_tc_lb` now runs at TC ingress; removes the XDP program a
/// previous agent attached (unpinning its link, the last reference). Until then a
/// packet XDP DNATed reaches `xlb_tc_lb` addressed to a pod, which it passes.
fn detach_xdp(
    iface: &str,
    pin_path: &Path,
    config: &mut Array<MapData, u64>,
    decision: XdpDecision,
) -> Result<XdpDecision, DataplaneError> {
    let pin = xdp_link_pin(pin_path, iface);
    if let Some(old) = open_pinned_link(&pin)? {
        std::fs::remove_file(&pin).map_err(|e| link_err(&pin, e))?;
        drop(old);
        info!(
            iface,
            "removed the XDP program a previous agent attached (--xdp-mode tc)"
        );
    }
    config
        .set(config::XDP_MODE, MODE_TC, 0)
        .map_err(map_err(names::CONFIG))?;
    Ok(decision)
}

/// Decides the attach mode for `iface` (see [`crate::netdev::auto_mode`]).
fn decide_mode(iface: &str, choice: XdpChoice) -> XdpDecision {
    let driver = crate::netdev::driver_info(iface);
    let name = driver
        .as_ref()
        .map(|d| d.driver.clone())
        .unwrap_or_default();
    match choice {
        XdpChoice::Native => XdpDecision {
            native: true,
            tc: false,
            reason: "--xdp-mode native".into(),
            driver: name,
        },
        XdpChoice::Generic => XdpDecision {
            native: false,
            tc: false,
            reason: "--xdp-mode generic".into(),
            driver: name,
        },
        XdpChoice::Tc => XdpDecision {
            native: false,
            tc: true,
            reason: "--xdp-mode tc".into(),
            driver: name,
        },
        XdpChoice::Auto | XdpChoice::AutoXdp => match driver {
            Ok(info) => crate::netdev::auto_mode(&info, choice == XdpChoice::AutoXdp),
            Err(e) => XdpDecision {
                native: false,
                tc: false,
                reason: format!("driver unknown ({e})"),
                driver: String::new(),
            },
        },
    }
}

/// Attaches `xlb_xdp` in the mode [`decide_mode`] picked, or swaps it into the pinned
/// link when that link already runs in that mode. Records the mode in `xlb_config`.
fn attach_xdp(
    ebpf: &mut Ebpf,
    iface: &str,
    pin_path: &Path,
    choice: XdpChoice,
    mut decision: XdpDecision,
    config: &mut Array<MapData, u64>,
) -> Result<XdpDecision, DataplaneError> {
    let name = names::XDP_PROG;
    let auto = matches!(choice, XdpChoice::Auto | XdpChoice::AutoXdp);
    let had = config
        .get(&config::XDP_MODE, 0)
        .map_err(map_err(names::CONFIG))?;
    if auto && decision.native && had == MODE_GENERIC {
        // A previous agent found native attach impossible here; don't detach to retry.
        decision.native = false;
        decision.reason = format!("{}; generic kept from the previous attach", decision.reason);
    }
    let want = if decision.native {
        MODE_NATIVE
    } else {
        MODE_GENERIC
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing("XDP program"))?
        .try_into()
        .map_err(program_err(name))?;
    prog.load().map_err(program_err(name))?;
    let pin = xdp_link_pin(pin_path, iface);
    if let Some(old) = open_pinned_link(&pin)? {
        if had == want {
            let link = XdpLink::try_from(old).map_err(|e| link_err(&pin, e))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    info!(iface, link = %pin.display(), native = decision.native, "took over the XDP link (atomic program replace)");
                    // The replaced link is still pinned; nothing to re-pin.
                    let link = prog.take_link(id).map_err(program_err(name))?;
                    drop(link);
                    return Ok(decision);
                }
                Err(e) => {
                    // Defunct link (interface recreated): start afresh.
                    info!(iface, error = %e, "pinned XDP link unusable, attaching anew");
                }
            }
        } else {
            // Native and generic XDP cannot be attached at once: detach, then attach.
            tracing::warn!(
                iface,
                from = had,
                to = want,
                "the pinned XDP link runs in another mode; re-attaching (a moment without XDP)"
            );
            drop(old);
        }
        std::fs::remove_file(&pin).map_err(|e| link_err(&pin, e))?;
    }
    let mode = if decision.native {
        XdpMode::Driver
    } else {
        XdpMode::Skb
    };
    let id = match prog.attach(iface, mode) {
        Ok(id) => id,
        Err(e) if decision.native && auto => {
            decision.native = false;
            decision.reason = format!("{}; native attach failed ({e})", decision.reason);
            prog.attach(iface, XdpMode::Skb)
                .map_err(program_err(name))?
        }
        Err(e) => return Err(program_err(name)(e)),
    };
    let link = prog.take_link(id).map_err(program_err(name))?;
    let fd = FdLink::try_from(link).map_err(|e| link_err(&pin, e))?;
    fd.pin(&pin).map_err(|e| link_err(&pin, e))?;
    let now = if decision.native {
        MODE_NATIVE
    } else {
        MODE_GENERIC
    };
    config
        .set(config::XDP_MODE, now, 0)
        .map_err(map_err(names::CONFIG))?;
    info!(iface, link = %pin.display(), "attached XDP program");
    Ok(decision)
}

/// Attaches or takes over the TC program `name` for `direction`: `xlb_tc_egress`
/// (reverse NAT), or at ingress `xlb_tc_ingress` (what XDP hands over) or `xlb_tc_lb`
/// (`--xdp-mode tc`), as a tcx link when `tcx`, else as
/// a netlink filter; then removes a predecessor's attachment of the other kind (an
/// agent that probed otherwise, or was forced to), so the program never runs twice.
fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    pin_path: &Path,
    name: &'static str,
    direction: TcAttachType,
    tcx: bool,
) -> Result<(), DataplaneError> {
    let pin = match direction {
        TcAttachType::Ingress => tc_ingress_link_pin(pin_path, iface),
        _ => tc_link_pin(pin_path, iface),
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing("TC program"))?
        .try_into()
        .map_err(program_err(name))?;
    prog.load().map_err(program_err(name))?;
    if tcx {
        attach_tcx(prog, name, iface, &pin, direction)?;
        // A netlink filter of an agent that ran without tcx.
        remove_tc_filter(iface, direction);
    } else {
        attach_tc_netlink(prog, name, iface, direction)?;
        if let Some(old) = open_pinned_link(&pin)? {
            std::fs::remove_file(&pin).map_err(|e| link_err(&pin, e))?;
            drop(old);
            info!(
                iface,
                program = name,
                "removed the tcx link of an agent that used tcx"
            );
        }
    }
    Ok(())
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    pin: &Path,
    direction: TcAttachType,
) -> Result<(), DataplaneError> {
    let attach_new = |prog: &mut SchedClassifier| {
        prog.attach_with_options(
            iface,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(program_err(name))
    };
    let id = match open_pinned_link(pin)? {
        Some(old) => {
            let link = SchedClassifierLink::try_from(old).map_err(|e| link_err(pin, e))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    info!(iface, program = name, link = %pin.display(), "took over the TC link (atomic program replace)");
                    let link = prog.take_link(id).map_err(program_err(name))?;
                    drop(link);
                    return Ok(());
                }
                Err(e) => {
                    info!(iface, program = name, error = %e, "pinned TC link unusable, attaching anew");
                    std::fs::remove_file(pin).map_err(|e| link_err(pin, e))?;
                    attach_new(prog)?
                }
            }
        }
        None => attach_new(prog)?,
    };
    let link = prog.take_link(id).map_err(program_err(name))?;
    let fd = FdLink::try_from(link).map_err(|e| link_err(pin, e))?;
    fd.pin(pin).map_err(|e| link_err(pin, e))?;
    info!(iface, program = name, link = %pin.display(), "attached TC program (tcx)");
    Ok(())
}

/// Attaches through netlink (kernels before 6.6): the clsact qdisc, then a cls_bpf
/// filter in direct-action mode at [`TC_NL_PRIORITY`]/[`TC_NL_HANDLE`]. A filter
/// already there (a previous agent's) is replaced in place: cls_bpf swaps the program
/// atomically, so every packet runs the old or the new one.
fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    direction: TcAttachType,
) -> Result<(), DataplaneError> {
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
        // EEXIST: the qdisc is there already (ours or another tool's); fine.
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
            if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(program_err(name)(ProgramError::from(e)));
        }
    }
    let existing =
        SchedClassifierLink::attached(iface, direction, TC_NL_PRIORITY, TC_NL_HANDLE, None)
            .map_err(|e| program_err(name)(ProgramError::from(e)))?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => {
            info!(
                iface,
                program = name,
                "took over the TC filter (netlink, atomic program replace)"
            );
            id
        }
        Err(_) => {
            let id = prog
                .attach_with_options(
                    iface,
                    direction,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_NL_PRIORITY,
                        handle: TC_NL_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(program_err(name))?;
            info!(
                iface,
                program = name,
                priority = TC_NL_PRIORITY,
                "attached TC program (netlink cls_bpf: this kernel has no tcx)"
            );
            id
        }
    };
    let link = prog.take_link(id).map_err(program_err(name))?;
    // Dropping the link would delete the filter: the datapath outlives the agent, so
    // the filter stays until `xlb cleanup` (or a tcx-capable agent) removes it.
    std::mem::forget(link);
    Ok(())
}

/// Deletes xlb's netlink filter for `direction` on `iface`, if there is one.
fn remove_tc_filter(iface: &str, direction: TcAttachType) -> bool {
    use aya::programs::Link as _;
    match SchedClassifierLink::attached(iface, direction, TC_NL_PRIORITY, TC_NL_HANDLE, None) {
        Ok(link) => link.detach().is_ok(),
        Err(_) => false,
    }
}

/// `xlb cleanup`: detaches the programs from `iface` (by unpinning their links, the
/// last reference) and removes every pinned map, then the directory if it is empty.
/// Returns what it removed.
pub fn cleanup(iface: &str, pin_path: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    let mut removed = Vec::new();
    for pin in [
        xdp_link_pin(pin_path, iface),
        tc_link_pin(pin_path, iface),
        tc_ingress_link_pin(pin_path, iface),
    ] {
        if let Some(link) = open_pinned_link(&pin)? {
            // Unpinning drops the bpffs reference; dropping `link` closes our fd, the
            // last one, and the kernel detaches the program.
            std::fs::remove_file(&pin).map_err(|e| link_err(&pin, e))?;
            drop(link);
            removed.push(pin);
        }
    }
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        if remove_tc_filter(iface, direction) {
            removed.push(PathBuf::from(format!(
                "tc filter {iface} {} pref {TC_NL_PRIORITY}",
                if direction == TcAttachType::Ingress {
                    "ingress"
                } else {
                    "egress"
                }
            )));
        }
    }
    for name in names::ALL_MAPS.into_iter().chain(layout::RETIRED) {
        let p = pin_path.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(link_err(&p, e)),
        }
    }
    match std::fs::remove_dir(pin_path) {
        Ok(()) => removed.push(pin_path.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Other interfaces' links may still live there.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
        Err(e) => return Err(link_err(pin_path, e)),
    }
    Ok(removed)
}

/// Read-only handles on the per-CPU counters, opened from their pins so the metrics
/// server can read them without sharing the reconciler's handles.
pub struct Stats {
    services: PerCpuArray<MapData, Counter>,
    backends: PerCpuArray<MapData, Counter>,
    reasons: aya::maps::PerCpuArray<MapData, u64>,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Per service id.
    pub services: std::collections::BTreeMap<u32, Counter>,
    /// Per backend id.
    pub backends: std::collections::BTreeMap<u32, Counter>,
    /// Per [`xlb_common::Reason`], indexed by discriminant.
    pub reasons: Vec<u64>,
}

impl Stats {
    /// Opens the pinned counter maps under `pin_path`.
    pub fn open(pin_path: &Path) -> Result<Self, DataplaneError> {
        let open =
            |name: &'static str| MapData::from_pin(pin_path.join(name)).map_err(map_err(name));
        Ok(Stats {
            services: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(
                names::SERVICE_STATS,
            )?))
            .map_err(map_err(names::SERVICE_STATS))?,
            backends: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(
                names::BACKEND_STATS,
            )?))
            .map_err(map_err(names::BACKEND_STATS))?,
            reasons: aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(
                names::REASONS,
            )?))
            .map_err(map_err(names::REASONS))?,
        })
    }

    /// Reads and sums the counters of the given service and backend ids (one lookup
    /// each at the id's slot) and every reason counter.
    pub fn read(
        &self,
        service_ids: impl IntoIterator<Item = u32>,
        backend_ids: impl IntoIterator<Item = u32>,
    ) -> Result<StatsSnapshot, DataplaneError> {
        let sum = |vals: PerCpuValues<Counter>| {
            vals.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
        };
        let mut s = StatsSnapshot::default();
        for id in service_ids {
            let v = self
                .services
                .get(&service_slot(id), 0)
                .map_err(map_err(names::SERVICE_STATS))?;
            s.services.insert(id, sum(v));
        }
        for id in backend_ids {
            let v = self
                .backends
                .get(&backend_slot(id), 0)
                .map_err(map_err(names::BACKEND_STATS))?;
            s.backends.insert(id, sum(v));
        }
        for v in self.reasons.iter() {
            let v = v.map_err(map_err(names::REASONS))?;
            s.reasons.push(v.iter().sum());
        }
        Ok(s)
    }
}
