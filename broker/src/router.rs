//! The subscription index: a token trie with NATS matching rules, plus a
//! per-producer match cache so the hot path (publish) takes no lock.
//!
//! Every change to the index bumps a generation counter. Each producer (the
//! delivery engine's `Batch` of a connection, route or HTTP connection) keeps
//! its own `subject -> matches` cache tagged with the generation it was
//! computed at; a hit at the current generation costs one atomic load and
//! one hash lookup. A miss takes the read lock, looks the whole subject up
//! among the literal patterns and walks only the trie branches the
//! subject's tokens lead to, never every subscription.
//!
//! Memory: most subscriptions name one subject, with no wildcard. Those are
//! not in the trie but in one hash table whose entries are the
//! subscriptions themselves (one inline, more in a box) and whose key is the
//! first one's own pattern, so a subscription costs its `Subscription`, one
//! string and a 16-byte table slot (docs/benchmarks.md, "Memory per
//! subscription"). Tables and lists shrink as they empty, so what a mass
//! unsubscribe frees can go back to the operating system.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use hashbrown::HashTable;
use sockbus_protocol::subject::{validate_subject, SubjectError, INBOX_PREFIX};

use crate::outlet::Outlet;

/// One subscription of one connection.
pub(crate) struct Subscription {
    /// Where its messages go.
    pub outlet: Arc<Outlet>,
    /// The pattern, then the queue group's name if any: one allocation.
    text: Box<str>,
    /// Messages after which the subscription ends (u64::MAX: never).
    max: AtomicU64,
    delivered: AtomicU64,
    pub sid: u32,
    /// Where the pattern ends in `text`.
    split: u32,
    /// Interest of a peer broker, held by a cluster route: gets forwarded
    /// RMSG frames, is never itself announced to other peers.
    pub peer: bool,
    removed: AtomicBool,
}

impl Subscription {
    pub fn new(sid: u32, pattern: &str, queue: Option<&str>, outlet: Arc<Outlet>) -> Self {
        // An empty group name is no group, as on the wire.
        let text: Box<str> = match queue.filter(|q| !q.is_empty()) {
            None => pattern.into(),
            Some(q) => [pattern, q].concat().into(),
        };
        Subscription {
            outlet,
            text,
            max: AtomicU64::new(u64::MAX),
            delivered: AtomicU64::new(0),
            sid,
            split: pattern.len() as u32,
            peer: false,
            removed: AtomicBool::new(false),
        }
    }

    /// A peer broker's interest, arriving on a cluster route.
    pub fn new_peer(sid: u32, pattern: &str, queue: Option<&str>, outlet: Arc<Outlet>) -> Self {
        Subscription {
            peer: true,
            ..Subscription::new(sid, pattern, queue, outlet)
        }
    }

    pub fn pattern(&self) -> &str {
        &self.text[..self.split as usize]
    }

    pub fn queue(&self) -> Option<&str> {
        Some(&self.text[self.split as usize..]).filter(|q| !q.is_empty())
    }

    /// Ends the subscription once it has delivered `max` messages over its
    /// life (NATS semantics). Returns true when it is already over.
    pub fn set_max(&self, max: u64) -> bool {
        self.max.store(max, Ordering::Release);
        self.delivered.load(Ordering::Acquire) >= max
    }

