//! mqgate's integration tests: one test binary (one link instead of twenty), a module per
//! area. Every test drives the real thing: the gateway on port 0 (`crate::support::gateway`), the
//! machine's RabbitMQ, real MQTT clients (mosquitto clients, paho-mqtt, rumqttc, and a raw
//! client on mqgate's own codec), real HTTP servers (`crate::support::webhook`).

mod support;

mod amqp_sink;
mod auth;
mod bad_input;
mod cli;
mod deadletters;
mod faults;
mod forwarding;
mod idle;
mod mqtt5;
mod mqtt5_props;
mod paho;
mod persistence;
mod pubsub;
mod reconnect;
mod semantics_uplink;
mod sessions;
mod shared;
mod sources;
mod spool;
mod webhooks;
mod webhooks_tls;
