//! A connection's life: connect and handshake (CONNECT out, INFO in),
//! serve it until it fails, then reconnect with backoff, restoring every
//! subscription on the new connection before anything else is sent.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use sockbus_protocol::flow::effective_window;
use sockbus_protocol::frame::{
    self, code, encode_connect, encode_ping, encode_sub, encode_unsub, CONNECT_EXPLICIT_ACKS,
    CONNECT_NO_ECHO, CONNECT_NO_RESPONDERS, INFO_PUB_ROOM,
};
use sockbus_protocol::{Backoff, FrameRef};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::client::{lock, Client, Inner};
use crate::error::{Error, Result};
use crate::options::ConnectOptions;
use crate::reader::{read_loop, read_loop_stream, ReadSide, ReadState};
use crate::writer::{write_loop, write_loop_stream};

/// The connection under the protocol: plain TCP (read and written in
/// place by the tasks that wait or publish) or TLS (one reader task, one
/// writer task).
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to the first reachable server of `urls` and starts the
/// connection's supervisor.
pub(crate) async fn connect(opts: ConnectOptions, urls: Vec<String>) -> Result<Client> {
    let inner = Arc::new(Inner::new(opts, urls));
    let conn = establish(&inner, 0).await?;
    tokio::spawn(supervise(inner.clone(), conn));
    Ok(Client::new(inner))
}

/// A connection whose handshake is done. `S` is a [`Stream`] except in tests.
struct Conn<S = Stream> {
    stream: S,
    buf: BytesMut,
    recv_window: u32,
    /// Size of the INFO frame: the broker counts it against our window.
    info_len: usize,
}

/// Tries every server once, starting at `start`; on success the outbox is
/// reset for the new connection with every live subscription re-sent first.
async fn establish(inner: &Arc<Inner>, start: usize) -> Result<Conn> {
    let mut last = String::new();
    let mut refused = None;
    for i in 0..inner.urls.len() {
        let url = &inner.urls[(start + i) % inner.urls.len()];
        match tokio::time::timeout(inner.opts.connect_timeout, handshake(inner, url)).await {
            Ok(Ok(c)) => return Ok(c),
            // The same credentials are wrong on every server.
            Ok(Err(e @ Error::Authorization(_))) => return Err(e),
            Ok(Err(e @ Error::Server { .. })) => {
                last = format!("{url}: {e}");
                refused = Some(e);
            }
            Ok(Err(e)) => last = format!("{url}: {e}"),
            Err(_) => last = format!("{url}: timed out"),
        }
    }
    // The only broker refused at CONNECT (a connection limit, its own or
    // the account's): that error, typed, says most.
    match refused {
        Some(e) if inner.urls.len() == 1 => Err(e),
        _ => Err(Error::NoServers(last)),
    }
}

async fn handshake(inner: &Arc<Inner>, url: &str) -> Result<Conn> {
    let (addr, tls) = match url.strip_prefix(crate::tls::TLS_SCHEME) {
        Some(a) => (a, true),
        None => (url, false),
    };
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    if tls {
        let s = crate::tls::connect(stream, addr, &inner.opts.tls).await?;
        let c = greet(inner, s, peer).await.map_err(|e| match e {
            // The TLS session ended before INFO: the broker refused our
            // certificate (or the lack of one) after the handshake.
            Error::Disconnected | Error::Io(_) => Error::Tls(
                "the broker closed the connection after the handshake (a client certificate it does not accept? --tls-cert/--tls-key)".into(),
            ),
            e => e,
        })?;
        return Ok(c.with(|s| Stream::Tls(Box::new(s))));
    }
    Ok(greet(inner, stream, peer).await?.with(Stream::Plain))
}

impl<S> Conn<S> {
    fn with<T>(self, f: impl FnOnce(S) -> T) -> Conn<T> {
        Conn {
            stream: f(self.stream),
            buf: self.buf,
            recv_window: self.recv_window,
            info_len: self.info_len,
        }
    }
}