    /// Claims one delivery. `Some(last)` when the message may be delivered;
    /// `last` is true when it is the final one allowed.
    #[inline]
    pub fn claim(&self) -> Option<bool> {
        // Counted always: a later UNSUB with a limit counts what came before it.
        let n = self.delivered.fetch_add(1, Ordering::AcqRel) + 1;
        let max = self.max.load(Ordering::Acquire);
        if n > max {
            None
        } else {
            Some(n == max)
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// True when it ends after a number of messages (UNSUB with a count):
    /// only the broker counts them, so it never gets a kernel route.
    pub fn is_limited(&self) -> bool {
        self.max.load(Ordering::Acquire) != u64::MAX
    }
}

/// A queue group's members for one subject.
pub(crate) struct QueueGroup {
    pub name: Box<str>,
    pub members: Vec<Arc<Subscription>>,
    next: AtomicUsize,
}

impl QueueGroup {
    /// Round-robin pick; the caller retries with the next one if the pick
    /// cannot take the message.
    pub fn start(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Everything a subject matches.
#[derive(Default)]
pub(crate) struct Matches {
    pub plain: Vec<Arc<Subscription>>,
    pub groups: Vec<QueueGroup>,
}

impl Matches {
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

/// The subscriptions to one literal subject, never empty: 16 bytes, the
/// usual single subscriber inline.
enum Subs {
    One(Arc<Subscription>),
    // Boxed: a bare Vec would make every slot 24 bytes for the rare subject
    // with several subscribers.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<Subscription>>>),
}

impl Subs {
    fn as_slice(&self) -> &[Arc<Subscription>] {
        match self {
            Subs::One(s) => std::slice::from_ref(s),
            Subs::Many(v) => v,
        }
    }

    /// The subject they share.
    fn pattern(&self) -> &str {
        self.as_slice()[0].pattern()
    }

    fn push(&mut self, sub: Arc<Subscription>) {
        match self {
            Subs::Many(v) => v.push(sub),
            Subs::One(first) => *self = Subs::Many(Box::new(vec![first.clone(), sub])),
        }
    }

    /// Removes `sub`: None when it is not here, else whether none are left.
    fn remove(&mut self, sub: &Arc<Subscription>) -> Option<bool> {
        match self {
            Subs::One(s) => Arc::ptr_eq(s, sub).then_some(true),
            Subs::Many(v) => {
                take(v, sub).then_some(())?;
                if v.len() == 1 {
                    *self = Subs::One(v.pop().expect("one left"));
                }
                Some(false)
            }
        }
    }
}

/// Removes `sub` from a list; true when found. A list that shrank to a
/// quarter of its capacity gives the rest back.
fn take(v: &mut Vec<Arc<Subscription>>, sub: &Arc<Subscription>) -> bool {
    let Some(i) = v.iter().position(|s| Arc::ptr_eq(s, sub)) else {
        return false;
    };
    v.swap_remove(i);
    if v.capacity() > 8 && v.len() < v.capacity() / 4 {
        v.shrink_to(v.len() * 2);
    }
    true
}

/// True when a table of `capacity` holding `len` should give memory back.
fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 64 && len < capacity / 4
}

/// The trie of patterns with a wildcard token.
#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Vec<Arc<Subscription>>,
    /// Patterns that end with `>` right after this node.
    rest: Vec<Arc<Subscription>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }

    fn insert(&mut self, toks: &[&str], sub: Arc<Subscription>) {
        match toks.split_first() {
            None => self.here.push(sub),
            Some((&">", _)) => self.rest.push(sub),
            Some((&"*", tail)) => self
                .star
                .get_or_insert_with(Default::default)
                .insert(tail, sub),
            Some((t, tail)) => self
                .literal
                .entry((*t).into())
                .or_default()
                .insert(tail, sub),
        }
    }

    /// Removes `sub`; returns true when found. Prunes emptied branches.
    fn remove(&mut self, toks: &[&str], sub: &Arc<Subscription>) -> bool {
        match toks.split_first() {
            None => take(&mut self.here, sub),
            Some((&">", _)) => take(&mut self.rest, sub),
            Some((&"*", tail)) => {
                let Some(n) = self.star.as_mut() else {
                    return false;
                };
                let found = n.remove(tail, sub);
                if n.is_empty() {
                    self.star = None;
                }
                found
            }
            Some((t, tail)) => {
                let Some(n) = self.literal.get_mut(*t) else {
                    return false;
                };
                let found = n.remove(tail, sub);
                if n.is_empty() {
                    self.literal.remove(*t);
                    if sparse(self.literal.len(), self.literal.capacity()) {
                        self.literal.shrink_to(self.literal.len() * 2);
                    }
                }
                found
            }
        }
    }

    fn collect(&self, toks: &[&str], out: &mut Vec<Arc<Subscription>>) {
        let Some((first, tail)) = toks.split_first() else {
            out.extend(self.here.iter().cloned());
            return;
        };
        out.extend(self.rest.iter().cloned());
        if let Some(n) = self.literal.get(*first) {
            n.collect(tail, out);
        }
        if let Some(n) = &self.star {
            n.collect(tail, out);
        }
    }
}

/// Whether a pattern has a wildcard token (`*` or `>` alone).
fn has_wildcard(toks: &[&str]) -> bool {
    toks.iter().any(|t| *t == "*" || *t == ">")
}

pub(crate) struct Router {
    root: RwLock<Trie>,
    generation: AtomicU64,
    count: AtomicUsize,
    rr_seed: AtomicUsize,
    hook: Option<Arc<dyn InterestHook>>,
}

/// The subscription index and what the reply-subject shortcut needs to
/// know of it, changed together under one lock.
#[derive(Default)]
struct Trie {
    /// Patterns with no wildcard, by their whole subject; an entry's key is
    /// its first subscription's pattern. Keyed with a random seed, like a
    /// `HashMap`: subjects come from clients.
    exact: HashTable<Subs>,
    hasher: RandomState,
    /// Patterns with a wildcard.
    node: Node,
    /// Three-token patterns under `_INBOX.` (or a leading `*`) whose last
    /// token is literal: while there are none for a client token, every
    /// `_INBOX.<client>.<n>` matches the same subscriptions whatever `<n>`
    /// is (see [`MatchCache`]).
    inbox_literal: InboxLiteral,
}

impl Trie {
    fn insert(&mut self, toks: &[&str], sub: Arc<Subscription>) {
        if has_wildcard(toks) {
            return self.node.insert(toks, sub);
        }
        let hasher = &self.hasher;
        let hash = hasher.hash_one(sub.pattern());
        let entry = self.exact.entry(
            hash,
            |e| e.pattern() == sub.pattern(),
            |e| hasher.hash_one(e.pattern()),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut e) => e.get_mut().push(sub),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(Subs::One(sub));
            }
        }
    }

