//! MQTT topics and filters as coarse AMQP routing and binding keys on the cluster's topic
//! exchange. Pure: no I/O.
//!
//! A key has a kind word (`m` a live message, `r` a retained one) and the topic's first
//! [`LEVELS`] levels, each as one word: `l` and the level itself when it is short and made of
//! `[A-Za-z0-9_-]` only, `e` for an empty level, otherwise `h` and 16 hex digits of a stable
//! hash (FNV-1a 64) of the level. So '.', '*' and '#' in topics, and topics longer than the
//! 255 bytes of a routing key, never reach AMQP; a key is at most 2 + 2 × 33 + 1 bytes.
//!
//! A filter's binding key is built from the same first levels (`+` → `*`, `#` → `#`); every
//! topic the filter matches has a key the binding matches (tested below), and the receiving
//! node matches the topic against its own subscriptions again: the coarse key only decides
//! which nodes see a message, never who gets it.

/// Topic levels that go into a key.
pub const LEVELS: usize = 2;
/// Longest level used as itself in a key; a longer one is hashed.
const MAX_LITERAL: usize = 32;

/// Bytes of a key built on the stack: the longest is `m.` and two words of `1 + MAX_LITERAL`.
const KEY_MAX: usize = 4 + 2 * (MAX_LITERAL + 1);

/// A key (or a word) built without allocating; ASCII only.
struct Key {
    bytes: [u8; KEY_MAX],
    len: usize,
}

impl Key {
    fn new() -> Key {
        Key { bytes: [0; KEY_MAX], len: 0 }
    }

    fn push(&mut self, part: &[u8]) {
        let end = self.len + part.len();
        if let Some(dst) = self.bytes.get_mut(self.len..end) {
            dst.copy_from_slice(part);
            self.len = end;
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// The word of one topic level, appended to `out`.
fn word_into(level: &str, out: &mut Key) {
    if level.is_empty() {
        out.push(b"e");
    } else if level.len() <= MAX_LITERAL
        && level.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        out.push(b"l");
        out.push(level.as_bytes());
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in level.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 17];
        hex[0] = b'h';
        for (i, d) in hex[1..].iter_mut().enumerate() {
            *d = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
        }
        out.push(&hex);
    }
}

/// The word of one topic level.
fn word(level: &str, out: &mut String) {
    let mut w = Key::new();
    word_into(level, &mut w);
    out.push_str(w.as_str());
}

/// The routing key of a message on `topic`: `m.` (or `r.` when `retained`) and the words of
/// its first levels.
pub fn routing_key(topic: &str, retained: bool) -> String {
    let mut key = String::with_capacity(4 + 2 * (MAX_LITERAL + 2));
    key.push_str(if retained { "r" } else { "m" });
    for level in topic.split('/').take(LEVELS) {
        key.push('.');
        word(level, &mut key);
    }
    key
}

/// The binding key that brings every live message a subscription to `filter` (valid, without
/// its `$share/{group}/` part) can match.
pub fn binding_key(filter: &str) -> String {
    let mut key = String::from("m");
    for level in filter.split('/').take(LEVELS) {
        key.push('.');
        match level {
            "#" => {
                key.push('#');
                return key;
            }
            "+" => key.push('*'),
            literal => word(literal, &mut key),
        }
    }
    key
}

/// Whether one of the binding keys `bound` says it holds (keys as [`binding_key`] makes them)
/// matches the routing key of a live message on `topic`, as RabbitMQ's topic exchange would:
/// asks for each of the at most seven binding keys that can match it.
pub fn any_binding_matches(topic: &str, bound: impl Fn(&str) -> bool) -> bool {
    let mut levels = topic.split('/');
    let mut first_word = Key::new();
    word_into(levels.next().unwrap_or(""), &mut first_word);
    let first = first_word.as_str();
    let has = |words: &[&str]| {
        let mut key = Key::new();
        key.push(b"m");
        for w in words {
            key.push(b".");
            key.push(w.as_bytes());
        }
        bound(key.as_str())
    };
    // `#` matches zero words too: `m.X.#` and `m.*.#` match a one-level key `m.X`.
    if has(&["#"]) || has(&[first, "#"]) || has(&["*", "#"]) {
        return true;
    }
    match levels.next() {
        None => has(&[first]) || has(&["*"]),
        Some(level) => {
            let mut second_word = Key::new();
            word_into(level, &mut second_word);
            let second = second_word.as_str();
            has(&[first, second]) || has(&[first, "*"]) || has(&["*", second]) || has(&["*", "*"])
        }
    }
}

/// The binding key that brings every retained message (each node keeps them all).
pub const RETAINED_BINDING: &str = "r.#";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mqtt::topic;

