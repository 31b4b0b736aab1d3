//! The access control list: compiled once from `acl:`, then specialised per connection.
//!
//! Pure data and functions, no I/O and no locks. [`Acl::for_client`] runs once at CONNECT and
//! substitutes `%u`/`%c` for that client, keeping only the entries that apply to it; the
//! per-message checks on the resulting [`ClientAcl`] then only compare strings (no allocation).
//!
//! Rules (first entry that applies decides; none applies: `acl_default`):
//! - PUBLISH: an entry applies when its filter matches the topic name.
//! - SUBSCRIBE to filter S: an `allow` entry with filter F applies when S is a subset of F
//!   (every topic S matches, F matches too); a `deny` entry whose F contains S refuses it. A
//!   `deny` entry that merely overlaps S (`deny: a/b` and S = `a/#` or `#`) does not refuse it:
//!   the subscription is granted *filtered* ([`Grant::Filtered`]), and each message delivered
//!   to the session is checked ([`ClientAcl::may_receive`]): `a/b`'s are withheld, retained
//!   ones too. Only sessions holding a filtered subscription pay that check.
//! - Entries whose topic starts with `$share/` apply to shared subscriptions only, against the
//!   whole `$share/GROUP/FILTER` (`+` as GROUP: any group): they restrict group names. Other
//!   entries see the filter a shared subscription matches topics with.
//! - `#` and `+` in the first level never match `$` topics (MQTT §4.7.2); entries naming
//!   `$…` topics explicitly do.
//! - A `%u`/`%c` value that could change the filter's shape (it contains `/`, `+` or `#`, or
//!   starts with `$`) is never substituted: an `allow` entry using it does not apply, a `deny`
//!   entry using it applies to every topic. An absent user name (anonymous client): entries
//!   using `%u` do not apply.

use std::sync::Arc;

use crate::config::{AclAction, AclEntryConfig, AclPolicy};
use crate::mqtt::topic::{self, TopicError};

/// One piece of a pattern from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text.
    Lit(Box<str>),
    /// `%u`: the user name.
    User,
    /// `%c`: the client id.
    Client,
    /// `*` (user and client patterns only): any run of characters.
    Star,
}

/// A `topic`, `user` or `client` value split into pieces.
#[derive(Debug, Clone)]
struct Pattern(Vec<Piece>);

impl Pattern {
    /// `star`: `*` is a wildcard (user and client patterns). `own`: the placeholder that names
    /// the identity being matched (`%u` in `user:`, `%c` in `client:`), which is a wildcard
    /// too: `user: sensor-%u` matches every user whose name starts with `sensor-`.
    fn parse(text: &str, star: bool, own: Option<Piece>) -> Pattern {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let piece = match (c, chars.peek()) {
                ('%', Some('u')) => Some(Piece::User),
                ('%', Some('c')) => Some(Piece::Client),
                ('*', _) if star => Some(Piece::Star),
                _ => None,
            };
            match piece {
                Some(p) => {
                    if p != Piece::Star {
                        chars.next();
                    }
                    let p = if own.as_ref() == Some(&p) { Piece::Star } else { p };
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
                    }
                    pieces.push(p);
                }
                None => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit.into()));
        }
        Pattern(pieces)
    }

    /// The text when the pattern has no placeholder.
    fn literal(&self) -> Option<String> {
        let mut s = String::new();
        for p in &self.0 {
            match p {
                Piece::Lit(l) => s.push_str(l),
                _ => return None,
            }
        }
        Some(s)
    }

    /// Replaces `%u`/`%c`; `*` stays a wildcard (the second list). `None` when a placeholder
    /// has no value.
    fn substitute(&self, who: &Who<'_>) -> Option<Vec<Seg>> {
        let mut segs = vec![Seg::Lit(String::new())];
        for p in &self.0 {
            let text = match p {
                Piece::Lit(l) => l,
                Piece::User => who.user?,
                Piece::Client => who.client,
                Piece::Star => {
                    segs.push(Seg::Star);
                    segs.push(Seg::Lit(String::new()));
                    continue;
                }
            };
            if let Some(Seg::Lit(last)) = segs.last_mut() {
                last.push_str(text);
            }
        }
        Some(segs)
    }

    fn uses(&self, piece: &Piece) -> bool {
        self.0.contains(piece)
    }
}

/// A substituted user/client pattern: literal runs separated by `*`.
#[derive(Debug)]
enum Seg {
    Lit(String),
    Star,
}

