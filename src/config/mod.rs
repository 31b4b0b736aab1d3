//! The YAML configuration: parsed with serde-saphyr, then validated into something the rest of
//! mqgate can trust. Every error names the file, line and column it comes from.
//!
//! Owns no I/O besides reading the one file it is given. Defaults are `const fn`s so the docs
//! and the code cannot disagree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

pub mod env;
pub mod types;

use crate::mqtt::topic;
pub use crate::rules::mapping::TopicMapping;
pub use crate::spool::config::{AckPolicy, ByteSize, OnFull, SpoolConfig};
pub use crate::targets::amqp::config::{
    AmqpBrokerConfig, AmqpTargetConfig, ArgumentValue, UnroutablePolicy,
};
pub use crate::targets::http::config::{HttpEndpointConfig, HttpTargetConfig};
pub use crate::targets::kinds::TargetConfig;
pub use types::{unspanned, ConfigError, ConfigErrors, HumanDuration};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The MQTT listener and its limits.
    pub mqtt: MqttConfig,
    /// The admin HTTP endpoint (health, readiness, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Named AMQP 0-9-1 broker connections, referenced by rule targets.
    #[serde(default)]
    pub amqp: BTreeMap<String, AmqpBrokerConfig>,
    /// Named AMQP 1.0 brokers (Artemis, Service Bus, Qpid, RabbitMQ), referenced by `- amqp10:`
    /// rule targets.
    #[serde(default)]
    pub amqp10: BTreeMap<String, crate::targets::amqp10::config::Amqp10BrokerConfig>,
    /// Named HTTP endpoints (webhooks), referenced by `- http:` rule targets.
    #[serde(default)]
    pub http: BTreeMap<String, HttpEndpointConfig>,
    /// Upstream MQTT brokers (bridges), referenced by `- mqtt:` targets and `bridge:` sources.
    #[serde(default)]
    pub bridges: BTreeMap<String, crate::targets::mqtt::config::BridgeConfig>,
    /// Kafka clusters, referenced by `- kafka:` targets.
    #[serde(default)]
    pub kafka: BTreeMap<String, crate::targets::kafka::config::KafkaClusterConfig>,
    /// ZeroMQ sockets, referenced by `- zmq:` targets.
    #[serde(default)]
    pub zmq: BTreeMap<String, crate::targets::zmq::config::ZmqSocketConfig>,
    /// Routing rules: an MQTT topic filter and the targets a matching message goes to.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Users allowed to connect with a password (argon2 PHC hashes, see `mqgate passwd`).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Access control: evaluated in order, the first entry that applies decides.
    #[serde(default)]
    pub acl: Vec<AclEntryConfig>,
    /// What happens when no `acl:` entry applies.
    #[serde(default)]
    pub acl_default: AclPolicy,
    /// AMQP queues consumed and published to MQTT (downlink).
    #[serde(default)]
    pub sources: Vec<crate::sources::SourceConfig>,
    /// The embedded store (retained messages, persistent sessions, spool, dead letters).
    /// Without it everything is kept in memory only and `ack: spool` cannot be used.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    /// Several nodes acting as one broker through RabbitMQ (docs/cluster.md). Without it this
    /// node is on its own and nothing of the cluster runs.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The MQTT-SN gateway (UDP), when set.
    #[serde(default)]
    pub mqttsn: Option<crate::mqttsn::MqttSnConfig>,
    /// On SIGTERM/SIGINT: how long in-flight QoS 1/2 messages may take to get their outcome
    /// and acknowledgement before the connections are closed anyway.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
}

/// `store:`: where mqgate keeps what must survive a restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The directory holding the store file (`mqgate.redb`); created if missing. A relative
    /// path is taken from the working directory.
    pub path: Spanned<std::path::PathBuf>,
    /// Most dead letters kept; a new one beyond evicts the oldest
    /// (`mqgate_messages_dropped{reason="dead_letters_full"}`).
    #[serde(default = "default_max_dead_letters")]
    pub max_dead_letters: usize,
    /// Most bytes of dead letters kept (as stored); a new one beyond evicts the oldest ones
    /// (`mqgate_messages_dropped{reason="dead_letters_full"}`).
    #[serde(default = "default_max_dead_letter_bytes")]
    pub max_dead_letter_bytes: ByteSize,
}

