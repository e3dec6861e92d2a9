//! Accounts: separate subject spaces and stream sets on one broker.
//!
//! Each account has a delivery engine of its own (its own router: nothing
//! published in one account can match a subscription of another) and its
//! own streams (names are per account; the default account's live where
//! they always did, `<data-dir>/streams`, another's under
//! `<data-dir>/accounts/<name>/streams`). A connection is bound to its
//! user's account at CONNECT and from then on only ever talks to that
//! account's engine and streams, so isolation needs no check per message:
//! the default account's hot path is exactly what it was.
//!
//! On cluster routes an account other than the default carries its name in
//! front of every subject and pattern (`$SB.ACC.<name>.`, [`ROUTE_PREFIX`]);
//! the receiving broker takes it off and hands the rest to that account.
//!
//! The set of accounts is fixed at start: the default, every account named
//! by a user and every `[[accounts]]` table.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::{User, DEFAULT_ACCOUNT};
use crate::cluster::PeerInterest;
use crate::config::{AccountLimits, Config};
use crate::deliver::{Delivery, Scope};
use crate::metrics::Metrics;
use crate::router::{InterestHook, Router};
use crate::store::FileCache;
use crate::streams::{StreamLimits, Streams};

/// What an account's subjects and patterns start with on cluster routes.
pub(crate) const ROUTE_PREFIX: &str = "$SB.ACC.";

/// One account: its engine, its streams, its limits.
pub(crate) struct Account {
    pub limits: AccountLimits,
    pub delivery: Delivery,
    pub streams: Arc<Streams>,
    /// Native client connections now.
    connections: AtomicUsize,
}

