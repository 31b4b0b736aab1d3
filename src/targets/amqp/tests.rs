//! The sink against a scripted fake broker: confirm bookkeeping the real RabbitMQ rarely
//! exercises (single acks out of order, nacks, `multiple`), `connection.blocked`, and a
//! `connection.close` from the broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::wire::frame::{self, Frame, METHOD};
use super::wire::methods::Method;
use super::{AmqpBroker, PublishRequest};
use crate::config::AmqpBrokerConfig;
use crate::message::Message;
use crate::metrics::{Metrics, TargetMetrics};
use crate::mqtt::codec::{PublishProperties, QoS};
use crate::targets::{Failure, Outcome};

/// The broker side of one connection.
struct Fake {
    /// The accepted connection.
    stream: TcpStream,
    /// Bytes read, not yet decoded.
    buf: BytesMut,
}

impl Fake {
    /// The next frame from the client.
    async fn frame(&mut self) -> Frame {
        loop {
            if let Some((f, used)) = frame::decode(&self.buf, 131_072).expect("client frame") {
                let _ = self.buf.split_to(used);
                return f;
            }
            assert!(self.stream.read_buf(&mut self.buf).await.expect("read") > 0, "client left");
        }
    }

    /// The next method from the client as (channel, class, method).
    async fn method(&mut self) -> (u16, u16, u16) {
        loop {
            if let Frame::Method { channel, method } = self.frame().await {
                // The decoder knows these as broker methods; the ids are what the test checks.
                return match method {
                    Method::Other { class, method } => (channel, class, method),
                    Method::ConnectionClose(_) => (channel, 10, 50),
                    Method::ConnectionCloseOk => (channel, 10, 51),
                    other => panic!("unexpected {other:?}"),
                };
            }
        }
    }

    /// Sends a method frame with `args`.
    async fn send(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) {
        let mut out = BytesMut::new();
        let start = frame::begin(&mut out, METHOD, channel);
        out.put_u16(class);
        out.put_u16(method);
        out.extend_from_slice(args);
        frame::end(&mut out, start);
        self.stream.write_all(&out).await.expect("write");
    }

    /// Accepts a client and runs the handshake for 1 confirm + 1 plain channel.
    async fn accept(listener: &TcpListener) -> Fake {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut f = Fake { stream, buf: BytesMut::new() };
        let mut header = [0u8; 8];
        f.stream.read_exact(&mut header).await.expect("protocol header");
        assert_eq!(&header, frame::PROTOCOL_HEADER);
        let mut start = vec![0, 9, 0, 0, 0, 0];
        start.extend_from_slice(&[0, 0, 0, 5]);
        start.extend_from_slice(b"PLAIN");
        start.extend_from_slice(&[0, 0, 0, 5]);
        start.extend_from_slice(b"en_US");
        f.send(0, 10, 10, &start).await;
        assert_eq!(f.method().await, (0, 10, 11)); // start-ok
        f.send(0, 10, 30, &[0, 10, 0, 0, 0x10, 0, 0, 0]).await; // tune: 10 channels, 4096, no hb
        assert_eq!(f.method().await, (0, 10, 31));
        assert_eq!(f.method().await, (0, 10, 40));
        f.send(0, 10, 41, &[0]).await;
        for ch in 1..=2 {
            assert_eq!(f.method().await, (ch, 20, 10));
            f.send(ch, 20, 11, &[0, 0, 0, 0]).await;
        }
        assert_eq!(f.method().await, (1, 85, 10));
        f.send(1, 85, 11, &[]).await;
        f
    }

    /// Waits for one `basic.publish` (and its content frames) on `channel`.
    async fn publish(&mut self, channel: u16) {
        assert_eq!(self.method().await, (channel, 60, 40));
        assert!(matches!(self.frame().await, Frame::Content { channel: c, .. } if c == channel));
        assert!(matches!(self.frame().await, Frame::Content { channel: c, .. } if c == channel));
    }

