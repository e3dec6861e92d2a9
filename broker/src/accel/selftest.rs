//! The fast path proves itself before anything relies on it: a TCP
//! connection on loopback, both ends in the socket hash, run through the
//! checks real traffic depends on. sockmap has a history of kernel bugs
//! (stalled sends, a wrong FIONREAD, lost EOFs) that differ between kernel
//! versions; a kernel that gets any check wrong is not used (`--accel auto`
//! falls back to plain TCP, `--accel on` and the node agent refuse to
//! start), with one log line naming the check.
//!
//! The checks, in order ([`CHECKS`]):
//! - `insert`: both ends enter the socket hash under the keys the programs
//!   compute (inserted by the loader, as `sockbus_sock_ops` would: the test
//!   connection's port is not one of the accelerated ports, and this process
//!   need not be in the attach cgroup).
//! - `order`: 1,000 small writes one way and 200 the other arrive intact
//!   and in order.
//! - `fionread`: after a 4,096-byte write, `FIONREAD` on the receiver says
//!   4,096.
//! - `large`: one 4 MiB write arrives intact.
//! - `redirect`: the bytes went socket to socket: the redirect counters
//!   cover them, and neither socket sent or received one TCP data segment
//!   (`TCP_INFO`).
//! - `eof`: a shutdown is seen as EOF by the peer after the data, and the
//!   peer's close is seen by the first socket.
//!
//! - `direct` (only when direct delivery is wanted, [`run_direct`]): a PUB
//!   on a routed subject goes from a publisher socket straight into a
//!   subscriber socket as the MSG the broker would write, and a PUB on
//!   another subject still reaches the broker's end intact. A failure turns
//!   direct delivery off and leaves the rest of the fast path on.
//!
//! The whole test runs on a thread of its own and is bounded: a check that
//! does not finish within [`LIMIT`] fails.
//!
//! For tests only (debug builds; a release build ignores it, see
//! [`super::test_hook`]), `SOCKBUS_ACCEL_SELFTEST_FAIL=<check>` makes that
//! check fail: `insert` leaves the pair out of the map and `redirect` removes the
//! receiver from it (both real breakages the checks then detect); `hang`
//! makes the first check sleep past the limit; any other check name fails
//! that check outright, saying so.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockbus_protocol::frame;
use sockbus_protocol::subject::subject_hash;

use super::direct::DirectMaps;
use super::loader::{FastPath, Handles};
use super::sock;

/// Every check, in the order they run.
pub const CHECKS: [&str; 6] = ["insert", "order", "fionread", "large", "redirect", "eof"];

/// Longest the whole self-test may take.
pub const LIMIT: Duration = Duration::from_secs(2);

/// The direct-delivery check ([`run_direct`]); not in [`CHECKS`], which a
/// kernel must pass for the fast path to be used at all.
pub const DIRECT_CHECK: &str = "direct";

/// The subject the direct check routes: under `$SB.`, which no client may
/// subscribe to, and routed only for the check's own sockets.
const DIRECT_SUBJECT: &str = "$SB.SELFTEST.DIRECT";

/// The test hook's variable (see the module documentation).
pub const FAIL_VAR: &str = "SOCKBUS_ACCEL_SELFTEST_FAIL";

const LARGE: usize = 4 << 20;
const FIONREAD_BYTES: usize = 4096;

/// A check that failed and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub check: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "check {}: {}", self.check, self.detail)
    }
}

fn fail(check: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        check,
        detail: detail.into(),
    }
}

