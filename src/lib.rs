//! mqgate: an MQTT to AMQP/HTTP bridge gateway. See ARCHITECTURE.md for the code map.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod deadletters;
pub mod dryrun;
pub mod listeners;
pub mod logtext;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod mqttsn;
pub mod reload;
pub mod routing;
pub mod rules;
pub mod sources;
pub mod spool;
pub mod store;
pub mod targets;
pub mod template;
pub mod timefmt;
pub mod trace;