/// CONNECT out, INFO in; then the outbox is reset for this connection, every
/// live subscription first. What arrived behind the INFO stays in the
/// returned buffer for the reader.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    mut stream: S,
    peer: SocketAddr,
) -> Result<Conn<S>> {
    // Stream acks only for durable publishes (PUB_ACK): a request to a
    // subject a stream captures gets its responders' replies alone.
    let mut flags = CONNECT_NO_RESPONDERS | CONNECT_EXPLICIT_ACKS;
    if inner.opts.no_echo {
        flags |= CONNECT_NO_ECHO;
    }
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        flags,
        inner.opts.recv_window,
        &inner.opts.name,
        &inner.opts.token.0,
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let decoded = frame::decode(&buf, 64 * 1024).map_err(|e| match buf.first() {
            // A TLS record (alert 0x15, handshake 0x16) where a frame should be.
            Some(0x15 | 0x16) => {
                Error::Tls("the broker speaks TLS on this port: use sockbus+tls://".into())
            }
            _ => e.into(),
        })?;
        if let Some((f, len)) = decoded {
            match f {
                FrameRef::Info {
                    flags,
                    recv_window,
                    max_payload,
                    server_name,
                    ..
                } => {
                    inner.max_payload.store(max_payload, Ordering::Relaxed);
                    let room = flags & INFO_PUB_ROOM != 0;
                    inner.pub_room.store(room, Ordering::Relaxed);
                    *lock(&inner.server) = Some((server_name.to_string(), peer));
                    let send_window = effective_window(recv_window, max_payload);
                    let our_window = effective_window(inner.opts.recv_window, max_payload);
                    buf.advance(len);
                    let mut prefix = BytesMut::new();
                    for (sid, e) in lock(&inner.subs).iter() {
                        let _ = encode_sub(&mut prefix, *sid, &e.subject, e.queue.as_deref());
                        if let Some(max) = e.max {
                            // The new broker counts from zero.
                            encode_unsub(
                                &mut prefix,
                                *sid,
                                max.saturating_sub(e.received).max(1).min(u32::MAX as u64) as u32,
                            );
                        }
                    }
                    // PUBs queued for the last broker keep their room only if
                    // this one asks for it too.
                    inner.outbox.reset(send_window, &prefix, room);
                    return Ok(Conn {
                        stream,
                        buf,
                        recv_window: our_window,
                        info_len: len,
                    });
                }
                FrameRef::Err { code, text } if code == code::AUTHORIZATION_VIOLATION => {
                    return Err(Error::Authorization(text.to_string()));
                }
                FrameRef::Err { code, text } => {
                    return Err(Error::Server {
                        code,
                        message: text.to_string(),
                    });
                }
                _ => {
                    return Err(Error::Server {
                        code: code::MALFORMED,
                        message: "expected INFO from the broker".into(),
                    })
                }
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(Error::Disconnected);
        }
    }
}

async fn supervise(inner: Arc<Inner>, first: Conn) {
    let mut conn = Some(first);
    let mut failures = 0usize;
    let mut next_url = 0usize;
    let backoff = Backoff::client_reconnect(inner.opts.max_reconnect_delay);
    loop {
        if let Some(c) = conn.take() {
            inner.connected.send_replace(true);
            let err = serve(&inner, c).await;
            {
                let reason = lock(&inner.close_reason).take();
                let mut lost = lock(&inner.lost);
                lost.0 += 1;
                lost.1 = reason;
            }
            inner.connected.send_replace(false);
            inner.fail_pings(|| Error::Disconnected);
            // Requests waiting for a reply on the lost connection fail now
            // (with `Disconnected`), not at their timeout.
            lock(&inner.requests).clear();
            if inner.is_closing() {
                break;
            }
            warn!("disconnected from the broker: {err}; reconnecting");
            next_url += 1;
        }
        if inner.is_closing() {
            break;
        }
        failures += 1;
        if inner.opts.max_reconnects.is_some_and(|m| failures > m) {
            warn!("giving up after {} reconnect attempts", failures - 1);
            break;
        }
        // Exponential backoff with jitter, capped: 50 ms, 100 ms, ...
        let attempt = u32::try_from(failures - 1).unwrap_or(u32::MAX);
        let delay = backoff.delay(attempt, rand::random());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = inner.closed.notified() => break,
        }
        match establish(&inner, next_url).await {
            Ok(c) => {
                info!(
                    "reconnected to {:?}",
                    lock(&inner.server).as_ref().map(|s| s.1)
                );
                failures = 0;
                conn = Some(c);
            }
            Err(e) => debug!("reconnect attempt {failures} failed: {e}"),
        }
    }
    inner.shutdown();
    inner.connected.send_replace(false);
    inner.fail_pings(|| Error::Closed);
    // Ending the senders ends every subscriber's stream.
    lock(&inner.subs).clear();
    lock(&inner.requests).clear();
}

