//! MQTT topic names and filters: validation, matching, and a filter tree.
//!
//! Pure functions and data, no I/O. The tree is generic so the same structure serves local
//! subscriptions (in `broker`) and rule filters (in `rules`).

use std::collections::HashMap;

use thiserror::Error;

/// Why a topic name or filter is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// Zero-length names and filters are not allowed.
    #[error("empty topic")]
    Empty,
    /// More than 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
    /// `+` or `#` in a topic name.
    #[error("wildcards '+' and '#' are not allowed in a topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("'{0}' must stand alone in a level ('#' only as the last level)")]
    BadWildcard(char),
    /// U+0000 anywhere.
    #[error("the null character is not allowed in a topic")]
    NullChar,
    /// Longer than `mqtt.max_topic_length`.
    #[error("topic longer than mqtt.max_topic_length ({0} bytes)")]
    OverLengthLimit(usize),
    /// More levels than `mqtt.max_topic_levels`.
    #[error("topic with more than mqtt.max_topic_levels ({0}) levels")]
    OverLevelLimit(usize),
    /// `$share/...` where only a plain filter is allowed (rules, ACL patterns).
    #[error("a shared subscription ($share/...) is only valid in SUBSCRIBE")]
    SharedNotAllowed,
    /// `$share/...` without a group name, with '+' or '#' in it, or without a filter after it.
    #[error("a shared subscription is $share/{{group}}/{{filter}}; the group is non-empty without '+' or '#'")]
    BadShare,
}

/// The prefix of a shared subscription's filter (MQTT 5 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// A SUBSCRIBE filter: a plain one, or a shared one (`$share/{group}/{filter}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionFilter<'a> {
    /// The share group name, for `$share/...`.
    pub group: Option<&'a str>,
    /// The filter matched against topics (after the group for a shared subscription).
    pub filter: &'a str,
}

/// Checks a SUBSCRIBE/UNSUBSCRIBE filter, which may be a shared subscription, and splits it.
pub fn parse_subscription(filter: &str) -> Result<SubscriptionFilter<'_>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        validate_filter(filter)?;
        return Ok(SubscriptionFilter { group: None, filter });
    };
    let (group, inner) = rest.split_once('/').ok_or(TopicError::BadShare)?;
    if group.is_empty() || group.contains(['+', '#', '\0']) {
        return Err(TopicError::BadShare);
    }
    match validate_filter(inner) {
        Ok(()) => Ok(SubscriptionFilter { group: Some(group), filter: inner }),
        Err(TopicError::Empty) => Err(TopicError::BadShare),
        Err(e) => Err(e),
    }
}

/// The configured bounds on topic names and filters (`mqtt.max_topic_length`,
/// `mqtt.max_topic_levels`).
#[derive(Debug, Clone, Copy)]
pub struct TopicLimits {
    /// Most bytes.
    pub max_length: usize,
    /// Most levels ('/'-separated parts).
    pub max_levels: usize,
}

impl TopicLimits {
    /// Checks a topic name or filter against the bounds.
    pub fn check(&self, topic: &str) -> Result<(), TopicError> {
        if topic.len() > self.max_length {
            return Err(TopicError::OverLengthLimit(self.max_length));
        }
        // Counting separators stops early: a level count above the bound needs no full scan.
        if topic.bytes().filter(|b| *b == b'/').take(self.max_levels).count() >= self.max_levels {
            return Err(TopicError::OverLevelLimit(self.max_levels));
        }
        Ok(())
    }
}

/// Checks a topic name as used in PUBLISH.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    if topic.contains('\0') {
        return Err(TopicError::NullChar);
    }
    Ok(())
}

/// Checks a plain topic filter as used in rules and ACLs (no `$share/`; see
/// [`parse_subscription`] for SUBSCRIBE).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if filter.contains('\0') {
        return Err(TopicError::NullChar);
    }
    if filter.starts_with(SHARE_PREFIX) {
        return Err(TopicError::SharedNotAllowed);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadWildcard('#'));
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadWildcard('+'));
        }
    }
    Ok(())
}

/// True when `filter` (valid) matches `topic` (valid), including the rule that wildcards in
/// the first level do not match topics starting with `$`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic `inner` matches is also matched by `outer` (both valid filters):
/// `a/b` and `a/+/#` are subsets of `a/#`; `#` is not a subset of `a/#`.
pub fn filter_is_subset(inner: &str, outer: &str) -> bool {
    // Wildcards in the first level do not match `$` topics (MQTT 4.7.2).
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut i = inner.split('/');
    let mut o = outer.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some topic matches both filters (both valid): `a/#` and `+/b` overlap; `a/+`
/// and `a/b/c` do not.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (a.starts_with('$') && wild(b)) || (b.starts_with('$') && wild(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Translates a topic to an AMQP routing key the way RabbitMQ's MQTT plugin does: '/' <-> '.'.
pub fn to_routing_key(topic: &str) -> String {
    topic.replace('/', ".")
}

/// A tree of topic filters, each holding values; matching walks one path per topic level.
#[derive(Debug)]
pub struct TopicTree<T> {
    root: Node<T>,
}

#[derive(Debug)]
struct Node<T> {
    /// Children by level text, but for the wildcards.
    children: HashMap<Box<str>, Node<T>, foldhash::fast::RandomState>,
    /// The "+" child: kept apart so that matching, which looks for it at every level, needs
    /// no hash lookup for it.
    plus: Option<Box<Node<T>>>,
    /// The "#" child, likewise.
    hash: Option<Box<Node<T>>>,
    /// Values of the filters that end at this node.
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: HashMap::default(), plus: None, hash: None, values: Vec::new() }
    }
}

