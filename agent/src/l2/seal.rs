//! Authenticated membership datagrams (issue 31, finding 1): with a shared key
//! (`--memberlist-key-file`), every datagram on the membership socket (SWIM and the
//! restart notice alike) carries an HMAC-SHA256 tag (RFC 2104) over a header and
//! the payload, so a host on the LAN that is not a node can neither join, nor
//! declare a node down, nor hold a node's VIPs with a forged notice. MetalLB's
//! memberlist does the same with a `secretkey` (AES-GCM); the membership is not
//! secret, only who may speak in it, so a MAC is enough.
//!
//! Replays: the header names the sender's membership address and a timestamp that
//! the sender keeps strictly increasing; a receiver takes, per sender, only
//! timestamps newer than the last it accepted, and none more than [`MAX_SKEW`] away
//! from its own clock (node clocks are assumed to be within a minute: NTP).
//!
//! Key rotation: the key file holds one to [`MAX_KEYS`] keys, one per line; the
//! first signs, every one verifies. Add the new key on every node (second line),
//! then make it first, then remove the old one: no step needs two nodes to agree on
//! which key signs.
//!
//! Wire format, after the payload is known:
//!
//! ```text
//! "xlb\x01" | key id (4) | timestamp ns, big endian (8) | sender IP, IPv6 or
//! v4-mapped (16) | sender port (2) | payload | HMAC-SHA256 of all before (32)
//! ```
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ring::{digest, hmac};

/// First bytes of a sealed datagram. foca's datagrams begin with the postcard
/// varint of the sender's name length, and restart notices with 0xff: neither
/// begins with `x` followed by these bytes and a valid tag.
const MAGIC: &[u8; 4] = b"xlb\x01";
const HEADER: usize = 4 + 4 + 8 + 16 + 2;
const TAG: usize = 32;
/// Bytes a seal adds to a datagram.
pub const OVERHEAD: usize = HEADER + TAG;
/// Shortest key accepted, in bytes (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// Most keys a key file may hold (one signing, the rest for rotation).
pub const MAX_KEYS: usize = 4;
/// How far a datagram's timestamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// Senders remembered for replay detection; beyond this, the oldest are dropped
/// (senders are authenticated nodes, so this is far above any cluster).
const MAX_SENDERS: usize = 4096;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("memberlist key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is shorter than [`MIN_KEY_LEN`].
    #[error(
        "memberlist key file {path}, line {line}: a key of {len} bytes; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The key's length.
        len: usize,
    },
    /// The file holds no key.
    #[error("memberlist key file {path}: no key in it")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file holds more than [`MAX_KEYS`] keys.
    #[error("memberlist key file {path}: {count} keys; at most {MAX_KEYS} (the first signs)")]
    TooMany {
        /// The file.
        path: PathBuf,
        /// Keys found.
        count: usize,
    },
}

/// One shared key and its public id (the first 4 bytes of its SHA-256), which lets a
/// receiver pick the key without trying each.
struct Key {
    id: [u8; 4],
    key: hmac::Key,
}

impl Key {
    fn new(secret: &[u8]) -> Key {
        let d = digest::digest(&digest::SHA256, secret);
        let mut id = [0u8; 4];
        id.copy_from_slice(&d.as_ref()[..4]);
        Key {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }
}

/// The keys of a key file: the first signs, all verify.
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

impl Keyring {
    /// Parses a key file's text: one key per non-empty line (surrounding blanks
    /// ignored; the line's bytes are the key, so a base64 line is used as written).
    pub fn parse(text: &str, path: &Path) -> Result<Keyring, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line.len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort {
                    path: path.to_path_buf(),
                    line: i + 1,
                    len: line.len(),
                });
            }
            keys.push(Key::new(line.as_bytes()));
        }
        match keys.len() {
            0 => Err(KeyError::Empty {
                path: path.to_path_buf(),
            }),
            n if n > MAX_KEYS => Err(KeyError::TooMany {
                path: path.to_path_buf(),
                count: n,
            }),
            _ => Ok(Keyring { keys }),
        }
    }

    /// Reads and parses a key file.
    pub fn load(path: &Path) -> Result<Keyring, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Keyring::parse(&text, path)
    }

    /// The keys' ids in hex, the signing key first (for logs: never the keys).
    pub fn ids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.id.iter().map(|b| format!("{b:02x}")).collect())
            .collect()
    }

    /// How many keys verify.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a keyring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Why a datagram was refused (the `reason` label of
