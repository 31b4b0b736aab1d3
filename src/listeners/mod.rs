//! The MQTT listeners: plain TCP (`mqtt.listen` and `kind: tcp`), TLS, WebSocket and
//! WebSocket over TLS (`mqtt.listeners:`), each optionally behind the PROXY protocol. Whatever
//! the kind, a connection ends up as a [`Transport`] handed to the same session code, under
//! the same connection cap, registry, rules and limits.
//!
//! What runs before the session (PROXY header, TLS handshake, WebSocket upgrade) is bounded by
//! `mqtt.connect_timeout`; every refusal is counted by listener and reason
//! (`mqgate_tls_handshake_failures_total`). A plain TCP listener without PROXY protocol skips
//! all of it: its connections cost what they cost before listeners had kinds.

pub mod config;
pub mod proxy;
pub mod tls;
pub mod ws;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub use config::{IdentitySource, ListenerConfig, ListenerKind};

/// A connection's byte stream, whatever the listener: what the session reads and writes.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The user name the transport itself authenticated: the configured name of a verified
    /// client certificate (`tls.identity`). `None` on plain TCP and without `identity`.
    fn certificate_user(&self) -> Option<&str> {
        None
    }

    /// Whether a quiet connection on this transport can rest (`mqtt/idle.rs`): only a plain
    /// socket can wait in the idle pool's epoll set (TLS and WebSocket keep state of their own).
    const RESTS: bool = false;

    /// The plain socket, for a transport that [`RESTS`](Self::RESTS).
    fn into_tcp(self) -> Result<TcpStream, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

impl Transport for TcpStream {
    const RESTS: bool = true;

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}

/// A TLS connection and the user its client certificate names.
pub struct TlsTransport {
    /// The TLS stream.
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The certificate's name, with `identity` set and a certificate presented.
    user: Option<Box<str>>,
}

impl Transport for TlsTransport {
    fn certificate_user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

impl<S: Transport> Transport for ws::WsStream<S> {
    fn certificate_user(&self) -> Option<&str> {
        self.get_ref().certificate_user()
    }
}

impl AsyncRead for TlsTransport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsTransport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Labels of a per-listener series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener's label (`mqtt` for `mqtt.listen`, else its `name` or `kind:listen`).
    pub listener: String,
}

/// Labels of a refused handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// The listener's label.
    pub listener: String,
    /// Why: `timeout`, `not_tls`, `untrusted_cert`, `expired_cert`, `no_client_cert`,
    /// `no_identity`, `proxy_header`, `ws_wrong_path`, `ws_no_subprotocol`, `ws_origin`, ...
    pub reason: String,
}

/// The listeners' metric families.
#[derive(Clone, Default)]
pub struct ListenerFamilies {
    /// Connections accepted, per listener.
    pub accepted: Family<ListenerLabels, Counter>,
    /// Connections that did not get past PROXY header, TLS handshake or WebSocket upgrade.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Certificate reloads (SIGHUP) that failed and kept the old certificate.
    pub tls_reload_errors: Counter,
}

impl ListenerFamilies {
    /// Registers the families.
    pub fn register(registry: &mut Registry) -> ListenerFamilies {
        let f = ListenerFamilies::default();
        registry.register(
            "listener_connections",
            "MQTT connections accepted, per listener",
            f.accepted.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Connections refused before MQTT: PROXY header, TLS handshake or WebSocket upgrade",
            f.handshake_failures.clone(),
        );
        registry.register(
            "tls_reload_errors",
            "TLS certificate reloads that failed (the old certificate stays)",
            f.tls_reload_errors.clone(),
        );
        f
    }

    fn failed(&self, listener: &str, reason: &str) {
        let labels = HandshakeLabels { listener: listener.to_owned(), reason: reason.to_owned() };
        self.handshake_failures.get_or_create(&labels).inc();
    }
}

/// A bound listener and what its connections go through before the session.
pub struct Listener {
    /// The socket.
    pub tcp: TcpListener,
    /// What runs before the session.
    pub prelude: Arc<Prelude>,
}

