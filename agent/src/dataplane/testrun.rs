//! Running the embedded kernel programs on hand-made packets with `BPF_PROG_TEST_RUN`,
//! for tests and cost measurements: no interface, no attach, no pins.
//!
//! [`TestBed::load`] loads the embedded object with fresh, unpinned maps (so tests never
//! touch a live datapath under `/sys/fs/bpf/xlb`, and two test beds never share state),
//! loads every program, and hands out typed map handles so a test can program a
//! service exactly as the agent would ([`super::state`] encodes the values).
//!
//! Two kernel facts to keep in mind when reading results:
//! - the kernel refuses inputs shorter than an Ethernet header (14 bytes) with
//!   `EINVAL`: the program never sees them;
//! - with `repeat > 1` the program runs again and again on the *same* buffer, so a
//!   program that rewrites the packet sees its own output from the second run on
//!   (a DNATed packet no longer goes to the VIP). Measure a rewriting path with a
//!   packet whose rewrite is the identity, or with `repeat = 1`.
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, HashOfMaps, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{Program, ProgramError, TestRun, TestRunOptions},
};
use xlb_common::{
    Backend, Counter, CtEntry, FlowKey4, L2Vip, Reason, ResolveMeta, Service, ServiceKey4,
    SlotPair, TcHandoff, backend_slot, names, service_slot,
};

use super::{DataplaneError, OBJECT, map_err, new_table, take_map};

/// The XDP program that returns `XDP_PASS` and nothing else: what any XDP program
/// costs at least, measured the same way as `xlb_xdp`. Never attached.
pub const BASELINE_PROG: &str = "xlb_baseline_pass";

/// Largest frame the kernel's test run accepts is one page minus head- and tailroom;
/// output buffers of this size always suffice.
const OUT_BUF: usize = 4096;

/// Size of `struct xdp_md` (six u32 fields).
const XDP_MD_LEN: usize = 24;

/// The loaded object with its own maps, ready to run programs on packets.
pub struct TestBed {
    ebpf: Ebpf,
    /// `xlb_services4`: IPv4 VIP:port:proto -> service.
    pub services: HashMap<MapData, ServiceKey4, Service>,
    /// `xlb_maglev`: table id -> inner array (see [`TestBed::set_table`]).
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, SlotPair>>,
    /// `xlb_backends`: backend id -> address.
    pub backends: HashMap<MapData, u32, Backend>,
    /// `xlb_conntrack4` (LRU): client flow -> chosen backend.
    pub conntrack: HashMap<MapData, FlowKey4, CtEntry>,
    /// `xlb_config`: node settings (`xlb_common::config`).
    pub config: Array<MapData, u64>,
    /// `xlb_l2_vips4`: owned IPv4 VIP (wire bytes as a native u32) -> ARP reply data.
    pub l2_vips: HashMap<MapData, u32, L2Vip>,
    /// `xlb_l2_stats4`: ARP replies per owned IPv4 VIP, per CPU.
    pub l2_stats: PerCpuHashMap<MapData, u32, u64>,
    service_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    reasons: PerCpuArray<MapData, u64>,
    /// `xlb_tc_handoff`, `None` in an object that predates it.
    tc_handoff: Option<std::sync::Mutex<PerCpuArray<MapData, TcHandoff>>>,
    /// Datapath events, `None` in an object that predates them ([`TestBed::load_object`]).
    events: Option<Events>,
    seen: Collect,
    ncpus: usize,
}

/// The datapath event maps and log of a loaded object.
struct Events {
    /// `xlb_dp_log`: the datapath event level (`xlb_common::datapath_log`).
    level: Array<MapData, u64>,
    // Keeps `xlb_events` in its program array (the kernel empties a program array
    // once no user reference is left).
    _progs: aya::maps::ProgramArray<MapData>,
    log: aya_log::EbpfLogger<Collect>,
}

