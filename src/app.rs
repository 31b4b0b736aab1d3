//! Starts and wires the tasks, and owns shutdown: sinks first, then the rule set over them, the
//! MQTT listener and the admin server. `start` binds everything before returning, so a caller
//! (the binary, or a test on port 0) knows the real addresses.
//!
//! Shutdown runs in the opposite order: the listener stops accepting and every session stops
//! reading and finishes the QoS 1/2 PUBLISHes it has read (outcome, then PUBACK/PUBREC)
//! within `shutdown_timeout`, while the sinks are still up; then the sinks close (the AMQP
//! sink waits for outstanding confirms, HTTP lanes finish the request in flight); last, the
//! store is flushed (an empty commit waits for every batch queued before it).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::broker::persist::Persist;
use crate::broker::{sessions, sys, Broker};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::deadletters::DeadLetters;
use crate::metrics::Metrics;
use crate::mqtt::listener;
use crate::mqtt::session::{SessionLimits, SessionShared};
use crate::reload::{self, ConfigFile, LiveCell};
use crate::store::{Store, WriteBatch};

/// A running gateway.
pub struct App {
    /// Where the MQTT listener is bound.
    pub mqtt_addr: SocketAddr,
    /// Where the admin server is bound.
    pub admin_addr: SocketAddr,
    /// Where the MQTT-SN gateway's UDP socket is bound (`mqttsn.listen`), if configured.
    pub mqttsn_addr: Option<SocketAddr>,
    /// Every MQTT listener's label and address, `mqtt.listen` (label `mqtt`) first.
    pub listener_addrs: Vec<(String, SocketAddr)>,
    /// What each listener's connections go through (its TLS config: reloaded on SIGHUP).
    preludes: Vec<Arc<crate::listeners::Prelude>>,
    /// The metrics (the listeners' families count certificate reload errors).
    metrics: Arc<crate::metrics::Metrics>,
    /// Cancel to shut down (then call [`App::stop`] to wait for the end).
    pub shutdown: CancellationToken,
    /// The dead letters, when a store is configured.
    pub dead_letters: Option<DeadLetters>,
    /// Cancelled once the sessions have finished: the sinks stop after them.
    sinks_shutdown: CancellationToken,
    /// The MQTT listener: ends when every session has ended (or the deadline passed). A set
    /// of one so that dropping the `App` aborts it, as it does the other tasks.
    listener: JoinSet<()>,
    /// Every other task the gateway started.
    tasks: JoinSet<()>,
    /// With a store: the broker's writes and their feeder task, flushed last at shutdown.
    persist: Option<(Persist, JoinHandle<()>)>,
    /// The store, flushed last.
    store: Option<Store>,
    /// Config reloads (their tasks are joined with the others at shutdown).
    reloader: Arc<reload::Reloader>,
    /// `shutdown_timeout`: how long in-flight messages may take at shutdown.
    shutdown_timeout: Duration,
}