/// Runs every check against the attached `fp`; returns how long it took.
pub fn run(fp: &FastPath) -> Result<Duration, Failure> {
    let hook = super::test_hook(FAIL_VAR);
    if let Some(h) = &hook {
        if h != "hang" && h != DIRECT_CHECK && !CHECKS.contains(&h.as_str()) {
            return Err(fail(
                "hook",
                format!(
                    "{FAIL_VAR}={h} names no check (one of {}, {DIRECT_CHECK}, hang)",
                    CHECKS.join(", ")
                ),
            ));
        }
    }
    let t = Instant::now();
    let mut handles = fp
        .handles()
        .map_err(|e| fail("insert", format!("cannot open the maps: {e}")))?;
    let at = Arc::new(AtomicUsize::new(0));
    let gave_up = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (progress, abandoned) = (at.clone(), gave_up.clone());
    std::thread::Builder::new()
        .name("accel-selftest".into())
        .spawn(move || {
            let _ = tx.send(checks(&mut handles, &progress, &abandoned, hook.as_deref()));
        })
        .map_err(|e| fail("insert", format!("cannot start the test thread: {e}")))?;
    match rx.recv_timeout(LIMIT) {
        Ok(r) => r.map(|()| t.elapsed()),
        // Every socket call of the thread times out by itself (SO_RCVTIMEO,
        // SO_SNDTIMEO): it ends on its own soon after.
        Err(_) => {
            // Its next check does not start.
            gave_up.store(true, Ordering::Relaxed);
            Err(fail(
                CHECKS[at.load(Ordering::Relaxed).min(CHECKS.len() - 1)],
                format!("did not finish within {LIMIT:?}"),
            ))
        }
    }
}

