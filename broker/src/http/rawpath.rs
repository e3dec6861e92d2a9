//! Lets `>` stand unencoded in a request target, as users type it
//! (`curl .../v1/subscribe/orders.>`). hyper parses the request target
//! with the `http` crate, which refuses `>` in a path or query (the URL
//! standard says to percent-encode it) and answers 400 before any route
//! sees it. So the connection's bytes go through [`RawPath`], which follows
//! HTTP/1.1 message framing just far enough to find each request line and
//! percent-encodes a raw `>` in its target as `%3E`; the routes
//! percent-decode it back.
//!
//! Only request targets are touched: header bytes and bodies pass as they
//! are. Bodies are skipped by their `Content-Length`; after a chunked
//! body, or framing this scanner does not follow exactly as hyper does
//! (a repeated or unparsable `Content-Length`), it stops rewriting for the
//! rest of the connection, so a later raw `>` is answered 400 as before,
//! and a body byte is never changed. Costs one pass over request heads, no
//! copy of bodies, and an allocation only when there is a `>` to encode.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What replaces a raw `>` in a request target.
const ENCODED: &[u8] = b"%3E";
/// Most bytes of a header line kept to read `Content-Length` and
/// `Transfer-Encoding`; a longer line of either makes the scanner give up.
const HEADER_PREFIX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line; empty lines are skipped (as httparse does).
    Start,
    Method,
    /// The request target (path and query): a raw `>` here is encoded.
    Target,
    /// The rest of the request line: fragment, version.
    Line,
    /// Header lines, up to the empty line ending the head.
    Headers,
    /// This many body bytes follow.
    Body(u64),
    /// Framing not followed: nothing more is rewritten on this connection.
    Passthrough,
}

/// The sans-IO part: fed the connection's bytes in order, it says which of
/// them are a raw `>` in a request target.
#[derive(Debug)]
pub(super) struct Scanner {
    state: State,
    /// The start of the current header line (see [`HEADER_PREFIX`]).
    line: [u8; HEADER_PREFIX],
    line_len: usize,
    /// The current header line is longer than `line`.
    line_long: bool,
    content_length: Option<u64>,
    chunked: bool,
    /// A `Content-Length` this scanner cannot be sure to read as hyper does.
    unsure: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Start,
            line: [0; HEADER_PREFIX],
            line_len: 0,
            line_long: false,
            content_length: None,
            chunked: false,
            unsure: false,
        }
    }
}

impl Scanner {
    /// Scans the next bytes of the connection; pushes onto `marks` the
    /// index (in `input`) of every `>` to encode.
    pub(super) fn scan(&mut self, input: &[u8], marks: &mut Vec<usize>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Passthrough => return,
                State::Body(n) => {
                    let skip = n.min((input.len() - i) as u64);
                    i += skip as usize;
                    self.state = if skip == n {
                        State::Start
                    } else {
                        State::Body(n - skip)
                    };
                    continue;
                }
                _ => {}
            }
            let b = input[i];
            match self.state {
                State::Start => {
                    if b != b'\r' && b != b'\n' {
                        self.state = State::Method;
                    }
                }
                State::Method => match b {
                    b' ' => self.state = State::Target,
                    b'\n' => self.state = State::Headers,
                    _ => {}
                },
                State::Target => match b {
                    b'>' => marks.push(i),
                    b' ' | b'#' => self.state = State::Line,
                    b'\n' => self.state = State::Headers,
                    _ => {}
                },
                State::Line => {
                    if b == b'\n' {
                        self.state = State::Headers;
                    }
                }
                State::Headers => {
                    if b == b'\n' {
                        self.end_header_line();
                    } else if self.line_len < HEADER_PREFIX {
                        self.line[self.line_len] = b;
                        self.line_len += 1;
                    } else {
                        self.line_long = true;
                    }
                }
                State::Body(_) | State::Passthrough => unreachable!("handled above"),
            }
            i += 1;
        }
    }

    fn end_header_line(&mut self) {
        let mut line = &self.line[..self.line_len];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.is_empty() && !self.line_long {
            // The end of the head: the body, if any, comes next.
            self.state = if self.chunked || self.unsure {
                State::Passthrough
            } else {
                match self.content_length {
                    Some(n) if n > 0 => State::Body(n),
                    _ => State::Start,
                }
            };
            self.content_length = None;
            self.chunked = false;
            self.unsure = false;
        } else {
            let (name, value) = match line.iter().position(|&c| c == b':') {
                Some(c) => (&line[..c], Some(&line[c + 1..])),
                None => (line, None),
            };
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                self.chunked = true;
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let n = value
                    .filter(|_| !self.line_long && self.content_length.is_none())
                    .map(|v| v.trim_ascii())
                    .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_digit))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                match n {
                    Some(n) => self.content_length = Some(n),
                    None => self.unsure = true,
                }
            } else if self.line_long
                && (line.len() >= 14 && line[..14].eq_ignore_ascii_case(b"content-length")
                    || line.len() >= 17 && line[..17].eq_ignore_ascii_case(b"transfer-encoding"))
            {
                self.unsure = true;
            }
        }
        self.line_len = 0;
        self.line_long = false;
    }
}

/// A connection whose request targets may hold a raw `>` (see the module docs).
pub(super) struct RawPath<T> {
    io: T,
    scanner: Scanner,
    marks: Vec<usize>,
    /// Rewritten bytes that did not fit the reader's buffer: they go first.
    spill: Vec<u8>,
    spilled: usize,
}

