//! Running `xlb agent` (and `xlb cleanup`) inside a lab node, talking to its HTTP endpoints.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::{Netns, in_netns, netns_path};

/// How long a SIGTERM'd agent gets before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `xlb` binary: `$XLB_BIN`, else `{workspace}/target/release/xlb`. Fails (saying to run
/// `cargo xtask build`) when it does not exist.
pub fn xlb_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("XLB_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb"),
    };
    if !path.is_file() {
        bail!(
            "xlb binary not found at {} (set XLB_BIN or run `cargo xtask build` first)",
            path.display()
        );
    }
    Ok(path)
}

/// Everything needed to start one agent on one lab node.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The `xlb` binary.
    pub xlb_bin: PathBuf,
    /// Name of the node's network namespace.
    pub netns: String,
    /// `--interface`.
    pub interface: String,
    /// `--node-name`.
    pub node_name: String,
    /// `--manifests` (left out when `extra_args` has `--kubeconfig`: the agent then
    /// reads the API server that names).
    pub manifests_dir: PathBuf,
    /// `--metrics-addr` (inside the node's namespace).
    pub metrics_addr: SocketAddr,
    /// `--pin-path`.
    pub pin_dir: PathBuf,
    /// Where the agent's stdout+stderr go: `{log_dir}/agent-{generation}.log`.
    pub log_dir: PathBuf,
    /// `--log-level`.
    pub log_level: String,
    /// Further flags, e.g. `--cluster-mode snat`.
    pub extra_args: Vec<String>,
}

/// A running (or stopped) `xlb agent` process in a node namespace; SIGTERM/SIGKILLed on drop.
pub struct Agent {
    cfg: AgentConfig,
    child: Option<Child>,
    generation: u32,
    logs: Vec<PathBuf>,
}

impl Agent {
    /// Starts `nsenter --net=/run/netns/NODE -- xlb agent ...` with output going to a log file.
    /// The agent gets SIGTERM if the starting *thread* dies (PR_SET_PDEATHSIG), so keep the
    /// handle on the thread that started it (tests do).
    pub fn start(cfg: AgentConfig) -> Result<Agent> {
        let mut agent = Agent {
            cfg,
            child: None,
            generation: 0,
            logs: Vec::new(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        self.generation += 1;
        let log = self
            .cfg
            .log_dir
            .join(format!("agent-{}.log", self.generation));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.cfg.netns).display()))
            .arg("--")
            .arg(&self.cfg.xlb_bin)
            .arg("agent")
            .args(["--interface", &self.cfg.interface])
            .args(["--node-name", &self.cfg.node_name])
            .args(if self.cfg.extra_args.iter().any(|a| a == "--kubeconfig") {
                vec![]
            } else {
                vec![
                    "--manifests".into(),
                    self.cfg.manifests_dir.clone().into_os_string(),
                ]
            })
            .args(["--metrics-addr", &self.cfg.metrics_addr.to_string()])
            .arg("--pin-path")
            .arg(&self.cfg.pin_dir)
            .args(["--log-level", &self.cfg.log_level])
            .args(&self.cfg.extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // If the test process dies without unwinding, the agent gets SIGTERM too (it then
        // leaves its pins; the next lab's stale sweep removes them).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} agent (via nsenter)",
                self.cfg.xlb_bin.display()
            )
        })?;
        self.logs.push(log);
        self.child = Some(child);
        Ok(())
    }

    /// The configuration this agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// PID of the current process (nsenter execs xlb, so this is the agent's PID).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the current process is still running; `Err` carries its exit status if not.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("agent is not started");
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "agent exited ({status}); log tail:\n{}",
                tail(&self.log(), 40)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM, waits up to [`STOP_TIMEOUT`], then SIGKILLs; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent is not running");
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: signalling our own, not yet reaped child by PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                eprintln!("xlb-lab: agent pid {pid} ignored SIGTERM for {STOP_TIMEOUT:?}; SIGKILL");
                child.kill()?;
                let status = child.wait()?;
                bail!(
                    "agent pid {pid} did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed: {status})"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the agent (by PID, no chance to clean up: a crash) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent is not running");
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: signalling our own, not yet reaped child by PID.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Ok(child.wait()?)
    }

    /// Waits up to `timeout` for the process to exit by itself (an agent expected to
    /// refuse to start) and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("agent is not running");
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("agent still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a new agent process with the same configuration (after [`Agent::stop`]).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent still running; stop it first");
        }
        self.spawn()
    }

    /// Starts a new agent process with `extra_args` instead of the previous ones (after
    /// [`Agent::stop`]): an upgrade that changes the agent's flags.
    pub fn start_again_with(&mut self, extra_args: Vec<String>) -> Result<()> {
        self.cfg.extra_args = extra_args;
        self.start_again()
    }

    /// The log of the current process (ANSI colour codes removed).
    pub fn current_log(&self) -> String {
        self.logs
            .last()
            .map(|p| strip_ansi(&std::fs::read_to_string(p).unwrap_or_default()))
            .unwrap_or_default()
    }

    /// The logs of every process generation, concatenated (ANSI colour codes removed).
    pub fn log(&self) -> String {
        self.logs
            .iter()
            .map(|p| strip_ansi(&std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("")
    }

    /// Paths of the log files (one per started process).
    pub fn log_paths(&self) -> &[PathBuf] {
        &self.logs
    }

    /// The number of log lines written so far (all generations), to pass as `since` to
    /// [`Agent::wait_for_log_line`] when only lines written after some action count.
    pub fn log_mark(&self) -> usize {
        self.log().lines().count()
    }

    /// Polls until a log line after the first `since` lines satisfies `pred`; returns it.
    /// Fails when the agent exits or `timeout` passes.
    pub fn wait_for_log_line(
        &mut self,
        what: &str,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().skip(since).find(|l| pred(l)) {
                return Ok(l.to_string());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "no agent log line {what} within {timeout:?}; log tail:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `GET /healthz` until it answers 200 (fails early if the process exits).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let last = match self.http_get("/healthz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "agent not healthy within {timeout:?} (last: {last}); log tail:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `xlb inspect -o FORMAT VIEW --agent METRICS_ADDR` run in the node's namespace
    /// (`owners`, `peers`: what the running agent publishes); its stdout.
    pub fn inspect_text(&self, view: &str, format: &str) -> Result<String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&self.cfg.netns).display()))
            .arg("--")
            .arg(&self.cfg.xlb_bin)
            .args(["inspect", "-o", format, view, "--agent"])
            .arg(self.cfg.metrics_addr.to_string())
            .output()
            .context("running xlb inspect")?;
        if !out.status.success() {
            bail!(
                "xlb inspect {view}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// [`Agent::inspect_text`] as JSON, parsed.
    pub fn inspect_view(&self, view: &str) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.inspect_text(view, "json")?)?)
    }

    /// A plain HTTP/1.0 GET to the agent's metrics address from inside the node namespace;
    /// returns (status, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.cfg.netns, self.cfg.metrics_addr, path)
    }

    /// `GET /metrics`, parsed.
    pub fn metrics(&self) -> Result<Vec<Sample>> {
        let (code, body) = self.http_get("/metrics")?;
        if code != 200 {
            bail!("GET /metrics: HTTP {code}");
        }
        Ok(parse_metrics(&body))
    }

    /// The sum of every `name` series whose labels include all of `labels`; `Err` if there is
    /// no such series.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let samples = self.metrics()?;
        metric_sum(&samples, name, labels)
            .ok_or_else(|| anyhow!("agent exports no series {name}{labels:?}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("xlb-lab: stopping agent: {e:#}");
        }
    }
}

