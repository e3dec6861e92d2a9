//! Draining an [`Outbox`] into a TCP socket: the two moves the broker's
//! outlets and the SDK's connection both make (feature `rt`). A producer
//! that finds nobody writing sends a small batch itself ([`write_now`]);
//! otherwise the connection's writer task sends what is queued
//! ([`write_all`]). The policy around them (when to write directly, what a
//! failed write ends) stays with each side.

use std::io;

use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use crate::outbox::{Direct, Outbox, Take};

/// What [`write_now`] did.
#[derive(Debug)]
pub enum Kick {
    /// Wrote what the socket took without blocking. `left`: bytes remain
    /// queued, for the writer task.
    Wrote { result: io::Result<()>, left: bool },
    /// More is queued than a producer writes itself, or it waits for the
    /// peer's credit: wake the writer task.
    Wake,
    /// Someone else is writing; their release takes care of the rest.
    Busy,
}

/// Writes up to `max` queued bytes to `sock` here and now, without
/// blocking, when nobody else is writing; at most `send_max` bytes of whole
/// frames per send (see [`Take::write_nonblocking`]).
pub fn write_now(outbox: &Outbox, sock: &OwnedWriteHalf, max: usize, send_max: usize) -> Kick {
    let mut t = match outbox.claim_direct(max) {
        Direct::Write(t) => t,
        Direct::Wake => return Kick::Wake,
        Direct::Busy => return Kick::Busy,
    };
    let result = t
        .write_nonblocking(send_max, |b| sock.try_write_vectored(b))
        .map(|_| ());
    let left = outbox.release(t);
    Kick::Wrote { result, left }
}

/// Writes all of a claimed batch, waiting for the socket as needed, at most
/// `send_max` bytes of whole frames per send (see [`Take::write_nonblocking`]).
pub async fn write_all(t: &mut Take, sock: &OwnedWriteHalf, send_max: usize) -> io::Result<()> {
    while !t.write_nonblocking(send_max, |b| sock.try_write_vectored(b))? {
        sock.writable().await?;
    }
    Ok(())
}

/// Writes all of a claimed batch into any async writer (a TLS session:
/// it encrypts, so no producer writes to it directly), then flushes it.
pub async fn write_all_to<W: AsyncWrite + Unpin>(t: &mut Take, w: &mut W) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        let r = t.write_nonblocking(usize::MAX, |b| {
            match Pin::new(&mut *w).poll_write_vectored(cx, b) {
                Poll::Ready(r) => r,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            }
        });
        match r {
            Ok(true) => Poll::Ready(Ok(())),
            // poll_write_vectored registered the waker.
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    })
    .await?;
    w.flush().await
}
