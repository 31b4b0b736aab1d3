//! mqgate-bench: the load generator and benchmark of mqgate.
//!
//! Publishes N messages from P connections and consumes them on an AMQP
//! queue, reporting delivered msgs/s, p50/p99/max end-to-end latency, loss
//! and duplicates. The same load runs in up to three modes:
//!
//! * `direct`: P AMQP connections straight into RabbitMQ, the ceiling
//!   (QoS 0: transient publish; QoS 1: persistent publish on a confirm
//!   channel, pipelined with a window of unconfirmed messages);
//! * `gateway`: P MQTT connections through mqgate (spawned on free ports
//!   with a temp config, or an already running one via `--mqtt-addr`) into
//!   the same exchange;
//! * `mosquitto`: P MQTT connections into the machine's Mosquitto, consumed
//!   by an MQTT subscriber, as a plain broker's MQTT→MQTT baseline.
//!
//! Two more modes compare mqgate with a Mosquitto the bench spawns itself
//! (`mosquitto -p PORT` on a free port, killed at the end), in the same run:
//!
//! * `fanin`: P MQTT publishers → 1 MQTT subscriber (QoS 0 subscription),
//!   through mqgate and through Mosquitto; no AMQP involved;
//! * `idle`: `--connections` idle MQTT connections to each; reports the
//!   server's VmRSS growth per connection and connections accepted per second;
//! * `storm`: `--connections` clients connecting at once while 4 connected clients publish
//!   QoS 1; reports refusals and those clients' PUBACK latency during the storm.
//!
//! `http` benchmarks the HTTP webhook targets (no AMQP involved): an axum sink served by
//! the bench itself, a direct reqwest loop against it (the ceiling), then a spawned mqgate
//! forwarding QoS 1 MQTT messages one per request, then batched (see `mqgate_bench/http.rs`).
//! `downlink` measures AMQP→MQTT: a queue of N messages drained by a plain
//! AMQP consumer (lapin, manual acks, prefetch `--window`) and by a spawned
//! mqgate's source to one MQTT QoS 1 subscriber, in the same run.
//!
//! Every payload starts with a 16-byte header (send timestamp, run-tagged
//! sequence number) so the consumer measures latency and counts loss and
//! duplicates. Every run stops by itself: after all messages arrived, or
//! after `--idle-timeout` without one.
//!
//! ```text
//! cargo build --release --bins
//! target/release/mqgate-bench                          # QoS 0 and 1, direct then gateway
//! target/release/mqgate-bench --rate 2000 --messages 20000 --repeat 3   # latency
//! target/release/mqgate-bench --mode all --qos 1       # add the Mosquitto baseline
//! target/release/mqgate-bench --mqtt-addr 127.0.0.1:1883 --exchange amq.topic  # running gateway
//! target/release/mqgate-bench --mode fanin --messages 100000 --repeat 3
//! target/release/mqgate-bench --mode bridge --qos 1 --messages 100000 --repeat 3
//! target/release/mqgate-bench --mode idle --connections 15000 --repeat 6   # ulimit -n 20000 first
//! MIMALLOC_ALLOW_THP=0 target/release/mqgate-bench --mode idle --repeat 6   # RSS without huge-page steps
//! target/release/mqgate-bench --mode idle --repeat 4 --credentials bench:secret   # a password user
//! target/release/mqgate-bench --mode idle --credentials bench:secret --cold-login   # cache cold, one user
//! target/release/mqgate-bench --mode storm --connections 15000  # reconnect storm (storm.rs)
//! target/release/mqgate-bench --mode http --messages 50000 --repeat 3
//! target/release/mqgate-bench --mode downlink --messages 100000 --repeat 3
//! target/release/mqgate-bench --mode amqp10 --messages 100000 --repeat 3   # AMQP 1.0 target
//! target/release/mqgate-bench --mode attack --repeat 2   # pathological inputs (attack.rs)
//! target/release/mqgate-bench --mode cluster --messages 100000 --repeat 3   # cluster.rs
//! target/release/mqgate-bench --mode mqttsn --messages 100000 --repeat 3   # MQTT-SN vs MQTT
//! scripts/bench.sh                                     # the standard set
//! ```
//!
//! Throughput (msgs/s) is messages received over the time from the start of
//! the run (all publishers connected) to the last message consumed. The end
//! of the output compares each mode with direct per QoS (median over
//! `--repeat` runs) against the issue's targets: ≥ 0.9× direct throughput,
//! and under +1 ms p99 at a fixed rate.

#![forbid(unsafe_code)]

mod amqp;
mod amqp10;
mod attack;
mod cluster;
mod dial;
mod downlink;
mod gateway;
mod http;
mod idle;
mod kafka;
mod load;
mod mosquitto;
mod mqtt;
mod mqttsn;
mod payload;
mod stats;
mod storm;
mod tls;
mod zmq;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::timeout;

use gateway::{Gateway, GatewaySpec};
use load::{Phase, PubJob};
use payload::{Clock, PayloadBuilder};
use stats::{json_str, Comparison, PubStats, RecvStats, RunReport, Tracker};

/// How long all publishers together may take to connect.
const CONNECT_ALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long publishers may take to finish once the consumer is done.
const FINISH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(
    name = "mqgate-bench",
    version,
    args_override_self = true,
    about = "Load generator for mqgate: MQTT→AMQP through the gateway vs. straight AMQP \
             (and Mosquitto), reporting msgs/s, p50/p99 latency and loss."
)]
struct Args {
    /// Messages per run, over all publishers.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=payload::MAX_MESSAGES))]
    messages: u64,

    /// Publisher connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    publishers: u64,

    /// Payload bytes per message (the first 16 carry timestamp and sequence).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    payload: u64,

    /// QoS of the runs: 0, 1 or both.
    #[arg(long, value_enum, default_value = "both")]
    qos: QosArg,

    /// Total msgs/s over all publishers, evenly paced; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Modes to run, comma-separated: direct, gateway, mosquitto; `both` is
    /// direct,gateway and `all` is direct,mosquitto,gateway. `fanin` and
    /// `idle` compare mqgate with a spawned Mosquitto and run alone.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
    mode: Vec<ModeArg>,

    /// mqgate binary to spawn [default: `mqgate` next to this binary].
    #[arg(long)]
    mqgate: Option<PathBuf>,

    /// Use an already running gateway at HOST:PORT instead of spawning one;
    /// it must route `bench/#` to `--exchange`.
    #[arg(long, conflicts_with = "mqgate")]
    mqtt_addr: Option<String>,

