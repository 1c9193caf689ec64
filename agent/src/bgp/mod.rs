//! BGP-4 (RFC 4271) for announcing VIPs to routers.
//!
//! - [`codec`] encodes and decodes messages (RFC 4271 §4), their path attributes
//!   (§4.3, §5) and the capabilities of OPEN (RFC 5492), and maps decoding errors
//!   to the NOTIFICATION (§6) the speaker sends back;
//! - [`fsm`] is the session state machine (§8) as pure data, driven by events and a
//!   caller's clock;
//! - [`plan`] is the routing policy: which VIPs go to which peer, with what
//!   attributes (from the model and this node's desired state);
//! - [`session`] drives one session over TCP (MD5, TTL), sending the plan's routes;
//! - [`speaker`] keeps one session per planned peer.
pub mod codec;
pub mod fsm;
pub mod plan;
pub mod session;
pub mod speaker;
