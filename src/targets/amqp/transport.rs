//! One AMQP connection's socket: the URL, the handshake, and buffered frame I/O.
//!
//! [`connect`] opens the TCP connection, runs the AMQP handshake (PLAIN credentials from the
//! URL, `connection.tune` honoured) and opens the publisher's channels; it returns a
//! [`Link`] whose [`Transport`] owns the stream, a read buffer that frames are decoded from and
//! a write buffer that frames are encoded into (the publisher flushes it once per batch). No
//! extra task or thread: whoever holds the `Transport` drives it. The URL holds a password:
//! it is never logged, and no error here quotes it.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::net::TcpStream;

use super::tls::{AmqpTlsConfig, AuthMechanism};

use super::wire::frame::{self, Frame, MIN_FRAME_MAX, PROTOCOL_HEADER};
use super::wire::methods::{self, Close, Method};
use super::wire::table::Value;
use super::wire::WireError;

/// The largest frame we accept or send, whatever the broker offers.
const OUR_FRAME_MAX: u32 = 131_072;
/// The heartbeat interval we ask for when the broker leaves it to us or offers a longer one.
const OUR_HEARTBEAT: u16 = 60;
/// How long a failed handshake write waits for the broker's TLS alert behind it.
const ALERT_WAIT: Duration = Duration::from_millis(500);
/// Spare room made in the read buffer before each read.
const READ_CHUNK: usize = 32 * 1024;

/// Why a connection attempt failed.
#[derive(Debug, Error)]
pub(crate) enum ConnectError {
    /// The handshake or the channel setup took longer than `connect_timeout`.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// TCP trouble.
    #[error("{0}")]
    Io(io::Error),
    /// The broker refused (credentials, vhost) or said something we did not expect.
    #[error("{0}")]
    Protocol(String),
    /// TLS could not be set up or the handshake failed (untrusted certificate, ...).
    #[error("{0}")]
    Tls(String),
}

impl From<io::Error> for ConnectError {
    /// A TLS failure (from the handshake, or an alert read by `try_fill` afterwards) is a
    /// [`ConnectError::Tls`] saying what it means; the rest is TCP trouble.
    fn from(e: io::Error) -> Self {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => ConnectError::Tls(tls_failure(tls)),
            None => ConnectError::Io(e),
        }
    }
}

/// What a TLS failure while connecting means. With TLS 1.3 the broker checks mqgate's client
/// certificate after mqgate's side of the handshake is done, so a refused certificate arrives
/// as an alert on the first read, not from the handshake call: both say the same here.
fn tls_failure(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    let what = match e {
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            format!("the broker requires a client certificate (tls.cert, tls.key): {e}")
        }
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA,
        ) => format!("the broker refused the client certificate: {e}"),
        _ => e.to_string(),
    };
    format!("TLS handshake with the broker failed: {what}")
}

impl From<WireError> for ConnectError {
    fn from(e: WireError) -> Self {
        ConnectError::Protocol(format!("AMQP framing error: {e}"))
    }
}

/// A parsed `amqp://user:pass@host:port/vhost` URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Uri {
    /// User name (default "guest").
    pub(crate) user: String,
    /// Password (default "guest"); never printed.
    pub(crate) password: String,
    /// Host name or address (IPv6 without brackets).
    pub(crate) host: String,
    /// Port (default 5672).
    pub(crate) port: u16,
    /// Virtual host, percent-decoded (default "/").
    pub(crate) vhost: String,
    /// `amqps://`: TLS (default port 5671).
    pub(crate) tls: bool,
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        write!(f, "{scheme}://{}@{}:{}/{:?}", self.user, self.host, self.port, self.vhost)
    }
}