/// `mqtt:`: the device-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Address the MQTT listener binds, e.g. "0.0.0.0:1883".
    pub listen: Spanned<String>,
    /// `mqtt.listen` connections start with a PROXY protocol (v1/v2) header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// More listeners: TLS, WebSocket, WebSocket over TLS, plain TCP (`listeners/config.rs`).
    #[serde(default)]
    pub listeners: Vec<crate::listeners::ListenerConfig>,
    /// Connections beyond this are refused (closed right after accept).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes, fixed header included (MQTT 5 Maximum Packet Size).
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// A connection that sends no complete CONNECT within this time is closed.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<HumanDuration>,
    /// QoS 1/2 PUBLISHes a client may have unacknowledged at once (MQTT 5 Receive Maximum; the
    /// same window applies to 3.1.1 clients). When it is full the session stops reading.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// Largest keepalive granted, in seconds; 0 means no maximum.
    #[serde(default = "default_max_keepalive")]
    pub max_keepalive: u16,
    /// Accept clients that send no user name. A client that sends one must always be a
    /// configured user with the right password, whatever this says.
    #[serde(default = "default_true")]
    pub allow_anonymous: bool,
    /// Messages waiting to be written to one subscriber; beyond it, messages to that
    /// subscriber are dropped and counted (`mqgate_messages_dropped{reason="subscriber_queue_full"}`).
    #[serde(default = "default_outbound_queue")]
    pub outbound_queue: usize,
    /// Longest topic name or filter accepted, in bytes.
    #[serde(default = "default_max_topic_length")]
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Most subscriptions one client may hold; further ones are refused (SUBACK 0x97 / 0x80).
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Topic aliases an MQTT 5 client may set (Topic Alias Maximum in CONNACK); 0 disables them.
    #[serde(default = "default_topic_alias_maximum")]
    pub topic_alias_maximum: u16,
    /// How often the `$SYS/broker/...` statistics are published (retained); 0 disables them.
    #[serde(default = "default_sys_interval")]
    pub sys_interval: HumanDuration,
    /// A client that does not take what mqgate writes to it within this time is disconnected.
    #[serde(default = "default_write_timeout")]
    pub write_timeout: HumanDuration,
    /// Most topics holding a retained message (kept in memory); a retained publish to a new
    /// topic beyond it is delivered but not kept (`mqgate_messages_dropped{reason="retained_store_full"}`).
    #[serde(default = "default_max_retained")]
    pub max_retained: usize,
    /// QoS 1 messages sent to one subscriber and not yet acknowledged (capped by the client's
    /// own Receive Maximum).
    #[serde(default = "default_max_inflight_out")]
    pub max_inflight_out: u16,
    /// Messages kept for one persistent session (3.1.1 clean session 0, MQTT 5 session expiry
    /// above 0), counting those waiting while it is connected. When full, the newest message is
    /// dropped and counted (`mqgate_messages_dropped{reason="session_queue_full"}` while the
    /// client is away).
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Also queue QoS 0 messages for a session while its client is away (as Mosquitto's
    /// `queue_qos0_messages`); by default only QoS 1/2 are kept.
    #[serde(default)]
    pub queue_qos0: bool,
    /// Who may take over a client id (and its session): `same_identity` (default: only the
    /// identity that created the session; others get CONNACK 0x85 / return code 2) or `any`
    /// (anyone, as before: unsafe, a client can take over another's session).
    #[serde(default)]
    pub client_id_takeover: ClientIdTakeover,
    /// A packet that has started must be complete within this (default 30s; 0: no limit): a
    /// client that starts a large packet and trickles it is disconnected, its buffer freed.
    #[serde(default = "default_packet_timeout")]
    pub packet_timeout: HumanDuration,
    /// The silence allowed of a client that asked for no keepalive (keepalive 0) before it is
    /// disconnected (default 1h; 0: forever).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Client ids connected or parked at once (default 100,000; 0: no limit); a CONNECT for a
    /// new one beyond it gets 0x97 Quota exceeded (3.1.1: return code 3).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// The longest a session is kept after its connection ends (default 7d; 0: no cap): caps
    /// MQTT 5 Session Expiry Intervals (never-expiring ones too) and applies to 3.1.1
    /// persistent sessions, which otherwise never expire.
    #[serde(default = "default_max_session_expiry")]
    pub max_session_expiry: HumanDuration,
    /// The longest an MQTT 5 will waits for its Will Delay Interval (default 1h).
    #[serde(default = "default_max_will_delay")]
    pub max_will_delay: HumanDuration,
    /// Bytes (topics and payloads) one session's queue holds (default 8 MiB): with
    /// `max_queued_messages`, what a persistent session keeps while its client is away and
    /// what waits for a client that does not read. Beyond it, messages for the session are
    /// dropped and counted (`messages_dropped{reason="session_queue_full"}`).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// Bytes (topics and payloads) of all retained messages together (default 64 MiB): a
    /// retained PUBLISH beyond it is refused (MQTT 5: PUBACK/PUBREC 0x97, QoS 0 dropped;
    /// 3.1.1: delivered live, not retained), counted in
    /// `messages_dropped{reason="retained_bytes_full"}`.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: ByteSize,
    /// PUBLISHes per second one client may send (token bucket, a second's worth of burst);
    /// beyond it its socket is not read until the bucket refills (TCP pushes back). 0: no limit.
    #[serde(default)]
    pub max_publish_rate: u32,
    /// Bytes (topics and payloads) per second one client may publish, as `max_publish_rate`.
    /// 0: no limit.
    #[serde(default = "default_zero_bytes")]
    pub max_publish_bytes_rate: ByteSize,
    /// Retained messages per second one client is sent for its SUBSCRIBEs (token bucket, a
    /// second's worth of burst; default 10,000). Beyond it the rest follow as the bucket
    /// refills: none is dropped, and a client re-subscribing `#` in a loop costs the others
    /// no more than this. 0: no limit (still paced by the client's queue).
    #[serde(default = "default_max_retained_rate")]
    pub max_retained_rate: u32,
    /// Topic filters per second one client may SUBSCRIBE or UNSUBSCRIBE (token bucket, a
    /// second's worth of burst; default 1,000). Beyond it the client's socket is not read
    /// until the bucket is back at zero (TCP pushes back): each filter costs a subscription
    /// tree update, an ACL check, a retained lookup and, for a stored session, a store write,
    /// so a client re-subscribing in a loop costs the others no more than this. 0: no limit.
    #[serde(default = "default_max_subscribe_rate")]
    pub max_subscribe_rate: u32,
    /// MQTT 5 user properties one PUBLISH may carry (default 64). One with more is refused
    /// (PUBACK/PUBREC 0x97, QoS 0 dropped; counted in
    /// `messages_dropped{reason="too_many_user_properties"}`): every target maps them into
    /// its own headers (AMQP, HTTP, Kafka), and thousands of them per message cost the
    /// peer's parser and every message sharing that connection.
    /// At most 65,535. Past the limit a PUBLISH's further user properties are not even
    /// decoded, only stepped over; a will with more is refused at CONNECT (CONNACK 0x97).
    #[serde(default = "default_max_user_properties")]
    pub max_user_properties: u16,
    /// New connections per second from one IP address (token bucket); beyond it (and the
    /// burst) a connection is closed before its CONNECT is read. 0: no limit.
    #[serde(default)]
    pub max_connect_rate_per_address: u32,
    /// Connections one address may open at once before `max_connect_rate_per_address`
    /// applies (default: the rate, at least 1).
    #[serde(default)]
    pub connect_burst_per_address: u32,
    /// Failed logins from one IP address before its further logins are refused without a
    /// password check, for a time that doubles with each failure (default 5; 0: never).
    #[serde(default = "default_login_failures_before_backoff")]
    pub login_failures_before_backoff: u32,
    /// Longest refusal time of `login_failures_before_backoff` (default 5m).
    #[serde(default = "default_login_backoff_max")]
    pub login_backoff_max: HumanDuration,
    /// Recent successful password checks remembered (user name and a SHA-256 of the
    /// password), so a reconnecting client skips the argon2 hash (default 1024; 0: none).
    #[serde(default = "default_login_cache_size")]
    pub login_cache_size: usize,
    /// How long a remembered password check stays valid (default 10m).
    #[serde(default = "default_login_cache_ttl")]
    pub login_cache_ttl: HumanDuration,
    /// Retained topics one client id may own (default 10,000; 0: no limit). A topic belongs
    /// to the client that last set its value; beyond it a retained PUBLISH for a new topic is
    /// refused like one beyond `max_retained_bytes`, counted in
    /// `messages_dropped{reason="retained_per_client_full"}`.
    #[serde(default = "default_max_retained_per_client")]
    pub max_retained_per_client: usize,
    /// Bytes (topics and payloads) of deliveries taken into a client's write buffer at once
    /// (default 4 MiB; one delivery alone always goes). The rest waits in the session queue,
    /// bounded by `max_queued_bytes` (beyond: dropped and counted); a client that does not
    /// read is disconnected after `write_timeout`.
    #[serde(default = "default_max_outbound_bytes")]
    pub max_outbound_bytes: ByteSize,
    /// One budget for the message bytes (topics and payloads) received from clients and held
    /// in memory anywhere in mqgate: session queues, in-flight windows, target buffers, the
    /// retained store (default 512 MiB; 0: no budget). At the budget a QoS 0 PUBLISH is
    /// dropped and counted (`messages_dropped{reason="max_memory"}`) and a client that sends a
    /// QoS 1/2 PUBLISH is not read again until the level falls below seven eighths of it.
    #[serde(default = "default_max_memory")]
    pub max_memory: ByteSize,
}

