//! The one template engine of mqgate: minijinja with one set of settings ([`environment`]:
//! one fuel bound, one undefined-value policy, no HTML escaping) for every template there is:
//! `when:` conditions, AMQP exchanges and routing keys, HTTP paths, headers and bodies, and the
//! topics of sources. Compiled once at start, evaluated per message.
//!
//! Undefined values: minijinja's semi-strict mode everywhere. A template may test a value
//! (`{% if json.temp is defined %}`, `{% if header.x %}`), but printing, comparing or
//! iterating an undefined one is an error: the message fails by the rule's or source's policy
//! rather than going to a wrong exchange, path or topic.
//!
//! Fuel: [`FUEL`] instructions per evaluation, the same for every template: enough for loops
//! over a payload's JSON in a body, and a bound on what a runaway template costs per message.
//!
//! Message templates (rules and targets)
//! A template sees one message through [`MessageContext`], a lazy view: nothing is copied until
//! a template reads it, and the payload is parsed as JSON only when a template reads `json`
//! (once per message, however many templates read it). Variables: `topic` (the topic's levels,
//! so `topic[1]` is the second one; `levels` is the same list), `topic_name` (the whole topic),
//! `client_id`, `username`, `qos`, `retain`, `content_type`, `response_topic`,
//! `correlation_data`, `user_properties` (name → value; the last value of a repeated name),
//! `payload_format_indicator`, `message_expiry_interval`, `payload` (the payload as text, if it
//! is UTF-8) and `json` (the payload parsed as JSON). Undefined values may be tested
//! (`{% if json.temp is defined %}`) but printing or comparing one is an error
//! (minijinja's semi-strict mode), so a typo or a missing field fails the rule rather than
//! silently routing to a wrong key.
//!
//! Pure: no I/O and no locks; an evaluation error is returned, never a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use minijinja::value::{Object, Value};
use minijinja::{Environment, UndefinedBehavior};
use thiserror::Error;

use crate::message::Message;

/// Instructions one evaluation may execute (minijinja fuel), for every template: plenty for
/// routing keys, conditions, topics and bodies that loop over a payload's JSON, and a bound on
/// what a runaway loop can cost per message.
pub const FUEL: u64 = 50_000;

/// The variables a template may use.
pub const VARIABLES: &[&str] = &[
    "topic",
    "topic_name",
    "levels",
    "client_id",
    "username",
    "qos",
    "retain",
    "content_type",
    "response_topic",
    "correlation_data",
    "user_properties",
    "payload_format_indicator",
    "message_expiry_interval",
    "payload",
    "json",
];

/// A template or condition that does not compile, or an evaluation that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

/// One compiled template: renders to a string.
#[derive(Debug, Clone)]
pub struct Template {
    /// An environment with mqgate's settings holding this one template, named `t`.
    env: Arc<Environment<'static>>,
    /// The native plan of a template that only substitutes variables (see [`Segment`]):
    /// rendered without the template engine, with the same result.
    fast: Option<Arc<[Segment]>>,
}

/// One piece of a template that only substitutes variables: `alerts.{{ levels[1] }}` is
/// `Text("alerts.")`, `Level(1)`. Such templates (most routing keys) render natively, about
/// twenty times faster than through the engine; anything else goes to minijinja.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text.
    Text(String),
    /// `topic`
    Topic,
    /// `client_id`
    ClientId,
    /// `username` (undefined without one: an error, as in the engine)
    Username,
    /// `qos`
    Qos,
    /// `levels[i]` (negative: from the end, as in the engine)
    Level(i64),
    /// `user_properties.NAME` / `user_properties['NAME']` (the last value of the name)
    UserProperty(String),
}

/// One compiled `when:` condition: through the engine, or natively when it is a chain of
/// simple comparisons joined by `and` (see [`Clause`]).
#[derive(Debug, Clone)]
pub struct Condition(Template, Option<Arc<[Clause]>>, Arc<str>);

