//! The subscription index: a token trie with NATS matching rules, plus a
//! per-producer match cache so the hot path (publish) takes no lock.
//!
//! Every change to the trie bumps a generation counter. Each producer (the
//! delivery engine's `Batch` of a connection, route or HTTP connection) keeps
//! its own `subject -> matches` cache tagged with the generation it was
//! computed at; a hit at the current generation costs one atomic load and
//! one hash lookup. A miss takes the read lock and walks only the trie
//! branches the subject's tokens lead to, never every subscription.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use sockbus_protocol::subject::{validate_subject, SubjectError, INBOX_PREFIX};

use crate::outlet::Outlet;

/// One subscription of one connection.
pub(crate) struct Subscription {
    pub sid: u32,
    pub pattern: Box<str>,
    pub queue: Option<Box<str>>,
    /// Where its messages go.
    pub outlet: Arc<Outlet>,
    /// Interest of a peer broker, held by a cluster route: gets forwarded
    /// RMSG frames, is never itself announced to other peers.
    pub peer: bool,
    /// Messages after which the subscription ends (u64::MAX: never).
    max: AtomicU64,
    delivered: AtomicU64,
    removed: AtomicBool,
}

impl Subscription {
    pub fn new(sid: u32, pattern: &str, queue: Option<&str>, outlet: Arc<Outlet>) -> Self {
        Subscription {
            sid,
            pattern: pattern.into(),
            queue: queue.map(Into::into),
            outlet,
            peer: false,
            max: AtomicU64::new(u64::MAX),
            delivered: AtomicU64::new(0),
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
        let take = |v: &mut Vec<Arc<Subscription>>| {
            if let Some(i) = v.iter().position(|s| Arc::ptr_eq(s, sub)) {
                v.swap_remove(i);
                true
            } else {
                false
            }
        };
        match toks.split_first() {
            None => take(&mut self.here),
            Some((&">", _)) => take(&mut self.rest),
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

pub(crate) struct Router {
    root: RwLock<Trie>,
    generation: AtomicU64,
    count: AtomicUsize,
    rr_seed: AtomicUsize,
    hook: Option<Arc<dyn InterestHook>>,
}

/// The subscription trie and what the reply-subject shortcut needs to know
/// of it, changed together under one lock.
#[derive(Default)]
struct Trie {
    node: Node,
    /// Three-token patterns under `_INBOX.` (or a leading `*`) whose last
    /// token is literal: while there are none for a client token, every
    /// `_INBOX.<client>.<n>` matches the same subscriptions whatever `<n>`
    /// is (see [`MatchCache`]).
    inbox_literal: InboxLiteral,
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
        let pattern = sub.pattern.clone();
        let local = (!sub.peer).then(|| sub.queue.clone());
        let toks: Vec<&str> = pattern.split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        root.node.insert(&toks, sub);
        root.inbox_literal.add(&toks);
        self.count.fetch_add(1, Ordering::Relaxed);
        // Bump while holding the lock so no reader caches a stale result
        // under the new generation.
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if let (Some(queue), Some(hook)) = (local, &self.hook) {
            hook.added(&pattern, queue.as_deref());
        }
    }

    /// Removes a subscription; idempotent.
    pub fn remove(&self, sub: &Arc<Subscription>) {
        if sub.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let toks: Vec<&str> = sub.pattern.split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        let found = root.node.remove(&toks, sub);
        if found {
            self.count.fetch_sub(1, Ordering::Relaxed);
            root.inbox_literal.remove(&toks);
        }
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if let Some(hook) = self.hook.as_ref().filter(|_| found && !sub.peer) {
            hook.removed(&sub.pattern, sub.queue.as_deref());
        }
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
        self.compute_locked(subject, &root.node)
    }

    fn compute_locked(&self, subject: &str, root: &Node) -> (Matches, u64) {
        let toks: Vec<&str> = subject.split('.').collect();
        let gen = self.generation.load(Ordering::Acquire);
        let mut all = Vec::new();
        root.collect(&toks, &mut all);
        let mut m = Matches::default();
        for s in all {
            match &s.queue {
                None => m.plain.push(s),
                Some(q) => match m.groups.iter_mut().find(|g| g.name == *q) {
                    Some(g) => g.members.push(s),
                    None => m.groups.push(QueueGroup {
                        name: q.clone(),
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
        Some(self.compute_locked(subject, &root.node))
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