    /// With --mqtt-addr: the (existing) exchange the gateway publishes
    /// `bench/#` to.
    #[arg(long, default_value = "amq.topic", requires = "mqtt_addr")]
    exchange: String,

    /// RabbitMQ for the consumer and the direct publishers (and the spawned
    /// gateway).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,

    /// The AMQP 1.0 broker of `--mode amqp10` (RabbitMQ 3.x: its rabbitmq_amqp1_0 plugin).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp10_url: String,

    /// Mosquitto for `--mode mosquitto`.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mosquitto_addr: String,

    /// Unacknowledged QoS 1 messages per publisher (MQTT in-flight window,
    /// unconfirmed AMQP publishes).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    window: u64,

    /// MQTT publisher implementation.
    #[arg(long, value_enum, default_value = "raw")]
    client: ClientArg,

    /// Seconds without a message after which the consumer gives up and
    /// counts the rest as lost.
    #[arg(long, default_value_t = 5.0)]
    idle_timeout: f64,

    /// Messages of an unreported warm-up run before the first run of each
    /// mode (same QoS and rate); 0 = none.
    #[arg(long, default_value_t = 2000)]
    warmup: u64,

    /// Runs of each mode per QoS, alternating modes; the comparison uses
    /// the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,

    /// `--mode cluster`: leave RabbitMQ's MQTT plugin alone (no `rabbitmq-mqtt` side), for a
    /// machine whose broker must not be reconfigured even for the run.
    #[arg(long)]
    no_broker_plugin: bool,

    /// `--mode tls`: full TLS handshakes per server and key type for the connection rate.
    #[arg(long, default_value_t = 2_000)]
    tls_connections: u64,

    /// Idle connections per server in `--mode idle` (and `--mode tls`).
    #[arg(long, default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    connections: u64,

    /// `--mode http`: requests in flight (the direct loop's tasks, the target's lanes).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    http_concurrency: u64,

    /// `--mode http`: messages per batch in the batched run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    http_batch: u64,

    /// `--mode http`: the batch's `max_delay`, milliseconds (raise it when mqgate runs under
    /// valgrind, so that batches still fill).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    http_batch_delay: u64,

    /// `--mode http`: only these runs (for profiling one of them); default: all three.
    #[arg(long, value_delimiter = ',', value_parser = ["direct", "mqgate", "batch"])]
    http_runs: Vec<String>,

    /// `--mode tls`: only these parts; default: all three.
    #[arg(long, value_delimiter = ',', value_parser = ["fanin", "rate", "idle"])]
    tls_parts: Vec<String>,

    /// Keepalive (seconds) of the idle connections' CONNECT in `--mode idle`; 0 = none.
    /// Devices usually have one (a server then keeps a timer per connection).
    #[arg(long, default_value_t = 0)]
    keepalive: u16,

    /// `--mode idle` and `storm`: the clients log in as USER:PASSWORD (both servers get the
    /// user: mqgate an argon2 hash, Mosquitto its `password_file`); default anonymous.
    #[arg(long)]
    credentials: Option<String>,

    /// `--mode idle` and `storm`: mqgate's `mqtt.login_cache_size` (0: every CONNECT
    /// verifies its argon2 hash, the password's full cost); default mqgate's own.
    #[arg(long)]
    login_cache: Option<u32>,

    /// `--mode idle` with `--credentials`: no login before the clock starts, so mqgate's
    /// login cache is cold and the first clients of the user log in at once (a restart's
    /// reconnect: what a check shared by concurrent logins of one user saves).
    #[arg(long)]
    cold_login: bool,

    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    attack: attack::AttackArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum QosArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Direct,
    Gateway,
    Mosquitto,
    Both,
    All,
    /// MQTT→MQTT fan-in through mqgate vs a spawned Mosquitto.
    Fanin,
    /// Uplink through an MQTT bridge: P publishers → mqgate → bridge → a spawned Mosquitto →
    /// 1 subscriber, vs the same publishers straight to that Mosquitto.
    Bridge,
    /// Idle connections: RSS per connection and accept rate, mqgate vs a spawned Mosquitto.
    Idle,
    /// HTTP webhook targets: direct reqwest loop vs mqgate, one message per request and batched.
    Http,
    /// Through the same spawned mqgate, alternating: a plain rule (`gateway`) vs a rule with a
    /// `routing_key` template and a `when:` condition (`templates`).
    Templates,
    /// AMQP→MQTT: a queue drained by a plain AMQP consumer vs by mqgate's source to one
    /// MQTT QoS 1 subscriber (prefetch = --window).
    Downlink,
    /// Through the same spawned mqgate (with a store), alternating: a plain rule, `ack: sink`
    /// (`gateway`), vs an `ack: spool` rule (`spool`: PUBACK once fsynced into the spool, then
    /// forwarded to the same exchange). The figure is the acknowledged rate (`sent`).
    Spool,
    /// TLS and WebSocket, mqgate vs a spawned Mosquitto with the same certificates: new TLS
    /// connections/s (ECDSA P-256, RSA 2048), QoS 1 fan-in over tcp/tls/ws/wss, memory per
    /// idle TLS connection (`--connections`).
    Tls,
    /// MQTT → Kafka (librdkafka's mock cluster): a direct idempotent producer vs MQTT QoS 1
    /// publishers through mqgate's kafka target.
    Kafka,
    /// MQTT → ZeroMQ: a direct zeromq PUSH vs MQTT QoS 1 publishers through mqgate's zmq
    /// target (PUSH), both to one PULL in the bench.
    Zmq,
    /// `cluster:`: MQTT fan-in across two mqgate nodes vs RabbitMQ's MQTT plugin (enabled on a
    /// spare port for the run), and on one node in cluster mode vs a single node (cluster.rs).
    Cluster,
    /// MQTT → AMQP 1.0: `--publishers` fe2o3-amqp clients straight to a queue's address vs
    /// as many MQTT QoS 1 publishers through a spawned mqgate's `- amqp10:` target to the
    /// same address (RabbitMQ's AMQP 1.0 support; see `amqp10.rs`).
    Amqp10,
    /// QoS 1 MQTT-SN (UDP) → RabbitMQ vs the same path over MQTT/TCP through the same spawned
    /// mqgate, and the gateway's MQTT-SN datagrams per second per core (see `mqttsn.rs`).
    Mqttsn,
    /// Pathological inputs (issue 13 item 5): an unrelated client's QoS 1 PUBACK latency
    /// without and with each attack (`--attacks`; see `attack.rs`).
    Attack,
    /// A reconnect storm: `--connections` clients connecting at once while 4 connected
    /// clients publish QoS 1; refusals and their PUBACK latency, mqgate vs a spawned
    /// Mosquitto (see `storm.rs`).
    Storm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ClientArg {
    /// The bench's lean hand-written MQTT 3.1.1 client.
    Raw,
    /// rumqttc's AsyncClient.
    Rumqttc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Mosquitto,
    Gateway,
    /// MQTT publishers to an MQTT subscriber through mqgate.
    Mqgate,
    /// Through mqgate, the rule with a routing_key template and a when: condition.
    Templated,
    /// Through mqgate, the `ack: spool` rule.
    Spooled,
    /// MQTT publishers to mqgate, which bridges to the bench's Mosquitto; the subscriber is on
    /// that Mosquitto.
    Bridged,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mosquitto => "mosquitto",
            Mode::Gateway => "gateway",
            Mode::Mqgate => "mqgate",
            Mode::Templated => "templates",
            Mode::Spooled => "spool",
            Mode::Bridged => "bridged",
        }
    }
}

