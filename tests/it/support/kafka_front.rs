//! TLS and SASL/PLAIN in front of librdkafka's mock cluster, which has neither: the mock
//! listens in plain TCP and has no SaslHandshake/SaslAuthenticate handler (librdkafka 2.12's
//! `rdkafka_mock_handlers.c`). The front is what a broker's listener does before the Kafka
//! protocol proper:
//!
//! - TLS (rustls, a certificate of the test's CA) when asked for;
//! - SASL (KIP-43, KIP-152) when asked for: the ApiVersions answer of the mock gets
//!   SaslHandshake v0–1 and SaslAuthenticate v0–1 added; the front answers those two itself,
//!   PLAIN only, checking user and password as a broker does (error 58
//!   `SASL_AUTHENTICATION_FAILED` with Kafka's own message, then the connection closes); any
//!   other request before a successful login closes the connection, as Kafka does;
//! - then it copies bytes both ways to the mock's broker.
//!
//! The mock advertises the front's address in its metadata
//! (`rd_kafka_mock_broker_set_host_port`), so every connection a client makes after the
//! bootstrap also goes through the front. librdkafka (mqgate's producer, the test's consumer)
//! does the client side for real: OpenSSL, certificate and host name checks, SASL framing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::certs::Pair;

const API_SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const API_SASL_AUTHENTICATE: i16 = 36;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const ILLEGAL_SASL_STATE: i16 = 34;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// What the front asks of a client.
#[derive(Default)]
pub struct Security<'a> {
    /// TLS with this server certificate.
    pub tls: Option<&'a Pair>,
    /// SASL/PLAIN with this user and password.
    pub plain: Option<(&'a str, &'a str)>,
}

/// A mock cluster of one broker (owned by a producer handle kept for its lifetime) reached
/// only through the front.
pub struct SecureCluster {
    /// Owns the mock cluster (`test.mock.num.brokers`).
    handle: BaseProducer<DefaultProducerContext>,
    /// The front's address: the bootstrap and the advertised broker.
    pub addr: SocketAddr,
}

impl SecureCluster {
    /// A cluster of one broker with `topic` (`partitions` partitions) behind a front asking for
    /// `security`.
    pub async fn start(topic: &str, partitions: i32, security: Security<'_>) -> SecureCluster {
        let handle: BaseProducer<DefaultProducerContext> = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .create()
            .expect("a producer owning a mock cluster");
        let (mock_addr, raw) = {
            let mock = handle.client().mock_cluster().expect("the mock cluster");
            mock.create_topic(topic, partitions, 1).expect("create topic");
            let addr: SocketAddr =
                mock.bootstrap_servers().parse().expect("the mock's address is host:port");
            // SAFETY: the handle is a live producer with a mock cluster (checked above); the
            // pointer is used once, below, while `handle` is alive.
            let raw = unsafe {
                rdkafka::bindings::rd_kafka_handle_mock_cluster(handle.client().native_ptr())
            };
            (addr, raw)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("front bind");
        let addr = listener.local_addr().expect("front addr");
        let host = std::ffi::CString::new("127.0.0.1").expect("host");
        // SAFETY: `raw` is the live mock cluster of `handle`; the host string outlives the
        // call (the mock copies it).
        unsafe {
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                raw,
                1,
                host.as_ptr(),
                i32::from(addr.port()),
            );
        }
        let acceptor = security.tls.map(acceptor);
        let plain = security.plain.map(|(u, p)| (u.to_owned(), p.to_owned()));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, plain) = (acceptor.clone(), plain.clone());
                tokio::spawn(async move {
                    let Ok(broker) = TcpStream::connect(mock_addr).await else { return };
                    match acceptor {
                        Some(a) => {
                            let Ok(tls) = a.accept(tcp).await else { return };
                            serve(tls, broker, plain).await;
                        }
                        None => serve(tcp, broker, plain).await,
                    }
                });
            }
        });
        SecureCluster { handle, addr }
    }

    /// `host:port` for `bootstrap:`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }
}

