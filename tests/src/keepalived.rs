//! Keepalived (Debian's `keepalived`, VRRP) in the multi-node lab: the reference xlb's
//! L2 failover is measured against (issue 17 test 7).
//!
//! [`KeepalivedLab`] is [`Lab::multi_node`] with three nodes and no pods: each node runs
//! one keepalived (VRRPv2, multicast on the lab bridge, `advert_int 1`, priorities
//! [`PRIORITIES`], every instance starting as BACKUP and preempting) for
//! [`KEEPALIVED_VIP`] on its uplink, and serves the VIP itself (UDP echo and TCP line
//! servers bound to the VIP with `ip_nonlocal_bind`, labelled with the node's name, so a
//! reply names the answering node). Every instance has its own configuration, pid
//! files, notify script, state file and log under the lab's scratch directory, runs in
//! its own process group, and is stopped by its PID on drop, even when a test fails.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::arp::{Mac, mac_of, neighbour, who_has};
use crate::l2::{ARP_WINDOW, MAX_TICKS, TICK};
use crate::lab::{CLIENT_ADDR, Lab, NodeSpec, SOON, UPLINK, poll};
use crate::netns::Netns;
use crate::servers::{Servers, TCP_LINE_PORT, UDP_ECHO_PORT};
use crate::traffic::Ticker;

/// Where Debian's `keepalived` package puts the daemon (`cargo xtask setup` installs it).
pub const KEEPALIVED_BIN: &str = "/usr/sbin/keepalived";
/// The VRRP virtual address: on the LAN's own /24, so the client reaches it by ARP.
pub const KEEPALIVED_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 201);
/// The VRRP virtual router id (each lab has a bridge of its own, so it never collides).
pub const VIRTUAL_ROUTER_ID: u8 = 51;
/// VRRP priorities of `node-a`, `node-b`, `node-c`: `node-a` is MASTER when it is up.
pub const PRIORITIES: [u8; 3] = [150, 100, 50];
/// How long a SIGTERMed keepalived may take to leave (it removes its VIP and sends a
/// priority-0 advertisement first).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One keepalived process (parent and VRRP child) in one node's namespace.
pub struct Keepalived {
    node: String,
    netns: PathBuf,
    conf: PathBuf,
    pid_file: PathBuf,
    vrrp_pid_file: PathBuf,
    state_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Keepalived {
    /// Writes the configuration and notify script for `node` (VRRP priority `priority`)
    /// into `dir` and starts keepalived in `ns`; returns once it reports its first state.
    pub fn start(ns: &Netns, node: &str, priority: u8, dir: &Path) -> Result<Keepalived> {
        if !Path::new(KEEPALIVED_BIN).is_file() {
            bail!(
                "{KEEPALIVED_BIN} is missing (Debian package keepalived): run `cargo xtask setup`"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = |ext: &str| dir.join(format!("{node}.{ext}"));
        let state_file = file("state");
        let notify = file("notify.sh");
        // keepalived runs `notify` with "INSTANCE" NAME STATE PRIORITY; the state is
        // written to a temporary file and renamed, so a reader never sees half of it.
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$3\" > '{s}.tmp' && mv '{s}.tmp' '{s}'\n",
            s = state_file.display()
        );
        std::fs::write(&notify, script)?;
        std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o755))?;
        let conf = file("conf");
        std::fs::write(&conf, config(node, priority, &notify))?;
        let mut ka = Keepalived {
            node: node.to_string(),
            netns: ns.path(),
            conf,
            pid_file: file("pid"),
            vrrp_pid_file: file("vrrp.pid"),
            state_file,
            log: file("log"),
            child: None,
        };
        ka.spawn()?;
        Ok(ka)
    }

