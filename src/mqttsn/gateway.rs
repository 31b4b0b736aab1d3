//! The UDP socket's task: every datagram is read here, dispatched by the sender's address to
//! its client's task, or answered here when no connection is involved (SEARCHGW, QoS -1
//! PUBLISH, a CONNECT starting a client). A datagram never stops this loop: what cannot be
//! read is dropped and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::client::{self, Datagram};
use super::codec::{self, msg_type, Packet, ReturnCode, SnQos, TopicRef};
use super::config::MqttSnConfig;
use super::metrics::MqttSnFamilies;
use super::topics::Predefined;
use crate::message::Message;
use crate::mqtt::session::SessionShared;
use crate::routing::route;
use crate::targets::{send_blocked, Blocked};

/// QoS -1 messages waiting for their task; beyond, dropped and counted.
const QOS_MINUS_ONE_QUEUE: usize = 256;

/// Datagrams read in one go before the loop looks at its other events.
const READ_BATCH: usize = 64;

/// Where a client is: its UDP address and, behind a forwarder (spec §5.5), its wireless node
/// id (every message to it is then encapsulated).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Peer {
    pub addr: SocketAddr,
    pub node: Option<Bytes>,
}

impl Peer {
    pub fn direct(addr: SocketAddr) -> Peer {
        Peer { addr, node: None }
    }
}

/// What the gateway's tasks share.
pub(super) struct Gateway {
    /// The socket (only the gateway's tasks send on it).
    pub socket: Arc<UdpSocket>,
    /// Broker, rules, ACL, limits: what MQTT sessions share.
    pub shared: Arc<SessionShared>,
    /// `mqttsn:`.
    pub config: MqttSnConfig,
    /// `mqttsn.predefined_topics`.
    pub predefined: Predefined,
    /// The families.
    pub metrics: MqttSnFamilies,
    /// A client task tells the loop it ended (its key), so its address is forgotten.
    pub ended: mpsc::UnboundedSender<u64>,
}

impl Gateway {
    /// Sends `p` to `to` now (encapsulated for a node behind a forwarder); never waits: a full
    /// send buffer drops it, counted.
    pub fn send(&self, p: &Packet, to: &Peer, buf: &mut BytesMut) {
        buf.clear();
        let encoded = match &to.node {
            None => codec::encode(p, buf),
            Some(node) => {
                let mut inner = BytesMut::new();
                codec::encode(p, &mut inner).and_then(|()| {
                    let wrapped = Packet::Encapsulated {
                        radius: 0,
                        node_id: node.clone(),
                        inner: inner.freeze(),
                    };
                    codec::encode(&wrapped, buf)
                })
            }
        };
        if let Err(e) = encoded {
            debug!(error = %e, "MQTT-SN message not sent");
            self.metrics.drop_for("unencodable");
            return;
        }
        match self.socket.try_send_to(buf, to.addr) {
            Ok(_) => {
                self.metrics.sent.inc();
            }
            Err(e) => {
                debug!(to = %to.addr, error = %e, "MQTT-SN datagram not sent");
                self.metrics.drop_for("send_failed");
            }
        }
    }
}

/// Binds `mqttsn.listen` (errors name the address and key) with `mqttsn.recv_buffer` as its
/// receive buffer (a smaller one than asked is logged, not refused).
pub async fn bind(config: &MqttSnConfig) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = config.listen_addr();
    let context = || format!("cannot listen on UDP {addr} (set by `mqttsn.listen` in the config)");
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .with_context(context)?;
    let asked = usize::try_from(config.recv_buffer.0).unwrap_or(usize::MAX);
    if let Err(e) = socket.set_recv_buffer_size(asked) {
        warn!(error = %e, "mqttsn: cannot set the receive buffer (mqttsn.recv_buffer)");
    }
    if let Ok(got) = socket.recv_buffer_size() {
        // Linux reports twice what it grants (bookkeeping included).
        if got < asked {
            info!(
                asked,
                got, "mqttsn: receive buffer smaller than mqttsn.recv_buffer (net.core.rmem_max)"
            );
        }
    }
    socket.set_nonblocking(true).with_context(context)?;
    socket.bind(&addr.into()).with_context(context)?;
    UdpSocket::from_std(socket.into()).with_context(context)
}

/// One connected client as the loop knows it.
struct Handle {
    /// Its task's datagram queue.
    tx: mpsc::Sender<Datagram>,
    /// Unique per client task.
    key: u64,
    client_id: Arc<str>,
}

