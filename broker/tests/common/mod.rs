//! Starts real brokers on ephemeral loopback ports for the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use sockbus_broker::{Config, Server};
use sockbus_protocol::frame::{self, encode_connect};
use sockbus_protocol::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub struct TestBroker {
    pub addr: SocketAddr,
    pub url: String,
    pub state: std::sync::Arc<sockbus_broker::State>,
    /// Where it listens for cluster routes, with `cluster` configured.
    pub route: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A data directory of its own for every test broker, so streams never mix.
pub fn scratch_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("sockbus-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        node_id: "test".into(),
        data_dir: scratch_dir(),
        drain_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::with(test_config()).await
    }

    pub async fn with(config: Config) -> TestBroker {
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let route = server.route_addr();
        let state = server.state();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        TestBroker {
            addr,
            url: format!("sockbus://{addr}"),
            state,
            route,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the broker and waits until its listener is gone.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("run");
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A hand-driven protocol connection, for what the SDK would never send.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and completes the handshake (declared window 0: the default;
    /// this client never grants credit, so it stalls after that many bytes).
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::connect_with_window(addr, 0).await
    }

    /// Connects declaring `window` as its receive window.
    pub async fn connect_with_window(addr: SocketAddr, window: u32) -> Raw {
        let mut r = Raw::connect_only(addr).await;
        let mut b = BytesMut::new();
        encode_connect(&mut b, 0, window, "raw", b"").unwrap();
        r.send(&b).await;
        match r.next().await {
            Some(Frame::Info { .. }) => {}
            other => panic!("expected INFO, got {other:?}"),
        }
        r
    }

    pub async fn connect_only(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send_frame(&mut self, f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b).unwrap();
        self.send(&b).await;
    }

    /// Next frame, or None on EOF / 5 s of silence.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some((f, len)) =
                frame::decode(&self.buf, u32::MAX).expect("broker sent a valid frame")
            {
                let owned = Frame::from(f);
                bytes::Buf::advance(&mut self.buf, len);
                return Some(owned);
            }
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads frames until EOF; true if the broker closed the connection.
    pub async fn closed(&mut self) -> bool {
        loop {
            let mut tmp = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub async fn recv(sub: &mut sockbus_client::Subscriber) -> sockbus_client::Message {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("timed out waiting for a message")
        .expect("subscription ended")
}

/// A replier that answers every request on `subject` with its own payload,
/// until the returned task is aborted.
pub async fn echo_replier(
    svc: sockbus_client::Client,
    subject: &str,
) -> tokio::task::JoinHandle<()> {
    let mut reqs = svc.subscribe(subject).await.unwrap();
    svc.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = reqs.next().await {
            if let Some(r) = m.reply() {
                svc.publish(r, &m.payload).await.unwrap();
            }
        }
    })
}

/// Asserts nothing arrives within a short while.
pub async fn nothing(sub: &mut sockbus_client::Subscriber) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        panic!("unexpected message on {}: {:?}", m.subject(), m.payload);
    }
}
