//! The delivery engine: every message that enters the broker, from any
//! front end (client connections, cluster routes, the HTTP gateway) or from
//! the broker itself (stream acks, consumer deliveries, status messages),
//! goes through here: checks -> match -> fan-out to local subscribers and
//! peers -> stream capture -> wake/flush -> counters. So does every
//! subscription change. A check that must hold for every publish or every
//! subscription is written once, in this file.
//!
//! [`Delivery`] is the cheap shared handle; a [`Batch`] is one producer's
//! working state (match cache, the outlets it queued to, counts, captured
//! messages), flushed once per read batch with [`Batch::finish`] so a burst
//! of publishes costs one write per receiving connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sockbus_protocol::api::subject::is_reserved;
use sockbus_protocol::frame::{
    self, encode_msg, message_frame_len, MSG_NO_RESPONDERS, PUB_ACK, RMSG_NO_ACK,
};
use sockbus_protocol::nats;
use sockbus_protocol::outbox::{Outbox, Push};
use sockbus_protocol::subject::{subject_hash, validate_pattern, validate_subject};
use sockbus_protocol::SubjectError;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::auth::check::PublishCheck;
use crate::auth::Permissions;
use crate::memory::Release;
use crate::metrics::{LocalCounts, Metrics};
use crate::outlet::{Codec, Outlet};
use crate::router::{MatchCache, Matches, QueueGroup, Router, Subscription};
use crate::streams::{AckTo, CaptureCache, Pending, PubAck, Stream, StreamError, Streams};

struct Engine {
    router: Router,
    /// The account this engine serves: every subscription in `router` is
    /// one of its clients' (or a peer's interest in that account).
    scope: Scope,
    metrics: Arc<Metrics>,
    max_payload: u32,
    max_pending: usize,
    /// Most subscriptions one outlet may hold (0: no limit).
    max_subscriptions: usize,
    next_id: AtomicU64,
    release: Release,
}

impl Engine {
    /// Ends a subscription, however it ends; idempotent.
    fn remove(&self, s: &Arc<Subscription>) {
        if self.router.remove(s) {
            s.outlet.subscriptions.fetch_sub(1, Ordering::AcqRel);
            if !s.peer {
                self.scope.subs.fetch_sub(1, Ordering::AcqRel);
            }
            self.release.freed(1);
        }
    }
}

/// The account a delivery engine serves (docs/security.md, "Accounts"):
/// accounts isolate because each has an engine, and so a router, of its
/// own; nothing published in one can match a subscription of another.
pub(crate) struct Scope {
    pub name: Arc<str>,
    /// Subscriptions of the account's clients (peers' interest not counted).
    pub subs: std::sync::atomic::AtomicUsize,
    /// Most of them at once (`max-subscriptions` of `[[accounts]]`); 0: no limit.
    pub max_subs: usize,
    /// What this account's subjects carry on cluster routes
    /// (`$SB.ACC.<name>.`); None for the default account, whose subjects
    /// cross as they are.
    pub route_prefix: Option<Box<str>>,
}

impl Scope {
    pub fn new(name: &str, max_subs: usize) -> Scope {
        let default = name == crate::auth::DEFAULT_ACCOUNT;
        Scope {
            name: name.into(),
            subs: Default::default(),
            max_subs,
            route_prefix: (!default)
                .then(|| format!("{}{name}.", crate::account::ROUTE_PREFIX).into()),
        }
    }
}

/// The engine's handle: clone it freely.
#[derive(Clone)]
pub(crate) struct Delivery(Arc<Engine>);

/// Why a publish was refused. The text is what the publisher sees.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("invalid subject: {0}")]
    InvalidSubject(SubjectError),
    #[error("invalid reply subject: {0}")]
    InvalidReply(SubjectError),
    #[error("message of {size} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge { size: usize, max: u32 },
    #[error("subject {0:?} is reserved: subjects under $SB. are the broker's API")]
    Reserved(String),
    #[error("permission denied: publish to {0}")]
    Denied(String),
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    #[error("invalid subscription subject: {0}")]
    InvalidSubject(SubjectError),
    #[error("invalid queue group name {0:?}")]
    InvalidQueue(String),
    #[error(
        "cannot subscribe to {0:?} here: subjects under $SB. are reserved for the broker's API"
    )]
    Reserved(String),
    #[error("subscription limit reached: a connection may hold at most {max} subscriptions (--max-subscriptions)")]
    TooMany { max: usize },
    #[error("subscription limit reached: account {account:?} may hold at most {max} subscriptions (max-subscriptions of its [[accounts]] table)")]
    AccountTooMany { account: Arc<str>, max: usize },
    #[error("permission denied: subscribe to {0}")]
    Denied(String),
}

/// Who publishes, as far as the checks and the fan-out care.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Publisher {
    /// The publisher's outlet id (its own subscriptions).
    pub id: u64,
    /// Deliver to the publisher's own subscriptions too.
    pub echo: bool,
    /// Answer a request nobody receives with a no-responders status.
    pub no_responders: bool,
    /// `$SB.` subjects go to the stream API instead of being refused.
    pub api: bool,
    /// The publisher asks for stream acks with [`PUB_ACK`]
    /// (`CONNECT_EXPLICIT_ACKS`); otherwise (an older client) every captured
    /// publish with a reply subject is acked there.
    pub explicit_acks: bool,
}

/// Who waits for the ack of a publish a stream captures.
pub(crate) enum Ack {
    /// The PUB's flags say whether its reply subject gets it ([`PUB_ACK`],
    /// read with [`Publisher::explicit_acks`]).
    Flags(u8),
    /// The HTTP gateway, on this channel (never the reply subject).
    Chan(oneshot::Sender<Result<PubAck, StreamError>>),
    /// A NATS client: every captured publish with a reply subject is acked
    /// there, in JetStream's shape (crate::jetstream).
    Nats,
}

impl Ack {
    /// Does the publish's reply subject get the stream's ack? A request
    /// that did not ask for one gets only its responders' replies.
    fn on_reply(&self, from: &Publisher) -> bool {
        match self {
            Ack::Flags(f) => f & PUB_ACK != 0 || !from.explicit_acks,
            Ack::Chan(_) => false,
            Ack::Nats => true,
        }
    }
}

