//! The NATS client protocol, sans-IO: what the broker's NATS front end
//! (`--nats`, docs/nats.md) reads from and writes to a NATS client. Text
//! control lines ending in CRLF, payloads counted in bytes:
//!
//! ```text
//! client: CONNECT {json} | PUB subj [reply] n | HPUB subj [reply] h n | SUB subj [queue] sid
//!         UNSUB sid [max] | PING | PONG
//! server: INFO {json} | MSG subj sid [reply] n | HMSG subj sid [reply] h n | PING | PONG | +OK | -ERR 'text'
//! ```
//!
//! Inside the broker headers travel as sockbus header blocks (frame.rs);
//! [`headers_to_block`] and [`encode_msg`] translate the `NATS/1.0` header
//! text to and from them, so a header set by a NATS client reaches a sockbus
//! SDK subscriber and back.

use bytes::BufMut;
use thiserror::Error;

use crate::frame::{iter_headers, push_header};

/// Longest control line read (nats-server's default `max_control_line`).
pub const MAX_CONTROL_LINE: usize = 4096;
/// The first line of a header block.
const HEADER_VERSION: &[u8] = b"NATS/1.0";
/// A no-responders status (what a request with no subscriber gets).
const NO_RESPONDERS: &[u8] = b"NATS/1.0 503\r\n\r\n";

/// What the client sent that the parser cannot accept. Each closes the
/// connection with `-ERR '<text>'`, as nats-server does.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NatsError {
    #[error("Unknown Protocol Operation")]
    UnknownOp,
    #[error("Maximum Control Line Exceeded")]
    ControlLineTooLong,
    #[error("Parser Error")]
    Parser,
}

/// One operation a client sent, borrowed from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// The CONNECT options, JSON.
    Connect(&'a [u8]),
    /// PUB or HPUB; `headers` is the raw `NATS/1.0` block (empty for PUB).
    Pub {
        subject: &'a str,
        reply: Option<&'a str>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    Sub {
        subject: &'a str,
        queue: Option<&'a str>,
        sid: &'a str,
    },
    Unsub {
        sid: &'a str,
        max: Option<u64>,
    },
    Ping,
    Pong,
    /// `+OK` or `-ERR` from a client: meaningless here, ignored.
    Ignored,
}

/// What [`parse`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// An operation and how many bytes it took.
    Op(Op<'a>, usize),
    /// Not a whole operation yet; at least this many bytes are needed.
    Incomplete(usize),
    /// A PUB or HPUB whose payload is larger than allowed: refuse it and
    /// skip `skip` bytes (control line, headers, payload, CRLF), read or
    /// not, without holding them in memory.
    TooLarge { size: usize, skip: usize },
}

fn text(b: &[u8]) -> Result<&str, NatsError> {
    std::str::from_utf8(b).map_err(|_| NatsError::Parser)
}

