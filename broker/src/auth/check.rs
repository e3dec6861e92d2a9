//! The per-connection side of permissions: the publish check with its cache,
//! and the replies a user may send without a publish permission
//! (allow_responses).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tracing::{debug, warn};

use super::{Permissions, User};

/// Subjects whose verdict one connection remembers; then it starts afresh.
const CACHE: usize = 4096;
/// Requests one connection may have unanswered at once; beyond that one of
/// them (expired ones first) loses its permission.
pub const MAX_RESPONSES: usize = 4096;
/// How long a received request may be answered.
pub const RESPONSE_TTL: Duration = Duration::from_secs(120);

/// Reply subjects of requests a connection received: each may be published
/// to once, within [`RESPONSE_TTL`], whatever the publish permissions say.
#[derive(Default)]
pub struct Responses {
    open: Mutex<FxHashMap<Box<str>, Instant>>,
}

impl Responses {
    /// A request with this reply subject was delivered.
    pub fn grant(&self, reply: &str) {
        let mut m = self.open.lock().expect("poisoned");
        if m.len() >= MAX_RESPONSES {
            let now = Instant::now();
            m.retain(|_, t| *t > now);
            if m.len() >= MAX_RESPONSES {
                if let Some(k) = m.keys().next().cloned() {
                    m.remove(&k);
                }
            }
        }
        m.insert(reply.into(), Instant::now() + RESPONSE_TTL);
    }

    /// Uses the permission to answer on `subject`, if there is one.
    pub fn take(&self, subject: &str) -> bool {
        let mut m = self.open.lock().expect("poisoned");
        m.remove(subject).is_some_and(|t| t > Instant::now())
    }
}

/// A restricted user's publish check, one per connection.
pub struct PublishCheck {
    user: Arc<User>,
    perms: Arc<Permissions>,
    cache: FxHashMap<Box<str>, bool>,
    responses: Option<Arc<Responses>>,
}

impl PublishCheck {
    /// None when the user may publish everywhere.
    pub fn new(user: &Arc<User>, responses: Option<Arc<Responses>>) -> Option<Self> {
        let perms = user.perms.clone()?;
        if perms.publish.is_open() {
            return None;
        }
        Some(PublishCheck {
            user: user.clone(),
            perms,
            cache: FxHashMap::default(),
            responses,
        })
    }

    pub fn user(&self) -> &Arc<User> {
        &self.user
    }

    /// May this connection publish to `subject` (a literal subject)? A
    /// repeated subject costs one hash lookup; a denial is counted per user
    /// and logged the first time per connection and subject.
    pub fn allows(&mut self, subject: &str) -> bool {
        if let Some(&ok) = self.cache.get(subject) {
            if ok {
                return true;
            }
            if self.answers(subject) {
                return true;
            }
            self.user
                .denied_publish
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(user = %self.user.name, "publish denied");
            return false;
        }
        let ok = self.perms.publish.allows_subject(subject) || crate::auth::is_open_api(subject);
        if !ok && self.answers(subject) {
            // One-time reply subjects stay out of the cache.
            return true;
        }
        if self.cache.len() >= CACHE {
            self.cache.clear();
        }
        self.cache.insert(subject.into(), ok);
        if !ok {
            self.user
                .denied_publish
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(user = %self.user.name, subject, "publish denied by permissions");
        }
        ok
    }

    fn answers(&self, subject: &str) -> bool {
        self.responses.as_ref().is_some_and(|r| r.take(subject))
    }
}
