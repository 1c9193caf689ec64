//! The xlb netns lab: uniquely named network namespaces standing in for a client, a node and
//! its pods, real traffic between them, and the `xlb agent` running on the node. Used by the
//! privileged integration tests in `tests/` and by `cargo xtask demo` ([`demo::run`]).
//!
//! Topology (one node for now):
//! ```text
//! client 10.0.0.1/24 --eth0==eth0-- node-a 10.0.0.2/24 --vp{i}==eth0-- pod{i} 10.0.1.{10+i}/32
//!  default via 10.0.0.2             ip_forward, proxy_arp on vp{i}      default via 169.254.1.1
//! ```
//! Lab traffic stays between addresses inside lab namespaces; nothing is created in the host
//! namespace. Everything a lab makes (namespaces, agent processes, pin directories) is
//! removed when the [`Lab`] is dropped, including on panic.

#![warn(missing_docs)]

pub mod agent;
pub mod demo;
pub mod lab;
pub mod manifests;
pub mod netns;
pub mod servers;
pub mod traffic;

pub use agent::{Agent, xlb_bin};
pub use lab::{Lab, LabSpec, Node, Pod, poll};
pub use netns::Netns;
pub use traffic::{Host, Reply, Ticker, TickerReport};
