//! `mqttsn:`: the MQTT-SN gateway's UDP listener, its predefined topics, who may connect, and
//! its bounds. Pure: parsed with the rest of the file, checked here with positions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config::types::{HumanDuration, Report};
use crate::spool::config::ByteSize;

/// `mqttsn:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSnConfig {
    /// The UDP address to bind, e.g. "0.0.0.0:1885".
    pub listen: Spanned<String>,
    /// The gateway id in ADVERTISE and GWINFO (0-255).
    #[serde(default = "default_gateway_id")]
    pub gateway_id: u8,
    /// How often ADVERTISE is sent to `advertise_to` (at most 65,535 seconds, the field's
    /// range); also the duration it announces.
    #[serde(default = "default_advertise_interval")]
    pub advertise_interval: Spanned<HumanDuration>,
    /// Where ADVERTISE goes (a broadcast or multicast address:port); none: not sent (SEARCHGW
    /// is still answered).
    #[serde(default)]
    pub advertise_to: Option<Spanned<String>>,
    /// Topic ids every client may use without REGISTER (and for QoS -1), id → topic name.
    #[serde(default)]
    pub predefined_topics: BTreeMap<u16, Spanned<String>>,
    /// Client ids allowed to connect (patterns, `*` any run of characters); empty: any
    /// (only when `mqtt.allow_anonymous` is true). MQTT-SN carries no password.
    #[serde(default)]
    pub client_ids: Vec<Spanned<String>>,
    /// Accept QoS -1 PUBLISHes (no connection); they are published as `qos_minus_one_client_id`.
    #[serde(default = "default_true")]
    pub qos_minus_one: bool,
    /// The client id QoS -1 messages carry (ACL `%c`, rules' `client_id`).
    #[serde(default = "default_qos_minus_one_client_id")]
    pub qos_minus_one_client_id: Spanned<String>,
    /// Clients connected (active or asleep) at once; a CONNECT beyond gets CONNACK 0x01.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Largest datagram accepted, octets; larger ones are dropped and counted.
    #[serde(default = "default_max_datagram_size")]
    pub max_datagram_size: Spanned<usize>,
    /// T_retry: how long the gateway waits for REGACK, PUBACK, PUBREC or PUBCOMP before it
    /// sends again.
    #[serde(default = "default_retry_interval")]
    pub retry_interval: Spanned<HumanDuration>,
    /// N_retry: sends after the first before the client is taken as lost (its will published).
    #[serde(default = "default_max_retries")]
    pub max_retries: u8,
    /// QoS 1/2 PUBLISHes one client may have unacknowledged; beyond, PUBACK 0x01 (congestion).
    #[serde(default = "default_max_pending")]
    pub max_pending: u16,
    /// Deliveries to one client unacknowledged at once (the spec's clients handle one).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages kept for one client (asleep, or not reading): its session's queue. Beyond,
    /// the newest is dropped and counted.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Bytes (topics and payloads) kept for one client, as `max_queued_messages`.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// Topic ids one client may have registered (its REGISTERs and the gateway's).
    #[serde(default = "default_max_topics")]
    pub max_topics: usize,
    /// The longest sleep a DISCONNECT may ask for; longer ones are cut to it.
    #[serde(default = "default_max_sleep")]
    pub max_sleep: HumanDuration,
    /// How long a session with CleanSession 0 is kept after its client is gone.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: HumanDuration,
    /// Datagrams waiting for one client's task; beyond, dropped and counted (it resends).
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// The socket's receive buffer (SO_RCVBUF; the kernel caps it at `net.core.rmem_max`):
    /// datagrams that arrive while the gateway is busy wait there; beyond, the kernel drops them.
    #[serde(default = "default_recv_buffer")]
    pub recv_buffer: ByteSize,
}

