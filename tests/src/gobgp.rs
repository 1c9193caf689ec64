//! GoBGP (Debian's `gobgpd` 3.10) as the lab's BGP router: one `gobgpd` in the
//! foreground inside a lab namespace with its own TOML configuration, its gRPC API on
//! that namespace's loopback and pprof off; the `gobgp` CLI runs in the same namespace.
//!
//! GoBGP without its `zebra` integration installs nothing into a kernel table, so what
//! the tests assert is its RIB (`gobgp global rib -j`): every path each node announces,
//! with its next hop and attributes. GoBGP has no BFD.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, output};
use crate::poll;
use crate::router::{NODE_ASN, ROUTER_ASN};

/// The daemon.
pub const GOBGPD_BIN: &str = "/usr/bin/gobgpd";
/// Its CLI (gRPC client).
pub const GOBGP_BIN: &str = "/usr/bin/gobgp";
/// The gRPC API port, on the router namespace's loopback.
const API_PORT: &str = "50051";

/// One gobgpd process; killed by PID on drop.
pub struct GoBgp {
    ns: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One path of a prefix in GoBGP's RIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RibPath {
    /// The neighbour that announced it.
    pub neighbor: Ipv4Addr,
    /// Its NEXT_HOP.
    pub next_hop: Ipv4Addr,
    /// AS_PATH, flattened.
    pub as_path: Vec<u32>,
    /// COMMUNITIES as `aa:nn`.
    pub communities: Vec<String>,
    /// LARGE_COMMUNITY as `a:b:c`.
    pub large_communities: Vec<String>,
    /// Kept across a graceful restart, not yet refreshed.
    pub stale: bool,
}

