//! MQTT clients of the bench: a lean hand-written MQTT 3.1.1 publisher and
//! subscriber over a tokio `TcpStream` (CONNECT, PUBLISH at QoS 0/1,
//! PUBACK, SUBSCRIBE, DISCONNECT; nothing else), and a rumqttc publisher for
//! comparison.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::dial::{self, Rd, Wr};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::time::timeout;

use super::load::{self, Phase, PubJob, CONNECT_TIMEOUT, STALL_TIMEOUT};
use super::payload::Clock;
use super::stats::{PubStats, RecvStats, Tracker};

const KEEP_ALIVE_SECS: u16 = 60;
/// Buffered PUBLISH bytes are written once they reach this size.
const WRITE_CHUNK: usize = 32 * 1024;
/// Largest packet the bench accepts from a server.
const MAX_PACKET: usize = 1 << 20;

// Packet types (upper nibble of the fixed header).
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBACK: u8 = 9;
const PINGRESP: u8 = 13;

/// Appends an MQTT "remaining length" varint.
fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn encode_connect(client_id: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.push(4); // protocol level: 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&KEEP_ALIVE_SECS.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    let mut out = vec![0x10];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn encode_subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + filter.len());
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, filter.as_bytes());
    body.push(qos);
    let mut out = vec![0x82];
    put_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn encode_puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Splits the next whole packet off `buf`: (first header byte, body).
fn next_packet(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            bail!("malformed remaining length");
        }
    }
    if len > MAX_PACKET {
        bail!("packet of {len} bytes is larger than {MAX_PACKET}");
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let mut packet = buf.split_to(i + len).freeze();
    let header = packet[0];
    packet.advance(i);
    Ok(Some((header, packet)))
}

/// Reads more bytes into `buf`; errors on EOF.
async fn fill(rd: &mut Rd, buf: &mut BytesMut) -> Result<()> {
    buf.reserve(64 * 1024);
    if rd.read_buf(buf).await.context("read from MQTT server")? == 0 {
        bail!("MQTT server closed the connection");
    }
    Ok(())
}

/// Reads one whole packet.
async fn read_packet(rd: &mut Rd, buf: &mut BytesMut) -> Result<(u8, Bytes)> {
    loop {
        if let Some(p) = next_packet(buf)? {
            return Ok(p);
        }
        fill(rd, buf).await?;
    }
}

/// Connects and completes the CONNECT/CONNACK handshake.
async fn connect(addr: &str, client_id: &str) -> Result<(Rd, Wr, BytesMut)> {
    let (mut rd, mut wr) = timeout(CONNECT_TIMEOUT, dial::open(addr))
        .await
        .map_err(|_| anyhow!("connecting to MQTT {addr} timed out"))??;
    wr.write_all(&encode_connect(client_id)).await.context("send CONNECT")?;
    wr.flush().await.context("send CONNECT")?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (header, body) = timeout(CONNECT_TIMEOUT, read_packet(&mut rd, &mut buf))
        .await
        .map_err(|_| anyhow!("no CONNACK from {addr} within {CONNECT_TIMEOUT:?}"))??;
    if header >> 4 != CONNACK || body.len() < 2 {
        bail!("expected CONNACK from {addr}, got packet type {}", header >> 4);
    }
    if body[1] != 0 {
        bail!("{addr} refused the connection: CONNACK return code {}", body[1]);
    }
    Ok((rd, wr, buf))
}

/// Packet ids currently waiting for their PUBACK.
struct InFlight {
    ids: Vec<AtomicBool>,
}

impl InFlight {
    fn new() -> Self {
        InFlight { ids: (0..=u16::MAX as usize).map(|_| AtomicBool::new(false)).collect() }
    }

    /// Takes the next free packet id after `last`.
    fn take_after(&self, last: u16) -> Result<u16> {
        let mut id = last;
        for _ in 0..u16::MAX {
            id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.ids[usize::from(id)].swap(true, Ordering::AcqRel) {
                return Ok(id);
            }
        }
        bail!("all 65535 packet ids are in flight")
    }

    /// Releases `id`; false if it was not in flight.
    fn release(&self, id: u16) -> bool {
        self.ids[usize::from(id)].swap(false, Ordering::AcqRel)
    }
}

/// What the PUBACK reader of a publisher counted.
struct AckCounts {
    acked: AtomicU64,
    unexpected: AtomicU64,
    progress: Notify,
}

