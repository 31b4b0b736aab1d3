//! The `amqp10:` section (AMQP 1.0 brokers: ActiveMQ Artemis, Azure Service Bus, Qpid,
//! RabbitMQ) and the `- amqp10:` rule targets, and their checks. Pure: no I/O but reading the
//! TLS files named in the config to check them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, HumanDuration, Report};
use crate::targets::amqp::tls::AmqpTlsConfig;
use crate::template;

/// `amqp10.NAME:`: one AMQP 1.0 broker, one connection with one session; a sender link per
/// target address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp10BrokerConfig {
    /// `amqp://user:pass@host:5672` (SASL PLAIN; no user: SASL ANONYMOUS) or `amqps://` (TLS).
    /// The password may be `${env:NAME}`.
    pub url: Spanned<String>,
    /// With `amqps://`: CAs (default: the system's roots), client certificate and key, the
    /// server name to verify (default: the URL's host).
    #[serde(default)]
    pub tls: Option<AmqpTlsConfig>,
    /// The AMQP container id mqgate opens the connection with (default `mqgate-NAME`).
    #[serde(default)]
    pub container_id: Option<String>,
    /// Time allowed for TCP, TLS, SASL, open and begin; and for a link's attach.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First reconnect delay; doubles after each failure up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// Messages queued per address (link) waiting for link credit; at the bound QoS 1/2
    /// publishers wait (backpressure) and QoS 0 messages are dropped (counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Bytes (payloads) queued per address; the same policy at the bound.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: crate::config::ByteSize,
    /// Deliveries sent and not yet settled by the broker, per link.
    #[serde(default = "default_max_unsettled")]
    pub max_unsettled: usize,
    /// Sender links (distinct addresses) open at once; a message for one more address fails
    /// (retryable) until an idle link closes.
    #[serde(default = "default_max_links")]
    pub max_links: usize,
    /// A delivery without an outcome this long after it was sent fails (retryable); the
    /// broker may still take it (a duplicate when it is sent again).
    #[serde(default = "default_outcome_timeout")]
    pub outcome_timeout: HumanDuration,
    /// A link with nothing queued or unsettled for this long is detached.
    #[serde(default = "default_link_idle_timeout")]
    pub link_idle_timeout: HumanDuration,
}

/// `- amqp10:` target: send to an address of an AMQP 1.0 broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp10TargetConfig {
    /// Key of a broker under `amqp10:`.
    pub broker: Spanned<String>,
    /// The target address of the sender link: a template (`telemetry.{{ topic[1] }}`);
    /// RabbitMQ: `/queue/NAME`, `/exchange/X/KEY`, `/amq/queue/NAME`.
    pub address: Spanned<String>,
    /// The header's `durable`; default: true for QoS 1/2, false for QoS 0.
    #[serde(default)]
    pub durable: Option<bool>,
    /// The header's `ttl`; the MQTT message expiry (what is left of it) when shorter.
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// The properties' `content-type`; default: the MQTT 5 content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The target's stable id; default `RULE/amqp10:BROKER/ADDRESS`.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_queue() -> usize {
    1024
}
fn default_max_queued_bytes() -> crate::config::ByteSize {
    crate::config::ByteSize(16 * 1024 * 1024)
}
const fn default_max_unsettled() -> usize {
    512
}
const fn default_max_links() -> usize {
    256
}
fn default_outcome_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_link_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

/// The parts of a broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS (`amqps://`).
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (default 5672, 5671 for TLS).
    pub port: u16,
    /// SASL PLAIN user name and password (percent-decoded); `None`: SASL ANONYMOUS.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("BrokerUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

impl BrokerUrl {
    /// Parses `url` (`${env:NAME}` in it resolved first). Errors never quote the password.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let url = crate::config::env::substitute_env(url).map_err(|e| e.to_string())?;
        let (scheme, rest) = url.split_once("://").ok_or("no scheme (amqp://, amqps://)")?;
        let tls = match scheme {
            "amqp" => false,
            "amqps" => true,
            _ => return Err(format!("scheme {scheme:?}: amqp or amqps")),
        };
        let authority = match rest.find(['/', '?', '#']) {
            Some(i) if rest[i..].trim_start_matches('/').is_empty() => &rest[..i],
            Some(_) => {
                return Err(
                    "an AMQP 1.0 URL has no path or query (addresses go in the targets)".into()
                )
            }
            None => rest,
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "the user or password is not UTF-8 once percent-decoded".to_owned())
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                if user.is_empty() {
                    return Err(
                        "an empty user name (leave user and password out for SASL ANONYMOUS)"
                            .into(),
                    );
                }
                Some((decode(user)?, decode(pass)?))
            }
        };
        let port_of = |p: &str| p.parse::<u16>().map_err(|_| format!("port {p:?}"));
        let default_port = if tls { 5671 } else { 5672 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, rest) = v6.split_once(']').ok_or("unclosed `[` in the host")?;
            match rest.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None if rest.is_empty() => (host, default_port),
                None => return Err(format!("{rest:?} after the host")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (hostport, default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(BrokerUrl { tls, host: host.to_owned(), port, credentials })
    }
}

