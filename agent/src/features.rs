//! The kernel features the datapath relies on, probed at start by asking the kernel
//! itself (never by its version: kernels are built with different options, and a
//! helper one build allows another refuses). Each probe loads a two-instruction
//! program that calls one helper, creates one small map, or makes one query, as
//! libbpf's `libbpf_probe_bpf_helper` does. A missing optional feature selects
//! another path when the programs load; a missing required one stops the agent
//! with a message naming it.
//!
//! | feature | used for | without it |
//! |---|---|---|
//! | `bpf_xdp_adjust_meta` in XDP | hand-off XDP -> TC ingress | per-CPU slot (`xlb_tc_handoff`) |
//! | tcx links (6.6+) | attaching TC programs | netlink: clsact + cls_bpf direct-action |
//! | managed neighbours (5.16+) | other nodes kept resolved | entries marked used every 5 s |
//!
//! Everything else listed in [`PROBES`] is required.
use std::{ffi::CStr, io, os::fd::FromRawFd};

use serde::Serialize;

/// A feature the agent may be told to do without (`xlb agent --force-fallback`), so
/// that tests exercise every fallback on any kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fallback {
    /// Hand packets from XDP to TC through the per-CPU slot, not XDP metadata.
    XdpMeta,
    /// Attach TC programs through netlink (cls_bpf), not tcx links.
    Tcx,
    /// Keep other nodes resolved by marking their entries used every few seconds,
    /// not as managed neighbour entries.
    ManagedNeigh,
    /// Read the conntrack map key by key in the agent's sweep, not in batches.
    MapBatch,
    /// Every fallback above.
    All,
}

/// What one probe asks the kernel.
#[derive(Clone, Copy, Debug)]
enum Ask {
    /// May a program of this type call this helper?
    Helper { prog_type: u32, helper: i32 },
    /// Can a map of this type be created?
    Map {
        map_type: u32,
        key: u32,
        value: u32,
        max_entries: u32,
        flags: u32,
    },
    /// Does `BPF_PROG_QUERY` know tcx ingress (kernel 6.6+)?
    Tcx,
    /// Does the kernel keep a neighbour entry flagged NTF_EXT_MANAGED (5.16+)?
    ManagedNeigh,
    /// Does `BPF_MAP_LOOKUP_BATCH` work on an LRU hash map (5.6+)?
    MapBatch,
}

/// One feature: what it is, how it is probed, what it serves and what replaces it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Short name, as in the metric label and `xlb inspect features`.
    pub name: &'static str,
    ask: Ask,
    /// What the datapath uses it for.
    pub used_for: &'static str,
    /// The path taken without it; `None`: required.
    pub fallback: Option<&'static str>,
}

// bpf(2) constants, include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_MAP_LOOKUP_BATCH`.
pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const PROG_SCHED_CLS: u32 = 3;
const PROG_XDP: u32 = 6;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LRU_HASH: u32 = 9;
const MAP_LPM_TRIE: u32 = 11;
const MAP_RINGBUF: u32 = 27;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_TCX_INGRESS: u32 = 46;

const fn helper(prog_type: u32, helper: i32) -> Ask {
    Ask::Helper { prog_type, helper }
}

