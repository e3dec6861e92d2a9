//! Frames: a fixed 12-byte header followed by a kind-specific body.
//!
//! ```text
//! 0..2   magic  b"SB"
//! 2      kind   (see [`Kind`])
//! 3      flags  (kind-specific bits)
//! 4..8   len    u32 LE, bytes of body after the header
//! 8..12  hash   u32 LE, FNV-1a of the subject for PUB and MSG, else 0
//! ```
//!
//! Integers are little-endian. `str16` is a u16 length then UTF-8 bytes;
//! `bytes16` the same without the UTF-8 rule. A zero-length optional string
//! (reply, queue) means "absent". Full byte-by-byte layout: docs/protocol.md.

use bytes::BufMut;
use thiserror::Error;

use crate::subject::subject_hash;

pub const MAGIC: [u8; 2] = *b"SB";
pub const HEADER_LEN: usize = 12;
pub const PROTOCOL_VERSION: u16 = 1;
/// Upper bound on everything in a PUB or MSG frame besides the payload:
/// subject, reply and headers. A frame's body may be `max_payload + MAX_FRAME_OVERHEAD`.
pub const MAX_FRAME_OVERHEAD: u32 = 64 * 1024;

/// CONNECT flag: the client wants a status message when a request finds no responders.
pub const CONNECT_NO_RESPONDERS: u8 = 0x01;
/// CONNECT flag: do not deliver this connection's own publishes to its own subscriptions.
pub const CONNECT_NO_ECHO: u8 = 0x02;
/// MSG flag: a status message saying a request published with this reply subject found no responders.
pub const MSG_NO_RESPONDERS: u8 = 0x01;
/// CONNECT flag: the client asks for stream acks explicitly (PUB flag
/// [`PUB_ACK`]); a PUB of its without the flag gets no ack on its reply
/// subject, so a request to a subject a stream captures gets only the
/// replies of its responders. Without this flag (older clients) every
/// captured PUB with a reply subject is acked there.
pub const CONNECT_EXPLICIT_ACKS: u8 = 0x04;
/// CONNECT flag: the peer is a broker opening a cluster route, not a client.
pub const CONNECT_ROUTE: u8 = 0x80;
/// CONNECT flag (with [`CONNECT_ROUTE`]): the connection carries a
/// replicated stream's Raft RPCs, not a route.
pub const CONNECT_RAFT: u8 = 0x40;
/// PUB flag: answer on the reply subject with the ack of the stream that
/// stores this message (a durable publish). See [`CONNECT_EXPLICIT_ACKS`].
pub const PUB_ACK: u8 = 0x01;
/// PUB flag: [`PUB_ROOM_LEN`] reserved bytes precede the subject, room for
/// the subscription id, so that the kernel's direct delivery turns the PUB
/// into a MSG in place (kind and flags rewritten, the sid written into the
/// room; length and hash are the same). Receivers skip the room whatever it
/// holds. Clients send it only to a broker whose INFO carries
/// [`INFO_PUB_ROOM`]: a broker without the flag would read the room as the
/// subject's length.
pub const PUB_ROOM: u8 = 0x02;
/// Bytes of room a [`PUB_ROOM`] PUB carries before its subject: a MSG's sid.
pub const PUB_ROOM_LEN: usize = 4;
/// INFO flag: the broker accepts [`PUB_ROOM`] and asks for it (direct
/// delivery may apply to this connection). Clients that do not know the flag
/// ignore it.
pub const INFO_PUB_ROOM: u8 = 0x01;
/// RMSG flag: deliver to the receiving broker's plain (non-queue) subscribers.
pub const RMSG_PLAIN: u8 = 0x01;
/// RMSG flag: the publisher did not ask for a stream ack, so a stream on the
/// receiving broker stores the message without acking its reply subject.
/// (Inverted so that an RMSG from an older broker, which never sets it,
/// keeps being acked as before.)
pub const RMSG_NO_ACK: u8 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Connect = 1,
    Info = 2,
    Pub = 3,
    Sub = 4,
    Unsub = 5,
    Msg = 6,
    Ping = 7,
    Pong = 8,
    Err = 9,
    Credit = 10,
    /// Broker-to-broker message on a cluster route (never sent to clients).
    RMsg = 11,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Connect,
            2 => Kind::Info,
            3 => Kind::Pub,
            4 => Kind::Sub,
            5 => Kind::Unsub,
            6 => Kind::Msg,
            7 => Kind::Ping,
            8 => Kind::Pong,
            9 => Kind::Err,
            10 => Kind::Credit,
            11 => Kind::RMsg,
            _ => return None,
        })
    }
}

