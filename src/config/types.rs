//! The building blocks every part of the config uses: durations, errors with file, line and
//! column, and the view of the systems sections (brokers, endpoints) a target kind checks its
//! targets against. A leaf: it imports no part of the config, so each kind's config can use it
//! without importing the top-level config (which assembles the kinds).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// Where a config problem is reported: the span's location and a message.
pub type Report<'a> = dyn FnMut(&Location, String) + 'a;

/// The top-level sections that name systems (`amqp:` brokers, `http:` endpoints, ...), as a
/// target kind sees them when it checks or starts its targets. Implemented by the top-level
/// config, one line per section.
pub trait Sections {
    /// The section `name` (its map of systems by name), for the kind that owns it to downcast.
    fn section(&self, name: &str) -> Option<&dyn std::any::Any>;
}

/// "the defined ones" for an error naming an unknown system.
pub fn defined<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let known: Vec<&str> = names.map(String::as_str).collect();
    if known.is_empty() {
        "none".into()
    } else {
        known.join(", ")
    }
}

/// A duration written as seconds (`10`) or with a unit (`250ms`, `10s`, `5m`, `1h`, `1d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t).map(HumanDuration).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid duration {t:?}: write e.g. 10, \"250ms\", \"10s\", \"5m\", \"1h\" or \"1d\""
                ))
            }),
        }
    }
}

pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        "d" => Some(Duration::from_secs(n.checked_mul(86_400)?)),
        _ => None,
    }
}

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// Every problem found in a config file (at least one).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}