/// What a listener's connections go through before MQTT.
pub struct Prelude {
    /// The `listener` label.
    pub label: Arc<str>,
    /// The kind.
    pub kind: ListenerKind,
    /// A PROXY protocol header comes first.
    pub proxy_protocol: bool,
    /// The TLS config (kinds tls and wss), reloadable.
    pub tls: Option<Arc<tls::Reloadable>>,
    /// The WebSocket policy (kinds ws and wss).
    pub ws: Option<ws::WsPolicy>,
}

impl Prelude {
    /// Plain TCP without PROXY protocol: the session starts on the socket at once.
    pub fn is_direct(&self) -> bool {
        self.kind == ListenerKind::Tcp && !self.proxy_protocol
    }
}

/// Binds every listener: `mqtt.listen` first (label `mqtt`), then `mqtt.listeners` in order.
/// Errors name the address and the config key; TLS files are loaded here.
pub async fn bind(config: &crate::config::Config) -> anyhow::Result<Vec<Listener>> {
    use anyhow::Context as _;
    let main = TcpListener::bind(config.mqtt_addr()).await.with_context(|| {
        format!("cannot listen on {} (set by `mqtt.listen` in the config)", config.mqtt_addr())
    })?;
    let mut out = vec![Listener {
        tcp: main,
        prelude: Arc::new(Prelude {
            label: Arc::from("mqtt"),
            kind: ListenerKind::Tcp,
            proxy_protocol: config.mqtt.proxy_protocol,
            tls: None,
            ws: None,
        }),
    }];
    let max_message = config.mqtt.max_packet_size as usize + 16;
    for (i, l) in config.mqtt.listeners.iter().enumerate() {
        let addr: SocketAddr = l
            .listen
            .value
            .parse()
            .with_context(|| format!("mqtt.listeners[{i}].listen: not an address:port"))?;
        let tcp = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (set by `mqtt.listeners[{i}].listen` in the config)")
        })?;
        let alpn: &'static [&'static [u8]] =
            if l.kind.is_ws() { &[b"http/1.1"] } else { &[b"mqtt"] };
        let tls = match &l.tls {
            Some(t) if l.kind.is_tls() => Some(Arc::new(
                tls::Reloadable::new(t.clone(), alpn)
                    .with_context(|| format!("mqtt.listeners[{i}].tls"))?,
            )),
            _ => None,
        };
        let ws = l.kind.is_ws().then(|| ws::WsPolicy {
            path: l.path.clone(),
            allowed_origins: l.allowed_origins.clone(),
            max_message,
        });
        let prelude = Prelude {
            label: Arc::from(l.label()),
            kind: l.kind,
            proxy_protocol: l.proxy_protocol,
            tls,
            ws,
        };
        out.push(Listener { tcp, prelude: Arc::new(prelude) });
    }
    Ok(out)
}

/// Reloads the certificates of every TLS listener (SIGHUP): new handshakes use the new files,
/// established connections keep theirs; a file that fails keeps the old certificate, logged
/// and counted.
pub fn reload_certificates(preludes: &[Arc<Prelude>], metrics: &ListenerFamilies) {
    for p in preludes {
        let Some(t) = &p.tls else { continue };
        match t.reload() {
            Ok(()) => info!(listener = %p.label, "TLS certificate reloaded"),
            Err(e) => {
                metrics.tls_reload_errors.inc();
                warn!(listener = %p.label, error = %e, "TLS certificate reload failed; keeping the old one");
            }
        }
    }
}

