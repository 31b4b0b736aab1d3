//! `amqps://`: the TLS settings of an AMQP broker connection (`amqp.<name>.tls`,
//! `auth_mechanism`) and the rustls client config built from them at each (re)connect (so a
//! rotated client certificate is picked up by the next connection).
//!
//! The TLS handshake runs once through tokio-rustls; after it the connection is driven in
//! rustls' sans-I/O form inside [`Transport`](super::transport::Transport)'s non-blocking
//! fill and flush, so the publisher keeps its batched writes and readiness loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// `amqp.<name>.tls`: how the broker is verified and how mqgate proves who it is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// CAs to verify the broker with (PEM); default: the system's roots.
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// A client certificate chain to present (PEM), with `key`.
    #[serde(default)]
    pub cert: Option<Spanned<PathBuf>>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<Spanned<PathBuf>>,
    /// The name the broker's certificate must carry; default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `amqp.<name>.auth_mechanism`: how mqgate logs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    /// User name and password from the URL (SASL PLAIN).
    #[default]
    Plain,
    /// The TLS client certificate (SASL EXTERNAL; RabbitMQ's `rabbitmq_auth_mechanism_ssl`).
    External,
}

/// Why the TLS client config could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(pub String);

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError(format!("cannot read {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(path, e))?;
    if certs.is_empty() {
        return Err(read_err(path, "no CERTIFICATE block in it"));
    }
    Ok(certs)
}

impl AmqpTlsConfig {
    /// Makes relative file names relative to the config file's folder.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        let Some(dir) = config_file.parent() else { return };
        for p in [&mut self.ca, &mut self.cert, &mut self.key].into_iter().flatten() {
            if p.value.is_relative() {
                p.value = dir.join(&p.value);
            }
        }
    }

    /// Builds the rustls client config (reads the files now).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for c in certs(&ca.value)? {
                    roots.add(c).map_err(|e| read_err(&ca.value, format!("not a CA: {e}")))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for c in native.certs {
                    // One unusable system root does not make the others useless.
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(TlsSetupError(
                        "no system CA certificates found; set tls.ca".into(),
                    ));
                }
            }
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certs(&cert.value)?;
                let key = PrivateKeyDer::from_pem_file(&key.value)
                    .map_err(|e| read_err(&key.value, e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsSetupError(format!("client certificate: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The name the broker's certificate is checked against.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsSetupError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned())
            .map_err(|_| TlsSetupError(format!("{name:?} is not a valid TLS server name")))
    }
}

/// Checks a broker's TLS settings against its URL; errors at their keys.
pub fn validate(
    at: &str,
    url: &Spanned<String>,
    tls: Option<&AmqpTlsConfig>,
    mechanism: Option<&Spanned<AuthMechanism>>,
    err: &mut impl FnMut(&Location, String),
) {
    let amqps = url.value.starts_with("amqps://");
    let Some(tls) = tls else {
        if let Some(m) = mechanism.filter(|m| m.value == AuthMechanism::External) {
            err(&m.referenced, format!("{at}.auth_mechanism: external needs tls.cert and tls.key"));
        }
        return;
    };
    if !amqps {
        err(&url.referenced, format!("{at}: tls: is set, so the url must start with amqps://"));
    }
    match (&tls.cert, &tls.key) {
        (Some(c), None) => err(&c.referenced, format!("{at}.tls.cert needs tls.key")),
        (None, Some(k)) => err(&k.referenced, format!("{at}.tls.key needs tls.cert")),
        (None, None) => {
            if let Some(m) = mechanism.filter(|m| m.value == AuthMechanism::External) {
                err(
                    &m.referenced,
                    format!("{at}.auth_mechanism: external needs tls.cert and tls.key"),
                );
            }
        }
        (Some(_), Some(_)) => {}
    }
    for file in [&tls.ca, &tls.cert].into_iter().flatten() {
        if let Err(e) = certs(&file.value) {
            err(&file.referenced, format!("{at}.tls: {e}"));
        }
    }
    if let Some(key) = &tls.key {
        if let Err(e) = PrivateKeyDer::from_pem_file(&key.value) {
            err(&key.referenced, format!("{at}.tls.key: {}", read_err(&key.value, e)));
        }
    }
}