/// True when `name` matches the segments (`*` = any run). Linear in the name per segment: the
/// first literal is a prefix, the last a suffix, the middle ones found left to right.
fn glob(segs: &[Seg], name: &str) -> bool {
    let lits: Vec<&str> = segs
        .iter()
        .filter_map(|s| match s {
            Seg::Lit(l) => Some(l.as_str()),
            Seg::Star => None,
        })
        .collect();
    // `segs` alternates Lit, Star, Lit, ... and starts and ends with a (maybe empty) Lit.
    match lits.as_slice() {
        [] => name.is_empty(),
        [only] => name == *only,
        [first, middle @ .., last] => {
            let Some(rest) = name.strip_prefix(first) else { return false };
            let Some(mut rest) = rest.strip_suffix(last) else { return false };
            for m in middle {
                match rest.find(m) {
                    Some(i) => rest = &rest[i + m.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

/// Whether `client_id` matches one of `patterns` (`%u` the user name, `*` any run of
/// characters), for a `users:` entry's `client_ids`.
pub fn client_id_allowed(patterns: &[String], user: &str, client_id: &str) -> bool {
    let who = Who { user: Some(user), client: client_id };
    patterns.iter().any(|p| {
        Pattern::parse(p, true, None).substitute(&who).is_some_and(|segs| glob(&segs, client_id))
    })
}

/// Whom a connection is: the values `%u` and `%c` stand for.
struct Who<'a> {
    user: Option<&'a str>,
    client: &'a str,
}

/// A value that would change a topic filter's shape if substituted into it.
fn unsafe_in_topic(value: &str) -> bool {
    value.contains(['/', '+', '#']) || value.starts_with('$')
}

/// One compiled `acl:` entry.
#[derive(Debug)]
struct Entry {
    /// `allow:` (true) or `deny:`.
    allow: bool,
    /// Applies to PUBLISH.
    publish: bool,
    /// Applies to SUBSCRIBE.
    subscribe: bool,
    /// The topic filter pattern.
    topic: Pattern,
    /// The filter already, when `topic` has no placeholder (shared by every connection).
    fixed: Option<Arc<str>>,
    /// `user:` pattern.
    user: Option<Pattern>,
    /// `client:` pattern.
    client: Option<Pattern>,
}

/// The whole ACL, as configured.
#[derive(Debug)]
pub struct Acl {
    /// Entries in config order.
    entries: Vec<Entry>,
    /// Decision when no entry applies.
    default_allow: bool,
    /// The per-client list when no entry depends on the client: shared by every connection.
    shared: Option<Arc<ClientRules>>,
}

/// One entry as it applies to one connection.
#[derive(Debug, Clone)]
struct ClientRule {
    allow: bool,
    publish: bool,
    subscribe: bool,
    /// The substituted filter; `None` matches everything (a deny whose value was unsafe).
    filter: Option<Arc<str>>,
}

/// The ACL of one connection: only the entries that apply to it, placeholders substituted.
#[derive(Debug, Clone)]
pub struct ClientAcl {
    /// One pointer (with the decision when no entry applies): a session holds this inline,
    /// and every idle connection pays for its size.
    rules: Arc<ClientRules>,
    /// The session holds a subscription granted filtered: its deliveries are checked.
    filtering: bool,
}

/// The entries that apply to one connection and the default decision.
#[derive(Debug)]
struct ClientRules {
    rules: Box<[ClientRule]>,
    default_allow: bool,
}

impl std::ops::Deref for ClientRules {
    type Target = [ClientRule];
    fn deref(&self) -> &[ClientRule] {
        &self.rules
    }
}

/// The ACL's answer to one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Refused (MQTT 5 0x87).
    Refused,
    /// Granted; no topic it matches is denied.
    Granted,
    /// Granted, but it overlaps a `deny`: messages on denied topics are withheld at delivery.
    Filtered,
}

/// Checks an `acl:` topic: a valid filter once `%u`/`%c` are replaced.
pub fn validate_topic_pattern(pattern: &str) -> Result<(), TopicError> {
    let pattern = pattern.replace("%u", "u").replace("%c", "c");
    // `$share/GROUP/FILTER`: GROUP a name or `+` (any group), then a filter.
    if let Some(rest) = pattern.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').unwrap_or((rest, ""));
        if group.is_empty() || (group != "+" && group.contains(['+', '#'])) {
            return topic::validate_filter("$share/#/bad");
        }
        return topic::validate_filter(filter);
    }
    topic::validate_filter(&pattern)
}

impl Acl {
    /// Compiles the `acl:` entries (validated with the config).
    pub fn compile(entries: &[AclEntryConfig], default: AclPolicy) -> Acl {
        let entries: Vec<Entry> = entries
            .iter()
            .map(|e| {
                let (allow, action) = match (&e.allow, &e.deny) {
                    (Some(a), _) => (true, a.value),
                    (None, Some(d)) => (false, d.value),
                    // Refused by the config validation; an entry that does nothing.
                    (None, None) => (false, AclAction::All),
                };
                let topic = Pattern::parse(&e.topic.value, false, None);
                Entry {
                    allow,
                    publish: matches!(action, AclAction::Publish | AclAction::All),
                    subscribe: matches!(action, AclAction::Subscribe | AclAction::All),
                    fixed: topic.literal().map(Arc::from),
                    topic,
                    user: e
                        .user
                        .as_ref()
                        .map(|u| Pattern::parse(&u.value, true, Some(Piece::User))),
                    client: e
                        .client
                        .as_ref()
                        .map(|c| Pattern::parse(&c.value, true, Some(Piece::Client))),
                }
            })
            .collect();
        let default_allow = default == AclPolicy::Allow;
        let independent =
            entries.iter().all(|e| e.fixed.is_some() && e.user.is_none() && e.client.is_none());
        let mut acl = Acl { entries, default_allow, shared: None };
        if independent {
            acl.shared = Some(acl.build(&Who { user: None, client: "" }));
        }
        acl
    }

    /// The ACL for one connection.
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let rules = match &self.shared {
            Some(shared) => Arc::clone(shared),
            None => self.build(&Who { user, client: client_id }),
        };
        ClientAcl { rules, filtering: false }
    }

    fn build(&self, who: &Who<'_>) -> Arc<ClientRules> {
        let rules = self.entries.iter().filter_map(|e| e.for_client(who)).collect();
        Arc::new(ClientRules { rules, default_allow: self.default_allow })
    }
}

impl Entry {
    fn for_client(&self, who: &Who<'_>) -> Option<ClientRule> {
        let name_matches = |pattern: &Option<Pattern>, name: Option<&str>| match pattern {
            None => true,
            Some(p) => match (p.substitute(who), name) {
                (Some(segs), Some(name)) => glob(&segs, name),
                _ => false,
            },
        };
        if !name_matches(&self.user, who.user) || !name_matches(&self.client, Some(who.client)) {
            return None;
        }
        let rule = |filter| ClientRule {
            allow: self.allow,
            publish: self.publish,
            subscribe: self.subscribe,
            filter,
        };
        if let Some(fixed) = &self.fixed {
            return Some(rule(Some(Arc::clone(fixed))));
        }
        let user_unsafe = self.topic.uses(&Piece::User) && who.user.is_some_and(unsafe_in_topic);
        let client_unsafe = self.topic.uses(&Piece::Client) && unsafe_in_topic(who.client);
        if user_unsafe || client_unsafe {
            // Never widen an allow; never let a deny be dodged.
            return (!self.allow).then(|| rule(None));
        }
        let segs = self.topic.substitute(who)?;
        let filter: String = segs
            .into_iter()
            .map(|s| match s {
                Seg::Lit(l) => l,
                Seg::Star => String::new(),
            })
            .collect();
        Some(rule(Some(Arc::from(filter))))
    }
}

impl ClientAcl {
    /// An ACL that allows everything (no `acl:` configured).
    pub fn allow_all() -> ClientAcl {
        let rules = ClientRules { rules: Box::new([]), default_allow: true };
        ClientAcl { rules: Arc::new(rules), filtering: false }
    }

    /// May this client publish to `topic_name`? Never to `$SYS/…` (the gateway's own).
    pub fn may_publish(&self, topic_name: &str) -> bool {
        if topic_name == "$SYS" || topic_name.starts_with("$SYS/") {
            return false;
        }
        for r in self.rules.iter().filter(|r| r.publish) {
            if r.filter.as_deref().is_none_or(|f| topic::matches(f, topic_name)) {
                return r.allow;
            }
        }
        self.rules.default_allow
    }

    /// May this client subscribe to `filter` (valid, not shared)? True when granted, filtered
    /// or not (see [`grant`](Self::grant)).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.grant(filter) != Grant::Refused
    }

    /// The decision for SUBSCRIBE filter `subscription` (valid; `$share/GROUP/FILTER` or a
    /// plain filter). See the module docs for the rules.
    pub fn grant(&self, subscription: &str) -> Grant {
        let (filter, shared) = match topic::parse_subscription(subscription) {
            Ok(topic::SubscriptionFilter { group: Some(_), filter }) => (filter, true),
            _ => (subscription, false),
        };
        let mut overlapped = false;
        for r in self.rules.iter().filter(|r| r.subscribe) {
            let Some(f) = r.filter.as_deref() else {
                if r.allow {
                    continue;
                }
                return Grant::Refused;
            };
            let share_rule = f.starts_with("$share/");
            let (candidate, f) = match (share_rule, shared) {
                (true, true) => (subscription, f),
                (true, false) => continue,
                (false, _) => (filter, f),
            };
            if topic::filter_is_subset(candidate, f) {
                return match (r.allow, overlapped) {
                    (false, _) => Grant::Refused,
                    (true, false) => Grant::Granted,
                    (true, true) => Grant::Filtered,
                };
            }
            if !r.allow && topic::filters_overlap(candidate, f) {
                overlapped = true;
            }
        }
        match (self.rules.default_allow, overlapped) {
            (false, _) => Grant::Refused,
            (true, false) => Grant::Granted,
            (true, true) => Grant::Filtered,
        }
    }

    /// Notes that the session holds a filtered subscription: from now on its deliveries are
    /// checked with [`may_receive`](Self::may_receive).
    pub fn set_filtering(&mut self) {
        self.filtering = true;
    }

    /// Whether the session's deliveries must be checked.
    pub fn is_filtering(&self) -> bool {
        self.filtering
    }

    /// May this client receive a message on `topic_name`? The subscribe entries decide, as
    /// for a subscription to exactly that topic (`$share/` entries aside).
    pub fn may_receive(&self, topic_name: &str) -> bool {
        for r in self.rules.iter().filter(|r| r.subscribe) {
            match r.filter.as_deref() {
                None if !r.allow => return false,
                None => {}
                Some(f) if f.starts_with("$share/") => {}
                Some(f) if topic::matches(f, topic_name) => return r.allow,
                Some(_) => {}
            }
        }
        self.rules.default_allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn acl(yaml: &str) -> Acl {
        let text = format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{yaml}");
        let c = Config::parse(Path::new("t.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
        Acl::compile(&c.acl, c.acl_default)
    }

    #[test]
    fn a_deny_filters_overlapping_wildcards_instead_of_refusing_them() {
        let a = acl("acl:\n  - deny: subscribe\n    topic: \"test/nosubscribe\"\n");
        let c = a.for_client(None, "x");
        assert_eq!(c.grant("test/nosubscribe"), Grant::Refused, "wholly inside the deny");
        for filtered in ["test/#", "#", "+/nosubscribe", "test/+", "$share/g/test/#"] {
            assert_eq!(c.grant(filtered), Grant::Filtered, "{filtered}");
        }
        for granted in ["test/other", "test/nosubscribe/deeper", "other/#", "$SYS/#"] {
            assert_eq!(c.grant(granted), Grant::Granted, "{granted}");
        }
        assert!(!c.may_receive("test/nosubscribe") && c.may_receive("test/other"));
        // `#` never matches `$` topics; `$SYS/#` does.
        assert!(c.may_receive("$SYS/x"));
        assert!(c.may_publish("test/nosubscribe"), "subscribe-only entry");
        assert!(Arc::ptr_eq(&c.rules, &a.for_client(Some("u"), "y").rules), "shared list");
    }

    #[test]
    fn the_issue_example_as_written() {
        let a = acl(
            "acl:\n  - deny: subscribe\n    topic: \"test/nosubscribe\"\n  - allow: all\n    user: sensor-%u\n    topic: \"devices/%c/#\"\nacl_default: deny\n",
        );
        let sensor = a.for_client(Some("sensor-1"), "c1");
        assert!(sensor.may_publish("devices/c1/temp") && sensor.may_subscribe("devices/c1/#"));
        assert!(
            !sensor.may_publish("devices/c2/temp") && !sensor.may_subscribe("test/nosubscribe")
        );
        let pump = a.for_client(Some("pump-1"), "c1");
        assert!(
            !pump.may_publish("devices/c1/temp"),
            "user pattern sensor-%u does not match pump-1"
        );
    }

    #[test]
    fn own_subtree_by_client_and_user() {
        let a = acl(
            "acl:\n  - allow: all\n    user: sensor-*\n    topic: \"devices/%c/#\"\n  - allow: publish\n    topic: \"users/%u/out\"\nacl_default: deny\n",
        );
        let c = a.for_client(Some("sensor-1"), "c1");
        assert!(c.may_subscribe("devices/c1/temp"));
        assert!(c.may_subscribe("devices/c1/#"));
        assert!(c.may_subscribe("devices/c1/+/x"));
        assert!(!c.may_subscribe("devices/#"), "wider than the own subtree");
        assert!(!c.may_subscribe("devices/+/temp"));
        assert!(!c.may_subscribe("devices/c2/temp"));
        assert!(c.may_publish("devices/c1/a/b"));
        assert!(!c.may_publish("devices/c2/a"));
        assert!(c.may_publish("users/sensor-1/out"));
        assert!(!c.may_publish("users/other/out"));
        let other = a.for_client(Some("admin"), "c1");
        assert!(!other.may_publish("devices/c1/a"), "user pattern does not match");
        let anon = a.for_client(None, "c1");
        assert!(!anon.may_publish("devices/c1/a") && !anon.may_publish("users//out"));
    }

    #[test]
    fn unsafe_substitutions_never_widen_an_allow_or_dodge_a_deny() {
        let a = acl(
            "acl:\n  - deny: publish\n    topic: \"locked/%c\"\n  - allow: all\n    topic: \"devices/%c/#\"\nacl_default: deny\n",
        );
        let c = a.for_client(None, "#");
        assert!(!c.may_publish("devices/x/y"));
        assert!(!c.may_publish("anything"), "the deny applies to every topic");
        let c = a.for_client(None, "a/b");
        assert!(!c.may_subscribe("devices/a/b/#"));
        let c = a.for_client(None, "ok");
        assert!(!c.may_publish("locked/ok") && c.may_publish("devices/ok/1"));
    }

    #[test]
    fn share_groups_can_be_restricted_and_sys_is_never_published_to() {
        let a = acl(
            "acl:\n  - allow: subscribe\n    topic: \"$share/workers/jobs/#\"\n  - deny: subscribe\n    topic: \"$share/+/jobs/#\"\n  - allow: all\n    topic: \"#\"\n",
        );
        let c = a.for_client(None, "x");
        assert_eq!(c.grant("$share/workers/jobs/a"), Grant::Granted);
        assert_eq!(c.grant("$share/other/jobs/a"), Grant::Refused);
        assert_eq!(c.grant("$share/other/news/a"), Grant::Granted, "other groups elsewhere");
        assert_eq!(c.grant("jobs/#"), Grant::Granted, "$share entries: shared subscriptions only");
        assert!(!c.may_publish("$SYS/broker/uptime") && !c.may_publish("$SYS"));
        assert!(!ClientAcl::allow_all().may_publish("$SYS/x"));
        // Explicit `$` entries match `$` topics; `#` does not.
        let d = acl("acl:\n  - deny: subscribe\n    topic: \"#\"\n");
        let c = d.for_client(None, "x");
        assert_eq!(c.grant("$SYS/#"), Grant::Granted);
        assert_eq!(c.grant("a/b"), Grant::Refused);
    }

    #[test]
    fn first_match_wins_and_default_policy() {
        let a = acl(
            "acl:\n  - allow: subscribe\n    client: \"admin-*\"\n    topic: \"#\"\n  - deny: all\n    topic: \"secret/#\"\n",
        );
        let admin = a.for_client(None, "admin-7");
        assert!(admin.may_subscribe("secret/#") && admin.may_subscribe("#"));
        assert!(!admin.may_publish("secret/x"), "the allow is for subscribe only");
        let dev = a.for_client(None, "dev");
        assert_eq!(dev.grant("#"), Grant::Filtered, "granted, secret/# withheld");
        assert!(!dev.may_subscribe("secret/a") && !dev.may_receive("secret/a"));
        assert!(dev.may_subscribe("public/#") && dev.may_publish("public/x"));
        assert!(
            ClientAcl::allow_all().may_publish("a") && ClientAcl::allow_all().may_subscribe("#")
        );
    }

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| {
            let segs =
                Pattern::parse(p, true, None).substitute(&Who { user: Some("u1"), client: "c1" });
            segs.is_some_and(|s| glob(&s, n))
        };
        assert!(m("sensor-*", "sensor-1") && m("sensor-*", "sensor-") && !m("sensor-*", "sensor"));
        assert!(m("*", "") && m("*-*-x", "a-b-x") && !m("a*a", "a"));
        assert!(m("%c", "c1") && m("%u-*", "u1-x") && !m("%u", "u2"));
        assert!(m("a*b*c", "abc") && m("a*b*c", "aXbYbZc") && !m("a*b*c", "acb"));
        // The placeholder of the identity being matched is a wildcard in its own pattern.
        let own = |p: &str, n: &str| {
            let who = Who { user: Some(n), client: "c1" };
            let segs = Pattern::parse(p, true, Some(Piece::User)).substitute(&who);
            segs.is_some_and(|s| glob(&s, n))
        };
        assert!(own("sensor-%u", "sensor-1") && !own("sensor-%u", "pump-1"));
    }
}
