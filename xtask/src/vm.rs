//! `cargo xtask vm`: the kernel matrix (issue 29, part 4). Boots Debian's packaged
//! kernels in qemu with virtme-ng, the machine's own files as the guest's root, and runs
//! the demo and a core set of lab tests inside each, from binaries built on the host
//! (cargo inside an emulated guest would rebuild from scratch). `--kernel host` runs the
//! same set on the machine's own kernel, without a VM.
//!
//! The kernels are not installed: `apt-get download` + `dpkg-deb -x` into
//! [`vm_dir`]`/kernels/<release>`, then `depmod`. Installing a linux-image package would
//! run its postinst (initramfs, bootloader hooks) on a machine that does not boot from
//! /boot, and virtme-ng needs only the image and its modules: given an image whose
//! directory tree holds `lib/modules/<release>`, it loads the modules its initramfs
//! needs (9p, virtio) from there and links that directory into the guest's
//! /lib/modules, so `modprobe` works inside.
//!
//! KVM is not used. This machine's /dev/kvm is PVM (`kvm_pvm`, the host booted with
//! `nested_pvm=1`), which runs only guests built as PVM guests: with `-cpu host` qemu
//! stops at `failed to set MSR 0x10a`; with `max,-arch-capabilities`, `Skylake-Client`,
//! `kvm64`, `qemu64` and `host,-arch-capabilities` every Debian kernel stops in its
//! decompressor with `KVM internal error. Suberror: 1` (the host's log: `kvm-pvm:
//! INTERNAL_ERROR in batch emul`), whatever the CPU model. So the guests run under
//! qemu's software emulation (`--disable-kvm`).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use super::{build, is_not_root, output, root, sh};

/// The virtme-ng release installed from PyPI (pinned: its command line and the guest
/// init it ships are what this file relies on).
const VNG_VERSION: &str = "1.42";

/// What booting a kernel with virtme-ng needs from Debian: (path checked, package, why).
const VM_REQUIREMENTS: &[(&str, &str, &str)] = &[
    (
        "/usr/bin/qemu-system-x86_64",
        "qemu-system-x86",
        "the virtual machine (software emulation)",
    ),
    (
        "/bin/busybox",
        "busybox-static",
        "virtme-ng's initramfs, which mounts the host's files as the guest's root",
    ),
    (
        "/usr/sbin/depmod",
        "kmod",
        "modules.dep for an extracted kernel's modules; modprobe inside the guest",
    ),
];

/// A Debian kernel series the matrix boots: its label (`--kernel`) and what its
/// package is called (the newest one apt offers is used). The `-amd64` flavour: the
/// `-cloud-amd64` one lacks 9p, so the guest cannot mount the host's files.
struct Series {
    /// `--kernel` value and the report's name for it.
    label: &'static str,
    /// `apt-cache search --names-only` pattern (POSIX extended regex).
    pattern: &'static str,
    /// What every package name of the series starts with: an extracted older release
    /// of the series is removed when a newer one replaces it.
    prefix: &'static str,
}

/// Debian 12's own kernel (no tcx) and its 6.12 from bookworm-security.
const SERIES: &[Series] = &[
    Series {
        label: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        prefix: "linux-image-6.1.0-",
    },
    Series {
        label: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        prefix: "linux-image-6.12.",
    },
];

