//! The MQTT-SN 1.2 wire format: one datagram in, one [`Packet`] out, and back.
//!
//! Does no I/O and never panics on any input (hand-written byte cases in `tests.rs`, proptest
//! round trips and garbage in `tests/roundtrip.rs`). Strict: the length field must be the
//! datagram's length, fixed-size messages must have exactly their size, reserved flag values
//! (topic id type 0b11 where a topic is named, protocol id other than 0x01) are refused, text
//! fields (client id, topic names) must be UTF-8. Topic *name* and *filter* syntax is left to
//! the gateway (`mqtt::topic`), which answers it with a return code rather than a drop.

mod decode;
mod encode;
pub mod packet;
#[cfg(test)]
mod tests;

pub use decode::{decode, header, DecodeError};
pub use encode::{encode, EncodeError};
pub use packet::*;