const fn default_max_memory() -> ByteSize {
    ByteSize(512 * 1024 * 1024)
}

const fn default_zero_bytes() -> ByteSize {
    ByteSize(0)
}
const fn default_login_failures_before_backoff() -> u32 {
    5
}
const fn default_login_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
const fn default_login_cache_size() -> usize {
    1024
}
const fn default_login_cache_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

/// `admin:`: health, readiness and metrics over HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address the admin HTTP server binds.
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<String>,
    /// Bearer token every route but `/healthz` and `/readyz` needs; may be `${env:NAME}`.
    /// Required when `listen` is not a loopback address.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    /// `/metrics` without the token (for a scraper on a trusted network).
    #[serde(default)]
    pub metrics_public: bool,
    /// Host names (besides loopback names and the listen address) requests may name in their
    /// `Host` header: the names the admin API is reached by.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: unspanned(default_admin_listen_str()),
            token: None,
            metrics_public: false,
            allowed_hosts: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// The token, `${env:NAME}` resolved (checked by the validation).
    pub fn token(&self) -> Option<String> {
        let t = self.token.as_ref()?;
        crate::config::env::substitute_env(&t.value).ok().filter(|t| !t.is_empty())
    }
}

/// One entry of `rules:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name; labels the rule's metrics.
    pub name: Spanned<String>,
    /// MQTT topic filter (`+` and `#` allowed).
    pub from: Spanned<String>,
    /// Where matching messages go.
    pub to: Vec<TargetConfig>,
    /// A condition (a minijinja expression over the message) the message must meet for the
    /// rule to apply, e.g. `qos > 0 and json.temp > 30`.
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    /// What happens to a message the rule's `when:` or templates fail to evaluate on.
    #[serde(default)]
    pub on_error: RuleErrorPolicy,
    /// When a QoS 1/2 message matching the rule is acknowledged to the device: `sink`
    /// (default), `spool` or `receive` (see [`AckPolicy`]).
    #[serde(default)]
    pub ack: Option<Spanned<AckPolicy>>,
    /// The bounds of the spools of an `ack: spool` rule (one per target).
    #[serde(default)]
    pub spool: Option<Spanned<SpoolConfig>>,
}