/// Runs `xlb cleanup --interface IFACE --pin-path DIR` in the namespace; returns its output
/// (stdout+stderr) or fails with it.
pub fn run_cleanup(xlb_bin: &Path, ns: &Netns, interface: &str, pin_dir: &Path) -> Result<String> {
    let mut cmd = ns.command(xlb_bin);
    cmd.args(["cleanup", "--interface", interface])
        .arg("--pin-path")
        .arg(pin_dir);
    let out = crate::netns::output(&mut cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {text}",
            crate::netns::describe(&cmd),
            out.status
        );
    }
    Ok(text)
}

/// A plain HTTP/1.0 GET to `addr` from inside netns `ns`; returns (status, body).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_get_within(
        ns,
        addr,
        path,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
}

/// [`http_get`] with its own connect and read/write timeouts.
pub fn http_get_within(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    connect: Duration,
    io: Duration,
) -> Result<(u16, String)> {
    let (code, _, body) = http_request(ns, addr, path, "", connect, io)?;
    Ok((code, body))
}

/// A GET with `extra` header lines (each ending in `\r\n`); returns (status, response
/// head, body).
pub fn http_request(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    extra: &str,
    connect: Duration,
    io: Duration,
) -> Result<(u16, String, String)> {
    let mut stream = in_netns(&netns_path(ns), || {
        TcpStream::connect_timeout(&addr, connect)
            .with_context(|| format!("connect {addr} in {ns}"))
    })?;
    stream.set_read_timeout(Some(io))?;
    stream.set_write_timeout(Some(io))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: malformed response {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line in {head:?}"))?;
    Ok((code, head.to_string(), body.to_string()))
}

/// One Prometheus sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_count` etc. suffixes as exposed).
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Parses Prometheus text exposition format (comments skipped, timestamps ignored).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let sp = line.find(char::is_whitespace)?;
            (&line[..sp], BTreeMap::new(), &line[sp..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',' | ' ')) {
            chars.next();
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() {
            return Some(out);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.insert(key.trim().to_string(), val);
    }
}

/// Sum of the `name` samples whose labels include all of `labels`; `None` if none match.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x y\n# TYPE xlb_service_packets_total counter\n\
            xlb_service_packets_total{namespace=\"demo\",service=\"web\",port=\"80\",protocol=\"TCP\"} 12\n\
            xlb_service_packets_total{namespace=\"demo\",service=\"web\",port=\"53\",protocol=\"UDP\"} 30 1700000000\n\
            xlb_config_errors_total 2\n\
            xlb_build_info{version=\"0.1.0\",note=\"a \\\"q\\\", b\"} 1\n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 4);
        assert_eq!(
            metric_sum(&s, "xlb_service_packets_total", &[("service", "web")]),
            Some(42.0)
        );
        assert_eq!(
            metric_sum(&s, "xlb_service_packets_total", &[("protocol", "UDP")]),
            Some(30.0)
        );
        assert_eq!(metric_sum(&s, "xlb_config_errors_total", &[]), Some(2.0));
        assert_eq!(s[3].labels["note"], "a \"q\", b");
        assert_eq!(metric_sum(&s, "xlb_nope", &[]), None);
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(
            strip_ansi("\x1b[2m2024\x1b[0m \x1b[3mfile\x1b[0m=a.yaml"),
            "2024 file=a.yaml"
        );
    }
}
