//! VIP announcement on a LAN (issue 17): one node answers ARP for each VIP, chosen
//! by every agent alike from a SWIM membership, and another takes over within a
//! second when it dies.
//!
//! - [`election`]: the pure part, model + live members -> owner per VIP.
//! - [`membership`]: SWIM identity and timing (foca).
//! - [`announce`]: gratuitous ARP (RFC 5227) and the announce link's state.
//! - [`restart`]: the restart grace (SIGTERM keeps the VIPs; peers are told).
//! - [`seal`]: authenticated membership datagrams (a shared key, HMAC-SHA256).
//! - [`task`]: the tokio driver that ties them to the sockets and the pinned maps
//!   (`xlb_l2_vips4`, the dead-man deadline in `xlb_config`).
//!
//! The XDP side (`ebpf/xlb-ebpf/src/arp.rs`) answers ARP requests for the VIPs in
//! `xlb_l2_vips4` while the deadline is in the future.
pub mod announce;
pub mod election;
pub mod membership;
pub mod restart;
pub mod seal;
pub mod task;

pub use election::Plan;
