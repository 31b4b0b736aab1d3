//! `--mode attack`: the pathological inputs of issue 13 item 5, each against an unrelated
//! client. One spawned mqgate per scenario; the unrelated client (the *victim*) publishes QoS 1
//! at a fixed rate (`--rate`, default 1,000 msg/s) to `victim/<pid>/v`, which a rule forwards
//! to RabbitMQ (the bench's exchange, a queue bound to `victim.#`): its PUBACK waits for
//! RabbitMQ's confirm, as a device's does in production, and goes through the same AMQP
//! connection as the attacker's messages in `user-properties`. Its latency is publish →
//! PUBACK, measured from when each message was due (a stalled gateway is not hidden by a
//! sender that waits), on a thread and runtime of its own so that the bench's attackers do
//! not delay its timers.
//!
//! Each scenario prepares the gateway once (sessions parked, retained messages loaded, queues
//! filled), then alternates `--repeat` times a baseline phase (victim alone) and an attack
//! phase (the same with the attacker running, started a second before), each
//! `--attack-phase` seconds, and reports p50/p99/max of both and the ratio of the p99s
//! (target: ≤ 2×). The scenarios:
//!
//! * `fanout`: `--fanout-sessions` persistent sessions (parked, in memory), each subscribed
//!   with four overlapping filters (`atk/fan/x`, `atk/fan/+`, `atk/+/x`, `atk/#`) at QoS 1;
//!   the attacker publishes QoS 1 to `atk/fan/x` continuously (`--attack-window` in flight):
//!   every message matches 4 subscriptions per session, one copy per session, into queues
//!   that are full (`mqtt.max_queued_messages: 10`) after the first messages;
//! * `resubscribe`: `--retained` retained messages under `atk/ret/`; the attacker sends
//!   SUBSCRIBE `#` again as soon as the previous SUBACK came, reading what it is sent;
//! * `user-properties`: the attacker publishes MQTT 5 QoS 1 messages with
//!   `--user-properties` user properties each to `atk/props/x`, which a rule forwards to the
//!   same exchange (routed to no queue: RabbitMQ confirms and drops them);
//! * `parked-full`: `--parked-sessions` persistent sessions subscribed to `atk/park/x` at
//!   QoS 1, parked, with a store (`store:`), their queues filled before the first phase
//!   (`mqtt.max_queued_messages: 10`); the attacker publishes QoS 1 to `atk/park/x`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use mqgate::mqtt::codec::{
    self, Connect, Packet, Properties, ProtocolVersion, Publish, PublishProperties, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::amqp;
use super::dial::{self, Rd, Wr};
use super::gateway::Gateway;
use super::load::{CONNECT_TIMEOUT, STALL_TIMEOUT};
use super::payload::Clock;
use super::stats::json_str;

/// Largest packet the bench's clients take from the gateway.
const MAX_PACKET: usize = 16 << 20;
/// The attacker runs this long before the victim's attack phase starts.
const ATTACK_RAMP: Duration = Duration::from_secs(1);
/// Pause after each phase, for what it left behind to drain.
const SETTLE: Duration = Duration::from_secs(2);
/// The unreported warm-up phase of the victim before each scenario's first phase.
const WARMUP: Duration = Duration::from_secs(2);
/// Connections opened at once while sessions are parked.
const PARK_CONCURRENCY: usize = 128;
/// Queued messages per persistent session in the spawned gateway (`fanout`, `parked-full`):
/// small, so that the queues are full after a few messages and stay full.
const QUEUED_MESSAGES: u64 = 10;
/// Retained messages published per round trip while they are loaded.
const LOAD_WINDOW: u16 = 256;
/// Longest latency recorded.
const MAX_LATENCY_NS: u64 = 120_000_000_000;

/// The scenarios of `--mode attack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Many sessions matching one topic through overlapping filters; QoS 1 publishes to it.
    Fanout,
    /// 100,000 retained messages; SUBSCRIBE `#` again and again.
    Resubscribe,
    /// MQTT 5 PUBLISHes with thousands of user properties, forwarded to AMQP.
    UserProperties,
    /// Many parked persistent sessions with full queues (with a store); QoS 1 publishes to them.
    ParkedFull,
}

impl Scenario {
    const ALL: [Scenario; 4] =
        [Scenario::Fanout, Scenario::Resubscribe, Scenario::UserProperties, Scenario::ParkedFull];

    fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Resubscribe => "resubscribe",
            Scenario::UserProperties => "user-properties",
            Scenario::ParkedFull => "parked-full",
        }
    }
}

/// The flags of `--mode attack` (flattened into the bench's).
#[derive(clap::Args, Debug, Clone)]
pub struct AttackArgs {
    /// `--mode attack`: the scenarios, comma-separated [default: all four].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub attacks: Vec<Scenario>,

    /// `--mode attack`: seconds the unrelated client publishes per phase.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub attack_phase: u64,

    /// `--mode attack` fanout: persistent sessions matching the attacked topic.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub fanout_sessions: u64,

    /// `--mode attack` parked-full: parked persistent sessions with full queues.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub parked_sessions: u64,

    /// `--mode attack` resubscribe: retained messages.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub retained: u64,

