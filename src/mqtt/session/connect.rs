//! The CONNECT handshake: wait (bounded) for CONNECT, check it, authenticate (off the async
//! workers, see `auth`), register the client id (taking it over from a connection that holds
//! it, and waiting, bounded, until that one has parked its session), resume or start the
//! session, specialise the ACL for this client, answer CONNACK. Returns what the session
//! needs, or `None` when the connection must close.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::SessionShared;
use crate::auth::acl::{ClientAcl, Grant};
use crate::auth::Refusal;
use crate::broker::persist::SessionKey;

use crate::broker::sessions::{Owner, Refused};
use crate::broker::{CloseReason, Expiry, Registration, SessionState};
use crate::cluster::Claim;
use crate::metrics::ReasonLabels;
use crate::mqtt::codec::{
    ConnAck, Connect, DecodeError, LastWill, Packet, Properties, ProtocolVersion, ReasonCode,
};
use crate::mqtt::connection::Connection;
use crate::mqtt::topic;

/// The Response Information given to an MQTT 5 client that asks for it (Request Response
/// Information 1): this prefix and its client id.
pub const RESPONSE_TOPIC_PREFIX: &str = "mqgate/response/";

/// What a successful handshake hands to the session.
pub(super) struct Connected {
    pub version: ProtocolVersion,
    pub client_id: Arc<str>,
    pub username: Option<Arc<str>>,
    /// The ACL specialised for this client.
    pub acl: ClientAcl,
    /// The config snapshot it was admitted by.
    pub live: Arc<crate::reload::Live>,
    /// The client id's registration: connection id and the link to the registry.
    pub registration: Registration,
    /// The resumed or new session state.
    pub state: SessionState,
    /// How long the session is kept after the connection ends.
    pub expiry: Expiry,
    pub keepalive: Option<Duration>,
    pub will: Option<LastWill>,
    pub problem_info: bool,
    /// The client's Receive Maximum (MQTT 5), caps our outbound window.
    pub client_receive_maximum: Option<u16>,
    /// The client's Topic Alias Maximum (MQTT 5): aliases we may set on deliveries.
    pub client_topic_alias_maximum: u16,
}

