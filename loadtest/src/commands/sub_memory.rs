//! `sockbus-loadtest sub-memory`: what a subscription costs a broker, and
//! whether the broker gives the memory back. Starts sockbus-broker and
//! nats-server; on one connection to each, subscribes to N distinct literal
//! subjects (`s.0` ... `s.<N-1>`) with raw protocol frames (no client
//! library's own bookkeeping), and reads the server's resident size
//! (`VmRSS`) before, with them, after UNSUBscribing them all, and after a
//! connection holding N subscriptions closes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::Args;
use sockbus_protocol::frame::{self, encode_connect, encode_ping, encode_sub, encode_unsub};
use sockbus_protocol::FrameRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::servers::{
    find_nats_server, find_sockbus_broker, free_port, version_of, ScratchDir, ServerProc,
};

#[derive(Args, Debug)]
pub struct SubMemoryArgs {
    /// Subscriptions on the one connection.
    #[arg(long, default_value_t = 1_000_000)]
    pub subs: u32,
    /// Rounds; each starts fresh servers, sockbus then NATS.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Pause before the readings before and with the subscriptions, for the
    /// server to settle; after the UNSUBs and the close the resident size is
    /// polled for up to this plus 20 s, until it is back within 10 %.
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub settle: Duration,
    #[arg(long)]
    pub broker_bin: Option<std::path::PathBuf>,
    #[arg(long)]
    pub nats_bin: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Sockbus,
    Nats,
}

/// Resident sizes in KiB.
struct Reading {
    base: u64,
    with: u64,
    peak: u64,
    /// With how long it took to come back within 10 % of `base`.
    after_unsub: (u64, Option<Duration>),
    after_close: (u64, Option<Duration>),
}

pub async fn execute(args: SubMemoryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.subs >= 1, "--subs must be at least 1");
    let broker_bin = find_sockbus_broker(args.broker_bin.as_deref())?;
    let nats_bin = find_nats_server(args.nats_bin.as_deref())?;
    println!(
        "sockbus-broker ({}) vs nats-server ({}); {} subscriptions to distinct literal subjects on one connection; settle {:?}",
        version_of(&broker_bin),
        version_of(&nats_bin),
        args.subs,
        args.settle
    );
    println!();
    println!(
        "RSS after UNSUB / close: the first reading within 10 % of the one before, and when it came \
         (or the last after {:?} + 20 s)",
        args.settle
    );
    println!();
    println!("| round | server | RSS before | with subs | peak | bytes/subscription | after UNSUB all | after close |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for round in 1..=args.rounds {
        for wire in [Wire::Sockbus, Wire::Nats] {
            let dir = ScratchDir::new("sockbus-loadtest-sub-memory")?;
            let r = measure(wire, &broker_bin, &nats_bin, &dir.0, &args).await?;
            let per = (r.with.saturating_sub(r.base) * 1024) as f64 / args.subs as f64;
            let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
            let back = |(k, took): (u64, Option<Duration>)| match took {
                Some(t) => format!("{} ({:.1} s)", mib(k), t.as_secs_f64()),
                None => format!("{} (not back)", mib(k)),
            };
            println!(
                "| {round} | {} | {} | {} | {} | {per:.0} | {} | {} |",
                match wire {
                    Wire::Sockbus => "sockbus",
                    Wire::Nats => "NATS",
                },
                mib(r.base),
                mib(r.with),
                mib(r.peak),
                back(r.after_unsub),
                back(r.after_close),
            );
        }
    }
    Ok(())
}

async fn measure(
    wire: Wire,
    broker_bin: &Path,
    nats_bin: &Path,
    dir: &Path,
    args: &SubMemoryArgs,
) -> anyhow::Result<Reading> {
    let addr = free_port()?;
    let server = match wire {
        Wire::Sockbus => ServerProc::start_env(
            "sockbus-broker",
            broker_bin,
            &[
                "--listen".into(),
                addr.to_string(),
                "--accel".into(),
                "off".into(),
                "--http".into(),
                "off".into(),
                "--data-dir".into(),
                dir.join("data").display().to_string(),
            ],
            // No limit; by variable, so a build from before the flag runs too.
            &[("SOCKBUS_MAX_SUBSCRIPTIONS", "0")],
            addr,
            dir,
        )?,
        Wire::Nats => ServerProc::start(
            "nats-server",
            nats_bin,
            &[
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                addr.port().to_string(),
            ],
            addr,
            dir,
        )?,
    };
    let rss = |field: &str| status_kib(server.pid(), field);
    tokio::time::sleep(args.settle).await;
    let base = rss("VmRSS:")?;

    let mut c = Conn::open(wire, addr).await?;
    c.subscribe(0..args.subs).await?;
    tokio::time::sleep(args.settle).await;
    let with = rss("VmRSS:")?;
    c.unsubscribe(0..args.subs).await?;
    let after_unsub = given_back(base, args.settle, || rss("VmRSS:")).await?;
    c.subscribe(0..args.subs).await?;
    drop(c);
    let after_close = given_back(base, args.settle, || rss("VmRSS:")).await?;
    let peak = rss("VmHWM:")?;
    Ok(Reading {
        base,
        with,
        peak,
        after_unsub,
        after_close,
    })
}

