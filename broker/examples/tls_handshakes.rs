//! A reconnect storm over TLS: `CONNS` tasks each connect (TCP, TLS
//! handshake, the protocol's own greeting), then close, as fast as they can
//! for `SECS` seconds; prints connections per second. Against a sockbus
//! broker (`sockbus+tls://`) with the SDK or a nats-server (`tls://`) with
//! async-nats, both verifying the server against `CA`.
//!
//!   cargo run --release -p sockbus-broker --example tls_handshakes -- URL CA [CONNS] [SECS]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, ca) = match (args.first(), args.get(1)) {
        (Some(u), Some(c)) => (u.clone(), c.clone()),
        _ => anyhow::bail!("usage: tls_handshakes URL CA [CONNS] [SECS]"),
    };
    let conns: usize = args.get(2).map_or(Ok(16), |s| s.parse())?;
    let secs: u64 = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (url, ca, done, failed) = (url.clone(), ca.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let ok = if url.starts_with("tls://") {
                    match async_nats::ConnectOptions::new()
                        .add_root_certificates(ca.clone().into())
                        .require_tls(true)
                        .max_reconnects(Some(0))
                        .connect(url.as_str())
                        .await
                    {
                        Ok(c) => {
                            // The server's INFO and our CONNECT went by;
                            // a flush is one round trip over the session.
                            let ok = c.flush().await.is_ok();
                            drop(c);
                            ok
                        }
                        Err(_) => false,
                    }
                } else {
                    match sockbus_client::ConnectOptions::new()
                        .tls_ca(&ca)
                        .max_reconnects(0)
                        .connect(&url)
                        .await
                    {
                        Ok(c) => {
                            let ok = c.flush().await.is_ok();
                            let _ = c.close().await;
                            ok
                        }
                        Err(_) => false,
                    }
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let el = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{url}: {n} TLS connections in {el:.1}s = {:.0}/s with {conns} at once ({} failed)",
        n as f64 / el,
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}