impl RuleConfig {
    /// The rule's `ack:` policy (`sink` when not given).
    pub fn ack_policy(&self) -> AckPolicy {
        self.ack.as_ref().map(|a| a.value).unwrap_or_default()
    }
}

/// `on_error:` of a rule: a message its condition or templates cannot be evaluated on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleErrorPolicy {
    /// The message fails for this rule (QoS 1/2: not acknowledged as delivered; MQTT 5 gets
    /// PUBACK/PUBREC 0x83 with the reason, 3.1.1 the connection closed).
    #[default]
    Fail,
    /// The rule is skipped for this message (counted), as if it did not match.
    Skip,
}

/// `mqtt.client_id_takeover`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdTakeover {
    /// Only the identity that created a session may connect with its client id.
    #[default]
    SameIdentity,
    /// Any client may (unsafe: it gets the session's subscriptions and queued messages).
    Any,
}

/// One entry of `users:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The MQTT user name.
    pub username: Spanned<String>,
    /// An argon2 PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), as printed by
    /// `mqgate passwd`.
    pub password_hash: Spanned<String>,
    /// Client ids the user may connect with: patterns where `%u` is the user name and `*`
    /// any run of characters (`["%u", "%u-*"]`). Default: any.
    #[serde(default)]
    pub client_ids: Vec<Spanned<String>>,
}

/// What an `acl:` entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    /// PUBLISH (and wills).
    Publish,
    /// SUBSCRIBE.
    Subscribe,
    /// Both.
    All,
}

/// `acl_default:`: the decision when no entry applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclPolicy {
    /// Allowed (the default: a config without `acl:` lets everyone do everything).
    #[default]
    Allow,
    /// Denied.
    Deny,
}

/// One entry of `acl:`: exactly one of `allow`/`deny`, a topic filter, and optionally whom it
/// is for (`user`, `client`; both given: both must match; neither: everyone).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntryConfig {
    /// `allow: publish|subscribe|all`.
    #[serde(default)]
    pub allow: Option<Spanned<AclAction>>,
    /// `deny: publish|subscribe|all`.
    #[serde(default)]
    pub deny: Option<Spanned<AclAction>>,
    /// A topic filter; `%u` and `%c` are replaced by the client's user name and client id.
    pub topic: Spanned<String>,
    /// User name pattern: `*` matches any run of characters, `%c` is the client id.
    #[serde(default)]
    pub user: Option<Spanned<String>>,
    /// Client id pattern: `*` matches any run of characters, `%u` is the user name.
    #[serde(default)]
    pub client: Option<Spanned<String>>,
}