/// Polls the resident size until it is back within 10 % of `base`, or for
/// `settle` plus 20 s at most; returns the last reading (KiB) and the time
/// it took, or None when it did not come back.
async fn given_back(
    base: u64,
    settle: Duration,
    rss: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<(u64, Option<Duration>)> {
    let start = Instant::now();
    let deadline = start + settle + Duration::from_secs(20);
    loop {
        let now = rss()?;
        if now <= base + base / 10 {
            return Ok((now, Some(start.elapsed())));
        }
        if Instant::now() >= deadline {
            return Ok((now, None));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// One raw protocol connection.
struct Conn {
    wire: Wire,
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(wire: Wire, addr: std::net::SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let mut c = Conn {
            wire,
            stream,
            buf: BytesMut::new(),
        };
        let mut b = BytesMut::new();
        match wire {
            Wire::Sockbus => encode_connect(&mut b, 0, 0, "sub-memory", b"")?,
            Wire::Nats => {
                b.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            }
        }
        c.stream.write_all(&b).await?;
        c.sync().await?;
        Ok(c)
    }

    async fn subscribe(&mut self, sids: std::ops::Range<u32>) -> anyhow::Result<()> {
        let wire = self.wire;
        self.send_all(sids, |b, sid| match wire {
            Wire::Sockbus => {
                let _ = encode_sub(b, sid, &format!("s.{sid}"), None);
            }
            Wire::Nats => b.extend_from_slice(format!("SUB s.{sid} {sid}\r\n").as_bytes()),
        })
        .await
    }

    async fn unsubscribe(&mut self, sids: std::ops::Range<u32>) -> anyhow::Result<()> {
        let wire = self.wire;
        self.send_all(sids, |b, sid| match wire {
            Wire::Sockbus => encode_unsub(b, sid, 0),
            Wire::Nats => b.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes()),
        })
        .await
    }

    /// Sends a frame per sid, then waits until the server handled them.
    async fn send_all(
        &mut self,
        sids: std::ops::Range<u32>,
        mut f: impl FnMut(&mut BytesMut, u32),
    ) -> anyhow::Result<()> {
        let mut b = BytesMut::with_capacity(128 * 1024);
        for sid in sids {
            f(&mut b, sid);
            if b.len() >= 64 * 1024 {
                self.stream.write_all(&b).await?;
                b.clear();
            }
        }
        self.stream.write_all(&b).await?;
        self.sync().await
    }

    /// PING, and wait for the PONG: everything sent before is handled.
    async fn sync(&mut self) -> anyhow::Result<()> {
        let mut b = BytesMut::new();
        match self.wire {
            Wire::Sockbus => encode_ping(&mut b, 1),
            Wire::Nats => b.extend_from_slice(b"PING\r\n"),
        }
        self.stream.write_all(&b).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.pong()? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => bail!("no PONG within 120 s"),
                Ok(Ok(0)) => bail!("the server closed the connection"),
                Ok(r) => {
                    r?;
                }
            }
        }
    }

    /// Consumes what was read; true once a PONG was among it.
    fn pong(&mut self) -> anyhow::Result<bool> {
        match self.wire {
            Wire::Sockbus => {
                while let Some((f, len)) = frame::decode(&self.buf, u32::MAX)? {
                    let is_pong = match f {
                        FrameRef::Pong(_) => true,
                        FrameRef::Err { code, text } => bail!("sockbus refused: ERR {code} {text}"),
                        _ => false,
                    };
                    bytes::Buf::advance(&mut self.buf, len);
                    if is_pong {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Wire::Nats => {
                while let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let line = self.buf.split_to(end + 2);
                    if line.starts_with(b"PONG") {
                        return Ok(true);
                    }
                    if line.starts_with(b"-ERR") {
                        bail!(
                            "nats-server refused: {}",
                            String::from_utf8_lossy(&line).trim()
                        );
                    }
                }
                Ok(false)
            }
        }
    }
}