    /// Removes `sub`; true when found.
    fn remove(&mut self, toks: &[&str], sub: &Arc<Subscription>) -> bool {
        if has_wildcard(toks) {
            return self.node.remove(toks, sub);
        }
        let hash = self.hasher.hash_one(sub.pattern());
        let Ok(mut e) = self
            .exact
            .find_entry(hash, |e| e.pattern() == sub.pattern())
        else {
            return false;
        };
        match e.get_mut().remove(sub) {
            None => false,
            Some(false) => true,
            Some(true) => {
                e.remove();
                if sparse(self.exact.len(), self.exact.capacity()) {
                    let hasher = &self.hasher;
                    self.exact
                        .shrink_to(self.exact.len() * 2, |e| hasher.hash_one(e.pattern()));
                }
                true
            }
        }
    }

    /// Every subscription whose pattern matches `subject` (its tokens `toks`).
    fn collect(&self, subject: &str, toks: &[&str], out: &mut Vec<Arc<Subscription>>) {
        if !self.exact.is_empty() {
            let hash = self.hasher.hash_one(subject);
            if let Some(e) = self.exact.find(hash, |e| e.pattern() == subject) {
                out.extend(e.as_slice().iter().cloned());
            }
        }
        if !self.node.is_empty() {
            self.node.collect(toks, out);
        }
    }
}

/// Counts of the patterns that make a reply subject's matches depend on its
/// last token: `_INBOX.<client>.<literal>` per client token, and any other
/// three-token pattern with a literal last token that can match `_INBOX.`
/// (`*.x.y`, `_INBOX.*.y`).
#[derive(Default)]
struct InboxLiteral {
    per_client: HashMap<Box<str>, usize>,
    any: usize,
}