    /// `--mode attack` user-properties: user properties per attacking PUBLISH (distinct names;
    /// 5,000 still fit RabbitMQ's default frame_max as AMQP headers).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub user_properties: u64,

    /// `--mode attack`: the attacker's QoS 1 PUBLISHes in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub attack_window: u16,

    /// `--mode attack`: the victim publishes to `local/<id>/v`, which no rule forwards, so
    /// its PUBACK does not wait for RabbitMQ (a diagnosis: where the victim's latency comes
    /// from).
    #[arg(long)]
    pub victim_local: bool,

    /// `--mode attack`: beside the victim, a direct AMQP publisher (lapin, its own thread)
    /// publishes to the same exchange at the same rate and reports its confirm latency in
    /// each phase: what the attack does to RabbitMQ itself, with no mqgate in the path.
    #[arg(long)]
    pub rabbit_probe: bool,
}

/// What `--mode attack` runs with.
pub struct Spec<'a> {
    pub attack: &'a AttackArgs,
    pub binary: &'a Path,
    pub amqp_url: &'a str,
    /// The bench's exchange (deleted by `main` too if the bench is interrupted).
    pub exchange: &'a str,
    /// The victim's messages per second.
    pub rate: u64,
    /// The victim's payload bytes.
    pub payload: usize,
    pub repeat: u64,
    pub json: bool,
}

/// Runs the selected scenarios; `Ok(false)` if one of them failed.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let scenarios: Vec<Scenario> = if spec.attack.attacks.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL.into_iter().filter(|s| spec.attack.attacks.contains(s)).collect()
    };
    if !spec.json {
        println!(
            "mqgate-bench attack: unrelated client QoS 1 at {} msg/s to victim/<pid>/v → AMQP \
             (PUBACK after RabbitMQ's confirm); {} s phases, baseline and attack alternating, \
             {} time(s)",
            spec.rate, spec.attack.attack_phase, spec.repeat
        );
        println!("{}", PhaseReport::header());
    }
    let mut reports = Vec::new();
    let mut ok = true;
    for scenario in scenarios {
        match run_scenario(spec, scenario).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                ok = false;
                eprintln!("mqgate-bench attack {}: {e:#}", scenario.name());
            }
        }
    }
    if spec.json {
        let items: Vec<String> = reports.iter().map(ScenarioReport::json).collect();
        println!("{{\"attack\":[{}]}}", items.join(","));
    } else {
        println!();
        println!("{}", ScenarioReport::header());
        for r in &reports {
            println!("{}", r.text_line());
        }
    }
    Ok(ok)
}

/// One scenario: its gateway and AMQP topology, set up, phases, torn down.
async fn run_scenario(spec: &Spec<'_>, scenario: Scenario) -> Result<ScenarioReport> {
    let control = amqp::connect(spec.amqp_url).await?;
    let queue = format!("{}-victim", spec.exchange);
    declare_topology(&control, spec.exchange, &queue).await?;
    let store = std::env::temp_dir().join(format!("mqgate-bench-attack-{}", std::process::id()));
    let with_store = scenario == Scenario::ParkedFull;
    let result = async {
        let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), |mqtt, admin| {
            config_yaml(
                mqtt,
                admin,
                spec.amqp_url,
                spec.exchange,
                with_store.then_some(store.as_path()),
            )
        })
        .await?;
        let r = measure(spec, scenario, &gw).await;
        if let Some(note) = gw.stop(Duration::from_secs(10)).await {
            eprintln!("note: {note}");
        }
        r
    }
    .await;
    let _ = std::fs::remove_dir_all(&store);
    delete_topology(&control, spec.exchange, &queue).await;
    let _ = timeout(Duration::from_secs(2), control.close(200, "done".into())).await;
    result
}

/// The spawned gateway's config: the victim's rule and the attacker's (`atk/props/#`), both to
/// `exchange`; bounds raised so that the attack's preparation fits (100,000 retained messages
/// from one client); small session queues; a store for `parked-full`.
fn config_yaml(
    mqtt: &str,
    admin: &str,
    amqp_url: &str,
    exchange: &str,
    store: Option<&Path>,
) -> String {
    let mut yaml = format!(
        "# Written by mqgate-bench --mode attack.\n\
         mqtt:\n  listen: {}\n  max_connections: 1000\n  max_queued_messages: {QUEUED_MESSAGES}\n  max_retained: 1000000\n  max_retained_bytes: 1GiB\n  max_memory: 2GiB\n  max_retained_per_client: 0\n\
         admin:\n  listen: {}\n\
         amqp:\n  rabbit:\n    url: {}\n\
         rules:\n  - name: victim\n    from: \"victim/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n\
         \x20 - name: attack-props\n    from: \"atk/props/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n",
        json_str(mqtt),
        json_str(admin),
        json_str(amqp_url),
        json_str(exchange),
        json_str(exchange),
    );
    if let Some(dir) = store {
        yaml.push_str(&format!("store:\n  path: {}\n", json_str(&dir.display().to_string())));
    }
    yaml
}

/// The bench's exchange and the victim's queue (bounded, and expiring should the bench be
/// killed before it deletes it).
async fn declare_topology(conn: &lapin::Connection, exchange: &str, queue: &str) -> Result<()> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declare exchange {exchange}"))?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(100_000));
    args.insert("x-expires".into(), AMQPValue::LongInt(1_800_000));
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await
        .with_context(|| format!("declare queue {queue}"))?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "victim.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("bind {queue} to {exchange}"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