/// Keeps the datapath events the programs log, as [`TestBed::events`] returns them.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if let Ok(mut v) = self.0.lock() {
            v.push(format!("{} {}: {}", r.level(), r.target(), r.args()));
        }
    }
    fn flush(&self) {}
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value (for XDP an `xdp_action`, e.g. 2 = `XDP_PASS`).
    pub retval: u32,
    /// The packet as the program left it (after the last repetition).
    pub data: Vec<u8>,
    /// XDP metadata the program put in front of the packet (`bpf_xdp_adjust_meta`),
    /// e.g. the `xlb_common::ResolveMeta` for `xlb_tc_ingress`; empty for TC.
    pub meta: Vec<u8>,
    /// What XDP handed to `xlb_tc_ingress`: the metadata, or else what it left in
    /// the per-CPU `xlb_tc_handoff` slot (which this run then empties).
    pub handoff: Option<ResolveMeta>,
    /// Average time per repetition as the kernel measured it, in nanoseconds.
    pub duration_ns: u64,
}

impl TestBed {
    /// Loads the embedded object with fresh, unpinned maps and loads (verifies) every
    /// program in it. Needs CAP_BPF (root).
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_object(OBJECT)
    }

    /// [`TestBed::load`] for another build of the programs (e.g. an older one, to
    /// compare costs); one without datapath events runs without them. XDP metadata is
    /// used where this kernel offers it (`crate::features`).
    pub fn load_object(object: &[u8]) -> Result<Self, DataplaneError> {
        let meta = crate::features::Features::probe(&[]).is_ok_and(|f| f.xdp_meta());
        Self::load_with(object, meta)
    }

    /// [`TestBed::load_object`] with XDP metadata on or off (off: the hand-off slot,
    /// as on a kernel or driver without metadata).
    pub fn load_with(object: &[u8], xdp_meta: bool) -> Result<Self, DataplaneError> {
        if object.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let meta = u8::from(xdp_meta);
        let mut ebpf = EbpfLoader::new()
            .override_global(xlb_common::globals::XDP_META, &meta, false)
            .load(object)?;
        for (name, prog) in ebpf.programs_mut() {
            let loaded = match prog {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => continue,
            };
            loaded.map_err(|source| DataplaneError::Program {
                name: static_name(name),
                source,
            })?;
        }
        let services = take_map(&mut ebpf, names::SERVICES4)?;
        let maglev = take_map(&mut ebpf, names::MAGLEV)?;
        let backends = take_map(&mut ebpf, names::BACKENDS)?;
        let conntrack = take_map(&mut ebpf, names::CONNTRACK4)?;
        let config = take_map(&mut ebpf, names::CONFIG)?;
        let l2_vips = take_map(&mut ebpf, names::L2_VIPS4)?;
        let l2_stats = take_map(&mut ebpf, names::L2_STATS4)?;
        let service_stats = take_map(&mut ebpf, names::SERVICE_STATS)?;
        let backend_stats = take_map(&mut ebpf, names::BACKEND_STATS)?;
        let reasons = take_map(&mut ebpf, names::REASONS)?;
        let tc_handoff = match ebpf.map(names::TC_HANDOFF) {
            Some(_) => Some(std::sync::Mutex::new(take_map(
                &mut ebpf,
                names::TC_HANDOFF,
            )?)),
            None => None,
        };
        let seen = Collect::default();
        let events = if ebpf.program(names::EVENTS_PROG).is_some() {
            Some(Events::load(&mut ebpf, &seen)?)
        } else {
            None
        };
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        Ok(TestBed {
            ebpf,
            services,
            maglev,
            backends,
            conntrack,
            config,
            l2_vips,
            l2_stats,
            service_stats,
            backend_stats,
            reasons,
            tc_handoff,
            events,
            seen,
            ncpus,
        })
    }

    /// Runs the XDP or TC program `prog` on `packet`, `repeat` times (0 counts as 1),
    /// with `BPF_PROG_TEST_RUN`. Returns the last run's verdict and packet and the
    /// kernel's average duration per run.
    pub fn run(
        &self,
        prog: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<RunResult, DataplaneError> {
        let mut out = vec![0u8; OUT_BUF.max(packet.len())];
        // struct xdp_md comes back with `data` = the metadata's length (the kernel
        // copies the output from data_meta on). Going in, the kernel wants
        // `data_end` = the packet's length and the rest zero.
        let mut md_in = [0u8; XDP_MD_LEN];
        md_in[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        let mut md = [0u8; XDP_MD_LEN];
        let program = self
            .ebpf
            .program(prog)
            .ok_or(DataplaneError::Missing(prog))?;
        let xdp = matches!(program, Program::Xdp(_));
        let mut opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        if xdp {
            opts.ctx_in = Some(&md_in);
            opts.ctx_out = Some(&mut md);
        }
        let res = match program {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => Err(ProgramError::UnexpectedProgramType),
        }
        .map_err(|source| DataplaneError::Program { name: prog, source })?;
        out.truncate((res.data_size_out as usize).min(out.len()));
        let meta_len = if xdp {
            (u32::from_ne_bytes([md[0], md[1], md[2], md[3]]) as usize).min(out.len())
        } else {
            0
        };
        let data = out.split_off(meta_len);
        let handoff = if out.len() >= std::mem::size_of::<ResolveMeta>() {
            // SAFETY: ResolveMeta is plain integers; read_unaligned copes with the
            // byte buffer's alignment.
            Some(unsafe { std::ptr::read_unaligned(out.as_ptr().cast::<ResolveMeta>()) })
        } else if xdp {
            self.take_handoff()?
        } else {
            None
        };
        Ok(RunResult {
            retval: res.return_value,
            data,
            handoff,
            meta: out,
            duration_ns: u64::try_from(res.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// Empties the `xlb_tc_handoff` slots and returns the one XDP filled, if any.
    fn take_handoff(&self) -> Result<Option<ResolveMeta>, DataplaneError> {
        let Some(map) = &self.tc_handoff else {
            return Ok(None);
        };
        // A poisoned lock only means another test thread panicked; the map is fine.
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let vals = map.get(&0, 0).map_err(map_err(names::TC_HANDOFF))?;
        let found = vals.iter().find(|h| h.meta.magic != 0).map(|h| h.meta);
        if found.is_some() {
            let empty = PerCpuValues::try_from(vec![TcHandoff::default(); self.ncpus])
                .map_err(DataplaneError::Cpus)?;
            map.set(0, empty, 0).map_err(map_err(names::TC_HANDOFF))?;
        }
        Ok(found)
    }

    /// Inserts (or replaces) table `table` holding backend id `slots[i]` in slot `i`,
    /// as the agent does (a fresh inner map).
    pub fn set_table(&mut self, table: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        let inner = new_table(slots)?;
        self.maglev
            .insert(table, &inner, 0)
            .map_err(map_err(names::MAGLEV))
    }

    /// Zeroes the traffic counters of a service id and backend ids, as the agent does
    /// for every id it allocates.
    pub fn create_counters(
        &mut self,
        service: u32,
        backends: &[u32],
    ) -> Result<(), DataplaneError> {
        let zero = || {
            PerCpuValues::try_from(vec![Counter::default(); self.ncpus])
                .map_err(DataplaneError::Cpus)
        };
        self.service_stats
            .set(service_slot(service), zero()?, 0)
            .map_err(map_err(names::SERVICE_STATS))?;
        for id in backends {
            self.backend_stats
                .set(backend_slot(*id), zero()?, 0)
                .map_err(map_err(names::BACKEND_STATS))?;
        }
        Ok(())
    }

    /// Programs service `id` (table `id * 2`) for `vip` with `backends` in slot order,
    /// encoded as the agent does ([`super::state`]); backend ids are
    /// `id * 100 + slot + 1`, and `flags` are `xlb_common::SVC_F_*`. Returns the ids.
    pub fn program(
        &mut self,
        id: u32,
        vip: &crate::desired::VipKey,
        backends: &[std::net::SocketAddr],
        flags: u32,
    ) -> Result<Vec<u32>, DataplaneError> {
        let table = id * 2;
        let mut ids = vec![];
        for (slot, sa) in backends.iter().enumerate() {
            let bid = id * 100 + slot as u32 + 1;
            self.backends
                .insert(bid, super::state::backend_value(sa), 0)
                .map_err(map_err(names::BACKENDS))?;
            ids.push(bid);
        }
        if !ids.is_empty() {
            self.set_table(table, &ids)?;
        }
        let svc = Service {
            id,
            table,
            count: backends.len() as u32,
            flags,
            affinity_secs: 0,
            pad: 0,
        };
        let key = super::state::service_key(vip)
            .v4()
            .ok_or(DataplaneError::Missing(
                "an IPv4 VIP (the test bed runs IPv4 only)",
            ))?;
        self.services
            .insert(key, svc, 0)
            .map_err(map_err(names::SERVICES4))?;
        self.create_counters(id, &ids)?;
        Ok(ids)
    }

    /// A service's traffic counter summed over CPUs.
    pub fn service_counter(&self, service: u32) -> Result<Option<Counter>, DataplaneError> {
        sum_counter(
            self.service_stats.get(&service_slot(service), 0),
            names::SERVICE_STATS,
        )
    }

    /// A backend's traffic counter summed over CPUs.
    pub fn backend_counter(&self, backend: u32) -> Result<Option<Counter>, DataplaneError> {
        sum_counter(
            self.backend_stats.get(&backend_slot(backend), 0),
            names::BACKEND_STATS,
        )
    }

    /// How many packets the programs counted for `reason`, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64, DataplaneError> {
        let per_cpu = self
            .reasons
            .get(&(reason as u32), 0)
            .map_err(map_err(names::REASONS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Sets the datapath event level (`xlb_common::datapath_log`); an object without
    /// events ignores it.
    pub fn set_datapath_log(&mut self, level: u64) -> Result<(), DataplaneError> {
        match &mut self.events {
            Some(e) => e
                .level
                .set(0, level, 0)
                .map_err(map_err(names::DATAPATH_LOG)),
            None => Ok(()),
        }
    }

    /// The datapath events logged since the last call, each `LEVEL target: message`.
    pub fn events(&mut self) -> Vec<String> {
        if let Some(e) = &mut self.events {
            e.log.flush();
        }
        std::mem::take(&mut *self.seen.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every reason's count, indexed by discriminant.
    pub fn reason_counts(&self) -> Result<Vec<u64>, DataplaneError> {
        Reason::ALL.iter().map(|r| self.reason_count(*r)).collect()
    }
}

impl Events {
    fn load(ebpf: &mut Ebpf, seen: &Collect) -> Result<Self, DataplaneError> {
        let level = take_map(ebpf, names::DATAPATH_LOG)?;
        let mut progs: aya::maps::ProgramArray<MapData> = take_map(ebpf, names::EVENT_PROGS)?;
        let fd = match ebpf.program(names::EVENTS_PROG) {
            Some(Program::Xdp(p)) => p.fd().map_err(|source| DataplaneError::Program {
                name: names::EVENTS_PROG,
                source,
            })?,
            _ => return Err(DataplaneError::Missing(names::EVENTS_PROG)),
        };
        progs.set(0, fd, 0).map_err(map_err(names::EVENT_PROGS))?;
        let log = aya_log::EbpfLogger::init_with_logger(ebpf, seen.clone())
            .map_err(|_| DataplaneError::Missing("AYA_LOGS"))?;
        Ok(Events {
            level,
            _progs: progs,
            log,
        })
    }
}

fn sum_counter(
    got: Result<PerCpuValues<Counter>, aya::maps::MapError>,
    map: &'static str,
) -> Result<Option<Counter>, DataplaneError> {
    match got {
        Ok(v) => Ok(Some(v.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err(map)(e)),
    }
}

/// The program names the object may contain, as `'static` for error messages.
fn static_name(name: &str) -> &'static str {
    [names::XDP_PROG, names::TC_EGRESS_PROG, BASELINE_PROG]
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("(unnamed program)")
}
