//! The clients and subscriptions routes (the web console's views; JSON):
//!
//! ```text
//! GET    /api/v1/clients?search=&after=&limit=   connected and parked client ids, by id
//! GET    /api/v1/clients/{id}                    one, with its subscriptions
//! DELETE /api/v1/clients/{id}                    disconnect (MQTT 5: DISCONNECT 0x98)
//! GET    /api/v1/subscriptions?search=&after=&limit=
//! ```
//!
//! Everything is a snapshot taken under the broker's locks for one pass (the registry's, then
//! the subscription tree's, never both at once) and bounded by `limit`; nothing here waits
//! while holding one. In a cluster the list and `GET /clients/{id}` also show the clients
//! connected on the other nodes (`node`: where; known from the cluster's notices, without their
//! details or subscriptions); disconnecting one is done on its node.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

use super::reply::{self, error, json};
use super::AdminState;
use crate::broker::sessions::ClientSnapshot;
use crate::broker::SubscriptionSnapshot;

/// A client as listed.
#[derive(Serialize)]
struct Client {
    client_id: String,
    /// In a cluster: the node it is connected to or parked on (`null` on a single node).
    node: Option<String>,
    /// Connected on another node of the cluster (only `node` and `connected_at` are known).
    remote: bool,
    user: Option<String>,
    /// A connection holds the client id.
    connected: bool,
    /// Its address, once its CONNECT completed.
    peer: Option<String>,
    /// `3.1.1`, `5.0` or `MQTT-SN 1.2`.
    protocol: Option<&'static str>,
    keep_alive: Option<u16>,
    connected_at: Option<String>,
    /// The session's id (connected or parked).
    session_id: Option<u64>,
    /// A parked session is kept for it.
    parked: bool,
    /// Seconds until the parked session expires (`null`: never, or not parked).
    expires_in: Option<u64>,
    /// Messages queued for the parked session.
    queued: Option<usize>,
}

impl Client {
    fn of(c: &ClientSnapshot, node: Option<&str>) -> Client {
        Client {
            client_id: c.client_id.to_string(),
            node: node.map(str::to_owned),
            remote: false,
            user: c.user.as_deref().map(str::to_owned),
            connected: c.connected,
            peer: c
                .conn
                .as_ref()
                .map(|i| std::net::SocketAddr::new(i.peer_ip, i.peer_port).to_string()),
            protocol: c.conn.as_ref().map(|i| i.protocol.name()),
            keep_alive: c.conn.as_ref().map(|i| i.keep_alive),
            connected_at: c.conn.as_ref().map(|i| super::iso8601(i.connected_at_ms)),
            session_id: c
                .conn
                .as_ref()
                .map(|i| i.session_id)
                .or(c.parked.as_ref().map(|p| p.session_id)),
            parked: c.parked.is_some(),
            expires_in: c.parked.as_ref().and_then(|p| p.expires_in),
            queued: c.parked.as_ref().map(|p| p.queued),
        }
    }

    /// A client connected on another node of the cluster.
    fn remote(c: &crate::cluster::RemoteClient) -> Client {
        Client {
            client_id: c.client_id.clone(),
            node: Some(c.node.to_string()),
            remote: true,
            user: None,
            connected: true,
            peer: None,
            protocol: None,
            keep_alive: None,
            connected_at: Some(super::iso8601(c.since_ms)),
            session_id: None,
            parked: false,
            expires_in: None,
            queued: None,
        }
    }
}

/// A page of clients.
#[derive(Serialize)]
struct ClientPage {
    /// Client ids matching the search, in all.
    count: usize,
    clients: Vec<Client>,
    /// The `after` of the next page; `null` on the last one.
    next_after: Option<String>,
}

pub(super) async fn list(State(state): State<AdminState>, RawQuery(q): RawQuery) -> Response {
    let params = match reply::query(q.as_deref(), &["search", "after", "limit"]) {
        Ok(p) => p,
        Err(m) => return reply::bad(m),
    };
    let limit = match reply::limit(reply::get(&params, "limit")) {
        Ok(n) => n,
        Err(m) => return reply::bad(m),
    };
    let search = reply::get(&params, "search").unwrap_or("");
    let broker = &state.gateway.broker;
    let after = reply::get(&params, "after");
    let (page, mut count) = broker.clients(search, after, limit + 1);
    let node = broker.cluster().map(|c| c.node_id());
    let mut clients: Vec<Client> = page.iter().map(|c| Client::of(c, node)).collect();
    if let Some(cluster) = broker.cluster() {
        // Merged by client id; a client id in both (a takeover under way) listed once, here.
        let (remote, n) = cluster.remote_clients(search, after, limit + 1);
        let local: std::collections::HashSet<String> =
            clients.iter().map(|c| c.client_id.clone()).collect();
        count += n;
        for r in &remote {
            if local.contains(&r.client_id) {
                count -= 1;
            } else {
                clients.push(Client::remote(r));
            }
        }
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    }
    let more = clients.len() > limit;
    clients.truncate(limit);
    let next_after = if more { clients.last().map(|c| c.client_id.clone()) } else { None };
    json(StatusCode::OK, &ClientPage { count, clients, next_after })
}