/// Name of the XDP metadata feature.
pub const XDP_META: &str = "xdp_adjust_meta";
/// Name of the tcx feature.
pub const TCX: &str = "tcx";
/// Name of the managed neighbour feature.
pub const MANAGED_NEIGH: &str = "managed_neigh";
/// Name of the batched map read feature.
pub const MAP_BATCH: &str = "map_lookup_batch";
/// How often, without managed entries, the agent marks other nodes' entries used.
pub const NEIGH_USE_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Every probe, in the order reported.
pub const PROBES: &[Spec] = &[
    Spec {
        name: XDP_META,
        ask: helper(PROG_XDP, 54),
        used_for: "XDP hands packets to TC ingress in metadata",
        fallback: Some("per-CPU hand-off slot (xlb_tc_handoff)"),
    },
    Spec {
        name: TCX,
        ask: Ask::Tcx,
        used_for: "TC programs attached as tcx links",
        fallback: Some("netlink: clsact qdisc, cls_bpf direct-action filter"),
    },
    Spec {
        name: MANAGED_NEIGH,
        ask: Ask::ManagedNeigh,
        used_for: "other nodes kept resolved for XDP's FIB lookup (managed neighbour entries)",
        fallback: Some("each entry marked used (NTF_USE) every 5 s, so the kernel re-resolves it"),
    },
    Spec {
        name: MAP_BATCH,
        ask: Ask::MapBatch,
        used_for: "the agent's conntrack sweep reads thousands of entries per syscall",
        fallback: Some("entries read key by key (two syscalls each)"),
    },
    Spec {
        name: "xdp_adjust_head",
        ask: helper(PROG_XDP, 44),
        used_for: "IPIP encapsulation and decapsulation in XDP",
        fallback: None,
    },
    Spec {
        name: "xdp_adjust_tail",
        ask: helper(PROG_XDP, 65),
        used_for: "ICMP fragmentation-needed built in XDP",
        fallback: None,
    },
    Spec {
        name: "xdp_fib_lookup",
        ask: helper(PROG_XDP, 69),
        used_for: "next hop of encapsulated and redirected packets",
        fallback: None,
    },
    Spec {
        name: "xdp_redirect",
        ask: helper(PROG_XDP, 23),
        used_for: "sending encapsulated packets out of another device",
        fallback: None,
    },
    Spec {
        name: "xdp_tail_call",
        ask: helper(PROG_XDP, 12),
        used_for: "SNAT programs and datapath events",
        fallback: None,
    },
    Spec {
        name: "tc_fib_lookup",
        ask: helper(PROG_SCHED_CLS, 69),
        used_for: "delivery into pods from TC ingress",
        fallback: None,
    },
    Spec {
        name: "tc_redirect_peer",
        ask: helper(PROG_SCHED_CLS, 155),
        used_for: "delivery into a pod's namespace without the forwarding path",
        fallback: None,
    },
    Spec {
        name: "tc_redirect_neigh",
        ask: helper(PROG_SCHED_CLS, 152),
        used_for: "sending to a next hop not resolved yet",
        fallback: None,
    },
    Spec {
        name: "tc_adjust_room",
        ask: helper(PROG_SCHED_CLS, 50),
        used_for: "IPIP encapsulation of GSO aggregates in TC",
        fallback: None,
    },
    Spec {
        name: "map_lru_hash",
        ask: Ask::Map {
            map_type: MAP_LRU_HASH,
            key: 4,
            value: 4,
            max_entries: 1,
            flags: 0,
        },
        used_for: "connection tracking, reverse NAT, affinity",
        fallback: None,
    },
    Spec {
        name: "map_percpu_array",
        ask: Ask::Map {
            map_type: MAP_PERCPU_ARRAY,
            key: 4,
            value: 4,
            max_entries: 1,
            flags: 0,
        },
        used_for: "counters and per-CPU hand-offs",
        fallback: None,
    },
    Spec {
        name: "map_lpm_trie",
        ask: Ask::Map {
            map_type: MAP_LPM_TRIE,
            key: 8,
            value: 1,
            max_entries: 1,
            flags: BPF_F_NO_PREALLOC,
        },
        used_for: "loadBalancerSourceRanges",
        fallback: None,
    },
    Spec {
        name: "map_ringbuf",
        ask: Ask::Map {
            map_type: MAP_RINGBUF,
            key: 0,
            value: 0,
            max_entries: 4096,
            flags: 0,
        },
        used_for: "datapath events (aya-log)",
        fallback: None,
    },
];

/// What one probe found.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Found {
    /// [`Spec::name`].
    pub name: &'static str,
    /// The kernel offers it.
    pub available: bool,
    /// The agent uses it (available and not forced off).
    pub used: bool,
    /// What it is for.
    pub used_for: &'static str,
    /// The path taken without it (`None`: required).
    pub fallback: Option<&'static str>,
    /// What the kernel said, when it said no (or the probe failed).
    pub detail: String,
}

/// The probed features of this kernel.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Features {
    /// `uname -r`.
    pub kernel: String,
    /// One entry per [`PROBES`] item.
    pub found: Vec<Found>,
}

/// Probing failed in a way that says nothing about the kernel (no privilege).
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The bpf(2) call itself was refused (not root / no CAP_BPF, or seccomp).
    #[error("probing kernel features with bpf(2): {0} (the agent needs CAP_BPF and CAP_NET_ADMIN)")]
    Bpf(io::Error),
    /// A required feature is missing.
    #[error("this kernel lacks {name} ({used_for}), which xlb requires: {detail}")]
    Required {
        /// Feature name.
        name: &'static str,
        /// What it is for.
        used_for: &'static str,
        /// What the kernel said.
        detail: String,
    },
}