/// The gateway until `shared.shutdown`, then (bounded) its clients' ends.
pub async fn run(socket: UdpSocket, shared: Arc<SessionShared>, config: MqttSnConfig) {
    let metrics = shared.metrics.mqttsn.clone();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let predefined =
        Predefined::new(config.predefined_topics.iter().map(|(id, n)| (*id, n.value.as_str())));
    let gw = Arc::new(Gateway {
        socket: Arc::new(socket),
        shared: Arc::clone(&shared),
        config,
        predefined,
        metrics,
        ended: ended_tx,
    });
    let tasks = TaskTracker::new();
    let qos_minus_one = gw.config.qos_minus_one.then(|| {
        let (tx, rx) = mpsc::channel(QOS_MINUS_ONE_QUEUE);
        tasks.spawn(publish_qos_minus_one(Arc::clone(&gw), rx));
        tx
    });
    let mut l = Loop {
        gw: Arc::clone(&gw),
        clients: HashMap::new(),
        keys: HashMap::new(),
        ids: HashMap::new(),
        next_key: 0,
        tasks: tasks.clone(),
        qos_minus_one,
        out: BytesMut::new(),
    };
    let advertise_to = gw.config.advertise_to.as_ref().and_then(|a| a.value.parse().ok());
    let interval = gw.config.advertise_interval.value.0;
    if advertise_to.is_some() {
        if let Err(e) = gw.socket.set_broadcast(true) {
            warn!(error = %e, "mqttsn: cannot allow broadcast ADVERTISE");
        }
    }
    let mut advertise = tokio::time::interval(interval.max(Duration::from_secs(1)));
    let mut buf = vec![0u8; gw.config.max_datagram_size.value + 1];
    info!(addr = ?gw.socket.local_addr().ok(), "MQTT-SN gateway started");
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => break,
            Some(key) = ended.recv() => l.forget(key),
            _ = advertise.tick(), if advertise_to.is_some() => {
                if let Some(to) = advertise_to {
                    let duration = u16::try_from(interval.as_secs()).unwrap_or(u16::MAX);
                    let p = Packet::Advertise { gw_id: gw.config.gateway_id, duration };
                    gw.send(&p, &Peer::direct(to), &mut l.out);
                }
            }
            r = gw.socket.recv_from(&mut buf) => {
                match r {
                    Ok((n, from)) => l.datagram(&buf[..n], from),
                    Err(e) => debug!(error = %e, "mqttsn: receive failed"),
                }
                // What else is there now, without going back to the select.
                for _ in 1..READ_BATCH {
                    match gw.socket.try_recv_from(&mut buf) {
                        Ok((n, from)) => l.datagram(&buf[..n], from),
                        Err(_) => break,
                    }
                }
            }
        }
    }
    // Clients wait for shutdown through their registry links (the MQTT listener does the
    // same for its sessions; whichever comes first tells all).
    shared.broker.close_connections();
    drop(l);
    tasks.close();
    let deadline = shared.limits.shutdown_timeout + Duration::from_secs(2);
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        warn!(clients = tasks.len(), "MQTT-SN clients still open after {deadline:?}; leaving them");
    }
    info!("MQTT-SN gateway stopped");
}

/// The loop's state: who is connected from where.
struct Loop {
    gw: Arc<Gateway>,
    /// Connected clients by address (and node id behind a forwarder).
    clients: HashMap<Peer, Handle>,
    /// The address of each client task's key.
    keys: HashMap<u64, Peer>,
    /// The address of each connected client id (a sleeping client may wake from another).
    ids: HashMap<Arc<str>, Peer>,
    next_key: u64,
    tasks: TaskTracker,
    /// QoS -1 messages' task.
    qos_minus_one: Option<mpsc::Sender<(Peer, codec::Publish)>>,
    /// Encoding buffer of the answers sent from here.
    out: BytesMut,
}

impl Loop {
    /// A copy of `data` for a client's queue, charged to `mqtt.max_memory`.
    fn datagram_of(&self, data: &[u8], from: Peer) -> Datagram {
        let _held = self.gw.shared.memory.charge(data.len());
        Datagram { from, data: Bytes::copy_from_slice(data), _held }
    }

    /// A client task ended.
    fn forget(&mut self, key: u64) {
        if let Some(addr) = self.keys.remove(&key) {
            if let Some(h) = self.clients.remove(&addr) {
                if self.ids.get(&h.client_id) == Some(&addr) {
                    self.ids.remove(&h.client_id);
                }
            }
        }
    }

