//! `--mode cluster`: mqgate nodes acting as one broker through RabbitMQ (`cluster:`), MQTT →
//! MQTT fan-in (P publishers → 1 subscriber at QoS 0), in one run, alternating:
//!
//! * `cross-node`: publishers on node A, the subscriber on node B (two spawned mqgate nodes of
//!   one cluster on the machine's RabbitMQ, a prefix of this run's own);
//! * `rabbitmq-mqtt`: the same load through RabbitMQ's own MQTT plugin (`rabbitmq_mqtt`, which
//!   ships with RabbitMQ): the bench enables it on a spare port for the run and disables it
//!   again afterwards (it says so), unless it was enabled already (then it is used as is);
//! * `same-node`: publishers and subscriber both on node A (cluster mode; node B has no
//!   subscription the messages match, so A forwards none of them);
//! * `single`: publishers and subscriber on a spawned mqgate without `cluster:`.
//!
//! Targets: cross-node ≥ 3× rabbitmq-mqtt, same-node ≥ 0.9× single (medians per QoS).
//! The bench waits a moment after subscribing before the publishers start (the SUBACK already
//! waits for the subscriber node's binding and the other node's acknowledgement).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::gateway::{free_port, Gateway};
use super::load::{Phase, PubJob};
use super::mqtt;
use super::payload::{Clock, PayloadBuilder};
use super::stats::{json_str, Tracker};

/// What the cluster bench needs.
pub struct Spec<'a> {
    pub messages: u64,
    pub payload: usize,
    pub publishers: u64,
    pub window: u16,
    pub repeat: u64,
    pub qos: Vec<u8>,
    pub binary: &'a Path,
    pub amqp_url: &'a str,
    pub idle: Duration,
    pub json: bool,
    /// Whether to run the `rabbitmq-mqtt` side (`--no-broker-plugin`: not).
    pub plugin: bool,
}

/// The sides of the comparison, in run order.
const SIDES: [&str; 4] = ["cross-node", "rabbitmq-mqtt", "same-node", "single"];

