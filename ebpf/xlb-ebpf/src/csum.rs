//! Internet checksums for the XDP path, where the kernel's csum helpers are not
//! available: incremental updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')) and the
//! IPv4 header checksum. All 16-bit words are read big-endian; one's-complement sums
//! are byte-order independent as long as every word, including the checksum, is read
//! the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Returns `check` updated for a 4-byte field changing from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut s = (!check) as u32;
    s += (!u16::from_be_bytes([old[0], old[1]])) as u32;
    s += (!u16::from_be_bytes([old[2], old[3]])) as u32;
    s += u16::from_be_bytes([new[0], new[1]]) as u32;
    s += u16::from_be_bytes([new[2], new[3]]) as u32;
    !fold(s)
}

/// Returns `check` updated for a 2-byte field changing from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut s = (!check) as u32;
    s += (!u16::from_be_bytes(old)) as u32;
    s += u16::from_be_bytes(new) as u32;
    !fold(s)
}

/// The change (`to` minus `from`, one's complement) of the sum over bytes where
/// `from` became `to`, in memory byte order: the form of the skb's receive checksum
/// (kernel `csum_partial`), for `bpf_csum_update`.
#[inline(always)]
pub fn delta_mem<const N: usize>(from: &[u8; N], to: &[u8; N]) -> u32 {
    let mut s: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        s += (!u16::from_ne_bytes([from[i], from[i + 1]])) as u32;
        s += u16::from_ne_bytes([to[i], to[i + 1]]) as u32;
        i += 2;
    }
    fold(s) as u32
}

/// The IPv4 header checksum (RFC 791 section 3.1) of a header without options: to
/// fill in, compute it with `check` zero; a received header is valid when this is 0.
#[inline(always)]
pub fn ipv4_header(h: &network_types::ip::Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain data.
    let b: &[u8; 20] = unsafe { &*(h as *const network_types::ip::Ipv4Hdr as *const [u8; 20]) };
    let mut s: u32 = 0;
    let mut i = 0;
    while i < 20 {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    !fold(s)
}

/// Whether a received IPv4 header without options carries a valid checksum.
#[inline(always)]
pub fn header_ok(h: &network_types::ip::Ipv4Hdr) -> bool {
    ipv4_header(h) == 0
}