/// Runs the handshake. `Ok(None)`: the connection must close (an answer may be queued).
pub(super) async fn handshake<S>(
    conn: &mut Connection<S>,
    shared: &SessionShared,
    peer: std::net::SocketAddr,
) -> std::io::Result<Option<Connected>>
where
    S: crate::listeners::Transport,
{
    let deadline = tokio::time::Instant::now() + shared.limits.connect_timeout;
    let connect = loop {
        match conn.decode() {
            Ok(Some(Packet::Connect(c))) => break c,
            Ok(Some(other)) => {
                shared.metrics.protocol_error("first_packet_not_connect");
                debug!(packet = other.name(), "first packet is not CONNECT");
                return Ok(None);
            }
            Ok(None) => {}
            Err(e) => {
                refuse_undecodable(conn, shared, &e);
                return Ok(None);
            }
        }
        tokio::select! {
            read = conn.fill() => {
                if !read? {
                    return Ok(None);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                shared.metrics.protocol_error("connect_timeout");
                debug!("no CONNECT within {:?}", shared.limits.connect_timeout);
                return Ok(None);
            }
            () = shared.shutdown.cancelled() => return Ok(None),
        }
    };
    // A verified client certificate's name (`tls.identity`) is the user name: no password.
    let cert_user: Option<Arc<str>> = conn.stream().certificate_user().map(Arc::from);
    Ok(admit(conn, shared, peer, connect, cert_user, deadline).await)
}

/// The handshake once the CONNECT is read: everything but reading it. It touches the
/// connection only to queue the CONNACK, so it also runs on a socket that tokio does not know
/// (`session::start_direct`, which polls it once on the idle pool's thread: with no password to
/// verify, no takeover to wait for and no cluster, it completes in that one poll). `None`:
/// the connection must close (a refusal may be queued).
pub(super) async fn admit<S>(
    conn: &mut Connection<S>,
    shared: &SessionShared,
    peer: std::net::SocketAddr,
    connect: Box<Connect>,
    cert_user: Option<Arc<str>>,
    deadline: tokio::time::Instant,
) -> Option<Connected> {
    // The users and ACL this CONNECT is checked against (a reload after this is seen by the
    // session at its first packet).
    let live = shared.live.load();
    let version = connect.protocol;
    let client_max_packet = connect.properties.maximum_packet_size;
    conn.set_version(version, client_max_packet);
    let accepted = match (accept(&connect, shared), &cert_user) {
        (Ok(accepted), Some(user)) => certificate_login(&connect, user, shared).map(|()| accepted),
        (Ok(accepted), None) => {
            authenticate(&connect, shared, &live.auth, deadline).await.map(|()| accepted)
        }
        (Err(refused), _) => Err(refused),
    };
    let accepted = match accepted {
        Ok(accepted) => accepted,
        Err((code, reason)) => {
            refuse(conn, &connect, code, reason);
            return None;
        }
    };
    // Who the client is: its user name or certificate identity, or anonymous.
    let username = cert_user.as_deref().or(connect.username.as_deref());
    if !live.auth.client_id_allowed(username, &accepted.client_id) {
        let reason = ReasonLabels { reason: "client_id_not_allowed".into() };
        shared.metrics.auth_refused.get_or_create(&reason).inc();
        refuse(
            conn,
            &connect,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            "this user may not use this client id",
        );
        return None;
    }
    let owner = Owner::of(username);
    // One string for the session, its messages and its registry entry.
    let client_id: Arc<str> = Arc::from(accepted.client_id.as_str());
    let registration = match shared.broker.register(
        &client_id,
        owner.clone(),
        shared.limits.same_identity,
        shared.limits.max_sessions,
    ) {
        Ok(registration) => registration,
        Err(Refused::Full) => {
            let reason = ReasonLabels { reason: "max_sessions".into() };
            shared.metrics.auth_refused.get_or_create(&reason).inc();
            let reason = "mqtt.max_sessions reached (connected and parked sessions)";
            refuse(conn, &connect, ReasonCode::QUOTA_EXCEEDED, reason);
            return None;
        }
        Err(Refused::Owned(_)) => {
            let reason = ReasonLabels { reason: "client_id_owned".into() };
            shared.metrics.auth_refused.get_or_create(&reason).inc();
            debug!(client_id = %crate::logtext::LogText(&accepted.client_id), "client id held by another identity");
            let reason = "the client id's session belongs to another identity";
            refuse(conn, &connect, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, reason);
            return None;
        }
    };
    if shared.shutdown.is_cancelled() {
        // Registered after the listener told every registered connection to close.
        registration.link.0.close(CloseReason::Shutdown);
    }
    if let Some(cluster) = shared.broker.cluster() {
        // One connection per client id across the cluster: the other nodes close theirs.
        let persistent = match version {
            ProtocolVersion::V311 => !connect.clean_start,
            ProtocolVersion::V5 => connect.properties.session_expiry_interval.unwrap_or(0) > 0,
        };
        let refused = match cluster.claim(&client_id, registration.conn_id, deadline).await {
            Claim::Held => None,
            // A clean session is served without the cluster (only this node's state).
            Claim::Unavailable(why) if !persistent => {
                debug!(%why, "cluster unreachable: a clean session without the cluster-wide client id lock");
                None
            }
            Claim::Unavailable(_) => Some((
                ReasonCode::SERVER_UNAVAILABLE,
                "this node cannot reach the cluster: no persistent session now",
            )),
            Claim::Busy => {
                Some((ReasonCode::SERVER_BUSY, "the client id is still connected on another node"))
            }
        };
        if let Some((code, reason)) = refused {
            shared.broker.unregister(&accepted.client_id, registration.conn_id);
            refuse(conn, &connect, code, reason);
            return None;
        }
    }
    if let (Some(cluster), Some(will)) = (shared.broker.cluster(), &connect.will) {
        // Kept by the other nodes too: published by one of them if this node dies.
        let acl = live.auth.acl.for_client(username, &accepted.client_id);
        if acl.may_publish(&will.topic) {
            let msg = crate::message::Message {
                charge: Default::default(),
                topic: will.topic.clone(),
                payload: will.payload.clone(),
                qos: will.qos,
                retain: will.retain,
                client_id: Arc::clone(&client_id),
                username: username.map(Arc::from),
                properties: Properties { will_delay_interval: None, ..will.properties.clone() }
                    .into(),
                received: std::time::Instant::now(),
                packet_id: None,
            };
            cluster.will_set(&client_id, registration.conn_id, &msg);
        }
    }
    if let Some(previous) = &registration.previous {
        // Takeover: the old connection was told to close; its session state is ours only
        // once it has parked it.
        if tokio::time::timeout_at(deadline, previous.parked()).await.is_err() {
            shared.broker.unregister(&accepted.client_id, registration.conn_id);
            let reason = "the previous connection of this client id is still closing";
            refuse(conn, &connect, ReasonCode::SERVER_BUSY, reason);
            return None;
        }
    }
    let asked = match version {
        ProtocolVersion::V311 if connect.clean_start => Expiry::Now,
        ProtocolVersion::V311 => Expiry::Never,
        ProtocolVersion::V5 => {
            Expiry::from_interval(connect.properties.session_expiry_interval.unwrap_or(0))
        }
    };
    // `mqtt.max_session_expiry` caps every kept session, 3.1.1 persistent ones too.
    let cap = shared.limits.max_session_expiry;
    let expiry = match asked {
        Expiry::Never if cap > 0 => Expiry::After(cap),
        Expiry::After(s) if cap > 0 && s > cap => Expiry::After(cap),
        other => other,
    };
    // `expired_queued`: this node's parked session had just expired; its queue in RabbitMQ
    // is deleted below, before anything new is opened.
    let (resumed, expired_queued) = shared.broker.take_session_for_connect(&accepted.client_id);
    let resumed = match resumed {
        Some(old) if connect.clean_start => {
            shared.broker.discard_session(old);
            None
        }
        other => other,
    };
    // In a cluster, a persistent session lives in a queue in RabbitMQ (`cluster::psession`):
    // a clean start on any node ends the one the client had on any node. MQTT 5 clean start
    // 0 with expiry 0 resumes the one kept there (this node's, or one another node announced),
    // which then ends with this connection (MQTT 5 §3.1.2.4).
    let resumes_queued = |c: &crate::cluster::Cluster| {
        !connect.clean_start
            && !expired_queued
            && (resumed.as_ref().is_some_and(|s| s.subscriber.is_queued())
                || c.knows_session(&client_id))
    };
    let queued = shared.broker.cluster().filter(|c| expiry != Expiry::Now || resumes_queued(c));
    let resumed = match (shared.broker.cluster(), resumed) {
        (Some(cluster), resumed) if queued.is_none() => {
            cluster.drop_session(
                &client_id,
                expired_queued || resumed.as_ref().is_some_and(|s| s.subscriber.is_queued()),
            );
            match resumed {
                // Kept in RabbitMQ, not here: it cannot go on as a session ending with this
                // connection.
                Some(old) if old.subscriber.is_queued() => {
                    shared.broker.discard_session(old);
                    None
                }
                other => other,
            }
        }
        (_, resumed) => resumed,
    };
    let open = match &resumed {
        _ if connect.clean_start || expired_queued => crate::cluster::Open::Fresh,
        Some(_) => crate::cluster::Open::Local,
        None => crate::cluster::Open::Resume,
    };
    let mut session_present = resumed.is_some();
    let mut state = resumed.unwrap_or_else(|| {
        let capacity = match expiry {
            Expiry::Now => shared.limits.outbound_queue,
            _ => shared.limits.max_queued_messages,
        };
        // A persistent session is kept in the store, when there is one.
        let stored = (expiry != Expiry::Now && shared.broker.persist().is_some())
            .then(|| SessionKey::new(&client_id));
        let max_bytes = shared.limits.max_queued_bytes;
        SessionState::with_bytes(shared.broker.next_id(), capacity, max_bytes, stored)
    });
    if let Some(cluster) = queued {
        let limits = crate::cluster::Limits {
            expiry,
            max_messages: shared.limits.max_queued_messages,
            max_bytes: shared.limits.max_queued_bytes,
            max_message: shared.limits.max_packet_size as usize,
            max_record: shared.limits.max_subscriptions
                * (shared.limits.topic_limits.max_length + 64),
        };
        match cluster_session(cluster, shared, &client_id, &mut state, open, limits, &owner).await {
            Ok(present) => session_present = present,
            Err((code, why)) => {
                warn!(reason = %why, "persistent session not opened in the cluster");
                shared.broker.discard_session(state);
                shared.broker.unregister(&accepted.client_id, registration.conn_id);
                let reason = format!("the session could not be opened in the cluster: {why}");
                refuse(conn, &connect, code, &reason);
                return None;
            }
        }
    }
    // A will still waiting for its delay: never sent if the session resumes, sent now if not.
    shared.broker.claim_will(&accepted.client_id, session_present);
    state.version = version;
    // The session's user name: the owner's string, not a copy of it.
    let user_name = match &owner {
        Owner::User(name) => Some(Arc::clone(name)),
        Owner::Anonymous | Owner::Unknown => None,
    };
    // A new session is the client's; one restored from an older store becomes it.
    state.owner = owner;
    let mut acl = live.auth.acl.for_client(username, &accepted.client_id);
    if session_present {
        // The resuming client's ACL decides what the session may still receive.
        let grants: Vec<(String, Grant)> =
            state.filters.keys().map(|f| (f.clone(), acl.grant(f))).collect();
        if grants.iter().any(|(_, g)| *g == Grant::Filtered) {
            acl.set_filtering();
        }
        let revoked: Vec<String> =
            grants.into_iter().filter(|(_, g)| *g == Grant::Refused).map(|(f, _)| f).collect();
        let any_revoked = !revoked.is_empty();
        for filter in revoked {
            state.filters.remove(&filter);
            shared.broker.unsubscribe(state.id, &filter);
            shared.acl_denied_subscribe.inc();
            debug!(filter = %crate::logtext::LogText(&filter), "resumed subscription no longer allowed by the ACL: removed");
        }
        if any_revoked {
            // What was queued or sent for it is not this client's to read either.
            let readable = |topic: &str| acl.may_receive(topic);
            let subscriber = Arc::clone(&state.subscriber);
            for out in subscriber.queue.remove_unless(|out| readable(&out.msg.topic)) {
                shared.broker.unstore(&subscriber, out.stored);
                crate::broker::tracking::finish(out.ticket, crate::broker::tracking::Fate::Gone);
            }
            let (keep, drop): (Vec<_>, Vec<_>) =
                state.inflight.drain(..).partition(|f| readable(&f.msg.topic));
            for f in drop {
                state.inflight_ids.remove(&f.packet_id);
                shared.broker.unstore(&subscriber, f.stored);
                crate::broker::tracking::finish(f.ticket, crate::broker::tracking::Fate::Gone);
            }
            state.inflight = keep.into();
        }
    }
    if expiry != Expiry::Now || queued.is_some() {
        // Its record (not waited for: SUBSCRIBE is what a client relies on being kept); in a
        // cluster the other nodes hear the session is served here, with its expiry.
        shared.broker.store_session(&state, expiry, false);
    }
    if let Some(cluster) = queued {
        cluster.session_start(state.id);
    }
    let mut properties = Properties::default();
    if version == ProtocolVersion::V5 {
        properties.receive_maximum = Some(shared.limits.receive_maximum);
        if expiry != asked {
            // Capped by mqtt.max_session_expiry: the client is told (MQTT 5 §3.2.2.3.2).
            properties.session_expiry_interval = Some(expiry.seconds());
        }
        properties.maximum_packet_size = Some(shared.limits.max_packet_size);
        properties.subscription_identifier_available = Some(1);
        properties.shared_subscription_available = Some(1);
        properties.topic_alias_maximum = Some(shared.limits.topic_alias_maximum);
        if accepted.assigned {
            properties.assigned_client_identifier = Some(accepted.client_id.clone());
        }
        if connect.properties.request_response_information == Some(1) {
            // A per-client prefix for response topics (docs/reference.md: "Response Information"); the
            // ACL still decides whether the client may use it.
            properties.response_information =
                Some(format!("{RESPONSE_TOPIC_PREFIX}{}", accepted.client_id));
        }
        if accepted.keep_alive != connect.keep_alive {
            properties.server_keep_alive = Some(accepted.keep_alive);
        }
    }
    let connack = ConnAck { session_present, code: ReasonCode::SUCCESS, properties };
    if let Err(e) = conn.queue(&Packet::ConnAck(Box::new(connack))) {
        warn!(error = %e, "cannot encode CONNACK");
        shared.broker.park_session(&accepted.client_id, state, expiry);
        shared.broker.unregister(&accepted.client_id, registration.conn_id);
        return None;
    }
    // The silence allowed: 1.5 × keepalive. A 3.1.1 client cannot be told `max_keepalive`, so
    // it is held to it anyway; one without keepalive (either version) gets `idle_timeout`.
    let max = shared.limits.max_keepalive;
    let keep_alive = match accepted.keep_alive {
        k if max > 0 && k > max => max,
        k => k,
    };
    registration.link.0.describe(crate::broker::sessions::ConnInfo {
        peer_ip: peer.ip(),
        peer_port: peer.port(),
        protocol: version.into(),
        keep_alive,
        connected_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        session_id: state.id,
    });
    let keepalive = match keep_alive {
        0 => Some(shared.limits.idle_timeout).filter(|d| !d.is_zero()),
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    Some(Connected {
        version,
        client_id,
        username: user_name,
        acl,
        live,
        registration,
        state,
        expiry,
        keepalive,
        will: connect.will.clone(),
        problem_info: connect.properties.request_problem_information != Some(0),
        client_receive_maximum: connect.properties.receive_maximum,
        client_topic_alias_maximum: match version {
            ProtocolVersion::V5 => connect.properties.topic_alias_maximum.unwrap_or(0),
            ProtocolVersion::V311 => 0,
        },
    })
}

/// Opens the cluster session queue of the persistent session `state` (`cluster::psession`):
/// its subscriptions are served through it from now on; resumed from another node, they come
/// back from its record. Returns whether the session existed (session present).
async fn cluster_session(
    cluster: &crate::cluster::Cluster,
    shared: &SessionShared,
    client_id: &Arc<str>,
    state: &mut SessionState,
    open: crate::cluster::Open,
    limits: crate::cluster::Limits,
    owner: &Owner,
) -> Result<bool, (ReasonCode, String)> {
    let broker = &shared.broker;
    if !state.subscriber.is_queued() {
        // Subscribed before (a session restored from the store): again, as a queued one.
        let filters: Vec<_> = state.filters.iter().map(|(f, o)| (f.clone(), *o)).collect();
        for (filter, _) in &filters {
            broker.unsubscribe(state.id, filter);
        }
        state.subscriber.set_queued();
        for (filter, options) in &filters {
            broker.subscribe(state.id, filter, *options, &state.subscriber);
        }
    }
    let opened = cluster
        .open_session(broker, client_id, state.id, open, limits)
        .await
        .map_err(|e| (ReasonCode::SERVER_UNAVAILABLE, e))?;
    if let Some(bytes) = opened.record {
        let record = crate::broker::persist::SessionRecord::decode(&bytes)
            .map_err(|e| (ReasonCode::UNSPECIFIED_ERROR, e.to_string()))?;
        if !record.owner.admits(owner) {
            cluster.session_ended(state.id);
            let why = "the client id's session belongs to another identity".to_owned();
            return Err((ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, why));
        }
        for (filter, options) in record.subscriptions {
            broker.subscribe(state.id, &filter, options, &state.subscriber);
            state.filters.insert(filter, options);
        }
    }
    Ok(opened.present)
}

/// Answers a refused CONNECT with CONNACK `code` (and the reason string when allowed).
fn refuse<S>(conn: &mut Connection<S>, connect: &Connect, code: ReasonCode, reason: &str) {
    debug!(?code, reason, "CONNECT refused");
    let mut properties = Properties::default();
    if connect.protocol == ProtocolVersion::V5
        && connect.properties.request_problem_information != Some(0)
    {
        properties.reason_string = Some(reason.to_owned());
    }
    let connack = ConnAck { session_present: false, code, properties };
    let _ = conn.queue(&Packet::ConnAck(Box::new(connack)));
}

/// A CONNECT that passed the checks.
struct Accepted {
    client_id: String,
    /// The id was assigned by us (MQTT 5 Assigned Client Identifier).
    assigned: bool,
    /// Keepalive granted.
    keep_alive: u16,
}

fn accept(c: &Connect, shared: &SessionShared) -> Result<Accepted, (ReasonCode, &'static str)> {
    if c.properties.authentication_method.is_some() {
        return Err((
            ReasonCode::BAD_AUTHENTICATION_METHOD,
            "enhanced authentication is not supported",
        ));
    }
    if let Some(will) = &c.will {
        if topic::validate_name(&will.topic).is_err() {
            return Err((ReasonCode::TOPIC_NAME_INVALID, "invalid will topic"));
        }
        // As a PUBLISH with more is refused (the decoder kept one more than the limit).
        if will.properties.user_properties.len() > usize::from(shared.limits.max_user_properties) {
            shared.metrics.dropped("too_many_user_properties");
            return Err((
                ReasonCode::QUOTA_EXCEEDED,
                "the will has more user properties than mqtt.max_user_properties",
            ));
        }
    }
    let (client_id, assigned) = if c.client_id.is_empty() {
        if c.protocol == ProtocolVersion::V311 && !c.clean_start {
            return Err((
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "an empty client id needs clean session",
            ));
        }
        (generated_client_id(), c.protocol == ProtocolVersion::V5)
    } else {
        (c.client_id.clone(), false)
    };
    let max = shared.limits.max_keepalive;
    let keep_alive = if max > 0
        && (c.keep_alive == 0 || c.keep_alive > max)
        && c.protocol == ProtocolVersion::V5
    {
        max
    } else {
        c.keep_alive
    };
    Ok(Accepted { client_id, assigned, keep_alive })
}

/// A client authenticated by its certificate: a CONNECT may repeat the certificate's name as
/// its user name, or carry none; another name is refused (0x86 / 3.1.1 return code 4), so a
/// device cannot act under a name its certificate does not prove. A password is not checked.
fn certificate_login(
    c: &Connect,
    user: &str,
    shared: &SessionShared,
) -> Result<(), (ReasonCode, &'static str)> {
    match c.username.as_deref() {
        Some(given) if given != user => {
            let reason = ReasonLabels { reason: "certificate_user_mismatch".into() };
            shared.metrics.auth_refused.get_or_create(&reason).inc();
            Err((
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "the user name is not the client certificate's name",
            ))
        }
        _ => Ok(()),
    }
}

/// Checks the credentials (on the blocking pool, bounded; see `auth`). The wait for a
/// verification slot counts against the CONNECT timeout.
async fn authenticate(
    c: &Connect,
    shared: &SessionShared,
    auth: &crate::auth::Authenticator,
    deadline: tokio::time::Instant,
) -> Result<(), (ReasonCode, &'static str)> {
    let refusal = match shared
        .logins
        .authenticate(auth, c.username.as_deref(), c.password.as_deref(), deadline)
        .await
    {
        Ok(()) => return Ok(()),
        Err(r) => r,
    };
    shared
        .metrics
        .auth_refused
        .get_or_create(&ReasonLabels { reason: refusal.label().into() })
        .inc();
    Err(match refusal {
        Refusal::BadCredentials => {
            (ReasonCode::BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
        }
        Refusal::NotAuthorized => (ReasonCode::NOT_AUTHORIZED, "anonymous clients are not allowed"),
        Refusal::Busy => (ReasonCode::SERVER_BUSY, "too many clients authenticating; retry"),
    })
}

/// An unpredictable client id (128 random bits from the TLS library's CSPRNG): a client
/// cannot guess another's assigned id to take its session.
fn generated_client_id() -> String {
    use std::fmt::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut bytes = [0u8; 16];
    let random = rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut bytes);
    if random.is_err() {
        // Never expected; still unique, and not the session of anyone else (ownership).
        static NEXT: AtomicU64 = AtomicU64::new(1);
        bytes[..8].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    let mut id = String::with_capacity(7 + 32);
    id.push_str("mqgate-");
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// Answers a CONNECT that could not be decoded: CONNACK 0x01/0x84 for an unsupported protocol
/// version, nothing for anything else (we cannot know which version to answer in).
pub(super) fn refuse_undecodable<S>(
    conn: &mut Connection<S>,
    shared: &SessionShared,
    e: &DecodeError,
) {
    shared.metrics.protocol_error(e.kind());
    debug!(error = %e, "bad CONNECT");
    if e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
        // 3.1.1 §3.2.2.3: return code 0x01, then close. Encoded as 3.1.1 (the default).
        let connack = ConnAck {
            session_present: false,
            code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            properties: Properties::default(),
        };
        let _ = conn.queue(&Packet::ConnAck(Box::new(connack)));
    }
}
