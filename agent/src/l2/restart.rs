//! The restart grace: an agent that gets SIGTERM keeps its VIPs for
//! `--restart-grace` and tells its peers so, in a notice on the membership socket.
//! Peers then count that node as live until the grace ends, even after SWIM has
//! declared its old identity down, so a DaemonSet rollout (SIGTERM, then a new agent
//! seconds later) moves no VIP; with no new agent (an uninstall) the peers take the
//! VIPs when the grace ends, at the moment the old datapath's dead-man deadline
//! (set to the same instant) stops it answering ARP. A grace of zero hands over at
//! once.
//!
//! This module is the pure part: the notice's wire format and the peers' table of
//! nodes in their grace. `task` sends notices and applies the table to the live set.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// First bytes of a notice. A foca datagram starts with the postcard encoding of the
/// sender's name length (a varint); 0xff five times would announce a name longer than
/// any datagram, so no foca datagram begins this way.
const MAGIC: &[u8] = b"\xff\xff\xff\xff\xffxlb-restart\x01";

/// "Node `name`, membership generation `generation`, stops; count it live for
/// `grace_ms` more."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// `metadata.name` of the stopping node.
    pub name: String,
    /// The generation of its membership identity (see `membership::NodeId`).
    pub generation: u64,
    /// How long its VIPs stay with it, from the notice.
    pub grace_ms: u64,
}

impl Notice {
    /// The datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // Serialising a struct of a string and two integers cannot fail.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// `None` when the datagram is not a notice (then it is foca's); `Some(Err)` when
    /// it is one that does not parse.
    pub fn decode(data: &[u8]) -> Option<Result<Notice, serde_json::Error>> {
        let body = data.strip_prefix(MAGIC)?;
        Some(serde_json::from_slice(body))
    }
}

/// One node in its grace, as a peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stopping {
    generation: u64,
    until: Instant,
}

/// Nodes whose agent said it stops, until their grace ends and SWIM has let the old
/// identity go, or a new agent of the node is a member.
#[derive(Debug, Default)]
pub struct Graces {
    nodes: BTreeMap<String, Stopping>,
}

impl Graces {
    /// Records a notice received at `now`, believed for at most `cap` (this node's
    /// own `--restart-grace`: a peer's word, or a forger's, holds no VIP longer).
    pub fn record(&mut self, notice: &Notice, now: Instant, cap: Duration) {
        let until = now + Duration::from_millis(notice.grace_ms).min(cap);
        self.nodes.insert(
            notice.name.clone(),
            Stopping {
                generation: notice.generation,
                until,
            },
        );
    }

    /// Whether this notice (node and generation) is already recorded: copies of one
    /// notice are logged once.
    pub fn is_recorded(&self, notice: &Notice) -> bool {
        self.nodes
            .get(&notice.name)
            .is_some_and(|s| s.generation == notice.generation)
    }

    /// Applies the graces to `live`, the names of SWIM's live members (plus this
    /// node): a node in its grace is live; a node past it whose old identity SWIM
    /// still thinks alive is not. `members` are SWIM's live (name, generation)
    /// pairs. Entries that no longer matter are dropped.
    pub fn apply(&mut self, members: &[(String, u64)], live: &mut BTreeSet<String>, now: Instant) {
        self.nodes.retain(|name, s| {
            let newer = members.iter().any(|(n, g)| n == name && *g > s.generation);
            let old_member = members.iter().any(|(n, g)| n == name && *g == s.generation);
            if newer {
                // A new agent of that node has joined: it is live on its own account.
                return false;
            }
            if now < s.until {
                live.insert(name.clone());
                return true;
            }
            if old_member {
                // The grace is over but SWIM has not noticed the stop yet.
                live.remove(name);
                return true;
            }
            false
        });
    }

    /// Nodes currently in their grace.
    pub fn in_grace(&self, now: Instant) -> usize {
        self.nodes.values().filter(|s| now < s.until).count()
    }

