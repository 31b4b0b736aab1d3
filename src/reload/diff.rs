//! What changed between two config files, read as plain YAML trees (`serde_json::Value`):
//! positions do not count, values do. Pure.
//!
//! A system (`amqp.NAME`, `http.NAME`, `bridges.NAME`), a target (its rule's name and its
//! `to:` entry) or a source (`sources:` entry by name) whose tree is equal in both files is
//! the same: its running object is kept.

use serde_json::Value;

/// The file's YAML as a tree; `None` when it does not parse (then `Config::parse` has said
/// why, with a position).
pub fn tree(text: &str) -> Option<Value> {
    serde_saphyr::from_str(text).ok()
}

/// Sections whose keys only a restart applies (listeners, the store, sizes of structures,
/// the admin server), with the keys inside them that a reload does apply.
const RESTART_SECTIONS: &[(&str, &[&str])] = &[
    ("mqtt", &["allow_anonymous"]),
    ("admin", &[]),
    ("store", &[]),
    ("cluster", &[]),
    ("mqttsn", &[]),
];

/// Top-level keys that only a restart applies.
const RESTART_KEYS: &[&str] = &["shutdown_timeout"];

/// The keys that differ between `old` and `new` and need a restart (`mqtt.listen`,
/// `store.path`, `shutdown_timeout`, ...), in a stable order.
pub fn restart_keys(old: &Value, new: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    for (section, reloadable) in RESTART_SECTIONS {
        let (a, b) = (old.get(section), new.get(section));
        match (a.and_then(Value::as_object), b.and_then(Value::as_object)) {
            (Some(a), Some(b)) => {
                let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
                names.sort();
                names.dedup();
                for name in names {
                    if !reloadable.contains(&name.as_str()) && a.get(name) != b.get(name) {
                        keys.push(format!("{section}.{name}"));
                    }
                }
            }
            _ if a != b => keys.push((*section).to_owned()),
            _ => {}
        }
    }
    for key in RESTART_KEYS {
        if old.get(key) != new.get(key) {
            keys.push((*key).to_owned());
        }
    }
    keys
}

/// `section.name` (`amqp.main`), if present.
pub fn entry<'a>(t: &'a Value, section: &str, name: &str) -> Option<&'a Value> {
    t.get(section)?.get(name)
}

/// Whether `section.name` is the same in both trees (and present).
pub fn same_entry(old: &Value, new: &Value, section: &str, name: &str) -> bool {
    entry(old, section, name).is_some_and(|a| Some(a) == entry(new, section, name))
}

/// The `sources:` entry named `name`.
pub fn source<'a>(t: &'a Value, name: &str) -> Option<&'a Value> {
    named(t, "sources", name)
}

/// The `rules:` entry named `name`.
pub fn rule<'a>(t: &'a Value, name: &str) -> Option<&'a Value> {
    named(t, "rules", name)
}

fn named<'a>(t: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    t.get(list)?.as_array()?.iter().find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}

/// Target `index` of rule `rule` (its `to:` entry).
pub fn target<'a>(t: &'a Value, rule_name: &str, index: usize) -> Option<&'a Value> {
    rule(t, rule_name)?.get("to")?.get(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Value {
        tree(text).expect("yaml")
    }

    #[test]
    fn restart_keys_name_what_changed_and_ignore_what_reloads() {
        let a = t("mqtt:\n  listen: \"127.0.0.1:1883\"\n  allow_anonymous: true\nrules: []\n");
        let b = t("mqtt:\n  listen: \"127.0.0.1:1884\"\n  allow_anonymous: false\n  max_connections: 5\nrules:\n  - name: x\n");
        assert_eq!(restart_keys(&a, &b), vec!["mqtt.listen", "mqtt.max_connections"]);
        let c = t(
            "mqtt:\n  listen: \"127.0.0.1:1883\"\nstore:\n  path: /tmp/x\nshutdown_timeout: 3s\n",
        );
        assert_eq!(
            restart_keys(&a, &c),
            vec!["mqtt.allow_anonymous", "store", "shutdown_timeout"]
                .into_iter()
                .filter(|k| *k != "mqtt.allow_anonymous")
                .collect::<Vec<_>>()
        );
        assert!(restart_keys(&a, &a).is_empty());
    }

    #[test]
    fn entries_compare_by_value_not_position() {
        let a = t("amqp:\n  main: {url: \"amqp://h\", queue: 5}\nrules:\n  - name: r\n    from: a\n    to:\n      - amqp: {broker: main, exchange: x}\n");
        let b = t("# moved\n\namqp:\n  main:\n    queue: 5\n    url: \"amqp://h\"\nrules:\n  - name: r\n    from: b\n    to:\n      - amqp: {broker: main, exchange: x}\n");
        assert!(same_entry(&a, &b, "amqp", "main"));
        assert!(!same_entry(&a, &b, "amqp", "other"));
        assert_eq!(target(&a, "r", 0), target(&b, "r", 0));
        assert_ne!(rule(&a, "r"), rule(&b, "r"));
    }
}