/// One clause of a condition evaluated natively: `qos < 2`, `levels[0] == 'a'`,
/// `client_id != "x"`, `retain`, `not retain`. A clause whose value is undefined for a message
/// (no user name, no such level or user property) sends that message to the engine, so the
/// result is always the engine's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Clause {
    /// `retain` (`true`) or `not retain` (`false`).
    Retain(bool),
    /// `qos OP n`.
    Qos(Cmp, i64),
    /// A string variable `==` (`true`) or `!=` (`false`) a string literal.
    Text(Segment, bool, String),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// True when `text` needs a template engine (it contains `{{` or `{%`); plain strings stay on
/// the zero-cost path.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// A fresh environment with mqgate's settings: every template of every kind is compiled in
/// one of these.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    // Routing keys are not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// Checks that `source` compiles as a template and uses only known variables (for config
/// validation; the message says what is wrong).
pub fn check_template(source: &str) -> Result<(), TemplateError> {
    Template::compile(source).map(|_| ())
}

/// Checks that `source` compiles as a `when:` condition and uses only known variables.
pub fn check_condition(source: &str) -> Result<(), TemplateError> {
    Condition::compile(source).map(|_| ())
}

/// Compiles `source` into an environment of its own, as template `t`, refusing variables a
/// message does not have.
fn compile(source: String) -> Result<Arc<Environment<'static>>, TemplateError> {
    compile_with(environment(), source, VARIABLES)
}

/// Compiles `source` as template `t` into `env` (made by [`environment`], possibly with a
/// formatter of its own), refusing variables not in `variables`.
pub fn compile_with(
    mut env: Environment<'static>,
    source: String,
    variables: &[&str],
) -> Result<Arc<Environment<'static>>, TemplateError> {
    env.add_template_owned("t", source).map_err(describe)?;
    let tmpl = env.get_template("t").map_err(describe)?;
    let mut unknown: Vec<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !variables.contains(&v.as_str()))
        .filter(|v| !env.globals().any(|(g, _)| g == v.as_str()))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(TemplateError(format!(
            "unknown variable {} (known: {})",
            unknown.join(", "),
            variables.join(", ")
        )));
    }
    drop(tmpl);
    Ok(Arc::new(env))
}

impl Condition {
    /// Compiles a condition: a minijinja expression such as `qos > 0 and json.temp > 30`.
    pub fn compile(source: &str) -> Result<Condition, TemplateError> {
        // Compiled on its own first, so a syntax error points into the user's text.
        environment().compile_expression(source).map_err(describe)?;
        let env = compile(format!("{{% if {source} %}}1{{% endif %}}"))?;
        let plan = condition_plan(source).map(Arc::from);
        Ok(Condition(Template { env, fast: None }, plan, Arc::from(source)))
    }
}

impl Template {
    /// Compiles a string template (a name such as `sensors.{{ levels[1] }}`).
    pub fn compile(source: &str) -> Result<Template, TemplateError> {
        let env = compile(source.to_owned())?;
        Ok(Template { env, fast: plan(source).map(Arc::from) })
    }

    /// Renders the template for the message behind `ctx` (through the engine).
    pub fn render(&self, ctx: &Value) -> Result<String, TemplateError> {
        let tmpl = self.env.get_template("t").map_err(describe)?;
        tmpl.render(ctx).map_err(describe)
    }

    /// Renders the template for `msg`: natively when it only substitutes variables, else
    /// through the engine with `ctx` (built here on first use, shared with later templates).
    pub fn render_for(
        &self,
        msg: &Arc<Message>,
        ctx: &mut Option<Value>,
    ) -> Result<String, TemplateError> {
        match &self.fast {
            Some(plan) => render_plan(plan, msg),
            None => self.render(ctx.get_or_insert_with(|| MessageContext::value(msg))),
        }
    }
}

/// The native plan of `source`, if it is text and `{{ VAR }}` substitutions of the variables
/// [`Segment`] knows, and nothing else (no statements, filters, comments or expressions).
fn plan(source: &str) -> Option<Vec<Segment>> {
    if source.contains("{%") || source.contains("{#") {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            out.push(Segment::Text(rest[..open].to_owned()));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        let expr = after[..close].trim_matches(|c: char| c == ' ' || c == '-');
        if after[..close].trim().starts_with('-') || after[..close].trim().ends_with('-') {
            return None; // whitespace control changes the surrounding text
        }
        out.push(variable(expr)?);
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return None;
    }
    if !rest.is_empty() {
        out.push(Segment::Text(rest.to_owned()));
    }
    Some(out)
}

