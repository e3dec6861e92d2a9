//! Users and what they may do: who a connection is (CONNECT credentials, an
//! HTTP `Authorization` header) and the permissions that follow it.
//!
//! Passwords and tokens are argon2 PHC strings (`sockbus passwd`) or plain
//! text (accepted with a warning). Verifying argon2 is slow on purpose, so it
//! runs on the blocking pool, at most [`VERIFY_AT_ONCE`] at a time (a flood
//! of bad CONNECTs waits there, inside each connection's handshake timeout,
//! and never holds a runtime worker); successful verifications are cached,
//! keyed by a keyed hash of the credentials, so a reconnect storm of good
//! clients costs one hash each.

pub mod cert;
pub mod check;
pub mod live;
pub mod perm;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use serde::Deserialize;
use sockbus_protocol::Credentials;
use tokio::sync::Semaphore;

pub use perm::{Permissions, Rule};

/// argon2 verifications running at once; the rest wait.
pub const VERIFY_AT_ONCE: usize = 2;
/// Successful verifications remembered.
const CACHE: usize = 4096;
/// The account of users that name none.
pub const DEFAULT_ACCOUNT: &str = "$default";

/// One `[[users]]` table of the config file, as written.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserConfig {
    pub name: String,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Named by a verified client certificate instead (`CN=...`, `DNS=...`,
    /// `email=...`, `URI=...`; auth/cert.rs).
    pub certificate: Option<String>,
    pub account: Option<String>,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    pub publish_deny: Option<Vec<String>>,
    pub subscribe_deny: Option<Vec<String>>,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// A password or token as the config holds it.
enum Secret {
    /// An argon2 PHC string, checked to parse at start.
    Hash(String),
    Plain(Vec<u8>),
    /// None: the user is named by a client certificate.
    Certificate,
}

impl Secret {
    fn parse(user: &str, what: &str, s: &str) -> anyhow::Result<(Secret, bool)> {
        if s.starts_with("$argon2") {
            let ph = PasswordHash::new(s).map_err(|e| {
                anyhow::anyhow!(
                    "user {user:?}: {what} looks like an argon2 hash but does not parse: {e}"
                )
            })?;
            if ph.hash.is_none() || ph.salt.is_none() {
                bail!("user {user:?}: {what} looks like an argon2 hash but does not parse: no salt or hash (use `sockbus passwd`)");
            }
            Ok((Secret::Hash(s.to_string()), false))
        } else if s.is_empty() {
            bail!("user {user:?}: empty {what}")
        } else {
            Ok((Secret::Plain(s.as_bytes().to_vec()), true))
        }
    }

    /// Checks `given`, on the blocking pool when it takes argon2.
    async fn verify(&self, given: &[u8], gate: &Semaphore) -> bool {
        match self {
            Secret::Plain(p) => constant_time_eq(p, given),
            Secret::Certificate => false,
            Secret::Hash(h) => {
                let Ok(_permit) = gate.acquire().await else {
                    return false;
                };
                let (h, given) = (h.clone(), given.to_vec());
                tokio::task::spawn_blocking(move || {
                    PasswordHash::new(&h)
                        .is_ok_and(|ph| Argon2::default().verify_password(&given, &ph).is_ok())
                })
                .await
                .unwrap_or(false)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A configured user.
pub struct User {
    pub name: String,
    pub account: String,
    secret: Secret,
    /// None: may publish and subscribe to everything.
    pub perms: Option<Arc<Permissions>>,
    /// Publishes refused by a permission.
    pub denied_publish: AtomicU64,
    /// Subscriptions refused by a permission.
    pub denied_subscribe: AtomicU64,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// Why credentials were refused; the text goes to the log and the client,
/// never with a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authorization failed: no credentials")]
    Missing,
    #[error("authorization failed: unknown user or wrong password for {0:?}")]
    BadPassword(String),
    #[error("authorization failed: unknown token")]
    BadToken,
    #[error("authorization failed: malformed credentials")]
    Malformed,
    #[error("authorization failed: not verified within the handshake timeout")]
    TimedOut,
    #[error("authorization failed: the client certificate ({0}) names no user")]
    UnknownCertificate(String),
    #[error("authorization failed: the client certificate names more than one user ({0}): send credentials")]
    AmbiguousCertificate(String),
}

/// Every configured user, and the verification gate and cache.
pub struct Users {
    by_name: HashMap<String, Arc<User>>,
    /// Users with a token, in config order (a token names no user).
    tokens: Vec<Arc<User>>,
    /// Users named by a client certificate, by that name.
    certs: HashMap<cert::CertName, Arc<User>>,
    /// Users in config order, for `/metrics`.
    all: Vec<Arc<User>>,
    /// Users whose password or token is plain text (warned about at start).
    pub plain_text: Vec<String>,
    gate: Semaphore,
    cache: Mutex<lru::LruCache<u64, (u64, Arc<User>)>>,
    keys: (RandomState, RandomState),
    /// Credentials refused.
    pub failures: AtomicU64,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.all.iter().map(|u| &u.name))
            .finish()
    }
}

fn patterns(user: &str, key: &str, v: Option<Vec<String>>) -> anyhow::Result<Option<Vec<String>>> {
    if let Some(v) = &v {
        for p in v {
            sockbus_protocol::validate_pattern(p)
                .with_context(|| format!("user {user:?}: bad pattern {p:?} in {key}"))?;
        }
    }
    Ok(v)
}

impl Users {
    /// Validates the `[[users]]` tables: a name, exactly one of password,
    /// token or certificate, valid patterns, no name, plain token or
    /// certificate name twice.
    pub fn from_config(list: Vec<UserConfig>) -> anyhow::Result<Users> {
        let mut by_name = HashMap::new();
        let mut tokens = Vec::new();
        let mut certs = HashMap::new();
        let mut all = Vec::new();
        let mut plain_text = Vec::new();
        for u in list {
            let name = u.name.clone();
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
                bail!("[[users]]: name {name:?} must be non-empty, without spaces");
            }
            if by_name.contains_key(&name) {
                bail!("[[users]]: user {name:?} is configured twice");
            }
            let mut cert_name = None;
            let (secret, is_token, plain) = match (&u.password, &u.token, &u.certificate) {
                (Some(p), None, None) => {
                    let (s, plain) = Secret::parse(&name, "password", p)?;
                    (s, false, plain)
                }
                (None, Some(t), None) => {
                    let (s, plain) = Secret::parse(&name, "token", t)?;
                    (s, true, plain)
                }
                (None, None, Some(c)) => {
                    let c = cert::CertName::parse(&name, c)?;
                    if let Some(o) = certs.get(&c).map(|o: &Arc<User>| &o.name) {
                        bail!("user {name:?}: certificate {c} already names user {o:?}");
                    }
                    cert_name = Some(c);
                    (Secret::Certificate, false, false)
                }
                _ => bail!("user {name:?}: give exactly one of password, token or certificate"),
            };
            if plain {
                plain_text.push(name.clone());
            }
            if let (true, Secret::Plain(t)) = (is_token, &secret) {
                let dup = tokens
                    .iter()
                    .any(|o: &Arc<User>| matches!(&o.secret, Secret::Plain(p) if p == t));
                if dup {
                    bail!("user {name:?}: the same token is given to another user");
                }
            }
            let rule = |allow, deny| -> anyhow::Result<Rule> {
                Ok(Rule {
                    allow: patterns(&name, "allow list", allow)?,
                    deny: patterns(&name, "deny list", deny)?.unwrap_or_default(),
                })
            };
            let p = Permissions {
                publish: rule(u.publish, u.publish_deny)?,
                subscribe: rule(u.subscribe, u.subscribe_deny)?,
            };
            let account = u.account.unwrap_or_else(|| DEFAULT_ACCOUNT.into());
            if !crate::config::valid_account_name(&account) {
                bail!("user {name:?}: account {account:?} must be 1 to 64 letters, digits, '-' or '_'");
            }
            let user = Arc::new(User {
                name: name.clone(),
                account,
                secret,
                perms: (!(p.publish.is_open() && p.subscribe.is_open())).then(|| Arc::new(p)),
                denied_publish: AtomicU64::new(0),
                denied_subscribe: AtomicU64::new(0),
            });
            if is_token {
                tokens.push(user.clone());
            }
            if let Some(c) = cert_name {
                certs.insert(c, user.clone());
            }
            by_name.insert(name, user.clone());
            all.push(user);
        }
        Ok(Users {
            by_name,
            tokens,
            certs,
            all,
            plain_text,
            gate: Semaphore::new(VERIFY_AT_ONCE),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHE).expect("non-zero"),
            )),
            keys: (RandomState::new(), RandomState::new()),
            failures: AtomicU64::new(0),
        })
    }

    /// Keeps the counters of `old` (a reload): refusals, and each user's
    /// denials under the same name.
    pub fn carry_counters(&self, old: &Users) {
        self.failures
            .fetch_add(old.failures.load(Ordering::Relaxed), Ordering::Relaxed);
        for u in &self.all {
            if let Some(o) = old.by_name.get(&u.name) {
                u.denied_publish
                    .fetch_add(o.denied_publish.load(Ordering::Relaxed), Ordering::Relaxed);
                u.denied_subscribe.fetch_add(
                    o.denied_subscribe.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// True when some user is named by a client certificate.
    pub fn has_certificate_users(&self) -> bool {
        !self.certs.is_empty()
    }

    /// The user a verified client certificate names (auth/cert.rs): the one
    /// user whose `certificate` is among its names; refused when none is,
    /// or when its names point at more than one user.
    pub fn authenticate_cert(&self, names: &cert::CertNames) -> Result<Arc<User>, AuthError> {
        let mut found: Option<&Arc<User>> = None;
        for n in &names.0 {
            let Some(u) = self.certs.get(n) else { continue };
            match found {
                Some(f) if !Arc::ptr_eq(f, u) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(AuthError::AmbiguousCertificate(format!(
                        "{:?}, {:?}",
                        f.name, u.name
                    )));
                }
                _ => found = Some(u),
            }
        }
        found.cloned().ok_or_else(|| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            AuthError::UnknownCertificate(names.summary())
        })
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every user, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<User>> {
        self.all.iter()
    }

    fn cache_key(&self, c: &Credentials<'_>) -> (u64, u64) {
        let h = |k: &RandomState| match c {
            Credentials::UserPassword { user, password } => k.hash_one((1u8, user, password)),
            Credentials::Token(t) => k.hash_one((2u8, t)),
            Credentials::None => 0,
        };
        (h(&self.keys.0), h(&self.keys.1))
    }

    /// The user these credentials name, or why not.
    pub async fn authenticate(&self, c: Credentials<'_>) -> Result<Arc<User>, AuthError> {
        let r = self.check(c).await;
        if r.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn check(&self, c: Credentials<'_>) -> Result<Arc<User>, AuthError> {
        if c == Credentials::None {
            return Err(AuthError::Missing);
        }
        let (key, check) = self.cache_key(&c);
        if let Some((k, u)) = self.cache.lock().expect("poisoned").get(&key) {
            if *k == check {
                return Ok(u.clone());
            }
        }
        let found = match c {
            Credentials::None => unreachable!("checked above"),
            Credentials::UserPassword { user, password } => {
                match self
                    .by_name
                    .get(user)
                    .filter(|u| !self.tokens.iter().any(|t| Arc::ptr_eq(t, u)))
                {
                    Some(u) if u.secret.verify(password, &self.gate).await => u.clone(),
                    _ => return Err(AuthError::BadPassword(user.to_string())),
                }
            }
            Credentials::Token(t) => {
                let mut found = None;
                for u in &self.tokens {
                    if u.secret.verify(t, &self.gate).await {
                        found = Some(u.clone());
                        break;
                    }
                }
                found.ok_or(AuthError::BadToken)?
            }
        };
        self.cache
            .lock()
            .expect("poisoned")
            .put(key, (check, found.clone()));
        Ok(found)
    }
}

/// `$SB.` API subjects every user may publish to: the stream list, which
/// `sockbus pub` and the SDK's durable publish read to find the stream that
/// stores a subject (it shows stream names and subjects, never messages).
/// Every other API subject needs a publish permission on it.
pub fn is_open_api(subject: &str) -> bool {
    subject == sockbus_protocol::api::subject::STREAM_LIST
}

/// An argon2id PHC string of `secret` with a random salt (`sockbus passwd`).
pub fn hash_secret(secret: &[u8]) -> anyhow::Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret, &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(list: Vec<UserConfig>) -> anyhow::Result<Users> {
        Users::from_config(list)
    }

    #[tokio::test]
    async fn hashed_and_plain_passwords_and_tokens_verify_and_wrong_ones_do_not() {
        let hashed = hash_secret(b"pw").unwrap();
        assert!(hashed.starts_with("$argon2id$"), "{hashed}");
        let u = users(vec![
            UserConfig {
                name: "a".into(),
                password: Some(hashed),
                ..Default::default()
            },
            UserConfig {
                name: "b".into(),
                password: Some("plain".into()),
                ..Default::default()
            },
            UserConfig {
                name: "ci".into(),
                token: Some(hash_secret(b"tok").unwrap()),
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(u.plain_text, ["b"]);
        let up = |user, password| Credentials::UserPassword { user, password };
        for _ in 0..2 {
            assert_eq!(u.authenticate(up("a", b"pw")).await.unwrap().name, "a");
        }
        assert_eq!(u.authenticate(up("b", b"plain")).await.unwrap().name, "b");
        assert_eq!(
            u.authenticate(Credentials::Token(b"tok"))
                .await
                .unwrap()
                .name,
            "ci"
        );
        assert!(u.authenticate(up("a", b"nope")).await.is_err());
        assert!(u.authenticate(up("nobody", b"pw")).await.is_err());
        assert!(
            u.authenticate(up("ci", b"tok")).await.is_err(),
            "a token user has no password"
        );
        assert_eq!(
            u.authenticate(Credentials::None).await.unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(u.failures.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn bad_user_tables_are_refused_with_a_clear_error() {
        let pw = |name: &str| UserConfig {
            name: name.into(),
            password: Some("x".into()),
            ..Default::default()
        };
        let err = |l| format!("{:#}", users(l).unwrap_err());
        assert!(err(vec![pw("a"), pw("a")]).contains("configured twice"));
        assert!(err(vec![UserConfig {
            name: "a".into(),
            ..Default::default()
        }])
        .contains("exactly one of password, token or certificate"));
        let e = err(vec![UserConfig {
            publish: Some(vec!["a..b".into()]),
            ..pw("a")
        }]);
        assert!(e.contains("bad pattern \"a..b\""), "{e}");
        let e = err(vec![UserConfig {
            password: Some("$argon2id$garbage".into()),
            ..pw("a")
        }]);
        assert!(e.contains("does not parse"), "{e}");
        let cert = |name: &str, c: &str| UserConfig {
            name: name.into(),
            certificate: Some(c.into()),
            ..Default::default()
        };
        let e = err(vec![cert("a", "CN=x"), cert("b", "cn=x")]);
        assert!(e.contains("already names user \"a\""), "{e}");
        let e = err(vec![UserConfig {
            password: Some("x".into()),
            ..cert("a", "CN=x")
        }]);
        assert!(e.contains("exactly one of"), "{e}");
    }

    #[tokio::test]
    async fn a_certificate_names_its_user_and_no_other_way_in() {
        use cert::{CertName, CertNames, Field};
        let u = users(vec![
            UserConfig {
                name: "orders".into(),
                certificate: Some("CN=orders-svc".into()),
                ..Default::default()
            },
            UserConfig {
                name: "billing".into(),
                certificate: Some("DNS=Billing.Shop.svc".into()),
                ..Default::default()
            },
        ])
        .unwrap();
        let names = |l: &[(Field, &str)]| {
            CertNames(
                l.iter()
                    .map(|(f, v)| CertName::parse("t", &format!("{f:?}={v}")).unwrap())
                    .collect(),
            )
        };
        let by = |l: &[(Field, &str)]| u.authenticate_cert(&names(l)).map(|u| u.name.clone());
        assert_eq!(by(&[(Field::Cn, "orders-svc")]).unwrap(), "orders");
        assert_eq!(
            by(&[(Field::Cn, "x"), (Field::Dns, "billing.shop.SVC")]).unwrap(),
            "billing"
        );
        assert!(matches!(
            by(&[(Field::Dns, "orders-svc")]),
            Err(AuthError::UnknownCertificate(_))
        ));
        assert!(matches!(
            by(&[(Field::Cn, "orders-svc"), (Field::Dns, "billing.shop.svc")]),
            Err(AuthError::AmbiguousCertificate(_))
        ));
        assert!(
            u.authenticate(Credentials::UserPassword {
                user: "orders",
                password: b""
            })
            .await
            .is_err(),
            "a certificate user has no password"
        );
    }
}