fn checks(
    maps: &mut Handles,
    at: &AtomicUsize,
    gave_up: &AtomicBool,
    hook: Option<&str>,
) -> Result<(), Failure> {
    // When each check started, for a debug line per check.
    let started = std::cell::Cell::new(Instant::now());
    let done = |i: usize| {
        tracing::debug!(
            "fast path self-test: check {} passed in {} us",
            CHECKS[i],
            started.replace(Instant::now()).elapsed().as_micros()
        );
    };
    let step = |i: usize| {
        let check = CHECKS[i];
        if i > 0 {
            done(i - 1);
        }
        if gave_up.load(Ordering::Relaxed) {
            return Err(fail(check, "abandoned"));
        }
        at.store(i, Ordering::Relaxed);
        if hook == Some(check) && !matches!(check, "insert" | "redirect") {
            return Err(fail(
                check,
                format!("failed on purpose ({FAIL_VAR}={check})"),
            ));
        }
        Ok(check)
    };

    // --- insert
    let check = step(0)?;
    if hook == Some("hang") {
        std::thread::sleep(LIMIT + Duration::from_secs(1));
        if gave_up.load(Ordering::Relaxed) {
            return Err(fail(check, "abandoned"));
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(io(check, "listen on 127.0.0.1"))?;
    let mut a = TcpStream::connect(l.local_addr().map_err(io(check, "listener address"))?)
        .map_err(io(check, "connect"))?;
    let (mut b, _) = l.accept().map_err(io(check, "accept"))?;
    drop(l);
    for s in [&a, &b] {
        s.set_read_timeout(Some(LIMIT))
            .map_err(io(check, "SO_RCVTIMEO"))?;
        s.set_write_timeout(Some(LIMIT))
            .map_err(io(check, "SO_SNDTIMEO"))?;
        s.set_nodelay(true).map_err(io(check, "TCP_NODELAY"))?;
    }
    let (ka, kb) = sock::keys(&a).map_err(io(check, "socket keys"))?;
    // With port 0 configured and this process in the attach cgroup,
    // `sockbus_sock_ops` has inserted them already.
    let there = maps
        .contains(&[ka, kb])
        .map_err(io(check, "walk SOCKBUS_SOCKS"))?;
    if hook == Some("insert") {
        for (k, _) in [ka, kb].iter().zip(&there).filter(|(_, t)| **t) {
            let _ = maps.socks.remove(k);
        }
    } else {
        for ((k, s), _) in [(ka, &a), (kb, &b)]
            .into_iter()
            .zip(there)
            .filter(|(_, t)| !t)
        {
            maps.socks
                .insert(k, s.as_raw_fd(), 0)
                .map_err(|e| fail(check, format!("insert into SOCKBUS_SOCKS: {e}")))?;
        }
    }
    let found = maps
        .contains(&[ka, kb])
        .map_err(io(check, "walk SOCKBUS_SOCKS"))?;
    if found != [true, true] {
        return Err(fail(
            check,
            format!(
                "the connection's ends are not in SOCKBUS_SOCKS after the insert (found {found:?})"
            ),
        ));
    }
    if hook == Some("redirect") {
        // A deliberately broken map: the receiver is gone, so a's sends
        // miss and go over TCP. The checks before `redirect` still pass.
        maps.socks
            .remove(&kb)
            .map_err(|e| fail(check, format!("remove from SOCKBUS_SOCKS: {e}")))?;
    }
    let stats0 = maps.stats().map_err(io(check, "read SOCKBUS_STATS"))?;
    let segs_a0 = sock::data_segments(&a).map_err(io(check, "TCP_INFO"))?;
    let segs_b0 = sock::data_segments(&b).map_err(io(check, "TCP_INFO"))?;
    let mut sent = 0u64;

    // --- order: many small writes, both ways.
    let check = step(1)?;
    for (mut from, mut to, n) in [(&a, &b, 1000u32), (&b, &a, 200)] {
        let mut want = Vec::new();
        for i in 0..n {
            let m = small(i);
            from.write_all(&m).map_err(io(check, "write"))?;
            want.extend_from_slice(&m);
        }
        sent += want.len() as u64;
        let mut got = vec![0u8; want.len()];
        to.read_exact(&mut got).map_err(io(check, "read"))?;
        if let Some(at) = got.iter().zip(&want).position(|(x, y)| x != y) {
            return Err(fail(
                check,
                format!("byte {at} of {} differs after {n} small writes", want.len()),
            ));
        }
    }

    // --- fionread: the receiver is told how much it can read.
    let check = step(2)?;
    let block: Vec<u8> = (0..FIONREAD_BYTES).map(|i| (i * 7) as u8).collect();
    a.write_all(&block).map_err(io(check, "write"))?;
    sent += block.len() as u64;
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut n = 0;
    while Instant::now() < deadline {
        n = sock::readable(&b).map_err(io(check, "FIONREAD"))?;
        if n >= FIONREAD_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if n != FIONREAD_BYTES {
        return Err(fail(
            check,
            format!("FIONREAD on the receiver says {n} bytes; {FIONREAD_BYTES} were queued"),
        ));
    }
    let mut got = vec![0u8; FIONREAD_BYTES];
    b.read_exact(&mut got).map_err(io(check, "read"))?;
    if got != block {
        return Err(fail(check, "the 4,096 bytes read back differ"));
    }

    // --- large: one write of several MiB, read as it arrives.
    let check = step(3)?;
    // A 251-byte pattern (prime: no period of the stream lines up with
    // the 64 KiB a verdict covers), copied, not computed byte by byte.
    let mut big = (0..251u8).collect::<Vec<u8>>().repeat(LARGE / 251 + 1);
    big.truncate(LARGE);
    let read = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut got = vec![0u8; LARGE];
            b.read_exact(&mut got).map(|()| got == big)
        });
        let wrote = a.write_all(&big);
        (wrote, reader.join())
    });
    match read {
        (Err(e), _) => return Err(fail(check, format!("write of {LARGE} bytes: {e}"))),
        (_, Err(_)) => return Err(fail(check, "the reading thread panicked")),
        (_, Ok(Err(e))) => return Err(fail(check, format!("read of {LARGE} bytes: {e}"))),
        (_, Ok(Ok(false))) => {
            return Err(fail(check, format!("the {LARGE} bytes read back differ")))
        }
        (Ok(()), Ok(Ok(true))) => sent += LARGE as u64,
    }

    // --- redirect: the bytes went socket to socket, not over TCP.
    let check = step(4)?;
    let stats1 = maps.stats().map_err(io(check, "read SOCKBUS_STATS"))?;
    let segs_a1 = sock::data_segments(&a).map_err(io(check, "TCP_INFO"))?;
    let segs_b1 = sock::data_segments(&b).map_err(io(check, "TCP_INFO"))?;
    let segs = segs_a1.0.wrapping_sub(segs_a0.0) + segs_b1.0.wrapping_sub(segs_b0.0);
    if segs > 0 {
        return Err(fail(
            check,
            format!("{segs} TCP data segments carried the test's bytes: they did not go through the redirect"),
        ));
    }
    let covered = stats1
        .bytes_redirected
        .saturating_sub(stats0.bytes_redirected);
    if stats1.redirect_verdicts == stats0.redirect_verdicts || covered < sent {
        return Err(fail(
            check,
            format!(
                "the redirect counters cover {covered} bytes in {} verdicts; {sent} were sent",
                stats1.redirect_verdicts - stats0.redirect_verdicts
            ),
        ));
    }

    // --- eof: shutdown and close reach the peer.
    let check = step(5)?;
    a.write_all(b"last").map_err(io(check, "write"))?;
    a.shutdown(Shutdown::Write).map_err(io(check, "shutdown"))?;
    let mut rest = Vec::new();
    b.read_to_end(&mut rest).map_err(|e| {
        fail(
            check,
            format!("the peer never saw EOF after a shutdown: {e}"),
        )
    })?;
    if rest != b"last" {
        return Err(fail(
            check,
            format!("the peer read {rest:?} before EOF, not \"last\""),
        ));
    }
    drop(b);
    let mut tmp = [0u8; 16];
    match a.read(&mut tmp) {
        Ok(0) => {}
        Ok(n) => return Err(fail(check, format!("read {n} bytes after the peer closed"))),
        // A reset is a close seen too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(fail(check, format!("the peer's close was never seen: {e}"))),
    }
    done(CHECKS.len() - 1);
    Ok(())
}