/// The segment for one substituted expression, if it is a plain variable we render natively.
fn variable(expr: &str) -> Option<Segment> {
    let ident = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && {
            s.chars().next().is_some_and(|c| !c.is_ascii_digit())
        }
    };
    match expr {
        "topic_name" => return Some(Segment::Topic),
        "client_id" => return Some(Segment::ClientId),
        "username" => return Some(Segment::Username),
        "qos" => return Some(Segment::Qos),
        _ => {}
    }
    let index = |prefix: &str| expr.strip_prefix(prefix).and_then(|r| r.strip_suffix(']'));
    if let Some(index) = index("topic[").or_else(|| index("levels[")) {
        return index.trim().parse().ok().map(Segment::Level);
    }
    if let Some(name) = expr.strip_prefix("user_properties.") {
        return ident(name).then(|| Segment::UserProperty(name.to_owned()));
    }
    let quoted = expr.strip_prefix("user_properties[").and_then(|r| r.strip_suffix(']'))?;
    let name = quoted
        .strip_prefix('\'')
        .and_then(|q| q.strip_suffix('\''))
        .or_else(|| quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')))?;
    let plain = !name.contains(['\\', '\'', '"']);
    plain.then(|| Segment::UserProperty(name.to_owned()))
}

/// Renders a native plan for `msg`; an undefined value is an error, as in the engine's
/// semi-strict mode.
fn render_plan(plan: &[Segment], msg: &Message) -> Result<String, TemplateError> {
    let undefined = || TemplateError("undefined value".to_owned());
    let mut out = String::with_capacity(64);
    for seg in plan {
        match seg {
            Segment::Text(t) => out.push_str(t),
            Segment::Topic => out.push_str(&msg.topic),
            Segment::ClientId => out.push_str(&msg.client_id),
            Segment::Username => out.push_str(msg.username.as_deref().ok_or_else(undefined)?),
            Segment::Qos => out.push(char::from(b'0' + msg.qos as u8)),
            Segment::Level(i) => {
                let n = msg.topic.split('/').count() as i64;
                let at = if *i < 0 { n + i } else { *i };
                let level = usize::try_from(at).ok().and_then(|at| msg.topic.split('/').nth(at));
                out.push_str(level.ok_or_else(undefined)?);
            }
            Segment::UserProperty(name) => {
                let props = &msg.properties.user_properties;
                let value = props.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
                out.push_str(value.ok_or_else(undefined)?);
            }
        }
    }
    Ok(out)
}

impl Condition {
    /// Whether the condition holds for the message behind `ctx` (through the engine).
    pub fn eval(&self, ctx: &Value) -> Result<bool, TemplateError> {
        self.0.render(ctx).map(|out| out == "1")
    }

    /// Whether the condition holds for `msg`: natively when it can, else through the engine
    /// with `ctx` (built here on first use, shared with later templates).
    pub fn eval_for(
        &self,
        msg: &Arc<Message>,
        ctx: &mut Option<Value>,
    ) -> Result<bool, TemplateError> {
        if let Some(held) = self.1.as_deref().and_then(|clauses| eval_clauses(clauses, msg)) {
            return Ok(held);
        }
        self.eval(ctx.get_or_insert_with(|| MessageContext::value(msg)))
    }
}

/// How a `when:` condition came out for one message, and why (the route dry-run).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConditionReport {
    /// The condition as configured.
    pub condition: String,
    /// Whether it holds; `None` when it cannot be evaluated (`error` says why).
    pub held: Option<bool>,
    /// Why it cannot be evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its top-level `and` clauses, each evaluated on its own (when it has more than one):
    /// which one is false.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clauses: Vec<ClauseReport>,
    /// What the values it reads are for this message (`json.temp`: `12`), as the engine
    /// shows them (`undefined` for one the message lacks).
    pub values: std::collections::BTreeMap<String, String>,
}

