//! The users table in force, and its reload: with `--users-file` the file
//! is read again on SIGHUP and when its modification time or size changes
//! (a Kubernetes Secret update replaces the mounted file). A reload applies
//! to connections and HTTP requests authenticated after it; connections up
//! keep the user and permissions they authenticated with and are never
//! dropped. A file that no longer loads is logged and counted, and the
//! table in force stays.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{UserConfig, Users};

/// Where a reload reads the users from.
struct Source {
    /// The `[[users]]` of `--config` (not reread: a config change restarts).
    config_users: Vec<UserConfig>,
    file: PathBuf,
    /// Client certificates are verified (`--tls-client-ca`): certificate
    /// users are allowed.
    client_ca: bool,
    /// The accounts the broker built at start; a reload that names another
    /// is refused (an account's engine and streams exist from start only,
    /// so its users would otherwise land in no account of their own).
    accounts: Option<Vec<String>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

pub struct LiveUsers {
    current: RwLock<Arc<Users>>,
    source: Option<Source>,
    /// Reloads that took effect, and reloads refused (the file did not load).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl std::fmt::Debug for LiveUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

fn stamp(p: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl LiveUsers {
    /// `users` as loaded at start; reloadable when they came (partly) from
    /// `users_file`.
    pub fn new(
        users: Arc<Users>,
        config_users: Vec<UserConfig>,
        users_file: Option<PathBuf>,
        client_ca: bool,
    ) -> LiveUsers {
        LiveUsers {
            current: RwLock::new(users),
            source: users_file.map(|file| Source {
                stamp: Mutex::new(stamp(&file)),
                config_users,
                file,
                client_ca,
                accounts: None,
            }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// Refuse reloads whose users name an account outside `names`.
    pub fn with_accounts(mut self, names: Vec<String>) -> Self {
        if let Some(src) = &mut self.source {
            src.accounts = Some(names);
        }
        self
    }

    /// The table in force now.
    pub fn get(&self) -> Arc<Users> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reloadable(&self) -> bool {
        self.source.is_some()
    }

    /// Reads the users file again; true when the new table is in force.
    pub fn reload(&self, why: &str) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        *src.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&src.file);
        let loaded = crate::config::read_users_file(&src.file).and_then(|list| {
            let mut all = src.config_users.clone();
            all.extend(list);
            let users = Users::from_config(all)?;
            if users.has_certificate_users() && !src.client_ca {
                anyhow::bail!("a user is named by `certificate`, but no --tls-client-ca is set");
            }
            if let Some(known) = &src.accounts {
                if let Some(u) = users.iter().find(|u| !known.contains(&u.account)) {
                    anyhow::bail!(
                        "user {:?} names account {:?}, which the broker did not have at start; a new account needs a restart",
                        u.name,
                        u.account
                    );
                }
            }
            Ok(users)
        });
        match loaded {
            Ok(new) => {
                let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
                new.carry_counters(&cur);
                info!(users = new.iter().count(), file = %src.file.display(), "users reloaded ({why}); connections up keep their user");
                for name in &new.plain_text {
                    warn!(user = %name, "password or token of this user is plain text; store an argon2 hash (`sockbus passwd`) instead");
                }
                *cur = Arc::new(new);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                warn!("users reload ({why}) failed, keeping the users in force: {e:#}");
                false
            }
        }
    }

    /// Reloads on SIGHUP and when the file changes, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(src) = &self.source else { return };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot watch SIGHUP for users reloads: {e}");
                None
            }
        };
        let mut tick = tokio::time::interval(crate::tls::RELOAD_POLL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let now = stamp(&src.file);
                    let changed = *src.stamp.lock().unwrap_or_else(|p| p.into_inner()) != now;
                    if changed {
                        self.reload("the users file changed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_that_would_not_start_is_refused_and_the_table_stays() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users.toml");
        let config_users = vec![UserConfig {
            name: "admin".into(),
            password: Some("pw".into()),
            ..Default::default()
        }];
        let start = Users::from_config(config_users.clone()).unwrap();
        let live = LiveUsers::new(Arc::new(start), config_users, Some(file.clone()), false);
        let names =
            |l: &LiveUsers| -> Vec<String> { l.get().iter().map(|u| u.name.clone()).collect() };
        for bad in [
            // A certificate user without --tls-client-ca.
            "[[users]]\nname = \"o\"\ncertificate = \"CN=o\"\n",
            // A name the config already has.
            "[[users]]\nname = \"admin\"\ntoken = \"t\"\n",
            "not toml",
        ] {
            std::fs::write(&file, bad).unwrap();
            assert!(!live.reload("test"), "{bad}");
            assert_eq!(names(&live), ["admin"]);
        }
        std::fs::remove_file(&file).unwrap();
        assert!(!live.reload("test"), "a missing file");
        assert_eq!(live.reload_failures.load(Ordering::Relaxed), 4);
        std::fs::write(&file, "[[users]]\nname = \"ci\"\ntoken = \"t\"\n").unwrap();
        assert!(live.reload("test"));
        assert_eq!(names(&live), ["admin", "ci"]);
    }

    #[test]
    fn a_reload_naming_an_account_the_broker_did_not_start_with_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users.toml");
        std::fs::write(
            &file,
            "[[users]]\nname = \"a\"\ntoken = \"t\"\naccount = \"shop\"\n",
        )
        .unwrap();
        let start = Users::from_config(crate::config::read_users_file(&file).unwrap()).unwrap();
        let live = LiveUsers::new(Arc::new(start), Vec::new(), Some(file.clone()), false)
            .with_accounts(vec!["$default".into(), "shop".into()]);
        // Same account: fine. A new one would put its users in no account
        // of their own (the default's subject space), so it is refused.
        std::fs::write(
            &file,
            "[[users]]\nname = \"b\"\ntoken = \"t\"\naccount = \"shop\"\n",
        )
        .unwrap();
        assert!(live.reload("test"));
        std::fs::write(
            &file,
            "[[users]]\nname = \"c\"\ntoken = \"t\"\naccount = \"newteam\"\n",
        )
        .unwrap();
        assert!(!live.reload("test"));
        assert_eq!(live.get().iter().next().unwrap().name, "b");
    }
}