    /// The next instant a grace ends, to recompute ownership then.
    pub fn next_end(&self, now: Instant) -> Option<Instant> {
        self.nodes
            .values()
            .map(|s| s.until)
            .filter(|u| *u > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This node's own `--restart-grace` in the tests.
    const CAP: Duration = Duration::from_secs(5);

    fn notice(grace_ms: u64) -> Notice {
        Notice {
            name: "node-b".into(),
            generation: 7,
            grace_ms,
        }
    }

    #[test]
    fn notices_round_trip_and_are_told_from_foca_datagrams() {
        let n = notice(5000);
        assert_eq!(Notice::decode(&n.encode()).map(Result::ok), Some(Some(n)));
        // A foca datagram: postcard starts with the name's length.
        assert!(Notice::decode(b"\x06node-a\x00\x01").is_none());
        let mut broken = MAGIC.to_vec();
        broken.extend(b"{not json");
        assert!(matches!(Notice::decode(&broken), Some(Err(_))));
    }

    #[test]
    fn a_node_in_its_grace_stays_live_until_it_ends() {
        let t0 = Instant::now();
        let mut g = Graces::default();
        g.record(&notice(5000), t0, CAP);
        assert_eq!(g.next_end(t0), Some(t0 + Duration::from_secs(5)));

        // SWIM has declared the old identity down: the grace keeps the node live.
        let mut live = BTreeSet::from(["node-a".to_string()]);
        g.apply(&[], &mut live, t0 + Duration::from_secs(1));
        assert!(live.contains("node-b"));
        assert_eq!(g.in_grace(t0 + Duration::from_secs(1)), 1);

        // Past the grace, with SWIM still holding the old identity alive: not live.
        let old = [("node-b".to_string(), 7)];
        let mut live = BTreeSet::from(["node-a".to_string(), "node-b".to_string()]);
        g.apply(&old, &mut live, t0 + Duration::from_secs(5));
        assert!(!live.contains("node-b"));
        // And once SWIM lets it go, the entry is gone.
        let mut live = BTreeSet::from(["node-a".to_string()]);
        g.apply(&[], &mut live, t0 + Duration::from_secs(6));
        assert!(!live.contains("node-b"));
        assert_eq!(g.next_end(t0), None);
    }

    #[test]
    fn a_new_agent_of_the_node_ends_the_grace_and_counts_on_its_own() {
        let t0 = Instant::now();
        let mut g = Graces::default();
        g.record(&notice(5000), t0, CAP);
        let new = [("node-b".to_string(), 8)];
        let mut live = BTreeSet::from(["node-b".to_string()]);
        g.apply(&new, &mut live, t0 + Duration::from_secs(2));
        assert!(live.contains("node-b"));
        assert_eq!(g.in_grace(t0), 0, "the entry is dropped");
        // Later the new agent is live through SWIM alone, past the old grace.
        let mut live = BTreeSet::from(["node-b".to_string()]);
        g.apply(&new, &mut live, t0 + Duration::from_secs(9));
        assert!(live.contains("node-b"));
    }

    #[test]
    fn a_zero_grace_hands_over_at_once() {
        let t0 = Instant::now();
        let mut g = Graces::default();
        g.record(&notice(0), t0, CAP);
        let old = [("node-b".to_string(), 7)];
        let mut live = BTreeSet::from(["node-a".to_string(), "node-b".to_string()]);
        g.apply(&old, &mut live, t0);
        assert!(!live.contains("node-b"));
    }

    #[test]
    fn a_notice_holds_a_vip_no_longer_than_this_nodes_own_grace() {
        // The hostile probe's notice: 2^64-1 ms (and no panic adding it to a clock).
        let t0 = Instant::now();
        let mut g = Graces::default();
        g.record(&notice(u64::MAX), t0, CAP);
        assert_eq!(g.next_end(t0), Some(t0 + CAP));
        let old = [("node-b".to_string(), 7)];
        let mut live = BTreeSet::from(["node-a".to_string(), "node-b".to_string()]);
        g.apply(&old, &mut live, t0 + CAP);
        assert!(!live.contains("node-b"));
    }
}