/// Who subscribes, as far as the checks care: the mirror of [`Publisher`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subscriber<'a> {
    /// May subscribe under `$SB.` (where the broker answers API requests
    /// sent with a `$SB.` reply subject); refused otherwise.
    pub api: bool,
    /// The user's permissions; None: may subscribe to anything.
    pub perms: Option<&'a Permissions>,
}

/// What became of an accepted publish.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Published {
    /// A stream captured it: its ack follows once stored.
    pub stored: bool,
}

/// A message on its way to subscribers, borrowed from the producer's buffer.
pub(crate) struct Outgoing<'a> {
    pub subject: &'a str,
    pub hash: u32,
    pub reply: Option<&'a str>,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    pub flags: u8,
    /// Over a cluster route: the publisher asked for no stream ack
    /// ([`RMSG_NO_ACK`]).
    pub no_ack: bool,
}

impl<'a> Outgoing<'a> {
    pub fn new(
        subject: &'a str,
        reply: Option<&'a str>,
        headers: &'a [u8],
        payload: &'a [u8],
    ) -> Self {
        Outgoing {
            subject,
            hash: subject_hash(subject.as_bytes()),
            reply,
            headers,
            payload,
            flags: 0,
            no_ack: false,
        }
    }
}

impl Delivery {
    /// The default account's engine. `max_subscriptions`: most
    /// subscriptions one connection (outlet) may hold, 0 for no limit.
    #[cfg(test)]
    pub fn new(
        router: Router,
        metrics: Arc<Metrics>,
        max_payload: u32,
        max_pending: usize,
        max_subscriptions: usize,
    ) -> Self {
        Self::scoped(
            Scope::new(crate::auth::DEFAULT_ACCOUNT, 0),
            router,
            metrics,
            max_payload,
            max_pending,
            max_subscriptions,
        )
    }

    /// An engine for one account ([`Scope`]); [`Delivery::new`] is the
    /// default account's.
    pub fn scoped(
        scope: Scope,
        router: Router,
        metrics: Arc<Metrics>,
        max_payload: u32,
        max_pending: usize,
        max_subscriptions: usize,
    ) -> Self {
        Delivery(Arc::new(Engine {
            scope,
            router,
            metrics,
            max_payload,
            max_pending,
            max_subscriptions,
            next_id: AtomicU64::new(1),
            release: Release::default(),
        }))
    }

    /// Gives the memory of removed subscriptions back to the system after
    /// each large release, until `shutdown` ([`crate::memory`]).
    pub async fn give_back_memory(self, shutdown: tokio_util::sync::CancellationToken) {
        self.0.release.run(shutdown).await
    }

    pub fn router(&self) -> &Router {
        &self.0.router
    }

    /// The account this engine serves.
    pub fn scope(&self) -> &Scope {
        &self.0.scope
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// A fresh outlet id (client connections, routes, event streams).
    pub fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A connection's outlet (client, route, event stream): `id` from
    /// [`Delivery::next_id`], one budget of `--max-pending` bytes for
    /// everything queued for it, and its slow-consumer verdicts counted in
    /// this engine's metrics. `send_window`: the peer's receive window (0:
    /// no flow control).
    pub fn outlet(
        &self,
        id: u64,
        send_window: u32,
        abort: CancellationToken,
        sock: Option<crate::transport::WriteSock>,
    ) -> Outlet {
        Outlet::new(
            id,
            Outbox::bounded(self.0.max_pending, send_window),
            abort,
            sock,
        )
        .counted_in(self.0.metrics.clone())
    }

    /// A batch for the broker's own messages: nothing it publishes is captured by a stream.
    pub fn batch(&self, cache: usize) -> Batch {
        Batch {
            d: self.clone(),
            cache: MatchCache::new(cache),
            wake: Wake::default(),
            counts: LocalCounts::default(),
            capture: None,
            perms: None,
        }
    }

    /// A batch for a front end: what it publishes is also stored by the stream capturing it.
    pub fn ingress(&self, streams: &Arc<Streams>, cache: usize) -> Batch {
        Batch {
            capture: Some(Capture {
                streams: streams.clone(),
                cache: CaptureCache::default(),
                pending: Pending::default(),
            }),
            ..self.batch(cache)
        }
    }

    /// Publishes one message of the broker's own (an API answer, a status)
    /// and gets it on its way at once. Returns how many subscriptions took it.
    pub fn publish_now(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<usize, PublishError> {
        let mut b = self.batch(1);
        let n = b.internal(&Outgoing::new(subject, None, headers, payload));
        b.finish();
        n
    }

    /// Adds a subscription of a client or an event stream.
    pub fn subscribe(
        &self,
        from: &Subscriber,
        outlet: &Arc<Outlet>,
        sid: u32,
        pattern: &str,
        queue: Option<&str>,
    ) -> Result<Arc<Subscription>, SubscribeError> {
        self.check_subscription(pattern, queue)?;
        if let Some(p) = from.perms {
            if !p.subscribe.allows_pattern(pattern) {
                return Err(SubscribeError::Denied(pattern.into()));
            }
        }
        // Only a pattern whose first token is literally `$SB`: `>` or
        // `*.API.>` may match the API's subjects but are ordinary patterns.
        if !from.api && is_reserved(pattern) {
            return Err(SubscribeError::Reserved(pattern.into()));
        }
        // How other accounts' subjects cross cluster routes: never a client's.
        if pattern.starts_with(crate::account::ROUTE_PREFIX) {
            return Err(SubscribeError::Reserved(pattern.into()));
        }
        // One task subscribes for an outlet; others only ever lower the count.
        let max = self.0.max_subscriptions;
        let held = outlet.subscriptions.fetch_add(1, Ordering::AcqRel);
        if max != 0 && held >= max {
            outlet.subscriptions.fetch_sub(1, Ordering::AcqRel);
            return Err(SubscribeError::TooMany { max });
        }
        let sc = &self.0.scope;
        let n = sc.subs.fetch_add(1, Ordering::AcqRel);
        if sc.max_subs != 0 && n >= sc.max_subs {
            sc.subs.fetch_sub(1, Ordering::AcqRel);
            outlet.subscriptions.fetch_sub(1, Ordering::AcqRel);
            return Err(SubscribeError::AccountTooMany {
                account: sc.name.clone(),
                max: sc.max_subs,
            });
        }
        let sub = Arc::new(Subscription::new(sid, pattern, queue, outlet.clone()));
        self.0.router.insert(sub.clone());
        Ok(sub)
    }

    /// Adds a peer broker's interest, held by the route it arrived on. The
    /// peer checked its own subscribers, `$SB.` interest is theirs to have,
    /// and so is `--max-subscriptions`: a peer announces one entry per
    /// distinct pattern its own (limited) connections and streams hold.
    pub fn subscribe_peer(
        &self,
        link: &Arc<Outlet>,
        sid: u32,
        pattern: &str,
        queue: Option<&str>,
    ) -> Result<Arc<Subscription>, SubscribeError> {
        self.check_subscription(pattern, queue)?;
        let sub = Arc::new(Subscription::new_peer(sid, pattern, queue, link.clone()));
        link.subscriptions.fetch_add(1, Ordering::AcqRel);
        self.0.router.insert(sub.clone());
        Ok(sub)
    }

    /// Ends a subscription; idempotent.
    pub fn unsubscribe(&self, sub: &Arc<Subscription>) {
        self.0.remove(sub);
    }

    fn check_subscription(&self, pattern: &str, queue: Option<&str>) -> Result<(), SubscribeError> {
        if let Err(e) = validate_pattern(pattern) {
            self.0
                .metrics
                .invalid_subjects
                .fetch_add(1, Ordering::Relaxed);
            return Err(SubscribeError::InvalidSubject(e));
        }
        if let Some(q) = queue {
            if q.len() > 255 || q.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(SubscribeError::InvalidQueue(q.into()));
            }
        }
        Ok(())
    }

    /// The largest payload a message may carry (`--max-payload`).
    pub fn max_payload(&self) -> usize {
        self.0.max_payload as usize
    }

    /// Counts a message refused for its size before it was even read (the
    /// native reader skips its bytes) and returns the error to report.
    pub fn too_large(&self, size: usize) -> PublishError {
        self.0
            .metrics
            .payload_too_large
            .fetch_add(1, Ordering::Relaxed);
        PublishError::PayloadTooLarge {
            size,
            max: self.0.max_payload,
        }
    }
}

/// A front end's stream capture: which stream takes a subject, and what this batch stores.
struct Capture {
    streams: Arc<Streams>,
    cache: CaptureCache,
    pending: Pending,
}

/// The outlets a batch queued to.
#[derive(Default)]
pub(crate) struct Wake {
    /// Made non-empty by this batch: kicked once at [`Batch::finish`].
    kick: Vec<Arc<Outlet>>,
    /// For a publisher that may go direct (`Batch::track_flushes`): every
    /// outlet it queued to whose bytes are not all in the kernel yet.
    touched: Option<Vec<Arc<Outlet>>>,
}

/// One producer's working state, reused across its messages.
pub(crate) struct Batch {
    d: Delivery,
    cache: MatchCache,
    /// Outlets this batch made non-empty (kicked once at [`Batch::finish`]),
    /// and, for a direct-delivery publisher, every outlet it queued to.
    wake: Wake,
    counts: LocalCounts,
    capture: Option<Capture>,
    /// A restricted user's publish permissions; None: may publish anywhere.
    perms: Option<PublishCheck>,
}

impl Batch {
    /// Checks every publish of this batch against a user's permissions.
    pub fn restrict(&mut self, check: Option<PublishCheck>) {
        self.perms = check;
    }