    /// RabbitMQ's topic exchange match: `*` one word, `#` zero or more words.
    fn amqp_match(binding: &[&str], key: &[&str]) -> bool {
        match binding.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|i| amqp_match(rest, &key[i..])),
            Some((&"*", rest)) => !key.is_empty() && amqp_match(rest, &key[1..]),
            Some((w, rest)) => key.first() == Some(w) && amqp_match(rest, &key[1..]),
        }
    }

    fn matches(binding: &str, key: &str) -> bool {
        let b: Vec<&str> = binding.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        amqp_match(&b, &k)
    }

    #[test]
    fn keys_are_coarse_and_safe() {
        assert_eq!(routing_key("a/b/c", false), "m.la.lb");
        assert_eq!(routing_key("a", true), "r.la");
        assert_eq!(routing_key("/x", false), "m.e.lx");
        let dotted = routing_key("a.b/*/c", false);
        assert!(dotted.starts_with("m.h") && !dotted.contains('*'), "{dotted}");
        let long = "x".repeat(70_000);
        assert!(routing_key(&long, false).len() < 80);
        assert_eq!(binding_key("a/+/c"), "m.la.*");
        assert_eq!(binding_key("a/#"), "m.la.#");
        assert_eq!(binding_key("#"), "m.#");
        assert_eq!(binding_key("+"), "m.*");
        // The same level always gives the same word (every node computes it alike).
        assert_eq!(routing_key("s p a c e", false), "m.h4b8aa9d8630f25db");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-c]{1,2}", "[a.*#-]{1,3}", Just("a".repeat(40)),]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![3 => level(), 1 => Just("+".to_owned()), 1 => Just("#".to_owned())]
    }

    proptest! {
        /// Whatever topic a filter matches, its binding matches the topic's key: no message a
        /// node's subscriber wants is left out by the coarse keys.
        #[test]
        fn a_matching_topic_always_reaches_the_binding(
            topic_levels in prop::collection::vec(level(), 1..5),
            filter_levels in prop::collection::vec(filter_level(), 1..4),
            hash in any::<bool>(),
        ) {
            let topic = topic_levels.join("/");
            let mut filter = filter_levels.join("/");
            if hash {
                filter.push_str("/#");
            }
            prop_assume!(!topic.contains(['+', '#']));
            if topic::matches(&filter, &topic) {
                prop_assert!(
                    matches(&binding_key(&filter), &routing_key(&topic, false)),
                    "{filter} / {topic}: {} / {}", binding_key(&filter), routing_key(&topic, false)
                );
            }
            prop_assert!(matches(RETAINED_BINDING, &routing_key(&topic, true)));
        }

        /// The forwarding filter says what RabbitMQ would: a binding among the set matches
        /// the topic's routing key exactly when `any_binding_matches` says so.
        #[test]
        fn the_forwarding_filter_agrees_with_the_topic_exchange(
            topic_levels in prop::collection::vec(level(), 1..5),
            filters in prop::collection::vec(
                (prop::collection::vec(filter_level(), 1..4), any::<bool>()), 0..4),
        ) {
            let topic = topic_levels.join("/");
            prop_assume!(!topic.contains(['+', '#']));
            let bound: std::collections::HashSet<String> = filters
                .iter()
                .map(|(levels, hash)| {
                    let mut f = levels.join("/");
                    if *hash {
                        f.push_str("/#");
                    }
                    binding_key(&f)
                })
                .collect();
            let key = routing_key(&topic, false);
            let amqp = bound.iter().any(|b| matches(b, &key));
            prop_assert_eq!(any_binding_matches(&topic, |k| bound.contains(k)), amqp, "{} {:?}", key, bound);
        }
    }
}
