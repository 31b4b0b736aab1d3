//! `mqtt.listeners:`: the extra listeners beside `mqtt.listen` (TLS, WebSocket, WebSocket over
//! TLS, more plain TCP), their TLS files and their checks. Pure apart from reading the
//! certificate files named in the config, so that `mqgate check` finds a bad file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// One `mqtt.listeners:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// What is spoken on the socket.
    pub kind: ListenerKind,
    /// The address to bind, e.g. "0.0.0.0:8883".
    pub listen: Spanned<String>,
    /// The `listener` label of its metrics and log lines; default `<kind>:<listen>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Certificate and key (kinds `tls` and `wss`).
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
    /// The HTTP path of the WebSocket upgrade (kinds `ws` and `wss`).
    #[serde(default = "default_ws_path")]
    pub path: String,
    /// Browser origins allowed to open a WebSocket (`Origin` header); empty: any origin.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Each connection starts with a PROXY protocol v1 or v2 header (HAProxy, cloud load
    /// balancers); the address in it is the client's address in logs and limits.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// The kinds of listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// MQTT over plain TCP.
    Tcp,
    /// MQTT over TLS (mutual TLS with `client_ca`).
    Tls,
    /// MQTT over WebSocket (MQTT 5.0 §6).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    /// The kind as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    /// Whether the kind runs TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    /// Whether the kind speaks WebSocket.
    pub fn is_ws(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// A TLS listener's files and client certificate policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: Spanned<PathBuf>,
    /// The private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: Spanned<PathBuf>,
    /// Ask for client certificates signed by one of these CAs (PEM).
    #[serde(default)]
    pub client_ca: Option<Spanned<PathBuf>>,
    /// Refuse the handshake of a client without a valid certificate (needs `client_ca`).
    #[serde(default = "spanned_default")]
    pub require_client_cert: Spanned<bool>,
    /// Which name of a verified client certificate is the client's user name.
    #[serde(default = "spanned_default")]
    pub identity: Spanned<IdentitySource>,
    /// The lowest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsMinVersion,
}

/// Which name of the client certificate becomes the MQTT user name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The certificate only authenticates the connection; the CONNECT's user name and
    /// password are checked as on any listener.
    #[default]
    None,
    /// The subject's common name (CN).
    Cn,
    /// The first DNS name of the subject alternative names.
    SanDns,
    /// The first e-mail address (rfc822Name) of the subject alternative names.
    SanEmail,
}

/// `min_version: "1.2" | "1.3"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

fn spanned_default<T: Default>() -> Spanned<T> {
    Spanned::new(T::default(), Location::UNKNOWN, Location::UNKNOWN)
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

impl ListenerConfig {
    /// The `listener` label: `name`, else `<kind>:<listen>`.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("{}:{}", self.kind.as_str(), self.listen.value))
    }
}

/// Makes the relative file names of every listener relative to the config file's folder (as
/// written they would depend on the directory mqgate was started from).
pub fn resolve_paths(listeners: &mut [ListenerConfig], config_file: &Path) {
    let Some(dir) = config_file.parent() else { return };
    let resolve = |p: &mut Spanned<PathBuf>| {
        if p.value.is_relative() {
            p.value = dir.join(&p.value);
        }
    };
    for tls in listeners.iter_mut().filter_map(|l| l.tls.as_mut()) {
        resolve(&mut tls.cert);
        resolve(&mut tls.key);
        if let Some(ca) = tls.client_ca.as_mut() {
            resolve(ca);
        }
    }
}

/// Checks every listener: addresses, the kind's required parts, and that the TLS files load
/// (a missing, unreadable or mismatched file is reported at its key).
pub fn validate(listeners: &[ListenerConfig], err: &mut impl FnMut(&Location, String)) {
    let mut labels = std::collections::HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        let at = format!("mqtt.listeners[{i}]");
        if let Err(e) = l.listen.value.parse::<std::net::SocketAddr>() {
            err(&l.listen.referenced, format!("{at}.listen: not an address:port ({e})"));
        }
        if !labels.insert(l.label()) {
            err(&l.listen.referenced, format!("{at}: a second listener named {:?}", l.label()));
        }
        if l.kind.is_ws() && !l.path.starts_with('/') {
            err(&l.listen.referenced, format!("{at}.path must start with '/'"));
        }
        match (&l.tls, l.kind.is_tls()) {
            (None, true) => err(
                &l.listen.referenced,
                format!("{at}: kind {} needs `tls: {{ cert, key }}`", l.kind.as_str()),
            ),
            (Some(t), false) => err(
                &t.cert.referenced,
                format!("{at}: kind {} takes no `tls:` (use tls or wss)", l.kind.as_str()),
            ),
            (Some(t), true) => validate_tls(&at, t, err),
            (None, false) => {}
        }
    }
}

fn validate_tls(at: &str, t: &TlsListenerConfig, err: &mut impl FnMut(&Location, String)) {
    if t.require_client_cert.value && t.client_ca.is_none() {
        err(
            &t.require_client_cert.referenced,
            format!("{at}.tls.require_client_cert needs tls.client_ca (the CAs to verify with)"),
        );
    }
    if t.identity.value != IdentitySource::None && t.client_ca.is_none() {
        err(
            &t.identity.referenced,
            format!("{at}.tls.identity needs tls.client_ca (only a verified certificate names)"),
        );
    }
    let certs = match super::tls::load_certs(&t.cert.value) {
        Ok(c) => Some(c),
        Err(e) => {
            err(&t.cert.referenced, format!("{at}.tls.cert: {e}"));
            None
        }
    };
    let key = match super::tls::load_key(&t.key.value) {
        Ok(k) => Some(k),
        Err(e) => {
            err(&t.key.referenced, format!("{at}.tls.key: {e}"));
            None
        }
    };
    if let (Some(certs), Some(key)) = (certs, key) {
        if let Err(e) = super::tls::check_pair(certs, key) {
            err(&t.key.referenced, format!("{at}.tls.key: {e}"));
        }
    }
    if let Some(ca) = &t.client_ca {
        if let Err(e) = super::tls::load_roots(&ca.value) {
            err(&ca.referenced, format!("{at}.tls.client_ca: {e}"));
        }
    }
}