    pub fn delivery(&self) -> &Delivery {
        &self.d
    }

    /// Remembers every outlet this batch queues to until its bytes are in
    /// the kernel, for [`Batch::flushed`] (direct delivery's barrier).
    pub fn track_flushes(&mut self) {
        self.wake.touched.get_or_insert_with(Vec::new);
    }

    /// True when every message queued by this producer so far has been
    /// written into the kernel (checked at [`Batch::finish`]). Always false
    /// unless [`Batch::track_flushes`] was called.
    pub fn flushed(&mut self) -> bool {
        match &mut self.wake.touched {
            None => false,
            Some(t) => {
                t.retain(|o| !o.outbox.is_flushed());
                t.is_empty()
            }
        }
    }

    /// Publishes a message from a client (native or HTTP): checked, routed
    /// to subscribers and peers, and stored by the stream that captures its
    /// subject, whose ack goes where `ack` says: the reply subject only
    /// when the publisher asked for it ([`Ack::on_reply`]).
    pub fn publish(
        &mut self,
        from: &Publisher,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
        ack: Ack,
    ) -> Result<Published, PublishError> {
        let e = &*self.d.0;
        if payload.len() > e.max_payload as usize {
            return Err(self.d.too_large(payload.len()));
        }
        if let Some(r) = reply {
            if let Err(err) = validate_subject(r) {
                e.metrics.invalid_subjects.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::InvalidReply(err));
            }
        }
        if let Some(p) = &mut self.perms {
            if !p.allows(subject) {
                return Err(PublishError::Denied(subject.into()));
            }
        }
        if crate::jetstream::is_js(subject) {
            // JetStream's API and acks, on every front end that stores.
            if let Some(c) = &self.capture {
                crate::jetstream::handle(&c.streams, &self.d, subject, reply, headers, payload);
                return Ok(Published::default());
            }
        }
        if is_reserved(subject) {
            return match &self.capture {
                Some(c) if from.api => {
                    crate::streams::api::handle(&c.streams, &self.d, subject, reply, payload);
                    Ok(Published::default())
                }
                _ => Err(PublishError::Reserved(subject.into())),
            };
        }
        let m = match self.cache.get(&e.router, subject) {
            Ok(m) => m,
            Err(err) => {
                e.metrics.invalid_subjects.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::InvalidSubject(err));
            }
        };
        self.counts.msgs_in += 1;
        self.counts.bytes_in += payload.len() as u64;
        let on_reply = reply.is_some() && ack.on_reply(from);
        let msg = Outgoing {
            no_ack: reply.is_some() && !on_reply,
            ..Outgoing::new(subject, reply, headers, payload)
        };
        self.counts.subject(subject, msg.hash, payload.len());
        let skip = (!from.echo).then_some(from.id);
        let delivered = fan_out(e, m, &msg, skip, &mut self.wake, &mut self.counts);
        let (stored, answered) = match self.capture.as_mut() {
            Some(c) => match c.cache.get(&c.streams, subject) {
                Some(s) => {
                    let to = match (ack, reply) {
                        (Ack::Chan(tx), _) => AckTo::Chan(tx),
                        (Ack::Nats, Some(r)) => AckTo::Js(r.into()),
                        (_, Some(r)) if on_reply => AckTo::Reply(r.into()),
                        _ => AckTo::None,
                    };
                    let answered = matches!(to, AckTo::Reply(_) | AckTo::Js(_));
                    c.pending.add(&s, subject, to, headers, payload);
                    (true, answered)
                }
                None => (false, false),
            },
            None => (false, false),
        };
        // A stream that stores a request without acking it is no answer:
        // the requester hears "no responders" as without the stream.
        if delivered == 0 && !answered && from.no_responders {
            if let Some(r) = reply {
                self.no_responders(from.id, r);
            }
        }
        Ok(Published { stored })
    }

    /// Delivers a message that arrived over a cluster route: only to local
    /// subscriptions (never onward to other peers, so a full mesh cannot
    /// loop), to plain ones when the sender said so, and to one local member
    /// of each queue group it named. A plain copy is also stored here when a
    /// local stream captures it, and acked on `reply` when `ack` (the
    /// publisher asked for it).
    #[allow(clippy::too_many_arguments)]
    pub fn forwarded(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
        plain: bool,
        ack: bool,
        queues: &[u8],
    ) -> usize {
        let e = &*self.d.0;
        self.counts.msgs_in += 1;
        self.counts.bytes_in += payload.len() as u64;
        let Ok(m) = self.cache.get(&e.router, subject) else {
            return 0;
        };
        let msg = Outgoing::new(subject, reply, headers, payload);
        let (wake, counts) = (&mut self.wake, &mut self.counts);
        let mut n = 0;
        if plain {
            for s in m.plain.iter().filter(|s| !s.peer) {
                n += deliver(e, s, &msg, wake, counts) as usize;
            }
        }
        for q in frame::iter_queues(queues) {
            if let Some(g) = m.groups.iter().find(|g| &*g.name == q) {
                n += pick_local(e, g, g.start(), &msg, None, wake, counts) as usize;
            }
        }
        if plain {
            if let Some(c) = self.capture.as_mut() {
                // A replicated stream stores what its node's clients
                // publish; a copy forwarded to a subscriber here is not
                // stored again.
                if let Some(s) = c.cache.get(&c.streams, subject).filter(|s| s.replicas == 1) {
                    let to = match reply {
                        Some(r) if ack => AckTo::Reply(r.into()),
                        _ => AckTo::None,
                    };
                    c.pending.add(&s, subject, to, headers, payload);
                }
            }
        }
        n
    }

    /// Publishes one of the broker's own messages (an ack, an API answer, a
    /// status) to the subscribers of its subject, counted as a message in;
    /// never captured. Returns how many subscriptions took it.
    pub fn internal(&mut self, msg: &Outgoing<'_>) -> Result<usize, PublishError> {
        let e = &*self.d.0;
        if msg.payload.len() > e.max_payload as usize {
            return Err(PublishError::PayloadTooLarge {
                size: msg.payload.len(),
                max: e.max_payload,
            });
        }
        let m = self
            .cache
            .get(&e.router, msg.subject)
            .map_err(PublishError::InvalidSubject)?;
        self.counts.msgs_in += 1;
        self.counts.bytes_in += msg.payload.len() as u64;
        Ok(fan_out(e, m, msg, None, &mut self.wake, &mut self.counts))
    }

    /// Delivers a stored message again (a consumer's delivery) to `m`, what
    /// the pull's inbox matches (looked up once per round by the consumer),
    /// with the subject it was stored under. Not counted as a message in.
    /// Returns how many subscriptions took it.
    pub fn redeliver(&mut self, m: &Matches, msg: &Outgoing<'_>) -> usize {
        fan_out(&self.d.0, m, msg, None, &mut self.wake, &mut self.counts)
    }

    /// Tells a requester nobody listens: a status MSG to its own reply subscriptions.
    fn no_responders(&mut self, requester: u64, reply: &str) {
        let e = &*self.d.0;
        e.metrics.no_responders.fetch_add(1, Ordering::Relaxed);
        let (m, _) = e.router.compute(reply);
        let msg = Outgoing {
            flags: MSG_NO_RESPONDERS,
            ..Outgoing::new(reply, None, &[], &[])
        };
        for s in m
            .plain
            .iter()
            .chain(m.groups.iter().flat_map(|g| g.members.iter()))
        {
            if s.outlet.id == requester {
                deliver(e, s, &msg, &mut self.wake, &mut self.counts);
            }
        }
    }

    /// Queues `out` to be kicked with the rest of the batch (a PONG, credit that arrived).
    pub fn wake(&mut self, out: &Arc<Outlet>) {
        self.wake.kick.push(out.clone());
    }

    /// End of a batch: captured messages to their streams' writers, every
    /// outlet written to on its way, counters published.
    pub fn finish(&mut self) {
        if let Some(c) = self.capture.as_mut() {
            c.pending.flush();
        }
        for o in self.wake.kick.drain(..) {
            o.kick();
        }
        if let Some(t) = &mut self.wake.touched {
            // What is written into the kernel is in order ahead of anything
            // the kernel delivers directly afterwards.
            t.retain(|o| !o.outbox.is_flushed());
        }
        self.d.0.metrics.add(&mut self.counts);
    }

    /// A stream this batch stored to whose writer is behind: the producer
    /// waits on it before taking more (backpressure).
    pub fn backlogged(&mut self) -> Option<Arc<Stream>> {
        self.capture.as_mut().and_then(|c| c.pending.take_full())
    }

    /// Per-subject counts not yet merged into the broker's table, merged now
    /// (a front end whose batch goes away).
    pub fn close(&mut self) {
        self.finish();
        self.d
            .0
            .metrics
            .subjects
            .merge(&mut self.counts.subjects, true);
    }
}