impl GoBgp {
    /// Writes `config` (TOML) to `{dir}/gobgpd.toml`, starts gobgpd in `ns` (log to
    /// `{dir}/gobgpd.log`) and waits until its API answers.
    pub fn start(ns: &Netns, dir: &Path, config: &str) -> Result<GoBgp> {
        for bin in [GOBGPD_BIN, GOBGP_BIN] {
            if !Path::new(bin).is_file() {
                bail!("{bin} is missing (Debian package gobgpd): run `cargo xtask setup`");
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("gobgpd.toml");
        std::fs::write(&conf, config)?;
        let log = dir.join("gobgpd.log");
        let log_file = std::fs::File::create(&log)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(GOBGPD_BIN)
            .arg("-f")
            .arg(&conf)
            .args(["-t", "toml", "-p", "-l", "debug", "--pprof-disable"])
            .arg(format!("--api-hosts=127.0.0.1:{API_PORT}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting gobgpd")?;
        let mut g = GoBgp {
            ns: ns.path(),
            log,
            child: Some(child),
        };
        poll(
            "gobgpd answers on its API",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                if let Some(c) = g.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!("gobgpd exited with {status}; log:\n{}", g.log_tail(30));
                }
                Ok(g.gobgp(&["global"]).ok())
            },
        )?;
        Ok(g)
    }

    /// `gobgp ARGS...`'s output (run in the router's namespace).
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        let out = output(
            Command::new("nsenter")
                .arg(format!("--net={}", self.ns.display()))
                .arg("--")
                .arg(GOBGP_BIN)
                .args(["-u", "127.0.0.1", "-p", API_PORT])
                .args(args),
        )?;
        if !out.status.success() {
            bail!(
                "gobgp {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The session state of `neighbor` (`established`, `active`, ...).
    pub fn bgp_state(&self, neighbor: Ipv4Addr) -> Result<String> {
        let out = self.gobgp(&["neighbor", &neighbor.to_string(), "-j"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("gobgp neighbor: {out}"))?;
        let state = &v["state"]["session_state"];
        // The API's enum: 1 idle, 2 connect, 3 active, 4 opensent, 5 openconfirm, 6
        // established; older CLIs print the name.
        Ok(match state.as_u64() {
            Some(1) => "idle".into(),
            Some(2) => "connect".into(),
            Some(3) => "active".into(),
            Some(4) => "opensent".into(),
            Some(5) => "openconfirm".into(),
            Some(6) => "established".into(),
            _ => state.as_str().unwrap_or("unknown").to_lowercase(),
        })
    }

    /// The paths GoBGP holds for `prefix` (`10.0.100.1/32`), sorted by neighbour;
    /// empty when it has none.
    pub fn rib(&self, prefix: &str) -> Result<Vec<RibPath>> {
        let out = self.gobgp(&["global", "rib", "-j"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("gobgp global rib -j: {out}"))?;
        let mut paths = Vec::new();
        for p in v[prefix].as_array().into_iter().flatten() {
            paths.push(parse_path(p).with_context(|| format!("path {p}"))?);
        }
        paths.sort_by_key(|p| p.neighbor);
        Ok(paths)
    }

    /// The last `n` lines of gobgpd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops gobgpd (SIGTERM by PID, then SIGKILL after a second).
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

impl Drop for GoBgp {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// One element of `gobgp global rib -j`'s array for a prefix: `attrs` by BGP attribute
/// type code (2 AS_PATH, 3 NEXT_HOP, 8 COMMUNITIES as numbers, 32 LARGE_COMMUNITY as
/// `{"ASN", "LocalData1", "LocalData2"}`).
fn parse_path(p: &serde_json::Value) -> Result<RibPath> {
    let ip = |v: &serde_json::Value| -> Result<Ipv4Addr> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an address: {v}"))
    };
    let mut path = RibPath {
        neighbor: ip(&p["neighbor-ip"])?,
        next_hop: Ipv4Addr::UNSPECIFIED,
        as_path: Vec::new(),
        communities: Vec::new(),
        large_communities: Vec::new(),
        stale: p["stale"] == true,
    };
    for a in p["attrs"].as_array().into_iter().flatten() {
        match a["type"].as_u64() {
            Some(2) => {
                for seg in a["as_paths"].as_array().into_iter().flatten() {
                    path.as_path.extend(
                        seg["asns"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())),
                    );
                }
            }
            Some(3) => path.next_hop = ip(&a["nexthop"])?,
            Some(8) => {
                for c in a["communities"].as_array().into_iter().flatten() {
                    let c = c.as_u64().context("community not a number")?;
                    path.communities.push(format!("{}:{}", c >> 16, c & 0xffff));
                }
            }
            Some(32) => {
                for c in a["value"].as_array().into_iter().flatten() {
                    path.large_communities.push(format!(
                        "{}:{}:{}",
                        c["ASN"], c["LocalData1"], c["LocalData2"]
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(path)
}

/// A gobgpd configuration for the router `router_id` (AS [`ROUTER_ASN`]) with a
/// neighbour per node of `nodes` (name, address; AS [`NODE_ASN`]): IPv4 unicast, hold
/// time 9 s, graceful restart (helper) on. `password(node)`: that node's TCP MD5 key.
pub fn gobgp_config(
    router_id: Ipv4Addr,
    nodes: &[(String, Ipv4Addr)],
    password: impl Fn(&str) -> Option<String>,
) -> String {
    let mut c = format!(
        "[global.config]\n  as = {ROUTER_ASN}\n  router-id = \"{router_id}\"\n  \
         local-address-list = [\"{router_id}\"]\n"
    );
    for (name, addr) in nodes {
        c.push_str(&format!(
            "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{addr}\"\n    \
             peer-as = {NODE_ASN}\n    description = \"{name}\"\n"
        ));
        if let Some(key) = password(name) {
            c.push_str(&format!("    auth-password = \"{key}\"\n"));
        }
        c.push_str(
            "  [neighbors.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n  \
             [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 120\n  \
             [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      \
             afi-safi-name = \"ipv4-unicast\"\n    \
             [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n",
        );
    }
    c
}
