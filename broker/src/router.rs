//! The subscription index: a token trie with NATS matching rules, plus a
//! per-reader match cache so the hot path (publish) takes no lock.
//!
//! Every change to the trie bumps a generation counter. A reader task keeps
//! its own `subject -> matches` cache tagged with the generation it was
//! computed at; a hit at the current generation costs one atomic load and
//! one hash lookup. A miss takes the read lock and walks only the trie
//! branches the subject's tokens lead to, never every subscription.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sockbus_protocol::frame::{encode_sub, encode_unsub};
use sockbus_protocol::outbox::Push;
use sockbus_protocol::subject::{validate_subject, SubjectError, INBOX_PREFIX};

use crate::conn::ConnShared;

/// One subscription of one connection.
pub struct Subscription {
    pub sid: u32,
    pub pattern: Box<str>,
    pub queue: Option<Box<str>>,
    pub conn: Arc<ConnShared>,
    /// Interest of a peer broker, held by a cluster route connection: gets
    /// forwarded RMSG frames, is never itself propagated to other peers.
    pub route: bool,
    /// Messages after which the subscription ends (u64::MAX: never).
    max: AtomicU64,
    delivered: AtomicU64,
    removed: AtomicBool,
}

impl Subscription {
    pub fn new(sid: u32, pattern: &str, queue: Option<&str>, conn: Arc<ConnShared>) -> Self {
        Subscription {
            sid,
            pattern: pattern.into(),
            queue: queue.map(Into::into),
            conn,
            route: false,
            max: AtomicU64::new(u64::MAX),
            delivered: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        }
    }