/// Runs one connection until it fails or the client closes.
async fn serve(inner: &Arc<Inner>, conn: Conn) -> Error {
    let Conn {
        stream,
        buf,
        recv_window,
        info_len,
    } = conn;
    let stream = match stream {
        Stream::Plain(s) => s,
        Stream::Tls(s) => {
            return serve_tls(inner, *s, ReadState::new(buf, recv_window, info_len)).await
        }
    };
    let (rd, wr) = stream.into_split();
    let wr = Arc::new(wr);
    *lock(&inner.sock) = Some(wr.clone());
    let side = Arc::new(ReadSide::new(wr.clone(), rd, buf, recv_window, info_len));
    // A message held up on the last connection went with it.
    inner.stalled.store(false, Ordering::SeqCst);
    inner.heard.store(false, Ordering::Relaxed);
    inner.pings_out.store(0, Ordering::Relaxed);
    lock(&inner.close_reason).take();
    *lock(&inner.read) = Some(side.clone());
    // Frames queued while there was no connection.
    inner.wake.notify_one();
    let writer = tokio::spawn(with_keepalive(inner.clone(), write_loop(inner.clone(), wr)));
    let abort = writer.abort_handle();
    let r = tokio::select! {
        r = read_loop(inner, &side) => r,
        w = writer => match w {
            Ok(e) => e,
            Err(_) => Error::Disconnected,
        },
    };
    abort.abort();
    lock(&inner.sock).take();
    lock(&inner.read).take();
    r
}

/// [`serve`] over TLS: nobody writes to the session but the writer task
/// (`inner.sock` stays empty, so publishers wake it) and nobody reads it
/// but the reader task (`inner.read` stays empty, so waiting tasks wait
/// for what it delivers).
async fn serve_tls(
    inner: &Arc<Inner>,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    st: ReadState,
) -> Error {
    let (mut rd, wr) = tokio::io::split(stream);
    inner.stalled.store(false, Ordering::SeqCst);
    inner.heard.store(false, Ordering::Relaxed);
    inner.pings_out.store(0, Ordering::Relaxed);
    lock(&inner.close_reason).take();
    inner.wake.notify_one();
    let writer = tokio::spawn(with_keepalive(
        inner.clone(),
        write_loop_stream(inner.clone(), wr),
    ));
    let abort = writer.abort_handle();
    let r = tokio::select! {
        r = read_loop_stream(inner, &mut rd, st) => r,
        w = writer => match w {
            Ok(e) => e,
            Err(_) => Error::Disconnected,
        },
    };
    abort.abort();
    r
}

/// Runs a connection's writer and its keepalive in one task: the timer is
/// polled when that task wakes (rarely: most writes are made by the
/// publishing task itself), not on every wake-up of the reading task.
async fn with_keepalive(inner: Arc<Inner>, writer: impl Future<Output = Error>) -> Error {
    tokio::select! {
        e = writer => e,
        e = keepalive(&inner) => e,
    }
}

/// Keepalive, the broker's rule from this side: after a ping interval
/// without a byte from the broker, PING it; when `max_pings_out` PINGs are
/// unanswered as the next one is due, the connection is stale (a broker
/// that is stopped, or a network that drops everything, never closes the
/// socket) and ends, so the supervisor reconnects.
async fn keepalive(inner: &Inner) -> Error {
    let every = inner.opts.ping_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A full subscription holding up the read side ([`Overflow::Wait`])
        // leaves the broker's answers unread: that says nothing of the broker.
        if inner.heard.swap(false, Ordering::Relaxed) || inner.stalled.load(Ordering::SeqCst) {
            continue;
        }
        let out = inner.pings_out.load(Ordering::Relaxed);
        if out >= inner.opts.max_pings_out {
            return Error::StaleConnection(out);
        }
        inner.pings_out.store(out + 1, Ordering::Relaxed);
        // Id 0: no flush waits for it.
        if inner.control(|b| encode_ping(b, 0)).is_err() {
            return Error::Closed;
        }
    }
}

#[cfg(test)]
mod tests;
