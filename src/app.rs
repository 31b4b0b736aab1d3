//! Starts and wires the tasks, and owns shutdown: sinks first, then the rule set over them, the
//! MQTT listener and the admin server. `start` binds everything before returning, so a caller
//! (the binary, or a test on port 0) knows the real addresses.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::auth::Authenticator;
use crate::broker::persist::Persist;
use crate::broker::{sessions, sys, Broker};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mqtt::listener;
use crate::mqtt::session::{SessionLimits, SessionShared};
use crate::rules::RuleSet;
use crate::sinks::amqp::AmqpBroker;
use crate::sinks::http::HttpEndpoint;
use crate::store::Store;

/// A running gateway.
pub struct App {
    /// Where the MQTT listener is bound.
    pub mqtt_addr: SocketAddr,
    /// Where the admin server is bound.
    pub admin_addr: SocketAddr,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
    /// Every task the gateway started.
    tasks: JoinSet<()>,
    /// With a store: the broker's writes and their feeder task, flushed last at shutdown.
    persist: Option<(Persist, JoinHandle<()>)>,
}

impl App {
    /// Binds the listeners, connects the sinks and starts every task.
    pub async fn start(config: Config) -> Result<App> {
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        // First: a store that cannot be opened (locked, corrupt, unreadable) stops the start
        // before anything listens.
        let store = match &config.store {
            Some(cfg) => Some(Store::open(&cfg.path.value)?),
            None => None,
        };
        if let Some(store) = &store {
            metrics.store.set(store.clone());
        }
        let persist = store.clone().map(Persist::start);
        let mqtt_listener = bind(config.mqtt_addr(), "mqtt.listen").await?;
        let admin_listener = bind(config.admin_addr(), "admin.listen").await?;
        let mqtt_addr = mqtt_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let mut tasks = JoinSet::new();
        let mut brokers = BTreeMap::new();
        for (name, cfg) in &config.amqp {
            let (broker, handle) = AmqpBroker::spawn(name, cfg, &metrics, shutdown.child_token());
            tasks.spawn(async move {
                if let Err(e) = handle.await {
                    error!(error = %e, "AMQP sink task failed");
                }
            });
            brokers.insert(name.clone(), broker);
        }
        let mut http = BTreeMap::new();
        for (name, cfg) in &config.http {
            http.insert(name.clone(), HttpEndpoint::new(name, cfg, shutdown.child_token())?);
        }
        let rules = Arc::new(RuleSet::compile(&config, &brokers, &http, &metrics)?);
        // Every HTTP target's lanes are started: wait for them at shutdown.
        for endpoint in http.into_values() {
            tasks.spawn(endpoint.finished());
        }
        let broker = Broker::new(
            Arc::clone(&metrics),
            config.mqtt.max_retained,
            config.mqtt.queue_qos0,
            persist.as_ref().map(|(p, _)| p.clone()),
        );
        if let Some(store) = &store {
            // Before the listener accepts anyone: what the store holds is the broker's state.
            let restored = broker.restore(config.mqtt.max_queued_messages.max(1))?;
            info!(
                path = %store.path().display(),
                retained = restored.retained,
                sessions = restored.sessions,
                messages = restored.messages,
                expired_sessions = restored.expired,
                "restored from the store"
            );
            if restored.retained_over_limit > 0 {
                warn!(
                    left = restored.retained_over_limit,
                    max = config.mqtt.max_retained,
                    "the store holds more retained messages than mqtt.max_retained; the rest were not loaded"
                );
            }
            if restored.unreadable > 0 {
                warn!(n = restored.unreadable, "stored values that could not be read were deleted");
            }
        }
        tasks.spawn(sessions::expire(Arc::clone(&broker), shutdown.clone()));
        if !config.mqtt.sys_interval.0.is_zero() {
            let (b, m) = (Arc::clone(&broker), Arc::clone(&metrics));
            tasks.spawn(sys::run(b, m, config.mqtt.sys_interval.0, shutdown.clone()));
        }
        for handle in crate::sources::spawn_all(&config, &broker, &metrics, &shutdown) {
            tasks.spawn(async move {
                if let Err(e) = handle.await {
                    error!(error = %e, "source task failed");
                }
            });
        }
        let shared = Arc::new(SessionShared::new(
            broker,
            rules,
            Arc::new(Authenticator::from_config(&config)?),
            Arc::clone(&metrics),
            SessionLimits::from_config(&config.mqtt),
            shutdown.clone(),
        ));
        let max_connections = config.mqtt.max_connections;
        tasks.spawn(listener::run(mqtt_listener, shared, max_connections));
        let state = AdminState { metrics, brokers: brokers.into_values().collect(), store };
        let admin_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = admin::serve(admin_listener, state, admin_shutdown).await {
                error!(error = %e, "admin server failed");
            }
        });
        info!(%mqtt_addr, %admin_addr, "mqgate started");
        Ok(App { mqtt_addr, admin_addr, shutdown, tasks, persist })
    }

    /// Shuts down and waits for every task; with a store, last commits what the sessions
    /// wrote while they closed (parked sessions).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        if let Some((persist, feeder)) = self.persist.take() {
            persist.close();
            if let Err(e) = feeder.await {
                error!(error = %e, "store feeder task failed");
            }
        }
        info!("mqgate stopped");
    }
}

/// Runs the gateway until `signal` completes, then shuts down gracefully.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<()> {
    let app = App::start(config).await?;
    signal.await;
    info!("shutting down");
    app.stop().await;
    Ok(())
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set by `{key}` in the config)"))
}
