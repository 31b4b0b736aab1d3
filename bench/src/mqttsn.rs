//! `--mode mqttsn`: QoS 1 MQTT-SN → RabbitMQ against the same path over MQTT/TCP, through the
//! same spawned mqgate, in the same run (alternating), and the datagrams the gateway handles
//! per second of its CPU time.
//!
//! * `mqtt`: `--publishers` MQTT 3.1.1 connections, each keeping `--window` QoS 1 PUBLISHes in
//!   flight, to the rule `bench/#` → a RabbitMQ exchange;
//! * `mqttsn`: as many MQTT-SN clients over UDP (CONNECT, REGISTER `bench/<i>`), each keeping
//!   `--window` QoS 1 PUBLISHes in flight (`mqttsn.max_pending` is set to it), to the same rule.
//!   A PUBLISH not acknowledged within a second, or rejected with 0x01 (congestion), is sent
//!   again with DUP (UDP may lose it; the consumer counts each sequence once).
//!
//! Throughput is N over the time from the first send to the N-th distinct message consumed
//! from a queue bound to the exchange. After the pairs, a QoS 0 MQTT-SN run to a topic nothing
//! matches gives the gateway's datagram rate per core (datagrams received over mqgate's CPU
//! seconds, `/proc/PID/stat`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mqgate::mqttsn::codec::{self, Connect, Packet, Publish, ReturnCode, SnQos, TopicRef};
use tokio::net::UdpSocket;

use super::gateway::Gateway;
use super::kafka::connect;
use super::stats::json_str;

/// What one comparison needs.
pub struct Spec<'a> {
    pub messages: u64,
    pub payload: usize,
    pub publishers: u64,
    pub window: u16,
    pub repeat: u64,
    pub binary: &'a Path,
    pub amqp_url: &'a str,
    pub json: bool,
}

/// A PUBLISH not acknowledged within this is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(1);

