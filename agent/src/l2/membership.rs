//! Liveness between agents: SWIM (Das et al., 2002) through `foca`, which does no
//! I/O of its own. This module holds the identity and the timing; `task` drives it
//! from tokio (datagrams and timers in, datagrams and timers out).
//!
//! Timing: MetalLB's memberlist keeps its LAN defaults (probe every 1 s, suspicion
//! for 4 × max(1, log10 N) s), which is why it fails over in seconds. On one LAN
//! segment a round trip is well under a millisecond, so xlb probes every 100 ms,
//! gives a probe 40 ms before asking others to probe indirectly, and declares a
//! suspect down after 200 ms more: a dead node is noticed in about 0.25 to 0.5 s
//! with a few nodes, and every node also gossips the verdict.
use std::{net::SocketAddr, num::NonZeroU32, time::Duration};

use foca::{Config, Identity};
use serde::{Deserialize, Serialize};

/// A member: the node's name (what ownership is computed over), where its agent
/// listens, and a generation that tells this run of the agent from earlier ones
/// (SWIM will not take back an identity it declared down; a restarted agent comes
/// back under a new generation at once).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// `metadata.name` of the node.
    pub name: String,
    /// The membership socket of its agent.
    pub addr: SocketAddr,
    /// Start time of this agent run (wall clock ns), bumped when declared down.
    pub generation: u64,
}

impl Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Probe period (see the module's timing note).
pub const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Time a direct probe has before indirect probes are asked for.
pub const PROBE_RTT: Duration = Duration::from_millis(40);
/// Suspicion lasts this long before the member is declared down.
pub const SUSPECT_TO_DOWN: Duration = Duration::from_millis(200);

/// foca's LAN configuration with xlb's sub-second timing, for a cluster of
/// `cluster_size` nodes.
pub fn config(cluster_size: usize) -> Config {
    let n = NonZeroU32::new(u32::try_from(cluster_size.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN);
    let mut c = Config::new_lan(n);
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.suspect_to_down_after = SUSPECT_TO_DOWN;
    // Spread news fast: gossip to three members every 50 ms.
    if let Some(g) = c.periodic_gossip.as_mut() {
        g.frequency = Duration::from_millis(50);
    }
    // Down members are forgotten after a while so a long-gone node's identity does
    // not stay in the tables forever; a restarted agent rejoins under a new
    // generation before that anyway.
    c.remove_down_after = Some(Duration::from_secs(60));
    c
}