/// Error codes carried by ERR frames.
pub mod code {
    /// The frame could not be decoded; the connection is closed after this error.
    pub const MALFORMED: u16 = 1;
    /// A PUB payload exceeded the broker's limit; the connection stays usable.
    pub const MAX_PAYLOAD: u16 = 2;
    /// A subject or pattern broke the subject rules; the connection stays usable.
    pub const INVALID_SUBJECT: u16 = 3;
    /// The connection fell behind its outbound budget and is being closed.
    pub const SLOW_CONSUMER: u16 = 4;
    /// The broker is at its connection limit.
    pub const MAX_CONNECTIONS: u16 = 5;
    /// The client speaks a protocol version the broker does not.
    pub const UNSUPPORTED_VERSION: u16 = 6;
    /// The first frame of a connection was not CONNECT.
    pub const NOT_CONNECTED: u16 = 7;
    /// The broker is shutting down.
    pub const SHUTTING_DOWN: u16 = 8;
    /// A CONNECT declared a receive window larger than the broker accepts
    /// (the connection is closed); also reserved for a peer that sends more
    /// bytes than the credit it was granted.
    pub const FLOW_CONTROL: u16 = 9;
    /// Any other refusal (unknown subscription id, bad queue name, ...); the connection stays usable.
    pub const BAD_REQUEST: u16 = 10;
    /// Cluster only: a route between these two brokers is already up; this one is closed.
    pub const DUPLICATE_ROUTE: u16 = 11;
    /// The peer left `--max-pings-out` keepalive PINGs unanswered; the connection is closed.
    pub const STALE_CONNECTION: u16 = 12;
    /// A SUB beyond the broker's per-connection subscription limit; the
    /// connection and its other subscriptions stay usable.
    pub const MAX_SUBSCRIPTIONS: u16 = 13;
    /// CONNECT carried no credentials, or wrong ones, while the broker has
    /// users; the connection is closed.
    pub const AUTHORIZATION_VIOLATION: u16 = 14;
    /// The user may not publish to (or subscribe to) that subject; the
    /// connection and its other subscriptions stay usable.
    pub const PERMISSION_DENIED: u16 = 15;
}

/// ERR header flag: the header's hash field carries the sid of the SUB this
/// error refuses (MAX_SUBSCRIPTIONS, PERMISSION_DENIED, INVALID_SUBJECT, ...).
pub const ERR_SID: u8 = 0x01;

/// ERR header flag: the refused frame was a PUB with a reply subject (a
/// request); the header's hash field carries [`subject_hash`] of that reply
/// subject, so the client fails the request waiting on it at once instead
/// of at its timeout. Clients that do not know the flag ignore it.
///
/// [`subject_hash`]: crate::subject::subject_hash
pub const ERR_REPLY: u8 = 0x02;

/// The reply subject's hash an ERR frame names (flag [`ERR_REPLY`]), if any.
pub fn err_reply(h: &Header) -> Option<u32> {
    (h.kind == Kind::Err && h.flags & ERR_REPLY != 0).then_some(h.hash)
}

