//! The device-facing MQTT side: codec, buffered connection, session task, listener, topics.

pub mod codec;
pub mod connection;
pub mod listener;
pub mod session;
pub mod topic;