/// A connection's place under its account's `max-connections`; given back
/// when dropped.
pub(crate) struct Slot(Arc<Account>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Account {
    pub fn name(&self) -> &str {
        &self.limits.name
    }

    /// A place for one more connection, or the error its client gets.
    pub fn connect(self: &Arc<Self>) -> Result<Slot, String> {
        let n = self.connections.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.clone());
        match self.limits.max_connections {
            Some(max) if n >= max => Err(format!(
                "account {:?} is at its connection limit of {max} (max-connections of its [[accounts]] table)",
                self.name()
            )),
            _ => Ok(slot),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Subscriptions of the account's clients now.
    pub fn subscriptions(&self) -> usize {
        self.delivery.scope().subs.load(Ordering::Acquire)
    }
}

/// Every account of the broker.
pub(crate) struct Accounts {
    default: Arc<Account>,
    by_name: HashMap<String, Arc<Account>>,
    /// Sorted by name, the default first: `/metrics` and the status page.
    all: Vec<Arc<Account>>,
}

/// Tells cluster peers of an account's interest: its patterns with the
/// account in front.
struct AccountInterest {
    prefix: Box<str>,
    peers: Arc<PeerInterest>,
}

impl InterestHook for AccountInterest {
    fn added(&self, pattern: &str, queue: Option<&str>) {
        self.peers.added(&[&*self.prefix, pattern].concat(), queue);
    }

    fn removed(&self, pattern: &str, queue: Option<&str>) {
        self.peers
            .removed(&[&*self.prefix, pattern].concat(), queue);
    }
}

impl Accounts {
    /// Builds every account's engine and opens its streams. `peers` is
    /// told of local interest when the broker has a cluster port.
    pub fn open(
        config: &Config,
        metrics: &Arc<Metrics>,
        peers: &Arc<PeerInterest>,
        open_files: usize,
    ) -> anyhow::Result<Accounts> {
        let mut names: Vec<String> = vec![DEFAULT_ACCOUNT.to_string()];
        names.extend(config.accounts.iter().map(|a| a.name.clone()));
        if let Some(users) = &config.users {
            names.extend(users.iter().map(|u| u.account.clone()));
        }
        names.sort();
        names.dedup();
        let mut files: Option<Arc<FileCache>> = None;
        let mut by_name = HashMap::new();
        let mut all = Vec::new();
        for name in names {
            let limits = config
                .accounts
                .iter()
                .find(|a| a.name == name)
                .cloned()
                .unwrap_or_else(|| AccountLimits {
                    name: name.clone(),
                    ..Default::default()
                });
            let scope = Scope::new(&name, limits.max_subscriptions.unwrap_or(0));
            let hook: Option<Arc<dyn InterestHook>> = match (&scope.route_prefix, config.cluster) {
                (_, None) => None,
                (None, Some(_)) => Some(peers.clone()),
                (Some(prefix), Some(_)) => Some(Arc::new(AccountInterest {
                    prefix: prefix.clone(),
                    peers: peers.clone(),
                })),
            };
            let delivery = Delivery::scoped(
                scope,
                Router::new(hook.clone()),
                metrics.clone(),
                config.max_payload,
                config.max_pending,
                config.max_subscriptions,
            );
            let default = name == DEFAULT_ACCOUNT;
            let dir = if default {
                config.data_dir.clone()
            } else {
                account_dir(&config.data_dir, &name)
            };
            let has_table = config.accounts.iter().any(|a| a.name == name);
            let streams = Arc::new(
                Streams::open_with(
                    &dir,
                    delivery.clone(),
                    hook,
                    StreamLimits {
                        max_streams: config.max_streams,
                        open_files,
                        files: files.clone(),
                        account: has_table
                            .then(|| (name.clone(), limits.max_streams, limits.max_stored_bytes)),
                    },
                )
                .map_err(|e| anyhow::anyhow!("account {name:?}: {e:#}"))?,
            );
            files.get_or_insert_with(|| streams.files());
            let a = Arc::new(Account {
                limits,
                delivery,
                streams,
                connections: AtomicUsize::new(0),
            });
            by_name.insert(name, a.clone());
            all.push(a);
        }
        let default = by_name[DEFAULT_ACCOUNT].clone();
        // The default first, the others by name.
        all.sort_by_key(|a| (a.name() != DEFAULT_ACCOUNT, a.name().to_string()));
        Ok(Accounts {
            default,
            by_name,
            all,
        })
    }

    pub fn default_account(&self) -> &Arc<Account> {
        &self.default
    }

    /// The account of `user`; the default without one (no users configured).
    pub fn of(&self, user: Option<&User>) -> &Arc<Account> {
        match user {
            Some(u) => self.by_name.get(&u.account).unwrap_or(&self.default),
            None => &self.default,
        }
    }

    /// An account by name (from a cluster route).
    pub fn get(&self, name: &str) -> Option<&Arc<Account>> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> &[Arc<Account>] {
        &self.all
    }
}

/// Where an account other than the default keeps its streams.
pub(crate) fn account_dir(data_dir: &Path, name: &str) -> std::path::PathBuf {
    data_dir.join("accounts").join(name)
}

/// Splits `$SB.ACC.<account>.<rest>` (a subject or pattern from a cluster
/// route) into the account and the rest; None for the default account's.
pub(crate) fn split_route_subject(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix(ROUTE_PREFIX)?;
    let (account, subject) = rest.split_once('.')?;
    (!account.is_empty() && !subject.is_empty()).then_some((account, subject))
}

/// Per-account figures for `/metrics` and the status page. Account names are
/// the only label.
pub(crate) struct AccountMetrics(pub Arc<Accounts>);

impl crate::metrics::Source for AccountMetrics {
    fn name(&self) -> &'static str {
        "accounts"
    }

    fn prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        type Figure = (&'static str, &'static str, fn(&Account) -> u64);
        let figures: [Figure; 4] = [
            (
                "sockbus_account_connections",
                "Native client connections of the account.",
                |a| a.connections() as u64,
            ),
            (
                "sockbus_account_subscriptions",
                "Subscriptions of the account's clients.",
                |a| a.subscriptions() as u64,
            ),
            (
                "sockbus_account_streams",
                "Durable streams of the account.",
                |a| a.streams.count() as u64,
            ),
            (
                "sockbus_account_stored_bytes",
                "Bytes stored in the account's streams.",
                |a| a.streams.stored_bytes(),
            ),
        ];
        for (metric, help, f) in figures {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for a in self.0.all() {
                let _ = writeln!(
                    out,
                    "{metric}{{account=\"{}\"}} {}",
                    a.name().replace('\\', "\\\\").replace('"', "\\\""),
                    f(a)
                );
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.0
                .all()
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "account": a.name(),
                        "connections": a.connections(),
                        "subscriptions": a.subscriptions(),
                        "streams": a.streams.count(),
                        "stored_bytes": a.streams.stored_bytes(),
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_subjects_name_their_account_in_front() {
        assert_eq!(
            split_route_subject("$SB.ACC.shop.orders.>"),
            Some(("shop", "orders.>"))
        );
        assert_eq!(split_route_subject("orders.new"), None);
        assert_eq!(split_route_subject("$SB.ACC.shop"), None);
        assert_eq!(split_route_subject("$SB.ACC..x"), None);
        assert_eq!(split_route_subject("$SB.ACK.s.c.1"), None);
    }
}
