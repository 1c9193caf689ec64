//! Bidirectional Forwarding Detection (RFC 5880), single hop over UDP (RFC 5881), so a
//! router notices a dead node in well under a second instead of after the BGP hold time.
//!
//! - [`packet`] encodes and decodes Control packets (RFC 5880 §4.1) and applies the
//!   discard rules of §6.8.6 that need only the packet;
//! - [`fsm`] is one session (§6.2, §6.8) as pure data, driven by events and a caller's
//!   clock;
//! - [`session`] is the tokio driver: one receive socket shared by all sessions, one
//!   sending socket per session, GTSM (RFC 5881 §4–§5).
pub mod fsm;
pub mod packet;
pub mod session;

pub use fsm::BfdConfig;
pub use packet::{Diag, State};
pub use session::{BfdError, PeerState, Speaker};
