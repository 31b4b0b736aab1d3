//! mqgate's integration tests: one test binary (one link instead of twenty), a module per
//! area. Every test drives the real thing: the gateway on port 0 (`crate::support::gateway`), the
//! machine's RabbitMQ, real MQTT clients (mosquitto clients, paho-mqtt, rumqttc, and a raw
//! client on mqgate's own codec), real HTTP servers (`crate::support::webhook`).

mod support;

mod acl_filter;
mod admin_api;
mod admin_auth;
mod amqp10;
mod amqp_external;
mod amqp_sink;
mod auth;
mod bad_input;
mod bounds;
mod bridge;
mod cli;
mod cluster;
mod cluster_sessions;
mod cluster_share;
mod console;
mod console_api;
mod deadletters;
mod disk_full;
mod docs;
mod faults;
mod forwarding;
mod http_publish;
mod identity;
mod idle;
mod json_logs;
mod kafka;
mod mqtt5;
mod mqtt5_conformance;
mod mqtt5_props;
mod mqttsn;
mod packaging;
mod paho;
mod pathological;
mod persistence;
mod pubsub;
mod reconnect;
mod reload;
mod route_dryrun;
mod semantics_uplink;
mod sessions;
mod shared;
mod slow_clients;
mod sources;
mod spool;
mod target_ids;
mod tls_listeners;
mod webhooks;
mod webhooks_tls;
mod zmq;
