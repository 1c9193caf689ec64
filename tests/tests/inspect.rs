//! Privileged integration tests of `xlb inspect`: what it shows of a running lab agent's
//! datapath, and of the pins a stopped agent left behind. Needs root and the built
//! binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use xlb_lab::agent::xlb_bin;
use xlb_lab::lab::{Lab, REPLY_TIMEOUT, SOON};
use xlb_lab::manifests::{EndpointSpec, web_tcp_vip, web_udp_vip, web_yaml, write_atomic};

/// Runs `xlb inspect ARGS --pin-path PIN` and returns its stdout; fails on a non-zero exit.
fn inspect(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = Command::new(xlb_bin()?)
        .arg("inspect")
        .args(args)
        .arg("--pin-path")
        .arg(&lab.node().pin_dir)
        .output()
        .context("running xlb inspect")?;
    ensure!(
        out.status.success(),
        "xlb inspect {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The service rows as JSON, by frontend.
fn services(lab: &Lab) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&inspect(lab, &["services", "-o", "json"])?)?;
    Ok(v.as_array().context("an array of rows")?.clone())
}

fn row<'a>(rows: &'a [Value], frontend: &str) -> Result<&'a Value> {
    rows.iter()
        .find(|r| r["frontend"] == frontend)
        .with_context(|| format!("no row for {frontend} in {rows:?}"))
}

#[test]
fn inspect_shows_services_and_backends_of_a_running_and_a_stopped_agent() -> Result<()> {
    let mut lab = Lab::one_node(3)?;
    let eps: Vec<EndpointSpec> = lab.node().pods[..2]
        .iter()
        .map(|p| EndpointSpec::new(p.ip, true, &lab.node().name))
        .collect();
    let pods: BTreeSet<String> = lab.node().pods[..2]
        .iter()
        .map(|p| p.ip.to_string())
        .collect();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;
    let replies = lab.client.udp_flows(web_udp_vip(), 20, REPLY_TIMEOUT)?;
    ensure!(
        replies.len() == 20,
        "{} of 20 UDP flows answered",
        replies.len()
    );

    let check = |rows: &[Value], traffic: bool| -> Result<()> {
        let udp = row(rows, &format!("{}/UDP", web_udp_vip()))?;
        ensure!(
            udp["service"] == "demo/web" && udp["port_name"] == "dns",
            "{udp}"
        );
        ensure!(udp["policy"] == "Local", "{udp}");
        let addrs: BTreeSet<String> = udp["backends"]
            .as_array()
            .context("backends")?
            .iter()
            .filter_map(|b| b["addr"].as_str())
            .map(|a| a.rsplit_once(':').map_or(a, |(ip, _)| ip).to_string())
            .collect();
        ensure!(addrs == pods, "backends {addrs:?}, pods {pods:?}");
        if traffic {
            ensure!(udp["packets"].as_u64() >= Some(20), "{udp}");
        }
        let tcp = row(rows, &format!("{}/TCP", web_tcp_vip()))?;
        ensure!(
            tcp["service"] == "demo/web" && tcp["port_name"] == "http",
            "{tcp}"
        );
        Ok(())
    };
    let running = services(&lab)?;
    check(&running, true)?;
    let table = inspect(&lab, &["services"])?;
    println!("{table}");
    ensure!(
        table.starts_with("SERVICE") && table.contains("demo/web:dns"),
        "{table}"
    );
    let backends: Value = serde_json::from_str(&inspect(&lab, &["backends", "-o", "json"])?)?;
    // Two pods, each a backend of both ports.
    ensure!(
        backends.as_array().is_some_and(|b| b.len() == 4),
        "{backends}"
    );

    let vip = web_udp_vip().ip().to_string();
    let flows: Value =
        serde_json::from_str(&inspect(&lab, &["conntrack", "--vip", &vip, "-o", "json"])?)?;
    let flows = flows.as_array().context("an array of flows")?;
    let udp = format!("{}/UDP", web_udp_vip());
    ensure!(
        flows.iter().filter(|f| f["frontend"] == udp).count() == 20,
        "{flows:?}"
    );
    for f in flows {
        let backend = f["backend"].as_str().unwrap_or_default();
        let ip = backend.rsplit_once(':').map_or(backend, |(ip, _)| ip);
        ensure!(pods.contains(ip) && f["service"] == "demo/web:dns", "{f}");
        ensure!(f["expires_in_s"].as_i64() > Some(0), "{f}");
    }

    let shares: Value =
        serde_json::from_str(&inspect(&lab, &["maglev", "demo/web:dns", "-o", "json"])?)?;
    let shares = shares.as_array().context("an array of shares")?;
    let slots: Vec<u64> = shares.iter().filter_map(|r| r["slots"].as_u64()).collect();
    ensure!(
        slots.len() == 2
            && slots.iter().all(|n| *n > 0)
            && shares
                .iter()
                .all(|r| r["of"].as_u64() == Some(slots.iter().sum())),
        "two backends share the whole table: {shares:?}"
    );
    let config = inspect(&lab, &["config"])?;
    ensure!(
        config.contains("next service id") && config.contains("xdp mode"),
        "{config}"
    );
    let unknown = Command::new(xlb_bin()?)
        .args(["inspect", "maglev", "demo/nothing", "--pin-path"])
        .arg(&lab.node().pin_dir)
        .output()?;
    ensure!(
        !unknown.status.success()
            && String::from_utf8_lossy(&unknown.stderr).contains("demo/nothing"),
        "inspect maglev of an unknown Service: {unknown:?}"
    );

    // The agent stopped (SIGTERM): the datapath stays pinned, and inspect reads it.
    lab.agent()?.stop()?;
    let stopped = services(&lab)?;
    check(&stopped, true)?;
    ensure!(
        stopped.len() == running.len(),
        "{} rows while running, {} after the agent stopped",
        running.len(),
        stopped.len()
    );
    Ok(())
}

