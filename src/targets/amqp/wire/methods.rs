//! The AMQP 0-9-1 methods a confirm-mode publisher sends and receives, and `basic.publish`
//! with its content header and body frames.
//!
//! Encoders append whole frames to a write buffer; [`decode`] turns a method frame's payload
//! into a [`Method`] (methods we have no use for become [`Method::Other`]).

use bytes::{BufMut, BytesMut};

use super::frame::{self, BODY, HEADER, METHOD, OVERHEAD};
use super::table::{self, put_long, put_short, Decoded, Reader, Value};
use super::WireError;

/// Class ids.
const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const EXCHANGE: u16 = 40;
const QUEUE: u16 = 50;
const BASIC: u16 = 60;
const CONFIRM: u16 = 85;

/// Reply code of a 404 NOT_FOUND channel close.
pub const NOT_FOUND: u16 = 404;
/// Reply code of a normal close.
pub const REPLY_SUCCESS: u16 = 200;
/// Reply code of a `basic.return` for a mandatory message no queue took.
pub const NO_ROUTE: u16 = 312;

/// A `basic.return`: a mandatory message RabbitMQ could not route (its content follows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Return {
    /// 312 NO_ROUTE for an unroutable mandatory message.
    pub code: u16,
    /// The reply text ("NO_ROUTE").
    pub text: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
}

/// A `connection.close` or `channel.close`: who closed what, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The reply code (404, 320, 541…).
    pub code: u16,
    /// The reply text.
    pub text: String,
    /// Class of the method that caused it (0 if none).
    pub class: u16,
    /// Method that caused it (0 if none).
    pub method: u16,
}

/// A method we received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `connection.start`: the broker's SASL mechanisms (space separated).
    ConnectionStart {
        /// Protocol major version (0).
        major: u8,
        /// Protocol minor version (9).
        minor: u8,
        /// e.g. "PLAIN AMQPLAIN".
        mechanisms: String,
        /// "RabbitMQ 3.13.7", from the server properties (empty if they do not say).
        server: String,
    },
    /// `connection.secure` (a SASL challenge; PLAIN never gets one).
    ConnectionSecure,
    /// `connection.tune`: the broker's limits (0 = none).
    ConnectionTune {
        /// Highest channel number.
        channel_max: u16,
        /// Largest frame, envelope included.
        frame_max: u32,
        /// Heartbeat interval in seconds.
        heartbeat: u16,
    },
    /// `connection.open-ok`
    ConnectionOpenOk,
    /// `connection.close`
    ConnectionClose(Close),
    /// `connection.close-ok`
    ConnectionCloseOk,
    /// `connection.blocked` with its reason.
    ConnectionBlocked(String),
    /// `connection.unblocked`
    ConnectionUnblocked,
    /// `channel.open-ok`
    ChannelOpenOk,
    /// `channel.flow` (active?)
    ChannelFlow(bool),
    /// `channel.close`
    ChannelClose(Close),
    /// `channel.close-ok`
    ChannelCloseOk,
    /// `exchange.declare-ok`
    ExchangeDeclareOk,
    /// `confirm.select-ok`
    ConfirmSelectOk,
    /// `basic.ack` from the broker (a confirm).
    BasicAck {
        /// The delivery tag confirmed.
        tag: u64,
        /// Also every lower tag.
        multiple: bool,
    },
    /// `basic.nack` from the broker.
    BasicNack {
        /// The delivery tag refused.
        tag: u64,
        /// Also every lower tag.
        multiple: bool,
    },
    /// `basic.return` (its content frames follow).
    BasicReturn(Return),
    /// `queue.declare-ok`
    QueueDeclareOk {
        /// The queue's name.
        queue: String,
        /// Messages in it.
        messages: u32,
        /// Its consumers.
        consumers: u32,
    },
    /// `queue.bind-ok`
    QueueBindOk,
    /// `queue.purge-ok` with the number of messages purged.
    QueuePurgeOk(u32),
    /// Anything else.
    Other {
        /// Class id.
        class: u16,
        /// Method id.
        method: u16,
    },
}