/// `xlb_l2_membership_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not sealed, while this node requires a seal.
    Unauthenticated,
    /// Sealed, but this node has no key (a configuration mismatch).
    NoKeyHere,
    /// Sealed with a key this node does not hold.
    UnknownKey,
    /// The tag does not match (forged or corrupted).
    BadTag,
    /// The timestamp is more than [`MAX_SKEW`] from this node's clock.
    Stale,
    /// Not newer than the last datagram accepted from the same sender.
    Replayed,
}

impl Refused {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Unauthenticated => "unauthenticated",
            Refused::NoKeyHere => "sealed_without_key",
            Refused::UnknownKey => "unknown_key",
            Refused::BadTag => "bad_tag",
            Refused::Stale => "stale",
            Refused::Replayed => "replayed",
        }
    }
}

/// A datagram that passed [`Sealer::open`].
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The payload (foca's datagram or a restart notice).
    pub payload: &'a [u8],
    /// The sender's membership address as it sealed it (`None` without a key).
    pub sender: Option<SocketAddr>,
}

/// How a keyed agent treats agents without the key while a cluster moves to an
/// authenticated membership (`--memberlist-key-transition`), as memberlist's
/// `GossipVerifyIncoming`/`GossipVerifyOutgoing` do: agents that cannot talk to each
/// other would each elect owners among their own half and answer ARP for the same VIPs.
/// Three rollouts: `send-plain` everywhere (interoperates with agents without a key),
/// then `accept-plain` (seals; accepts what a `send-plain` agent sends), then neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transition {
    /// Seal everything and accept only sealed datagrams (the default).
    #[default]
    Enforce,
    /// Seal everything; accept unsealed datagrams too.
    AcceptPlain,
    /// Send unsealed datagrams, accept both.
    SendPlain,
}

/// Seals outgoing and opens incoming datagrams; sans-IO (the caller passes the
/// clock). Without a keyring it passes datagrams through unchanged, as before
/// membership was authenticated.
#[derive(Debug, Default)]
pub struct Sealer {
    keyring: Option<Keyring>,
    transition: Transition,
    /// The last timestamp this node sealed with.
    last_sent: u64,
    /// Per sender, the last timestamp accepted.
    seen: HashMap<SocketAddr, u64>,
}

impl Sealer {
    /// A sealer with `keyring` (`None`: unauthenticated).
    pub fn new(keyring: Option<Keyring>) -> Sealer {
        Sealer {
            keyring,
            ..Sealer::default()
        }
    }

    /// The same, in a transition towards an authenticated membership.
    pub fn with_transition(mut self, transition: Transition) -> Sealer {
        self.transition = transition;
        self
    }

    /// Replaces the keys (a rotated key file); the replay table is kept.
    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.keyring = Some(keyring);
    }

    /// `payload` as it goes on the wire from `me` at wall-clock `now_ns`.
    pub fn seal(&mut self, payload: &[u8], me: SocketAddr, now_ns: u64) -> Vec<u8> {
        let Some(ring) = self
            .keyring
            .as_ref()
            .filter(|_| self.transition != Transition::SendPlain)
        else {
            return payload.to_vec();
        };
        // A keyring is never empty (`Keyring::parse`), so the first key exists.
        let key = &ring.keys[0];
        let ts = now_ns.max(self.last_sent.saturating_add(1));
        self.last_sent = ts;
        let mut out = Vec::with_capacity(OVERHEAD + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&ts.to_be_bytes());
        out.extend_from_slice(&ipv6_form(me.ip()));
        out.extend_from_slice(&me.port().to_be_bytes());
        out.extend_from_slice(payload);
        let tag = hmac::sign(&key.key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The payload of `data`, if this node accepts it at wall-clock `now_ns`.
    pub fn open<'a>(&mut self, data: &'a [u8], now_ns: u64) -> Result<Opened<'a>, Refused> {
        let sealed = data.len() >= OVERHEAD && data.starts_with(MAGIC);
        let Some(ring) = &self.keyring else {
            if sealed {
                return Err(Refused::NoKeyHere);
            }
            return Ok(Opened {
                payload: data,
                sender: None,
            });
        };
        if !sealed {
            if self.transition != Transition::Enforce {
                return Ok(Opened {
                    payload: data,
                    sender: None,
                });
            }
            return Err(Refused::Unauthenticated);
        }
        let (signed, tag) = data.split_at(data.len() - TAG);
        let key = ring
            .keys
            .iter()
            .find(|k| k.id == signed[4..8])
            .ok_or(Refused::UnknownKey)?;
        // Constant-time comparison (ring's verify).
        hmac::verify(&key.key, signed, tag).map_err(|_| Refused::BadTag)?;
        let ts = u64::from_be_bytes(field(signed, 8));
        let ip: [u8; 16] = field(signed, 16);
        let port = u16::from_be_bytes(field(signed, 32));
        let ip = std::net::Ipv6Addr::from(ip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let sender = SocketAddr::new(ip, port);
        if now_ns.abs_diff(ts) > MAX_SKEW.as_nanos() as u64 {
            return Err(Refused::Stale);
        }
        if self.seen.get(&sender).is_some_and(|last| ts <= *last) {
            return Err(Refused::Replayed);
        }
        if self.seen.len() >= MAX_SENDERS && !self.seen.contains_key(&sender) {
            // Entries older than the skew window protect nothing any more: a datagram
            // that old is refused as stale anyway.
            let floor = now_ns.saturating_sub(MAX_SKEW.as_nanos() as u64);
            self.seen.retain(|_, last| *last >= floor);
        }
        self.seen.insert(sender, ts);
        Ok(Opened {
            payload: &signed[HEADER..],
            sender: Some(sender),
        })
    }
}