/// One `and` clause of a condition, evaluated alone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClauseReport {
    /// The clause's text.
    pub clause: String,
    /// Whether it holds; `None` when it cannot be evaluated.
    pub held: Option<bool>,
    /// Why it cannot be evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Longest shown value in a [`ConditionReport`], in characters.
const MAX_SHOWN_VALUE: usize = 200;

impl Condition {
    /// The condition's text.
    pub fn source(&self) -> &str {
        &self.2
    }

    /// Evaluates the condition for `msg` as routing does, then each of its top-level `and`
    /// clauses and each value it reads on their own, to say why it does not hold.
    pub fn explain(&self, msg: &Arc<Message>) -> ConditionReport {
        let ctx = MessageContext::value(msg);
        let (held, error) = match self.eval_for(msg, &mut Some(ctx.clone())) {
            Ok(held) => (Some(held), None),
            Err(e) => (None, Some(e.0)),
        };
        let env = environment();
        let eval = |source: &str| -> Result<Value, TemplateError> {
            let expr = env.compile_expression(source).map_err(describe)?;
            expr.eval(ctx.clone()).map_err(describe)
        };
        let parts = top_level_and(&self.2);
        let clauses = if parts.len() > 1 {
            parts
                .iter()
                .map(|part| {
                    let (held, error) = match eval(part) {
                        Ok(v) => (Some(v.is_true()), None),
                        Err(e) => (None, Some(e.0)),
                    };
                    ClauseReport { clause: (*part).to_owned(), held, error }
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut names: Vec<String> = match env.compile_expression(&self.2) {
            Ok(expr) => expr.undeclared_variables(true).into_iter().collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        let values = names
            .into_iter()
            .map(|name| {
                let shown = match eval(&name) {
                    Ok(v) if v.is_undefined() => "undefined".to_owned(),
                    Ok(v) => {
                        let text = format!("{v:?}");
                        match text.char_indices().nth(MAX_SHOWN_VALUE) {
                            Some((at, _)) => format!("{}…", &text[..at]),
                            None => text,
                        }
                    }
                    Err(e) => format!("(error: {e})"),
                };
                (name, shown)
            })
            .collect();
        ConditionReport { condition: self.2.to_string(), held, error, clauses, values }
    }
}

/// The clauses of `source` joined by `and` outside quotes and brackets; the whole of it when
/// there is an `or` at that level too (then `and` binds inside the `or`s).
fn top_level_and(source: &str) -> Vec<&str> {
    let bytes = source.as_bytes();
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<u8>, 0usize);
    let word_at = |i: usize, word: &[u8]| {
        let before = i == 0 || bytes[i - 1].is_ascii_whitespace() || bytes[i - 1] == b')';
        let end = i + word.len();
        let after = end >= bytes.len() || bytes[end].is_ascii_whitespace() || bytes[end] == b'(';
        before && after && bytes.get(i..end) == Some(word)
    };
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ if depth == 0 && word_at(i, b"or") => return vec![source.trim()],
                _ if depth == 0 && word_at(i, b"and") => {
                    parts.push(source[start..i].trim());
                    start = i + 3;
                    i += 2;
                }
                _ => {}
            },
        }
        i += 1;
    }
    parts.push(source[start..].trim());
    parts
}

/// The native plan of a condition: clauses joined by ` and `, each of a form [`Clause`]
/// knows; `None` for anything else (it then runs in the engine).
fn condition_plan(source: &str) -> Option<Vec<Clause>> {
    // Quotes would make splitting at " and " unsafe: only quote-free literals per clause.
    let mut out = Vec::new();
    for part in source.split(" and ") {
        let part = part.trim();
        out.push(match part {
            "retain" => Clause::Retain(true),
            "not retain" => Clause::Retain(false),
            _ => clause(part)?,
        });
    }
    Some(out)
}