/// The in-VM test set: (test binary, test name, what it shows). Issue 29's core set:
/// Local and Cluster policy with real TCP and UDP, a restart under traffic without a
/// gap, L2 failover, and the fallback paths (the first packet to a node whose
/// neighbour entry is not resolved; the hand-off slot and netlink TC filters). `cargo
/// xtask test` also runs it on the host with every fallback forced. Chosen to keep a cold matrix run well inside CI's limit
/// under software emulation.
pub(crate) const CORE_TESTS: &[(&str, &str, &str)] = &[
    (
        "agent",
        "tcp_and_udp_reach_every_ready_backend",
        "Local policy: TCP and UDP through a VIP reach every ready backend",
    ),
    (
        "agent",
        "restart_keeps_flows",
        "an agent restart under TCP and UDP traffic without a gap",
    ),
    (
        "multinode",
        "local_policy_on_each_node",
        "Local policy on every node of a three-node lab",
    ),
    (
        "cluster",
        "cluster_traffic_is_tunnelled_and_answered_directly_from_the_vip",
        "Cluster policy: IPIP to the pod's node, reply straight from the VIP (DSR)",
    ),
    (
        "cluster",
        "first_packet_to_a_node_without_a_neighbour_entry_is_not_lost",
        "Cluster fallback: TC resolves a next hop XDP could not",
    ),
    (
        "cluster",
        "cluster_snat_mode_answers_through_the_entry_node",
        "Cluster policy with --cluster-mode snat: replies back through the entry node",
    ),
    (
        "l2",
        "l2_vip_is_answered_by_one_node_and_fails_over",
        "L2 (ARP) announcement and failover",
    ),
    (
        "l2",
        "a_restart_within_the_grace_moves_nothing",
        "an agent restart keeps its L2 VIPs answered, with no gap",
    ),
    (
        "fallbacks",
        "forced_fallbacks_deliver_survive_a_restart_and_clean_up",
        "every fallback forced: hand-off slot, netlink TC filters (restart, re-attach, cleanup)",
    ),
];

/// Kernel modules the lab and the agent use, loaded up front in a guest (they would
/// also autoload; loading them here makes a missing one show in the guest's log).
const GUEST_MODULES: &[&str] = &["veth", "bridge", "sch_ingress", "cls_bpf"];

/// Default bound on each demo or test run inside a guest, in seconds. Each took under
/// a minute on 6.12 under emulation; a hung one should not eat CI's 90 minutes.
const DEFAULT_ITEM_TIMEOUT: u64 = 300;

/// Bound on a guest's boot and shutdown, added to its items' bounds, in seconds.
const BOOT_ALLOWANCE: u64 = 300;

/// Where the VM tooling lives: `$XLB_VM_DIR`, else /opt/xlb-vm (kept across `cargo
/// clean`, shared by work trees): `venv/` (virtme-ng), `kernels/<release>/` (extracted
/// packages), `debs/` (downloads, removed once extracted).
fn vm_dir() -> PathBuf {
    std::env::var_os("XLB_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/xlb-vm"))
}

