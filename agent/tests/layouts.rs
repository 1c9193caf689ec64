//! The kernel and the agent agree on every map layout: the key and value sizes the
//! kernel created the maps with (from the eBPF object's BTF, compiled for bpfel) equal
//! the sizes of the shared Rust types as compiled for this host. Needs root (loads the
//! object; nothing is attached or pinned).
use aya::maps::{Map, MapData};
use xlb::dataplane::layout::LAYOUTS;
use xlb_common::names;

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
    assert_eq!(LAYOUTS.len(), names::ALL_MAPS.len(), "every map is checked");
    for l in LAYOUTS {
        assert!(
            names::ALL_MAPS.contains(&l.name),
            "{} is in ALL_MAPS",
            l.name
        );
        let map = ebpf
            .map(l.name)
            .unwrap_or_else(|| panic!("object has no map {}", l.name));
        let info = data(map).info().expect("map info");
        assert_eq!(info.map_type().unwrap(), l.kind, "{}: type", l.name);
        assert_eq!(info.key_size() as usize, l.key, "{}: key size", l.name);
        assert_eq!(
            info.value_size() as usize,
            l.value,
            "{}: value size",
            l.name
        );
        assert_eq!(info.max_entries(), l.max_entries, "{}: max entries", l.name);
    }
}
