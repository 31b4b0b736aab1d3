//! What the console's JSON routes share: answers (`{"error": "..."}` on failure) and the
//! query string parser. Pure.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Items in a page when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;
/// Most items in one page.
pub const MAX_PAGE: usize = 1_000;

/// `value` as pretty JSON with `status`.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_string_pretty(value) {
        Ok(mut s) => {
            s.push('\n');
            (status, [(header::CONTENT_TYPE, "application/json")], s).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode: {e}")),
    }
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message });
    (status, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

/// A query string's parameters, percent-decoded (`+` is a space), limited to `known` names:
/// an unknown one is an error naming the ones allowed (for a 400: [`bad`]).
pub fn query<'a>(raw: Option<&str>, known: &[&'a str]) -> Result<Vec<(&'a str, String)>, String> {
    let mut out = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(name) = known.iter().find(|n| **n == k) else {
            return Err(format!("unknown query parameter {k:?}: use {}", known.join(", ")));
        };
        let v = v.replace('+', " ");
        let decoded = percent_encoding::percent_decode_str(&v)
            .decode_utf8()
            .map_err(|_| format!("query parameter {k}: not UTF-8"))?;
        out.push((*name, decoded.into_owned()));
    }
    Ok(out)
}

/// The `limit` parameter: `DEFAULT_PAGE` when absent, clamped to 1..=`MAX_PAGE`.
pub fn limit(value: Option<&str>) -> Result<usize, String> {
    match value {
        None => Ok(DEFAULT_PAGE),
        Some(v) => v
            .parse::<usize>()
            .map(|n| n.clamp(1, MAX_PAGE))
            .map_err(|_| format!("limit: not a number: {v:?}")),
    }
}

/// A 400 saying `message`.
pub fn bad(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, &message)
}

/// The first value of parameter `name`.
pub fn get<'q>(params: &'q [(&str, String)], name: &str) -> Option<&'q str> {
    params.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_checked() {
        let q = query(Some("filter=a%2F%23&search=x+y&limit=5"), &["filter", "search", "limit"])
            .expect("valid");
        assert_eq!(get(&q, "filter"), Some("a/#"));
        assert_eq!(get(&q, "search"), Some("x y"));
        assert_eq!(limit(get(&q, "limit")).ok(), Some(5));
        assert_eq!(limit(Some("100000")).ok(), Some(MAX_PAGE));
        assert!(limit(Some("x")).is_err());
        assert!(query(Some("colour=red"), &["filter"]).is_err());
        assert!(query(Some("filter=%ff"), &["filter"]).is_err());
    }
}
