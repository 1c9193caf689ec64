//! Writing straight into an agent's pinned maps, for tests that need a state real
//! traffic would take too long to build (a conntrack map with hundreds of thousands of
//! flows). Raw `bpf(2)` calls: the lab does not link the agent or aya.
use std::ffi::CString;
use std::path::Path;

use anyhow::{Context, Result, bail};
use xlb_common::{Backend, CtEntry, FAMILY_V4, FlowKey4, PROTO_UDP};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> libc::c_long {
    // SAFETY: attr is a valid bpf_attr prefix of its length for `cmd`; every pointer
    // stored in it outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    }
}

/// An fd for the map pinned at `path` (closed on drop).
struct PinnedMap(libc::c_int);

impl PinnedMap {
    fn open(path: &Path) -> Result<PinnedMap> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())?;
        let mut attr = [0u8; 16];
        attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(BPF_OBJ_GET, &mut attr);
        if fd < 0 {
            bail!(
                "BPF_OBJ_GET {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(PinnedMap(fd as libc::c_int))
    }

    fn update<K, V>(&self, key: &K, value: &V) -> std::io::Result<()> {
        let mut attr = [0u8; 32];
        attr[0..4].copy_from_slice(&(self.0 as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(key as *const K as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value as *const V as u64).to_ne_bytes());
        if bpf(BPF_MAP_UPDATE_ELEM, &mut attr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for PinnedMap {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Fills `{pin_dir}/xlb_conntrack4` with `n` UDP flows from distinct 10.200.x.y:port
/// clients to `vip:port`, each tracked to `backend:port` and living `ttl_ns` past
/// `now_ns` (CLOCK_MONOTONIC, as the datapath's `bpf_ktime_get_ns`). Returns how many
/// were written.
pub fn fill_conntrack(
    pin_dir: &Path,
    n: u32,
    vip: std::net::SocketAddrV4,
    backend: std::net::SocketAddrV4,
    expires_ns: u64,
) -> Result<u32> {
    let map = PinnedMap::open(&pin_dir.join(xlb_common::names::CONNTRACK4))?;
    let addr16 = |ip: std::net::Ipv4Addr| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&ip.octets());
        a
    };
    let value = CtEntry {
        backend: Backend {
            addr: addr16(*backend.ip()),
            port: backend.port().to_be(),
            family: FAMILY_V4,
            flags: 0,
            node: [0; 16],
        },
        backend_id: 0,
        expires: expires_ns,
        service_id: 0,
        flags: 0,
        snat_port: 0,
        pad: [0; 6],
    };
    for i in 0..n {
        let client = std::net::Ipv4Addr::new(10, 200, (i >> 14) as u8, ((i >> 6) & 0xff) as u8);
        let key = FlowKey4 {
            src: client.octets(),
            dst: vip.ip().octets(),
            sport: (1024 + (i & 0x3f) as u16).to_be(),
            dport: vip.port().to_be(),
            proto: PROTO_UDP,
            pad: [0; 3],
        };
        map.update(&key, &value)
            .with_context(|| format!("conntrack entry {i} of {n}"))?;
    }
    Ok(n)
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
