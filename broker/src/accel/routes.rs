//! The broker half of direct delivery (docs/fast-path.md, "Direct
//! delivery"): which subjects get a kernel route, which publishers may use
//! them, the ordering barrier the kernel checks, and the credit both ends
//! of a direct message are owed.
//!
//! - Routes follow the one subscription-change hook (`Router::insert` /
//!   `remove`, peers' interest included) and stream creation/deletion: a
//!   literal subject gets a route exactly while its only match in the
//!   default account is one plain, unlimited subscription of a native,
//!   plain-TCP client on the fast path, no stream captures it and it is not
//!   under `$SB.`. Anything else (a second subscriber, a wildcard or queue
//!   subscription that matches, a peer's interest, a stream) removes it at
//!   once, before the change that caused it returns.
//! - Publishers: only connections with no publish restrictions are put in
//!   the allow map (the kernel's allow map is per publisher, not per
//!   subject, so a restricted user never goes direct).
//! - Barrier: after each read batch a publisher writes the bytes it has
//!   handled into `SOCKBUS_DIRECT_DONE`, but only once every message it
//!   queued is in the kernel ([`crate::deliver::Batch::flushed`]).
//! - Credit: a pump every [`PUMP`] credits publishers for the PUB bytes
//!   that went direct (the broker never read them) and keeps each routed
//!   subscriber's grant topped up out of its send window, which counts the
//!   grant as in flight, so the subscriber's credit for directly delivered
//!   bytes balances and a subscriber that stops reading holds at most its
//!   window in the kernel.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sockbus_protocol::api::subject::is_reserved;

use super::abi::{DirectCount, SockKey, DIRECT_SUBJECT_MAX};
use super::direct::DirectMaps;
use super::loader::FastPath;
use crate::deliver::Delivery;
use crate::outlet::Outlet;
use crate::router::Router;
use crate::streams::Streams;

/// How often publishers are credited and grants topped up.
const PUMP: Duration = Duration::from_millis(5);
/// A routed subscriber's grant is raised by up to this much (out of its
/// send window) ... At one raise per [`PUMP`] this bounds direct delivery
/// to one subscriber at 800 MB/s (1 MiB held it at 200 MB/s, about 1.3 M
/// messages/s of 128 bytes, below the fast path's rate).
const GRANT_CHUNK: u64 = 4 << 20;
/// ... once less than this is left of it.
const GRANT_LOW: u64 = GRANT_CHUNK / 2;

/// Set while routes are managed: every hook checks it first, so a broker
/// without direct delivery pays one atomic load per subscription change.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

struct State {
    maps: DirectMaps,
    /// The default account's engine and streams (`bind`); routes are only
    /// ever for its subjects.
    bound: Option<(Delivery, Arc<Streams>)>,
    conns: HashMap<u64, Conn>,
    /// Installed routes: subject -> outlet id of the subscriber.
    routes: HashMap<Box<str>, u64>,
    /// Literal subjects with subscriptions, and how many: the subjects a
    /// route could be for, looked at again when a wildcard comes or goes.
    literal: HashMap<Box<str>, usize>,
    /// The last pump pass had routes to serve.
    pumped: bool,
    /// Per routed subject, the kernel's direct counts already added to the
    /// broker's metrics ([`State::account`]).
    counted: HashMap<Box<str>, DirectCount>,
}

struct Conn {
    /// The client's end of the connection, as the programs key it.
    key: SockKey,
    outlet: Weak<Outlet>,
    publisher: bool,
    subscriber: bool,
    /// PUB bytes of this publisher that went direct and were credited.
    credited: u64,
    /// Running total granted to the kernel for this subscriber, and the
    /// part of it counted in the outlet's send window.
    granted: u64,
    /// Routes to this subscriber.
    routes: usize,
    /// Its receive window (what the broker's send window allows at start).
    window: u64,
}

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Switches per-frame mode on for connections established from now on
/// (`sockbus_sock_ops` reads it): before the broker accepts its first client.
pub(crate) fn enable(fp: &FastPath) -> io::Result<()> {
    fp.direct()?.set_enabled(true)
}

