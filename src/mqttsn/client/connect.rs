//! CONNECT: the will exchange (WILLTOPICREQ, WILLTOPIC, WILLMSGREQ, WILLMSG), the client-id
//! checks (`mqttsn.client_ids`; MQTT-SN has no password), the registry (takeover, owner,
//! `mqtt.max_sessions`), resuming or starting the session, CONNACK. The same steps as an MQTT
//! CONNECT (`mqtt/session/connect.rs`) through the same broker calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::{Client, Datagram, Mode};
use crate::auth::acl::{ClientAcl, Grant};
use crate::broker::persist::SessionKey;
use crate::broker::sessions::{Owner, Refused};
use crate::broker::{CloseReason, Expiry, SessionState};
use crate::metrics::ReasonLabels;
use crate::mqtt::codec::{LastWill, Properties, ProtocolVersion};
use crate::mqtt::session::{PendingQueue, SessionShared};
use crate::mqttsn::codec::{self, Connect, Packet, ReturnCode};
use crate::mqttsn::gateway::{Gateway, Peer};
use crate::mqttsn::topics::Topics;

/// The longest client id accepted (the spec says 23; longer ones are common and harmless).
const MAX_CLIENT_ID: usize = 256;

/// How the will exchange ended.
enum Exchange {
    /// The will (or none).
    Done(Option<Box<LastWill>>),
    /// Another CONNECT came: start again with it.
    Again(Connect),
    /// Refused, timed out or shut down: no connection.
    Failed,
}

