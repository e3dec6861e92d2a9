//! How queued frames reach the socket: a publisher writes a small batch
//! itself when the connection is quiet (no writer wake-up, no thread hop);
//! otherwise the connection's writer task sends everything queued in one
//! write.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sockbus_protocol::drain::{self, Kick};
use tokio::net::tcp::OwnedWriteHalf;

use crate::client::{lock, Inner};
use crate::error::Error;

/// Most bytes a publishing task writes to the socket itself (see
/// [`Inner::pushed`]); more goes to the writer task.
const DIRECT_MAX: usize = 32 * 1024;
/// Most bytes of one send on a plain TCP connection with
/// [`ConnectOptions::frame_aligned_sends`](crate::ConnectOptions::frame_aligned_sends):
/// whole frames only, a larger frame alone
/// ([`sockbus_protocol::outbox::Take::write_nonblocking`]). On the fast path
/// with direct delivery the kernel reads a frame header at the start of each
/// piece of a send; a header cut between two pieces puts this connection
/// through the broker for good. The kernel cuts a send into pieces of its own
/// only beyond 17 page fragments (64 KiB at the least), so sends of at most
/// 64 KiB that end on frame boundaries keep every header whole
/// (docs/fast-path.md, "Direct delivery").
pub(crate) const SEND_MAX: usize = 64 * 1024;
/// A publish writes to the socket itself only when nothing was written for
/// this many nanoseconds: a quiet connection. On a busy one the frame goes
/// to the writer task, which batches it with the others (one syscall per
/// message would cap a tight publish loop at a few hundred thousand
/// messages per second).
const QUIET_NS: u64 = 10_000;

impl Inner {
    /// Called after a push found the outbox empty: gets the frame on its way.
    /// At moderate rates the publishing task writes it to the socket itself,
    /// saving the writer task's wake-up (a thread hop, most of the latency
    /// of a request); on a connection that wrote within `QUIET_NS` the
    /// writer task takes it, so fast publishers' frames go out in batches.
    pub(crate) fn pushed(&self) {
        let now = self.now_ns();
        if now.saturating_sub(self.last_write.load(Ordering::Relaxed)) < QUIET_NS {
            self.wake.notify_one();
            return;
        }
        self.kick_at(Some(now));
    }

