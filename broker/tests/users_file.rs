//! `--users-file` over real sockets: its users authenticate, and a changed
//! file takes effect for new connections without dropping the ones up; a
//! broken file keeps the users in force.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::TestBroker;
use sockbus_broker::Options;
use sockbus_client::{ConnectOptions, Error};

fn opts() -> ConnectOptions {
    ConnectOptions::new()
        .max_reconnects(0)
        .connect_timeout(Duration::from_secs(10))
}

async fn can_connect(b: &TestBroker, userinfo: &str) -> Result<(), Error> {
    let c = opts()
        .connect(&format!("sockbus://{userinfo}@{}", b.addr))
        .await?;
    c.flush().await
}

/// Polls `f` until it holds (at most 60 s: the file is polled every 2 s).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces the file the way a Secret update does: a new file renamed
/// over it.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_changed_users_file_applies_to_new_connections_and_drops_none() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.toml");
    write(
        &file,
        "[[users]]\nname = \"alice\"\npassword = \"a-pw\"\npublish = [\"a.>\"]\n",
    );
    let mut cfg = Options {
        users_file: Some(file.clone()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http = None;
    cfg.data_dir = common::scratch_dir();
    let b = TestBroker::with(cfg).await;
    let live = b.state.live_users().unwrap().clone();

    let alice = opts()
        .connect(&format!("sockbus://alice:a-pw@{}", b.addr))
        .await
        .unwrap();
    let mut sub = alice.subscribe("a.>").await.unwrap();
    alice.flush().await.unwrap();
    assert!(matches!(
        can_connect(&b, "bob:b-pw").await,
        Err(Error::Authorization(_))
    ));

    // alice goes, bob comes.
    write(&file, "[[users]]\nname = \"bob\"\npassword = \"b-pw\"\n");
    eventually("bob may connect", async || {
        can_connect(&b, "bob:b-pw").await.is_ok()
    })
    .await;
    assert!(matches!(
        can_connect(&b, "alice:a-pw").await,
        Err(Error::Authorization(_))
    ));
    // alice's connection is still up, with alice's permissions.
    alice.publish("a.1", "still here").await.unwrap();
    alice.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"still here");
    alice.publish("b.1", "no").await.unwrap();
    assert!(matches!(
        alice.flush().await,
        Err(Error::PermissionDenied { .. })
    ));

    // A broken file is refused; bob stays.
    let failed = live.reload_failures.load(Ordering::Relaxed);
    write(&file, "[[users]]\nname = \"carol\"\n");
    eventually("the broken file is refused", async || {
        live.reload_failures.load(Ordering::Relaxed) > failed
    })
    .await;
    can_connect(&b, "bob:b-pw").await.unwrap();
    let ok = live.reloads.load(Ordering::Relaxed);
    write(&file, "[[users]]\nname = \"carol\"\ntoken = \"c-tok\"\n");
    eventually("carol may connect", async || {
        can_connect(&b, "c-tok").await.is_ok()
    })
    .await;
    assert!(live.reloads.load(Ordering::Relaxed) > ok);

    // SIGHUP rereads it: a change the poll cannot see (same size, same
    // modification time) takes effect on the signal.
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, "[[users]]\nname = \"daisy\"\ntoken = \"d-tok\"\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(before)
        .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // a poll or two pass
    assert!(
        can_connect(&b, "d-tok").await.is_err(),
        "the poll saw no change"
    );
    // SAFETY: kill(2) on this process; the broker's watcher handles SIGHUP.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    eventually("daisy may connect after SIGHUP", async || {
        can_connect(&b, "d-tok").await.is_ok()
    })
    .await;
    b.stop().await;
}
