//! What the running agent says about itself beyond its metrics: who holds each VIP and
//! why (`/debug/owners`), and the state of its BGP and BFD sessions (`/debug/peers`),
//! served as JSON next to `/metrics` and shown by `xlb inspect owners` and
//! `xlb inspect peers`. The L2 task and the BGP speaker publish their view here
//! whenever they act on it; nothing here is read back by them.
use std::{net::IpAddr, sync::RwLock};

use serde::{Deserialize, Serialize};

/// One VIP of L2 announcement, as this node's election sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L2Owner {
    /// The VIP.
    pub vip: IpAddr,
    /// The node election gives it to (`None`: no candidate is live).
    pub owner: Option<String>,
    /// This node answers ARP for it now (`xlb_l2_vips4` holds it).
    pub held_here: bool,
    /// Nodes allowed to announce it: an L2Announcement's node selectors match them
    /// and, for externalTrafficPolicy Local, they have a ready endpoint.
    pub candidates: Vec<String>,
    /// Why the owner is who it is, in words.
    pub why: String,
}

/// L2 announcement on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L2View {
    /// The announce interface.
    pub interface: String,
    /// Its link is up (a node whose uplink is down holds nothing).
    pub link_up: bool,
    /// Still joining the membership: claims nothing new yet.
    pub joining: bool,
    /// Members this node sees alive (itself included), and those in a restart grace.
    pub live: Vec<String>,
    /// Per VIP.
    pub vips: Vec<L2Owner>,
}

/// One prefix this node announces over BGP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpRoute {
    /// The prefix (a VIP as /32, or its aggregate).
    pub prefix: String,
    /// The peers whose plan holds it (sent once their session is Established).
    pub peers: Vec<String>,
    /// Standard and large communities attached, as written in the BGPAnnouncement.
    pub communities: Vec<String>,
}

/// `/debug/owners`: what this node attracts and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owners {
    /// This node's name.
    pub node: String,
    /// L2 announcement (`None`: no L2 task runs here).
    pub l2: Option<L2View>,
    /// Prefixes announced over BGP by this node (each node announces what it may
    /// attract; the router spreads traffic over all of them, ECMP).
    pub bgp: Vec<BgpRoute>,
}

/// BFD with one peer (RFC 5880).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdView {
    /// Session state (RFC 5880 §6.2: AdminDown, Down, Init, Up).
    pub state: String,
    /// Diagnostic of the last change (RFC 5880 §4.1).
    pub diag: String,
    /// Detection time in milliseconds, once the peer has been heard.
    pub detection_ms: Option<u64>,
}

/// One BGP peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The BGPPeer (`namespace/name`).
    pub name: String,
    /// Its address and port.
    pub address: String,
    /// Our AS and the peer's.
    pub local_asn: u32,
    /// The peer's AS.
    pub peer_asn: u32,
    /// RFC 4271 state (`Idle` .. `Established`).
    pub state: String,
    /// Prefixes sent and not withdrawn.
    pub advertised: usize,
    /// The last NOTIFICATION sent or received.
    pub last_error: Option<String>,
    /// BFD, when the peer's BGPPeer names a profile.
    pub bfd: Option<BfdView>,
}

/// `/debug/peers`: this node's BGP sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// This node's name.
    pub node: String,
    /// Per peer, by name.
    pub peers: Vec<PeerView>,
}

/// The published views (written by their owners, read by the HTTP server).
#[derive(Debug, Default)]
pub struct Views {
    node: String,
    l2: RwLock<Option<L2View>>,
    routes: RwLock<Vec<BgpRoute>>,
    peers: RwLock<Vec<PeerView>>,
}

impl Views {
    /// Empty views of node `node`.
    pub fn new(node: &str) -> Self {
        Views {
            node: node.to_string(),
            ..Views::default()
        }
    }

    /// The L2 task's current view.
    pub fn set_l2(&self, view: L2View) {
        if let Ok(mut l2) = self.l2.write() {
            *l2 = Some(view);
        }
    }

    /// The BGP speaker's current routes and sessions.
    pub fn set_bgp(&self, routes: Vec<BgpRoute>, peers: Vec<PeerView>) {
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
        if let Ok(mut p) = self.peers.write() {
            *p = peers;
        }
    }

    /// `/debug/owners`.
    pub fn owners(&self) -> Owners {
        Owners {
            node: self.node.clone(),
            l2: self.l2.read().map(|v| v.clone()).unwrap_or_default(),
            bgp: self.routes.read().map(|v| v.clone()).unwrap_or_default(),
        }
    }

    /// `/debug/peers`.
    pub fn peers(&self) -> Peers {
        Peers {
            node: self.node.clone(),
            peers: self.peers.read().map(|v| v.clone()).unwrap_or_default(),
        }
    }
}