impl Features {
    /// Probes every feature in [`PROBES`]; `force` switches fallbacks on as if the
    /// feature were missing.
    pub fn probe(force: &[Fallback]) -> Result<Self, FeatureError> {
        let forced = |name: &str| {
            force.iter().any(|f| match f {
                Fallback::All => true,
                Fallback::XdpMeta => name == XDP_META,
                Fallback::Tcx => name == TCX,
                Fallback::ManagedNeigh => name == MANAGED_NEIGH,
                Fallback::MapBatch => name == MAP_BATCH,
            })
        };
        let mut found = Vec::with_capacity(PROBES.len());
        for spec in PROBES {
            let (available, detail) = match ask(spec.ask) {
                Ok(None) => (true, String::new()),
                Ok(Some(why)) => (false, why),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(FeatureError::Bpf(e));
                }
                Err(e) => (false, e.to_string()),
            };
            let detail = if available && forced(spec.name) {
                "forced off (--force-fallback)".to_string()
            } else {
                detail
            };
            found.push(Found {
                name: spec.name,
                available,
                used: available && !forced(spec.name),
                used_for: spec.used_for,
                fallback: spec.fallback,
                detail,
            });
        }
        Ok(Features {
            kernel: kernel_release(),
            found,
        })
    }

    /// Whether `name` is used.
    pub fn uses(&self, name: &str) -> bool {
        self.found.iter().any(|f| f.name == name && f.used)
    }

    /// XDP may put metadata in front of a frame.
    pub fn xdp_meta(&self) -> bool {
        self.uses(XDP_META)
    }

    /// TC programs attach as tcx links.
    pub fn tcx(&self) -> bool {
        self.uses(TCX)
    }

    /// Other nodes are kept as managed neighbour entries.
    pub fn managed_neigh(&self) -> bool {
        self.uses(MANAGED_NEIGH)
    }

    /// The conntrack sweep reads the map in batches.
    pub fn map_batch(&self) -> bool {
        self.uses(MAP_BATCH)
    }

    /// The first required feature the kernel lacks.
    pub fn check_required(&self) -> Result<(), FeatureError> {
        match self
            .found
            .iter()
            .find(|f| f.fallback.is_none() && !f.available)
        {
            Some(f) => Err(FeatureError::Required {
                name: f.name,
                used_for: f.used_for,
                detail: f.detail.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The fallbacks in use, as `feature: fallback (why)`.
    pub fn fallbacks(&self) -> Vec<String> {
        self.found
            .iter()
            .filter(|f| !f.used)
            .filter_map(|f| {
                f.fallback
                    .map(|fb| format!("{}: {fb} ({})", f.name, f.detail))
            })
            .collect()
    }
}

/// `uname -r`, or `unknown`.
pub fn kernel_release() -> String {
    // SAFETY: all-zero is a valid utsname (byte arrays).
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid utsname to fill.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".to_string();
    }
    // SAFETY: uname NUL-terminates the field.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `Ok(None)`: available. `Ok(Some(why))`: the kernel said no. `Err`: the probe could
/// not be made.
fn ask(a: Ask) -> io::Result<Option<String>> {
    match a {
        Ask::Helper { prog_type, helper } => probe_helper(prog_type, helper),
        Ask::Map {
            map_type,
            key,
            value,
            max_entries,
            flags,
        } => probe_map(map_type, key, value, max_entries, flags),
        Ask::Tcx => probe_tcx(),
        Ask::ManagedNeigh => probe_managed_neigh(),
        Ask::MapBatch => probe_map_batch(),
    }
}

/// Creates an empty one-entry LRU hash map and reads it in a batch: a kernel with
/// batched reads answers ENOENT (nothing left to read), one without EINVAL.
fn probe_map_batch() -> io::Result<Option<String>> {
    let mut attr = MapCreateAttr {
        map_type: MAP_LRU_HASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    let fd = match bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Err(e),
        Err(e) => return Ok(Some(format!("map creation refused: {e}"))),
    };
    // SAFETY: the kernel just gave us this fd, and nothing else owns it.
    let map = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let (mut keys, mut values, mut token) = ([0u32; 1], [0u32; 1], [0u64; 1]);
    let mut batch = BatchAttr {
        out_batch: token.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: 1,
        map_fd: std::os::fd::AsRawFd::as_raw_fd(&map) as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut batch) {
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e),
        Err(e) => Ok(Some(format!("BPF_MAP_LOOKUP_BATCH: {e}"))),
    }
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (`batch` in the uapi union).
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    /// Where to resume (null: from the start).
    pub in_batch: u64,
    /// Where the kernel writes the resume token.
    pub out_batch: u64,
    /// Key buffer, `count` keys.
    pub keys: u64,
    /// Value buffer, `count` values.
    pub values: u64,
    /// In: buffer capacity in elements; out: elements written.
    pub count: u32,
    /// The map.
    pub map_fd: u32,
    /// Per-element flags.
    pub elem_flags: u64,
    /// Command flags.
    pub flags: u64,
}

/// bpf(2) with `attr`, for the batched reads of the conntrack sweep.
pub(crate) fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<i32> {
    bpf(cmd, attr)
}

/// Adds a managed entry on `lo` in a network namespace of its own (a thread's, gone
/// with the thread: nothing on the node changes) and reads it back: a kernel that
/// does not know NTF_EXT_MANAGED accepts the request but keeps a plain entry.
fn probe_managed_neigh() -> io::Result<Option<String>> {
    let addr = std::net::Ipv4Addr::new(127, 51, 0, 1);
    let probe = std::thread::Builder::new()
        .name("xlb-probe-neigh".into())
        .spawn(move || -> io::Result<Option<String>> {
            // SAFETY: unshare affects only this thread, which exits right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Ok(Some(format!("could not probe (unshare: {e})")));
            }
            let other = |e: crate::netdev::NetdevError| io::Error::other(e.to_string());
            crate::netdev::add_managed_neighbour("lo", addr).map_err(other)?;
            // A loopback device's entries are all keyed 0.0.0.0 (include/net/arp.h,
            // __ipv4_neigh_lookup_noref), whatever address was asked for.
            let key = std::net::Ipv4Addr::UNSPECIFIED;
            Ok(
                match crate::netdev::neighbour_is_managed("lo", key).map_err(other)? {
                    Some(true) => None,
                    Some(false) => {
                        Some("the kernel keeps the entry but not its managed flag".into())
                    }
                    None => Some("the managed entry was not kept".into()),
                },
            )
        })?;
    probe
        .join()
        .map_err(|_| io::Error::other("the probe thread panicked"))?
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: attr is a bpf_attr prefix of its own size that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// [`bpf`] for a call that returns a new fd (a program or map), closed at once:
/// only whether the kernel made it matters.
fn bpf_made<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel just gave us this fd, and nothing else owns it.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Loads `call helper; exit` as `prog_type`. The verifier names a helper it does not
/// offer ("invalid func", "unknown func", "program of this type cannot use helper");
/// any other refusal (here: arguments left unset) means the helper itself exists.
fn probe_helper(prog_type: u32, helper: i32) -> io::Result<Option<String>> {
    // BPF_JMP | BPF_CALL with imm = helper id; then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0x85 | ((helper as u32 as u64) << 32), 0x95];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf_made(BPF_PROG_LOAD, &mut attr) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e),
        Err(_) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let refused = [
                "invalid func ",
                "unknown func ",
                "program of this type cannot use helper ",
            ];
            Ok(text
                .lines()
                .find(|l| refused.iter().any(|r| l.contains(r)))
                .map(|l| l.trim().to_string()))
        }
    }
}

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn probe_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> io::Result<Option<String>> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
    };
    match bpf_made(BPF_MAP_CREATE, &mut attr) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e),
        Err(e) => Ok(Some(format!("map creation refused: {e}"))),
    }
}

