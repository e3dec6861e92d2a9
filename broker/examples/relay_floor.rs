//! The floor under accel_bench's request/reply: the same four-hop round trip
//! (requester → relay → replier → relay → requester) through a relay that
//! only copies bytes between two sockets, no broker. Every process runs a
//! one-thread tokio runtime that busy-polls, as `accel_bench --busy-poll-us`
//! does, and the fast path is off and on alternately.
//!
//!   cargo build --release -p sockbus-broker --example relay_floor
//!   sudo target/release/examples/relay_floor [--rounds 5] [--requests 30000] [--size 128]
//!
//! What accel_bench measures above this is the broker's and the SDK's own
//! work (parsing, routing, subscriptions, request bookkeeping). Needs root.

use std::time::{Duration, Instant};

use clap::Parser;
use sockbus_broker::accel::{AttachOptions, FastPath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 30_000)]
    requests: usize,
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Internal: run as the relay on this port.
    #[arg(long, hide = true)]
    relay: Option<u16>,
}

/// Keeps the runtime looking for I/O instead of sleeping.
fn busy_poll() {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await
        }
    });
}

/// Copies whatever one socket reads to the other.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

async fn relay(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    busy_poll();
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

/// Round trips from the requester through the relay to the replier and back: p50 µs.
async fn round_trips(port: u16, args: &Args) -> f64 {
    busy_poll();
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
            if b.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let n = args.requests;
    let p50 = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + 1000 {
            let t = Instant::now();
            a.write_all(&buf).await.unwrap();
            a.read_exact(&mut buf).await.unwrap();
            if i >= 1000 {
                lat.push(t.elapsed());
            }
        }
        lat.sort_unstable();
        lat[lat.len() / 2].as_secs_f64() * 1e6
    })
    .await
    .unwrap();
    replier.abort();
    p50
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
    let cg = root.join(format!("sockbus-relay-floor-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("create a cgroup (run as root)");
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .expect("move into the cgroup");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..args.rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for accel in order {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--relay", &port.to_string()])
                .spawn()
                .expect("start the relay");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !port_listening(port) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _fp = accel.then(|| {
                FastPath::attach(&AttachOptions {
                    ports: vec![port],
                    cgroup: Some(cg.clone()),
                    max_sockets: None,
                })
                .expect("attach the fast path (run as root)")
            });
            let p50 = rt.block_on(round_trips(port, &args));
            let _ = child.kill();
            let _ = child.wait();
            println!(
                "round {} {:>3}: round trip p50 {p50:.1} µs",
                r + 1,
                if accel { "on" } else { "off" }
            );
            if accel {
                on.push(p50)
            } else {
                off.push(p50)
            }
        }
    }
    let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
    let _ = std::fs::remove_dir(&cg);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(&mut off), med(&mut on));
    println!(
        "\nmedians of {} rounds, {} B: off {a:.1} µs, on {b:.1} µs, on/off {:.2}",
        args.rounds,
        args.size,
        b / a
    );
}

/// True once something listens on the port (checked without connecting).
fn port_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines()
                .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
        })
        .unwrap_or(false)
}
