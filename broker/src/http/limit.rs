//! Connections over `--http-max-connections`: they get no hyper connection
//! and hold no slot. A short task reads the request line, answers the
//! probes (`GET`/`HEAD` `/healthz` and `/readyz`) as the routes do, so a
//! kubelet does not restart or unlist a broker that is merely busy, and
//! answers anything else 503 with `retry-after: 1`; then it closes.
//!
//! Bounded under attack: at most [`MAX_ANSWERING`] such tasks at once
//! (beyond that a connection is closed unanswered), each reading at most
//! [`REQUEST_LINE_MAX`] bytes and living at most [`ANSWER_WITHIN`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::routes::{self, Route};
use super::Gateway;

/// Connections over the limit that may be answered at once.
pub(super) const MAX_ANSWERING: usize = 256;
/// A request line longer than this is no probe (kubelet's is ~30 bytes).
const REQUEST_LINE_MAX: usize = 256;
/// Time for the request line to arrive; without it the answer is 503.
const REQUEST_LINE_WITHIN: Duration = Duration::from_millis(500);
/// Time for the whole exchange, answer and close included.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

const REFUSAL: &str = "{\"error\":\"the broker is at its HTTP connection limit\"}\n";

/// Answers one connection over the limit, then closes it; `_slot` is its
/// place among the [`MAX_ANSWERING`].
pub(super) async fn answer(gw: Arc<Gateway>, mut stream: TcpStream, _slot: OwnedSemaphorePermit) {
    let start = Instant::now();
    let mut line = [0u8; REQUEST_LINE_MAX];
    let mut n = 0;
    let _ = tokio::time::timeout(REQUEST_LINE_WITHIN, async {
        while n < line.len() && !line[..n].contains(&b'\n') {
            match stream.read(&mut line[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
    })
    .await;
    let resp = match probe_of(&line[..n]) {
        Some((route, head_only)) => {
            let (status, body) = routes::probe(&gw, route);
            gw.metrics.observe(route, status, start.elapsed());
            let mut body = serde_json::to_vec(&body).unwrap_or_default();
            body.push(b'\n');
            response(status, &body, head_only, "")
        }
        None => {
            gw.metrics.refused();
            response(
                StatusCode::SERVICE_UNAVAILABLE,
                REFUSAL.as_bytes(),
                false,
                "retry-after: 1\r\n",
            )
        }
    };
    // The rest of the request is read and dropped until the client closes:
    // closing with unread bytes would reset the connection and could
    // destroy the answer before the client reads it.
    let _ = tokio::time::timeout(
        ANSWER_WITHIN.saturating_sub(start.elapsed()),
        crate::transport::refuse(&mut stream, &resp),
    )
    .await;
}

/// The probe a request asks for, from its first bytes: the route, and
/// whether the method is HEAD (no body). None for anything else,
/// including a request line that is not complete.
fn probe_of(head: &[u8]) -> Option<(Route, bool)> {
    let start = head.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let head = &head[start..];
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match Route::of(path).0 {
        r @ (Route::Healthz | Route::Readyz) => Some((r, head_only)),
        _ => None,
    }
}

fn response(status: StatusCode, body: &[u8], head_only: bool, extra: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_probe_request_lines_are_probes() {
        let p = |s: &str| probe_of(s.as_bytes());
        assert_eq!(
            p("GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            Some((Route::Healthz, false))
        );
        assert_eq!(p("HEAD /readyz HTTP/1.0\n"), Some((Route::Readyz, true)));
        assert_eq!(
            p("\r\nGET /readyz?full=1 HTTP/1.1\r\n"),
            Some((Route::Readyz, false))
        );
        for no in [
            "GET /healthz HTTP/1.1",
            "POST /healthz HTTP/1.1\r\n",
            "GET /healthz/ HTTP/1.1\r\n",
            "GET /metrics HTTP/1.1\r\n",
            "GET /v1/publish/healthz HTTP/1.1\r\n",
            "GET  /healthz HTTP/1.1\r\n",
            "GET /healthz HTTP/1.1 x\r\n",
            "GET /healthz SPDY/3\r\n",
            "",
        ] {
            assert_eq!(p(no), None, "{no:?}");
        }
    }

    #[test]
    fn answers_are_complete_http_responses() {
        let r = response(StatusCode::OK, b"{}\n", false, "");
        assert_eq!(
            r,
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\nconnection: close\r\n\r\n{}\n"
        );
        let r = response(StatusCode::OK, b"{}\n", true, "");
        assert!(r.ends_with(b"content-length: 3\r\nconnection: close\r\n\r\n"));
    }
}