/// The sid an ERR frame names (flag [`ERR_SID`]), if any.
pub fn err_sid(h: &Header) -> Option<u32> {
    (h.kind == Kind::Err && h.flags & ERR_SID != 0).then_some(h.hash)
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic bytes {0:02x?}: not a sockbus frame")]
    BadMagic([u8; 2]),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("frame is truncated: {0} is missing")]
    Truncated(&'static str),
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("{0} trailing bytes after the frame body")]
    TrailingBytes(usize),
    #[error("malformed header block")]
    BadHeaders,
    #[error("{0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    #[error("unknown credentials kind {0} in CONNECT")]
    UnknownCredentials(u8),
}

/// The fixed-size header at the front of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub len: u32,
    pub hash: u32,
}

impl Header {
    /// Total frame length, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }

    pub fn write(&self, dst: &mut impl BufMut) {
        dst.put_slice(&MAGIC);
        dst.put_u8(self.kind as u8);
        dst.put_u8(self.flags);
        dst.put_u32_le(self.len);
        dst.put_u32_le(self.hash);
    }
}

/// Parses the header at the front of `buf`. `Ok(None)` means fewer than
/// [`HEADER_LEN`] bytes are buffered. The body length is not checked here:
/// the caller decides what an oversized frame means (see [`check_len`]).
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        // Reject garbage as early as possible, even on a partial header.
        if buf.len() >= 2 && buf[..2] != MAGIC {
            return Err(ProtocolError::BadMagic([buf[0], buf[1]]));
        }
        return Ok(None);
    }
    if buf[..2] != MAGIC {
        return Err(ProtocolError::BadMagic([buf[0], buf[1]]));
    }
    let kind = Kind::from_u8(buf[2]).ok_or(ProtocolError::UnknownKind(buf[2]))?;
    let flags = buf[3];
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let hash = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    Ok(Some(Header {
        kind,
        flags,
        len,
        hash,
    }))
}

/// Refuses a body longer than `max`.
pub fn check_len(h: &Header, max: u32) -> Result<(), ProtocolError> {
    if h.len > max {
        return Err(ProtocolError::FrameTooLarge { len: h.len, max });
    }
    Ok(())
}

/// A decoded frame borrowing from the receive buffer. Decoding allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRef<'a> {
    Connect {
        version: u16,
        flags: u8,
        recv_window: u32,
        name: &'a str,
        token: &'a [u8],
    },
    Info {
        version: u16,
        /// [`INFO_PUB_ROOM`] or 0.
        flags: u8,
        recv_window: u32,
        max_payload: u32,
        server_name: &'a str,
    },
    Pub {
        /// [`PUB_ACK`], [`PUB_ROOM`] (the room is skipped, not kept) or 0.
        flags: u8,
        subject: &'a str,
        reply: Option<&'a str>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    Sub {
        sid: u32,
        subject: &'a str,
        queue: Option<&'a str>,
    },
    Unsub {
        sid: u32,
        max: u32,
    },
    Msg {
        sid: u32,
        flags: u8,
        subject: &'a str,
        reply: Option<&'a str>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    Ping(u64),
    Pong(u64),
    Err {
        code: u16,
        text: &'a str,
    },
    Credit(u32),
    /// A message forwarded over a cluster route: delivered to the receiving
    /// broker's plain subscribers when `flags & RMSG_PLAIN`, and to one local
    /// member of each queue group named in `queues` (a block of str16).
    RMsg {
        flags: u8,
        subject: &'a str,
        reply: Option<&'a str>,
        queues: &'a [u8],
        headers: &'a [u8],
        payload: &'a [u8],
    },
}