/// The direct-delivery check against the attached `fp` (see the module
/// documentation); returns how long it took. Bounded by [`LIMIT`] like
/// [`run`]. Leaves no route, publisher or grant behind.
pub fn run_direct(fp: &FastPath) -> Result<Duration, Failure> {
    let check = DIRECT_CHECK;
    let hook = super::test_hook(FAIL_VAR);
    if hook.as_deref() == Some(check) {
        return Err(fail(
            check,
            format!("failed on purpose ({FAIL_VAR}={check})"),
        ));
    }
    let t = Instant::now();
    let mut handles = fp
        .handles()
        .map_err(|e| fail(check, format!("cannot open the maps: {e}")))?;
    let mut maps = fp
        .direct()
        .map_err(|e| fail(check, format!("cannot open the direct maps: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("accel-selftest-direct".into())
        .spawn(move || {
            let _ = tx.send(direct_check(&mut handles, &mut maps));
        })
        .map_err(|e| fail(check, format!("cannot start the test thread: {e}")))?;
    match rx.recv_timeout(LIMIT) {
        Ok(r) => r.map(|()| t.elapsed()),
        // Its sockets time out by themselves (SO_RCVTIMEO), so it ends soon.
        Err(_) => Err(fail(check, format!("did not finish within {LIMIT:?}"))),
    }
}

fn direct_check(maps: &mut Handles, direct: &mut DirectMaps) -> Result<(), Failure> {
    let check = DIRECT_CHECK;
    let l = TcpListener::bind("127.0.0.1:0").map_err(io(check, "listen on 127.0.0.1"))?;
    let addr = l.local_addr().map_err(io(check, "listener address"))?;
    // p: the publisher's end, pb: the broker's end of it; s, sb likewise.
    let mut p = TcpStream::connect(addr).map_err(io(check, "connect"))?;
    let (mut pb, _) = l.accept().map_err(io(check, "accept"))?;
    let mut s = TcpStream::connect(addr).map_err(io(check, "connect"))?;
    let (sb, _) = l.accept().map_err(io(check, "accept"))?;
    drop(l);
    for x in [&p, &pb, &s, &sb] {
        x.set_read_timeout(Some(LIMIT))
            .map_err(io(check, "SO_RCVTIMEO"))?;
        x.set_nodelay(true).map_err(io(check, "TCP_NODELAY"))?;
    }
    let (pk, pbk) = sock::keys(&p).map_err(io(check, "socket keys"))?;
    let (sk, sbk) = sock::keys(&s).map_err(io(check, "socket keys"))?;
    let keys = [pk, pbk, sk, sbk];
    let there = maps
        .contains(&keys)
        .map_err(io(check, "walk SOCKBUS_SOCKS"))?;
    for ((k, x), _) in keys
        .into_iter()
        .zip([&p, &pb, &s, &sb])
        .zip(there)
        .filter(|(_, t)| !t)
    {
        maps.socks
            .insert(k, x.as_raw_fd(), 0)
            .map_err(|e| fail(check, format!("insert into SOCKBUS_SOCKS: {e}")))?;
    }
    let r = (|| {
        let err = |what: &'static str| move |e: std::io::Error| fail(check, format!("{what}: {e}"));
        direct
            .track_publisher(pk)
            .map_err(err("SOCKBUS_DIRECT_PUBS"))?;
        direct
            .add_route(DIRECT_SUBJECT, sk, 7)
            .map_err(err("SOCKBUS_DIRECT_ROUTES"))?;
        direct.allow(pk).map_err(err("SOCKBUS_DIRECT_ALLOW"))?;
        direct.set_done(pk, 0).map_err(err("SOCKBUS_DIRECT_DONE"))?;
        direct
            .grant(sk, 1 << 20)
            .map_err(err("SOCKBUS_DIRECT_GRANT"))?;
        let payload = b"direct self-test";
        let mut pubf = bytes::BytesMut::new();
        frame::encode_pub(
            &mut pubf,
            DIRECT_SUBJECT,
            Some("_INBOX.selftest.1"),
            &[],
            payload,
        )
        .map_err(|e| fail(check, format!("encode PUB: {e}")))?;
        let mut other = bytes::BytesMut::new();
        frame::encode_pub(&mut other, "$SB.SELFTEST.OTHER", None, &[], payload)
            .map_err(|e| fail(check, format!("encode PUB: {e}")))?;
        let mut want = bytes::BytesMut::new();
        frame::encode_msg(
            &mut want,
            7,
            0,
            DIRECT_SUBJECT,
            subject_hash(DIRECT_SUBJECT.as_bytes()),
            Some("_INBOX.selftest.1"),
            &[],
            payload,
        );
        // Both frames in one send: a verdict each (the second frame, of
        // another subject, ends the first one's run).
        let mut both = pubf.to_vec();
        both.extend_from_slice(&other);
        p.write_all(&both).map_err(io(check, "write"))?;
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).map_err(|e| {
            fail(
                check,
                format!("the routed PUB never reached the subscriber: {e}"),
            )
        })?;
        if got != want[..] {
            return Err(fail(
                check,
                "the subscriber got other bytes than the MSG the broker would write",
            ));
        }
        let mut got = vec![0u8; other.len()];
        pb.read_exact(&mut got).map_err(|e| {
            fail(
                check,
                format!("the unrouted PUB never reached the broker's end: {e}"),
            )
        })?;
        if got != other[..] {
            return Err(fail(
                check,
                "the unrouted PUB reached the broker's end changed",
            ));
        }
        let st = direct
            .publisher(&pk)
            .ok_or_else(|| fail(check, "the publisher's state is gone"))?;
        if st.direct_msgs != 1 || st.passed != other.len() as u64 {
            return Err(fail(
                check,
                format!(
                    "the publisher's counters say {} direct and {} bytes to the broker; 1 and {} were sent",
                    st.direct_msgs,
                    st.passed,
                    other.len()
                ),
            ));
        }
        Ok(())
    })();
    direct.remove_route(DIRECT_SUBJECT);
    for k in &keys {
        direct.forget(k);
    }
    r
}

fn io(check: &'static str, what: &'static str) -> impl Fn(std::io::Error) -> Failure {
    move |e| fail(check, format!("{what}: {e}"))
}

/// The i-th small message: 1 to 200 bytes, each telling its number.
fn small(i: u32) -> Vec<u8> {
    let len = 1 + (i as usize * 37) % 200;
    (0..len).map(|j| (i as usize + j) as u8).collect()
}