/// Runs both sides `repeat` times, alternating; prints the rates and the ratio of the medians.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let exchange = format!("mqgate-bench-sn-{}", std::process::id());
    let conn = super::amqp::connect(spec.amqp_url).await?;
    super::amqp::declare_exchange(&conn, &exchange).await?;
    let sn_port = free_udp_port()?;
    let window = spec.window.max(1);
    let gw = Gateway::start_with(spec.binary, Duration::from_secs(30), |mqtt, admin| {
        format!(
            "mqtt:\n  listen: \"{mqtt}\"\n  receive_maximum: {window}\nadmin:\n  listen: \"{admin}\"\nmqttsn:\n  listen: \"127.0.0.1:{sn_port}\"\n  max_pending: {window}\n  max_datagram_size: 65535\n  client_queue: {}\namqp:\n  rabbit:\n    url: {}\nrules:\n  - name: bench\n    from: \"bench/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n",
            usize::from(window) * 2,
            json_str(spec.amqp_url),
            json_str(&exchange),
        )
    })
    .await?;
    let sn_addr = format!("127.0.0.1:{sn_port}");
    if !spec.json {
        println!(
            "mqgate-bench mqttsn: {} msgs x {} B per run; {} publishers x window {} QoS 1 -> rule bench/# -> RabbitMQ exchange; mqtt = MQTT 3.1.1 over TCP, mqttsn = MQTT-SN 1.2 over UDP; the same mqgate",
            spec.messages, spec.payload, spec.publishers, window
        );
    }
    let mut runs: Vec<(&str, f64, bool, f64)> = Vec::new();
    let result = async {
        for r in 0..spec.repeat {
            for side in ["mqtt", "mqttsn"] {
                let queue = bound_queue(&conn, &exchange).await?;
                let counter = tokio::spawn(count(conn.create_channel().await?, queue, spec.messages));
                let cpu0 = gw.cpu_time();
                let start = Instant::now();
                let sending = match side {
                    "mqtt" => through_mqtt(spec, &gw.mqtt_addr, r).await,
                    _ => through_mqttsn(spec, &sn_addr, r, SnQos::One).await.map(|_| ()),
                };
                let got = counter.await.context("consumer task")??;
                let secs = start.elapsed().as_secs_f64();
                sending.with_context(|| format!("{side} run"))?;
                let cpu = match (cpu0, gw.cpu_time()) {
                    (Some(a), Some(b)) => (b - a).as_secs_f64(),
                    _ => 0.0,
                };
                let rate = got as f64 / secs;
                let complete = got == spec.messages;
                if !spec.json {
                    println!(
                        "  {side:<7} {rate:>10.0} msgs/s  {secs:>6.2} s  received {got}  mqgate cpu {cpu:.2} s{}",
                        if complete { "" } else { "  (messages lost)" }
                    );
                }
                runs.push((side, rate, complete, cpu));
            }
        }
        // The gateway's datagram rate per core: QoS 0 to a topic nothing matches.
        let before = datagrams_received(&gw.admin_addr).await?;
        let cpu0 = gw.cpu_time();
        let start = Instant::now();
        through_mqttsn(spec, &sn_addr, 99, SnQos::Zero).await?;
        let secs = start.elapsed().as_secs_f64();
        // What is still in the socket's buffer is read within moments.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = datagrams_received(&gw.admin_addr).await?;
        let cpu = match (cpu0, gw.cpu_time()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        Ok::<_, anyhow::Error>((after.saturating_sub(before), secs, cpu))
    }
    .await;
    if let Some(note) = gw.stop(Duration::from_secs(10)).await {
        eprintln!("mqgate-bench: {note}");
    }
    let _ = super::amqp::delete_exchange(&conn, &exchange).await;
    let (datagrams, dsecs, dcpu) = result?;
    let median = |side: &str, f: fn(&(&str, f64, bool, f64)) -> f64| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r.0 == side).map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (m, s) = (median("mqtt", |r| r.1), median("mqttsn", |r| r.1));
    let ratio = if m > 0.0 { s / m } else { 0.0 };
    let per_core = if dcpu > 0.0 { datagrams as f64 / dcpu } else { 0.0 };
    let sn_cpu = median("mqttsn", |r| r.3);
    // QoS 1: a PUBLISH in and a PUBACK out per message.
    let qos1_per_core = if sn_cpu > 0.0 { 2.0 * spec.messages as f64 / sn_cpu } else { 0.0 };
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|(side, rate, complete, cpu)| {
                format!(
                    "{{\"side\":{},\"msgs_per_s\":{rate:.0},\"complete\":{complete},\"mqgate_cpu_s\":{cpu:.2}}}",
                    json_str(side)
                )
            })
            .collect();
        println!(
            "{{\"mqttsn\":{{\"runs\":[{}],\"mqtt_median\":{m:.0},\"mqttsn_median\":{s:.0},\"ratio\":{ratio:.3},\"qos0_datagrams\":{datagrams},\"qos0_secs\":{dsecs:.2},\"qos0_cpu_s\":{dcpu:.2},\"datagrams_per_core_s\":{per_core:.0},\"qos1_datagrams_per_core_s\":{qos1_per_core:.0}}}}}",
            list.join(",")
        );
    } else {
        let verdict = if ratio >= 0.9 { "meets" } else { "below" };
        println!(
            "mqttsn: mqtt {m:.0} msgs/s, mqttsn {s:.0} msgs/s, ratio {ratio:.2}x ({verdict} the 0.9x target; medians of {})",
            spec.repeat
        );
        println!(
            "mqttsn datagrams per core: QoS 0 (no route) {datagrams} datagrams in {dsecs:.2} s, mqgate cpu {dcpu:.2} s = {per_core:.0} datagrams/s per core; QoS 1 -> RabbitMQ (PUBLISH + PUBACK) {qos1_per_core:.0} datagrams/s per core"
        );
    }
    Ok(runs.iter().all(|r| r.2))
}

/// A UDP port that was free a moment ago.
fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a free UDP port")?;
    Ok(s.local_addr()?.port())
}

/// An exclusive queue bound to `exchange` with `#`.
async fn bound_queue(conn: &lapin::Connection, exchange: &str) -> Result<String> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: false, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .context("declare the run's queue")?;
    let name = q.name().as_str().to_owned();
    ch.queue_bind(
        name.as_str().into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .context("bind the run's queue")?;
    Ok(name)
}

