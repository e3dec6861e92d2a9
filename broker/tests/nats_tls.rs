//! TLS on the NATS port beyond the upgrade after INFO (nats.rs has that):
//! clients that start TLS first (`handshake_first`) and users named by
//! their client certificate, with async-nats and certificates made here.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, TestBroker};
use futures_util::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::{Config, TlsFiles};

const WAIT: Duration = Duration::from_secs(10);

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

    /// A certificate for localhost named `cn`, written to `dir`: (cert, key).
    fn leaf(&self, dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            write(dir, &format!("{cn}.crt"), &cert.pem()),
            write(dir, &format!("{cn}.key"), &key.serialize_pem()),
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    broker: TestBroker,
}

/// A broker with TLS on its NATS port, client certificates checked
/// against the test CA (`--tls-client-ca`), `orders` named by CN (and
/// restricted to orders.>), `admin` by password.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf(dir.path(), "broker");
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            certificate: Some("CN=orders-svc".into()),
            publish: Some(vec!["orders.>".into()]),
            subscribe: Some(vec!["orders.>".into(), "_INBOX.>".into()]),
            ..Default::default()
        },
        UserConfig {
            name: "admin".into(),
            password: Some("admin-pw".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    let broker = TestBroker::with(Config {
        nats: Some("127.0.0.1:0".parse().unwrap()),
        users: Some(Arc::new(users)),
        tls: Some(TlsFiles {
            cert,
            key,
            client_ca: Some(write(dir.path(), "ca.crt", &ca.cert.pem())),
            cluster_ca: None,
        }),
        ..test_config()
    })
    .await;
    Setup { dir, ca, broker }
}

impl Setup {
    fn url(&self) -> String {
        let port = self.broker.state.config().nats.unwrap().port();
        format!("tls://localhost:{port}")
    }

    /// async-nats options trusting the test CA, presenting a certificate
    /// named `cn` when given (`--tls-client-ca` requires one of every
    /// client; a password still names the user when given).
    fn opts(&self, cn: Option<&str>) -> async_nats::ConnectOptions {
        let mut o = async_nats::ConnectOptions::new()
            .add_root_certificates(self.dir.path().join("ca.crt"))
            .require_tls(true)
            .connection_timeout(WAIT);
        if let Some(cn) = cn {
            let (c, k) = self.ca.leaf(self.dir.path(), cn);
            o = o.add_client_certificate(c, k);
        }
        o
    }
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("timed out waiting for a NATS message")
        .expect("subscription ended")
}

#[tokio::test]
async fn a_client_that_starts_tls_first_gets_info_inside_the_session() {
    let s = setup().await;
    let admin = s
        .opts(Some("ops-laptop"))
        .user_and_password("admin".into(), "admin-pw".into())
        .tls_first()
        .connect(s.url())
        .await
        .expect("tls_first client connects");
    assert_eq!(
        admin.server_info().max_payload,
        s.broker.state.config().max_payload as usize
    );
    // A client that upgrades after INFO shares the same port.
    let later = s
        .opts(Some("ops-laptop"))
        .user_and_password("admin".into(), "admin-pw".into())
        .connect(s.url())
        .await
        .expect("upgrade-after-INFO client connects");
    let mut sub = later.subscribe("tf.>").await.unwrap();
    later.flush().await.unwrap();
    admin.publish("tf.a", "first".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"first");
    // A certificate user starting TLS first.
    let orders = s
        .opts(Some("orders-svc"))
        .tls_first()
        .connect(s.url())
        .await
        .expect("certificate user with tls_first connects");
    let mut osub = orders.subscribe("orders.>").await.unwrap();
    orders.flush().await.unwrap();
    admin.publish("orders.eu", "o1".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert_eq!(&next(&mut osub).await.payload[..], b"o1");
}

#[tokio::test]
async fn a_client_certificate_names_the_nats_user_and_brings_its_permissions() {
    let s = setup().await;
    let admin = s
        .opts(Some("ops-laptop"))
        .user_and_password("admin".into(), "admin-pw".into())
        .connect(s.url())
        .await
        .unwrap();
    let mut all = admin.subscribe(">").await.unwrap();
    admin.flush().await.unwrap();
    // No credentials: the certificate's CN names `orders`.
    let orders = s
        .opts(Some("orders-svc"))
        .connect(s.url())
        .await
        .expect("certificate user connects without credentials");
    // Outside its permissions first, then inside: the admin sees only the
    // second (messages of one connection arrive in order).
    orders.publish("billing.x", "no".into()).await.unwrap();
    orders.publish("orders.x", "yes".into()).await.unwrap();
    orders.flush().await.unwrap();
    let m = next(&mut all).await;
    assert_eq!(m.subject.as_str(), "orders.x");
    // A certificate from the CA that names no user is refused.
    let r = s.opts(Some("stranger")).connect(s.url()).await;
    let Err(e) = r else {
        panic!("a certificate naming no user is refused")
    };
    assert!(
        format!("{e:?}").to_lowercase().contains("authoriz"),
        "refused for the wrong reason: {e:?}"
    );
    // Without a certificate: refused in the TLS handshake.
    assert!(s
        .opts(None)
        .user_and_password("admin".into(), "admin-pw".into())
        .connect(s.url())
        .await
        .is_err());
}

#[tokio::test]
async fn a_tls_record_byte_followed_by_garbage_or_silence_is_closed_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let addr = s.broker.state.config().nats.unwrap();
    // Looks like TLS first, is not: the handshake fails, the connection
    // closes, and no plain INFO was sent into it.
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(b"\x16garbage that is no ClientHello\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(WAIT, garbage.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "not closed");
    assert!(
        !got.starts_with(b"INFO"),
        "plain INFO sent to a TLS-first client"
    );
    // One byte of a handshake, then silence: closed at the handshake
    // timeout (5 s), not held open.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    silent.write_all(b"\x16").await.unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "a stalled handshake was not closed");
    // The port still serves a real client.
    s.opts(Some("ops-laptop"))
        .user_and_password("admin".into(), "admin-pw".into())
        .tls_first()
        .connect(s.url())
        .await
        .expect("a real client after the garbage");
}