    /// Starts the process (again, after [`Keepalived::kill`] or [`Keepalived::stop`]) and
    /// waits until its notify script has reported a state.
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("keepalived on {} is already running", self.node);
        }
        // A SIGKILLed keepalived leaves its pid files behind; a new one refuses to start
        // while a pid in them still exists (a zombie counts), so start from none.
        for f in [&self.pid_file, &self.vrrp_pid_file, &self.state_file] {
            let _ = std::fs::remove_file(f);
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(KEEPALIVED_BIN)
            // Foreground, log to the console (our log file) not syslog, VRRP only,
            // with detail (state changes, GARPs).
            .args(["--dont-fork", "--log-console", "--no-syslog", "--vrrp"])
            .arg("--log-detail")
            .arg("--use-file")
            .arg(&self.conf)
            .arg("--pid")
            .arg(&self.pid_file)
            .arg("--vrrp_pid")
            .arg(&self.vrrp_pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group (nsenter execs keepalived, which keeps the pid and
            // group): the VRRP child joins it, so one kill(-pgid) reaches both at once.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting keepalived on {}", self.node))?;
        self.child = Some(child);
        let node = self.node.clone();
        poll(
            &format!("keepalived on {node} reports a state"),
            SOON,
            Duration::from_millis(20),
            || {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                    self.child = None;
                    bail!("exited with {status}: {}", self.log_tail(20));
                }
                Ok(self.state())
            },
        )?;
        Ok(())
    }

    /// The node this instance runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The state keepalived last reported through its notify script (`BACKUP`,
    /// `MASTER`, `FAULT`, `STOP`), if any since it was started.
    pub fn state(&self) -> Option<String> {
        std::fs::read_to_string(&self.state_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// The keepalived parent's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The VRRP child's PID from its pid file, if it wrote one.
    fn vrrp_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.vrrp_pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs the parent and the VRRP child at once (their process group), as a
    /// crash would: no priority-0 advertisement, and the VIP stays on the interface.
    /// (SIGKILL of the parent alone is no crash: the VRRP child gets SIGTERM from the
    /// kernel as its parent-death signal and shuts down gracefully.)
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("keepalived on {} is not running", self.node);
        };
        let vrrp = self.vrrp_pid();
        let pgid = i32::try_from(child.id())?;
        // SAFETY: signals the process group of a child we started and have not reaped
        // (so the group id cannot have been reused).
        let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            bail!(
                "kill(-{pgid}, SIGKILL) for keepalived on {}: {err}",
                self.node
            );
        }
        child.wait()?;
        if let Some(pid) = vrrp {
            poll(
                &format!("keepalived's VRRP child {pid} on {} dies", self.node),
                SOON,
                Duration::from_millis(5),
                || Ok((!alive(pid)).then_some(())),
            )?;
        }
        Ok(())
    }

    /// SIGTERM (keepalived removes its VIP and sends a priority-0 advertisement), then
    /// SIGKILL of the group if it has not exited within a few seconds.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let vrrp = self.vrrp_pid();
        let pid = i32::try_from(child.id())?;
        // SAFETY: signals a child we started and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                // SAFETY: as above; the group is the child's own.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The parent normally reaps its VRRP child before exiting; should it have been
        // left behind, it is still in the parent's process group: kill it by its PID.
        if let Some(v) = vrrp
            && alive(v)
            && pgid_of(v) == Some(pid)
        {
            // SAFETY: a process of the group we started, checked just above.
            unsafe { libc::kill(v, libc::SIGKILL) };
        }
        Ok(())
    }

    /// The last `n` lines of this instance's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("xlb-lab: stopping keepalived on {}: {e:#}", self.node);
        }
    }
}

/// keepalived.conf for one node: one VRRP instance, every node starting as BACKUP (a
/// restarted node must not claim the VIP before it has heard the others), the highest
/// priority preempting (keepalived's default).
fn config(node: &str, priority: u8, notify: &Path) -> String {
    format!(
        "global_defs {{
    router_id {node}
    script_user root
}}
vrrp_instance VI_XLB {{
    state BACKUP
    interface {UPLINK}
    virtual_router_id {VIRTUAL_ROUTER_ID}
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        {KEEPALIVED_VIP}/32 dev {UPLINK}
    }}
    notify \"{}\"
}}
",
        notify.display()
    )
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The process group of `pid` (`/proc/PID/stat` field 5).
fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// How the MASTER fails in [`KeepalivedLab::failover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Its keepalived (parent and VRRP child) is SIGKILLed.
    Sigkill,
    /// Its uplink is set down.
    LinkDown,
}

/// What one failover measured.
#[derive(Clone, Debug)]
pub struct FailoverRun {
    /// The node that failed (the MASTER).
    pub failed: String,
    /// The node that took the VIP over.
    pub next: String,
    /// The client ticker's largest gap between two answers.
    pub max_gap: Duration,
    /// From the failure until another node held the VIP.
    pub takeover: Duration,
    /// Whether the failed node still had the VIP on its uplink when another node took
    /// it (after a SIGKILL it does: two nodes hold it until keepalived runs again).
    pub failed_still_held: bool,
    /// How many nodes answered an ARP request for the VIP once the client was served
    /// by the new MASTER (2 after a SIGKILL: the dead keepalived's node still has it).
    pub arp_answerers: usize,
    /// Tickets sent.
    pub sent: u64,
    /// Tickets never answered.
    pub lost: u64,
}

