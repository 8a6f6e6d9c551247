//! The subscription tree of one tenant: one node per filter level, `+` as a child named `+`,
//! filters ending in `#` kept on the node of the level before it. A PUBLISH walks at most two
//! children per level (the literal and `+`), so matching costs the topic's depth, not the
//! number of subscriptions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Session, SubOpts};

/// One subscription of one session.
#[derive(Clone)]
pub struct Entry {
    pub session: Arc<Session>,
    pub opts: SubOpts,
}

/// The members of one shared subscription group on one filter.
#[derive(Default)]
pub struct Group {
    pub name: Arc<str>,
    pub members: Vec<Entry>,
    next: AtomicUsize,
}

impl Group {
    /// The member to deliver the next message to: round robin, skipping members that are
    /// offline or whose queue is full while another one can take it.
    pub fn pick(&self) -> Option<&Entry> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.members[(start + i) % n])
            .find(|e| e.session.can_take())
            .or_else(|| self.members.get(start % n))
    }
}

/// Subscriptions ending at one point of the tree.
#[derive(Default)]
pub struct Subs {
    pub plain: Vec<Entry>,
    pub groups: Vec<Group>,
}

impl Subs {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    /// Adds or replaces the session's subscription; returns whether it existed.
    fn put(&mut self, group: Option<&str>, entry: Entry) -> bool {
        let id = entry.session.id;
        let list = match group {
            None => &mut self.plain,
            Some(g) => {
                let pos = match self.groups.iter().position(|x| &*x.name == g) {
                    Some(p) => p,
                    None => {
                        self.groups.push(Group { name: Arc::from(g), ..Group::default() });
                        self.groups.len() - 1
                    }
                };
                &mut self.groups[pos].members
            }
        };
        match list.iter_mut().find(|e| e.session.id == id) {
            Some(e) => {
                *e = entry;
                true
            }
            None => {
                list.push(entry);
                false
            }
        }
    }

    fn remove(&mut self, group: Option<&str>, session: u64) -> bool {
        match group {
            None => {
                let before = self.plain.len();
                self.plain.retain(|e| e.session.id != session);
                before != self.plain.len()
            }
            Some(g) => {
                let Some(pos) = self.groups.iter().position(|x| &*x.name == g) else { return false };
                let members = &mut self.groups[pos].members;
                let before = members.len();
                members.retain(|e| e.session.id != session);
                let removed = before != members.len();
                if members.is_empty() {
                    self.groups.swap_remove(pos);
                }
                removed
            }
        }
    }
}

/// A node of the tree.
#[derive(Default)]
pub struct Node {
    children: HashMap<Box<str>, Node>,
    /// Filters that end at this level.
    here: Subs,
    /// Filters that end with `#` after this level.
    hash: Subs,
}