/// `cargo xtask vm [--kernel 6.1|6.12|host|all]... [--only-demo] [--only SUBSTRING]...
/// [--timeout SECS]`. Without `--kernel`: 6.1, 6.12 and the host's kernel. `--only`
/// keeps the items (`demo`, `binary::test`) whose label contains one of its values.
pub fn vm(args: &[String]) -> Result<()> {
    let mut kernels: Vec<String> = Vec::new();
    let mut only_demo = false;
    let mut only: Vec<String> = Vec::new();
    let mut timeout = DEFAULT_ITEM_TIMEOUT;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--kernel" => {
                let k = args.next().context("--kernel 6.1|6.12|host|all")?;
                match k.as_str() {
                    "all" => kernels.extend(
                        SERIES
                            .iter()
                            .map(|s| s.label.to_string())
                            .chain(["host".to_string()]),
                    ),
                    "host" => kernels.push(k.clone()),
                    _ if SERIES.iter().any(|s| s.label == k) => kernels.push(k.clone()),
                    _ => bail!("--kernel {k}: expected 6.1, 6.12, host or all"),
                }
            }
            "--only-demo" => only_demo = true,
            "--only" => only.push(args.next().context("--only SUBSTRING")?.clone()),
            "--timeout" => {
                timeout = args
                    .next()
                    .context("--timeout SECS")?
                    .parse()
                    .context("--timeout SECS")?;
            }
            other => bail!(
                "cargo xtask vm: unknown argument {other:?} ([--kernel 6.1|6.12|host|all]... [--only-demo] [--only SUBSTRING]... [--timeout SECS])"
            ),
        }
    }
    if kernels.is_empty() {
        kernels.extend(SERIES.iter().map(|s| s.label.to_string()));
        kernels.push("host".to_string());
    }
    kernels.dedup();
    if is_not_root() {
        bail!("the kernel matrix installs packages and its guests load BPF programs: run as root");
    }
    let vng = install()?;
    let bins = binaries()?;
    // What the agent's probes find on this kernel (`features.log`), for the README's
    // kernel table and bug reports.
    let mut plan = vec![Item {
        label: "features".to_string(),
        command: vec![
            bins.xlb.display().to_string(),
            "inspect".into(),
            "features".into(),
        ],
    }];
    plan.push(Item {
        label: "demo".to_string(),
        command: vec![
            bins.xtask.display().to_string(),
            "demo".into(),
            "--no-build".into(),
        ],
    });
    if !only_demo {
        for &(bin, name, _) in CORE_TESTS {
            let path = bins
                .tests
                .get(bin)
                .with_context(|| format!("no test binary {bin:?} among the lab's"))?;
            plan.push(Item {
                label: format!("{bin}::{name}"),
                command: vec![
                    path.display().to_string(),
                    name.into(),
                    "--exact".into(),
                    "--test-threads=1".into(),
                    "--nocapture".into(),
                ],
            });
        }
    }
    if !only.is_empty() {
        plan.retain(|i| only.iter().any(|o| i.label.contains(o.as_str())));
        ensure!(!plan.is_empty(), "--only {only:?} keeps nothing to run");
    }
    let mut reports = Vec::new();
    for label in &kernels {
        let report = if label == "host" {
            run_host(&bins, &plan, timeout)?
        } else {
            let series = SERIES
                .iter()
                .find(|s| s.label == label)
                .context("unknown series")?;
            let kernel = kernel(series)?;
            run_guest(&vng, &kernel, &bins, &plan, timeout)?
        };
        eprint!("{}", report.render());
        reports.push(report);
    }
    let mut summary = String::from("\nxtask vm: kernel matrix\n");
    for r in &reports {
        summary.push_str(&r.render());
    }
    let summary_file = root().join("target/vm/summary.txt");
    std::fs::write(&summary_file, &summary)
        .with_context(|| format!("writing {}", summary_file.display()))?;
    eprint!("{summary}");
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    eprintln!("xtask vm: all passed");
    Ok(())
}

