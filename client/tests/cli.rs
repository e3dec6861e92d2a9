//! The `sockbus` CLI against a real broker: output format, exit codes,
//! `--server` and `SOCKBUS_URL`, exactly as docs and DESIGN.md promise.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use sockbus_broker::{Config, Server};
use tokio_util::sync::CancellationToken;

struct Broker {
    url: String,
    stop: CancellationToken,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn broker() -> Broker {
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let server = Server::bind(cfg).await.unwrap();
    let url = format!("sockbus://{}", server.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Broker { url, stop }
}

fn cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sockbus"));
    c.env_remove("SOCKBUS_URL");
    c
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_print_payloads_one_per_line_and_exit_after_count() {
    let b = broker().await;
    let mut sub = cli();
    sub.args(["--server", &b.url, "sub", "cli.>", "--count", "3"]);
    sub.stdout(Stdio::piped());
    let sub = sub.spawn().unwrap();
    // Wait until the subscription is registered: publish until it is seen.
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut watcher = c.subscribe("cli.>").await.unwrap();
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut p = cli();
    p.args(["--server", &b.url, "pub", "cli.a", "first"]);
    let out = output(p).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Data from stdin when DATA is absent, and SOCKBUS_URL instead of --server.
    let mut p = cli();
    p.env("SOCKBUS_URL", &b.url)
        .args(["pub", "cli.b", "--count", "2"])
        .stdin(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = p.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"from stdin")
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .unwrap()
            .unwrap();
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "first\nfrom stdin\nfrom stdin\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_prints_the_reply_and_fails_clearly_without_responders() {
    let b = broker().await;
    let mut r = cli();
    r.args([
        "--server", &b.url, "reply", "cli.svc", "pong", "--count", "1",
    ]);
    let mut replier = r.spawn().unwrap();
    // Retry until the replier's subscription is in place.
    let mut out = None;
    for _ in 0..50 {
        let mut q = cli();
        q.args([
            "--server",
            &b.url,
            "req",
            "cli.svc",
            "ping",
            "--timeout",
            "1s",
        ]);
        let o = output(q).await;
        if o.status.success() {
            out = Some(o);
            break;
        }
        assert!(String::from_utf8_lossy(&o.stderr).contains("no responders"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = out.expect("replier answered");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong\n");
    assert!(tokio::task::spawn_blocking(move || replier.wait().unwrap())
        .await
        .unwrap()
        .success());

    let mut q = cli();
    q.args(["--server", &b.url, "req", "cli.nobody", "x"]);
    let o = output(q).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "sockbus: no responders"
    );

    // A responder that never answers: timeout.
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let _silent = c.subscribe("cli.silent").await.unwrap();
    c.flush().await.unwrap();
    let mut q = cli();
    q.args([
        "--server",
        &b.url,
        "req",
        "cli.silent",
        "x",
        "--timeout",
        "200ms",
    ]);
    let o = output(q).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "sockbus: timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_a_nonzero_exit() {
    let b = broker().await;
    let cases: Vec<Vec<String>> = vec![
        vec![
            "--server".into(),
            b.url.clone(),
            "pub".into(),
            "bad..subject".into(),
            "x".into(),
        ],
        vec![
            "--server".into(),
            b.url.clone(),
            "sub".into(),
            "a.>.b".into(),
        ],
        vec![
            "--server".into(),
            "sockbus://127.0.0.1:1".into(),
            "pub".into(),
            "a".into(),
            "x".into(),
        ],
        vec![
            "--server".into(),
            b.url.clone(),
            "pub".into(),
            "a".into(),
            "x".into(),
            "-H".into(),
            "nocolon".into(),
        ],
    ];
    for args in cases {
        let mut c = cli();
        c.args(&args);
        let o = output(c).await;
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("sockbus: "), "{err}");
    }
}
