//! TLS on every listener, over real sockets: the native port, mTLS, the
//! HTTP gateway, cluster routes, handshakes that never finish, and
//! certificates rotated under live connections. Certificates are made here
//! with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{test_config, TestBroker};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sockbus_broker::TlsFiles;
use sockbus_protocol::frame::{self, encode_connect};
use sockbus_protocol::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// One test at a time: one counts the process's open files.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Broker-side sockets on `port` the broker has not closed (established,
/// or closed by the peer and not yet by the broker).
fn held_sockets(port: u16) -> usize {
    let mut n = 0;
    for f in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = cols[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local_port, 16) == Ok(port)
                && (cols[3] == "01" || cols[3] == "08")
            {
                n += 1;
            }
        }
    }
    n
}

/// A certificate authority that signs test certificates.
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

    /// A leaf for `localhost` and 127.0.0.1 named `cn`: (cert PEM, key PEM).
    fn leaf(&self, cn: &str) -> (String, String) {
        self.leaf_with(cn, |_| {})
    }

    fn leaf_with(&self, cn: &str, f: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        f(&mut p);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.cert.der().clone()).unwrap();
        r
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(ca: &Ca, identity: Option<&(String, String)>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots());
    Arc::new(match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
                .unwrap()
                .unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    })
}

