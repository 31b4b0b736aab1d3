//! The AMQP 0-9-1 wire format, as much of it as a confirm-mode publisher needs.
//!
//! Pure encode/decode: no I/O, no clocks, no metrics. Encoders append to a `BytesMut` (a
//! connection's write buffer), so many publishes share one buffer and one write. Decoders take
//! a byte slice (a connection's read buffer) and never panic on any input: every length is
//! checked against what is there, and a frame larger than the negotiated `frame_max` is an
//! error rather than a reason to wait for gigabytes. Short strings (exchange, routing key) are
//! checked to fit 255 bytes before anything is written, so a bad name fails one publish and
//! never corrupts the stream.
//!
//! Layout: `frame` is the frame envelope (type, channel, size, end octet) and the frame
//! decoder; `methods` the methods we send and the ones we understand, and the content header
//! of `basic.publish`; `table` field tables (message headers, client properties); `consume` the
//! consumer side (declare, bind, qos, consume, deliveries, ack/nack) that `sources` use.

pub(crate) mod consume;
pub(crate) mod frame;
pub(crate) mod methods;
pub(crate) mod table;

use thiserror::Error;

/// Longest AMQP short string (exchange names, routing keys, content type), in bytes.
pub const MAX_SHORT_STRING_LENGTH: usize = 255;

/// Why bytes could not be decoded, or a value not encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The input ended inside a value that claimed to be longer.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A frame did not end with the frame-end octet 0xCE.
    #[error("frame does not end with 0xCE")]
    BadFrameEnd,
    /// A frame type this protocol does not have.
    #[error("unknown frame type {0}")]
    BadFrameType(u8),
    /// A frame larger than the negotiated maximum.
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    FrameTooLarge {
        /// Its payload size plus the 8 bytes of envelope.
        size: u64,
        /// The negotiated maximum.
        max: u32,
    },
    /// A field table entry of a type we do not know (its length is unknown, so the rest of
    /// the table cannot be read).
    #[error("unknown field type {0:#04x}")]
    BadFieldType(u8),
    /// Field tables nested deeper than we follow.
    #[error("field tables nested too deep")]
    TooDeep,
    /// A short string longer than 255 bytes (encode side).
    #[error("{0} longer than 255 bytes")]
    ShortStringTooLong(&'static str),
    /// A long string or table longer than 4 GiB (encode side).
    #[error("{0} longer than 4 GiB")]
    TooLong(&'static str),
}