/// Why a URL was refused (never quotes the URL: it holds the password).
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum UriError {
    /// Neither `amqp://` nor `amqps://`.
    #[error("the URL must start with amqp:// or amqps://")]
    Scheme,
    /// A port that is not a number in 1..=65535.
    #[error("invalid port")]
    Port,
    /// A malformed %-escape or one that is not UTF-8.
    #[error("invalid %-escape in the {0}")]
    Escape(&'static str),
    /// No host.
    #[error("no host")]
    Host,
}

impl FromStr for Uri {
    type Err = UriError;

    fn from_str(url: &str) -> Result<Uri, UriError> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("amqp://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("amqps://") {
            (rest, true)
        } else {
            return Err(UriError::Scheme);
        };
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (decode(u, "user")?, decode(p, "password")?),
                None => (decode(info, "user")?, "guest".to_owned()),
            },
            None => ("guest".to_owned(), "guest".to_owned()),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UriError::Host)?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port {
            None | Some("") if tls => 5671,
            None | Some("") => 5672,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or(UriError::Port)?,
        };
        let host = if host.is_empty() { "localhost".to_owned() } else { decode(host, "host")? };
        let vhost = match path {
            None | Some("") => "/".to_owned(),
            Some(p) => decode(p, "vhost")?,
        };
        Ok(Uri { user, password, host, port, vhost, tls })
    }
}

/// Percent-decodes one part of the URL.
fn decode(s: &str, what: &'static str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::Escape(what))?;
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::Escape(what))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::Escape(what))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Escape(what))
}

/// The socket of one connection and its two buffers.
pub(crate) struct Transport {
    /// The TCP stream (ciphertext with `amqps://`).
    pub(crate) stream: TcpStream,
    /// With `amqps://`: the TLS state, driven sans-I/O by `try_fill` and `try_flush`.
    tls: Option<Box<rustls::ClientConnection>>,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Frames encoded and not yet written.
    pub(crate) wbuf: BytesMut,
    /// Negotiated largest frame.
    pub(crate) frame_max: u32,
    /// Negotiated highest channel number.
    pub(crate) channel_max: u16,
    /// Negotiated heartbeat interval (`None`: off).
    pub(crate) heartbeat: Option<Duration>,
    /// When bytes last arrived.
    pub(crate) last_read: Instant,
    /// When bytes were last written.
    pub(crate) last_write: Instant,
}

impl Transport {
    /// Wraps a freshly connected stream (limits as before `connection.tune`).
    fn new(stream: TcpStream, tls: Option<Box<rustls::ClientConnection>>) -> Transport {
        let now = Instant::now();
        Transport {
            stream,
            tls,
            rbuf: BytesMut::with_capacity(READ_CHUNK * 2),
            wbuf: BytesMut::with_capacity(64 * 1024),
            frame_max: OUR_FRAME_MAX,
            channel_max: 0,
            heartbeat: None,
            last_read: now,
            last_write: now,
        }
    }

    /// A plain connection to a peer of the tests' own (no handshake: limits as before
    /// `connection.tune`).
    #[cfg(test)]
    pub(crate) fn plain_for_test(stream: TcpStream) -> Transport {
        Transport::new(stream, None)
    }

    /// Bytes read and not yet taken as frames (a frame's wire size is the difference across
    /// [`Transport::next_consumer_frame`]).
    pub(crate) fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Whether anything waits to be written (frames, or TLS records).
    pub(crate) fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what the socket takes now without waiting. `Ok(true)` when the buffer is empty.
    pub(crate) fn try_flush(&mut self) -> io::Result<bool> {
        if self.tls.is_some() {
            return self.try_flush_tls();
        }
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wbuf.advance(n);
                    self.last_write = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        Ok(true)
    }

