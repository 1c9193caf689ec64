//! `cargo xtask setup | build | run | demo | test`: everything a fresh Debian machine
//! needs to build, try and test xlb, in the project's own files.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

/// What the build, the lab and the tests actually run or read, each with the Debian
/// package that provides it. Setup checks the files themselves, not a package list, so a
/// package that is present but incomplete, or a file some other package provides, is
/// judged by what is really on disk. The eBPF build needs Debian's rustc because it is
/// the toolchain here that ships its library source (`-Z build-std=core`), and
/// bpf-linker must be built against the LLVM that rustc emits bitcode for (22).
const REQUIREMENTS: &[(&str, &str, &str)] = &[
    // (path checked, Debian package, what it is for)
    (
        "/usr/bin/cargo",
        "cargo-web",
        "Debian's cargo, runs the eBPF build (agent/build.rs)",
    ),
    (
        "/usr/bin/rustc",
        "rustc-web",
        "Debian's rustc 1.96, compiles the eBPF programs",
    ),
    (
        "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
        "rust-web-src",
        "the library source for -Z build-std=core",
    ),
    (
        "/usr/lib/llvm-22/bin/llvm-config",
        "llvm-22-dev",
        "LLVM 22, which bpf-linker links against",
    ),
    (
        "/usr/lib/llvm-22/lib/libPolly.a",
        "libpolly-22-dev",
        "Polly, needed to link bpf-linker against LLVM 22",
    ),
    (
        "/usr/include/zstd.h",
        "libzstd-dev",
        "zstd, needed to link bpf-linker",
    ),
    (
        "/usr/sbin/bpftool",
        "bpftool",
        "map dumps in tests and docs",
    ),
    (
        "/usr/bin/ip",
        "iproute2",
        "the netns lab (namespaces, veths, bridges)",
    ),
    ("/usr/bin/ping", "iputils-ping", "lab reachability checks"),
    (
        "/usr/bin/nsenter",
        "util-linux",
        "running processes inside lab namespaces",
    ),
    (
        "/usr/bin/promtool",
        "prometheus",
        "promtool check metrics, run on a real scrape by the tests",
    ),
    (
        "/usr/sbin/trafgen",
        "netsniff-ng",
        "the bench's packet generator (AF_PACKET, one core)",
    ),
    (
        "/usr/sbin/nft",
        "nftables",
        "the bench: kube-proxy's nftables mode, and the pods' early drop",
    ),
    (
        "/usr/sbin/iptables-restore",
        "iptables",
        "the bench: kube-proxy's iptables mode (DNAT, statistic random)",
    ),
    (
        "/usr/sbin/haproxy",
        "haproxy",
        "the bench: HAProxy in TCP mode, the userspace proxy reference",
    ),
];

/// bpf-linker links the eBPF object; built against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup           install what the build and tests need (Debian packages, bpf-linker); idempotent
  build           build target/release/xlb with its eBPF programs embedded
  run -- ARGS     build, then run `xlb agent ARGS` on this machine (a lab node)
  demo            build, bring up the netns lab, send real traffic through xlb, print a verdict
  test            the full test suite: fmt, clippy, unit tests, privileged netns integration tests
  bench           measure xlb next to the alternatives (results in bench/results/)
  crds            regenerate deploy/crds/ from the agent's resource types";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(true),
        Some("build") => build().map(|_| ()),
        Some("run") => run(&args[1..]),
        Some("demo") => demo(),
        Some("test") => test(),
        Some("bench") => bench(),
        Some("crds") => crds(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Regenerates `deploy/crds/` with `xlb crds` (a unit test fails while the committed
/// files differ from what the types generate).
fn crds() -> Result<()> {
    let xlb = build()?;
    sh(Command::new(xlb)
        .arg("crds")
        .arg("--out")
        .arg(root().join("deploy/crds")))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The requirements whose file is missing, as (package, what for).
fn missing_requirements() -> Vec<(&'static str, &'static str)> {
    REQUIREMENTS
        .iter()
        .filter(|(path, _, _)| !Path::new(path).exists())
        .map(|&(path, pkg, why)| {
            eprintln!("xtask setup: missing {path} ({why})");
            (pkg, why)
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    let out = Command::new(cargo_home_bin().join("bpf-linker"))
        .arg("--version")
        .output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// Installs what is missing. With `verbose`, also says when nothing is.
fn setup(verbose: bool) -> Result<()> {
    let mut pkgs: Vec<&str> = missing_requirements().iter().map(|(p, _)| *p).collect();
    pkgs.dedup();
    if !pkgs.is_empty() {
        if is_not_root() {
            bail!("installing {} needs root", pkgs.join(" "));
        }
        eprintln!(
            "xtask setup: installing Debian packages: {}",
            pkgs.join(" ")
        );
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        let still: Vec<String> = REQUIREMENTS
            .iter()
            .filter(|(path, _, _)| !Path::new(path).exists())
            .map(|(path, pkg, _)| format!("{path} (from {pkg})"))
            .collect();
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(", "));
        }
    } else if verbose {
        eprintln!("xtask setup: every required file is present");
    }
    if !bpf_linker_ok() {
        eprintln!(
            "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (about a minute)"
        );
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path))?;
    } else if verbose {
        eprintln!("xtask setup: bpf-linker {BPF_LINKER_VERSION} present");
    }
    if verbose {
        eprintln!("xtask setup: done");
    }
    Ok(())
}

fn is_not_root() -> bool {
    // geteuid has no preconditions; avoids a libc dependency for one call.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0")
        .unwrap_or(true)
}

/// Builds the release binary (the eBPF object is built and embedded by agent/build.rs).
fn build() -> Result<PathBuf> {
    setup(false)?;
    sh(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "xlb"]))?;
    let bin = root().join("target/release/xlb");
    eprintln!("xtask build: {}", bin.display());
    Ok(bin)
}

