//! How the bench's MQTT clients reach a server: `host:port` (plain TCP, as always),
//! `tls://host:port`, `ws://host:port/path` or `wss://host:port/path`. TLS clients trust the
//! CA the TLS bench made (`set_tls_roots`); WebSocket clients offer the `mqtt` subprotocol.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Read half of a client connection, whatever the transport.
pub type Rd = Box<dyn AsyncRead + Send + Unpin>;
/// Write half of a client connection (TLS and WebSocket writes must be flushed).
pub type Wr = Box<dyn AsyncWrite + Send + Unpin>;

static TLS_CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Trusts the CA in `ca` for every later `tls://` and `wss://` address.
pub fn set_tls_roots(ca: &Path) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).context("read the bench CA")? {
        roots.add(c.context("parse the bench CA")?).context("add the bench CA")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let _ = TLS_CLIENT.set(Arc::new(config));
    Ok(())
}

/// A TLS connection to `hostport` (certificate checked for "localhost").
pub async fn tls(hostport: &str) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = TLS_CLIENT.get().context("no bench CA set for tls:// addresses")?;
    let tcp =
        TcpStream::connect(hostport).await.with_context(|| format!("connect to {hostport}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").map_err(|e| anyhow!("{e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    connector.connect(name, tcp).await.with_context(|| format!("TLS handshake with {hostport}"))
}

async fn ws<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    url: &str,
) -> Result<(Rd, Wr)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().context("WebSocket URL")?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let (socket, _) =
        tokio_tungstenite::client_async(request, stream).await.context("WebSocket upgrade")?;
    let (rd, wr) = tokio::io::split(mqgate::listeners::ws::WsStream::new(socket));
    Ok((Box::new(rd), Box::new(wr)))
}

/// Opens a connection to `addr` (see the module doc) and splits it.
pub async fn open(addr: &str) -> Result<(Rd, Wr)> {
    if let Some(hostport) = addr.strip_prefix("tls://") {
        let (rd, wr) = tokio::io::split(tls(hostport).await?);
        return Ok((Box::new(rd), Box::new(wr)));
    }
    if let Some(rest) = addr.strip_prefix("ws://") {
        let hostport = rest.split('/').next().unwrap_or(rest);
        let tcp = TcpStream::connect(hostport).await.with_context(|| format!("connect {addr}"))?;
        tcp.set_nodelay(true)?;
        return ws(tcp, addr).await;
    }
    if let Some(rest) = addr.strip_prefix("wss://") {
        let hostport = rest.split('/').next().unwrap_or(rest);
        let url = format!("ws://{rest}");
        return ws(tls(hostport).await?, &url).await;
    }
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connect to MQTT {addr}"))?;
    tcp.set_nodelay(true).context("set TCP_NODELAY")?;
    let (rd, wr) = tcp.into_split();
    Ok((Box::new(rd), Box::new(wr)))
}