impl InboxLiteral {
    /// What `pattern` counts under, if anything.
    fn key<'a>(toks: &[&'a str]) -> Option<Option<&'a str>> {
        let &[first, second, last] = toks else {
            return None;
        };
        let inbox = INBOX_PREFIX.trim_end_matches('.');
        if (first != inbox && first != "*") || last == "*" || last == ">" {
            return None;
        }
        Some((first == inbox && second != "*").then_some(second))
    }

    fn add(&mut self, toks: &[&str]) {
        match Self::key(toks) {
            None => {}
            Some(None) => self.any += 1,
            Some(Some(c)) => *self.per_client.entry(c.into()).or_default() += 1,
        }
    }

    fn remove(&mut self, toks: &[&str]) {
        match Self::key(toks) {
            None => {}
            Some(None) => self.any -= 1,
            Some(Some(c)) => {
                if let Some(n) = self.per_client.get_mut(c) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_client.remove(c);
                        if sparse(self.per_client.len(), self.per_client.capacity()) {
                            self.per_client.shrink_to(self.per_client.len() * 2);
                        }
                    }
                }
            }
        }
    }

    fn blocks(&self, client: &str) -> bool {
        self.any > 0 || self.per_client.contains_key(client)
    }
}

/// The client token of a reply subject `_INBOX.<client>.<n>` (exactly three
/// tokens), else None.
fn inbox_client(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix(INBOX_PREFIX)?;
    let (client, n) = rest.split_once('.')?;
    (!n.contains('.')).then_some(client)
}

/// Told when local interest changes: a subscription of this broker's own
/// clients (not a peer's) is added or removed. The cluster module keeps what
/// its peers must hear from it; the router knows nothing of peers.
pub(crate) trait InterestHook: Send + Sync {
    fn added(&self, pattern: &str, queue: Option<&str>);
    fn removed(&self, pattern: &str, queue: Option<&str>);
}

impl Default for Router {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Router {
    /// A router that tells `hook` of every change to local interest.
    pub fn new(hook: Option<Arc<dyn InterestHook>>) -> Self {
        Router {
            root: RwLock::new(Trie::default()),
            generation: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            rr_seed: AtomicUsize::new(0),
            hook,
        }
    }

    /// Adds a subscription (its pattern already validated).
    pub fn insert(&self, sub: Arc<Subscription>) {
        let s = sub.clone();
        let toks: Vec<&str> = s.pattern().split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        root.insert(&toks, sub);
        root.inbox_literal.add(&toks);
        self.count.fetch_add(1, Ordering::Relaxed);
        // Bump while holding the lock so no reader caches a stale result
        // under the new generation.
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if let Some(hook) = self.hook.as_ref().filter(|_| !s.peer) {
            hook.added(s.pattern(), s.queue());
        }
        // Direct delivery's routes follow every change, peers' interest too.
        crate::accel::routes::changed(self, s.pattern(), Some(true));
    }

