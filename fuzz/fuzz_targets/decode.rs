//! Fuzzes `mqtt::codec::decode` over a stream of packets, the way a session reads them.
//!
//! The first input byte is a selector: its value mod 3 picks the version the stream starts
//! with (0: before CONNECT, 1: MQTT 3.1.1, 2: MQTT 5.0), bit 7 picks a small maximum packet
//! size. The rest is decoded packet after packet until more bytes are needed or an error; a
//! CONNECT fixes the version. Besides never panicking, every decoded packet must re-encode and
//! decode back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqgate::mqtt::codec::{decode, encode, Packet, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let mut version = match selector % 3 {
        0 => None,
        1 => Some(ProtocolVersion::V311),
        _ => Some(ProtocolVersion::V5),
    };
    let max_packet_size = if selector & 0x80 != 0 { 64 } else { 1 << 20 };
    let mut buf = BytesMut::from(stream);
    while let Ok(Some(packet)) = decode(&mut buf, version, max_packet_size) {
        let packet_version = match (&packet, version) {
            (Packet::Connect(c), _) => c.protocol,
            (_, Some(v)) => v,
            (_, None) => panic!("decoded {} before CONNECT", packet.name()),
        };
        version.get_or_insert(packet_version);
        let mut again = BytesMut::new();
        let written = encode(&packet, packet_version, &mut again)
            .unwrap_or_else(|e| panic!("decoded {packet:?} does not re-encode: {e}"));
        assert_eq!(written, again.len());
        let back = decode(&mut again, Some(packet_version), usize::MAX);
        assert_eq!(back, Ok(Some(packet)));
        assert!(again.is_empty());
    }
});
