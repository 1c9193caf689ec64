//! The bpffs directory maps and links are pinned in.
use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

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

/// Makes sure `pin_path` is a directory on bpffs: mounts bpffs on /sys/fs/bpf when
/// nothing is mounted there (a fresh machine), then creates the directory.
pub fn prepare(pin_path: &Path) -> io::Result<()> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(sys_bpf) && !is_bpffs(sys_bpf)? {
        let src = c"bpffs";
        let target = c"/sys/fs/bpf";
        let fstype = c"bpf";
        // SAFETY: plain mount(2) with NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_path)?;
    if !is_bpffs(pin_path)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not on a bpf filesystem (mount -t bpf bpffs <dir>)",
        ));
    }
    Ok(())
}