/// Reads PUBACKs, frees their window slots, until `expected` arrived or the
/// connection ends.
async fn read_acks(
    mut rd: Rd,
    mut buf: BytesMut,
    inflight: Arc<InFlight>,
    window: Arc<Semaphore>,
    counts: Arc<AckCounts>,
    expected: u64,
) -> Result<()> {
    while counts.acked.load(Ordering::Acquire) < expected || expected == 0 {
        let (header, body) = read_packet(&mut rd, &mut buf).await?;
        match header >> 4 {
            PUBACK if body.len() >= 2 => {
                let id = u16::from_be_bytes([body[0], body[1]]);
                if inflight.release(id) {
                    counts.acked.fetch_add(1, Ordering::AcqRel);
                    window.add_permits(1);
                } else {
                    counts.unexpected.fetch_add(1, Ordering::AcqRel);
                }
                counts.progress.notify_one();
            }
            PINGRESP => {}
            _ => {
                counts.unexpected.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    Ok(())
}

/// Takes window slots for the next sends: all that are free, or, when none
/// is, flushes `out` and waits until a batch of them is (so a full window
/// does not turn into one write per PUBACK). Returns 0 if the window was
/// closed because the PUBACK reader stopped.
async fn take_credits(
    window: &Semaphore,
    wr: &mut Wr,
    out: &mut Vec<u8>,
    remaining: u64,
    counts: &AckCounts,
    job: &PubJob,
) -> Result<usize> {
    let remaining = usize::try_from(remaining).unwrap_or(usize::MAX);
    let free = window.available_permits().min(remaining);
    if free > 0 {
        if let Ok(p) = window.try_acquire_many(free as u32) {
            p.forget();
            return Ok(free);
        }
    }
    wr.write_all(out).await.context("send PUBLISH")?;
    wr.flush().await.context("send PUBLISH")?;
    out.clear();
    let want = (job.window / 16).clamp(1, remaining.max(1));
    match timeout(STALL_TIMEOUT, window.acquire_many(want as u32)).await {
        Ok(Ok(p)) => {
            p.forget();
            Ok(want)
        }
        Ok(Err(_)) => Ok(0),
        Err(_) => Err(anyhow!(
            "no PUBACK for {STALL_TIMEOUT:?} ({} of {} acked)",
            counts.acked.load(Ordering::Acquire),
            job.count
        )),
    }
}

/// Why the PUBACK reader of a publisher stopped early.
async fn reader_failure(reader: &mut tokio::task::JoinHandle<Result<()>>) -> anyhow::Error {
    match reader.await {
        Ok(Err(e)) => e.context("reading PUBACKs"),
        Ok(Ok(())) => anyhow!("PUBACK reader stopped"),
        Err(e) => anyhow!("PUBACK reader failed: {e}"),
    }
}

/// A lean MQTT 3.1.1 publisher: sends `job.count` messages to `topic`;
/// at QoS 1 keeps at most `job.window` PUBLISHes unacknowledged.
pub async fn raw_publisher(
    addr: String,
    client_id: String,
    topic: String,
    job: PubJob,
    ready: tokio::sync::mpsc::Sender<()>,
    phase: watch::Receiver<Phase>,
) -> Result<PubStats> {
    raw_publisher_topics(addr, client_id, vec![topic], job, ready, phase).await
}

/// [`raw_publisher`] over several topics: message `k` goes to `topics[k % len]` (the HTTP
/// bench spreads a publisher's messages over the target's per-topic lanes).
pub async fn raw_publisher_topics(
    addr: String,
    client_id: String,
    topics: Vec<String>,
    job: PubJob,
    ready: tokio::sync::mpsc::Sender<()>,
    mut phase: watch::Receiver<Phase>,
) -> Result<PubStats> {
    if topics.is_empty() {
        bail!("no topic to publish to");
    }
    let (rd, mut wr, buf) = connect(&addr, &client_id).await?;
    let qos1 = job.qos == 1;
    let inflight = Arc::new(InFlight::new());
    let window = Arc::new(Semaphore::new(job.window));
    let counts = Arc::new(AckCounts {
        acked: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        progress: Notify::new(),
    });
    let expected = if qos1 { job.count } else { 0 };
    let mut reader = {
        let (inflight, window, counts) = (inflight.clone(), window.clone(), counts.clone());
        tokio::spawn(async move {
            let r = read_acks(rd, buf, inflight, window.clone(), counts.clone(), expected).await;
            // Wake a sender blocked on the window or on the last acks.
            window.close();
            counts.progress.notify_one();
            r
        })
    };
    let _ = ready.send(()).await;
    let start_ns = load::wait_go(&mut phase).await?;

    let header = 0x30 | (job.qos << 1);
    let longest = topics.iter().map(String::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(WRITE_CHUNK + 2 + longest + 2 + job.payload.len() + 8);
    let mut packet_id = 0u16;
    let mut credits = 0usize;
    let mut stats = PubStats::default();
    for k in 0..job.count {
        let seq = job.seq(k);
        if job.rate > 0 {
            job.pace(seq, start_ns).await;
        }
        if qos1 {
            if credits == 0 {
                credits =
                    take_credits(&window, &mut wr, &mut out, job.count - k, &counts, &job).await?;
                if credits == 0 {
                    return Err(reader_failure(&mut reader).await);
                }
            }
            credits -= 1;
            packet_id = inflight.take_after(packet_id)?;
        }
        let topic = topics[(k % topics.len() as u64) as usize].as_bytes();
        let body_len = 2 + topic.len() + if qos1 { 2 } else { 0 } + job.payload.len();
        out.push(header);
        put_len(&mut out, body_len);
        put_str(&mut out, topic);
        if qos1 {
            out.extend_from_slice(&packet_id.to_be_bytes());
        }
        job.payload.write(&mut out, seq, job.clock.now_ns());
        stats.sent += 1;
        if job.rate > 0 || out.len() >= WRITE_CHUNK {
            wr.write_all(&out).await.context("send PUBLISH")?;
            wr.flush().await.context("send PUBLISH")?;
            out.clear();
        }
    }
    wr.write_all(&out).await.context("send PUBLISH")?;
    wr.flush().await.context("send PUBLISH")?;

    if qos1 {
        // Wait for the last PUBACKs, giving up after a stall.
        loop {
            let notified = counts.progress.notified();
            if counts.acked.load(Ordering::Acquire) >= job.count || reader.is_finished() {
                break;
            }
            if timeout(STALL_TIMEOUT, notified).await.is_err() {
                break;
            }
        }
    }
    stats.done_ns = job.clock.now_ns();
    if qos1 && counts.acked.load(Ordering::Acquire) < job.count && reader.is_finished() {
        return Err(reader_failure(&mut reader).await);
    }
    load::wait_stop(&mut phase).await;
    let _ = wr.write_all(&DISCONNECT).await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    reader.abort();
    stats.acked = counts.acked.load(Ordering::Acquire);
    stats.errors = counts.unexpected.load(Ordering::Acquire);
    Ok(stats)
}

/// What an MQTT subscriber subscribes to.
pub struct Subscription {
    pub addr: String,
    pub client_id: String,
    pub filter: String,
    pub qos: u8,
    /// Stop after this long without a message.
    pub idle: Duration,
}

/// A lean MQTT 3.1.1 subscriber: subscribes to `sub.filter` and feeds every
/// PUBLISH to the tracker, until all arrived or `sub.idle` passes without
/// one.
pub async fn raw_subscriber(
    sub: Subscription,
    mut tracker: Tracker,
    clock: Clock,
    ready: oneshot::Sender<()>,
) -> Result<RecvStats> {
    let Subscription { addr, client_id, filter, qos, idle } = sub;
    let (mut rd, mut wr, mut buf) = connect(&addr, &client_id).await?;
    wr.write_all(&encode_subscribe(1, &filter, qos)).await.context("send SUBSCRIBE")?;
    wr.flush().await.context("send SUBSCRIBE")?;
    let (header, body) = timeout(CONNECT_TIMEOUT, read_packet(&mut rd, &mut buf))
        .await
        .map_err(|_| anyhow!("no SUBACK within {CONNECT_TIMEOUT:?}"))??;
    if header >> 4 != SUBACK || body.len() < 3 {
        bail!("expected SUBACK, got packet type {}", header >> 4);
    }
    if body[2] == 0x80 {
        bail!("subscription to {filter} refused");
    }
    let _ = ready.send(());

    let mut acks = Vec::with_capacity(4096);
    let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
    let mut last = clock.now_ns();
    loop {
        // Take every whole packet already read, then read more.
        while let Some((header, mut body)) = next_packet(&mut buf)? {
            if header >> 4 != PUBLISH {
                continue;
            }
            let pqos = (header >> 1) & 0x03;
            let topic_len = match body.get(0..2) {
                Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
                None => bail!("short PUBLISH"),
            };
            let id_len = if pqos > 0 { 2 } else { 0 };
            if body.len() < 2 + topic_len + id_len {
                bail!("short PUBLISH");
            }
            body.advance(2 + topic_len);
            if pqos > 0 {
                let id = body.get_u16();
                encode_puback(&mut acks, id);
            }
            last = clock.now_ns();
            tracker.record(&body, last);
        }
        if !acks.is_empty() {
            wr.write_all(&acks).await.context("send PUBACK")?;
            wr.flush().await.context("send PUBACK")?;
            acks.clear();
        }
        if tracker.complete() {
            break;
        }
        let idle_left = last.saturating_add(idle_ns).saturating_sub(clock.now_ns());
        if idle_left == 0 {
            break;
        }
        if let Ok(r) = timeout(Duration::from_nanos(idle_left), fill(&mut rd, &mut buf)).await {
            r?;
        }
    }
    let _ = wr.write_all(&DISCONNECT).await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    Ok(tracker.finish())
}

/// The same publisher on rumqttc's `AsyncClient`, to compare client cost.
pub async fn rumqttc_publisher(
    addr: String,
    client_id: String,
    topic: String,
    job: PubJob,
    ready: tokio::sync::mpsc::Sender<()>,
    mut phase: watch::Receiver<Phase>,
) -> Result<PubStats> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("bad MQTT address {addr}"))?;
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(u64::from(KEEP_ALIVE_SECS)));
    opts.set_clean_session(true);
    opts.set_inflight(u16::try_from(job.window).unwrap_or(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(opts, job.window.max(64));
    timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) =
                eventloop.poll().await.context("rumqttc connect")?
            {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no CONNACK from {addr} within {CONNECT_TIMEOUT:?}"))??;

    let counts = Arc::new(AckCounts {
        acked: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        progress: Notify::new(),
    });
    let driver_counts = counts.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    driver_counts.acked.fetch_add(1, Ordering::AcqRel);
                    driver_counts.progress.notify_one();
                }
                Ok(_) => {}
                Err(e) => {
                    driver_counts.progress.notify_one();
                    return e;
                }
            }
        }
    });
    let _ = ready.send(()).await;
    let start_ns = load::wait_go(&mut phase).await?;

    let qos = if job.qos == 1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    let mut stats = PubStats::default();
    for k in 0..job.count {
        let seq = job.seq(k);
        if job.rate > 0 {
            job.pace(seq, start_ns).await;
        }
        let body = job.payload.build(seq, job.clock.now_ns());
        client.publish(topic.as_str(), qos, false, body).await.context("rumqttc publish")?;
        stats.sent += 1;
    }
    if job.qos == 1 {
        loop {
            let notified = counts.progress.notified();
            if counts.acked.load(Ordering::Acquire) >= job.count || driver.is_finished() {
                break;
            }
            if timeout(STALL_TIMEOUT, notified).await.is_err() {
                break;
            }
        }
    }
    stats.done_ns = job.clock.now_ns();
    load::wait_stop(&mut phase).await;
    let _ = timeout(Duration::from_secs(1), client.disconnect()).await;
    let _ = timeout(Duration::from_secs(1), driver).await;
    stats.acked = counts.acked.load(Ordering::Acquire);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_round_trips() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut out = vec![0x30];
            put_len(&mut out, len);
            let mut buf = BytesMut::from(&out[..]);
            // The body is missing, so no packet yet, but the header parses.
            if len == 0 {
                assert!(next_packet(&mut buf).unwrap().is_some());
            } else if len <= MAX_PACKET {
                assert!(next_packet(&mut buf).unwrap().is_none());
            } else {
                assert!(next_packet(&mut buf).is_err());
            }
        }
    }

    #[test]
    fn splits_packets() {
        let mut out = Vec::new();
        encode_puback(&mut out, 7);
        encode_puback(&mut out, 8);
        out.push(0x40);
        let mut buf = BytesMut::from(&out[..]);
        let (h, b) = next_packet(&mut buf).unwrap().unwrap();
        assert_eq!((h, &b[..]), (0x40, &[0u8, 7][..]));
        let (_, b) = next_packet(&mut buf).unwrap().unwrap();
        assert_eq!(&b[..], &[0u8, 8]);
        assert!(next_packet(&mut buf).unwrap().is_none());
    }

    #[test]
    fn packet_ids_skip_those_in_flight() {
        let f = InFlight::new();
        assert_eq!(f.take_after(0).unwrap(), 1);
        assert_eq!(f.take_after(0).unwrap(), 2);
        assert!(f.release(1));
        assert!(!f.release(1));
        assert_eq!(f.take_after(u16::MAX).unwrap(), 1);
    }
}
