//! Request/reply round trip layer by layer, fast path off and on, so each
//! layer's share shows: the same four hops (requester → middle → replier →
//! middle → requester) through
//!
//! 1. `relay`: a process that only copies bytes between the two sockets;
//! 2. `broker, raw clients`: `sockbus-broker --busy-poll`, with clients that
//!    write pre-encoded frames and decode replies themselves (no SDK);
//! 3. `broker, SDK`: the same broker with `sockbus_client` clients, as in
//!    accel_bench.
//!
//! Every process busy-polls on a one-thread tokio runtime (200 µs window),
//! so no thread wake-up is measured. Modes are alternated within each round
//! and the order flips between rounds; medians are printed.
//!
//!   cargo build --release -p sockbus-broker --bin sockbus-broker --example rr_layers
//!   sudo target/release/examples/rr_layers [--rounds 5] [--requests 30000]
//!
//! Needs root (it attaches the fast path in a cgroup of its own).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use clap::Parser;
use sockbus_broker::accel::{AttachOptions, FastPath};

#[path = "shared/request_reply.rs"]
mod request_reply;
use sockbus_protocol::frame::{self, encode_connect, encode_pub, encode_sub};
use sockbus_protocol::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Round trips per measurement (after 1,000 of warm-up).
    #[arg(long, default_value_t = 30_000)]
    requests: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Internal: run as the relay on this port.
    #[arg(long, hide = true)]
    relay: Option<u16>,
}

const WINDOW: Duration = Duration::from_micros(200);

#[derive(Clone, Copy, PartialEq)]
enum Layer {
    Relay,
    Raw,
    Sdk,
}

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Relay => "relay (copies bytes)",
            Layer::Raw => "broker, raw clients",
            Layer::Sdk => "broker, SDK",
        }
    }
}

fn p50(mut lat: Vec<Duration>) -> f64 {
    lat.sort_unstable();
    lat[lat.len() / 2].as_secs_f64() * 1e6
}

// ------------------------------------------------------------------ relay

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        sockbus_protocol::busy_poll::touch();
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

async fn relay(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _poll = sockbus_protocol::busy_poll::spawn(WINDOW);
    let (a, _) = l.accept().await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let t = tokio::spawn(pipe(ar, bw));
    pipe(br, aw).await;
    let _ = t.await;
}

async fn through_relay(port: u16, args: &Args) -> f64 {
    let mut a = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The relay takes the requester first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut b = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    let size = args.size;
    let replier = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        while b.read_exact(&mut buf).await.is_ok() {
            sockbus_protocol::busy_poll::touch();
            if b.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let n = args.requests;
    let r = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + 1000 {
            let t = Instant::now();
            a.write_all(&buf).await.unwrap();
            a.read_exact(&mut buf).await.unwrap();
            sockbus_protocol::busy_poll::touch();
            if i >= 1000 {
                lat.push(t.elapsed());
            }
        }
        p50(lat)
    })
    .await
    .unwrap();
    replier.abort();
    r
}

// ------------------------------------------------------------ raw clients

/// A protocol client without the SDK: frames in and out by hand.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(port: u16, sub: &str) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let mut b = BytesMut::new();
        encode_connect(&mut b, 0, 0, "rr-layers", b"").unwrap();
        r.s.write_all(&b).await.unwrap();
        while !matches!(r.next().await, Frame::Info { .. }) {}
        b.clear();
        encode_sub(&mut b, 1, sub, None).unwrap();
        r.s.write_all(&b).await.unwrap();
        r
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some((f, len)) = frame::decode(&self.buf, u32::MAX).unwrap() {
                let owned = Frame::from(f);
                self.buf.advance(len);
                return owned;
            }
            assert!(
                self.s.read_buf(&mut self.buf).await.unwrap() > 0,
                "broker closed"
            );
            sockbus_protocol::busy_poll::touch();
        }
    }
}