/// Runs the prelude of one connection and then its session. Everything before the session is
/// bounded by `mqtt.connect_timeout`.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<crate::mqtt::session::SessionShared>,
    prelude: Arc<Prelude>,
    slot: crate::mqtt::listener::ConnSlot,
) {
    let metrics = &shared.metrics.listeners;
    let timeout = shared.limits.connect_timeout;
    let label = &*prelude.label;
    let mut tcp = tcp;
    let mut peer = peer;
    if prelude.proxy_protocol {
        match tokio::time::timeout(timeout, proxy::read_header(&mut tcp)).await {
            Ok(Ok(Some(addr))) => peer = addr,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                metrics.failed(label, "proxy_header");
                debug!(listener = label, %peer, error = %e, "PROXY header refused");
                return;
            }
            Err(_) => {
                metrics.failed(label, "timeout");
                return;
            }
        }
    }
    // Each branch's handshake and session are boxed: the task then holds what its own
    // transport needs, not the largest of all four branches (a plain socket's session
    // future is ~900 B, one over WebSocket over TLS several KiB).
    use crate::mqtt::session::run;
    match prelude.kind {
        ListenerKind::Tcp => Box::pin(run(tcp, peer, shared, slot)).await,
        ListenerKind::Tls => {
            let accept = Box::pin(tls_accept(tcp, peer, &prelude, metrics, timeout));
            let Some(t) = accept.await else { return };
            Box::pin(run(t, peer, shared, slot)).await
        }
        ListenerKind::Ws => {
            let upgrade = Box::pin(ws_accept(tcp, peer, &prelude, metrics, timeout));
            let Some(w) = upgrade.await else { return };
            Box::pin(run(w, peer, shared, slot)).await
        }
        ListenerKind::Wss => {
            let accept = Box::pin(tls_accept(tcp, peer, &prelude, metrics, timeout));
            let Some(t) = accept.await else { return };
            let upgrade = Box::pin(ws_accept(t, peer, &prelude, metrics, timeout));
            let Some(w) = upgrade.await else { return };
            Box::pin(run(w, peer, shared, slot)).await
        }
    }
}

/// The TLS handshake and the certificate's name; `None` (counted) when refused.
async fn tls_accept(
    tcp: TcpStream,
    peer: SocketAddr,
    prelude: &Prelude,
    metrics: &ListenerFamilies,
    timeout: std::time::Duration,
) -> Option<TlsTransport> {
    let label = &*prelude.label;
    let reloadable = prelude.tls.as_ref()?;
    let acceptor = reloadable.acceptor();
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = handshake_reason(&e);
            metrics.failed(label, reason);
            debug!(listener = label, %peer, error = %e, reason, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics.failed(label, "timeout");
            debug!(listener = label, %peer, "TLS handshake not finished within connect_timeout");
            return None;
        }
    };
    let source = reloadable.identity();
    let user = match (source, stream.get_ref().1.peer_certificates()) {
        (IdentitySource::None, _) | (_, None) => None,
        (source, Some(chain)) => {
            let name = chain.first().and_then(|leaf| tls::certificate_name(leaf, source));
            if name.is_none() {
                metrics.failed(label, "no_identity");
                debug!(listener = label, %peer, ?source, "client certificate has no such name");
                return None;
            }
            name.map(String::into_boxed_str)
        }
    };
    Some(TlsTransport { stream, user })
}

/// The `reason` label of a failed TLS handshake.
fn handshake_reason(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        Error::InvalidMessage(_) => "not_tls",
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired_cert",
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | Error::InvalidCertificate(CertificateError::BadSignature) => "untrusted_cert",
        Error::InvalidCertificate(_) => "bad_cert",
        Error::PeerIncompatible(_) => "incompatible",
        _ => "tls_error",
    }
}

/// The WebSocket upgrade; `None` (counted) when refused.
async fn ws_accept<S: Transport>(
    stream: S,
    peer: SocketAddr,
    prelude: &Prelude,
    metrics: &ListenerFamilies,
    timeout: std::time::Duration,
) -> Option<ws::WsStream<S>> {
    let label = &*prelude.label;
    let policy = prelude.ws.as_ref()?;
    let refused = std::sync::Mutex::new(None);
    // The error type is tungstenite's callback contract (an HTTP response), not ours.
    #[allow(clippy::result_large_err)]
    let callback = |req: &ws::Request, resp: ws::Response| {
        ws::check_upgrade(policy, req, resp).map_err(|why| {
            if let Ok(mut r) = refused.lock() {
                *r = Some(why);
            }
            why.answer()
        })
    };
    let config = ws::ws_config(policy);
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    match tokio::time::timeout(timeout, upgrade).await {
        Ok(Ok(socket)) => Some(ws::WsStream::new(socket)),
        Ok(Err(e)) => {
            let why = refused.lock().ok().and_then(|r| *r);
            let reason = why.map(ws::Refused::label).unwrap_or("ws_bad_upgrade");
            metrics.failed(label, reason);
            debug!(listener = label, %peer, error = %e, reason, "WebSocket upgrade refused");
            None
        }
        Err(_) => {
            metrics.failed(label, "timeout");
            None
        }
    }
}