/// `VAR OP LITERAL` with VAR `qos` and an integer, or a string variable, `==`/`!=` and a
/// quoted string without quotes, backslashes or ` and ` inside.
fn clause(part: &str) -> Option<Clause> {
    let ops = [
        ("==", Cmp::Eq),
        ("!=", Cmp::Ne),
        ("<=", Cmp::Le),
        (">=", Cmp::Ge),
        ("<", Cmp::Lt),
        (">", Cmp::Gt),
    ];
    let (at, op, cmp) = ops.iter().find_map(|(op, cmp)| part.find(op).map(|at| (at, *op, *cmp)))?;
    let (lhs, rhs) = (part[..at].trim(), part[at + op.len()..].trim());
    if lhs == "qos" {
        let n: i64 = rhs.parse().ok()?;
        return Some(Clause::Qos(cmp, n));
    }
    let eq = match cmp {
        Cmp::Eq => true,
        Cmp::Ne => false,
        _ => return None,
    };
    let literal = rhs
        .strip_prefix('\'')
        .and_then(|q| q.strip_suffix('\''))
        .or_else(|| rhs.strip_prefix('"').and_then(|q| q.strip_suffix('"')))?;
    if literal.contains(['\'', '"', '\\']) {
        return None;
    }
    let var = match variable(lhs)? {
        Segment::Qos | Segment::Text(_) => return None,
        v => v,
    };
    Some(Clause::Text(var, eq, literal.to_owned()))
}

/// Evaluates native clauses; `None` when a value is undefined for `msg` (the engine decides).
fn eval_clauses(clauses: &[Clause], msg: &Message) -> Option<bool> {
    for c in clauses {
        let held = match c {
            Clause::Retain(want) => msg.retain == *want,
            Clause::Qos(cmp, n) => {
                let q = msg.qos as i64;
                match cmp {
                    Cmp::Eq => q == *n,
                    Cmp::Ne => q != *n,
                    Cmp::Lt => q < *n,
                    Cmp::Le => q <= *n,
                    Cmp::Gt => q > *n,
                    Cmp::Ge => q >= *n,
                }
            }
            Clause::Text(var, eq, literal) => {
                let value = render_plan(std::slice::from_ref(var), msg).ok()?;
                (value == *literal) == *eq
            }
        };
        if !held {
            // `and` stops at the first false clause, as the engine does.
            return Some(false);
        }
    }
    Some(true)
}

/// minijinja's error, with its detail, as one line.
/// A minijinja error as a [`TemplateError`] (with the detail minijinja gives).
pub fn describe(e: minijinja::Error) -> TemplateError {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text.push_str(": ");
            text.push_str(detail);
        }
    }
    TemplateError(text.lines().next().unwrap_or("template error").to_owned())
}

/// The template context of one message: a lazy view of it (see the module docs).
#[derive(Debug)]
pub struct MessageContext {
    /// The message.
    msg: Arc<Message>,
    /// The payload parsed as JSON, once a template asked (`None`: not JSON).
    json: OnceLock<Option<Value>>,
    /// The topic's levels, once a template asked (condition and routing key often both do).
    levels: OnceLock<Value>,
}

impl MessageContext {
    /// The context value for `msg` (one small allocation; nothing is copied yet).
    pub fn value(msg: &Arc<Message>) -> Value {
        Value::from_object(MessageContext {
            msg: Arc::clone(msg),
            json: OnceLock::new(),
            levels: OnceLock::new(),
        })
    }
}

/// An optional string as a value (none: undefined).
fn opt_str(s: Option<&str>) -> Option<Value> {
    s.map(Value::from)
}