    /// Most bytes per send (see [`SEND_MAX`]).
    pub(crate) fn send_max(&self) -> usize {
        if self.opts.frame_aligned_sends {
            SEND_MAX
        } else {
            usize::MAX
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    pub(crate) fn wrote(&self) {
        self.last_write.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Wakes the publishers waiting for outbox space, if any (checking
    /// first saves the notifier's lock on every write).
    pub(crate) fn space_freed(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Writes what is queued to the socket without blocking when nobody else
    /// is writing and the batch is small; otherwise leaves it to the writer
    /// task (woken if needed). What the socket does not take, the writer
    /// task finishes.
    pub(crate) fn kick(&self) {
        self.kick_at(None)
    }

    /// [`Inner::kick`], `now` being the time just read by the caller (one
    /// clock read per publish, not two: it stands for the end of the write,
    /// a couple of µs off, well inside `QUIET_NS`).
    fn kick_at(&self, now: Option<u64>) {
        let sock = lock(&self.sock);
        let Some(s) = sock.as_ref() else {
            // Between connections: what is queued stays queued (the next
            // connection's reset keeps the publishes) for the next writer.
            return self.wake.notify_one();
        };
        let kicked = drain::write_now(&self.outbox, s, DIRECT_MAX, self.send_max());
        drop(sock);
        let (result, left) = match kicked {
            Kick::Wrote { result, left } => (result, left),
            Kick::Wake => return self.wake.notify_one(),
            Kick::Busy => return,
        };
        // The claim took bytes out of the outbox: room for waiting publishers.
        self.space_freed();
        match now {
            Some(now) => self.last_write.store(now, Ordering::Relaxed),
            None => self.wrote(),
        }
        // On an error the writer task meets it too, and the connection is
        // replaced.
        if left || result.is_err() {
            self.wake.notify_one();
        }
    }
}

pub(crate) async fn write_loop(inner: Arc<Inner>, wr: Arc<OwnedWriteHalf>) -> Error {
    loop {
        let Some(mut t) = inner.outbox.claim() else {
            // Nothing to write, or a publisher is writing directly (its
            // release wakes us if it leaves anything, or on close).
            if inner.is_closing() && inner.outbox.queued() == 0 && !inner.outbox.is_writing() {
                let _ = socket2::SockRef::from(wr.as_ref().as_ref())
                    .shutdown(std::net::Shutdown::Write);
                return Error::Closed;
            }
            inner.wake.notified().await;
            // Let the tasks that are ready now (say, the publishers a batch
            // of acks just released) queue their frames first: they then go
            // out in this one write instead of one write each.
            tokio::task::yield_now().await;
            continue;
        };
        if !t.data.is_empty() {
            inner.space_freed();
        }
        let r = drain::write_all(&mut t, &wr, inner.send_max()).await;
        inner.outbox.release(t);
        inner.wrote();
        if let Err(e) = r {
            return e.into();
        }
    }
}

/// [`write_loop`] for a connection only this task writes (TLS: the session
/// encrypts, so publishers never write it directly).
pub(crate) async fn write_loop_stream<W: tokio::io::AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    mut wr: W,
) -> Error {
    loop {
        let Some(mut t) = inner.outbox.claim() else {
            if inner.is_closing() && inner.outbox.queued() == 0 && !inner.outbox.is_writing() {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
                return Error::Closed;
            }
            inner.wake.notified().await;
            tokio::task::yield_now().await;
            continue;
        };
        if !t.data.is_empty() {
            inner.space_freed();
        }
        let r = drain::write_all_to(&mut t, &mut wr).await;
        inner.outbox.release(t);
        inner.wrote();
        if let Err(e) = r {
            return e.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, IoSlice};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use sockbus_protocol::{decode, Frame};

    use super::SEND_MAX;
    use crate::options::ConnectOptions;
    use crate::testing::offline_client;

    /// A socket that records each send it is handed and takes all of it, a
    /// random part of it, or nothing (would block).
    struct Recorder {
        stream: Vec<u8>,
        /// (offset in `stream` where the send began, bytes offered).
        sends: Vec<(usize, usize)>,
        rng: u64,
    }

    impl Recorder {
        fn write(&mut self, s: &[IoSlice<'_>]) -> io::Result<usize> {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let r = self.rng;
            if r.is_multiple_of(5) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let offered: usize = s.iter().map(|b| b.len()).sum();
            let n = if r.is_multiple_of(3) {
                1 + (r >> 8) as usize % offered
            } else {
                offered
            };
            self.sends.push((self.stream.len(), offered));
            let mut left = n;
            for b in s {
                let k = left.min(b.len());
                self.stream.extend_from_slice(&b[..k]);
                left -= k;
            }
            Ok(n)
        }
    }

    /// Publishers of every message size, four at once (8 B to 200 KiB), while a writer
    /// drains the client's outbox as its writer task does into a socket
    /// that takes sends whole, in part or not at all: every send the SDK
    /// makes ends on a frame boundary, holds at most `SEND_MAX` bytes or a
    /// single frame, and every message arrives once, in order per publisher.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_load_no_send_ends_inside_a_frame() {
        const PUBLISHERS: usize = 4;
        const EACH: usize = 1500;
        let client = offline_client(ConnectOptions::default().frame_aligned_sends(true));
        let done = Arc::new(AtomicBool::new(false));
        let inner = client.inner.clone();
        let stop = done.clone();
        let writer = std::thread::spawn(move || {
            let mut rec = Recorder {
                stream: Vec::new(),
                sends: Vec::new(),
                rng: 0x9e37_79b9_7f4a_7c15,
            };
            loop {
                let finished = stop.load(Ordering::Acquire);
                match inner.outbox.claim() {
                    Some(mut t) => {
                        // As the writer task does: a publisher waiting for
                        // outbox space is woken once the claim took bytes out
                        // (without this the test hung whenever the queue
                        // reached its 32 MiB budget).
                        if !t.data.is_empty() {
                            inner.space_freed();
                        }
                        let _ = t
                            .write_nonblocking(inner.send_max(), |s| rec.write(s))
                            .unwrap();
                        inner.outbox.release(t);
                    }
                    None if finished => return rec,
                    None => std::thread::yield_now(),
                }
            }
        });
        let small = [8usize, 17, 128, 900, 4000];
        let mut tasks = Vec::new();
        for p in 0..PUBLISHERS {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                let subject = format!("load.p{p}");
                for i in 0..EACH {
                    let len = match (i + p) % 50 {
                        0 => 200_000,
                        1 => 70_000,
                        2..=5 => 40_000,
                        k => small[k % small.len()],
                    };
                    let mut payload = vec![p as u8; len];
                    payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    c.publish(&subject, &payload).await.unwrap();
                    if i.is_multiple_of(500) {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for t in tasks {
            // A publisher left waiting for space is a failure, not a hang.
            tokio::time::timeout(std::time::Duration::from_secs(120), t)
                .await
                .expect("every publisher finishes: none is left waiting for outbox space")
                .unwrap();
        }
        done.store(true, Ordering::Release);
        let rec = writer.join().unwrap();

        let mut bounds = vec![0usize];
        let mut next = vec![0u64; PUBLISHERS];
        let mut at = 0;
        while let Some((f, len)) = decode(&rec.stream[at..], u32::MAX).unwrap() {
            if let Frame::Pub {
                subject, payload, ..
            } = Frame::from(f)
            {
                let p: usize = subject.strip_prefix("load.p").unwrap().parse().unwrap();
                let i = u64::from_le_bytes(payload[..8].try_into().unwrap());
                assert_eq!(i, next[p], "publisher {p}: message {i} in order, once");
                next[p] += 1;
            }
            at += len;
            bounds.push(at);
        }
        assert_eq!(at, rec.stream.len(), "the stream is whole frames");
        assert_eq!(next, vec![EACH as u64; PUBLISHERS], "every message arrived");
        let mut big = 0;
        for &(start, offered) in &rec.sends {
            let end = start + offered;
            assert!(
                bounds.binary_search(&end).is_ok(),
                "a send of {offered} bytes at {start} ends inside a frame"
            );
            if offered > SEND_MAX {
                big += 1;
                assert!(
                    !bounds.iter().any(|&b| b > start && b < end),
                    "a send of {offered} bytes at {start} holds more than one frame"
                );
            }
        }
        // The load really made batches larger than one send.
        let batched = rec.sends.iter().filter(|&&(_, n)| n > 1000).count();
        assert!(
            big > 0 && batched > 100,
            "{big} big sends, {batched} batches"
        );
    }
}