/// Iterates the queue group names of an RMSG `queues` block.
pub fn iter_queues(mut block: &[u8]) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        let mut c = Cursor { buf: block };
        let q = c.str16("queue group").ok()?;
        block = c.buf;
        Some(q)
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
    fn str16(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        let b = self.bytes16(what)?;
        std::str::from_utf8(b).map_err(|_| ProtocolError::BadUtf8(what))
    }
    fn opt_str16(&mut self, what: &'static str) -> Result<Option<&'a str>, ProtocolError> {
        let s = self.str16(what)?;
        Ok(if s.is_empty() { None } else { Some(s) })
    }
    fn headers(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32("headers length")? as usize;
        let block = self.take(n, "headers")?;
        validate_headers(block)?;
        Ok(block)
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Decodes the body of a frame whose header is `h`. `body` must be exactly `h.len` bytes.
pub fn decode_body<'a>(h: &Header, body: &'a [u8]) -> Result<FrameRef<'a>, ProtocolError> {
    let mut c = Cursor { buf: body };
    let f = match h.kind {
        Kind::Connect => {
            let version = c.u16("version")?;
            let recv_window = c.u32("receive window")?;
            let name = c.str16("client name")?;
            let token = c.bytes16("auth token")?;
            FrameRef::Connect {
                version,
                flags: h.flags,
                recv_window,
                name,
                token,
            }
        }
        Kind::Info => FrameRef::Info {
            version: c.u16("version")?,
            flags: h.flags,
            recv_window: c.u32("receive window")?,
            max_payload: c.u32("max payload")?,
            server_name: c.str16("server name")?,
        },
        Kind::Pub => {
            if h.flags & PUB_ROOM != 0 {
                c.take(PUB_ROOM_LEN, "room for the subscription id")?;
            }
            let subject = c.str16("subject")?;
            let reply = c.opt_str16("reply subject")?;
            let headers = c.headers()?;
            let payload = c.buf;
            c.buf = &[];
            FrameRef::Pub {
                flags: h.flags,
                subject,
                reply,
                headers,
                payload,
            }
        }
        Kind::Sub => FrameRef::Sub {
            sid: c.u32("subscription id")?,
            subject: c.str16("subject")?,
            queue: c.opt_str16("queue group")?,
        },
        Kind::Unsub => FrameRef::Unsub {
            sid: c.u32("subscription id")?,
            max: c.u32("max messages")?,
        },
        Kind::Msg => {
            let sid = c.u32("subscription id")?;
            let subject = c.str16("subject")?;
            let reply = c.opt_str16("reply subject")?;
            let headers = c.headers()?;
            let payload = c.buf;
            c.buf = &[];
            FrameRef::Msg {
                sid,
                flags: h.flags,
                subject,
                reply,
                headers,
                payload,
            }
        }
        Kind::Ping => FrameRef::Ping(c.u64("ping id")?),
        Kind::Pong => FrameRef::Pong(c.u64("pong id")?),
        Kind::Err => FrameRef::Err {
            code: c.u16("error code")?,
            text: c.str16("error text")?,
        },
        Kind::Credit => FrameRef::Credit(c.u32("credit")?),
        Kind::RMsg => {
            let subject = c.str16("subject")?;
            let reply = c.opt_str16("reply subject")?;
            let nq = c.u16("queue count")? as usize;
            let start = c.buf;
            for _ in 0..nq {
                c.str16("queue group")?;
            }
            let queues = &start[..start.len() - c.buf.len()];
            let headers = c.headers()?;
            let payload = c.buf;
            c.buf = &[];
            FrameRef::RMsg {
                flags: h.flags,
                subject,
                reply,
                queues,
                headers,
                payload,
            }
        }
    };
    c.finish()?;
    Ok(f)
}

/// Decodes one whole frame from the front of `buf`. Returns the frame and
/// its total length, or `Ok(None)` when more bytes are needed.
pub fn decode(buf: &[u8], max_body: u32) -> Result<Option<(FrameRef<'_>, usize)>, ProtocolError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(None);
    };
    check_len(&h, max_body)?;
    let total = h.frame_len();
    if buf.len() < total {
        return Ok(None);
    }
    let f = decode_body(&h, &buf[HEADER_LEN..total])?;
    Ok(Some((f, total)))
}

