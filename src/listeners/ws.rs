//! MQTT over WebSocket (MQTT 5.0 §6, the same for 3.1.1): the upgrade (path, the `mqtt`
//! subprotocol, allowed origins) and [`WsStream`], which makes a WebSocket look like a byte
//! stream to the session: binary frames only, one frame may carry part of a packet or several.
//!
//! Ping/pong is answered by tungstenite itself while the session reads.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
pub use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols we speak, in order of preference (MQTT 5.0 §6: "mqtt"; "mqttv3.1" is
/// what MQTT 3.1 clients such as older Paho JavaScript ask for).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// What an upgrade must satisfy.
#[derive(Debug, Clone)]
pub struct WsPolicy {
    /// The HTTP path of the upgrade.
    pub path: String,
    /// Allowed `Origin` values; empty: any (non-browser clients send none).
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message and frame accepted (the MQTT packet limit plus framing).
    pub max_message: usize,
}

/// Why an upgrade was refused (the `reason` label of the handshake failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another path than the configured one: 404.
    WrongPath,
    /// No `mqtt` / `mqttv3.1` in `Sec-WebSocket-Protocol`: 400.
    NoSubprotocol,
    /// An `Origin` not in `allowed_origins`: 403.
    Origin,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::WrongPath => "ws_wrong_path",
            Refused::NoSubprotocol => "ws_no_subprotocol",
            Refused::Origin => "ws_origin",
        }
    }
}

impl Refused {
    /// The HTTP answer to the refused upgrade.
    pub fn answer(self) -> ErrorResponse {
        let (status, text) = match self {
            Refused::WrongPath => (StatusCode::NOT_FOUND, "no MQTT endpoint here"),
            Refused::NoSubprotocol => {
                (StatusCode::BAD_REQUEST, "Sec-WebSocket-Protocol must offer mqtt")
            }
            Refused::Origin => (StatusCode::FORBIDDEN, "origin not allowed"),
        };
        let mut r = ErrorResponse::new(Some(text.to_owned()));
        *r.status_mut() = status;
        r
    }
}

/// Checks an upgrade request: the response to send (with the chosen subprotocol), or why it
/// is refused (see [`Refused::answer`]).
pub fn check_upgrade(
    policy: &WsPolicy,
    request: &Request,
    mut response: Response,
) -> Result<Response, Refused> {
    if request.uri().path() != policy.path {
        return Err(Refused::WrongPath);
    }
    if !policy.allowed_origins.is_empty() {
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let allowed = origin
                .to_str()
                .map(|o| policy.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
                .unwrap_or(false);
            if !allowed {
                return Err(Refused::Origin);
            }
        }
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let Some(chosen) = SUBPROTOCOLS.iter().find(|p| offered.contains(p)) else {
        return Err(Refused::NoSubprotocol);
    };
    response
        .headers_mut()
        .insert(header::SEC_WEBSOCKET_PROTOCOL, header::HeaderValue::from_static(chosen));
    Ok(response)
}

/// The tungstenite limits for `policy`: messages and frames no larger than an MQTT packet
/// may be (plus a little), small buffers for idle connections.
pub fn ws_config(policy: &WsPolicy) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(policy.max_message))
        .max_frame_size(Some(policy.max_message))
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(policy.max_message.saturating_mul(2).max(64 * 1024))
}

/// A WebSocket as a byte stream: reads the payloads of binary messages in order, writes each
/// write as one binary message.
pub struct WsStream<S> {
    /// The WebSocket.
    ws: WebSocketStream<S>,
    /// What is left of the last binary message read.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsStream { ws, pending: Bytes::new() }
    }

    /// The stream under the WebSocket (a TLS stream for wss).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                // The peer closed: end of stream.
                None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(_))) => {
                    // MQTT 5.0 §6: any other data frame than binary closes the connection.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text frame (MQTT uses binary frames only)",
                    )));
                }
                // Pings are answered by tungstenite; a close frame is followed by the end.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}
