//! The device-facing MQTT side: codec, buffered connection, session task, resting idle
//! connections, listener, topics.

pub mod codec;
pub mod connection;
pub mod idle;
pub mod listener;
pub mod session;
pub mod topic;
