//! The `sockbus` CLI against a real broker: output format, exit codes,
//! `--server` and `SOCKBUS_URL`, exactly as docs and DESIGN.md promise.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use sockbus_broker::{Config, Server};
use tokio_util::sync::CancellationToken;

struct Broker {
    url: String,
    stop: CancellationToken,
    state: std::sync::Arc<sockbus_broker::State>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn broker() -> Broker {
    broker_with(Config::default()).await
}

async fn broker_with(cfg: Config) -> Broker {
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..cfg
    };
    let server = Server::bind(cfg).await.unwrap();
    let url = format!("sockbus://{}", server.local_addr());
    let state = server.state();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Broker { url, stop, state }
}

/// Waits until the broker has `n` subscriptions.
async fn subscribed(b: &Broker, n: usize) {
    for _ in 0..500 {
        if b.state.subscriptions() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} subscriptions, wanted {n}", b.state.subscriptions());
}

/// Starts `sockbus sub SUBJECT ARGS..` with stdout and stderr piped, and
/// waits until the broker has its subscription.
async fn start_sub(b: &Broker, subject: &str, args: &[&str]) -> std::process::Child {
    let before = b.state.subscriptions();
    let mut c = cli();
    c.args(["--server", &b.url, "sub", subject])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    subscribed(b, before + 1).await;
    child
}

/// Waits for `child` to exit, up to `limit` (else kills it and fails with
/// `what`), and returns its status and stderr.
async fn finish(
    mut child: std::process::Child,
    limit: Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            return (status, err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads lines from `r` on a thread: nothing for `first`, then every
/// `every` lines a pause of `pause` (a slow consumer of a pipe).
fn slow_reader(
    r: impl std::io::Read + Send + 'static,
    first: Duration,
    every: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::thread::sleep(first);
        let mut lines = Vec::new();
        for l in std::io::BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            lines.push(l);
            if lines.len() % every == 0 {
                std::thread::sleep(pause);
            }
        }
        lines
    })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_through_a_slow_pipe_gets_every_message_in_order() {
    const N: usize = 300_000;
    let b = broker().await;
    let mut child = start_sub(&b, "slow.x", &["--count", &N.to_string()]).await;
    // The pipe fills while nobody reads, then drains in slow steps.
    let lines = slow_reader(
        child.stdout.take().unwrap(),
        Duration::from_secs(1),
        30_000,
        Duration::from_millis(100),
    );
    let c = sockbus_client::connect(&b.url).await.unwrap();
    for i in 0..N {
        c.publish("slow.x", i.to_string()).await.unwrap();
    }
    c.flush().await.unwrap();
    let (status, err) = finish(
        child,
        Duration::from_secs(120),
        "the CLI never printed all the messages",
    )
    .await;
    let lines = lines.await.unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(lines.len(), N);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l, &i.to_string(), "line {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_cut_off_by_the_broker_says_so_on_stderr_and_exits_nonzero() {
    // A broker that holds little for a slow subscriber.
    let b = broker_with(Config {
        max_payload: 64 << 10,
        max_pending: 256 << 10,
        ..Config::default()
    })
    .await;
    const N: usize = 40_000;
    let mut child = start_sub(&b, "cut.x", &["--count", &N.to_string()]).await;
    let stdout = child.stdout.take().unwrap();
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let payload = "p".repeat(1024);
    for _ in 0..N {
        c.publish("cut.x", &payload).await.unwrap();
    }
    c.flush().await.unwrap();
    // Read only once the broker has given up on the subscriber.
    for _ in 0..1000 {
        if b.state.metrics().slow_consumers.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.state.metrics().slow_consumers.load(Ordering::Relaxed), 1);
    let lines = slow_reader(stdout, Duration::ZERO, usize::MAX, Duration::ZERO);
    let (status, err) = finish(
        child,
        Duration::from_secs(60),
        "the CLI did not end once the broker had cut it off",
    )
    .await;
    let printed = lines.await.unwrap().len();
    assert!(!status.success(), "{printed} printed; {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "connection to the broker lost after {printed} messages"
        )),
        "{err}"
    );
    assert!(printed < N, "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_whose_reader_closes_the_pipe_exits_nonzero_at_once() {
    let b = broker().await;
    let mut child = start_sub(&b, "gone.x", &[]).await;
    let c = sockbus_client::connect(&b.url).await.unwrap();
    c.publish("gone.x", "first").await.unwrap();
    c.flush().await.unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        l
    })
    .await
    .unwrap();
    assert_eq!(first, "first\n");
    // The reader has closed its end (dropped above); the next write fails.
    for i in 0..10 {
        c.publish("gone.x", format!("m{i}")).await.unwrap();
    }
    c.flush().await.unwrap();
    let (status, err) = finish(child, Duration::from_secs(10), "the CLI did not end").await;
    assert!(!status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot write to stdout after 1 messages"),
        "{err}"
    );
}