// ---------------------------------------------------------------- headers

/// Checks that a header block is a sequence of `str16 name, str16 value` pairs.
pub fn validate_headers(mut block: &[u8]) -> Result<(), ProtocolError> {
    while !block.is_empty() {
        for _ in 0..2 {
            if block.len() < 2 {
                return Err(ProtocolError::BadHeaders);
            }
            let n = u16::from_le_bytes([block[0], block[1]]) as usize;
            if block.len() < 2 + n || std::str::from_utf8(&block[2..2 + n]).is_err() {
                return Err(ProtocolError::BadHeaders);
            }
            block = &block[2 + n..];
        }
    }
    Ok(())
}

/// Iterates the (name, value) pairs of a validated header block.
pub fn iter_headers(block: &[u8]) -> HeaderIter<'_> {
    HeaderIter { block }
}

pub struct HeaderIter<'a> {
    block: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a str);
    fn next(&mut self) -> Option<Self::Item> {
        let mut c = Cursor { buf: self.block };
        let k = c.str16("header name").ok()?;
        let v = c.str16("header value").ok()?;
        self.block = c.buf;
        Some((k, v))
    }
}

/// Appends one header pair to a header block.
pub fn push_header(block: &mut Vec<u8>, name: &str, value: &str) -> Result<(), ProtocolError> {
    let nl = u16::try_from(name.len()).map_err(|_| ProtocolError::FieldTooLong("header name"))?;
    let vl = u16::try_from(value.len()).map_err(|_| ProtocolError::FieldTooLong("header value"))?;
    block.put_u16_le(nl);
    block.put_slice(name.as_bytes());
    block.put_u16_le(vl);
    block.put_slice(value.as_bytes());
    Ok(())
}

// ---------------------------------------------------------------- encoding
//
// Encoders write straight into the caller's buffer so a batch of frames is
// one contiguous write. Strings longer than u16::MAX are the caller's bug
// (subjects are validated to 4 KiB) and are refused with FieldTooLong.

fn str16_len(s: &str, what: &'static str) -> Result<u16, ProtocolError> {
    u16::try_from(s.len()).map_err(|_| ProtocolError::FieldTooLong(what))
}

fn body_len(n: usize) -> Result<u32, ProtocolError> {
    u32::try_from(n).map_err(|_| ProtocolError::FrameTooLarge {
        len: u32::MAX,
        max: u32::MAX,
    })
}

fn put_str16(dst: &mut impl BufMut, s: &[u8]) {
    dst.put_u16_le(s.len() as u16);
    dst.put_slice(s);
}

/// Encoded size of a PUB or MSG frame, header included.
pub fn message_frame_len(
    is_msg: bool,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) -> usize {
    HEADER_LEN
        + if is_msg { 4 } else { 0 }
        + 2
        + subject.len()
        + 2
        + reply.map_or(0, str::len)
        + 4
        + headers.len()
        + payload.len()
}

pub fn encode_pub(
    dst: &mut impl BufMut,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) -> Result<(), ProtocolError> {
    encode_pub_flags(dst, 0, subject, reply, headers, payload)
}

/// Length of a PUB frame with `flags` ([`PUB_ROOM`] adds the room).
pub fn pub_frame_len(
    flags: u8,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) -> usize {
    let room = if flags & PUB_ROOM != 0 {
        PUB_ROOM_LEN
    } else {
        0
    };
    message_frame_len(false, subject, reply, headers, payload) + room
}

