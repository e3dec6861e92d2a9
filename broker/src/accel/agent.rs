//! `sockbus-broker accel agent`: attaches the fast path for a whole node
//! (a Kubernetes DaemonSet, privileged) and serves its metrics, so that the
//! brokers themselves can run without privileges.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::AttachOptions;
use crate::config::AccelMode;

/// Default metrics address of the agent.
pub const DEFAULT_METRICS: &str = "127.0.0.1:7490";

/// Attaches (failing loudly if it can't), serves `GET /metrics` and
/// `GET /healthz` on `metrics` until `shutdown`, then detaches.
pub async fn run(
    opts: AttachOptions,
    metrics: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(metrics)
        .await
        .with_context(|| format!("cannot listen on {metrics} for metrics"))?;
    let guard = super::start(
        AccelMode::On,
        &opts,
        // Routes are a broker's to install, in maps of its own attach.
        Some("a node agent routes no subjects (brokers that attach themselves do)"),
    )
    .context("cannot attach the fast path")?;
    info!(addr = %listener.local_addr()?, "accel agent: serving metrics");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve(s).await {
                            debug!(%peer, "metrics request failed: {e}");
                        }
                    });
                }
                Err(e) => {
                    debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(guard);
    info!("accel agent: stopped");
    Ok(())
}

/// A minimal HTTP/1.0 responder: one request per connection.
async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => {
            let mut body = String::new();
            super::render_prometheus(&mut body);
            ("200 OK", "text/plain; version=0.0.4", body)
        }
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
