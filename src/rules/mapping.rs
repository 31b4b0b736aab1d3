//! MQTT topics ↔ AMQP routing keys, both ways, in one place (the uplink encodes, the downlink
//! decodes).
//!
//! Two mappings:
//! - [`TopicMapping::Plugin`] (the default) is RabbitMQ's MQTT plugin's: '/' ↔ '.', and for
//!   filters '+' ↔ '*', '#' ↔ '#'. It is lossy: a '.' in a topic becomes a level separator on
//!   the way back (`a.b/c` → `a.b.c` → `a/b/c`; RabbitMQ issue #2559).
//! - [`TopicMapping::Lossless`] first escapes the characters that mean something in a routing
//!   or binding key, percent-style: '%' → `%25`, '.' → `%2E`, '*' → `%2A`, '#' → `%23`; then
//!   maps as the plugin does. Every topic survives the round trip, and a binding key made from a
//!   filter with [`encode_filter`] matches exactly the routing keys of the topics the filter
//!   matches.
//!
//! Pure functions: no I/O, no allocation beyond the returned string. Decoding a routing key
//! that the mapping could not have produced (a stray or malformed escape) is an error, never a
//! guess.

use serde::Deserialize;
use thiserror::Error;

/// How topics become routing keys (`topic_mapping:` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicMapping {
    /// RabbitMQ's MQTT plugin's mapping: '/' ↔ '.' (lossy for topics containing '.').
    #[default]
    Plugin,
    /// Escapes '%', '.', '*', '#' as `%25`, `%2E`, `%2A`, `%23`, then '/' ↔ '.': reversible.
    Lossless,
}

/// A routing key that the chosen mapping cannot turn back into a topic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A '%' not followed by one of `25`, `2E`, `2A`, `23` (lossless mapping).
    #[error("invalid escape at byte {0} of the routing key (lossless mapping expects %25, %2E, %2A or %23)")]
    BadEscape(usize),
}

/// The escape character of the lossless mapping.
const ESCAPE: char = '%';

/// The escape sequence for a character the lossless mapping escapes, if it is one.
fn escape_of(c: char) -> Option<&'static str> {
    match c {
        '%' => Some("%25"),
        '.' => Some("%2E"),
        '*' => Some("%2A"),
        '#' => Some("%23"),
        _ => None,
    }
}

/// The routing key for a topic name.
pub fn encode_topic(mapping: TopicMapping, topic: &str) -> String {
    match mapping {
        TopicMapping::Plugin => topic.replace('/', "."),
        TopicMapping::Lossless => {
            let mut out = String::with_capacity(topic.len() + 8);
            push_escaped_level(&mut out, topic);
            out
        }
    }
}

/// The topic name a routing key stands for (the inverse of [`encode_topic`]).
pub fn decode_routing_key(mapping: TopicMapping, routing_key: &str) -> Result<String, DecodeError> {
    match mapping {
        TopicMapping::Plugin => Ok(routing_key.replace('.', "/")),
        TopicMapping::Lossless => unescape(routing_key, false),
    }
}

/// The binding key for an MQTT topic filter: as [`encode_topic`], with a whole-level '+' → '*'
/// and '#' → '#'.
pub fn encode_filter(mapping: TopicMapping, filter: &str) -> String {
    let mut out = String::with_capacity(filter.len() + 8);
    for (i, level) in filter.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match (level, mapping) {
            ("+", _) => out.push('*'),
            ("#", _) => out.push('#'),
            (level, TopicMapping::Plugin) => out.push_str(level),
            (level, TopicMapping::Lossless) => push_escaped_level(&mut out, level),
        }
    }
    out
}

/// The MQTT filter a binding key stands for (the inverse of [`encode_filter`]): a whole-word
/// '*' → '+', '#' → '#'.
pub fn decode_binding_key(mapping: TopicMapping, binding_key: &str) -> Result<String, DecodeError> {
    match mapping {
        TopicMapping::Plugin => Ok(binding_key
            .split('.')
            .map(|w| if w == "*" { "+" } else { w })
            .collect::<Vec<_>>()
            .join("/")),
        TopicMapping::Lossless => unescape(binding_key, true),
    }
}

/// Appends `text` with '/' → '.' and the lossless escapes.
fn push_escaped_level(out: &mut String, text: &str) {
    for c in text.chars() {
        match (c, escape_of(c)) {
            ('/', _) => out.push('.'),
            (_, Some(esc)) => out.push_str(esc),
            (c, None) => out.push(c),
        }
    }
}