fn number(b: &[u8]) -> Result<usize, NatsError> {
    if b.is_empty() || b.len() > 12 || !b.iter().all(u8::is_ascii_digit) {
        return Err(NatsError::Parser);
    }
    Ok(b.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

/// Up to four arguments of a control line.
fn collect<'a>(args: impl Iterator<Item = &'a [u8]>) -> Result<([&'a [u8]; 4], usize), NatsError> {
    let mut argv: [&[u8]; 4] = [&[]; 4];
    let mut n = 0;
    for a in args {
        if n == argv.len() {
            return Err(NatsError::Parser);
        }
        argv[n] = a;
        n += 1;
    }
    Ok((argv, n))
}

/// Parses the operation at the front of `buf`. `max_payload`: the largest
/// payload (headers included, as nats-server counts it) accepted.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Parsed<'_>, NatsError> {
    let window = &buf[..buf.len().min(MAX_CONTROL_LINE + 2)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(NatsError::ControlLineTooLong);
        }
        return Ok(Parsed::Incomplete(buf.len() + 1));
    };
    let line_len = nl + 1;
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut args = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|a| !a.is_empty());
    let Some(name) = args.next() else {
        return Err(NatsError::UnknownOp);
    };
    // Case-insensitive, without allocating: this runs for every operation.
    let is = |w: &[u8]| name.eq_ignore_ascii_case(w);
    let op: &[u8] = [
        &b"PUB"[..],
        b"HPUB",
        b"SUB",
        b"UNSUB",
        b"PING",
        b"PONG",
        b"CONNECT",
        b"+OK",
        b"-ERR",
    ]
    .into_iter()
    .find(|w| is(w))
    .unwrap_or(b"");
    match op {
        b"CONNECT" => {
            let start = line
                .iter()
                .position(|&b| b == b'{')
                .ok_or(NatsError::Parser)?;
            Ok(Parsed::Op(Op::Connect(&line[start..]), line_len))
        }
        b"PING" => Ok(Parsed::Op(Op::Ping, line_len)),
        b"PONG" => Ok(Parsed::Op(Op::Pong, line_len)),
        b"+OK" | b"-ERR" => Ok(Parsed::Op(Op::Ignored, line_len)),
        b"PUB" | b"HPUB" => {
            let (argv, argc) = collect(&mut args)?;
            let hpub = op == b"HPUB";
            let fixed = if hpub { 3 } else { 2 };
            if argc != fixed && argc != fixed + 1 {
                return Err(NatsError::Parser);
            }
            let subject = text(argv[0])?;
            let reply = if argc == fixed + 1 {
                Some(text(argv[1])?)
            } else {
                None
            };
            let (hdr, total) = if hpub {
                let h = number(argv[argc - 2])?;
                let t = number(argv[argc - 1])?;
                // nats.js sends an empty header block as `HPUB s r 0 n`
                // (a JetStream publish without options): no headers.
                if h > t || (h != 0 && h < HEADER_VERSION.len()) {
                    return Err(NatsError::Parser);
                }
                (h, t)
            } else {
                (0, number(argv[argc - 1])?)
            };
            let need = line_len + total + 2;
            if total > max_payload {
                return Ok(Parsed::TooLarge {
                    size: total,
                    skip: need,
                });
            }
            if buf.len() < need {
                return Ok(Parsed::Incomplete(need));
            }
            if &buf[need - 2..need] != b"\r\n" {
                return Err(NatsError::Parser);
            }
            let body = &buf[line_len..line_len + total];
            Ok(Parsed::Op(
                Op::Pub {
                    subject,
                    reply,
                    headers: &body[..hdr],
                    payload: &body[hdr..],
                },
                need,
            ))
        }
        b"SUB" => {
            let (argv, argc) = collect(&mut args)?;
            let (subject, queue, sid) = match argc {
                2 => (argv[0], None, argv[1]),
                3 => (argv[0], Some(text(argv[1])?), argv[2]),
                _ => return Err(NatsError::Parser),
            };
            Ok(Parsed::Op(
                Op::Sub {
                    subject: text(subject)?,
                    queue,
                    sid: text(sid)?,
                },
                line_len,
            ))
        }
        b"UNSUB" => {
            let (argv, argc) = collect(&mut args)?;
            let max = match argc {
                1 => None,
                2 => Some(number(argv[1])? as u64),
                _ => return Err(NatsError::Parser),
            };
            Ok(Parsed::Op(
                Op::Unsub {
                    sid: text(argv[0])?,
                    max,
                },
                line_len,
            ))
        }
        _ => Err(NatsError::UnknownOp),
    }
}

/// Turns a `NATS/1.0` header block (HPUB) into a sockbus header block.
/// A status on the first line (only servers send one) is dropped. Errors
/// on a block that is not `NATS/1.0` text with `Name: value` lines.
pub fn headers_to_block(raw: &[u8]) -> Result<Vec<u8>, NatsError> {
    let mut block = Vec::new();
    if raw.is_empty() {
        return Ok(block);
    }
    let raw = text(raw)?;
    let mut lines = raw.split("\r\n");
    match lines.next() {
        Some(first) if first.as_bytes().starts_with(HEADER_VERSION) => {}
        _ => return Err(NatsError::Parser),
    }
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or(NatsError::Parser)?;
        let name = name.trim();
        if name.is_empty() {
            return Err(NatsError::Parser);
        }
        push_header(&mut block, name, value.trim()).map_err(|_| NatsError::Parser)?;
    }
    Ok(block)
}

/// A broker status at the head of a sockbus header block (`Sb-Status`,
/// then optionally `Sb-Description`): on the NATS port it is the status
/// line, `NATS/1.0 404 No Messages`, as JetStream's clients read it.
/// Returns the code, the description and how many headers they take.
fn status_of(block: &[u8]) -> Option<(&str, &str, usize)> {
    let mut it = iter_headers(block);
    let (k, code) = it.next()?;
    if !k.eq_ignore_ascii_case(STATUS_HEADER)
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    match it.next() {
        Some((k, d)) if k.eq_ignore_ascii_case(DESCRIPTION_HEADER) => Some((code, d, 2)),
        _ => Some((code, "", 1)),
    }
}

