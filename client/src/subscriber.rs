//! Subscriptions: the user's [`Subscriber`] stream, and the entry the
//! reader delivers to ([`SubEntry`], kept in the client's [`SubMap`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use sockbus_protocol::frame::encode_unsub;
use tokio::sync::mpsc;

use crate::client::{lock, Client};
use crate::error::Result;
use crate::message::Message;
use crate::reader::poll_reading;

/// Subscriptions by id; ids are small integers, so a fast non-keyed hash suffices.
pub(crate) type SubMap = HashMap<u32, SubEntry, rustc_hash::FxBuildHasher>;

/// A subscription as the reader sees it: where its messages go, and its counts.
pub(crate) struct SubEntry {
    pub(crate) subject: String,
    pub(crate) queue: Option<String>,
    pub(crate) tx: mpsc::Sender<Message>,
    /// Payload bytes queued for the subscriber over its life (the reader's
    /// count, under the subscription lock) and the bytes it has taken off
    /// (written only by the [`Subscriber`]): their difference is what it
    /// holds. Two one-writer counters, not one shared one: no atomic
    /// read-modify-write per message on either side.
    pub(crate) offered: usize,
    pub(crate) taken: Arc<AtomicUsize>,
    /// Messages received over the subscription's life, and the limit.
    pub(crate) received: u64,
    pub(crate) max: Option<u64>,
    pub(crate) dropped: Arc<AtomicU64>,
    pub(crate) warned: bool,
    /// Set when the broker refused the SUB (ERR naming its sid): code, text.
    pub(crate) refused: Refusal,
}

/// Why the broker refused a subscription, once it has.
pub(crate) type Refusal = Arc<std::sync::OnceLock<(u16, String)>>;

/// A subscription: a `Stream` of messages. Dropping it unsubscribes.
pub struct Subscriber {
    sid: u32,
    rx: mpsc::Receiver<Message>,
    taken: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    refused: Refusal,
    client: Client,
    active: bool,
}

impl Subscriber {
    pub(crate) fn new(
        sid: u32,
        rx: mpsc::Receiver<Message>,
        taken: Arc<AtomicUsize>,
        dropped: Arc<AtomicU64>,
        refused: Refusal,
        client: Client,
    ) -> Subscriber {
        Subscriber {
            sid,
            rx,
            taken,
            dropped,
            refused,
            client,
            active: true,
        }
    }

    /// The next message; `None` once unsubscribed and drained, or closed.
    pub async fn next(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let rx = &mut self.rx;
        let m = std::task::ready!(poll_reading(&self.client.inner, cx, |cx| rx.poll_recv(cx)));
        if let Some(m) = &m {
            // The only writer: a load and a store, no locked instruction.
            let t = self.taken.load(Ordering::Relaxed);
            self.taken
                .store(t.wrapping_add(m.payload.len()), Ordering::Relaxed);
            self.client.inner.took();
        }
        Poll::Ready(m)
    }

    /// Why the broker refused this subscription, once it has: its stream
    /// then ends (`next()` gives `None`) and it is not re-sent on reconnect.
    /// [`Error::PermissionDenied`] for a subject the user may not subscribe
    /// to; [`Error::Server`] with the code otherwise (MAX_SUBSCRIPTIONS, ...).
    ///
    /// [`Error::PermissionDenied`]: crate::Error::PermissionDenied
    /// [`Error::Server`]: crate::Error::Server
    pub fn refusal(&self) -> Option<crate::Error> {
        self.refused
            .get()
            .map(|(code, text)| crate::Error::from_server(*code, text))
    }

    /// Stops the subscription now.
    pub fn unsubscribe(mut self) -> Result<()> {
        self.stop()
    }

    /// Ends the subscription after `n` more messages.
    pub fn unsubscribe_after(&mut self, n: u64) -> Result<()> {
        let mut subs = lock(&self.client.inner.subs);
        let Some(e) = subs.get_mut(&self.sid) else {
            return Ok(());
        };
        let total = e.received + n;
        e.max = Some(total);
        if n == 0 {
            subs.remove(&self.sid);
            drop(subs);
            self.client.inner.took();
        } else {
            drop(subs);
        }
        let sid = self.sid;
        self.client
            .inner
            .control(|b| encode_unsub(b, sid, total.min(u32::MAX as u64) as u32))
    }

    /// Messages dropped because this subscription's buffer was full
    /// ([`Overflow::Drop`], the default), plus, with [`Overflow::Wait`], a
    /// message held for it when its connection ended. Each drop is also
    /// logged once per run of drops (`tracing`, at warn).
    ///
    /// [`Overflow::Drop`]: crate::Overflow::Drop
    /// [`Overflow::Wait`]: crate::Overflow::Wait
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.active, false) {
            return Ok(());
        }
        let present = lock(&self.client.inner.subs).remove(&self.sid).is_some();
        // A message held for it goes nowhere now: the read side goes on.
        self.client.inner.took();
        if present {
            let sid = self.sid;
            self.client.inner.control(|b| encode_unsub(b, sid, 0))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("sid", &self.sid)
            .finish()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Stream for Subscriber {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.poll_message(cx)
    }
}
