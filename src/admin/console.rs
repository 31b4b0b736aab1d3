//! The web console: static files embedded in the binary (`src/admin/console/`: plain HTML,
//! CSS and JavaScript modules, no build step, nothing fetched from the network), served at
//! `/` and `/console/{file}`. They hold no data, so the guard lets them through without the
//! token (the Host check still applies); the page asks for the token and sends it as
//! `Authorization: Bearer` on every API call, the live trace included (a `fetch` stream, not
//! `EventSource`, which cannot send headers).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The files: name, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("console/index.html")),
    ("style.css", "text/css; charset=utf-8", include_str!("console/style.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("console/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_str!("console/dom.js")),
    ("views.js", "text/javascript; charset=utf-8", include_str!("console/views.js")),
];

/// Only this server's own files and API; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn serve(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    };
    let mut r = (StatusCode::OK, *body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Embedded: a new binary may bring new files under the same names.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`: the page.
pub async fn index() -> Response {
    serve("index.html")
}

/// `GET /console/{file}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    serve(&name)
}

/// Whether `path` is one of the console's files (served without the token).
pub fn is_asset(path: &str) -> bool {
    path == "/" || path.strip_prefix("/console/").is_some_and(|n| FILES.iter().any(|f| f.0 == n))
}