async fn delete_topology(conn: &lapin::Connection, exchange: &str, queue: &str) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
    let _ = ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await;
    let _ = ch.close(200, "ok".into()).await;
}

/// Prepares `scenario` on `gw`, then runs its phases.
async fn measure(spec: &Spec<'_>, scenario: Scenario, gw: &Gateway) -> Result<ScenarioReport> {
    let addr = gw.mqtt_addr.as_str();
    let tag = std::process::id();
    let a = spec.attack;
    let what = match scenario {
        Scenario::Fanout => {
            let filters = ["atk/fan/x", "atk/fan/+", "atk/+/x", "atk/#"];
            park(addr, &format!("fan-{tag}"), a.fanout_sessions, &filters).await?;
            format!("{} parked sessions × 4 overlapping filters", a.fanout_sessions)
        }
        Scenario::ParkedFull => {
            park(addr, &format!("park-{tag}"), a.parked_sessions, &["atk/park/x"]).await?;
            // Fill every queue (one more to be sure), then measure with them full.
            let filler = Attacker::connect(addr, scenario, a, format!("fill-{tag}")).await?;
            filler.flood(None, Some(QUEUED_MESSAGES + 1)).await?;
            format!("{} parked sessions, queues full, with a store", a.parked_sessions)
        }
        Scenario::Resubscribe => {
            load_retained(addr, &format!("ret-{tag}"), a.retained).await?;
            format!("{} retained messages, SUBSCRIBE # in a loop", a.retained)
        }
        Scenario::UserProperties => {
            format!("{} user properties per PUBLISH", a.user_properties)
        }
    };
    gw_alive(gw)?;
    let prefix = if spec.attack.victim_local { "local" } else { "victim" };
    let victim = Victim::start(addr.to_owned(), format!("victim-{tag}"), spec.payload, prefix)?;
    let clock = Clock::new();
    let phase_count = spec.rate * spec.attack.attack_phase;
    let warmup = (spec.rate * WARMUP.as_secs()).max(1);
    victim.phase(spec.rate, warmup).await.context("warm-up")?;
    let probe = if spec.attack.rabbit_probe {
        Some(Probe::start(spec.amqp_url.to_owned(), spec.exchange.to_owned(), spec.payload)?)
    } else {
        None
    };
    let probed = |attacked: bool| {
        let probe = probe.as_ref();
        async move {
            match probe {
                Some(p) => p.phase(spec.rate, phase_count).await.map(Some),
                None => Ok(None),
            }
            .with_context(|| {
                format!("rabbit probe ({})", if attacked { "attack" } else { "baseline" })
            })
        }
    };
    let mut report = ScenarioReport::new(scenario, what)?;
    for run in 1..=spec.repeat {
        let (base, base_probe) = tokio::join!(victim.phase(spec.rate, phase_count), probed(false));
        let base = base.context("baseline phase")?;
        let line = PhaseReport { scenario, attacked: false, run, lat: &base, attack_rate: None };
        if !spec.json {
            println!("{}", line.text_line());
        }
        report.add(false, &base)?;
        if let Some(p) = base_probe? {
            if !spec.json {
                println!("{}", PhaseReport::probe_line(&p));
            }
            report.add_probe(false, &p)?;
        }
        tokio::time::sleep(SETTLE).await;

        let attacker = Attacker::connect(addr, scenario, a, format!("atk-{tag}-{run}")).await?;
        let (stop_tx, stop) = watch::channel(false);
        let counter = Arc::clone(&attacker.count);
        let task = tokio::spawn(attacker.flood(Some(stop), None));
        tokio::time::sleep(ATTACK_RAMP).await;
        let before = (counter.load(Ordering::Relaxed), clock.now_ns());
        let (lat, attack_probe) = tokio::join!(victim.phase(spec.rate, phase_count), probed(true));
        let ops = counter.load(Ordering::Relaxed) - before.0;
        let secs = (clock.now_ns() - before.1) as f64 / 1e9;
        let _ = stop_tx.send(true);
        let flood = match timeout(STALL_TIMEOUT * 2, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow!("attacker task: {e}")),
            Err(_) => Err(anyhow!("attacker did not stop within {:?}", STALL_TIMEOUT * 2)),
        };
        let lat = lat.context("attack phase")?;
        flood.context("attacker")?;
        let rate = ops as f64 / secs.max(1e-9);
        let line =
            PhaseReport { scenario, attacked: true, run, lat: &lat, attack_rate: Some(rate) };
        if !spec.json {
            println!("{}", line.text_line());
        }
        report.add(true, &lat)?;
        if let Some(p) = attack_probe? {
            if !spec.json {
                println!("{}", PhaseReport::probe_line(&p));
            }
            report.add_probe(true, &p)?;
        }
        report.attack_ops += ops;
        report.attack_secs += secs;
        gw_alive(gw)?;
        tokio::time::sleep(SETTLE).await;
    }
    victim.stop().await;
    if let Some(p) = probe {
        p.stop().await;
    }
    Ok(report)
}

