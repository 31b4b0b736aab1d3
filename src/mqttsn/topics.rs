//! Topic ids: the ones registered on one connection (REGISTER from the client, or from the
//! gateway before it delivers on a topic), bounded by `mqttsn.max_topics`, and the predefined
//! ones every client shares (`mqttsn.predefined_topics`). Pure.

use std::collections::HashMap;
use std::sync::Arc;

/// The predefined topics, both ways.
#[derive(Debug, Default)]
pub struct Predefined {
    by_id: HashMap<u16, Arc<str>>,
    by_name: HashMap<Arc<str>, u16>,
}

impl Predefined {
    /// From the config's map.
    pub fn new<'a>(topics: impl Iterator<Item = (u16, &'a str)>) -> Predefined {
        let mut p = Predefined::default();
        for (id, name) in topics {
            let name: Arc<str> = Arc::from(name);
            p.by_name.insert(Arc::clone(&name), id);
            p.by_id.insert(id, name);
        }
        p
    }

    pub fn name(&self, id: u16) -> Option<&Arc<str>> {
        self.by_id.get(&id)
    }

    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }
}

/// One connection's registered topic ids.
#[derive(Debug)]
pub struct Topics {
    by_id: HashMap<u16, Arc<str>>,
    by_name: HashMap<Arc<str>, u16>,
    /// The last id given.
    last: u16,
    /// `mqttsn.max_topics`.
    max: usize,
}

impl Topics {
    pub fn new(max: usize) -> Topics {
        Topics { by_id: HashMap::new(), by_name: HashMap::new(), last: 0, max }
    }

    /// The topic of `id`.
    pub fn name(&self, id: u16) -> Option<&Arc<str>> {
        self.by_id.get(&id)
    }

    /// The id of `name`, if registered.
    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// The id of `name`, registering it when new; `None` when `max` ids are taken.
    pub fn register(&mut self, name: &str) -> Option<u16> {
        if let Some(id) = self.id(name) {
            return Some(id);
        }
        if self.by_id.len() >= self.max.min(0xFFFD) {
            return None;
        }
        // 0x0000 and 0xFFFF are reserved; a free id exists (fewer than 0xFFFE are taken).
        loop {
            self.last = if self.last >= 0xFFFE { 1 } else { self.last + 1 };
            if !self.by_id.contains_key(&self.last) {
                break;
            }
        }
        let name: Arc<str> = Arc::from(name);
        self.by_name.insert(Arc::clone(&name), self.last);
        self.by_id.insert(self.last, name);
        Some(self.last)
    }

    /// Forgets `id` (the client refused or does not know it).
    pub fn forget(&mut self, id: u16) {
        if let Some(name) = self.by_id.remove(&id) {
            self.by_name.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_given_once_per_name_and_bounded() {
        let mut t = Topics::new(2);
        let a = t.register("a/b").expect("room");
        assert_eq!(t.register("a/b"), Some(a), "the same name keeps its id");
        let c = t.register("c").expect("room");
        assert_ne!(a, c);
        assert_eq!(t.register("d"), None, "max_topics reached");
        t.forget(a);
        assert_eq!(t.name(a), None);
        assert!(t.register("d").is_some(), "room again");
        assert_eq!(t.name(c).map(|s| &**s), Some("c"));
    }
}
