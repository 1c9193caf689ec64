//! FRR (Debian bookworm's `frr`, 8.4) as the lab's BGP router: zebra, bfdd and bgpd run
//! as child processes in the foreground inside a lab namespace, with every path of
//! their own (configuration files, vty sockets, zserv socket, bfdd control socket, pid
//! files, logs) in one directory of the lab's scratch directory. Nothing is shared with
//! the host's `frr.service` (which `cargo xtask setup` stops and disables): without the
//! per-run zserv path a lab bgpd would hand its routes to the host's zebra.
//!
//! zebra installs what bgpd selects into the namespace's kernel table (ECMP as kernel
//! nexthop groups), so [`crate::router::next_hops`] reads FRR's forwarding decision
//! the same way it reads BIRD's. `vtysh --vty_socket DIR` queries the daemons (JSON).
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, output};
use crate::poll;
use crate::router::{NODE_ASN, ROUTER_ASN};

/// Where Debian's frr package puts its daemons.
pub const FRR_DIR: &str = "/usr/lib/frr";
/// FRR's shell, the only way to talk to the daemons.
pub const VTYSH_BIN: &str = "/usr/bin/vtysh";

/// The configuration of each FRR daemon the lab runs (integrated `frr.conf` needs
/// watchfrr; separate files let each daemon read its own with `-f`).
#[derive(Debug, Clone, Default)]
pub struct FrrConfig {
    /// bgpd.conf: `router bgp ...`.
    pub bgpd: String,
    /// bfdd.conf (`bfd` profiles); `None`: no bfdd.
    pub bfdd: Option<String>,
}