/// Runs the handshake for `connect` from `from`; `None`: no connection (a CONNACK refusal may
/// have been sent).
pub(super) async fn handshake(
    gw: &Arc<Gateway>,
    rx: &mut mpsc::Receiver<Datagram>,
    mut connect: Connect,
    mut from: Peer,
) -> Option<Client> {
    let shared = Arc::clone(&gw.shared);
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let mut out = BytesMut::new();
    let will = loop {
        if !connect.will {
            break None;
        }
        match will_exchange(gw, rx, &mut from, deadline, &mut out).await {
            Exchange::Done(will) => break will,
            Exchange::Again(c) => connect = c,
            Exchange::Failed => return None,
        }
    };
    let refuse = |code: ReturnCode, reason: &str, out: &mut BytesMut| {
        debug!(client_id = %crate::logtext::LogText(&connect.client_id), reason, "MQTT-SN CONNECT refused");
        gw.metrics.rejected_with(code);
        gw.send(&Packet::ConnAck { code }, &from, out);
    };
    let live = shared.live.load();
    if connect.client_id.is_empty() || connect.client_id.len() > MAX_CLIENT_ID {
        refuse(ReturnCode::NOT_SUPPORTED, "empty or too long client id", &mut out);
        return None;
    }
    let anonymous_ok = !gw.config.client_ids.is_empty() || live.auth.allows_anonymous();
    if !anonymous_ok || !gw.config.client_id_allowed(&connect.client_id) {
        let reason = ReasonLabels { reason: "client_id_not_allowed".into() };
        shared.metrics.auth_refused.get_or_create(&reason).inc();
        refuse(ReturnCode::NOT_SUPPORTED, "client id not in mqttsn.client_ids", &mut out);
        return None;
    }
    if let Some(w) = &will {
        if crate::mqtt::topic::validate_name(&w.topic).is_err() {
            refuse(ReturnCode::NOT_SUPPORTED, "invalid will topic", &mut out);
            return None;
        }
    }
    let client_id: Arc<str> = Arc::from(connect.client_id.as_str());
    let limits = &shared.limits;
    let registration = match shared.broker.register(
        &client_id,
        Owner::Anonymous,
        limits.same_identity,
        limits.max_sessions,
    ) {
        Ok(r) => r,
        Err(Refused::Full) => {
            let reason = ReasonLabels { reason: "max_sessions".into() };
            shared.metrics.auth_refused.get_or_create(&reason).inc();
            refuse(ReturnCode::CONGESTION, "mqtt.max_sessions reached", &mut out);
            return None;
        }
        Err(Refused::Owned(_)) => {
            let reason = ReasonLabels { reason: "client_id_owned".into() };
            shared.metrics.auth_refused.get_or_create(&reason).inc();
            refuse(ReturnCode::NOT_SUPPORTED, "client id held by another identity", &mut out);
            return None;
        }
    };
    if shared.shutdown.is_cancelled() {
        registration.link.0.close(CloseReason::Shutdown);
    }
    if let Some(previous) = &registration.previous {
        if tokio::time::timeout_at(deadline, previous.parked()).await.is_err() {
            shared.broker.unregister(&client_id, registration.conn_id);
            refuse(ReturnCode::CONGESTION, "the previous connection is still closing", &mut out);
            return None;
        }
    }
    let expiry = if connect.clean_session {
        Expiry::Now
    } else {
        match u32::try_from(gw.config.session_expiry.0.as_secs()).unwrap_or(u32::MAX) {
            0 => Expiry::Now,
            s => Expiry::After(s),
        }
    };
    let resumed = match shared.broker.take_session(&client_id) {
        Some(old) if connect.clean_session => {
            shared.broker.discard_session(old);
            None
        }
        other => other,
    };
    let session_present = resumed.is_some();
    shared.broker.claim_will(&client_id, session_present);
    let mut state = resumed.unwrap_or_else(|| {
        let stored = (expiry != Expiry::Now && shared.broker.persist().is_some())
            .then(|| SessionKey::new(&client_id));
        let max_bytes = usize::try_from(gw.config.max_queued_bytes.0).unwrap_or(usize::MAX);
        let capacity = gw.config.max_queued_messages.max(1);
        SessionState::with_bytes(shared.broker.next_id(), capacity, max_bytes, stored)
    });
    state.version = ProtocolVersion::V311;
    state.owner = Owner::Anonymous;
    let mut acl = live.auth.acl.for_client(None, &client_id);
    if session_present {
        apply_acl(&shared, &mut state, &mut acl);
    }
    if expiry != Expiry::Now {
        shared.broker.store_session(&state, expiry, false);
    }
    gw.send(&Packet::ConnAck { code: ReturnCode::ACCEPTED }, &from, &mut out);
    let max = limits.max_keepalive;
    let duration = match connect.duration {
        d if max > 0 && d > max => max,
        d => d,
    };
    registration.link.0.describe(crate::broker::sessions::ConnInfo {
        peer_ip: from.addr.ip(),
        peer_port: from.addr.port(),
        protocol: crate::broker::sessions::ConnProtocol::MqttSn,
        keep_alive: duration,
        connected_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        session_id: state.id,
    });
    let keepalive = match duration {
        0 => Some(limits.idle_timeout).filter(|d| !d.is_zero()),
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    debug!(client_id = %crate::logtext::LogText(&client_id), peer = %from.addr, session_present, "MQTT-SN client connected");
    let mut pending = PendingQueue::new(gw.config.max_pending.max(1));
    pending.resume(std::mem::take(&mut state.awaiting_rel));
    let resend: std::collections::VecDeque<u16> =
        state.inflight.iter().map(|f| f.packet_id).collect();
    Some(Client {
        gw: Arc::clone(gw),
        peer: from,
        client_id,
        acl,
        live,
        session_id: state.id,
        expiry,
        link: Some(registration.link),
        state,
        keepalive,
        last_heard: Instant::now(),
        will,
        topics: Topics::new(gw.config.max_topics),
        pending,
        pending_topics: Default::default(),
        recent: Default::default(),
        mode: Mode::Active,
        sleep_until: None,
        sent: Default::default(),
        registering: None,
        resend,
        blocked: Vec::new(),
        hits: Vec::new(),
        held: None,
        draining: None,
        subscribes: crate::mqtt::session::Bucket::new(f64::from(
            gw.shared.limits.max_subscribe_rate,
        )),
        buf: out,
    })
}

/// WILLTOPICREQ → WILLTOPIC (empty: no will) → WILLMSGREQ → WILLMSG, within the CONNECT's
/// deadline. A new CONNECT restarts it (the client resent it).
async fn will_exchange(
    gw: &Arc<Gateway>,
    rx: &mut mpsc::Receiver<Datagram>,
    from: &mut Peer,
    deadline: Instant,
    out: &mut BytesMut,
) -> Exchange {
    gw.send(&Packet::WillTopicReq, from, out);
    let mut topic: Option<crate::mqttsn::codec::WillTopic> = None;
    loop {
        let next = tokio::select! {
            d = rx.recv() => d,
            () = tokio::time::sleep_until(deadline) => {
                gw.shared.metrics.protocol_error("connect_timeout");
                return Exchange::Failed;
            }
            () = gw.shared.shutdown.cancelled() => return Exchange::Failed,
        };
        let Some(d) = next else { return Exchange::Failed };
        *from = d.from;
        match codec::decode(&d.data) {
            Ok(Packet::Connect(c)) => return Exchange::Again(c),
            Ok(Packet::WillTopic(None)) if topic.is_none() => return Exchange::Done(None),
            Ok(Packet::WillTopic(Some(w))) if topic.is_none() => {
                topic = Some(w);
                gw.send(&Packet::WillMsgReq, from, out);
            }
            Ok(Packet::WillMsg(payload)) => {
                let Some(w) = topic.take() else {
                    gw.metrics.drop_for("unexpected");
                    continue;
                };
                return Exchange::Done(Some(Box::new(will_of(w, payload))));
            }
            Ok(_) => gw.metrics.drop_for("unexpected"),
            Err(e) => gw.metrics.drop_for(e.kind()),
        }
    }
}

/// An MQTT-SN will as the will an MQTT session publishes.
pub(super) fn will_of(w: crate::mqttsn::codec::WillTopic, payload: Bytes) -> LastWill {
    LastWill {
        topic: w.topic,
        payload,
        qos: w.qos.mqtt(),
        retain: w.retain,
        properties: Properties::default(),
    }
}

/// Takes `acl` for a session's existing filters (a resumed session, a reload), as an MQTT
/// session does: filters it refuses are removed (and what was queued for them and may not be
/// read is dropped), ones overlapping a deny make deliveries checked.
pub(super) fn apply_acl(shared: &SessionShared, state: &mut SessionState, acl: &mut ClientAcl) {
    let grants: Vec<(String, Grant)> =
        state.filters.keys().map(|f| (f.clone(), acl.grant(f))).collect();
    if grants.iter().any(|(_, g)| *g == Grant::Filtered) {
        acl.set_filtering();
    }
    let revoked: Vec<String> =
        grants.into_iter().filter(|(_, g)| *g == Grant::Refused).map(|(f, _)| f).collect();
    if revoked.is_empty() {
        return;
    }
    for filter in revoked {
        state.filters.remove(&filter);
        shared.broker.unsubscribe(state.id, &filter);
        shared.acl_denied_subscribe.inc();
    }
    let subscriber = Arc::clone(&state.subscriber);
    for out in subscriber.queue.remove_unless(|out| acl.may_receive(&out.msg.topic)) {
        shared.broker.unstore(&subscriber, out.stored);
        crate::broker::tracking::finish(out.ticket, crate::broker::tracking::Fate::Gone);
    }
}
