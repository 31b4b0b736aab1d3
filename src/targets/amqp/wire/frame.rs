//! The AMQP 0-9-1 frame envelope: `type u8, channel u16, size u32, payload, 0xCE`.
//!
//! [`begin`]/[`end`] write a frame around whatever the caller appends in between (the size is
//! patched in afterwards, so payloads are encoded once, straight into the write buffer).
//! [`decode`] takes one complete frame off the front of a read buffer, or says how it is
//! incomplete; it never panics and never trusts a size beyond `frame_max`.

use bytes::{BufMut, BytesMut};

use super::methods::{self, Method};
use super::WireError;

/// The bytes a client sends first: "AMQP", 0, 0, 9, 1.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type of a method frame.
pub const METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Envelope bytes around a frame's payload (7 before, 1 after).
pub const OVERHEAD: usize = 8;
/// The smallest `frame_max` a peer may ask for (and the limit before `connection.tune`).
pub const MIN_FRAME_MAX: u32 = 4096;

/// One frame taken off the wire, decoded as far as a publisher cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A method frame on `channel`.
    Method {
        /// The channel (0 for the connection).
        channel: u16,
        /// The method and its arguments.
        method: Method,
    },
    /// A content header or body frame (a publisher only gets them after `basic.return`).
    Content {
        /// The channel it came on.
        channel: u16,
        /// [`HEADER`] or [`BODY`].
        kind: u8,
        /// The frame's payload (copied: returns are rare).
        payload: Vec<u8>,
    },
    /// A heartbeat.
    Heartbeat,
}

/// Starts a frame of `kind` on `channel` in `out`; returns where it starts, for [`end`].
pub fn begin(out: &mut BytesMut, kind: u8, channel: u16) -> usize {
    let start = out.len();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(0); // size, patched by `end`
    start
}

/// Ends the frame begun at `start`: patches its size and appends the frame-end octet.
pub fn end(out: &mut BytesMut, start: usize) {
    let size = (out.len() - start - 7) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Appends a heartbeat frame.
pub fn heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// One complete frame at the front of a buffer, its envelope checked.
pub struct Envelope<'a> {
    /// The frame type ([`METHOD`], [`HEADER`], [`BODY`], [`HEARTBEAT`]).
    pub kind: u8,
    /// The channel.
    pub channel: u16,
    /// The payload between the envelope's header and its end octet.
    pub payload: &'a [u8],
    /// Bytes the whole frame takes.
    pub total: usize,
}

/// Checks the frame at the front of `buf`: `Ok(None)` when more bytes are needed. A frame
/// larger than `frame_max` (envelope included) or without its end octet is an error, so a
/// garbage size never makes the caller buffer without bound.
pub fn envelope(buf: &[u8], frame_max: u32) -> Result<Option<Envelope<'_>>, WireError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    let total = size as u64 + OVERHEAD as u64;
    if total > u64::from(frame_max.max(MIN_FRAME_MAX)) {
        return Err(WireError::FrameTooLarge { size: total, max: frame_max });
    }
    let total = total as usize;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(WireError::BadFrameEnd);
    }
    Ok(Some(Envelope { kind, channel, payload: &buf[7..7 + size], total }))
}

/// Decodes the first frame of `buf`: `Ok(None)` when more bytes are needed, otherwise the
/// frame and how many bytes it took. A frame larger than `frame_max` (envelope included) is an
/// error, so a garbage size never makes the caller buffer without bound.
pub fn decode(buf: &[u8], frame_max: u32) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(Envelope { kind, channel, payload, total }) = envelope(buf, frame_max)? else {
        return Ok(None);
    };
    let frame = match kind {
        METHOD => Frame::Method { channel, method: methods::decode(payload)? },
        HEADER | BODY => Frame::Content { channel, kind, payload: payload.to_vec() },
        HEARTBEAT => Frame::Heartbeat,
        other => return Err(WireError::BadFrameType(other)),
    };
    Ok(Some((frame, total)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn heartbeat_round_trips_and_partial_input_waits() {
        let mut out = BytesMut::new();
        heartbeat(&mut out);
        assert_eq!(decode(&out, 4096), Ok(Some((Frame::Heartbeat, 8))));
        for n in 0..8 {
            assert_eq!(decode(&out[..n], 4096), Ok(None));
        }
    }

    #[test]
    fn a_wrong_end_octet_or_type_or_size_is_an_error() {
        assert_eq!(decode(&[8, 0, 0, 0, 0, 0, 0, 0], 4096), Err(WireError::BadFrameEnd));
        assert_eq!(decode(&[9, 0, 0, 0, 0, 0, 0, 0xCE], 4096), Err(WireError::BadFrameType(9)));
        assert!(matches!(
            decode(&[1, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF], 131_072),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn begin_end_patch_the_size() {
        let mut out = BytesMut::new();
        let start = begin(&mut out, BODY, 3);
        out.extend_from_slice(b"hello");
        end(&mut out, start);
        assert_eq!(&out[..], b"\x03\x00\x03\x00\x00\x00\x05hello\xCE");
        assert_eq!(
            decode(&out, 4096),
            Ok(Some((Frame::Content { channel: 3, kind: BODY, payload: b"hello".to_vec() }, 13)))
        );
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                        max in 0u32..200_000) {
            if let Ok(Some((_, used))) = decode(&bytes, max) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn garbage_method_payloads_never_panic(class in prop_oneof![Just(10u16), Just(20),
                                                   Just(40), Just(50), Just(60), Just(85), any::<u16>()],
                                               method in 0u16..130,
                                               rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = BytesMut::new();
            let start = begin(&mut out, METHOD, 1);
            out.put_u16(class);
            out.put_u16(method);
            out.extend_from_slice(&rest);
            end(&mut out, start);
            let _ = decode(&out, 131_072);
        }

        #[test]
        fn garbage_content_headers_never_panic(rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = methods::decode_content_header(&rest);
        }
    }
}
