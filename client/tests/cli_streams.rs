//! `sockbus stream` and `sockbus consume` against a real broker: output,
//! exit codes, and a durable consumer resuming where the last run stopped.

use std::process::Command;

use sockbus_broker::{Config, Server};
use tokio_util::sync::CancellationToken;

struct Broker {
    url: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = Server::bind(cfg).await.unwrap();
    let url = format!("sockbus://{}", server.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Broker {
        url,
        stop,
        _dir: dir,
    }
}

async fn run(b: &Broker, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sockbus"));
    c.env_remove("SOCKBUS_URL")
        .arg("--server")
        .arg(&b.url)
        .args(args);
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_commands_create_list_show_and_remove_a_stream() {
    let b = broker().await;
    let (ok, out, err) = run(
        &b,
        &[
            "stream",
            "add",
            "ORDERS",
            "--subjects",
            "orders.>,refunds.*",
            "--max-age",
            "24h",
            "--max-bytes",
            "1GiB",
            "--max-msgs",
            "1000000",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "stream ORDERS created\n");
    let (ok, _, err) = run(&b, &["pub", "orders.eu", "hello"]).await;
    assert!(ok, "{err}");
    let (ok, out, _) = run(&b, &["stream", "ls"]).await;
    assert!(ok);
    let line = out.lines().nth(1).unwrap();
    assert!(
        line.starts_with("ORDERS") && line.contains("orders.>,refunds.*"),
        "{out}"
    );
    // A plain publish is stored asynchronously (no ack was asked for).
    let mut out = String::new();
    for _ in 0..100 {
        let (ok, o, _) = run(&b, &["stream", "info", "ORDERS"]).await;
        assert!(ok);
        out = o;
        if out.contains("messages:        1\n") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        out.contains("messages:        1\n") && out.contains("max age:         1day"),
        "{out}"
    );
    let (ok, out, _) = run(&b, &["stream", "rm", "ORDERS"]).await;
    assert!(ok);
    assert_eq!(out, "stream ORDERS deleted\n");
    let (ok, _, err) = run(&b, &["stream", "info", "ORDERS"]).await;
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    let (ok, _, err) = run(
        &b,
        &[
            "stream",
            "add",
            "X",
            "--subjects",
            "x",
            "--fsync",
            "sometimes",
        ],
    )
    .await;
    assert!(!ok && err.contains("--fsync"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_prints_payloads_in_order_and_a_durable_consumer_resumes() {
    let b = broker().await;
    assert!(
        run(
            &b,
            &[
                "stream",
                "add",
                "EV",
                "--subjects",
                "ev.>",
                "--fsync",
                "interval"
            ]
        )
        .await
        .0
    );
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for i in 1..=5 {
        c.publish_durable("ev.x", format!("m{i}")).await.unwrap();
    }
    let (ok, out, err) = run(&b, &["consume", "EV", "--durable", "cli", "--count", "2"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "m1\nm2\n");
    let (ok, out, err) = run(&b, &["consume", "EV", "--durable", "cli", "--count", "3"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "m3\nm4\nm5\n");
    // Another durable starts on its own; --from picks where.
    let (ok, out, _) = run(
        &b,
        &[
            "consume",
            "EV",
            "--durable",
            "other",
            "--from",
            "seq:4",
            "--count",
            "2",
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(out, "m4\nm5\n");
    let (ok, out, _) = run(
        &b,
        &[
            "consume",
            "EV",
            "--durable",
            "last",
            "--from",
            "last",
            "--count",
            "1",
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(out, "m5\n");
    let (ok, _, err) = run(&b, &["consume", "NOPE", "--durable", "x", "--count", "1"]).await;
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = run(
        &b,
        &["consume", "EV", "--durable", "x", "--from", "yesterday"],
    )
    .await;
    assert!(!ok && err.contains("--from"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_to_a_captured_subject_returns_once_every_message_is_stored() {
    let b = broker().await;
    let (ok, _, err) = run(&b, &["stream", "add", "ORDERS", "--subjects", "orders.>"]).await;
    assert!(ok, "{err}");
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let (ok, out, err) = run(&b, &["pub", "orders.eu", "hello", "--count", "500"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "", "nothing printed unless asked");
    // Straight after, with no waiting: every message is stored.
    assert_eq!(c.stream_info("ORDERS").await.unwrap().state.messages, 500);
    let (_, out, _) = run(&b, &["stream", "info", "ORDERS"]).await;
    assert!(out.contains("messages:        500\n"), "{out}");
    // --ack prints each message's stream and sequence, in order.
    let (ok, out, err) = run(&b, &["pub", "orders.us", "x", "--count", "2", "--ack"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "{\"stream\":\"ORDERS\",\"seq\":501}\n{\"stream\":\"ORDERS\",\"seq\":502}\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_to_an_uncaptured_subject_returns_at_once_as_a_plain_publish() {
    let b = broker().await;
    let (ok, _, err) = run(&b, &["stream", "add", "ORDERS", "--subjects", "orders.>"]).await;
    assert!(ok, "{err}");
    // A subscriber that never answers: a request to it could only time out.
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("plain.>").await.unwrap();
    c.flush().await.unwrap();
    let started = std::time::Instant::now();
    let (ok, out, err) = run(&b, &["pub", "plain.x", "hi", "--ack"]).await;
    assert!(ok, "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "waited {:?}, as for a reply (the request timeout is 5 s)",
        started.elapsed()
    );
    assert_eq!(out, "");
    assert!(err.contains("not stored"), "{err}");
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.payload.as_ref(), m.reply()), (&b"hi"[..], None));
}

/// A TCP relay to a broker that the test cuts, as a broker going away would:
/// open connections are dropped and new ones refused.
struct Relay {
    url: String,
    cut: CancellationToken,
}

async fn relay(to: &str) -> Relay {
    let target = to.trim_start_matches("sockbus://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("sockbus://{}", listener.local_addr().unwrap());
    let cut = CancellationToken::new();
    let stop = cut.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => return,
                },
            };
            let (stop, target) = (stop.clone(), target.clone());
            tokio::spawn(async move {
                let Ok(mut out) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Relay { url, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_fails_loudly_when_the_broker_goes_away_and_every_ack_it_printed_is_stored() {
    let b = broker().await;
    let (ok, _, err) = run(&b, &["stream", "add", "ORDERS", "--subjects", "orders.>"]).await;
    assert!(ok, "{err}");
    let r = relay(&b.url).await;
    let mut p = Command::new(env!("CARGO_BIN_EXE_sockbus"));
    p.env_remove("SOCKBUS_URL")
        .args(["--server", &r.url, "pub", "orders.eu", "m"])
        .args(["--count", "10000000", "--ack"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = p.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let acks = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for _ in 0..500 {
        if c.stream_info("ORDERS").await.unwrap().state.messages > 100 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    r.cut.cancel();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            // Killed unless it ends by itself in time (so a hang fails the test).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(25);
            while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            child.wait_with_output().unwrap()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not known to be stored"), "{stderr}");
    // What it said was stored, is: acks 1, 2, 3, ... all within the stream.
    let stored = c.stream_info("ORDERS").await.unwrap().state.last_seq;
    let acks = acks.join().unwrap();
    let mut n = 0;
    for (i, line) in acks.lines().enumerate() {
        let a: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(a["seq"], i as u64 + 1, "{line}");
        n += 1;
    }
    assert!(n > 0 && n <= stored, "{n} acks printed, {stored} stored");
}