impl Drop for SecureCluster {
    fn drop(&mut self) {
        let _ = self.handle.flush(std::time::Duration::from_millis(10));
    }
}

fn acceptor(pair: &Pair) -> tokio_rustls::TlsAcceptor {
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(&pair.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&pair.key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The librdkafka properties of a client of a cluster whose front asks for `security` (CA file
/// `ca` for TLS).
pub fn client_properties(ca: Option<&Path>, plain: Option<(&str, &str)>) -> Vec<(String, String)> {
    let protocol = match (plain.is_some(), ca.is_some()) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    let mut p = vec![("security.protocol".to_owned(), protocol.to_owned())];
    if let Some(ca) = ca {
        p.push(("ssl.ca.location".to_owned(), ca.display().to_string()));
    }
    if let Some((u, pw)) = plain {
        p.push(("sasl.mechanisms".to_owned(), "PLAIN".to_owned()));
        p.push(("sasl.username".to_owned(), u.to_owned()));
        p.push(("sasl.password".to_owned(), pw.to_owned()));
    }
    p
}

/// One client connection: the SASL exchange (if asked for), then bytes both ways.
async fn serve<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    mut broker: TcpStream,
    plain: Option<(String, String)>,
) {
    if let Some((user, password)) = plain {
        if login(&mut client, &mut broker, &user, &password).await.is_none() {
            return;
        }
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
}

/// A request as framed on the wire (without the size), with its header's first fields.
struct Request {
    api_key: i16,
    api_version: i16,
    correlation_id: i32,
    bytes: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let size = r.read_i32().await.ok()?;
    let size = usize::try_from(size).ok().filter(|s| *s < (16 << 20))?;
    let mut bytes = vec![0; size];
    r.read_exact(&mut bytes).await.ok()?;
    Some(bytes)
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Option<()> {
    let size = i32::try_from(body.len()).ok()?;
    w.write_all(&size.to_be_bytes()).await.ok()?;
    w.write_all(body).await.ok()?;
    w.flush().await.ok()
}

async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Option<Request> {
    let bytes = read_frame(r).await?;
    let b = bytes.get(..8)?;
    Some(Request {
        api_key: i16::from_be_bytes([b[0], b[1]]),
        api_version: i16::from_be_bytes([b[2], b[3]]),
        correlation_id: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        bytes,
    })
}

/// The body of a non-flexible request (header v1: after the client id).
fn body_v1(req: &Request) -> Option<&[u8]> {
    let b = &req.bytes;
    let len = i16::from_be_bytes([*b.get(8)?, *b.get(9)?]);
    let start = 10 + usize::try_from(len.max(0)).ok()?;
    b.get(start..)
}

/// The SASL exchange up to a successful login; `None` when the connection must close.
async fn login<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    broker: &mut TcpStream,
    user: &str,
    password: &str,
) -> Option<()> {
    let mut mechanism_ok = false;
    loop {
        let req = read_request(client).await?;
        match req.api_key {
            API_VERSIONS => {
                write_frame(broker, &req.bytes).await?;
                let answer = read_frame(broker).await?;
                let answer = with_sasl_apis(&answer, req.api_version).unwrap_or(answer);
                write_frame(client, &answer).await?;
            }
            API_SASL_HANDSHAKE => {
                let body = body_v1(&req)?;
                let len =
                    usize::try_from(i16::from_be_bytes([*body.first()?, *body.get(1)?])).ok()?;
                let mechanism = body.get(2..2 + len)?;
                mechanism_ok = mechanism == b"PLAIN";
                let mut out = req.correlation_id.to_be_bytes().to_vec();
                let code = if mechanism_ok { 0 } else { UNSUPPORTED_SASL_MECHANISM };
                out.extend(code.to_be_bytes());
                out.extend(1i32.to_be_bytes());
                out.extend(5i16.to_be_bytes());
                out.extend(b"PLAIN");
                write_frame(client, &out).await?;
                if !mechanism_ok {
                    return None;
                }
            }
            API_SASL_AUTHENTICATE => {
                let body = body_v1(&req)?;
                let len =
                    usize::try_from(i32::from_be_bytes(body.get(..4)?.try_into().ok()?)).ok()?;
                let token = body.get(4..4 + len)?;
                // PLAIN (RFC 4616): authzid NUL authcid NUL passwd.
                let mut parts = token.split(|b| *b == 0);
                let (_authz, u, p) = (parts.next(), parts.next(), parts.next());
                let ok =
                    mechanism_ok && u == Some(user.as_bytes()) && p == Some(password.as_bytes());
                let (code, message) = if !mechanism_ok {
                    (ILLEGAL_SASL_STATE, "SaslAuthenticate before SaslHandshake")
                } else if ok {
                    (0, "")
                } else {
                    (
                        SASL_AUTHENTICATION_FAILED,
                        "Authentication failed: Invalid username or password",
                    )
                };
                let mut out = req.correlation_id.to_be_bytes().to_vec();
                out.extend(code.to_be_bytes());
                if code == 0 {
                    out.extend((-1i16).to_be_bytes());
                } else {
                    out.extend(i16::try_from(message.len()).ok()?.to_be_bytes());
                    out.extend(message.as_bytes());
                }
                out.extend(0i32.to_be_bytes());
                if req.api_version >= 1 {
                    out.extend(0i64.to_be_bytes());
                }
                write_frame(client, &out).await?;
                return ok.then_some(());
            }
            // Anything else before a login: Kafka closes the connection.
            _ => return None,
        }
    }
}

/// The mock's ApiVersions answer (header v0, then the body of `version`) with SaslHandshake
/// v0–1 and SaslAuthenticate v0–1 added; `None` if it cannot be read (then it goes as is).
fn with_sasl_apis(answer: &[u8], version: i16) -> Option<Vec<u8>> {
    let added = [(API_SASL_HANDSHAKE, 0i16, 1i16), (API_SASL_AUTHENTICATE, 0, 1)];
    let mut out = answer.get(..6)?.to_vec(); // correlation id, error code
    if i16::from_be_bytes([answer[4], answer[5]]) != 0 {
        return None;
    }
    let mut at = 6;
    let mut apis = Vec::new();
    if version >= 3 {
        // Flexible: a compact array (unsigned varint length + 1), a tag buffer per entry.
        let (n, used) = uvarint(answer.get(at..)?)?;
        at += used;
        for _ in 0..n.checked_sub(1)? {
            let e = answer.get(at..at + 6)?;
            apis.push((
                i16::from_be_bytes([e[0], e[1]]),
                i16::from_be_bytes([e[2], e[3]]),
                i16::from_be_bytes([e[4], e[5]]),
            ));
            at += 6;
            // Entries carry no tagged fields here (an empty tag buffer: one 0 byte).
            if *answer.get(at)? != 0 {
                return None;
            }
            at += 1;
        }
    } else {
        let n = i32::from_be_bytes(answer.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        for _ in 0..n {
            let e = answer.get(at..at + 6)?;
            apis.push((
                i16::from_be_bytes([e[0], e[1]]),
                i16::from_be_bytes([e[2], e[3]]),
                i16::from_be_bytes([e[4], e[5]]),
            ));
            at += 6;
        }
    }
    apis.retain(|(k, _, _)| !added.iter().any(|(a, _, _)| a == k));
    apis.extend(added);
    apis.sort_unstable();
    if version >= 3 {
        put_uvarint(&mut out, apis.len() as u64 + 1);
    } else {
        out.extend(i32::try_from(apis.len()).ok()?.to_be_bytes());
    }
    for (k, lo, hi) in apis {
        out.extend(k.to_be_bytes());
        out.extend(lo.to_be_bytes());
        out.extend(hi.to_be_bytes());
        if version >= 3 {
            out.push(0);
        }
    }
    out.extend(answer.get(at..)?);
    Some(out)
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
