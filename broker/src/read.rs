//! One frame-reading loop for every kind of connection the broker reads
//! (clients, cluster routes): decode every whole frame in the buffer, hand
//! each to the connection's [`Frames`], end the batch (one flush for all the
//! frames of a read), grant the peer credit for what was consumed, then read
//! more, until the peer closes, the connection is aborted or the broker
//! shuts down. It also keeps the connection alive, as NATS does: a peer
//! that sent nothing for a ping interval gets a PING, and one that has left
//! `max_out` PINGs unanswered when the next is due is stale
//! ([`Ended::Stale`]). A peer that sends traffic is never PINGed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use sockbus_protocol::flow::RecvWindow;
use sockbus_protocol::frame::{self, encode_ping, Header};
use sockbus_protocol::{FrameRef, Kind, ProtocolError, HEADER_LEN};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::outlet::Outlet;
use crate::streams::Stream;
use crate::transport::ReadSock;

/// Room kept free in the read buffer; it grows by this much at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What one kind of connection does with the frames it reads.
pub(crate) trait Frames {
    type Error: From<ProtocolError> + From<std::io::Error>;

    /// A frame longer than the limit arrived: `Ok` to skip its bytes and
    /// go on (the connection stays usable), or the error that closes it.
    fn oversized(&mut self, h: &Header) -> Result<(), Self::Error>;

    fn frame(&mut self, f: FrameRef<'_>) -> Result<(), Self::Error>;

    /// Every whole frame of a read was handled: flush. Returns a stream
    /// whose writer is behind, to wait on before reading more.
    fn end_batch(&mut self) -> Option<Arc<Stream>>;

    /// After [`Frames::end_batch`]: `total` bytes of the connection's whole
    /// frames have been handled since it began (direct delivery's barrier).
    fn handled(&mut self, _total: u64) {}
}

/// Keepalive settings (`--ping-interval`, `--max-pings-out`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keepalive {
    /// A peer that sent nothing for this long gets a PING.
    pub interval: Duration,
    /// PINGs a peer may leave unanswered; when the next one is due with
    /// this many out, the connection is stale.
    pub max_out: u32,
}

/// How a reading loop ended, other than by an error in the peer's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The peer closed, the connection was aborted or the broker shuts down.
    Closed,
    /// The peer left this many keepalive PINGs unanswered.
    Stale { unanswered: u32 },
}

pub(crate) struct FrameReader {
    max_body: u32,
    recv: RecvWindow,
    /// Bytes consumed and not yet granted back as credit.
    consumed: usize,
    /// Bytes still to discard of an oversized frame.
    skip: usize,
    keepalive: Keepalive,
    /// Bytes arrived since the last keepalive tick.
    heard: bool,
    /// Keepalive PINGs sent since the last PONG.
    pings_out: u32,
    /// Bytes of whole frames handled (or skipped) since the connection
    /// began, the handshake's included ([`FrameReader::handled_before`]).
    handled: u64,
}

impl FrameReader {
    /// `window`: the receive window we announced; `consumed`: bytes of it
    /// the handshake already used.
    pub fn new(max_body: u32, window: u32, consumed: usize, keepalive: Keepalive) -> Self {
        FrameReader {
            max_body,
            recv: RecvWindow::new(window),
            consumed,
            skip: 0,
            keepalive,
            heard: false,
            pings_out: 0,
            handled: 0,
        }
    }

    /// Counts `n` bytes the handshake read before this reader took over.
    pub fn handled_before(mut self, n: u64) -> Self {
        self.handled = n;
        self
    }