impl Amqp10BrokerConfig {
    /// Makes relative TLS file names relative to the config file's folder.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_paths(config_file);
        }
    }
}

/// The checks of broker `amqp10.NAME`.
pub fn validate_broker(name: &str, b: &Amqp10BrokerConfig, err: &mut Report<'_>) {
    let at = &b.url.referenced;
    if let Err(e) = BrokerUrl::parse(&b.url.value) {
        err(at, format!("amqp10.{name}.url: {e}"));
    }
    crate::targets::amqp::tls::validate(
        &format!("amqp10.{name}"),
        &b.url,
        b.tls.as_ref(),
        None,
        &mut |l: &Location, m: String| err(l, m),
    );
    if b.queue == 0 || b.max_queued_bytes.0 == 0 || b.max_unsettled == 0 || b.max_links == 0 {
        err(
            at,
            format!("amqp10.{name}: queue, max_queued_bytes, max_unsettled and max_links must be at least 1"),
        );
    }
    if b.connect_timeout.0.is_zero() {
        err(at, format!("amqp10.{name}.connect_timeout must be > 0"));
    }
    if let Some(id) = &b.container_id {
        if id.is_empty() || id.len() > 255 {
            err(at, format!("amqp10.{name}.container_id: 1 to 255 bytes"));
        }
    }
}

/// The checks of an AMQP 1.0 target of rule `rule`.
pub fn validate_target(
    rule: &str,
    t: &Amqp10TargetConfig,
    brokers: &BTreeMap<String, Amqp10BrokerConfig>,
    err: &mut Report<'_>,
) {
    if !brokers.contains_key(&t.broker.value) {
        err(
            &t.broker.referenced,
            format!(
                "rule {rule:?}: no broker {:?} under amqp10: (defined: {})",
                t.broker.value,
                defined(brokers.keys())
            ),
        );
    }
    let a = &t.address;
    if template::is_template(&a.value) {
        if let Err(e) = template::check_template(&a.value) {
            err(&a.referenced, format!("rule {rule:?}: address: {e}"));
        }
    } else if let Err(e) = check_address(&a.value) {
        err(&a.referenced, format!("rule {rule:?}: address: {e}"));
    }
    if let Some(ct) = &t.content_type {
        if ct.is_empty() || ct.len() > 255 {
            err(&t.broker.referenced, format!("rule {rule:?}: content_type: 1 to 255 bytes"));
        }
    }
    if let Some(ttl) = &t.ttl {
        if ttl.0.is_zero() || ttl.0.as_millis() > u128::from(u32::MAX) {
            err(
                &t.broker.referenced,
                format!("rule {rule:?}: ttl: 1 ms to 49 days (a u32 of milliseconds)"),
            );
        }
    }
}

/// An address as sent: 1 to 1024 bytes, no control characters.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err("empty".into());
    }
    if address.len() > MAX_ADDRESS {
        return Err(format!("longer than {MAX_ADDRESS} bytes"));
    }
    if address.contains(char::is_control) {
        return Err("holds a control character".into());
    }
    Ok(())
}

/// The longest address mqgate sends to.
pub const MAX_ADDRESS: usize = 1024;

/// Where a target's problems are reported.
pub fn location(t: &Amqp10TargetConfig) -> &Location {
    &t.broker.referenced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let u = BrokerUrl::parse("amqp://us%40r:p%3Ass@broker:5673").expect("url");
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "broker", 5673));
        assert_eq!(u.credentials, Some(("us@r".to_owned(), "p:ss".to_owned())));
        let u = BrokerUrl::parse("amqps://[::1]").expect("url");
        assert_eq!((u.tls, u.host.as_str(), u.port, u.credentials), (true, "::1", 5671, None));
        assert!(BrokerUrl::parse("amqp://h/").is_ok());
        for bad in ["http://h", "amqp://", "amqp://h:x", "amqp://h/vhost", "amqp://:p@h"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        let e = BrokerUrl::parse("amqp://u:secret@h:99999").expect_err("bad port");
        assert!(!e.contains("secret"), "{e}");
        let debug = format!("{:?}", BrokerUrl::parse("amqp://u:secret@h").expect("url"));
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn addresses_are_bounded() {
        assert!(check_address("/queue/a").is_ok());
        assert!(check_address("").is_err());
        assert!(check_address(&"a".repeat(MAX_ADDRESS + 1)).is_err());
        assert!(check_address("a\nb").is_err());
    }
}