/// `N` bytes of `b` from `at` (the caller checked the length: `b` is at least
/// [`HEADER`] long and every field lies inside it).
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn ipv6_form(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The wall clock in ns since the Unix epoch (what timestamps are compared with).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const A: &str = "0123456789abcdef-old";
    const B: &str = "fedcba9876543210-new";
    const T0: u64 = 1_800_000_000_000_000_000;

    fn ring(text: &str) -> Keyring {
        Keyring::parse(text, Path::new("keys")).unwrap()
    }

    fn me() -> SocketAddr {
        "10.0.0.1:7946".parse().unwrap()
    }

    #[test]
    fn a_sealed_datagram_opens_with_the_same_key_and_names_its_sender() {
        let mut tx = Sealer::new(Some(ring(A)));
        let mut rx = Sealer::new(Some(ring(A)));
        let wire = tx.seal(b"hello", me(), T0);
        assert_eq!(wire.len(), 5 + OVERHEAD);
        let got = rx.open(&wire, T0 + 1_000).unwrap();
        assert_eq!(got.payload, b"hello");
        assert_eq!(got.sender, Some(me()));
    }

    #[test]
    fn what_a_stranger_sends_is_refused_with_its_reason() {
        let mut rx = Sealer::new(Some(ring(A)));
        // Plain (a foca datagram or a notice as an unkeyed sender writes it).
        assert_eq!(rx.open(b"\x05node1...", T0), Err(Refused::Unauthenticated));
        // Sealed with another key.
        let other = Sealer::new(Some(ring(B))).seal(b"hi", me(), T0);
        assert_eq!(rx.open(&other, T0), Err(Refused::UnknownKey));
        // Sealed with the right key, then altered: payload, timestamp, sender.
        let good = Sealer::new(Some(ring(A))).seal(b"grace 5000", me(), T0);
        for at in [8, 20, 34, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert_eq!(rx.open(&bad, T0), Err(Refused::BadTag), "byte {at} flipped");
        }
        // The right key, the right id, a tag made up (a forger who guessed the id).
        let mut forged = good.clone();
        let n = forged.len();
        forged[n - TAG..].fill(0);
        assert_eq!(rx.open(&forged, T0), Err(Refused::BadTag));
        // An unkeyed node refuses sealed datagrams (a mixed configuration).
        let mut plain = Sealer::new(None);
        assert_eq!(plain.open(&good, T0), Err(Refused::NoKeyHere));
        assert_eq!(plain.open(b"x", T0).unwrap().payload, b"x");
    }

    #[test]
    fn replays_and_old_datagrams_are_refused() {
        let mut tx = Sealer::new(Some(ring(A)));
        let mut rx = Sealer::new(Some(ring(A)));
        let first = tx.seal(b"1", me(), T0);
        // The sender's clock did not move: timestamps still increase.
        let second = tx.seal(b"2", me(), T0);
        assert!(rx.open(&first, T0).is_ok());
        assert!(rx.open(&second, T0).is_ok());
        assert_eq!(rx.open(&first, T0), Err(Refused::Replayed));
        assert_eq!(rx.open(&second, T0), Err(Refused::Replayed));
        // A fresh receiver (restarted) still refuses what is older than the window.
        let mut fresh = Sealer::new(Some(ring(A)));
        let later = T0 + MAX_SKEW.as_nanos() as u64 + 10;
        assert_eq!(fresh.open(&first, later), Err(Refused::Stale));
        let skewed = tx.seal(b"3", me(), later + MAX_SKEW.as_nanos() as u64);
        assert_eq!(fresh.open(&skewed, T0), Err(Refused::Stale));
    }

    #[test]
    fn keys_rotate_without_a_step_where_two_nodes_disagree() {
        // Every node starts on A; then each in turn, in any order: [A, B], [B, A], [B].
        let steps = [
            A.to_string(),
            format!("{A}\n{B}"),
            format!("{B}\n{A}"),
            B.to_string(),
        ];
        for i in 0..steps.len() - 1 {
            // One node is a step ahead of the other: both directions still open.
            let (old, new) = (&steps[i], &steps[i + 1]);
            let mut a = Sealer::new(Some(ring(old)));
            let mut b = Sealer::new(Some(ring(new)));
            let ab = a.seal(b"a", "10.0.0.1:7946".parse().unwrap(), T0);
            let ba = b.seal(b"b", "10.0.0.2:7946".parse().unwrap(), T0);
            assert!(
                b.open(&ab, T0).is_ok(),
                "step {i} -> {}: new opens old",
                i + 1
            );
            assert!(
                a.open(&ba, T0).is_ok(),
                "step {i} -> {}: old opens new",
                i + 1
            );
        }
        let r = ring(&steps[2]);
        assert_eq!(r.len(), 2);
        assert_eq!(r.ids()[0], ring(B).ids()[0], "the first line signs");
    }

    #[test]
    fn a_cluster_moves_to_a_key_in_three_rollouts_without_a_split() {
        // Each rollout replaces agents one by one: every agent of one step talks to
        // every agent of the next, in both directions.
        let agent = |step: usize| match step {
            0 => Sealer::new(None),
            1 => Sealer::new(Some(ring(A))).with_transition(Transition::SendPlain),
            2 => Sealer::new(Some(ring(A))).with_transition(Transition::AcceptPlain),
            _ => Sealer::new(Some(ring(A))),
        };
        for step in 0..3 {
            let (mut old, mut new) = (agent(step), agent(step + 1));
            let from_old = old.seal(b"o", "10.0.0.1:7946".parse().unwrap(), T0);
            let from_new = new.seal(b"n", "10.0.0.2:7946".parse().unwrap(), T0);
            assert_eq!(
                new.open(&from_old, T0).map(|o| o.payload),
                Ok(&b"o"[..]),
                "step {step}"
            );
            assert_eq!(
                old.open(&from_new, T0).map(|o| o.payload),
                Ok(&b"n"[..]),
                "step {step}"
            );
        }
        // Skipping a step splits: an enforcing agent refuses a keyless one.
        let mut keyless = agent(0);
        let plain = keyless.seal(b"x", me(), T0);
        assert_eq!(agent(3).open(&plain, T0), Err(Refused::Unauthenticated));
    }

    #[test]
    fn key_files_that_cannot_be_used_say_why() {
        let p = Path::new("/etc/xlb/memberlist/keys");
        let short = Keyring::parse("\nshort\n", p).unwrap_err().to_string();
        assert!(
            short.contains("line 2") && short.contains("5 bytes"),
            "{short}"
        );
        let empty = Keyring::parse(" \n\n", p).unwrap_err().to_string();
        assert!(empty.contains("no key"), "{empty}");
        let five = [A; 5].join("\n");
        let many = Keyring::parse(&five, p).unwrap_err().to_string();
        assert!(many.contains("5 keys"), "{many}");
        let missing = Keyring::load(Path::new("/nonexistent/xlb-keys")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/xlb-keys"));
        // Blanks around a key are not part of it.
        assert_eq!(ring(&format!("  {A}  \n")).ids(), ring(A).ids());
    }

    /// The cost of authentication per SWIM datagram (printed, never asserted): seal
    /// and open of a 200-byte datagram, a typical foca probe with gossip.
    #[test]
    fn cost_per_datagram() {
        let mut tx = Sealer::new(Some(ring(A)));
        let mut rx = Sealer::new(Some(ring(A)));
        let payload = [7u8; 200];
        let n = 20_000u64;
        let start = std::time::Instant::now();
        for i in 0..n {
            let wire = tx.seal(&payload, me(), T0 + i);
            assert!(rx.open(&wire, T0 + i).is_ok());
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("seal + open of a 200-byte datagram: {ns:.0} ns");
    }
}
