//! Request/reply over one wildcard subscription, `_INBOX.<client>.*`,
//! made on the first request: each request publishes with the reply subject
//! `_INBOX.<client>.<id>` and waits on a oneshot channel kept under `<id>`;
//! the reader routes a reply by its last token (see `reader::dispatch_msg`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sockbus_protocol::frame::encode_sub;
use sockbus_protocol::subject::validate_subject;
use tokio::sync::{mpsc, oneshot};

use crate::client::{lock, Client};
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::reader::poll_reading;
use crate::subscriber::SubEntry;

/// `<prefix>.<id>` written into `buf`: a request's reply subject without an
/// allocation (the prefix is `_INBOX.` and 16 hex digits).
pub(crate) fn reply_subject<'a>(buf: &'a mut [u8; 64], prefix: &str, id: u64) -> &'a str {
    use std::io::Write;
    let mut w = &mut buf[..];
    write!(w, "{prefix}.{id}").expect("a reply subject fits in 64 bytes");
    let n = 64 - w.len();
    std::str::from_utf8(&buf[..n]).expect("ASCII")
}

impl Client {
    /// A unique subject to receive replies on (`_INBOX.<client>_<n>`: outside
    /// the `_INBOX.<client>.*` subscription that carries this client's
    /// request replies).
    pub fn new_inbox(&self) -> String {
        let n = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        format!("{}_{n}", self.inner.inbox_prefix)
    }

    /// Sends a request and waits for the first reply, up to the request
    /// timeout. Fails at once with [`Error::Disconnected`] when the
    /// connection is lost meanwhile; it is not retried (the request may
    /// have reached a responder, or, still queued, be sent on the next
    /// connection).
    pub async fn request(&self, subject: &str, payload: impl AsRef<[u8]>) -> Result<Message> {
        self.request_timeout(subject, payload, self.inner.opts.request_timeout)
            .await
    }

    pub async fn request_timeout(
        &self,
        subject: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Message> {
        self.request_raw(subject, &[], payload.as_ref(), timeout, 0)
            .await
    }

    /// Sends a request with headers and waits for the first reply, up to the request timeout.
    pub async fn request_with_headers(
        &self,
        subject: &str,
        headers: &Headers,
        payload: impl AsRef<[u8]>,
    ) -> Result<Message> {
        let h = headers.encode()?;
        self.request_raw(
            subject,
            &h,
            payload.as_ref(),
            self.inner.opts.request_timeout,
            0,
        )
        .await
    }

    /// A request whose PUB carries `flags`: [`PUB_ACK`] asks the stream
    /// that stores it for its ack as the reply (a durable publish); without
    /// it a stream capturing the subject stores the request silently.
    ///
    /// [`PUB_ACK`]: sockbus_protocol::frame::PUB_ACK
    pub(crate) async fn request_raw(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
        timeout: Duration,
        flags: u8,
    ) -> Result<Message> {
        validate_subject(subject)?;
        let inner = &self.inner;
        inner
            .mux_sid
            .get_or_try_init(|| async {
                let sid = inner.next_sid.fetch_add(1, Ordering::Relaxed);
                let (tx, _rx) = mpsc::channel(1);
                let pattern = format!("{}.*", inner.inbox_prefix);
                let mut subs = lock(&inner.subs);
                subs.insert(
                    sid,
                    SubEntry {
                        subject: pattern.clone(),
                        queue: None,
                        tx,
                        offered: 0,
                        taken: Arc::new(AtomicUsize::new(0)),
                        received: 0,
                        max: None,
                        dropped: Arc::new(AtomicU64::new(0)),
                        warned: false,
                        refused: Default::default(),
                    },
                );
                inner.control(|b| {
                    let _ = encode_sub(b, sid, &pattern, None);
                })?;
                Ok::<_, Error>(sid)
            })
            .await?;
        let id = inner.next_req.fetch_add(1, Ordering::Relaxed);
        let mut subject_buf = [0u8; 64];
        let reply = reply_subject(&mut subject_buf, &inner.inbox_prefix, id);
        let (tx, rx) = oneshot::channel();
        lock(&inner.requests).insert(id, tx);
        if let Err(e) = self
            .publish_inner(subject, Some(reply), headers, payload, flags)
            .await
        {
            lock(&inner.requests).remove(&id);
            return Err(e);
        }
        let mut rx = rx;
        let reply =
            std::future::poll_fn(|cx| poll_reading(inner, cx, |cx| Pin::new(&mut rx).poll(cx)));
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(Ok(m))) if m.is_no_responders() => Err(Error::NoResponders),
            Ok(Ok(Ok(m))) => Ok(m),
            // The broker refused the request (ERR_REPLY): permission
            // denied, payload too large, ...
            Ok(Ok(Err(e))) => Err(e),
            // Its connection was lost (see `connector::supervise`), or the
            // client closed.
            Ok(Err(_)) if inner.is_closing() => Err(Error::Closed),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                lock(&inner.requests).remove(&id);
                Err(Error::Timeout)
            }
        }
    }
}