/// Undoes the lossless escapes, with '.' → '/'; `filter` also turns whole-word '*' into '+'.
fn unescape(key: &str, filter: bool) -> Result<String, DecodeError> {
    let mut out = String::with_capacity(key.len());
    let mut pos = 0;
    for (w, word) in key.split('.').enumerate() {
        if w > 0 {
            out.push('/');
        }
        if filter && word == "*" {
            out.push('+');
            pos += word.len() + 1;
            continue;
        }
        let bytes = word.as_bytes();
        let mut i = 0;
        while i < word.len() {
            if bytes[i] == ESCAPE as u8 {
                let c = match bytes.get(i + 1..i + 3) {
                    Some(b"25") => '%',
                    Some(b"2E") => '.',
                    Some(b"2A") => '*',
                    Some(b"23") => '#',
                    _ => return Err(DecodeError::BadEscape(pos + i)),
                };
                out.push(c);
                i += 3;
            } else {
                // Copy the run up to the next escape in one go (keeps UTF-8 intact).
                let end = word[i..].find(ESCAPE).map_or(word.len(), |n| i + n);
                out.push_str(&word[i..end]);
                i = end;
            }
        }
        pos += word.len() + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mqtt::topic;

    #[test]
    fn plugin_mapping_is_rabbitmqs() {
        let m = TopicMapping::Plugin;
        assert_eq!(encode_topic(m, "sensors/a/telemetry"), "sensors.a.telemetry");
        assert_eq!(encode_topic(m, "a.b/c"), "a.b.c");
        assert_eq!(decode_routing_key(m, "a.b.c").as_deref(), Ok("a/b/c"));
        assert_eq!(encode_filter(m, "sensors/+/#"), "sensors.*.#");
        assert_eq!(decode_binding_key(m, "sensors.*.#").as_deref(), Ok("sensors/+/#"));
    }

    #[test]
    fn lossless_mapping_keeps_dots_stars_and_escapes() {
        let m = TopicMapping::Lossless;
        assert_eq!(encode_topic(m, "v1.2/a*b/100%"), "v1%2E2.a%2Ab.100%25");
        assert_eq!(decode_routing_key(m, "v1%2E2.a%2Ab.100%25").as_deref(), Ok("v1.2/a*b/100%"));
        assert_eq!(encode_filter(m, "v1.2/+/#"), "v1%2E2.*.#");
        assert_eq!(decode_binding_key(m, "v1%2E2.*.#").as_deref(), Ok("v1.2/+/#"));
        assert_eq!(decode_routing_key(m, "a%2"), Err(DecodeError::BadEscape(1)));
        assert_eq!(decode_routing_key(m, "ok.b%41"), Err(DecodeError::BadEscape(4)));
    }

    /// A topic level: printable text with the characters that matter over-represented.
    fn level() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just('.'),
                Just('*'),
                Just('%'),
                Just('#'),
                Just('2'),
                Just('E'),
                Just('é'),
                proptest::char::range('a', 'z')
            ],
            0..6,
        )
        .prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #[test]
        fn lossless_topics_round_trip(levels in proptest::collection::vec(level(), 1..5)) {
            let t = levels.join("/").replace('#', "x");
            let rk = encode_topic(TopicMapping::Lossless, &t);
            prop_assert_eq!(decode_routing_key(TopicMapping::Lossless, &rk), Ok(t.clone()));
            // No AMQP-special character is left unescaped inside a level.
            prop_assert!(!rk.contains('*') && !rk.contains('#'));
            prop_assert_eq!(rk.split('.').count(), t.split('/').count());
        }

        #[test]
        fn lossless_filters_round_trip(levels in proptest::collection::vec(
            prop_oneof![level().prop_map(|l| l.replace(['#', '+'], "x")),
                        Just("+".to_owned())], 1..5),
            hash in any::<bool>()) {
            let mut f = levels.join("/");
            if hash { f.push_str("/#"); }
            let bk = encode_filter(TopicMapping::Lossless, &f);
            prop_assert_eq!(decode_binding_key(TopicMapping::Lossless, &bk), Ok(f));
        }

        #[test]
        fn plugin_topics_without_dots_round_trip(levels in proptest::collection::vec("[a-z0-9 _-]{0,6}", 1..5)) {
            let t = levels.join("/");
            let rk = encode_topic(TopicMapping::Plugin, &t);
            prop_assert_eq!(decode_routing_key(TopicMapping::Plugin, &rk), Ok(t));
        }

        #[test]
        fn decoding_garbage_never_panics(key in ".{0,40}") {
            let _ = decode_routing_key(TopicMapping::Lossless, &key);
            let _ = decode_binding_key(TopicMapping::Lossless, &key);
        }

        /// A binding key from a filter matches (with AMQP topic semantics) exactly the routing
        /// keys of the topics the filter matches.
        #[test]
        fn lossless_binding_matches_like_the_filter(filter in proptest::collection::vec(
            prop_oneof![Just("+".to_owned()), Just("a.b".to_owned()), Just("*".to_owned()), Just("c".to_owned())], 1..4),
            topic_levels in proptest::collection::vec(
            prop_oneof![Just("a.b".to_owned()), Just("*".to_owned()), Just("c".to_owned()), Just("a".to_owned())], 1..4)) {
            let f = filter.join("/");
            let t = topic_levels.join("/");
            let bk = encode_filter(TopicMapping::Lossless, &f);
            let rk = encode_topic(TopicMapping::Lossless, &t);
            prop_assert_eq!(amqp_topic_match(&bk, &rk), topic::matches(&f, &t));
        }
    }

    /// AMQP topic-exchange matching ('*' one word, '#' zero or more), for the property above.
    fn amqp_topic_match(binding: &str, key: &str) -> bool {
        fn go(b: &[&str], k: &[&str]) -> bool {
            match (b.first(), k.first()) {
                (None, None) => true,
                (Some(&"#"), _) => go(&b[1..], k) || (!k.is_empty() && go(b, &k[1..])),
                (Some(&"*"), Some(_)) => go(&b[1..], &k[1..]),
                (Some(w), Some(x)) if w == x => go(&b[1..], &k[1..]),
                _ => false,
            }
        }
        let b: Vec<&str> = binding.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        go(&b, &k)
    }
}
