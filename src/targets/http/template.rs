//! minijinja templates of HTTP targets (path, headers, body): compiled once at load, rendered
//! per message with a bounded amount of work (fuel), never panicking on a message.
//!
//! One engine for every template ([`crate::template`]: the same fuel and undefined-value
//! policy). A template sees the message through the rules' lazy context
//! ([`MessageContext`](crate::template::MessageContext)): the same variables as rule
//! templates and `when:` conditions — `topic` (the list of levels: `topic[1]` is the second),
//! `topic_name` (the whole topic), `client_id`, `username`, `qos`, `retain`, `content_type`,
//! `user_properties`, `payload` (text, when UTF-8), `json` (parsed, when JSON) and the other
//! MQTT 5 properties; an unknown variable is a config error. The payload is parsed only when a
//! template reads `json`. Printing an undefined value is an error (a path must not silently
//! lose a segment): the message fails, permanently. In a
//! `path`, every `{{ }}` value is percent-encoded (`/` kept, so `{{ topic_name }}` gives
//! several segments); a rendered path with a `.` or `..` segment is refused.

use std::borrow::Cow;

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use thiserror::Error;

/// Bytes kept as they are in a path value: RFC 3986 unreserved characters and `/`.
const PATH_VALUE: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// What a template is for: where its output goes decides how values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A URL path: values percent-encoded, dot segments refused.
    Path,
    /// A header value or a body: values written as they are.
    Text,
}

/// A template that does not compile, or a rendering that failed.
#[derive(Debug, Error)]
pub enum TemplateError {
    /// Syntax errors and the like, found at load.
    #[error("template does not compile: {0}")]
    Compile(String),
    /// A rendering error (undefined value, out of fuel, a bad path segment).
    #[error("template failed: {0}")]
    Render(String),
}

/// Which parts of the message the templates of a target read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// `payload` is used.
    pub payload: bool,
    /// `json` is used.
    pub json: bool,
}

impl Needs {
    /// Both needs of `self` and `other`.
    pub fn merge(self, other: Needs) -> Needs {
        Needs { payload: self.payload || other.payload, json: self.json || other.json }
    }
}

/// A compiled template, or the text itself when it has no template syntax.
#[derive(Debug)]
pub enum Template {
    /// No `{{`, `{%` or `{#`: used as is.
    Static(String),
    /// An environment holding the one template, named `t`.
    Dynamic {
        /// The environment owning the compiled template.
        env: std::sync::Arc<Environment<'static>>,
        /// Path or text.
        kind: Kind,
        /// What the template reads.
        needs: Needs,
    },
}

impl Template {
    /// Compiles `source` once; errors name the problem (minijinja's message).
    pub fn compile(kind: Kind, source: &str) -> Result<Template, TemplateError> {
        if !["{{", "{%", "{#"].iter().any(|m| source.contains(m)) {
            if kind == Kind::Path {
                check_path(source)?;
            }
            return Ok(Template::Static(source.to_owned()));
        }
        let mut env = crate::template::environment();
        if kind == Kind::Path {
            env.set_formatter(|out, _state, value| {
                let text = value.to_string();
                let encoded: Cow<str> = if value.is_safe() {
                    Cow::Borrowed(&text)
                } else {
                    percent_encoding::utf8_percent_encode(&text, PATH_VALUE).into()
                };
                out.write_str(&encoded)
                    .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "write failed"))
            });
        }
        let env = crate::template::compile_with(env, source.to_owned(), crate::template::VARIABLES)
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        let vars = env
            .get_template("t")
            .map_err(|e| TemplateError::Compile(e.to_string()))?
            .undeclared_variables(false);
        let needs = Needs { payload: vars.contains("payload"), json: vars.contains("json") };
        Ok(Template::Dynamic { env, kind, needs })
    }

    /// What the template reads from the message.
    pub fn needs(&self) -> Needs {
        match self {
            Template::Static(_) => Needs::default(),
            Template::Dynamic { needs, .. } => *needs,
        }
    }

    /// Renders with `ctx` (from [`context`]).
    pub fn render<'a>(&'a self, ctx: &Value) -> Result<Cow<'a, str>, TemplateError> {
        match self {
            Template::Static(s) => Ok(Cow::Borrowed(s)),
            Template::Dynamic { env, kind, .. } => {
                let t = env.get_template("t").map_err(|e| TemplateError::Render(e.to_string()))?;
                let out = t.render(ctx).map_err(|e| TemplateError::Render(e.to_string()))?;
                if *kind == Kind::Path {
                    check_path(&out)?;
                }
                Ok(Cow::Owned(out))
            }
        }
    }
}

