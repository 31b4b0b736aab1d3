//! HTTP targets over TLS: a custom CA, a client certificate (mutual TLS) and HTTP/2 where the
//! server offers it, against a real axum server behind rustls. The certificates are made for
//! each run with the `openssl` command line tool (a temporary directory, nothing kept).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::support::webhook::{Reply, Webhook};
use crate::support::*;
use axum::http::Version;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line tool (Debian package openssl) is needed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=mqgate test CA",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
}

/// A TLS listener for axum: accepts, handshakes (a failed handshake is only counted), hands
/// over the TLS stream.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    failed: Arc<Mutex<usize>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(_) => *self.failed.lock().unwrap() += 1,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An HTTPS server offering h2 and http/1.1; records each request's HTTP version. With
/// `client_auth`, it requires a client certificate signed by the CA.
async fn https_server(dir: &Path, client_auth: bool) -> (SocketAddr, Webhook, Arc<Mutex<usize>>) {
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let builder = ServerConfig::builder();
    let mut config = if client_auth {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
        builder.with_client_cert_verifier(verifier).with_single_cert(certs, key).unwrap()
    } else {
        builder.with_no_client_auth().with_single_cert(certs, key).unwrap()
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let failed = Arc::new(Mutex::new(0));
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        failed: Arc::clone(&failed),
    };
    let versions = Webhook::on_listener(listener, |_, _| Reply::Status(200));
    (addr, versions, failed)
}

fn config(addr: SocketAddr, tls: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nhttp:\n  api:\n    url: \"https://127.0.0.1:{}\"\n    tls:\n{tls}rules:\n  - name: r\n    from: \"t/#\"\n    to:\n      - http:\n          endpoint: api\n          retry: {{ attempts: 1 }}\n",
        addr.port()
    )
}

/// Publishes one QoS 1 message; the reason code of the PUBACK or DISCONNECT, and its reason
/// string.
async fn publish(app: &mqgate::app::App, id: &str) -> (ReasonCode, String) {
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, id).await;
    c.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    let (code, props) = match c.recv().await {
        Some(Packet::PubAck(a)) => (a.code, a.properties),
        Some(Packet::Disconnect(d)) => (d.code, d.properties.into()),
        other => panic!("expected PUBACK or DISCONNECT, got {other:?}"),
    };
    (code, props.reason_string.clone().unwrap_or_default())
}

#[tokio::test]
async fn a_custom_ca_is_trusted_and_http2_is_used_when_offered() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (addr, versions, _) = https_server(dir.path(), false).await;
    let ca = dir.path().join("ca.pem");

    // Without the CA the server's certificate is not trusted: never delivered.
    let app = gateway(&config(addr, "      ca_only: false\n")).await;
    let (code, reason) = publish(&app, "no-ca").await;
    assert_eq!(code, ReasonCode::SERVER_BUSY, "{reason}");
    assert!(reason.contains("certificate"), "{reason}");
    assert!(versions.seen().is_empty());
    app.stop().await;

    let app =
        gateway(&config(addr, &format!("      ca: \"{}\"\n      ca_only: true\n", ca.display())))
            .await;
    assert_eq!(publish(&app, "ca").await.0, ReasonCode::SUCCESS);
    let got: Vec<Version> = versions.seen().iter().map(|r| r.version).collect();
    assert_eq!(got, vec![Version::HTTP_2], "ALPN offered h2");
    app.stop().await;
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (addr, versions, failed) = https_server(dir.path(), true).await;
    let p = |f: &str| dir.path().join(f).display().to_string();

    let app = gateway(&config(addr, &format!("      ca: \"{}\"\n", p("ca.pem")))).await;
    let (code, reason) = publish(&app, "no-cert").await;
    assert_eq!(code, ReasonCode::SERVER_BUSY, "no client certificate: refused ({reason})");
    assert!(versions.seen().is_empty());
    app.stop().await;
    assert!(*failed.lock().unwrap() >= 1, "the server saw no failed handshake");

    let tls = format!(
        "      ca: \"{}\"\n      cert: \"{}\"\n      key: \"{}\"\n",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let app = gateway(&config(addr, &tls)).await;
    assert_eq!(publish(&app, "cert").await.0, ReasonCode::SUCCESS);
    assert_eq!(versions.seen().len(), 1);
    app.stop().await;
}