    /// A peer broker's interest, arriving on a cluster route.
    pub fn new_route(sid: u32, pattern: &str, queue: Option<&str>, conn: Arc<ConnShared>) -> Self {
        Subscription {
            route: true,
            ..Subscription::new(sid, pattern, queue, conn)
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
pub struct QueueGroup {
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
pub struct Matches {
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

pub struct Router {
    root: RwLock<Node>,
    generation: AtomicU64,
    count: AtomicUsize,
    rr_seed: AtomicUsize,
    interest: Mutex<Interest>,
}

/// This broker's local interest as peers see it: one route subscription per
/// distinct (pattern, queue), however many local subscriptions share it, and
/// the route links it is announced on (at most one per peer node).
/// (pattern, queue group) of local subscriptions.
type InterestKey = (Box<str>, Option<Box<str>>);

#[derive(Default)]
struct Interest {
    /// Route subscription id and how many local subscriptions share the key.
    table: HashMap<InterestKey, (u32, usize)>,
    next_rsid: u32,
    links: Vec<Link>,
}

struct Link {
    conn: Arc<ConnShared>,
    peer: Box<str>,
    dialed_by_us: bool,
}

/// Why a route was not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkRefused {
    /// A route to that peer is up and wins the tie-break: the one dialed by
    /// the node with the smaller id is kept, so both ends keep the same one.
    Duplicate,
}

fn announce(link: &ConnShared, f: impl FnOnce(&mut bytes::BytesMut)) {
    if let Push::Queued { was_empty: true } = link.outbox.push_control(f) {
        link.wake();
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    pub fn new() -> Self {
        Router {
            root: RwLock::new(Node::default()),
            generation: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            rr_seed: AtomicUsize::new(0),
            interest: Mutex::new(Interest::default()),
        }
    }

    fn interest(&self) -> std::sync::MutexGuard<'_, Interest> {
        self.interest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an outbound cluster route and queues a SUB for every piece of
    /// local interest on it; later changes are queued as they happen. Done
    /// under one lock so no change can fall between snapshot and registration.
    ///
    /// Keeps one route per peer: when both nodes dialed each other, the route
    /// dialed by the node with the smaller id (`us` vs `peer`) wins on both
    /// ends; a losing existing route is aborted, a losing new one refused.
    pub fn add_link(
        &self,
        link: Arc<ConnShared>,
        us: &str,
        peer: &str,
        dialed_by_us: bool,
    ) -> Result<(), LinkRefused> {
        let mut i = self.interest();
        let wins = |dialed_by_us: bool| dialed_by_us == (us < peer);
        if let Some(pos) = i.links.iter().position(|l| &*l.peer == peer) {
            if !wins(dialed_by_us) || wins(i.links[pos].dialed_by_us) {
                return Err(LinkRefused::Duplicate);
            }
            let old = i.links.swap_remove(pos);
            old.conn.abort.cancel();
        }
        for ((pattern, queue), (rsid, _)) in &i.table {
            announce(&link, |b| {
                let _ = encode_sub(b, *rsid, pattern, queue.as_deref());
            });
        }
        i.links.push(Link {
            conn: link,
            peer: peer.into(),
            dialed_by_us,
        });
        Ok(())
    }

    pub fn remove_link(&self, id: u64) {
        self.interest().links.retain(|l| l.conn.id != id);
    }

    /// Node ids of the peers with a route up.
    pub fn peers(&self) -> Vec<String> {
        self.interest()
            .links
            .iter()
            .map(|l| l.peer.to_string())
            .collect()
    }

    /// Interest that is not a subscription (a durable stream's subjects):
    /// announced to cluster peers like one, so they forward matching publishes.
    pub fn add_local_interest(&self, pattern: &str) {
        self.interest_added(pattern, None);
    }

    pub fn remove_local_interest(&self, pattern: &str) {
        self.interest_removed(pattern, None);
    }

    fn interest_added(&self, pattern: &str, queue: Option<&str>) {
        let mut i = self.interest();
        let key = (Box::<str>::from(pattern), queue.map(Box::<str>::from));
        if let Some(e) = i.table.get_mut(&key) {
            e.1 += 1;
            return;
        }
        i.next_rsid = i.next_rsid.wrapping_add(1);
        let rsid = i.next_rsid;
        i.table.insert(key, (rsid, 1));
        for l in &i.links {
            announce(&l.conn, |b| {
                let _ = encode_sub(b, rsid, pattern, queue);
            });
        }
    }

    fn interest_removed(&self, pattern: &str, queue: Option<&str>) {
        let mut i = self.interest();
        let key = (Box::<str>::from(pattern), queue.map(Box::<str>::from));
        let Some(e) = i.table.get_mut(&key) else {
            return;
        };
        e.1 -= 1;
        if e.1 > 0 {
            return;
        }
        let rsid = e.0;
        i.table.remove(&key);
        for l in &i.links {
            announce(&l.conn, |b| encode_unsub(b, rsid, 0));
        }
    }

    /// Adds a subscription (its pattern already validated).
    pub fn insert(&self, sub: Arc<Subscription>) {
        let pattern = sub.pattern.clone();
        let local = (!sub.route).then(|| sub.queue.clone());
        let toks: Vec<&str> = pattern.split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        root.insert(&toks, sub);
        self.count.fetch_add(1, Ordering::Relaxed);
        // Bump while holding the lock so no reader caches a stale result
        // under the new generation.
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if let Some(queue) = local {
            self.interest_added(&pattern, queue.as_deref());
        }
    }

    /// Removes a subscription; idempotent.
    pub fn remove(&self, sub: &Arc<Subscription>) {
        if sub.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let toks: Vec<&str> = sub.pattern.split('.').collect();
        let mut root = self.root.write().unwrap_or_else(|p| p.into_inner());
        let found = root.remove(&toks, sub);
        if found {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        self.generation.fetch_add(1, Ordering::Release);
        drop(root);
        if found && !sub.route {
            self.interest_removed(&sub.pattern, sub.queue.as_deref());
        }
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Computes what a literal subject matches. Returns the result and the
    /// generation it is valid for.
    pub fn compute(&self, subject: &str) -> (Matches, u64) {
        let toks: Vec<&str> = subject.split('.').collect();
        let root = self.root.read().unwrap_or_else(|p| p.into_inner());
        let gen = self.generation.load(Ordering::Acquire);
        let mut all = Vec::new();
        root.collect(&toks, &mut all);
        drop(root);
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
}

/// A reader task's private cache of match results.
pub struct MatchCache {
    map: HashMap<Box<str>, (u64, Arc<Matches>), rustc_hash::FxBuildHasher>,
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
