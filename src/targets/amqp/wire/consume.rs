//! The consumer side of AMQP 0-9-1, for `sources`: `queue.declare`/`queue.bind`, `basic.qos`,
//! `basic.consume`, `basic.deliver` with its content header and body frames, and
//! `basic.ack`/`basic.nack` of deliveries.
//!
//! Kept apart from `methods` (the publisher's methods) so the two sides grow independently:
//! [`take_frame`] decodes every frame a consumer sees (content frames included, which the
//! publisher's decoder skips), and methods it does not know itself it hands to
//! [`methods::decode`]. Pure like the rest of `wire`: no I/O, never panics on input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{self, BODY, HEADER, HEARTBEAT, METHOD};
use super::methods::{self, begin, Method};
use super::table::{self, put_short, Decoded, Reader};
use super::WireError;

/// Class ids.
const QUEUE: u16 = 50;
const BASIC: u16 = 60;

/// A method a consumer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerMethod {
    /// `queue.declare-ok`: the queue's name and how many messages and consumers it has.
    QueueDeclareOk {
        /// The queue.
        queue: String,
        /// Messages ready in it.
        messages: u32,
        /// Consumers on it.
        consumers: u32,
    },
    /// `queue.bind-ok`
    QueueBindOk,
    /// `basic.qos-ok`
    QosOk,
    /// `basic.consume-ok` with the consumer tag.
    ConsumeOk(String),
    /// `basic.cancel` from the broker (the queue was deleted, or a quorum queue moved).
    Cancel(String),
    /// `basic.deliver`: a message's content header and body frames follow.
    Deliver(Deliver),
    /// `basic.get-ok`: the message's delivery tag; its content header and body frames follow.
    GetOk(u64),
    /// `basic.get-empty`: the queue had no message ready.
    GetEmpty,
    /// Anything else, as the publisher's decoder sees it (close, flow, heartbeats' siblings).
    Common(Method),
}

/// The arguments of `basic.deliver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// Identifies the delivery on its channel, for ack/nack.
    pub delivery_tag: u64,
    /// The broker delivered it before (to us or another consumer) without an ack.
    pub redelivered: bool,
    /// The exchange it was published to ("" for the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
}

/// The `basic` content properties of a delivered message (each optional, as on the wire).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BasicProperties {
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `headers`.
    pub headers: Vec<(String, Decoded)>,
    /// `delivery-mode` (1 transient, 2 persistent).
    pub delivery_mode: Option<u8>,
    /// `priority`.
    pub priority: Option<u8>,
    /// `correlation-id` (bytes: AMQP calls it a short string, clients put any bytes in it).
    pub correlation_id: Option<Vec<u8>>,
    /// `reply-to`.
    pub reply_to: Option<String>,
    /// `expiration`: a per-message TTL in milliseconds, as text.
    pub expiration: Option<String>,
    /// `message-id`.
    pub message_id: Option<String>,
    /// `timestamp`, seconds since the epoch.
    pub timestamp: Option<u64>,
    /// `type`.
    pub kind: Option<String>,
    /// `user-id`.
    pub user_id: Option<String>,
    /// `app-id`.
    pub app_id: Option<String>,
}

/// One frame as a consumer sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerFrame {
    /// A method frame.
    Method {
        /// Its channel.
        channel: u16,
        /// The method.
        method: ConsumerMethod,
    },
    /// A content header: the body size and the properties.
    Header {
        /// Its channel.
        channel: u16,
        /// Bytes of body that follow in body frames.
        body_size: u64,
        /// The message properties.
        properties: Box<BasicProperties>,
    },
    /// A content body frame (a part of the body).
    Body {
        /// Its channel.
        channel: u16,
        /// The bytes.
        bytes: Bytes,
    },
    /// A heartbeat.
    Heartbeat,
}

/// Takes the first complete frame off the front of `buf`: `Ok(None)` when more bytes are
/// needed. A frame larger than `frame_max` is an error (never buffered without bound).
pub fn take_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<ConsumerFrame>, WireError> {
    let Some(frame::Envelope { kind, channel, payload, total }) = frame::envelope(buf, frame_max)?
    else {
        return Ok(None);
    };
    let frame = match kind {
        METHOD => ConsumerFrame::Method { channel, method: decode_method(payload)? },
        HEADER => {
            let (body_size, properties) = decode_header(payload)?;
            ConsumerFrame::Header { channel, body_size, properties: Box::new(properties) }
        }
        BODY => ConsumerFrame::Body { channel, bytes: Bytes::copy_from_slice(payload) },
        HEARTBEAT => ConsumerFrame::Heartbeat,
        other => return Err(WireError::BadFrameType(other)),
    };
    buf.advance(total);
    Ok(Some(frame))
}

