//! The STUN/TURN codec (media/src/stun.rs) on arbitrary bytes: parsing never panics,
//! and what parses can be read attribute by attribute without panicking either;
//! stream framing agrees with the parser.

#![no_main]

use impmesh_media::stun::{self, Message, attr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stun::looks_like_stun(data);
    if let Some((channel, payload)) = stun::channel_data(data) {
        assert!(stun::is_channel(channel));
        assert!(payload.len() + 4 <= data.len());
    }
    if let Ok(head) = <[u8; 4]>::try_from(data.get(..4).unwrap_or_default()) {
        if let Some(len) = stun::frame_len(head) {
            assert!(len <= stun::MAX_FRAME);
        }
    }
    let Ok(m) = Message::parse(data) else {
        return;
    };
    assert!(m.bytes().len() <= data.len());
    // A stream reads exactly the message the parser took.
    let head = [data[0], data[1], data[2], data[3]];
    assert_eq!(stun::frame_len(head), Some(m.bytes().len()));
    for a in m.attributes() {
        let _ = m.get(a.ty);
    }
    let _ = m.unknown_required(&[attr::USERNAME, attr::REALM]);
    for ty in [
        attr::XOR_PEER_ADDRESS,
        attr::XOR_RELAYED_ADDRESS,
        attr::XOR_MAPPED_ADDRESS,
    ] {
        let _ = m.xor_address(ty);
        let _ = m.xor_addresses(ty);
    }
    let _ = m.u32_attr(attr::LIFETIME);
    let _ = m.text(attr::USERNAME);
    let _ = m.error_code();
    let _ = m.has_fingerprint();
    if m.has_integrity() {
        let _ = m.check_integrity(b"0123456789abcdef");
    }
});
