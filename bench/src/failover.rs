//! L2 failover next to Keepalived's, measured alike (issue 17 tests 2 and 7): xlb's L2
//! lab ([`xlb_lab::l2`], three agents, a Local VIP) and the Keepalived lab
//! ([`xlb_lab::keepalived`], VRRP `advert_int 1`, priorities 150/100/50) side by side,
//! their runs interleaved (xlb, Keepalived, xlb, ...). Each run fails the VIP's
//! holder (SIGKILL of its agent / keepalived, or its link down) and records the
//! client's 10 ms UDP ticker's largest gap and the time until another node took the
//! VIP. A system whose run fails is recorded (`error`, the runs so far kept) and the
//! bench goes on. Reported, never asserted.
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use xlb_lab::keepalived::{self, KeepalivedLab};
use xlb_lab::l2::{self, median_ms, ms};

use crate::Scale;
use crate::stats::{num, round};

/// What one system's runs of one failure measured.
#[derive(Default)]
struct Series {
    gaps: Vec<Duration>,
    takeovers: Vec<Duration>,
    /// Per-run facts beyond the two times (Keepalived: whether the failed node still
    /// held the VIP, how many nodes answered ARP after the takeover).
    notes: Vec<Value>,
    error: Option<String>,
}

impl Series {
    fn json(&self) -> Value {
        let list = |v: &[Duration]| v.iter().map(|d| round(ms(*d), 1)).collect::<Vec<_>>();
        let median = |v: &[Duration]| {
            if v.is_empty() {
                Value::Null
            } else {
                num(round(median_ms(v), 1))
            }
        };
        json!({
            "max_gap_ms": list(&self.gaps),
            "takeover_ms": list(&self.takeovers),
            "median_max_gap_ms": median(&self.gaps),
            "median_takeover_ms": median(&self.takeovers),
            "runs": self.notes,
            "error": self.error,
        })
    }

    fn print(&self, system: &str, how: &str) {
        match &self.error {
            Some(e) => println!("failover: {system} {how}: failed: {e}"),
            None => println!(
                "failover: {system} {how}: median max gap {:.0} ms, median takeover {:.0} ms over {} runs",
                median_ms(&self.gaps),
                median_ms(&self.takeovers),
                self.gaps.len()
            ),
        }
    }
}

/// Runs both labs; returns the JSON part. Full: 5 runs of each failure per system;
/// quick: one link-down run each.
pub fn run(scale: Scale) -> Result<Value> {
    let (runs, kinds): (usize, &[&str]) = if scale.quick {
        (1, &["link_down"])
    } else {
        (5, &["sigkill", "link_down"])
    };
    println!(
        "failover: xlb L2 and Keepalived, {runs} run(s) of {}",
        kinds.join(", ")
    );
    let mut xlb_lab = l2::l2_lab();
    let mut ka_lab = KeepalivedLab::start();
    let mut out_xlb = serde_json::Map::new();
    let mut out_ka = serde_json::Map::new();
    for &kind in kinds {
        let (mut xs, mut ks) = (Series::default(), Series::default());
        for run in 0..runs {
            if xs.error.is_none() {
                let how = match kind {
                    "sigkill" => l2::Failure::Sigkill,
                    _ => l2::Failure::LinkDown,
                };
                let r = match &mut xlb_lab {
                    Ok(lab) => l2::failover_gap(lab, how),
                    Err(e) => Err(anyhow::anyhow!("building the L2 lab: {e:#}")),
                };
                match r {
                    Ok((gap, takeover)) => {
                        xs.gaps.push(gap);
                        xs.takeovers.push(takeover);
                    }
                    Err(e) => xs.error = Some(format!("run {}: {e:#}", run + 1)),
                }
            }
            if ks.error.is_none() {
                let how = match kind {
                    "sigkill" => keepalived::Failure::Sigkill,
                    _ => keepalived::Failure::LinkDown,
                };
                // 0, 200, .. 800 ms into the MASTER's advertisement interval (see
                // `KeepalivedLab::failover`).
                let lead = (run % 5) as u64 * 20;
                let r = match &mut ka_lab {
                    Ok(lab) => lab.failover(how, lead),
                    Err(e) => Err(anyhow::anyhow!("building the Keepalived lab: {e:#}")),
                };
                match r {
                    Ok(r) => {
                        ks.gaps.push(r.max_gap);
                        ks.takeovers.push(r.takeover);
                        ks.notes.push(json!({
                            "failed": r.failed, "next": r.next,
                            "failed_still_held": r.failed_still_held,
                            "arp_answerers": r.arp_answerers,
                            "lost": r.lost, "sent": r.sent,
                        }));
                    }
                    Err(e) => ks.error = Some(format!("run {}: {e:#}", run + 1)),
                }
            }
        }
        xs.print("xlb L2", kind);
        ks.print("Keepalived", kind);
        out_xlb.insert(kind.to_string(), xs.json());
        out_ka.insert(kind.to_string(), ks.json());
    }
    Ok(json!({
        "runs_per_failure": runs,
        "tick_ms": ms(l2::TICK),
        "l2": Value::Object(out_xlb),
        "keepalived": Value::Object(out_ka),
    }))
}
