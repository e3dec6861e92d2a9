//! TLS to the broker (`sockbus+tls://host:port`): the CA the broker's
//! certificate must chain to (`tls_ca`, else the system's roots), an
//! optional client certificate for mTLS, and errors that say what is wrong
//! (expired certificate, unknown CA, a port that does not speak TLS).
//! The files are read at each connect, so a reconnect picks up a rotated
//! client certificate.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};

/// The scheme of a TLS server URL, kept on the parsed address.
pub(crate) const TLS_SCHEME: &str = "sockbus+tls://";

/// Where the SDK finds what TLS needs.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificates the broker's certificate must chain to; the
    /// system's roots when None.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn tls_err(what: impl Into<String>) -> Error {
    Error::Tls(what.into())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let f = File::open(path)
        .map_err(|e| tls_err(format!("cannot read {what} {}: {e}", path.display())))?;
    let v = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_err(format!("{what} {} is not PEM: {e}", path.display())))?;
    if v.is_empty() {
        return Err(tls_err(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let f = File::open(path)
        .map_err(|e| tls_err(format!("cannot read the key {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| tls_err(format!("the key {} is not PEM: {e}", path.display())))?
        .ok_or_else(|| tls_err(format!("{} holds no PEM private key", path.display())))
}

pub(crate) fn config(o: &TlsOptions) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &o.ca {
        Some(ca) => {
            for c in certs(ca, "the CA file")? {
                roots
                    .add(c)
                    .map_err(|e| tls_err(format!("the CA file {}: {e}", ca.display())))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots);
    let c = match (&o.cert, &o.key) {
        (Some(c), Some(k)) => b
            .with_client_auth_cert(certs(c, "the client certificate")?, key(k)?)
            .map_err(|e| {
                tls_err(format!(
                    "the client key {} does not go with {}: {e}",
                    k.display(),
                    c.display()
                ))
            })?,
        (None, None) => b.with_no_client_auth(),
        _ => {
            return Err(tls_err(
                "a client certificate needs both the certificate and its key",
            ))
        }
    };
    Ok(Arc::new(c))
}

/// TLS handshake over `tcp` with the broker at `host_port`, whose host
/// names the certificate expected.
pub(crate) async fn connect(
    tcp: TcpStream,
    host_port: &str,
    o: &TlsOptions,
) -> Result<TlsStream<TcpStream>> {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        tls_err(format!(
            "{host:?} is not a name to verify a certificate by: {e}"
        ))
    })?;
    TlsConnector::from(config(o)?)
        .connect(name, tcp)
        .await
        .map_err(explain)
}

/// What a failed TLS handshake means, in a user's words.
fn explain(e: std::io::Error) -> Error {
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return tls_err(format!("handshake failed: {e}"));
    };
    let why = match r {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the broker's certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the broker's certificate is not valid yet"
            }
            CertificateError::UnknownIssuer => {
                "the broker's certificate is not signed by a trusted CA (set the CA with --tls-ca or SOCKBUS_TLS_CA)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the broker's certificate is not valid for the host in the URL"
            }
            _ => "the broker's certificate was refused",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server does not speak TLS (a plain sockbus:// port?)"
        }
        rustls::Error::AlertReceived(_) => {
            "the broker refused the handshake (does it require a client certificate: --tls-cert/--tls-key?)"
        }
        _ => "handshake failed",
    };
    tls_err(format!("{why}: {r}"))
}