/// Runs every side `repeat` times per QoS, alternating; prints the rates and the ratios.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let pid = std::process::id();
    let prefix = format!("mqgate-bench-{pid}");
    let node = |id: &'static str, cluster: bool| {
        let prefix = prefix.clone();
        move |mqtt: &str, admin: &str| {
            let mut yaml = format!(
                "mqtt:\n  listen: \"{mqtt}\"\n  receive_maximum: {}\n  max_connections: 10000\n  outbound_queue: {}\nadmin:\n  listen: \"{admin}\"\namqp:\n  backbone:\n    url: {}\n",
                spec.window.max(1),
                spec.messages.max(1024),
                json_str(spec.amqp_url),
            );
            if cluster {
                yaml.push_str(&format!(
                    "cluster:\n  node_id: {id}\n  broker: backbone\n  prefix: {prefix}\n  inbound_max: {}\n",
                    spec.messages.max(1024)
                ));
            }
            yaml
        }
    };
    let ready = Duration::from_secs(20);
    let a = Gateway::start_with(spec.binary, ready, node("a", true)).await?;
    let b = Gateway::start_with(spec.binary, ready, node("b", true)).await?;
    let single = Gateway::start_with(spec.binary, ready, node("single", false)).await?;
    let plugin = if spec.plugin { Some(MqttPlugin::start()?) } else { None };
    let plugin_addr = plugin.as_ref().map_or("skipped (--no-broker-plugin)", |p| p.addr.as_str());
    if !spec.json {
        println!(
            "mqgate-bench cluster: {} msgs x {} B per run, {} MQTT publishers (window {}) -> 1 subscriber (QoS 0); nodes a {} and b {} (prefix {prefix}), single {}, RabbitMQ MQTT plugin {}",
            spec.messages, spec.payload, spec.publishers, spec.window, a.mqtt_addr, b.mqtt_addr,
            single.mqtt_addr, plugin_addr
        );
        if let Some(plugin) = &plugin {
            println!("note: {}", plugin.note);
        }
    }
    let clock = Clock::new();
    let mut runs: Vec<(u8, &str, f64, u64, f64)> = Vec::new();
    let mut run_no = 0u32;
    let result: Result<()> = async {
        for &qos in &spec.qos {
            for _ in 0..spec.repeat {
                for side in SIDES {
                    let (publish_to, subscribe_to) = match (side, &plugin) {
                        ("cross-node", _) => (&a.mqtt_addr, &b.mqtt_addr),
                        ("rabbitmq-mqtt", Some(plugin)) => (&plugin.addr, &plugin.addr),
                        ("rabbitmq-mqtt", None) => continue,
                        ("same-node", _) => (&a.mqtt_addr, &a.mqtt_addr),
                        _ => (&single.mqtt_addr, &single.mqtt_addr),
                    };
                    run_no += 1;
                    let tag = (pid.wrapping_mul(256).wrapping_add(run_no)) & 0xff_ffff;
                    let r = fanin(spec, clock, tag, qos, publish_to, subscribe_to).await;
                    let (rate, lost, p99) = r.with_context(|| format!("{side} qos {qos}"))?;
                    if !spec.json {
                        println!(
                            "  qos {qos} {side:<13} {rate:>10.0} msgs/s  lost {lost:>6}  p99 {p99:>8.2} ms"
                        );
                    }
                    runs.push((qos, side, rate, lost, p99));
                }
            }
        }
        Ok(())
    }
    .await;
    if !spec.json {
        // What the nodes dropped, and why (a run's `lost` is counted at the subscriber).
        for (name, gw) in [("a", &a), ("b", &b), ("single", &single)] {
            println!("mqgate {name} dropped: {}", dropped(&gw.admin_addr).await);
        }
    }
    let cpu = [("a", a.cpu_time()), ("b", b.cpu_time()), ("single", single.cpu_time())];
    for gw in [a, b, single] {
        if let Some(note) = gw.stop(Duration::from_secs(5)).await {
            eprintln!("mqgate-bench: {note}");
        }
    }
    let restored =
        plugin.map_or_else(|| "RabbitMQ's MQTT plugin not used".into(), MqttPlugin::stop);
    result?;
    let median = |qos: u8, side: &str| {
        let mut v: Vec<f64> =
            runs.iter().filter(|r| r.0 == qos && r.1 == side).map(|r| r.2).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    let mut lines = Vec::new();
    for &qos in &spec.qos {
        let (cross, plugin_rate) = (median(qos, "cross-node"), median(qos, "rabbitmq-mqtt"));
        let (same, single_rate) = (median(qos, "same-node"), median(qos, "single"));
        if spec.json {
            lines.push(format!(
                "{{\"qos\":{qos},\"cross_node\":{cross:.0},\"rabbitmq_mqtt\":{plugin_rate:.0},\"same_node\":{same:.0},\"single\":{single_rate:.0},\"cross_vs_plugin\":{:.3},\"same_vs_single\":{:.3}}}",
                ratio(cross, plugin_rate),
                ratio(same, single_rate)
            ));
        } else {
            println!(
                "qos {qos}: cross-node / rabbitmq-mqtt {:.2}x (target >= 3), same-node / single {:.2}x (target >= 0.9); medians of {}",
                ratio(cross, plugin_rate),
                ratio(same, single_rate),
                spec.repeat
            );
        }
    }
    if spec.json {
        println!("{{\"cluster\":[{}]}}", lines.join(","));
    } else {
        for (name, cpu) in cpu {
            if let Some(cpu) = cpu {
                println!("mqgate {name}: {:.2} s CPU over the whole run", cpu.as_secs_f64());
            }
        }
        println!("note: {restored}");
    }
    Ok(runs.iter().all(|r| r.3 == 0))
}

/// One fan-in run: the subscriber on `subscribe_to`, the publishers on `publish_to`. Returns
/// msgs/s (received over the time from the go to the last message), messages lost and the
/// p99 latency in ms.
async fn fanin(
    spec: &Spec<'_>,
    clock: Clock,
    tag: u32,
    qos: u8,
    publish_to: &str,
    subscribe_to: &str,
) -> Result<(f64, u64, f64)> {
    let prefix = format!("mqgate-bench/c{tag}");
    let tracker = Tracker::new(tag, spec.messages);
    let (sub_ready, sub_ready_rx) = oneshot::channel();
    let sub = mqtt::Subscription {
        addr: subscribe_to.to_owned(),
        client_id: format!("mqgate-bench-{tag}-sub"),
        filter: format!("{prefix}/#"),
        qos: 0,
        idle: spec.idle,
    };
    let consumer = tokio::spawn(mqtt::raw_subscriber(sub, tracker, clock, sub_ready));
    if sub_ready_rx.await.is_err() {
        consumer.await.context("subscriber task")??;
        bail!("the subscriber stopped before subscribing");
    }
    // The subscriber's node binds its queue just after the SUBACK.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let builder = PayloadBuilder::new(spec.payload, tag);
    let publishers = spec.publishers as usize;
    let jobs =
        PubJob::split(spec.messages, publishers, qos, usize::from(spec.window), 0, &builder, clock);
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let (ready_tx, mut ready_rx) = mpsc::channel(publishers);
    let mut set = JoinSet::new();
    for job in jobs {
        let i = job.index;
        set.spawn(mqtt::raw_publisher(
            publish_to.to_owned(),
            format!("mqgate-bench-{tag}-{i}"),
            format!("{prefix}/{i}"),
            job,
            ready_tx.clone(),
            phase_rx.clone(),
        ));
    }
    drop(ready_tx);
    for _ in 0..publishers {
        if tokio::time::timeout(Duration::from_secs(15), ready_rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            let _ = phase_tx.send(Phase::Stop);
            bail!("publishers did not connect");
        }
    }
    let start_ns = clock.now_ns();
    let _ = phase_tx.send(Phase::Go(start_ns));
    let recv = consumer.await.context("subscriber task")??;
    let _ = phase_tx.send(Phase::Stop);
    while let Some(j) = set.join_next().await {
        j.context("publisher task")??;
    }
    let secs = recv.last_ns.unwrap_or(start_ns).saturating_sub(start_ns) as f64 / 1e9;
    let rate = if secs > 0.0 { recv.received as f64 / secs } else { 0.0 };
    Ok((rate, spec.messages.saturating_sub(recv.received), recv.p99_ms))
}