impl<T> RawPath<T> {
    pub(super) fn new(io: T) -> Self {
        RawPath {
            io,
            scanner: Scanner::default(),
            marks: Vec::new(),
            spill: Vec::new(),
            spilled: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RawPath<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.spilled < this.spill.len() {
            let n = buf.remaining().min(this.spill.len() - this.spilled);
            buf.put_slice(&this.spill[this.spilled..this.spilled + n]);
            this.spilled += n;
            if this.spilled == this.spill.len() {
                this.spill.clear();
                this.spilled = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.marks.clear();
        this.scanner.scan(&buf.filled()[before..], &mut this.marks);
        if this.marks.is_empty() {
            return Poll::Ready(Ok(()));
        }
        // Rare: a raw `>` to encode. The bytes grow, so what does not fit
        // the reader's buffer waits in `spill`.
        let fresh = &buf.filled()[before..];
        let mut out = std::mem::take(&mut this.spill);
        out.reserve(fresh.len() + this.marks.len() * (ENCODED.len() - 1));
        let mut from = 0;
        for &m in &this.marks {
            out.extend_from_slice(&fresh[from..m]);
            out.extend_from_slice(ENCODED);
            from = m + 1;
        }
        out.extend_from_slice(&fresh[from..]);
        buf.set_filled(before);
        let n = buf.remaining().min(out.len());
        buf.put_slice(&out[..n]);
        if n < out.len() {
            this.spilled = n;
            this.spill = out;
        } else {
            out.clear();
            this.spill = out;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RawPath<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the scanner makes of `input` fed in pieces cut at `cuts`.
    fn rewrite(input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut s = Scanner::default();
        let mut out = Vec::new();
        let mut marks = Vec::new();
        let mut at = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        ends.sort();
        ends.push(input.len());
        for end in ends {
            let piece = &input[at..end.max(at)];
            marks.clear();
            s.scan(piece, &mut marks);
            let mut from = 0;
            for &m in &marks {
                assert_eq!(piece[m], b'>');
                out.extend_from_slice(&piece[from..m]);
                out.extend_from_slice(ENCODED);
                from = m + 1;
            }
            out.extend_from_slice(&piece[from..]);
            at = end.max(at);
        }
        out
    }

    fn text(input: &str) -> String {
        String::from_utf8(rewrite(input.as_bytes(), &[])).unwrap()
    }

    #[test]
    fn a_raw_gt_is_encoded_in_request_targets_only() {
        assert_eq!(
            text("GET /v1/subscribe/a.>?queue=> HTTP/1.1\r\nx-h: >\r\n\r\n"),
            "GET /v1/subscribe/a.%3E?queue=%3E HTTP/1.1\r\nx-h: >\r\n\r\n"
        );
        assert_eq!(
            text("\r\nGET />>#> HTTP/1.1\n\nGET /> HTTP/1.1\r\n\r\n"),
            "\r\nGET /%3E%3E#> HTTP/1.1\n\nGET /%3E HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_skipped_by_their_content_length() {
        let body = "GET /> HTTP/1.1\r\n\r\n>";
        let req = format!(
            "POST /a> HTTP/1.1\r\nContent-Length:  {} \r\n\r\n{body}GET /b> HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(
            text(&req),
            format!(
                "POST /a%3E HTTP/1.1\r\nContent-Length:  {} \r\n\r\n{body}GET /b%3E HTTP/1.1\r\n\r\n",
                body.len()
            )
        );
    }

    #[test]
    fn framing_it_does_not_follow_stops_all_rewriting() {
        for head in [
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: 1, 1\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        ] {
            let req = format!("{head}1\r\n>\r\n0\r\n\r\nGET /> HTTP/1.1\r\n\r\n");
            assert_eq!(text(&req), req, "{head:?}");
        }
        let long = format!(
            "POST /a HTTP/1.1\r\ncontent-length: {}1\r\n\r\nx GET /> HTTP/1.1\r\n\r\n",
            "0".repeat(100)
        );
        assert_eq!(text(&long), long);
    }

    /// One request: a path with wildcards, a query, headers, a body that
    /// may look like anything.
    fn request() -> impl Strategy<Value = (String, String, Vec<u8>, bool)> {
        (
            "/[a-z.*>$%0-9]{0,12}",
            "(\\?[a-z=>]{0,6})?",
            proptest::collection::vec(
                prop_oneof![
                    Just(b'>'),
                    Just(b'\r'),
                    Just(b'\n'),
                    Just(b' '),
                    any::<u8>()
                ],
                0..40,
            ),
            any::<bool>(),
        )
            .prop_map(|(path, query, body, crlf)| (path, query, body, crlf))
    }

    proptest! {
        #[test]
        fn only_target_gts_change_however_the_bytes_arrive(
            reqs in proptest::collection::vec(request(), 1..5),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let (mut input, mut want) = (Vec::new(), Vec::new());
            for (path, query, body, crlf) in &reqs {
                let nl = if *crlf { "\r\n" } else { "\n" };
                let head = |target: &str| {
                    format!("POST {target} HTTP/1.1{nl}Host: x{nl}content-length: {}{nl}x-gt: >{nl}{nl}", body.len())
                };
                let target = format!("{path}{query}");
                input.extend_from_slice(head(&target).as_bytes());
                input.extend_from_slice(body);
                want.extend_from_slice(head(&target.replace('>', "%3E")).as_bytes());
                want.extend_from_slice(body);
            }
            prop_assert_eq!(rewrite(&input, &cuts), want);
        }
    }
}