/// Decodes a method frame's payload, consumer methods first.
pub fn decode_method(payload: &[u8]) -> Result<ConsumerMethod, WireError> {
    let mut r = Reader::new(payload);
    let class = r.u16("class id")?;
    let method = r.u16("method id")?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match (class, method) {
        (QUEUE, 11) => ConsumerMethod::QueueDeclareOk {
            queue: text(r.short("queue name")?),
            messages: r.u32("message count")?,
            consumers: r.u32("consumer count")?,
        },
        (QUEUE, 21) => ConsumerMethod::QueueBindOk,
        (BASIC, 11) => ConsumerMethod::QosOk,
        (BASIC, 21) => ConsumerMethod::ConsumeOk(text(r.short("consumer tag")?)),
        (BASIC, 30) => ConsumerMethod::Cancel(text(r.short("consumer tag")?)),
        (BASIC, 60) => {
            r.short("consumer tag")?;
            let delivery_tag = r.u64("delivery tag")?;
            let redelivered = r.u8("bits")? & 1 != 0;
            let exchange = text(r.short("exchange")?);
            let routing_key = text(r.short("routing key")?);
            ConsumerMethod::Deliver(Deliver { delivery_tag, redelivered, exchange, routing_key })
        }
        (BASIC, 71) => ConsumerMethod::GetOk(r.u64("delivery tag")?),
        (BASIC, 72) => ConsumerMethod::GetEmpty,
        _ => ConsumerMethod::Common(methods::decode(payload)?),
    })
}

/// Property flag bits of the `basic` class, in wire order (bit 0 would continue the flags).
const FLAGS: [u16; 14] = [
    1 << 15, // content-type
    1 << 14, // content-encoding
    1 << 13, // headers
    1 << 12, // delivery-mode
    1 << 11, // priority
    1 << 10, // correlation-id
    1 << 9,  // reply-to
    1 << 8,  // expiration
    1 << 7,  // message-id
    1 << 6,  // timestamp
    1 << 5,  // type
    1 << 4,  // user-id
    1 << 3,  // app-id
    1 << 2,  // reserved (cluster-id)
];

/// Decodes a content header frame's payload: body size and properties.
pub fn decode_header(payload: &[u8]) -> Result<(u64, BasicProperties), WireError> {
    let mut r = Reader::new(payload);
    r.u16("class id")?;
    r.u16("weight")?;
    let body_size = r.u64("body size")?;
    let mut flags = r.u16("property flags")?;
    let first = flags;
    // Further flag words (bit 0 set) carry no basic property; skip them.
    while flags & 1 != 0 {
        flags = r.u16("property flags")?;
    }
    let flags = first;
    let mut p = BasicProperties::default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (i, bit) in FLAGS.iter().enumerate() {
        if flags & bit == 0 {
            continue;
        }
        match i {
            0 => p.content_type = Some(text(r.short("content type")?)),
            1 => p.content_encoding = Some(text(r.short("content encoding")?)),
            2 => p.headers = table::decode_entries(r.long("headers")?)?,
            3 => p.delivery_mode = Some(r.u8("delivery mode")?),
            4 => p.priority = Some(r.u8("priority")?),
            5 => p.correlation_id = Some(r.short("correlation id")?.to_vec()),
            6 => p.reply_to = Some(text(r.short("reply to")?)),
            7 => p.expiration = Some(text(r.short("expiration")?)),
            8 => p.message_id = Some(text(r.short("message id")?)),
            9 => p.timestamp = Some(r.u64("timestamp")?),
            10 => p.kind = Some(text(r.short("type")?)),
            11 => p.user_id = Some(text(r.short("user id")?)),
            12 => p.app_id = Some(text(r.short("app id")?)),
            _ => {
                r.short("cluster id")?;
            }
        }
    }
    Ok((body_size, p))
}

