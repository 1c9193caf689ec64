//! Real routers for the BGP tests: Debian's BIRD 2 running in a lab namespace with its
//! own configuration, control socket and log in the lab's scratch directory, and a
//! second namespace "outside" it where clients reach the VIPs through the router.
//!
//! The router's kernel table is the point: `ip route show VIP` in its namespace says
//! which next hops (nodes) the router really forwards to, ECMP included.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, output};
use crate::poll;
use crate::traffic::Host;

/// BIRD 2 (Debian package bird2).
pub const BIRD_BIN: &str = "/usr/sbin/bird";
/// BIRD's control client.
pub const BIRDC_BIN: &str = "/usr/sbin/birdc";
/// The router's AS: a 4-octet private one (RFC 6996).
pub const ROUTER_ASN: u32 = 4_200_000_001;
/// The nodes' AS (eBGP to the router).
pub const NODE_ASN: u32 = 4_200_000_002;
/// The outside client's address, behind the router (`10.0.250.0/24`).
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 250, 2);
/// The router's address towards the outside client.
pub const OUTSIDE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 250, 1);
/// The outside network, routed by nodes via the router.
pub const OUTSIDE_NET: &str = "10.0.250.0/24";

/// One BIRD process; killed by PID on drop.
pub struct Bird {
    ns: PathBuf,
    conf: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Bird {
    /// Writes `config` to `{dir}/bird.conf` (after a `log` line pointing at
    /// `{dir}/bird.log`), starts BIRD in `ns` in the foreground and waits until its
    /// control socket answers.
    pub fn start(ns: &Netns, dir: &Path, config: &str) -> Result<Bird> {
        if !Path::new(BIRD_BIN).is_file() {
            bail!("{BIRD_BIN} is missing (Debian package bird2): run `cargo xtask setup`");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("bird.log");
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, format!("log \"{}\" all;\n{config}", log.display()))?;
        let mut bird = Bird {
            ns: ns.path(),
            conf,
            socket: dir.join("bird.ctl"),
            log,
            child: None,
        };
        bird.spawn()?;
        Ok(bird)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .arg("--")
            .arg(BIRD_BIN)
            .arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bird")?;
        self.child = Some(child);
        poll(
            "bird answers on its control socket",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                if let Some(c) = self.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!("bird exited with {status}; log:\n{}", self.log_tail(30));
                }
                Ok(self.birdc(&["show", "status"]).ok())
            },
        )?;
        Ok(())
    }

    /// Replaces the configuration (as [`Bird::start`] writes it) and has BIRD load it
    /// (`birdc configure`): protocols whose options changed restart, as on a router
    /// whose operator changed them.
    pub fn reconfigure(&self, config: &str) -> Result<()> {
        std::fs::write(
            &self.conf,
            format!("log \"{}\" all;\n{config}", self.log.display()),
        )?;
        let out = self.birdc(&["configure"])?;
        if !out.contains("Reconfigur") {
            bail!("birdc configure: {out}");
        }
        Ok(())
    }

    /// `birdc -s SOCKET ARGS...`'s output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = output(
            std::process::Command::new(BIRDC_BIN)
                .arg("-s")
                .arg(&self.socket)
                .args(args),
        )?;
        if !out.status.success() {
            bail!(
                "birdc {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The state column of `show protocols` for `name` (`Established`, `Active`, ...).
    pub fn bgp_state(&self, name: &str) -> Result<String> {
        let out = self.birdc(&["show", "protocols", name])?;
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no protocol {name} in:\n{out}"))?;
        // name proto table state since info
        Ok(line
            .split_whitespace()
            .nth(5)
            .unwrap_or_default()
            .to_string())
    }

    /// The last `n` lines of BIRD's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops BIRD (SIGTERM by PID, then SIGKILL after a second).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The next hops of `prefix` in `ns`'s main table, sorted (`ip route show`: one
/// `via` for a single path, `nexthop via` lines for ECMP); empty when there is no
/// such route.
pub fn next_hops(ns: &Netns, prefix: &str) -> Result<Vec<Ipv4Addr>> {
    let out = ns.ip(&["-4", "route", "show", "exact", prefix])?;
    let mut hops: Vec<Ipv4Addr> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    hops.sort();
    Ok(hops)
}

/// Makes `router` (a lab namespace with the LAN) forward for a new namespace
/// `{name}` behind it (`OUTSIDE_ADDR`, default route via the router), with per-flow
/// (L4) ECMP hashing as routers in front of load balancers use. Returns the outside
/// host.
pub fn outside_host(router: &Netns, name: &str) -> Result<Host> {
    let ns = Netns::create(name)?;
    router.ip(&[
        "link",
        "add",
        "ext0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    router.ip(&[
        "addr",
        "add",
        &format!("{OUTSIDE_GATEWAY}/24"),
        "dev",
        "ext0",
    ])?;
    router.ip(&["link", "set", "ext0", "up"])?;
    ns.ip(&["addr", "add", &format!("{OUTSIDE_ADDR}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &OUTSIDE_GATEWAY.to_string(),
    ])?;
    router.sysctl("net/ipv4/ip_forward", "1")?;
    router.sysctl("net/ipv4/fib_multipath_hash_policy", "1")?;
    Ok(Host::new(ns, OUTSIDE_ADDR))
}

/// A BIRD 2 configuration for the router `router_id`: BGP sessions to each of
/// `nodes` (name, address) learning their routes into the kernel table, ECMP merged
/// (`merge paths`). `extra(node)` goes into that node's BGP protocol (timers,
/// graceful restart, BFD, passwords). With `bfd`, a BFD protocol on `eth0` with
/// MetalLB's default profile timers (300 ms × 3).
pub fn bird_config(
    router_id: Ipv4Addr,
    nodes: &[(String, Ipv4Addr)],
    bfd: bool,
    extra: impl Fn(&str) -> String,
) -> String {
    let mut c = format!(
        "router id {router_id};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n"
    );
    if bfd {
        c.push_str(
            "protocol bfd { interface \"eth0\" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }; }\n",
        );
    }
    for (name, addr) in nodes {
        let proto = name.replace('-', "_");
        c.push_str(&format!(
            "protocol bgp {proto} {{\n  local {router_id} as {ROUTER_ASN};\n  neighbor {addr} as {NODE_ASN};\n  \
             ipv4 {{ import all; export none; }};\n  debug {{ states, events }};\n{}\n}}\n",
            extra(name)
        ));
    }
    c
}
