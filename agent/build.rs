//! Builds the kernel programs (ebpf/xlb-ebpf) for bpfel-unknown-none and hands the
//! object to the agent, which embeds it: the `xlb` binary is all a node needs.
//!
//! The eBPF build needs `-Z build-std=core`, i.e. a toolchain with rust-src; on these
//! machines that is Debian's rustc 1.96 (`rustc-web` + `rust-web-src`) plus
//! bpf-linker, both installed by `cargo xtask setup` (see xtask/src/main.rs).
//! `XLB_SKIP_EBPF=1` embeds an empty object instead, for working on userspace code
//! without that toolchain; such a binary refuses to start the agent.
// A build script reports failure by panicking with a message.
#![allow(clippy::expect_used, clippy::unwrap_used)]
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let obj_out = out_dir.join("xlb.bpf.o");
    println!("cargo:rerun-if-env-changed=XLB_SKIP_EBPF");
    println!("cargo:rustc-check-cfg=cfg(xlb_no_ebpf)");

    if env::var_os("XLB_SKIP_EBPF").is_some_and(|v| v == "1") {
        std::fs::write(&obj_out, b"").expect("write empty object");
        println!("cargo:rustc-cfg=xlb_no_ebpf");
        println!("cargo:rustc-env=XLB_EBPF_OBJ={}", obj_out.display());
        return;
    }

    let ebpf_dir = root.join("ebpf/xlb-ebpf");
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    for p in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("ebpf/xlb-common").join(p).display()
        );
    }

    let debian_rustc = Path::new("/usr/bin/rustc");
    let debian_cargo = Path::new("/usr/bin/cargo");
    let missing: Vec<&str> = [
        (debian_rustc.exists(), "Debian rustc (/usr/bin/rustc)"),
        (
            Path::new("/usr/lib/rustlib/src/rust").exists(),
            "rust-src (/usr/lib/rustlib/src/rust)",
        ),
        (which("bpf-linker"), "bpf-linker"),
    ]
    .into_iter()
    .filter_map(|(ok, what)| (!ok).then_some(what))
    .collect();
    if !missing.is_empty() {
        panic!(
            "cannot build the eBPF programs: missing {}. Run `cargo xtask setup` (or set \
             XLB_SKIP_EBPF=1 to build userspace only).",
            missing.join(", ")
        );
    }

    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new(debian_cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", debian_rustc)
        .env("RUSTC_BOOTSTRAP", "1");
    // The outer cargo (or clippy) exports settings meant for the host build.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        let host_only = (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || (k.starts_with("RUSTC_") && k != "RUSTC_BOOTSTRAP")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS";
        if host_only {
            cmd.env_remove(k.as_ref());
        }
    }
    // BTF lets bpftool print map keys and values field by field.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().expect("run /usr/bin/cargo for the eBPF build");
    assert!(status.success(), "eBPF build failed (see the output above)");
    let obj = target_dir.join("bpfel-unknown-none/release/xlb");
    std::fs::copy(&obj, &obj_out).expect("copy eBPF object");
    println!("cargo:rustc-env=XLB_EBPF_OBJ={}", obj_out.display());
}

fn which(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|p| p.join(bin).is_file()))
        .unwrap_or(false)
}