/// Decodes a method frame's payload.
pub fn decode(payload: &[u8]) -> Result<Method, WireError> {
    let mut r = Reader::new(payload);
    let class = r.u16("class id")?;
    let method = r.u16("method id")?;
    Ok(match (class, method) {
        (CONNECTION, 10) => {
            let major = r.u8("version")?;
            let minor = r.u8("version")?;
            let server = server_name(r.long("server properties")?);
            let mechanisms = String::from_utf8_lossy(r.long("mechanisms")?).into_owned();
            r.long("locales")?;
            Method::ConnectionStart { major, minor, mechanisms, server }
        }
        (CONNECTION, 20) => Method::ConnectionSecure,
        (CONNECTION, 30) => Method::ConnectionTune {
            channel_max: r.u16("channel_max")?,
            frame_max: r.u32("frame_max")?,
            heartbeat: r.u16("heartbeat")?,
        },
        (CONNECTION, 41) => Method::ConnectionOpenOk,
        (CONNECTION, 50) => Method::ConnectionClose(close(&mut r)?),
        (CONNECTION, 51) => Method::ConnectionCloseOk,
        (CONNECTION, 60) => {
            Method::ConnectionBlocked(String::from_utf8_lossy(r.short("reason")?).into_owned())
        }
        (CONNECTION, 61) => Method::ConnectionUnblocked,
        (CHANNEL, 11) => Method::ChannelOpenOk,
        (CHANNEL, 20) => Method::ChannelFlow(r.u8("active")? & 1 != 0),
        (CHANNEL, 40) => Method::ChannelClose(close(&mut r)?),
        (CHANNEL, 41) => Method::ChannelCloseOk,
        (EXCHANGE, 11) => Method::ExchangeDeclareOk,
        (CONFIRM, 11) => Method::ConfirmSelectOk,
        (BASIC, 80) => {
            Method::BasicAck { tag: r.u64("delivery tag")?, multiple: r.u8("bits")? & 1 != 0 }
        }
        (BASIC, 120) => {
            Method::BasicNack { tag: r.u64("delivery tag")?, multiple: r.u8("bits")? & 1 != 0 }
        }
        (BASIC, 50) => Method::BasicReturn(Return {
            code: r.u16("reply code")?,
            text: String::from_utf8_lossy(r.short("reply text")?).into_owned(),
            exchange: String::from_utf8_lossy(r.short("exchange")?).into_owned(),
            routing_key: String::from_utf8_lossy(r.short("routing key")?).into_owned(),
        }),
        (QUEUE, 11) => Method::QueueDeclareOk {
            queue: String::from_utf8_lossy(r.short("queue")?).into_owned(),
            messages: r.u32("message count")?,
            consumers: r.u32("consumer count")?,
        },
        (QUEUE, 21) => Method::QueueBindOk,
        (QUEUE, 31) => Method::QueuePurgeOk(r.u32("message count")?),
        (class, method) => Method::Other { class, method },
    })
}