    /// [`try_flush`](Self::try_flush) through TLS: the frames become records in rustls,
    /// the records go to the socket as far as it takes them.
    fn try_flush_tls(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else { return Ok(true) };
        loop {
            if !self.wbuf.is_empty() {
                let n = tls.writer().write(&self.wbuf)?;
                self.wbuf.advance(n);
            }
            if !tls.wants_write() {
                if self.wbuf.is_empty() {
                    self.wbuf.clear();
                    return Ok(true);
                }
                continue;
            }
            match tls.write_tls(&mut SocketWriter(&self.stream)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => self.last_write = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// [`try_fill`](Self::try_fill) through TLS: records from the socket, decrypted into the
    /// read buffer.
    fn try_fill_tls(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else { return Ok(true) };
        match tls.read_tls(&mut SocketReader(&self.stream)) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
        let state =
            tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let start = self.rbuf.len();
            self.rbuf.resize(start + n, 0);
            tls.reader().read_exact(&mut self.rbuf[start..])?;
        }
        self.last_read = Instant::now();
        if tls.wants_write() {
            // An alert or a key update to answer; the rest goes with the next flush.
            let _ = tls.write_tls(&mut SocketWriter(&self.stream));
        }
        Ok(!(state.peer_has_closed() && n == 0))
    }

    /// Reads what the socket has now without waiting. `Ok(false)`: the peer closed it.
    pub(crate) fn try_fill(&mut self) -> io::Result<bool> {
        if self.tls.is_some() {
            return self.try_fill_tls();
        }
        self.rbuf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Ok(false),
            Ok(_) => {
                self.last_read = Instant::now();
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Takes the next complete frame out of the read buffer, if there is one.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match frame::decode(&self.rbuf, self.frame_max)? {
            Some((frame, used)) => {
                self.rbuf.advance(used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Takes the next complete frame out of the read buffer as a consumer sees it (content
    /// header and body frames decoded), if there is one.
    pub(crate) fn next_consumer_frame(
        &mut self,
    ) -> Result<Option<super::wire::consume::ConsumerFrame>, WireError> {
        super::wire::consume::take_frame(&mut self.rbuf, self.frame_max)
    }

    /// Writes the whole buffer, waiting as needed (handshake only). A write that fails on a
    /// TLS connection fails with the broker's alert when one is waiting to be read: a broker
    /// refusing the client certificate under TLS 1.3 sends its alert and resets the
    /// connection, and the reset reaches our next write before we read the alert.
    async fn flush(&mut self) -> io::Result<()> {
        loop {
            match self.try_flush() {
                Ok(true) => return Ok(()),
                Ok(false) => self.stream.writable().await?,
                Err(e) => return Err(self.tls_alert().await.unwrap_or(e)),
            }
        }
    }

    /// After a failed write: the TLS error (an alert) in what the broker sent before the
    /// connection broke, if any. Reads until the end of what came (a reset connection is
    /// readable at once), for [`ALERT_WAIT`] at most.
    async fn tls_alert(&mut self) -> Option<io::Error> {
        self.tls.as_ref()?;
        let read_to_the_end = async {
            loop {
                // Not `try_fill_tls` alone: tokio answers WouldBlock without reading until
                // its reactor has seen the socket readable.
                self.stream.readable().await.ok()?;
                match self.try_fill_tls() {
                    Err(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
                        return Some(e)
                    }
                    Ok(true) => {}
                    Ok(false) | Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(ALERT_WAIT, read_to_the_end).await.ok().flatten()
    }

    /// Reads until a whole frame is there (handshake only).
    async fn read_frame(&mut self) -> Result<Frame, ConnectError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(frame);
            }
            self.stream.readable().await?;
            if !self.try_fill()? {
                return Err(ConnectError::Protocol("the broker closed the connection".into()));
            }
        }
    }

    /// Reads frames until `want` accepts a method on `channel` (handshake only). A close of
    /// the connection or of that channel is an error naming the broker's reason.
    async fn expect(
        &mut self,
        channel: u16,
        what: &str,
        want: impl Fn(&Method) -> bool,
    ) -> Result<Method, ConnectError> {
        self.expect_on(channel..=channel, what, want).await.map(|(_, m)| m)
    }

    /// Waits for one `want` answer on each of `channels`, in whatever order they come (the
    /// broker answers each channel from its own process: channel 2's open-ok may come first).
    async fn expect_each(
        &mut self,
        channels: std::ops::RangeInclusive<u16>,
        what: &str,
        want: impl Fn(&Method) -> bool,
    ) -> Result<(), ConnectError> {
        let mut left: std::collections::HashSet<u16> = channels.clone().collect();
        while !left.is_empty() {
            let (ch, _) = self.expect_on(channels.clone(), what, &want).await?;
            if !left.remove(&ch) {
                return Err(ConnectError::Protocol(format!("a second {what} on channel {ch}")));
            }
        }
        Ok(())
    }

    /// [`Transport::expect`] on any of `channels`: the channel and the method.
    async fn expect_on(
        &mut self,
        channels: std::ops::RangeInclusive<u16>,
        what: &str,
        want: impl Fn(&Method) -> bool,
    ) -> Result<(u16, Method), ConnectError> {
        loop {
            match self.read_frame().await? {
                Frame::Heartbeat | Frame::Content { .. } => {}
                Frame::Method { channel: 0, method: Method::ConnectionClose(c) } => {
                    methods::connection_close_ok(&mut self.wbuf);
                    let _ = self.flush().await;
                    return Err(ConnectError::Protocol(format!(
                        "the broker refused the connection: {}",
                        describe(&c)
                    )));
                }
                Frame::Method { channel: ch, method: Method::ChannelClose(c) } => {
                    return Err(ConnectError::Protocol(format!(
                        "the broker closed channel {ch}: {}",
                        describe(&c)
                    )));
                }
                Frame::Method { channel: ch, method }
                    if channels.contains(&ch) && want(&method) =>
                {
                    return Ok((ch, method))
                }
                Frame::Method { channel: ch, method } => {
                    return Err(ConnectError::Protocol(format!(
                        "unexpected {method:?} on channel {ch} while waiting for {what}"
                    )))
                }
            }
        }
    }
}

/// "404 NOT_FOUND - no exchange 'x'" from a close.
pub(crate) fn describe(c: &Close) -> String {
    format!("{} {}", c.code, c.text)
}

/// A connection ready for publishing.
pub(crate) struct Link {
    /// The socket and its buffers.
    pub(crate) transport: Transport,
    /// Confirm-mode channels are numbered `1..=confirm_channels`.
    pub(crate) confirm_channels: u16,
    /// As many channels without confirms, for QoS 0, follow them:
    /// `confirm_channels + 1..=2 * confirm_channels`.
    /// The broker's product and version, for the logs.
    pub(crate) server: String,
}

/// The socket as `std::io::Read` for rustls: a non-blocking read (`WouldBlock` when empty).
struct SocketReader<'a>(&'a TcpStream);

impl Read for SocketReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// The socket as `std::io::Write` for rustls: a non-blocking write.
struct SocketWriter<'a>(&'a TcpStream);

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a connection is secured and authenticated, beside its URL.
#[derive(Debug, Clone, Default)]
pub(crate) struct Security {
    /// `amqp.<name>.tls` (used with `amqps://`; the system roots when absent).
    pub(crate) tls: Option<AmqpTlsConfig>,
    /// PLAIN (URL credentials) or EXTERNAL (the client certificate).
    pub(crate) mechanism: AuthMechanism,
}

/// Checks that `connection.start`'s SASL mechanisms (space separated) include ours.
fn check_mechanism(mechanisms: &str, ours: AuthMechanism) -> Result<(), ConnectError> {
    let (wanted, hint) = match ours {
        AuthMechanism::Plain => ("PLAIN", ""),
        // RabbitMQ offers EXTERNAL only when all of these hold.
        AuthMechanism::External => (
            "EXTERNAL",
            "; RabbitMQ offers it with the rabbitmq_auth_mechanism_ssl plugin enabled and \
             EXTERNAL in auth_mechanisms, on a TLS listener that verified a client certificate",
        ),
    };
    if mechanisms.split_ascii_whitespace().any(|m| m == wanted) {
        return Ok(());
    }
    Err(ConnectError::Protocol(format!(
        "the broker does not offer {wanted} authentication (offers {mechanisms:?}){hint}"
    )))
}

/// Connects to `uri` (through TLS for `amqps://`) and opens `channels` confirm-mode channels
/// and as many plain ones. The caller bounds the time it takes.
pub(crate) async fn connect(
    uri: &Uri,
    security: &Security,
    name: &str,
    channels: usize,
) -> Result<Link, ConnectError> {
    let stream = TcpStream::connect((uri.host.as_str(), uri.port)).await?;
    stream.set_nodelay(true)?;
    let mut t = if uri.tls {
        let settings = security.tls.clone().unwrap_or_default();
        let config = settings.client_config().map_err(|e| ConnectError::Tls(e.0))?;
        let server = settings.server_name(&uri.host).map_err(|e| ConnectError::Tls(e.0))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = connector.connect(server, stream).await.map_err(|e| match e.into() {
            ConnectError::Io(e) => {
                ConnectError::Tls(format!("TLS handshake with the broker failed: {e}"))
            }
            tls => tls,
        })?;
        let (stream, conn) = tls.into_inner();
        Transport::new(stream, Some(Box::new(conn)))
    } else {
        Transport::new(stream, None)
    };

    t.wbuf.extend_from_slice(PROTOCOL_HEADER);
    t.flush().await?;
    let start = t.expect(0, "connection.start", |m| matches!(m, Method::ConnectionStart { .. }));
    let mut server = String::new();
    if let Method::ConnectionStart { major, minor, mechanisms, server: product } = start.await? {
        server = product;
        if (major, minor) != (0, 9) {
            return Err(ConnectError::Protocol(format!("unsupported AMQP {major}-{minor}")));
        }
        check_mechanism(&mechanisms, security.mechanism)?;
    }
    let connection_name = format!("mqgate/{name}");
    let capabilities = [
        ("publisher_confirms", Value::Bool(true)),
        ("connection.blocked", Value::Bool(true)),
        ("consumer_cancel_notify", Value::Bool(true)),
        ("exchange_exchange_bindings", Value::Bool(true)),
        ("basic.nack", Value::Bool(true)),
        ("authentication_failure_close", Value::Bool(true)),
    ];
    let properties = [
        ("product", Value::LongString(b"mqgate")),
        ("version", Value::LongString(env!("CARGO_PKG_VERSION").as_bytes())),
        ("platform", Value::LongString(b"Rust")),
        ("connection_name", Value::LongString(connection_name.as_bytes())),
        ("capabilities", Value::Table(&capabilities)),
    ];
    match security.mechanism {
        AuthMechanism::Plain => {
            methods::start_ok(&mut t.wbuf, &properties, &uri.user, &uri.password)?
        }
        AuthMechanism::External => methods::start_ok_external(&mut t.wbuf, &properties)?,
    }
    t.flush().await?;

    let tune = t.expect(0, "connection.tune", |m| matches!(m, Method::ConnectionTune { .. }));
    let Method::ConnectionTune { channel_max, frame_max, heartbeat } = tune.await? else {
        return Err(ConnectError::Protocol("no connection.tune".into()));
    };
    let channel_max = if channel_max == 0 { u16::MAX } else { channel_max };
    let frame_max = match frame_max {
        0 => OUR_FRAME_MAX,
        n => n.clamp(MIN_FRAME_MAX, OUR_FRAME_MAX),
    };
    let heartbeat = match heartbeat {
        0 => 0,
        n => n.min(OUR_HEARTBEAT),
    };
    methods::tune_ok(&mut t.wbuf, channel_max, frame_max, heartbeat);
    t.frame_max = frame_max;
    t.channel_max = channel_max;
    t.heartbeat = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
    methods::connection_open(&mut t.wbuf, &uri.vhost)?;
    t.flush().await?;
    t.expect(0, "connection.open-ok", |m| matches!(m, Method::ConnectionOpenOk)).await?;

    // Confirm channels, as many plain ones (RabbitMQ runs a process per channel: QoS 0 spread
    // over several uses more than one core), and room for the exchange-check channel.
    let confirm_channels = u16::try_from(channels)
        .ok()
        .filter(|&n| 2 * u32::from(n) < u32::from(channel_max))
        .ok_or_else(|| {
            ConnectError::Protocol(format!(
                "{channels} channels do not fit the broker's channel_max {channel_max}"
            ))
        })?;
    let last = 2 * confirm_channels;
    for ch in 1..=last {
        methods::channel_open(&mut t.wbuf, ch);
    }
    t.flush().await?;
    t.expect_each(1..=last, "channel.open-ok", |m| matches!(m, Method::ChannelOpenOk)).await?;
    for ch in 1..=confirm_channels {
        methods::confirm_select(&mut t.wbuf, ch);
    }
    t.flush().await?;
    let selected = |m: &Method| matches!(m, Method::ConfirmSelectOk);
    t.expect_each(1..=confirm_channels, "confirm.select-ok", selected).await?;
    Ok(Link { transport: t, confirm_channels, server })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_urls() {
        let u: Uri = "amqp://guest:gu%40st@127.0.0.1:5672/%2f".parse().expect("valid");
        assert_eq!(
            u,
            Uri {
                user: "guest".into(),
                password: "gu@st".into(),
                host: "127.0.0.1".into(),
                port: 5672,
                vhost: "/".into(),
                tls: false,
            }
        );
        let u: Uri = "amqps://u:p@rabbit.example/prod".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.tls), ("rabbit.example", 5671, true));
        let u: Uri = "amqp://rabbit".parse().expect("valid");
        assert_eq!((u.user.as_str(), u.port, u.vhost.as_str()), ("guest", 5672, "/"));
        let u: Uri = "amqp://u:p@[::1]:5673/prod?heartbeat=10".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.vhost.as_str()), ("::1", 5673, "prod"));
    }

    #[test]
    fn the_broker_must_offer_our_sasl_mechanism() {
        let offered = "EXTERNAL PLAIN AMQPLAIN";
        assert!(check_mechanism(offered, AuthMechanism::External).is_ok());
        assert!(check_mechanism(offered, AuthMechanism::Plain).is_ok());
        assert!(check_mechanism(" PLAIN  EXTERNAL ", AuthMechanism::External).is_ok());
        // A name that only contains ours is not ours.
        let e = check_mechanism("PLAINTEXT AMQPLAIN", AuthMechanism::Plain).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the broker does not offer PLAIN authentication (offers \"PLAINTEXT AMQPLAIN\")"
        );
        let e = check_mechanism("PLAIN AMQPLAIN", AuthMechanism::External).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "the broker does not offer EXTERNAL authentication (offers \"PLAIN AMQPLAIN\"); \
                 RabbitMQ offers it with the rabbitmq_auth_mechanism_ssl plugin"
            ),
            "{e}"
        );
    }