/// Time beyond `shutdown_timeout` for closing connections (sessions' sockets, the sinks'
/// connections) before the remaining tasks are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl App {
    /// Binds the listeners, connects the sinks and starts every task. Without a file to read
    /// again, a reload answers `failed`: see [`start_file`](Self::start_file).
    pub async fn start(config: Config) -> Result<App> {
        App::start_with(config, None).await
    }

    /// [`start`](Self::start) from config file `path` (read again by a reload).
    pub async fn start_file(path: &std::path::Path) -> Result<App> {
        let (file, config) = ConfigFile::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        App::start_with(config, Some(file)).await
    }

    /// [`start`](Self::start) with the file `config` was read from, if any.
    pub async fn start_with(config: Config, file: Option<ConfigFile>) -> Result<App> {
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
        if let Some(store) = &store {
            // Before the dead letters and spools read them: ids by name, not position.
            crate::targets::ids::migrate_positional_ids(store, &config).await?;
        }
        let dead_letters = match (&store, &config.store) {
            (Some(store), Some(cfg)) => Some(DeadLetters::with_limits(
                store.clone(),
                &metrics,
                cfg.max_dead_letters,
                cfg.max_dead_letter_bytes.0,
            )?),
            _ => None,
        };
        // The sinks outlive the sessions at shutdown: in-flight messages still get outcomes.
        let sinks_shutdown = CancellationToken::new();
        let mqtt_listeners = crate::listeners::bind(&config).await?;
        let admin_listener = bind(config.admin_addr(), "admin.listen").await?;
        let mqttsn_socket = match &config.mqttsn {
            Some(sn) => Some(crate::mqttsn::bind(sn).await?),
            None => None,
        };
        let mqttsn_addr = match &mqttsn_socket {
            Some(s) => Some(s.local_addr()?),
            None => None,
        };
        let mut listener_addrs = Vec::with_capacity(mqtt_listeners.len());
        for l in &mqtt_listeners {
            listener_addrs.push((l.prelude.label.to_string(), l.tcp.local_addr()?));
        }
        let preludes: Vec<_> = mqtt_listeners.iter().map(|l| Arc::clone(&l.prelude)).collect();
        let mqtt_addr = listener_addrs[0].1;
        for exposed in anonymous_exposed(&config) {
            warn!(
                listener = %exposed,
                "anonymous clients are accepted on a non-loopback listener without TLS: anyone who reaches it can publish and subscribe (set mqtt.allow_anonymous: false, listen on 127.0.0.1, or use a tls/wss listener)"
            );
        }
        let admin_addr = admin_listener.local_addr()?;

        let mut tasks = JoinSet::new();
        let broker = Broker::new(
            Arc::clone(&metrics),
            (
                config.mqtt.max_retained,
                usize::try_from(config.mqtt.max_retained_bytes.0).unwrap_or(usize::MAX),
                config.mqtt.max_retained_per_client,
            ),
            config.mqtt.queue_qos0,
            persist.as_ref().map(|(p, _)| p.clone()),
        );
        if let Some(store) = &store {
            // Before the listener accepts anyone and before the sources and bridges publish
            // into it: what the store holds is the broker's state.
            let max_bytes = usize::try_from(config.mqtt.max_queued_bytes.0).unwrap_or(usize::MAX);
            let restored = broker.restore(config.mqtt.max_queued_messages.max(1), max_bytes)?;
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
        if let Some(cluster) = &config.cluster {
            // Before the listener: every subscription from now on registers its interest.
            // Closed with the sinks: the sessions' last messages still reach the other nodes.
            let amqp = config.amqp.get(&cluster.broker.value).context("cluster.broker")?;
            let token = sinks_shutdown.clone();
            tasks.spawn(Cluster::start(cluster, amqp, &broker, &metrics, token));
        }
        tasks.spawn(sessions::expire(Arc::clone(&broker), shutdown.clone()));
        if !config.mqtt.sys_interval.0.is_zero() {
            let (b, m) = (Arc::clone(&broker), Arc::clone(&metrics));
            tasks.spawn(sys::run(b, m, config.mqtt.sys_interval.0, shutdown.clone()));
        }
        // The sinks' systems, the rule set over them, the spools, the sources, then the
        // bridges' connections: the same code a reload runs (`reload::build`).
        let base = reload::Base {
            broker: Arc::clone(&broker),
            metrics: Arc::clone(&metrics),
            store: store.clone(),
            dead_letters: dead_letters.clone(),
            sinks_shutdown: sinks_shutdown.clone(),
            shutdown: shutdown.clone(),
        };
        let (running, live) =
            reload::build(&base, config.clone(), file, None, 0, &mut tasks).await?;
        let live = Arc::new(LiveCell::new(live));
        let mut limits = SessionLimits::from_config(&config.mqtt);
        limits.shutdown_timeout = config.shutdown_timeout.0;
        let shared = Arc::new(SessionShared::new(
            broker,
            Arc::clone(&live),
            Arc::clone(&metrics),
            limits,
            shutdown.clone(),
        ));
        let reloader = Arc::new(reload::Reloader::new(
            base,
            Arc::clone(&shared),
            running,
            config.shutdown_timeout.0,
        ));
        let max_connections = config.mqtt.max_connections;
        let mut listener = JoinSet::new();
        listener.spawn(listener::run(mqtt_listeners, Arc::clone(&shared), max_connections));
        if let (Some(socket), Some(sn)) = (mqttsn_socket, config.mqttsn.clone()) {
            // In the listeners' set: stopped and waited for before the sinks close.
            listener.spawn(crate::mqttsn::run(socket, Arc::clone(&shared), sn));
        }
        let state = AdminState {
            metrics: Arc::clone(&metrics),
            dead_letters: dead_letters.clone(),
            reloader: Arc::clone(&reloader),
            store: store.clone(),
            guard: admin::guard::Guard::new(
                admin_addr,
                config.admin.token(),
                config.admin.metrics_public,
                &config.admin.allowed_hosts,
                metrics.admin_refused.clone(),
            ),
            gateway: shared,
            publishers: Arc::default(),
            sources: config.sources.iter().map(|s| s.name.value.clone()).collect(),
            started: Instant::now(),
        };
        let admin_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = admin::serve(admin_listener, state, admin_shutdown).await {
                error!(error = %e, "admin server failed");
            }
        });
        info!(%mqtt_addr, %admin_addr, "mqgate started");
        Ok(App {
            mqtt_addr,
            mqttsn_addr,
            listener_addrs,
            preludes,
            metrics,
            persist,
            admin_addr,
            shutdown,
            dead_letters,
            sinks_shutdown,
            listener,
            tasks,
            store,
            reloader,
            shutdown_timeout: config.shutdown_timeout.0,
        })
    }

    /// Reads the config file again and swaps what it configures (SIGHUP, `POST
    /// /api/v1/reload`; see [`crate::reload`]).
    pub async fn reload(&self) -> reload::Outcome {
        self.reloader.reload().await
    }

    /// Reads every TLS listener's certificate, key and client CA files again (SIGHUP): new
    /// handshakes use them, established connections keep theirs; a bad file keeps the old
    /// certificate (logged, `mqgate_tls_reload_errors_total`).
    pub fn reload_certificates(&self) {
        crate::listeners::reload_certificates(&self.preludes, &self.metrics.listeners);
    }

    /// The address of the listener labelled `label` (`mqtt` for `mqtt.listen`).
    pub fn listener_addr(&self, label: &str) -> Option<SocketAddr> {
        self.listener_addrs.iter().find(|(l, _)| l == label).map(|(_, a)| *a)
    }

    /// Shuts down and waits for every task: sessions finish their in-flight messages (within
    /// `shutdown_timeout`), then the sinks close, then what the broker wrote while the sessions
    /// closed (parked sessions) is committed, then the store is flushed. Bounded: what is
    /// still running `CLOSE_GRACE` after `shutdown_timeout` is aborted.
    pub async fn stop(mut self) {
        let hard_deadline = Instant::now() + self.shutdown_timeout + CLOSE_GRACE;
        self.shutdown.cancel();
        while let Some(joined) = self.listener.join_next().await {
            if let Err(e) = joined {
                error!(error = %e, "MQTT listener task failed");
            }
        }
        info!("sessions closed; closing the sinks");
        self.sinks_shutdown.cancel();
        // What reloads started (systems, spools, sources, retirements) ends with the rest.
        let mut reloaded = self.reloader.take_tasks().await;
        while let Some(task) = reloaded.try_join_next() {
            let _ = task;
        }
        self.tasks.spawn(async move { while reloaded.join_next().await.is_some() {} });
        // At least a moment for the sinks, even when the sessions used all the time.
        let until = hard_deadline.max(Instant::now() + Duration::from_secs(1));
        let joined = tokio::time::timeout_at(until.into(), async {
            while self.tasks.join_next().await.is_some() {}
        });
        if joined.await.is_err() {
            warn!(
                tasks = self.tasks.len(),
                "tasks still running at the shutdown deadline; aborted"
            );
            self.tasks.shutdown().await;
        }
        if let Some((persist, feeder)) = self.persist.take() {
            // What the broker wrote while the sessions closed (parked sessions' records).
            persist.close();
            match tokio::time::timeout(CLOSE_GRACE, feeder).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "store feeder task failed"),
                Err(_) => warn!("the broker's last store writes did not finish in time"),
            }
        }
        if let Some(store) = self.store.take() {
            // Waits for every batch queued before it (dead letters recorded without waiting).
            // Bounded: with a full disk, writes wait for space that may not come.
            match tokio::time::timeout(CLOSE_GRACE, store.commit(WriteBatch::new())).await {
                Ok(Ok(())) => info!("store flushed"),
                Ok(Err(e)) => error!(error = %e, "store flush failed"),
                Err(_) => error!("store flush did not finish in time (disk full?)"),
            }
        }
        info!("mqgate stopped");
    }
}

