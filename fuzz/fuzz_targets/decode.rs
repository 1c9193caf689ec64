//! Decodes arbitrary bytes as a BGP message (RFC 4271 §4) under both AS widths
//! (RFC 6793): decoding must never panic, must not claim more bytes than it was given,
//! and whatever decodes must re-encode to bytes that decode to the same message.
#![no_main]

#[path = "../../agent/src/bgp/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::{Context, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for four_octet in [false, true] {
        let ctx = Context { four_octet };
        match decode(data, &ctx) {
            Ok((msg, used)) => {
                assert!(used <= data.len());
                let bytes = encode(&msg, &ctx);
                assert_eq!(decode(&bytes, &ctx).ok().map(|(m, _)| m), Some(msg));
            }
            Err(e) => {
                let _ = e.notification();
            }
        }
    }
});
