//! Authentication of cluster routes with a shared secret
//! (`--cluster-secret`).
//!
//! The dialing broker puts a token in the route CONNECT's auth field:
//!
//! ```text
//! v1:<unix ms>:<nonce, 32 hex>:<HMAC-SHA256(secret, "sockbus-route-v1\n" node "\n" ms "\n" nonce), 64 hex>
//! ```
//!
//! The secret itself never crosses the wire. The accepting broker checks the
//! MAC (in constant time), that the time is within [`MAX_SKEW`] of its own
//! clock, and that it has not seen the nonce in that window (a recorded
//! CONNECT cannot be replayed). The secret authenticates the dialer to the
//! acceptor; that the acceptor is who the dialer meant, and privacy of what
//! the route carries, come from TLS on the route (docs/security.md).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a token's time may be from the acceptor's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// Most nonces remembered; beyond it the oldest are forgotten early (a
/// replay would then also need a time within [`MAX_SKEW`]).
const MAX_NONCES: usize = 100_000;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], node: &str, ms: u64, nonce: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"sockbus-route-v1\n");
    m.update(node.as_bytes());
    m.update(b"\n");
    m.update(ms.to_string().as_bytes());
    m.update(b"\n");
    m.update(nonce.as_bytes());
    m
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The token a broker named `node` sends when it dials a peer.
pub fn token(secret: &[u8], node: &str) -> String {
    token_at(secret, node, now_ms(), &hex(&rand::random::<[u8; 16]>()))
}

fn token_at(secret: &[u8], node: &str, ms: u64, nonce: &str) -> String {
    let tag = mac(secret, node, ms, nonce).finalize().into_bytes();
    format!("v1:{ms}:{nonce}:{}", hex(&tag))
}

/// Why a route was refused (logged and counted, never sent in detail).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no cluster secret in its handshake")]
    Missing,
    #[error("a malformed route token")]
    Malformed,
    #[error("a wrong cluster secret")]
    WrongSecret,
    #[error("a token {0} s away from this broker's clock (at most 60 s; check the clocks)")]
    Skew(i64),
    #[error("a replayed handshake (a nonce already seen)")]
    Replayed,
}

/// The acceptor's side: the secret and the nonces seen recently.
pub struct Verifier {
    secret: Vec<u8>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    map: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Verifier {
        Verifier {
            secret: secret.to_vec(),
            seen: Mutex::default(),
        }
    }

    /// Checks the token `node` sent in its route CONNECT.
    pub fn verify(&self, node: &str, token: &[u8]) -> Result<(), Refused> {
        self.verify_at(node, token, now_ms())
    }

    fn verify_at(&self, node: &str, token: &[u8], now: u64) -> Result<(), Refused> {
        if token.is_empty() {
            return Err(Refused::Missing);
        }
        let t = std::str::from_utf8(token).map_err(|_| Refused::Malformed)?;
        let mut parts = t.split(':');
        let (Some("v1"), Some(ms), Some(nonce), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refused::Malformed);
        };
        let ms: u64 = ms.parse().map_err(|_| Refused::Malformed)?;
        if nonce.len() != 32 || unhex(nonce).is_none() {
            return Err(Refused::Malformed);
        }
        let tag = unhex(tag).ok_or(Refused::Malformed)?;
        mac(&self.secret, node, ms, nonce)
            .verify_slice(&tag)
            .map_err(|_| Refused::WrongSecret)?;
        let skew = ms as i64 - now as i64;
        if skew.unsigned_abs() > MAX_SKEW.as_millis() as u64 {
            return Err(Refused::Skew(skew / 1000));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let window = 2 * MAX_SKEW.as_millis() as u64;
        while let Some((at, _)) = seen.order.front() {
            if *at + window >= now && seen.order.len() < MAX_NONCES {
                break;
            }
            let (_, n) = seen.order.pop_front().expect("front exists");
            seen.map.remove(&n);
        }
        if seen.map.contains_key(nonce) {
            return Err(Refused::Replayed);
        }
        seen.map.insert(nonce.to_string(), now);
        seen.order.push_back((now, nonce.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn a_token_from_the_same_secret_passes_once() {
        let v = Verifier::new(b"s3cret");
        let now = 1_700_000_000_000;
        let t = token_at(b"s3cret", "b-0", now, NONCE);
        assert_eq!(v.verify_at("b-0", t.as_bytes(), now + 10), Ok(()));
        assert_eq!(
            v.verify_at("b-0", t.as_bytes(), now + 20),
            Err(Refused::Replayed)
        );
        let fresh = token(b"s3cret", "b-0");
        assert_eq!(v.verify("b-0", fresh.as_bytes()), Ok(()));
    }

    #[test]
    fn a_wrong_secret_another_node_name_an_old_token_and_garbage_are_refused() {
        let v = Verifier::new(b"s3cret");
        let now = 1_700_000_000_000;
        let wrong = token_at(b"guess", "b-0", now, NONCE);
        assert_eq!(
            v.verify_at("b-0", wrong.as_bytes(), now),
            Err(Refused::WrongSecret)
        );
        // A token is bound to the node name it was made for.
        let t = token_at(b"s3cret", "b-0", now, NONCE);
        assert_eq!(
            v.verify_at("rogue", t.as_bytes(), now),
            Err(Refused::WrongSecret)
        );
        let old = token_at(b"s3cret", "b-0", now - 120_000, NONCE);
        assert_eq!(
            v.verify_at("b-0", old.as_bytes(), now),
            Err(Refused::Skew(-120))
        );
        assert_eq!(v.verify_at("b-0", b"", now), Err(Refused::Missing));
        for bad in [
            &b"s3cret"[..],
            b"v1:x:y:z",
            b"v2:1:00112233445566778899aabbccddeeff:00",
            b"v1:1:short:00",
            b"v1:1:00112233445566778899aabbccddeeff:zz",
            b"\xff\xfe",
        ] {
            assert_eq!(v.verify_at("b-0", bad, now), Err(Refused::Malformed));
        }
    }
}
