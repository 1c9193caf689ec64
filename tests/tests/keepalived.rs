//! Keepalived from Debian (VRRP, `advert_int 1`) in the same three-node bridge lab as the
//! L2 failover test (issue 17 test 7), failed the same two ways (SIGKILL of the MASTER's
//! keepalived, the MASTER's link down) and measured the same way (the client's 10 ms UDP
//! ticker's largest gap), so the two sets of numbers sit side by side. No xlb agent runs:
//! the VIP is keepalived's, served by the node kernels. Every run must recover (traffic
//! answered by another node); the gaps are printed, never asserted against a clock.
//! Needs root and `/usr/sbin/keepalived` (`cargo xtask setup`).

use anyhow::{Context, Result};
use xlb_lab::keepalived::{Failure, KeepalivedLab};
use xlb_lab::l2::{median_ms, ms};

#[test]
fn keepalived_failover_gaps_over_runs() -> Result<()> {
    const RUNS: usize = 5;
    let mut kl = KeepalivedLab::start()?;
    for how in [Failure::Sigkill, Failure::LinkDown] {
        let mut gaps = Vec::new();
        let mut takeovers = Vec::new();
        for run in 1..=RUNS {
            // Runs fail the MASTER 0, 200, .. 800 ms later against its advertisement
            // timer (see `KeepalivedLab::failover`).
            let lead = (run as u64 - 1) * 20;
            let r = kl
                .failover(how, lead)
                .with_context(|| format!("{how:?} run {run}"))?;
            println!(
                "{how:?} run {run}: ticker max gap {:.0} ms, new owner after {:.0} ms ({} took over from {}{}; {} node(s) answered ARP after; lost {} of {})",
                ms(r.max_gap),
                ms(r.takeover),
                r.next,
                r.failed,
                if r.failed_still_held {
                    ", which still held the VIP"
                } else {
                    ""
                },
                r.arp_answerers,
                r.lost,
                r.sent
            );
            gaps.push(r.max_gap);
            takeovers.push(r.takeover);
        }
        println!(
            "{how:?}: median max gap {:.0} ms (worst {:.0} ms), median takeover {:.0} ms over {RUNS} runs",
            median_ms(&gaps),
            gaps.iter().map(|d| ms(*d)).fold(0.0, f64::max),
            median_ms(&takeovers)
        );
    }
    kl.stop()
}