impl Args {
    /// The selected modes in run order: the ceiling first.
    fn modes(&self) -> Vec<Mode> {
        let has = |m: ModeArg| self.mode.contains(&m);
        let all = has(ModeArg::All);
        if has(ModeArg::Fanin) {
            return vec![Mode::Mosquitto, Mode::Mqgate];
        }
        if has(ModeArg::Bridge) {
            return vec![Mode::Mosquitto, Mode::Bridged];
        }
        if has(ModeArg::Templates) {
            return vec![Mode::Gateway, Mode::Templated];
        }
        if has(ModeArg::Spool) {
            return vec![Mode::Gateway, Mode::Spooled];
        }
        let mut modes = Vec::new();
        if all || has(ModeArg::Both) || has(ModeArg::Direct) {
            modes.push(Mode::Direct);
        }
        if all || has(ModeArg::Mosquitto) {
            modes.push(Mode::Mosquitto);
        }
        if all || has(ModeArg::Both) || has(ModeArg::Gateway) {
            modes.push(Mode::Gateway);
        }
        modes
    }

    fn qos_levels(&self) -> Vec<u8> {
        match self.qos {
            QosArg::Zero => vec![0],
            QosArg::One => vec![1],
            QosArg::Both => vec![0, 1],
        }
    }

    fn idle(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.idle_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow!("--idle-timeout must be a positive number of seconds"))
    }
}