/// Consumes until `n` distinct sequence numbers arrived, or 10 s pass without one.
async fn count(ch: lapin::Channel, queue: String, n: u64) -> Result<u64> {
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "mqgate-bench-sn".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .context("consume")?;
    let mut seen = HashSet::new();
    while (seen.len() as u64) < n {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let key =
                    d.data.get(..8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                seen.insert(key.unwrap_or(0));
            }
            _ => break,
        }
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(seen.len() as u64)
}

/// The payload of message `seq` of publisher `p` in run `r`: the key the consumer counts.
fn payload(r: u64, p: u64, seq: u64, len: usize) -> Bytes {
    let mut v = vec![b'x'; len.max(8)];
    v[..8].copy_from_slice(&((r << 56) | (p << 40) | seq).to_be_bytes());
    Bytes::from(v)
}

async fn through_mqtt(spec: &Spec<'_>, addr: &str, r: u64) -> Result<()> {
    let mut conns = Vec::new();
    for p in 0..spec.publishers {
        conns.push(connect(addr, &format!("mqgate-bench-mqtt-{r}-{p}")).await?);
    }
    let per = spec.messages / spec.publishers;
    let mut tasks = Vec::new();
    for (p, s) in conns.into_iter().enumerate() {
        let n = per + u64::from((p as u64) < spec.messages % spec.publishers);
        let (window, len) = (u64::from(spec.window.max(1)), spec.payload);
        tasks.push(tokio::spawn(publish_seq(s, format!("bench/{p}"), n, window, r, p as u64, len)));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// As `kafka::publish` (QoS 1, `window` unacknowledged), with a distinct payload per message
/// (the consumer counts keys).
async fn publish_seq(
    mut s: tokio::net::TcpStream,
    topic: String,
    n: u64,
    window: u64,
    r: u64,
    p: u64,
    len: usize,
) -> Result<()> {
    use mqgate::mqtt::codec::{self as mc, Packet as MP, ProtocolVersion, QoS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while acked < n {
        while sent < n && sent - acked < window {
            let pkt = mc::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: (sent % 65_535) as u16 + 1,
                properties: Default::default(),
                payload: payload(r, p, sent, len),
            };
            mc::encode(&MP::Publish(pkt), ProtocolVersion::V311, &mut out)?;
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await?? == 0 {
            bail!("mqgate closed the publisher's connection after {acked} PUBACKs");
        }
        while let Some(pk) = mc::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)? {
            match pk {
                MP::PubAck(_) => acked += 1,
                other => bail!("unexpected {}", other.name()),
            }
        }
    }
    Ok(())
}

async fn through_mqttsn(spec: &Spec<'_>, addr: &str, r: u64, qos: SnQos) -> Result<()> {
    let per = spec.messages / spec.publishers;
    let mut tasks = Vec::new();
    for p in 0..spec.publishers {
        let n = per + u64::from(p < spec.messages % spec.publishers);
        let addr = addr.to_owned();
        let (window, len) = (spec.window.max(1), spec.payload);
        tasks.push(tokio::spawn(
            async move { sn_publisher(&addr, r, p, n, window, len, qos).await },
        ));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn send(sock: &UdpSocket, p: &Packet, buf: &mut BytesMut) -> Result<()> {
    buf.clear();
    codec::encode(p, buf)?;
    sock.send(buf).await?;
    Ok(())
}

async fn recv(sock: &UdpSocket, buf: &mut [u8], wait: Duration) -> Result<Option<Packet>> {
    match tokio::time::timeout(wait, sock.recv(buf)).await {
        Err(_) => Ok(None),
        Ok(n) => {
            let n = n?;
            Ok(Some(codec::decode(&Bytes::copy_from_slice(&buf[..n]))?))
        }
    }
}

/// A client's UDP socket with a 4 MiB receive buffer (as the gateway's `mqttsn.recv_buffer`):
/// the kernel's default 208 KiB overflows under a window of 1,024 PUBACKs, and each lost one
/// costs the client a second before it sends again.
fn client_socket() -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(4 * 1024 * 1024);
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// One MQTT-SN client: CONNECT, REGISTER, `n` PUBLISHes with `window` in flight (QoS 1) or
/// as fast as the socket takes them (QoS 0), DISCONNECT.
async fn sn_publisher(
    addr: &str,
    r: u64,
    p: u64,
    n: u64,
    window: u16,
    len: usize,
    qos: SnQos,
) -> Result<()> {
    let sock = client_socket()?;
    sock.connect(addr).await?;
    let mut out = BytesMut::new();
    let mut buf = vec![0u8; 65_536];
    let id = format!("bsn-{r}-{p}");
    let c = Connect { will: false, clean_session: true, duration: 0, client_id: id };
    send(&sock, &Packet::Connect(c), &mut out).await?;
    match recv(&sock, &mut buf, Duration::from_secs(5)).await? {
        Some(Packet::ConnAck { code: ReturnCode::ACCEPTED }) => {}
        other => bail!("MQTT-SN CONNECT: {other:?}"),
    }
    let topic = if qos == SnQos::Zero { format!("nobody/{p}") } else { format!("bench/{p}") };
    send(&sock, &Packet::Register { topic_id: 0, msg_id: 1, topic_name: topic }, &mut out).await?;
    let topic_id = match recv(&sock, &mut buf, Duration::from_secs(5)).await? {
        Some(Packet::RegAck { topic_id, code: ReturnCode::ACCEPTED, .. }) => topic_id,
        other => bail!("MQTT-SN REGISTER: {other:?}"),
    };
    let publish_of = |seq: u64, msg_id: u16, dup: bool| Publish {
        dup,
        qos,
        retain: false,
        topic: TopicRef::Normal(topic_id),
        msg_id,
        data: payload(r, p, seq, len),
    };
    if qos == SnQos::Zero {
        for seq in 0..n {
            send(&sock, &Packet::Publish(publish_of(seq, 0, false)), &mut out).await?;
            if seq % 32 == 31 {
                // Paced (32 per millisecond per client): what overflows the gateway's socket
                // buffer is lost, and only what it received is counted.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        send(&sock, &Packet::Disconnect { duration: None }, &mut out).await?;
        return Ok(());
    }
    // msg id → (sequence, when sent)
    let mut inflight: HashMap<u16, (u64, Instant)> = HashMap::new();
    let (mut next, mut acked) = (0u64, 0u64);
    let mut next_id: u16 = 1;
    let mut last_scan = Instant::now();
    while acked < n {
        while next < n && inflight.len() < usize::from(window) {
            while inflight.contains_key(&next_id) || next_id == 0 {
                next_id = next_id.wrapping_add(1);
            }
            send(&sock, &Packet::Publish(publish_of(next, next_id, false)), &mut out).await?;
            inflight.insert(next_id, (next, Instant::now()));
            next += 1;
            next_id = next_id.wrapping_add(1);
        }
        match recv(&sock, &mut buf, Duration::from_millis(200)).await? {
            Some(Packet::PubAck { msg_id, code, .. }) => {
                if code == ReturnCode::ACCEPTED {
                    if inflight.remove(&msg_id).is_some() {
                        acked += 1;
                    }
                } else if let Some((_, at)) = inflight.get_mut(&msg_id) {
                    // Congestion: again after RESEND_AFTER.
                    *at = Instant::now();
                }
            }
            Some(other) => bail!("unexpected MQTT-SN {}", other.name()),
            None => {}
        }
        let now = Instant::now();
        if now.duration_since(last_scan) < RESEND_AFTER / 4 {
            continue;
        }
        last_scan = now;
        let due: Vec<(u16, u64)> = inflight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= RESEND_AFTER)
            .map(|(id, (seq, _))| (*id, *seq))
            .collect();
        for (msg_id, seq) in due {
            send(&sock, &Packet::Publish(publish_of(seq, msg_id, true)), &mut out).await?;
            inflight.insert(msg_id, (seq, now));
        }
    }
    send(&sock, &Packet::Disconnect { duration: None }, &mut out).await?;
    Ok(())
}

/// `mqgate_mqttsn_datagrams_received_total` from `/metrics`.
async fn datagrams_received(admin: &str) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("mqgate_mqttsn_datagrams_received_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("mqgate_mqttsn_datagrams_received_total not in /metrics")
}