/// Delivers a message published on this broker: to every plain local
/// subscription, to one member of each queue group (a local one when any can
/// take it), and at most once over each cluster route, carrying the plain
/// flag and the queue groups that peer should serve.
/// Returns how many subscriptions (or routes) took the message.
#[inline(always)]
fn fan_out(
    e: &Engine,
    m: &Matches,
    msg: &Outgoing<'_>,
    skip: Option<u64>,
    wake: &mut Wake,
    counts: &mut LocalCounts,
) -> usize {
    let mut n = 0;
    let mut remote: Vec<Remote<'_>> = Vec::new();
    for s in &m.plain {
        if s.peer {
            note_remote(&mut remote, s, None);
            continue;
        }
        if skip == Some(s.outlet.id) {
            continue;
        }
        n += deliver(e, s, msg, wake, counts) as usize;
    }
    for g in &m.groups {
        let start = g.start();
        if pick_local(e, g, start, msg, skip, wake, counts) {
            n += 1;
            continue;
        }
        // No local member could take it: one peer with members gets it.
        let len = g.members.len();
        if let Some(s) = (0..len)
            .map(|i| &g.members[(start + i) % len])
            .find(|s| s.peer && !s.is_removed())
        {
            note_remote(&mut remote, s, Some(&g.name));
        }
    }
    for r in &remote {
        n += forward(e, r, msg, wake, counts) as usize;
    }
    n
}