impl Object for MessageContext {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        let m = &self.msg;
        let p = &m.properties;
        match key {
            "topic_name" => Some(Value::from(m.topic.as_str())),
            "topic" | "levels" => Some(
                self.levels
                    .get_or_init(|| {
                        Value::from(m.topic.split('/').map(Value::from).collect::<Vec<_>>())
                    })
                    .clone(),
            ),
            "client_id" => Some(Value::from(&*m.client_id)),
            "username" => opt_str(m.username.as_deref()),
            "qos" => Some(Value::from(m.qos as u8)),
            "retain" => Some(Value::from(m.retain)),
            "content_type" => opt_str(p.content_type.as_deref()),
            "response_topic" => opt_str(p.response_topic.as_deref()),
            "correlation_data" => {
                p.correlation_data.as_ref().map(|d| Value::from(String::from_utf8_lossy(d)))
            }
            "user_properties" => {
                let map: BTreeMap<String, String> =
                    p.user_properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                Some(Value::from(map))
            }
            "payload_format_indicator" => p.payload_format_indicator.map(Value::from),
            "message_expiry_interval" => p.message_expiry_interval.map(Value::from),
            "payload" => std::str::from_utf8(&m.payload).ok().map(Value::from),
            "json" => self
                .json
                .get_or_init(|| {
                    serde_json::from_slice::<serde_json::Value>(&m.payload)
                        .ok()
                        .map(|j| Value::from(minijinja::value::Serde(j)))
                })
                .clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::mqtt::codec::{Properties, QoS};

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            charge: Default::default(),
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("dev-1"),
            username: Some(Arc::from("alice")),
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                user_properties: vec![("site".to_owned(), "x".to_owned())],
                ..Properties::default()
            }
            .into(),
            received: Instant::now(),
            packet_id: Some(3),
        })
    }

    fn build(tmpl: &str, cond: &str) -> (Template, Condition) {
        let t = Template::compile(tmpl).expect("template compiles");
        let c = Condition::compile(cond).expect("condition compiles");
        (t, c)
    }

    #[test]
    fn renders_and_evaluates_over_the_message() {
        let (t, c) = build(
            "{{ levels[1] }}.{{ user_properties.site }}.{{ json.kind }}",
            "qos > 0 and json.temp > 30 and username == 'alice' and content_type == 'application/json'",
        );
        let m = msg("sensors/a/telemetry", br#"{"temp": 31, "kind": "t"}"#);
        let ctx = MessageContext::value(&m);
        assert_eq!(t.render(&ctx).as_deref(), Ok("a.x.t"));
        assert_eq!(c.eval(&ctx), Ok(true));
        let cold = msg("sensors/a/telemetry", br#"{"temp": 3, "kind": "t"}"#);
        assert_eq!(c.eval(&MessageContext::value(&cold)), Ok(false));
    }

    #[test]
    fn a_missing_field_or_non_json_payload_is_an_error_not_a_guess() {
        let (t, c) = build("{{ json.kind }}", "json.temp > 30");
        let m = msg("a", b"not json");
        let ctx = MessageContext::value(&m);
        assert!(t.render(&ctx).is_err());
        assert!(c.eval(&ctx).is_err());
        // ... but it can be tested for.
        let (_, c) = build("x", "json is defined and json.temp > 30");
        assert_eq!(c.eval(&ctx), Ok(false));
    }

    #[test]
    fn compile_errors_and_unknown_variables_are_reported() {
        assert!(check_template("{{ topic").is_err());
        let e = check_template("{{ topik }}").unwrap_err();
        assert!(e.0.contains("unknown variable topik"), "{e}");
        assert!(check_condition("qos >").is_err());
        assert!(check_condition("qos > 0").is_ok());
        assert!(is_template("a.{{ topic }}") && !is_template("plain.key"));
    }

    #[test]
    fn native_plans_render_as_the_engine_does() {
        let sources = [
            "bench.{{ levels[1] }}",
            "{{levels[0]}}.{{ levels[-1] }}/{{ topic_name }}",
            "{{ topic[1] }}.{{ topic[-1] }}",
            "{{ client_id }}-{{ qos }}-{{ username }}",
            "x.{{ user_properties.site }}.{{ user_properties['site'] }}",
            "{{ levels[7] }}",
            "{{ user_properties.missing }}",
            "{{ levels[-9] }}",
            "no variables",
        ];
        let messages = [msg("sensors/a/telemetry", b""), msg("one", b"")];
        for source in sources {
            assert!(plan(source).is_some(), "{source} should have a native plan");
            let t = Template::compile(source).expect("compiles");
            for m in &messages {
                let native = render_plan(t.fast.as_deref().expect("plan"), m);
                let engine = t.render(&MessageContext::value(m));
                assert_eq!(native.is_ok(), engine.is_ok(), "{source}: {native:?} vs {engine:?}");
                if let (Ok(a), Ok(b)) = (native, engine) {
                    assert_eq!(a, b, "{source}");
                }
            }
        }
        for engine_only in
            ["{{ levels | length }}", "{% if qos %}a{% endif %}", "{{ topic }}", "{{ json.a }}"]
        {
            assert!(plan(engine_only).is_none(), "{engine_only}");
        }
    }

    #[test]
    fn native_conditions_decide_as_the_engine_does() {
        let conditions = [
            "qos < 2 and levels[0] == 'benchT' and not retain",
            "qos >= 1 and retain",
            "qos == 1 and client_id != \"dev-1\"",
            "username == 'alice' and user_properties.site == 'x'",
            "levels[5] == 'x'",
            "qos > 0 and user_properties.nope != 'x'",
            "topic_name != 'one'",
            "topic[0] == 'benchT'",
        ];
        let mut retained = (*msg("one", b"")).clone();
        retained.retain = true;
        retained.username = None;
        let messages = [msg("benchT/a/telemetry", b""), msg("one", b""), Arc::new(retained)];
        for source in conditions {
            let clauses = condition_plan(source).unwrap_or_else(|| panic!("{source}: no plan"));
            let c = Condition::compile(source).expect("compiles");
            for m in &messages {
                let engine = c.eval(&MessageContext::value(m));
                // `None`: left to the engine.
                if let Some(native) = eval_clauses(&clauses, m) {
                    assert_eq!(Ok(native), engine, "{source} on {}", m.topic);
                }
                assert_eq!(c.eval_for(m, &mut None), engine, "{source} on {}", m.topic);
            }
        }
        for engine_only in [
            "json.temp > 30",
            "qos > 0 or retain",
            "topic_name == 'a and b'",
            "levels | length > 2",
        ] {
            assert!(condition_plan(engine_only).is_none(), "{engine_only}");
        }
    }

    #[test]
    fn tojson_quotes_whatever_the_payload_holds() {
        let m = msg("a/b", b"he said \"hi\"\n\x01");
        let t = Template::compile(
            r#"{"text": {{ payload | tojson }}, "topic": {{ topic_name | tojson }}}"#,
        )
        .expect("compiles");
        let out = t.render(&MessageContext::value(&m)).expect("renders");
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(v["text"], "he said \"hi\"\n\u{1}");
        assert_eq!(v["topic"], "a/b");
    }

    #[test]
    fn a_condition_says_which_clause_fails_and_what_it_read() {
        let c = Condition::compile("qos > 0 and json.temp > 30 and levels[0] == 'sensors'")
            .expect("compiles");
        let r = c.explain(&msg("sensors/a", br#"{"temp": 12}"#));
        assert_eq!(r.held, Some(false));
        let clauses: Vec<_> = r.clauses.iter().map(|c| (c.clause.as_str(), c.held)).collect();
        assert_eq!(
            clauses,
            [
                ("qos > 0", Some(true)),
                ("json.temp > 30", Some(false)),
                ("levels[0] == 'sensors'", Some(true))
            ]
        );
        assert_eq!(r.values.get("json.temp").map(String::as_str), Some("12"));
        assert_eq!(r.values.get("qos").map(String::as_str), Some("1"));
        // An undefined value is named as such; `or` at the top level is one clause.
        let c = Condition::compile("json.missing == 1 or retain").expect("compiles");
        let r = c.explain(&msg("a", b"{}"));
        assert!(r.clauses.is_empty());
        assert_eq!(r.values.get("json.missing").map(String::as_str), Some("undefined"));
        assert_eq!(top_level_and("a == 'x and y' and (b or c)"), ["a == 'x and y'", "(b or c)"]);
        assert_eq!(top_level_and("android and b"), ["android", "b"]);
    }

    #[test]
    fn fuel_bounds_a_runaway_template() {
        let (t, _) = build("{% for i in range(100000) %}{{ i }}{% endfor %}", "true");
        let e = t.render(&MessageContext::value(&msg("a", b""))).unwrap_err();
        assert!(e.0.contains("fuel"), "{e}");
    }
}