/// Writes a certificate and key into `dir` (atomically, as cert-manager
/// does: a new file renamed over the old one).
fn write_pair(dir: &Path, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    for (path, text) in [(&c, cert), (&k, key)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (c, k)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn tls_broker(dir: &Path, ca: &Ca, client_ca: bool) -> TestBroker {
    let (cert, key) = write_pair(dir, &ca.leaf("broker-1"));
    let mut cfg = test_config();
    cfg.tls = Some(TlsFiles {
        cert,
        key,
        client_ca: client_ca.then(|| write(dir, "ca.crt", &ca.cert.pem())),
        cluster_ca: None,
    });
    TestBroker::with(cfg).await
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The common name of the certificate the broker presented.
fn peer_cn(s: &TlsStream<TcpStream>) -> String {
    let der = &s.get_ref().1.peer_certificates().unwrap()[0];
    let text = String::from_utf8_lossy(der.as_ref()).to_string();
    ["broker-1", "broker-2"]
        .into_iter()
        .find(|n| text.contains(n))
        .unwrap_or("?")
        .to_string()
}

/// A protocol connection over any stream, driven by hand.
struct Proto<S> {
    s: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Proto<S> {
    async fn handshake(s: S) -> Option<Proto<S>> {
        let mut p = Proto {
            s,
            buf: BytesMut::new(),
        };
        let mut b = BytesMut::new();
        encode_connect(&mut b, 0, 0, "tls-test", b"").unwrap();
        p.s.write_all(&b).await.ok()?;
        match p.next().await {
            Some(Frame::Info { .. }) => Some(p),
            _ => None,
        }
    }

    async fn send(&mut self, f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b).unwrap();
        self.s.write_all(&b).await.unwrap();
        self.s.flush().await.unwrap();
    }

    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Ok(Some((f, len))) = frame::decode(&self.buf, u32::MAX) {
                let owned = Frame::from(f);
                bytes::Buf::advance(&mut self.buf, len);
                return Some(owned);
            }
            match tokio::time::timeout(Duration::from_secs(5), self.s.read_buf(&mut self.buf)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Subscribes to `subject`, publishes `payload` there and reads it back.
    async fn round_trip(&mut self, sid: u32, subject: &str, payload: &[u8]) -> bool {
        self.send(Frame::Sub {
            sid,
            subject: subject.into(),
            queue: None,
        })
        .await;
        self.send(Frame::Pub {
            flags: 0,
            subject: subject.into(),
            reply: None,
            headers: vec![],
            payload: payload.to_vec(),
        })
        .await;
        loop {
            match self.next().await {
                Some(Frame::Msg { payload: p, .. }) => return p == payload,
                Some(_) => continue,
                None => return false,
            }
        }
    }
}

#[tokio::test]
async fn the_native_port_speaks_tls_and_a_plain_client_gets_no_frames() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let b = tls_broker(dir.path(), &ca, false).await;

    let s = tls_connect(b.addr, client_config(&ca, None)).await.unwrap();
    let mut p = Proto::handshake(s).await.expect("INFO over TLS");
    assert!(p.round_trip(1, "tls.a", b"over tls").await);

    // A plain client never gets an INFO frame from a TLS port.
    let plain = TcpStream::connect(b.addr).await.unwrap();
    assert!(Proto::handshake(plain).await.is_none());

    // A client that trusts another CA refuses the broker.
    let other = Ca::new("other CA");
    let e = tls_connect(b.addr, client_config(&other, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    b.stop().await;
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_a_certificate_from_it_get_in() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let b = tls_broker(dir.path(), &ca, true).await;

    let me = ca.leaf("client-1");
    let s = tls_connect(b.addr, client_config(&ca, Some(&me)))
        .await
        .unwrap();
    let mut p = Proto::handshake(s).await.expect("INFO with a client cert");
    assert!(p.round_trip(1, "mtls.a", b"hello").await);

    // No certificate: TLS 1.3 finishes the client's side of the handshake
    // before the broker's verdict arrives, so the refusal shows on first use.
    let refused = match tls_connect(b.addr, client_config(&ca, None)).await {
        Err(_) => true,
        Ok(s) => Proto::handshake(s).await.is_none(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA.
    let other = Ca::new("other CA");
    let stranger = other.leaf("client-2");
    let refused = match tls_connect(b.addr, client_config(&ca, Some(&stranger))).await {
        Err(_) => true,
        Ok(s) => Proto::handshake(s).await.is_none(),
    };
    assert!(refused, "a client with a foreign certificate was served");
    b.stop().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn silent_garbage_and_trickling_handshakes_are_closed_at_the_handshake_timeout_and_nothing_leaks(
) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(dir.path(), &ca.leaf("broker-1"));
    let mut cfg = test_config();
    cfg.handshake_timeout = Duration::from_millis(500);
    cfg.tls = Some(TlsFiles {
        cert,
        key,
        client_ca: None,
        cluster_ca: None,
    });
    let b = TestBroker::with(cfg).await;
    // Let the broker's own files settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = open_fds();

    const EACH: usize = 30;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for kind in 0..3 {
        for _ in 0..EACH {
            let addr = b.addr;
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                match kind {
                    // Silent.
                    0 => {}
                    // A record header that announces more than ever comes.
                    1 => s.write_all(b"\x16\x03\x01\x02\x00\x01\x00").await.unwrap(),
                    // A ClientHello trickled a byte at a time.
                    _ => {}
                }
                let mut tmp = [0u8; 64];
                let trickle = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
                let mut i = 0;
                loop {
                    if kind == 2 && i < trickle.len() {
                        if s.write_all(&trickle[i..i + 1]).await.is_err() {
                            return true;
                        }
                        i += 1;
                    }
                    match tokio::time::timeout(Duration::from_millis(100), s.read(&mut tmp)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return true,
                        Ok(Ok(_)) => {}
                        Err(_) if start.elapsed() > Duration::from_secs(4) => return false,
                        Err(_) => {}
                    }
                }
            }));
        }
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert!(
            t.await.unwrap(),
            "socket {i} (kind {}) still open after 4 s",
            i / EACH
        );
    }
    // Our ends are closed now too; the broker's go with them.
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_fds() > before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds() <= before,
        "{} fds open, {before} before the handshakes",
        open_fds()
    );
    assert_eq!(held_sockets(b.addr.port()), 0, "the broker holds sockets");
    // The broker still serves TLS.
    let s = tls_connect(b.addr, client_config(&ca, None)).await.unwrap();
    assert!(Proto::handshake(s).await.is_some());
    b.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_live_ones_keep_working() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let b = tls_broker(dir.path(), &ca, false).await;
    let cfg = client_config(&ca, None);

    let s = tls_connect(b.addr, cfg.clone()).await.unwrap();
    assert_eq!(peer_cn(&s), "broker-1");
    let mut live = Proto::handshake(s).await.unwrap();
    assert!(live.round_trip(1, "rot.a", b"before").await);

    write_pair(dir.path(), &ca.leaf("broker-2"));
    // Picked up by the file watch (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = tls_connect(b.addr, cfg.clone()).await.unwrap();
        if peer_cn(&s) == "broker-2" {
            assert!(Proto::handshake(s).await.is_some());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        live.round_trip(2, "rot.b", b"after").await,
        "the connection made before the rotation stopped working"
    );

    // A broken file is refused and the certificate in use stays.
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = tls_connect(b.addr, cfg.clone()).await.unwrap();
    assert_eq!(peer_cn(&s), "broker-2");
    assert!(live.round_trip(3, "rot.c", b"still").await);
    b.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_broker_with_its_name() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(dir.path(), &ca.leaf("broker-1"));
    let bad = write(dir.path(), "bad.pem", "hello");
    for (files, named) in [
        (
            TlsFiles {
                cert: bad.clone(),
                key: key.clone(),
                client_ca: None,
                cluster_ca: None,
            },
            "bad.pem",
        ),
        (
            TlsFiles {
                cert: cert.clone(),
                key: bad.clone(),
                client_ca: None,
                cluster_ca: None,
            },
            "bad.pem",
        ),
        (
            TlsFiles {
                cert: cert.clone(),
                key: dir.path().join("missing.key"),
                client_ca: None,
                cluster_ca: None,
            },
            "missing.key",
        ),
        (
            TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: Some(bad.clone()),
                cluster_ca: None,
            },
            "bad.pem",
        ),
    ] {
        let mut cfg = test_config();
        cfg.tls = Some(files);
        let e = match sockbus_broker::Server::bind(cfg).await {
            Ok(_) => panic!("started with a bad file"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(named), "{e}");
    }
}

#[tokio::test]
async fn the_http_gateway_serves_https() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(dir.path(), &ca.leaf("broker-1"));
    let mut cfg = test_config();
    cfg.tls = Some(TlsFiles {
        cert,
        key,
        client_ca: None,
        cluster_ca: None,
    });
    let broker = TestBroker::with(cfg).await;
    let http = sockbus_broker::http::HttpServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        broker.state.clone(),
    )
    .await
    .unwrap();
    let addr = http.local_addr();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(http.run(shutdown.clone()));
    let mut s = tls_connect(addr, client_config(&ca, None)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Plain HTTP to the TLS port gets no answer.
    let mut p = TcpStream::connect(addr).await.unwrap();
    p.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), p.read_to_end(&mut resp)).await;
    assert!(!String::from_utf8_lossy(&resp).contains("200"));
    shutdown.cancel();
}