    /// One datagram from `addr`: a message, or one encapsulated by a forwarder for a node.
    fn datagram(&mut self, data: &[u8], addr: SocketAddr) {
        let m = &self.gw.metrics;
        m.received.inc();
        if data.len() > self.gw.config.max_datagram_size.value {
            m.drop_for("oversized");
            return;
        }
        if matches!(codec::header(data), Ok((msg_type::ENCAPSULATED, _))) {
            match codec::decode(&Bytes::copy_from_slice(data)) {
                Ok(Packet::Encapsulated { node_id, inner, .. }) => {
                    if matches!(codec::header(&inner), Ok((msg_type::ENCAPSULATED, _))) {
                        m.drop_for("nested_encapsulation");
                        return;
                    }
                    self.message(&inner, Peer { addr, node: Some(node_id) });
                }
                Ok(_) => {}
                Err(e) => m.drop_for(e.kind()),
            }
            return;
        }
        self.message(data, Peer::direct(addr));
    }

    /// One message from `from`.
    fn message(&mut self, data: &[u8], from: Peer) {
        let gw = Arc::clone(&self.gw);
        let m = &gw.metrics;
        let t = match codec::header(data) {
            Ok((t, _)) => t,
            Err(e) => {
                m.drop_for(e.kind());
                return;
            }
        };
        if let Some(h) = self.clients.get(&from) {
            if gw.shared.memory.over() {
                // `mqtt.max_memory`: the client sends it again.
                m.drop_for("max_memory");
                return;
            }
            let d = self.datagram_of(data, from.clone());
            match h.tx.try_send(d) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The client's task is behind (a full sink): UDP loses, the client resends.
                    m.drop_for("client_busy");
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let key = h.key;
                    self.forget(key);
                }
            }
        }
        match t {
            msg_type::CONNECT => self.connect(data, from),
            msg_type::SEARCHGW => {
                let p = Packet::GwInfo { gw_id: self.gw.config.gateway_id, gw_add: Bytes::new() };
                self.gw.send(&p, &from, &mut self.out);
            }
            msg_type::PUBLISH => match codec::decode(&Bytes::copy_from_slice(data)) {
                Ok(Packet::Publish(p)) if p.qos == SnQos::MinusOne => self.minus_one(p, from),
                Ok(_) => self.not_connected(from),
                Err(e) => m.drop_for(e.kind()),
            },
            msg_type::PINGREQ => match codec::decode(&Bytes::copy_from_slice(data)) {
                Ok(Packet::PingReq { client_id: Some(id) }) => self.wake_elsewhere(&id, data, from),
                Ok(_) => self.not_connected(from),
                Err(e) => m.drop_for(e.kind()),
            },
            // Other gateways' announcements and answers: nothing to do.
            msg_type::ADVERTISE | msg_type::GWINFO => m.drop_for("ignored"),
            msg_type::DISCONNECT => m.drop_for("not_connected"),
            _ => match codec::decode(&Bytes::copy_from_slice(data)) {
                Ok(_) => self.not_connected(from),
                Err(e) => m.drop_for(e.kind()),
            },
        }
    }

    /// A message that needs a connection from an address without one: DISCONNECT (2 octets,
    /// never more than came) tells the client to connect again.
    fn not_connected(&mut self, from: Peer) {
        self.gw.metrics.drop_for("not_connected");
        self.gw.send(&Packet::Disconnect { duration: None }, &from, &mut self.out);
    }

    /// A CONNECT from an address without a client: starts its task.
    fn connect(&mut self, data: &[u8], from: Peer) {
        let datagram = Bytes::copy_from_slice(data);
        let connect = match codec::decode(&datagram) {
            Ok(Packet::Connect(c)) => c,
            Ok(_) => return,
            Err(e) => {
                self.gw.metrics.drop_for(e.kind());
                return;
            }
        };
        if self.clients.len() >= self.gw.config.max_clients {
            self.gw.metrics.drop_for("max_clients");
            let p = Packet::ConnAck { code: ReturnCode::CONGESTION };
            self.gw.metrics.rejected_with(ReturnCode::CONGESTION);
            self.gw.send(&p, &from, &mut self.out);
            return;
        }
        let (tx, rx) = mpsc::channel(self.gw.config.client_queue.max(1));
        let _held = self.gw.shared.memory.charge(datagram.len());
        let _ = tx.try_send(Datagram { from: from.clone(), data: datagram, _held });
        self.next_key += 1;
        let key = self.next_key;
        let client_id: Arc<str> = Arc::from(connect.client_id.as_str());
        self.clients.insert(from.clone(), Handle { tx, key, client_id: Arc::clone(&client_id) });
        self.keys.insert(key, from.clone());
        self.ids.insert(client_id, from);
        self.tasks.spawn(client::run(Arc::clone(&self.gw), rx, key));
    }

    /// A PINGREQ with a client id from an address without a client: a sleeping client woke
    /// up elsewhere (another address, a forwarder's new port). Its task takes it from there.
    fn wake_elsewhere(&mut self, client_id: &str, data: &[u8], from: Peer) {
        let Some(old) = self.ids.get(client_id).cloned() else {
            self.not_connected(from);
            return;
        };
        let Some(h) = self.clients.remove(&old) else {
            self.not_connected(from);
            return;
        };
        let d = self.datagram_of(data, from.clone());
        if h.tx.try_send(d).is_err() {
            self.gw.metrics.drop_for("client_busy");
        }
        self.keys.insert(h.key, from.clone());
        self.ids.insert(Arc::clone(&h.client_id), from.clone());
        self.clients.insert(from, h);
    }

    /// A QoS -1 PUBLISH: to its task, or dropped (counted) when that is behind or disabled.
    fn minus_one(&mut self, p: codec::Publish, from: Peer) {
        let Some(tx) = &self.qos_minus_one else {
            self.gw.metrics.drop_for("qos_minus_one_disabled");
            return;
        };
        if tx.try_send((from, p)).is_err() {
            self.gw.metrics.drop_for("qos_minus_one_busy");
        }
    }
}

