//! Network namespaces: creation, RAII deletion, running code and commands inside them.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, anyhow, bail};

/// A named network namespace (`/run/netns/NAME`) created by the lab; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with `ip netns add` and brings its `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `f` on a short-lived thread that has entered this namespace and returns its result.
    /// Sockets created by `f` stay in this namespace after the thread ends.
    pub fn enter<T: Send, F: FnOnce() -> Result<T> + Send>(&self, f: F) -> Result<T> {
        in_netns(&self.path(), f)
    }

    /// `ip -n NAME ARGS...`; fails with the command line and stderr on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace via `nsenter --net=PATH --`.
    /// Only the network namespace changes (unlike `ip netns exec`, the host's /sys and its
    /// bpffs stay visible).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program ARGS...` inside this namespace; returns stdout, fails on a non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// Writes a sysctl under `/proc/sys/` (e.g. `net/ipv4/ip_forward`) from inside this
    /// namespace and reads it back.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key);
        self.enter(|| {
            std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
            let got = std::fs::read_to_string(&path)?;
            if got.trim() != value {
                bail!(
                    "{} reads back {:?}, wanted {value:?}",
                    path.display(),
                    got.trim()
                );
            }
            Ok(())
        })
        .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Turns TX checksum offload off on `ifname` (what `ethtool -K IFNAME tx off` does),
    /// through the SIOCETHTOOL ioctl so the lab does not need the ethtool binary, and
    /// checks it reads back off.
    ///
    /// Why: with offload on, veth hands the peer CHECKSUM_PARTIAL packets whose L4 checksum
    /// was never computed, and the receiver trusts them, so a datapath that writes a wrong
    /// checksum would go unnoticed. With offload off, the sender computes full checksums and
    /// the receiving stack (CHECKSUM_NONE) really verifies them after the NAT rewrite.
    pub fn disable_tx_checksum(&self, ifname: &str) -> Result<()> {
        self.enter(|| {
            ethtool_value(ifname, ETHTOOL_STXCSUM, Some(0))?;
            let now = ethtool_value(ifname, ETHTOOL_GTXCSUM, None)?;
            if now != 0 {
                bail!("tx checksum offload on {ifname} is still on after ETHTOOL_STXCSUM");
            }
            Ok(())
        })
        .with_context(|| format!("disabling tx checksum offload on {ifname} in {}", self.name))
    }

    /// IDs of the programs attached with tcx (`BPF_TCX_INGRESS`/`BPF_TCX_EGRESS`, kernel
    /// 6.6+) to `ifname` in this namespace, via `BPF_PROG_QUERY` (bpftool 7.1's `net show`
    /// does not list tcx attachments).
    pub fn tcx_programs(&self, ifname: &str, egress: bool) -> Result<Vec<u32>> {
        let cname = std::ffi::CString::new(ifname)?;
        self.enter(|| {
            // SAFETY: valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
            }
            let mut ids = [0u32; 64];
            // The `query` member of union bpf_attr (64 bytes).
            let mut attr = [0u8; 64];
            attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
            let attach_type: u32 = if egress {
                BPF_TCX_EGRESS
            } else {
                BPF_TCX_INGRESS
            };
            attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
            attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
            attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
            // SAFETY: attr is a valid bpf_attr prefix; the kernel writes at most
            // prog_cnt ids into `ids`, which outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    attr.as_mut_ptr(),
                    attr.len() as libc::c_uint,
                )
            };
            if rc != 0 {
                bail!(
                    "BPF_PROG_QUERY tcx on {ifname}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let n = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
            Ok(ids[..n.min(ids.len())].to_vec())
        })
    }
}

const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("xlb-lab: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `f` on a fresh thread that first joins the network namespace at `path`
/// (`setns(CLONE_NEWNET)`); the calling thread's namespace is untouched. A panic in `f` is
/// propagated to the caller.
pub fn in_netns<T: Send, F: FnOnce() -> Result<T> + Send>(path: &Path, f: F) -> Result<T> {
    let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            // SAFETY: plain syscall on a valid fd; it only changes this thread's netns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(anyhow!(
                    "setns({}) failed: {} (the lab needs root / CAP_SYS_ADMIN)",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace at `path` for good (for a
/// thread of its own that serves from inside a namespace).
pub fn enter_here(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    // SAFETY: plain syscall on a valid fd; it only changes this thread's netns.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(anyhow!(
            "setns({}) failed: {} (the lab needs root / CAP_SYS_ADMIN)",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Runs a command to completion; returns stdout, or an error with the command line, exit
/// status and stderr. A missing program is reported as such.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to completion and returns its output whatever the exit status; fails only
/// when it cannot be started.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "`{}`: program not found ({e}); the lab needs ip, nsenter, ping and bpftool installed",
                describe(cmd)
            )
        } else {
            anyhow!("`{}`: cannot run: {e}", describe(cmd))
        }
    })
}

/// The command line of `cmd`, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Get (`set == None`) or set a legacy ethtool u32 value on `ifname` in the current netns.
fn ethtool_value(ifname: &str, cmd: u32, set: Option<u32>) -> Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ {
        bail!("interface name {ifname:?} too long");
    }
    let mut value = EthtoolValue {
        cmd,
        data: set.unwrap_or(0),
    };
    let mut ifr = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in ifr.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: creating a socket has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifr and value live across the call; the kernel reads/writes exactly these.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr as *mut IfreqData) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("SIOCETHTOOL cmd {cmd:#x} on {ifname}: {err}");
    }
    Ok(value.data)
}