/// One subscription as listed.
#[derive(Serialize)]
struct Subscription {
    filter: String,
    /// The subscribing client (`null`: its session ended meanwhile).
    client_id: Option<String>,
    session_id: u64,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    subscription_id: Option<u32>,
    /// Messages queued for the session now.
    queued: usize,
}

fn subscriptions_of(
    state: &AdminState,
    subs: Vec<SubscriptionSnapshot>,
    client: Option<&str>,
) -> Vec<Subscription> {
    let ids: Vec<u64> = subs.iter().map(|s| s.session_id).collect();
    let clients = match client {
        Some(c) => vec![Some(std::sync::Arc::from(c)); ids.len()],
        None => state.gateway.broker.client_ids_of(&ids),
    };
    subs.into_iter()
        .zip(clients)
        .map(|(s, c)| Subscription {
            filter: s.filter,
            client_id: c.map(|c| c.to_string()),
            session_id: s.session_id,
            qos: s.options.qos as u8,
            no_local: s.options.no_local,
            retain_as_published: s.options.retain_as_published,
            subscription_id: s.options.subscription_id,
            queued: s.queued,
        })
        .collect()
}

/// One client in full.
#[derive(Serialize)]
struct ClientDetail {
    #[serde(flatten)]
    client: Client,
    /// Its subscriptions (at most `MAX_PAGE`), by filter.
    subscriptions: Vec<Subscription>,
}

pub(super) async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let broker = &state.gateway.broker;
    let node = broker.cluster().map(|c| c.node_id());
    let Some(c) = broker.client(&id) else {
        if let Some(remote) = broker.cluster().and_then(|c| c.remote_client(&id)) {
            let detail = ClientDetail { client: Client::remote(&remote), subscriptions: vec![] };
            return json(StatusCode::OK, &detail);
        }
        return error(StatusCode::NOT_FOUND, &format!("no client {id:?}"));
    };
    let detail = Client::of(&c, node);
    let subs = match detail.session_id {
        Some(session) => broker.subscriptions("", None, reply::MAX_PAGE, Some(session)).0,
        None => Vec::new(),
    };
    let subscriptions = subscriptions_of(&state, subs, Some(&id));
    json(StatusCode::OK, &ClientDetail { client: detail, subscriptions })
}

pub(super) async fn disconnect(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Response {
    if state.gateway.broker.disconnect_client(&id) {
        tracing::info!(client_id = %crate::logtext::LogText(&id), "client disconnected by an operator (admin API)");
        json(StatusCode::OK, &serde_json::json!({ "disconnected": id }))
    } else {
        error(StatusCode::NOT_FOUND, &format!("client {id:?} is not connected"))
    }
}

/// A page of subscriptions.
#[derive(Serialize)]
struct SubscriptionPage {
    /// Subscriptions matching the search, in all.
    count: usize,
    subscriptions: Vec<Subscription>,
    /// The `after` of the next page (`SESSION:FILTER`); `null` on the last one.
    next_after: Option<String>,
}

pub(super) async fn subscriptions(
    State(state): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Response {
    let params = match reply::query(q.as_deref(), &["search", "after", "limit"]) {
        Ok(p) => p,
        Err(m) => return reply::bad(m),
    };
    let limit = match reply::limit(reply::get(&params, "limit")) {
        Ok(n) => n,
        Err(m) => return reply::bad(m),
    };
    let after = match reply::get(&params, "after") {
        None => None,
        Some(a) => match a.split_once(':').and_then(|(s, f)| Some((f, s.parse::<u64>().ok()?))) {
            Some(cursor) => Some(cursor),
            None => return error(StatusCode::BAD_REQUEST, "after: SESSION:FILTER (next_after)"),
        },
    };
    let search = reply::get(&params, "search").unwrap_or("");
    let broker = &state.gateway.broker;
    let (mut page, count) = broker.subscriptions(search, after, limit + 1, None);
    let more = page.len() > limit;
    page.truncate(limit);
    let next_after =
        if more { page.last().map(|s| format!("{}:{}", s.session_id, s.filter)) } else { None };
    let subscriptions = subscriptions_of(&state, page, None);
    json(StatusCode::OK, &SubscriptionPage { count, subscriptions, next_after })
}
