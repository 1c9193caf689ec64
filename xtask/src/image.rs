//! `cargo xtask image`: the agent's OCI image, built from nothing (no base image, no
//! registry): the release binary without its debug sections, the shared libraries it
//! links (read from `ldd`) at the paths it asks for, and empty mount points. Buildah
//! (vfs storage, kept under `target/image/`) commits it with every timestamp at the
//! epoch, so the same binary always gives the same digest. The result is an OCI
//! layout directory, `target/image/oci`, tagged with the workspace version: the
//! name deploy/ and the Helm chart refer to ([`IMAGE_NAME`]).
//!
//! `cargo xtask test` checks it with [`check`]: umoci unpacks the layout, and the demo
//! runs with the agent started from the unpacked root filesystem (chroot, in a mount
//! namespace of its own with the host's /proc, /sys, /dev, /run and /tmp bound in, as
//! the DaemonSet mounts them), so the demo's traffic passes through an agent that came
//! from the image.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{build, output, root, sh};

/// The repository the deploy files and the Helm chart pull from.
pub const IMAGE_NAME: &str = "ghcr.io/xlb-dev/xlb";
/// The tag: the workspace version (agent and xtask share it).
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// Where the agent sits in the image (the DaemonSet's `command`/entrypoint).
const BIN_IN_IMAGE: &str = "usr/local/bin/xlb";
/// Empty directories a container runtime mounts over (and /tmp, writable).
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "run", "tmp", "etc"];

/// What [`build_image`] made.
pub struct Image {
    /// The OCI layout directory (`oci:DIR:TAG` for skopeo, `DIR:TAG` for umoci).
    pub layout: PathBuf,
    /// The manifest's digest (`sha256:...`), what a registry will call it too.
    pub digest: String,
    /// The uncompressed size of the one layer, in bytes.
    pub layer_bytes: u64,
}

fn image_dir() -> PathBuf {
    root().join("target/image")
}

/// Buildah with its storage kept in the build tree (vfs: no overlay mounts needed).
fn buildah() -> Command {
    let dir = image_dir();
    let mut cmd = Command::new("buildah");
    cmd.arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"]);
    cmd
}

/// `cargo xtask image [--check]`: builds the binary, then the image; prints where it
/// is, its digest, and how to push it.
/// `--check` runs the image test ([`check`]) instead.
pub fn image(args: &[String]) -> Result<()> {
    let bin = match args {
        [] => build()?,
        [flag] if flag == "--check" => return check(&build()?),
        _ => bail!("cargo xtask image [--check]"),
    };
    let img = build_image(&bin)?;
    println!(
        "xtask image: {IMAGE_NAME}:{TAG} in {} ({}, layer {:.1} MB)",
        img.layout.display(),
        img.digest,
        img.layer_bytes as f64 / 1e6
    );
    println!(
        "xtask image: push it with `skopeo copy oci:{}:{TAG} docker://REGISTRY/xlb:{TAG}`",
        img.layout.display()
    );
    Ok(())
}

/// Stages the root filesystem for `bin` and commits it as `target/image/oci:TAG`.
pub fn build_image(bin: &Path) -> Result<Image> {
    let dir = image_dir();
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    for d in MOUNT_POINTS {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let target = rootfs.join(BIN_IN_IMAGE);
    std::fs::create_dir_all(target.parent().context("binary path has a parent")?)?;
    // The debug sections are most of the release binary (built with debuginfo for
    // backtraces and perf on the lab machine); the image does not need them.
    sh(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&target))?;
    for lib in shared_libraries(bin)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib);
        let to = rootfs.join(rel);
        std::fs::create_dir_all(to.parent().context("library path has a parent")?)?;
        // The resolved file, copied as a regular file to the path the binary asks for
        // (Debian's /lib64 and /lib are symlinks; a scratch image has no such links).
        let from =
            std::fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }

    let layout = dir.join("oci");
    if layout.exists() {
        std::fs::remove_dir_all(&layout)?;
    }
    let container = format!("xlb-image-{}", std::process::id());
    let ctr = output(buildah().args(["from", "--name", &container, "scratch"]))?;
    let ctr = ctr.trim().to_string();
    let committed = (|| -> Result<()> {
        sh(buildah()
            .args(["copy", "--quiet", &ctr])
            .arg(format!("{}/", rootfs.display()))
            .arg("/"))?;
        sh(buildah().args([
            "config",
            "--entrypoint",
            &format!("[\"/{BIN_IN_IMAGE}\"]"),
            "--cmd",
            "[\"--help\"]",
            "--label",
            &format!("org.opencontainers.image.version={TAG}"),
            "--label",
            "org.opencontainers.image.title=xlb",
            &ctr,
        ]))?;
        // --timestamp 0: the config's creation time and every file in the layer at
        // the epoch, so the digest depends on the files alone.
        sh(buildah()
            .args([
                "commit",
                "--quiet",
                "--timestamp",
                "0",
                "--format",
                "oci",
                &ctr,
            ])
            .arg(format!("oci:{}:{TAG}", layout.display())))?;
        Ok(())
    })();
    // The working container is scratch state either way.
    let _ = buildah().args(["rm", &ctr]).output();
    committed?;
    let (digest, layer_bytes) = manifest_facts(&layout)?;
    Ok(Image {
        layout,
        digest,
        layer_bytes,
    })
}