#[test]
fn inspect_without_a_datapath_says_so() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xlb-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(xlb_bin()?)
        .args(["inspect", "services", "--pin-path"])
        .arg(&dir)
        .output();
    std::fs::remove_dir(&dir)?;
    let out = out?;
    ensure!(
        !out.status.success(),
        "inspect of an empty directory succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("xlb_services4") && err.contains("--pin-path"),
        "{err}"
    );
    Ok(())
}

/// Sends one TCP segment with a raw socket from the client namespace (the kernel adds
/// the IP header; the segment's checksum is computed for `src`).
fn send_raw_tcp(
    lab: &Lab,
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    flags: u8,
) -> Result<()> {
    let seg = xlb_lab::packets::tcp_seg(
        src.ip().octets(),
        dst.ip().octets(),
        (src.port(), dst.port()),
        flags,
        5,
        &[],
        &[],
    );
    lab.client.ns.enter(|| {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            );
            ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from_ne_bytes(dst.ip().octets());
            let n = libc::sendto(
                fd,
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            ensure!(n == seg.len() as isize, "sendto: {err}");
        }
        Ok(())
    })
}

/// Issue 31, finding 5: a TCP flow whose first packet is not a SYN (a lone forged
/// ACK, as a flood of them would be) is tracked as mid-stream with the SYN lifetime
/// (60 s), while a connection that began with a SYN gets the established one (6 h).
/// On the landed code the forged ACK's entry lived 6 h too, so 300k of them stayed
/// in the table for hours.
#[test]
fn a_tcp_flow_first_seen_without_a_syn_keeps_a_short_lifetime() -> Result<()> {
    let mut lab = Lab::one_node(1)?;
    let eps = lab.node().ready_endpoints();
    write_atomic(&lab.node().manifests_dir.join("web.yaml"), &web_yaml(&eps))?;
    lab.start_agent()?.wait_healthy(SOON)?;

    let vip = match web_tcp_vip() {
        std::net::SocketAddr::V4(v) => v,
        other => anyhow::bail!("the lab's TCP VIP is {other}"),
    };
    let mut conn = lab.client.tcp_connect(vip.into(), REPLY_TIMEOUT)?;
    conn.ping()?;
    let real_port = conn.local().port();
    let forged = std::net::SocketAddrV4::new(lab.client.addr, 40_999);
    send_raw_tcp(&lab, forged, vip, xlb_lab::packets::ACK)?;

    let ip = vip.ip().to_string();
    let rows = xlb_lab::poll(
        "both flows in conntrack",
        SOON,
        std::time::Duration::from_millis(50),
        || {
            let flows: Value =
                serde_json::from_str(&inspect(&lab, &["conntrack", "--vip", &ip, "-o", "json"])?)?;
            let flows = flows.as_array().context("an array of flows")?.clone();
            let port_of = |f: &Value| {
                f["client"]
                    .as_str()
                    .and_then(|c| c.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok())
            };
            let real = flows
                .iter()
                .find(|f| port_of(f) == Some(real_port))
                .cloned();
            let fake = flows
                .iter()
                .find(|f| port_of(f) == Some(forged.port()))
                .cloned();
            Ok(real.zip(fake))
        },
    )?;
    let (real, fake) = rows;
    ensure!(
        real["midstream"] == false && real["expires_in_s"].as_i64() > Some(3600),
        "the connection that began with a SYN: {real}"
    );
    ensure!(
        fake["midstream"] == true && fake["expires_in_s"].as_i64() <= Some(60),
        "the flow a lone ACK began: {fake}"
    );
    println!("SYN-first: {real}\nACK-first: {fake}");
    Ok(())
}