/// The direct AMQP publisher of `--rabbit-probe`: one lapin connection with confirms, on a
/// thread with a runtime of its own (as the victim), publishing to the bench's exchange with
/// routing key `victim.probe` (into the victim's bounded queue).
struct Probe {
    tx: mpsc::Sender<PhaseRequest>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(url: String, exchange: String, payload: usize) -> Result<Probe> {
        let (tx, mut rx) = mpsc::channel::<PhaseRequest>(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("probe runtime")?;
        let thread = std::thread::Builder::new()
            .name("rabbit-probe".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let conn = match amqp::connect(&url).await {
                        Ok(c) => c,
                        Err(e) => {
                            while let Some((_, _, answer)) = rx.recv().await {
                                let _ = answer.send(Err(anyhow!("probe connect: {e:#}")));
                            }
                            return;
                        }
                    };
                    while let Some((rate, count, answer)) = rx.recv().await {
                        let r = probe_phase(&conn, &exchange, payload, rate, count).await;
                        let _ = answer.send(r);
                    }
                    let _ = timeout(Duration::from_secs(2), conn.close(200, "done".into())).await;
                });
            })
            .context("spawn the probe thread")?;
        Ok(Probe { tx, thread })
    }

    async fn phase(&self, rate: u64, count: u64) -> Result<Latencies> {
        let (answer, rx) = oneshot::channel();
        self.tx.send((rate, count, answer)).await.map_err(|_| anyhow!("probe thread ended"))?;
        rx.await.map_err(|_| anyhow!("probe thread ended"))?
    }

    async fn stop(self) {
        drop(self.tx);
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// `count` persistent publishes at `rate` per second on a fresh confirm channel; each one's
/// latency from when it was due to its confirm.
async fn probe_phase(
    conn: &lapin::Connection,
    exchange: &str,
    payload: usize,
    rate: u64,
    count: u64,
) -> Result<Latencies> {
    let ch = conn.create_channel().await.context("probe channel")?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.context("probe confirms")?;
    let clock = Clock::new();
    let body = vec![b'p'; payload];
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut confirms = JoinSet::new();
    let start = clock.now_ns() + 1_000_000;
    for seq in 0..count {
        let offset = u128::from(seq) * 1_000_000_000 / u128::from(rate.max(1));
        let at = start.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX));
        tokio::time::sleep_until(clock.instant_at(at).into()).await;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "victim.probe".into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .context("probe publish")?;
        confirms.spawn(async move {
            let c = timeout(STALL_TIMEOUT, confirm).await;
            (at, clock.now_ns(), matches!(c, Ok(Ok(lapin::Confirmation::Ack(_)))))
        });
    }
    let mut hist = histogram()?;
    let mut acked = 0u64;
    while let Some(r) = confirms.join_next().await {
        let (at, done, ok) = r.map_err(|e| anyhow!("probe confirm task: {e}"))?;
        if ok {
            hist.saturating_record(done.saturating_sub(at).max(1));
            acked += 1;
        }
    }
    let _ = ch.close(200, "ok".into()).await;
    if acked < count {
        bail!("rabbit probe: {} of {count} publishes not confirmed", count - acked);
    }
    Ok(Latencies { hist, sent: count, acked })
}

fn gw_alive(gw: &Gateway) -> Result<()> {
    match gw.pid() {
        Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => Ok(()),
        _ => bail!("mqgate is not running; log {}:\n{}", gw.log_path.display(), gw.log_tail(20)),
    }
}

/// A client connection speaking through mqgate's own codec: the bench's lean clients
/// (`mqtt.rs`) know 3.1.1 with a clean session only, and the attacks need MQTT 5 properties,
/// persistent sessions and retained messages.
struct Client {
    reader: Reader,
    wr: Wr,
    version: ProtocolVersion,
}

/// The read half of a [`Client`].
struct Reader {
    rd: Rd,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl Reader {
    /// The next packet. Cancel safe: what was read stays in the buffer.
    async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.version), MAX_PACKET)
                .map_err(|e| anyhow!("bad packet from mqgate: {e}"))?
            {
                return Ok(p);
            }
            self.buf.reserve(64 * 1024);
            if self.rd.read_buf(&mut self.buf).await.context("read from mqgate")? == 0 {
                bail!("mqgate closed the connection");
            }
        }
    }
}