/// Publishes QoS -1 messages (no connection, no acknowledgement) as the client id
/// `mqttsn.qos_minus_one_client_id`: checked by the ACL as that client id, routed as QoS 0.
/// A task of its own so that a full sink holds back these messages only.
async fn publish_qos_minus_one(gw: Arc<Gateway>, mut rx: mpsc::Receiver<(Peer, codec::Publish)>) {
    let shared = Arc::clone(&gw.shared);
    let client_id: Arc<str> = Arc::from(gw.config.qos_minus_one_client_id.value.as_str());
    let mut hits = Vec::new();
    let mut out = BytesMut::new();
    loop {
        let next = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            n = rx.recv() => n,
        };
        let Some((from, p)) = next else { break };
        let topic: Option<String> = match p.topic {
            TopicRef::Predefined(id) => gw.predefined.name(id).map(|n| n.to_string()),
            TopicRef::Short(s) => std::str::from_utf8(&s).ok().map(str::to_owned),
            TopicRef::Normal(_) => None,
        };
        let valid = topic.filter(|t| {
            crate::mqtt::topic::validate_name(t).is_ok()
                && shared.limits.topic_limits.check(t).is_ok()
        });
        let Some(topic) = valid else {
            // A registered id means nothing without a connection.
            let id = u16::from_be_bytes(p.topic.id_bytes());
            let code = ReturnCode::INVALID_TOPIC_ID;
            gw.metrics.rejected_with(code);
            gw.send(&Packet::PubAck { topic_id: id, msg_id: 0, code }, &from, &mut out);
            continue;
        };
        shared.received[0].inc();
        let live = shared.live.load();
        let acl = live.auth.acl.for_client(None, &client_id);
        if !acl.may_publish(&topic) {
            shared.acl_denied_publish.inc();
            debug!(topic = %crate::logtext::LogText(&topic), "QoS -1 PUBLISH denied by the ACL");
            continue;
        }
        if !gw.config.client_id_allowed(&client_id) {
            gw.metrics.drop_for("client_id_not_allowed");
            continue;
        }
        if shared.memory.over() {
            shared.metrics.dropped("max_memory");
            continue;
        }
        let charge = shared.memory.charge(topic.len() + p.data.len());
        let msg = Arc::new(Message {
            charge,
            topic,
            payload: p.data,
            qos: crate::mqtt::codec::QoS::AtMostOnce,
            retain: p.retain,
            client_id: Arc::clone(&client_id),
            username: None,
            properties: crate::mqtt::codec::PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
        });
        let mut blocked = Blocked::new();
        let _ = route(shared.routing(&live), &msg, None, &mut hits, &mut blocked);
        drop(live);
        if !blocked.is_empty() {
            send_blocked(blocked).await;
        }
    }
}