/// Three nodes on one bridge running keepalived for [`KEEPALIVED_VIP`], each serving it.
pub struct KeepalivedLab {
    // Field order is drop order: keepalived and servers go before the namespaces.
    instances: Vec<Keepalived>,
    servers: Vec<Servers>,
    macs: Vec<(String, Mac)>,
    /// The lab (client `10.0.0.1`, `node-a` .. `node-c` at `10.0.0.11` ..).
    pub lab: Lab,
}

impl KeepalivedLab {
    /// Builds the lab, starts the servers and one keepalived per node.
    pub fn start() -> Result<KeepalivedLab> {
        let lab = Lab::multi_node(&[
            NodeSpec::default(),
            NodeSpec::default(),
            NodeSpec::default(),
        ])?;
        let dir = lab.scratch().join("keepalived");
        let mut servers = Vec::new();
        let mut macs = Vec::new();
        for node in &lab.nodes {
            // Bound to the VIP before this node holds it, so it answers from the VIP the
            // moment keepalived adds the address.
            node.host.ns.sysctl("net/ipv4/ip_nonlocal_bind", "1")?;
            servers.push(Servers::start(
                &node.host.ns,
                &node.name,
                KEEPALIVED_VIP,
                UDP_ECHO_PORT,
                TCP_LINE_PORT,
            )?);
            macs.push((node.name.clone(), mac_of(&node.host.ns, UPLINK)?));
        }
        let mut kl = KeepalivedLab {
            instances: Vec::new(),
            servers,
            macs,
            lab,
        };
        for (node, prio) in kl.lab.nodes.iter().zip(PRIORITIES) {
            let ka = Keepalived::start(&node.host.ns, &node.name, prio, &dir)?;
            kl.instances.push(ka);
        }
        Ok(kl)
    }

    /// The client's UDP destination: the VIP's echo port.
    pub fn udp_target(&self) -> SocketAddr {
        SocketAddr::from((KEEPALIVED_VIP, UDP_ECHO_PORT))
    }

    /// The keepalived of node `name`.
    pub fn instance_mut(&mut self, name: &str) -> Result<&mut Keepalived> {
        self.instances
            .iter_mut()
            .find(|k| k.node == name)
            .with_context(|| format!("no keepalived on {name}"))
    }

    /// The nodes whose uplink holds the VIP right now.
    pub fn holders(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for node in &self.lab.nodes {
            let addrs = node
                .host
                .ns
                .ip(&["-4", "-o", "addr", "show", "dev", UPLINK])?;
            let vip = format!(" {KEEPALIVED_VIP}/32 ");
            if addrs.contains(&vip) {
                out.push(node.name.clone());
            }
        }
        Ok(out)
    }