const fn default_max_queued_bytes() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}
const fn default_max_outbound_bytes() -> ByteSize {
    ByteSize(4 * 1024 * 1024)
}
const fn default_max_retained_per_client() -> usize {
    10_000
}
const fn default_max_retained_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
const fn default_max_sessions() -> usize {
    100_000
}
const fn default_max_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 86_400))
}
const fn default_max_will_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
const fn default_packet_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
const fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
const fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_max_dead_letter_bytes() -> ByteSize {
    ByteSize(crate::deadletters::DEFAULT_MAX_BYTES)
}
const fn default_max_dead_letters() -> usize {
    crate::deadletters::DEFAULT_LIMIT
}
const fn default_max_connections() -> usize {
    10_000
}
const fn default_max_packet_size() -> u32 {
    1024 * 1024
}
fn default_connect_timeout() -> Spanned<HumanDuration> {
    unspanned(HumanDuration(Duration::from_secs(10)))
}
const fn default_receive_maximum() -> u16 {
    1024
}
const fn default_max_keepalive() -> u16 {
    3600
}
const fn default_true() -> bool {
    true
}
const fn default_outbound_queue() -> usize {
    1024
}
const fn default_max_topic_length() -> usize {
    65_535
}
const fn default_max_topic_levels() -> usize {
    128
}
const fn default_max_subscribe_rate() -> u32 {
    1_000
}
const fn default_max_user_properties() -> u16 {
    64
}

const fn default_max_retained_rate() -> u32 {
    10_000
}

