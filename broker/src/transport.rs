//! A connection's byte stream: plain TCP or TLS over TCP. An enum, not a
//! trait object, so the plain path stays exactly what it was (reads on an
//! `OwnedReadHalf`, non-blocking vectored writes straight on the socket by
//! whoever holds the outbox's writer role) at the cost of one predictable
//! branch per read or write call; only TLS connections pay for TLS.
//!
//! Over TLS the two halves share one rustls session (`tokio::io::split`),
//! and producers never write to it directly: [`crate::outlet::Outlet::kick`]
//! wakes the connection's write loop, which encrypts and writes each batch.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use sockbus_protocol::outbox::Take;

/// A TLS session over TCP, server or client side (cluster routes dial).
pub(crate) type TlsTcp = TlsStream<TcpStream>;

/// How long a refused connection is kept half-open for the client to read
/// its error, and how much of what it sends meanwhile is read and dropped.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_millis(1000);
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// Sends a refused client its last words (`-ERR ...`, an ERR frame, an HTTP
/// answer) and closes the connection so that it can read them: the write
/// side is shut (FIN), then whatever the client still sends (the PING it
/// sent after CONNECT, a PUB) is read and dropped until it closes, for at
/// most [`REFUSAL_LINGER`] and [`REFUSAL_LINGER_BYTES`]. Closing a socket
/// with unread bytes makes the kernel answer with a reset, and a client
/// that writes after it gets EPIPE or ECONNRESET instead of the error.
pub(crate) async fn refuse(s: &mut (impl AsyncRead + AsyncWrite + Unpin), last: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        if s.write_all(last).await.is_err() || s.shutdown().await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < REFUSAL_LINGER_BYTES {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// A whole connection, before it is split into its reading and writing halves.
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTcp>),
}

impl Transport {
    pub fn split(self) -> (ReadSock, WriteSock) {
        match self {
            Transport::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadSock::Plain(r), WriteSock::Plain(w))
            }
            Transport::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadSock::Tls(r), WriteSock::Tls(tokio::sync::Mutex::new(w)))
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

/// The reading half of a connection.
pub(crate) enum ReadSock {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsTcp>),
}

/// The writing half of a connection, held by its outlet.
pub(crate) enum WriteSock {
    Plain(OwnedWriteHalf),
    /// Only the write loop writes here (it holds the lock for its whole
    /// life); producers wake it instead of writing themselves.
    Tls(tokio::sync::Mutex<WriteHalf<TlsTcp>>),
}

impl WriteSock {
    /// Writes `b` before the outlet owns this half (a refusal on a route).
    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            WriteSock::Plain(w) => w.write_all(b).await,
            WriteSock::Tls(m) => {
                let w = m.get_mut();
                w.write_all(b).await?;
                w.flush().await
            }
        }
    }

    /// The TCP socket under a plain connection (the fast path's checks
    /// look at it); None over TLS.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            WriteSock::Plain(w) => Some(w.as_ref()),
            WriteSock::Tls(_) => None,
        }
    }
}

/// Writes all of a claimed batch through a TLS session, then flushes it
/// (the session buffers the records it encrypted).
pub(crate) async fn write_all_tls(t: &mut Take, w: &mut WriteHalf<TlsTcp>) -> io::Result<()> {
    sockbus_protocol::drain::write_all_to(t, w).await
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Self::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for ReadSock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSock::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadSock::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}
