//! The xlb netns lab: uniquely named network namespaces standing in for a client, nodes and
//! their pods, real traffic between them, and `xlb agent` running on the nodes. Used by the
//! privileged integration tests in `tests/` and by `cargo xtask demo` ([`demo::run`]).
//!
//! One node ([`Lab::one_node`]):
//! ```text
//! client 10.0.0.1/24 --eth0==eth0-- node-a 10.0.0.2/24 --vp{i}==eth0-- pod{i} 10.0.1.{10+i}/32
//!  default via 10.0.0.2             ip_forward, proxy_arp on vp{i}      default via 169.254.1.1
//! ```
//! Several nodes on one L2 segment ([`Lab::multi_node`]): client `10.0.0.1` and `node-a`,
//! `node-b`, ... (`10.0.0.11`, `.12`, ...) each with `eth0` on bridge `br0` in the lab's
//! `-lan` namespace; node `n` has pods in `10.0.{n+1}.0/24` as above and routes to the other
//! nodes' pod CIDRs; the client routes VIPs via one chosen node.
//! Lab traffic stays between addresses inside lab namespaces; nothing is created in the host
//! namespace. Everything a lab makes (namespaces, agent processes, pin directories) is
//! removed when the [`Lab`] is dropped, including on panic.
//!
//! [`apiserver`]: a fake Kubernetes API server speaking list/watch (the kube source's tests).
//! [`arp`]: raw ARP requests from a lab host (who answers for an address).
//! [`bpf`]: writing straight into an agent's pinned maps (states too slow to build with traffic).
//! [`l2`]: xlb's L2 announcement lab and one measured failover of a VIP's owner.
//! [`keepalived`]: Debian's keepalived (VRRP) on lab nodes, the reference for L2 failover.
//! [`load`]: health checks under scrape load (hardening test and bench).
//! [`router`]: BIRD 2 as the lab's BGP router, and a client behind it.
//! [`frr`]: FRR (zebra, bgpd, bfdd) as the lab's BGP router instead.
//! [`gobgp`]: GoBGP as the lab's BGP router (its RIB, no kernel routes).
//! [`bgp_lab`]: the lab, manifests and checks every BGP interop test shares.
//! [`packets`]: hand-built frames and checksum checks for the agent's `BPF_PROG_TEST_RUN` tests.

#![warn(missing_docs)]

pub mod agent;
pub mod apiserver;
pub mod arp;
pub mod bgp_lab;
pub mod bpf;
pub mod demo;
pub mod frr;
pub mod gobgp;
pub mod keepalived;
pub mod l2;
pub mod lab;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod packets;
pub mod router;
pub mod servers;
pub mod traffic;

pub use agent::{Agent, xlb_bin};
pub use lab::{Lab, LabSpec, ManifestsLayout, Node, NodeSpec, Pod, poll};
pub use netns::Netns;
pub use traffic::{Host, Reply, Ticker, TickerReport};
