//! Fuzzes `mqttsn::codec::decode` on one datagram, the way the MQTT-SN gateway reads them.
//! Besides never panicking, `header` must agree with `decode` on the message type, and every
//! decoded message must re-encode to a datagram that decodes back to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mqgate::mqttsn::codec::{decode, encode, header};

fuzz_target!(|data: &[u8]| {
    let datagram = Bytes::copy_from_slice(data);
    let head = header(data);
    let Ok(packet) = decode(&datagram) else { return };
    assert_eq!(head.map(|(t, _)| t), Ok(packet.msg_type()));
    let mut again = BytesMut::new();
    encode(&packet, &mut again).unwrap_or_else(|e| panic!("{packet:?} does not re-encode: {e}"));
    assert_eq!(decode(&again.freeze()), Ok(packet));
});