/// One member of a queue group on this broker, round-robin; false when no
/// local member could take the message.
fn pick_local(
    e: &Engine,
    g: &QueueGroup,
    start: usize,
    msg: &Outgoing<'_>,
    skip: Option<u64>,
    wake: &mut Wake,
    counts: &mut LocalCounts,
) -> bool {
    let len = g.members.len();
    for i in 0..len {
        let s = &g.members[(start + i) % len];
        if s.peer || skip == Some(s.outlet.id) {
            continue;
        }
        if deliver(e, s, msg, wake, counts) {
            return true;
        }
    }
    false
}

/// What one message owes one cluster route.
struct Remote<'a> {
    sub: &'a Arc<Subscription>,
    plain: bool,
    queues: Vec<&'a str>,
}

fn note_remote<'a>(remote: &mut Vec<Remote<'a>>, s: &'a Arc<Subscription>, queue: Option<&'a str>) {
    let i = match remote.iter().position(|r| r.sub.outlet.id == s.outlet.id) {
        Some(i) => i,
        None => {
            remote.push(Remote {
                sub: s,
                plain: false,
                queues: Vec::new(),
            });
            remote.len() - 1
        }
    };
    match queue {
        None => remote[i].plain = true,
        Some(q) => remote[i].queues.push(q),
    }
}

fn forward(
    e: &Engine,
    r: &Remote<'_>,
    msg: &Outgoing<'_>,
    wake: &mut Wake,
    counts: &mut LocalCounts,
) -> bool {
    if r.sub.is_removed() {
        return false;
    }
    let mut flags = if r.plain { frame::RMSG_PLAIN } else { 0 };
    if msg.no_ack {
        flags |= RMSG_NO_ACK;
    }
    // Another account's subject crosses with its account in front.
    let prefixed;
    let (subject, hash) = match &e.scope.route_prefix {
        None => (msg.subject, msg.hash),
        Some(p) => {
            prefixed = [&**p, msg.subject].concat();
            (&*prefixed, subject_hash(prefixed.as_bytes()))
        }
    };
    let len = frame::rmsg_frame_len(subject, msg.reply, &r.queues, msg.headers, msg.payload);
    let push = r.sub.outlet.outbox.push(len, |b| {
        frame::encode_rmsg(
            b,
            flags,
            subject,
            hash,
            msg.reply,
            &r.queues,
            msg.headers,
            msg.payload,
        )
    });
    if accepted(e, &r.sub.outlet, push, wake) {
        counts.msgs_out += 1;
        counts.bytes_out += msg.payload.len() as u64;
        true
    } else {
        false
    }
}