/// The shared objects `ldd` says `bin` loads, the dynamic loader included.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        // "linux-vdso.so.1 (0x...)" (in the kernel: nothing to copy).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => bail!("ldd {}: a library is missing: {line}", bin.display()),
            _ => {}
        }
    }
    ensure!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "ldd {} found no libc: {out}",
        bin.display()
    );
    Ok(libs)
}

/// The manifest digest of the layout's one image and its layer's size.
fn manifest_facts(layout: &Path) -> Result<(String, u64)> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?
        .to_string();
    let hex = digest
        .strip_prefix("sha256:")
        .context("manifest digest is not sha256")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex))?)?;
    let layer_bytes = manifest["layers"]
        .as_array()
        .context("manifest lists no layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    Ok((digest, layer_bytes))
}

/// Checks that deploy/ and the Helm chart name the image this builds.
fn check_references() -> Result<()> {
    let root = root();
    let want = format!("image: {IMAGE_NAME}:{TAG}");
    let ds = std::fs::read_to_string(root.join("deploy/daemonset.yaml"))?;
    ensure!(
        ds.lines().any(|l| l.trim() == want),
        "deploy/daemonset.yaml does not say `{want}`"
    );
    let chart = std::fs::read_to_string(root.join("deploy/helm/xlb/Chart.yaml"))?;
    ensure!(
        chart
            .lines()
            .any(|l| l.trim() == format!("appVersion: \"{TAG}\"")),
        "deploy/helm/xlb/Chart.yaml: appVersion is not \"{TAG}\""
    );
    let values = std::fs::read_to_string(root.join("deploy/helm/xlb/values.yaml"))?;
    ensure!(
        values
            .lines()
            .any(|l| l.trim() == format!("repository: {IMAGE_NAME}")),
        "deploy/helm/xlb/values.yaml: image.repository is not {IMAGE_NAME}"
    );
    Ok(())
}

/// The image test (`cargo xtask test`): builds the image twice from `bin` (the same
/// digest both times), unpacks it with umoci, and runs the demo with the agent from
/// its root filesystem.
pub fn check(bin: &Path) -> Result<()> {
    check_references()?;
    let first = build_image(bin)?;
    let second = build_image(bin)?;
    ensure!(
        first.digest == second.digest,
        "the image is not reproducible: {} then {}",
        first.digest,
        second.digest
    );
    eprintln!(
        "xtask image: {IMAGE_NAME}:{TAG} {} (layer {:.1} MB), the same digest twice",
        first.digest,
        first.layer_bytes as f64 / 1e6
    );
    let scratch = std::env::temp_dir().join(format!("xlb-image-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = run_demo_from_image(&second, &scratch);
    // The bind mounts live in the agent's own mount namespace; never delete through
    // one that somehow shows here (it would reach the host's /sys or /tmp).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = scratch.to_string_lossy().to_string();
    if mountinfo.lines().any(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|m| m.starts_with(&prefix))
    }) {
        bail!(
            "mounts under {} are visible here: left in place, not deleted",
            scratch.display()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_demo_from_image(img: &Image, scratch: &Path) -> Result<()> {
    let bundle = scratch.join("bundle");
    sh(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{TAG}", img.layout.display()))
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    ensure!(
        rootfs.join(BIN_IN_IMAGE).is_file(),
        "the unpacked image has no /{BIN_IN_IMAGE}"
    );
    // The demo's manifests, where the chrooted agent can read them (/tmp is bound in).
    let manifests = scratch.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    for entry in std::fs::read_dir(root().join("deploy/examples"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), manifests.join(entry.file_name()))?;
        }
    }
    // The lab runs `WRAPPER agent ...` under nsenter and stops it by PID: every step
    // execs, so that PID is the agent's own. The mount namespace (and with it every
    // bind mount) goes away with the agent.
    let wrapper = scratch.join("xlb-from-image");
    std::fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
# xlb from the unpacked image {digest}: chroot into its root filesystem with the
# host's /proc, /sys (bpffs included), /dev, /run and /tmp bound in.
exec unshare --mount --propagation private -- /bin/sh -c '
r="$0"
for d in proc sys dev run tmp; do mount --rbind "/$d" "$r/$d" || exit 1; done
exec chroot "$r" /{BIN_IN_IMAGE} "$@"' '{rootfs}' "$@"
"#,
            digest = img.digest,
            rootfs = rootfs.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    eprintln!("xtask image: the demo, with the agent from the unpacked image");
    let passed = xlb_lab::demo::run(&wrapper, &manifests)?;
    ensure!(passed, "the demo through the image's agent: FAIL");
    Ok(())
}
