//! Users named by their client certificate (mTLS), over real TLS sockets
//! with certificates made here: a certificate that names a user gets that
//! user's permissions without credentials, on the native port and over
//! HTTPS; one that names no user is refused; explicit credentials still
//! win; a certificate from another CA never gets in.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, TestBroker};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::TlsFiles;
use sockbus_client::{ConnectOptions, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// A leaf for `localhost` named `cn`, with more subject alternative
    /// names: (cert PEM, key PEM).
    fn leaf(&self, cn: &str, sans: &[SanType]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names.extend(sans.iter().cloned());
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn list(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    broker: TestBroker,
    https: std::net::SocketAddr,
    stop_http: tokio_util::sync::CancellationToken,
}

/// An mTLS broker (native port and HTTPS) with `orders` named by CN,
/// `billing` by a URI SAN (both restricted) and `admin` by password.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf("broker", &[]);
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            certificate: Some("CN=orders-svc".into()),
            publish: list(&["orders.>"]),
            subscribe: list(&["orders.>", "_INBOX.>"]),
            ..Default::default()
        },
        UserConfig {
            name: "billing".into(),
            certificate: Some("URI=spiffe://shop/billing".into()),
            publish: list(&["billing.>"]),
            subscribe: list(&["billing.>", "_INBOX.>"]),
            ..Default::default()
        },
        UserConfig {
            name: "admin".into(),
            password: Some("admin-pw".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    let mut cfg = test_config();
    cfg.users = Some(Arc::new(users));
    cfg.tls = Some(TlsFiles {
        cert: write(dir.path(), "tls.crt", &cert),
        key: write(dir.path(), "tls.key", &key),
        client_ca: Some(write(dir.path(), "ca.crt", &ca.cert.pem())),
        cluster_ca: None,
    });
    let broker = TestBroker::with(cfg).await;
    let http = sockbus_broker::http::HttpServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        broker.state.clone(),
    )
    .await
    .unwrap();
    let https = http.local_addr();
    let stop_http = tokio_util::sync::CancellationToken::new();
    tokio::spawn(http.run(stop_http.clone()));
    Setup {
        dir,
        ca,
        broker,
        https,
        stop_http,
    }
}

impl Setup {
    /// Writes a client certificate signed by `ca` and returns options
    /// that present it.
    fn client(&self, ca: &Ca, cn: &str, sans: &[SanType]) -> ConnectOptions {
        let (cert, key) = ca.leaf(cn, sans);
        let (c, k) = (
            write(self.dir.path(), &format!("{cn}.crt"), &cert),
            write(self.dir.path(), &format!("{cn}.key"), &key),
        );
        ConnectOptions::new()
            .max_reconnects(0)
            .connect_timeout(Duration::from_secs(10))
            .request_timeout(Duration::from_secs(2))
            .tls_ca(self.dir.path().join("ca.crt"))
            .tls_client_cert(c, k)
    }

    fn url(&self) -> String {
        format!("sockbus+tls://localhost:{}", self.broker.addr.port())
    }

    /// One HTTPS request presenting a certificate of `cn` signed by the
    /// test CA: the status code.
    async fn https(&self, cn: &str, request: &str) -> u16 {
        let (cert, key) = self.ca.leaf(cn, &[]);
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
            .unwrap()
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).unwrap();
        let cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .unwrap();
        let tcp = TcpStream::connect(self.https).await.unwrap();
        let mut s = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
        let resp = String::from_utf8_lossy(&resp);
        resp.get(9..12)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {resp:?}"))
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

#[tokio::test]
async fn a_client_certificate_names_its_user_who_gets_its_permissions_without_credentials() {
    let s = setup().await;
    let orders = s
        .client(&s.ca, "orders-svc", &[])
        .connect(&s.url())
        .await
        .expect("the certificate names orders");
    let mut sub = orders.subscribe("orders.>").await.unwrap();
    orders.publish("orders.new", "yes").await.unwrap();
    orders.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"yes");
    orders.publish("billing.x", "no").await.unwrap();
    match orders.flush().await {
        Err(Error::PermissionDenied { op, subject }) => {
            assert_eq!((op.as_str(), subject.as_str()), ("publish", "billing.x"))
        }
        other => panic!("expected permission denied, got {other:?}"),
    }
    let mut denied = orders.subscribe("billing.>").await.unwrap();
    assert!(matches!(
        orders.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
    assert!(tokio::time::timeout(Duration::from_secs(10), denied.next())
        .await
        .unwrap()
        .is_none());

    // A URI subject alternative name names billing (its CN names nobody).
    let billing = s
        .client(&s.ca, "pod-1234", &[uri("spiffe://shop/billing")])
        .connect(&s.url())
        .await
        .expect("the URI SAN names billing");
    billing.publish("billing.paid", "ok").await.unwrap();
    billing.flush().await.unwrap();
    billing.publish("orders.new", "no").await.unwrap();
    assert!(matches!(
        billing.flush().await,
        Err(Error::PermissionDenied { .. })
    ));
    s.stop_http.cancel();
    s.broker.stop().await;
}

#[tokio::test]
async fn a_certificate_that_names_no_user_is_refused_and_explicit_credentials_still_win() {
    let s = setup().await;
    match s
        .client(&s.ca, "stranger", &[uri("spiffe://shop/other")])
        .connect(&s.url())
        .await
    {
        Err(Error::Authorization(text)) => {
            assert!(text.contains("names no user"), "{text}");
            assert!(text.contains("CN=stranger"), "{text}");
        }
        other => panic!("expected authorization failed, got {:?}", other.err()),
    }
    // Two names of one certificate that point at two users: refused.
    match s
        .client(&s.ca, "orders-svc", &[uri("spiffe://shop/billing")])
        .connect(&s.url())
        .await
    {
        Err(Error::Authorization(text)) => assert!(text.contains("more than one user"), "{text}"),
        other => panic!("expected authorization failed, got {:?}", other.err()),
    }
    // The same stranger with a password is admin, who may do anything.
    let admin = s
        .client(&s.ca, "stranger", &[])
        .user_password("admin", "admin-pw")
        .connect(&s.url())
        .await
        .expect("credentials over mTLS");
    admin.publish("billing.x", "any").await.unwrap();
    admin.flush().await.unwrap();
    // Credentials win over the certificate: a wrong password with a
    // certificate that names orders is refused, not let in as orders.
    let r = s
        .client(&s.ca, "orders-svc", &[])
        .user_password("admin", "wrong")
        .connect(&s.url())
        .await;
    assert!(matches!(r, Err(Error::Authorization(_))), "{:?}", r.err());
    // A certificate user has no password to log in with.
    let r = s
        .client(&s.ca, "stranger", &[])
        .user_password("orders", "")
        .connect(&s.url())
        .await;
    assert!(matches!(r, Err(Error::Authorization(_))), "{:?}", r.err());
    s.stop_http.cancel();
    s.broker.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_never_gets_in_even_with_a_configured_name() {
    let s = setup().await;
    let other = Ca::new("other CA");
    let r = s.client(&other, "orders-svc", &[]).connect(&s.url()).await;
    assert!(r.is_err(), "a foreign certificate got in");
    assert!(
        !matches!(r, Err(Error::PermissionDenied { .. })),
        "{:?}",
        r.err()
    );
    s.stop_http.cancel();
    s.broker.stop().await;
}

#[tokio::test]
async fn https_requests_are_authorized_by_the_client_certificate() {
    let s = setup().await;
    let post = |subject: &str, auth: &str| {
        format!(
            "POST /v1/publish/{subject} HTTP/1.1\r\nhost: localhost\r\n{auth}content-length: 1\r\nconnection: close\r\n\r\nx"
        )
    };
    let get = |path: &str, auth: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n")
    };
    assert_eq!(s.https("orders-svc", &post("orders.new", "")).await, 204);
    assert_eq!(s.https("orders-svc", &post("billing.x", "")).await, 403);
    // Observing routes need a user who may subscribe to everything.
    assert_eq!(s.https("orders-svc", &get("/metrics", "")).await, 403);
    assert_eq!(s.https("stranger", &post("orders.new", "")).await, 401);
    // A Basic header wins over the certificate.
    let basic = "authorization: Basic YWRtaW46YWRtaW4tcHc=\r\n"; // admin:admin-pw
    assert_eq!(s.https("stranger", &get("/metrics", basic)).await, 200);
    let wrong = "authorization: Basic YWRtaW46bm9wZQ==\r\n"; // admin:nope
    assert_eq!(s.https("orders-svc", &post("orders.new", wrong)).await, 401);
    s.stop_http.cancel();
    s.broker.stop().await;
}