impl Client {
    /// Connects (keepalive 0) and waits for a successful CONNACK.
    async fn connect(
        addr: &str,
        client_id: &str,
        version: ProtocolVersion,
        clean: bool,
    ) -> Result<Client> {
        let (rd, wr) = timeout(CONNECT_TIMEOUT, dial::open(addr))
            .await
            .map_err(|_| anyhow!("connecting to MQTT {addr} timed out"))??;
        let reader = Reader { rd, buf: BytesMut::with_capacity(64 * 1024), version };
        let mut c = Client { reader, wr, version };
        let connect = Connect {
            protocol: version,
            clean_start: clean,
            keep_alive: 0,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        c.send(&Packet::Connect(Box::new(connect))).await?;
        match timeout(CONNECT_TIMEOUT, c.reader.recv()).await {
            Ok(Ok(Packet::ConnAck(a))) if a.code.is_success() => Ok(c),
            Ok(Ok(Packet::ConnAck(a))) => bail!("{client_id}: CONNACK {:#04x}", a.code.0),
            Ok(Ok(p)) => bail!("{client_id}: expected CONNACK, got {}", p.name()),
            Ok(Err(e)) => Err(e.context(format!("{client_id}: waiting for CONNACK"))),
            Err(_) => bail!("{client_id}: no CONNACK within {CONNECT_TIMEOUT:?}"),
        }
    }

    fn encode(version: ProtocolVersion, p: &Packet) -> Result<Bytes> {
        let mut out = BytesMut::new();
        codec::encode(p, version, &mut out).map_err(|e| anyhow!("encode {}: {e}", p.name()))?;
        Ok(out.freeze())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.wr.write_all(bytes).await.context("write to mqgate")?;
        self.wr.flush().await.context("write to mqgate")
    }

    async fn send(&mut self, p: &Packet) -> Result<()> {
        let bytes = Client::encode(self.version, p)?;
        self.write(&bytes).await
    }

    /// SUBSCRIBE `filters` at `qos`; waits for the SUBACK (skipping what else comes) and
    /// fails if one was refused.
    async fn subscribe(&mut self, packet_id: u16, filters: &[&str], qos: QoS) -> Result<()> {
        let options = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        let filters =
            filters.iter().map(|f| SubscribeFilter { filter: (*f).to_owned(), options }).collect();
        let sub = Subscribe { packet_id, filters, properties: Properties::default() };
        self.send(&Packet::Subscribe(Box::new(sub))).await?;
        loop {
            match timeout(STALL_TIMEOUT, self.reader.recv()).await {
                Ok(Ok(Packet::SubAck(a))) if a.packet_id == packet_id => {
                    if let Some(c) = a.codes.iter().find(|c| !c.is_success()) {
                        bail!("subscription refused: {:#04x}", c.0);
                    }
                    return Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("no SUBACK within {STALL_TIMEOUT:?}"),
            }
        }
    }

    async fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect(Box::default())).await;
        let _ = self.wr.shutdown().await;
    }
}

fn publish(topic: &str, qos: QoS, retain: bool, packet_id: u16, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.to_owned(),
        packet_id,
        properties: PublishProperties::none(),
        payload,
    })
}

