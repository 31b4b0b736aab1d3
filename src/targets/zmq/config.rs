//! The `zmq:` section (ZeroMQ sockets) and the `- zmq:` rule targets, and their checks.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, Report};
use crate::config::ByteSize;

/// `zmq.NAME:`: one ZeroMQ socket mqgate sends on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqSocketConfig {
    /// `pub` (every connected subscriber whose prefix matches gets each message; full: dropped)
    /// or `push` (each message to one connected peer, round robin; full: publishers wait).
    pub kind: Spanned<ZmqKind>,
    /// Listen here (`tcp://0.0.0.0:5556`).
    #[serde(default)]
    pub bind: Option<Spanned<String>>,
    /// Or connect there (`tcp://host:5556`); reconnected after a failure.
    #[serde(default)]
    pub connect: Option<Spanned<String>>,
    /// Messages queued for the socket (its high-water mark, count).
    #[serde(default = "default_sndhwm")]
    pub sndhwm: usize,
    /// Bytes (topics and payloads) queued for the socket; the same policy at the bound.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
}

/// The socket type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZmqKind {
    /// PUB: fan-out to subscribers, topic as the first frame.
    Pub,
    /// PUSH: one peer per message, round robin.
    Push,
}

/// `- zmq:` in a rule's `to:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqTargetConfig {
    /// The socket (a name under `zmq:`).
    pub socket: Spanned<String>,
    /// The target's stable id (dead letters, metrics); default `RULE/zmq:SOCKET`.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
}

const fn default_sndhwm() -> usize {
    1000
}
fn default_max_queued_bytes() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}

/// The checks of socket `zmq.NAME`.
pub fn validate_socket(name: &str, s: &ZmqSocketConfig, err: &mut Report<'_>) {
    let at = &s.kind.referenced;
    match (&s.bind, &s.connect) {
        (Some(_), Some(c)) => err(&c.referenced, format!("zmq.{name}: bind or connect, not both")),
        (None, None) => err(at, format!("zmq.{name}: needs bind: or connect:")),
        (Some(e), None) | (None, Some(e)) => {
            if let Err(why) = check_endpoint(&e.value) {
                err(&e.referenced, format!("zmq.{name}: {why}"));
            }
        }
    }
    if s.sndhwm == 0 || s.sndhwm > 1_000_000 {
        err(at, format!("zmq.{name}.sndhwm: 1 to 1000000"));
    }
    if s.max_queued_bytes.0 < 1024 || s.max_queued_bytes.0 > u64::from(u32::MAX) {
        err(at, format!("zmq.{name}.max_queued_bytes: 1KiB to 4GiB"));
    }
}

/// `tcp://HOST:PORT` (the only transport built in).
fn check_endpoint(e: &str) -> Result<(), String> {
    let rest = e.strip_prefix("tcp://").ok_or_else(|| format!("{e:?}: only tcp://HOST:PORT"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{e:?}: no port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{e:?}: not tcp://HOST:PORT"));
    }
    Ok(())
}

/// The checks of a ZeroMQ target of rule `rule`.
pub fn validate_target(
    rule: &str,
    t: &ZmqTargetConfig,
    sockets: &BTreeMap<String, ZmqSocketConfig>,
    err: &mut Report<'_>,
) {
    if !sockets.contains_key(&t.socket.value) {
        err(
            &t.socket.referenced,
            format!(
                "rule {rule:?}: no socket {:?} under zmq: (defined: {})",
                t.socket.value,
                defined(sockets.keys())
            ),
        );
    }
}

/// Where a target's problems are reported.
pub fn location(t: &ZmqTargetConfig) -> &Location {
    &t.socket.referenced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(check_endpoint("tcp://0.0.0.0:5556").is_ok());
        assert!(check_endpoint("tcp://[::1]:5556").is_ok());
        assert!(check_endpoint("ipc:///tmp/x").is_err());
        assert!(check_endpoint("tcp://host").is_err());
    }
}