/// Installs what the matrix needs where it is missing (idempotent, saying what it
/// does): the Debian packages of [`VM_REQUIREMENTS`] and virtme-ng in a venv. Returns
/// the venv's bin directory (vng runs virtme-run from its PATH).
fn install() -> Result<PathBuf> {
    let missing: Vec<&str> = VM_REQUIREMENTS
        .iter()
        .filter(|(path, _, _)| !Path::new(path).exists())
        .map(|&(path, pkg, why)| {
            eprintln!("xtask vm: missing {path} ({why})");
            pkg
        })
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "xtask vm: installing Debian packages: {}",
            missing.join(" ")
        );
        apt_install(&missing)?;
    }
    let dir = vm_dir();
    let venv = dir.join("venv");
    let bin = venv.join("bin");
    let stamp = dir.join("venv-installed");
    let want = format!("virtme-ng=={VNG_VERSION}\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && bin.join("vng").exists() {
        return Ok(bin);
    }
    eprintln!(
        "xtask vm: installing virtme-ng {VNG_VERSION} from PyPI into {}",
        venv.display()
    );
    let venv_ok = Command::new("/usr/bin/python3")
        .args(["-c", "import ensurepip, venv"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !venv_ok {
        eprintln!("xtask vm: installing Debian packages: python3 python3-venv");
        apt_install(&["python3", "python3-venv"])?;
    }
    let _ = std::fs::remove_file(&stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    sh(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    sh(Command::new(bin.join("pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("virtme-ng=={VNG_VERSION}")))?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}

/// `apt-get update` and `apt-get install` of `pkgs`, without recommends.
fn apt_install(pkgs: &[&str]) -> Result<()> {
    sh(Command::new("apt-get").args(["update", "-q"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A kernel ready to boot: extracted from its Debian package.
struct Kernel {
    /// The series' label (`6.1`).
    label: String,
    /// The package and its version (`linux-image-6.1.0-57-amd64-unsigned 6.1.192-3`).
    package: String,
    /// The image virtme-ng boots; `lib/modules/<release>` is beside its `boot/`.
    vmlinuz: PathBuf,
}

/// The newest package of `series` apt offers; runs `apt-get update` when the lists
/// offer none (a fresh machine).
fn newest_package(series: &Series) -> Result<String> {
    let search = || -> Result<Option<String>> {
        let names =
            output(Command::new("apt-cache").args(["search", "--names-only", series.pattern]))?;
        Ok(names
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.ends_with("-amd64-unsigned") && !n.contains("-cloud-"))
            .max_by_key(|n| version_key(n))
            .map(str::to_string))
    };
    if let Some(pkg) = search()? {
        return Ok(pkg);
    }
    eprintln!(
        "xtask vm: apt's lists offer no {} kernel; apt-get update",
        series.label
    );
    sh(Command::new("apt-get").args(["update", "-q"]))?;
    search()?.with_context(|| {
        format!(
            "apt offers no package matching {} (Debian 12's {} kernel)",
            series.pattern, series.label
        )
    })
}

/// The numbers in a package name, in order, to compare `6.1.0-9` below `6.1.0-57`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// The newest kernel of `series`, downloaded and extracted into
/// [`vm_dir`]`/kernels/<release>` unless it already is (a stamp written last says so).
fn kernel(series: &Series) -> Result<Kernel> {
    let pkg = newest_package(series)?;
    let release = pkg
        .strip_prefix("linux-image-")
        .and_then(|p| p.strip_suffix("-unsigned"))
        .with_context(|| format!("unexpected kernel package name {pkg}"))?
        .to_string();
    let kernels = vm_dir().join("kernels");
    let dir = kernels.join(&release);
    let stamp = dir.join(".xlb-extracted");
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    if let Ok(package) = std::fs::read_to_string(&stamp)
        && package.starts_with(&format!("{pkg} "))
        && vmlinuz.is_file()
    {
        return Ok(Kernel {
            label: series.label.to_string(),
            package: package.trim().to_string(),
            vmlinuz,
        });
    }
    let debs = vm_dir().join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    eprintln!(
        "xtask vm: downloading {pkg} and extracting it into {} (not installed: only its image and modules are used)",
        dir.display()
    );
    let download = || {
        // As root, apt's download sandbox user cannot write here; download as root.
        sh(Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(&pkg))
    };
    if download().is_err() {
        eprintln!("xtask vm: download failed (stale package lists?); apt-get update and again");
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .with_context(|| format!("apt-get download left no {pkg}_*.deb in {}", debs.display()))?;
    let version = output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
    let tmp = kernels.join(format!(".{release}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    // The package's postinst would run depmod; virtme-ng and modprobe need modules.dep.
    sh(Command::new("depmod")
        .args(["-a", "-b"])
        .arg(&tmp)
        .arg(&release))?;
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    let package = format!("{pkg} {}", version.trim());
    std::fs::write(&stamp, format!("{package}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    std::fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    // Older releases of the series (about 500 MB each) are not booted again.
    for entry in std::fs::read_dir(&kernels)?.flatten() {
        let old = entry.path();
        let is_older = old != dir
            && std::fs::read_to_string(old.join(".xlb-extracted"))
                .is_ok_and(|p| p.starts_with(series.prefix));
        if is_older {
            eprintln!(
                "xtask vm: removing {}, replaced by {release}",
                old.display()
            );
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    ensure!(vmlinuz.is_file(), "{pkg} has no {}", vmlinuz.display());
    Ok(Kernel {
        label: series.label.to_string(),
        package,
        vmlinuz,
    })
}

/// The host-built binaries a guest runs.
struct Binaries {
    /// target/release/xlb (`XLB_BIN` inside).
    xlb: PathBuf,
    /// This xtask, which runs the demo (`demo --no-build`) and the guest side
    /// (`vm-guest`).
    xtask: PathBuf,
    /// The lab's test binaries by target name (`agent`, `cluster`, ...).
    tests: BTreeMap<String, PathBuf>,
}

/// Builds xlb and the lab's test binaries (no-ops when they are up to date) and finds
/// the test binaries' paths in cargo's JSON messages.
fn binaries() -> Result<Binaries> {
    let xlb = build()?;
    eprintln!(
        "xtask vm: building the lab's test binaries (cargo test --release -p xlb-lab --no-run)"
    );
    let out = Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--release",
            "-p",
            "xlb-lab",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "cargo test --release -p xlb-lab --no-run failed: {}",
        out.status
    );
    let mut tests = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if msg["reason"] == "compiler-artifact"
            && is_test
            && let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            tests.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let xtask = std::env::current_exe().context("this xtask's path")?;
    Ok(Binaries { xlb, xtask, tests })
}

/// One run inside a guest: its label in the report and its command line.
struct Item {
    /// `demo` or `binary::test`.
    label: String,
    /// Program and arguments.
    command: Vec<String>,
}

/// Writes the plan the guest side reads: one item a line, `label\tprogram\targs...`.
fn write_plan(out: &Path, plan: &[Item], timeout: u64, xlb: &Path) -> Result<()> {
    let mut text = format!("timeout\t{timeout}\nxlb\t{}\n", xlb.display());
    for item in plan {
        writeln!(text, "run\t{}\t{}", item.label, item.command.join("\t"))?;
    }
    let file = out.join("plan");
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))
}

/// A fresh results directory for `label`: target/vm/<label>.
fn fresh_out(label: &str) -> Result<PathBuf> {
    let out = root().join("target/vm").join(label);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

/// Boots `kernel` and runs `plan` inside; the guest writes its results into the
/// results directory, shared read-write (`--rwdir`). The console goes to
/// `console.log` there; the guest's progress lines are echoed as they come.
fn run_guest(
    vng: &Path,
    kernel: &Kernel,
    bins: &Binaries,
    plan: &[Item],
    timeout: u64,
) -> Result<Report> {
    let out = fresh_out(&kernel.label)?;
    write_plan(&out, plan, timeout, &bins.xlb)?;
    // Each item is bounded inside; this bounds a guest that hangs in boot or between
    // items. qemu is vng's own process (vng execs it), so timeout's signal reaches it.
    let budget = BOOT_ALLOWANCE + (timeout + 30) * plan.len() as u64;
    let inner = format!("{} vm-guest {}", bins.xtask.display(), out.display());
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=30", &budget.to_string()])
        .arg(vng.join("vng"))
        .arg("--verbose")
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args([
            "--disable-kvm",
            "--user",
            "root",
            "--memory",
            "3G",
            "--cpus",
            "2",
        ])
        // The lab's sockets and fifos live under /tmp, which 9p cannot share
        // read-write: an overlay keeps it writable inside, the host's untouched.
        .args(["--overlay-rwdir", "/tmp"])
        .arg("--rwdir")
        .arg(&out)
        .arg("--")
        .arg(&inner)
        .current_dir(root())
        .env(
            "PATH",
            format!(
                "{}:{}",
                vng.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    eprintln!(
        "xtask vm: booting {} ({}) under software emulation; console in {}",
        kernel.label,
        kernel.package,
        out.join("console.log").display()
    );
    let started = Instant::now();
    let status = stream(cmd, &out.join("console.log"))?;
    let wall = started.elapsed().as_secs();
    let mut report = Report::read(&kernel.label, &kernel.package, &out, plan, wall)?;
    if !status.success() && report.release.is_none() {
        report.note = format!("vng exited with {status} before the guest started");
    }
    Ok(report)
}

/// Runs `plan` on the machine's own kernel, with the same guest side as a VM.
fn run_host(bins: &Binaries, plan: &[Item], timeout: u64) -> Result<Report> {
    let out = fresh_out("host")?;
    write_plan(&out, plan, timeout, &bins.xlb)?;
    eprintln!("xtask vm: running on the machine's own kernel (no VM)");
    let started = Instant::now();
    let mut cmd = Command::new(&bins.xtask);
    cmd.arg("vm-guest").arg(&out);
    stream(cmd, &out.join("console.log"))?;
    let wall = started.elapsed().as_secs();
    let mut report = Report::read("host", "the machine's own kernel", &out, plan, wall)?;
    // The host's uptime says nothing about a boot.
    report.boot_secs = None;
    Ok(report)
}

/// Runs `cmd` with stdout and stderr, through one pipe, into `log`, echoing the guest
/// side's progress lines (`xtask vm-guest: ...`) to stderr as they arrive (the guest's
/// console reaches vng's output, kernel messages with it).
fn stream(mut cmd: Command, log: &Path) -> Result<std::process::ExitStatus> {
    let mut file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (reader, writer) = std::io::pipe()?;
    let mut child = cmd
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    // The command holds the pipe's write end until dropped: the reader would never end.
    drop(cmd);
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        file.write_all(&line)?;
        let text = String::from_utf8_lossy(&line);
        if let Some(at) = text.find("xtask vm-guest:") {
            eprint!("{}", &text[at..]);
        }
    }
    Ok(child.wait()?)
}

/// One kernel's results.
struct Report {
    /// `6.1`, `6.12`, `host`.
    label: String,
    /// The package booted.
    package: String,
    /// `uname -r` inside, if the guest side started.
    release: Option<String>,
    /// Seconds from the guest kernel's start to the guest side's start.
    boot_secs: Option<f64>,
    /// Host wall-clock seconds for the whole run (boot, items, shutdown).
    wall_secs: u64,
    /// Per item: (label, verdict, seconds); items that never ran are `NOT RUN`.
    items: Vec<(String, String, f64)>,
    /// Why the run ended early, if it did.
    note: String,
    /// The results directory (each item's log is there).
    out: PathBuf,
}

impl Report {
    /// Reads what the guest side wrote into `out`: `booted` and `results`.
    fn read(label: &str, package: &str, out: &Path, plan: &[Item], wall_secs: u64) -> Result<Self> {
        let booted = std::fs::read_to_string(out.join("booted")).ok();
        let mut release = None;
        let mut boot_secs = None;
        for line in booted.iter().flat_map(|b| b.lines()) {
            if let Some(r) = line.strip_prefix("release ") {
                release = Some(r.to_string());
            } else if let Some(u) = line.strip_prefix("uptime ") {
                boot_secs = u.parse().ok();
            }
        }
        let results = std::fs::read_to_string(out.join("results")).unwrap_or_default();
        let mut done: BTreeMap<&str, (String, f64)> = BTreeMap::new();
        for line in results.lines() {
            let mut f = line.split('\t');
            if let (Some(l), Some(v), Some(s)) = (f.next(), f.next(), f.next()) {
                done.insert(l, (v.to_string(), s.parse().unwrap_or(0.0)));
            }
        }
        let items = plan
            .iter()
            .map(|i| {
                let (v, s) = done
                    .get(i.label.as_str())
                    .cloned()
                    .unwrap_or(("NOT RUN".to_string(), 0.0));
                (i.label.clone(), v, s)
            })
            .collect();
        let note = if release.is_none() {
            "did not boot (see console.log)".to_string()
        } else if !out.join("done").exists() {
            "the guest stopped before its last item (timeout or crash; see console.log)".to_string()
        } else {
            String::new()
        };
        Ok(Report {
            label: label.to_string(),
            package: package.to_string(),
            release,
            boot_secs,
            wall_secs,
            items,
            note,
            out: out.to_path_buf(),
        })
    }

    /// Booted, and every item passed.
    fn passed(&self) -> bool {
        self.release.is_some() && self.items.iter().all(|(_, v, _)| v == "PASS")
    }

    /// The report as printed and written to target/vm/summary.txt.
    fn render(&self) -> String {
        let mut s = format!(
            "kernel {} ({}): {}, {} s in all",
            self.label,
            self.package,
            match (&self.release, self.boot_secs) {
                (Some(r), Some(b)) => format!("booted {r}, guest side started at {b:.1} s"),
                (Some(r), None) => format!("running {r}"),
                _ => "NOT BOOTED".to_string(),
            },
            self.wall_secs
        );
        if !self.note.is_empty() {
            write!(s, "; {}", self.note).ok();
        }
        s.push('\n');
        for (label, verdict, secs) in &self.items {
            write!(s, "  {verdict:<8} {secs:>7.1} s  {label}").ok();
            if verdict != "PASS" && verdict != "NOT RUN" {
                let log = self.out.join(format!("{}.log", label.replace("::", "-")));
                write!(s, "  ({})", log.display()).ok();
            }
            s.push('\n');
        }
        s
    }
}

/// `xtask vm-guest DIR`: the side that runs inside a guest (or on the host for
/// `--kernel host`). Prepares what the lab needs that a fresh guest lacks (bpffs,
/// /run/netns, modules), writes `booted`, runs each item of `DIR/plan` bounded by
/// `timeout`, appending `label\tPASS|FAIL|TIMEOUT\tseconds` to `DIR/results` as each
/// ends (so a guest that dies keeps what it did), with each item's output in
/// `DIR/<label>.log`, and writes `done` at the end.
pub fn guest(args: &[String]) -> Result<()> {
    let out = PathBuf::from(args.first().context("xtask vm-guest DIR")?);
    let plan = std::fs::read_to_string(out.join("plan")).context("reading the plan")?;
    let mut timeout = DEFAULT_ITEM_TIMEOUT;
    let mut xlb = String::new();
    let mut items = Vec::new();
    for line in plan.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["timeout", t] => timeout = t.parse().context("plan: timeout")?,
            ["xlb", x] => xlb = (*x).to_string(),
            ["run", label, program, args @ ..] => items.push((*label, *program, args.to_vec())),
            _ => bail!("plan: unexpected line {line:?}"),
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let uptime = std::fs::read_to_string("/proc/uptime")?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_string();
    println!("xtask vm-guest: kernel {release}, up {uptime} s");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
        let _ = sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
    std::fs::create_dir_all("/run/netns")?;
    if Path::new("/lib/modules").join(&release).is_dir() {
        for m in GUEST_MODULES {
            if !Command::new("modprobe").arg(m).status()?.success() {
                println!("xtask vm-guest: modprobe {m} failed");
            }
        }
    }
    std::fs::write(
        out.join("booted"),
        format!("release {release}\nuptime {uptime}\n"),
    )?;
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("results"))?;
    for (label, program, args) in items {
        println!("xtask vm-guest: {label} ...");
        let log = std::fs::File::create(out.join(format!("{}.log", label.replace("::", "-"))))?;
        let started = Instant::now();
        let status = Command::new("timeout")
            .args(["--kill-after=15", &timeout.to_string(), program])
            .args(&args)
            .env("XLB_BIN", &xlb)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        let secs = started.elapsed().as_secs_f64();
        let verdict = match status.code() {
            Some(0) => "PASS",
            Some(124) | Some(137) => "TIMEOUT",
            _ => "FAIL",
        };
        println!("xtask vm-guest: {label} {verdict} in {secs:.1} s");
        writeln!(results, "{label}\t{verdict}\t{secs:.1}")?;
        results.flush()?;
    }
    std::fs::write(out.join("done"), "")?;
    Ok(())
}
