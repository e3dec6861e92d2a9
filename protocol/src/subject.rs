//! Subject validation and matching, with the same rules as NATS:
//! tokens separated by `.`, `*` matches exactly one token, `>` matches one or
//! more trailing tokens and may only stand last. A token is a wildcard only
//! when it is exactly `*` or `>`: `foo*`, `*bar` and `>-` are literal tokens,
//! valid in publish subjects and patterns alike, as nats-server has them.

use thiserror::Error;

/// Longest subject or pattern accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 4096;

/// Prefix of the one-time reply subjects clients make for requests
/// (`_INBOX.<client>.<request>`): each is used once, so the broker caches
/// their routes per client, not per subject, and does not track them per
/// subject.
pub const INBOX_PREFIX: &str = "_INBOX.";

/// Is `subject` (or pattern) under `_INBOX.`, where requests' replies go?
/// Streams never capture these (docs/storage.md, "Capture").
#[inline]
pub fn is_inbox(subject: &str) -> bool {
    subject.starts_with(INBOX_PREFIX)
}

/// Why a subject or pattern was refused. The text is meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject is longer than {MAX_SUBJECT_LEN} bytes")]
    TooLong,
    #[error("subject {0:?} has an empty token (leading, trailing or doubled '.')")]
    EmptyToken(String),
    #[error("subject {0:?} contains whitespace or a control character")]
    BadCharacter(String),
    #[error(
        "subject {0:?} contains a wildcard token ('*' or '>'); publish subjects must be literal"
    )]
    WildcardInPublish(String),
    #[error("subject {0:?}: '>' may only stand as the last token")]
    GreaterNotLast(String),
}

fn check_common(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong);
    }
    if s.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(SubjectError::BadCharacter(s.to_string()));
    }
    Ok(())
}

/// Validates a subject a message is published to: literal tokens only.
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    // One pass over the bytes, eight at a time, for the common, valid case
    // (this runs on every publish, in the SDK and in the broker); the
    // detailed checks below only name the error.
    if plainly_valid(s.as_bytes()) {
        return Ok(());
    }
    check_common(s)?;
    for tok in s.split('.') {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken(s.to_string()));
        }
        // Only a whole `*` or `>` token is a wildcard; `foo*` is literal.
        if tok == "*" || tok == ">" {
            return Err(SubjectError::WildcardInPublish(s.to_string()));
        }
    }
    Ok(())
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// 0x80 in each byte of `x` that is zero, 0 elsewhere (exact, no borrow
/// between bytes).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    let low7 = !HI;
    !(((x & low7).wrapping_add(low7)) | x | low7)
}

/// True when `b` is a non-empty publish subject of printable bytes with no
/// empty token and no `*` or `>` anywhere: by far the most common subject,
/// checked without a branch per byte. False says nothing (the caller
/// checks the slow way: `foo*` is still valid).
#[inline]
fn plainly_valid(b: &[u8]) -> bool {
    let n = b.len();
    if n == 0 || n > MAX_SUBJECT_LEN || b[0] == b'.' || b[n - 1] == b'.' {
        return false;
    }
    let mut bad = 0u64;
    // Bit 7 of byte i set when byte i is a '.'; carried across words so a
    // doubled '.' over a word boundary is seen.
    let mut prev_dot = 0u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        bad |= word_bad(w);
        let dots = zero_bytes(w ^ (LO * b'.' as u64));
        bad |= dots & ((dots << 8) | prev_dot);
        prev_dot = dots >> 56;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Pad with 'a' (a valid byte that is not a '.').
        let mut t = [b'a'; 8];
        t[..rest.len()].copy_from_slice(rest);
        let w = u64::from_le_bytes(t);
        bad |= word_bad(w);
        let dots = zero_bytes(w ^ (LO * b'.' as u64));
        bad |= dots & ((dots << 8) | prev_dot);
    }
    bad == 0
}

/// Nonzero when a byte of `w` is whitespace or a control byte (<= 0x20),
/// DEL, `*` or `>`.
#[inline(always)]
fn word_bad(w: u64) -> u64 {
    // Bytes below 0x21: x - 0x21 borrows into bit 7 only for them (bytes
    // with bit 7 set are masked off by !w, and are valid UTF-8 parts).
    let low = w.wrapping_sub(LO * 0x21) & !w & HI;
    low | zero_bytes(w ^ (LO * 0x7f))
        | zero_bytes(w ^ (LO * b'*' as u64))
        | zero_bytes(w ^ (LO * b'>' as u64))
}

/// Validates a subscription pattern: literal tokens, `*` tokens, and an optional final `>`.
pub fn validate_pattern(s: &str) -> Result<(), SubjectError> {
    check_common(s)?;
    let mut toks = s.split('.').peekable();
    while let Some(tok) = toks.next() {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken(s.to_string()));
        }
        // `*`, and any token that is not exactly a wildcard, is fine
        // anywhere; `foo*` and `>-` are literal tokens.
        if tok == ">" && toks.peek().is_some() {
            return Err(SubjectError::GreaterNotLast(s.to_string()));
        }
    }
    Ok(())
}

/// True when the pattern has a wildcard token.
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.split('.').any(|t| t == "*" || t == ">")
}

/// Does `pattern` (validated) match the literal `subject` (validated)?
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(pt), Some(st)) if pt == st => {}
            _ => return false,
        }
    }
}

