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
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Program, ProgramError, TestRun, TestRunOptions},
};
use xlb_common::{Backend, CtEntry, FlowKey, Reason, Service, ServiceKey, SlotKey, names};

use super::{DataplaneError, OBJECT, map_err};

/// The XDP program that returns `XDP_PASS` and nothing else: what any XDP program
/// costs at least, measured the same way as `xlb_xdp`. Never attached.
pub const BASELINE_PROG: &str = "xlb_baseline_pass";

/// Largest frame the kernel's test run accepts is one page minus head- and tailroom;
/// output buffers of this size always suffice.
const OUT_BUF: usize = 4096;

/// The loaded object with its own maps, ready to run programs on packets.
pub struct TestBed {
    ebpf: Ebpf,
    /// `xlb_services`: VIP:port:proto -> service.
    pub services: HashMap<MapData, ServiceKey, Service>,
    /// `xlb_slots`: (table, slot) -> backend id.
    pub slots: HashMap<MapData, SlotKey, u32>,
    /// `xlb_backends`: backend id -> address.
    pub backends: HashMap<MapData, u32, Backend>,
    /// `xlb_conntrack` (LRU): client flow -> chosen backend.
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    reasons: PerCpuArray<MapData, u64>,
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value (for XDP an `xdp_action`, e.g. 2 = `XDP_PASS`).
    pub retval: u32,
    /// The packet as the program left it (after the last repetition).
    pub data: Vec<u8>,
    /// Average time per repetition as the kernel measured it, in nanoseconds.
    pub duration_ns: u64,
}

impl TestBed {
    /// Loads the embedded object with fresh, unpinned maps and loads (verifies) every
    /// program in it. Needs CAP_BPF (root).
    pub fn load() -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
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
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::Missing(name));
        let services =
            HashMap::try_from(take(names::SERVICES)?).map_err(map_err(names::SERVICES))?;
        let slots = HashMap::try_from(take(names::SLOTS)?).map_err(map_err(names::SLOTS))?;
        let backends =
            HashMap::try_from(take(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        let conntrack =
            HashMap::try_from(take(names::CONNTRACK)?).map_err(map_err(names::CONNTRACK))?;
        let reasons =
            PerCpuArray::try_from(take(names::REASONS)?).map_err(map_err(names::REASONS))?;
        Ok(TestBed {
            ebpf,
            services,
            slots,
            backends,
            conntrack,
            reasons,
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
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let program = self
            .ebpf
            .program(prog)
            .ok_or(DataplaneError::Missing(prog))?;
        let res = match program {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => Err(ProgramError::UnexpectedProgramType),
        }
        .map_err(|source| DataplaneError::Program { name: prog, source })?;
        out.truncate((res.data_size_out as usize).min(out.len()));
        Ok(RunResult {
            retval: res.return_value,
            data: out,
            duration_ns: u64::try_from(res.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// How many packets the programs counted for `reason`, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64, DataplaneError> {
        let per_cpu = self
            .reasons
            .get(&(reason as u32), 0)
            .map_err(map_err(names::REASONS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Every reason's count, indexed by discriminant.
    pub fn reason_counts(&self) -> Result<Vec<u64>, DataplaneError> {
        Reason::ALL.iter().map(|r| self.reason_count(*r)).collect()
    }
}

/// The program names the object may contain, as `'static` for error messages.
fn static_name(name: &str) -> &'static str {
    [names::XDP_PROG, names::TC_EGRESS_PROG, BASELINE_PROG]
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("(unnamed program)")
}