const STATUS_HEADER: &str = "Sb-Status";
const DESCRIPTION_HEADER: &str = "Sb-Description";

/// Length of the `NATS/1.0` text of a sockbus header block; 0 when empty.
pub fn headers_len(block: &[u8]) -> usize {
    if block.is_empty() {
        return 0;
    }
    let (line, skip) = match status_of(block) {
        Some((code, d, n)) => (
            1 + code.len() + if d.is_empty() { 0 } else { 1 + d.len() },
            n,
        ),
        None => (0, 0),
    };
    let pairs: usize = iter_headers(block)
        .skip(skip)
        .map(|(k, v)| k.len() + 2 + v.len() + 2)
        .sum();
    HEADER_VERSION.len() + line + 2 + pairs + 2
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn put_number(dst: &mut impl BufMut, n: usize) {
    let mut b = [0u8; 20];
    let mut i = b.len();
    let mut n = n;
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    dst.put_slice(&b[i..]);
}

/// A message as a NATS subscriber gets it: MSG, or HMSG when it carries
/// headers or is a no-responders status.
pub struct Msg<'a> {
    pub subject: &'a str,
    pub sid: u32,
    /// The subscription's id as the client named it, when it is not the
    /// decimal `sid` (NATS sids are opaque tokens).
    pub sid_name: Option<&'a str>,
    pub reply: Option<&'a str>,
    /// A sockbus header block.
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    /// A no-responders status (503), with no headers or payload.
    pub no_responders: bool,
}