/// FNV-1a 32-bit hash of a subject; carried in the frame header so a kernel
/// program can route by topic without parsing the body.
pub fn subject_hash(subject: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in subject {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_subjects_are_accepted_and_wildcards_refused_for_publish() {
        assert!(validate_subject("orders.eu.created").is_ok());
        assert!(validate_subject("a").is_ok());
        assert_eq!(validate_subject(""), Err(SubjectError::Empty));
        assert!(matches!(
            validate_subject("a..b"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject(".a"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject("a."),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject("a b"),
            Err(SubjectError::BadCharacter(_))
        ));
        assert!(matches!(
            validate_subject("a\tb"),
            Err(SubjectError::BadCharacter(_))
        ));
        assert!(matches!(
            validate_subject("a.*"),
            Err(SubjectError::WildcardInPublish(_))
        ));
        assert!(matches!(
            validate_subject("a.>"),
            Err(SubjectError::WildcardInPublish(_))
        ));
    }

    #[test]
    fn patterns_follow_nats_rules() {
        assert!(validate_pattern("a.*.c").is_ok());
        assert!(validate_pattern("a.>").is_ok());
        assert!(validate_pattern(">").is_ok());
        assert!(validate_pattern("*").is_ok());
        assert!(matches!(
            validate_pattern("a.>.c"),
            Err(SubjectError::GreaterNotLast(_))
        ));
        assert!(matches!(
            validate_pattern(">.a"),
            Err(SubjectError::GreaterNotLast(_))
        ));
        assert!(matches!(
            validate_pattern("a..*"),
            Err(SubjectError::EmptyToken(_))
        ));
    }

    #[test]
    fn matching_semantics() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*", "one"));
        assert!(!matches("*", "one.two"));
    }

    /// The word-at-a-time check agrees with a byte-at-a-time one on every
    /// subject made of bytes that matter, at every length and alignment.
    #[test]
    fn the_fast_check_agrees_with_the_plain_rules() {
        fn slow(b: &[u8]) -> bool {
            !b.is_empty()
                && b.len() <= MAX_SUBJECT_LEN
                && b[0] != b'.'
                && b[b.len() - 1] != b'.'
                && !b.windows(2).any(|w| w[0] == b'.' && w[1] == b'.')
                && b.iter()
                    .all(|&c| c > b' ' && c != 0x7f && c != b'*' && c != b'>')
        }
        let alphabet = [
            b'a', b'.', b'*', b'>', b' ', 0x00, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0xc3, 0xff, b'Z',
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let mut v = Vec::with_capacity(len);
            let mut r = seed;
            for i in 0..len {
                // Mostly valid bytes, so long valid runs with one bad byte
                // (or one doubled '.') anywhere are common.
                let pick = (r % 64) as usize;
                v.push(if pick < alphabet.len() {
                    alphabet[pick]
                } else {
                    b'a' + (i % 26) as u8
                });
                r = r.rotate_right(5) ^ seed.wrapping_mul(i as u64 + 1);
            }
            assert_eq!(plainly_valid(&v), slow(&v), "{v:?}");
        }
        let long = "a".repeat(MAX_SUBJECT_LEN + 1);
        assert!(!plainly_valid(long.as_bytes()));
        assert!(plainly_valid(&long.as_bytes()[1..]));
        for split in 1..18 {
            let mut s = "x".repeat(20);
            s.replace_range(split..split + 1, ".");
            s.replace_range(split + 1..split + 2, ".");
            assert!(!plainly_valid(s.as_bytes()), "{s}");
        }
    }

    /// Cases after nats-server's sublist tests (TestSublistValidLiteralSubjects,
    /// TestSublistValidSubjects, TestSublistMatchLiterals): a token is a
    /// wildcard only when it is exactly `*` or `>`.
    #[test]
    fn partial_wildcards_are_literal_tokens_as_in_nats() {
        for lit in [
            "foo*", "*bar", "foo.*bar", "foo.bar*", ">-", "foo.>-", "foo.a>b", "*>", "**", ">>",
        ] {
            assert_eq!(validate_subject(lit), Ok(()), "publish {lit}");
            assert_eq!(validate_pattern(lit), Ok(()), "pattern {lit}");
            assert!(!is_wildcard(lit), "{lit}");
        }
        for wild in ["*", ">", "foo.*", "foo.>", "*.bar", "foo.*.bar"] {
            assert!(validate_subject(wild).is_err(), "publish {wild}");
            assert_eq!(validate_pattern(wild), Ok(()), "pattern {wild}");
        }
        for bad in [
            "foo.>.bar",
            ">.foo",
            "foo..bar",
            ".foo",
            "foo.",
            "foo bar",
            "foo\tbar",
        ] {
            assert!(validate_pattern(bad).is_err(), "pattern {bad}");
        }
        // Literal tokens with wildcard characters match only themselves.
        assert!(matches("foo.*", "foo.*bar"));
        assert!(matches("foo.>", "foo.bar*.baz"));
        assert!(matches("foo.*bar", "foo.*bar"));
        assert!(!matches("foo.*bar", "foo.xbar"));
        assert!(!matches("foo.bar*", "foo.bar"));
        assert!(!matches("foo.bar*", "foo.barbaz"));
        assert!(matches(">-", ">-"));
        assert!(!matches(">-", "anything"));
        assert!(matches("*", ">-"));
        assert!(matches("foo.*", "foo.>>"));
    }
}
