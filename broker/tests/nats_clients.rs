//! NATS clients nobody here wrote, against the broker's NATS port: the
//! nats-py and nats.js scripts in tests/nats-clients/ (installed, pinned, by
//! tests/nats-clients/install.sh under target/nats-clients/), with a native
//! sockbus client on the other side of requests, and the broker restarted
//! under them. Each script prints `ok <step>` lines; this test answers its
//! `WAIT <tag>` lines and requires `ALL OK` and exit 0.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{test_config, TestBroker};
use sockbus_broker::auth::{UserConfig, Users};
use sockbus_broker::Config;

/// The whole script, however loaded the machine.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/nats-clients")
}

/// Runs install.sh (does nothing when the pinned clients are there);
/// returns the install directory.
fn install() -> PathBuf {
    static ONCE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut once = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = &*once {
        return p.clone();
    }
    let dest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nats-clients");
    let out = std::process::Command::new("bash")
        .arg(dir().join("install.sh"))
        .env("NATS_CLIENTS_DIR", &dest)
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "tests/nats-clients/install.sh failed (needs python3 with venv, node and npm, and \
         PyPI/npm or their caches):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    *once = Some(dest.clone());
    dest
}

fn nats_config() -> Config {
    Config {
        nats: Some("127.0.0.1:0".parse().unwrap()),
        lame_duck_grace: Duration::ZERO,
        ..test_config()
    }
}

/// A broker with users: `py` and `js` may publish only under their own name.
fn auth_config() -> Config {
    let user = |name: &str| UserConfig {
        name: name.into(),
        password: Some(format!("{name}-pw")),
        publish: Some(vec![format!("{name}.>")]),
        ..Default::default()
    };
    Config {
        users: Some(Arc::new(
            Users::from_config(vec![user("py"), user("js")]).unwrap(),
        )),
        ..nats_config()
    }
}

fn nats_url(b: &TestBroker) -> String {
    format!("nats://{}", b.state.config().nats.unwrap())
}

/// Answers every request on `native.svc` with `native:` + its payload and
/// its headers, until aborted.
async fn native_service(b: &TestBroker) -> tokio::task::JoinHandle<()> {
    let c = sockbus_client::connect(&b.url).await.unwrap();
    let mut sub = c.subscribe("native.svc").await.unwrap();
    c.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let mut p = b"native:".to_vec();
            p.extend_from_slice(&m.payload);
            let _ = c
                .publish_with_headers(m.reply().unwrap(), &m.headers(), p)
                .await;
        }
    })
}

/// Runs `cmd` against fresh brokers, answering its WAITs; `lang` names the
/// script's subjects (`py.svc`, `js.svc`) and its user.
async fn run_script(lang: &str, mut cmd: Command) {
    let b = TestBroker::with(nats_config()).await;
    let auth = TestBroker::with(auth_config()).await;
    let nats_addr = b.state.config().nats.unwrap();
    let svc = native_service(&b).await;
    cmd.env("NATS_URL", nats_url(&b))
        .env("NATS_AUTH_URL", nats_url(&auth))
        .env("MAX_PAYLOAD", b.state.config().max_payload.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the script");
    let mut stdin = child.stdin.take().unwrap();
    // The script's lines, read on a thread of their own.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    let mut b = Some(b);
    let run = async {
        while let Some(line) = lines.recv().await {
            seen.push(format!("{:6.1}s {line}", started.elapsed().as_secs_f64()));
            match line.as_str() {
                "WAIT serving" => {
                    let broker = b.as_ref().unwrap();
                    let c = sockbus_client::connect(&broker.url).await.unwrap();
                    let r = c.request(&format!("{lang}.svc"), "x").await.unwrap();
                    assert_eq!(r.payload, format!("{lang}:x"));
                    assert!(r.headers().get("Served-By").is_some(), "{:?}", r.headers());
                    stdin.write_all(b"done\n").unwrap();
                    stdin.flush().unwrap();
                }
                "WAIT restart" => {
                    let old = b.take().unwrap();
                    // The same data directory: JetStream's durable consumer resumes.
                    let data_dir = old.state.config().data_dir.clone();
                    old.stop().await;
                    b = Some(
                        TestBroker::with(Config {
                            nats: Some(nats_addr),
                            data_dir,
                            ..nats_config()
                        })
                        .await,
                    );
                    stdin.write_all(b"done\n").unwrap();
                    stdin.flush().unwrap();
                }
                "ALL OK" => return true,
                _ => {}
            }
        }
        false
    };
    let ok = tokio::time::timeout(SCRIPT_TIMEOUT, run).await;
    let mut err = String::new();
    if ok != Ok(true) {
        let _ = child.kill();
        let _ = stderr.read_to_string(&mut err);
    }
    assert_eq!(
        ok,
        Ok(true),
        "the {lang} script did not finish: timed out (Err) or ended early (false).\n\
         stdout: {seen:#?}\nstderr: {err}"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "{lang} script: {status}; stdout: {seen:#?}"
    );
    eprintln!("{lang} script: {seen:#?}");
    svc.abort();
}

#[tokio::test]
async fn nats_py_works_against_the_nats_port() {
    let dest = install();
    let mut cmd = Command::new(dest.join("venv/bin/python"));
    cmd.arg(dir().join("client.py"));
    run_script("py", cmd).await;
}

#[tokio::test]
async fn nats_js_works_against_the_nats_port() {
    let dest = install();
    let mut cmd = Command::new("node");
    cmd.arg(dir().join("client.js"))
        .env("NODE_PATH", dest.join("node/node_modules"));
    run_script("js", cmd).await;
}
