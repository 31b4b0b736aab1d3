//! TLS for MQTT listeners: the PEM files into a rustls server config, kept behind a lock so
//! that SIGHUP can swap it (new handshakes use the new files, established connections keep
//! theirs), and the client certificate's name as the MQTT user name.
//!
//! Does no network I/O; reads only the files named in the config.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::config::{IdentitySource, TlsListenerConfig, TlsMinVersion};

/// Why TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read or holds no PEM block of the expected kind.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The files were read but rustls refused them (key does not match the certificate, ...).
    #[error("{0}")]
    Rustls(String),
}

fn read_error(path: &Path, reason: impl ToString) -> TlsFileError {
    TlsFileError::Read { path: path.display().to_string(), reason: reason.to_string() }
}

/// The certificates of a PEM file, in order (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(path, e))?;
    if certs.is_empty() {
        return Err(read_error(path, "no CERTIFICATE block in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_error(path, e))
}

/// The CA certificates of a PEM file as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| read_error(path, format!("not a usable CA: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks that `key` belongs to the leaf of `certs`.
pub fn check_pair(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), TlsFileError> {
    rustls::sign::CertifiedKey::from_der(certs, key, &provider())
        .map(|_| ())
        .map_err(|e| TlsFileError::Rustls(format!("does not fit the certificate ({e})")))
}

/// Builds the rustls server config from the files named in `cfg` (read now).
pub fn server_config(
    cfg: &TlsListenerConfig,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsFileError> {
    let certs = load_certs(&cfg.cert.value)?;
    let key = load_key(&cfg.key.value)?;
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
        TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsFileError::Rustls(e.to_string()))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots(&ca.value)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if cfg.require_client_cert.value {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsFileError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsFileError::Rustls(format!("key does not fit the certificate ({e})")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS listener's current server config, swapped by [`Reloadable::reload`].
pub struct Reloadable {
    /// The files and policy, as configured.
    config: TlsListenerConfig,
    /// ALPN protocols offered (none for MQTT over TLS; `http/1.1` for wss).
    alpn: &'static [&'static [u8]],
    /// What new handshakes use. A std lock: read once per handshake, never held across
    /// an await.
    current: RwLock<Arc<ServerConfig>>,
}

impl Reloadable {
    /// Loads the files once.
    pub fn new(
        config: TlsListenerConfig,
        alpn: &'static [&'static [u8]],
    ) -> Result<Self, TlsFileError> {
        let current = RwLock::new(Arc::new(server_config(&config, alpn)?));
        Ok(Reloadable { config, alpn, current })
    }

    /// The config for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Reads the files again; on error the old config stays.
    pub fn reload(&self) -> Result<(), TlsFileError> {
        let fresh = Arc::new(server_config(&self.config, self.alpn)?);
        match self.current.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// Which certificate name is the user name.
    pub fn identity(&self) -> IdentitySource {
        self.config.identity.value
    }
}

/// The name `source` picks from a (verified) DER certificate, if it has one.
pub fn certificate_name(der: &[u8], source: IdentitySource) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    match source {
        IdentitySource::None => None,
        IdentitySource::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentitySource::SanDns | IdentitySource::SanEmail => {
            let san = cert.subject_alternative_name().ok().flatten()?;
            san.value.general_names.iter().find_map(|name| match (name, source) {
                (GeneralName::DNSName(n), IdentitySource::SanDns) => Some((*n).to_owned()),
                (GeneralName::RFC822Name(n), IdentitySource::SanEmail) => Some((*n).to_owned()),
                _ => None,
            })
        }
    }
    .filter(|n| !n.is_empty())
}