async fn raw_clients(port: u16, args: &Args) -> f64 {
    let mut svc = Raw::connect(port, "rr.svc").await;
    let replier = tokio::spawn(async move {
        let mut out = BytesMut::new();
        loop {
            if let Frame::Msg {
                reply: Some(r),
                payload,
                ..
            } = svc.next().await
            {
                out.clear();
                encode_pub(&mut out, &r, None, &[], &payload).unwrap();
                svc.s.write_all(&out).await.unwrap();
            }
        }
    });
    let mut c = Raw::connect(port, "rr.inbox.>").await;
    // Lets the broker register both subscriptions (the warm-up would fail
    // with no responder otherwise... raw clients see no error, they wait).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (size, n) = (args.size, args.requests);
    let r = tokio::spawn(async move {
        let mut req = BytesMut::new();
        encode_pub(
            &mut req,
            "rr.svc",
            Some("rr.inbox.1"),
            &[],
            &vec![0u8; size],
        )
        .unwrap();
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + 1000 {
            let t = Instant::now();
            c.s.write_all(&req).await.unwrap();
            while !matches!(c.next().await, Frame::Msg { .. }) {}
            if i >= 1000 {
                lat.push(t.elapsed());
            }
        }
        p50(lat)
    })
    .await
    .unwrap();
    replier.abort();
    r
}

// -------------------------------------------------------------------- SDK

async fn sdk_clients(port: u16, args: &Args) -> f64 {
    let url = format!("sockbus://127.0.0.1:{port}");
    let (lat, ()) = request_reply::sdk_round_trips(&url, args.size, args.requests, || ()).await;
    p50(lat)
}

// ------------------------------------------------------------------- main

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the relay (this program) or the broker (next to it) on a free port.
fn spawn_middle(layer: Layer) -> (Child, u16) {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = if layer == Layer::Relay {
        let mut c = Command::new(&exe);
        c.args(["--relay", &port.to_string()]);
        c
    } else {
        let mut c = Command::new(
            exe.parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("sockbus-broker"),
        );
        c.args(["--listen", &format!("127.0.0.1:{port}")]).args([
            "--accel",
            "off",
            "--http",
            "off",
            "--busy-poll",
            "200us",
        ]);
        c
    };
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the relay or the broker");
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(err).lines() {});
    let deadline = Instant::now() + Duration::from_secs(10);
    while !port_listening(port) {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, port)
}

/// True once something listens on the port (checked without connecting,
/// which the relay would take as its first client).
fn port_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines()
                .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
        })
        .unwrap_or(false)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(port) = args.relay {
        rt.block_on(relay(port));
        return;
    }
    let root = sockbus_broker::accel::cgroup::find_or_mount()
        .expect("cgroup v2")
        .root;
    let cg = root.join(format!("sockbus-rr-layers-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("create a cgroup (run as root)");
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .expect("move into the cgroup");
    let layers = [Layer::Relay, Layer::Raw, Layer::Sdk];
    // [layer][accel] -> samples
    let mut res: Vec<[Vec<f64>; 2]> = layers.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    for r in 0..args.rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for (li, &layer) in layers.iter().enumerate() {
            for accel in order {
                let (mut child, port) = spawn_middle(layer);
                let _fp = accel.then(|| {
                    FastPath::attach(&AttachOptions {
                        ports: vec![port],
                        cgroup: Some(cg.clone()),
                        max_sockets: None,
                    })
                    .expect("attach the fast path (run as root)")
                });
                let v = rt.block_on(async {
                    let _poll = sockbus_protocol::busy_poll::spawn(WINDOW);
                    match layer {
                        Layer::Relay => through_relay(port, &args).await,
                        Layer::Raw => raw_clients(port, &args).await,
                        Layer::Sdk => sdk_clients(port, &args).await,
                    }
                });
                let _ = child.kill();
                let _ = child.wait();
                println!(
                    "round {} {:<22} {:>3}: p50 {v:>6.1} µs",
                    r + 1,
                    layer.name(),
                    if accel { "on" } else { "off" }
                );
                res[li][accel as usize].push(v);
            }
        }
    }
    let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
    let _ = std::fs::remove_dir(&cg);
    println!(
        "\nrequest/reply round trip p50, medians of {} rounds, {} B, everything busy-polling:\n{:<24} {:>9} {:>9} {:>7}",
        args.rounds, args.size, "", "off µs", "on µs", "on/off"
    );
    for (li, layer) in layers.iter().enumerate() {
        let off = median(res[li][0].clone());
        let on = median(res[li][1].clone());
        println!(
            "{:<24} {off:>9.1} {on:>9.1} {:>7.2}",
            layer.name(),
            on / off
        );
    }
}
