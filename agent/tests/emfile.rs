//! With no file descriptor left (issue 31, finding 2: idle connections to the metrics
//! port ate the agent's 1,024), a failed question is an error, never an answer: the
//! layout check does not take it for "older layout" and replace a pinned map, the
//! interface lookup does not take it for "gone", the link check not for "down". One
//! test in its own binary, because it lowers the whole process's open-files limit.
//! Needs root (bpffs).
use std::path::PathBuf;

use xlb::dataplane::layout::{LAYOUTS, unpin_incompatible};

/// Lowers the soft open-files limit just above the highest descriptor open now (so
/// [`fill`] stops soon); puts the limit back when dropped.
struct Exhausted(libc::rlimit);

impl Exhausted {
    /// (`expect`: a test helper; any failure here is the test's own.)
    #[allow(clippy::unwrap_used, clippy::expect_used)]
    fn now() -> Exhausted {
        // SAFETY: all-zero is a valid rlimit; getrlimit/setrlimit touch only it.
        let mut old: libc::rlimit = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u64>().ok())
            .max()
            .unwrap_or(3);
        let lim = libc::rlimit {
            rlim_cur: highest + 1,
            rlim_max: old.rlim_max,
        };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        Exhausted(old)
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}

/// Fills every descriptor number below the limit, so none is free.
#[allow(clippy::unwrap_used, clippy::expect_used)]
fn fill() -> Vec<std::fs::File> {
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
        assert!(held.len() < 100_000, "the limit did not bite");
    }
    held
}

#[test]
fn without_file_descriptors_nothing_is_taken_for_gone_down_or_older() {
    // A real pinned map with the layout the programs use.
    let dir = PathBuf::from(format!("/sys/fs/bpf/xlbt-emfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ebpf = aya::EbpfLoader::new()
        .load(xlb::dataplane::object())
        .expect("load the embedded eBPF object (root needed)");
    let name = LAYOUTS[0].name;
    ebpf.map_mut(name)
        .expect("the object has the map")
        .pin(dir.join(name))
        .expect("pin it");
    assert!(unpin_incompatible(&dir).expect("layout check").is_empty());

    let (layout, ifindex, link) = {
        let _limit = Exhausted::now();
        let _held = fill();
        (
            unpin_incompatible(&dir),
            xlb::netdev::lookup_ifindex("lo"),
            xlb::l2::announce::link_up("lo"),
        )
    };
    let pinned = dir.join(name).exists();
    let _ = std::fs::remove_file(dir.join(name));
    let _ = std::fs::remove_dir(&dir);

    let e = layout.expect_err("the layout check answered without a descriptor");
    assert!(e.to_string().contains(name), "the error names the map: {e}");
    assert!(
        pinned,
        "the pinned map was replaced for want of a descriptor"
    );
    assert!(
        ifindex.is_err(),
        "the interface lookup answered {ifindex:?} without a descriptor"
    );
    assert!(
        link.is_err(),
        "the link check answered {link:?} without a descriptor"
    );
    // With descriptors again, the same questions have their real answers.
    assert!(xlb::netdev::lookup_ifindex("lo").unwrap().is_some());
    assert_eq!(xlb::netdev::lookup_ifindex("nope0").unwrap(), None);
}
