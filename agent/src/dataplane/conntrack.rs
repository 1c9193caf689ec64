//! Removing expired connection-tracking state, and counting what is left, off the
//! scrape path.
//!
//! The LRU map evicts only when full, so without a sweep an idle node keeps every
//! flow it ever saw, and counting them on each scrape costs one syscall per entry.
//! The sweeper runs on its own thread at a fixed period: it deletes entries whose
//! expiry (CLOCK_MONOTONIC, which the datapath reads coarsely) has passed, with the reverse-NAT
//! entry they created, and publishes the count for `/metrics` to read in O(1).
//!
//! A full map holds 262,144 entries; read key by key that is two syscalls per entry
//! (about half a CPU-second per sweep here), so the sweep reads it with
//! `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+), thousands of entries per syscall, where the
//! feature probe found it.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, IterableMap, Map, MapData};
use xlb_common::{BACKEND_F_REMOTE, CtEntry, FlowKey4, RevNat, names};

use super::{DataplaneError, map_err};

/// What the last sweep found, shared with the metrics collector.
#[derive(Debug, Default)]
pub struct CtCounts {
    /// Entries present after the last sweep.
    pub present: AtomicU64,
    /// Expired entries removed by sweeps since the agent started.
    pub expired: AtomicU64,
    /// Sweeps completed.
    pub sweeps: AtomicU64,
    /// How long the last sweep took, in ns.
    pub last_sweep_ns: AtomicU64,
}

/// Entries one batched read asks for. Larger than any hash bucket, which the kernel
/// requires (a bucket that does not fit fails the read with ENOSPC).
const BATCH: usize = 4096;

/// Handles on the pinned conntrack and reverse-NAT maps.
pub struct Sweeper {
    conntrack: HashMap<MapData, FlowKey4, CtEntry>,
    revnat: HashMap<MapData, FlowKey4, RevNat>,
}

impl Sweeper {
    /// Opens the pinned maps under `pin_path`.
    pub fn open(pin_path: &Path) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| {
            MapData::from_pin(pin_path.join(name))
                .map(Map::LruHashMap)
                .map_err(map_err(name))
        };
        Ok(Sweeper {
            conntrack: HashMap::try_from(open(names::CONNTRACK4)?)
                .map_err(map_err(names::CONNTRACK4))?,
            revnat: HashMap::try_from(open(names::REVNAT4)?).map_err(map_err(names::REVNAT4))?,
        })
    }

    /// Calls `f` for every conntrack entry, read in batches of [`BATCH`]. The kernel
    /// walks its buckets in order (`__htab_map_lookup_and_delete_batch`), so entries
    /// the datapath adds or evicts meanwhile are seen at most once.
    fn walk_batched(&self, mut f: impl FnMut(FlowKey4, CtEntry)) -> io::Result<()> {
        use crate::features::{BPF_MAP_LOOKUP_BATCH, BatchAttr, bpf_batch};
        let fd = self.conntrack.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![FlowKey4::default(); BATCH];
        let mut values = vec![CtEntry::default(); BATCH];
        // The resume token: a bucket index for hash maps (4 bytes), room for 8.
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw mut token_in as u64 },
                out_batch: &raw mut token_out as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let rc = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
            // The kernel wrote back how many entries it copied, also with ENOENT (the
            // last batch).
            let n = (attr.count as usize).min(BATCH);
            for i in 0..n {
                f(keys[i], values[i]);
            }
            match rc {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Reads every entry: (entries expired before `now_ns`, count of the others).
    /// `batched`: with `BPF_MAP_LOOKUP_BATCH`; a batched read that fails is repeated
    /// key by key.
    fn tally(&self, now_ns: u64, batched: bool) -> (Vec<(FlowKey4, CtEntry)>, u64) {
        if batched {
            let (mut expired, mut present) = (Vec::new(), 0u64);
            let read = self.walk_batched(|key, ct| {
                if ct.expires < now_ns {
                    expired.push((key, ct));
                } else {
                    present += 1;
                }
            });
            match read {
                Ok(()) => return (expired, present),
                Err(e) => {
                    tracing::warn!(error = %e, "conntrack sweep: batched read failed; reading key by key")
                }
            }
        }
        let (mut expired, mut present) = (Vec::new(), 0u64);
        for kv in self.conntrack.iter() {
            // An entry evicted or deleted by the datapath while we walk is skipped.
            let Ok((key, ct)) = kv else { continue };
            if ct.expires < now_ns {
                expired.push((key, ct));
            } else {
                present += 1;
            }
        }
        (expired, present)
    }

    /// One pass: removes entries that expired before `now_ns` (CLOCK_MONOTONIC) and
    /// returns (entries left, entries removed). `batched`: see [`Self::tally`].
    pub fn sweep(&mut self, now_ns: u64, batched: bool) -> (u64, u64) {
        let (expired, mut present) = self.tally(now_ns, batched);
        let mut removed = 0u64;
        for (key, ct) in expired {
            // The datapath may have renewed the flow since we read it.
            match self.conntrack.get(&key, 0) {
                Ok(now) if now.expires < now_ns => {}
                _ => {
                    present += 1;
                    continue;
                }
            }
            if self.conntrack.remove(&key).is_ok() {
                removed += 1;
            }
            if ct.backend.flags & BACKEND_F_REMOTE == 0 {
                let b = ct.backend.addr;
                let reply = FlowKey4 {
                    src: [b[0], b[1], b[2], b[3]],
                    dst: key.src,
                    sport: ct.backend.port,
                    dport: key.sport,
                    proto: key.proto,
                    pad: [0; 3],
                };
                // Only the reverse NAT this flow made: another VIP flow of the same
                // client port to the same backend would map back elsewhere.
                if let Ok(rn) = self.revnat.get(&reply, 0)
                    && rn.addr[..4] == key.dst
                    && rn.port == key.dport
                {
                    let _ = self.revnat.remove(&reply);
                }
            }
        }
        (present, removed)
    }
}

/// CLOCK_MONOTONIC in ns: the clock of the datapath's expiry times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs sweeps every `period` on a dedicated thread for the life of the process,
/// publishing into `counts`. The first sweep runs at once. The maps are opened from
/// their pins at each sweep, so a datapath the agent had to rebuild is followed.
/// `batched`: the kernel reads maps in batches ([`crate::features::MAP_BATCH`]).
pub fn spawn(pin_path: std::path::PathBuf, period: Duration, counts: Arc<CtCounts>, batched: bool) {
    let spawned = std::thread::Builder::new()
        .name("xlb-ct-sweep".into())
        .spawn(move || {
            loop {
                let mut sweeper = match Sweeper::open(&pin_path) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "conntrack sweep skipped");
                        std::thread::sleep(period);
                        continue;
                    }
                };
                let start = std::time::Instant::now();
                let (present, removed) = sweeper.sweep(monotonic_ns(), batched);
                let took = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                counts.last_sweep_ns.store(took, Ordering::Relaxed);
                counts.present.store(present, Ordering::Relaxed);
                counts.expired.fetch_add(removed, Ordering::Relaxed);
                counts.sweeps.fetch_add(1, Ordering::Relaxed);
                if removed > 0 {
                    tracing::debug!(present, removed, "conntrack sweep");
                }
                std::thread::sleep(period);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the conntrack sweeper; expired flows stay until evicted");
    }
}