impl<T> Node<T> {
    /// The child for filter level `level`.
    fn child(&self, level: &str) -> Option<&Node<T>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    /// The child for filter level `level`, to change it.
    fn child_mut(&mut self, level: &str) -> Option<&mut Node<T>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    /// The child for filter level `level`, made if missing.
    fn child_or_default(&mut self, level: &str) -> &mut Node<T> {
        match level {
            "+" => self.plus.get_or_insert_default(),
            "#" => self.hash.get_or_insert_default(),
            _ => self.children.entry(level.into()).or_default(),
        }
    }

    /// Drops the child for filter level `level`.
    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    /// True without values and children.
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }
}

impl<T> Default for TopicTree<T> {
    fn default() -> Self {
        TopicTree { root: Node::default() }
    }
}

impl<T> TopicTree<T> {
    /// Adds `value` under `filter` (assumed valid).
    pub fn insert(&mut self, filter: &str, value: T) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_default(level);
        }
        node.values.push(value);
    }

    /// Removes the values under exactly `filter` for which `remove` is true; prunes empty
    /// branches. Returns how many were removed.
    pub fn remove(&mut self, filter: &str, mut remove: impl FnMut(&T) -> bool) -> usize {
        let levels: Vec<&str> = filter.split('/').collect();
        Self::remove_at(&mut self.root, &levels, &mut remove)
    }

    fn remove_at(
        node: &mut Node<T>,
        levels: &[&str],
        remove: &mut impl FnMut(&T) -> bool,
    ) -> usize {
        match levels.split_first() {
            None => {
                let before = node.values.len();
                node.values.retain(|v| !remove(v));
                before - node.values.len()
            }
            Some((first, rest)) => {
                let Some(child) = node.child_mut(first) else { return 0 };
                let n = Self::remove_at(child, rest, remove);
                if child.is_empty() {
                    node.remove_child(first);
                }
                n
            }
        }
    }

    /// The first value under exactly `filter` for which `pick` is true.
    pub fn find(&self, filter: &str, pick: impl Fn(&T) -> bool) -> Option<&T> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.child(level)?;
        }
        node.values.iter().find(|v| pick(v))
    }

    /// The first value under exactly `filter` for which `pick` is true, to change it.
    pub fn find_mut(&mut self, filter: &str, pick: impl Fn(&T) -> bool) -> Option<&mut T> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_mut(level)?;
        }
        node.values.iter_mut().find(|v| pick(v))
    }

    /// Calls `found` for every value whose filter matches `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut found: impl FnMut(&'a T)) {
        if self.is_empty() {
            return;
        }
        let dollar = topic.starts_with('$');
        let mut levels = topic.split('/');
        Self::walk(&self.root, &mut levels, true, dollar, &mut found);
    }

    fn walk<'a, 'b>(
        node: &'a Node<T>,
        levels: &mut (impl Iterator<Item = &'b str> + Clone),
        first: bool,
        dollar: bool,
        found: &mut impl FnMut(&'a T),
    ) {
        let wild_ok = !(first && dollar);
        match levels.next() {
            None => {
                node.values.iter().for_each(&mut *found);
                // "a/#" also matches "a".
                if let Some(hash) = &node.hash {
                    hash.values.iter().for_each(&mut *found);
                }
            }
            Some(level) => {
                if let Some(child) = node.children.get(level) {
                    Self::walk(child, &mut levels.clone(), false, dollar, found);
                }
                if wild_ok {
                    if let Some(plus) = &node.plus {
                        Self::walk(plus, &mut levels.clone(), false, dollar, found);
                    }
                    if let Some(hash) = &node.hash {
                        hash.values.iter().for_each(&mut *found);
                    }
                }
            }
        }
    }

    /// True when the tree holds no value.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Calls `found` with every value and the filter it is under (the admin API's listing:
    /// one walk of the whole tree).
    pub fn for_each(&self, mut found: impl FnMut(&str, &T)) {
        let mut path = String::new();
        Self::walk_all(&self.root, &mut path, true, &mut found);
    }

    fn walk_all(node: &Node<T>, path: &mut String, root: bool, found: &mut impl FnMut(&str, &T)) {
        if !root {
            for v in &node.values {
                found(path, v);
            }
        }
        let named = node.children.iter().map(|(k, n)| (&**k, n));
        let wild = node.plus.as_deref().map(|n| ("+", n)).into_iter();
        let wild = wild.chain(node.hash.as_deref().map(|n| ("#", n)));
        for (level, child) in named.chain(wild) {
            let len = path.len();
            if !root {
                path.push('/');
            }
            path.push_str(level);
            Self::walk_all(child, path, false, found);
            path.truncate(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_names_every_filter() {
        let mut tree = TopicTree::default();
        for f in ["a/b", "a/+", "#", "/", "a//b", "a"] {
            tree.insert(f, f.to_owned());
        }
        let mut seen = Vec::new();
        tree.for_each(|filter, v: &String| {
            assert_eq!(filter, v);
            seen.push(filter.to_owned());
        });
        seen.sort();
        assert_eq!(seen, ["#", "/", "a", "a/+", "a//b", "a/b"]);
    }

    #[test]
    fn filters() {
        for ok in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+/#", "/", "a//b", "$SYS/#"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a/b+", "++", "#/", "a\0b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_filter("$share/g/a"), Err(TopicError::SharedNotAllowed));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_subscription_filters() {
        let shared = |group, filter| Ok(SubscriptionFilter { group: Some(group), filter });
        assert_eq!(parse_subscription("$share/g/a/#"), shared("g", "a/#"));
        assert_eq!(parse_subscription("$share/g/+"), shared("g", "+"));
        assert_eq!(parse_subscription("$share/g//"), shared("g", "/"));
        assert_eq!(parse_subscription("$share/g/$SYS/x"), shared("g", "$SYS/x"));
        assert_eq!(
            parse_subscription("a/b"),
            Ok(SubscriptionFilter { group: None, filter: "a/b" })
        );
        assert_eq!(
            parse_subscription("$sharex/a"),
            Ok(SubscriptionFilter { group: None, filter: "$sharex/a" })
        );
        for bad in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/+/a",
            "$share/g#/a",
            "$share/a+/b",
        ] {
            assert_eq!(parse_subscription(bad), Err(TopicError::BadShare), "{bad}");
        }
        assert_eq!(parse_subscription("$share/g/a#"), Err(TopicError::BadWildcard('#')));
    }

    #[test]
    fn matching_rules() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/c", false),
        ];
        for (f, t, want) in cases {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
            let mut tree = TopicTree::default();
            tree.insert(f, ());
            let mut n = 0;
            tree.for_each_match(t, |_| n += 1);
            assert_eq!(n > 0, want, "tree: {f} vs {t}");
        }
    }

    #[test]
    fn tree_collects_all_and_removes() {
        let mut tree = TopicTree::default();
        for (i, f) in ["a/b", "a/+", "#", "a/#", "b/#"].iter().enumerate() {
            tree.insert(f, i);
        }
        let mut got = Vec::new();
        tree.for_each_match("a/b", |v| got.push(*v));
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(tree.remove("a/#", |v| *v == 3), 1);
        assert_eq!(tree.remove("a/#", |_| true), 0);
        let mut got = Vec::new();
        tree.for_each_match("a/b", |v| got.push(*v));
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        for f in ["a/b", "a/+", "#", "b/#"] {
            tree.remove(f, |_| true);
        }
        assert!(tree.is_empty());
        tree.insert("x/+", 5);
        tree.insert("x/+", 6);
        assert_eq!(tree.find("x/+", |v| *v == 6), Some(&6));
        assert_eq!(tree.find("x/y", |_| true), None);
        if let Some(v) = tree.find_mut("x/+", |v| *v == 5) {
            *v = 7;
        }
        assert_eq!(tree.find("x/+", |v| *v == 7), Some(&7));
    }

    #[test]
    fn subsets() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/#", true),
            ("a", "a/#", true),
            ("a/+/#", "a/#", true),
            ("a/#", "a/#", true),
            ("#", "#", true),
            ("a/b", "a/+", true),
            ("a/+", "a/+", true),
            ("a/#", "a/+", false),
            ("a/+", "a/b", false),
            ("#", "a/#", false),
            ("a/#", "a/b/#", false),
            ("a/b/c", "a/+", false),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
        ];
        for (inner, outer, want) in cases {
            assert_eq!(filter_is_subset(inner, outer), want, "{inner} in {outer}");
        }
    }

    #[test]
    fn overlaps() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/#", "a/b", true),
            ("#", "a/b", true),
            ("+/b", "a/+", true),
            ("a", "a/#", true),
            ("a/+", "a/b/c", false),
            ("a/b", "a/c", false),
            ("a/+", "a", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("#", "+", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(filters_overlap(a, b), want, "{a} ~ {b}");
            assert_eq!(filters_overlap(b, a), want, "{b} ~ {a}");
        }
    }

    #[test]
    fn limits() {
        let l = TopicLimits { max_length: 10, max_levels: 3 };
        assert_eq!(l.check("a/b/c"), Ok(()));
        assert_eq!(l.check("a/b/c/d"), Err(TopicError::OverLevelLimit(3)));
        assert_eq!(l.check("abcdefghijk"), Err(TopicError::OverLengthLimit(10)));
        assert_eq!(l.check("a//"), Ok(()));
    }

    #[test]
    fn routing_key_default() {
        assert_eq!(to_routing_key("sensors/a/telemetry"), "sensors.a.telemetry");
    }
}