/// Common handling of a push into an outlet: wake its writer, or treat it
/// as a slow consumer when it is over budget.
#[inline(always)]
fn accepted(e: &Engine, out: &Arc<Outlet>, push: Push, wake: &mut Wake) -> bool {
    match push {
        Push::Queued { was_empty } => {
            if was_empty {
                wake.kick.push(out.clone());
            }
            if let Some(t) = &mut wake.touched {
                // A short list is searched; a long one (a fan-out) only
                // skips a repeat of the last outlet, and is pruned at finish.
                let dup = if t.len() <= 32 {
                    t.iter().any(|o| Arc::ptr_eq(o, out))
                } else {
                    t.last().is_some_and(|o| Arc::ptr_eq(o, out))
                };
                if !dup {
                    t.push(out.clone());
                }
            }
            true
        }
        Push::OverBudget => {
            e.metrics.dropped_messages.fetch_add(1, Ordering::Relaxed);
            out.overflow("outbound budget exceeded");
            false
        }
        Push::Closed => {
            e.metrics.dropped_messages.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// A MSG for a NATS subscription whose sid the client named with text.
#[cold]
fn nats_named(s: &Subscription, m: nats::Msg<'_>) -> Push {
    let names = s.outlet.sid_names.read().unwrap_or_else(|e| e.into_inner());
    let m = nats::Msg {
        sid_name: names.get(&s.sid).map(|n| &**n),
        ..m
    };
    s.outlet.outbox.push(m.len(), |b| nats::encode_msg(b, &m))
}

/// Queues one MSG frame for one subscription. False when it could not take it.
#[inline(always)]
fn deliver(
    e: &Engine,
    s: &Arc<Subscription>,
    msg: &Outgoing<'_>,
    wake: &mut Wake,
    counts: &mut LocalCounts,
) -> bool {
    if s.is_removed() {
        return false;
    }
    let Some(last) = s.claim() else { return false };
    let push = match s.outlet.codec {
        Codec::Native => {
            let len = message_frame_len(true, msg.subject, msg.reply, msg.headers, msg.payload);
            s.outlet.outbox.push(len, |b| {
                encode_msg(
                    b,
                    s.sid,
                    msg.flags,
                    msg.subject,
                    msg.hash,
                    msg.reply,
                    msg.headers,
                    msg.payload,
                )
            })
        }
        Codec::Nats => {
            let m = nats::Msg {
                subject: msg.subject,
                sid: s.sid,
                sid_name: None,
                reply: msg.reply,
                headers: msg.headers,
                payload: msg.payload,
                no_responders: msg.flags & MSG_NO_RESPONDERS != 0,
            };
            if s.sid >= crate::outlet::NAMED_SID {
                nats_named(s, m)
            } else {
                s.outlet.outbox.push(m.len(), |b| nats::encode_msg(b, &m))
            }
        }
    };
    if !accepted(e, &s.outlet, push, wake) {
        return false;
    }
    if let (Some(r), Some(reply)) = (&s.outlet.responses, msg.reply) {
        r.grant(reply);
    }
    counts.msgs_out += 1;
    counts.bytes_out += msg.payload.len() as u64;
    if last {
        e.remove(s);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use sockbus_protocol::FrameRef;

    const MAX_PAYLOAD: u32 = 1024;

    fn engine() -> Delivery {
        Delivery::new(Router::default(), Default::default(), MAX_PAYLOAD, 4096, 0)
    }

    fn outlet(d: &Delivery) -> Arc<Outlet> {
        Arc::new(d.outlet(d.next_id(), 1 << 20, CancellationToken::new(), None))
    }

    const NATIVE: Subscriber = Subscriber {
        api: true,
        perms: None,
    };

    fn client(out: &Outlet) -> Publisher {
        Publisher {
            id: out.id,
            echo: true,
            no_responders: false,
            api: false,
            explicit_acks: true,
        }
    }

    /// (sid, subject, flags, payload) of every MSG queued for `out`, and
    /// (flags, subject, queues) of every RMSG.
    #[allow(clippy::type_complexity)]
    fn received(
        out: &Outlet,
    ) -> (
        Vec<(u32, String, u8, Vec<u8>)>,
        Vec<(u8, String, Vec<String>)>,
    ) {
        let t = out.outbox.take();
        let mut data = &t.data[..];
        let (mut msgs, mut rmsgs) = (Vec::new(), Vec::new());
        while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
            data = &data[len..];
            match f {
                FrameRef::Msg {
                    sid,
                    flags,
                    subject,
                    payload,
                    ..
                } => msgs.push((sid, subject.into(), flags, payload.into())),
                FrameRef::RMsg {
                    flags,
                    subject,
                    queues,
                    ..
                } => rmsgs.push((
                    flags,
                    subject.into(),
                    frame::iter_queues(queues).map(String::from).collect(),
                )),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        (msgs, rmsgs)
    }

    fn msgs(out: &Outlet) -> Vec<(u32, String, u8, Vec<u8>)> {
        received(out).0
    }

    #[test]
    fn a_publish_reaches_every_plain_subscriber_and_one_member_of_each_queue_group() {
        let d = engine();
        let (a, b, q1, q2, publisher) =
            (outlet(&d), outlet(&d), outlet(&d), outlet(&d), outlet(&d));
        d.subscribe(&NATIVE, &a, 1, "orders.*", None).unwrap();
        d.subscribe(&NATIVE, &b, 2, "orders.>", None).unwrap();
        d.subscribe(&NATIVE, &q1, 3, "orders.eu", Some("workers"))
            .unwrap();
        d.subscribe(&NATIVE, &q2, 4, "orders.eu", Some("workers"))
            .unwrap();
        let mut batch = d.batch(16);
        for i in 0..10 {
            let p = batch
                .publish(
                    &client(&publisher),
                    "orders.eu",
                    None,
                    &[],
                    &[i],
                    Ack::Flags(0),
                )
                .unwrap();
            assert!(!p.stored);
        }
        batch.finish();
        assert_eq!(msgs(&a).len(), 10);
        assert_eq!(msgs(&b).len(), 10);
        let (n1, n2) = (msgs(&q1).len(), msgs(&q2).len());
        assert_eq!(n1 + n2, 10, "each message to exactly one member");
        assert!(n1 > 0 && n2 > 0, "round-robin uses both members: {n1}/{n2}");
        assert!(msgs(&publisher).is_empty());
        assert_eq!(d.metrics().msgs_in.load(Ordering::Relaxed), 10);
        assert_eq!(d.metrics().msgs_out.load(Ordering::Relaxed), 30);
    }

    #[test]
    fn without_echo_a_publisher_does_not_get_its_own_messages() {
        let d = engine();
        let me = outlet(&d);
        d.subscribe(&NATIVE, &me, 1, "x", None).unwrap();
        let mut batch = d.batch(16);
        let quiet = Publisher {
            echo: false,
            ..client(&me)
        };
        batch
            .publish(&quiet, "x", None, &[], b"1", Ack::Flags(0))
            .unwrap();
        batch
            .publish(&client(&me), "x", None, &[], b"2", Ack::Flags(0))
            .unwrap();
        batch.finish();
        let got: Vec<Vec<u8>> = msgs(&me).into_iter().map(|m| m.3).collect();
        assert_eq!(got, [b"2".to_vec()]);
    }

    #[test]
    fn a_request_nobody_receives_gets_a_no_responders_status_only_at_the_requester() {
        let d = engine();
        let (requester, other) = (outlet(&d), outlet(&d));
        d.subscribe(&NATIVE, &requester, 9, "_INBOX.r.*", None)
            .unwrap();
        d.subscribe(&NATIVE, &other, 1, "_INBOX.>", None).unwrap();
        let mut batch = d.batch(16);
        let from = Publisher {
            no_responders: true,
            ..client(&requester)
        };
        batch
            .publish(
                &from,
                "svc.nobody",
                Some("_INBOX.r.1"),
                &[],
                b"?",
                Ack::Flags(0),
            )
            .unwrap();
        batch.finish();
        let got = msgs(&requester);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].2), (9, MSG_NO_RESPONDERS));
        assert!(
            msgs(&other).is_empty(),
            "the status goes to the requester only"
        );
        assert_eq!(d.metrics().no_responders.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_publishes_are_refused_with_the_reason_and_counted() {
        let d = engine();
        let out = outlet(&d);
        let mut batch = d.batch(16);
        let from = client(&out);
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        assert!(matches!(
            batch.publish(&from, "a", None, &[], &big, Ack::Flags(0)),
            Err(PublishError::PayloadTooLarge {
                size: 1025,
                max: 1024
            })
        ));
        assert!(matches!(
            batch.publish(&from, "a.*", None, &[], b"", Ack::Flags(0)),
            Err(PublishError::InvalidSubject(_))
        ));
        assert!(matches!(
            batch.publish(&from, "a", Some("r. x"), &[], b"", Ack::Flags(0)),
            Err(PublishError::InvalidReply(_))
        ));
        assert!(matches!(
            batch.publish(&from, "$SB.API.STREAM.LIST", None, &[], b"", Ack::Flags(0)),
            Err(PublishError::Reserved(_))
        ));
        let m = d.metrics();
        assert_eq!(m.payload_too_large.load(Ordering::Relaxed), 1);
        assert_eq!(m.invalid_subjects.load(Ordering::Relaxed), 2);
        assert_eq!(
            m.msgs_in.load(Ordering::Relaxed),
            0,
            "nothing refused counts as in"
        );
    }

    #[test]
    fn bad_subscriptions_are_refused() {
        let d = engine();
        let out = outlet(&d);
        assert!(matches!(
            d.subscribe(&NATIVE, &out, 1, "a..b", None),
            Err(SubscribeError::InvalidSubject(_))
        ));
        assert!(matches!(
            d.subscribe(&NATIVE, &out, 1, "a", Some("has space")),
            Err(SubscribeError::InvalidQueue(_))
        ));
        assert_eq!(d.router().len(), 0);
    }

    #[test]
    fn subscriptions_beyond_the_limit_are_refused_until_one_ends() {
        let d = Delivery::new(Router::default(), Default::default(), MAX_PAYLOAD, 4096, 2);
        let (a, b, link, publisher) = (outlet(&d), outlet(&d), outlet(&d), outlet(&d));
        let first = d.subscribe(&NATIVE, &a, 1, "x", None).unwrap();
        let once = d.subscribe(&NATIVE, &a, 2, "y", None).unwrap();
        let e = d.subscribe(&NATIVE, &a, 3, "z", None).err().unwrap();
        assert!(matches!(e, SubscribeError::TooMany { max: 2 }), "{e:?}");
        assert!(e.to_string().contains("at most 2 subscriptions"), "{e}");
        // Per connection: another one has its own allowance.
        d.subscribe(&NATIVE, &b, 1, "z", None).unwrap();
        d.subscribe(&NATIVE, &b, 2, "z", None).unwrap();
        // A peer's interest is bounded by the peer's own limits.
        for sid in 0..5 {
            d.subscribe_peer(&link, sid, "p", None).unwrap();
        }

        // UNSUB frees a place...
        d.unsubscribe(&first);
        d.subscribe(&NATIVE, &a, 3, "z", None).unwrap();
        assert!(d.subscribe(&NATIVE, &a, 4, "z", None).is_err());
        // ...and so does a subscription that ends after its last message.
        assert!(!once.set_max(1));
        let mut batch = d.batch(16);
        batch
            .publish(&client(&publisher), "y", None, &[], b"m", Ack::Flags(0))
            .unwrap();
        batch.finish();
        assert_eq!(msgs(&a).len(), 1);
        d.subscribe(&NATIVE, &a, 4, "z", None).unwrap();
        assert!(d.subscribe(&NATIVE, &a, 5, "z", None).is_err());
        assert_eq!(d.router().len(), 2 + 2 + 5);
    }

    #[test]
    fn only_front_ends_with_the_api_may_subscribe_under_sb() {
        let d = engine();
        let out = outlet(&d);
        let http = Subscriber {
            api: false,
            perms: None,
        };
        for p in ["$SB.>", "$SB.API.>", "$SB.*", "$SB.ACK.s.c.1.1"] {
            assert!(
                matches!(
                    d.subscribe(&http, &out, 1, p, None),
                    Err(SubscribeError::Reserved(_))
                ),
                "{p}"
            );
            d.subscribe(&NATIVE, &out, 1, p, None).unwrap();
        }
        assert_eq!(d.router().len(), 4, "only the native ones");
        // Patterns that merely may match `$SB.` subjects are ordinary.
        for p in [">", "*", "*.API.>", "$SB", "x.$SB.>", "$SBX.>"] {
            d.subscribe(&http, &out, 1, p, None).unwrap();
        }
    }

    #[test]
    fn no_client_may_subscribe_where_other_accounts_cross_cluster_routes() {
        let d = engine();
        let out = outlet(&d);
        for p in ["$SB.ACC.shop.>", "$SB.ACC.shop.orders.new", "$SB.ACC.>"] {
            assert!(
                matches!(
                    d.subscribe(&NATIVE, &out, 1, p, None),
                    Err(SubscribeError::Reserved(_))
                ),
                "{p}"
            );
        }
        assert_eq!(d.router().len(), 0);
    }

    #[test]
    fn an_accounts_subscriptions_are_limited_together_and_freed_as_they_end() {
        let d = Delivery::scoped(
            Scope::new("shop", 2),
            Router::default(),
            Default::default(),
            MAX_PAYLOAD,
            4096,
            0,
        );
        let (a, b, link) = (outlet(&d), outlet(&d), outlet(&d));
        let first = d.subscribe(&NATIVE, &a, 1, "x", None).unwrap();
        d.subscribe(&NATIVE, &b, 1, "y", None).unwrap();
        let e = d.subscribe(&NATIVE, &b, 2, "z", None).err().unwrap();
        assert!(
            e.to_string()
                .contains(r#"account "shop" may hold at most 2"#),
            "{e}"
        );
        assert_eq!(b.subscriptions.load(Ordering::Acquire), 1, "not counted");
        // Peers' interest is not the account's clients'.
        d.subscribe_peer(&link, 1, "p", None).unwrap();
        d.unsubscribe(&first);
        d.subscribe(&NATIVE, &b, 2, "z", None).unwrap();
        assert_eq!(d.scope().subs.load(Ordering::Acquire), 2);
    }

    #[test]
    fn a_subscriber_over_its_budget_is_cut_off_and_the_others_keep_getting_messages() {
        let d = engine();
        let (slow, fine, publisher) = (outlet(&d), outlet(&d), outlet(&d));
        d.subscribe(&NATIVE, &slow, 1, "x", None).unwrap();
        d.subscribe(&NATIVE, &fine, 1, "x", None).unwrap();
        let mut batch = d.batch(16);
        let payload = [7u8; 512];
        for _ in 0..20 {
            batch
                .publish(&client(&publisher), "x", None, &[], &payload, Ack::Flags(0))
                .unwrap();
            // The fine subscriber drains as it goes; the slow one never does.
            let _ = fine.outbox.take();
        }
        batch.finish();
        assert!(
            slow.abort.is_cancelled(),
            "the slow consumer is disconnected"
        );
        assert_eq!(d.metrics().slow_consumers.load(Ordering::Relaxed), 1);
        assert!(d.metrics().dropped_messages.load(Ordering::Relaxed) > 0);
        assert!(!fine.abort.is_cancelled());
    }

    #[test]
    fn a_subscription_with_a_limit_ends_after_that_many_messages() {
        let d = engine();
        let (sub, publisher) = (outlet(&d), outlet(&d));
        let s = d.subscribe(&NATIVE, &sub, 1, "x", None).unwrap();
        assert!(!s.set_max(2));
        let mut batch = d.batch(16);
        for _ in 0..5 {
            batch
                .publish(&client(&publisher), "x", None, &[], b"m", Ack::Flags(0))
                .unwrap();
        }
        batch.finish();
        assert_eq!(msgs(&sub).len(), 2);
        assert_eq!(d.router().len(), 0, "removed once its limit was reached");
    }

    #[test]
    fn each_peer_gets_one_copy_carrying_the_plain_flag_and_the_queue_groups_it_serves() {
        let d = engine();
        let (link, publisher) = (outlet(&d), outlet(&d));
        // The peer has a plain subscriber and a queue group; both match.
        d.subscribe_peer(&link, 1, "orders.>", None).unwrap();
        d.subscribe_peer(&link, 2, "orders.*", None).unwrap();
        d.subscribe_peer(&link, 3, "orders.eu", Some("workers"))
            .unwrap();
        let mut batch = d.batch(16);
        batch
            .publish(
                &client(&publisher),
                "orders.eu",
                None,
                &[],
                b"m",
                Ack::Flags(0),
            )
            .unwrap();
        batch.finish();
        let (m, r) = received(&link);
        assert!(m.is_empty());
        assert_eq!(
            r,
            [(
                frame::RMSG_PLAIN,
                "orders.eu".into(),
                vec!["workers".into()]
            )]
        );

        // A local member of the group takes precedence over the peer's.
        let local = outlet(&d);
        d.subscribe(&NATIVE, &local, 1, "orders.eu", Some("workers"))
            .unwrap();
        batch
            .publish(
                &client(&publisher),
                "orders.eu",
                None,
                &[],
                b"m",
                Ack::Flags(0),
            )
            .unwrap();
        batch.finish();
        assert_eq!(msgs(&local).len(), 1);
        let (_, r) = received(&link);
        assert_eq!(r, [(frame::RMSG_PLAIN, "orders.eu".into(), vec![])]);
    }

    #[test]
    fn a_peer_is_told_when_a_request_did_not_ask_for_a_stream_ack() {
        let d = engine();
        let (link, publisher) = (outlet(&d), outlet(&d));
        d.subscribe_peer(&link, 1, ">", None).unwrap();
        let mut batch = d.batch(16);
        let legacy = Publisher {
            explicit_acks: false,
            ..client(&publisher)
        };
        for (from, flags, no_ack) in [
            (client(&publisher), 0, true),
            (client(&publisher), PUB_ACK, false),
            (legacy, 0, false),
        ] {
            batch
                .publish(
                    &from,
                    "svc",
                    Some("_INBOX.r.1"),
                    &[],
                    b"?",
                    Ack::Flags(flags),
                )
                .unwrap();
            batch.finish();
            let (_, r) = received(&link);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].0 & RMSG_NO_ACK != 0, no_ack, "flags {flags}");
        }
        // Without a reply subject there is nothing to ack: the frame is as before.
        batch
            .publish(&client(&publisher), "x", None, &[], b"m", Ack::Flags(0))
            .unwrap();
        batch.finish();
        assert_eq!(received(&link).1[0].0, frame::RMSG_PLAIN);
    }

    #[test]
    fn a_forwarded_message_reaches_local_subscribers_only_never_another_peer() {
        let d = engine();
        let (link, local, q) = (outlet(&d), outlet(&d), outlet(&d));
        d.subscribe_peer(&link, 1, ">", None).unwrap();
        d.subscribe(&NATIVE, &local, 1, "a", None).unwrap();
        d.subscribe(&NATIVE, &q, 2, "a", Some("g")).unwrap();
        let mut batch = d.batch(16);
        assert_eq!(batch.forwarded("a", None, &[], b"m", true, false, &[]), 1);
        // The queue block of an RMSG naming group "g".
        let mut b = bytes::BytesMut::new();
        frame::encode_rmsg(&mut b, 0, "a", subject_hash(b"a"), None, &["g"], &[], b"m");
        let Ok(Some((FrameRef::RMsg { queues, .. }, _))) = frame::decode(&b, u32::MAX) else {
            panic!("an RMSG");
        };
        assert_eq!(
            batch.forwarded("a", None, &[], b"m", false, false, queues),
            1
        );
        batch.finish();
        assert_eq!(msgs(&local).len(), 1, "plain only when the sender said so");
        assert_eq!(msgs(&q).len(), 1, "the group the sender named");
        assert_eq!(received(&link), (vec![], vec![]), "never onward to a peer");
    }

    #[test]
    fn the_brokers_own_messages_go_to_the_subscribers_of_their_target() {
        let d = engine();
        let inbox = outlet(&d);
        d.subscribe(&NATIVE, &inbox, 5, "_INBOX.c.1", None).unwrap();
        let mut batch = d.batch(4);
        let stored = Outgoing {
            reply: Some("$SB.ACK.S.c.1.1"),
            ..Outgoing::new("orders.eu", None, &[], b"stored")
        };
        let (m, _) = d.router().compute("_INBOX.c.1");
        assert_eq!(batch.redeliver(&m, &stored), 1);
        batch.finish();
        let got = msgs(&inbox);
        assert_eq!(
            got[0].1, "orders.eu",
            "delivered with the subject it was stored under"
        );
        assert_eq!(d.publish_now("_INBOX.c.1", &[], b"ack").unwrap(), 1);
        assert_eq!(
            d.metrics().msgs_in.load(Ordering::Relaxed),
            1,
            "only the new message counts as in"
        );
    }
}
