//! xlb's agent: sources -> model -> desired state -> diff -> BPF maps.
//!
//! - [`source`] turns manifests (and later the Kubernetes API) into one [`model::Snapshot`];
//! - [`desired`] computes, for this node, the whole BPF state the snapshot asks for;
//! - [`dataplane`] loads and attaches the kernel programs, reads back what the maps hold,
//!   and applies the difference;
//! - [`features`] probes the kernel features the datapath uses and picks fallbacks;
//! - [`netdev`] reads and keeps what the datapath needs from the uplink (addresses,
//!   driver and XDP mode, neighbour entries for other nodes);
//! - [`ipam`] gives LoadBalancer Services addresses from AddressPools (in the model);
//!   with the Kubernetes API, [`leader`] elects one agent (a Lease) and [`status`]
//!   has it write the addresses to Service status, and problems as Events;
//! - [`inspect`] shows what the pinned maps hold (`xlb inspect`), and what a running
//!   agent publishes in [`introspect`] (who owns each VIP, BGP/BFD sessions);
//! - [`metrics`] serves `/metrics` and `/healthz`; [`health`] the per-Service
//!   `healthCheckNodePort` servers;
//! - [`crd`] xlb's resources as types (and their CRDs);
//! - [`checks`] health-checks StaticService backends (verdicts go to the source);
//! - [`metallb`] converts MetalLB configuration (`xlb convert-metallb`);
//! - [`attract`] says which nodes may attract a VIP (shared by L2 and BGP);
//! - [`l2`] announces VIPs on the LAN (ARP, SWIM membership, failover);
//! - [`bgp`] speaks BGP-4 to routers (codec, session state machine, policy, speaker);
//! - [`bfd`] detects a dead path to a router in under a second (BFD, RFC 5880/5881);
//! - [`duration`] parses `500ms` / `2s` / `1m` (objects and flags);
//! - [`agent`] wires them into the running process.
pub mod agent;
pub mod attract;
pub mod bfd;
pub mod bgp;
pub mod checks;
pub mod crd;
pub mod dataplane;
pub mod desired;
pub mod duration;
pub mod features;
pub mod health;
pub mod inspect;
pub mod introspect;
pub mod ipam;
pub mod l2;
pub mod leader;
pub mod metallb;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod source;
pub mod status;
