//! Mandatory publishes and `basic.return`: which publish a returned message stands for.
//!
//! RabbitMQ returns a mandatory message no queue takes (method, content header, body) before
//! that publish's confirm on the same channel. The publisher keeps, for each unconfirmed
//! mandatory publish, what identifies it ([`Mandatory`]); a complete return marks the oldest
//! one of its channel with the same exchange, routing key, client id, topic and body, and the
//! confirm that follows resolves it as a failure (see `on_confirm`). No I/O of its own.

use std::sync::Arc;

use tracing::debug;

use super::{Publisher, Role};
use crate::config::UnroutablePolicy;
use crate::message::Message;
use crate::targets::amqp::wire::frame;
use crate::targets::amqp::wire::methods::{self, ReturnedHeader, NO_ROUTE};

/// Most bytes of a returned message's body kept to tell it from other publishes; a longer one
/// is told apart by its length alone.
const RETURN_BODY_CAPTURE: usize = 1 << 20;

/// A mandatory publish, as far as telling it apart in a `basic.return` goes.
pub(super) struct Mandatory {
    /// The MQTT 5 answer policy when it is returned.
    pub(super) policy: UnroutablePolicy,
    /// Its exchange.
    pub(super) exchange: Arc<str>,
    /// Its routing key.
    pub(super) routing_key: String,
    /// The message (client id, topic, payload).
    pub(super) msg: Arc<Message>,
    /// Set when RabbitMQ returned it: the confirm that follows becomes a failure.
    pub(super) returned: Option<String>,
}

/// A `basic.return` whose content frames are still arriving.
pub(super) struct Returning {
    /// The return method.
    pub(super) ret: methods::Return,
    /// Its content header, once it came.
    pub(super) header: Option<ReturnedHeader>,
    /// Its body so far (up to [`RETURN_BODY_CAPTURE`] bytes).
    pub(super) body: Vec<u8>,
    /// Body bytes received, captured or not.
    pub(super) received: u64,
}

impl Publisher<'_> {
    /// A content frame: part of a `basic.return` on a confirm channel (anything else is not
    /// for us and is dropped).
    pub(super) fn on_content(&mut self, channel: u16, kind: u8, payload: &[u8]) {
        let Role::Confirm(i) = self.role(channel) else { return };
        let Some(r) = self.confirm[i].returning.as_mut() else { return };
        if kind == frame::HEADER {
            match methods::decode_content_header(payload) {
                Ok(h) => r.header = Some(h),
                Err(e) => {
                    debug!(broker = %self.shared.name, error = %e, "unreadable returned header");
                    self.confirm[i].returning = None;
                    return;
                }
            }
        } else {
            r.received += payload.len() as u64;
            let room = RETURN_BODY_CAPTURE.saturating_sub(r.body.len());
            r.body.extend_from_slice(&payload[..payload.len().min(room)]);
        }
        let complete = r.header.as_ref().is_some_and(|h| r.received >= h.body_size);
        if complete {
            if let Some(r) = self.confirm[i].returning.take() {
                self.on_returned(i, r);
            }
        }
    }

    /// Marks the publish a complete `basic.return` on confirm channel `i` stands for: the
    /// oldest unconfirmed mandatory publish of this channel with the same exchange, routing
    /// key, client id, topic and body. RabbitMQ sends the return before that publish's
    /// confirm, so the confirm that follows resolves it as a failure.
    pub(super) fn on_returned(&mut self, i: usize, r: Returning) {
        let Some(h) = r.header else { return };
        let complete_body = r.body.len() as u64 == h.body_size;
        let hit = self.confirm[i].inflight.iter_mut().find_map(|e| {
            let m = e.mandatory.as_mut()?;
            let same = m.returned.is_none()
                && *m.exchange == *r.ret.exchange
                && m.routing_key == r.ret.routing_key
                && h.client_id.as_deref() == Some(m.msg.client_id.as_bytes())
                && h.topic.as_deref() == Some(m.msg.topic.as_bytes())
                && m.msg.payload.len() as u64 == h.body_size
                && (!complete_body || m.msg.payload[..] == r.body[..]);
            same.then_some(m)
        });
        match hit {
            Some(m) if r.ret.code == NO_ROUTE => {
                m.returned = Some(format!(
                    "unroutable: exchange '{}' routes '{}' to no queue",
                    r.ret.exchange, r.ret.routing_key
                ));
            }
            Some(m) => {
                m.returned = Some(format!("returned by the broker: {} {}", r.ret.code, r.ret.text));
            }
            None => debug!(broker = %self.shared.name, exchange = %r.ret.exchange,
                "a returned message matched no unconfirmed publish"),
        }
    }
}