/// "product version" from `connection.start`'s server properties; empty when they cannot be
/// read (they are informative only, so a table we cannot read is no error).
fn server_name(properties: &[u8]) -> String {
    let Ok(entries) = table::decode_entries(properties) else { return String::new() };
    let field = |name: &str| {
        entries.iter().find_map(|(k, v)| match v {
            Decoded::Bytes(b) if k == name => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
    };
    let parts: Vec<String> = [field("product"), field("version")].into_iter().flatten().collect();
    parts.join(" ")
}

/// The arguments of a close method.
fn close(r: &mut Reader<'_>) -> Result<Close, WireError> {
    Ok(Close {
        code: r.u16("reply code")?,
        text: String::from_utf8_lossy(r.short("reply text")?).into_owned(),
        class: r.u16("class id")?,
        method: r.u16("method id")?,
    })
}

/// Starts a method frame: envelope, class and method ids.
pub(super) fn begin(out: &mut BytesMut, channel: u16, class: u16, method: u16) -> usize {
    let start = frame::begin(out, METHOD, channel);
    out.put_u16(class);
    out.put_u16(method);
    start
}

/// Appends `connection.start-ok` with PLAIN credentials and our client properties.
pub fn start_ok(
    out: &mut BytesMut,
    properties: &[(&str, Value<'_>)],
    user: &str,
    password: &str,
) -> Result<(), WireError> {
    let start = begin(out, 0, CONNECTION, 11);
    table::put_table(out, properties)?;
    put_short(out, b"PLAIN", "mechanism")?;
    let mut response = Vec::with_capacity(2 + user.len() + password.len());
    response.push(0);
    response.extend_from_slice(user.as_bytes());
    response.push(0);
    response.extend_from_slice(password.as_bytes());
    put_long(out, &response, "credentials")?;
    put_short(out, b"en_US", "locale")?;
    frame::end(out, start);
    Ok(())
}

/// Appends `connection.start-ok` with SASL EXTERNAL (the TLS client certificate is the
/// identity; the response is empty).
pub fn start_ok_external(
    out: &mut BytesMut,
    properties: &[(&str, Value<'_>)],
) -> Result<(), WireError> {
    let start = begin(out, 0, CONNECTION, 11);
    table::put_table(out, properties)?;
    put_short(out, b"EXTERNAL", "mechanism")?;
    put_long(out, b"", "credentials")?;
    put_short(out, b"en_US", "locale")?;
    frame::end(out, start);
    Ok(())
}

/// Appends `connection.tune-ok`.
pub fn tune_ok(out: &mut BytesMut, channel_max: u16, frame_max: u32, heartbeat: u16) {
    let start = begin(out, 0, CONNECTION, 31);
    out.put_u16(channel_max);
    out.put_u32(frame_max);
    out.put_u16(heartbeat);
    frame::end(out, start);
}

/// Appends `connection.open` for `vhost`.
pub fn connection_open(out: &mut BytesMut, vhost: &str) -> Result<(), WireError> {
    let start = out.len();
    let frame = begin(out, 0, CONNECTION, 40);
    if let Err(e) = put_short(out, vhost.as_bytes(), "vhost") {
        out.truncate(start);
        return Err(e);
    }
    out.put_u8(0); // reserved short string
    out.put_u8(0); // reserved bit
    frame::end(out, frame);
    Ok(())
}

/// Appends `connection.close` (`code` 200 for a normal close).
pub fn connection_close(out: &mut BytesMut, code: u16, text: &str) {
    let start = begin(out, 0, CONNECTION, 50);
    out.put_u16(code);
    let text = &text.as_bytes()[..text.len().min(255)];
    out.put_u8(text.len() as u8);
    out.extend_from_slice(text);
    out.put_u16(0);
    out.put_u16(0);
    frame::end(out, start);
}

/// Appends `connection.close-ok`.
pub fn connection_close_ok(out: &mut BytesMut) {
    let start = begin(out, 0, CONNECTION, 51);
    frame::end(out, start);
}

/// Appends `channel.open`.
pub fn channel_open(out: &mut BytesMut, channel: u16) {
    let start = begin(out, channel, CHANNEL, 10);
    out.put_u8(0); // reserved short string
    frame::end(out, start);
}

/// Appends `channel.flow-ok`.
pub fn channel_flow_ok(out: &mut BytesMut, channel: u16, active: bool) {
    let start = begin(out, channel, CHANNEL, 21);
    out.put_u8(u8::from(active));
    frame::end(out, start);
}

/// Appends `channel.close` (`code` 200 for a normal close).
pub fn channel_close(out: &mut BytesMut, channel: u16, code: u16, text: &str) {
    let start = begin(out, channel, CHANNEL, 40);
    out.put_u16(code);
    let text = &text.as_bytes()[..text.len().min(255)];
    out.put_u8(text.len() as u8);
    out.extend_from_slice(text);
    out.put_u16(0);
    out.put_u16(0);
    frame::end(out, start);
}

/// Appends `channel.close-ok`.
pub fn channel_close_ok(out: &mut BytesMut, channel: u16) {
    let start = begin(out, channel, CHANNEL, 41);
    frame::end(out, start);
}

/// Appends `confirm.select` (waiting for select-ok).
pub fn confirm_select(out: &mut BytesMut, channel: u16) {
    let start = begin(out, channel, CONFIRM, 10);
    out.put_u8(0); // no-wait off
    frame::end(out, start);
}

/// Appends a passive `exchange.declare`: does `exchange` exist? (declare-ok or a 404 close).
pub fn exchange_declare_passive(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
) -> Result<(), WireError> {
    let start = out.len();
    let frame = begin(out, channel, EXCHANGE, 10);
    out.put_u16(0); // reserved
    if let Err(e) = put_short(out, exchange.as_bytes(), "exchange name") {
        out.truncate(start);
        return Err(e);
    }
    put_short(out, b"direct", "type")?; // ignored by the broker for a passive declare
    out.put_u8(0b0000_0001); // passive; not durable, auto-delete, internal, no-wait
    out.put_u32(0); // no arguments
    frame::end(out, frame);
    Ok(())
}

/// Appends `exchange.declare` (waiting for declare-ok) of `exchange` of type `kind`
/// (`topic`, `direct`, ...), durable or not, auto-deleted (when its last binding goes) or not.
/// A declare of an existing exchange with other flags gets a 406 channel close. On error
/// nothing is appended.
pub fn exchange_declare(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    kind: &str,
    (durable, auto_delete): (bool, bool),
) -> Result<(), WireError> {
    all_or_nothing(out, |out| {
        let frame = begin(out, channel, EXCHANGE, 10);
        out.put_u16(0); // reserved
        put_short(out, exchange.as_bytes(), "exchange name")?;
        put_short(out, kind.as_bytes(), "type")?;
        // not passive; durable, auto-delete; not internal, no-wait
        out.put_u8(u8::from(durable) << 1 | u8::from(auto_delete) << 2);
        out.put_u32(0); // no arguments
        frame::end(out, frame);
        Ok(())
    })
}

/// Appends `queue.unbind` (waiting for unbind-ok) of `queue` from `exchange` with
/// `routing_key`. On error nothing is appended.
pub fn queue_unbind(
    out: &mut BytesMut,
    channel: u16,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), WireError> {
    all_or_nothing(out, |out| {
        let frame = begin(out, channel, QUEUE, 50);
        out.put_u16(0); // reserved
        put_short(out, queue.as_bytes(), "queue name")?;
        put_short(out, exchange.as_bytes(), "exchange name")?;
        put_short(out, routing_key.as_bytes(), "routing key")?;
        out.put_u32(0); // no arguments
        frame::end(out, frame);
        Ok(())
    })
}

/// Appends `queue.delete` (waiting for delete-ok) of `queue`, whether used or not.
pub fn queue_delete(out: &mut BytesMut, channel: u16, queue: &str) -> Result<(), WireError> {
    let start = out.len();
    let frame = begin(out, channel, QUEUE, 40);
    out.put_u16(0); // reserved
    if let Err(e) = put_short(out, queue.as_bytes(), "queue name") {
        out.truncate(start);
        return Err(e);
    }
    out.put_u8(0); // if-unused, if-empty, no-wait: off
    frame::end(out, frame);
    Ok(())
}

/// How a queue is declared.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueFlags {
    /// Only check that it exists (404 closes the channel if not).
    pub passive: bool,
    /// Survives a broker restart.
    pub durable: bool,
    /// Only this connection may use it; deleted with it.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
}

/// Appends `queue.declare` (waiting for declare-ok) with `flags` and `arguments`. A declare of
/// an existing queue with other arguments gets a 406 channel close. On error nothing is
/// appended.
pub fn queue_declare(
    out: &mut BytesMut,
    channel: u16,
    queue: &str,
    flags: QueueFlags,
    arguments: &[(&str, Value<'_>)],
) -> Result<(), WireError> {
    all_or_nothing(out, |out| {
        let frame = begin(out, channel, QUEUE, 10);
        out.put_u16(0); // reserved
        put_short(out, queue.as_bytes(), "queue name")?;
        let bits = u8::from(flags.passive)
            | u8::from(flags.durable) << 1
            | u8::from(flags.exclusive) << 2
            | u8::from(flags.auto_delete) << 3;
        out.put_u8(bits); // no-wait off
        table::put_table(out, arguments)?;
        frame::end(out, frame);
        Ok(())
    })
}

/// Appends `queue.bind` (waiting for bind-ok) of `queue` to `exchange` with `routing_key`.
pub fn queue_bind(
    out: &mut BytesMut,
    channel: u16,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), WireError> {
    all_or_nothing(out, |out| {
        let frame = begin(out, channel, QUEUE, 20);
        out.put_u16(0); // reserved
        put_short(out, queue.as_bytes(), "queue name")?;
        put_short(out, exchange.as_bytes(), "exchange name")?;
        put_short(out, routing_key.as_bytes(), "routing key")?;
        out.put_u8(0); // no-wait off
        out.put_u32(0); // no arguments
        frame::end(out, frame);
        Ok(())
    })
}

/// Appends `queue.purge` (waiting for purge-ok) of `queue`.
pub fn queue_purge(out: &mut BytesMut, channel: u16, queue: &str) -> Result<(), WireError> {
    let start = out.len();
    let frame = begin(out, channel, QUEUE, 30);
    out.put_u16(0); // reserved
    if let Err(e) = put_short(out, queue.as_bytes(), "queue name") {
        out.truncate(start);
        return Err(e);
    }
    out.put_u8(0); // no-wait off
    frame::end(out, frame);
    Ok(())
}

/// The `basic` content properties mqgate sets on a message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Properties<'a> {
    /// `content-type`, when known (at most 255 bytes, else the publish fails).
    pub content_type: Option<&'a str>,
    /// `headers`.
    pub headers: &'a [(&'a str, Value<'a>)],
    /// `delivery-mode`: 1 transient, 2 persistent.
    pub delivery_mode: u8,
    /// `correlation-id` (MQTT 5 correlation data).
    pub correlation_id: Option<&'a [u8]>,
    /// `reply-to` (MQTT 5 response topic, as a routing key).
    pub reply_to: Option<&'a str>,
    /// `expiration`: milliseconds, as a decimal string.
    pub expiration: Option<&'a str>,
    /// `message-id`.
    pub message_id: Option<&'a str>,
    /// `timestamp`, seconds since the epoch.
    pub timestamp: u64,
}

/// Property flag bits of the `basic` class, in wire order.
const FLAG_CONTENT_TYPE: u16 = 1 << 15;
const FLAG_CONTENT_ENCODING: u16 = 1 << 14;
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_DELIVERY_MODE: u16 = 1 << 12;
const FLAG_PRIORITY: u16 = 1 << 11;
const FLAG_CORRELATION_ID: u16 = 1 << 10;
const FLAG_REPLY_TO: u16 = 1 << 9;
const FLAG_EXPIRATION: u16 = 1 << 8;
const FLAG_MESSAGE_ID: u16 = 1 << 7;
const FLAG_TIMESTAMP: u16 = 1 << 6;

/// What mqgate reads back from a returned message's content header: enough to tell which of
/// its own publishes it was.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReturnedHeader {
    /// The body's size.
    pub body_size: u64,
    /// The `x-mqtt-client-id` header, if present.
    pub client_id: Option<Vec<u8>>,
    /// The `x-mqtt-topic` header, if present.
    pub topic: Option<Vec<u8>>,
    /// The `message-id` property, if present.
    pub message_id: Option<Vec<u8>>,
}

/// Decodes a content header frame's payload as far as [`ReturnedHeader`] needs.
pub fn decode_content_header(payload: &[u8]) -> Result<ReturnedHeader, WireError> {
    let mut r = Reader::new(payload);
    r.u16("class id")?;
    r.u16("weight")?;
    let body_size = r.u64("body size")?;
    let flags = r.u16("property flags")?;
    let mut out = ReturnedHeader { body_size, ..ReturnedHeader::default() };
    if flags & 1 != 0 {
        // Continuation flags: only for property classes with more than 15 properties.
        return Ok(out);
    }
    if flags & FLAG_CONTENT_TYPE != 0 {
        r.short("content type")?;
    }
    if flags & FLAG_CONTENT_ENCODING != 0 {
        r.short("content encoding")?;
    }
    if flags & FLAG_HEADERS != 0 {
        for (name, value) in r.table()? {
            if let Decoded::Bytes(b) = value {
                match name.as_str() {
                    "x-mqtt-client-id" => out.client_id = Some(b),
                    "x-mqtt-topic" => out.topic = Some(b),
                    _ => {}
                }
            }
        }
    }
    if flags & FLAG_DELIVERY_MODE != 0 {
        r.u8("delivery mode")?;
    }
    if flags & FLAG_PRIORITY != 0 {
        r.u8("priority")?;
    }
    for flag in [FLAG_CORRELATION_ID, FLAG_REPLY_TO, FLAG_EXPIRATION] {
        if flags & flag != 0 {
            r.short("property")?;
        }
    }
    if flags & FLAG_MESSAGE_ID != 0 {
        out.message_id = Some(r.short("message id")?.to_vec());
    }
    Ok(out)
}

/// Appends a `basic.publish` (mandatory and immediate off), its content header and its body
/// split into frames of at most `frame_max`. On error nothing is appended.
/// Runs `write`, which appends one method frame to `out`; on error takes back what it
/// appended, so that a failed encoding leaves nothing half-written.
fn all_or_nothing(
    out: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = out.len();
    let res = write(out);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

#[cfg(test)]
pub fn publish(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    properties: &Properties<'_>,
    body: &[u8],
    frame_max: u32,
) -> Result<(), WireError> {
    publish_with(out, channel, exchange, routing_key, false, properties, body, frame_max)
}

/// [`publish`] with the `mandatory` flag as given: RabbitMQ returns (`basic.return`) a
/// mandatory message that no queue takes, before its confirm.
#[allow(clippy::too_many_arguments)]
pub fn publish_with(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    properties: &Properties<'_>,
    body: &[u8],
    frame_max: u32,
) -> Result<(), WireError> {
    let start = out.len();
    let res =
        publish_inner(out, channel, exchange, routing_key, mandatory, properties, body, frame_max);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// [`publish`] without the clean-up on error.
#[allow(clippy::too_many_arguments)]
fn publish_inner(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    properties: &Properties<'_>,
    body: &[u8],
    frame_max: u32,
) -> Result<(), WireError> {
    let max_body = (frame_max.max(frame::MIN_FRAME_MAX) as usize) - OVERHEAD;
    out.reserve(64 + exchange.len() + routing_key.len() + body.len() + 256);

    let f = begin(out, channel, BASIC, 40);
    out.put_u16(0); // reserved
    put_short(out, exchange.as_bytes(), "exchange name")?;
    put_short(out, routing_key.as_bytes(), "routing key")?;
    out.put_u8(u8::from(mandatory)); // mandatory bit; immediate off
    frame::end(out, f);

    let f = frame::begin(out, HEADER, channel);
    out.put_u16(BASIC);
    out.put_u16(0); // weight
    out.put_u64(body.len() as u64);
    let mut flags = FLAG_HEADERS | FLAG_DELIVERY_MODE | FLAG_TIMESTAMP;
    let optional = [
        (properties.content_type.is_some(), FLAG_CONTENT_TYPE),
        (properties.correlation_id.is_some(), FLAG_CORRELATION_ID),
        (properties.reply_to.is_some(), FLAG_REPLY_TO),
        (properties.expiration.is_some(), FLAG_EXPIRATION),
        (properties.message_id.is_some(), FLAG_MESSAGE_ID),
    ];
    for (set, flag) in optional {
        if set {
            flags |= flag;
        }
    }
    out.put_u16(flags);
    if let Some(ct) = properties.content_type {
        put_short(out, ct.as_bytes(), "content type")?;
    }
    table::put_table(out, properties.headers)?;
    out.put_u8(properties.delivery_mode);
    if let Some(c) = properties.correlation_id {
        put_short(out, c, "correlation id")?;
    }
    if let Some(r) = properties.reply_to {
        put_short(out, r.as_bytes(), "reply-to")?;
    }
    if let Some(e) = properties.expiration {
        put_short(out, e.as_bytes(), "expiration")?;
    }
    if let Some(m) = properties.message_id {
        put_short(out, m.as_bytes(), "message id")?;
    }
    out.put_u64(properties.timestamp);
    if out.len() - f - 7 > max_body {
        return Err(WireError::TooLong("content header"));
    }
    frame::end(out, f);

    for chunk in body.chunks(max_body) {
        let f = frame::begin(out, BODY, channel);
        out.extend_from_slice(chunk);
        frame::end(out, f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::frame::{decode as decode_frame, Frame};
    use super::*;

    fn durable() -> QueueFlags {
        QueueFlags { durable: true, ..QueueFlags::default() }
    }

    fn method_of(out: &[u8]) -> Method {
        match decode_frame(out, 131_072) {
            Ok(Some((Frame::Method { method, .. }, _))) => method,
            other => panic!("not a method frame: {other:?}"),
        }
    }

    #[test]
    fn decodes_broker_methods() {
        let mut out = BytesMut::new();
        let f = begin(&mut out, 1, BASIC, 80);
        out.put_u64(42);
        out.put_u8(1);
        frame::end(&mut out, f);
        assert_eq!(method_of(&out), Method::BasicAck { tag: 42, multiple: true });

        let mut out = BytesMut::new();
        let f = begin(&mut out, 3, CHANNEL, 40);
        out.put_u16(404);
        out.put_u8(9);
        out.extend_from_slice(b"NOT_FOUND");
        out.put_u16(40);
        out.put_u16(10);
        frame::end(&mut out, f);
        let close = Close { code: 404, text: "NOT_FOUND".to_owned(), class: 40, method: 10 };
        assert_eq!(method_of(&out), Method::ChannelClose(close));

        let mut out = BytesMut::new();
        let f = begin(&mut out, 0, CONNECTION, 30);
        out.put_u16(2047);
        out.put_u32(131_072);
        out.put_u16(60);
        frame::end(&mut out, f);
        let tune = Method::ConnectionTune { channel_max: 2047, frame_max: 131_072, heartbeat: 60 };
        assert_eq!(method_of(&out), tune);
    }

    #[test]
    fn a_truncated_method_is_an_error() {
        let mut out = BytesMut::new();
        let f = begin(&mut out, 1, BASIC, 80);
        out.put_u32(1); // half a delivery tag
        frame::end(&mut out, f);
        assert_eq!(decode_frame(&out, 4096), Err(WireError::Truncated("delivery tag")));
    }

    #[test]
    fn publish_splits_the_body_and_refuses_long_names_without_writing() {
        let headers = [("x-mqtt-qos", Value::I32(1))];
        let props = Properties {
            content_type: Some("application/json"),
            headers: &headers,
            delivery_mode: 2,
            timestamp: 7,
            ..Properties::default()
        };
        let body = vec![7u8; 10_000];
        let mut out = BytesMut::new();
        publish(&mut out, 5, "ex", "rk", &props, &body, 4096).expect("publish");
        let mut rest = &out[..];
        let mut kinds = Vec::new();
        while let Ok(Some((frame, used))) = decode_frame(rest, 4096) {
            kinds.push(matches!(frame, Frame::Method { .. }));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        // method, header, then 10000 / 4088 → 3 body frames
        assert_eq!(kinds, vec![true, false, false, false, false]);

        let long = "k".repeat(256);
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            publish(&mut out, 1, "ex", &long, &props, b"x", 4096),
            Err(WireError::ShortStringTooLong("routing key"))
        );
        assert_eq!(
            publish(&mut out, 1, &long, "rk", &props, b"x", 4096),
            Err(WireError::ShortStringTooLong("exchange name"))
        );
        let props = Properties { content_type: Some(&long), ..props };
        assert!(publish(&mut out, 1, "ex", "rk", &props, b"x", 4096).is_err());
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn publish_with_an_empty_body_has_no_body_frame() {
        let props = Properties { delivery_mode: 1, ..Properties::default() };
        let mut out = BytesMut::new();
        publish(&mut out, 1, "", "q", &props, b"", 131_072).expect("publish");
        let (_, used) = decode_frame(&out, 131_072).expect("ok").expect("complete");
        let (header, used2) = decode_frame(&out[used..], 131_072).expect("ok").expect("complete");
        assert!(matches!(header, Frame::Content { channel: 1, kind: frame::HEADER, .. }));
        assert_eq!(used + used2, out.len());
    }

    #[test]
    fn decodes_return_and_queue_answers() {
        let mut out = BytesMut::new();
        let f = begin(&mut out, 1, BASIC, 50);
        out.put_u16(NO_ROUTE);
        put_short(&mut out, b"NO_ROUTE", "t").expect("fits");
        put_short(&mut out, b"ex", "t").expect("fits");
        put_short(&mut out, b"a.b", "t").expect("fits");
        frame::end(&mut out, f);
        let ret = Return {
            code: NO_ROUTE,
            text: "NO_ROUTE".to_owned(),
            exchange: "ex".to_owned(),
            routing_key: "a.b".to_owned(),
        };
        assert_eq!(method_of(&out), Method::BasicReturn(ret));

        let mut out = BytesMut::new();
        let f = begin(&mut out, 9, QUEUE, 11);
        put_short(&mut out, b"jobs", "t").expect("fits");
        out.put_u32(3);
        out.put_u32(2);
        frame::end(&mut out, f);
        let ok = Method::QueueDeclareOk { queue: "jobs".to_owned(), messages: 3, consumers: 2 };
        assert_eq!(method_of(&out), ok);
        let mut out = BytesMut::new();
        let f = begin(&mut out, 9, QUEUE, 31);
        out.put_u32(1);
        frame::end(&mut out, f);
        assert_eq!(method_of(&out), Method::QueuePurgeOk(1));
    }

    #[test]
    fn queue_methods_encode_and_refuse_long_names_without_writing() {
        let args = [("x-queue-type", Value::LongString(b"quorum"))];
        let mut out = BytesMut::new();
        queue_declare(&mut out, 3, "jobs", durable(), &args).expect("declare");
        let (frame, used) = decode_frame(&out, 4096).expect("ok").expect("complete");
        assert_eq!(used, out.len());
        assert!(matches!(
            frame,
            Frame::Method { channel: 3, method: Method::Other { class: 50, method: 10 } }
        ));
        // reserved, name, bits (durable), table
        let payload = &out[7..out.len() - 1];
        assert_eq!(&payload[4..6], &[0, 0]);
        assert_eq!(&payload[6..11], b"\x04jobs");
        assert_eq!(payload[11], 0b10, "durable, not exclusive, not auto-delete");
        let long = "q".repeat(256);
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(queue_declare(&mut out, 3, &long, durable(), &[]).is_err());
        assert!(queue_bind(&mut out, 3, "q", "x", &long).is_err());
        assert!(queue_purge(&mut out, 3, &long).is_err());
        assert_eq!(&out[..], b"keep");
        queue_bind(&mut out, 3, "q", "x", "a.*").expect("bind");
        queue_purge(&mut out, 3, "q").expect("purge");
        let (f1, used) = decode_frame(&out[4..], 4096).expect("ok").expect("complete");
        let (f2, _) = decode_frame(&out[4 + used..], 4096).expect("ok").expect("complete");
        assert!(matches!(
            f1,
            Frame::Method { method: Method::Other { class: 50, method: 20 }, .. }
        ));
        assert!(matches!(
            f2,
            Frame::Method { method: Method::Other { class: 50, method: 30 }, .. }
        ));
    }

    #[test]
    fn content_header_of_a_returned_message_is_read_back() {
        let headers = [
            ("x-mqtt-client-id", Value::LongString(b"dev")),
            ("x-mqtt-topic", Value::LongString(b"a/b")),
        ];
        let props = Properties {
            content_type: Some("text/plain"),
            headers: &headers,
            delivery_mode: 2,
            correlation_id: Some(b"c"),
            reply_to: Some("r"),
            expiration: Some("1000"),
            message_id: Some("mqgate-1"),
            timestamp: 1,
        };
        let mut out = BytesMut::new();
        publish_with(&mut out, 1, "ex", "rk", true, &props, b"hello", 4096).expect("publish");
        assert_eq!(out[7 + 4 + 2 + 3 + 3], 1, "mandatory bit set");
        let (_, used) = decode_frame(&out, 4096).expect("ok").expect("complete");
        let header = &out[used + 7..];
        let h = decode_content_header(header).expect("header");
        assert_eq!(h.body_size, 5);
        assert_eq!(h.client_id.as_deref(), Some(&b"dev"[..]));
        assert_eq!(h.topic.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(h.message_id.as_deref(), Some(&b"mqgate-1"[..]));
    }
}