#[tokio::test]
async fn cluster_routes_run_over_tls_and_verify_the_peer() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(dir.path(), &ca.leaf("broker-1"));
    let ca_file = write(dir.path(), "ca.crt", &ca.cert.pem());
    let files = TlsFiles {
        cert,
        key,
        client_ca: None,
        cluster_ca: Some(ca_file),
    };
    // Each node's route listener on a port of its own choosing (a port
    // picked in advance can be taken before the broker binds it: another
    // test's connection, or a dial to it that connects to itself); b dials
    // a, and the one link is verified both ways.
    let node = |id: &str, peer: Option<SocketAddr>| {
        let mut c = test_config();
        c.node_id = id.into();
        c.cluster = Some("127.0.0.1:0".parse().unwrap());
        c.peers = peer
            .map(|p| vec![format!("sockbus-route://{p}")])
            .unwrap_or_default();
        c.tls = Some(files.clone());
        c
    };
    let a = TestBroker::with(node("a", None)).await;
    let b = TestBroker::with(node("b", a.route)).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while a.state.peers().is_empty() || b.state.peers().is_empty() {
        assert!(Instant::now() < deadline, "no route over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = client_config(&ca, None);
    let mut sub = Proto::handshake(tls_connect(a.addr, cfg.clone()).await.unwrap())
        .await
        .unwrap();
    sub.send(Frame::Sub {
        sid: 1,
        subject: "x.y".into(),
        queue: None,
    })
    .await;
    let mut publ = Proto::handshake(tls_connect(b.addr, cfg).await.unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        publ.send(Frame::Pub {
            flags: 0,
            subject: "x.y".into(),
            reply: None,
            headers: vec![],
            payload: b"across".to_vec(),
        })
        .await;
        let got = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        if let Ok(Some(Frame::Msg { payload, .. })) = got {
            assert_eq!(payload, b"across");
            break;
        }
        assert!(Instant::now() < deadline, "no message across the TLS route");
    }
    a.stop().await;
    b.stop().await;
}

fn sdk(ca: &Path) -> sockbus_client::ConnectOptions {
    sockbus_client::ConnectOptions::new()
        .tls_ca(ca)
        .connect_timeout(Duration::from_secs(3))
        .max_reconnects(0)
}

async fn sdk_error(opts: sockbus_client::ConnectOptions, url: &str) -> String {
    match opts.connect(url).await {
        Ok(_) => panic!("connected to {url}"),
        Err(e) => {
            eprintln!("{url}: {e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn the_sdk_speaks_tls_with_a_client_certificate_and_reconnects_over_tls() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let b = tls_broker(dir.path(), &ca, true).await;
    let ca_file = dir.path().join("ca.crt");
    let me = ca.leaf("client-1");
    let (c, k) = (
        write(dir.path(), "me.crt", &me.0),
        write(dir.path(), "me.key", &me.1),
    );
    let url = format!("sockbus+tls://localhost:{}", b.addr.port());
    let client = sdk(&ca_file)
        .tls_client_cert(&c, &k)
        .max_reconnects(100)
        .connect(&url)
        .await
        .unwrap();
    let mut sub = client.subscribe("sdk.tls").await.unwrap();
    client.publish("sdk.tls", "one").await.unwrap();
    assert_eq!(&common::recv(&mut sub).await.payload[..], b"one");

    // Without the client certificate the broker refuses, and says so.
    let e = sdk_error(sdk(&ca_file), &url).await;
    assert!(e.contains("client certificate"), "{e}");

    // A new broker on the same port: the client comes back over TLS.
    let addr = b.addr;
    let cfg = {
        let mut c = b.state.config().clone();
        c.listen = addr;
        c.data_dir = common::scratch_dir();
        c
    };
    b.stop().await;
    let b2 = TestBroker::with(cfg).await;
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.publish("sdk.tls", "two").await.unwrap();
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            assert_eq!(&m.unwrap().payload[..], b"two");
            break;
        }
        assert!(Instant::now() < deadline, "no message after reconnecting");
    }
    b2.stop().await;
}

#[tokio::test]
async fn sdk_tls_errors_say_what_is_wrong() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let ca_file = write(dir.path(), "ca.crt", &ca.cert.pem());
    let b = tls_broker(dir.path(), &ca, false).await;
    let port = b.addr.port();

    // Another CA.
    let other = Ca::new("other CA");
    let other_file = write(dir.path(), "other.crt", &other.cert.pem());
    let e = sdk_error(sdk(&other_file), &format!("sockbus+tls://localhost:{port}")).await;
    assert!(e.contains("not signed by a trusted CA"), "{e}");

    // A plain client to the TLS port.
    let e = sdk_error(sdk(&ca_file), &format!("sockbus://127.0.0.1:{port}")).await;
    assert!(e.contains("speaks TLS"), "{e}");

    // A TLS client to a plain port.
    let plain = TestBroker::start().await;
    let e = sdk_error(
        sdk(&ca_file),
        &format!("sockbus+tls://localhost:{}", plain.addr.port()),
    )
    .await;
    assert!(e.contains("does not speak TLS"), "{e}");
    plain.stop().await;
    b.stop().await;

    // An expired certificate.
    let expired = ca.leaf_with("broker-1", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let d2 = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(d2.path(), &expired);
    let mut cfg = test_config();
    cfg.tls = Some(TlsFiles {
        cert,
        key,
        client_ca: None,
        cluster_ca: None,
    });
    let b = TestBroker::with(cfg).await;
    let e = sdk_error(
        sdk(&ca_file),
        &format!("sockbus+tls://localhost:{}", b.addr.port()),
    )
    .await;
    assert!(e.contains("expired"), "{e}");
    b.stop().await;
}