    /// Removes a subscription; idempotent. True when this call removed it.
    pub fn remove(&self, sub: &Arc<Subscription>) -> bool {
        if sub.removed.swap(true, Ordering::AcqRel) {
            return false;
        }
        let toks: Vec<&str> = sub.pattern().split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        let found = root.remove(&toks, sub);
        if found {
            self.count.fetch_sub(1, Ordering::Relaxed);
            root.inbox_literal.remove(&toks);
        }
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if let Some(hook) = self.hook.as_ref().filter(|_| found && !sub.peer) {
            hook.removed(sub.pattern(), sub.queue());
        }
        if found {
            crate::accel::routes::changed(self, sub.pattern(), Some(false));
        }
        found
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Computes what a literal subject matches. Returns the result and the
    /// generation it is valid for.
    pub fn compute(&self, subject: &str) -> (Matches, u64) {
        let root = self.root.read().unwrap_or_else(|p| p.into_inner());
        self.compute_locked(subject, &root)
    }

    fn compute_locked(&self, subject: &str, root: &Trie) -> (Matches, u64) {
        let toks: Vec<&str> = subject.split('.').collect();
        let gen = self.generation.load(Ordering::Acquire);
        let mut all = Vec::new();
        root.collect(subject, &toks, &mut all);
        let mut m = Matches::default();
        for s in all {
            match s.queue() {
                None => m.plain.push(s),
                Some(q) => match m.groups.iter_mut().find(|g| &*g.name == q) {
                    Some(g) => g.members.push(s),
                    None => m.groups.push(QueueGroup {
                        name: q.into(),
                        members: vec![s],
                        // Start each new result at a different member so that
                        // short-lived publishers still spread across the group.
                        next: AtomicUsize::new(self.rr_seed.fetch_add(1, Ordering::Relaxed)),
                    }),
                },
            }
        }
        (m, gen)
    }

    /// What every reply subject `_INBOX.<client>.<n>` of `subject`'s client
    /// matches, when that does not depend on `<n>` (no subscription names a
    /// literal last token there); None otherwise.
    fn compute_inbox(&self, subject: &str, client: &str) -> Option<(Matches, u64)> {
        // One read lock for the count, the walk and the generation.
        let root = self.root.read().unwrap_or_else(|p| p.into_inner());
        if root.inbox_literal.blocks(client) {
            return None;
        }
        Some(self.compute_locked(subject, &root))
    }
}

/// A producer's private cache of match results (one per delivery `Batch`).
pub(crate) struct MatchCache {
    map: HashMap<Box<str>, (u64, Arc<Matches>), rustc_hash::FxBuildHasher>,
    /// Reply subjects `_INBOX.<client>.<n>` by client token: each reply
    /// subject is used once, but one client's all match alike.
    inbox: HashMap<Box<str>, (u64, Arc<Matches>), rustc_hash::FxBuildHasher>,
    /// The last subject looked up: most publishers repeat one, and a string
    /// compare is cheaper than hashing it.
    last_key: String,
    last_gen: u64,
    last: Option<Arc<Matches>>,
    cap: usize,
}

impl MatchCache {
    pub fn new(cap: usize) -> Self {
        MatchCache {
            map: HashMap::default(),
            inbox: HashMap::default(),
            last_key: String::new(),
            last_gen: 0,
            last: None,
            cap,
        }
    }

