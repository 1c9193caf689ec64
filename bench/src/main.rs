//! `cargo xtask bench`: xlb measured side by side with what it replaces, in one run, on
//! this machine, reported as medians and ratios (the machines here are shared and noisy).
//!
//! Parts, each its own module:
//! - [`prog`]: per-packet program cost by `BPF_PROG_TEST_RUN`, next to the XDP_PASS floor
//!   and the minimal reference load balancer (`bench/reference`);
//! - [`e2e`]: packets/s and TCP connections/s through a node in the netns lab, for direct
//!   delivery, plain routing, iptables, nftables, HAProxy and xlb's attach/forward modes;
//! - [`control`]: programming 10,000 Services, EndpointSlice-change-to-map latency, agent
//!   RSS, map memory, iptables-restore of the same ruleset, health under scrape load;
//! - [`churn`]: established connections broken while endpoints change (must be 0);
//! - [`failover`]: xlb's L2 failover and Keepalived's, in the same lab, measured alike.
//!
//! [`report`] writes `<out>/<date>.json` (every raw number and the `headline`) and
//! `<out>/latest.md`; [`plot`] draws the PNGs. `--quick` runs everything smaller (under
//! two minutes) so `cargo xtask test` can keep the harness working.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

mod churn;
mod control;
mod e2e;
mod failover;
mod plot;
mod prog;
mod report;
mod server;
mod stats;
mod sys;

/// How big and how long each part runs.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// `--quick`: the smoke-test size.
    pub quick: bool,
}

impl Scale {
    /// Services in the control-plane part (10,000; 100 when quick).
    pub fn control_services(self) -> usize {
        if self.quick { 100 } else { 10_000 }
    }

    /// Services in the "many" end-to-end configuration (1,000; 100 when quick).
    pub fn e2e_many(self) -> usize {
        if self.quick { 100 } else { 1_000 }
    }
}

fn main() -> Result<()> {
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let (mut reference, mut out_dir) = (None, PathBuf::from("bench/results"));
    let mut quick = false;
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--reference" => reference = args.next().map(PathBuf::from),
            "--out" => out_dir = args.next().map(PathBuf::from).context("--out DIR")?,
            "--only" => only = Some(args.next().context("--only PART")?),
            // Checks an output directory is complete and well-formed (what `cargo
            // xtask test` checks after its quick run); never that it is fast.
            "--check" => {
                let dir = PathBuf::from(args.next().context("--check DIR")?);
                return report::check(&dir);
            }
            // Rewrites latest.md and the plots from an existing <date>.json (after a
            // change to the report), without measuring anything.
            "--render" => {
                let path = PathBuf::from(args.next().context("--render JSON")?);
                let doc: Value = serde_json::from_str(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                )?;
                let dir = path.parent().context("--render JSON: no directory")?;
                report::write(dir, &doc)?;
                return plot::all(dir, &doc);
            }
            other => bail!(
                "unknown argument {other:?} (--reference OBJ [--out DIR] [--quick] [--only prog|e2e|control|churn|failover])"
            ),
        }
    }
    let reference = reference.context("--reference OBJ (cargo xtask bench builds it)")?;
    let scale = Scale { quick };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let want = |part: &str| only.as_deref().is_none_or(|o| o == part);

    let load_before = sys::loadavg();
    let mut parts = serde_json::Map::new();
    let mut took = serde_json::Map::new();
    type Part<'a> = (&'a str, Box<dyn Fn() -> Result<Value> + 'a>);
    let list: [Part<'_>; 5] = [
        ("prog", Box::new(|| prog::run(&reference, scale))),
        ("e2e", Box::new(|| e2e::run(scale))),
        ("control", Box::new(|| control::run(scale))),
        ("churn", Box::new(|| churn::run(scale))),
        ("failover", Box::new(|| failover::run(scale))),
    ];
    for (name, part) in list.iter().filter(|(n, _)| want(n)) {
        let t = Instant::now();
        parts.insert(name.to_string(), part()?);
        let secs = stats::round(t.elapsed().as_secs_f64(), 1);
        println!("bench: {name} took {secs} s");
        took.insert(name.to_string(), json!(secs));
    }
    let doc = json!({
        "date": sys::today()?,
        "mode": if quick { "quick" } else { "full" },
        "machine": sys::machine(),
        "kernel": sys::kernel(),
        "took_s": stats::round(started.elapsed().as_secs_f64(), 1),
        "part_took_s": Value::Object(took),
        // The machines are shared: how busy this one was around the run.
        "loadavg_before": load_before,
        "loadavg_after": sys::loadavg(),
        "headline": report::headline(&parts),
        "parts": Value::Object(parts),
    });
    report::write(&out_dir, &doc)?;
    plot::all(&out_dir, &doc)?;
    println!(
        "bench: done in {:.0} s, results in {}",
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(())
}
