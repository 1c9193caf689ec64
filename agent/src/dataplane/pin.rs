//! The bpffs directory maps and links are pinned in.
use std::{
    ffi::CString,
    io,
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, MetadataExt, PermissionsExt},
        io::AsRawFd,
    },
    path::Path,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lives on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs only writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// What [`prepare`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The agent mounted bpffs itself (nothing was mounted on /sys/fs/bpf).
    pub mounted: bool,
}

/// Makes sure `pin_path` is a directory on bpffs that only root controls: mounts
/// bpffs on /sys/fs/bpf (mode 0700) when nothing is mounted there, creates the
/// directory with mode 0700, and refuses one owned by another user (who could remove
/// the pins and so detach the datapath). A root-owned directory open to others is
/// narrowed to 0700.
pub fn prepare(pin_path: &Path) -> io::Result<Prepared> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    let mut mounted = false;
    if pin_path.starts_with(sys_bpf) && !is_bpffs(sys_bpf)? {
        let src = c"bpffs";
        let target = c"/sys/fs/bpf";
        let fstype = c"bpf";
        // A fresh bpffs is mode 1777: anyone could create or remove pins.
        let data = c"mode=0700";
        // SAFETY: plain mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        mounted = true;
        tracing::warn!(
            "nothing was mounted on /sys/fs/bpf: mounted a new bpffs (mode 0700). Pins, and so \
             the datapath's survival across agent restarts, last only as long as this mount. \
             Under `ip netns exec`, which gives the process a /sys of its own, that is until \
             the agent exits: run it with `nsenter --net=/run/netns/NAME` instead"
        );
    }
    if let Some(parent) = pin_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(pin_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if !is_bpffs(pin_path)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not on a bpf filesystem (mount -t bpf bpffs <dir>)",
        ));
    }
    let meta = std::fs::symlink_metadata(pin_path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this agent's uid {me}: refusing to pin there (its owner \
                 could remove the pins and detach the datapath); remove the directory",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(pin_path, std::fs::Permissions::from_mode(0o700))?;
        tracing::info!(path = %pin_path.display(), was = format!("{:o}", meta.mode() & 0o7777), "pin directory narrowed to mode 0700");
    }
    Ok(Prepared { mounted })
}

/// An exclusive lock on a pin directory (`flock(2)` on the directory itself), held
/// for as long as this value lives: one agent per pin path.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

/// Takes [`PinLock`] on `pin_path` without waiting. `Err` with kind `WouldBlock`
/// names the holder's PID when `/proc/locks` tells it.
pub fn lock(pin_path: &Path) -> io::Result<PinLock> {
    let dir = std::fs::File::open(pin_path)?;
    // SAFETY: flock on our own open fd.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(PinLock { _dir: dir });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err);
    }
    let holder = lock_holder(&dir)
        .map(|pid| format!("pid {pid}"))
        .unwrap_or_else(|| "another process".to_string());
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("in use by another xlb agent ({holder}); stop it first"),
    ))
}

/// The PID holding a flock on `dir`, from `/proc/locks` (lines such as
/// `1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`: pid, then major:minor:inode).
fn lock_holder(dir: &std::fs::File) -> Option<u32> {
    let meta = dir.metadata().ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}
