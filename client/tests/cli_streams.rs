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