/// zebra, (bfdd) and bgpd in one namespace; killed by PID on drop.
pub struct Frr {
    ns: PathBuf,
    dir: PathBuf,
    /// (daemon, process), in start order.
    children: Vec<(&'static str, Child)>,
}

impl Frr {
    /// Writes the daemons' configurations into `dir`, starts zebra, then bfdd (if
    /// configured), then bgpd in `ns`, each in the foreground, and waits until each
    /// answers on its vty socket. A daemon that exits early fails the start with its
    /// log.
    pub fn start(ns: &Netns, dir: &Path, config: &FrrConfig) -> Result<Frr> {
        for bin in ["zebra", "bgpd", "bfdd"] {
            let path = Path::new(FRR_DIR).join(bin);
            if !path.is_file() {
                bail!(
                    "{} is missing (Debian package frr): run `cargo xtask setup`",
                    path.display()
                );
            }
        }
        if !Path::new(VTYSH_BIN).is_file() {
            bail!("{VTYSH_BIN} is missing (Debian package frr): run `cargo xtask setup`");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut frr = Frr {
            ns: ns.path(),
            dir: dir.to_path_buf(),
            children: Vec::new(),
        };
        let log_line = |d: &str| {
            format!(
                "log file {} debugging\n",
                dir.join(format!("{d}.log")).display()
            )
        };
        std::fs::write(dir.join("zebra.conf"), log_line("zebra"))?;
        frr.spawn("zebra", &["-s", "90000000"])?;
        if let Some(bfdd) = &config.bfdd {
            std::fs::write(dir.join("bfdd.conf"), format!("{}{bfdd}", log_line("bfdd")))?;
            let ctl = dir.join("bfdd.sock");
            let ctl = ctl.to_string_lossy().into_owned();
            frr.spawn("bfdd", &["--bfdctl", &ctl])?;
        }
        std::fs::write(
            dir.join("bgpd.conf"),
            format!("{}{}", log_line("bgpd"), config.bgpd),
        )?;
        frr.spawn("bgpd", &[])?;
        Ok(frr)
    }

    /// Starts `/usr/lib/frr/{daemon}` with this run's paths and waits for its vty.
    /// `-u root -g frrvty`: FRR refuses a run group that is not its vty group, and root
    /// keeps every file in the scratch directory ours.
    fn spawn(&mut self, daemon: &'static str, extra: &[&str]) -> Result<()> {
        let dir = self.dir.clone();
        let path = |name: &str| dir.join(name);
        let stderr = std::fs::File::create(path(&format!("{daemon}.stderr")))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .arg("--")
            .arg(Path::new(FRR_DIR).join(daemon))
            .arg("-f")
            .arg(path(&format!("{daemon}.conf")))
            .arg("--vty_socket")
            .arg(&self.dir)
            .arg("-i")
            .arg(path(&format!("{daemon}.pid")))
            .arg("-z")
            .arg(path("zserv.api"))
            .args(["-u", "root", "-g", "frrvty", "-P", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting FRR's {daemon}"))?;
        self.children.push((daemon, child));
        poll(
            &format!("FRR's {daemon} answers on its vty socket"),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                if let Some((_, c)) = self.children.last_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!(
                        "FRR's {daemon} exited with {status}:\n{}\n{}",
                        std::fs::read_to_string(path(&format!("{daemon}.stderr")))
                            .unwrap_or_default(),
                        self.log_tail(daemon, 20)
                    );
                }
                Ok(self.vtysh_daemon(daemon, &["show version"]).ok())
            },
        )?;
        Ok(())
    }

    fn vtysh_daemon(&self, daemon: &str, commands: &[&str]) -> Result<String> {
        let mut cmd = Command::new(VTYSH_BIN);
        cmd.arg("--vty_socket").arg(&self.dir).args(["-d", daemon]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        vtysh_output(&mut cmd, commands)
    }

    /// `vtysh -c C1 -c C2 ...`'s output (every daemon that runs, as vtysh routes each
    /// command).
    pub fn vtysh(&self, commands: &[&str]) -> Result<String> {
        let mut cmd = Command::new(VTYSH_BIN);
        cmd.arg("--vty_socket").arg(&self.dir);
        for c in commands {
            cmd.args(["-c", c]);
        }
        vtysh_output(&mut cmd, commands)
    }

    /// `vtysh -c COMMAND` parsed as JSON (COMMAND ends in `json`).
    pub fn vtysh_json(&self, command: &str) -> Result<serde_json::Value> {
        let out = self.vtysh(&[command])?;
        serde_json::from_str(&out).with_context(|| format!("{command}: not JSON:\n{out}"))
    }

    /// bgpd's state of the session with `neighbor` (`Established`, `Active`, ...).
    pub fn bgp_state(&self, neighbor: Ipv4Addr) -> Result<String> {
        let v = self.vtysh_json(&format!("show bgp neighbors {neighbor} json"))?;
        v[neighbor.to_string()]["bgpState"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no bgpState for {neighbor} in {v}"))
    }

    /// The BFD peers bfdd has Up.
    pub fn bfd_up(&self) -> Result<Vec<Ipv4Addr>> {
        let v = self.vtysh_json("show bfd peers json")?;
        let mut up: Vec<Ipv4Addr> = v
            .as_array()
            .with_context(|| format!("show bfd peers json: {v}"))?
            .iter()
            .filter(|p| p["status"] == "up")
            .filter_map(|p| p["peer"].as_str()?.parse().ok())
            .collect();
        up.sort();
        Ok(up)
    }

    /// The last `n` lines of `daemon`'s log (`bgpd`, `zebra`, `bfdd`).
    pub fn log_tail(&self, daemon: &str, n: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{daemon}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the daemons, last started first (SIGTERM by PID, SIGKILL after a second:
    /// bgpd before zebra, so zebra removes the routes it installed on its way out).
    pub fn stop(&mut self) -> Result<()> {
        while let Some((_, mut child)) = self.children.pop() {
            let pid = libc::pid_t::try_from(child.id())?;
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn vtysh_output(cmd: &mut Command, commands: &[&str]) -> Result<String> {
    let out = output(cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // vtysh prints a rejected command's error on stdout ("% Unknown command") and may
    // still exit 0.
    if !out.status.success() || stdout.trim_start().starts_with('%') {
        bail!(
            "vtysh {commands:?}: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// The configuration of an FRR router `router_id` (AS [`ROUTER_ASN`]) peering with
/// each of `nodes` (name, address; AS [`NODE_ASN`]): IPv4 unicast learned into the
/// kernel table with ECMP over up to 8 paths, eBGP without a policy requirement (the
/// lab router accepts what the nodes announce), graceful restart (restarting and
/// helper), hold time 9 s. `extra(node)` lists more `neighbor ADDR ...` attributes for
/// that node (`password KEY`). With `bfd`, a bfdd profile `fast` with MetalLB's default
/// timers (300 ms × 3) on every neighbour.
pub fn frr_config(
    router_id: Ipv4Addr,
    nodes: &[(String, Ipv4Addr)],
    bfd: bool,
    extra: impl Fn(&str) -> Vec<String>,
) -> FrrConfig {
    let mut c = format!(
        "debug bgp neighbor-events\n\
         debug bgp updates\n\
         debug bgp graceful-restart\n\
         router bgp {ROUTER_ASN}\n \
         bgp router-id {router_id}\n \
         no bgp ebgp-requires-policy\n \
         no bgp default ipv4-unicast\n \
         bgp graceful-restart\n \
         bgp log-neighbor-changes\n"
    );
    for (name, addr) in nodes {
        c.push_str(&format!(
            " neighbor {addr} remote-as {NODE_ASN}\n neighbor {addr} description {name}\n \
             neighbor {addr} timers 3 9\n"
        ));
        if bfd {
            c.push_str(&format!(" neighbor {addr} bfd profile fast\n"));
        }
        for e in extra(name) {
            c.push_str(&format!(" neighbor {addr} {e}\n"));
        }
    }
    c.push_str(" address-family ipv4 unicast\n  maximum-paths 8\n");
    for (_, addr) in nodes {
        c.push_str(&format!("  neighbor {addr} activate\n"));
    }
    c.push_str(" exit-address-family\nexit\n");
    FrrConfig {
        bgpd: c,
        bfdd: bfd.then(|| {
            "debug bfd peer\nbfd\n profile fast\n  detect-multiplier 3\n  receive-interval 300\n  \
             transmit-interval 300\n exit\nexit\n"
                .to_string()
        }),
    }
}