const fn default_max_subscriptions() -> usize {
    1000
}
const fn default_topic_alias_maximum() -> u16 {
    64
}
const fn default_sys_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_write_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
const fn default_max_retained() -> usize {
    100_000
}
const fn default_max_inflight_out() -> u16 {
    256
}
const fn default_max_queued_messages() -> usize {
    1000
}
fn default_admin_listen_str() -> String {
    "127.0.0.1:9090".to_owned()
}
fn default_admin_listen() -> Spanned<String> {
    unspanned(default_admin_listen_str())
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`, attributing errors to `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut config: Config = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            ConfigErrors(vec![ConfigError {
                file: file.to_owned(),
                line,
                column,
                message: first_line(&e.to_string()),
            }])
        })?;
        crate::listeners::config::resolve_paths(&mut config.mqtt.listeners, file);
        for tls in config.amqp.values_mut().filter_map(|b| b.tls.as_mut()) {
            tls.resolve_paths(file);
        }
        for broker in config.amqp10.values_mut() {
            broker.resolve_paths(file);
        }
        for bridge in config.bridges.values_mut() {
            bridge.resolve_paths(file);
        }
        for tls in config.kafka.values_mut().filter_map(|c| c.tls.as_mut()) {
            tls.resolve_paths(file);
        }
        let mut errors = Vec::new();
        // The URL carries the password: `${env:...}` keeps it out of the file.
        for (name, broker) in &mut config.amqp {
            match env::substitute_env(&broker.url.value) {
                Ok(url) => broker.url.value = url,
                Err(e) => errors.push(ConfigError {
                    file: file.to_owned(),
                    line: broker.url.referenced.line(),
                    column: broker.url.referenced.column(),
                    message: format!("amqp.{name}.url: {e}"),
                }),
            }
        }
        errors.extend(config.validate(file));
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn validate(&self, file: &Path) -> Vec<ConfigError> {
        let sections: &dyn types::Sections = self;
        let mut errors = Vec::new();
        let mut err = |loc: &Location, message: String| {
            errors.push(ConfigError {
                file: file.to_owned(),
                line: loc.line(),
                column: loc.column(),
                message,
            })
        };
        if let Err(e) = self.mqtt.listen.value.parse::<SocketAddr>() {
            err(&self.mqtt.listen.referenced, format!("mqtt.listen: not an address:port ({e})"));
        }
        crate::listeners::config::validate(&self.mqtt.listeners, &mut err);
        match self.admin.listen.value.parse::<SocketAddr>() {
            Err(e) => err(
                &self.admin.listen.referenced,
                format!("admin.listen: not an address:port ({e})"),
            ),
            Ok(addr) if !addr.ip().is_loopback() && self.admin.token.is_none() => err(
                &self.admin.listen.referenced,
                "admin.listen is not a loopback address: set admin.token (a bearer token, e.g. \"${env:MQGATE_ADMIN_TOKEN}\"), or listen on 127.0.0.1".into(),
            ),
            Ok(_) => {}
        }
        if let Some(t) = &self.admin.token {
            match crate::config::env::substitute_env(&t.value) {
                Err(e) => err(&t.referenced, format!("admin.token: {e}")),
                Ok(v) if v.len() < 16 => {
                    err(&t.referenced, "admin.token: at least 16 characters".into())
                }
                Ok(_) => {}
            }
        }
        if self.mqtt.receive_maximum == 0 {
            err(&self.mqtt.listen.referenced, "mqtt.receive_maximum must be at least 1".into());
        }
        if self.mqtt.max_packet_size < 16 {
            err(&self.mqtt.listen.referenced, "mqtt.max_packet_size must be at least 16".into());
        }
        let (memory, retained) = (self.mqtt.max_memory.0, self.mqtt.max_retained_bytes.0);
        if memory != 0 && memory <= retained.saturating_add(u64::from(self.mqtt.max_packet_size)) {
            err(
                &self.mqtt.listen.referenced,
                format!(
                    "mqtt.max_memory ({memory} bytes) must be above mqtt.max_retained_bytes plus mqtt.max_packet_size ({} bytes): retained messages count against it",
                    retained.saturating_add(u64::from(self.mqtt.max_packet_size))
                ),
            );
        }
        // A session's queue keeps its bounds as `u32` (`broker/queue.rs`: every connection
        // has one, and that keeps it in a smaller allocation).
        let queue_bounds = [
            ("mqtt.outbound_queue", self.mqtt.outbound_queue as u64),
            ("mqtt.max_queued_messages", self.mqtt.max_queued_messages as u64),
            ("mqtt.max_queued_bytes", self.mqtt.max_queued_bytes.0),
        ];
        for (name, value) in queue_bounds {
            if value > u64::from(crate::broker::queue::MAX_BOUND) {
                err(
                    &self.mqtt.listen.referenced,
                    format!(
                        "{name} must be at most {} (it is {value})",
                        crate::broker::queue::MAX_BOUND
                    ),
                );
            }
        }
        if self.mqtt.connect_timeout.value.0.is_zero() {
            err(&self.mqtt.connect_timeout.referenced, "mqtt.connect_timeout must be > 0".into());
        }
        crate::targets::kinds::validate_systems(sections, &mut err);
        let mut names = std::collections::HashSet::new();
        let mut target_ids = std::collections::HashSet::new();
        for rule in &self.rules {
            if !names.insert(rule.name.value.as_str()) {
                err(&rule.name.referenced, format!("duplicate rule name {:?}", rule.name.value));
            }
            if let Err(e) = topic::validate_filter(&rule.from.value) {
                err(&rule.from.referenced, format!("rule {:?}: from: {e}", rule.name.value));
            }
            if rule.to.is_empty() {
                err(&rule.name.referenced, format!("rule {:?} has no targets", rule.name.value));
            }
            crate::targets::kinds::validate_targets(sections, rule, &mut target_ids, &mut err);
            if let Some(when) = &rule.when {
                if let Err(e) = crate::template::check_condition(&when.value) {
                    err(&when.referenced, format!("rule {:?}: when: {e}", rule.name.value));
                }
            }
        }
        let brokers: Vec<&str> = self.amqp.keys().map(String::as_str).collect();
        let bridges: Vec<&str> = self.bridges.keys().map(String::as_str).collect();
        let amqp10_brokers: Vec<&str> = self.amqp10.keys().map(String::as_str).collect();
        crate::sources::config::validate(
            &self.sources,
            &brokers,
            &amqp10_brokers,
            &bridges,
            &mut err,
        );
        if let Some(cluster) = &self.cluster {
            cluster.validate(&brokers, &mut err);
        }
        self.validate_auth(&mut err);
        if let Some(sn) = &self.mqttsn {
            sn.validate(self.mqtt.allow_anonymous, &mut err);
        }
        crate::spool::config::validate(self, &mut err);
        errors
    }

    fn validate_auth(&self, err: &mut impl FnMut(&Location, String)) {
        let mut names = std::collections::HashSet::new();
        for user in &self.users {
            let name = &user.username.value;
            if name.is_empty() {
                err(&user.username.referenced, "users: empty username".into());
            }
            if !names.insert(name.as_str()) {
                err(&user.username.referenced, format!("users: duplicate username {name:?}"));
            }
            if let Err(e) = crate::auth::passwd::parse_hash(&user.password_hash.value) {
                err(
                    &user.password_hash.referenced,
                    format!("users: {name:?}: password_hash: {e} (make one with `mqgate passwd`)"),
                );
            }
        }
        for entry in &self.acl {
            match (&entry.allow, &entry.deny) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => err(
                    &entry.topic.referenced,
                    "acl: each entry needs exactly one of `allow:` or `deny:`".into(),
                ),
            }
            if let Err(e) = crate::auth::acl::validate_topic_pattern(&entry.topic.value) {
                err(&entry.topic.referenced, format!("acl: topic: {e}"));
            }
            for pattern in [&entry.user, &entry.client].into_iter().flatten() {
                if pattern.value.is_empty() {
                    err(&pattern.referenced, "acl: empty user/client pattern".into());
                }
            }
        }
    }

    /// The MQTT listen address (validated).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt.listen.value.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 1883)))
    }

    /// The admin listen address (validated).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.listen.value.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9090)))
    }
}