/// State of one bench invocation.
struct Bench {
    args: Args,
    clock: Clock,
    idle: Duration,
    pid: u32,
    runs: u32,
    /// Declares the exchange and the run queues, and consumes.
    control: Option<lapin::Connection>,
    exchange: String,
    /// Whether the exchange is the bench's own (deleted at the end).
    own_exchange: bool,
    gateway: Option<Gateway>,
    /// Why the gateway could not be started, so it is tried once only.
    gateway_failed: Option<String>,
    /// The bench's own Mosquitto (fan-in), else `--mosquitto-addr` is used.
    mosquitto: Option<mosquitto::Mosquitto>,
    notes: Vec<String>,
    /// `--mode tls`: the MQTT address of the next runs (a `tls://`, `ws://`... address of the
    /// spawned mqgate or Mosquitto) instead of the plain one.
    addr_override: Option<String>,
    /// Lines added to the spawned mqgate's `mqtt:` section (`--mode tls`: its listeners).
    extra_mqtt: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    // `--mode kafka` runs librdkafka's mock cluster in a child process of its own (this binary
    // with this one argument), so neither side shares a process with the broker.
    if std::env::args().nth(1).as_deref() == Some(kafka::MOCK_ARG) {
        return match kafka::serve_mock() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mqgate-bench: mock cluster: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    let json = args.json;
    let own_exchange =
        args.mqtt_addr.is_none().then(|| (args.amqp_url.clone(), own_exchange_name()));
    // On SIGINT/SIGTERM the run is dropped, and with it the spawned
    // gateway (its guard kills it); the bench's exchange is deleted here.
    let outcome = tokio::select! {
        r = run(args) => r,
        signal = interrupted() => {
            if let Some((url, exchange)) = own_exchange {
                let _ = timeout(Duration::from_secs(3), async {
                    let conn = amqp::connect(&url).await?;
                    amqp::delete_exchange(&conn, &exchange).await
                })
                .await;
            }
            Err(anyhow!("interrupted by {signal}"))
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            if json {
                println!("{{\"error\":{}}}", json_str(&format!("{e:#}")));
            }
            eprintln!("mqgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exchange a bench that spawns its gateway declares (and deletes).
fn own_exchange_name() -> String {
    format!("mqgate-bench-{}", std::process::id())
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Runs every selected mode at every selected QoS; `Ok(false)` if a run
/// failed.
async fn run(args: Args) -> Result<bool> {
    let idle = args.idle()?;
    if args.mode.contains(&ModeArg::Idle) {
        return run_idle(&args).await;
    }
    if args.mode.contains(&ModeArg::Storm) {
        return run_storm(&args).await;
    }
    if args.mode.contains(&ModeArg::Http) {
        return run_http(&args).await;
    }
    if args.mode.contains(&ModeArg::Tls) {
        return run_tls(args).await;
    }
    if args.mode.contains(&ModeArg::Attack) {
        let binary = mqgate_binary(&args)?;
        let exchange = own_exchange_name();
        let spec = attack::Spec {
            attack: &args.attack,
            binary: &binary,
            amqp_url: &args.amqp_url,
            exchange: &exchange,
            rate: if args.rate == 0 { 1000 } else { args.rate },
            payload: args.payload as usize,
            repeat: args.repeat,
            json: args.json,
        };
        return attack::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Cluster) {
        let binary = mqgate_binary(&args)?;
        let spec = cluster::Spec {
            messages: args.messages,
            payload: args.payload as usize,
            publishers: args.publishers,
            window: u16::try_from(args.window).unwrap_or(u16::MAX),
            repeat: args.repeat,
            qos: args.qos_levels(),
            binary: &binary,
            amqp_url: &args.amqp_url,
            idle: args.idle()?,
            json: args.json,
            plugin: !args.no_broker_plugin,
        };
        return cluster::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Mqttsn) {
        let binary = mqgate_binary(&args)?;
        let spec = mqttsn::Spec {
            messages: args.messages,
            payload: args.payload as usize,
            publishers: args.publishers,
            window: u16::try_from(args.window).unwrap_or(u16::MAX),
            repeat: args.repeat,
            binary: &binary,
            amqp_url: &args.amqp_url,
            json: args.json,
        };
        return mqttsn::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Zmq) {
        let binary = mqgate_binary(&args)?;
        let spec = zmq::Spec {
            messages: args.messages,
            payload: args.payload as usize,
            publishers: args.publishers,
            window: u16::try_from(args.window).unwrap_or(u16::MAX),
            repeat: args.repeat,
            binary: &binary,
            json: args.json,
        };
        return zmq::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Kafka) {
        let binary = mqgate_binary(&args)?;
        let spec = kafka::Spec {
            messages: args.messages,
            payload: args.payload as usize,
            publishers: args.publishers,
            window: u16::try_from(args.window).unwrap_or(u16::MAX),
            repeat: args.repeat,
            binary: &binary,
            json: args.json,
        };
        return kafka::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Amqp10) {
        let binary = mqgate_binary(&args)?;
        let amqp10_url = args.amqp10_url.clone();
        let spec = amqp10::Spec {
            messages: args.messages,
            publishers: args.publishers,
            payload: args.payload as usize,
            window: args.window as usize,
            repeat: args.repeat,
            amqp_url: &args.amqp_url,
            amqp10_url: &amqp10_url,
            binary: &binary,
            idle,
            json: args.json,
        };
        return amqp10::run(&spec).await;
    }
    if args.mode.contains(&ModeArg::Downlink) {
        let binary = mqgate_binary(&args)?;
        let spec = downlink::Spec {
            messages: args.messages,
            payload: args.payload as usize,
            window: u16::try_from(args.window).unwrap_or(u16::MAX),
            repeat: args.repeat,
            amqp_url: &args.amqp_url,
            binary: &binary,
            idle,
            json: args.json,
        };
        return downlink::run(&spec).await;
    }
    let bridge = args.mode.contains(&ModeArg::Bridge);
    let fanin = args.mode.contains(&ModeArg::Fanin) || bridge;
    let modes = args.modes();
    if modes.is_empty() {
        bail!("no mode selected");
    }
    let pid = std::process::id();
    let mut bench = Bench {
        idle,
        pid,
        runs: 0,
        control: None,
        // Fan-in routes nothing to AMQP: the spawned gateway's rule points at an exchange that
        // always exists.
        exchange: if fanin {
            "amq.topic".to_owned()
        } else {
            args.mqtt_addr.as_ref().map_or_else(own_exchange_name, |_| args.exchange.clone())
        },
        own_exchange: false,
        gateway: None,
        gateway_failed: None,
        mosquitto: if fanin { Some(mosquitto::Mosquitto::start().await?) } else { None },
        notes: Vec::new(),
        clock: Clock::new(),
        addr_override: None,
        extra_mqtt: String::new(),
        args,
    };
    let result = bench.run_all(&modes).await;
    bench.shutdown().await;
    let reports = result?;

    let comparisons = Comparison::from_reports(&reports, bench.args.rate > 0);
    let ok = reports.iter().all(|r| r.error.is_none());
    if bench.args.json {
        let runs: Vec<String> = reports.iter().map(RunReport::json).collect();
        let cmps: Vec<String> = comparisons.iter().map(Comparison::json).collect();
        let notes: Vec<String> = bench.notes.iter().map(|n| json_str(n)).collect();
        println!(
            "{{\"runs\":[{}],\"comparisons\":[{}],\"notes\":[{}]}}",
            runs.join(","),
            cmps.join(","),
            notes.join(",")
        );
    } else {
        for c in &comparisons {
            println!("{}", c.text());
        }
        if let Some(line) = stats::spool_ack_rates(&reports) {
            println!("{line}");
        }
        for n in &bench.notes {
            println!("note: {n}");
        }
    }
    Ok(ok)
}

/// The mqgate binary to spawn: `--mqgate`, or `mqgate` next to this binary.
fn mqgate_binary(args: &Args) -> Result<PathBuf> {
    match &args.mqgate {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .context("locate the bench binary")?
            .parent()
            .context("the bench binary has no directory")?
            .join("mqgate")),
    }
}

/// The login `--mode idle` and `--mode storm` clients use.
fn connections_login(args: &Args) -> Result<idle::Login> {
    let credentials = match &args.credentials {
        None => None,
        Some(c) => {
            let (user, password) = c.split_once(':').context("--credentials is USER:PASSWORD")?;
            Some((user.to_owned(), password.to_owned()))
        }
    };
    Ok(idle::Login { keepalive: args.keepalive, credentials, cold: args.cold_login })
}

/// The gateway `--mode idle` and `--mode storm` spawn: room for `n` connections, no rules;
/// `login`'s user, if any, and `--login-cache`.
async fn connections_gateway(
    args: &Args,
    binary: &std::path::Path,
    n: usize,
    login: &idle::Login,
) -> Result<Gateway> {
    let mut extra = String::new();
    if let Some(size) = args.login_cache {
        extra.push_str(&format!("  login_cache_size: {size}\n"));
    }
    if let Some((user, password)) = &login.credentials {
        let hash = mqgate::auth::passwd::hash_password(password.as_bytes())
            .map_err(|e| anyhow!("hash the bench password: {e}"))?;
        extra.push_str(&format!(
            "users:\n  - username: {}\n    password_hash: {}\n",
            stats::json_str(user),
            stats::json_str(&hash)
        ));
    }
    Gateway::start(&GatewaySpec {
        binary,
        amqp_url: &args.amqp_url,
        exchange: "amq.topic",
        receive_maximum: args.window as usize,
        max_connections: n + 100,
        outbound_queue: 1024,
        ready_timeout: Duration::from_secs(20),
        store: None,
        extra_mqtt: &extra,
        bridge_to: None,
    })
    .await
}

/// The Mosquitto `--mode idle` and `--mode storm` spawn: anonymous, or with `login`'s user.
async fn connections_mosquitto(login: &idle::Login) -> Result<mosquitto::Mosquitto> {
    match &login.credentials {
        None => mosquitto::Mosquitto::start().await,
        Some((user, password)) => mosquitto::Mosquitto::start_with_user(user, password).await,
    }
}

/// The median of `v` (the upper one of an even count), 0 when empty.
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `--mode idle`: N idle connections to a spawned mqgate and to a spawned Mosquitto, fresh
/// processes each round (`--repeat`; which server goes first alternates), then the
/// distribution: each round's figures and rate ratio, medians, ranges.
async fn run_idle(args: &Args) -> Result<bool> {
    let n = args.connections as usize;
    let binary = mqgate_binary(args)?;
    let login = connections_login(args)?;
    let who = if login.credentials.is_some() { "a password user" } else { "anonymous" };
    if !args.json {
        println!(
            "mqgate-bench idle: {n} idle MQTT 3.1.1 connections (keepalive {}, {who}) per server, {} round(s)",
            args.keepalive, args.repeat
        );
    }
    let (mut mq, mut mo) = (Vec::new(), Vec::new());
    for round in 0..args.repeat {
        let mut pair: [Option<idle::IdleReport>; 2] = [None, None];
        for k in 0..2 {
            let mqgate_turn = (k + round as usize).is_multiple_of(2);
            if mqgate_turn {
                let gw = connections_gateway(args, &binary, n, &login).await?;
                let pid = gw.pid().context("mqgate not running")?;
                let r = idle::measure("mqgate", &gw.mqtt_addr, pid, n, &login).await;
                if let Some(note) = gw.stop(Duration::from_secs(10)).await {
                    eprintln!("note: {note}");
                }
                pair[0] = Some(r?);
            } else {
                let mosq = connections_mosquitto(&login).await?;
                let r = idle::measure("mosquitto", &mosq.addr, mosq.pid(), n, &login).await;
                drop(mosq);
                pair[1] = Some(r?);
            }
        }
        let [Some(a), Some(b)] = pair else { bail!("round {round} incomplete") };
        if !args.json {
            println!("round {}:", round + 1);
            println!("  {}", a.text_line());
            println!("  {}", b.text_line());
            println!("  rate ratio mqgate/mosquitto {:.2}", a.rate() / b.rate().max(1e-9));
        }
        mq.push(a);
        mo.push(b);
    }
    if args.json {
        let runs: Vec<String> = mq.iter().chain(mo.iter()).map(idle::IdleReport::json).collect();
        println!("{{\"idle\":[{}]}}", runs.join(","));
        return Ok(true);
    }
    let bytes = |v: &[idle::IdleReport]| {
        v.iter().map(idle::IdleReport::per_connection_bytes).collect::<Vec<_>>()
    };
    let range = |v: Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("median {:.0}, {lo:.0}-{hi:.0}", median_of(v))
    };
    let ratios: Vec<f64> = mq.iter().zip(&mo).map(|(a, b)| a.rate() / b.rate().max(1e-9)).collect();
    println!("B/conn    mqgate {} | mosquitto {}", range(bytes(&mq)), range(bytes(&mo)));
    println!(
        "conn/s    mqgate {} | mosquitto {}",
        range(mq.iter().map(idle::IdleReport::rate).collect()),
        range(mo.iter().map(idle::IdleReport::rate).collect())
    );
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(0.0, f64::max);
    println!("rate ratio median {:.2}, {lo:.2}-{hi:.2}", median_of(ratios.clone()));
    println!(
        "server CPU us/conn  mqgate {} | mosquitto {}",
        range(mq.iter().map(idle::IdleReport::cpu_us).collect()),
        range(mo.iter().map(idle::IdleReport::cpu_us).collect())
    );
    Ok(true)
}

/// `--mode storm`: a reconnect storm against a spawned mqgate, then a spawned Mosquitto
/// (`--repeat` rounds, fresh processes each).
async fn run_storm(args: &Args) -> Result<bool> {
    let n = args.connections as usize;
    let binary = mqgate_binary(args)?;
    let login = connections_login(args)?;
    println!(
        "mqgate-bench storm: {n} MQTT 3.1.1 connections at once per server, 4 QoS 1 publishers"
    );
    for round in 0..args.repeat {
        let gw = connections_gateway(args, &binary, n, &login).await?;
        let mqgate = storm::measure("mqgate", &gw.mqtt_addr, n, &login).await;
        let note = gw.stop(Duration::from_secs(10)).await;
        let mosq = connections_mosquitto(&login).await?;
        let baseline = storm::measure("mosquitto", &mosq.addr, n, &login).await;
        drop(mosq);
        println!("round {}:", round + 1);
        for r in [mqgate?, baseline?] {
            println!("  {}", r.text_line());
        }
        if let Some(note) = note {
            println!("note: {note}");
        }
    }
    Ok(true)
}

/// `--mode tls`: see `tls.rs`. One invocation: connection rates, fan-in per transport, idle
/// TLS memory, mqgate beside a Mosquitto with the same certificates.
async fn run_tls(mut args: Args) -> Result<bool> {
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("mqgate-bench-tls-{pid}"));
    let certs = tls::Certs::make(&dir)?;
    dial::set_tls_roots(&certs.ca)?;
    let ports = tls::Ports::pick()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, tls::mosquitto_conf(&ports, &certs))?;
    let mosquitto = mosquitto::Mosquitto::start_conf(&conf, ports.mosquitto_tcp).await?;
    let mosquitto_pid = mosquitto.pid();
    args.mode = vec![ModeArg::Fanin];
    args.qos = QosArg::One;
    let json = args.json;
    let (messages, publishers, repeat) = (args.messages, args.publishers, args.repeat);
    let (tls_n, idle_n) = (args.tls_connections as usize, args.connections as usize);
    let part = |p: &str| args.tls_parts.is_empty() || args.tls_parts.iter().any(|x| x == p);
    let (do_fanin, do_rate, do_idle) = (part("fanin"), part("rate"), part("idle"));
    let mut bench = Bench {
        idle: args.idle()?,
        pid,
        runs: 0,
        control: None,
        exchange: "amq.topic".to_owned(),
        own_exchange: false,
        gateway: None,
        gateway_failed: None,
        mosquitto: Some(mosquitto),
        notes: Vec::new(),
        clock: Clock::new(),
        addr_override: None,
        extra_mqtt: tls::mqgate_listeners(&ports, &certs),
        args,
    };
    let plain = bench.gateway_addr().await?;
    let gw_pid = bench.gateway.as_ref().and_then(Gateway::pid).context("mqgate not running")?;
    let mosq_tcp = format!("127.0.0.1:{}", ports.mosquitto_tcp);
    let runs: [(&str, Mode, String); 6] = [
        ("mqgate tcp", Mode::Mqgate, plain),
        ("mqgate tls", Mode::Mqgate, format!("tls://127.0.0.1:{}", ports.mqgate_tls_ec)),
        ("mqgate ws", Mode::Mqgate, format!("ws://127.0.0.1:{}/mqtt", ports.mqgate_ws)),
        ("mqgate wss", Mode::Mqgate, format!("wss://127.0.0.1:{}/mqtt", ports.mqgate_wss)),
        ("mosquitto tcp", Mode::Mosquitto, mosq_tcp),
        ("mosquitto tls", Mode::Mosquitto, format!("tls://127.0.0.1:{}", ports.mosquitto_tls_ec)),
    ];
    if !json {
        println!(
            "mqgate-bench tls: fan-in QoS 1, {messages} msgs x {} B, {publishers} publishers -> 1 \
             subscriber, {repeat} runs each (alternating); {tls_n} TLS handshakes per server and \
             key; {idle_n} idle TLS connections per server",
            bench.args.payload
        );
        println!("{}", RunReport::text_header());
    }
    let mut reports: Vec<Vec<RunReport>> = runs.iter().map(|_| Vec::new()).collect();
    for _ in 0..if do_fanin { repeat } else { 0 } {
        for (i, (_, mode, addr)) in runs.iter().enumerate() {
            bench.addr_override = Some(addr.clone());
            if bench.args.warmup > 0 && reports[i].is_empty() {
                let _ = bench.run_one(*mode, 1, bench.args.warmup).await;
            }
            let report = match bench.run_one(*mode, 1, messages).await {
                Ok(r) => r,
                Err(e) => bench.failed_report(*mode, 1, format!("{e:#}")),
            };
            if !json {
                println!("{:<14} {}", runs[i].0, report.text_line());
            }
            reports[i].push(report);
        }
    }
    let medians: Vec<f64> = reports.iter().map(|r| tls::median_rate(r)).collect();
    let mut rates = Vec::new();
    for (key, mq, mo) in if !do_rate {
        Vec::new()
    } else {
        vec![
            ("ecdsa-p256", ports.mqgate_tls_ec, ports.mosquitto_tls_ec),
            ("rsa-2048", ports.mqgate_tls_rsa, ports.mosquitto_tls_rsa),
        ]
    } {
        let m = tls::connection_rate(&format!("tls://127.0.0.1:{mq}"), tls_n, "mq").await?;
        let o = tls::connection_rate(&format!("tls://127.0.0.1:{mo}"), tls_n, "mo").await?;
        rates.push((key, m, o));
    }
    let (mut mq_idle, mut mo_idle) = (0.0, 0.0);
    if do_idle {
        let tls_mq = format!("tls://127.0.0.1:{}", ports.mqgate_tls_ec);
        mq_idle = tls::idle_memory(&tls_mq, gw_pid, idle_n, "mq").await?.0;
        let tls_mo = format!("tls://127.0.0.1:{}", ports.mosquitto_tls_ec);
        mo_idle = tls::idle_memory(&tls_mo, mosquitto_pid, idle_n, "mo").await?.0;
    }
    bench.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let ok = reports.iter().flatten().all(|r| r.error.is_none());
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    if json {
        let fanin: Vec<String> = runs
            .iter()
            .zip(&medians)
            .map(|((name, _, _), m)| {
                format!("{{\"run\":{},\"median_msgs_per_s\":{m:.0}}}", stats::json_str(name))
            })
            .collect();
        let conn: Vec<String> = rates
            .iter()
            .map(|(k, m, o)| {
                format!("{{\"key\":\"{k}\",\"mqgate_per_s\":{m:.0},\"mosquitto_per_s\":{o:.0}}}")
            })
            .collect();
        println!(
            "{{\"fanin\":[{}],\"tls_connections\":[{}],\"idle_tls_bytes\":{{\"mqgate\":{mq_idle:.0},\"mosquitto\":{mo_idle:.0}}}}}",
            fanin.join(","),
            conn.join(",")
        );
    } else {
        for ((name, _, _), m) in runs.iter().zip(&medians) {
            println!("fan-in QoS 1 {name:<14} median {m:>9.0} msgs/s");
        }
        let (tcp, tls_, ws, wss, mo_tcp, mo_tls) =
            (medians[0], medians[1], medians[2], medians[3], medians[4], medians[5]);
        println!(
            "fan-in: mqgate tls/tcp {:.2}x (>= 0.8), ws/tcp {:.2}x (>= 0.8), wss/tcp {:.2}x; \
             mqgate tls / mosquitto tls {:.2}x (>= 1); mqgate tcp / mosquitto tcp {:.2}x",
            ratio(tls_, tcp),
            ratio(ws, tcp),
            ratio(wss, tcp),
            ratio(tls_, mo_tls),
            ratio(tcp, mo_tcp)
        );
        for (key, m, o) in &rates {
            println!(
                "new TLS connections/s to CONNACK, {key}: mqgate {m:.0}, mosquitto {o:.0} ({:.2}x, >= 1)",
                ratio(*m, *o)
            );
        }
        println!(
            "memory per idle TLS connection ({idle_n} each): mqgate {mq_idle:.0} B, mosquitto {mo_idle:.0} B"
        );
        for n in &bench.notes {
            println!("note: {n}");
        }
    }
    Ok(ok)
}

/// `--mode http`: the HTTP webhook bench.
async fn run_http(args: &Args) -> Result<bool> {
    let binary = mqgate_binary(args)?;
    http::run(&http::HttpBench {
        binary: &binary,
        messages: args.messages,
        publishers: args.publishers as usize,
        payload: args.payload as usize,
        window: args.window as usize,
        concurrency: args.http_concurrency as usize,
        batch: args.http_batch as usize,
        batch_delay_ms: args.http_batch_delay,
        repeat: args.repeat,
        warmup: args.warmup,
        json: args.json,
        runs: args.http_runs.clone(),
    })
    .await
}

/// A task's result with a panic or cancellation as an error.
fn joined<T>(r: std::result::Result<Result<T>, JoinError>) -> Result<T> {
    r.map_err(|e| anyhow!("task failed: {e}"))?
}

impl Bench {
    async fn run_all(&mut self, modes: &[Mode]) -> Result<Vec<RunReport>> {
        let a = &self.args;
        if !a.json {
            println!(
                "mqgate-bench: {} msgs x {} B, {} publishers, rate {}, window {}, \
                 MQTT client {}; direct = {} AMQP connections, 1 channel each",
                a.messages,
                a.payload,
                a.publishers,
                if a.rate == 0 { "max".to_owned() } else { format!("{}/s", a.rate) },
                a.window,
                match a.client {
                    ClientArg::Raw => "raw",
                    ClientArg::Rumqttc => "rumqttc",
                },
                a.publishers,
            );
        }
        if modes
            .iter()
            .any(|m| matches!(m, Mode::Direct | Mode::Gateway | Mode::Templated | Mode::Spooled))
        {
            let conn = amqp::connect(&self.args.amqp_url).await?;
            if self.args.mqtt_addr.is_some() {
                amqp::check_exchange(&conn, &self.exchange).await?;
            } else {
                amqp::declare_exchange(&conn, &self.exchange).await?;
                self.own_exchange = true;
            }
            self.control = Some(conn);
        }
        if !self.args.json {
            println!("{}", RunReport::text_header());
        }
        let mut reports = Vec::new();
        let mut warmed = Vec::new();
        for qos in self.args.qos_levels() {
            for _ in 0..self.args.repeat {
                for &mode in modes {
                    if self.args.warmup > 0 && !warmed.contains(&mode) {
                        warmed.push(mode);
                        // A failure shows again in the measured run.
                        let _ = self.run_one(mode, qos, self.args.warmup).await;
                    }
                    let report = match self.run_one(mode, qos, self.args.messages).await {
                        Ok(r) => r,
                        Err(e) => self.failed_report(mode, qos, format!("{e:#}")),
                    };
                    if !self.args.json {
                        println!("{}", report.text_line());
                    }
                    reports.push(report);
                }
            }
        }
        Ok(reports)
    }

    fn failed_report(&self, mode: Mode, qos: u8, error: String) -> RunReport {
        RunReport {
            mode: mode.name(),
            qos,
            messages: self.args.messages,
            publishers: self.args.publishers as usize,
            payload: self.args.payload as usize,
            target_rate: self.args.rate,
            rate: 0.0,
            publish_rate: 0.0,
            recv: RecvStats::default(),
            publish: PubStats::default(),
            notes: Vec::new(),
            lost: self.args.messages,
            seconds: 0.0,
            error: Some(error),
        }
    }

    /// The MQTT address of the gateway, spawning it on first use.
    async fn gateway_addr(&mut self) -> Result<String> {
        if let Some(addr) = &self.args.mqtt_addr {
            return Ok(addr.clone());
        }
        if let Some(e) = &self.gateway_failed {
            bail!("{e}");
        }
        if self.gateway.is_none() {
            let binary = mqgate_binary(&self.args)?;
            // `--mode spool`: the store next to the gateway's config and log (the temp
            // directory: a real disk here, so every commit's fsync is real), removed with them.
            let spool_store = self.args.mode.contains(&ModeArg::Spool).then(|| {
                std::env::temp_dir().join(format!("mqgate-bench-{}", self.pid)).join("store")
            });
            let started = Gateway::start(&GatewaySpec {
                binary: &binary,
                amqp_url: &self.args.amqp_url,
                exchange: &self.exchange,
                receive_maximum: self.args.window as usize,
                max_connections: 10_000,
                // Fan-in: the one subscriber may fall behind a burst; Mosquitto queues QoS 0
                // for an online subscriber without a bound, so mqgate gets room for the run
                // rather than dropping (the default is 1,024).
                outbound_queue: if self.mosquitto.is_some() {
                    (self.args.messages as usize).max(1024)
                } else {
                    1024
                },
                ready_timeout: Duration::from_secs(20),
                store: spool_store.as_deref(),
                extra_mqtt: &self.extra_mqtt,
                // `--mode bridge`: a bridge to the bench's Mosquitto and a rule using it.
                bridge_to: self
                    .args
                    .mode
                    .contains(&ModeArg::Bridge)
                    .then(|| self.mosquitto.as_ref().map(|m| m.addr.clone()))
                    .flatten(),
            })
            .await;
            let gw = match started {
                Ok(gw) => gw,
                Err(e) => {
                    let e = format!("{e:#}");
                    self.gateway_failed = Some(e.clone());
                    bail!("{e}");
                }
            };
            if !self.args.json {
                println!(
                    "(spawned {} on {}, log {})",
                    binary.display(),
                    gw.mqtt_addr,
                    gw.log_path.display()
                );
            }
            self.gateway = Some(gw);
        }
        match &self.gateway {
            Some(gw) => Ok(gw.mqtt_addr.clone()),
            None => bail!("gateway not started"),
        }
    }

    /// One run: consumer first, then the publishers connect, go, and the
    /// run ends when the consumer has everything or went idle.
    async fn run_one(&mut self, mode: Mode, qos: u8, messages: u64) -> Result<RunReport> {
        self.runs += 1;
        let run = self.runs;
        let tag = self.pid.wrapping_mul(256).wrapping_add(run) & 0xff_ffff;
        let args = &self.args;
        let publishers = args.publishers as usize;
        let builder = PayloadBuilder::new(args.payload as usize, tag);
        let tracker = Tracker::new(tag, messages);
        let mqtt_addr = match mode {
            Mode::Mqgate | Mode::Mosquitto if self.addr_override.is_some() => {
                self.gateway_addr().await?;
                self.addr_override.clone()
            }
            Mode::Gateway | Mode::Mqgate | Mode::Templated | Mode::Spooled | Mode::Bridged => {
                Some(self.gateway_addr().await?)
            }
            Mode::Mosquitto => Some(match &self.mosquitto {
                Some(m) => m.addr.clone(),
                None => self.args.mosquitto_addr.clone(),
            }),
            Mode::Direct => None,
        };
        let args = &self.args;
        let clock = self.clock;
        let prefix = match mode {
            Mode::Mosquitto | Mode::Mqgate | Mode::Bridged => {
                format!("mqgate-bench/{}-{run}", self.pid)
            }
            // Matched by the templated rule only (see gateway::config_yaml).
            Mode::Templated => gateway::TEMPLATED_PREFIX.to_owned(),
            Mode::Spooled => gateway::SPOOL_PREFIX.to_owned(),
            _ => "bench".to_owned(),
        };

        // The consumer, ready before anything is sent.
        let consumer: JoinHandle<Result<RecvStats>> = match mode {
            Mode::Direct | Mode::Gateway | Mode::Templated | Mode::Spooled => {
                let control = self.control.as_ref().context("no AMQP connection")?;
                let queue = amqp::BenchQueue::declare(control, &self.exchange, "bench.#").await?;
                tokio::spawn(queue.consume(tracker, clock, self.idle).await?)
            }
            Mode::Mosquitto | Mode::Mqgate | Mode::Bridged => {
                let (ready_tx, ready_rx) = oneshot::channel();
                // Bridged: the subscriber is on the upstream Mosquitto.
                let sub_addr = match (mode, &self.mosquitto) {
                    (Mode::Bridged, Some(m)) => Some(m.addr.clone()),
                    _ => mqtt_addr.clone(),
                };
                let sub = mqtt::Subscription {
                    addr: sub_addr.context("no MQTT address")?,
                    client_id: format!("mqgate-bench-{}-{run}-sub", self.pid),
                    filter: format!("{prefix}/#"),
                    // Mosquitto's default max_queued_messages (1000) drops
                    // the backlog of a QoS 1 subscriber that is behind, which
                    // would measure the broker's queue limit, not its ingest:
                    // the publishers use `qos`, the subscriber QoS 0.
                    qos: 0,
                    idle: self.idle,
                };
                let handle = tokio::spawn(mqtt::raw_subscriber(sub, tracker, clock, ready_tx));
                if ready_rx.await.is_err() {
                    joined(handle.await).context("MQTT subscriber")?;
                    bail!("MQTT subscriber stopped before subscribing");
                }
                handle
            }
        };
        let mut consumer = AbortOnDrop(consumer);

        // The publishers: connect, then wait for the go.
        let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
        let (ready_tx, mut ready_rx) = mpsc::channel(publishers);
        let mut set = JoinSet::new();
        let jobs = PubJob::split(
            messages,
            publishers,
            qos,
            args.window as usize,
            args.rate,
            &builder,
            clock,
        );
        for job in jobs {
            let i = job.index;
            let client_id = format!("mqgate-bench-{}-{run}-{i}", self.pid);
            let topic = format!("{prefix}/{i}");
            let (ready, phase) = (ready_tx.clone(), phase_rx.clone());
            match (&mqtt_addr, args.client) {
                (None, _) => set.spawn(amqp::direct_publisher(
                    args.amqp_url.clone(),
                    self.exchange.clone(),
                    job,
                    ready,
                    phase,
                )),
                (Some(addr), ClientArg::Raw) => set.spawn(mqtt::raw_publisher(
                    addr.clone(),
                    client_id,
                    topic,
                    job,
                    ready,
                    phase,
                )),
                (Some(addr), ClientArg::Rumqttc) => set.spawn(mqtt::rumqttc_publisher(
                    addr.clone(),
                    client_id,
                    topic,
                    job,
                    ready,
                    phase,
                )),
            };
        }
        drop(ready_tx);
        let connected = timeout(CONNECT_ALL_TIMEOUT, async {
            for _ in 0..publishers {
                tokio::select! {
                    r = ready_rx.recv() => if r.is_none() { break },
                    Some(j) = set.join_next() => {
                        joined(j).context("publisher")?;
                        bail!("a publisher stopped before the start");
                    }
                }
            }
            anyhow::Ok(())
        })
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = phase_tx.send(Phase::Stop);
                return Err(e);
            }
            Err(_) => {
                let _ = phase_tx.send(Phase::Stop);
                bail!("publishers did not connect within {CONNECT_ALL_TIMEOUT:?}");
            }
        }

        // Go; wait for the consumer, noting publishers that fail meanwhile.
        let spawned =
            matches!(mode, Mode::Gateway | Mode::Templated | Mode::Spooled | Mode::Bridged);
        let cpu_before = self.gateway.as_ref().filter(|_| spawned).and_then(Gateway::cpu_time);
        let start_ns = clock.now_ns();
        let _ = phase_tx.send(Phase::Go(start_ns));
        let mut publish = PubStats::default();
        let mut errors = Vec::new();
        let recv = loop {
            tokio::select! {
                r = &mut consumer.0 => break joined(r),
                Some(j) = set.join_next() => match joined(j) {
                    Ok(s) => publish.merge(&s),
                    Err(e) => errors.push(format!("publisher: {e:#}")),
                },
            }
        };
        let _ = phase_tx.send(Phase::Stop);
        let finished = timeout(FINISH_TIMEOUT, async {
            while let Some(j) = set.join_next().await {
                match joined(j) {
                    Ok(s) => publish.merge(&s),
                    Err(e) => errors.push(format!("publisher: {e:#}")),
                }
            }
        })
        .await;
        if finished.is_err() {
            set.abort_all();
            errors.push(format!(
                "publishers still busy {FINISH_TIMEOUT:?} after the consumer finished"
            ));
        }
        let recv = match recv {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("consumer: {e:#}"));
                RecvStats::default()
            }
        };
        if matches!(
            mode,
            Mode::Gateway | Mode::Mqgate | Mode::Templated | Mode::Spooled | Mode::Bridged
        ) {
            if let Some(gw) = self.gateway.as_mut() {
                if let Err(e) = gw.check_alive() {
                    errors.push(format!("{e:#}"));
                }
            }
        }

        let end_ns = recv.last_ns.unwrap_or(start_ns);
        let seconds = end_ns.saturating_sub(start_ns) as f64 / 1e9;
        let per_sec = |count: u64, secs: f64| if secs > 0.0 { count as f64 / secs } else { 0.0 };
        let mut notes = Vec::new();
        if matches!(mode, Mode::Mosquitto | Mode::Mqgate | Mode::Bridged) {
            notes.push("sub qos 0".to_owned());
        }
        // mqgate's CPU per message: what decides the ratio when RabbitMQ takes most of the
        // cores, and far less noisy than the rate on a busy machine.
        let cpu_after = self.gateway.as_ref().filter(|_| spawned).and_then(Gateway::cpu_time);
        if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
            let per_msg = after.saturating_sub(before).as_secs_f64() * 1e6 / messages.max(1) as f64;
            notes.push(format!("mqgate cpu {per_msg:.2} us/msg"));
        }
        let publish_seconds = publish.done_ns.saturating_sub(start_ns) as f64 / 1e9;
        errors.dedup();
        Ok(RunReport {
            mode: mode.name(),
            qos,
            messages,
            publishers,
            payload: builder.len(),
            target_rate: self.args.rate,
            rate: per_sec(recv.received, seconds),
            publish_rate: per_sec(publish.sent, publish_seconds),
            lost: messages.saturating_sub(recv.received),
            seconds,
            recv,
            publish,
            notes,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        })
    }

    /// Stops the gateway and the bench's Mosquitto, deletes the bench's exchange, closes AMQP.
    async fn shutdown(&mut self) {
        drop(self.mosquitto.take());
        if let Some(gw) = self.gateway.take() {
            if let Some(note) = gw.stop(Duration::from_secs(5)).await {
                self.notes.push(note);
            }
        }
        if let Some(conn) = self.control.take() {
            if self.own_exchange {
                if let Err(e) = amqp::delete_exchange(&conn, &self.exchange).await {
                    self.notes.push(format!("{e:#}"));
                }
            }
            let _ = timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        }
    }
}

/// Aborts the task when the run is left early.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