/// A broker with the user `orders` (publish `orders.>` except
/// `orders.admin.>`, subscribe `orders.>` and `_INBOX.>`).
async fn broker_with_users() -> Broker {
    use sockbus_broker::auth::{UserConfig, Users};
    let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    let users = Users::from_config(vec![UserConfig {
        name: "orders".into(),
        password: Some("pw".into()),
        publish: list(&["orders.>"]),
        subscribe: list(&["orders.>", "_INBOX.>"]),
        publish_deny: list(&["orders.admin.>"]),
        ..Default::default()
    }])
    .unwrap();
    broker_with(Config {
        users: Some(std::sync::Arc::new(users)),
        ..Config::default()
    })
    .await
}

#[tokio::test]
async fn the_cli_says_authorization_failed_and_permission_denied_in_one_line() {
    let b = broker_with_users().await;
    let host = b.url.trim_start_matches("sockbus://").to_string();
    let run = |args: Vec<String>, env: &[(&str, &str)]| {
        let mut c = cli();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        output(c)
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Wrong password, in the URL and with the flags: no secret echoed.
    for (args, env) in [
        (
            s(&[
                "--server",
                &format!("sockbus://orders:wrong@{host}"),
                "pub",
                "orders.x",
                "1",
            ]),
            vec![],
        ),
        (
            s(&[
                "--server",
                &b.url,
                "--user",
                "orders",
                "--password",
                "wrong",
                "pub",
                "orders.x",
                "1",
            ]),
            vec![],
        ),
        (
            s(&["--server", &b.url, "pub", "orders.x", "1"]),
            vec![("SOCKBUS_USER", "orders"), ("SOCKBUS_PASSWORD", "wrong")],
        ),
        (s(&["--server", &b.url, "pub", "orders.x", "1"]), vec![]),
    ] {
        let o = run(args.clone(), &env).await;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim(), "sockbus: authorization failed", "{args:?}");
    }
    // Right password, denied subject.
    let o = run(
        s(&[
            "--server",
            &format!("sockbus://orders:pw@{host}"),
            "pub",
            "orders.admin.x",
            "1",
        ]),
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "sockbus: permission denied: publish to orders.admin.x"
    );
    let o = run(
        s(&[
            "--server",
            &b.url,
            "--user",
            "orders",
            "--password",
            "pw",
            "sub",
            "billing.>",
        ]),
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "sockbus: permission denied: subscribe to billing.>"
    );
    // A request to a denied subject says so at once, not `timeout`.
    let o = run(
        s(&[
            "--server",
            &format!("sockbus://orders:pw@{host}"),
            "req",
            "billing.get",
            "?",
            "--timeout",
            "10m",
        ]),
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "sockbus: permission denied: publish to billing.get"
    );
    let o = run(
        s(&[
            "--server",
            &b.url,
            "--user",
            "orders",
            "--password",
            "pw",
            "pub",
            "orders.new",
            "1",
        ]),
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test]
async fn passwd_prints_an_argon2id_hash_of_stdin() {
    let mut c = cli();
    c.arg("passwd").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let hash = String::from_utf8(o.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let users = sockbus_broker::auth::Users::from_config(vec![sockbus_broker::auth::UserConfig {
        name: "u".into(),
        password: Some(hash.trim().into()),
        ..Default::default()
    }])
    .unwrap();
    let ok = users
        .authenticate(sockbus_protocol::Credentials::UserPassword {
            user: "u",
            password: b"s3cret",
        })
        .await;
    assert!(
        ok.is_ok(),
        "the hash verifies the password without its line end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_at_its_connection_limit_is_one_line_naming_the_limit_with_exit_1() {
    use sockbus_broker::auth::{UserConfig, Users};
    use sockbus_broker::config::AccountLimits;
    let users = Users::from_config(vec![UserConfig {
        name: "s".into(),
        password: Some("pw".into()),
        account: Some("shop".into()),
        ..Default::default()
    }])
    .unwrap();
    let b = broker_with(Config {
        users: Some(std::sync::Arc::new(users)),
        accounts: vec![AccountLimits {
            name: "shop".into(),
            max_connections: Some(1),
            ..Default::default()
        }],
        ..Config::default()
    })
    .await;
    let url = b.url.replace("sockbus://", "sockbus://s:pw@");
    // The account's one connection.
    let _held = sockbus_client::connect(&url).await.unwrap();
    let mut c = cli();
    c.args(["--server", &url, "pub", "x", "1"]);
    let o = output(c).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("sockbus: ")
            && err.contains(r#"account "shop" is at its connection limit of 1 (max-connections"#),
        "{err}"
    );
    assert!(!err.contains("pw"), "no secret echoed: {err}");
}