/// The non-zero `mqgate_messages_dropped_total` series of the node at `admin`, by reason.
async fn dropped(admin: &str) -> String {
    let text = match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => return format!("(metrics unavailable: {e})"),
    };
    let drops: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("mqgate_messages_dropped_total{"))
        .filter_map(|l| {
            let (series, n) = l.rsplit_once(' ')?;
            let reason = series.split("reason=\"").nth(1)?.split('"').next()?;
            (n != "0").then(|| format!("{reason} {n}"))
        })
        .collect();
    if drops.is_empty() {
        "nothing".into()
    } else {
        drops.join(", ")
    }
}

/// RabbitMQ's MQTT plugin for the run: enabled on a free port unless it was enabled already.
struct MqttPlugin {
    /// Its MQTT address.
    addr: String,
    /// Whether the bench enabled it (and disables it at the end).
    enabled_here: bool,
    /// What the bench did, for the output.
    note: String,
}

fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl MqttPlugin {
    fn start() -> Result<MqttPlugin> {
        let listed = rabbitmqctl(&["rabbitmq-plugins", "list", "-e", "rabbitmq_mqtt"])?;
        // "[E*] rabbitmq_mqtt 3.10.8" (the header names the pattern too).
        let enabled = listed.lines().any(|l| l.starts_with('[') && l.contains(" rabbitmq_mqtt "));
        if enabled {
            let env = rabbitmqctl(&[
                "rabbitmqctl",
                "eval",
                "application:get_env(rabbitmq_mqtt, tcp_listeners).",
            ])?;
            let port: String = env.chars().filter(char::is_ascii_digit).collect();
            if port.is_empty() {
                bail!("rabbitmq_mqtt is enabled but its TCP port is unknown ({env})");
            }
            return Ok(MqttPlugin {
                addr: format!("127.0.0.1:{port}"),
                enabled_here: false,
                note: format!("rabbitmq_mqtt was already enabled (port {port}); used as is"),
            });
        }
        let port = free_port()?;
        // Before the plugin starts: never its default 1883 (the machine's Mosquitto has it).
        let set = format!(
            "application:set_env(rabbitmq_mqtt, tcp_listeners, [{{\"127.0.0.1\", {port}}}], [{{persistent, true}}])."
        );
        rabbitmqctl(&["rabbitmqctl", "eval", &set])?;
        rabbitmqctl(&["rabbitmq-plugins", "enable", "rabbitmq_mqtt"])?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = rabbitmqctl(&["rabbitmq-plugins", "disable", "rabbitmq_mqtt"]);
                bail!("rabbitmq_mqtt did not listen on {addr} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(MqttPlugin {
            addr,
            enabled_here: true,
            note: format!(
                "enabled RabbitMQ's rabbitmq_mqtt plugin on 127.0.0.1:{port} for this run (rabbitmq-plugins enable; disabled again at the end)"
            ),
        })
    }

    /// Disables the plugin if the bench enabled it; says what it did.
    fn stop(self) -> String {
        if !self.enabled_here {
            return "rabbitmq_mqtt left as it was (enabled before the run)".into();
        }
        let disabled = rabbitmqctl(&["rabbitmq-plugins", "disable", "rabbitmq_mqtt"]);
        let unset = rabbitmqctl(&[
            "rabbitmqctl",
            "eval",
            "application:unset_env(rabbitmq_mqtt, tcp_listeners).",
        ]);
        match (disabled, unset) {
            (Ok(_), Ok(_)) => "rabbitmq_mqtt disabled again; the broker is as it was".into(),
            (d, u) => format!(
                "could not restore the broker: disable {:?}, unset_env {:?} (run `rabbitmq-plugins disable rabbitmq_mqtt`)",
                d.err(),
                u.err()
            ),
        }
    }
}