impl Node {
    pub fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }

    /// Adds a subscription on a valid filter; returns whether the session had it already.
    pub fn insert(&mut self, filter: &str, group: Option<&str>, entry: Entry) -> bool {
        let mut node = self;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                return node.hash.put(group, entry);
            }
            node = node.children.entry(Box::from(level)).or_default();
            if levels.peek().is_none() {
                return node.here.put(group, entry);
            }
        }
        unreachable!("split yields at least one level")
    }

    /// Removes a session's subscription; returns whether it existed. Empty nodes are pruned.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, session: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        self.remove_at(&levels, group, session)
    }

    fn remove_at(&mut self, levels: &[&str], group: Option<&str>, session: u64) -> bool {
        match levels {
            ["#"] => self.hash.remove(group, session),
            [] => false,
            [level, rest @ ..] => {
                let Some(child) = self.children.get_mut(*level) else { return false };
                let removed = if rest.is_empty() {
                    child.here.remove(group, session)
                } else {
                    child.remove_at(rest, group, session)
                };
                if child.is_empty() {
                    self.children.remove(*level);
                }
                removed
            }
        }
    }

    /// Calls `f` with every set of subscriptions whose filter matches topic `name` (valid).
    pub fn for_matches<'a>(&'a self, name: &str, f: &mut impl FnMut(&'a Subs)) {
        let levels: Vec<&str> = name.split('/').collect();
        self.walk(&levels, true, name.starts_with('$'), f);
    }

    fn walk<'a>(&'a self, levels: &[&str], first: bool, dollar: bool, f: &mut impl FnMut(&'a Subs)) {
        // A wildcard at the first level never matches a `$` topic [MQTT-4.7.2-1].
        let wild = !(first && dollar);
        if wild && !self.hash.is_empty() {
            f(&self.hash);
        }
        match levels.split_first() {
            None => {
                if !self.here.is_empty() {
                    f(&self.here);
                }
            }
            Some((level, rest)) => {
                if let Some(child) = self.children.get(*level) {
                    child.walk_child(rest, dollar, f);
                }
                if wild && let Some(child) = self.children.get("+") {
                    child.walk_child(rest, dollar, f);
                }
            }
        }
    }

    fn walk_child<'a>(&'a self, rest: &[&str], dollar: bool, f: &mut impl FnMut(&'a Subs)) {
        if rest.is_empty() {
            // The topic ends here: filters ending here, and `x/#` (which matches `x`).
            for subs in [&self.here, &self.hash] {
                if !subs.is_empty() {
                    f(subs);
                }
            }
        } else {
            self.walk(rest, false, dollar, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::model::topics;

    fn session(id: u64) -> Arc<Session> {
        Arc::new(Session::new(id, &crate::model::TenantId::dev(), &format!("c{id}"), None, Default::default()))
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("$s".to_string()), Just(String::new())]
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("valid names", |n| topics::check_name(n).is_ok())
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4), any::<bool>())
            .prop_map(|(mut l, hash)| {
                if hash || l.is_empty() {
                    l.push("#".into());
                }
                l.join("/")
            })
            .prop_filter("valid filters", |f| topics::check_filter(f).is_ok())
    }

    fn matched(node: &Node, name: &str) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        node.for_matches(name, &mut |subs| out.extend(subs.plain.iter().map(|e| e.session.id)));
        out
    }

    proptest! {
        /// The tree finds exactly the subscriptions whose filter matches, before and after
        /// removals, and empties itself when everything is removed.
        #[test]
        fn the_tree_agrees_with_the_reference_matcher(
            filters in proptest::collection::vec(filter(), 1..12),
            names in proptest::collection::vec(name(), 1..12),
            remove_every in 1usize..4,
        ) {
            let mut node = Node::default();
            for (i, f) in filters.iter().enumerate() {
                prop_assert!(topics::check_filter(f).is_ok(), "{}", f);
                node.insert(f, None, Entry { session: session(i as u64), opts: SubOpts::default() });
            }
            let expect = |alive: &dyn Fn(usize) -> bool, n: &str| -> BTreeSet<u64> {
                filters.iter().enumerate().filter(|(i, f)| alive(*i) && topics::matches(f, n)).map(|(i, _)| i as u64).collect()
            };
            for n in &names {
                prop_assert_eq!(matched(&node, n), expect(&|_| true, n), "name {}", n);
            }
            for (i, f) in filters.iter().enumerate().filter(|(i, _)| i % remove_every == 0) {
                prop_assert!(node.remove(f, None, i as u64));
            }
            for n in &names {
                prop_assert_eq!(matched(&node, n), expect(&|i| i % remove_every != 0, n), "name {} after removals", n);
            }
            for (i, f) in filters.iter().enumerate().filter(|(i, _)| i % remove_every != 0) {
                node.remove(f, None, i as u64);
            }
            prop_assert!(node.is_empty());
        }

        /// A filter covered by an allowed one never matches a topic the allowed one does not.
        #[test]
        fn coverage_is_sound(allowed in filter(), requested in filter(), names in proptest::collection::vec(name(), 1..16)) {
            if topics::covers(&allowed, &requested) {
                for n in &names {
                    prop_assert!(!topics::matches(&requested, n) || topics::matches(&allowed, n), "{} covers {} but not {}", allowed, requested, n);
                }
            }
        }
    }

    #[test]
    fn shared_groups_pick_one_member_in_turn() {
        let mut node = Node::default();
        for id in 0..3 {
            node.insert("jobs/+", Some("g"), Entry { session: session(id), opts: SubOpts::default() });
        }
        let mut picks = Vec::new();
        for _ in 0..6 {
            node.for_matches("jobs/1", &mut |subs| {
                assert!(subs.plain.is_empty());
                picks.push(subs.groups[0].pick().unwrap().session.id);
            });
        }
        // All offline: plain rotation.
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(node.remove("jobs/+", Some("g"), 1));
        assert!(!node.remove("jobs/+", Some("g"), 1));
        assert!(!node.remove("jobs/+", Some("other"), 0));
    }
}