/// `union bpf_attr` for `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
}

/// Queries the tcx ingress programs of the loopback device (index 1 in every network
/// namespace): a kernel without tcx does not know the attach type (EINVAL).
fn probe_tcx() -> io::Result<Option<String>> {
    let mut attr = QueryAttr {
        target_ifindex: 1,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    match bpf(BPF_PROG_QUERY, &mut attr) {
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e),
        Err(e) => Ok(Some(format!("BPF_PROG_QUERY for BPF_TCX_INGRESS: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, as the agent does: the probes answer on the kernel under test, and
    /// the kernel's own answer for one helper every supported kernel has must be yes.
    #[test]
    fn probes_answer_and_forcing_switches_fallbacks() {
        let f = Features::probe(&[]).expect("probing needs root");
        assert_eq!(f.found.len(), PROBES.len());
        assert!(f.uses("xdp_adjust_head"), "{f:#?}");
        f.check_required().expect("this kernel runs xlb");
        let forced = Features::probe(&[Fallback::All]).expect("probe");
        assert!(
            !forced.xdp_meta() && !forced.tcx() && !forced.managed_neigh() && !forced.map_batch()
        );
        assert!(
            f.map_batch(),
            "every supported kernel (5.6+) reads maps in batches: {f:#?}"
        );
        let fb = forced.fallbacks();
        let optional = PROBES.iter().filter(|p| p.fallback.is_some()).count();
        assert_eq!(fb.len(), optional, "{fb:?}");
        let one = Features::probe(&[Fallback::ManagedNeigh]).expect("probe");
        assert!(!one.managed_neigh());
        assert_eq!(one.tcx(), f.tcx(), "forcing one fallback leaves the others");
    }

    /// A helper id no kernel has is reported missing, by the verifier's own words.
    #[test]
    fn an_unknown_helper_is_missing() {
        let why = probe_helper(PROG_XDP, 100_000)
            .expect("probe")
            .expect("missing");
        assert!(why.contains("func"), "{why}");
    }
}
