//! The `- zmq:` target: the MQTT topic and payload, as two frames, to its socket.

use std::sync::Arc;

use bytes::Bytes;

use super::config::ZmqKind;
use super::socket::{Out, ZmqSocket};
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::rules::LazyContext;
use crate::targets::{Explained, Handoff, Target};
use crate::template::TemplateError;

/// One `- zmq:` target.
#[derive(Debug)]
pub struct ZmqTarget {
    id: String,
    socket: ZmqSocket,
    metrics: TargetMetrics,
}

impl ZmqTarget {
    /// Target `id` on `socket`.
    pub fn new(id: &str, socket: &ZmqSocket, metrics: TargetMetrics) -> ZmqTarget {
        ZmqTarget { id: id.to_owned(), socket: socket.clone(), metrics }
    }
}

impl Target for ZmqTarget {
    fn id(&self) -> &str {
        &self.id
    }

    fn hand_over(
        &self,
        msg: &Arc<Message>,
        _ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError> {
        // Only `ack: receive` rules send here; their outcomes are not read, so no outcome
        // channel is made for them (the counters say what became of the message). Anything
        // else that waits (a replay's `targets::send`) gets one.
        let ack = if hand.awaited() { hand.ack() } else { None };
        let out = Out::new(
            Bytes::copy_from_slice(msg.topic.as_bytes()),
            msg.payload.clone(),
            ack,
            self.metrics.clone(),
        );
        hand.offer(out, |o| self.socket.try_send(o), |o| Box::pin(self.socket.clone().send(o)));
        Ok(())
    }

    fn explain(&self, msg: &Arc<Message>, _ctx: &mut LazyContext) -> Explained {
        let mut e = Explained::new(&self.id, "zmq");
        e.field("socket", self.socket.name());
        e.field(
            "kind",
            match self.socket.kind() {
                ZmqKind::Pub => "pub",
                ZmqKind::Push => "push",
            },
        );
        e.field(
            "frames",
            vec![msg.topic.clone(), format!("<payload, {} bytes>", msg.payload.len())],
        );
        e.note("ZeroMQ confirms nothing: delivered means handed to the socket (ack: receive only)");
        e
    }
}