const fn default_gateway_id() -> u8 {
    1
}
fn default_advertise_interval() -> Spanned<HumanDuration> {
    crate::config::unspanned(HumanDuration(Duration::from_secs(900)))
}
const fn default_true() -> bool {
    true
}
fn default_qos_minus_one_client_id() -> Spanned<String> {
    crate::config::unspanned("mqttsn-qos-1".to_owned())
}
const fn default_max_clients() -> usize {
    10_000
}
fn default_max_datagram_size() -> Spanned<usize> {
    crate::config::unspanned(1024)
}
fn default_retry_interval() -> Spanned<HumanDuration> {
    crate::config::unspanned(HumanDuration(Duration::from_secs(10)))
}
const fn default_max_retries() -> u8 {
    3
}
const fn default_max_pending() -> u16 {
    64
}
const fn default_max_inflight() -> u16 {
    1
}
const fn default_max_queued_messages() -> usize {
    100
}
const fn default_max_queued_bytes() -> ByteSize {
    ByteSize(256 * 1024)
}
const fn default_max_topics() -> usize {
    256
}
const fn default_max_sleep() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}
const fn default_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}
const fn default_recv_buffer() -> ByteSize {
    ByteSize(4 * 1024 * 1024)
}
const fn default_client_queue() -> usize {
    128
}

impl MqttSnConfig {
    /// The UDP address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.value.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 1885)))
    }

    /// Checks what serde cannot. `allow_anonymous`: `mqtt.allow_anonymous`.
    pub fn validate(&self, allow_anonymous: bool, err: &mut Report<'_>) {
        if let Err(e) = self.listen.value.parse::<SocketAddr>() {
            err(&self.listen.referenced, format!("mqttsn.listen: not an address:port ({e})"));
        }
        if let Some(to) = &self.advertise_to {
            if let Err(e) = to.value.parse::<SocketAddr>() {
                err(&to.referenced, format!("mqttsn.advertise_to: not an address:port ({e})"));
            }
        }
        let bound = u64::from(crate::broker::queue::MAX_BOUND);
        for (name, value) in [
            ("mqttsn.max_queued_messages", self.max_queued_messages as u64),
            ("mqttsn.max_queued_bytes", self.max_queued_bytes.0),
        ] {
            if value > bound {
                err(
                    &self.listen.referenced,
                    format!("{name} must be at most {bound} (it is {value})"),
                );
            }
        }
        let interval = self.advertise_interval.value.0;
        if interval.is_zero() || interval > Duration::from_secs(u64::from(u16::MAX)) {
            err(
                &self.advertise_interval.referenced,
                "mqttsn.advertise_interval: between 1s and 65535s (ADVERTISE's duration field)"
                    .into(),
            );
        }
        for (id, name) in &self.predefined_topics {
            if *id == 0 || *id == 0xFFFF {
                err(
                    &name.referenced,
                    format!("mqttsn.predefined_topics: topic id {id} is reserved (use 1-65534)"),
                );
            }
            if let Err(e) = crate::mqtt::topic::validate_name(&name.value) {
                err(&name.referenced, format!("mqttsn.predefined_topics.{id}: {e}"));
            }
        }
        for pattern in &self.client_ids {
            if pattern.value.is_empty() {
                err(&pattern.referenced, "mqttsn.client_ids: empty pattern".into());
            }
        }
        if self.client_ids.is_empty() && !allow_anonymous {
            err(
                &self.listen.referenced,
                "mqttsn.client_ids is required when mqtt.allow_anonymous is false: MQTT-SN carries no password, so its clients are admitted by client id".into(),
            );
        }
        let q = &self.qos_minus_one_client_id;
        if self.qos_minus_one && q.value.is_empty() {
            err(&q.referenced, "mqttsn.qos_minus_one_client_id: empty".into());
        }
        let size = self.max_datagram_size.value;
        if !(16..=65_535).contains(&size) {
            err(
                &self.max_datagram_size.referenced,
                "mqttsn.max_datagram_size: between 16 and 65535 octets".into(),
            );
        }
        if self.retry_interval.value.0.is_zero() {
            err(&self.retry_interval.referenced, "mqttsn.retry_interval must be > 0".into());
        }
    }

    /// Whether `client_id` may connect (`client_ids`; empty: any).
    pub fn client_id_allowed(&self, client_id: &str) -> bool {
        if self.client_ids.is_empty() {
            return true;
        }
        let patterns: Vec<String> = self.client_ids.iter().map(|p| p.value.clone()).collect();
        crate::auth::acl::client_id_allowed(&patterns, "", client_id)
    }
}
