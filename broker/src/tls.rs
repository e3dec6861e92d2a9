//! TLS for every listener (native clients, cluster routes, HTTP) and for the
//! routes this broker dials: certificates read from PEM files, checked once
//! at start (a bad file stops the broker with its name), and read again on
//! SIGHUP or when a file's modification time changes (cert-manager rewrites
//! them in place). A reload only affects handshakes that start after it;
//! connections up keep their session. A new file that does not load is
//! logged and the certificate in use is kept.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the certificate files' modification times are looked at.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The PEM files TLS is made of (`--tls-cert`, `--tls-key`,
/// `--tls-client-ca`, `--cluster-tls-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to these CAs (mTLS on every listener).
    pub client_ca: Option<PathBuf>,
    /// What peers this broker dials must chain to; `client_ca` when absent.
    pub cluster_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn route_ca(&self) -> Option<&Path> {
        self.cluster_ca.as_deref().or(self.client_ca.as_deref())
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key)]
            .into_iter()
            .chain([self.client_ca.as_ref(), self.cluster_ca.as_ref()])
            .flatten()
            .map(PathBuf::as_path)
    }
}

struct Loaded {
    server: Arc<ServerConfig>,
    /// For dialing cluster peers: verifies them against the route CA and
    /// presents our own certificate.
    route: Option<Arc<ClientConfig>>,
}

pub(crate) struct Tls {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
    /// Modification times at the last (attempted) load.
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no PEM certificate (BEGIN CERTIFICATE)",
            path.display()
        );
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .with_context(|| format!("{} is not a PEM key file", path.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", path.display()))
}

pub(crate) fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .with_context(|| format!("{}: a CA certificate that does not parse", path.display()))?;
    }
    Ok(roots)
}

fn load(files: &TlsFiles) -> anyhow::Result<Loaded> {
    let certs = read_certs(&files.cert).context("--tls-cert")?;
    let key = read_key(&files.key).context("--tls-key")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = read_roots(ca).context("--tls-client-ca")?;
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("--tls-client-ca {}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let server = builder
        .with_single_cert(certs.clone(), key.clone_key())
        .with_context(|| {
            format!(
                "--tls-key {} does not go with --tls-cert {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    let route = match files.route_ca() {
        Some(ca) => {
            let roots = read_roots(ca).context("--cluster-tls-ca")?;
            let c = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .with_context(|| format!("--tls-key {}", files.key.display()))?;
            Some(Arc::new(c))
        }
        None => None,
    };
    Ok(Loaded {
        server: Arc::new(server),
        route,
    })
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    files
        .paths()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl Tls {
    /// Reads every file; the error names the one that is wrong.
    pub fn load(files: TlsFiles) -> anyhow::Result<Tls> {
        let stamps = stamps(&files);
        let loaded = load(&files)?;
        Ok(Tls {
            files,
            loaded: RwLock::new(loaded),
            stamps: Mutex::new(stamps),
        })
    }

    /// For one handshake on a listener, with the certificate loaded now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.loaded
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .server
                .clone(),
        )
    }

    /// For dialing a cluster peer; None without a CA to verify peers by.
    pub fn route_connector(&self) -> Option<TlsConnector> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .route
            .clone()
            .map(TlsConnector::from)
    }

    /// Reads the files again. A failure is logged and the loaded
    /// certificates stay. True when the new ones are in use.
    pub fn reload(&self, why: &str) -> bool {
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps(&self.files);
        match load(&self.files) {
            Ok(l) => {
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = l;
                info!(cert = %self.files.cert.display(), "TLS certificates reloaded ({why})");
                true
            }
            Err(e) => {
                warn!("TLS reload ({why}) failed, keeping the certificates in use: {e:#}");
                false
            }
        }
    }

    /// Reloads on SIGHUP and when a file's modification time changes,
    /// until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot watch SIGHUP for TLS reloads: {e}");
                None
            }
        };
        let mut tick = tokio::time::interval(RELOAD_POLL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let now = stamps(&self.files);
                    let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
                    if changed {
                        self.reload("a certificate file changed");
                    }
                }
            }
        }
    }
}