/// Appends `basic.qos`: at most `prefetch` unacknowledged deliveries on the channel.
pub fn basic_qos(out: &mut BytesMut, channel: u16, prefetch: u16) {
    let f = begin(out, channel, BASIC, 10);
    out.put_u32(0); // prefetch size: no limit
    out.put_u16(prefetch);
    out.put_u8(0); // per consumer
    frame::end(out, f);
}

/// Appends `basic.consume` of `queue` with manual acks. On error nothing is appended.
pub fn basic_consume(
    out: &mut BytesMut,
    channel: u16,
    queue: &str,
    consumer_tag: &str,
) -> Result<(), WireError> {
    basic_consume_with(out, channel, queue, consumer_tag, false, false)
}

/// [`basic_consume`] with `no_ack` (the broker counts a delivery as acked once sent) and
/// `exclusive` (no other consumer on the queue: a second one gets 403 ACCESS_REFUSED).
pub fn basic_consume_with(
    out: &mut BytesMut,
    channel: u16,
    queue: &str,
    consumer_tag: &str,
    no_ack: bool,
    exclusive: bool,
) -> Result<(), WireError> {
    let start = out.len();
    let res = (|| {
        let f = begin(out, channel, BASIC, 20);
        out.put_u16(0); // reserved
        put_short(out, queue.as_bytes(), "queue name")?;
        put_short(out, consumer_tag.as_bytes(), "consumer tag")?;
        // no-local off, no-ack, exclusive, no-wait off
        out.put_u8(u8::from(no_ack) << 1 | u8::from(exclusive) << 2);
        out.put_u32(0); // no arguments
        frame::end(out, f);
        Ok(())
    })();
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// Appends `basic.get` of one message of `queue`, acknowledged by the client (`basic.ack` or
/// `basic.nack`). On error nothing is appended.
pub fn basic_get(out: &mut BytesMut, channel: u16, queue: &str) -> Result<(), WireError> {
    let start = out.len();
    let f = begin(out, channel, BASIC, 70);
    out.put_u16(0); // reserved
    if let Err(e) = put_short(out, queue.as_bytes(), "queue name") {
        out.truncate(start);
        return Err(e);
    }
    out.put_u8(0); // no-ack off
    frame::end(out, f);
    Ok(())
}

/// Appends `basic.cancel-ok` (the answer to a broker's `basic.cancel`).
pub fn basic_cancel_ok(out: &mut BytesMut, channel: u16, consumer_tag: &str) {
    let f = begin(out, channel, BASIC, 31);
    let tag = &consumer_tag.as_bytes()[..consumer_tag.len().min(255)];
    out.put_u8(tag.len() as u8);
    out.extend_from_slice(tag);
    frame::end(out, f);
}

/// Appends `basic.ack` of delivery `tag` (and every lower one with `multiple`).
pub fn basic_ack(out: &mut BytesMut, channel: u16, tag: u64, multiple: bool) {
    let f = begin(out, channel, BASIC, 80);
    out.put_u64(tag);
    out.put_u8(u8::from(multiple));
    frame::end(out, f);
}

/// Appends `basic.nack` of delivery `tag`: `requeue` puts it back in the queue, otherwise the
/// broker drops it or dead-letters it (the queue's `x-dead-letter-exchange`).
pub fn basic_nack(out: &mut BytesMut, channel: u16, tag: u64, multiple: bool, requeue: bool) {
    let f = begin(out, channel, BASIC, 120);
    out.put_u64(tag);
    out.put_u8(u8::from(multiple) | u8::from(requeue) << 1);
    frame::end(out, f);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::targets::amqp::wire::methods::{queue_bind, queue_declare, QueueFlags};
    use crate::targets::amqp::wire::table::Value;

    /// A content header as RabbitMQ would send it.
    fn header_frame(channel: u16, body: u64) -> BytesMut {
        let mut out = BytesMut::new();
        let f = frame::begin(&mut out, HEADER, channel);
        out.put_u16(BASIC);
        out.put_u16(0);
        out.put_u64(body);
        out.put_u16(FLAGS[0] | FLAGS[2] | FLAGS[3] | FLAGS[5] | FLAGS[6] | FLAGS[7] | FLAGS[9]);
        put_short(&mut out, b"application/json", "ct").expect("short");
        table::put_table(&mut out, &[("x-mqtt-qos", Value::I32(2))]).expect("table");
        out.put_u8(2);
        put_short(&mut out, b"\x00corr", "cid").expect("short");
        put_short(&mut out, b"replies.dev1", "rt").expect("short");
        put_short(&mut out, b"1500", "exp").expect("short");
        out.put_u64(1_700_000_000);
        frame::end(&mut out, f);
        out
    }

    #[test]
    fn a_delivery_decodes_method_header_and_body() {
        let mut out = BytesMut::new();
        let f = begin(&mut out, 3, BASIC, 60);
        put_short(&mut out, b"ctag", "tag").expect("short");
        out.put_u64(42);
        out.put_u8(1);
        put_short(&mut out, b"amq.topic", "x").expect("short");
        put_short(&mut out, b"a.b.c", "rk").expect("short");
        frame::end(&mut out, f);
        out.extend_from_slice(&header_frame(3, 5));
        let f = frame::begin(&mut out, BODY, 3);
        out.extend_from_slice(b"hello");
        frame::end(&mut out, f);

        let deliver = take_frame(&mut out, 4096).expect("ok").expect("frame");
        let want = Deliver {
            delivery_tag: 42,
            redelivered: true,
            exchange: "amq.topic".into(),
            routing_key: "a.b.c".into(),
        };
        assert_eq!(
            deliver,
            ConsumerFrame::Method { channel: 3, method: ConsumerMethod::Deliver(want) }
        );
        let ConsumerFrame::Header { body_size, properties, .. } =
            take_frame(&mut out, 4096).expect("ok").expect("frame")
        else {
            panic!("not a header");
        };
        assert_eq!(body_size, 5);
        assert_eq!(properties.content_type.as_deref(), Some("application/json"));
        assert_eq!(properties.headers, vec![("x-mqtt-qos".to_owned(), Decoded::Int(2))]);
        assert_eq!(properties.delivery_mode, Some(2));
        assert_eq!(properties.correlation_id.as_deref(), Some(&b"\x00corr"[..]));
        assert_eq!(properties.reply_to.as_deref(), Some("replies.dev1"));
        assert_eq!(properties.expiration.as_deref(), Some("1500"));
        assert_eq!(properties.timestamp, Some(1_700_000_000));
        assert_eq!(
            take_frame(&mut out, 4096).expect("ok"),
            Some(ConsumerFrame::Body { channel: 3, bytes: Bytes::from_static(b"hello") })
        );
        assert!(out.is_empty());
        assert_eq!(take_frame(&mut out, 4096), Ok(None));
    }

    #[test]
    fn encoders_write_what_the_decoder_reads_and_refuse_long_names() {
        let mut out = BytesMut::new();
        basic_ack(&mut out, 1, 7, true);
        let m = take_frame(&mut out, 4096).expect("ok").expect("frame");
        let ack = Method::BasicAck { tag: 7, multiple: true };
        assert_eq!(m, ConsumerFrame::Method { channel: 1, method: ConsumerMethod::Common(ack) });
        basic_nack(&mut out, 1, 9, false, true);
        assert_eq!(&out[11..20], &[0, 0, 0, 0, 0, 0, 0, 9, 0b10]);

        let long = "q".repeat(256);
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(queue_declare(&mut out, 1, &long, QueueFlags::default(), &[]).is_err());
        assert!(queue_bind(&mut out, 1, "q", &long, "rk").is_err());
        assert!(basic_consume(&mut out, 1, &long, "t").is_err());
        assert_eq!(&out[..], b"keep");
        let args = [("x-queue-type", Value::LongString(b"quorum"))];
        let flags = QueueFlags { durable: true, ..QueueFlags::default() };
        queue_declare(&mut out, 1, "q", flags, &args).expect("declare");
        basic_qos(&mut out, 1, 10);
        basic_consume(&mut out, 1, "q", "t").expect("consume");
        assert!(out.len() > 4);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = take_frame(&mut buf, 131_072);
            let _ = decode_header(&bytes);
            let _ = decode_method(&bytes);
        }

        #[test]
        fn garbage_frames_never_panic(kind in prop_oneof![Just(1u8), Just(2), Just(3)],
                                      rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = BytesMut::new();
            let f = frame::begin(&mut out, kind, 1);
            out.extend_from_slice(&rest);
            frame::end(&mut out, f);
            let _ = take_frame(&mut out, 131_072);
        }
    }
}