/// [`encode_pub`] with PUB flags ([`PUB_ACK`], [`PUB_ROOM`]: the room is
/// written as zeros).
pub fn encode_pub_flags(
    dst: &mut impl BufMut,
    flags: u8,
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) -> Result<(), ProtocolError> {
    str16_len(subject, "subject")?;
    str16_len(reply.unwrap_or(""), "reply subject")?;
    let len = body_len(pub_frame_len(flags, subject, reply, headers, payload) - HEADER_LEN)?;
    Header {
        kind: Kind::Pub,
        flags,
        len,
        hash: subject_hash(subject.as_bytes()),
    }
    .write(dst);
    if flags & PUB_ROOM != 0 {
        dst.put_bytes(0, PUB_ROOM_LEN);
    }
    put_str16(dst, subject.as_bytes());
    put_str16(dst, reply.unwrap_or("").as_bytes());
    dst.put_u32_le(headers.len() as u32);
    dst.put_slice(headers);
    dst.put_slice(payload);
    Ok(())
}

/// Encodes a MSG frame. `hash` is the subject hash, computed once per
/// published message rather than once per subscriber.
#[allow(clippy::too_many_arguments)]
pub fn encode_msg(
    dst: &mut impl BufMut,
    sid: u32,
    flags: u8,
    subject: &str,
    hash: u32,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    // Subject, reply and headers were validated when the PUB was decoded.
    let len = (message_frame_len(true, subject, reply, headers, payload) - HEADER_LEN) as u32;
    Header {
        kind: Kind::Msg,
        flags,
        len,
        hash,
    }
    .write(dst);
    dst.put_u32_le(sid);
    put_str16(dst, subject.as_bytes());
    put_str16(dst, reply.unwrap_or("").as_bytes());
    dst.put_u32_le(headers.len() as u32);
    dst.put_slice(headers);
    dst.put_slice(payload);
}

pub fn encode_sub(
    dst: &mut impl BufMut,
    sid: u32,
    subject: &str,
    queue: Option<&str>,
) -> Result<(), ProtocolError> {
    let q = queue.unwrap_or("");
    let len =
        4 + 2 + str16_len(subject, "subject")? as u32 + 2 + str16_len(q, "queue group")? as u32;
    Header {
        kind: Kind::Sub,
        flags: 0,
        len,
        hash: 0,
    }
    .write(dst);
    dst.put_u32_le(sid);
    put_str16(dst, subject.as_bytes());
    put_str16(dst, q.as_bytes());
    Ok(())
}

pub fn encode_unsub(dst: &mut impl BufMut, sid: u32, max: u32) {
    Header {
        kind: Kind::Unsub,
        flags: 0,
        len: 8,
        hash: 0,
    }
    .write(dst);
    dst.put_u32_le(sid);
    dst.put_u32_le(max);
}

pub fn encode_connect(
    dst: &mut impl BufMut,
    flags: u8,
    recv_window: u32,
    name: &str,
    token: &[u8],
) -> Result<(), ProtocolError> {
    let nl = str16_len(name, "client name")? as u32;
    let tl =
        u16::try_from(token.len()).map_err(|_| ProtocolError::FieldTooLong("auth token"))? as u32;
    Header {
        kind: Kind::Connect,
        flags,
        len: 2 + 4 + 2 + nl + 2 + tl,
        hash: 0,
    }
    .write(dst);
    dst.put_u16_le(PROTOCOL_VERSION);
    dst.put_u32_le(recv_window);
    put_str16(dst, name.as_bytes());
    put_str16(dst, token);
    Ok(())
}

pub fn encode_info(
    dst: &mut impl BufMut,
    recv_window: u32,
    max_payload: u32,
    server_name: &str,
) -> Result<(), ProtocolError> {
    encode_info_flags(dst, 0, recv_window, max_payload, server_name)
}

/// [`encode_info`] with INFO flags ([`INFO_PUB_ROOM`]).
pub fn encode_info_flags(
    dst: &mut impl BufMut,
    flags: u8,
    recv_window: u32,
    max_payload: u32,
    server_name: &str,
) -> Result<(), ProtocolError> {
    let nl = str16_len(server_name, "server name")? as u32;
    Header {
        kind: Kind::Info,
        flags,
        len: 2 + 4 + 4 + 2 + nl,
        hash: 0,
    }
    .write(dst);
    dst.put_u16_le(PROTOCOL_VERSION);
    dst.put_u32_le(recv_window);
    dst.put_u32_le(max_payload);
    put_str16(dst, server_name.as_bytes());
    Ok(())
}