/// Connects `n` persistent (Clean Session 0) MQTT 3.1.1 sessions `{prefix}-{i}`, each
/// subscribing to `filters` at QoS 1, and disconnects them: they stay parked.
async fn park(addr: &str, prefix: &str, n: u64, filters: &[&str]) -> Result<()> {
    let permits = Arc::new(Semaphore::new(PARK_CONCURRENCY));
    let filters: Arc<Vec<String>> = Arc::new(filters.iter().map(|f| (*f).to_owned()).collect());
    let mut set = JoinSet::new();
    let one = |i: u64| {
        let (addr, id, filters) = (addr.to_owned(), format!("{prefix}-{i}"), filters.clone());
        async move {
            let mut c = Client::connect(&addr, &id, ProtocolVersion::V311, false).await?;
            let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
            c.subscribe(1, &refs, QoS::AtLeastOnce).await.with_context(|| id.clone())?;
            c.disconnect().await;
            anyhow::Ok(())
        }
    };
    for i in 0..n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let fut = one(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
        while let Some(r) = set.try_join_next() {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Publishes `n` retained QoS 1 messages to `atk/ret/<i / 1000>/<i % 1000>`.
async fn load_retained(addr: &str, client_id: &str, n: u64) -> Result<()> {
    let mut c = Client::connect(addr, client_id, ProtocolVersion::V311, true).await?;
    let payload = Bytes::from_static(b"retained-message");
    let mut i = 0;
    while i < n {
        let batch = (n - i).min(u64::from(LOAD_WINDOW));
        let mut out = BytesMut::new();
        for k in 0..batch {
            let topic = format!("atk/ret/{}/{}", (i + k) / 1000, (i + k) % 1000);
            let id = u16::try_from(k + 1).unwrap_or(u16::MAX);
            let p = publish(&topic, QoS::AtLeastOnce, true, id, payload.clone());
            codec::encode(&p, ProtocolVersion::V311, &mut out)
                .map_err(|e| anyhow!("encode PUBLISH: {e}"))?;
        }
        c.write(&out).await?;
        let mut acked = 0;
        while acked < batch {
            match timeout(STALL_TIMEOUT, c.reader.recv()).await {
                Ok(Ok(Packet::PubAck(_))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("no PUBACK for a retained message within {STALL_TIMEOUT:?}"),
            }
        }
        i += batch;
    }
    c.disconnect().await;
    Ok(())
}

/// One attacking connection and what it sends.
struct Attacker {
    client: Client,
    kind: AttackKind,
    /// Operations done: PUBLISHes acknowledged, or SUBSCRIBEs answered.
    count: Arc<AtomicU64>,
    /// Of those, PUBLISHes the gateway refused (a reason code ≥ 0x80).
    refused: Arc<AtomicU64>,
}

enum AttackKind {
    /// QoS 1 PUBLISHes kept in flight: one pre-encoded packet per packet id `1..=len`, resent
    /// when its PUBACK comes.
    Publish(Vec<Bytes>),
    /// SUBSCRIBE `#`, again when its SUBACK comes.
    Resubscribe(Bytes),
}

impl Attacker {
    async fn connect(
        addr: &str,
        scenario: Scenario,
        args: &AttackArgs,
        client_id: String,
    ) -> Result<Attacker> {
        let version = if scenario == Scenario::UserProperties {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let client = Client::connect(addr, &client_id, version, true).await?;
        let kind = match scenario {
            Scenario::Resubscribe => {
                let options = SubscriptionOptions::default();
                let sub = Subscribe {
                    packet_id: 1,
                    filters: vec![SubscribeFilter { filter: "#".to_owned(), options }],
                    properties: Properties::default(),
                };
                AttackKind::Resubscribe(Client::encode(version, &Packet::Subscribe(Box::new(sub)))?)
            }
            Scenario::Fanout | Scenario::ParkedFull | Scenario::UserProperties => {
                let topic = match scenario {
                    Scenario::Fanout => "atk/fan/x",
                    Scenario::ParkedFull => "atk/park/x",
                    _ => "atk/props/x",
                };
                let mut properties = PublishProperties::none();
                if scenario == Scenario::UserProperties {
                    properties.user_properties = (0..args.user_properties)
                        .map(|i| (format!("p{i}"), "v".to_owned()))
                        .collect();
                }
                let payload = Bytes::from_static(b"attack");
                let mut packets = Vec::with_capacity(usize::from(args.attack_window));
                for id in 1..=args.attack_window {
                    let p = Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: topic.to_owned(),
                        packet_id: id,
                        properties: properties.clone(),
                        payload: payload.clone(),
                    });
                    packets.push(Client::encode(version, &p)?);
                }
                AttackKind::Publish(packets)
            }
        };
        let (count, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        Ok(Attacker { client, kind, count, refused })
    }

    /// Attacks until `stop` turns true, or until `limit` operations are done; then waits for
    /// what is in flight and disconnects.
    async fn flood(self, stop: Option<watch::Receiver<bool>>, limit: Option<u64>) -> Result<()> {
        let Attacker { mut client, kind, count, refused } = self;
        let mut stop = stop;
        let mut stopping = false;
        let mut sent = 0u64;
        let mut inflight = 0u64;
        let more = |sent: u64, stopping: bool| !stopping && limit.is_none_or(|l| sent < l);
        match &kind {
            AttackKind::Publish(packets) => {
                let mut out = BytesMut::new();
                for p in packets {
                    if more(sent, stopping) {
                        out.extend_from_slice(p);
                        sent += 1;
                        inflight += 1;
                    }
                }
                client.write(&out).await?;
            }
            AttackKind::Resubscribe(sub) => {
                client.write(sub).await?;
                sent += 1;
                inflight += 1;
            }
        }
        while inflight > 0 {
            let packet = tokio::select! {
                p = timeout(STALL_TIMEOUT, client.reader.recv()) => match p {
                    Ok(p) => p?,
                    Err(_) => bail!("attacker: no answer from mqgate within {STALL_TIMEOUT:?}"),
                },
                changed = async {
                    match stop.as_mut() {
                        Some(s) => s.wait_for(|stop| *stop).await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                }, if !stopping => {
                    let _ = changed;
                    stopping = true;
                    continue;
                }
            };
            let resend = match (&kind, packet) {
                (AttackKind::Publish(packets), Packet::PubAck(a)) => {
                    if !a.code.is_success() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    packets.get(usize::from(a.packet_id).wrapping_sub(1))
                }
                (AttackKind::Resubscribe(sub), Packet::SubAck(_)) => Some(sub),
                _ => continue,
            };
            count.fetch_add(1, Ordering::Relaxed);
            inflight -= 1;
            if let Some(bytes) = resend.filter(|_| more(sent, stopping)) {
                client.write(bytes).await?;
                sent += 1;
                inflight += 1;
            }
        }
        client.disconnect().await;
        Ok(())
    }
}

/// Publish → PUBACK latencies of one phase of the victim.
struct Latencies {
    hist: Histogram<u64>,
    sent: u64,
    acked: u64,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).map_err(|e| anyhow!("histogram: {e}"))
}

/// A phase the victim is asked to run: (messages per second, messages, where to answer).
type PhaseRequest = (u64, u64, oneshot::Sender<Result<Latencies>>);

/// The unrelated client: one MQTT 3.1.1 connection, on a thread with a runtime of its own.
struct Victim {
    tx: mpsc::Sender<PhaseRequest>,
    thread: std::thread::JoinHandle<()>,
}

impl Victim {
    fn start(
        addr: String,
        client_id: String,
        payload: usize,
        prefix: &'static str,
    ) -> Result<Victim> {
        let (tx, mut rx) = mpsc::channel::<PhaseRequest>(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("victim runtime")?;
        let thread = std::thread::Builder::new()
            .name("victim".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut client: Option<Client> = None;
                    while let Some((rate, count, answer)) = rx.recv().await {
                        let c = match client.take() {
                            Some(c) => Ok(c),
                            None => Client::connect(&addr, &client_id, ProtocolVersion::V311, true)
                                .await
                                .context("victim connect"),
                        };
                        let r = match c {
                            Ok(c) => {
                                let topic = format!("{prefix}/{client_id}/v");
                                victim_phase(c, &topic, payload, rate, count).await
                            }
                            Err(e) => Err(e),
                        };
                        let _ = answer.send(r.map(|(c, lat)| {
                            client = Some(c);
                            lat
                        }));
                    }
                    if let Some(c) = client {
                        c.disconnect().await;
                    }
                });
            })
            .context("spawn the victim thread")?;
        Ok(Victim { tx, thread })
    }

    async fn phase(&self, rate: u64, count: u64) -> Result<Latencies> {
        let (answer, rx) = oneshot::channel();
        self.tx.send((rate, count, answer)).await.map_err(|_| anyhow!("victim thread ended"))?;
        rx.await.map_err(|_| anyhow!("victim thread ended"))?
    }

    async fn stop(self) {
        drop(self.tx);
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// Sends `count` QoS 1 PUBLISHes at `rate` per second to `topic` (`victim/<client id>/v`)
/// and records each one's latency from when it was due to its PUBACK.
async fn victim_phase(
    client: Client,
    topic: &str,
    payload: usize,
    rate: u64,
    count: u64,
) -> Result<(Client, Latencies)> {
    let Client { mut reader, mut wr, version } = client;
    let clock = Clock::new();
    // When each packet id's message was due (0: not in flight).
    let due: Arc<Vec<AtomicU64>> = Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
    let acks = {
        let due = Arc::clone(&due);
        tokio::spawn(async move {
            let mut hist = histogram()?;
            let mut acked = 0u64;
            while acked < count {
                match timeout(STALL_TIMEOUT, reader.recv()).await {
                    Ok(Ok(Packet::PubAck(a))) => {
                        let now = clock.now_ns();
                        let sent = due[usize::from(a.packet_id)].swap(0, Ordering::AcqRel);
                        if sent == 0 {
                            bail!("PUBACK for packet id {} not in flight", a.packet_id);
                        }
                        if !a.code.is_success() {
                            bail!("victim's PUBLISH refused: {:#04x}", a.code.0);
                        }
                        hist.saturating_record(now.saturating_sub(sent).max(1));
                        acked += 1;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break,
                }
            }
            anyhow::Ok((reader, hist, acked))
        })
    };
    let body = Bytes::from(vec![b'v'; payload]);
    let start = clock.now_ns() + 1_000_000;
    let mut sent = 0u64;
    let mut failure = None;
    for seq in 0..count {
        let offset = u128::from(seq) * 1_000_000_000 / u128::from(rate.max(1));
        let at = start.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX));
        tokio::time::sleep_until(clock.instant_at(at).into()).await;
        let id = u16::try_from(seq % u64::from(u16::MAX) + 1).unwrap_or(1);
        if due[usize::from(id)].load(Ordering::Acquire) != 0 {
            failure = Some(anyhow!("65,535 PUBLISHes without PUBACK"));
            break;
        }
        due[usize::from(id)].store(at.max(1), Ordering::Release);
        let p = publish(topic, QoS::AtLeastOnce, false, id, body.clone());
        let bytes = Client::encode(version, &p)?;
        if let Err(e) = async {
            wr.write_all(&bytes).await?;
            wr.flush().await
        }
        .await
        {
            failure = Some(anyhow::Error::new(e).context("victim: send PUBLISH"));
            break;
        }
        sent += 1;
    }
    let (reader, hist, acked) = match acks.await {
        Ok(r) => r?,
        Err(e) => bail!("victim's PUBACK reader: {e}"),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    if acked < sent {
        bail!(
            "victim: {} of {sent} PUBLISHes without PUBACK after {STALL_TIMEOUT:?}",
            sent - acked
        );
    }
    Ok((Client { reader, wr, version }, Latencies { hist, sent, acked }))
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One phase's line.
struct PhaseReport<'a> {
    scenario: Scenario,
    attacked: bool,
    run: u64,
    lat: &'a Latencies,
    /// Attack operations per second during the phase.
    attack_rate: Option<f64>,
}

impl PhaseReport<'_> {
    /// A `--rabbit-probe` line under its phase's.
    fn probe_line(lat: &Latencies) -> String {
        let h = &lat.hist;
        format!(
            "{:<16} {:<8} {:>3} {:>7} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>12}",
            "  rabbit probe",
            "",
            "",
            lat.sent,
            lat.acked,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            "-"
        )
    }

    fn header() -> String {
        format!(
            "{:<16} {:<8} {:>3} {:>7} {:>7} {:>8} {:>8} {:>8} {:>12}",
            "scenario",
            "phase",
            "run",
            "sent",
            "acked",
            "p50 ms",
            "p99 ms",
            "max ms",
            "attack op/s"
        )
    }

    fn text_line(&self) -> String {
        let h = &self.lat.hist;
        format!(
            "{:<16} {:<8} {:>3} {:>7} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>12}",
            self.scenario.name(),
            if self.attacked { "attack" } else { "baseline" },
            self.run,
            self.lat.sent,
            self.lat.acked,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            self.attack_rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
        )
    }
}

/// A scenario's phases merged: baseline and attack.
struct ScenarioReport {
    scenario: Scenario,
    what: String,
    baseline: Histogram<u64>,
    attack: Histogram<u64>,
    attack_ops: u64,
    attack_secs: f64,
    /// `--rabbit-probe`: the direct publisher's confirm latencies (baseline, attack).
    probe: Option<(Histogram<u64>, Histogram<u64>)>,
}

impl ScenarioReport {
    fn new(scenario: Scenario, what: String) -> Result<ScenarioReport> {
        Ok(ScenarioReport {
            scenario,
            what,
            baseline: histogram()?,
            attack: histogram()?,
            attack_ops: 0,
            attack_secs: 0.0,
            probe: None,
        })
    }

    fn add(&mut self, attacked: bool, lat: &Latencies) -> Result<()> {
        let h = if attacked { &mut self.attack } else { &mut self.baseline };
        h.add(&lat.hist).map_err(|e| anyhow!("merge histograms: {e}"))
    }

    fn add_probe(&mut self, attacked: bool, lat: &Latencies) -> Result<()> {
        if self.probe.is_none() {
            self.probe = Some((histogram()?, histogram()?));
        }
        let Some((base, attack)) = self.probe.as_mut() else { return Ok(()) };
        let h = if attacked { attack } else { base };
        h.add(&lat.hist).map_err(|e| anyhow!("merge histograms: {e}"))
    }

    /// The probe's p99 under attack over its baseline p99.
    fn probe_ratio(&self) -> Option<f64> {
        let (base, attack) = self.probe.as_ref()?;
        let b = base.value_at_quantile(0.99).max(1);
        Some(attack.value_at_quantile(0.99) as f64 / b as f64)
    }

    fn ratio(&self) -> f64 {
        let base = self.baseline.value_at_quantile(0.99).max(1);
        self.attack.value_at_quantile(0.99) as f64 / base as f64
    }

    fn header() -> String {
        format!(
            "{:<16} {:>26} {:>26} {:>9} {:>11}  setup",
            "scenario", "baseline p50/p99/max ms", "attack p50/p99/max ms", "p99 ×", "attack op/s"
        )
    }

    fn triple(h: &Histogram<u64>) -> String {
        format!(
            "{:.2}/{:.2}/{:.1}",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max())
        )
    }

    fn text_line(&self) -> String {
        let ratio = self.ratio();
        let mut line = format!(
            "{:<16} {:>26} {:>26} {:>8.2}× {:>11.0}  {} ({})",
            self.scenario.name(),
            ScenarioReport::triple(&self.baseline),
            ScenarioReport::triple(&self.attack),
            ratio,
            self.attack_ops as f64 / self.attack_secs.max(1e-9),
            self.what,
            if ratio <= 2.0 { "target ≤ 2× met" } else { "target ≤ 2× MISSED" },
        );
        if let (Some((base, attack)), Some(r)) = (&self.probe, self.probe_ratio()) {
            line.push_str(&format!(
                "\n{:<16} {:>26} {:>26} {:>8.2}×  (RabbitMQ's own confirm latency, no mqgate)",
                "  rabbit probe",
                ScenarioReport::triple(base),
                ScenarioReport::triple(attack),
                r
            ));
        }
        line
    }

    fn json(&self) -> String {
        let q = |h: &Histogram<u64>| {
            format!(
                "{{\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"count\":{}}}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max()),
                h.len()
            )
        };
        let probe = match (&self.probe, self.probe_ratio()) {
            (Some((base, attack)), Some(r)) => format!(
                ",\"rabbit_probe\":{{\"baseline\":{},\"attack\":{},\"p99_ratio\":{r:.3}}}",
                q(base),
                q(attack)
            ),
            _ => String::new(),
        };
        format!(
            "{{\"scenario\":{},\"setup\":{},\"baseline\":{},\"attack\":{},\"p99_ratio\":{:.3},\
             \"attack_ops_per_s\":{:.1}{probe}}}",
            json_str(self.scenario.name()),
            json_str(&self.what),
            q(&self.baseline),
            q(&self.attack),
            self.ratio(),
            self.attack_ops as f64 / self.attack_secs.max(1e-9)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_what_mqgate_accepts() {
        for store in [None, Some(Path::new("/tmp/x"))] {
            let y = config_yaml("127.0.0.1:1", "127.0.0.1:2", "amqp://g:g@h/%2f", "ex-1", store);
            let config = mqgate::config::Config::parse(Path::new("attack.yaml"), &y)
                .unwrap_or_else(|e| panic!("attack config invalid: {e}\n{y}"));
            assert_eq!(config.store.is_some(), store.is_some(), "{y}");
            let names: Vec<&str> = config.rules.iter().map(|r| r.name.value.as_str()).collect();
            assert_eq!(names, ["victim", "attack-props"]);
        }
    }

    #[test]
    fn attack_publishes_encode_with_thousands_of_user_properties() {
        let mut properties = PublishProperties::none();
        properties.user_properties = (0..5000).map(|i| (format!("p{i}"), "v".to_owned())).collect();
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "atk/props/x".to_owned(),
            packet_id: 7,
            properties,
            payload: Bytes::from_static(b"attack"),
        });
        let bytes = Client::encode(ProtocolVersion::V5, &p).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let back = codec::decode(&mut buf, Some(ProtocolVersion::V5), MAX_PACKET).unwrap();
        assert_eq!(back, Some(p));
    }
}