    #[test]
    fn tls_alerts_while_connecting_say_what_was_refused() {
        use rustls::AlertDescription as A;
        let e = |alert| {
            let io =
                io::Error::new(io::ErrorKind::InvalidData, rustls::Error::AlertReceived(alert));
            ConnectError::from(io).to_string()
        };
        assert_eq!(
            e(A::UnknownCA),
            "TLS handshake with the broker failed: the broker refused the client certificate: \
             received fatal alert: UnknownCA"
        );
        assert!(e(A::CertificateRequired).contains("requires a client certificate"));
        assert!(e(A::HandshakeFailure).ends_with("failed: received fatal alert: HandshakeFailure"));
        let plain = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(ConnectError::from(plain), ConnectError::Io(_)));
    }

    /// A broker refusing the client certificate under TLS 1.3 (here: none where one is
    /// required) sends its alert after mqgate's side of the handshake is done and resets the
    /// connection. When the reset is there before mqgate's first write, that write fails: the
    /// error must still be the alert, not "connection reset" (RabbitMQ closes with linger 0).
    #[tokio::test]
    async fn a_write_into_a_refused_tls_connection_fails_with_the_brokers_alert() {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::sync::Arc;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
            .expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("server certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broker = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let Err((_, tcp)) = acceptor.accept(tcp).into_fallible().await else {
                panic!("the handshake without a client certificate succeeded")
            };
            // The alert went out; now a reset, as RabbitMQ's linger 0 close does.
            tcp.set_zero_linger().expect("linger 0");
        });
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .expect("our side of a TLS 1.3 handshake completes");
        broker.await.expect("broker task");
        tokio::time::sleep(Duration::from_millis(50)).await; // the reset has arrived
        let (tcp, conn) = tls.into_inner();
        let mut t = Transport::new(tcp, Some(Box::new(conn)));
        t.wbuf.extend_from_slice(PROTOCOL_HEADER);
        let e = t.flush().await.expect_err("the connection was reset");
        assert_eq!(
            ConnectError::from(e).to_string(),
            "TLS handshake with the broker failed: the broker requires a client certificate \
             (tls.cert, tls.key): received fatal alert: CertificateRequired"
        );
    }

    #[test]
    fn refuses_bad_urls_without_quoting_them() {
        assert_eq!("http://h/".parse::<Uri>(), Err(UriError::Scheme));
        assert_eq!("amqp://u:secret@h:99999/".parse::<Uri>(), Err(UriError::Port));
        assert_eq!("amqp://u:secret@h/%zz".parse::<Uri>(), Err(UriError::Escape("vhost")));
        assert!(!format!("{:?}", "amqp://u:secret@h/".parse::<Uri>()).contains("secret"));
        assert!(!format!("{:?}", "amqps://u:secret@h/".parse::<Uri>()).contains("secret"));
    }
}