    /// Reads until the peer closes, `abort`/`shutdown` is cancelled
    /// (`Ended::Closed`), the keepalive gives up on the peer
    /// (`Ended::Stale`) or a frame handler fails (`Err`). `out` is the
    /// connection's own outlet, where credit is granted and PINGs queued.
    pub async fn run<F: Frames>(
        &mut self,
        f: &mut F,
        rd: &mut ReadSock,
        buf: &mut BytesMut,
        out: &Outlet,
        shutdown: &CancellationToken,
    ) -> Result<Ended, F::Error> {
        // Made once: registering with a token per read costs two locks each.
        let aborted = out.abort.clone().cancelled_owned();
        let shut_down = shutdown.cancelled();
        tokio::pin!(aborted, shut_down);
        let every = self.keepalive.interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let r = self.decode(f, buf);
            let full = f.end_batch();
            r?;
            f.handled(self.handled);
            if let Some(s) = full {
                // A stream writer that is behind slows this publisher down.
                s.wait_space().await;
            }
            if let Some(c) = self.recv.on_consumed(std::mem::take(&mut self.consumed)) {
                if out.outbox.grant(c) {
                    out.kick();
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
            // Checked here too: a peer that keeps the socket readable (a
            // flood) would otherwise be read on after its connection was
            // aborted (a slow-consumer verdict), since the read wins below.
            if out.abort.is_cancelled() {
                return Ok(Ended::Closed);
            }
            tokio::select! {
                biased;
                r = rd.read_buf(buf) => {
                    if r? == 0 {
                        return Ok(Ended::Closed);
                    }
                    self.heard = true;
                    sockbus_protocol::busy_poll::touch();
                }
                _ = aborted.as_mut() => return Ok(Ended::Closed),
                _ = shut_down.as_mut() => return Ok(Ended::Closed),
                _ = tick.tick() => {
                    if let Some(end) = self.keepalive_tick(out) {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// A ping interval went by: nothing to do when the peer was heard from
    /// meanwhile; otherwise it is stale with `max_out` PINGs unanswered, or
    /// gets one more.
    fn keepalive_tick(&mut self, out: &Outlet) -> Option<Ended> {
        if std::mem::take(&mut self.heard) {
            return None;
        }
        if self.pings_out >= self.keepalive.max_out {
            return Some(Ended::Stale {
                unanswered: self.pings_out,
            });
        }
        self.pings_out += 1;
        let id = u64::from(self.pings_out);
        out.control(|b| encode_ping(b, id));
        None
    }

    /// Handles every whole frame in `buf`.
    fn decode<F: Frames>(&mut self, f: &mut F, buf: &mut BytesMut) -> Result<(), F::Error> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len());
                buf.advance(n);
                self.skip -= n;
                self.consumed += n;
                self.handled += n as u64;
                if self.skip > 0 {
                    return Ok(());
                }
                continue;
            }
            let Some(h) = frame::parse_header(buf)? else {
                return Ok(());
            };
            if h.len > self.max_body {
                f.oversized(&h)?;
                self.skip = h.frame_len();
                continue;
            }
            let len = h.frame_len();
            if buf.len() < len {
                buf.reserve(len - buf.len());
                return Ok(());
            }
            if h.kind == Kind::Pong {
                // Whatever it answers, the peer is alive and reading.
                self.pings_out = 0;
            }
            f.frame(frame::decode_body(&h, &buf[HEADER_LEN..len])?)?;
            // Credit frames are outside the flow-control window.
            if h.kind != Kind::Credit {
                self.consumed += len;
            }
            self.handled += len as u64;
            buf.advance(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sockbus_protocol::frame::{encode_ping, encode_pong, encode_pub};
    use sockbus_protocol::outbox::Outbox;

    const KEEPALIVE: Keepalive = Keepalive {
        interval: Duration::from_secs(1),
        max_out: 2,
    };

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("{0}")]
        Protocol(#[from] ProtocolError),
        #[error("{0}")]
        Io(#[from] std::io::Error),
    }

    #[derive(Default)]
    struct Seen {
        pubs: Vec<(String, Vec<u8>)>,
        pings: u32,
        oversized: Vec<u32>,
        batches: u32,
        refuse_oversized: bool,
    }

    impl Frames for Seen {
        type Error = TestError;
        fn oversized(&mut self, h: &Header) -> Result<(), TestError> {
            self.oversized.push(h.len);
            if self.refuse_oversized {
                return Err(ProtocolError::FrameTooLarge { len: h.len, max: 0 }.into());
            }
            Ok(())
        }
        fn frame(&mut self, f: FrameRef<'_>) -> Result<(), TestError> {
            match f {
                FrameRef::Pub {
                    subject, payload, ..
                } => self.pubs.push((subject.into(), payload.into())),
                FrameRef::Ping(_) => self.pings += 1,
                _ => {}
            }
            Ok(())
        }
        fn end_batch(&mut self) -> Option<Arc<Stream>> {
            self.batches += 1;
            None
        }
    }

    fn frames(max_payload: usize) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_pub(&mut b, "a.b", None, &[], b"one").unwrap();
        encode_pub(&mut b, "too.big", None, &[], &vec![7u8; max_payload + 100]).unwrap();
        encode_ping(&mut b, 9);
        encode_pub(&mut b, "a.c", None, &[], b"two").unwrap();
        b.to_vec()
    }

    #[test]
    fn frames_split_at_every_byte_arrive_whole_and_an_oversized_one_is_skipped() {
        let all = frames(1000);
        for cut in 0..all.len() {
            let mut r = FrameReader::new(1000 + 64, 1 << 20, 0, KEEPALIVE);
            let mut seen = Seen::default();
            let mut buf = BytesMut::new();
            // Two reads, split at `cut`.
            for part in [&all[..cut], &all[cut..]] {
                buf.extend_from_slice(part);
                r.decode(&mut seen, &mut buf).unwrap();
            }
            let subjects: Vec<&str> = seen.pubs.iter().map(|(s, _)| s.as_str()).collect();
            assert_eq!(subjects, ["a.b", "a.c"], "cut at {cut}");
            assert_eq!(seen.pings, 1, "cut at {cut}");
            assert_eq!(seen.oversized.len(), 1, "cut at {cut}");
            assert!(buf.is_empty(), "cut at {cut}: {} bytes left", buf.len());
            assert_eq!(
                r.consumed,
                all.len(),
                "every byte counts against the window"
            );
        }
    }

    #[test]
    fn an_oversized_frame_the_connection_refuses_ends_it() {
        let mut r = FrameReader::new(1000 + 64, 1 << 20, 0, KEEPALIVE);
        let mut seen = Seen {
            refuse_oversized: true,
            ..Default::default()
        };
        let mut buf = BytesMut::from(&frames(1000)[..]);
        assert!(r.decode(&mut seen, &mut buf).is_err());
        assert_eq!(seen.pubs.len(), 1, "frames before it were handled");
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut r = FrameReader::new(1 << 20, 1 << 20, 0, KEEPALIVE);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(r.decode(&mut Seen::default(), &mut buf).is_err());
    }

    /// PINGs the keepalive queued for the peer, by id.
    fn pings(out: &Outlet) -> Vec<u64> {
        let t = out.outbox.take();
        let mut data = &t.data[..];
        let mut v = Vec::new();
        while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
            data = &data[len..];
            if let FrameRef::Ping(id) = f {
                v.push(id);
            }
        }
        v
    }

    #[test]
    fn a_silent_peer_gets_max_out_pings_then_is_stale_and_a_pong_or_traffic_resets_it() {
        let out = Outlet::new(
            1,
            Outbox::bounded(1 << 20, 0),
            CancellationToken::new(),
            None,
        );
        let mut r = FrameReader::new(1 << 20, 1 << 20, 0, KEEPALIVE);
        assert_eq!(r.keepalive_tick(&out), None);
        assert_eq!(r.keepalive_tick(&out), None);
        assert_eq!(pings(&out).len(), 2);
        // A PONG answers them all.
        let mut buf = BytesMut::new();
        encode_pong(&mut buf, 1);
        r.decode(&mut Seen::default(), &mut buf).unwrap();
        assert_eq!(r.keepalive_tick(&out), None);
        assert_eq!(r.keepalive_tick(&out), None);
        assert_eq!(pings(&out).len(), 2, "PINGed again once idle again");
        // Traffic since the last tick: no PING, no verdict.
        r.heard = true;
        assert_eq!(r.keepalive_tick(&out), None);
        assert!(pings(&out).is_empty());
        assert_eq!(
            r.keepalive_tick(&out),
            Some(Ended::Stale { unanswered: 2 }),
            "two PINGs out when the third is due"
        );
    }
}
