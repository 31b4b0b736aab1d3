//! ZeroMQ: `zmq:` sockets (PUB or PUSH, bound or connected) and `- zmq:` rule targets, on the
//! pure-Rust `zeromq` crate. ZeroMQ confirms nothing, so only `ack: receive` rules may use it.
//!
//! - `config.rs`: `zmq.NAME`, `- zmq:` and their checks.
//! - `socket.rs`: one task per socket, its bounded queue, PUB drops and PUSH backpressure.
//! - `target.rs`: the `- zmq:` target (topic and payload frames).
//! - `kind.rs`: the kind's registration.

pub mod config;
mod kind;
pub mod socket;
pub mod target;

pub use kind::ZmqKindImpl as ZmqTargetKind;