    /// Sends `basic.ack` (60, 80) or `basic.nack` (60, 120).
    async fn confirm(&mut self, method: u16, tag: u64, multiple: bool) {
        let mut args = tag.to_be_bytes().to_vec();
        args.push(u8::from(multiple));
        self.send(1, 60, method, &args).await;
    }
}

fn request(ack: Option<oneshot::Sender<Outcome>>, target: &TargetMetrics) -> PublishRequest {
    PublishRequest {
        exchange: Arc::from(""),
        routing_key: "q".to_owned(),
        msg: Arc::new(Message {
            charge: Default::default(),
            topic: "t".to_owned(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("c"),
            username: None,
            properties: PublishProperties::none(),
            received: Instant::now(),
            packet_id: None,
        }),
        ack,
        metrics: target.clone(),
        options: Default::default(),
        dead_letter: None,
    }
}

async fn outcome(rx: oneshot::Receiver<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("an outcome within 5 s")
        .expect("an outcome, not a dropped sender")
}

#[tokio::test]
async fn confirms_in_any_order_nacks_blocking_and_a_broker_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let yaml = format!(
        "url: \"amqp://u:p@{addr}/%2f\"\nchannels: 1\nconnect_timeout: 2s\n\
         reconnect_min: 50ms\nreconnect_max: 50ms\n"
    );
    let cfg: AmqpBrokerConfig = serde_saphyr::from_str(&yaml).expect("config");
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (broker, task) = AmqpBroker::spawn("fake", &cfg, &metrics, shutdown.clone());
    let mut fake = Fake::accept(&listener).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !broker.is_connected() {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let target = TargetMetrics::default();
    let bm = metrics.broker("fake");

    // Tags 1..=4; confirms: 3 alone, 1 nacked alone, then everything up to 4 at once.
    let mut rxs = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = oneshot::channel();
        broker.publish(request(Some(tx), &target)).await;
        fake.publish(1).await;
        rxs.push(rx);
    }
    assert_eq!(bm.unconfirmed.get(), 4);
    fake.confirm(80, 3, false).await;
    fake.confirm(120, 1, false).await;
    fake.confirm(80, 4, true).await;
    let outcomes: Vec<Outcome> =
        futures::future::join_all(rxs.into_iter().map(outcome)).await.into_iter().collect();
    assert_eq!(outcomes[0], Outcome::Failed(Failure::fatal("nacked by broker")));
    assert_eq!(&outcomes[1..], &[Outcome::Delivered, Outcome::Delivered, Outcome::Delivered]);
    assert_eq!((target.forwarded.get(), target.failed.get(), bm.nacks.get()), (3, 1, 1));
    assert_eq!(bm.unconfirmed.get(), 0);

    // Blocked: nothing is written until the broker unblocks.
    fake.send(0, 10, 60, b"\x03mem").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (tx, rx) = oneshot::channel();
    broker.publish(request(Some(tx), &target)).await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), fake.stream.peek(&mut byte)).await;
    assert!(early.is_err(), "a publish was written while blocked");
    fake.send(0, 10, 61, &[]).await;
    fake.publish(1).await;

    // The broker closes the connection: the unconfirmed publish fails, retryable, once.
    fake.send(0, 10, 50, b"\x01\x40\x0aCONNECTION\x00\x00\x00\x00").await;
    assert_eq!(fake.method().await, (0, 10, 51)); // close-ok
    match outcome(rx).await {
        Outcome::Failed(f) => assert!(f.retryable && f.reason.contains("lost"), "{f:?}"),
        o => panic!("expected a failure, got {o:?}"),
    }
    assert_eq!(bm.unconfirmed.get(), 0);

    // It reconnects; shutdown closes the connection cleanly.
    let mut fake = Fake::accept(&listener).await;
    while bm.connects.get() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    assert_eq!(fake.method().await, (0, 10, 50)); // connection.close
    fake.send(0, 10, 51, &[]).await;
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("ends").expect("no panic");
}
