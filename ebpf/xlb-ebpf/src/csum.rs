//! Incremental Internet checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')),
//! for the XDP path where the kernel's csum helpers are not available. All 16-bit
//! words are read big-endian; one's-complement sums are byte-order independent as
//! long as every word, including the checksum, is read the same way.

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