pub fn encode_ping(dst: &mut impl BufMut, id: u64) {
    Header {
        kind: Kind::Ping,
        flags: 0,
        len: 8,
        hash: 0,
    }
    .write(dst);
    dst.put_u64_le(id);
}

pub fn encode_pong(dst: &mut impl BufMut, id: u64) {
    Header {
        kind: Kind::Pong,
        flags: 0,
        len: 8,
        hash: 0,
    }
    .write(dst);
    dst.put_u64_le(id);
}

/// Encodes an ERR frame; text longer than 1 KiB is cut at a character boundary.
pub fn encode_err(dst: &mut impl BufMut, code: u16, text: &str) {
    encode_err_as(dst, code, 0, 0, text)
}

/// An ERR that refuses the SUB with this sid ([`ERR_SID`]).
pub fn encode_err_sid(dst: &mut impl BufMut, code: u16, sid: u32, text: &str) {
    encode_err_as(dst, code, ERR_SID, sid, text)
}

/// An ERR that refuses a PUB carrying the reply subject `reply` ([`ERR_REPLY`]).
pub fn encode_err_reply(dst: &mut impl BufMut, code: u16, reply: &str, text: &str) {
    let hash = crate::subject::subject_hash(reply.as_bytes());
    encode_err_as(dst, code, ERR_REPLY, hash, text)
}

fn encode_err_as(dst: &mut impl BufMut, code: u16, flags: u8, hash: u32, text: &str) {
    let mut end = text.len().min(1024);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    Header {
        kind: Kind::Err,
        flags,
        len: 2 + 2 + text.len() as u32,
        hash,
    }
    .write(dst);
    dst.put_u16_le(code);
    put_str16(dst, text.as_bytes());
}

/// Encoded size of an RMSG frame.
pub fn rmsg_frame_len(
    subject: &str,
    reply: Option<&str>,
    queues: &[&str],
    headers: &[u8],
    payload: &[u8],
) -> usize {
    HEADER_LEN
        + 2
        + subject.len()
        + 2
        + reply.map_or(0, str::len)
        + 2
        + queues.iter().map(|q| 2 + q.len()).sum::<usize>()
        + 4
        + headers.len()
        + payload.len()
}

/// Encodes an RMSG frame (fields validated by the caller: they come from a decoded PUB).
#[allow(clippy::too_many_arguments)]
pub fn encode_rmsg(
    dst: &mut impl BufMut,
    flags: u8,
    subject: &str,
    hash: u32,
    reply: Option<&str>,
    queues: &[&str],
    headers: &[u8],
    payload: &[u8],
) {
    let len = (rmsg_frame_len(subject, reply, queues, headers, payload) - HEADER_LEN) as u32;
    Header {
        kind: Kind::RMsg,
        flags,
        len,
        hash,
    }
    .write(dst);
    put_str16(dst, subject.as_bytes());
    put_str16(dst, reply.unwrap_or("").as_bytes());
    dst.put_u16_le(queues.len() as u16);
    for q in queues {
        put_str16(dst, q.as_bytes());
    }
    dst.put_u32_le(headers.len() as u32);
    dst.put_slice(headers);
    dst.put_slice(payload);
}

pub const CREDIT_FRAME_LEN: usize = HEADER_LEN + 4;

pub fn encode_credit(dst: &mut impl BufMut, bytes: u32) {
    Header {
        kind: Kind::Credit,
        flags: 0,
        len: 4,
        hash: 0,
    }
    .write(dst);
    dst.put_u32_le(bytes);
}
