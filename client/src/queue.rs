//! A subscription's queue of messages, from the connection's reader to the
//! [`Subscriber`](crate::Subscriber): bounded by a message count, one
//! producer, one consumer.
//!
//! The reader appends under a lock; the subscriber takes everything queued
//! at once (it swaps its empty buffer for the shared one) and then pops
//! from its own buffer with no lock and no atomic read-modify-write. So a
//! subscriber that keeps up pays one lock per batch the reader delivered,
//! not per message, and the two sides' buffers are reused, never
//! reallocated. A general-purpose channel pays a semaphore and a shared
//! slot per message on both sides: on a 1-to-1 stream of small messages
//! that was about a seventh of the client's CPU.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::message::Message;

struct Queue {
    shared: Mutex<Shared>,
    cap: usize,
    /// Messages the receiver has taken off its own buffer, over the queue's
    /// life (written only by the receiver: a load and a store).
    taken: AtomicUsize,
}

struct Shared {
    buf: VecDeque<Message>,
    /// Messages appended over the queue's life (under the lock).
    offered: usize,
    /// The receiver, waiting for a message.
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

/// Why [`Sender::try_send`] gave the message back.
#[derive(Debug)]
pub(crate) enum TrySendError {
    /// `cap` messages are queued and not yet taken.
    Full(Message),
    /// The receiver is gone.
    Closed,
}

/// The reader's end.
pub(crate) struct Sender(Arc<Queue>);

/// The subscriber's end.
pub(crate) struct Receiver {
    q: Arc<Queue>,
    /// Taken from the shared buffer, not yet handed out.
    local: VecDeque<Message>,
}

/// A queue holding at most `cap` messages (at least one).
pub(crate) fn channel(cap: usize) -> (Sender, Receiver) {
    let q = Arc::new(Queue {
        shared: Mutex::new(Shared {
            buf: VecDeque::new(),
            offered: 0,
            waker: None,
            sender_gone: false,
            receiver_gone: false,
        }),
        cap: cap.max(1),
        taken: AtomicUsize::new(0),
    });
    (
        Sender(q.clone()),
        Receiver {
            q,
            local: VecDeque::new(),
        },
    )
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sender {
    /// Queues `m` unless the queue is full or the receiver is gone. A full
    /// queue hands the message back by value: boxing it would cost an
    /// allocation on the path that is already behind.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send(&self, m: Message) -> Result<(), TrySendError> {
        let mut s = self.0.lock();
        if s.receiver_gone {
            return Err(TrySendError::Closed);
        }
        // `taken` may lag (a relaxed read), which only overstates what is held.
        let held = s.offered.wrapping_sub(self.0.taken.load(Ordering::Relaxed));
        if held >= self.0.cap {
            return Err(TrySendError::Full(m));
        }
        s.buf.push_back(m);
        s.offered = s.offered.wrapping_add(1);
        let w = s.waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.sender_gone = true;
        let w = s.waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Receiver {
    /// The next message; `Ready(None)` once the sender is gone and
    /// everything queued was taken.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(m) = self.pop_local() {
            return Poll::Ready(Some(m));
        }
        let mut s = self.q.lock();
        if !s.buf.is_empty() {
            std::mem::swap(&mut s.buf, &mut self.local);
            drop(s);
            return Poll::Ready(self.pop_local());
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn pop_local(&mut self) -> Option<Message> {
        let m = self.local.pop_front()?;
        // The only writer: a load and a store, no locked instruction.
        let t = self.q.taken.load(Ordering::Relaxed);
        self.q.taken.store(t.wrapping_add(1), Ordering::Relaxed);
        Some(m)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut s = self.q.lock();
        s.receiver_gone = true;
        s.waker = None;
        // The messages go now, not with the last handle of the queue.
        let buf = std::mem::take(&mut s.buf);
        drop(s);
        drop(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    fn with_payload(payload: Bytes) -> Message {
        Message {
            frame: Bytes::new(),
            subject: (0, 0),
            reply: None,
            headers: (0, 0),
            payload,
            status: 0,
        }
    }

    fn msg(i: u8) -> Message {
        with_payload(Bytes::from(vec![i]))
    }

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll(rx: &mut Receiver, flag: &Arc<Flag>) -> Poll<Option<Message>> {
        let w = Waker::from(flag.clone());
        rx.poll_recv(&mut Context::from_waker(&w))
    }

    fn payload(p: Poll<Option<Message>>) -> Option<u8> {
        match p {
            Poll::Ready(Some(m)) => Some(m.payload[0]),
            _ => None,
        }
    }

    #[test]
    fn messages_come_out_in_order_and_the_bound_counts_what_the_subscriber_holds() {
        let (tx, mut rx) = channel(3);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        for i in 0..3 {
            tx.try_send(msg(i)).unwrap();
        }
        assert!(matches!(tx.try_send(msg(9)), Err(TrySendError::Full(_))));
        // Taking one (the subscriber swapped all three into its buffer)
        // makes room for exactly one more.
        assert_eq!(payload(poll(&mut rx, &flag)), Some(0));
        tx.try_send(msg(3)).unwrap();
        assert!(matches!(tx.try_send(msg(9)), Err(TrySendError::Full(_))));
        for want in 1..4 {
            assert_eq!(payload(poll(&mut rx, &flag)), Some(want));
        }
        assert!(poll(&mut rx, &flag).is_pending());
    }

    #[test]
    fn a_waiting_subscriber_is_woken_by_a_message_and_by_the_end() {
        let (tx, mut rx) = channel(8);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        assert!(poll(&mut rx, &flag).is_pending());
        tx.try_send(msg(1)).unwrap();
        assert!(flag.0.swap(false, Ordering::SeqCst), "woken by the message");
        assert_eq!(payload(poll(&mut rx, &flag)), Some(1));
        assert!(poll(&mut rx, &flag).is_pending());
        tx.try_send(msg(2)).unwrap();
        drop(tx);
        // What was queued before the end still comes out, then the end.
        assert_eq!(payload(poll(&mut rx, &flag)), Some(2));
        assert!(matches!(poll(&mut rx, &flag), Poll::Ready(None)));
    }

    #[test]
    fn a_gone_subscriber_closes_the_queue_and_frees_what_was_queued() {
        let (tx, rx) = channel(8);
        let m = msg(1);
        let frame = m.payload.clone();
        tx.try_send(m).unwrap();
        drop(rx);
        assert!(frame.is_unique(), "the queued message was dropped");
        assert!(matches!(tx.try_send(msg(2)), Err(TrySendError::Closed)));
    }

    #[test]
    fn messages_cross_threads_without_loss_under_the_bound() {
        let (tx, mut rx) = channel(64);
        let n = 200_000u32;
        let t = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < n {
                match tx.try_send(with_payload(Bytes::copy_from_slice(&i.to_le_bytes()))) {
                    Ok(()) => i += 1,
                    Err(TrySendError::Full(_)) => std::thread::yield_now(),
                    Err(TrySendError::Closed) => panic!("receiver gone"),
                }
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for want in 0..n {
                let m = std::future::poll_fn(|cx| rx.poll_recv(cx)).await.unwrap();
                let got = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
                assert_eq!(got, want);
            }
            assert!(std::future::poll_fn(|cx| rx.poll_recv(cx)).await.is_none());
        });
        t.join().unwrap();
    }
}