    /// Matches for a publish subject, validating it on first sight.
    pub fn get(&mut self, router: &Router, subject: &str) -> Result<&Matches, SubjectError> {
        let gen = router.generation();
        if self.last.is_some() && self.last_gen == gen && self.last_key == subject {
            return Ok(self.last.as_deref().expect("checked"));
        }
        if let Some(client) = inbox_client(subject) {
            validate_subject(subject)?;
            let hit = matches!(self.inbox.get(client), Some((g, _)) if *g == gen);
            if !hit {
                match router.compute_inbox(subject, client) {
                    Some((m, g)) => {
                        if self.inbox.len() >= self.cap {
                            self.inbox.clear();
                        }
                        self.inbox.insert(client.into(), (g, Arc::new(m)));
                    }
                    None => {
                        // Some subscription names this reply subject itself.
                        let (m, g) = router.compute(subject);
                        self.last_key.clear();
                        self.last_key.push_str(subject);
                        self.last_gen = g;
                        return Ok(self.last.insert(Arc::new(m)));
                    }
                }
            }
            return Ok(&self.inbox.get(client).expect("inserted").1);
        }
        let cached = self
            .map
            .get(subject)
            .filter(|(g, _)| *g == gen)
            .map(|(g, m)| (*g, m.clone()));
        let (g, m) = match cached {
            Some(hit) => hit,
            None if subject.starts_with(INBOX_PREFIX) => {
                // A request's reply subject is used once: caching it would
                // cost an allocation and push out the subjects that repeat.
                validate_subject(subject)?;
                let (m, g) = router.compute(subject);
                (g, Arc::new(m))
            }
            None => {
                if !self.map.contains_key(subject) {
                    validate_subject(subject)?;
                    if self.map.len() >= self.cap {
                        self.map.clear();
                    }
                }
                let (m, g) = router.compute(subject);
                let m = Arc::new(m);
                self.map.insert(subject.into(), (g, m.clone()));
                (g, m)
            }
        };
        self.last_key.clear();
        self.last_key.push_str(subject);
        self.last_gen = g;
        Ok(self.last.insert(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sockbus_protocol::outbox::Outbox;
    use tokio_util::sync::CancellationToken;

    fn sub(router: &Router, id: u64, pattern: &str) -> Arc<Subscription> {
        let conn = Arc::new(Outlet::new(
            id,
            Outbox::new(1 << 20, 0),
            CancellationToken::new(),
            None,
        ));
        let s = Arc::new(Subscription::new(1, pattern, None, conn));
        router.insert(s.clone());
        s
    }

    fn who(cache: &mut MatchCache, router: &Router, subject: &str) -> Vec<u64> {
        let m = cache.get(router, subject).unwrap();
        let mut ids: Vec<u64> = m.plain.iter().map(|s| s.outlet.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn reply_subjects_match_like_a_direct_walk_of_the_trie() {
        let r = Router::default();
        let mut c = MatchCache::new(16);
        let _mux = sub(&r, 1, "_INBOX.a.*");
        let _all = sub(&r, 2, "_INBOX.>");
        let _other = sub(&r, 3, "_INBOX.b.*");
        assert_eq!(who(&mut c, &r, "_INBOX.a.1"), [1, 2]);
        assert_eq!(who(&mut c, &r, "_INBOX.a.2"), [1, 2]);
        assert_eq!(who(&mut c, &r, "_INBOX.b.2"), [2, 3]);
        // Not three tokens: not the per-client shortcut, still right.
        assert_eq!(who(&mut c, &r, "_INBOX.a.2.x"), [2]);
        assert_eq!(who(&mut c, &r, "_INBOX.a"), [2]);

        // A subscription to one reply subject of client a: only that one
        // gains a match, a's other reply subjects do not.
        let one = sub(&r, 4, "_INBOX.a.7");
        assert_eq!(who(&mut c, &r, "_INBOX.a.7"), [1, 2, 4]);
        assert_eq!(who(&mut c, &r, "_INBOX.a.8"), [1, 2]);
        assert_eq!(who(&mut c, &r, "_INBOX.b.7"), [2, 3]);
        r.remove(&one);
        assert_eq!(who(&mut c, &r, "_INBOX.a.7"), [1, 2]);

        // Wildcards before a literal last token, for any client.
        let any = sub(&r, 5, "*.*.9");
        let star = sub(&r, 6, "_INBOX.*.9");
        assert_eq!(who(&mut c, &r, "_INBOX.b.9"), [2, 3, 5, 6]);
        assert_eq!(who(&mut c, &r, "_INBOX.b.8"), [2, 3]);
        r.remove(&any);
        assert_eq!(who(&mut c, &r, "_INBOX.a.9"), [1, 2, 6]);
        r.remove(&star);
        assert_eq!(who(&mut c, &r, "_INBOX.a.9"), [1, 2]);
        assert_eq!(who(&mut c, &r, "_INBOX.b.9"), [2, 3]);

        // Publish subjects are still validated.
        assert!(c.get(&r, "_INBOX.a.*").is_err());
        assert!(c.get(&r, "_INBOX.a. x").is_err());
    }

    /// Subjects of one to three tokens `a`/`b`.
    fn small_subjects() -> Vec<String> {
        let mut all = Vec::new();
        let mut last: Vec<String> = vec![String::new()];
        for _ in 0..3 {
            last = last
                .iter()
                .flat_map(|p| {
                    ["a", "b"].map(|t| {
                        if p.is_empty() {
                            t.to_string()
                        } else {
                            format!("{p}.{t}")
                        }
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    proptest::proptest! {
        /// Literal patterns live in the subject table, wildcard ones in the
        /// trie: together they match exactly what the subject rules say,
        /// however subscriptions to the same subjects come and go.
        #[test]
        fn a_subject_matches_exactly_the_live_patterns_that_match_it(
            ops in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    proptest::collection::vec(
                        proptest::sample::select(vec!["a", "b", "*", ">"]),
                        1..4,
                    ),
                    0usize..16,
                ),
                1..80,
            ),
        ) {
            let r = Router::default();
            let subjects = small_subjects();
            let mut live: Vec<Arc<Subscription>> = Vec::new();
            for (i, (add, mut toks, pick)) in ops.into_iter().enumerate() {
                if add || live.is_empty() {
                    // `>` only stands last.
                    let last = toks.len() - 1;
                    for t in &mut toks[..last] {
                        if *t == ">" {
                            *t = "a";
                        }
                    }
                    live.push(sub(&r, i as u64, &toks.join(".")));
                } else {
                    let s = live.swap_remove(pick % live.len());
                    proptest::prop_assert!(r.remove(&s));
                    proptest::prop_assert!(!r.remove(&s), "removing twice is a no-op");
                }
                proptest::prop_assert_eq!(r.len(), live.len());
                for subject in &subjects {
                    let got = sorted(&r.compute(subject).0);
                    let mut want: Vec<u64> = live
                        .iter()
                        .filter(|s| sockbus_protocol::subject::matches(s.pattern(), subject))
                        .map(|s| s.outlet.id)
                        .collect();
                    want.sort_unstable();
                    proptest::prop_assert_eq!(got, want, "subject {}", subject);
                }
            }
        }
    }

    #[test]
    fn a_subscription_keeps_its_pattern_and_queue_group() {
        let r = Router::default();
        let s = sub(&r, 1, "orders.eu");
        assert_eq!((s.pattern(), s.queue()), ("orders.eu", None));
        let out = s.outlet.clone();
        let q = Subscription::new(2, "orders.*", Some("workers"), out.clone());
        assert_eq!((q.pattern(), q.queue()), ("orders.*", Some("workers")));
        let none = Subscription::new(3, "x", Some(""), out);
        assert_eq!(none.queue(), None, "an empty group name is no group");
    }

    fn sorted(m: &Matches) -> Vec<u64> {
        let mut ids: Vec<u64> = m.plain.iter().map(|s| s.outlet.id).collect();
        ids.sort_unstable();
        ids
    }

    fn token() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec!["_INBOX", "a", "b", "1", "2", "*"])
    }

    proptest::proptest! {
        /// Whatever subscriptions come and go, a reader's cached result for
        /// any subject is what a fresh walk of the trie finds.
        #[test]
        fn cached_matches_equal_a_fresh_walk(
            ops in proptest::collection::vec(
                (0u8..3, proptest::collection::vec(token(), 1..4), proptest::bool::ANY, 0usize..8),
                1..60,
            ),
        ) {
            let r = Router::default();
            let mut c = MatchCache::new(4);
            let mut live: Vec<Arc<Subscription>> = Vec::new();
            for (i, (op, toks, tail, pick)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        let mut pattern = toks.join(".");
                        if tail {
                            pattern.push_str(".>");
                        }
                        live.push(sub(&r, i as u64, &pattern));
                    }
                    1 if !live.is_empty() => {
                        let s = live.swap_remove(pick % live.len());
                        r.remove(&s);
                    }
                    _ => {
                        let subject = toks
                            .iter()
                            .map(|t| if *t == "*" { "x" } else { t })
                            .collect::<Vec<_>>()
                            .join(".");
                        // Reply subjects of the same clients one after the
                        // other: the per-client shortcut must not carry one
                        // subject's matches over to another.
                        let fixed = ["_INBOX.a.1", "_INBOX.a.2", "_INBOX.b.1", "_INBOX.b.2", "_INBOX.a.1"];
                        for subject in [subject.clone(), format!("_INBOX.{subject}")]
                            .into_iter()
                            .chain(fixed.map(String::from))
                        {
                            let cached = sorted(c.get(&r, &subject).unwrap());
                            let fresh = sorted(&r.compute(&subject).0);
                            proptest::prop_assert_eq!(cached, fresh, "subject {}", subject);
                        }
                    }
                }
            }
        }
    }
}