impl Msg<'_> {
    fn header_text_len(&self) -> usize {
        if self.no_responders {
            NO_RESPONDERS.len()
        } else {
            headers_len(self.headers)
        }
    }

    /// Bytes [`encode_msg`] writes.
    pub fn len(&self) -> usize {
        let h = self.header_text_len();
        let total = h + self.payload.len();
        let reply = self.reply.map_or(0, |r| r.len() + 1);
        let (prefix, hdr_count) = if h > 0 { (5, digits(h) + 1) } else { (4, 0) };
        prefix
            + self.subject.len()
            + 1
            + self
                .sid_name
                .map_or_else(|| digits(self.sid as usize), str::len)
            + reply
            + 1
            + hdr_count
            + digits(total)
            + 2
            + total
            + 2
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Writes `m` as `MSG subject sid [reply] n` or `HMSG subject sid [reply] h n`.
pub fn encode_msg(dst: &mut impl BufMut, m: &Msg<'_>) {
    let h = m.header_text_len();
    dst.put_slice(if h > 0 { b"HMSG " } else { b"MSG " });
    dst.put_slice(m.subject.as_bytes());
    dst.put_u8(b' ');
    match m.sid_name {
        Some(name) => dst.put_slice(name.as_bytes()),
        None => put_number(dst, m.sid as usize),
    }
    if let Some(r) = m.reply {
        dst.put_u8(b' ');
        dst.put_slice(r.as_bytes());
    }
    dst.put_u8(b' ');
    if h > 0 {
        put_number(dst, h);
        dst.put_u8(b' ');
    }
    put_number(dst, h + m.payload.len());
    dst.put_slice(b"\r\n");
    if m.no_responders {
        dst.put_slice(NO_RESPONDERS);
    } else if h > 0 {
        put_headers(dst, m.headers);
    }
    dst.put_slice(m.payload);
    dst.put_slice(b"\r\n");
}

/// The `NATS/1.0` text of a non-empty sockbus header block.
fn put_headers(dst: &mut impl BufMut, block: &[u8]) {
    dst.put_slice(HEADER_VERSION);
    let mut skip = 0;
    if let Some((code, d, n)) = status_of(block) {
        dst.put_u8(b' ');
        dst.put_slice(code.as_bytes());
        if !d.is_empty() {
            dst.put_u8(b' ');
            dst.put_slice(d.as_bytes());
        }
        skip = n;
    }
    dst.put_slice(b"\r\n");
    for (k, v) in iter_headers(block).skip(skip) {
        dst.put_slice(k.as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(v.as_bytes());
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
}

/// A sockbus header block as NATS header text (`NATS/1.0\r\nK: V\r\n\r\n`),
/// what JetStream's `STREAM.MSG.GET` answers carry; empty for no headers.
pub fn headers_text(block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers_len(block));
    if !block.is_empty() {
        put_headers(&mut out, block);
    }
    out
}

/// `-ERR 'text'`.
pub fn encode_err(dst: &mut impl BufMut, text: &str) {
    dst.put_slice(b"-ERR '");
    // A quote would end the text early for a client's parser.
    for b in text.bytes() {
        dst.put_u8(if b == b'\'' || b == b'\r' || b == b'\n' {
            b'"'
        } else {
            b
        });
    }
    dst.put_slice(b"'\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(buf: &[u8]) -> Op<'_> {
        match parse(buf, 1024).unwrap() {
            Parsed::Op(o, n) => {
                assert_eq!(
                    n,
                    buf.len(),
                    "consumed all of {:?}",
                    String::from_utf8_lossy(buf)
                );
                o
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn header_text_comes_back_as_the_client_wrote_it() {
        let text = b"NATS/1.0\r\nNats-Msg-Id: a-1\r\nX-Two: b c\r\n\r\n";
        let block = headers_to_block(text).unwrap();
        assert_eq!(headers_text(&block), text);
        assert_eq!(headers_text(&block).len(), headers_len(&block));
        assert!(headers_text(&[]).is_empty());
    }

    #[test]
    fn every_client_operation_parses_case_insensitively() {
        assert_eq!(
            op(b"CONNECT {\"verbose\":false}\r\n"),
            Op::Connect(b"{\"verbose\":false}")
        );
        assert_eq!(op(b"ping\r\n"), Op::Ping);
        assert_eq!(op(b"PONG\r\n"), Op::Pong);
        assert_eq!(
            op(b"PUB a.b 5\r\nhello\r\n"),
            Op::Pub {
                subject: "a.b",
                reply: None,
                headers: b"",
                payload: b"hello"
            }
        );
        assert_eq!(
            op(b"pub a.b  _INBOX.x\t0\r\n\r\n"),
            Op::Pub {
                subject: "a.b",
                reply: Some("_INBOX.x"),
                headers: b"",
                payload: b""
            }
        );
        assert_eq!(
            op(b"HPUB a r 24 26\r\nNATS/1.0\r\nA: b\r\nX: y\r\n\r\nhi\r\n"),
            Op::Pub {
                subject: "a",
                reply: Some("r"),
                headers: b"NATS/1.0\r\nA: b\r\nX: y\r\n\r\n",
                payload: b"hi"
            }
        );
        assert_eq!(
            op(b"SUB a.* 1\r\n"),
            Op::Sub {
                subject: "a.*",
                queue: None,
                sid: "1"
            }
        );
        assert_eq!(
            op(b"SUB a q 9\r\n"),
            Op::Sub {
                subject: "a",
                queue: Some("q"),
                sid: "9"
            }
        );
        assert_eq!(
            op(b"UNSUB 9\r\n"),
            Op::Unsub {
                sid: "9",
                max: None
            }
        );
        assert_eq!(
            op(b"UNSUB 9 3\r\n"),
            Op::Unsub {
                sid: "9",
                max: Some(3)
            }
        );
    }

    #[test]
    fn an_hpub_with_an_empty_header_block_is_a_pub_without_headers() {
        assert_eq!(
            op(b"HPUB jsjs.a _INBOX.1 0 2\r\nm1\r\n"),
            Op::Pub {
                subject: "jsjs.a",
                reply: Some("_INBOX.1"),
                headers: b"",
                payload: b"m1",
            }
        );
        assert_eq!(headers_to_block(b"").unwrap(), b"");
        assert_eq!(
            parse(b"HPUB a 5 7\r\nNATS/\r\n\r\n", 10),
            Err(NatsError::Parser)
        );
    }

    #[test]
    fn a_pub_split_at_every_byte_is_incomplete_until_whole() {
        let all = b"HPUB a 12 15\r\nNATS/1.0\r\n\r\nabc\r\n";
        for cut in 0..all.len() {
            assert!(
                matches!(parse(&all[..cut], 1024), Ok(Parsed::Incomplete(_))),
                "cut {cut}"
            );
        }
        assert!(matches!(parse(all, 1024), Ok(Parsed::Op(Op::Pub { .. }, n)) if n == all.len()));
    }

    #[test]
    fn bad_input_is_refused_with_the_nats_error() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 10), Err(NatsError::UnknownOp));
        assert_eq!(parse(b"PUB a\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"PUB a x\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"PUB a 2\r\nabcd\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"HPUB a 5 2\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"SUB a\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"UNSUB\r\n", 10), Err(NatsError::Parser));
        assert_eq!(parse(b"\r\n", 10), Err(NatsError::UnknownOp));
        let long = vec![b'A'; MAX_CONTROL_LINE + 10];
        assert_eq!(parse(&long, 10), Err(NatsError::ControlLineTooLong));
        assert_eq!(
            parse(b"PUB a 11\r\n", 10),
            Ok(Parsed::TooLarge {
                size: 11,
                skip: 10 + 11 + 2
            })
        );
    }

    #[test]
    fn headers_go_to_a_block_and_back_to_the_same_text() {
        let raw = b"NATS/1.0\r\nTrace-Id: 42\r\nX: a: b\r\n\r\n";
        let block = headers_to_block(raw).unwrap();
        assert_eq!(
            iter_headers(&block).collect::<Vec<_>>(),
            [("Trace-Id", "42"), ("X", "a: b")]
        );
        assert_eq!(headers_len(&block), raw.len());
        let m = Msg {
            subject: "s",
            sid: 12,
            sid_name: None,
            reply: Some("r"),
            headers: &block,
            payload: b"pay",
            no_responders: false,
        };
        let mut out = Vec::new();
        encode_msg(&mut out, &m);
        assert_eq!(out.len(), m.len());
        let mut want = format!("HMSG s 12 r {} {}\r\n", raw.len(), raw.len() + 3).into_bytes();
        want.extend_from_slice(raw);
        want.extend_from_slice(b"pay\r\n");
        assert_eq!(out, want);
        assert!(headers_to_block(b"HTTP/1.1\r\n\r\n").is_err());
        assert!(headers_to_block(b"NATS/1.0\r\nnocolon\r\n\r\n").is_err());
    }

    #[test]
    fn a_broker_status_at_the_head_of_the_headers_is_the_nats_status_line() {
        let mut block = Vec::new();
        push_header(&mut block, "Sb-Status", "404").unwrap();
        push_header(&mut block, "Sb-Description", "No Messages").unwrap();
        push_header(&mut block, "Nats-Pending-Messages", "3").unwrap();
        let raw = b"NATS/1.0 404 No Messages\r\nNats-Pending-Messages: 3\r\n\r\n";
        assert_eq!(headers_len(&block), raw.len());
        let m = Msg {
            subject: "_INBOX.p",
            sid: 1,
            sid_name: None,
            reply: None,
            headers: &block,
            payload: b"",
            no_responders: false,
        };
        let mut out = Vec::new();
        encode_msg(&mut out, &m);
        assert_eq!(out.len(), m.len());
        let mut want = format!("HMSG _INBOX.p 1 {0} {0}\r\n", raw.len()).into_bytes();
        want.extend_from_slice(raw);
        want.extend_from_slice(b"\r\n");
        assert_eq!(out, want);
        // A code alone; a header that only looks like one stays a header.
        let mut block = Vec::new();
        push_header(&mut block, "Sb-Status", "100").unwrap();
        assert_eq!(headers_len(&block), b"NATS/1.0 100\r\n\r\n".len());
        let mut block = Vec::new();
        push_header(&mut block, "Sb-Status", "busy").unwrap();
        assert_eq!(
            headers_len(&block),
            b"NATS/1.0\r\nSb-Status: busy\r\n\r\n".len()
        );
    }

    #[test]
    fn msg_and_no_responders_are_encoded_with_their_exact_length() {
        for (sid, reply, payload) in [
            (1, None, &b""[..]),
            (4_000_000_000, Some("_INBOX.a"), &[7u8; 1000][..]),
        ] {
            let m = Msg {
                subject: "a.b",
                sid,
                sid_name: None,
                reply,
                headers: &[],
                payload,
                no_responders: false,
            };
            let mut out = Vec::new();
            encode_msg(&mut out, &m);
            assert_eq!(out.len(), m.len());
            assert!(out.starts_with(format!("MSG a.b {sid} ").as_bytes()));
        }
        let m = Msg {
            subject: "_INBOX.x",
            sid: 3,
            sid_name: None,
            reply: None,
            headers: &[],
            payload: &[],
            no_responders: true,
        };
        let mut out = Vec::new();
        encode_msg(&mut out, &m);
        assert_eq!(out, b"HMSG _INBOX.x 3 16 16\r\nNATS/1.0 503\r\n\r\n\r\n");
        assert_eq!(out.len(), m.len());
        let m = Msg {
            subject: "a",
            sid: 1 << 31,
            sid_name: Some("orders-sub"),
            reply: None,
            headers: &[],
            payload: b"x",
            no_responders: false,
        };
        let mut out = Vec::new();
        encode_msg(&mut out, &m);
        assert_eq!(out, b"MSG a orders-sub 1\r\nx\r\n");
        assert_eq!(out.len(), m.len());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Parses every whole operation of `buf` the way the broker does
        /// (skipping oversized PUBs), returning them as text and what is left.
        fn all(buf: &[u8], max: usize) -> Result<(Vec<String>, usize), NatsError> {
            let mut at = 0;
            let mut ops = Vec::new();
            loop {
                match parse(&buf[at..], max)? {
                    Parsed::Op(o, n) => {
                        ops.push(format!("{o:?}"));
                        at += n;
                    }
                    Parsed::TooLarge { size, skip } => {
                        ops.push(format!("too large {size}"));
                        if buf.len() - at < skip {
                            return Ok((ops, buf.len() - at));
                        }
                        at += skip;
                    }
                    Parsed::Incomplete(need) => {
                        assert!(need > buf.len() - at, "asks for more than it has");
                        return Ok((ops, buf.len() - at));
                    }
                }
            }
        }

        fn op_text() -> impl Strategy<Value = String> {
            let word = "[a-z*>]{1,6}(\\.[a-z*>]{1,6}){0,3}";
            prop_oneof![
                Just("PING\r\n".to_string()),
                Just("pong\r\n".to_string()),
                Just("CONNECT {\"verbose\":true}\r\n".to_string()),
                (word, "[ -~]{0,40}").prop_map(|(s, p)| format!("PUB {s} {}\r\n{p}\r\n", p.len())),
                (word, word, "[a-z]{0,20}")
                    .prop_map(|(s, r, p)| format!("PUB {s} {r} {}\r\n{p}\r\n", p.len())),
                (word, "[A-Za-z-]{1,8}", "[a-z]{0,8}", "[a-z]{0,20}").prop_map(|(s, k, v, p)| {
                    let h = format!("NATS/1.0\r\n{k}: {v}\r\n\r\n");
                    format!("HPUB {s} {} {}\r\n{h}{p}\r\n", h.len(), h.len() + p.len())
                }),
                (word, 0u32..100000).prop_map(|(s, sid)| format!("SUB {s} {sid}\r\n")),
                (word, "[a-z]{1,5}", 0u32..100)
                    .prop_map(|(s, q, sid)| format!("SUB {s} {q} {sid}\r\n")),
                (0u32..1000, proptest::option::of(0u32..10)).prop_map(|(sid, m)| match m {
                    Some(m) => format!("UNSUB {sid} {m}\r\n"),
                    None => format!("UNSUB {sid}\r\n"),
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Reads split anywhere give the same operations as one read.
            #[test]
            fn operations_split_at_any_byte_parse_the_same(ops in proptest::collection::vec(op_text(), 1..8), cut in any::<proptest::sample::Index>()) {
                let all_bytes = ops.concat().into_bytes();
                let (whole, left) = all(&all_bytes, 30).unwrap();
                prop_assert_eq!(left, 0);
                prop_assert_eq!(whole.len(), ops.len());
                let cut = cut.index(all_bytes.len() + 1);
                let (first, rest) = all(&all_bytes[..cut], 30).unwrap();
                let consumed = cut - rest;
                // What a broker does with the rest once more bytes arrive
                // (an oversized PUB cut in its payload is skipped in full).
                let skip_over = first.last().is_some_and(|l| l.starts_with("too large")) && rest > 0;
                if !skip_over {
                    let (second, left) = all(&all_bytes[consumed..], 30).unwrap();
                    prop_assert_eq!(left, 0);
                    let mut joined = first.clone();
                    joined.extend(second);
                    prop_assert_eq!(joined, whole);
                }
            }

            /// Arbitrary bytes give an operation, a request for more or an
            /// error: never a panic, never a length past the buffer.
            #[test]
            fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
                if let Ok(Parsed::Op(_, n)) = parse(&buf, 100) {
                    prop_assert!(n <= buf.len());
                }
                let _ = headers_to_block(&buf);
            }
        }
    }
}