/// Runs the gateway until `signal` completes, then shuts down gracefully. SIGHUP reloads the
/// config file (`file`, see [`crate::reload`]) and the TLS listeners' certificates.
pub async fn run(
    config: Config,
    file: Option<ConfigFile>,
    signal: impl Future<Output = ()>,
) -> Result<()> {
    // Before the start: a SIGHUP as soon as the process logs "mqgate started" must not end it.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let app = App::start_with(config, file).await?;
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            Some(()) = hangup.recv() => {
                info!("SIGHUP: reloading the config file and TLS certificates");
                app.reload_certificates();
                // The outcome is logged and counted by the reload itself.
                let _ = app.reload().await;
            }
        }
    }
    info!("shutting down");
    app.stop().await;
    Ok(())
}

/// The listeners (as configured) where anonymous clients get in over a non-loopback address
/// without TLS: worth a warning at start.
pub fn anonymous_exposed(config: &Config) -> Vec<String> {
    use crate::listeners::config::ListenerKind;
    if !config.mqtt.allow_anonymous {
        return Vec::new();
    }
    let exposed = |listen: &str| listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback());
    let mut out = Vec::new();
    if exposed(&config.mqtt.listen.value) {
        out.push(format!("mqtt.listen {}", config.mqtt.listen.value));
    }
    for l in &config.mqtt.listeners {
        let plain = matches!(l.kind, ListenerKind::Tcp | ListenerKind::Ws);
        if plain && exposed(&l.listen.value) {
            out.push(format!("{:?} {}", l.kind, l.listen.value).to_lowercase());
        }
    }
    out
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set by `{key}` in the config)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(std::path::Path::new("t.yaml"), text).expect("valid")
    }

    #[test]
    fn anonymous_clients_on_a_network_without_tls_are_named_at_start() {
        let shipped = include_str!("../config/mqgate.yaml");
        assert!(anonymous_exposed(&config(shipped)).is_empty(), "the example is safe");
        let open = config("mqtt:\n  listen: \"0.0.0.0:1883\"\n");
        assert_eq!(anonymous_exposed(&open), vec!["mqtt.listen 0.0.0.0:1883"]);
        let closed = config("mqtt:\n  listen: \"0.0.0.0:1883\"\n  allow_anonymous: false\n");
        assert!(anonymous_exposed(&closed).is_empty());
        let ws = config("mqtt:\n  listen: \"127.0.0.1:1883\"\n  listeners:\n    - kind: ws\n      listen: \"0.0.0.0:8080\"\n");
        assert_eq!(anonymous_exposed(&ws), vec!["ws 0.0.0.0:8080"]);
    }
}
