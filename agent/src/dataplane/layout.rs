//! Every map's kind and sizes as the agent expects them, in one table: checked
//! against the eBPF object by the `layouts` test, and against pinned maps before the
//! programs load, so that a map an older agent pinned with another layout is
//! replaced instead of making the new programs fail to load (aya reuses a pin by
//! name without comparing it; the verifier then refuses the program, or worse,
//! accepts keys of the wrong size).
use std::{io, mem::size_of, path::Path};

use aya::maps::{MapInfo, MapType};
use xlb_common::{
    Affinity, AffinityKey, Backend, BackendKey4, Counter, CtEntry, FlowKey4, Handoff, L2Vip, Owner,
    Reason, RevNat, Service, ServiceKey4, ServiceKey6, SnatRev, SourceRange, TcHandoff, config,
    datapath_log, limits, names,
};

/// One map as the programs define it.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Pin (and object) name.
    pub name: &'static str,
    /// Kernel map type.
    pub kind: MapType,
    /// Key size in bytes.
    pub key: usize,
    /// Value size in bytes.
    pub value: usize,
    /// Capacity in the object (`--conntrack-size` overrides the conntrack maps').
    pub max_entries: u32,
}

const U32: usize = size_of::<u32>();

const fn layout(
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    max_entries: u32,
) -> Layout {
    Layout {
        name,
        kind,
        key,
        value,
        max_entries,
    }
}

/// Every map in `names::ALL_MAPS`, with its layout.
pub const LAYOUTS: [Layout; names::ALL_MAPS.len()] = [
    layout(
        names::SERVICES4,
        MapType::Hash,
        size_of::<ServiceKey4>(),
        size_of::<Service>(),
        limits::MAX_SERVICES,
    ),
    layout(
        names::SERVICES6,
        MapType::Hash,
        size_of::<ServiceKey6>(),
        size_of::<Service>(),
        limits::MAX_SERVICES,
    ),
    layout(
        names::MAGLEV,
        MapType::HashOfMaps,
        U32,
        U32,
        limits::MAX_TABLES,
    ),
    layout(
        names::BACKENDS,
        MapType::Hash,
        U32,
        size_of::<Backend>(),
        limits::MAX_BACKENDS,
    ),
    layout(
        names::CONNTRACK4,
        MapType::LruHash,
        size_of::<FlowKey4>(),
        size_of::<CtEntry>(),
        limits::CONNTRACK_ENTRIES,
    ),
    layout(
        names::REVNAT4,
        MapType::LruHash,
        size_of::<FlowKey4>(),
        size_of::<RevNat>(),
        limits::CONNTRACK_ENTRIES,
    ),
    layout(
        names::SERVICE_STATS,
        MapType::PerCpuArray,
        U32,
        size_of::<Counter>(),
        limits::MAX_SERVICES,
    ),
    layout(
        names::BACKEND_STATS,
        MapType::PerCpuArray,
        U32,
        size_of::<Counter>(),
        limits::MAX_BACKENDS,
    ),
    layout(
        names::REASONS,
        MapType::PerCpuArray,
        U32,
        size_of::<u64>(),
        Reason::COUNT,
    ),
    layout(
        names::CONFIG,
        MapType::Array,
        U32,
        size_of::<u64>(),
        config::LEN,
    ),
    // LPM keys are the 32-bit prefix length followed by the data.
    layout(
        names::SOURCE_RANGES,
        MapType::LpmTrie,
        U32 + size_of::<SourceRange>(),
        1,
        limits::MAX_SOURCE_RANGES,
    ),
    layout(
        names::AFFINITY,
        MapType::LruHash,
        size_of::<AffinityKey>(),
        size_of::<Affinity>(),
        limits::AFFINITY_ENTRIES,
    ),
    layout(
        names::SNAT4,
        MapType::LruHash,
        size_of::<FlowKey4>(),
        size_of::<SnatRev>(),
        limits::CONNTRACK_ENTRIES,
    ),
    layout(
        names::PROGS,
        MapType::ProgramArray,
        U32,
        U32,
        names::TAIL_PROGS.len() as u32,
    ),
    layout(
        names::HANDOFF,
        MapType::PerCpuArray,
        U32,
        size_of::<Handoff>(),
        1,
    ),
    layout(
        names::OWNERS,
        MapType::Hash,
        U32,
        size_of::<Owner>(),
        limits::MAX_SERVICES,
    ),
    layout(
        names::PEER_DEVS,
        MapType::Hash,
        U32,
        U32,
        limits::MAX_PEER_DEVS,
    ),
    layout(
        names::REVHINT4,
        MapType::Hash,
        size_of::<BackendKey4>(),
        size_of::<RevNat>(),
        limits::MAX_BACKENDS,
    ),
    layout(
        names::L2_VIPS4,
        MapType::Hash,
        U32,
        size_of::<L2Vip>(),
        limits::MAX_L2_VIPS,
    ),
    layout(
        names::L2_STATS4,
        MapType::PerCpuHash,
        U32,
        size_of::<u64>(),
        limits::MAX_L2_VIPS,
    ),
    layout(
        names::DATAPATH_LOG,
        MapType::Array,
        U32,
        size_of::<u64>(),
        1,
    ),
    layout(
        names::LOG_LIMIT,
        MapType::PerCpuArray,
        U32,
        size_of::<u64>(),
        datapath_log::LIMIT_SLOTS,
    ),
    layout(names::EVENT_PROGS, MapType::ProgramArray, U32, U32, 1),
    layout(
        names::TC_HANDOFF,
        MapType::PerCpuArray,
        U32,
        size_of::<TcHandoff>(),
        1,
    ),
    layout(
        names::PROGS_TC,
        MapType::ProgramArray,
        U32,
        U32,
        names::TC_TAIL_PROGS.len() as u32,
    ),
];