    fn mac(&self, name: &str) -> Result<Mac> {
        self.macs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| *m)
            .with_context(|| format!("no node {name}"))
    }

    /// Every instance's last log lines, for an error's context.
    pub fn logs(&self) -> String {
        self.instances
            .iter()
            .map(|k| format!("keepalived on {}:\n{}", k.node, k.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the lab is settled: `node-a` (the highest priority) is MASTER and the
    /// others BACKUP, only `node-a` holds the VIP and answers ARP for it, the client's
    /// neighbour entry points at it and it answers the client. Returns its name.
    pub fn wait_settled(&self) -> Result<String> {
        let master = self.instances[0].node.clone();
        let mac = self.mac(&master)?;
        poll(
            "keepalived settles with node-a MASTER",
            SOON,
            Duration::from_millis(20),
            || {
                let states: Vec<Option<String>> =
                    self.instances.iter().map(Keepalived::state).collect();
                let holders = self.holders()?;
                let ok =
                    states.iter().enumerate().all(|(i, s)| {
                        s.as_deref() == Some(if i == 0 { "MASTER" } else { "BACKUP" })
                    }) && holders == [master.clone()];
                if ok {
                    Ok(Some(()))
                } else {
                    bail!("states {states:?}, VIP held by {holders:?}")
                }
            },
        )?;
        poll(
            "only the MASTER answers ARP for the VIP",
            SOON,
            Duration::from_millis(50),
            || {
                let got = who_has(
                    &self.lab.client.ns,
                    UPLINK,
                    CLIENT_ADDR,
                    KEEPALIVED_VIP,
                    ARP_WINDOW,
                )?;
                Ok((got == BTreeSet::from([mac])).then_some(()))
            },
        )?;
        let dst = self.udp_target();
        poll(
            "the MASTER answers the client",
            SOON,
            Duration::from_millis(50),
            || {
                let reply = self.lab.client.udp_probe(dst, Duration::from_millis(300))?;
                let by_master = reply.is_some_and(|r| r.server == master);
                let entry = neighbour(&self.lab.client.ns, UPLINK, KEEPALIVED_VIP)?;
                Ok((by_master && entry == Some(mac)).then_some(()))
            },
        )?;
        Ok(master)
    }

    /// One failover, as the L2 test measures xlb's: waits for a settled MASTER, starts the
    /// client's 10 ms UDP ticker, fails the MASTER once `20 + lead` tickets came back,
    /// waits until another node holds the VIP, the client's neighbour entry points at it
    /// and 50 more tickets came back, checks that node answered some, counts the ARP
    /// answerers, then repairs the failed node (keepalived started again / link up).
    ///
    /// `lead` moves the failure against the MASTER's 1 s advertisement timer, which
    /// settling leaves at much the same phase every run: a crash comes at any phase, and
    /// the takeover time (the last advertisement heard + 3 intervals + skew) depends on it.
    pub fn failover(&mut self, how: Failure, lead: u64) -> Result<FailoverRun> {
        let run = self.failover_inner(how, lead);
        run.map_err(|e| e.context(self.logs()))
    }

    fn failover_inner(&mut self, how: Failure, lead: u64) -> Result<FailoverRun> {
        let failed = self.wait_settled()?;
        let dst = self.udp_target();
        let ticker = Ticker::start(&self.lab.client, dst, TICK, MAX_TICKS)?;
        ticker.wait_received(20 + lead, SOON)?;
        let failed_at = Instant::now();
        match how {
            Failure::Sigkill => self.instance_mut(&failed)?.kill()?,
            Failure::LinkDown => {
                let ns = &self.lab.node_named(&failed)?.host.ns;
                ns.ip(&["link", "set", UPLINK, "down"])?;
            }
        }
        let next = poll(
            "another node takes the VIP",
            SOON,
            Duration::from_millis(10),
            || {
                let others: Vec<String> = self
                    .holders()?
                    .into_iter()
                    .filter(|h| *h != failed)
                    .collect();
                match &others[..] {
                    [one] => Ok(Some(one.clone())),
                    [] => Ok(None),
                    many => bail!("several nodes hold the VIP: {many:?}"),
                }
            },
        )?;
        let takeover = failed_at.elapsed();
        let failed_still_held = self.holders()?.contains(&failed);
        let next_mac = self.mac(&next)?;
        poll(
            "the client's neighbour entry moves to the new MASTER",
            SOON,
            Duration::from_millis(10),
            || {
                let entry = neighbour(&self.lab.client.ns, UPLINK, KEEPALIVED_VIP)?;
                Ok((entry == Some(next_mac)).then_some(()))
            },
        )?;
        let n = ticker.received();
        ticker.wait_received(n + 50, SOON)?;
        let report = ticker.finish(Duration::from_millis(500))?;
        ensure!(
            report.by_server.contains_key(&next),
            "traffic never reached {next}: {:?}",
            report.by_server
        );
        let arp_answerers = who_has(
            &self.lab.client.ns,
            UPLINK,
            CLIENT_ADDR,
            KEEPALIVED_VIP,
            ARP_WINDOW,
        )?
        .len();
        match how {
            Failure::Sigkill => self.instance_mut(&failed)?.start_again()?,
            Failure::LinkDown => {
                let ns = &self.lab.node_named(&failed)?.host.ns;
                ns.ip(&["link", "set", UPLINK, "up"])?;
            }
        }
        Ok(FailoverRun {
            failed,
            next,
            max_gap: report.max_gap,
            takeover,
            failed_still_held,
            arp_answerers,
            sent: report.sent,
            lost: report.lost,
        })
    }

    /// Stops every keepalived (SIGTERM, then SIGKILL of its group) before the lab goes.
    pub fn stop(&mut self) -> Result<()> {
        for k in &mut self.instances {
            k.stop()?;
        }
        Ok(())
    }
}

impl Drop for KeepalivedLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for k in &mut self.instances {
            if let Err(e) = k.stop() {
                eprintln!("xlb-lab: stopping keepalived on {}: {e:#}", k.node);
            }
        }
        for s in &mut self.servers {
            s.stop();
        }
    }
}