fn run(args: &[String]) -> Result<()> {
    let bin = build()?;
    let args = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    sh(Command::new(bin).arg("agent").args(args))
}

fn demo() -> Result<()> {
    let bin = build()?;
    let passed = xlb_lab::demo::run(&bin, &root().join("deploy/examples"))?;
    if !passed {
        bail!("the demo's verdict is FAIL");
    }
    Ok(())
}

fn test() -> Result<()> {
    if is_not_root() {
        bail!("the integration tests create network namespaces and load BPF programs: run as root");
    }
    let bin = build()?;
    let root = root();
    eprintln!("xtask test: cargo fmt --check");
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;
    eprintln!("xtask test: cargo clippy --all-targets -- -D warnings");
    sh(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("xtask test: unit and integration tests (release profile, shared with the build)");
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--release", "--workspace"])
        .env("XLB_BIN", &bin))?;
    // Keeps the bench harness working: one quick run into a scratch directory (not the
    // committed results), checked for well-formed output, never for speed.
    let out = std::env::temp_dir().join(format!("xlbb{}-bench", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    eprintln!(
        "xtask test: cargo xtask bench --quick --out {}",
        out.display()
    );
    run_bench(true, &out)?;
    check_bench_output(&out)?;
    let _ = std::fs::remove_dir_all(&out);
    eprintln!("xtask test: all passed");
    Ok(())
}

/// Builds xlb and the reference program (`bench/reference`), then runs the bench
/// harness (`bench/`): `cargo xtask bench [--quick] [--out DIR]` (default out:
/// `bench/results/`, the committed results).
fn bench() -> Result<()> {
    let mut quick = false;
    let mut out = root().join("bench/results");
    let mut args = std::env::args().skip(2);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().context("--out DIR")?),
            // Only checks an existing output directory (what `cargo xtask test` checks).
            "--check" => {
                return check_bench_output(Path::new(&args.next().context("--check DIR")?));
            }
            other => bail!(
                "cargo xtask bench: unknown argument {other:?} ([--quick] [--out DIR] | --check DIR)"
            ),
        }
    }
    run_bench(quick, &out)
}

/// Runs the bench harness (as root), writing its results under `out`.
fn run_bench(quick: bool, out: &Path) -> Result<()> {
    if is_not_root() {
        bail!("the benchmarks load BPF programs and build netns labs: run as root");
    }
    let bin = build()?;
    let root = root();
    let reference = build_reference(&root)?;
    eprintln!(
        "xtask bench: program cost, end to end in the netns lab, control plane, churn{}",
        if quick { " (--quick)" } else { "" }
    );
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .env("XLB_BIN", &bin)
        .args(["run", "--release", "-p", "xlb-bench", "--"])
        .arg("--reference")
        .arg(&reference)
        .arg("--out")
        .arg(out);
    if quick {
        cmd.arg("--quick");
    }
    sh(&mut cmd)
}

/// Checks a bench output directory with the harness itself (`xlb-bench --check`),
/// which owns the format: well-formed, never fast.
fn check_bench_output(out: &Path) -> Result<()> {
    sh(Command::new("cargo")
        .current_dir(root())
        .args(["run", "--release", "-q", "-p", "xlb-bench", "--", "--check"])
        .arg(out))?;
    eprintln!("xtask: bench output in {} is well-formed", out.display());
    Ok(())
}

/// Builds the reference XDP program the way agent/build.rs builds xlb's (Debian's
/// rustc with its library source, bpf-linker) and returns the object's path.
fn build_reference(root: &Path) -> Result<PathBuf> {
    let target = root.join("target/bench-ref");
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(root.join("bench/reference"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target);
    // The outer cargo's settings are for the host build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    sh(&mut cmd)?;
    Ok(target.join("bpfel-unknown-none/release/xlb-bench-ref"))
}
