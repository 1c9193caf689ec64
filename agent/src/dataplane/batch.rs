//! Many map elements per `bpf(2)` call: `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (Linux 5.6+), which aya 0.14 does not expose. The attribute
//! layout comes from aya-obj's generated kernel bindings; this module only fills it in.
//!
//! Kernel behaviour relied on (kernel/bpf/syscall.c, `generic_map_update_batch` and
//! `generic_map_delete_batch`): elements are processed in order, one at a time, as by
//! `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM`; on an error the call stops and
//! `batch.count` says how many were done, so a failed batch is exactly a prefix of the
//! single writes. For map-in-map types the kernel waits for an RCU grace period once
//! per *call* (`maybe_wait_bpf_programs`), not once per element: on `xlb_maglev` a
//! batch of 10,000 inner maps costs one grace period (milliseconds) instead of 10,000.
//! A map type without batch support answers `ENOTSUPP`; then the elements are written
//! one by one with the same semantics.
use std::{
    io,
    mem::{size_of, size_of_val},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_attr__bindgen_ty_3, bpf_cmd};

/// The kernel's `ENOTSUPP` (not `EOPNOTSUPP`): a map type without batch operations.
const ENOTSUPP: i32 = 524;

/// A failed batch: how many elements were written before `error`.
#[derive(Debug, thiserror::Error)]
#[error("{done} of {total} elements written, then: {error}")]
pub struct BatchError {
    /// Elements written (a prefix of the batch).
    pub done: usize,
    /// Elements asked for.
    pub total: usize,
    /// The kernel's answer for element `done`.
    pub error: io::Error,
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` whose pointers refer to
    // buffers the caller keeps alive for the duration of the call; its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The `batch` member for `count` elements of `keys` (and `values`).
fn batch_attr<K, V>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: *const V,
    count: usize,
) -> bpf_attr__bindgen_ty_3 {
    bpf_attr__bindgen_ty_3 {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a plain-data union; all-zero is the kernel's "unset".
    unsafe { std::mem::zeroed() }
}

/// Writes `keys[i] -> value i` for every `i`, in order. `values` holds `keys.len()`
/// values back to back, each `size_of_val(values) / keys.len()` bytes (for per-CPU maps: one
/// value per possible CPU, each rounded up to 8 bytes, as the kernel expects).
pub fn update<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    let total = keys.len();
    if total == 0 {
        return Ok(());
    }
    let stride = size_of_val(values) / total;
    debug_assert_eq!(stride * total, size_of_val(values));
    let mut attr = zeroed_attr();
    attr.batch = batch_attr(map, keys, values.as_ptr(), total);
    match sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(ENOTSUPP) => update_each(map, keys, values, stride),
        Err(error) => Err(BatchError {
            // SAFETY: the kernel wrote back how many elements it processed.
            done: unsafe { attr.batch.count } as usize,
            total,
            error,
        }),
    }
}

fn update_each<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    stride: usize,
) -> Result<(), BatchError> {
    for (i, key) in keys.iter().enumerate() {
        let mut attr = zeroed_attr();
        // SAFETY: plain integers into the element-command member of the union; the
        // pointers refer to `keys` and `values`, alive for the call.
        unsafe {
            let a = &mut attr.__bindgen_anon_2;
            a.map_fd = map.as_raw_fd() as u32;
            a.key = key as *const K as u64;
            a.__bindgen_anon_1.value = (values.as_ptr() as *const u8).add(i * stride) as u64;
        }
        sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map_err(|error| BatchError {
            done: i,
            total: keys.len(),
            error,
        })?;
    }
    Ok(())
}

/// Deletes every key of `keys`, in order; a key that is not there is skipped (as the
/// agent's single deletes do), anything else stops the batch.
pub fn delete<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    let total = keys.len();
    let mut done = 0;
    while done < total {
        let mut attr = zeroed_attr();
        attr.batch = batch_attr(map, &keys[done..], std::ptr::null::<u8>(), total - done);
        match sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(ENOTSUPP) && done == 0 => {
                return delete_each(map, keys);
            }
            Err(error) => {
                // SAFETY: the kernel wrote back how many elements it processed.
                let n = unsafe { attr.batch.count } as usize;
                if error.raw_os_error() == Some(libc::ENOENT) {
                    // Already gone: skip it and go on with the rest.
                    done += n + 1;
                    continue;
                }
                return Err(BatchError {
                    done: done + n,
                    total,
                    error,
                });
            }
        }
    }
    Ok(())
}

fn delete_each<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    for (i, key) in keys.iter().enumerate() {
        let mut attr = zeroed_attr();
        // SAFETY: as in `update_each`.
        unsafe {
            let a = &mut attr.__bindgen_anon_2;
            a.map_fd = map.as_raw_fd() as u32;
            a.key = key as *const K as u64;
        }
        match sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                return Err(BatchError {
                    done: i,
                    total: keys.len(),
                    error: e,
                });
            }
            _ => {}
        }
    }
    Ok(())
}
