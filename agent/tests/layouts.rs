//! The kernel and the agent agree on every map layout: the key and value sizes the
//! kernel created the maps with (from the eBPF object's BTF, compiled for bpfel) equal
//! the sizes of the shared Rust types as compiled for this host. Needs root (loads the
//! object; nothing is attached or pinned).
use std::mem::size_of;

use aya::maps::{Map, MapData};
use xlb_common::{
    Affinity, AffinityKey, Backend, Counter, CtEntry, FlowKey, Handoff, Reason, RevNat, Service,
    ServiceKey, SnatRev, SourceRange, config, limits, names,
};

fn data(m: &Map) -> &MapData {
    match m {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuArray(d)
        | Map::Array(d)
        | Map::HashOfMaps(d)
        | Map::LpmTrie(d)
        | Map::ProgramArray(d) => d,
        other => panic!("unexpected map type {other:?}"),
    }
}

#[test]
fn kernel_and_agent_agree_on_map_layouts() {
    let ebpf = aya::EbpfLoader::new()
        .load(xlb::dataplane::object())
        .expect("load the embedded eBPF object (root needed)");
    let u32s = size_of::<u32>();
    // (map, key size, value size, max entries)
    let expected = [
        (
            names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            limits::MAX_SERVICES,
        ),
        (names::MAGLEV, u32s, u32s, limits::MAX_TABLES),
        (
            names::BACKENDS,
            u32s,
            size_of::<Backend>(),
            limits::MAX_BACKENDS,
        ),
        (
            names::CONNTRACK,
            size_of::<FlowKey>(),
            size_of::<CtEntry>(),
            limits::CONNTRACK_ENTRIES,
        ),
        (
            names::REVNAT,
            size_of::<FlowKey>(),
            size_of::<RevNat>(),
            limits::CONNTRACK_ENTRIES,
        ),
        (
            names::SERVICE_STATS,
            u32s,
            size_of::<Counter>(),
            limits::MAX_SERVICES,
        ),
        (
            names::BACKEND_STATS,
            u32s,
            size_of::<Counter>(),
            limits::MAX_BACKENDS,
        ),
        (names::REASONS, u32s, size_of::<u64>(), Reason::COUNT),
        (names::CONFIG, u32s, size_of::<u64>(), config::LEN),
        // LPM keys are the 32-bit prefix length followed by the data.
        (
            names::SOURCE_RANGES,
            u32s + size_of::<SourceRange>(),
            1,
            limits::MAX_SOURCE_RANGES,
        ),
        (
            names::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
            limits::AFFINITY_ENTRIES,
        ),
        (
            names::SNAT,
            size_of::<FlowKey>(),
            size_of::<SnatRev>(),
            limits::CONNTRACK_ENTRIES,
        ),
        (names::PROGS, u32s, u32s, names::TAIL_PROGS.len() as u32),
        (names::HANDOFF, u32s, size_of::<Handoff>(), 1),
        (
            names::OWNERS,
            u32s,
            size_of::<xlb_common::Owner>(),
            limits::MAX_SERVICES,
        ),
    ];
    assert_eq!(
        expected.len(),
        names::ALL_MAPS.len(),
        "every map is checked"
    );
    for (name, key, value, max) in expected {
        let map = ebpf
            .map(name)
            .unwrap_or_else(|| panic!("object has no map {name}"));
        let info = data(map).info().expect("map info");
        assert_eq!(info.key_size() as usize, key, "{name}: key size");
        assert_eq!(info.value_size() as usize, value, "{name}: value size");
        assert_eq!(info.max_entries(), max, "{name}: max entries");
    }
}