impl types::Sections for Config {
    /// One line per top-level section that names a kind's systems.
    fn section(&self, name: &str) -> Option<&dyn std::any::Any> {
        match name {
            "amqp" => Some(&self.amqp),
            "amqp10" => Some(&self.amqp10),
            "http" => Some(&self.http),
            "bridges" => Some(&self.bridges),
            "kafka" => Some(&self.kafka),
            "zmq" => Some(&self.zmq),
            "sources" => Some(&self.sources),
            _ => None,
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/mqgate.yaml");

    #[test]
    fn shipped_example_parses() {
        let c = Config::parse(Path::new("config/mqgate.yaml"), EXAMPLE).expect("example is valid");
        assert_eq!(c.mqtt_addr().port(), 1883);
        assert_eq!(c.admin_addr().port(), 9090);
        assert!(!c.rules.is_empty());
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let text = "mqtt:\n  listen: \"0.0.0.0:1883\"\n  lisen: 3\n";
        let e = Config::parse(Path::new("x.yaml"), text).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, 3, "{e}");
        assert!(e.0[0].column >= 3, "{e}");
        assert!(e.to_string().starts_with("x.yaml:3:"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = "mqtt:\n  listen: \"0.0.0.0:1883\"\nrules:\n  - name: a\n    from: \"a/#/b\"\n    to:\n      - amqp:\n          broker: nope\n          exchange: x\n";
        let e = Config::parse(Path::new("c.yaml"), text).unwrap_err();
        let lines: Vec<u64> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![5, 8], "{e}");
        assert!(e.to_string().contains("no broker \"nope\""), "{e}");
    }

    #[test]
    fn target_ids_come_from_names_and_must_be_unique() {
        use crate::targets::kinds::target_id;
        let text = "mqtt:\n  listen: \"127.0.0.1:1883\"\namqp:\n  r:\n    url: \"amqp://localhost\"\nrules:\n  - name: a\n    from: \"a/#\"\n    to:\n      - amqp:\n          broker: r\n          exchange: x\n      - amqp:\n          broker: r\n          exchange: y\n";
        let c = Config::parse(Path::new("i.yaml"), text).expect("valid");
        let ids: Vec<String> = c.rules[0].to.iter().map(|t| target_id("a", t)).collect();
        assert_eq!(ids, ["a/amqp:r/x", "a/amqp:r/y"]);
        // The same endpoint twice: each needs an `id:`; the error points at the second.
        let twice = text.replace("exchange: y", "exchange: x");
        let e = Config::parse(Path::new("i.yaml"), &twice).unwrap_err();
        assert_eq!((e.0.len(), e.0[0].line), (1, 14), "{e}");
        assert!(e.0[0].message.contains("give each an `id:`"), "{e}");
        let named = twice
            .replace("exchange: x\n      - amqp", "exchange: x\n          id: first\n      - amqp");
        let c = Config::parse(Path::new("i.yaml"), &named).expect("valid with an id");
        assert_eq!(target_id("a", &c.rules[0].to[0]), "first");
        // An explicit id that another rule's target already has.
        let clash = format!("{named}  - name: b\n    from: \"b\"\n    to:\n      - amqp:\n          broker: r\n          id: first\n");
        let e = Config::parse(Path::new("i.yaml"), &clash).unwrap_err();
        assert!(e.to_string().contains("another target has the id \"first\""), "{e}");
    }

    #[test]
    fn auth_errors_point_at_the_value() {
        let text = "mqtt:\n  listen: \"0.0.0.0:1883\"\nusers:\n  - username: a\n    password_hash: \"$argon2id$nope\"\nacl:\n  - allow: all\n    deny: publish\n    topic: \"x/#\"\n  - deny: subscribe\n    topic: \"a/#/b\"\n  - allow: sometimes\n    topic: x\n";
        let e = Config::parse(Path::new("a.yaml"), text).unwrap_err();
        assert!(e.to_string().contains("a.yaml:12:"), "unknown action: {e}");
        let text = text.replace("  - allow: sometimes\n    topic: x\n", "");
        let e = Config::parse(Path::new("a.yaml"), &text).unwrap_err();
        let at: Vec<(u64, u64)> = e.0.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(at, vec![(5, 20), (9, 12), (11, 12)], "{e}");
        assert!(e.0[0].message.contains("password_hash"), "{e}");
        assert!(e.0[1].message.contains("exactly one of"), "{e}");
    }

    #[test]
    fn amqps_settings_are_checked_with_positions() {
        let head = "mqtt:\n  listen: \"0.0.0.0:1883\"\namqp:\n  r:\n";
        let ok = format!("{head}    url: \"amqps://u:p@h/%2f\"\n");
        Config::parse(Path::new("c.yaml"), &ok).expect("amqps:// with the system roots");
        let plain_with_tls =
            format!("{head}    url: \"amqp://u:p@h/%2f\"\n    tls:\n      server_name: h\n");
        let e = Config::parse(Path::new("c.yaml"), &plain_with_tls).unwrap_err();
        assert!(
            e.to_string().starts_with("c.yaml:5:") && e.to_string().contains("amqps://"),
            "{e}"
        );
        assert!(!e.to_string().contains("u:p@"), "the error quotes the password: {e}");
        let missing =
            format!("{head}    url: \"amqps://h/\"\n    tls:\n      ca: /nonexistent/ca.pem\n");
        let e = Config::parse(Path::new("c.yaml"), &missing).unwrap_err();
        assert!(e.to_string().starts_with("c.yaml:7:") && e.to_string().contains("ca.pem"), "{e}");
        let external = format!("{head}    url: \"amqps://h/\"\n    auth_mechanism: external\n");
        let e = Config::parse(Path::new("c.yaml"), &external).unwrap_err();
        assert!(
            e.to_string().starts_with("c.yaml:6:") && e.to_string().contains("tls.cert"),
            "{e}"
        );
    }

    #[test]
    fn amqp_url_takes_its_password_from_the_environment() {
        // Only this test sets or reads this variable.
        std::env::set_var("MQGATE_TEST_AMQP_URL_PASSWORD", "s3cret");
        let head = "mqtt:\n  listen: \"0.0.0.0:1883\"\namqp:\n  r:\n";
        let ok =
            format!("{head}    url: \"amqp://u:${{env:MQGATE_TEST_AMQP_URL_PASSWORD}}@h/%2f\"\n");
        let c = Config::parse(Path::new("c.yaml"), &ok).expect("valid");
        assert_eq!(c.amqp["r"].url.value, "amqp://u:s3cret@h/%2f");
        let unset = format!("{head}    url: \"amqp://u:${{env:MQGATE_TEST_UNSET_VARIABLE}}@h/\"\n");
        let e = Config::parse(Path::new("c.yaml"), &unset).unwrap_err().to_string();
        assert!(e.starts_with("c.yaml:5:") && e.contains("MQGATE_TEST_UNSET_VARIABLE"), "{e}");
    }

    #[test]
    fn uplink_target_options_are_checked_with_positions() {
        let head = "mqtt:\n  listen: \"0.0.0.0:1883\"\namqp:\n  r:\n    url: \"amqp://g:g@h/%2f\"\n    topic_mapping: lossless\nrules:\n";
        let ok = format!("{head}  - name: a\n    from: \"a/#\"\n    when: \"qos > 0\"\n    on_error: skip\n    to:\n      - amqp:\n          broker: r\n          queue: jobs\n          arguments:\n            x-queue-type: quorum\n            x-max-length: 10\n          mandatory: true\n          unroutable: error\n          last_value: true\n");
        let c = Config::parse(Path::new("c.yaml"), &ok).expect("valid");
        assert_eq!(c.rules[0].on_error, RuleErrorPolicy::Skip);
        assert_eq!(c.amqp["r"].topic_mapping, TopicMapping::Lossless);
        let TargetConfig::Amqp(t) = &c.rules[0].to[0] else { panic!("an AMQP target") };
        assert_eq!(t.arguments["x-max-length"], ArgumentValue::Int(10));
        assert_eq!(t.unroutable, UnroutablePolicy::Error);

        let bad = format!("{head}  - name: a\n    from: \"a/#\"\n    to:\n      - amqp:\n          broker: r\n          exchange: x\n          queue: jobs\n      - amqp:\n          broker: r\n          exchange: y\n          arguments:\n            k: v\n");
        let e = Config::parse(Path::new("c.yaml"), &bad).unwrap_err();
        let at: Vec<u64> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(at, vec![14, 16], "{e}");
        assert!(e.0[0].message.contains("default exchange"), "{e}");
        assert!(e.0[1].message.contains("needs `queue:`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(types::parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(types::parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(types::parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(types::parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(types::parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(types::parse_duration("ten"), None);
        assert_eq!(types::parse_duration("5 parsecs"), None);
    }
}
