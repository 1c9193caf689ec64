//! What the numbers were measured on, and small process helpers shared by the parts.
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Today's date (UTC), `YYYY-MM-DD`, from `date`.
pub fn today() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// CPU model and core count.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok());
    json!({ "cpu_model": model, "cores": cores, "mem_kib": mem_kib })
}

/// The 1, 5 and 15-minute load averages (`/proc/loadavg`).
pub fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(v)
}

/// `uname -r`.
pub fn kernel() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A process the bench started, in a process group of its own (trafgen forks its
/// sender: stopping only the parent would leave the sender running). SIGINT to that
/// group, then SIGKILL after a grace, on drop. Only ever signals the group it created.
pub struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        // If the bench dies without unwinding, its children die with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what} ({})", xlb_lab::netns::describe(cmd)))?;
        Ok(Proc {
            child: Some(child),
            what: what.to_string(),
        })
    }

    /// Fails if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited early: {status}", self.what);
        }
        Ok(())
    }

    /// SIGINT to the group, wait up to `grace` for the leader, then SIGKILL to the group
    /// (whatever it forked goes too); reaps the leader.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let Ok(pgid) = i32::try_from(c.id()) else {
            let _ = c.kill();
            let _ = c.wait();
            return;
        };
        // SAFETY: signalling the process group this Proc created (leader = our child).
        unsafe { libc::kill(-pgid, libc::SIGINT) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Forked members may outlive the leader: the group is ours, end all of it.
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// Runs `cmd` to completion within `limit`, killing it (by PID) past that; returns how
/// long it took. Fails on a non-zero exit, with stderr.
pub fn run_timed(
    cmd: &mut Command,
    limit: Duration,
    stdin_file: Option<&Path>,
) -> Result<Duration> {
    use std::process::Stdio;
    if let Some(f) = stdin_file {
        cmd.stdin(Stdio::from(
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?,
        ));
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let what = xlb_lab::netns::describe(cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let took = start.elapsed();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("`{what}` failed ({status}): {}", err.trim());
            }
            return Ok(took);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no VmRSS")
}