/// Starts managing routes on `fp` (direct delivery passed its self-test).
pub(crate) fn install(fp: &Arc<FastPath>) {
    match fp.direct() {
        Ok(maps) => {
            *state() = Some(State {
                maps,
                bound: None,
                conns: HashMap::new(),
                routes: HashMap::new(),
                literal: HashMap::new(),
                pumped: false,
                counted: HashMap::new(),
            });
            ACTIVE.store(true, Ordering::Release);
        }
        Err(e) => tracing::warn!("fast path: direct delivery off: cannot open its maps: {e}"),
    }
}

/// Stops managing routes (the fast path is being detached).
pub(crate) fn uninstall() {
    ACTIVE.store(false, Ordering::Release);
    if let Some(mut s) = state().take() {
        let _ = s.maps.set_enabled(false);
        for subject in s.routes.keys() {
            s.maps.remove_route(subject);
        }
    }
}

/// True while the broker installs routes.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Gives the route manager the default account's engine and streams, and
/// starts the credit pump on the current tokio runtime. Until then no
/// route is installed.
pub(crate) fn bind(delivery: Delivery, streams: Arc<Streams>) {
    if !active() {
        return;
    }
    if let Some(s) = state().as_mut() {
        s.bound = Some((delivery, streams));
    }
    tokio::spawn(async {
        let mut tick = tokio::time::interval(PUMP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while active() {
            tick.tick().await;
            if let Some(s) = state().as_mut() {
                s.pump();
            }
        }
    });
}

/// The key of the client's end of a just-accepted connection, when direct
/// delivery is on.
pub(crate) fn client_key(sock: &impl AsFd) -> Option<SockKey> {
    if !active() {
        return None;
    }
    super::sock::keys(sock).ok().map(|(_, theirs)| theirs)
}

/// A client connection known to the route manager; dropping it forgets the
/// connection, its routes and its map entries.
pub(crate) struct Registered {
    id: u64,
    key: SockKey,
    pub publisher: bool,
    /// Bytes last written to `SOCKBUS_DIRECT_DONE`.
    done: u64,
}

/// Registers a client connection (native protocol, plain TCP) whose client
/// end is `key`. `publisher`: it may publish anywhere (no publish
/// restrictions) and is in the default account; `subscriber`: its
/// subscriptions may get routes (default account).
pub(crate) fn register(
    id: u64,
    key: SockKey,
    outlet: &Arc<Outlet>,
    publisher: bool,
    subscriber: bool,
) -> Option<Registered> {
    if !active() {
        return None;
    }
    let mut g = state();
    let s = g.as_mut()?;
    if publisher {
        if let Err(e) = s.maps.allow(key) {
            tracing::debug!(
                conn = id,
                "direct delivery: cannot allow the publisher: {e}"
            );
            return None;
        }
    }
    s.conns.insert(
        id,
        Conn {
            key,
            outlet: Arc::downgrade(outlet),
            publisher,
            subscriber,
            credited: 0,
            granted: 0,
            routes: 0,
            window: outlet.outbox.available() as u64,
        },
    );
    Some(Registered {
        id,
        key,
        publisher,
        done: u64::MAX,
    })
}

impl Registered {
    /// The broker has handled `total` bytes of this publisher's frames and
    /// every message they produced is in the kernel: frames may go direct
    /// again once the kernel has passed no more than that.
    pub fn set_done(&mut self, total: u64) {
        if self.done == total || !active() {
            return;
        }
        if let Some(s) = state().as_mut() {
            if s.maps.set_done(self.key, total).is_ok() {
                self.done = total;
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if !active() {
            return;
        }
        if let Some(s) = state().as_mut() {
            let gone: Vec<Box<str>> = s
                .routes
                .iter()
                .filter(|(_, id)| **id == self.id)
                .map(|(k, _)| k.clone())
                .collect();
            for subject in gone {
                s.remove(&subject);
            }
            s.conns.remove(&self.id);
            s.maps.forget(&self.key);
        }
    }
}

/// A subscription to `pattern` was added (`Some(true)`), removed
/// (`Some(false)`) or changed (its message limit set, a stream on it
/// created or deleted: `None`) in `router`: routes for the subjects it
/// matches follow.
pub(crate) fn changed(router: &Router, pattern: &str, added: Option<bool>) {
    if !active() {
        return;
    }
    if let Some(s) = state().as_mut() {
        if !s.is_bound(router) {
            return;
        }
        if sockbus_protocol::subject::is_wildcard(pattern) {
            let hit: Vec<Box<str>> = s
                .literal
                .keys()
                .filter(|r| sockbus_protocol::subject::matches(pattern, r))
                .cloned()
                .collect();
            for subject in hit {
                s.evaluate(&subject);
            }
            return;
        }
        match added {
            Some(true) => *s.literal.entry(pattern.into()).or_default() += 1,
            Some(false) => {
                if let Some(n) = s.literal.get_mut(pattern) {
                    *n -= 1;
                    if *n == 0 {
                        s.literal.remove(pattern);
                    }
                }
            }
            None => {}
        }
        s.evaluate(pattern);
    }
}

/// Streams of `delivery`'s account were created or deleted with these
/// subject patterns: routed subjects they capture lose their route, and a
/// deleted stream's subjects may get one.
pub(crate) fn streams_changed(delivery: &Delivery, patterns: &[String]) {
    if !active() {
        return;
    }
    for p in patterns {
        changed(delivery.router(), p, None);
    }
}

impl State {
    fn is_bound(&self, router: &Router) -> bool {
        self.bound
            .as_ref()
            .is_some_and(|(d, _)| std::ptr::eq(d.router(), router))
    }

    /// Installs, keeps or removes the route for one literal subject.
    fn evaluate(&mut self, subject: &str) {
        let want = self.eligible(subject);
        let have = self.routes.get(subject).copied();
        match (have, want) {
            (Some(id), Some((to, _))) if id == to => {}
            (Some(_), _) => {
                self.remove(subject);
                if let Some((to, sid)) = want {
                    self.add(subject, to, sid);
                }
            }
            (None, Some((to, sid))) => self.add(subject, to, sid),
            (None, None) => {}
        }
    }

    /// The subscriber (outlet id, sid) a route for `subject` would go to.
    fn eligible(&self, subject: &str) -> Option<(u64, u32)> {
        let (delivery, streams) = self.bound.as_ref()?;
        if subject.is_empty() || subject.len() > DIRECT_SUBJECT_MAX || is_reserved(subject) {
            return None;
        }
        let (m, _) = delivery.router().compute(subject);
        if !m.groups.is_empty() || m.plain.len() != 1 {
            return None;
        }
        let s = &m.plain[0];
        if s.peer || s.is_removed() || s.is_limited() || s.pattern() != subject {
            return None;
        }
        let c = self.conns.get(&s.outlet.id)?;
        // On the fast path: sock_ops put its socket in per-frame mode.
        if !c.subscriber || self.maps.publisher(&c.key).is_none() {
            return None;
        }
        if streams.capture(subject).is_some() {
            return None;
        }
        Some((s.outlet.id, s.sid))
    }

    fn add(&mut self, subject: &str, to: u64, sid: u32) {
        let Some(c) = self.conns.get_mut(&to) else {
            return;
        };
        // What the kernel counted for this subject before (an earlier
        // route) is in the metrics already.
        let before = self.maps.subject(subject).unwrap_or_default();
        if let Err(e) = self.maps.add_route(subject, c.key, sid) {
            tracing::debug!(subject, "direct delivery: cannot add the route: {e}");
            return;
        }
        self.counted.insert(subject.into(), before);
        c.routes += 1;
        self.routes.insert(subject.into(), to);
        tracing::debug!(subject, conn = to, sid, "direct delivery: route added");
        // Its first budget now, not at the next pump.
        self.top_up(to);
    }

    fn remove(&mut self, subject: &str) {
        let Some(id) = self.routes.remove(subject) else {
            return;
        };
        self.maps.remove_route(subject);
        // What went direct until now, then no more counting.
        self.account(subject);
        self.counted.remove(subject);
        tracing::debug!(subject, conn = id, "direct delivery: route removed");
        let last = match self.conns.get_mut(&id) {
            Some(c) => {
                c.routes -= 1;
                c.routes == 0
            }
            None => false,
        };
        if last {
            self.take_back(id);
        }
    }

    /// Keeps a routed subscriber's grant at least [`GRANT_LOW`] ahead of
    /// what the kernel used, counting each raise in its send window (so
    /// the kernel never holds more for it than the window allows).
    fn top_up(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(out) = c.outlet.upgrade() else {
            return;
        };
        let used = self.maps.subscriber(&c.key).map_or(0, |s| s.used);
        // Two CPUs may overshoot the grant by a frame each: count that too.
        let base = c.granted.max(used);
        if base - used >= GRANT_LOW {
            return;
        }
        // Only out of the window's free half: the other half stays for
        // what the broker itself writes (PONGs, messages of other subjects),
        // also when the subscriber stops reading. It must stay above the
        // receiver's credit quantum (a quarter of its window,
        // `flow::RecvWindow`): a grant the kernel cannot use (the publisher
        // is behind the barrier) holds its part of the window until the
        // route goes, and with an eighth left for the broker the receiver
        // never read enough to send credit: the publisher's messages waited
        // in the broker for good (tried: `accel_bench --direct` hung).
        let free = (out.outbox.available() as u64).saturating_sub(c.window / 2);
        let extra = free.min(GRANT_CHUNK);
        if extra == 0 && base == c.granted {
            return;
        }
        let total = base + extra;
        if self.maps.grant(c.key, total).is_ok() {
            out.outbox.reserve((total - c.granted) as usize);
            c.granted = total;
        }
    }

    /// The subscriber has no route left: the kernel's unused grant goes
    /// back to its send window.
    fn take_back(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let used = self.maps.subscriber(&c.key).map_or(0, |s| s.used);
        let _ = self.maps.grant(c.key, used);
        // Read again: a send that checked the old grant may have added since.
        let used = self.maps.subscriber(&c.key).map_or(used, |s| s.used);
        let unused = c.granted.saturating_sub(used);
        if let Some(out) = c.outlet.upgrade() {
            out.outbox.on_credit(unused.min(u64::from(u32::MAX)) as u32);
        }
        c.granted = used;
    }

    /// Adds what went direct on `subject` since the last look to the
    /// broker's metrics, as any message is counted there: a message in and
    /// one out, its payload bytes (here the MSG bytes less the frame's fixed
    /// part and subject: reply subjects count as payload) and the subject's
    /// line on the status page.
    fn account(&mut self, subject: &str) {
        let Some((delivery, _)) = self.bound.as_ref() else {
            return;
        };
        let Some(seen) = self.counted.get_mut(subject) else {
            return;
        };
        let now = self.maps.subject(subject).unwrap_or_default();
        let msgs = now.msgs.saturating_sub(seen.msgs);
        let bytes = now.bytes.saturating_sub(seen.bytes);
        *seen = now;
        if msgs == 0 {
            return;
        }
        // Header, sid, subject and reply lengths, headers length.
        const MSG_FIXED: u64 = 12 + 4 + 2 + 2 + 4;
        let payload = bytes.saturating_sub(msgs * (MSG_FIXED + subject.len() as u64));
        let m = delivery.metrics();
        m.msgs_in.fetch_add(msgs, Ordering::Relaxed);
        m.msgs_out.fetch_add(msgs, Ordering::Relaxed);
        m.bytes_in.fetch_add(payload, Ordering::Relaxed);
        m.bytes_out.fetch_add(payload, Ordering::Relaxed);
        m.subjects.record(subject, msgs, payload);
    }

    /// Credits publishers for their PUB bytes that went direct, tops up
    /// routed subscribers' grants, counts direct messages in the metrics.
    fn pump(&mut self) {
        // Without routes nothing goes direct: one more pass after the last
        // one went (for what went direct until then), then none.
        let busy = !self.routes.is_empty();
        if !busy && !self.pumped {
            return;
        }
        self.pumped = busy;
        let routed: Vec<Box<str>> = self.routes.keys().cloned().collect();
        for subject in routed {
            self.account(&subject);
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.publisher {
                if let Some(p) = self.maps.publisher(&c.key) {
                    // The PUB bytes (a PUB without room is 4 bytes
                    // shorter than its MSG, one with room is not).
                    let owed = p.direct_pub_bytes.saturating_sub(c.credited);
                    if owed > 0 {
                        if let Some(out) = c.outlet.upgrade() {
                            let n = owed.min(u64::from(u32::MAX)) as u32;
                            if out.outbox.grant(n) {
                                out.kick();
                            }
                            c.credited += u64::from(n);
                        }
                    }
                }
            }
            if c.routes > 0 {
                self.top_up(id);
            }
        }
    }
}