/// Pins of maps older agents made that no program uses any more (renamed when their
/// layout changed); removed once the new programs are attached.
pub const RETIRED: [&str; 4] = ["xlb_services", "xlb_conntrack", "xlb_revnat", "xlb_snat"];

/// Whether a pinned map matches `l` (type, key and value size; capacity may differ).
fn matches(info: &MapInfo, l: &Layout) -> bool {
    matches!(info.map_type(), Ok(t) if t == l.kind)
        && info.key_size() as usize == l.key
        && info.value_size() as usize == l.value
}

/// Unpins every map under `pin_path` whose layout is not the one these programs use,
/// so loading creates it afresh (its contents are lost: counters restart, tracked
/// flows pick a backend again). Returns the names replaced. Only a map the kernel
/// describes, with another layout, is replaced: a pin that cannot be opened or
/// described (no file descriptors left, no memory) is an error, never a reason to
/// throw a live map away.
pub fn unpin_incompatible(pin_path: &Path) -> io::Result<Vec<&'static str>> {
    let mut replaced = Vec::new();
    for l in &LAYOUTS {
        let path = pin_path.join(l.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| {
            io::Error::other(format!(
                "reading the pinned map {} to check its layout: {e}",
                path.display()
            ))
        })?;
        if !matches(&info, l) {
            std::fs::remove_file(&path)?;
            replaced.push(l.name);
        }
    }
    Ok(replaced)
}

/// Removes the pins in [`RETIRED`] (absent ones are fine); returns those removed.
pub fn unpin_retired(pin_path: &Path) -> io::Result<Vec<&'static str>> {
    let mut removed = Vec::new();
    for name in RETIRED {
        match std::fs::remove_file(pin_path.join(name)) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Kernel-accounted memory of each pinned map in [`LAYOUTS`] (the `memlock:` line of
/// its fdinfo, what `bpftool map show` prints as memlock), for `xlb_map_memory_bytes`.
/// Maps that cannot be opened are left out.
pub fn pinned_memory(pin_path: &Path) -> Vec<(&'static str, u64)> {
    use std::os::fd::{AsFd, AsRawFd};
    LAYOUTS
        .iter()
        .filter_map(|l| {
            let map = aya::maps::MapData::from_pin(pin_path.join(l.name)).ok()?;
            let fd = map.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let bytes = info
                .lines()
                .find_map(|line| line.strip_prefix("memlock:"))?
                .trim()
                .parse()
                .ok()?;
            Some((l.name, bytes))
        })
        .collect()
}

/// Memory of the inner Maglev tables (they hang off `xlb_maglev`, unpinned), from
/// their slot counts as the kernel sizes mmapable arrays: a page for the map, and the
/// slot pairs rounded up to whole pages (kernel `array_map_alloc`).
pub fn tables_memory(slot_counts: impl IntoIterator<Item = usize>) -> u64 {
    const PAGE: u64 = 4096;
    slot_counts
        .into_iter()
        .map(|slots| {
            let data = (slots.div_ceil(2) as u64) * size_of::<xlb_common::SlotPair>() as u64;
            PAGE + data.div_ceil(PAGE) * PAGE
        })
        .sum()
}