/// Refuses a path with a `.` or `..` segment (also percent-encoded): it would leave the
/// resource the template names.
fn check_path(path: &str) -> Result<(), TemplateError> {
    for segment in path.split(['/', '?', '#']) {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(TemplateError::Render(format!(
                "the path {path:?} has a {decoded:?} segment"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::message::Message;
    use crate::mqtt::codec::{PublishProperties, QoS};
    use crate::template::MessageContext;

    fn msg(topic: &str, payload: &[u8]) -> Arc<Message> {
        Arc::new(Message {
            charge: Default::default(),
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: PublishProperties::none(),
            received: Instant::now(),
            packet_id: Some(7),
        })
    }

    fn render(kind: Kind, src: &str, m: &Arc<Message>) -> Result<String, TemplateError> {
        let t = Template::compile(kind, src)?;
        let ctx = MessageContext::value(m);
        t.render(&ctx).map(Cow::into_owned)
    }

    #[test]
    fn topic_levels_and_fields() {
        let m = msg("sensors/a b/alerts", br#"{"level": 3}"#);
        assert_eq!(render(Kind::Text, "{{ topic[1] }}", &m).unwrap(), "a b");
        assert_eq!(
            render(Kind::Text, "{{ topic_name }}|{{ qos }}", &m).unwrap(),
            "sensors/a b/alerts|1"
        );
        assert_eq!(render(Kind::Text, "{{ json.level * 2 }}", &m).unwrap(), "6");
        assert_eq!(render(Kind::Text, "{{ client_id }}", &m).unwrap(), "dev-1");
        assert_eq!(render(Kind::Text, "{{ payload }}", &m).unwrap(), r#"{"level": 3}"#);
    }

    #[test]
    fn path_values_are_encoded_and_dot_segments_refused() {
        let m = msg("sensors/a?b#c%/alerts", b"x");
        assert_eq!(
            render(Kind::Path, "/alerts/{{ topic[1] }}", &m).unwrap(),
            "/alerts/a%3Fb%23c%25"
        );
        let m = msg("sensors/a/t", b"x");
        assert_eq!(render(Kind::Path, "/s/{{ topic_name }}", &m).unwrap(), "/s/sensors/a/t");
        let m = msg("sensors/../t", b"x");
        assert!(render(Kind::Path, "/s/{{ topic[1] }}/x", &m).is_err());
        assert!(Template::compile(Kind::Path, "/a/../b").is_err());
    }

    #[test]
    fn undefined_values_fail_and_bad_syntax_is_a_compile_error() {
        let m = msg("a", b"x");
        assert!(matches!(render(Kind::Text, "{{ topic[3] }}", &m), Err(TemplateError::Render(_))));
        assert!(matches!(
            Template::compile(Kind::Text, "{{ topic[1 }}"),
            Err(TemplateError::Compile(_))
        ));
        assert!(matches!(
            Template::compile(Kind::Text, "{{ topik }}"),
            Err(TemplateError::Compile(e)) if e.contains("unknown variable topik")
        ));
        // Tested, an undefined value is not an error (the same policy as conditions).
        assert_eq!(
            render(Kind::Text, "{% if topic[3] %}x{% else %}y{% endif %}", &m).unwrap(),
            "y"
        );
    }

    #[test]
    fn fuel_bounds_the_work() {
        let m = msg("a", b"x");
        let e = render(
            Kind::Text,
            "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
            &m,
        );
        assert!(matches!(&e, Err(TemplateError::Render(r)) if r.contains("fuel")), "{e:?}");
    }
}
