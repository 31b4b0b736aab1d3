//! `ack:` and `spool:` of a rule: when the device is acknowledged, and the bounds of the
//! store-and-forward spool that `ack: spool` puts in front of each of the rule's targets.
//!
//! Pure: types, defaults and checks; no I/O.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Location;

use crate::config::{Config, HumanDuration};

/// `ack:` of a rule: when a QoS 1/2 PUBLISH matching it is acknowledged to the device
/// (PUBACK/PUBREC). Applies to every target of the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// After every target confirmed (AMQP publisher confirm, HTTP 2xx). While a sink is down
    /// the in-flight windows fill and mqgate stops reading from the publishers.
    #[default]
    Sink,
    /// Once the message is durably (fsynced) in each target's spool; the spool forwards it
    /// when the sink takes it. Survives sink outages and restarts. Needs `store:`.
    Spool,
    /// On receipt, before any target has it: at most once across failures (a sink that is
    /// down, a crash, a restart lose what was acknowledged and not yet delivered). Opt-in only.
    Receive,
}

impl AckPolicy {
    /// The policy as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            AckPolicy::Sink => "sink",
            AckPolicy::Spool => "spool",
            AckPolicy::Receive => "receive",
        }
    }
}

/// What an append to a full spool does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// The append waits for room, so the device's acknowledgement waits, its session's
    /// window fills and mqgate stops reading from it.
    #[default]
    Backpressure,
    /// The oldest spooled messages are deleted to make room, each counted
    /// (`mqgate_spool_dropped_total`).
    DropOldest,
}

/// `spool:` of an `ack: spool` rule. Each target of the rule gets its own spool with these
/// bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Most bytes one target's spool holds (stored size of its messages), e.g. `64MiB`,
    /// `1GB` or a number of bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// What an append to a full spool does.
    #[serde(default)]
    pub on_full: OnFull,
    /// Messages per second at most while a backlog is replayed (after a sink failure or at
    /// start with a non-empty spool), so a recovering sink is not flooded; 0 = no pacing.
    #[serde(default = "default_replay_rate")]
    pub replay_rate: u32,
    /// A message the sink keeps refusing with retryable errors for longer than this goes to
    /// the dead letters with the last reason; 0 = retry forever.
    #[serde(default = "default_max_retry_time")]
    pub max_retry_time: HumanDuration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: default_max_bytes(),
            on_full: OnFull::default(),
            replay_rate: default_replay_rate(),
            max_retry_time: default_max_retry_time(),
        }
    }
}

const fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
const fn default_replay_rate() -> u32 {
    5000
}
const fn default_max_retry_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

/// A size in bytes written as a number (`1048576`) or with a unit (`64KiB`, `64MiB`, `1GiB`,
/// `500KB`, `10MB`, `1GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(t) => parse_size(&t).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {t:?}: write e.g. 1048576, \"64KiB\", \"64MiB\" or \"1GB\""
                ))
            }),
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The checks of every rule's `ack:` and `spool:`: `ack: spool` needs `store:`, `spool:`
/// needs `ack: spool`, and the bounds must leave room for a message.
pub fn validate(config: &Config, err: &mut impl FnMut(&Location, String)) {
    for rule in &config.rules {
        let name = &rule.name.value;
        let ack = rule.ack_policy();
        let at = rule.ack.as_ref().map_or(rule.name.referenced, |a| a.referenced);
        if ack == AckPolicy::Spool && config.store.is_none() {
            err(
                &at,
                format!("rule {name:?}: `ack: spool` keeps messages on disk and needs a `store:` section (e.g. `store: {{ path: ./data }}`)"),
            );
        }
        if ack == AckPolicy::Spool && name.contains('\0') {
            err(
                &rule.name.referenced,
                format!("rule {name:?}: a spooled rule's name may not contain NUL"),
            );
        }
        if let Some(spool) = &rule.spool {
            if ack != AckPolicy::Spool {
                err(
                    &spool.referenced,
                    format!("rule {name:?}: `spool:` only applies with `ack: spool`"),
                );
            }
            if spool.value.max_bytes.0 < 1024 {
                err(
                    &spool.referenced,
                    format!("rule {name:?}: spool.max_bytes must be at least 1024"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("10 KB"), Some(10_000));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("5 parsecs"), None);
    }
}
