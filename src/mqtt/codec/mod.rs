//! Our own MQTT 3.1.1 / 5.0 codec: bytes in, [`Packet`] out, and back.
//!
//! Does no I/O and never panics on any input (fuzzed under `fuzz/`, round-trip tested with
//! proptest). Validates strictly: fixed-header flags, reserved bits, remaining length, UTF-8 and
//! U+0000 in strings, no wildcards in PUBLISH topics, maximum packet size, properties allowed per
//! packet and not duplicated. Topic *filter* syntax is left to `mqtt::topic`, because the session
//! answers a bad filter per filter in SUBACK rather than closing the connection.

mod decode;
mod encode;
mod error;
pub mod packet;
mod properties;
#[cfg(test)]
mod tests;

pub use decode::{decode, decode_capped};
pub use encode::encode;
pub use error::{DecodeError, EncodeError};
pub use packet::*;
